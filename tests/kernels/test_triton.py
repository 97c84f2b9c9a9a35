"""The Triton kernels: under the interpreter on the CPU (always), on a GPU where there is one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from padst_compiler.kernels import NM, Block, Diagonal
from padst_compiler.kernels.inductor import lowering as inductor_lowering
from padst_compiler.kernels.inductor import visibility as inductor_visibility

from . import gpu_compile
from .test_ops import make_case, run_with_grads

REPOSITORY = Path(__file__).resolve().parents[2]


def _run_interpreted(cases_file: str, **environment) -> None:
    """Triton reads TRITON_INTERPRET when it is imported, so interpreted cases run in a
    fresh process; none may skip."""
    cases = Path(__file__).with_name(cases_file)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", **environment)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
                         cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0 and "skipped" not in summary, run.stdout[-6000:] + run.stderr[-2000:]


def test_kernels_match_the_dense_reference_under_the_interpreter():
    _run_interpreted("interpreted_triton_cases.py")


def test_inductor_template_lowerings_under_the_interpreter_and_for_gpus(tmp_path):
    """The interpreted cases check what the templates compute; the kernels Inductor generated
    there must also compile for GPUs, in every tile configuration the lowering offers (the
    interpreter accepts code that GPU code generation rejects)."""
    _run_interpreted("interpreted_inductor_cases.py", PADST_TEMPLATE_SOURCES=str(tmp_path))
    if gpu_compile.ptxas_problem():
        pytest.skip(gpu_compile.ptxas_problem())
    jobs = gpu_compile.template_jobs(tmp_path)
    for op_name in ("block_linear", "nm_linear", "diag_linear"):
        assert any(op_name in name for name, *_ in jobs), f"no {op_name} template was generated"
    for name, source, options, target in jobs:
        try:
            gpu_compile.compile_to_cubin(source, options, target)
        except Exception as error:
            raise AssertionError(f"{name}: {error}") from error


def test_template_lowerings_register_on_this_torch():
    from torch._inductor.lowering import lowerings

    assert inductor_lowering.supported(), "this torch is outside the versions the lowerings were written for"
    inductor_lowering.ensure_registered()
    for structure in (Block(16, 16), NM(4), Diagonal()):
        assert isinstance(getattr(lowerings.get(structure.op.default), "__wrapped__", None),
                          inductor_lowering._ForwardLowering), structure
        grad_input = getattr(torch.ops.padst, f"{structure.op.__name__}_grad_input").default
        assert isinstance(getattr(lowerings.get(grad_input), "__wrapped__", None),
                          inductor_lowering._GradInputLowering), structure


def test_the_inductor_templates_run_the_bodies_and_tiles_of_the_launcher_kernels():
    triton_kernels = pytest.importorskip("padst_compiler.kernels.triton.kernels")
    for prefix, tiles in (("block", triton_kernels.BLOCK_FORWARD_TILES), ("nm", triton_kernels.ROWS_FORWARD_TILES),
                          ("diag", triton_kernels.ROWS_FORWARD_TILES)):
        template, kernel = inductor_lowering._TEMPLATES[f"{prefix}_linear"], getattr(triton_kernels, f"_{prefix}_forward_kernel")
        assert f"padst_bodies.{prefix}_forward(" in template.source and f"bodies.{prefix}_forward(" in kernel.fn.src
        offered = template.configs()
        assert offered == [dict(tile) for tile in tiles] and offered[0] is not tiles[0]
        launched = [{**config.kwargs, "num_warps": config.num_warps} for config in kernel.configs]
        assert launched == list(tiles)[:len(launched)]  # the interpreter keeps the first only


def test_functionalization_keeps_the_ops_opaque_off_cuda():
    """The CUDA-only decomposition rule is registered on this torch and passes CPU ops through."""
    from functorch.compile import aot_function, make_boxed_func

    assert inductor_visibility.decompose_on_cuda_supported(), "rule not registered on this torch"
    weight, x, bias, in_index, out_index = make_case(Block(4, 8), 32, 16, 0.5, (5,), dtype=torch.float32)
    graphs = []

    def keep_graph(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    op = lambda x, v, index, *rest: Block(4, 8).op(x, v, index, 32, *rest)  # noqa: E731
    aot_function(op, keep_graph, keep_graph)(x.requires_grad_(), weight.values.requires_grad_(), weight.index,
                                             bias, in_index, out_index)
    targets = {str(node.target) for node in graphs[0].graph.nodes}
    assert "padst.block_linear.default" in targets, targets


# ------------------------------------------------------------------------- GPU

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
STRUCTURES = [Block(16, 16), Block(8, 8), Block(32, 16), NM(4), NM(8), Diagonal()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
@pytest.mark.parametrize("shape", [(128, 256), (256, 128)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.cuda
@needs_gpu
def test_cuda_ops_match_the_cpu_ops(structure, shape, dtype):
    weight, x, bias, in_index, out_index = make_case(structure, *shape, 0.5, (3, 1000), dtype=torch.float32)
    op = lambda x, v, b: structure.op(x, v, weight.index.to(x.device), shape[0], b,  # noqa: E731
                                      in_index.to(x.device), out_index.to(x.device))
    want = run_with_grads(op, x, weight.values, bias)
    on_gpu = [t.to("cuda", dtype) for t in (x, weight.values, bias)]
    got = run_with_grads(lambda *a: op(*a).cpu().float(), *on_gpu)
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.5, rtol=0.05)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float().cpu(), w, **tolerance)


@pytest.mark.parametrize("structure", [Block(16, 16), NM(4), Diagonal()], ids=str)
@pytest.mark.cuda
@needs_gpu
def test_cuda_opcheck(structure):
    weight, x, bias, in_index, out_index = make_case(structure, 64, 32, 0.5, (2, 5), dtype=torch.float32)
    args = [t.to("cuda") for t in (x, weight.values, weight.index)] + [64] + \
           [t.to("cuda") for t in (bias, in_index, out_index)]
    for i in (0, 1, 4):
        args[i] = args[i].requires_grad_()
    torch.library.opcheck(structure.op, tuple(args))


@pytest.mark.cuda
@pytest.mark.slow
@needs_gpu
def test_cuda_inductor_fuses_the_forward_templates_and_sees_the_backward_kernels(monkeypatch):
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(inductor_lowering, "OFFER", ("template",))  # the opaque op may win at 4 tokens

    layers = []
    for structure in (Block(16, 16), NM(4), Diagonal()):
        weight = structure.project(torch.randn(64, 64), 0.5)
        layers.append((structure, weight.index.cuda(), weight.values.cuda().requires_grad_()))
    in_index, out_index = torch.randperm(64, device="cuda"), torch.randperm(64, device="cuda")

    def model(x):
        for structure, index, values in layers:
            x = torch.relu(structure.op(x, values, index, 64, None, in_index, out_index))
        return x.sum()

    x = torch.randn(4, 64, device="cuda", requires_grad=True)
    eager = model(x)
    eager.backward()
    want = [values.grad.clone() for _, _, values in layers]
    for _, _, values in layers:
        values.grad = None
    compiled = torch.compile(model, fullgraph=True)

    def step():
        loss = compiled(x)
        loss.backward()
        return loss

    loss, code = run_and_get_code(step)
    torch.testing.assert_close(loss, eager)
    for (_, _, values), grad in zip(layers, want):
        torch.testing.assert_close(values.grad, grad)
    code = "".join(code)
    for op_name in ("block_linear", "nm_linear", "diag_linear"):  # each forward fused with its relu
        assert f"def triton_tem_fused_{op_name}_relu" in code, op_name
    assert all(name in code for name in ("_block_grad_input_kernel", "_ell_grad_values_kernel")), \
        "Inductor did not see the backward Triton kernels"
