"""The Inductor template lowerings, compiled by Inductor and run under the Triton interpreter.

Inductor emits Triton for CPU tensors when ``cpu_backend="triton"``; with
``TRITON_INTERPRET=1`` (set before Triton is imported, so ``test_triton.py`` runs this
file in a fresh process) those kernels run as Python. That exercises the whole
lowering on a machine without a GPU: the template sources, the choices, the autotuner's
pick, the epilogue fusion and the numbers. Only the hardware is left out.
"""

import functools
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

from padst_compiler.kernels import NM, Block, Diagonal
from padst_compiler.kernels.inductor import lowering as inductor_lowering

from .reference import dense_reference
from .test_ops import make_case

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)


@pytest.fixture(autouse=True)
def triton_on_cpu(monkeypatch):
    """Inductor emits Triton for CPU tensors, into a fresh code cache (a cached graph from
    before a lowering changed would hide the change). The interpreter has no GPU driver, but
    Inductor's kernel metadata asks Triton for a GPU backend's hash: give it the sm_90 one."""
    import torch._inductor.config as config
    import torch.utils._triton as inductor_triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    monkeypatch.setattr(inductor_triton, "triton_backend",
                        functools.cache(lambda: make_backend(GPUTarget("cuda", 90, 32))))
    monkeypatch.setattr(inductor_lowering, "OFFER", ("template",))
    torch._dynamo.reset()
    # benchmark_epilogue_fusion: torch's own CPU-Triton code fails there
    with config.patch(cpu_backend="triton", benchmark_epilogue_fusion=False, force_disable_caches=True):
        yield
    torch._dynamo.reset()


# Where to leave the generated template kernels, for test_triton.py to compile them for GPUs.
SOURCES = os.environ.get("PADST_TEMPLATE_SOURCES")
_TEMPLATE_KERNEL = re.compile(r"= async_compile\.triton\('(triton_tem_\w+)', '''(.*?)'''", re.DOTALL)


def compile_and_run(model, *args, **compile_options):
    """Outputs and generated code of ``torch.compile(model)(*args)``; keeps its template kernels."""
    outputs, code = run_and_get_code(torch.compile(model, fullgraph=True, **compile_options), *args)
    if SOURCES:
        test = re.sub(r"[^A-Za-z0-9_.-]", "_", os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].split(" ")[0])
        for name, source in _TEMPLATE_KERNEL.findall("".join(code)):
            Path(SOURCES, f"{name}-{test}.py").write_text(source)
    return outputs, code


OUT, IN = 64, 128
CASES = [  # structure, (out, in), with bias and both permutations
    (Block(16, 16), (OUT, IN), True),
    (Block(16, 16), (IN, OUT), False),
    (Block(8, 8), (OUT, IN), True),  # blocks below 16 take the broadcast product instead of tl.dot
    (Block(32, 16), (IN, OUT), True),
    (NM(4), (OUT, IN), True),
    (NM(8), (IN, OUT), False),
    (Diagonal(), (OUT, IN), True),
    (Diagonal(), (IN, OUT), True),
]


def _case(structure, shape, extras, batch=(3, 11), dtype=torch.float32):
    weight, x, bias, in_index, out_index = make_case(structure, *shape, 0.75, batch, dtype=dtype)
    residual = torch.randn(*batch, shape[0], dtype=dtype)
    if not extras:
        bias = in_index = out_index = None
    return weight, x, residual, bias, in_index, out_index


def _epilogue_model(structure, out_features):
    """An op followed by elementwise work that should fuse into its template."""
    def model(x, residual, values, index, bias, in_index, out_index):
        return torch.relu(structure.op(x, values, index, out_features, bias, in_index, out_index)) * 2 + residual
    return model


def _reference(structure, out_features, weight, x, residual, bias, in_index, out_index):
    y = dense_reference(structure, x.double(), weight.values.double(), weight.index, out_features,
                        None if bias is None else bias.double(), in_index, out_index)
    return torch.relu(y) * 2 + residual.double()


