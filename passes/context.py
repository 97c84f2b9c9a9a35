"""What every pass may read besides the graph: the mode and the known constant tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx


@dataclass
class PassContext:
    """``constants`` maps placeholder / get_attr nodes to the tensors they hold when those
    are fixed for the compiled graph: permutation indices always (a change of permutation
    goes with a recompile), parameters only in inference mode (they are frozen there)."""

    mode: str = "training"
    constants: dict[fx.Node, torch.Tensor] = field(default_factory=dict)

    @property
    def inference(self) -> bool:
        return self.mode == "inference"

    def constant(self, node) -> torch.Tensor | None:
        return self.constants.get(node) if isinstance(node, fx.Node) else None

    def add_constant(self, gm: fx.GraphModule, tensor: torch.Tensor, prefix: str = "_padst_const") -> fx.Node:
        """A get_attr node holding ``tensor``, defined before every use (an existing node with an
        equal tensor is reused and hoisted: get_attr nodes have no inputs, so that is always valid)."""
        for node, value in self.constants.items():
            if node.op == "get_attr" and node.graph is gm.graph and value.dtype == tensor.dtype \
                    and value.shape == tensor.shape \
                    and value.device == tensor.device and torch.equal(value, tensor):
                return self.hoist(gm, node)
        name = f"{prefix}_{sum(1 for n in gm.graph.nodes if n.op == 'get_attr')}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, tensor)
        with gm.graph.inserting_before(self._first_computation(gm)):
            node = gm.graph.get_attr(name)
        node.meta["val"] = tensor
        self.constants[node] = tensor
        return node

    def permuted_constant(self, gm: fx.GraphModule, node: fx.Node, index: torch.Tensor) -> fx.Node:
        """A constant holding ``node``'s (constant) value gathered along its last axis."""
        return self.add_constant(gm, self.constants[node].index_select(-1, index), "_padst_folded")

    @staticmethod
    def inserting_after(gm: fx.GraphModule, node: fx.Node):
        """Insertion point right after ``node``; after every input and constant when ``node`` is one
        (constants get hoisted to the top, so a use must come after all of them)."""
        if node.op in ("placeholder", "get_attr"):
            return gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr")))
        return gm.graph.inserting_after(node)

    @staticmethod
    def _first_computation(gm: fx.GraphModule) -> fx.Node:
        return next(n for n in gm.graph.nodes if n.op != "placeholder")

    def hoist(self, gm: fx.GraphModule, node: fx.Node) -> fx.Node:
        """Move a get_attr constant to the top of the graph (placeholders already are)."""
        if node.op == "get_attr":
            first = self._first_computation(gm)
            if first is not node:
                first.prepend(node)
        return node
