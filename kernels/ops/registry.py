"""The ``padst`` operator set (design section 4), as ``torch.library`` custom ops.

Every structured op has one schema,

    padst::<structure>_linear(x, values, index, out_features, bias=None,
                              in_index=None, out_index=None) -> y

with ``y = z[..., out_index]`` and ``z = S @ x[..., in_index] + bias``, where ``S`` is
the weight described by ``(values, index)`` in the structure's compressed form. The
uniform schema lets compiler passes treat all structures alike. Each op comes with two
backward ops (``*_grad_input`` and ``*_grad_values``), so Dynamo, AOTAutograd and
Inductor see opaque, correctly typed nodes in forward and backward graphs alike.

CUDA tensors run the Triton kernels of :mod:`..triton.kernels`; every other device (and
CUDA without Triton) runs :mod:`..implementations`. Under Inductor on CUDA the forward ops
lower to Triton templates that take an elementwise epilogue (:mod:`..inductor.lowering`)
and the backward ops are traced into their Triton kernels (:mod:`..inductor.visibility`).
Plain eager calls skip the dispatcher (:mod:`..eager.dispatch`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from padst_compiler.kernels import implementations
from padst_compiler.kernels.eager import dispatch
from padst_compiler.kernels.inductor import lowering as inductor_lowering
from padst_compiler.kernels.inductor import visibility as inductor_visibility
from padst_compiler.kernels.ops import checks
from padst_compiler.kernels.permutation import inverse_permutation

try:
    from padst_compiler.kernels.triton import kernels as triton_kernels
except ImportError:  # no Triton on this platform: CUDA tensors take the PyTorch implementation
    triton_kernels = None

Tensor = torch.Tensor

# ------------------------------------------------------------------------ permute


@torch.library.custom_op("padst::permute", mutates_args=())
def permute(x: Tensor, index: Tensor) -> Tensor:
    """``x[..., index]``: a gather along the feature (last) axis."""
    _check_permute(x, index)
    return x.index_select(-1, index)


def _check_permute(x: Tensor, index: Tensor) -> None:
    if x.dim() == 0:
        checks.fail("padst::permute", "x must have a feature axis, got a 0-d tensor")
    checks.check_permutation("padst::permute", "index", index, x.shape[-1])


@permute.register_fake
def _(x, index):
    _check_permute(x, index)
    return torch.empty_like(x)


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _permute_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return torch.ops.padst.permute(grad, inverse_permutation(index)), None


permute.register_autograd(_permute_backward, setup_context=_permute_setup)


# ------------------------------------------------------------- structured linears


@dataclass(frozen=True)
class Implementation:
    """One structure's three functions on one backend, all on ``[tokens, features]`` inputs."""

    forward: Callable
    grad_input: Callable
    grad_values: Callable


@dataclass(frozen=True)
class StructuredKernels:
    """What one structure plugs into the generic op definition."""

    name: str
    check_format: Callable[[str, int, Tensor, Tensor, int], None]
    portable: Implementation  # any device: native C++ on CPU, vectorised PyTorch, dense
    triton: Implementation | None

    def for_device(self, device: torch.device) -> Implementation:
        """The one place that picks a backend: Triton for CUDA tensors, PyTorch elsewhere."""
        if device.type == "cuda" and self.triton is not None:
            return self.triton
        return self.portable


def _check_call(op, kernels, x, values, index, out_features, bias, in_index, out_index):
    """Shape and dtype checks shared by the real and fake implementations."""
    if out_features < 0:
        checks.fail(op, f"out_features must be >= 0, got {out_features}")
    if x.dim() == 0:
        checks.fail(op, "x must have a feature axis, got a 0-d tensor")
    if not x.dtype.is_floating_point:
        checks.fail(op, f"x must be floating point, got {x.dtype}")
    if values.dtype != x.dtype:
        checks.fail(op, f"values have dtype {values.dtype} but x has {x.dtype}")
    in_features = x.shape[-1]
    kernels.check_format(op, in_features, values, index, out_features)
    if bias is not None:
        checks.check_tensor(op, "bias", bias, (out_features,), x.dtype)
    if in_index is not None:
        checks.check_permutation(op, "in_index", in_index, in_features)
    if out_index is not None:
        checks.check_permutation(op, "out_index", out_index, out_features)


