"""Before/after harness for single passes on small traced graphs."""

import torch
from torch import fx, nn

from padst_compiler.passes.context import PassContext
from padst_compiler.pipeline import fake_inputs_for, node_counts, refresh_meta


class Holder(nn.Module):
    """A traced function's tensors live here as buffers, so they become get_attr constants."""

    def __init__(self, fn, **tensors):
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self.fn = fn

    def forward(self, x):
        return self.fn(self, x)


def trace(fn, example_inputs, mode="training", **tensors):
    gm = fx.symbolic_trace(Holder(fn, **tensors))
    refresh_meta(gm, fake_inputs_for(example_inputs))
    ctx = PassContext(mode=mode, constants={n: getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"})
    return gm, ctx


def apply(pass_fn, gm, ctx, example_inputs):
    """Run one pass the way the pipeline does; returns (changed, outputs before, outputs after)."""
    before = gm(*example_inputs)
    changed = pass_fn(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    refresh_meta(gm, fake_inputs_for(example_inputs))
    return changed, before, gm(*example_inputs)


def check_pass(pass_fn, gm, ctx, example_inputs, expect_change=True):
    """The pass contract: same function, idempotent, standalone permutes never grow."""
    permutes_before = node_counts(gm)["permutes"]
    changed, before, after = apply(pass_fn, gm, ctx, example_inputs)
    assert changed == expect_change
    torch.testing.assert_close(after, before)
    assert node_counts(gm)["permutes"] <= permutes_before
    code = gm.code
    assert not pass_fn(gm, ctx), "a second run changed the graph again"
    assert gm.code == code
    return gm.code
