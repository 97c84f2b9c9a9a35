"""Checkpoints a user can ship: ``save`` / ``load`` with safetensors, and ``densify``."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import padst_compiler
from padst_compiler.models import GPT, GPTConfig
from padst_compiler.outputs import PathError
from padst_compiler.training import NM, Block, Diagonal, DSTScheduler, PADSTLinear, sparsify
from padst_compiler.training.layer import PERMUTATION_MODES

CONFIG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32)
TOKENS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def trained_gpt(steps: int, permutation="learned", structure=Block(4, 4), total=20):
    torch.manual_seed(0)
    model = sparsify(GPT(CONFIG), structure, 0.75, permutation=permutation, seed=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = DSTScheduler(model, optimizer, total_steps=total, update_every=3, harden_at=0.3)
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randint(0, 64, (4, 16), generator=gen)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sched.step()
    return model.eval()


def fresh_gpt(config=CONFIG):
    torch.manual_seed(123)  # other initial weights than the saved model: everything must come from the files
    return GPT(config)


def tensors_of(model):
    return {key: value for key, value in model.state_dict().items() if torch.is_tensor(value)}


@pytest.mark.parametrize("steps", [2, 12], ids=["warming-up", "hardened"])
@pytest.mark.parametrize("permutation", ["learned", "birkhoff"])
def test_saved_model_reloads_into_a_fresh_dense_model(tmp_path, steps, permutation):
    model = trained_gpt(steps, permutation)
    padst_compiler.save(model, tmp_path / "ckpt")
    loaded = padst_compiler.load(fresh_gpt(), tmp_path / "ckpt").eval()
    assert [name for name, _ in loaded.named_modules() if isinstance(_, PADSTLinear)] == \
        [name for name, _ in model.named_modules() if isinstance(_, PADSTLinear)]
    torch.testing.assert_close(tensors_of(loaded), tensors_of(model), rtol=0, atol=0)
    for (_, mine), (_, theirs) in zip(padst_compiler.training.padst_layers(loaded),
                                      padst_compiler.training.padst_layers(model)):
        assert mine.state_record() == theirs.state_record()
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), model(TOKENS), rtol=0, atol=0)


def test_files_hold_tied_weights_once_and_each_layer_record(tmp_path):
    model = trained_gpt(12)
    padst_compiler.save(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    record = json.loads((tmp_path / "padst.json").read_text())
    assert "head.weight" in record["aliases"] or "tok.weight" in record["aliases"]
    layer_states = [key for key in tensors_of(model) if key.endswith("_extra_state")]
    assert len(layer_states) == len(record["layers"]) == 8  # kept in padst.json, not among the tensors
    assert len(tensors) == len(tensors_of(model)) - len(layer_states) - 1
    layer = record["layers"]["blocks.0.mlp.fc"] if "blocks.0.mlp.fc" in record["layers"] else \
        next(iter(record["layers"].values()))
    assert layer["structure_fields"] == {"type": "Block", "rows": 4, "cols": 4}
    assert layer["sparsity"] == 0.75 and layer["hard"] is True and layer["side"] in ("input", "output")


def test_load_takes_a_function_building_the_model(tmp_path):
    model = trained_gpt(12)
    padst_compiler.save(model, tmp_path)
    loaded = padst_compiler.load(fresh_gpt, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), model(TOKENS), rtol=0, atol=0)


def test_load_refuses_another_architecture_naming_the_layer_and_changes_nothing(tmp_path):
    padst_compiler.save(trained_gpt(12), tmp_path)
    other = fresh_gpt(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=48))
    before = {key: value.clone() for key, value in tensors_of(other).items()}
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.[a-z.]+' is 48 -> \d+.*nothing was loaded"):
        padst_compiler.load(other, tmp_path)
    assert not any(isinstance(module, PADSTLinear) for module in other.modules())
    torch.testing.assert_close(tensors_of(other), before, rtol=0, atol=0)


def test_load_refuses_a_model_sparsified_otherwise_and_changes_nothing(tmp_path):
    padst_compiler.save(trained_gpt(12), tmp_path)
    other = sparsify(fresh_gpt(), NM(4), 0.75)
    before = {key: value.clone() for key, value in tensors_of(other).items()}
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.attn\.qkv'.*nothing was loaded"):
        padst_compiler.load(other, tmp_path)
    torch.testing.assert_close(tensors_of(other), before, rtol=0, atol=0)


def test_load_refuses_files_from_two_different_saves(tmp_path):
    padst_compiler.save(trained_gpt(12), tmp_path / "a")
    padst_compiler.save(trained_gpt(12), tmp_path / "b")
    (tmp_path / "a" / "padst.json").write_bytes((tmp_path / "b" / "padst.json").read_bytes())
    with pytest.raises(ValueError, match="different saves"):
        padst_compiler.load(fresh_gpt(), tmp_path / "a")


def test_load_refuses_a_broken_record_naming_the_layer(tmp_path):
    padst_compiler.save(trained_gpt(12), tmp_path)
    record = json.loads((tmp_path / "padst.json").read_text())
    name = next(iter(record["layers"]))
    del record["layers"][name]["sparsity"]
    (tmp_path / "padst.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=f"record of layer '{name}'"):
        padst_compiler.load(fresh_gpt(), tmp_path)


def test_save_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PathError, match="notes.txt"):
        padst_compiler.save(trained_gpt(2), tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_save_again_into_its_own_folder(tmp_path):
    padst_compiler.save(trained_gpt(2), tmp_path)
    model = trained_gpt(12)
    padst_compiler.save(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(padst_compiler.load(fresh_gpt(), tmp_path).eval()(TOKENS), model(TOKENS))


# ----------------------------------------------------------------------------- densify


@pytest.mark.parametrize("permutation", PERMUTATION_MODES)
@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("structure", [Block(4, 4), NM(4), Diagonal()], ids=str)
@pytest.mark.parametrize("hardened", [False, True])
def test_densify_gives_nn_linear_equal_to_the_layer(permutation, side, structure, hardened):
    torch.manual_seed(0)
    layer = PADSTLinear(16, 32, structure, 0.5, permutation=permutation, side=side, soft_noise=0.3)
    if hardened:
        layer.harden()
    x = torch.randn(5, 16)
    dense = padst_compiler.densify(layer)
    assert type(dense) is nn.Linear
    torch.testing.assert_close(dense(x), layer(x))


def test_densify_gives_back_gpt2_conv1d_that_from_pretrained_reads(tmp_path):
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = sparsify(GPT2LMHeadModel(config), Block(4, 4), 0.75, permutation="random").eval()
    with torch.no_grad():
        expected = model(TOKENS).logits
    padst_compiler.densify(model)
    assert not any(isinstance(module, PADSTLinear) for module in model.modules())
    assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)
    model.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, expected, rtol=1e-4, atol=1e-5)


def test_hf_gpt2_saves_and_loads_through_padst_files(tmp_path):
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = sparsify(GPT2LMHeadModel(config), Block(4, 4), 0.75, permutation="random").eval()
    padst_compiler.save(model, tmp_path)
    torch.manual_seed(1)
    loaded = padst_compiler.load(GPT2LMHeadModel(config), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS).logits, model(TOKENS).logits, rtol=0, atol=0)
    assert padst_compiler.densify(loaded).transformer.h[1].attn.c_attn.__class__ is Conv1D


def test_a_densified_model_loads_state_dicts_as_torch_does():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), Block(4, 4), 0.5)
    padst_compiler.densify(model)
    state = model.state_dict()
    del state["2.bias"]
    result = model.load_state_dict(state, strict=False)  # the PA-DST checkpoint guard went with the layers
    assert result.missing_keys == ["2.bias"]


def test_save_refuses_a_model_that_is_itself_a_layer(tmp_path):
    with pytest.raises(ValueError, match="the model itself is a PADSTLinear"):
        padst_compiler.save(PADSTLinear(8, 8, Block(4, 4), 0.5), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_a_save_without_a_hugging_face_config_removes_an_older_one(tmp_path):
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    padst_compiler.save(sparsify(GPT2LMHeadModel(config), Block(4, 4), 0.75), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    padst_compiler.save(trained_gpt(2), tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_a_300_layer_model_saves_loads_and_densifies(tmp_path):
    """Real depth: every layer recorded, rebuilt and loaded; the dense copy computes the same."""
    def deep(seed):
        torch.manual_seed(seed)
        return nn.Sequential(*[nn.Linear(16, 16) for _ in range(300)])

    model = sparsify(deep(0), Block(4, 4), 0.5, permutation="random").eval()
    padst_compiler.save(model, tmp_path)
    loaded = padst_compiler.load(lambda: deep(1), tmp_path).eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(padst_compiler.densify(loaded)(x), expected)
    assert len(json.loads((tmp_path / "padst.json").read_text())["layers"]) == 300
