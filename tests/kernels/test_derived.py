"""State derived from a layer's tensors lives with those tensors: reused while they are
unchanged, recomputed after an in-place change, kept for every layer of a deep model, and
freed with the model."""

import gc
import weakref

import pytest
import torch
from torch import nn

from padst_compiler.kernels import NM, Block, Diagonal
from padst_compiler.kernels.eager import derived
from padst_compiler.training import harden_permutations, sparsify


def test_a_result_is_reused_until_its_tensor_changes_in_place_or_moves():
    t = torch.zeros(3)
    calls = []

    def cached_sum():
        return derived.memoize("test sum", (t,), lambda: calls.append(1) or float(t.sum()))

    assert cached_sum() == 0 and cached_sum() == 0 and len(calls) == 1
    t.add_(1)  # bumps the version: computed again, and the old entry is replaced
    assert cached_sum() == 3 and len(calls) == 2
    assert derived.summary().get("test sum") == 1
    t.data = torch.full((3,), 2.0)  # no version bump, but the storage moved
    assert cached_sum() == 6 and len(calls) == 3


def test_a_partner_tensor_is_told_apart_from_a_new_one_at_the_same_address():
    owner = torch.zeros(2)
    seen = []
    for value in range(3):
        partner = torch.full((2,), float(value))
        assert derived.memoize("test partner", (owner, partner), lambda: seen.append(1) or float(partner[0])) == value
        del partner  # the next one may reuse its id and address
    assert len(seen) == 3


def test_results_go_with_their_tensor_and_a_result_that_is_the_tensor_is_not_filed():
    t = torch.arange(4)
    derived.memoize("test copy", (t,), lambda: t * 2)
    assert derived.memoize("test self", (t,), lambda: t) is t
    assert derived.summary().get("test copy") == 1 and "test self" not in derived.summary()
    gone = weakref.ref(t)
    del t
    assert gone() is None and "test copy" not in derived.summary()


def test_one_tensor_keeps_a_bounded_number_of_results():
    owner = torch.zeros(1)
    partners = [torch.zeros(1) for _ in range(derived.MAX_PER_OWNER + 5)]
    for partner in partners:
        derived.memoize("test bound", (owner, partner), lambda: 0)
    assert derived.summary()["test bound"] == derived.MAX_PER_OWNER


def _deep_model(structure, depth: int, width: int = 64) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    sparsify(model, structure, 0.75, permutation="random")
    harden_permutations(model)
    return model


STRUCTURES = [Block(8, 8), NM(8), Diagonal()]


@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
def test_a_deep_model_keeps_every_layers_state_between_calls(structure):
    """300 layers: far more than any global cache of a fixed size would hold. A second
    forward computes nothing again, frozen or trainable, one token or many."""
    model = _deep_model(structure, 300)
    frozen = _deep_model(structure, 300).requires_grad_(False)
    for tokens in (1, 16):
        x = torch.randn(tokens, 64)
        with torch.no_grad():
            model(x), frozen(x)
        before = derived.computed()
        with torch.no_grad():
            model(x), frozen(x)
        assert derived.computed() == before


@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
def test_deleting_a_model_frees_what_was_derived_from_it(structure):
    gc.collect()  # earlier tests' garbage goes first: only this model's entries may change the count
    baseline = sum(derived.summary().values())
    model = _deep_model(structure, 4)
    frozen = _deep_model(structure, 4).requires_grad_(False)
    x = torch.randn(8, 64, requires_grad=True)
    model(x).sum().backward()
    with torch.no_grad():
        model(x[:1]), frozen(x[:1]), frozen(x)
    assert sum(derived.summary().values()) > baseline
    tensors = [weakref.ref(t) for m in (model, frozen) for t in (*m.parameters(), *m.buffers())]
    del model, frozen
    gc.collect()
    assert all(ref() is None for ref in tensors)
    assert sum(derived.summary().values()) == baseline


def test_the_caches_can_be_inspected_and_cleared():
    from padst_compiler.kernels import cache_summary, clear_caches

    model = _deep_model(Block(8, 8), 2).requires_grad_(False)
    with torch.no_grad():
        model(torch.randn(4, 64))
    summary = cache_summary()
    assert summary["derived"].get("direct forward", 0) >= 2 and isinstance(summary["implementation_choices"], list)
    clear_caches()
    assert cache_summary() == {"derived": {}, "implementation_choices": []}
