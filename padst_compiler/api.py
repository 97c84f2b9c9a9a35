"""``padst_compiler.optimize``: a model in, an optimized module with the same call signature out."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from padst_compiler.backend import BackendConfig, padst_backend
from padst_compiler.pipeline import MODES


class InferenceModule(nn.Module):
    """The frozen, compiled model; runs without autograd."""

    def __init__(self, model: nn.Module, compiled):
        super().__init__()
        self.model = model
        self._compiled = compiled

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self._compiled(*args, **kwargs)


def optimize(model: nn.Module, example_inputs: Sequence, mode: str = "inference",
             debug_dir: str | Path | None = None, disable: Sequence[str] = (), check: bool = False,
             strict: bool = False, dynamic: bool | None = None) -> nn.Module:
    """Compile ``model`` with the padst passes.

    ``mode="inference"`` freezes the parameters (eval mode, no autograd) so permutations fold
    into weights; the model is compiled right away on ``example_inputs``. ``mode="training"``
    returns a module to train as usual (forward and backward are compiled on first call).
    ``strict`` raises where the backend would fall back (a failing pass, Inductor failing).
    A call that raises leaves the model as it was (training flags, ``requires_grad``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tuple or list of the model's positional inputs")
    options = {"mode": mode, "disable": (disable,) if isinstance(disable, str) else tuple(disable), "check": check,
               "strict": strict}
    if debug_dir is not None:
        options["debug_dir"] = str(debug_dir)
    BackendConfig.from_options(options)  # bad options are refused before the model is touched
    backend = functools.partial(padst_backend, options=options)
    if mode == "training":
        return torch.compile(model, backend=backend, dynamic=dynamic)
    training = [(module, module.training) for module in model.modules()]
    trainable = [param for param in model.parameters() if param.requires_grad]
    model.eval()
    for param in trainable:
        param.requires_grad_(False)
    try:
        optimized = InferenceModule(model, torch.compile(model, backend=backend, dynamic=dynamic))
        optimized(*example_inputs)
    except BaseException:
        for module, flag in training:
            module.training = flag
        for param in trainable:
            param.requires_grad_(True)
        raise
    return optimized
