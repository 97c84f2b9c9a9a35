"""propagate: layout assignment moves, composes and cancels permutations."""

import torch
import torch.nn.functional as F
from torch.testing import FileCheck

from padst_compiler.kernels import NM, Block
from padst_compiler.passes.canonicalize import canonicalize
from padst_compiler.passes.propagate import propagate_permutations
from padst_compiler.pipeline import node_counts

from .helpers import apply, check_pass, trace

torch.manual_seed(0)
FC = Block(4, 4).project(torch.randn(32, 16), 0.5)
PROJ = Block(4, 4).project(torch.randn(16, 32), 0.5)
P16, P32 = torch.randperm(16), torch.randperm(32)
permute = torch.ops.padst.permute
block = torch.ops.padst.block_linear


def canonical(fn, x, mode="training", **tensors):
    gm, ctx = trace(fn, [x], mode, **tensors)
    apply(canonicalize, gm, ctx, [x])
    return gm, ctx


def test_a_permutation_before_a_structured_op_stays_for_its_in_index():
    """An in_index costs the CPU kernels less than an out_index on the other side (a 768 -> 3072
    -> 768 block MLP at 4096 tokens: 27.7 against 36.7 ms): proj keeps its permutation."""
    def mlp(m, x):
        h = F.gelu(block(x, m.v1, m.i1, 32, None, m.p1))
        return block(h, m.v2, m.i2, 16, None, m.p2)

    x = torch.randn(5, 16)
    gm, ctx = canonical(mlp, x, v1=FC.values, i1=FC.index, p1=P16, v2=PROJ.values, i2=PROJ.index, p2=P32)
    code = check_pass(propagate_permutations, gm, ctx, [x], expect_change=False)
    FileCheck().check("permute.default(x, p1)").check("block_linear.default(permute_default, v1, i1, 32, None, None, None)") \
        .check("gelu").check("permute.default(gelu, p2)").run(code)


def test_a_permutation_no_consumer_absorbs_moves_into_the_producer_output():
    def fn(m, x):
        return permute(F.gelu(block(x, m.v1, m.i1, 32)), m.p)

    x = torch.randn(5, 16)
    gm, ctx = canonical(fn, x, v1=FC.values, i1=FC.index, p=P32)
    code = check_pass(propagate_permutations, gm, ctx, [x])
    FileCheck().check("block_linear.default(x, v1, i1, 32, None, None, p)").check("gelu").check_not("permute") \
        .run(code)
    assert node_counts(gm)["permutes"] == 0


def test_a_permutation_and_its_inverse_cancel():
    def fn(m, x):
        return permute(torch.relu(permute(x, m.p)), m.inv)

    x = torch.randn(4, 16)
    gm, ctx = canonical(fn, x, p=P16, inv=torch.argsort(P16))
    code = check_pass(propagate_permutations, gm, ctx, [x])
    FileCheck().check_not("padst.permute").check("relu").run(code)


def test_two_permutations_become_one():
    q = torch.randperm(16)

    def fn(m, x):
        return permute(torch.tanh(permute(x, m.p)), m.q)

    x = torch.randn(4, 16)
    gm, ctx = canonical(fn, x, p=P16, q=q)
    code = check_pass(propagate_permutations, gm, ctx, [x])
    FileCheck().check("tanh").check_count("padst.permute", 1, exactly=True).run(code)


def test_layernorm_and_residual_share_one_layout_with_parameters_folded_in_inference():
    """In inference an N:M layer's out_index folds into its rows: the permutation moves back
    through the residual and the norm (whose parameters fold) into it. A block layer keeps
    the cheaper in_index of the consumer, and so does training (the parameters would need
    gathers of their own)."""
    weight, bias = torch.randn(32), torch.randn(32)
    nm_fc = NM(4).project(torch.randn(32, 16), 0.5)

    def make(linear):
        def fn(m, x):
            h = linear(x, m.v1, m.i1, 32)
            y = F.layer_norm(h, (32,), m.w, m.b) + h
            return block(permute(y, m.p), m.v2, m.i2, 16)
        return fn

    x = torch.randn(3, 16)
    tensors = dict(v1=nm_fc.values, i1=nm_fc.index, v2=PROJ.values, i2=PROJ.index, p=P32, w=weight, b=bias)
    gm, ctx = canonical(make(torch.ops.padst.nm_linear), x, mode="inference", **tensors)
    code = check_pass(propagate_permutations, gm, ctx, [x])
    FileCheck().check("nm_linear.default(x, v1, i1, 32, None, None, p)").check("layer_norm(nm_linear, (32,), weight = _padst_folded") \
        .check("block_linear.default(add, v2, i2, 16, None, None, None)").run(code)
    for mode, fc, linear in (("training", nm_fc, torch.ops.padst.nm_linear), ("inference", FC, block)):
        gm, ctx = canonical(make(linear), x, mode=mode, **{**tensors, "v1": fc.values, "i1": fc.index})
        code = check_pass(propagate_permutations, gm, ctx, [x], expect_change=False)
        FileCheck().check("layer_norm(").check("weight = w, bias = b").check("permute.default(add, p)").run(code)


