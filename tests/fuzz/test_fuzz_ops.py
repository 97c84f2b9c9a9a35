"""Fuzzing the raw ``torch.ops.padst`` ops.

In process: random valid calls (structure, shape, sparsity, fp32/fp64, batch shapes with
zeros and none, bias, fused input/output permutations, memory layouts, each
implementation) against the dense reference, forward and both backward ops.

In a subprocess (``op_worker.py``): random index values, dtypes, shapes and layouts with
the value checks on and off; every call must be refused with a ``padst::`` ValueError,
give finite numbers (repeats with the checks off) or the reference's numbers, and the
process must not crash.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given

from .op_cases import budget, cases, check_valid_case, profile_env

pytestmark = pytest.mark.fuzz


@budget(3.0)
@given(case=cases())
def test_valid_calls_match_the_dense_reference(case):
    check_valid_case(case)


def test_adversarial_calls_never_crash_and_are_refused_or_right():
    worker = Path(__file__).with_name("op_worker.py")
    done = subprocess.run([sys.executable, str(worker)], env=profile_env(), capture_output=True, text=True,
                          timeout=3600)
    # a negative return code is a signal: -11 a segfault, -6 an abort; the last "step" line names the call
    assert done.returncode == 0, (done.returncode, done.stdout[-6000:], done.stderr[-6000:])
    summary = done.stdout.strip().splitlines()[-1]
    print(summary)
    assert " examples, " in summary
