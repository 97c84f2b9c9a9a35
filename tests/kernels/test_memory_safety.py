"""No index value makes a kernel read or write outside its tensors, with the value checks
off: out-of-range indices are refused by a range check that cannot be switched off, and
repeated indices (not a permutation, a unit kept twice) give finite numbers, never a crash."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from padst_compiler.kernels import NM, Block, Diagonal, implementations, result_buffers, set_checks
from padst_compiler.kernels.cpu import native
from padst_compiler.kernels.eager import select
from .markers import needs_native
from .reference import dense_reference


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


@needs_native
@pytest.mark.parametrize("structure,prefix", [(Block(16, 16), "block"), (NM(8), "nm"), (Diagonal(), "diag")],
                         ids=["block", "nm", "diag"])
@pytest.mark.parametrize("tokens", [1, 16, 300])  # few-token kernels, output split across threads, tiles
@pytest.mark.parametrize("implementation", ["native", "native-sliced", "native-streamed", "native-packed"])
def test_native_kernels_write_every_column_through_a_repeated_out_index(structure, prefix, tokens,
                                                                       implementation):
    """Output maps are gathers: with the checks off a repeated out_index still writes every
    column (here exactly ``z[:, out_index]``), so no result needs zeroing first and none can
    show what its memory held before (a NaN-filled buffer here); the same for an input
    gradient through a repeated in_index."""
    weight = structure.project(torch.randn(64, 128), 0.75)
    values = weight.values.detach()
    x, grad = torch.randn(tokens, 128), torch.randn(tokens, 64)
    out_index, in_index = torch.tensor([0, 0, *range(2, 64)]), torch.tensor([5, 5, *range(2, 128)])
    with set_checks(False), torch.no_grad(), select.only(implementation):
        with result_buffers.planned(torch.full((tokens, 64), float("nan"))):
            y = getattr(implementations, f"{prefix}_forward")(x, values, weight.index, 64, None, None, out_index)
        with result_buffers.planned(torch.full((tokens, 128), float("nan"))):
            dx = getattr(implementations, f"{prefix}_grad_input")(grad, values, weight.index, 128, in_index, None)
    torch.testing.assert_close(y, dense_reference(structure, x, values, weight.index, 64, None, None, out_index))
    assert dx.isfinite().all()


def test_the_native_result_buffer_is_handed_over_as_planned():
    """No pass over the result before the kernel writes it, whatever the checks say."""
    x, planned = torch.randn(3, 8), torch.full((3, 16), 7.0)
    for checks in (False, True):
        with set_checks(checks), result_buffers.planned(planned):
            assert native.output_buffer(x, 16) is planned
        assert torch.equal(planned, torch.full((3, 16), 7.0))
