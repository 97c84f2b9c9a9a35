"""The Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``, against the dense reference.

Triton decides at import whether ``@triton.jit`` compiles or interprets, for its own
library functions too, so these cases need a process started with the variable set:
``test_triton.py`` runs this file in one (``TRITON_INTERPRET=1 pytest <this file>`` works too).
"""

import os

import pytest
import torch

from padst_compiler.kernels import NM, Block, Diagonal

from .reference import dense_reference

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

from .triton_inputs import BIAS, IN, OUT, case_id, kernel_results, make_inputs  # noqa: E402  (after the check)

# (structure, launcher prefix, (out, in), tokens, fused extras). The kernels read both
# permutations and the bias through separate flags, so each flag is on in some case and
# off in another; 70 tokens is more than one split of the values-gradient reduction.
CASES = [
    (Block(16, 16), "block", (64, 128), 33, {BIAS, IN, OUT}),
    (Block(16, 16), "block", (128, 64), 70, set()),
    (Block(8, 8), "block", (64, 128), 5, {BIAS, IN, OUT}),
    (Block(8, 8), "block", (128, 64), 33, {IN}),
    (Block(32, 16), "block", (128, 64), 33, {BIAS, IN, OUT}),
    (Block(32, 16), "block", (64, 128), 5, {OUT}),
    (NM(4), "nm", (64, 128), 33, {BIAS, IN, OUT}),
    (NM(4), "nm", (128, 64), 5, set()),
    (NM(8), "nm", (128, 64), 70, {BIAS, IN, OUT}),
    (NM(8), "nm", (64, 128), 5, {BIAS, IN}),
    (Diagonal(), "diag", (64, 128), 33, {BIAS, IN, OUT}),
    (Diagonal(), "diag", (128, 64), 70, {OUT}),
    (Diagonal(), "diag", (64, 128), 5, set()),
]


def reference_results(structure, weight, x, grad, bias, in_index, out_index):
    """y, dx and dvalues of the masked dense matmul, through autograd."""
    x, values = x.double().requires_grad_(), weight.values.double().requires_grad_()
    bias = None if bias is None else bias.double()
    y = dense_reference(structure, x, values, weight.index, grad.shape[1], bias, in_index, out_index)
    y.backward(grad.double())
    return y.detach(), x.grad, values.grad


def check_against_reference(case, dtype, **tolerance):
    structure, prefix, (out_features, in_features), tokens, extras = case
    inputs = make_inputs(structure, out_features, in_features, tokens, extras)
    got = kernel_results(prefix, *inputs, dtype)
    want = reference_results(structure, *inputs)
    for name, g, w in zip(("y", "dx", "dvalues"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, **tolerance, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float32_matches_dense_reference(case):
    check_against_reference(case, torch.float32, atol=1e-4, rtol=1e-4)


# tl.dot on bfloat16 is not supported by the interpreter (it multiplies the bit patterns,
# triton-lang/triton#11584), so bfloat16 runs only where the kernels use no tl.dot:
# blocks smaller than 16 and the row-sparse kernels.
HALF_CASES = [(case, torch.float16) for case in CASES[::2]] + \
             [(case, torch.bfloat16) for case in CASES if case[1] != "block" or case[0].rows < 16]


@pytest.mark.parametrize("case,dtype", HALF_CASES, ids=lambda v: case_id(v) if isinstance(v, tuple) else str(v))
def test_half_precision_matches_dense_reference(case, dtype):
    # the tolerance covers rounding the 16-bit inputs and outputs
    check_against_reference(case, dtype, atol=0.1, rtol=0.02)


# Index values no range check has seen, as a graph compiled by Inductor hands them to the
# kernels: far outside, negative, one block or feature past the end. Every address taken from
# an index value is masked, so nothing outside the tensors is read or written (a wild read
# of 1 << 40 elements would crash this process) and what the kernels return is finite; host
# preparation that builds a transposed structure from the index refuses instead (a torch error).
@pytest.mark.parametrize("prefix,structure", [("block", Block(8, 8)), ("nm", NM(4)), ("diag", Diagonal())],
                         ids=["block", "nm", "diag"])
@pytest.mark.parametrize("target", ["index", "in_index"])
@pytest.mark.parametrize("value", [1 << 40, -3, 128])
def test_index_values_outside_their_tensors_address_nothing(prefix, structure, target, value):
    weight, x, grad, bias, in_index, out_index = make_inputs(structure, 64, 128, 5, {IN})
    (weight.index if target == "index" else in_index).view(-1)[0] = value
    from padst_compiler.kernels.triton import kernels as triton_kernels

    y = triton_kernels.__dict__[f"{prefix}_forward"](x, weight.values, weight.index, 64, bias, in_index, out_index)
    assert torch.isfinite(y).all()
    for part, args in (("grad_input", (grad, weight.values, weight.index, 128, in_index, out_index)),
                       ("grad_values", (grad, x, weight.values, weight.index, in_index, out_index))):
        try:
            result = triton_kernels.__dict__[f"{prefix}_{part}"](*args)
        except RuntimeError:
            continue
        assert torch.isfinite(result).all(), part
