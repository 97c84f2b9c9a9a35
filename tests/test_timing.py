"""The benchmark timer: interleaved single calls, more rounds for fast candidates."""

import time

import pytest

from padst_compiler.timing import interleaved_medians


def _counting(seconds):
    calls = []

    def fn():
        calls.append(1)
        time.sleep(seconds)
    return fn, calls


def test_fast_candidates_get_rounds_until_the_time_is_covered_and_slow_ones_get_repeats():
    fast, fast_calls = _counting(0)
    medians = interleaved_medians({"fast": fast}, repeats=3, warmup=1, min_seconds=0.02)
    assert len(fast_calls) > 50 and medians["fast"] < 1e-3  # warm-up and timed rounds both ran past 3

    slow, slow_calls = _counting(0.03)
    other, other_calls = _counting(0)
    medians = interleaved_medians({"slow": slow, "other": other}, repeats=3, warmup=1, min_seconds=0.02)
    assert len(slow_calls) == len(other_calls) == 1 + 3  # interleaved: every round calls both
    assert 0.03 <= medians["slow"] < 0.1 and medians["other"] < medians["slow"]


def test_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        interleaved_medians({"a": lambda: None}, repeats=0)


def test_machine_names_the_processor_its_vector_width_and_threads(monkeypatch):
    import torch

    from padst_compiler import timing

    monkeypatch.setattr(timing.Path, "read_text", lambda self: "model name\t: Some CPU 9000\nflags\t\t: fpu avx2 fma\n")
    assert timing.machine() == f"Some CPU 9000, AVX2, {torch.get_num_threads()} threads"
    monkeypatch.setattr(timing.Path, "read_text", lambda self: "model name\t: Other\nflags\t: avx2 avx512f\n")
    assert timing.machine().startswith("Other, AVX-512, ")
