"""canonicalize: every spelling of a feature permutation becomes padst::permute."""

import torch
from torch.testing import FileCheck

from padst_compiler.kernels import Block
from padst_compiler.passes.canonicalize import canonicalize
from padst_compiler.pipeline import node_counts

from .helpers import apply, trace

torch.manual_seed(0)
W = Block(4, 4).project(torch.randn(16, 16), 0.5)
P, Q = torch.randperm(16), torch.randperm(16)


def test_fused_indices_become_standalone_permutes():
    gm, ctx = trace(lambda m, x: torch.ops.padst.block_linear(x, m.v, m.i, 16, None, m.p, m.q),
                    [torch.randn(3, 16)], v=W.values, i=W.index, p=P, q=Q)
    x = torch.randn(3, 16)
    changed, before, after = apply(canonicalize, gm, ctx, [x])
    assert changed
    torch.testing.assert_close(after, before)
    FileCheck().check("padst.permute.default(x, p)").check("block_linear.default").check("None, None, None)") \
        .check("padst.permute.default(block_linear, q)").run(gm.code)
    assert node_counts(gm) | {"nodes": 0} == {"nodes": 0, "permutes": 2, "gathers": 2, "fused_gathers": 0,
                                              "block_linear": 1}
    assert not canonicalize(gm, ctx)


def test_indexing_and_index_select_with_a_known_permutation():
    def fn(m, x):
        return torch.relu(x[..., m.p]) + torch.index_select(x, -1, m.q)

    x = torch.randn(2, 3, 16)
    gm, ctx = trace(fn, [x], p=P, q=Q)
    changed, before, after = apply(canonicalize, gm, ctx, [x])
    assert changed
    torch.testing.assert_close(after, before)
    FileCheck().check_count("padst.permute.default", 2, exactly=True).check_not("index_select").run(gm.code)
    assert not canonicalize(gm, ctx)


def test_gathers_that_are_not_permutations_stay_as_they_are():
    def fn(m, x):
        return x[..., m.repeated] + torch.index_select(x, 0, m.p)

    x = torch.randn(16, 16)
    gm, ctx = trace(fn, [x], repeated=torch.zeros(16, dtype=torch.long), p=P)
    assert not canonicalize(gm, ctx)
    FileCheck().check_not("padst.permute").run(gm.code)
