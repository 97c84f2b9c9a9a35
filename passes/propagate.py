"""Pass 2, propagate permutations: layout assignment over feature axes.

Every tensor with a feature (last) axis gets a *layout* ``s``: the graph stores
``true[..., s]`` instead of ``true``. Tensors tied by ops that commute with a feature
permutation (elementwise ops, residual adds, LayerNorm with its affine parameters,
softmax over the features) form one component (networkx connected components) and
share one layout. A ``permute(a, p)`` between components A and B costs nothing when
``s_A = p[s_B]``; a structured op reading or writing a component absorbs its layout as
``in_index`` / ``out_index`` at almost no cost; anything unknown (reshapes, attention
head splits, graph outputs, ...) is a barrier that needs the identity layout or pays a
standalone gather. The pass picks, per group of components linked by permutes, the
layouts with the fewest standalone gathers, then rewrites the graph to them:

    h = permute(x, p1); y = fc(h); g = gelu(y); z = proj(permute(g, p2))
 => h = permute(x, p1); y = fc(h, out_index=p2); g = gelu(y); z = proj(g)

    y = permute(permute(x, p), inverse(p))   =>   y = x
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx

from padst_compiler.passes.context import PassContext
from padst_compiler.passes.fold import read_permuted_input, rows_fold
from padst_compiler.passes.indices import compose, inverse
from padst_compiler.passes.graph import (
    IN_INDEX,
    OUT_INDEX,
    PERMUTE,
    X,
    elementwise_kind,
    feature_size,
    is_dense_linear,
    is_layer_norm,
    is_permute,
    is_structured,
    meta_value,
    set_structured_args,
    structured_args,
)

STANDALONE = 1.0  # a gather pass over a tensor
# Fused indices cost little, loads less than stores (`padst bench kernels`, columns in_index
# and out_index, AVX2): a 768 -> 3072 forward took -5..+8 % longer with an in_index and
# +13..+66 % with an out_index, a 3072 -> 768 one -2..+46 % and +4..+54 %. An out_index the
# fold pass moves into an N:M weight's rows costs nothing.
FUSED_LOAD = 0.001  # an in_index: indexed load inside the consuming kernel
FUSED_STORE = 0.002  # an out_index: indexed store inside the producing kernel
_REDUCTIONS = {torch.sum, torch.mean, torch.amax, torch.amin, torch.logsumexp}
_REDUCTION_METHODS = {"sum", "mean", "amax", "amin", "logsumexp"}


@dataclass
class Component:
    members: set[fx.Node]
    producers: list[tuple[fx.Node, str, float]] = field(default_factory=list)  # (member, how, cost)
    consumers: list[tuple[fx.Node, fx.Node, str, float]] = field(default_factory=list)  # (member, user, how, cost)

    def cost(self) -> float:
        return sum(c for *_, c in self.producers) + sum(c for *_, c in self.consumers)


@dataclass(frozen=True)
class Edge:
    node: fx.Node  # the permute
    source: int  # component of its input
    target: int  # component of its output
    index: torch.Tensor
    cost: float  # of keeping a gather here: the fuse pass absorbs it next to a structured op


def _kept_permute_cost(node: fx.Node, ctx: PassContext) -> float:
    users, source = list(node.users), node.args[0]
    if is_structured(source) and len(source.users) == 1 and rows_fold(ctx, source):
        return 0.0
    if len(users) == 1 and is_structured(users[0]) and structured_args(users[0])[X] is node:
        return FUSED_LOAD
    if is_structured(source) and len(source.users) == 1:
        return FUSED_STORE
    return STANDALONE


def _is_softmax_last(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (F.softmax, torch.softmax, F.log_softmax):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    elif node.op == "call_method" and node.target in ("softmax", "log_softmax"):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    else:
        return False
    value = meta_value(node)
    return value is not None and dim in (-1, value.dim() - 1)


def _is_feature_reduction(node: fx.Node, member: fx.Node) -> bool:
    """sum / mean / ... over the last axis only: the result does not depend on the layout."""
    is_call = node.op == "call_function" and node.target in _REDUCTIONS
    is_method = node.op == "call_method" and node.target in _REDUCTION_METHODS
    if not (is_call or is_method) or not node.args or node.args[0] is not member:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    rank = meta_value(member).dim()
    return dim in (-1, rank - 1) or dim in ((-1,), (rank - 1,), [-1], [rank - 1])


def _transparent_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs that share ``node``'s layout, for ops that commute with feature permutations."""
    size = feature_size(node)
    if size is None:
        return []
    if elementwise_kind(node) == "unary" or _is_softmax_last(node):
        operands = node.args[:1]
    elif elementwise_kind(node) == "binary":
        operands = node.args
    elif is_layer_norm(node):  # input, weight, bias
        operands = [node.args[0], *node.args[2:4], node.kwargs.get("weight"), node.kwargs.get("bias")]
    else:
        return []
    return [a for a in operands if isinstance(a, fx.Node) and feature_size(a) == size]


