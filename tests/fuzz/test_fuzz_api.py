"""Fuzzing ``sparsify`` and ``PADSTLinear`` on random small models with random options.

Models: linears, GPT-2 style ``Conv1D``, nested containers, residuals, a tied weight, a
module applied twice, one linear held twice by a container, a linear inside a
``ModuleDict``, ``nn.MultiheadAttention``; fp32 or fp64; train or eval mode. Options:
structure, sparsity, permutation, side, include / exclude, strict, distribution,
dense_warmup, seed, soft_noise, each valid or not (unknown strings, NaN, infinities,
booleans, strings for structures and numbers, ...); sometimes a second ``sparsify`` on the
result. Every call must either

- succeed, convert exactly the layers the options select (linear, not tied, selected by
  include / exclude, a shape the structure takes; the others stay the very same modules),
  and give a model whose outputs and gradients (any batch shape, zero tokens included)
  match a reference that computes each converted layer from its own tensors as documented
  (``y = S · Π · x + b``: the structure expanded to a dense matrix, the permutation applied
  as a gather or as the soft matrix, or the dense warm-up weight while warming up), whose
  weights after ``harden_permutations`` are the structure's projection of the original
  weights in the layer's order, and which is the original model where the structure keeps
  everything; or
- raise ``ValueError`` / ``TypeError``, predicted from the options, and leave the model
  exactly as it was (modules, parameters, buffers, requires_grad, training flags, hooks).
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from padst_compiler.training import (NM, Block, Diagonal, PADSTLinear, Structure, Unstructured, harden_permutations,
                                     sparsify)
from padst_compiler.training.sparsify import erk_densities

from .support import Conv1D, assert_matches_reference, build, has_attention, model_specs, tolerance
from .op_cases import budget

pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")]

# --------------------------------------------------------------------------- options

structures = st.one_of(st.builds(Block, st.integers(1, 4), st.integers(1, 4)), st.builds(NM, st.integers(1, 8)),
                       st.just(Diagonal()), st.just(Unstructured()))
INVALID_STRUCTURES = ["Block(2, 2)", "nm", None, 3, True, Block, 0.5]
INVALID_SPARSITIES = [1.0, -0.1, math.nan, math.inf, -math.inf, True, False, "0.5", None, 1e300, 1]
PERMUTATIONS = ["learned", "birkhoff", "random", "none"]
SIDES = ["input", "output", "auto"]
PATTERNS = ["*", "0", "1", "2", "2*", "*.a", "*.b", "*layer", "*proj", "*.0", "*.2", "?", "1.*", "0.body.*",
            "*attn*", "nomatch", "*.parts.*"]
# include / exclude that are not a list or tuple of patterns (a plain string, a number) are left
# out here; their refusal is covered by test_include_and_exclude_must_be_pattern_lists
pattern_lists = st.one_of(st.none(), st.lists(st.sampled_from(PATTERNS), max_size=3),
                          st.lists(st.sampled_from(PATTERNS), max_size=3).map(tuple))


@st.composite
def options(draw):
    return {
        "structure": draw(st.one_of(structures, structures, structures, st.sampled_from(INVALID_STRUCTURES))),
        "sparsity": draw(st.one_of(st.floats(0, 1, exclude_max=True),
                                   st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.875, 0.9375]),
                                   st.sampled_from(INVALID_SPARSITIES))),
        "permutation": draw(st.sampled_from(PERMUTATIONS * 3 + ["Learned", "", "rand", None, 1, "none "])),
        "side": draw(st.sampled_from(SIDES * 3 + ["in", "both", None, 0])),
        "include": draw(pattern_lists),
        "exclude": draw(pattern_lists),
        "strict": draw(st.booleans()),
        "distribution": draw(st.sampled_from(["uniform"] * 4 + ["erk", "ERK", None])),
        "dense_warmup": draw(st.sampled_from([None, None, True, False])),
        # bad seeds and soft_noise values: covered by
        # test_fuzz_regressions.py::test_sparsify_refuses_a_bad_seed_or_soft_noise
        "seed": draw(st.integers(0, 2**31 - 1)),
        "soft_noise": draw(st.sampled_from([0.5, 0.0, 0.1, 1.0, 3.0])),
    }


# ---------------------------------------------------------------- the specification


def _as_linear(module):
    """(weight [out, in], bias) of a linear-like module the test built, else None."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if isinstance(module, Conv1D):
        return module.weight.t(), module.bias
    return None


def _tied_ids(model):
    counts = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {key for key, count in counts.items() if count > 1}


