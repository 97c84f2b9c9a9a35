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


def test_native_outputs_start_zeroed_when_a_repeated_out_index_could_leave_holes():
    """The native kernels scatter output columns through out_index's inverse: with the checks
    off a repeated entry leaves columns unwritten, which must read as zeros, not as whatever
    the allocator held (bad_index_cases caught NaNs there, in a few runs out of ten)."""
    from padst_compiler.kernels import result_buffers
    from padst_compiler.kernels.cpu import native

    x, repeated = torch.randn(3, 8), torch.tensor([0, 0, *range(2, 16)])
    with set_checks(False), result_buffers.planned(torch.full((3, 16), 7.0)):
        assert torch.equal(native.output_buffer(x, 16, repeated), torch.zeros(3, 16))
    assert native.output_buffer(x, 16, None).shape == (3, 16)


def test_native_outputs_scattered_through_a_permutation_are_not_zero_filled():
    """A permutation leaves no hole: zeroing the result would be a pass over it on every call
    (the input gradients of a permuted model's layers, with the checks off)."""
    from padst_compiler.kernels import result_buffers
    from padst_compiler.kernels.cpu import native

    x, planned = torch.randn(3, 8), torch.full((3, 16), 7.0)
    for checks in (False, True):
        with set_checks(checks), result_buffers.planned(planned):
            assert native.output_buffer(x, 16, torch.randperm(16)) is planned
        assert torch.equal(planned, torch.full((3, 16), 7.0))