@pytest.mark.parametrize("structure, shape, extras", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_template_with_a_fused_epilogue_matches_the_reference(structure, shape, extras):
    weight, x, residual, bias, in_index, out_index = _case(structure, shape, extras)
    model = _epilogue_model(structure, shape[0])
    args = (x, residual, weight.values, weight.index, bias, in_index, out_index)
    got, code = compile_and_run(model, *args)
    want = _reference(structure, shape[0], weight, x, residual, bias, in_index, out_index)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    op_name = structure.op.__name__
    # One template kernel holds the op and its epilogue; the opaque op is never called.
    fused = "_".join(sorted(["add", op_name, "mul", "relu"]))  # Inductor names a kernel by its sorted ops
    FileCheck().check(f"def triton_tem_fused_{fused}_").run(code[0])
    FileCheck().check_not(f"torch.ops.padst.{op_name}.default(").run(code[0])
    if extras:
        FileCheck().check("arg_BIAS").check("arg_IN_MAP").check("arg_OUT_POS").run(code[0])
    else:
        FileCheck().check_not("arg_BIAS").check_not("arg_IN_MAP").check_not("arg_OUT_POS").run(code[0])


# The interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584), so
# bfloat16 runs where the template uses no tl.dot.
@pytest.mark.parametrize("structure, dtype", [(Block(16, 16), torch.float16), (Block(8, 8), torch.bfloat16),
                                              (NM(4), torch.bfloat16)], ids=str)
def test_half_precision_accumulates_in_float32(structure, dtype):
    weight, x, residual, bias, in_index, out_index = _case(structure, (OUT, IN), True, dtype=dtype)
    model = _epilogue_model(structure, OUT)
    args = (x, residual, weight.values, weight.index, bias, in_index, out_index)
    got, _ = compile_and_run(model, *args)
    want = _reference(structure, OUT, weight, x, residual, bias, in_index, out_index)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("structure", [Block(16, 16), NM(4)], ids=str)
def test_one_compile_serves_every_token_count(structure, caplog):
    """dynamic=True makes every size symbolic, the weight's too: the lowering specialises
    on those (a layer's weight shapes are fixed) and keeps the token count symbolic."""
    model = _epilogue_model(structure, OUT)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    torch._dynamo.utils.counters.clear()
    code = []
    for tokens in (5, 37):
        weight, x, residual, bias, in_index, out_index = _case(structure, (OUT, IN), True, batch=(tokens,))
        args = (x, residual, weight.values, weight.index, bias, in_index, out_index)
        if code:
            got = compiled(*args)
        else:  # (run_and_get_code resets Dynamo: the first call only)
            got, code = run_and_get_code(compiled, *args)
        want = _reference(structure, OUT, weight, x, residual, bias, in_index, out_index)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert "def triton_tem_fused_" in code[0] and "failed" not in caplog.text


def test_training_step_runs_the_template_forward_and_the_backward_ops():
    structure = Diagonal()
    weight, x, residual, bias, in_index, out_index = _case(structure, (OUT, IN), True)
    model = _epilogue_model(structure, OUT)

    def gradients(fn, dtype):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (x, weight.values, bias)]
        fn(leaves[0], residual.to(dtype), leaves[1], weight.index, leaves[2], in_index, out_index).square().sum() \
            .backward()
        return [t.grad for t in leaves]

    got, code = run_and_get_code(lambda: gradients(torch.compile(model, fullgraph=True), torch.float32))
    # The float64 dense reference: the eager fp32 op picks its kernel by timing, and
    # another kernel sums in another order.
    def reference_model(x, residual, values, index, bias, in_index, out_index):
        y = dense_reference(structure, x, values, index, OUT, bias, in_index, out_index)
        return torch.relu(y) * 2 + residual

    want = gradients(reference_model, torch.float64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
    FileCheck().check("def triton_tem_fused_").run(code[0])


def test_the_autotuner_picks_between_the_templates_and_the_opaque_op(monkeypatch):
    # Under the interpreter a template runs as Python, so the opaque native op must win.
    monkeypatch.setattr(inductor_lowering, "OFFER", ("template", "opaque"))
    structure = Block(16, 16)
    weight, x, residual, bias, in_index, out_index = _case(structure, (OUT, IN), True)
    model = _epilogue_model(structure, OUT)
    args = (x, residual, weight.values, weight.index, bias, in_index, out_index)
    got, code = run_and_get_code(torch.compile(model, fullgraph=True), *args)
    want = _reference(structure, OUT, weight, x, residual, bias, in_index, out_index)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    FileCheck().check("extern_kernels.padst_block_linear_opaque(").check_not("def triton_tem_").run(code[0])


def test_inductor_without_triton_calls_the_op_as_an_extern_kernel():
    import torch._inductor.config as config

    structure = NM(4)
    weight, x, residual, bias, in_index, out_index = _case(structure, (OUT, IN), True)
    model = _epilogue_model(structure, OUT)
    args = (x, residual, weight.values, weight.index, bias, in_index, out_index)
    with config.patch(cpu_backend="cpp"):
        got, code = run_and_get_code(torch.compile(model, fullgraph=True), *args)
    want = _reference(structure, OUT, weight, x, residual, bias, in_index, out_index)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    FileCheck().check("extern_kernels.padst_nm_linear_opaque(").check_not("triton_tem").run(code[0])


def test_a_failing_template_falls_back_to_the_opaque_op_with_a_warning(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("template codegen broke")

    monkeypatch.setattr(inductor_lowering._ForwardLowering, "lower", broken)
    structure = Block(16, 16)
    weight, x, residual, bias, in_index, out_index = _case(structure, (OUT, IN), True)
    model = _epilogue_model(structure, OUT)
    args = (x, residual, weight.values, weight.index, bias, in_index, out_index)
    with caplog.at_level(logging.WARNING, logger=inductor_lowering.__name__):
        got, code = run_and_get_code(torch.compile(model, fullgraph=True), *args)
    want = _reference(structure, OUT, weight, x, residual, bias, in_index, out_index)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert "lowering padst.block_linear.default failed" in caplog.text and "template codegen broke" in caplog.text
    FileCheck().check("torch.ops.padst.block_linear.default(").run(code[0])


@pytest.mark.parametrize("structure", [Block(16, 16), NM(4), Diagonal()], ids=str)
@pytest.mark.parametrize("value", [1 << 40, -3])
def test_a_compiled_template_masks_index_values_outside_their_tensors(structure, value):
    """A compiled graph hands the template its index buffer without the ops' range checks:
    the template masks every column it takes from an index value (a wild read of 1 << 40
    elements would crash this process), so a corrupted index gives finite numbers."""
    weight, x, residual, bias, in_index, out_index = _case(structure, (OUT, IN), True)
    compiled = torch.compile(_epilogue_model(structure, OUT), fullgraph=True)
    compiled(x, residual, weight.values, weight.index, bias, in_index, out_index)
    corrupted, bad_in_index = weight.index.clone(), in_index.clone()
    corrupted.view(-1)[0], bad_in_index[0] = value, value
    for index, mapped in ((corrupted, in_index), (weight.index, bad_in_index)):
        assert torch.isfinite(compiled(x, residual, weight.values, index, bias, mapped, out_index)).all()
