"""Fuzzing the checkpoint guard: random corruptions of a sparsified model's ``state_dict``.

A source and a target model are sparsified alike (structure, sparsity, permutation mode,
side) from different seeds, some layers of each hardened; the source's state dict is
corrupted (entries dropped or added, wrong shapes, wrong dtypes, non-tensors, tampered
``_extra_state`` fields, index values outside their range or repeated, NaN values, a
warm-up weight emptied or filled) and loaded into the target, strictly or not. Every load
must either

- raise ``ValueError`` and leave the target exactly as it was (every entry of its state
  dict, extra states included, and every ``requires_grad``), or
- load: each checkpoint entry the target has is now the target's (floating tensors cast to
  the target's dtype), entries the checkpoint lacks (``strict=False``) are untouched, and
  the loaded model still works: its outputs and gradients match the reference
  computation from its own tensors, or a call is refused with a ``padst::`` ValueError;
  an untouched checkpoint gives the source model's function.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from padst_compiler.training import NM, Block, Diagonal, PADSTLinear, Unstructured, sparsify
from padst_compiler.training.layer import decode_record

from .op_cases import budget
from .support import Conv1D, assert_matches_reference, tolerance

pytestmark = pytest.mark.fuzz

STRUCTURES = [Block(2, 2), Block(4, 2), NM(2), NM(4), Diagonal(), Unstructured()]
FIELDS = ["structure", "sparsity", "permutation", "side", "dense_warmup", "hard", "seed", "averaged_steps"]
JUNK = [None, "x", -1, 0, 1, 1.5, True, False, [], {}, math.nan, "Block(rows=2, cols=2)", 0.5, "none", "input"]
HUGE = [1 << 40, -(1 << 40), -1, (1 << 63) - 1]
# the PADSTLinear extra-state fields a layer takes over from a checkpoint, as it reads them
TAKEN = {"hard": bool, "seed": int, "averaged_steps": int}


@st.composite
def setups(draw):
    return {"widths": draw(st.lists(st.sampled_from([4, 8]), min_size=2, max_size=4)),
            "conv1d": draw(st.booleans()),
            "bias": draw(st.booleans()),
            "structure": draw(st.sampled_from(STRUCTURES)),
            "sparsity": draw(st.sampled_from([0.0, 0.5, 0.75])),
            "permutation": draw(st.sampled_from(["learned", "birkhoff", "random", "none"])),
            "dense_warmup": draw(st.booleans()),
            "side": draw(st.sampled_from(["input", "output", "auto"])),
            "dtype": draw(st.sampled_from(["float32", "float64"])),
            "source_hardened": draw(st.lists(st.booleans(), min_size=3, max_size=3)),
            "target_hardened": draw(st.lists(st.booleans(), min_size=3, max_size=3))}


def build(setup, seed, hardened):
    torch.manual_seed(seed)
    widths, layers = setup["widths"], []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(Conv1D(b, a, setup["bias"]) if setup["conv1d"] and i % 2 else nn.Linear(a, b, setup["bias"]))
        layers.append(nn.Tanh())
    model = nn.Sequential(*layers).to(getattr(torch, setup["dtype"]))
    warmup = setup["permutation"] == "learned" or (setup["permutation"] != "birkhoff" and setup["dense_warmup"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsify(model, setup["structure"], setup["sparsity"], permutation=setup["permutation"], side=setup["side"],
                 dense_warmup=warmup, seed=seed)
    layers = [m for m in model.modules() if isinstance(m, PADSTLinear)]
    for layer, harden in zip(layers, hardened):
        if harden and not (layer.permutation == "learned" and layer.permuted_features == 1):
            layer.harden()
    return model


@st.composite
def corruptions(draw, keys, extra_keys, index_keys, float_keys):
    """A list of (kind, arguments) edits of a state dict, as data."""
    kinds = ["drop", "add", "shape", "dtype", "not_tensor", "field", "drop_field", "extra_not_dict",
             "index_values", "index_repeat", "nan", "warmup_weight"]
    edits = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(kinds))
        if kind in ("drop", "shape", "dtype", "not_tensor"):
            edits.append((kind, draw(st.sampled_from(keys)), draw(st.integers(0, 4))))
        elif kind == "add":
            edits.append((kind, draw(st.sampled_from(["extra", "0.extra", "0.values_", "9.index"])), 0))
        elif kind in ("field", "drop_field", "extra_not_dict") and extra_keys:
            field = draw(st.sampled_from(FIELDS))
            value = draw(st.sampled_from(JUNK + STRUCTURES)) if kind == "field" else None
            edits.append((kind, draw(st.sampled_from(extra_keys)), (field, value)))
        elif kind in ("index_values", "index_repeat") and index_keys:
            edits.append((kind, draw(st.sampled_from(index_keys)),
                          (draw(st.floats(0, 1)), draw(st.one_of(st.integers(-2, 9), st.sampled_from(HUGE))))))
        elif kind == "nan" and float_keys:
            edits.append((kind, draw(st.sampled_from(float_keys)), 0))
        elif kind == "warmup_weight" and extra_keys:
            edits.append((kind, draw(st.sampled_from(extra_keys)), draw(st.booleans())))
    return edits


def corrupt(state, edits, model):
    state = dict(state)
    for kind, key, arg in edits:
        if key not in state and kind not in ("add", "warmup_weight"):
            continue
        if kind == "drop":
            del state[key]
        elif kind == "add":
            state[key] = torch.zeros(2)
        elif kind == "shape" and torch.is_tensor(state[key]):
            t = state[key]
            state[key] = [t.reshape(-1), t.unsqueeze(0), t.reshape(-1)[:-1] if t.numel() else t.new_zeros(1),
                          torch.cat([t.reshape(-1), t.reshape(-1)]) if t.numel() else t.new_zeros(2),
                          t.new_zeros(0)][arg]
        elif kind == "dtype" and torch.is_tensor(state[key]):
            state[key] = state[key].to([torch.int32, torch.float64, torch.float16, torch.bool, torch.int64][arg])
        elif kind == "not_tensor":
            state[key] = [1.0, "x", None, [1, 2], {"a": 1}][arg]
        elif kind == "field" and isinstance(state[key], dict):
            field, value = arg
            state[key] = {**state[key], field: repr(value) if field == "structure" and not isinstance(value, str)
                          else value}
        elif kind == "drop_field" and isinstance(state[key], dict):
            state[key] = {k: v for k, v in state[key].items() if k != arg[0]}
        elif kind == "extra_not_dict":
            state[key] = [state[key]]
        elif kind in ("index_values", "index_repeat") and torch.is_tensor(state[key]) and state[key].numel():
            t = state[key].clone()
            where, value = arg
            if kind == "index_values":
                t.view(-1)[min(int(where * t.numel()), t.numel() - 1)] = value
            else:
                t.view(-1)[:] = t.view(-1)[0]
            state[key] = t
        elif kind == "nan" and torch.is_tensor(state[key]) and state[key].numel():
            state[key] = torch.full_like(state[key], math.nan)
        elif kind == "warmup_weight":
            owner = key.rpartition(".")[0]
            layer = model.get_submodule(owner)
            for name in ("dense_weight_proxy", "dense_weight_average"):
                full = f"{owner}.{name}"
                if full in state:
                    state[full] = torch.randn(layer.out_features, layer.in_features,
                                              dtype=state[full].dtype) if arg else state[full].new_empty(0)
    return state


def readable_state(model) -> dict:
    """The state dict with each layer's extra state decoded into the dict the fuzzer edits."""
    return {key: decode_record(value) if key.endswith("_extra_state") else value
            for key, value in model.state_dict().items()}