def _check_grad_call(op, kernels, grad, values, index, in_features, in_index, out_index, x=None):
    """The checks of the forward call the backward ops stand for (they are public ops too,
    and their kernels read through the same indices), plus ``x`` matching ``grad`` row for row."""
    if grad.dim() == 0:
        checks.fail(op, "grad must have a feature axis, got a 0-d tensor")
    if in_features < 0:
        checks.fail(op, f"in_features must be >= 0, got {in_features}")
    if x is not None:
        if x.dim() == 0 or x.shape[:-1] != grad.shape[:-1]:
            checks.fail(op, f"x of shape {tuple(x.shape)} does not match grad of shape {tuple(grad.shape)} "
                            "in its leading dimensions")
        if x.dtype != grad.dtype:
            checks.fail(op, f"x has dtype {x.dtype} but grad has {grad.dtype}")
    _check_call(op, kernels, grad.new_empty(0, in_features) if x is None else x, values, index, grad.shape[-1],
                None, in_index, out_index)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


_FORWARD_SCHEMA = ("(Tensor x, Tensor values, Tensor index, int out_features, Tensor? bias=None, "
                   "Tensor? in_index=None, Tensor? out_index=None) -> Tensor")
_GRAD_INPUT_SCHEMA = ("(Tensor grad, Tensor values, Tensor index, int in_features, "
                      "Tensor? in_index, Tensor? out_index) -> Tensor")
_GRAD_VALUES_SCHEMA = ("(Tensor grad, Tensor x, Tensor values, Tensor index, "
                       "Tensor? in_index, Tensor? out_index) -> Tensor")


