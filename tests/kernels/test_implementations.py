"""Each CPU implementation (native C++, PyTorch, dense) in fp32 against the float64 dense
reference, forward and backward, with and without bias and fused permutations; the native
kernels at token counts that hit every tail path. Also: choosing between them, and building
the native library."""

import os
import subprocess
import sys
import time

import pytest
import torch

from padst_compiler.kernels import NM, Block, Diagonal, implementations
from padst_compiler.kernels.cpu import native
from padst_compiler.kernels.eager import select
from .markers import needs_native
from .reference import dense_reference


# (structure, out, in): every block width the kernels specialise, on both sides; diagonals
# long enough for the streamed kernel's full vector steps and its tails
CASES = [(Block(8, 8), 64, 48), (Block(16, 32), 96, 128), (Block(32, 16), 64, 96), (Block(48, 48), 96, 96),
         (Block(64, 64), 128, 128), (NM(4), 64, 32), (NM(8), 32, 64), (Diagonal(), 64, 32), (Diagonal(), 32, 64),
         (Diagonal(), 384, 128), (Diagonal(), 100, 300)]
OPTIONS = ["plain", "bias+in+out", "in_index", "out_index"]


def _case(structure, out_features, in_features, tokens, option, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = structure.project(torch.randn(out_features, in_features, generator=gen), 0.5)
    x = torch.randn(tokens, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen) if option == "bias+in+out" else None
    in_index = torch.randperm(in_features, generator=gen) if option in ("bias+in+out", "in_index") else None
    out_index = torch.randperm(out_features, generator=gen) if option in ("bias+in+out", "out_index") else None
    return weight, x, bias, in_index, out_index


IMPLEMENTATIONS = [pytest.param("native", tokens, marks=needs_native) for tokens in (1, 13, 200)] + \
    [("torch", 13), ("dense", 13)]


@pytest.mark.parametrize("structure,out_features,in_features", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("implementation,tokens", IMPLEMENTATIONS)
@pytest.mark.parametrize("option", OPTIONS)
def test_implementation_matches_dense_reference(structure, out_features, in_features, implementation, tokens,
                                                option):
    weight, x, bias, in_index, out_index = _case(structure, out_features, in_features, tokens, option)
    values = weight.values.clone().requires_grad_()
    x = x.requires_grad_()
    bias = None if bias is None else bias.requires_grad_()
    grad = torch.randn(tokens, out_features)
    with select.only(implementation):
        y = structure.op(x, values, weight.index, out_features, bias, in_index, out_index)
        y.backward(grad)
    as64 = [t.detach().double().requires_grad_() for t in (x, values)]
    bias64 = None if bias is None else bias.detach().double().requires_grad_()
    reference = dense_reference(structure, as64[0], as64[1], weight.index, out_features, bias64, in_index, out_index)
    reference.backward(grad.double())
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), as64[0].grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(values.grad.double(), as64[1].grad, rtol=1e-5, atol=1e-4)
    if bias is not None:
        torch.testing.assert_close(bias.grad.double(), bias64.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("structure,out_features,in_features", [c for c in CASES if isinstance(c[0], Block)],
                         ids=lambda c: str(c))
@pytest.mark.parametrize("tokens", [1, 13, 200])
@pytest.mark.parametrize("option", ["bias+in+out", "in_index"])
@needs_native
def test_block_packing_rows_through_in_index_matches_dense_reference(structure, out_features, in_features,
                                                                     tokens, option):
    """The block forward's and values gradient's other way of applying in_index: packing rows
    of x (the forward: once for all tokens when few, per tile of tokens when many; the
    gradient: once for all tokens, each thread a share, read in tiles of 64 tokens)."""
    weight, x, bias, in_index, out_index = _case(structure, out_features, in_features, tokens, option)
    values = weight.values.clone().requires_grad_()
    grad = torch.randn(tokens, out_features, generator=torch.Generator().manual_seed(1))
    select.clear()
    with select.set_autotune(True):
        weight.structure.op(x, values, weight.index, out_features, bias, in_index, out_index).backward(grad)
    measured = {choice["op"]: choice["ms"] for choice in select.choices()}
    assert "native-packed" in measured["block_forward"] and "native-packed" in measured["block_grad_values"]
    values.grad = None
    with select.only("native-packed"):
        y = weight.structure.op(x, values, weight.index, out_features, bias, in_index, out_index)
        y.backward(grad)
    values64 = weight.values.double().requires_grad_()
    reference = dense_reference(structure, x.double(), values64, weight.index, out_features,
                                None if bias is None else bias.double(), in_index, out_index)
    reference.backward(grad.double())
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(values.grad.double(), values64.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m,out_features", [(4, 40), (8, 16), (16, 33), (32, 64)])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("option", OPTIONS)
@needs_native
def test_sliced_nm_forward_of_frozen_values_matches_dense_reference(m, out_features, tokens, option):
    """The register-permute N:M kernel, offered for a few tokens on frozen values, for group
    sizes that fill one or two vectors and row counts that leave a partial slice."""
    weight, x, bias, in_index, out_index = _case(NM(m), out_features, 4 * m, tokens, option)
    select.clear()
    with select.set_autotune(True):
        y = weight.structure.op(x, weight.values, weight.index, out_features, bias, in_index, out_index)
    assert "native-sliced" in select.choices()[0]["ms"]
    with select.only("native-sliced"):
        sliced = weight.structure.op(x, weight.values, weight.index, out_features, bias, in_index, out_index)
    reference = dense_reference(NM(m), x.double(), weight.values.double(), weight.index, out_features,
                                None if bias is None else bias.double(), in_index, out_index)
    torch.testing.assert_close(sliced.double(), reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("out_features,in_features", [(64, 32), (32, 64), (384, 128), (100, 300)])
@pytest.mark.parametrize("tokens", [1, 13])
@pytest.mark.parametrize("option", OPTIONS)
@needs_native
def test_streamed_diagonal_forward_matches_dense_reference(out_features, in_features, tokens, option):
    """The diagonal kernel that streams the values in their own layout, offered up to 16
    tokens next to the row-sparse one, with full vector steps and tails."""
    weight, x, bias, in_index, out_index = _case(Diagonal(), out_features, in_features, tokens, option)
    select.clear()
    with select.set_autotune(True):
        weight.structure.op(x, weight.values, weight.index, out_features, bias, in_index, out_index)
    assert {"native-streamed", "native"} <= set(select.choices()[0]["ms"])
    with select.only("native-streamed"):
        y = weight.structure.op(x, weight.values, weight.index, out_features, bias, in_index, out_index)
    reference = dense_reference(Diagonal(), x.double(), weight.values.double(), weight.index, out_features,
                                None if bias is None else bias.double(), in_index, out_index)
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-4)


def test_autotune_measures_once_per_regime_and_records_the_choice():
    weight, x, *_ = _case(NM(4), 64, 32, 40, "plain")
    select.clear()
    with select.set_autotune(True):
        reference = weight.linear(x)
        torch.testing.assert_close(weight.linear(x[:33]), reference[:33])  # 33 and 40 share bucket 64
    records = [r for r in select.choices() if r["op"] == "ell_forward"]
    assert len(records) == 1
    assert records[0]["chosen"] in records[0]["ms"] and set(records[0]["ms"]) >= {"torch", "dense"}
    assert select.token_bucket(33) == select.token_bucket(64) == 64 and select.token_bucket(1) == 1


def test_the_first_call_times_its_candidates_in_interleaved_rounds_and_runs_the_winner():
    """a b a b ...: a slow phase of the machine while one candidate is timed must not decide
    the choice for the whole run (sequential timing put every repeat of one candidate in it)."""
    calls = []

    def candidate(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)
            return torch.tensor(seconds)
        return run

    select.clear()
    with select.set_autotune(True):
        result = select.run("test_op", ("regime",), {"slow": candidate("slow", 0.004), "fast": candidate("fast", 0)})
    assert calls == ["slow", "fast"] * 4 + ["fast"] and float(result) == 0
    (record,) = [r for r in select.choices() if r["op"] == "test_op"]
    assert record["chosen"] == "fast" and record["ms"]["slow"] >= 4


@needs_native
def test_eager_calls_that_replay_are_chosen_for_apart_and_by_their_kernel_call_alone():
    """A no-grad eager call replays its native kernel call, so its choice times that replay;
    a call that records gradients runs the whole implementation and is chosen for apart."""
    weight, x, *_ = _case(Block(16, 16), 64, 64, 16, "plain")
    select.clear()
    with select.set_autotune(True), torch.no_grad():
        weight.linear(x)
    weight.linear(x.clone().requires_grad_())
    records = {r["replayed"]: r for r in select.choices() if r["op"] == "block_forward"}
    assert set(records) == {True, False} and records[True]["regime"] == records[False]["regime"]

    prepared = []

    def native_candidate():
        prepared.append(1)  # the Python a replay skips
        with select.only("native"):
            return implementations.block_forward(x, weight.values, weight.index, 64, None, None, None)

    def torch_candidate():
        return x * 2

    repeat = select._as_repeated(native_candidate)
    for _ in range(3):
        repeat()
    assert len(prepared) == 1 and select._as_repeated(torch_candidate) is torch_candidate


def test_ranks_of_a_distributed_run_take_the_preferred_implementation_without_measuring(monkeypatch):
    """Measured choices can differ between processes; ranks must compute alike."""
    monkeypatch.setattr(select, "_distributed", lambda: True)
    select.clear()
    weight, x, *_ = _case(NM(4), 64, 32, 40, "plain")
    with select.set_autotune(True):
        weight.linear(x)
    (record,) = [r for r in select.choices() if r["op"] == "ell_forward"]
    assert record["ms"] == {} and record["chosen"] == ("native" if native.library() is not None else "torch")


def test_without_autotune_the_preferred_implementation_runs():
    select.clear()
    weight, x, *_ = _case(Block(8, 8), 64, 48, 5, "plain")
    with select.set_autotune(False):
        weight.linear(x)
    assert select.choices() == []


@needs_native
def test_a_fresh_cache_directory_builds_the_library(tmp_path):
    code = ("from padst_compiler.kernels.cpu import native; import sys; "
            "sys.exit(0 if native.library() is not None else 1)")
    env = {**os.environ, "PADST_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    built = list(tmp_path.glob("native-*/padst_native.so"))
    assert len(built) == 1


def _has_avx512() -> bool:
    try:
        return "avx512f" in open("/proc/cpuinfo").read().split()
    except OSError:
        return False


@needs_native
@pytest.mark.skipif(not _has_avx512(), reason="this machine runs the AVX2 kernels natively, in the tests above")
def test_the_avx2_kernels_match_the_dense_reference_on_an_avx512_machine(tmp_path):
    """The kernels are written once for both vector widths but built for this machine's:
    here the AVX2 build (narrower tiles, scalar packing) runs the reference cases too."""
    env = {**os.environ, "PADST_CACHE_DIR": str(tmp_path), "PADST_NATIVE_FLAGS": "-mno-avx512f"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                          "-k", "native and (matches_dense_reference or packing_rows)", __file__],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
    bits = subprocess.run([sys.executable, "-c", "from padst_compiler.kernels.cpu import native; "
                           "print(native.library().padst_vector_bits())"], env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    assert bits.stdout.split() == ["256"] and native.library().padst_vector_bits() == 512


def test_missing_compiler_falls_back_with_one_warning(tmp_path):
    code = ("import warnings, torch\n"
            "from padst_compiler.kernels import NM\nfrom padst_compiler.kernels.cpu import native\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    w = NM(4).project(torch.randn(8, 8), 0.5)\n"
            "    y = w.linear(torch.randn(3, 8)); w.linear(torch.randn(3, 8))\n"
            "assert native.library() is None\n"
            "messages = [str(c.message) for c in caught if 'native CPU kernels' in str(c.message)]\n"
            "assert len(messages) == 1 and 'no C++ compiler' in messages[0], messages\n")
    env = {**os.environ, "PADST_CACHE_DIR": str(tmp_path), "CXX": "no-such-compiler-padst"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_switched_off_says_nothing(tmp_path):
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from padst_compiler.kernels.cpu import native\n"
            "assert native.library() is None\n")
    env = {**os.environ, "PADST_NATIVE": "0"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


def test_diagonal_expand_stays_differentiable_after_a_no_grad_call():
    weight = Diagonal().project(torch.randn(32, 64), 0.5)
    values = weight.values.clone().requires_grad_()
    with torch.no_grad():
        Diagonal().expand(values, weight.index, 32, 64)
    dense = Diagonal().expand(values, weight.index, 32, 64)
    dense.sum().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0


@needs_native
def test_frozen_values_are_packed_once_and_repacked_after_a_change():
    weight = Block(8, 8).project(torch.randn(32, 48), 0.5)
    x = torch.randn(5, 48)
    with select.only("native"):
        before = weight.linear(x)
        with torch.no_grad():
            weight.values.mul_(2)  # in place: the packed copy must not be reused
        torch.testing.assert_close(weight.linear(x), 2 * before)


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    start = end = None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
        elif head == "VmFlags:" and start <= address < end:
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_native
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads the mappings from /proc (Linux)")
@pytest.mark.parametrize("out_index", [False, True])
def test_a_large_result_is_backed_by_huge_pages_and_still_right(out_index):
    structure, tokens, in_features = Block(32, 32), 2048, 64
    out_features = native.HUGE_PAGE_RESULT_BYTES // (4 * tokens)  # exactly the threshold
    weight, x, _, _, index = _case(structure, out_features, in_features, tokens,
                                   "out_index" if out_index else "plain")
    with torch.no_grad(), select.only("native"):
        y = structure.op(x, weight.values, weight.index, out_features, None, None, index)
        small = native.output_buffer(x[:1], out_features)
    assert "hg" in _vm_flags(y.data_ptr() + y.nbytes // 2)  # madvise(MADV_HUGEPAGE) marks the mapping
    assert "hg" not in _vm_flags(small.data_ptr())
    torch.testing.assert_close(y, dense_reference(structure, x, weight.values, weight.index, out_features, None,
                                                  None, index), rtol=1e-5, atol=1e-4)
