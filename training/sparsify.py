"""``sparsify``: turn the linear layers of any model into ``PADSTLinear`` layers, in place."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tabulate import tabulate
from torch import nn

from padst_compiler.kernels.structures import Structure, Unstructured, check_sparsity
from padst_compiler.training.layer import WARMUP_TENSORS, PADSTLinear, check_permutation_options, decode_record
from padst_compiler.training.sharding import is_sharded


@dataclass(frozen=True)
class _Candidate:
    name: str
    module: nn.Module
    weight: torch.Tensor  # [out, in], a view for transposed-weight modules
    bias: torch.Tensor | None


def linear_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of a linear layer, or None for anything else.

    Besides ``nn.Linear`` this accepts the GPT-2 style ``Conv1D`` that stores its weight
    transposed as ``[in, out]`` and names ``out`` as ``nf``; it is recognised by that
    layout, not by its class name.
    """
    if isinstance(module, PADSTLinear):
        return None
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    weight, nf = getattr(module, "weight", None), getattr(module, "nf", None)
    if isinstance(weight, nn.Parameter) and weight.dim() == 2 and isinstance(nf, int) and weight.shape[1] == nf:
        return weight.t(), getattr(module, "bias", None)
    return None


def _patterns(option: str, patterns) -> tuple[str, ...] | None:
    """``include`` / ``exclude`` as a tuple of fnmatch patterns (a single string is refused:
    iterating it would make each character a pattern)."""
    if patterns is None:
        return None
    if isinstance(patterns, str) or not isinstance(patterns, Iterable) or \
            not all(isinstance(pattern, str) for pattern in patterns):
        raise TypeError(f"sparsify: {option} must be a list of name patterns such as ['mlp.*'], got {patterns!r}")
    return tuple(patterns)


