"""``save`` / ``load``: a sparsified model as a folder a user can ship.

The folder holds ``model.safetensors`` (every tensor of the state dict: the compressed values,
indices and permutations of the PA-DST layers and the model's other weights, tied weights
stored once), ``padst.json`` (each PA-DST layer's structure, sparsity, permutation mode,
side and training state) and, for a Hugging Face model, its ``config.json``. ``load`` takes a freshly built *dense* model of the same
architecture (or a function that builds one), sparsifies the recorded layers as recorded and
loads the tensors: it checks everything before it changes anything, so a mismatch raises an
error naming the layer and leaves the model as it was.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from padst_compiler.kernels.structures import structure_from_record, structure_record
from padst_compiler.outputs import PathError, atomic_open, claim_directory, read_json, write_json
from padst_compiler.training.layer import PADSTLinear
from padst_compiler.training.sparsify import check_checkpoint_matches, guard_checkpoints, linear_parts, \
    padst_layers, replacement_layer, storage_identity

TENSORS, LAYERS = "model.safetensors", "padst.json"
HF_CONFIG = "config.json"  # a Hugging Face model's configuration, as save_pretrained writes it
FORMAT, VERSION = "padst-checkpoint", 1
EXTRA_STATE = "_extra_state"


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (sparsified or not) to ``directory``; each file is replaced atomically."""
    state = model.state_dict()
    layers = dict(padst_layers(model))
    if "" in layers:
        raise ValueError("save: the model itself is a PADSTLinear; save a model that holds it (e.g. nn.Sequential)")
    tensors, aliases, seen = {}, {}, {}
    for key, value in state.items():
        owner, _, field = key.rpartition(".")
        if field == EXTRA_STATE and owner in layers:
            continue
        if not torch.is_tensor(value):
            raise TypeError(f"save: state entry {key!r} is a {type(value).__name__}, not a tensor; safetensors "
                            "stores tensors only")
        storage = storage_identity(value) or key  # empty tensors share no weight
        if storage in seen:  # a tied weight: stored once, loaded under both names
            aliases[key] = seen[storage]
            continue
        seen[storage] = key
        tensors[key] = value.detach().to("cpu").contiguous()
    save_id = secrets.token_hex(8)
    record = {"format": FORMAT, "version": VERSION, "save_id": save_id, "aliases": aliases,
              "layers": {name: {"in_features": layer.in_features, "out_features": layer.out_features,
                                "bias": layer.bias is not None, "structure_fields": structure_record(layer.structure),
                                **layer.state_record()} for name, layer in layers.items()}}
    directory = claim_directory(directory, "padst_compiler.save", {TENSORS, LAYERS, HF_CONFIG})
    with atomic_open(directory / TENSORS, binary=True) as file:
        file.write(save_safetensors(tensors, metadata={"format": FORMAT, "save_id": save_id}))
    if callable(getattr(getattr(model, "config", None), "to_json_string", None)):
        # how to build the model again; save_pretrained names the class the same way
        config = {**json.loads(model.config.to_json_string()), "architectures": [type(model).__name__]}
        write_json(directory / HF_CONFIG, config)
    else:  # an earlier save's configuration would describe another model
        (directory / HF_CONFIG).unlink(missing_ok=True)
    write_json(directory / LAYERS, record)
    return directory


def _read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    record = read_json(directory / LAYERS)
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION \
            or not isinstance(record.get("layers"), dict) or not isinstance(record.get("aliases"), dict):
        raise ValueError(f"{directory / LAYERS} is not a {FORMAT} version {VERSION} record")
    try:
        data = (directory / TENSORS).read_bytes()
        header = _safetensors_metadata(data)
        tensors = load_safetensors(data)
    except (OSError, SafetensorError, ValueError) as error:
        raise PathError(f"cannot read {directory / TENSORS}: {error}") from None
    if header.get("save_id") != record.get("save_id"):
        raise ValueError(f"{directory}: {TENSORS} and {LAYERS} come from different saves (a save was "
                         "interrupted between the two files); save the model again")
    for alias, canonical in record["aliases"].items():
        if canonical not in tensors:
            raise ValueError(f"{directory / LAYERS}: tied entry {alias!r} names {canonical!r}, which {TENSORS} lacks")
        tensors[alias] = tensors[canonical]
    return record, tensors


