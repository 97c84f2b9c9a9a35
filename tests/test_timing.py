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
    assert len(slow_calls) == len(other_calls) == 1 + 2 * 3  # interleaved, a lead-in call before each timed one
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


def test_the_lead_in_call_keeps_a_candidate_from_paying_for_the_one_before_it():
    last = []

    def heavy():
        last.append("heavy")

    def after():  # slow right after the other candidate, as a step after a dense step that freed its memory
        time.sleep(0.03 if last and last[-1] == "heavy" else 0.001)
        last.append("after")

    candidates = {"heavy": heavy, "after": after}
    assert interleaved_medians(candidates, repeats=3, min_seconds=0)["after"] < 0.02
    assert interleaved_medians(candidates, repeats=3, min_seconds=0, lead_in=False)["after"] >= 0.03


def test_each_round_starts_one_candidate_further_on():
    """No candidate always runs right after the same other one (a step timed after the dense
    model's paid for the memory that step freed, even after its lead-in call)."""
    from padst_compiler.timing import interleaved_samples

    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    interleaved_samples(candidates, repeats=4, warmup=1, min_seconds=0, lead_in=False)
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab" + "abc"


def test_samples_are_per_round_and_a_paired_ratio_keeps_still_through_a_slow_phase():
    import statistics

    from padst_compiler.timing import interleaved_samples, paired_ratio

    calls = []
    slow_from = 2 + 2 * 2 + 1  # after a warm-up round of both: from `single` in the third timed round on

    def sleeping(name, seconds):
        def fn():  # the machine turns 3x slower and stays so
            time.sleep(seconds * (3 if len(calls) >= slow_from else 1))
            calls.append(name)
        return fn

    samples = interleaved_samples({"double": sleeping("double", 0.004), "single": sleeping("single", 0.002)},
                                  repeats=5, warmup=1, min_seconds=0, lead_in=False)
    assert len(samples["double"]) == len(samples["single"]) == 5
    assert paired_ratio(samples["double"], samples["single"]) == pytest.approx(2, rel=0.25)
    # medians taken apart see `double` fast (2 slow rounds of 5) and `single` slow (3 of 5)
    assert statistics.median(samples["double"]) / statistics.median(samples["single"]) < 1
    with pytest.raises(ValueError, match="same non-zero length, got 5 and 4"):
        paired_ratio(samples["double"], samples["single"][:4])
