"""The ops under torch.compile with the default Inductor backend (one compile: they are slow here)."""

import pytest
import torch

from padst_compiler.kernels import NM, Block, Diagonal

pytestmark = pytest.mark.slow


def test_inductor_compiles_every_op_forward_and_backward():
    gen = torch.Generator().manual_seed(0)
    layers = []
    for structure in (Block(4, 8), NM(4), Diagonal()):
        weight = structure.project(torch.randn(32, 32, generator=gen), 0.5)
        layers.append((structure, weight.index, weight.values.clone().requires_grad_(),
                       torch.randn(32, generator=gen).requires_grad_()))
    in_index, out_index = torch.randperm(32, generator=gen), torch.randperm(32, generator=gen)

    def model(x):
        h = torch.ops.padst.permute(x, in_index)
        for structure, index, values, bias in layers:
            h = torch.relu(structure.op(h, values, index, 32, bias, in_index, out_index))
        return h.sum(-1)

    x = torch.randn(4, 6, 32, generator=gen, requires_grad=True)
    params = [x] + [t for layer in layers for t in layer[2:]]
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.sum(), params)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.sum(), params)
    torch.testing.assert_close(out, eager)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


def test_inductor_on_the_cpu_calls_the_ops_as_extern_kernels_that_replay(monkeypatch):
    """Without Triton the lowering makes each forward op an extern kernel call that skips
    the dispatcher, so an inference graph replays each layer's native kernel call; the
    compile caches carry the lowering's tag, so no graph compiled without it is reused."""
    from torch._inductor.utils import run_and_get_code

    from padst_compiler.kernels.eager import dispatch, select

    structure = Block(8, 8)
    weight = structure.project(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), 0.5)
    bias, in_index = torch.randn(64), torch.randperm(32)
    direct = dispatch.DIRECT_FORWARD[structure.op]
    calls = []
    monkeypatch.setitem(dispatch.DIRECT_FORWARD, structure.op, lambda *args: calls.append(1) or direct(*args))

    def model(x):
        return torch.relu(structure.op(x, weight.values, weight.index, 64, bias, in_index))

    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    x = torch.randn(3, 32)
    with torch.no_grad(), select.only("native"):
        got, code = run_and_get_code(compiled, x)
        again = compiled(2 * x)
    torch.testing.assert_close(got, model(x))
    torch.testing.assert_close(again, model(2 * x))
    assert "extern_kernels.padst_block_linear_opaque(" in code[0]
    assert len(calls) == 1, "the second call should replay the first one's kernel call"
    assert "padst-lowering-" in torch.compiler.config.cache_key_tag


def _block_stack(depth: int, width: int = 32, activation=None, scale: float = 1.0):
    gen = torch.Generator().manual_seed(0)
    weights = [Block(8, 8).project(scale * torch.randn(width, width, generator=gen), 0.5) for _ in range(depth)]

    def model(x):
        for weight in weights:
            x = torch.ops.padst.block_linear(x, weight.values, weight.index, width)
            x = x if activation is None else activation(x)
        return x

    return model


def test_the_extern_call_writes_into_buffers_inductor_plans_and_reuses_between_layers(handed_out):
    """A result the op allocated itself would be new memory every call (on the CPU, a large
    one is faulted in page by page); as an out= call its buffer is Inductor's, which hands
    a freed one to a later layer of the same size, and the native kernel writes into it."""
    from torch._inductor.utils import run_and_get_code
    from torch.testing import FileCheck

    from padst_compiler.kernels.eager import select

    model = _block_stack(depth=4)
    x = torch.randn(16, 32)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), select.only("native"):
        got, code = run_and_get_code(compiled, x)  # (a first call checks the op's aliasing: dispatched)
        handed_out.clear()
        again = compiled(x)
    assert handed_out[-1].data_ptr() == again.data_ptr(), "the last layer's kernel wrote a result of its own"
    torch.testing.assert_close(got, model(x))
    torch.testing.assert_close(again, got)
    FileCheck().check("padst_block_linear_opaque(").check_regex(
        r"buf[0-9]+ = buf[0-9]+; del buf[0-9]+  # reuse\n(.*#.*\n)?.*padst_block_linear_opaque\(.*out=buf").run(code[0])