def define_structured_op(kernels: StructuredKernels):
    """Register ``padst::<name>`` with its fake, backward ops and autograd formula."""
    qualname = f"padst::{kernels.name}"

    def compute_forward(x, values, index, out_features, bias=None, in_index=None, out_index=None):
        _check_call(qualname, kernels, x, values, index, out_features, bias, in_index, out_index)
        if x.numel() == 0:  # no token: no kernel (their tilings and timings assume at least one)
            return x.new_empty(*x.shape[:-1], out_features)
        y = kernels.for_device(x.device).forward(_flat(x), values, index, out_features, bias, in_index, out_index)
        return y.view(*x.shape[:-1], out_features)

    forward = torch.library.custom_op(qualname, compute_forward, mutates_args=(), schema=_FORWARD_SCHEMA)
    dispatch.DIRECT_FORWARD[getattr(torch.ops.padst, kernels.name)] = compute_forward

    @forward.register_fake
    def _(x, values, index, out_features, bias=None, in_index=None, out_index=None):
        inductor_lowering.ensure_registered()  # tracing comes before Inductor lowers the graph
        _check_call(qualname, kernels, x, values, index, out_features, bias, in_index, out_index)
        return x.new_empty(*x.shape[:-1], out_features)

    def compute_grad_input(grad, values, index, in_features, in_index, out_index):
        _check_grad_call(f"{qualname}_grad_input", kernels, grad, values, index, in_features, in_index, out_index)
        if grad.numel() == 0:
            return grad.new_empty(*grad.shape[:-1], in_features)
        dx = kernels.for_device(grad.device).grad_input(_flat(grad), values, index, in_features, in_index, out_index)
        return dx.view(*grad.shape[:-1], in_features)

    grad_input = torch.library.custom_op(f"{qualname}_grad_input", compute_grad_input, mutates_args=(),
                                         schema=_GRAD_INPUT_SCHEMA)
    dispatch.DIRECT_GRAD_INPUT[getattr(torch.ops.padst, f"{kernels.name}_grad_input")] = compute_grad_input

    @grad_input.register_fake
    def _(grad, values, index, in_features, in_index, out_index):
        inductor_lowering.ensure_registered()
        _check_grad_call(f"{qualname}_grad_input", kernels, grad, values, index, in_features, in_index, out_index)
        return grad.new_empty(*grad.shape[:-1], in_features)

    def compute_grad_values(grad, x, values, index, in_index, out_index):
        _check_grad_call(f"{qualname}_grad_values", kernels, grad, values, index, x.shape[-1] if x.dim() else 0,
                         in_index, out_index, x)
        if grad.numel() == 0 or x.numel() == 0:
            return torch.zeros_like(values, memory_format=torch.contiguous_format)
        # contiguous: the fake implementation promises the layout of empty_like(values)
        return kernels.for_device(grad.device).grad_values(_flat(grad), _flat(x), values, index, in_index,
                                                           out_index).contiguous()

    grad_values = torch.library.custom_op(f"{qualname}_grad_values", compute_grad_values, mutates_args=(),
                                          schema=_GRAD_VALUES_SCHEMA)

    @grad_values.register_fake
    def _(grad, x, values, index, in_index, out_index):
        _check_grad_call(f"{qualname}_grad_values", kernels, grad, values, index, x.shape[-1] if x.dim() else 0,
                         in_index, out_index, x)
        return torch.empty_like(values)

    def setup_context(ctx, inputs, output):
        x, values, index, _, bias, in_index, out_index = inputs
        ctx.save_for_backward(x, values, index, in_index, out_index)

    def backward(ctx, grad):
        x, values, index, in_index, out_index = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx = grad_input(grad, values, index, x.shape[-1], in_index, out_index) if needs[0] else None
        dvalues = grad_values(grad, x, values, index, in_index, out_index) if needs[1] else None
        dbias = None
        if len(needs) > 4 and needs[4]:  # needs_input_grad covers the arguments actually passed
            dbias = _flat(grad).sum(0)
            if out_index is not None:
                dbias = dbias.index_select(0, inverse_permutation(out_index))
        return (dx, dvalues, None, None, dbias, None, None)[:len(needs)]

    forward.register_autograd(backward, setup_context=setup_context)

    # The backward ops are linear in each argument, so their own derivatives are the
    # three ops again: this gives double backward (and opcheck's AOT tests) for free.
    def grad_input_setup(ctx, inputs, output):
        grad, values, index, _, in_index, out_index = inputs
        ctx.save_for_backward(grad, values, index, in_index, out_index)

    def grad_input_backward(ctx, dx_grad):
        grad, values, index, in_index, out_index = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dgrad = forward(dx_grad, values, index, grad.shape[-1], None, in_index, out_index) if needs[0] else None
        dvalues = grad_values(grad, dx_grad, values, index, in_index, out_index) if needs[1] else None
        return dgrad, dvalues, None, None, None, None

    grad_input.register_autograd(grad_input_backward, setup_context=grad_input_setup)

    def grad_values_setup(ctx, inputs, output):
        grad, x, _, index, in_index, out_index = inputs
        ctx.save_for_backward(grad, x, index, in_index, out_index)

    def grad_values_backward(ctx, dvalues_grad):
        grad, x, index, in_index, out_index = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dgrad = forward(x, dvalues_grad, index, grad.shape[-1], None, in_index, out_index) if needs[0] else None
        dx = grad_input(grad, dvalues_grad, index, x.shape[-1], in_index, out_index) if needs[1] else None
        return dgrad, dx, None, None, None, None

    grad_values.register_autograd(grad_values_backward, setup_context=grad_values_setup)

    if kernels.triton is not None:
        # The forward lowers to Inductor's Triton templates where this torch has them.
        decomposed = [] if inductor_lowering.supported() else [(forward, compute_forward)]
        for op, body in (*decomposed, (grad_input, compute_grad_input), (grad_values, compute_grad_values)):
            inductor_visibility.decompose_on_cuda(op, body, triton_kernels.traceable_launches)
    return forward, grad_input, grad_values


