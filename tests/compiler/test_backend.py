"""End to end: torch.compile(backend="padst") and optimize() on GPT and ViT, training and inference.

Compiles take tens of seconds on 2 cores, so each test covers several properties.
"""

import subprocess
import sys

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import padst_compiler
from padst_compiler import pipeline
from padst_compiler.backend import BackendConfig, optimize_graph, padst_backend
from padst_compiler.models import GPT, ViT, GPTConfig, ViTConfig
from padst_compiler.training import NM, Block, DSTScheduler, sparsify

# a silent fallback would make every other test pass without the passes: make it an error
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("error:padst:UserWarning")]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with empty Dynamo caches, so compile counts are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_gpt(structure=NM(4), permutation="random", side="input"):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, d_model=32))
    return sparsify(model, structure, 0.5, permutation=permutation, side=side)


def lm_loss(logits, targets):
    """GPT.loss on compiled logits (torch.compile compiles ``forward`` only)."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def counting_backend(calls, **options):
    def backend(gm, example_inputs):
        calls.append(gm)
        return padst_backend(gm, example_inputs, options=options)
    return backend


def test_backend_is_found_through_its_entry_point_without_importing_the_package():
    code = ("import sys, torch; from torch._dynamo.backends.registry import lookup_backend; "
            "assert 'padst_compiler' not in sys.modules; fn = lookup_backend('padst'); "
            "print(fn.__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "padst_compiler.backend"


def test_gpt_training_matches_eager_with_padst_ops_in_forward_and_backward():
    model = small_gpt()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    eager_loss = model.loss(idx, targets)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, backend="padst")

    def step():
        loss = lm_loss(compiled(idx), targets)
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    with torch._inductor.config.patch(fx_graph_cache=False):  # a cache hit would generate no code to read
        (loss, grads), codes = run_and_get_code(step)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for (name, _), got, want in zip(model.named_parameters(), grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    code = "\n".join(codes)
    assert "extern_kernels.padst_nm_linear_opaque(" in code
    assert "extern_kernels.padst_nm_linear_grad_input_opaque(" in code  # an out= call: see test_compile
    assert "padst.nm_linear_grad_values.default" in code


def test_gpt_inference_graph_has_no_standalone_permute_and_every_layer_reads_through_its_in_index():
    model = small_gpt(Block(8, 8)).eval()
    idx = torch.randint(0, 256, (2, 16))
    graphs = []

    def inspect(gm, example_inputs):
        graphs.append(optimize_graph(gm, example_inputs, BackendConfig(mode="inference")).gm)
        return graphs[-1].forward

    with torch.no_grad():
        torch.compile(model, backend=inspect)(idx)
    counts = pipeline.node_counts(graphs[0])
    assert counts["permutes"] == 0 and counts["block_linear"] == 4
    # an in_index costs the CPU kernels less than an out_index (see passes/propagate.py)
    layers = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "block_linear" in str(n.target)]
    assert all(n.args[5] is not None and n.args[6] is None for n in layers)
    optimized = padst_compiler.optimize(model, [idx], mode="inference")
    with torch.no_grad():
        torch.testing.assert_close(optimized(idx), model(idx), rtol=1e-5, atol=1e-5)


def test_vit_training_and_inference_match_eager():
    torch.manual_seed(0)
    model = sparsify(ViT(ViTConfig(image_size=16, patch_size=8, d_model=32, n_head=2, n_layer=1)),
                     Block(8, 8), 0.5, permutation="random")
    images = torch.randn(2, 3, 16, 16)
    expected = model(images)
    grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, backend="padst")
    out = compiled(images)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(out.square().sum(), list(model.parameters())), grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(padst_compiler.optimize(model, [images])(images), model(images),
                                   rtol=1e-5, atol=1e-5)


def test_mask_updates_never_recompile_and_hardening_recompiles_once():
    model = small_gpt(Block(8, 8), permutation="learned")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = DSTScheduler(model, optimizer, total_steps=12, update_every=2, growth="set", harden_at=0.5)
    calls = []
    compiled = torch.compile(model, backend=counting_backend(calls))
    gen = torch.Generator().manual_seed(0)
    masks, compiles = [], []
    for _ in range(12):
        idx, targets = torch.randint(0, 256, (2, 16), generator=gen), torch.randint(0, 256, (2, 16), generator=gen)
        loss = lm_loss(compiled(idx), targets) + sched.permutation_penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sched.step()
        masks.append(model.blocks[0].mlp.fc.index.clone())
        compiles.append(len(calls))
    assert not torch.equal(masks[0], masks[-1])  # the masks did move
    assert compiles[5] == 1  # soft phase: one graph through several mask updates
    assert compiles[-1] == 2  # hardening at step 6 changes the forward: exactly one recompile
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx), rtol=1e-5, atol=1e-5)


def test_new_batch_and_sequence_sizes_do_not_recompile_with_dynamic_shapes():
    model = small_gpt()
    calls = []
    compiled = torch.compile(model, backend=counting_backend(calls), dynamic=True)
    with torch.no_grad():
        compiles = []
        for batch, tokens in [(2, 8), (3, 11), (5, 13)]:
            idx = torch.randint(0, 256, (batch, tokens))
            torch.testing.assert_close(compiled(idx), model(idx), rtol=1e-5, atol=1e-5)
            compiles.append(len(calls))
    # Dynamo may call the backend more than once for its first compile (it restarts its analysis
    # to specialise scalars); what matters is that new sizes compile nothing
    assert compiles[0] >= 1 and compiles[1] == compiles[2] == compiles[0]


@pytest.mark.filterwarnings("default:padst:UserWarning")
def test_a_failing_pass_falls_back_to_inductor_with_a_warning(monkeypatch):
    def broken(gm, ctx):
        raise RuntimeError("deliberately broken pass")

    monkeypatch.setattr(pipeline, "PASSES", (pipeline.Pass("broken", broken),) + pipeline.PASSES)
    model = small_gpt()
    idx = torch.randint(0, 256, (2, 16))
    with pytest.warns(UserWarning, match=r"padst: the passes failed on graph \[\d+/\d+\] \(\d+ nodes\) \(PassFailed: "
                                         r"pass 'broken' failed \(the first pass\): RuntimeError: deliberately broken"):
        out = torch.compile(model, backend="padst")(idx)
    torch.testing.assert_close(out, model(idx), rtol=1e-5, atol=1e-5)


def test_strict_raises_where_the_backend_would_fall_back_and_optimize_leaves_the_model_as_it_was(monkeypatch):
    def broken(gm, ctx):
        raise RuntimeError("deliberately broken pass")

    monkeypatch.setattr(pipeline, "PASSES", pipeline.PASSES[:1] + (pipeline.Pass("broken", broken),)
                        + pipeline.PASSES[1:])
    torch._dynamo.reset()
    model = small_gpt().train()
    idx = torch.randint(0, 256, (2, 16))
    with pytest.raises(Exception, match=f"pass 'broken' failed after '{pipeline.PASSES[0].name}'"):
        padst_compiler.optimize(model, [idx], strict=True)
    assert model.training and all(module.training for module in model.modules())
    assert all(param.requires_grad for param in model.parameters())
    with pytest.raises(TypeError, match="strict must be True or False, got 'yes'"):
        BackendConfig.from_options({"strict": "yes"})


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown option"):
        BackendConfig.from_options({"speed": "fast"})
    with pytest.raises(ValueError, match="cannot disable unknown pass"):
        BackendConfig.from_options({"disable": ["propagate", "magic"]})
    with pytest.raises(ValueError, match="mode must be one of"):
        padst_compiler.optimize(small_gpt(), [torch.zeros(1, 4, dtype=torch.long)], mode="fast")
