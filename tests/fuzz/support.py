"""Random small models for the API fuzz tests, drawn as plain data (a spec) and then built,
so a failing example prints as a model one can rebuild; and the reference computation of a
sparsified model from its own tensors.

A spec is a list of parts, each taking the running width ``w`` to a new one:

- ``("linear", out, bias)``: ``nn.Linear(w, out)``;
- ``("conv1d", out, bias)``: a GPT-2 / Hugging Face style ``Conv1D`` (weight stored
  ``[in, out]``, ``nf = out``), defined here;
- ``("act", name)``: an activation;
- ``("nested", parts)``: an ``nn.Sequential`` of parts inside the model;
- ``("residual", parts)``: ``x + body(x)`` around parts that end at width ``w``;
- ``("tied", bias)``: two ``w -> w`` linears sharing one weight;
- ``("twice", bias)``: one ``w -> w`` linear applied twice (a shared module);
- ``("shared_seq", bias)``: an ``nn.Sequential`` holding the same linear at two places;
- ``("dict", out, bias)``: a linear inside an ``nn.ModuleDict`` of a custom module;
- ``("mha", heads)``: ``nn.MultiheadAttention`` as self-attention over single tokens.
"""

from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from padst_compiler.training import PADSTLinear

WIDTHS = [1, 2, 3, 4, 6, 8, 12, 16, 0]  # 0: a layer with no input or no output features


class Conv1D(nn.Module):
    """The transposed linear layer of GPT-2 in Hugging Face transformers: ``y = x @ W + b``
    with ``W`` stored ``[in, out]`` and ``nf = out``."""

    def __init__(self, nf: int, nx: int, bias: bool = True):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / max(nx, 1) ** 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1) if bias else None

    def forward(self, x):
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Tied(nn.Module):
    """Two linears, one weight (``b.weight is a.weight``), separate biases."""

    def __init__(self, width: int, bias: bool):
        super().__init__()
        self.a, self.b = nn.Linear(width, width, bias=bias), nn.Linear(width, width, bias=bias)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Twice(nn.Module):
    def __init__(self, width: int, bias: bool):
        super().__init__()
        self.layer = nn.Linear(width, width, bias=bias)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


class InDict(nn.Module):
    def __init__(self, width: int, out: int, bias: bool):
        super().__init__()
        self.parts = nn.ModuleDict({"proj": nn.Linear(width, out, bias=bias), "act": nn.Tanh()})

    def forward(self, x):
        return self.parts["act"](self.parts["proj"](x))


