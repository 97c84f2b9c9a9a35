"""PADSTLinear: the function it computes in every permutation mode and side."""

import pytest
import torch
from torch import nn

from padst_compiler.kernels import NM, Block, Diagonal, Unstructured
from padst_compiler.training import PADSTLinear
from padst_compiler.training.permutation import (
    harden,
    permutation_penalty,
    project_to_birkhoff_,
    select_permutation,
)

STRUCTURES = [Block(4, 4), NM(4), Diagonal(), Unstructured()]


def expected_output(layer, x):
    """Dense reference: y = x @ W_eff.T + b, with b permuted on the output side."""
    bias = layer.bias
    if layer.side == "output" and layer.perm_index is not None:
        if not layer.soft:
            bias = bias[layer.perm_index]
        elif layer.soft_perm is not None:
            bias = layer.soft_perm @ bias
    return x @ layer.effective_weight().t() + bias


@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("mode", ["learned", "birkhoff", "random", "none"])
def test_forward_matches_dense_reference_soft_and_hard(structure, side, mode):
    layer = PADSTLinear(16, 32, structure, 0.5, permutation=mode, side=side, seed=3).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), expected_output(layer, x))
    assert layer.soft == (mode in ("learned", "birkhoff"))
    layer.harden()
    assert not layer.soft
    torch.testing.assert_close(layer(x), expected_output(layer, x))


def test_hardening_a_learned_layer_keeps_the_structured_part_of_its_dense_weight_and_frees_it():
    """Warm-up weight exactly block-sparse up to a permutation: the hard layer computes the same."""
    gen = torch.Generator().manual_seed(0)
    layer = PADSTLinear(32, 32, Block(4, 4), 0.75, permutation="learned", side="input")
    sparse = Block(4, 4).project(torch.randn(32, 32, generator=gen), 0.75).to_dense()
    with torch.no_grad():
        layer.dense_weight_proxy.copy_(sparse[:, torch.argsort(torch.randperm(32, generator=gen))])
    x = torch.randn(5, 32)
    before = layer(x)
    layer.harden()
    torch.testing.assert_close(layer(x), before)
    assert layer.dense_weight_proxy.numel() == 0 and layer.dense_weight_proxy.grad is None


def test_auto_side_permutes_the_smaller_dimension():
    assert PADSTLinear(16, 64, Block(4, 4), 0.5, side="auto").side == "input"
    assert PADSTLinear(64, 16, Block(4, 4), 0.5, side="auto").side == "output"
    assert PADSTLinear(64, 16, Block(4, 4), 0.5, side="auto", permutation="birkhoff").soft_perm.shape == (16, 16)


def test_from_dense_projects_the_existing_weight():
    linear = nn.Linear(32, 16)
    layer = PADSTLinear.from_dense(linear.weight, linear.bias, Block(4, 8), 0.5, permutation="none")
    torch.testing.assert_close(layer.dense_weight(), Block(4, 8).project(linear.weight, 0.5).to_dense())
    torch.testing.assert_close(layer.bias, linear.bias)


def test_hardened_layer_runs_the_permutation_fused_in_the_op():
    layer = PADSTLinear(16, 16, Block(4, 4), 0.5, permutation="random", side="input")
    x = torch.randn(3, 16)
    fused = layer.structure.linear(x, layer.values, layer.index, 16, layer.bias, layer.perm_index)
    torch.testing.assert_close(layer(x), fused)


def test_bad_options_name_the_layer():
    with pytest.raises(ValueError, match="layer 'mlp.fc' of shape 30x16 .* block rows 4 do not divide"):
        PADSTLinear(16, 30, Block(4, 4), 0.5, name="mlp.fc")
    with pytest.raises(ValueError, match="fc: permutation must be one of"):
        PADSTLinear(16, 16, Block(4, 4), 0.5, permutation="sorted", name="fc")
    with pytest.raises(ValueError, match="side must be one of"):
        PADSTLinear(16, 16, Block(4, 4), 0.5, side="left")


# ------------------------------------------------------------- soft permutations


def test_birkhoff_projection_gives_a_doubly_stochastic_matrix():
    matrix = torch.randn(12, 12, generator=torch.Generator().manual_seed(0))
    project_to_birkhoff_(matrix, iterations=50)
    assert bool((matrix >= 0).all())
    torch.testing.assert_close(matrix.sum(1), torch.ones(12))
    torch.testing.assert_close(matrix.sum(0), torch.ones(12), atol=1e-4, rtol=0)


def test_penalty_is_zero_exactly_on_permutations_and_normalised():
    p = torch.randperm(10)
    assert permutation_penalty(torch.eye(10)[p]).item() == 0
    uniform = torch.full((10, 10), 0.1)
    assert permutation_penalty(uniform).item() == pytest.approx(1 - 10 ** -0.5)
    almost = 0.9 * torch.eye(10) + 0.01
    assert 0 < permutation_penalty(almost).item() < permutation_penalty(uniform).item()


def test_hardening_solves_the_assignment_problem():
    p = torch.randperm(9)
    noisy = torch.eye(9)[p] * 0.6 + torch.rand(9, 9) * 0.3
    index = harden(noisy)
    assert torch.equal(index, p)
    x = torch.randn(4, 9)
    torch.testing.assert_close(x[..., index], x @ torch.eye(9)[p].t())
    assert sorted(harden(torch.rand(20, 20)).tolist()) == list(range(20))  # always a permutation


@pytest.mark.parametrize("structure, side", [(Block(4, 4), "input"), (Block(4, 4), "output"), (Block(8, 2), "input"),
                                             (Block(8, 2), "output"), (Diagonal(), "input"), (Diagonal(), "output"),
                                             (NM(4), "input")], ids=str)
def test_selection_finds_an_order_the_structure_represents_exactly(structure, side):
    """W is structured up to a hidden permutation: from the identity and one random start, the
    selection finds an order with no energy outside the structure (N:M only on the input side:
    its rows are independent, so a row permutation changes nothing it keeps)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randperm(32, generator=gen)
    sparse = structure.project(torch.randn(32, 32, generator=gen), 0.75).to_dense()
    weight = sparse[:, torch.argsort(hidden)] if side == "input" else sparse[torch.argsort(hidden)]
    assert structure.project(weight, 0.75).to_dense().square().sum() < 0.9 * weight.square().sum()
    index = select_permutation(weight, structure, 0.75, side, [torch.arange(32), torch.randperm(32, generator=gen)])
    assert sorted(index.tolist()) == list(range(32))
    ordered = weight[:, index] if side == "input" else weight[torch.argsort(index)]
    torch.testing.assert_close(structure.project(ordered, 0.75).to_dense(), ordered)


def test_selection_never_keeps_less_than_its_start():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 32, generator=gen)
    for structure in (Block(4, 4), NM(4), Diagonal()):
        start = torch.randperm(32, generator=gen)
        index = select_permutation(weight, structure, 0.75, "input", [start])
        kept = structure.project(weight[:, index], 0.75).to_dense().square().sum()
        assert kept >= structure.project(weight[:, start], 0.75).to_dense().square().sum() * (1 - 1e-6)


def test_inputs_of_the_wrong_width_are_refused_by_name():
    layer = PADSTLinear(16, 8, NM(4), 0.5, name="mlp.fc")
    with pytest.raises(ValueError, match=r"mlp.fc: expected inputs with 16 features .* got shape \(2, 32\)"):
        layer(torch.randn(2, 32))
    with pytest.raises(ValueError, match=r"mlp.fc: expected inputs with 16 features .* got a 0-d tensor"):
        layer(torch.tensor(1.0))
