"""Property: on random models the whole pipeline computes the same function and never adds gathers.

A gather here is a pass over memory: a standalone ``padst::permute`` or an indexing gather. A
permutation fused into a structured op (in_index / out_index) is an indexed load or store inside
the kernel, not a gather; the pipeline may trade one standalone gather for fused indices.
"""

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

from padst_compiler.kernels import NM, Block, Diagonal
from padst_compiler.passes.context import PassContext
from padst_compiler.pipeline import fake_inputs_for, node_counts, refresh_meta, run_pipeline
from padst_compiler.training import PADSTLinear

WIDTH = 16
STRUCTURES = [Block(4, 4), NM(4), Diagonal()]


class Attention(nn.Module):
    def __init__(self, make_linear):
        super().__init__()
        self.qkv, self.proj = make_linear(WIDTH, 3 * WIDTH), make_linear(WIDTH, WIDTH)

    def forward(self, x):
        q, k, v = self.qkv(x).split(WIDTH, dim=-1)
        heads = [t.view(2, 3, 2, WIDTH // 2).transpose(1, 2) for t in (q, k, v)]
        y = F.scaled_dot_product_attention(*heads)
        return self.proj(y.transpose(1, 2).reshape(2, 3, WIDTH))


class Residual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@st.composite
def models(draw):
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)

    def make_linear(i, o):
        if draw(st.booleans()):
            return nn.Linear(i, o)
        layer = PADSTLinear(i, o, draw(st.sampled_from(STRUCTURES)), 0.5, permutation=draw(
            st.sampled_from(["random", "none"])), side=draw(st.sampled_from(["input", "output"])),
            seed=draw(st.integers(0, 1000)))
        with torch.no_grad():
            layer.values.normal_(generator=gen)
        return layer

    def block(depth):
        kind = draw(st.sampled_from(["linear", "act", "norm", "reshape", "permute", "softmax", "residual",
                                     "attention", "mlp"] if depth < 2 else ["linear", "act", "norm"]))
        if kind == "linear":
            return make_linear(WIDTH, WIDTH)
        if kind == "act":
            return draw(st.sampled_from([nn.GELU(), nn.ReLU(), nn.Tanh()]))
        if kind == "norm":
            return nn.LayerNorm(WIDTH)
        if kind == "reshape":
            return Lambda(lambda x: x.reshape(2, 3, 4, 4).reshape(2, 3, WIDTH))
        if kind == "permute":
            index = torch.randperm(WIDTH, generator=gen)
            return Lambda(lambda x: x[..., index])
        if kind == "softmax":
            return Lambda(lambda x: torch.softmax(x, -1))
        if kind == "attention":
            return Attention(make_linear)
        if kind == "mlp":
            return nn.Sequential(make_linear(WIDTH, 2 * WIDTH), nn.GELU(), make_linear(2 * WIDTH, WIDTH))
        return Residual(nn.Sequential(*[block(depth + 1) for _ in range(draw(st.integers(1, 3)))]))

    return nn.Sequential(*[block(0) for _ in range(draw(st.integers(1, 5)))])


class InlineEverything(fx.Tracer):
    """Trace through every module, as Dynamo does, so passes see functional calls."""

    def is_leaf_module(self, module, name):
        return False


def traced(model, x, mode):
    graph = InlineEverything().trace(model)
    gm = fx.GraphModule(model, graph)
    refresh_meta(gm, fake_inputs_for([x]))
    constants = {n: gm.get_buffer(n.target) if n.target in dict(gm.named_buffers()) else
                 gm.get_parameter(n.target) if n.target in dict(gm.named_parameters()) else getattr(gm, n.target)
                 for n in gm.graph.nodes if n.op == "get_attr"}
    indices = {n: v for n, v in constants.items() if v.dtype == torch.int64 and v.dim() == 1}
    return gm, PassContext(mode=mode, constants=constants if mode == "inference" else indices)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=models(), mode=st.sampled_from(["training", "inference"]))
def test_pipeline_preserves_outputs_and_never_adds_gathers(model, mode):
    model, x = model.double(), torch.randn(2, 3, WIDTH, dtype=torch.float64)  # exact enough to compare tightly
    with torch.no_grad():
        expected = model(x)
        gm, ctx = traced(model, x, mode)
        before = node_counts(gm)
        run_pipeline(gm, [x], ctx)
        after = node_counts(gm)
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
    assert after["gathers"] <= before["gathers"]
