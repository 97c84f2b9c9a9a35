"""Every padst op against the dense reference, forward and backward, and opcheck."""

import itertools

import pytest
import torch

from padst_compiler.kernels import NM, Block, Diagonal, Unstructured, set_checks
from padst_compiler.kernels.cpu import native
from padst_compiler.kernels.eager import select
from padst_compiler.kernels.permutation import inverse_permutation

from .markers import needs_native
from .reference import dense_reference

STRUCTURES = [Block(4, 8), Block(8, 4), NM(4), NM(8), Diagonal()]
SHAPES = [(32, 16), (16, 32), (32, 32)]  # out, in: taller, wider, square


def make_case(structure, out_features, in_features, sparsity, batch_shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(out_features, in_features, generator=gen, dtype=dtype)
    weight = structure.project(dense, sparsity)
    x = torch.randn(*batch_shape, in_features, generator=gen, dtype=dtype)
    bias = torch.randn(out_features, generator=gen, dtype=dtype)
    in_index = torch.randperm(in_features, generator=gen)
    out_index = torch.randperm(out_features, generator=gen)
    return weight, x, bias, in_index, out_index


def run_with_grads(fn, x, values, bias, grad_out_seed=1):
    x = x.clone().requires_grad_()
    values = values.clone().requires_grad_()
    bias = None if bias is None else bias.clone().requires_grad_()
    y = fn(x, values, bias)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_out_seed), dtype=y.dtype)
    y.backward(grad)
    return y, x.grad, values.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("batch_shape", [(7,), (2, 3), (1, 2, 3), ()], ids=str)
def test_matches_dense_reference(structure, shape, sparsity, batch_shape):
    out_features, in_features = shape
    weight, x, bias, in_index, out_index = make_case(structure, *shape, sparsity, batch_shape)
    for use_bias, use_in, use_out in itertools.product([False, True], repeat=3):
        b = bias if use_bias else None
        ii = in_index if use_in else None
        oi = out_index if use_out else None
        got = run_with_grads(
            lambda x, v, b: structure.linear(x, v, weight.index, out_features, b, ii, oi), x, weight.values, b)
        want = run_with_grads(
            lambda x, v, b: dense_reference(structure, x, v, weight.index, out_features, b, ii, oi),
            x, weight.values, b)
        for name, g, w in zip(("y", "dx", "dvalues", "dbias"), got, want):
            if w is None:
                assert g is None
                continue
            torch.testing.assert_close(g, w, msg=lambda m: f"{name} (bias={use_bias}, in={use_in}, "
                                                           f"out={use_out}): {m}")


@pytest.mark.parametrize("structure", [Block(8, 8), NM(4), Diagonal()], ids=str)
def test_bfloat16_matches_float32(structure):
    weight, x, bias, in_index, out_index = make_case(structure, 64, 32, 0.5, (16,), dtype=torch.float32)
    args = (weight.index, 64)
    want = run_with_grads(lambda x, v, b: structure.linear(x, v, *args, b, in_index, out_index),
                          x, weight.values, bias)
    got = run_with_grads(lambda x, v, b: structure.linear(x, v, *args, b, in_index, out_index),
                         x.bfloat16(), weight.values.bfloat16(), bias.bfloat16())
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w, atol=0.15, rtol=0.05)


def test_permute_forward_backward_and_composition():
    x = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    p, q = torch.randperm(10), torch.randperm(10)
    y = torch.ops.padst.permute(x, p)
    torch.testing.assert_close(y, x[..., p])
    torch.testing.assert_close(torch.ops.padst.permute(y, q), x[..., p[q]])
    torch.testing.assert_close(torch.ops.padst.permute(y, inverse_permutation(p)), x)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad[..., inverse_permutation(p)])


def test_unstructured_is_masked_dense():
    weight, x, bias, in_index, out_index = make_case(Unstructured(), 16, 32, 0.9, (5,))
    assert weight.kept_fraction == pytest.approx(0.1, abs=1 / 512)
    y = weight.linear(x, bias, in_index, out_index)
    torch.testing.assert_close(y, dense_reference(Unstructured(), x, weight.values, weight.index, 16,
                                                  bias, in_index, out_index))


# ----------------------------------------------------------------------- opcheck


def opcheck_cases():
    for structure in (Block(4, 8), NM(4), Diagonal()):
        weight, x, bias, in_index, out_index = make_case(structure, 32, 16, 0.5, (2, 5), dtype=torch.float32)
        op = structure.op
        ops = torch.ops.padst
        name = op.__name__.split(".")[0]
        grad_input, grad_values = getattr(ops, f"{name}_grad_input"), getattr(ops, f"{name}_grad_values")
        grad = torch.randn(2, 5, 32)
        leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
        yield f"{name}-plain", op, (x, weight.values, weight.index, 32)
        yield f"{name}-fused", op, (leaf(x), leaf(weight.values), weight.index, 32, leaf(bias),
                                     in_index, out_index)
        yield f"{name}_grad_input", grad_input, (leaf(grad), leaf(weight.values), weight.index, 16,
                                                 in_index, out_index)
        yield f"{name}_grad_values", grad_values, (leaf(grad), leaf(x), weight.values, weight.index,
                                                   in_index, out_index)
    yield "permute", torch.ops.padst.permute, (torch.randn(3, 7, requires_grad=True), torch.randperm(7))


