"""``export`` (``padst_compiler.export``): a hardened sparsified model as an AOTInductor package (``.pt2``).

``torch.export`` traces the model (the ``padst`` ops stay single nodes), the padst passes run
on that graph in inference mode (permutations fused into the structured ops or folded into
weights: no standalone permute is left), the result is exported again and compiled by
AOTInductor. The package runs in any process that has imported ``padst_compiler`` (which
registers the ops the package calls); ``load_package`` does both.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from padst_compiler.backend import context_for
from padst_compiler.outputs import PathError, atomic_open, check_file
from padst_compiler.pipeline import node_counts, run_pipeline
from padst_compiler.training import padst_layers

PACKAGE_SUFFIX = ".pt2"


def _is_package(text: str) -> bool:
    return text.startswith("PK")  # a .pt2 is a zip archive


def _check_path(path: Path) -> None:
    if path.suffix != PACKAGE_SUFFIX:
        raise PathError(f"{path}: an AOTInductor package file name ends with {PACKAGE_SUFFIX}")
    check_file(path, "an AOTInductor package", _is_package)


def _check_exportable(model: nn.Module, example_inputs) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"export: model must be an nn.Module (or a function building one, with checkpoint=), "
                        f"got {type(model).__name__}")
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("export: example_inputs must be a tuple or list of the model's positional inputs")
    soft = [name for name, layer in padst_layers(model) if layer.soft]
    if soft:
        raise ValueError(f"export: layer {soft[0]!r} (and {len(soft) - 1} more) still learns its permutation; "
                         "finish training or call padst_compiler.training.harden_permutations(model) first")


def exported_program(model: nn.Module, example_inputs: Sequence, dynamic_shapes=None) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` with the padst inference passes applied (model unchanged)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            traced = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    finally:
        for module, mode in modes:
            module.training = mode
    graph = traced.module()
    optimized = run_pipeline(graph, example_inputs, context_for(graph, example_inputs, "inference")).gm
    permutes = node_counts(optimized)["permutes"]
    if permutes:
        raise RuntimeError(f"export: {permutes} standalone permutation(s) left after the padst passes")
    with torch.no_grad():
        return torch.export.export(optimized, tuple(example_inputs), dynamic_shapes=dynamic_shapes)


def export(model: nn.Module | Callable[[], nn.Module], example_inputs: Sequence, path: str | Path, *,
           dynamic_shapes=None, checkpoint: str | Path | None = None) -> Path:
    """Write ``model`` as an AOTInductor package at ``path`` (``.pt2``) and return the path.

    ``checkpoint``: a folder written by ``padst_compiler.save``, loaded into ``model`` (a dense
    model of that architecture, or a function building one) first. ``dynamic_shapes`` is
    ``torch.export``'s. Every layer must be hardened. The file appears only once complete.
    """
    path = Path(path)
    _check_path(path)  # before a checkpoint changes the model
    if checkpoint is not None:
        from padst_compiler.checkpoint import load

        model = load(model, checkpoint)
    _check_exportable(model, example_inputs)
    program = exported_program(model, example_inputs, dynamic_shapes)
    package = io.BytesIO()
    torch._inductor.aoti_compile_and_package(program, package_path=package)
    with atomic_open(path, binary=True) as file:
        file.write(package.getbuffer())
    return path


def load_package(path: str | Path):
    """A ``.pt2`` written by ``export``, ready to call (``import padst_compiler`` registered its ops)."""
    check = Path(path)
    if not check.is_file():
        raise PathError(f"cannot read {check}: there is no such file")
    return torch._inductor.aoti_load_package(str(check))