def _weights_read_by_parents(model: nn.Module) -> set[int]:
    """Weights a parent module reads directly instead of calling the layer (the output
    projection of ``nn.MultiheadAttention``): converting such a layer would break the parent."""
    return {id(module.out_proj.weight) for module in model.modules() if isinstance(module, nn.MultiheadAttention)}


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns or ())


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def erk_densities(shapes: dict[str, tuple[int, int]], sparsity: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities: proportional to ``(in + out) / (in * out)``, scaled so the
    model keeps ``1 - sparsity`` of its weights; layers that would exceed 1 stay dense."""
    dense: set[str] = set()
    total = sum(o * i for o, i in shapes.values())
    while True:
        budget = (1 - sparsity) * total - sum(o * i for name, (o, i) in shapes.items() if name in dense)
        raw = {name: (o + i) / (o * i) for name, (o, i) in shapes.items() if name not in dense}
        scale = budget / sum(raw[name] * shapes[name][0] * shapes[name][1] for name in raw)
        over = {name for name, value in raw.items() if value * scale > 1}
        if not over:
            return {name: 1.0 if name in dense else raw[name] * scale for name in shapes}
        dense |= over


def sparsify(model: nn.Module, structure: Structure, sparsity: float, *, permutation: str = "learned",
             side: str = "auto", include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
             strict: bool = False, distribution: str = "uniform", seed: int = 0, soft_noise: float = 0.5,
             dense_warmup: bool | None = None, verbose: bool = False) -> nn.Module:
    """Replace linear layers by ``PADSTLinear`` in place and return the model.

    Every ``nn.Linear`` (and transposed-weight ``Conv1D``) is converted, except layers
    whose weight is tied to another module (they stay dense, like embeddings) or read
    directly by their parent (``nn.MultiheadAttention``'s output projection). ``include``
    keeps only layers whose qualified name matches one of its patterns (fnmatch),
    ``exclude`` leaves matching layers dense. Layers whose shape the structure cannot take
    are listed in one warning and left dense, or raise with ``strict=True``.
    ``distribution="erk"`` spreads the sparsity Erdős–Rényi-Kernel style (unstructured
    baselines only; structured layers keep a uniform sparsity so their invariant holds).
    ``dense_warmup`` (default: only for ``permutation="learned"``, which needs it) trains each
    layer dense until the scheduler hardens it, then fits the structure to that weight.
    """
    check_sparsity(sparsity)
    check_permutation_options(permutation, side, dense_warmup, "sparsify")
    if distribution not in ("uniform", "erk"):
        raise ValueError(f"distribution must be 'uniform' or 'erk', got {distribution!r}")
    if distribution == "erk" and not isinstance(structure, Unstructured):
        raise ValueError(f"distribution='erk' needs Unstructured(), got {structure}: a structured layer "
                         "keeps the same count per group, so its sparsity stays uniform")
    include, exclude = _patterns("include", include), _patterns("exclude", exclude)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 62:
        raise ValueError(f"sparsify: seed must be an integer in [0, 2**62), got {seed!r}")
    if isinstance(soft_noise, bool) or not isinstance(soft_noise, (int, float)) or not 0 <= soft_noise < math.inf:
        raise ValueError(f"sparsify: soft_noise must be a finite number >= 0, got {soft_noise!r}")
    if not isinstance(structure, Structure):
        raise TypeError(f"sparsify: structure must be a Structure such as Block(8, 8), NM(32), Diagonal() or "
                        f"Unstructured(), got {structure!r}")

    def selected(name: str) -> bool:
        return (include is None or _matches(name, include)) and not _matches(name, exclude)

    for name, module in model.named_modules():
        if isinstance(module, PADSTLinear) and selected(name):
            raise ValueError(f"sparsify: layer {name!r} is already sparsified ({module.structure}); nothing was "
                             "changed. Sparsify each layer once (include / exclude pick the layers still dense)")
    tied = _shared_parameter_ids(model) | _weights_read_by_parents(model)
    candidates = []
    for name, module in model.named_modules():
        linear = linear_parts(module)
        if linear is None or id(getattr(module, "weight")) in tied or not selected(name):
            continue
        if not name:
            raise ValueError("sparsify replaces layers inside a model; the model itself is a linear layer: "
                             "wrap it in a container (e.g. nn.Sequential) or use PADSTLinear.from_dense")
        candidates.append(_Candidate(name, module, *linear))

    # a layer without weights takes no structure: listed with the layers left dense
    rejected = [f"layer {c.name!r} of shape {c.weight.shape[0]}x{c.weight.shape[1]} (out x in) has no weights"
                for c in candidates if c.weight.numel() == 0]
    candidates = [c for c in candidates if c.weight.numel()]
    if distribution == "erk" and candidates:
        densities = erk_densities({c.name: tuple(c.weight.shape) for c in candidates}, sparsity)
        sparsities = {name: max(0.0, 1 - density) for name, density in densities.items()}
    else:
        sparsities = {c.name: sparsity for c in candidates}

    # every layer is built before any is swapped in: a refusal leaves the model as it was
    layers = {}
    for position, candidate in enumerate(candidates):
        try:
            layers[candidate.name] = replacement_layer(
                candidate.module, structure, sparsities[candidate.name], permutation=permutation, side=side,
                name=candidate.name, soft_noise=soft_noise, seed=seed + position, dense_warmup=dense_warmup)
        except ValueError as error:
            rejected.append(str(error))
    if rejected:
        message = f"sparsify: {len(rejected)} layer(s) left dense:\n  " + "\n  ".join(rejected)
        if strict:
            raise ValueError(message + "\nnothing was changed (strict=True)")
        warnings.warn(message, stacklevel=2)
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    guard_checkpoints(model)
    if verbose:
        print(sparsity_summary(model))
    return model


def replacement_layer(module: nn.Module, structure: Structure, sparsity: float, **options) -> PADSTLinear:
    """The ``PADSTLinear`` that takes the place of the linear layer ``module`` (``nn.Linear`` or
    ``Conv1D``): its weight projected onto the structure, frozen where ``module`` was frozen,
    remembering the class ``densify`` gives back."""
    weight, bias = linear_parts(module)
    layer = PADSTLinear.from_dense(weight.detach(), None if bias is None else bias.detach(), structure, sparsity,
                                   **options)
    if not weight.requires_grad:
        for param in (layer.values, layer.soft_perm, layer.dense_weight_proxy):
            if param is not None:
                param.requires_grad_(False)
    if bias is not None and not bias.requires_grad:
        layer.bias.requires_grad_(False)
    layer.dense_class = type(module)
    return layer


def guard_checkpoints(model: nn.Module) -> None:
    """Make ``model.load_state_dict`` refuse a checkpoint that does not fit before copying anything.

    ``sparsify`` guards the model it was given. A module built around it later (a wrapper, a
    bigger model) needs its own guard: torch runs a module's load hooks only when loading
    reaches that module, after everything before it has been copied."""
    if getattr(model, "_padst_checkpoint_guard", None) is None:
        model._padst_checkpoint_guard = model.register_load_state_dict_pre_hook(check_checkpoint_matches)


def remove_checkpoint_guard(model: nn.Module) -> None:
    """Give ``model.load_state_dict`` back its own behaviour (``densify`` left no PA-DST layer)."""
    guard = getattr(model, "_padst_checkpoint_guard", None)
    if guard is not None:
        guard.remove()
        del model._padst_checkpoint_guard


def padst_layers(model: nn.Module) -> list[tuple[str, PADSTLinear]]:
    """Every ``PADSTLinear`` in ``model`` (through wrappers such as DDP), in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, PADSTLinear)]


def sparsity_summary(model: nn.Module) -> str:
    """A table of the PA-DST layers: shape, structure, kept fraction, permutation state."""
    rows, kept, total = [], 0, 0
    for name, layer in padst_layers(model):
        count = layer.structure.kept_count(layer.values, layer.index)
        size = layer.in_features * layer.out_features
        kept, total = kept + count, total + size
        state = "soft" if layer.soft else "hard" if layer.perm_index is not None else "-"
        rows.append((name, f"{layer.out_features}x{layer.in_features}", str(layer.structure),
                     f"{count / size:.3f}", layer.permutation, layer.side if layer.perm_index is not None else "-",
                     state))
    table = tabulate(rows, headers=["layer", "out x in", "structure", "kept", "permutation", "side", "state"],
                     disable_numparse=True)
    return f"{table}\n{len(rows)} PA-DST layers keep {kept} of {total} weights ({kept / max(total, 1):.3f})"


