"""Pass 1, canonicalize: every way the graph writes a feature permutation becomes a
standalone ``padst::permute`` node, so later passes see one form.

    block_linear(x, v, i, n, b, p, q)  =>  permute(block_linear(permute(x, p), v, i, n, b), q)
    x[..., idx]                        =>  permute(x, idx)        (idx a known permutation)
    torch.index_select(x, -1, idx)     =>  permute(x, idx)        (idx a known permutation)

A gather whose index is not known to be a permutation is left alone (it is a barrier
for the layout pass, never a silent rewrite).
"""

from __future__ import annotations

import torch
from torch import fx

from padst_compiler.passes.context import PassContext
from padst_compiler.passes.graph import (
    IN_INDEX,
    OUT_INDEX,
    PERMUTE,
    X,
    canonical_target,
    feature_size,
    is_permute,
    is_structured,
    last_axis_gather_index,
    meta_value,
    set_structured_args,
    structured_args,
)


def _is_permutation(index: torch.Tensor | None) -> bool:
    return (index is not None and index.dim() == 1 and index.dtype == torch.int64
            and torch.equal(index.sort().values, torch.arange(index.numel(), device=index.device)))


def _permute(graph: fx.Graph, source: fx.Node, index: fx.Node) -> fx.Node:
    """A permute node that carries its value's metadata at once, so later rewrites in the
    same run can read its feature size."""
    node = graph.call_function(PERMUTE, (source, index))
    if meta_value(source) is not None:
        node.meta["val"] = meta_value(source)
    return node


def canonicalize(gm: fx.GraphModule, ctx: PassContext) -> bool:
    graph, changed = gm.graph, False
    for node in list(graph.nodes):
        if is_permute(node) and node.target is not PERMUTE:
            node.target, changed = PERMUTE, True
        elif is_structured(node):
            args = structured_args(node)
            in_index, out_index = args[IN_INDEX], args[OUT_INDEX]
            if in_index is None and out_index is None and node.target is canonical_target(node) and not node.kwargs:
                continue
            if in_index is not None:
                with graph.inserting_before(node):
                    args[X] = _permute(graph, args[X], in_index)
            args[IN_INDEX] = args[OUT_INDEX] = None
            set_structured_args(node, args)
            if out_index is not None:
                with graph.inserting_after(node):
                    permuted = _permute(graph, node, out_index)
                node.replace_all_uses_with(permuted, delete_user_cb=lambda user: user is not permuted)
            changed = True
        else:
            index = last_axis_gather_index(node)
            value = ctx.constant(index)
            if _is_permutation(value) and value.numel() == feature_size(node.args[0]):
                with graph.inserting_before(node):
                    permuted = _permute(graph, node.args[0], index)
                node.replace_all_uses_with(permuted)
                graph.erase_node(node)
                changed = True
    return changed