def _matches(name, patterns):
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def option_problem(model, o) -> str | None:
    """Why ``sparsify(model, **o)`` must be refused, or None (the documented contract)."""
    s = o["sparsity"]
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
        return "sparsity"
    if o["permutation"] not in PERMUTATIONS or o["side"] not in SIDES:
        return "permutation or side"
    warmup = o["permutation"] == "learned" if o["dense_warmup"] is None else o["dense_warmup"]
    if (o["permutation"] == "learned" and not warmup) or (o["permutation"] == "birkhoff" and warmup):
        return "dense_warmup"
    if o["distribution"] not in ("uniform", "erk"):
        return "distribution"
    if o["distribution"] == "erk" and not isinstance(o["structure"], Unstructured):
        return "erk needs Unstructured"
    if not isinstance(o["structure"], Structure):
        return "structure"
    for pattern_list in (o["include"], o["exclude"]):
        if pattern_list is not None and not isinstance(pattern_list, (list, tuple)):
            return "patterns"
    return None


def selected(name, o) -> bool:
    return (o["include"] is None or _matches(name, o["include"])) and not _matches(name, o["exclude"])


def candidates(model, o) -> dict:
    """Linear-like modules sparsify must consider: name -> (weight [out, in], bias)."""
    tied = _tied_ids(model)
    found = {}
    for name, module in model.named_modules():
        linear = _as_linear(module)
        if linear is not None and id(module.weight) not in tied and selected(name, o):
            found[name] = linear
    return found


def erk_sparsities(shapes: dict, sparsity: float) -> dict:
    """Per-layer sparsities of ``distribution="erk"`` (the densities themselves are checked by
    tests/training/test_sparsify.py)."""
    return {name: max(0.0, 1 - density) for name, density in erk_densities(shapes, sparsity).items()}


def takes(structure, weight, sparsity) -> bool:
    try:
        structure.kept_units(weight.shape[0], weight.shape[1], sparsity)
        return True
    except ValueError:
        return False


def snapshot(model):
    """Everything sparsify may change, as comparable data."""
    return {
        "modules": [(name, type(m), id(m), m.training) for name, m in model.named_modules(remove_duplicate=False)],
        "parameters": [(name, id(p), p.dtype, tuple(p.shape), p.requires_grad, p.detach().clone())
                       for name, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [(name, id(b), b.dtype, b.detach().clone())
                    for name, b in model.named_buffers(remove_duplicate=False)],
        "attributes": sorted(k for k in vars(model) if not k.startswith("_modules")),
        "hooks": len(model._load_state_dict_pre_hooks),
    }


def assert_same_snapshot(before, after):
    assert before["modules"] == after["modules"]
    assert before["attributes"] == after["attributes"] and before["hooks"] == after["hooks"]
    assert len(before["parameters"]) == len(after["parameters"])
    for b, a in zip(before["parameters"], after["parameters"]):
        assert b[:5] == a[:5], (b[:5], a[:5])
        assert torch.equal(b[5], a[5]), b[0]
    assert len(before["buffers"]) == len(after["buffers"])
    for b, a in zip(before["buffers"], after["buffers"]):
        assert b[:3] == a[:3] and torch.equal(b[3], a[3]), b[0]


# --------------------------------------------------------------------- the reference


def ordered_weight(layer: PADSTLinear, weight, bias):
    """The original weight (and bias) in the order the structure sees them."""
    if layer.perm_index is None:
        return weight, bias
    if layer.side == "input":
        return weight[:, layer.perm_index], bias
    inverse = torch.argsort(layer.perm_index)
    return weight[inverse], None if bias is None else bias[inverse]


def assert_projection_of_original(layer: PADSTLinear, weight, bias):
    """After hardening, ``S`` is the structure's projection of the original weight in the layer's order."""
    ordered, ordered_bias = ordered_weight(layer, weight, bias)
    want = layer.structure.project(ordered, layer.sparsity).to_dense()
    torch.testing.assert_close(layer.dense_weight().detach(), want, rtol=0, atol=0)
    if bias is not None:
        torch.testing.assert_close(layer.bias.detach(), ordered_bias, rtol=0, atol=0)


# --------------------------------------------------------------------------- the test


def check_sparsify_call(model, o, originals, inputs, dtype):
    before = snapshot(model)
    problem = option_problem(model, o)
    already = [n for n, m in model.named_modules() if isinstance(m, PADSTLinear)]
    if problem is None and any(selected(n, o) for n in already):
        problem = "already sparsified"
    found = {} if problem else candidates(model, o)
    if not problem and any(name == "" for name in found):
        problem = "the model itself is a linear layer"
    # distribution="erk" over no layer at all, or over a layer with a zero dimension: covered by
    # test_fuzz_regressions.py::test_erk_over_no_layer_or_an_empty_layer
    assume(problem is not None or o["distribution"] != "erk" or (found and all(w.numel() for w, _ in found.values())))
    sparsities = {n: o["sparsity"] for n in found}
    if not problem and o["distribution"] == "erk":
        sparsities = erk_sparsities({n: tuple(w.shape) for n, (w, _) in found.items()}, o["sparsity"])
    rejected = {n for n, (w, _) in found.items() if not takes(o["structure"], w, sparsities[n])}
    if not problem and rejected and o["strict"]:
        problem = "strict"
    # a layer with a zero dimension: covered by
    # test_fuzz_regressions.py::test_a_zero_sized_layer_is_named_or_converted
    assume(problem not in (None, "strict") or not any(0 in w.shape for n, (w, _) in found.items() if n not in rejected))
    kept_modules = {name: m for name, m in model.named_modules()}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = sparsify(model, **o)
        except (ValueError, TypeError) as error:
            assert problem is not None, f"refused valid options: {error!r}"
            assert_same_snapshot(before, snapshot(model))
            return False
    assert problem is None, f"accepted options that break the contract ({problem})"
    assert result is model
    left_dense = [w for w in caught if "left dense" in str(w.message)]
    converted = {n for n, m in model.named_modules() if isinstance(m, PADSTLinear) and n not in already}
    assert converted == set(found) - rejected, (converted, set(found), rejected)
    assert bool(left_dense) == bool(rejected)
    for name, module in model.named_modules():
        if name in converted:
            layer = module
            weight, bias = found[name]
            assert (layer.out_features, layer.in_features) == tuple(weight.shape)
            assert layer.structure == o["structure"] and (layer.bias is None) == (bias is None)
            assert layer.sparsity == pytest.approx(sparsities[name], abs=1e-12)
            assert layer.values.dtype == weight.dtype
            originals[name] = (weight.detach().clone(), None if bias is None else bias.detach().clone())
        elif name in kept_modules:
            assert module is kept_modules[name], name
    assert_matches_reference(model, inputs, dtype)
    return True


def batch_inputs(width, dtype, shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, width, generator=gen, dtype=dtype) for shape in shapes] + \
        [torch.randn((), generator=gen, dtype=dtype)]  # a 0-d input: refused alike


