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
