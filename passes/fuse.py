"""Pass 3, fuse: standalone permutes next to a structured op become its indices.

    structured(permute(x, p), ..., in_index=q)       =>  structured(x, ..., in_index=p[q])
    permute(structured(x, ..., out_index=o), q)      =>  structured(x, ..., out_index=o[q])

Each rewrite needs the permute (first) or the structured op (second) to have no other
user: otherwise the permute stays and fusing would only add an indexed access. Indices are composed
at compile time, so both must be known (they always are after canonicalize). A permute
between two structured ops becomes the consumer's ``in_index``, which costs the kernels
less than the producer's ``out_index`` (see ``propagate``), unless that ``out_index`` folds
into the producer's weight (an N:M layer in inference).
"""

from __future__ import annotations

import torch
from torch import fx

from padst_compiler.passes.context import PassContext
from padst_compiler.passes.fold import rows_fold
from padst_compiler.passes.indices import compose
from padst_compiler.passes.graph import IN_INDEX, OUT_INDEX, X, is_permute, is_structured, set_structured_args, \
    structured_args


def _index_node(gm, ctx: PassContext, index: torch.Tensor | None, original: fx.Node | None):
    if index is None:
        return None
    if original is not None and torch.equal(ctx.constant(original), index):
        return ctx.hoist(gm, original)
    return ctx.add_constant(gm, index, "_padst_fused")


def _known(ctx: PassContext, node) -> tuple[bool, torch.Tensor | None]:
    if node is None:
        return True, None
    value = ctx.constant(node)
    return value is not None, value


def _read_as_in_index(ctx: PassContext, permute: fx.Node) -> bool:
    """Whether ``permute``'s only user is a structured op that will take it as its in_index."""
    users = list(permute.users)
    if len(users) != 1 or not is_structured(users[0]):
        return False
    args = structured_args(users[0])
    return args[X] is permute and _known(ctx, args[IN_INDEX])[0]


def fuse_permutations(gm: fx.GraphModule, ctx: PassContext) -> bool:
    changed = False
    for node in list(gm.graph.nodes):
        if not is_structured(node):
            continue
        args = structured_args(node)
        source = args[X]
        if isinstance(source, fx.Node) and is_permute(source) and len(source.users) == 1:
            (known_p, p), (known_q, q) = _known(ctx, source.args[1]), _known(ctx, args[IN_INDEX])
            if known_p and known_q:
                args[X], args[IN_INDEX] = source.args[0], _index_node(gm, ctx, compose(p, q), args[IN_INDEX])
                set_structured_args(node, args)
                gm.graph.erase_node(source)
                changed = True
        users = list(node.users)
        if len(users) == 1 and is_permute(users[0]) and users[0].args[0] is node and \
                (rows_fold(ctx, node) or not _read_as_in_index(ctx, users[0])):
            permute = users[0]
            (known_o, o), (known_q, q) = _known(ctx, args[OUT_INDEX]), _known(ctx, permute.args[1])
            if known_o and known_q:
                args[OUT_INDEX] = _index_node(gm, ctx, compose(o, q), args[OUT_INDEX])
                set_structured_args(node, args)
                permute.replace_all_uses_with(node)
                gm.graph.erase_node(permute)
                changed = True
    return changed
