"""The pass manager: one fixed, visible order of passes over a torch.fx graph.

Both entry points (the ``padst`` torch.compile backend and ``optimize``) run
``run_pipeline``. Each pass is a plain function ``(GraphModule, PassContext) -> bool``
(whether it changed the graph). The manager keeps node metadata fresh between passes,
enforces the contract that standalone permutations never grow, and, when asked to,
records every pass for the graph-diff tool.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from padst_compiler.passes.canonicalize import canonicalize
from padst_compiler.passes.cleanup import cleanup
from padst_compiler.passes.context import PassContext
from padst_compiler.passes.fold import fold_into_weights
from padst_compiler.passes.fuse import fuse_permutations
from padst_compiler.passes.graph import IN_INDEX, OUT_INDEX, attribute_value, canonical_target, is_permute, \
    is_structured, last_axis_gather_index, meta_value, structured_args
from padst_compiler.passes.propagate import propagate_permutations

MODES = ("training", "inference")


@dataclass(frozen=True)
class Pass:
    """``unfuses``: the pass turns fused indices into standalone permutes on purpose (so the
    growth check does not apply to it; the pipeline as a whole still may not grow them)."""

    name: str
    run: Callable[[fx.GraphModule, PassContext], bool]
    modes: tuple[str, ...] = MODES
    unfuses: bool = False


PASSES: tuple[Pass, ...] = (
    Pass("canonicalize", canonicalize, unfuses=True),
    Pass("propagate", propagate_permutations),
    Pass("fuse", fuse_permutations),
    Pass("fold", fold_into_weights, ("inference",)),
    Pass("cleanup", cleanup),
)
PASS_NAMES = tuple(p.name for p in PASSES)


def node_counts(gm: fx.GraphModule) -> dict[str, int]:
    """Standalone permutes, all gather passes over a feature axis (permutes and indexing), fused
    gathers (in_index / out_index), structured ops by kind, all nodes."""
    counts: Counter[str] = Counter(nodes=len(gm.graph.nodes), permutes=0, gathers=0, fused_gathers=0)
    for node in gm.graph.nodes:
        if is_permute(node):
            counts["permutes"] += 1
            counts["gathers"] += 1
        elif last_axis_gather_index(node) is not None:
            counts["gathers"] += 1
        elif is_structured(node):
            args = structured_args(node)
            counts[canonical_target(node).name().split("::")[1]] += 1
            counts["fused_gathers"] += (args[IN_INDEX] is not None) + (args[OUT_INDEX] is not None)
    return dict(counts)


@dataclass
class PassRecord:
    """What one pass did to one graph (filled only when recording)."""

    name: str
    changed: bool
    seconds: float
    counts_before: dict[str, int]
    counts_after: dict[str, int]
    code_before: str = ""
    code_after: str = ""
    max_abs_diff: float | None = None


@dataclass
class PipelineResult:
    gm: fx.GraphModule
    records: list[PassRecord] = field(default_factory=list)


def refresh_meta(gm: fx.GraphModule, fake_inputs: Sequence) -> None:
    """Give every node a ``meta["val"]`` the passes can read feature sizes from.

    A graph without metadata (a hand-traced one) gets one fake propagation. A Dynamo graph
    keeps its own ``example_value``s (re-propagating would have to replay Dynamo's symbolic
    shapes and unbacked scalars); nodes the passes add are permutes, which have the shape
    of their input, and get_attr constants, which hold real tensors.
    """
    if any("val" not in n.meta and "example_value" not in n.meta for n in gm.graph.nodes if n.op == "placeholder"):
        mode = next((x.fake_mode for x in fake_inputs if isinstance(x, FakeTensor)), None) or \
            FakeTensorMode(allow_non_fake_inputs=True)
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)
        return
    for node in gm.graph.nodes:
        if meta_value(node) is not None:
            continue
        if node.op == "get_attr":
            node.meta["val"] = attribute_value(gm, node)
        elif is_permute(node) and meta_value(node.args[0]) is not None:
            node.meta["val"] = meta_value(node.args[0])


def fake_inputs_for(example_inputs: Sequence) -> list:
    """Fake versions of the example inputs, for graphs that carry no metadata of their own."""
    if any(isinstance(x, FakeTensor) for x in example_inputs):
        return list(example_inputs)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    return [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x for x in example_inputs]


def _outputs(gm: fx.GraphModule, inputs: Sequence) -> list[torch.Tensor]:
    with torch.no_grad():
        out = gm(*inputs)
    out = out if isinstance(out, (tuple, list)) else [out]
    return [o for o in out if isinstance(o, torch.Tensor)]


def max_abs_diff(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    return max(((r.float() - o.float()).abs().max().item() for r, o in zip(reference, outputs)
                if r.numel()), default=0.0)


class PassFailed(RuntimeError):
    """A pass raised: names it and the passes that ran before it (the cause is chained)."""

    def __init__(self, name: str, before: list[str], error: Exception):
        after = f" after {', '.join(repr(n) for n in before)}" if before else " (the first pass)"
        super().__init__(f"pass {name!r} failed{after}: {type(error).__name__}: {error}")
        self.pass_name = name


def run_pipeline(gm: fx.GraphModule, example_inputs: Sequence, ctx: PassContext,
                 disabled: Sequence[str] = (), record: bool = False,
                 numeric_inputs: Sequence | None = None) -> PipelineResult:
    """Run every enabled pass of ``ctx.mode`` in order; with ``record`` keep a PassRecord per pass
    (code before / after, counts, time, and with ``numeric_inputs`` the output difference)."""
    unknown = set(disabled) - set(PASS_NAMES)
    if unknown:
        raise ValueError(f"unknown pass(es) {sorted(unknown)}; the passes are {list(PASS_NAMES)}")
    fake_inputs = fake_inputs_for(example_inputs)
    refresh_meta(gm, fake_inputs)
    reference = _outputs(gm, numeric_inputs) if record and numeric_inputs is not None else None
    result = PipelineResult(gm)
    initial = node_counts(gm)["gathers"]
    ran: list[str] = []
    for step in PASSES:
        if step.name in disabled or ctx.mode not in step.modes:
            continue
        before = node_counts(gm)
        code_before = gm.code if record else ""
        start = time.perf_counter()
        try:
            changed = step.run(gm, ctx)
            if changed:
                gm.graph.lint()
                gm.recompile()
                refresh_meta(gm, fake_inputs)
        except Exception as error:
            raise PassFailed(step.name, ran, error) from error
        ran.append(step.name)
        seconds = time.perf_counter() - start
        after = node_counts(gm)
        if after["gathers"] > before["gathers"] and not step.unfuses:
            raise RuntimeError(f"pass {step.name!r} grew the standalone gathers from {before['gathers']} "
                               f"to {after['gathers']}")
        if record:
            diff = max_abs_diff(reference, _outputs(gm, numeric_inputs)) if reference is not None else None
            result.records.append(PassRecord(step.name, changed, seconds, before, after, code_before,
                                             gm.code, diff))
    if node_counts(gm)["gathers"] > initial:
        raise RuntimeError(f"the pipeline grew the standalone gathers from {initial} to "
                           f"{node_counts(gm)['gathers']}")
    return result