class SelfAttention(nn.Module):
    """Every feature vector attends over itself only: any batch shape, one token each."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, x):
        tokens = x.reshape(-1, 1, x.shape[-1])
        return self.attn(tokens, tokens, tokens, need_weights=False)[0].reshape(x.shape)


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


@st.composite
def parts(draw, width: int, depth: int = 0, max_parts: int = 4):
    """A list of parts starting at ``width``; returns (parts, final width)."""
    spec = []
    for _ in range(draw(st.integers(1, max_parts))):
        kinds = ["linear", "linear", "conv1d", "act", "tied", "twice", "shared_seq", "dict"] + ["mha"] * (width > 0)
        if depth < 2:
            kinds += ["nested", "residual"]
        kind = draw(st.sampled_from(kinds))
        if kind in ("linear", "conv1d", "dict"):
            out = draw(st.sampled_from(WIDTHS))
            spec.append((kind, out, draw(st.booleans())))
            width = out
        elif kind == "act":
            spec.append(("act", draw(st.sampled_from(sorted(ACTIVATIONS)))))
        elif kind in ("tied", "twice", "shared_seq"):
            spec.append((kind, draw(st.booleans())))
        elif kind == "mha":
            heads = draw(st.sampled_from([h for h in (1, 2, 4) if width % h == 0]))
            spec.append(("mha", heads))
        elif kind == "nested":
            inner, width = draw(parts(width, depth + 1, 3))
            spec.append(("nested", inner))
        else:
            inner, end = draw(parts(width, depth + 1, 3))
            if end != width:
                inner = inner + [("linear", width, draw(st.booleans()))]
            spec.append(("residual", inner))
    return spec, width


@st.composite
def model_specs(draw):
    width = draw(st.sampled_from(WIDTHS))
    spec, out = draw(parts(width))
    return {"in": width, "parts": spec, "out": out, "dtype": draw(st.sampled_from(["float32", "float64"])),
            "seed": draw(st.integers(0, 2**16)), "eval": draw(st.booleans())}


def _build_parts(spec, width: int) -> tuple[list[nn.Module], int]:
    modules = []
    for part in spec:
        kind = part[0]
        if kind == "linear":
            modules.append(nn.Linear(width, part[1], bias=part[2]))
            width = part[1]
        elif kind == "conv1d":
            modules.append(Conv1D(part[1], width, bias=part[2]))
            width = part[1]
        elif kind == "dict":
            modules.append(InDict(width, part[1], part[2]))
            width = part[1]
        elif kind == "act":
            modules.append(ACTIVATIONS[part[1]]())
        elif kind == "tied":
            modules.append(Tied(width, part[1]))
        elif kind == "twice":
            modules.append(Twice(width, part[1]))
        elif kind == "shared_seq":
            layer = nn.Linear(width, width, bias=part[1])
            modules.append(nn.Sequential(layer, nn.Tanh(), layer))
        elif kind == "mha":
            modules.append(SelfAttention(width, part[1]))
        elif kind == "nested":
            inner, width = _build_parts(part[1], width)
            modules.append(nn.Sequential(*inner))
        elif kind == "residual":
            inner, _ = _build_parts(part[1], width)
            modules.append(Residual(nn.Sequential(*inner)))
    return modules, width


def build(spec: dict) -> nn.Module:
    torch.manual_seed(spec["seed"])
    modules, _ = _build_parts(spec["parts"], spec["in"])
    model = nn.Sequential(*modules).to(getattr(torch, spec["dtype"]))
    return model.eval() if spec["eval"] else model


def has_attention(spec) -> bool:
    def walk(parts):
        return any(p[0] == "mha" or (p[0] in ("nested", "residual") and walk(p[1])) for p in parts)
    return walk(spec["parts"])


def reference_forward(self: PADSTLinear, x):
    """``PADSTLinear.forward`` as documented, from the layer's own tensors: ``S`` expanded
    to a dense matrix, the permutation as a gather (or the soft matrix), or the dense
    warm-up weight while warming up."""
    if x.dim() == 0 or x.shape[-1] != self.in_features:
        raise ValueError("reference: wrong input")
    if self.warming_up:
        return F.linear(x, self.dense_weight_proxy, self.bias)
    weight = self.structure.expand(self.values, self.index, self.out_features, self.in_features)
    soft, perm = self.soft_perm if self.soft else None, self.perm_index if not self.soft else None
    if self.side == "input":
        x = x @ soft.t() if soft is not None else x if perm is None else x[..., perm]
    y = x @ weight.t()
    if self.bias is not None:
        y = y + self.bias
    if self.side == "output":
        y = y @ soft.t() if soft is not None else y if perm is None else y[..., perm]
    return y


def outputs_and_grads(model, x, grad_seed):
    """``model(x)`` and the gradients of ``<g, model(x)>`` w.r.t. x and every parameter; or the
    exception type."""
    x = x.detach().clone().requires_grad_()
    try:
        y = model(x)
    except Exception as error:  # noqa: BLE001 - compared with the reference's
        return type(error)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=y.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x, *params], g, allow_unused=True)
    return y.detach(), [None if gr is None else gr.detach() for gr in grads]


def tolerance(dtype):
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-8, "atol": 1e-8}


def assert_matches_reference(model, inputs, dtype):
    for number, x in enumerate(inputs):
        got = outputs_and_grads(model, x, number)
        with mock.patch.object(PADSTLinear, "forward", reference_forward):
            want = outputs_and_grads(model, x, number)
        if isinstance(want, type) or isinstance(got, type):
            assert got == want, f"input {tuple(x.shape)}: model gave {got}, the reference {want}"
            assert not isinstance(got, type) or issubclass(got, (ValueError, RuntimeError, IndexError)), got
            continue
        torch.testing.assert_close(got[0], want[0], **tolerance(dtype), equal_nan=True,
                                   msg=lambda m: f"y {tuple(x.shape)}: {m}")
        for i, (g, w) in enumerate(zip(got[1], want[1])):
            if g is None or w is None:
                assert (g is None or not g.any()) and (w is None or not w.any()), i
            else:
                torch.testing.assert_close(g, w, **tolerance(dtype), equal_nan=True,
                                           msg=lambda m: f"grad {i} {tuple(x.shape)}: {m}")
