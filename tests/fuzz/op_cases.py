"""Random cases for the raw ``torch.ops.padst`` ops, shared by the in-process property
(``test_fuzz_ops.py``, valid inputs only) and the subprocess worker (``op_worker.py``,
adversarial inputs: a crash there must not take the test session with it).

A case is drawn as plain data first (shapes, structure, seeds, flags), so a failing
example prints as something one can paste into a reproduction, then turned into tensors.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
from hypothesis import reject, settings
from hypothesis import strategies as st

from padst_compiler.kernels import NM, Block, Diagonal

try:  # where the implementation switch lives moves with the kernels' layout
    from padst_compiler.kernels.eager import select
except ImportError:  # pragma: no cover - the layout before kernels/ had sub-packages
    from padst_compiler.kernels import select

IMPLEMENTATIONS = ("auto", "native", "torch", "dense")


def budget(share: float = 1.0) -> settings:
    """Settings of the loaded profile with ``share`` of its examples (at least one)."""
    return settings(max_examples=max(1, round(settings.default.max_examples * share)))


def profile_env() -> dict[str, str]:
    """Environment for a subprocess worker: the loaded hypothesis profile travels with it."""
    return {**os.environ, "HYPOTHESIS_PROFILE": settings.get_current_profile_name()}


# ------------------------------------------------------------------------ valid cases


@dataclass(frozen=True)
class Case:
    """One call of a structured op, as data."""

    structure: object
    out_features: int
    in_features: int
    sparsity: float
    batch_shape: tuple[int, ...]
    dtype: torch.dtype
    bias: bool
    in_perm: bool
    out_perm: bool
    layout: str  # how x is laid out in memory: contiguous, transposed, expanded, strided
    implementation: str
    seed: int

    @property
    def op_name(self) -> str:
        return self.structure.op.__name__.split(".")[0]


@st.composite
def structures_and_shapes(draw):
    """A structure with a weight shape it takes and a sparsity it takes, drawn so that most
    draws are usable: the kept count is drawn and the sparsity derived from it, or (one in
    three) the sparsity is drawn and the case rejected if the shape cannot take it."""
    kind = draw(st.sampled_from(["block", "nm", "diag"]))
    if kind == "block":
        rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        structure = Block(rows, cols)
        out_features, in_features = rows * draw(st.integers(1, 4)), cols * draw(st.integers(1, 4))
        units = in_features // cols
    elif kind == "nm":
        structure = NM(draw(st.integers(1, 8)))
        out_features, in_features = draw(st.integers(1, 9)), structure.m * draw(st.integers(1, 3))
        units = structure.m
    else:
        structure = Diagonal()
        shorter, ratio = draw(st.integers(1, 6)), draw(st.integers(1, 3))
        out_features, in_features = draw(st.sampled_from([(shorter, shorter * ratio), (shorter * ratio, shorter)]))
        units = shorter
    if draw(st.integers(0, 2)):
        kept = draw(st.integers(1, units))
        sparsity = 1 - kept / units
    else:
        sparsity = draw(st.floats(0, 1, exclude_max=True))
    try:
        structure.kept_units(out_features, in_features, sparsity)
    except ValueError:
        reject()
    return structure, out_features, in_features, sparsity


batch_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def cases(draw, layouts=("contiguous", "transposed", "expanded", "strided")):
    structure, out_features, in_features, sparsity = draw(structures_and_shapes())
    return Case(structure, out_features, in_features, sparsity, draw(batch_shapes),
                draw(st.sampled_from([torch.float32, torch.float64])), draw(st.booleans()), draw(st.booleans()),
                draw(st.booleans()), draw(st.sampled_from(layouts)), draw(st.sampled_from(IMPLEMENTATIONS)),
                draw(st.integers(0, 2**16)))


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout: leading axes transposed in memory, or
    the feature axis with stride 2 (``expanded``, stride 0, is :func:`expanded_x`)."""
    if layout == "transposed" and t.dim() >= 3:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided" and t.dim() >= 1:
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def expanded_x(t: torch.Tensor) -> torch.Tensor:
    """A stride-0 ``x``: the first row repeated along the first axis."""
    return t[:1].expand_as(t) if t.dim() >= 2 and t.shape[0] > 0 else t


@dataclass
class Tensors:
    """The tensors of a case: weight (compressed), input, optional bias and permutations."""

    values: torch.Tensor
    index: torch.Tensor
    x: torch.Tensor
    bias: torch.Tensor | None
    in_index: torch.Tensor | None
    out_index: torch.Tensor | None
    grad: torch.Tensor
    extra: dict = field(default_factory=dict)


def make_tensors(case: Case) -> Tensors:
    gen = torch.Generator().manual_seed(case.seed)
    dense = torch.randn(case.out_features, case.in_features, generator=gen, dtype=case.dtype)
    weight = case.structure.project(dense, case.sparsity)
    x = torch.randn(*case.batch_shape, case.in_features, generator=gen, dtype=case.dtype)
    if case.layout == "expanded":
        x = expanded_x(x)
    else:
        x = laid_out(x, case.layout)
    bias = torch.randn(case.out_features, generator=gen, dtype=case.dtype) if case.bias else None
    in_index = torch.randperm(case.in_features, generator=gen) if case.in_perm else None
    out_index = torch.randperm(case.out_features, generator=gen) if case.out_perm else None
    grad = torch.randn(*case.batch_shape, case.out_features, generator=gen, dtype=case.dtype)
    return Tensors(weight.values, weight.index, x, bias, in_index, out_index, grad)


