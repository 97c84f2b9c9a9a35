"""sparsify: which layers it converts, what it leaves dense, and how it reports."""

import pytest
import torch
from torch import nn

from padst_compiler.models import GPT, GPTConfig
from padst_compiler.training import NM, Block, PADSTLinear, Unstructured, sparsify, sparsity_summary
from padst_compiler.training.sparsify import erk_densities


class Conv1D(nn.Module):
    """GPT-2's transposed linear layer: weight [in, out], ``nf`` = out."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def small_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, d_model=32))


def test_gpt_linears_become_padst_and_tied_head_stays_dense():
    model = small_gpt()
    sparsify(model, Block(8, 8), 0.5)
    converted = {name for name, m in model.named_modules() if isinstance(m, PADSTLinear)}
    assert converted == {f"blocks.{i}.{layer}" for i in range(2)
                         for layer in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert isinstance(model.head, nn.Linear) and model.head.weight is model.tok.weight
    logits = model(torch.randint(0, 256, (2, 16)))
    assert logits.shape == (2, 16, 256)


def test_include_and_exclude_patterns():
    model = sparsify(small_gpt(), Block(8, 8), 0.5, include=["*.mlp.*"], exclude=["blocks.1.*"])
    converted = {name for name, m in model.named_modules() if isinstance(m, PADSTLinear)}
    assert converted == {"blocks.0.mlp.fc", "blocks.0.mlp.proj"}


def test_transposed_conv1d_is_converted_with_its_function():
    model = nn.Sequential(Conv1D(16, 32))
    x = torch.randn(4, 32)
    dense = model[0].weight.t().clone()
    bias = model[0].bias.detach().clone()
    sparsify(model, NM(4), 0.5, permutation="none")
    assert isinstance(model[0], PADSTLinear) and (model[0].out_features, model[0].in_features) == (16, 32)
    torch.testing.assert_close(model(x), x @ NM(4).project(dense, 0.5).to_dense().t() + bias)


def test_layers_the_structure_cannot_take_are_listed_in_one_warning():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 30), nn.Linear(30, 32))
    with pytest.warns(UserWarning, match=r"2 layer\(s\) left dense:\n  layer '1' of shape 30x32.*\n  layer '2'"):
        sparsify(model, Block(4, 4), 0.5)
    assert isinstance(model[0], PADSTLinear) and isinstance(model[1], nn.Linear)
    strict = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 30))
    with pytest.raises(ValueError, match=r"layer '1' of shape 30x32(.|\n)*nothing was changed \(strict=True\)"):
        sparsify(strict, Block(4, 4), 0.5, strict=True)
    assert all(type(layer) is nn.Linear for layer in strict)  # the layer that fits was not converted either


def test_bare_linear_and_bad_distribution_are_explained():
    with pytest.raises(ValueError, match="the model itself is a linear layer"):
        sparsify(nn.Linear(8, 8), Block(4, 4), 0.5)
    with pytest.raises(ValueError, match="distribution='erk' needs Unstructured"):
        sparsify(small_gpt(), Block(8, 8), 0.5, distribution="erk")


def test_erk_keeps_the_global_budget_and_favours_small_layers():
    shapes = {"small": (16, 16), "wide": (256, 64), "big": (256, 256)}
    densities = erk_densities(shapes, 0.9)
    kept = sum(densities[n] * o * i for n, (o, i) in shapes.items())
    assert kept == pytest.approx(0.1 * sum(o * i for o, i in shapes.values()))
    assert densities["small"] > densities["wide"] > densities["big"] and max(densities.values()) <= 1
    model = sparsify(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 256), nn.Linear(256, 256)),
                     Unstructured(), 0.9, distribution="erk", permutation="none")
    total_kept = sum(int(m.index.sum()) for m in model if isinstance(m, PADSTLinear))
    assert total_kept == pytest.approx(0.1 * (256 + 16 * 256 + 256 * 256), rel=0.01)


def test_summary_table_lists_layers_and_state():
    model = sparsify(small_gpt(), Block(8, 8), 0.5)
    table = sparsity_summary(model)
    assert "blocks.0.mlp.fc" in table and "128x32" in table and "Block(8x8)" in table and "soft" in table
    assert table.splitlines()[-1].startswith("8 PA-DST layers keep")


def test_contradictory_permutation_options_are_refused_before_any_layer_changes():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="permutation='learned' is chosen from the dense warm-up weight"):
        sparsify(model, Block(4, 4), 0.5, permutation="learned", dense_warmup=False)
    with pytest.raises(ValueError, match="permutation='birkhoff' learns its soft matrix"):
        sparsify(model, Block(4, 4), 0.5, permutation="birkhoff", dense_warmup=True)
    assert all(isinstance(layer, nn.Linear) for layer in model)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_a_layer_is_sparsified_once_and_the_structure_must_be_a_structure():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    sparsify(model, Block(4, 4), 0.5, include=["0"])
    first = model[0]
    with pytest.raises(ValueError, match=r"layer '0' is already sparsified \(Block\(4x4\)\); nothing was changed"):
        sparsify(model, NM(4), 0.5)
    assert model[0] is first and type(model[1]) is nn.Linear
    sparsify(model, NM(4), 0.5, include=["1"])  # the layers still dense can be sparsified
    assert isinstance(model[1], PADSTLinear) and model[1].structure == NM(4)
    with pytest.raises(TypeError, match="structure must be a Structure such as Block\\(8, 8\\).*got 'block8'"):
        sparsify(nn.Sequential(nn.Linear(32, 32)), "block8", 0.5)


def test_frozen_weights_stay_frozen_in_the_layers_that_replace_them():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    sparsify(model, Block(4, 4), 0.5, permutation="learned")
    assert not any(param.requires_grad for param in model[0].parameters())
    assert model[2].values.requires_grad and model[2].dense_weight_proxy.requires_grad
    assert not model[2].bias.requires_grad