# ---------------------------------------------------------------- format checks


def _check_block_format(op, in_features, values, col_blocks, out_features):
    if values.dim() != 4:
        checks.fail(op, f"block values must be [block_rows_count, kept, rows, cols], got shape {tuple(values.shape)}")
    n_rows, kept, block_rows, block_cols = values.shape
    if block_rows < 1 or block_cols < 1:
        checks.fail(op, f"blocks must be at least 1x1, got {block_rows}x{block_cols} (values {tuple(values.shape)})")
    checks.check_index_tensor(op, "index (column blocks)", col_blocks, (n_rows, kept))
    if n_rows * block_rows != out_features:
        checks.fail(op, f"values hold {n_rows}x{block_rows} = {n_rows * block_rows} output rows, "
                        f"out_features is {out_features}")
    if in_features % block_cols:
        checks.fail(op, f"block columns {block_cols} do not divide in_features {in_features}")
    checks.check_in_range(op, "index (column blocks)", col_blocks, in_features // block_cols)
    checks.check_distinct_rows(op, "index (column blocks)", col_blocks, "column block")


def _check_nm_format(op, in_features, values, positions, out_features):
    if positions.dim() != 3:
        checks.fail(op, f"N:M index must be [out, in/m, n], got shape {tuple(positions.shape)}")
    _, groups, kept = positions.shape
    checks.check_index_tensor(op, "index (positions)", positions, (out_features, groups, kept))
    checks.check_tensor(op, "values", values, (out_features, groups * kept), values.dtype)
    if groups == 0 or in_features % groups:
        checks.fail(op, f"{groups} groups per row do not divide in_features {in_features}")
    m = in_features // groups
    if kept > m:
        checks.fail(op, f"n = {kept} kept positions exceed the group size m = {m}")
    checks.check_in_range(op, "index (positions)", positions, m)
    checks.check_distinct_rows(op, "index (positions)", positions, "position")


def _check_diag_format(op, in_features, values, offsets, out_features):
    if values.dim() != 2:
        checks.fail(op, f"diagonal values must be [K, L], got shape {tuple(values.shape)}")
    n_diag, length = values.shape
    checks.check_index_tensor(op, "index (offsets)", offsets, (n_diag,))
    longer, shorter = max(out_features, in_features), min(out_features, in_features)
    if shorter == 0 or longer % shorter:
        checks.fail(op, f"wrap-around diagonals need one of out_features {out_features} and "
                        f"in_features {in_features} to divide the other")
    if length != longer:
        checks.fail(op, f"diagonals have length {length}, expected max(out, in) = {longer}")
    checks.check_in_range(op, "index (offsets)", offsets, longer)
    checks.check_distinct_rows(op, "index (offsets) modulo min(out, in)", offsets, "diagonal", modulo=shorter)


def _implementation(module, prefix: str) -> Implementation:
    """``<prefix>_forward``, ``_grad_input`` and ``_grad_values`` of a backend module
    (``implementations`` and ``triton.kernels`` name their functions alike)."""
    return Implementation(*(getattr(module, f"{prefix}_{part}") for part in ("forward", "grad_input", "grad_values")))


def _structure(name: str, check_format, prefix: str) -> StructuredKernels:
    triton = None if triton_kernels is None else _implementation(triton_kernels, prefix)
    return StructuredKernels(name, check_format, _implementation(implementations, prefix), triton)


block_linear, block_linear_grad_input, block_linear_grad_values = define_structured_op(
    _structure("block_linear", _check_block_format, "block"))
nm_linear, nm_linear_grad_input, nm_linear_grad_values = define_structured_op(
    _structure("nm_linear", _check_nm_format, "nm"))
diag_linear, diag_linear_grad_input, diag_linear_grad_values = define_structured_op(
    _structure("diag_linear", _check_diag_format, "diag"))
