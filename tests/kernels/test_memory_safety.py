"""No index value makes a kernel read or write outside its tensors, with the value checks
off: out-of-range indices are refused by a range check that cannot be switched off, and
repeated indices (not a permutation, a unit kept twice) give finite numbers, never a crash."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from padst_compiler.kernels import Block, set_checks


def test_bad_indices_never_crash_any_op_or_implementation():
    script = Path(__file__).with_name("bad_index_cases.py")
    env = {**os.environ, "PADST_CHECKS": "0"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.returncode, done.stdout[-3000:], done.stderr[-3000:])  # -11: a segfault
    assert done.stdout.strip().splitlines()[-1] == "810 cases, 0 failures"


def test_the_range_check_names_the_op_and_index_and_runs_with_checks_off():
    weight = Block(8, 8).project(torch.randn(64, 64), 0.75)
    index = weight.index.clone()
    index[0, 0] = 1 << 40
    with set_checks(False):
        try:
            torch.ops.padst.block_linear(torch.randn(3, 64), weight.values, index, 64)
        except ValueError as error:
            assert str(error) == "padst::block_linear: index (column blocks) holds 1099511627776, outside [0, 8)"
        else:
            raise AssertionError("an index outside its tensor was accepted")
