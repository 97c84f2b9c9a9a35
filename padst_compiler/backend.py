"""The ``padst`` torch.compile backend: padst passes on Dynamo's graph, then Inductor.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="padst")`` works without importing this package first.
Options (``torch.compile(..., options={...})``):

- ``mode``: ``"training"`` (default) or ``"inference"``; inference folds permutations into
  parameters, which is only right when they are frozen (``padst_compiler.optimize`` does that).
- ``disable``: names of passes to skip.
- ``debug_dir``: record every pass of every graph there (also ``PADST_DEBUG_DIR``).
- ``check``: compare each pass's outputs with the original graph's on the example inputs; a
  pass that changes them beyond 1e-4 is reported in the fallback warning (the graph is
  then compiled unmodified).
- ``strict``: raise instead of falling back (for tests and for debugging a pass).

Any failure in the passes falls back to Inductor on the unmodified graph, and a failure
in Inductor to eager execution, each with a warning that names the graph, the pass and
the exception: training never crashes because of the backend.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx
from torch._dynamo.exc import RestartAnalysis

from padst_compiler.passes.context import PassContext
from padst_compiler.passes.graph import IN_INDEX, OUT_INDEX, attribute_value, is_permute, is_structured, \
    last_axis_gather_index, structured_args
from padst_compiler.pipeline import MODES, PASS_NAMES, PipelineResult, run_pipeline

CHECK_TOLERANCE = 1e-4  # largest output difference a pass may cause under ``check``


@dataclass(frozen=True)
class BackendConfig:
    mode: str = "training"
    disable: tuple[str, ...] = ()
    debug_dir: str | None = None
    check: bool = False
    strict: bool = False

    @classmethod
    def from_options(cls, options: dict | None) -> BackendConfig:
        options = dict(options or {})
        unknown = set(options) - {"mode", "disable", "debug_dir", "check", "strict"}
        if unknown:
            raise ValueError(f"padst backend: unknown option(s) {sorted(unknown)}; "
                             "known: mode, disable, debug_dir, check, strict")
        mode = options.get("mode", "training")
        if mode not in MODES:
            raise ValueError(f"padst backend: mode must be one of {MODES}, got {mode!r}")
        disable = options.get("disable", ())
        disable = (disable,) if isinstance(disable, str) else tuple(disable)
        if set(disable) - set(PASS_NAMES):
            raise ValueError(f"padst backend: cannot disable unknown pass(es) {sorted(set(disable) - set(PASS_NAMES))};"
                             f" the passes are {list(PASS_NAMES)}")
        debug_dir = options.get("debug_dir") or os.environ.get("PADST_DEBUG_DIR") or None
        for flag in ("check", "strict"):
            if not isinstance(options.get(flag, False), bool):
                raise TypeError(f"padst backend: {flag} must be True or False, got {options[flag]!r}")
        return cls(mode, disable, debug_dir, options.get("check", False), options.get("strict", False))


def _module_state_kind(node: fx.Node) -> str | None:
    """"parameter" / "buffer" for placeholders Dynamo lifted from module state."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = source.name if isinstance(getattr(source, "name", None), str) else str(getattr(source, "name", ""))
    if "._parameters[" in name:
        return "parameter"
    if "._buffers[" in name:
        return "buffer"
    return None


def _permutation_index_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes used as a permutation index (permute index, in_index / out_index, a feature
    gather's index). Other integer buffers, such as the structure's own index that DST
    rewrites every update, must stay graph inputs."""
    used = set()
    for node in gm.graph.nodes:
        if is_permute(node):
            used.add(node.args[1])
        elif is_structured(node):
            args = structured_args(node)
            used.update(a for a in (args[IN_INDEX], args[OUT_INDEX]) if a is not None)
        elif (index := last_axis_gather_index(node)) is not None:
            used.add(index)
    return used


def context_for(gm: fx.GraphModule, example_inputs: Sequence, mode: str) -> PassContext:
    """Which placeholders hold fixed tensors: index buffers always (a new permutation comes with a
    recompile, since hardening flips a guarded flag), all module state in inference mode."""
    ctx = PassContext(mode=mode)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    permutation_indices = _permutation_index_nodes(gm)
    for node, value in zip(placeholders, example_inputs):
        kind = _module_state_kind(node)
        if kind is None or not isinstance(value, torch.Tensor) or isinstance(value, torch._subclasses.FakeTensor):
            continue
        is_index = kind == "buffer" and node in permutation_indices and value.dtype == torch.int64 and value.dim() == 1
        if is_index or mode == "inference":
            ctx.constants[node] = value.detach()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            ctx.constants[node] = attribute_value(gm, node)
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
        from padst_compiler.debug import write_kernel_choices_at_exit, write_run

        write_run(config.debug_dir, result, original_code=gm.code)
        write_kernel_choices_at_exit(config.debug_dir)
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
        if config.strict:
            raise
        warnings.warn(f"padst: the passes failed on graph {_graph_name(gm)} ({type(error).__name__}: {error}); "
                      "compiling it with Inductor unchanged", stacklevel=2)
        optimized = gm
    from torch._inductor.compile_fx import compile_fx

    try:
        return compile_fx(optimized, example_inputs)
    except RestartAnalysis:
        raise
    except Exception as error:
        if config.strict:
            raise
        warnings.warn(f"padst: Inductor failed on graph {_graph_name(gm)} ({type(error).__name__}: {error}); "
                      "running it eagerly", stacklevel=2)
        return optimized.forward


def _graph_name(gm: fx.GraphModule) -> str:
    """Dynamo's compile id (as ``TORCH_LOGS`` prints it) and the graph's size."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    nodes = len(gm.graph.nodes)
    return f"[{compile_id}] ({nodes} nodes)" if compile_id is not None else f"({nodes} nodes)"