def _safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file: an 8-byte length, then a JSON header."""
    if len(data) < 8 or int.from_bytes(data[:8], "little") > len(data) - 8:
        raise ValueError("not a safetensors file")
    return json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}


LAYER_FIELDS = {"in_features": int, "out_features": int, "bias": bool, "structure_fields": dict,
                "sparsity": (int, float), "permutation": str, "side": str, "dense_warmup": bool, "seed": int}


def _layer_for(model: nn.Module, name: str, record: dict) -> PADSTLinear | None:
    """The ``PADSTLinear`` to put at ``name`` (None: the one there already matches)."""
    if not isinstance(record, dict) or any(not isinstance(record.get(key), kind) for key, kind in LAYER_FIELDS.items()):
        raise ValueError(f"load: the record of layer {name!r} in {LAYERS} lacks a field or holds a wrong type "
                         f"(needs {', '.join(LAYER_FIELDS)}); nothing was loaded")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"load: the checkpoint has a PA-DST layer {name!r}, the model has no such module; "
                         "nothing was loaded") from None
    shape = f"{record['in_features']} -> {record['out_features']}"
    if isinstance(module, PADSTLinear):
        if (module.in_features, module.out_features) != (record["in_features"], record["out_features"]):
            raise ValueError(f"load: layer {name!r} is {module.in_features} -> {module.out_features}, the "
                             f"checkpoint's is {shape}; nothing was loaded")
        return None  # the checkpoint guard compares its structure and options
    linear = linear_parts(module)
    if linear is None:
        raise ValueError(f"load: layer {name!r} is a {type(module).__name__}, the checkpoint holds a linear "
                         f"layer {shape} there; nothing was loaded")
    weight, bias = linear
    if tuple(weight.shape) != (record["out_features"], record["in_features"]) or (bias is not None) != record["bias"]:
        raise ValueError(f"load: layer {name!r} is {weight.shape[1]} -> {weight.shape[0]} "
                         f"(bias={bias is not None}), the checkpoint's is {shape} (bias={record['bias']}); "
                         "nothing was loaded")
    try:
        structure = structure_from_record(record["structure_fields"])
    except ValueError as error:
        raise ValueError(f"load: layer {name!r}: {error}; nothing was loaded") from None
    return replacement_layer(module, structure, record["sparsity"], permutation=record["permutation"],
                             side=record["side"], name=name, seed=record["seed"], dense_warmup=record["dense_warmup"])


def load(model: nn.Module | Callable[[], nn.Module], directory: str | Path) -> nn.Module:
    """Load a ``save``d folder into ``model`` (a dense model of the saved architecture, or a
    function building one) and return it: the recorded layers are sparsified as recorded,
    then every tensor is loaded. Nothing changes unless all of it fits."""
    record, tensors = _read(Path(directory))
    if not isinstance(model, nn.Module):
        model = model()
    unnamed = [name for name in record["layers"] if not isinstance(name, str) or not name]
    if unnamed:
        raise ValueError(f"{Path(directory) / LAYERS} names a layer {unnamed[0]!r}: layer names are non-empty "
                         "module paths")
    replacements = {name: layer for name, fields in record["layers"].items()
                    if (layer := _layer_for(model, name, fields)) is not None}
    state = dict(tensors)
    for name, fields in record["layers"].items():
        state[f"{name}.{EXTRA_STATE}"] = {key: value for key, value in fields.items()
                                          if key not in ("in_features", "out_features", "bias", "structure_fields")}
    originals = {name: model.get_submodule(name) for name in replacements}
    try:
        for name, layer in replacements.items():
            model.set_submodule(name, layer)
        check_checkpoint_matches(model, state, "", {}, True, [], [], [])
    except BaseException as error:
        for name, module in originals.items():
            model.set_submodule(name, module)
        if isinstance(error, ValueError):
            raise ValueError(f"load: {error}") from None
        raise
    guard_checkpoints(model)
    model.load_state_dict(state)
    return model