batch_shapes = st.lists(st.lists(st.integers(0, 3), max_size=3).map(tuple), min_size=1, max_size=2)


@budget(2.0)
@given(spec=model_specs(), first=options(), second=st.one_of(st.none(), options()), shapes=batch_shapes)
def test_sparsify_converts_what_it_should_and_keeps_the_function(spec, first, second, shapes):
    model = build(spec)
    if has_attention(spec):
        # sparsify leaves nn.MultiheadAttention's out_proj dense (its parent reads the weight;
        # test_sparsify_keeps_multihead_attention_working); excluding it keeps this spec simple
        for o in (first, second):
            if o is not None and isinstance(o["exclude"], (list, tuple)):
                o["exclude"] = [*o["exclude"], "*.out_proj"]
            elif o is not None and o["exclude"] is None:
                o["exclude"] = ["*.out_proj"]
    dtype = getattr(torch, spec["dtype"])
    original = copy.deepcopy(model)
    inputs = batch_inputs(spec["in"], dtype, shapes, spec["seed"])
    originals = {}
    for o in (first, second):
        if o is not None:
            check_sparsify_call(model, o, originals, inputs, dtype)

    # every converted layer refuses a 0-d input by name and takes zero tokens, forward and backward
    for name, layer in model.named_modules():
        if isinstance(layer, PADSTLinear):
            with pytest.raises(ValueError, match="0-d"):
                layer(torch.tensor(1.0, dtype=dtype))
            x = torch.randn(2, 0, layer.in_features, dtype=dtype, requires_grad=True)
            y = layer(x)
            assert y.shape == (2, 0, layer.out_features)
            y.sum().backward()
            assert x.grad.shape == x.shape

    # hardened, each layer holds the projection of its original weight in its own order, and a
    # structure that keeps everything gives back the original model
    soft = sum(isinstance(m, PADSTLinear) and m.soft for m in model.modules())
    assert harden_permutations(model) == soft
    keeps_all = True
    for name, layer in model.named_modules():
        if isinstance(layer, PADSTLinear):
            weight, bias = originals[name]
            keeps_all &= layer.structure.kept_count(layer.values, layer.index) == weight.numel()
            if layer.permutation == "birkhoff":
                keeps_all = False  # hardening re-fits S to S·M: not the original weight
            else:
                assert_projection_of_original(layer, weight, bias)
    assert_matches_reference(model, inputs, dtype)
    if keeps_all:
        with torch.no_grad():
            for x in inputs[:-1]:
                torch.testing.assert_close(model(x), original(x), **tolerance(dtype))