@pytest.mark.parametrize("name,op,args", list(opcheck_cases()), ids=[c[0] for c in opcheck_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------ bad input


def test_permute_rejects_non_permutations():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="not a permutation of 4 features: 1 appears 2 times"):
        torch.ops.padst.permute(x, torch.tensor([0, 1, 1, 3]))
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        torch.ops.padst.permute(x, torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match=r"index has shape \(3,\), expected \(4,\)"):
        torch.ops.padst.permute(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="int64"):
        torch.ops.padst.permute(x, torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    with set_checks(False):  # value checks off: the caller vouches for the index
        torch.ops.padst.permute(x, torch.tensor([0, 1, 1, 3]))


def test_structured_ops_reject_bad_inputs():
    weight, x, bias, in_index, out_index = make_case(Block(4, 8), 32, 16, 0.5, (5,), dtype=torch.float32)
    op = torch.ops.padst.block_linear
    with pytest.raises(ValueError, match="padst::block_linear: values have dtype torch.bfloat16"):
        op(x, weight.values.bfloat16(), weight.index, 32)
    with pytest.raises(ValueError, match="out_features is 16"):
        op(x, weight.values, weight.index, 16)
    with pytest.raises(ValueError, match="block columns 8 do not divide in_features 12"):
        op(torch.randn(5, 12), weight.values, weight.index, 32)
    with pytest.raises(ValueError, match=r"bias has shape \(31,\), expected \(32,\)"):
        op(x, weight.values, weight.index, 32, bias[:31])
    with pytest.raises(ValueError, match="out_index is not a permutation"):
        op(x, weight.values, weight.index, 32, None, None, torch.zeros(32, dtype=torch.long))
    with pytest.raises(ValueError, match=r"column blocks\) holds 2, outside \[0, 2\)"):
        op(x, weight.values, torch.full_like(weight.index, 2), 32)
    wide, x, *_ = make_case(Block(4, 8), 32, 32, 0.5, (5,), dtype=torch.float32)
    with pytest.raises(ValueError, match="keeps the same column block twice"):
        op(x, wide.values, torch.zeros_like(wide.index), 32)


def test_nm_and_diagonal_ops_reject_bad_formats():
    nm, x, *_ = make_case(NM(4), 8, 16, 0.5, (3,), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"positions\) holds 4, outside \[0, 4\)"):
        torch.ops.padst.nm_linear(x, nm.values, torch.full_like(nm.index, 4), 8)
    with pytest.raises(ValueError, match="4 groups per row do not divide in_features 18"):
        torch.ops.padst.nm_linear(torch.randn(3, 18), nm.values, nm.index, 8)
    diag, x, *_ = make_case(Diagonal(), 8, 16, 0.5, (3,), dtype=torch.float32)
    with pytest.raises(ValueError, match="need one of out_features 8 and in_features 12 to divide"):
        torch.ops.padst.diag_linear(torch.randn(3, 12), diag.values, diag.index, 8)
    with pytest.raises(ValueError, match="keeps the same diagonal twice"):
        torch.ops.padst.diag_linear(x, diag.values, torch.tensor([0, 8, 1, 2]), 8)


def test_value_checks_run_again_after_an_index_changes_in_place():
    weight, x, *_ = make_case(Block(4, 8), 32, 32, 0.5, (5,), dtype=torch.float32)
    index = weight.index.clone()
    torch.ops.padst.block_linear(x, weight.values, index, 32)  # checked once, then remembered
    torch.ops.padst.block_linear(x, weight.values, index, 32)
    index[0, 1] = index[0, 0]  # an in-place change bumps the version: the next call re-checks
    with pytest.raises(ValueError, match="keeps the same column block twice"):
        torch.ops.padst.block_linear(x, weight.values, index, 32)
    with torch.inference_mode():  # no version counter: checked on every call
        bad = torch.zeros_like(index)
        with pytest.raises(ValueError, match="keeps the same column block twice"):
            torch.ops.padst.block_linear(x, weight.values, bad, 32)


def _count_direct_calls(monkeypatch, op):
    """Wrap the implementation ``structured_linear`` calls without the dispatcher."""
    from padst_compiler.kernels.eager import dispatch

    calls = []
    direct = dispatch.DIRECT_FORWARD[op]
    monkeypatch.setitem(dispatch.DIRECT_FORWARD, op, lambda *args: calls.append(1) or direct(*args))
    return calls


def test_eager_calls_without_gradients_skip_the_dispatcher_with_the_same_result(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    structure = Block(4, 8)
    weight, x, bias, in_index, out_index = make_case(structure, 32, 16, 0.5, (2, 5), dtype=torch.float32)
    calls = _count_direct_calls(monkeypatch, structure.op)
    call = lambda x, values: structure.linear(x, values, weight.index, 32, bias, in_index, out_index)  # noqa: E731
    with torch.no_grad():
        direct = call(x, weight.values)
    assert len(calls) == 1 and direct.shape == (2, 5, 32)
    torch.testing.assert_close(direct, structure.op(x, weight.values, weight.index, 32, bias, in_index, out_index))

    seen = []

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    values = weight.values.clone().requires_grad_()
    call(x, values).sum().backward()  # a gradient is needed: the op runs, with its autograd formula
    assert values.grad is not None
    with torch.no_grad(), Recording():
        call(x, weight.values)
    assert torch.ops.padst.block_linear.default in seen
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = call(mode.from_tensor(x), mode.from_tensor(weight.values))
    assert fake.shape == (2, 5, 32)
    batched = torch.vmap(lambda row: call(row, weight.values))(x)
    torch.testing.assert_close(batched, direct)
    assert len(calls) == 1  # none of these took the direct path


@needs_native
@pytest.mark.parametrize("structure", [Block(8, 8), NM(4), Diagonal()], ids=str)
def test_repeated_eager_calls_replay_the_kernel_and_follow_every_change(monkeypatch, structure):
    """A repeated direct call replays the native kernel call of the first; a new version of
    any layer tensor, another input shape, a strided input or forgotten kernel choices
    prepare the call again."""
    weight, x, bias, in_index, out_index = make_case(structure, 64, 32, 0.5, (3,), dtype=torch.float32)
    values, index = weight.values.clone(), weight.index.clone()
    calls = _count_direct_calls(monkeypatch, structure.op)

    def check(x):
        got = structure.linear(x, values, index, 64, bias, in_index, out_index)
        want = dense_reference(structure, x.double(), values.double(), index, 64, bias.double(), in_index, out_index)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)

    with torch.no_grad(), select.only("native"):
        check(x)
        check(2 * x)  # replayed on new data
        assert len(calls) == 1
        values.mul_(3)  # in place: a new version
        check(x)
        index.copy_(structure.project(torch.randn(64, 32), 0.5).index)
        check(x)
        check(x[:2])
        assert len(calls) == 4
        check(x[:2])
        assert len(calls) == 4
        bias.mul_(2)
        check(x[:2])
        out_index.copy_(torch.randperm(64))
        check(x[:2])
        in_index.copy_(torch.randperm(32))
        check(x[:2])
        assert len(calls) == 7
        strided = torch.randn(32, 3).t()  # features not contiguous: never replayed
        check(strided)
        check(strided)
        assert len(calls) == 9
        select.clear()  # forgotten choices: prepared again
        check(x)
        assert len(calls) == 10


@pytest.mark.parametrize("structure", [Block(8, 8), NM(4), Diagonal()], ids=str)
def test_a_call_into_a_planned_buffer_writes_there_and_a_dispatched_one_keeps_its_result_apart(handed_out,
                                                                                              structure):
    """With ``out`` (a buffer Inductor planned) the direct call's kernel writes into it, first
    call and replays alike; a call through the dispatcher (here: profiled) gets a result of
    its own, copied in, even where ``out`` and x share a storage, as Inductor's pooled
    buffers do (the custom-op layer refuses a result that shares an input's storage)."""
    from padst_compiler.kernels.eager.dispatch import structured_linear

    weight, x, bias, in_index, out_index = make_case(structure, 64, 32, 0.5, (3,), dtype=torch.float32)
    want = dense_reference(structure, x.double(), weight.values.double(), weight.index, 64, bias.double(), in_index,
                           out_index)
    pool = torch.empty(3 * 32 + 3 * 64)
    x, out = pool[:96].view(3, 32).copy_(x), pool[96:].view(3, 64)

    def call():
        out.fill_(float("nan"))
        handed_out.clear()
        got = structured_linear(structure.op, x, weight.values, weight.index, 64, bias, in_index, out_index, out=out)
        assert got is out
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)

    with torch.no_grad(), select.only("native"):
        for _ in range(2):  # the second call replays
            call()
            if native.library() is not None:
                assert handed_out and all(t.data_ptr() == out.data_ptr() for t in handed_out)
        with torch.autograd.profiler.profile():
            call()
        assert handed_out and all(t.untyped_storage().data_ptr() != pool.data_ptr() for t in handed_out)


@pytest.mark.parametrize("structure,op", [(Block(4, 8), "block_linear"), (NM(4), "nm_linear"),
                                         (Diagonal(), "diag_linear")], ids=str)
@pytest.mark.parametrize("batch_shape", [(0,), (2, 0)], ids=str)
def test_a_batch_without_tokens_gives_empty_outputs_and_zero_weight_gradients(structure, op, batch_shape):
    weight, x, bias, in_index, out_index = make_case(structure, 32, 32, 0.5, batch_shape, dtype=torch.float32)
    values, x, bias = weight.values.requires_grad_(), x.requires_grad_(), bias.requires_grad_()
    y = getattr(torch.ops.padst, op)(x, values, weight.index, 32, bias, in_index, out_index)
    assert y.shape == (*batch_shape, 32)
    y.sum().backward()  # under the default implementation choice, which times candidates
    assert x.grad.shape == x.shape and not values.grad.any() and not bias.grad.any()