def test_the_input_gradients_are_extern_calls_into_buffers_inductor_plans_and_reuses(handed_out):
    """The backward's input gradients, as out= calls: each layer's gradient is written into
    a buffer Inductor planned (a freed one, past the first two), not allocated per call."""
    from torch._inductor.utils import run_and_get_code
    from torch.testing import FileCheck

    from padst_compiler.kernels.eager import select

    model = _block_stack(depth=4, activation=torch.tanh)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    want = torch.autograd.grad(model(x).square().sum(), x)[0]
    close = dict(rtol=1e-4, atol=1e-5)  # (Inductor's tanh and its derivative are not eager's to the last bit)
    with torch._inductor.config.patch(fx_graph_cache=False), select.only("native"):
        got, code = run_and_get_code(lambda: torch.autograd.grad(compiled(x).square().sum(), x)[0])
        handed_out.clear()
        again = torch.autograd.grad(compiled(x).square().sum(), x)[0]
    torch.testing.assert_close(got, want, **close)
    torch.testing.assert_close(again, want, **close)
    assert handed_out[-1].data_ptr() == again.data_ptr(), "the first layer's input gradient was not written in place"
    backward = code[-1]
    assert backward.count("padst_block_linear_grad_input_opaque(") == 4
    assert "padst.block_linear_grad_input.default(" not in backward
    FileCheck().check_regex(
        r"buf[0-9]+ = buf[0-9]+; del buf[0-9]+  # reuse\n(.*#.*\n)?.*padst_block_linear_grad_input_opaque\(.*out=buf"
    ).run(backward)


def test_a_256_layer_stack_compiles_to_two_result_buffers_in_all():
    """Real depth: every layer's result is one of two buffers Inductor plans (each layer
    reads the other's), where each call used to allocate 256."""
    from torch._inductor.utils import run_and_get_code

    model = _block_stack(depth=256, scale=0.25)
    x = torch.randn(16, 32)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        got, code = run_and_get_code(torch.compile(model, backend="inductor", fullgraph=True), x)
        torch.testing.assert_close(got, model(x))
    assert code[0].count("padst_block_linear_opaque(") == 256
    assert code[0].count("empty_strided_cpu((16, 32)") == 2


def test_a_256_layer_backward_writes_its_input_gradients_into_a_few_planned_buffers():
    """Real depth for the backward: all 256 input gradients are out= calls into buffers
    Inductor reuses, with gradients equal to eager's."""
    from torch._inductor.utils import run_and_get_code

    model = _block_stack(depth=256, activation=torch.tanh, scale=0.25)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    want = torch.autograd.grad(model(x).sum(), x)[0]
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    with torch._inductor.config.patch(fx_graph_cache=False):
        got, code = run_and_get_code(lambda: torch.autograd.grad(compiled(x).sum(), x)[0])
    # 256 of Inductor's tanh derivatives, each a few ulp from eager's: compare as a whole
    assert (got - want).norm() <= 1e-4 * want.norm()
    backward = code[-1]
    assert backward.count("padst_block_linear_grad_input_opaque(") == 256
    assert backward.count("empty_strided_cpu((16, 32)") <= 3, "input gradients were not written into reused buffers"


def test_a_dynamic_compile_keeps_the_extern_call_for_every_token_count(caplog):
    from torch._inductor.utils import run_and_get_code

    structure = NM(4)
    weight = structure.project(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), 0.5)
    out_index = torch.randperm(64)

    def model(x):
        return structure.op(x, weight.values, weight.index, 64, None, None, out_index) * 2

    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        got, code = run_and_get_code(compiled, torch.randn(5, 32))  # (resets Dynamo first)
        torch._dynamo.utils.counters.clear()
        for tokens in (3, 17):
            x = torch.randn(tokens, 32)
            torch.testing.assert_close(compiled(x), model(x))
    assert "extern_kernels.padst_nm_linear_opaque(" in code[0]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0, "a token count recompiled"
    assert "failed" not in caplog.text
