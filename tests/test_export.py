"""Deployable inference: a hardened sparsified model as an AOTInductor package."""

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import padst_compiler
from padst_compiler.cli import main
from padst_compiler.deploy import exported_program
from padst_compiler.integrations.huggingface import CausalLMLogits
from padst_compiler.outputs import PathError
from padst_compiler.pipeline import node_counts
from padst_compiler.training import Block, harden_permutations, sparsify

CONFIG = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2, use_cache=False)


def hardened_gpt2(permutation="learned"):
    torch.manual_seed(0)
    model = sparsify(GPT2LMHeadModel(CONFIG), Block(8, 8), 0.75, permutation=permutation)
    harden_permutations(model)
    return CausalLMLogits(model).eval()


def test_the_exported_graph_has_no_standalone_permutation_and_computes_the_model():
    model = hardened_gpt2()
    ids = torch.randint(0, 64, (1, 16))
    program = exported_program(model, (ids,))
    counts = node_counts(program.module())
    assert counts["permutes"] == 0 and counts["block_linear"] == 4 and counts["fused_gathers"] > 0
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids), model(ids))
    assert model.training is False and all(param.requires_grad for param in model.parameters())


@pytest.mark.slow
def test_padst_export_package_runs_in_a_fresh_process_at_other_lengths(tmp_path, capsys):
    model = hardened_gpt2()
    padst_compiler.save(model.model, tmp_path / "saved")
    assert main(["export", str(tmp_path / "saved"), str(tmp_path / "gpt2.pt2")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'gpt2.pt2'}"
    inputs = [torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(length))
              for batch, length in ((1, 5), (3, 32))]
    with torch.no_grad():
        torch.save({"inputs": inputs, "outputs": [model(x) for x in inputs]}, tmp_path / "reference.pt")
    script = textwrap.dedent(f"""
        import torch, padst_compiler
        package = padst_compiler.load_package({str(tmp_path / "gpt2.pt2")!r})
        reference = torch.load({str(tmp_path / "reference.pt")!r})
        for x, expected in zip(reference["inputs"], reference["outputs"]):
            torch.testing.assert_close(package(x), expected, rtol=1e-4, atol=1e-5)
        print("equal")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "equal", run.stderr[-2000:]


def test_padst_export_names_a_folder_without_a_model(tmp_path, capsys):
    padst_compiler.save(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "saved")
    assert main(["export", str(tmp_path / "saved"), str(tmp_path / "m.pt2")]) == 2
    assert "has no config.json: it was not saved from a Hugging Face model" in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()


def test_export_refuses_a_layer_still_learning_its_permutation(tmp_path):
    torch.manual_seed(0)
    model = CausalLMLogits(sparsify(GPT2LMHeadModel(CONFIG), Block(8, 8), 0.75, permutation="learned"))
    with pytest.raises(ValueError, match=r"layer 'model\.transformer\.h\.0\.attn\.c_attn' \(and 3 more\) still learns"):
        padst_compiler.export(model, (torch.randint(0, 64, (1, 8)),), tmp_path / "m.pt2")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name, content, message", [
    ("m.onnx", None, "ends with .pt2"),
    ("m.pt2", b"my notes", "exists and is not an AOTInductor package"),
])
def test_export_refuses_a_path_it_must_not_write(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(PathError, match=message):
        padst_compiler.export(hardened_gpt2(), (torch.randint(0, 64, (1, 8)),), tmp_path / name)
    assert content is None or (tmp_path / name).read_bytes() == content


def test_load_package_names_a_missing_file(tmp_path):
    with pytest.raises(PathError, match="no such file"):
        padst_compiler.load_package(tmp_path / "missing.pt2")
