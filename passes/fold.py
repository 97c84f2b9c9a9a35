"""Pass 4, fold (inference only): with frozen parameters, permutations next to constant
weights become part of the weights and cost nothing at run time.

    permute(W, p)                              =>  W[..., p]                 (a new constant)
    F.linear(permute(x, p), W, b)              =>  F.linear(x, W[:, inv(p)], b)
    permute(F.linear(x, W, b), p)              =>  F.linear(x, W[p], b[p])
    permute(F.embedding(i, W), p)              =>  F.embedding(i, W[:, p])
    nm_linear(x, v, i, n, b, out_index=p)      =>  nm_linear(x, v[p], i[p], n, b[p])

N:M rows are independent, so a row permutation keeps the weight N:M; block and
diagonal weights keep theirs as a fused ``out_index``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from padst_compiler.passes.context import PassContext
from padst_compiler.passes.graph import BIAS, INDEX, OUT_INDEX, VALUES, canonical_target, is_dense_linear, \
    is_permute, set_structured_args, structured_args
from padst_compiler.passes.indices import inverse


def _constant_args(ctx: PassContext, *nodes) -> list[torch.Tensor | None] | None:
    """The constant values of ``nodes`` (None stays None); None if any is not constant."""
    values = []
    for node in nodes:
        if node is None:
            values.append(None)
        elif (value := ctx.constant(node)) is None:
            return None
        else:
            values.append(value)
    return values


def _linear_args(node: fx.Node):
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0], weight, bias


def _fold_permute(gm, ctx: PassContext, node: fx.Node) -> bool:
    source, index = node.args[0], ctx.constant(node.args[1])
    if index is None:
        return False
    if ctx.constant(source) is not None:
        node.replace_all_uses_with(ctx.permuted_constant(gm, source, index))
        gm.graph.erase_node(node)
        return True
    if not isinstance(source, fx.Node) or len(source.users) != 1:
        return False
    if is_dense_linear(source):
        x, weight, bias = _linear_args(source)
        constants = _constant_args(ctx, weight, bias)
        if constants is None:
            return False
        weight_value, bias_value = constants
        source.args = (x, ctx.add_constant(gm, weight_value[index], "_padst_folded"),
                       None if bias is None else ctx.add_constant(gm, bias_value[index], "_padst_folded"))
        source.kwargs = {}
    elif source.op == "call_function" and source.target is F.embedding:
        constants = _constant_args(ctx, source.args[1])
        if constants is None:
            return False
        source.args = (source.args[0], ctx.add_constant(gm, constants[0][:, index], "_padst_folded"),
                       *source.args[2:])
    else:
        return False
    node.replace_all_uses_with(source)
    gm.graph.erase_node(node)
    return True


def read_permuted_input(gm, ctx: PassContext, linear: fx.Node, source: fx.Node, index: torch.Tensor) -> None:
    """Make ``linear`` read ``source`` and compute what it computed on ``source[..., index]``:
    ``F.linear(x[..., p], W, b) == F.linear(x, W[:, inv(p)], b)`` (the weight must be constant)."""
    _, weight, bias = _linear_args(linear)
    linear.args = (source, ctx.add_constant(gm, ctx.constants[weight][:, inverse(index)], "_padst_folded"), bias)
    linear.kwargs = {}


def _fold_linear_input(gm, ctx: PassContext, node: fx.Node) -> bool:
    x, weight, _ = _linear_args(node)
    if not (isinstance(x, fx.Node) and is_permute(x)):
        return False
    index = ctx.constant(x.args[1])
    if index is None or _constant_args(ctx, weight) is None:
        return False
    read_permuted_input(gm, ctx, node, x.args[0], index)
    return True


def rows_fold(ctx: PassContext, node: fx.Node) -> bool:
    """Whether an ``out_index`` of structured op ``node`` folds into its weight's rows (an N:M
    op with constant weights, in inference): there it costs nothing at run time."""
    if not (ctx.inference and canonical_target(node) is torch.ops.padst.nm_linear.default):
        return False
    args = structured_args(node)
    return _constant_args(ctx, args[VALUES], args[INDEX], args[BIAS]) is not None


def _fold_nm_rows(gm, ctx: PassContext, node: fx.Node) -> bool:
    if not rows_fold(ctx, node):
        return False
    args = structured_args(node)
    if args[OUT_INDEX] is None:
        return False
    constants = _constant_args(ctx, args[VALUES], args[INDEX], args[BIAS], args[OUT_INDEX])
    if constants is None:
        return False
    values, index, bias, rows = constants
    args[VALUES] = ctx.add_constant(gm, values[rows], "_padst_folded")
    args[INDEX] = ctx.add_constant(gm, index[rows], "_padst_folded")
    args[BIAS] = None if bias is None else ctx.add_constant(gm, bias[rows], "_padst_folded")
    args[OUT_INDEX] = None
    set_structured_args(node, args)
    return True


def fold_into_weights(gm: fx.GraphModule, ctx: PassContext) -> bool:
    if not ctx.inference:
        return False
    changed = False
    for node in list(gm.graph.nodes):
        if is_permute(node):
            changed |= _fold_permute(gm, ctx, node)
        elif is_dense_linear(node):
            changed |= _fold_linear_input(gm, ctx, node)
        elif node.op == "call_function":
            changed |= _fold_nm_rows(gm, ctx, node)
    return changed