def snapshot(model):
    state = {k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in readable_state(model).items()}
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return state, flags




def same_value(mine, theirs, loaded=False) -> bool:
    """Whether a state entry equals another; ``loaded``: ``mine`` was loaded from ``theirs``
    (any tensor cast to a floating model tensor's dtype, extra-state fields read as the layer reads them)."""
    if torch.is_tensor(mine) != torch.is_tensor(theirs):
        return False
    if isinstance(mine, dict) and isinstance(theirs, dict):
        if not loaded:
            return mine == theirs
        return all(mine.get(k) == (TAKEN[k](v) if k in TAKEN else v) for k, v in theirs.items() if k in mine)
    if not torch.is_tensor(mine):
        return mine == theirs
    if loaded and mine.is_floating_point():  # load_state_dict copies into the model's tensors
        theirs = theirs.to(mine.dtype)
    return mine.shape == theirs.shape and mine.dtype == theirs.dtype and torch.equal(mine, theirs) or \
        (mine.shape == theirs.shape and mine.dtype == theirs.dtype and mine.is_floating_point()
         and torch.equal(mine.isnan(), theirs.isnan()) and torch.equal(mine.nan_to_num(), theirs.nan_to_num()))


def layer_invariants(model) -> None:
    """What every saved layer satisfies, so a loaded one must too: a layer with a dense warm-up
    holds it in full while soft (and in full or emptied once hard: FSDP2 keeps it); a layer
    with neither warm-up nor soft matrix is hard."""
    for name, layer in model.named_modules():
        if not isinstance(layer, PADSTLinear):
            continue
        if layer.dense_weight_proxy is not None:
            full = (layer.out_features, layer.in_features)
            assert tuple(layer.dense_weight_proxy.shape) in ((full,) if layer.soft else (full, (0,))), \
                f"layer {name!r}: hard={layer.hard} with a warm-up weight of shape " \
                f"{tuple(layer.dense_weight_proxy.shape)}"
        elif layer.soft_perm is None:
            assert layer.hard, f"layer {name!r}: soft without a warm-up weight or a soft matrix"


