"""Structure specs: projection keeps the invariant and the largest magnitudes, expansion,
transposed form, costs, and errors that name the layer, shape and rule."""

import dataclasses

import pytest
import torch

import padst_compiler
import padst_compiler.training
from padst_compiler.kernels import NM, Block, Diagonal, Unstructured

STRUCTURED = [Block(4, 8), NM(4), Diagonal()]
SHAPES = [(32, 16), (16, 32), (32, 32)]


def dense(out_features, in_features, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def test_block_keeps_largest_blocks_per_block_row():
    w = dense(16, 32)
    sw = Block(4, 8).project(w, 0.5)
    assert sw.values.shape == (4, 2, 4, 8) and sw.index.shape == (4, 2)
    norms = w.reshape(4, 4, 4, 8).permute(0, 2, 1, 3).square().sum((2, 3))
    assert torch.equal(sw.index, norms.topk(2, dim=1).indices.sort(dim=1).values)
    mask = sw.to_dense() != 0
    assert torch.equal(mask.reshape(4, 4, 4, 8).any(3).any(1).sum(1), torch.full((4,), 2))


def test_nm_keeps_n_largest_of_every_m():
    w = dense(8, 16)
    sw = NM(4).project(w, 0.5)
    assert sw.values.shape == (8, 8) and sw.index.shape == (8, 4, 2)
    kept = sw.to_dense().reshape(8, 4, 4)
    assert torch.equal((kept != 0).sum(2), torch.full((8, 4), 2))
    smallest_kept = kept.abs().masked_fill(kept == 0, float("inf")).amin(2)
    largest_dropped = w.reshape(8, 4, 4).abs().masked_fill(kept != 0, 0).amax(2)
    assert bool((smallest_kept >= largest_dropped).all())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_diagonal_keeps_highest_energy_wraparound_diagonals(shape):
    out_features, in_features = shape
    w = dense(*shape)
    sw = Diagonal().project(w, 0.75)
    shorter, longer = min(shape), max(shape)
    assert sw.values.shape == (shorter // 4, longer)
    energies = []
    for offset in range(shorter):
        j = torch.arange(longer)
        energies.append(w[j % out_features, (j + offset) % in_features].square().sum())
    assert torch.equal(sw.index, torch.stack(energies).topk(shorter // 4).indices.sort().values)
    assert (sw.to_dense() != 0).sum() == sw.values.numel()
    assert torch.equal((sw.to_dense() != 0).sum(1), torch.full((out_features,), sw.values.numel() // out_features))


def test_unstructured_keeps_largest_weights():
    w = dense(16, 16)
    sw = Unstructured().project(w, 0.75)
    assert int(sw.index.sum()) == 64
    assert w.abs()[sw.index].min() >= w.abs()[~sw.index].max()


@pytest.mark.parametrize("structure", STRUCTURED + [Unstructured()], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_project_expand_round_trip(structure, shape):
    sw = structure.project(dense(*shape), 0.5)
    expanded = sw.to_dense()
    again = structure.project(expanded, 0.5)  # a structured matrix projects onto itself
    torch.testing.assert_close(again.to_dense(), expanded)
    w = dense(*shape)
    torch.testing.assert_close(expanded, w * (expanded != 0))


@pytest.mark.parametrize("structure", STRUCTURED, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_transposed_form_is_the_transpose(structure, shape):
    out_features, in_features = shape
    sw = structure.project(dense(*shape), 0.5)
    t = structure.transposed(sw.values, sw.index, out_features, in_features)
    rebuilt = torch.zeros(in_features, out_features)
    cols = torch.repeat_interleave(torch.arange(in_features), t.counts)
    rebuilt[cols, t.rows] = t.values
    torch.testing.assert_close(rebuilt, sw.to_dense().t())
    assert torch.equal(t.starts, torch.cumsum(t.counts, 0) - t.counts)


@pytest.mark.parametrize("structure", STRUCTURED + [Unstructured()], ids=str)
def test_costs_match_the_compressed_tensors(structure):
    out_features, in_features, sparsity = 64, 32, 0.75
    sw = structure.project(dense(out_features, in_features), sparsity)
    nnz = structure.nnz(out_features, in_features, sparsity)
    assert nnz == sw.structure.kept_count(sw.values, sw.index)
    assert structure.flops(out_features, in_features, sparsity, tokens=10) == 2 * 10 * nnz
    expected_bytes = sw.values.numel() * 4 + sw.index.numel() * sw.index.element_size()
    assert structure.nbytes(out_features, in_features, sparsity) == expected_bytes
    assert sw.kept_fraction == pytest.approx(0.25)


def test_kept_fraction_at_90_percent_on_a_gpt_mlp_layer():
    assert Block(32, 32).kept_units(3072, 768, 0.9) == 2  # 2.4 of 24 blocks rounds to 2
    assert NM(32).kept_units(3072, 768, 0.9) == 3
    assert Diagonal().kept_units(3072, 768, 0.9) == 77
    assert Unstructured().nnz(3072, 768, 0.9) == 235930


@pytest.mark.parametrize("structure,shape,sparsity,message", [
    (Block(32, 32), (100, 64), 0.9, "layer 'mlp.fc' of shape 100x64 .* Block\\(32x32\\): block rows 32 do not divide out_features 100"),
    (Block(8, 24), (64, 100), 0.5, "block columns 24 do not divide in_features 100"),
    (Block(8, 8), (64, 16), 0.9, "sparsity 0.9 keeps no block of the 2 in a block-row"),
    (NM(8), (64, 100), 0.5, "m = 8 does not divide in_features 100"),
    (NM(4), (64, 64), 0.9, "keeps n = 0 of every m = 4 inputs"),
    (Diagonal(), (24, 16), 0.5, "need one of out_features and in_features to divide the other"),
    (Diagonal(), (64, 8), 0.95, "keeps none of the 8 diagonals"),
    (Unstructured(), (2, 2), 0.9, "keeps no weight"),
])
def test_shapes_a_structure_cannot_take_are_named(structure, shape, sparsity, message):
    with pytest.raises(ValueError, match=message):
        structure.project(torch.zeros(shape), sparsity, layer="mlp.fc")


@pytest.mark.parametrize("sparsity", [1.0, -0.1, "0.5", True, float("nan")])
def test_sparsity_outside_unit_interval_is_rejected(sparsity):
    with pytest.raises(ValueError, match="sparsity must be a number in \\[0, 1\\)"):
        Block(4, 4).kept_units(16, 16, sparsity)


def test_specs_validate_their_own_options_and_are_immutable():
    with pytest.raises(ValueError, match="Block: rows must be a positive integer, got 0"):
        Block(0, 4)
    with pytest.raises(ValueError, match="NM: m must be a positive integer, got 2.5"):
        NM(2.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Block(4, 4).rows = 8
    assert Block(4, 4) == Block(4, 4) and len({NM(4), NM(4), Diagonal(), Diagonal()}) == 2


def test_specs_are_importable_from_every_public_namespace():
    assert padst_compiler.Block is padst_compiler.training.Block is Block
    assert padst_compiler.training.NM is NM and padst_compiler.Diagonal is Diagonal


@pytest.mark.parametrize("structure", STRUCTURED + [Unstructured()], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_unit_views_agree_with_the_compressed_form(structure, shape):
    out_features, in_features = shape
    sw = structure.project(dense(*shape), 0.5)
    mask = structure.index_to_units(sw.index, out_features, in_features)
    assert torch.equal(mask.sum(1), torch.full((mask.shape[0],), structure.kept_units(*shape, 0.5)))
    assert torch.equal(structure.units_to_index(mask, *shape), sw.index)
    assert torch.equal(structure.units_to_dense(mask, *shape), sw.to_dense() != 0)
    torch.testing.assert_close(structure.compress(sw.to_dense(), sw.index), sw.values)
    unit_sizes = structure.unit_scores(torch.ones(shape))
    assert unit_sizes.sum() == out_features * in_features and bool((unit_sizes == unit_sizes[0, 0]).all())
