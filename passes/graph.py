"""What the passes need to know about nodes of a Dynamo (torch-level) FX graph.

Dynamo records the padst ops as ``OpOverloadPacket`` targets and most torch functions
under several spellings (``torch._C._nn.gelu``, ``F.gelu``, ``x.relu()``); this module
is the one place that knows them, so passes match on meaning rather than on spelling.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from padst_compiler.kernels import ops as padst_ops  # noqa: F401  (registers torch.ops.padst)

PERMUTE = torch.ops.padst.permute.default
STRUCTURED = frozenset({torch.ops.padst.block_linear.default, torch.ops.padst.nm_linear.default,
                        torch.ops.padst.diag_linear.default})
_PACKETS = {torch.ops.padst.permute: PERMUTE, torch.ops.padst.block_linear: torch.ops.padst.block_linear.default,
            torch.ops.padst.nm_linear: torch.ops.padst.nm_linear.default,
            torch.ops.padst.diag_linear: torch.ops.padst.diag_linear.default}

# Positional layout of every structured op (kernels/ops/registry.py, one schema for all).
X, VALUES, INDEX, OUT_FEATURES, BIAS, IN_INDEX, OUT_INDEX = range(7)
_STRUCTURED_ARG_NAMES = ("x", "values", "index", "out_features", "bias", "in_index", "out_index")

# Elementwise ops whose output has the layout of their tensor inputs.
UNARY = frozenset({
    torch._C._nn.gelu, F.gelu, torch.relu, F.relu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.silu,
    torch.nn.functional.dropout, torch.neg, operator.neg, torch.exp, F.elu, F.leaky_relu, torch.abs,
})
UNARY_METHODS = frozenset({"relu", "tanh", "sigmoid", "neg", "exp", "abs", "float", "to", "contiguous"})
BINARY = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
                    torch.mul, torch.div, operator.iadd, operator.imul})
BINARY_METHODS = frozenset({"add", "sub", "mul", "div"})


def canonical_target(node: fx.Node):
    """``node.target`` with padst overload packets resolved to their default overload."""
    return _PACKETS.get(node.target, node.target)


def is_permute(node: fx.Node) -> bool:
    return node.op == "call_function" and canonical_target(node) is PERMUTE


def is_structured(node: fx.Node) -> bool:
    return node.op == "call_function" and canonical_target(node) in STRUCTURED


def structured_args(node: fx.Node) -> list:
    """The seven arguments of a structured op, positional, defaults filled in."""
    args = list(node.args) + [None] * (7 - len(node.args))
    for position, name in enumerate(_STRUCTURED_ARG_NAMES):
        if name in node.kwargs:
            args[position] = node.kwargs[name]
    return args


def set_structured_args(node: fx.Node, args: list) -> None:
    node.target = canonical_target(node)
    node.args, node.kwargs = tuple(args), {}


def attribute_value(gm: fx.GraphModule, node: fx.Node):
    """What a ``get_attr`` node reads; its target may be a dotted path (``torch.export``'s
    ``ep.module()`` keeps the model's module tree)."""
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value


def meta_value(node) -> torch.Tensor | None:
    """The fake (or real) tensor Dynamo or fake propagation recorded for ``node``."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, torch.Tensor) else None


def feature_size(node) -> int | None:
    """Size of the last axis of ``node``'s value, when it is a known integer."""
    value = meta_value(node)
    if value is None or value.dim() == 0:
        return None
    size = value.shape[-1]
    return size if isinstance(size, int) else None


def elementwise_kind(node: fx.Node) -> str | None:
    """``"unary"`` or ``"binary"`` for elementwise ops that keep the feature layout."""
    if node.op == "call_function":
        if node.target in UNARY:
            return "unary"
        if node.target in BINARY:
            return "binary"
    if node.op == "call_method":
        if node.target in UNARY_METHODS:
            return "unary"
        if node.target in BINARY_METHODS:
            return "binary"
    return None


def is_layer_norm(node: fx.Node) -> bool:
    """LayerNorm over the last axis only (so a feature permutation commutes with it)."""
    if node.op != "call_function" or node.target not in (F.layer_norm, torch.layer_norm):
        return False
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    return isinstance(shape, (tuple, list)) and len(shape) == 1


def is_dense_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch._C._nn.linear, F.linear)


def replace_uses(node: fx.Node, replacement: fx.Node) -> None:
    node.replace_all_uses_with(replacement, propagate_meta=False)


def last_axis_gather_index(node: fx.Node) -> fx.Node | None:
    """The index node of a gather along the last axis written as ``x[..., idx]``,
    ``x[:, :, idx]`` or ``index_select(x, -1, idx)``; None for anything else."""
    value = meta_value(node.args[0]) if node.args else None
    if value is None:
        return None
    last = value.dim() - 1
    if node.op == "call_function" and node.target is operator.getitem:
        key = node.args[1]
        if isinstance(key, tuple) and len(key) == 2 and key[0] is Ellipsis and isinstance(key[1], fx.Node):
            return key[1]
        if isinstance(key, tuple) and len(key) == value.dim() and all(k == slice(None) for k in key[:-1]) \
                and isinstance(key[-1], fx.Node):
            return key[-1]
        return None
    is_index_select = (node.op == "call_function" and node.target is torch.index_select) or \
                      (node.op == "call_method" and node.target == "index_select")
    if is_index_select and len(node.args) == 3 and node.args[1] in (-1, last) and isinstance(node.args[2], fx.Node):
        return node.args[2]
    return None
