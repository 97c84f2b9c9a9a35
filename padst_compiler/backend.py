"""The ``padst`` torch.compile backend: padst passes on Dynamo's graph, then Inductor.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="padst")`` works without importing this package first.
Options (``torch.compile(..., options={...})``):

- ``mode``: ``"training"`` (default) or ``"inference"``; inference folds permutations into
  parameters, which is only right when they are frozen (``padst_compiler.optimize`` does that).
- ``disable``: names of passes to skip.
- ``debug_dir``: record every pass of every graph there (also ``PADST_DEBUG_DIR``).
- ``check``: compare each pass's outputs with the original graph's on the example inputs.

Any failure in the passes falls back to Inductor on the unmodified graph, and a failure
in Inductor to eager execution, each with a warning that says why: training never
crashes because of the backend.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx
from torch._dynamo.exc import RestartAnalysis

from padst_compiler.passes.context import PassContext
from padst_compiler.pipeline import MODES, PASS_NAMES, PipelineResult, run_pipeline

log = logging.getLogger(__name__)
CHECK_TOLERANCE = 1e-4  # largest output difference a pass may cause under ``check``


@dataclass(frozen=True)
class BackendConfig:
    mode: str = "training"
    disable: tuple[str, ...] = ()
    debug_dir: str | None = None
    check: bool = False

    @classmethod
    def from_options(cls, options: dict | None) -> BackendConfig:
        options = dict(options or {})
        unknown = set(options) - {"mode", "disable", "debug_dir", "check"}
        if unknown:
            raise ValueError(f"padst backend: unknown option(s) {sorted(unknown)}; "
                             "known: mode, disable, debug_dir, check")
        mode = options.get("mode", "training")
        if mode not in MODES:
            raise ValueError(f"padst backend: mode must be one of {MODES}, got {mode!r}")
        disable = tuple(options.get("disable", ()))
        if set(disable) - set(PASS_NAMES):
            raise ValueError(f"padst backend: cannot disable unknown pass(es) {sorted(set(disable) - set(PASS_NAMES))};"
                             f" the passes are {list(PASS_NAMES)}")
        debug_dir = options.get("debug_dir") or os.environ.get("PADST_DEBUG_DIR") or None
        return cls(mode, disable, debug_dir, bool(options.get("check", False)))


def _module_state_kind(node: fx.Node) -> str | None:
    """"parameter" / "buffer" for placeholders Dynamo lifted from module state."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = source.name if isinstance(getattr(source, "name", None), str) else str(getattr(source, "name", ""))
    if "._parameters[" in name:
        return "parameter"
    if "._buffers[" in name:
        return "buffer"
    return None


def context_for(gm: fx.GraphModule, example_inputs: Sequence, mode: str) -> PassContext:
    """Which placeholders hold fixed tensors: index buffers always (a new permutation comes with a
    recompile, since hardening flips a guarded flag), all module state in inference mode."""
    ctx = PassContext(mode=mode)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        kind = _module_state_kind(node)
        if kind is None or not isinstance(value, torch.Tensor) or isinstance(value, torch._subclasses.FakeTensor):
            continue
        if kind == "parameter":
            ctx.parameters.add(node)
        is_index = kind == "buffer" and value.dtype == torch.int64 and value.dim() == 1
        if is_index or mode == "inference":
            ctx.constants[node] = value.detach()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            ctx.constants[node] = getattr(gm, node.target)
    return ctx


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy to rewrite; the original stays intact for the fallback."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def optimize_graph(gm: fx.GraphModule, example_inputs: Sequence, config: BackendConfig) -> PipelineResult:
    """Run the padst passes on a copy of ``gm`` (and write the debug records when asked)."""
    work = clone_graph_module(gm)
    ctx = context_for(work, example_inputs, config.mode)
    record = config.debug_dir is not None or config.check
    real = record and not any(isinstance(x, torch._subclasses.FakeTensor) for x in example_inputs)
    result = run_pipeline(work, example_inputs, ctx, disabled=config.disable, record=record,
                          numeric_inputs=list(example_inputs) if real else None)
    if config.debug_dir is not None:
        from padst_compiler.debug import write_run

        write_run(config.debug_dir, result, original_code=gm.code)
    if config.check:
        for record_ in result.records:
            if record_.max_abs_diff is not None and record_.max_abs_diff > CHECK_TOLERANCE:
                raise RuntimeError(f"pass {record_.name!r} changed the outputs by {record_.max_abs_diff:.3g}")
    return result


def padst_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, **_):
    config = BackendConfig.from_options(options)
    try:
        optimized = optimize_graph(gm, example_inputs, config).gm
    except RestartAnalysis:  # Dynamo's own control flow, not a failure
        raise
    except Exception as error:  # never let a pass failure crash the user's program
        warnings.warn(f"padst: the passes failed on this graph ({type(error).__name__}: {error}); "
                      "compiling it with Inductor unchanged", stacklevel=2)
        optimized = gm
    from torch._inductor.compile_fx import compile_fx

    try:
        return compile_fx(optimized, example_inputs)
    except RestartAnalysis:
        raise
    except Exception as error:
        warnings.warn(f"padst: Inductor failed on this graph ({type(error).__name__}: {error}); "
                      "running it eagerly", stacklevel=2)
        return optimized.forward
