"""Test-session settings shared by every test module."""

import os

import torch
from hypothesis import HealthCheck, settings

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers on two cores: more OpenMP threads per worker only spin against each
    # other (a 12 ms matmul was seen to take 1.6 s that way).
    torch.set_num_threads(1)

# Hypothesis profiles. "default" is what a plain `pytest` (and CI) runs: few examples, the
# same ones on every run (derandomized, no example database), so a CI failure reproduces
# anywhere. "long" is the fuzzing run: `pytest -m fuzz --hypothesis-profile=long`.
# Tests under tests/fuzz/ take their example counts from the loaded profile (their
# subprocess workers get it through HYPOTHESIS_PROFILE).
_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("default", max_examples=40, derandomize=True, database=None, deadline=None,
                          print_blob=True, suppress_health_check=_SLOW_IS_FINE)
settings.register_profile("long", max_examples=1500, derandomize=False, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_IS_FINE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config):
    config.addinivalue_line("markers", "fuzz: property-based fuzzing of the public API (tests/fuzz); short by "
                                       "default, `pytest -m fuzz --hypothesis-profile=long` for a long run")
