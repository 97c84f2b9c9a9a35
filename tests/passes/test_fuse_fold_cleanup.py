"""fuse, fold and cleanup: before/after on tiny graphs."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import FileCheck

from padst_compiler.kernels import NM, Block
from padst_compiler.passes.cleanup import cleanup
from padst_compiler.passes.fold import fold_into_weights
from padst_compiler.passes.fuse import fuse_permutations
from padst_compiler.pipeline import node_counts

from .helpers import check_pass, trace

torch.manual_seed(0)
W = Block(4, 4).project(torch.randn(16, 16), 0.5)
NMW = NM(4).project(torch.randn(16, 16), 0.5)
P, Q = torch.randperm(16), torch.randperm(16)
permute = torch.ops.padst.permute


def test_fuse_moves_neighbouring_permutes_into_the_op_indices():
    def fn(m, x):
        y = torch.ops.padst.block_linear(permute(x, m.p), m.v, m.i, 16, None, m.q)
        return permute(y, m.q)

    x = torch.randn(3, 16)
    gm, ctx = trace(fn, [x], v=W.values, i=W.index, p=P, q=Q)
    code = check_pass(fuse_permutations, gm, ctx, [x])
    FileCheck().check_not("padst.permute.default(").check("block_linear.default(x, v, i, 16, None, _padst_fused") \
        .run(code)
    assert node_counts(gm)["permutes"] == 0 and node_counts(gm)["fused_gathers"] == 2


@pytest.mark.parametrize("mode", ["training", "inference"])
@pytest.mark.parametrize("first", ["block_linear", "nm_linear"])
def test_a_permute_between_two_structured_ops_becomes_the_consumers_in_index(mode, first):
    """Unless the producer is an N:M layer in inference, whose out_index folds into its rows."""
    def fn(m, x):
        y = getattr(torch.ops.padst, first)(x, m.v1, m.i1, 16)
        return torch.ops.padst.block_linear(permute(y, m.p), m.v2, m.i2, 16)

    x = torch.randn(3, 16)
    weight, second = NMW if first == "nm_linear" else W, Block(4, 4).project(torch.randn(16, 16), 0.5)
    gm, ctx = trace(fn, [x], mode, v1=weight.values, i1=weight.index, p=P, v2=second.values, i2=second.index)
    code = check_pass(fuse_permutations, gm, ctx, [x])
    if first == "nm_linear" and mode == "inference":
        FileCheck().check(f"{first}.default(x, v1, i1, 16, None, None, p)").check("block_linear(").run(code)
    else:
        FileCheck().check(f"{first}(x, v1, i1, 16)").check("block_linear.default(").check(", v2, i2, 16, None, p") \
            .run(code)
    assert node_counts(gm)["permutes"] == 0


def test_fuse_keeps_an_output_permute_when_the_op_has_other_users():
    def fn(m, x):
        y = torch.ops.padst.block_linear(x, m.v, m.i, 16)
        return permute(y, m.q) + y

    x = torch.randn(3, 16)
    gm, ctx = trace(fn, [x], v=W.values, i=W.index, q=Q)
    check_pass(fuse_permutations, gm, ctx, [x], expect_change=False)


def test_cleanup_composes_chains_and_drops_identities():
    def fn(m, x):
        a = permute(permute(x, m.p), m.q)
        b = permute(permute(x, m.p), m.inv)
        return a + b + permute(x, m.ident)

    x = torch.randn(2, 16)
    gm, ctx = trace(fn, [x], p=P, q=Q, inv=torch.argsort(P), ident=torch.arange(16))
    code = check_pass(cleanup, gm, ctx, [x])
    FileCheck().check_count("permute(x, _padst_chain", 1, exactly=True).check("add").run(code)
    assert node_counts(gm)["permutes"] == 1


def test_fold_moves_permutations_into_frozen_weights():
    weight, bias, table = torch.randn(8, 16), torch.randn(8), torch.randn(50, 16)

    def fn(m, x):
        emb = permute(F.embedding(x, m.table), m.p)  # embedding columns
        hidden = F.linear(permute(emb, m.q), m.w, m.b)  # linear input columns
        rows = torch.ops.padst.nm_linear(emb, m.nv, m.ni, 16, m.nb, None, m.q)  # N:M rows
        return hidden.sum(-1) + rows.sum(-1) + permute(m.nb, m.p).sum()  # a permuted constant

    x = torch.randint(0, 50, (2, 5))
    gm, ctx = trace(fn, [x], mode="inference", table=table, p=P, q=Q, w=weight, b=bias, nv=NMW.values,
                    ni=NMW.index, nb=torch.randn(16))
    code = check_pass(fold_into_weights, gm, ctx, [x])
    FileCheck().check_not("padst.permute").check("embedding(x, _padst_folded").check("linear(embedding, _padst_folded") \
        .check("nm_linear.default(embedding, _padst_folded").check("None, None)").run(code)


def test_fold_does_nothing_in_training():
    def fn(m, x):
        return F.linear(permute(x, m.p), m.w)

    x = torch.randn(2, 16)
    gm, ctx = trace(fn, [x], p=P, w=torch.randn(4, 16))
    check_pass(fold_into_weights, gm, ctx, [x], expect_change=False)