class LayoutProblem:
    """Components, their boundary costs and the permute edges between them."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext):
        self.ctx = ctx
        union = nx.Graph()
        transparent: set[fx.Node] = set()
        for node in gm.graph.nodes:
            if feature_size(node) is not None:
                union.add_node(node)
            inputs = _transparent_inputs(node)
            if inputs:
                transparent.add(node)
                for source in inputs:
                    union.add_edge(source, node)
        self.components = [Component(set(nodes)) for nodes in nx.connected_components(union)]
        self.component_of = {m: i for i, c in enumerate(self.components) for m in c.members}
        self.edges: list[Edge] = []
        for node in gm.graph.nodes:
            if is_permute(node) and node in self.component_of and node.args[0] in self.component_of:
                index = ctx.constant(node.args[1])
                if index is not None:
                    self.edges.append(Edge(node, self.component_of[node.args[0]], self.component_of[node], index,
                                           _kept_permute_cost(node, ctx)))
        edge_nodes = {edge.node for edge in self.edges}
        for component in self.components:
            for member in component.members:
                if member not in transparent and member not in edge_nodes:
                    component.producers.append(self._producer(member))
                for user in member.users:
                    if user in transparent and user in component.members:
                        continue
                    if user in edge_nodes and user.args[0] is member:
                        continue
                    component.consumers.append((member, user, *self._consumer(member, user)))

    def _foldable(self, node) -> bool:
        return self.ctx.inference and isinstance(node, fx.Node) and node in self.ctx.constants

    def _producer(self, member: fx.Node) -> tuple[fx.Node, str, float]:
        out_index = structured_args(member)[OUT_INDEX] if is_structured(member) else None
        if is_structured(member) and (out_index is None or out_index in self.ctx.constants):
            return member, "out_index", 0.0 if rows_fold(self.ctx, member) else FUSED_STORE
        if self._foldable(member):
            return member, "fold", 0.0
        return member, "permute_after", STANDALONE

    def _consumer(self, member: fx.Node, user: fx.Node) -> tuple[str, float]:
        args = structured_args(user) if is_structured(user) else None
        if args is not None and args[X] is member and member not in args[1:] and \
                (args[IN_INDEX] is None or args[IN_INDEX] in self.ctx.constants):
            return "in_index", FUSED_LOAD
        if _is_feature_reduction(user, member):
            return "invariant", 0.0
        if is_dense_linear(user) and user.args[0] is member and self._foldable(user.args[1]):
            return "fold_linear", 0.0  # into the frozen weight's columns
        return "permute_before", STANDALONE

    # ------------------------------------------------------------------- solving

    def cost(self, layouts: list[torch.Tensor | None]) -> float:
        total = sum(c.cost() for c, s in zip(self.components, layouts) if s is not None)
        return total + sum(e.cost for e in self.edges if self.residual(e, layouts) is not None)

    def residual(self, edge: Edge, layouts) -> torch.Tensor | None:
        """The gather an edge still needs: stored_b = stored_a[..., r], r = inv(s_a)[p[s_b]]."""
        return compose(inverse(layouts[edge.source]),
                             compose(edge.index, layouts[edge.target]))

    def solve(self) -> list[torch.Tensor | None]:
        layouts: list[torch.Tensor | None] = [None] * len(self.components)
        linked = nx.MultiGraph()
        linked.add_nodes_from(range(len(self.components)))
        for edge in self.edges:
            linked.add_edge(edge.source, edge.target, edge=edge)
        for group in nx.connected_components(linked):
            if len(group) == 1 and not any(e.source in group for e in self.edges):
                continue
            best, best_cost = None, None
            candidates = [None] + sorted(group)  # None: leave every layout alone
            for root in candidates:
                trial = list(layouts)
                if root is not None:
                    self._propagate_from(root, linked, trial)
                cost = self.cost(trial)
                if best_cost is None or cost < best_cost - 1e-9:
                    best, best_cost = trial, cost
            layouts = best
        return layouts

    def _propagate_from(self, root: int, linked: nx.MultiGraph, layouts: list) -> None:
        layouts[root] = None
        for parent, child in nx.bfs_edges(linked, root):
            edge = next(data["edge"] for data in linked.get_edge_data(parent, child).values())
            if edge.source == parent:  # s_parent = p[s_child]  =>  s_child = inv(p)[s_parent]
                layouts[child] = compose(inverse(edge.index), layouts[parent])
            else:  # s_child = p[s_parent]
                layouts[child] = compose(edge.index, layouts[parent])


def _known_index(ctx: PassContext, node) -> torch.Tensor | None:
    return None if node is None else ctx.constants[node]


def _index_node(gm: fx.GraphModule, ctx: PassContext, index: torch.Tensor | None) -> fx.Node | None:
    return None if index is None else ctx.add_constant(gm, index, "_padst_layout")


def propagate_permutations(gm: fx.GraphModule, ctx: PassContext) -> bool:
    problem = LayoutProblem(gm, ctx)
    if not problem.edges:  # every boundary prefers the identity layout: nothing to gain
        return False
    layouts = problem.solve()
    if all(s is None for s in layouts):
        return False
    graph = gm.graph
    for component, layout in zip(problem.components, layouts):
        if layout is None:
            continue
        stored = {}
        index = ctx.add_constant(gm, layout, "_padst_layout")
        for member, how, _ in component.producers:
            if how == "out_index":  # z[..., o][..., s]: compose with an index the op already has
                args = structured_args(member)
                args[OUT_INDEX] = _index_node(gm, ctx, compose(_known_index(ctx, args[OUT_INDEX]), layout))
                set_structured_args(member, args)
            elif how == "fold":
                stored[member] = ctx.permuted_constant(gm, member, layout)
                member.replace_all_uses_with(stored[member])
            else:
                with ctx.inserting_after(gm, member):
                    permuted = graph.call_function(PERMUTE, (member, index))
                member.replace_all_uses_with(permuted, delete_user_cb=lambda user: user is not permuted)
                stored[member] = permuted
        restore = inverse(layout)
        for member, user, how, _ in component.consumers:
            source = stored.get(member, member)
            if how == "in_index":  # stored[..., inv(s)][..., i]: compose with an index the op already has
                args = structured_args(user)
                args[IN_INDEX] = _index_node(gm, ctx, compose(restore, _known_index(ctx, args[IN_INDEX])))
                set_structured_args(user, args)
            elif how == "fold_linear":
                read_permuted_input(gm, ctx, user, source, restore)
            elif how == "permute_before":
                with graph.inserting_before(user):
                    restored = graph.call_function(PERMUTE, (source, ctx.add_constant(gm, restore, "_padst_layout")))
                user.replace_input_with(source, restored)
    for edge in problem.edges:
        residual = problem.residual(edge, layouts)
        if residual is None:
            edge.node.replace_all_uses_with(edge.node.args[0])
            graph.erase_node(edge.node)
        elif not torch.equal(residual, edge.index):
            edge.node.args = (edge.node.args[0], ctx.add_constant(gm, residual, "_padst_layout"))
    return True

