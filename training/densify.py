"""``densify``: give a sparsified model back its plain dense layers, for tools that know nothing
of this library (exporters, other runtimes, ``from_pretrained`` of the original class)."""

from __future__ import annotations

import torch
from torch import nn

from padst_compiler.training.layer import PADSTLinear
from padst_compiler.training.sparsify import padst_layers, remove_checkpoint_guard


def dense_layer(layer: PADSTLinear) -> nn.Module:
    """The ``nn.Linear`` (or transposed-weight ``Conv1D``, whatever ``sparsify`` replaced) that
    computes what ``layer`` computes now: its permutation folded into the weight and bias."""
    weight = layer.effective_weight().detach()
    bias = layer.effective_bias()
    factory = {"device": weight.device, "dtype": weight.dtype}
    if issubclass(layer.dense_class, nn.Linear):
        module = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, **factory)
        stored = weight
    else:  # GPT-2's Conv1D(nf=out, nx=in), weight stored [in, out]
        module = layer.dense_class(layer.out_features, layer.in_features).to(**factory)
        stored = weight.t()
        if getattr(module, "weight", None) is None or module.weight.shape != stored.shape:
            raise TypeError(f"densify: layer {layer.name!r} came from {layer.dense_class.__name__}, which "
                            f"{layer.dense_class.__name__}({layer.out_features}, {layer.in_features}) does not "
                            f"rebuild with a [{layer.in_features}, {layer.out_features}] weight")
    with torch.no_grad():
        module.weight.copy_(stored)
        if module.bias is not None:
            module.bias.copy_(bias.detach() if bias is not None else torch.zeros_like(module.bias))
    return module


def densify(model: nn.Module) -> nn.Module:
    """Replace every ``PADSTLinear`` of ``model`` in place by the dense layer equal to it and
    return the model (the new layer itself when ``model`` is one). Every layer is built
    before any is swapped, so a refusal leaves the model as it was."""
    replacements = {name: dense_layer(layer) for name, layer in padst_layers(model)}
    if "" in replacements:
        return replacements[""]
    for name, module in replacements.items():
        model.set_submodule(name, module)
    remove_checkpoint_guard(model)  # a plain model again: load_state_dict as torch defines it
    return model