def tolerances(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}


def dense_reference(structure, x, values, index, out_features, bias=None, in_index=None, out_index=None):
    """``(S @ x[..., in_index] + bias)[..., out_index]`` with ``S`` expanded to a dense matrix
    (the same reference as tests/kernels/reference.py, spelled out with ``@`` so it also
    takes batch shapes with a zero)."""
    weight = structure.expand(values, index, out_features, x.shape[-1])
    if in_index is not None:
        x = x[..., in_index]
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    return y if out_index is None else y[..., out_index]


def reference_grads(structure, t: Tensors, out_features: int):
    """``dx`` and ``dvalues`` of ``<grad, y>`` through the dense reference."""
    x = t.x.detach().clone().requires_grad_()
    values = t.values.detach().clone().requires_grad_()
    with torch.enable_grad():
        y = dense_reference(structure, x, values, t.index, out_features, t.bias, t.in_index, t.out_index)
        dx, dvalues = torch.autograd.grad(y, (x, values), t.grad, allow_unused=True)
    return (torch.zeros_like(x) if dx is None else dx), (torch.zeros_like(values) if dvalues is None else dvalues)


def ops_of(structure):
    """(forward, grad_input, grad_values) ops of a structure."""
    name = structure.op.__name__.split(".")[0]
    ops = torch.ops.padst
    return getattr(ops, name), getattr(ops, f"{name}_grad_input"), getattr(ops, f"{name}_grad_values")


def implementation(name: str):
    """A context that runs implementation ``name`` ("auto": the measured choice)."""
    return contextlib.nullcontext() if name == "auto" else select.only(name)


def check_valid_case(case: Case) -> None:
    """Forward (op, eager direct call twice so the second replays, autograd) and both
    backward ops of a valid case against the dense reference."""
    t = make_tensors(case)
    forward, grad_input, grad_values = ops_of(case.structure)
    tol = tolerances(case.dtype)
    want = dense_reference(case.structure, t.x, t.values, t.index, case.out_features, t.bias, t.in_index,
                           t.out_index)
    want_dx, want_dvalues = reference_grads(case.structure, t, case.out_features)
    args = (t.index, case.out_features, t.bias, t.in_index, t.out_index)
    with implementation(case.implementation):
        got = forward(t.x, t.values, *args)
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"op forward: {m}")
        with torch.no_grad():
            for attempt in ("direct", "replayed"):
                got = case.structure.linear(t.x, t.values, *args)
                torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{attempt} eager forward: {m}")
        dx = grad_input(t.grad, t.values, t.index, case.in_features, t.in_index, t.out_index)
        torch.testing.assert_close(dx, want_dx, **tol, msg=lambda m: f"grad_input op: {m}")
        dvalues = grad_values(t.grad, t.x, t.values, t.index, t.in_index, t.out_index)
        torch.testing.assert_close(dvalues, want_dvalues, **tol, msg=lambda m: f"grad_values op: {m}")
        x = t.x.detach().clone().requires_grad_()
        values = t.values.detach().clone().requires_grad_()
        y = forward(x, values, *args)
        dx, dvalues = torch.autograd.grad(y, (x, values), t.grad)
        torch.testing.assert_close(dx, want_dx, **tol, msg=lambda m: f"autograd dx: {m}")
        torch.testing.assert_close(dvalues, want_dvalues, **tol, msg=lambda m: f"autograd dvalues: {m}")
        if t.values.numel():  # a changed weight (in place: a new version) is seen by the next eager call
            with torch.no_grad():
                t.values.mul_(-2)
                got = case.structure.linear(t.x, t.values, *args)
            want = dense_reference(case.structure, t.x, t.values, *args)
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"eager forward after an update: {m}")


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def n_units(structure, out_features: int, in_features: int) -> int:
    """Bound of the values of a structure's index tensor (what its range check enforces)."""
    if isinstance(structure, Block):
        return in_features // structure.cols
    if isinstance(structure, NM):
        return structure.m
    return max(out_features, in_features)


def semantic_ok(structure, index: torch.Tensor, out_features: int, in_features: int) -> bool:
    """Whether an in-range index keeps every unit at most once in a row (what the value
    checks enforce)."""
    if index.numel() == 0:
        return True
    if isinstance(structure, Diagonal):
        index = index % min(out_features, in_features)
    ordered = index.sort(dim=-1).values
    return not bool((ordered[..., 1:] == ordered[..., :-1]).any())


def is_permutation(index: torch.Tensor, length: int) -> bool:
    return index.numel() == length and bool((torch.bincount(index, minlength=length) == 1).all())


__all__ = ["Case", "Tensors", "IMPLEMENTATIONS", "budget", "profile_env", "cases", "make_tensors", "laid_out",
           "dense_reference", "reference_grads", "ops_of", "implementation", "check_valid_case", "finite",
           "n_units", "semantic_ok", "is_permutation", "tolerances"]