def assert_unchanged(before, after):
    state_before, flags_before = before
    state_after, flags_after = after
    assert state_before.keys() == state_after.keys()
    for key in state_before:
        assert same_value(state_before[key], state_after[key]), key
    assert flags_before == flags_after


@budget(1.0)
@given(setup=setups(), data=st.data(), strict=st.booleans(), seeds=st.tuples(st.integers(0, 99), st.integers(0, 99)))
def test_a_checkpoint_loads_exactly_or_not_at_all(setup, data, strict, seeds):
    source = build(setup, seeds[0], setup["source_hardened"])
    target = build(setup, seeds[1] + 100, setup["target_hardened"])
    state = readable_state(source)
    keys = sorted(state)
    extra_keys = [k for k in keys if k.endswith("_extra_state")]
    index_keys = [k for k in keys if k.endswith(".index") or k.endswith(".perm_index")]
    float_keys = [k for k in keys if torch.is_tensor(state[k]) and state[k].is_floating_point()]
    edits = data.draw(corruptions(keys, extra_keys, index_keys, float_keys), label="edits")
    checkpoint = corrupt(copy.deepcopy(state), edits, source)
    dtype = getattr(torch, setup["dtype"])
    x = torch.randn(3, setup["widths"][0], dtype=dtype)

    before = snapshot(target)
    try:
        target.load_state_dict(checkpoint, strict=strict)
    except ValueError:
        assert_unchanged(before, snapshot(target))
        return
    except Exception as error:  # noqa: BLE001 - the property: a named refusal, nothing changed
        after = snapshot(target)
        unchanged = True
        try:
            assert_unchanged(before, after)
        except AssertionError:
            unchanged = False
        raise AssertionError(f"load raised {type(error).__name__} (not ValueError), model "
                             f"{'unchanged' if unchanged else 'CHANGED (half-loaded)'}: {error}") from error

    loaded, _ = snapshot(target)
    state_before, _ = before
    for key, mine in loaded.items():
        if key in checkpoint:
            assert same_value(mine, checkpoint[key], loaded=True), f"{key} did not load as saved"
        else:
            assert not strict, key
            assert same_value(mine, state_before[key]), f"{key} changed but is not in the checkpoint"
    layer_invariants(target)
    # the loaded model works: the reference computation from its own tensors, or a named refusal
    try:
        y = target(x)
    except ValueError:
        return
    except Exception as error:  # noqa: BLE001
        raise AssertionError(f"the loaded model fails with {type(error).__name__}: {error}") from error
    if all(torch.isfinite(t).all() for t in loaded.values() if torch.is_tensor(t) and t.is_floating_point()):
        # (with NaN weights the sparse kernels and the dense reference differ where the reference
        # multiplies a NaN by a structural zero: nothing to compare there)
        assert_matches_reference(target, [x], dtype)
    if not edits:
        with torch.no_grad():
            torch.testing.assert_close(y, source(x), **tolerance(dtype))