def test_softmax_passes_and_a_feature_reduction_does_not_care():
    def fn(m, x):
        h = block(x, m.v1, m.i1, 32)
        s = torch.softmax(h, -1)
        return permute(s, m.p), h.sum(-1, keepdim=True)

    x = torch.randn(3, 16)
    gm, ctx = canonical(fn, x, v1=FC.values, i1=FC.index, p=P32)
    code = check_pass(propagate_permutations, gm, ctx, [x])
    FileCheck().check("block_linear.default(x, v1, i1, 32, None, None, p)").check("softmax") \
        .check_not("padst.permute").run(code)


def test_reshapes_are_barriers():
    def fn(m, x):
        h = block(x, m.v1, m.i1, 32).reshape(3, 4, 8)
        return h.reshape(3, 32)[..., m.p]

    x = torch.randn(3, 16)
    gm, ctx = canonical(fn, x, v1=FC.values, i1=FC.index, p=P32)
    assert node_counts(gm)["permutes"] == 1
    check_pass(propagate_permutations, gm, ctx, [x], expect_change=False)


def test_nm_structure_and_side_output_layers_compose():
    nm_fc = NM(4).project(torch.randn(32, 16), 0.5)

    def fn(m, x):  # fc permutes its output, proj its input: the two compose into one index
        h = torch.relu(torch.ops.padst.nm_linear(x, m.v1, m.i1, 32, None, None, m.q))
        return block(h, m.v2, m.i2, 16, None, m.p)

    x = torch.randn(3, 16)
    tensors = dict(v1=nm_fc.values, i1=nm_fc.index, q=torch.randperm(32), v2=PROJ.values, i2=PROJ.index, p=P32)
    gm, ctx = canonical(fn, x, **tensors)  # training: proj's in_index, the cheaper side
    code = check_pass(propagate_permutations, gm, ctx, [x])
    FileCheck().check("nm_linear.default(x, v1, i1, 32, None, None, None)").check("relu") \
        .check("block_linear.default(relu, v2, i2, 16, None, _padst").run(code)
    gm, ctx = canonical(fn, x, mode="inference", **tensors)  # the N:M rows absorb an out_index for free
    code = check_pass(propagate_permutations, gm, ctx, [x])
    FileCheck().check("nm_linear.default(x, v1, i1, 32, None, None, _padst").check("relu") \
        .check("block_linear.default(relu, v2, i2, 16, None, None, None)").run(code)


def test_indices_a_structured_op_already_has_are_composed_not_replaced():
    """Without canonicalize first (a disabled pass, or a second pipeline run) existing indices stay."""
    nm = NM(4).project(torch.randn(32, 16), 0.5)

    def fn(m, x):
        h = torch.relu(torch.ops.padst.nm_linear(x, m.v1, m.i1, 32, None, None, m.o))
        return block(permute(h, m.p), m.v2, m.i2, 16, None, m.q)

    x = torch.randn(3, 16)
    gm, ctx = trace(fn, [x], "inference", v1=nm.values, i1=nm.index, o=torch.randperm(32), p=P32,
                    v2=PROJ.values, i2=PROJ.index, q=torch.randperm(32))
    code = check_pass(propagate_permutations, gm, ctx, [x])  # p moves into the N:M rows' out_index, composed with o
    FileCheck().check("nm_linear.default(x, v1, i1, 32, None, None, _padst").check("block_linear(relu, v2, i2, 16, None, q)") \
        .run(code)
