"""Pass 5, clean up: compose permute chains, drop identity permutes and dead code, lint.

    permute(permute(x, p), q)  =>  permute(x, p[q])      (=> x when p[q] is the identity)
    permute(x, arange(d))      =>  x
"""

from __future__ import annotations

from torch import fx

from padst_compiler.passes.context import PassContext
from padst_compiler.passes.indices import compose, is_identity
from padst_compiler.passes.graph import is_permute


def cleanup(gm: fx.GraphModule, ctx: PassContext) -> bool:
    changed = False
    for node in list(gm.graph.nodes):
        if not is_permute(node):
            continue
        source, index = node.args[0], ctx.constant(node.args[1])
        if index is None:
            continue
        if isinstance(source, fx.Node) and is_permute(source) and ctx.constant(source.args[1]) is not None:
            index = compose(ctx.constant(source.args[1]), index)
            source, changed = source.args[0], True
            node.args = (source, node.args[1] if index is None else ctx.add_constant(gm, index, "_padst_chain"))
        if is_identity(index):
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            changed = True
    changed |= gm.graph.eliminate_dead_code()
    live = set(gm.graph.nodes)
    for node in [n for n in ctx.constants if n.op == "get_attr" and n not in live]:
        del ctx.constants[node]
        if hasattr(gm, node.target) and not any(n.op == "get_attr" and n.target == node.target for n in live):
            delattr(gm, node.target)
    gm.graph.lint()
    gm.recompile()
    return changed