def _extra_state_problem(layer: PADSTLinear, state: dict, warmup_weight) -> str | None:
    """What makes a layer's saved state unreadable or contradict itself, or None."""
    hard, seed, averaged = state.get("hard"), state.get("seed", 0), state.get("averaged_steps", 0)
    if not isinstance(hard, bool):
        return f"its state holds hard={hard!r}, not True or False"
    for field, value in (("seed", seed), ("averaged_steps", averaged)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"its state holds {field}={value!r}, not an integer >= 0"
    if not hard and layer.soft_perm is None and layer.dense_weight_proxy is None:
        return "it was saved with a permutation still being learned (hard=False), the layer learns none"
    if torch.is_tensor(warmup_weight) and warmup_weight.numel() == 0 and not hard:
        return "its dense warm-up weight is emptied but it was saved with hard=False"
    return None


def storage_identity(tensor) -> tuple | None:
    """What identifies a tensor's memory (None for non-tensors, empty and meta tensors)."""
    if torch.is_tensor(tensor) and is_sharded(tensor):  # FSDP2: this rank's shard is what holds memory
        tensor = tensor.to_local()
    if not torch.is_tensor(tensor) or not tensor.numel() or tensor.device.type == "meta":
        return None
    return tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)


def check_checkpoint_matches(module, state_dict, prefix, local_metadata, strict, missing_keys,
                             unexpected_keys, error_msgs) -> None:
    """Refuse a checkpoint that does not fit before a single tensor is copied.

    ``load_state_dict`` copies entry by entry and only complains at the end, which would
    leave a model half-loaded; this pre-hook runs on the root first and checks every
    entry, naming the first layer that does not match. (``strict`` is True whatever the
    caller asked: ``load_state_dict`` passes True to every pre-hook, so the check is strict.)
    """
    layers = {name: layer for name, layer in padst_layers(module)}
    own_state = module.state_dict()
    extra = [key for key in state_dict if key.startswith(prefix) and key[len(prefix):] not in own_state]
    if extra:
        raise ValueError(f"checkpoint entry {extra[0]!r} has no place in the model; nothing was loaded")
    # a tied weight saved under one of its names only (Hugging Face checkpoints drop the tied
    # head) is loaded through that name: its other names may be missing
    loaded_storage = {storage_identity(own) for key, own in own_state.items() if prefix + key in state_dict} - {None}
    for key, own in own_state.items():
        full_key = prefix + key
        owner = key.rpartition(".")[0]
        if full_key not in state_dict:
            if storage_identity(own) is None or storage_identity(own) not in loaded_storage:
                raise ValueError(f"checkpoint has no entry {full_key!r} (layer {owner!r}); nothing was loaded")
            continue
        theirs = state_dict[full_key]
        if key.endswith("_extra_state") and owner in layers:
            record = decode_record(theirs)
            if record is None:
                raise ValueError(f"checkpoint does not match layer {owner!r}: its {key} is a "
                                 f"{type(theirs).__name__}, not a PADSTLinear state; nothing was loaded")
            theirs, mine = record, layers[owner].state_record()
            for field in ("structure", "sparsity", "permutation", "side", "dense_warmup"):
                if theirs.get(field) != mine[field]:
                    raise ValueError(f"checkpoint does not match layer {owner!r}: it was saved with "
                                     f"{field}={theirs.get(field)!r}, the model has {mine[field]!r}; "
                                     "nothing was loaded")
            problem = _extra_state_problem(layers[owner], theirs, state_dict.get(f"{prefix}{owner}.dense_weight_proxy"))
            if problem:
                raise ValueError(f"checkpoint does not match layer {owner!r}: {problem}; nothing was loaded")
        elif key.rpartition(".")[2] in WARMUP_TENSORS and owner in layers and torch.is_tensor(theirs) \
                and theirs.shape in (torch.Size([0]), torch.Size([layers[owner].out_features,
                                                                  layers[owner].in_features])):
            continue  # the dense warm-up weight: full while warming up, emptied once hardened
        elif torch.is_tensor(own) and (not torch.is_tensor(theirs) or theirs.shape != own.shape
                                       or (theirs.dtype != own.dtype and not own.is_floating_point())):
            found = f"{tuple(theirs.shape)} {theirs.dtype}" if torch.is_tensor(theirs) else type(theirs).__name__
            raise ValueError(f"checkpoint does not match layer {owner!r}: {key} is {found} in the checkpoint, "
                             f"{tuple(own.shape)} {own.dtype} in the model; nothing was loaded")
        elif key.rpartition(".")[2] == "perm_index" and owner in layers and \
                not torch.equal(theirs.sort().values, torch.arange(theirs.numel(), device=theirs.device)):
            raise ValueError(f"checkpoint does not match layer {owner!r}: its perm_index is not a permutation of "
                             f"0..{theirs.numel() - 1}; nothing was loaded")
