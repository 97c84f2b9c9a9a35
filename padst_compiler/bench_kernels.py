"""``padst bench kernels``: every structured op against the dense op, one process.

For each structure, layer shape, token count and sparsity it times, interleaved and as
medians of repeats: the structured forward, the same forward with a fused ``in_index`` and
with a fused ``out_index``, and forward+backward (gradients of input, kept values and bias; also
with either permutation), each against
``F.linear`` with a dense weight of the same shape, and the share of a forward+backward
with a fused ``in_index`` spent in the index range checks that no flag turns off. The forward is timed as inference
runs it, on frozen values (as ``optimize`` leaves them, so value repackings are kept
between calls); forward+backward on trainable values, as a training step runs it. The implementation each op ran (as
picked by measurement, see ``kernels/eager/select.py``) is printed alongside, and the results can
be written as JSON.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from tabulate import tabulate

from padst_compiler import outputs
from padst_compiler.kernels import NM, Block, Diagonal, Structure, set_checks
from padst_compiler.kernels.eager import select
from padst_compiler.kernels.ops import checks
from padst_compiler.timing import interleaved_medians, machine

STRUCTURES: tuple[Structure, ...] = (Block(32, 32), Block(64, 64), NM(32), Diagonal())
SHAPES = ((768, 3072), (3072, 768))  # (in, out)
TOKENS = (1, 16, 4096)
SPARSITIES = (0.9, 0.95)


@dataclass(frozen=True)
class KernelResult:
    structure: str
    in_features: int
    out_features: int
    tokens: int
    sparsity: float
    kept_fraction: float
    forward_ms: float
    dense_forward_ms: float
    in_index_cost: float  # forward with a fused in_index over the same forward without, minus 1
    out_index_cost: float  # the same for a fused out_index
    train_ms: float
    dense_train_ms: float
    train_in_index_cost: float  # forward+backward with a fused in_index over the same without, minus 1
    train_out_index_cost: float  # the same for a fused out_index
    range_check_share: float  # of a forward+backward with a fused in_index, in the always-on range checks
    implementations: str

    @property
    def forward_speedup(self) -> float:
        return self.dense_forward_ms / self.forward_ms

    @property
    def train_speedup(self) -> float:
        return self.dense_train_ms / self.train_ms


_RATIOS = ("forward_speedup", "train_speedup")  # written to JSON beside the fields
RESULT_KEYS = (*(field.name for field in fields(KernelResult)), *_RATIOS)  # of each row of the JSON result (--out)


def measure(structure: Structure, in_features: int, out_features: int, tokens: int, sparsity: float,
            device: str = "cpu", repeats: int = 7, seed: int = 0) -> KernelResult:
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5
    weight = structure.project(dense, sparsity, layer=f"bench {out_features}x{in_features}")
    index = weight.index.to(device)
    dense = dense.to(device).requires_grad_()
    x = torch.randn(tokens, in_features, generator=gen).to(device).requires_grad_()
    bias = torch.randn(out_features, generator=gen).to(device).requires_grad_()
    grad = torch.randn(tokens, out_features, generator=gen).to(device)
    in_index = torch.randperm(in_features, generator=gen).to(device)
    out_index = torch.randperm(out_features, generator=gen).to(device)
    frozen = weight.values.to(device)
    values = frozen.clone().requires_grad_()

    def sparse(in_index=None, values=frozen, out_index=None):
        return structure.linear(x, values, index, out_features, bias, in_index, out_index)

    def sync(fn):
        def run():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    with set_checks(False):  # index value checks are a debugging aid, not part of the kernels' cost
        with torch.no_grad():
            forward = interleaved_medians({
                "sparse": sync(sparse), "dense": sync(lambda: F.linear(x, dense, bias)),
                "in_index": sync(lambda: sparse(in_index)), "out_index": sync(lambda: sparse(out_index=out_index))},
                repeats=repeats)
        train = interleaved_medians({
            "sparse": sync(lambda: sparse(values=values).backward(grad)),
            "in_index": sync(lambda: sparse(in_index, values).backward(grad)),
            "out_index": sync(lambda: sparse(values=values, out_index=out_index).backward(grad)),
            "dense": sync(lambda: F.linear(x, dense, bias).backward(grad))}, repeats=repeats)
    range_checks = _range_check_share(sync(lambda: sparse(in_index, values).backward(grad)), train["sparse"])
    # run() clears the choices before each case, so every record here is this case's
    chosen = sorted({f"{r['op'].split('_', 1)[1]}={r['chosen']}" for r in select.choices()})
    return KernelResult(str(structure), in_features, out_features, tokens, sparsity, weight.kept_fraction,
                        forward["sparse"] * 1e3, forward["dense"] * 1e3, forward["in_index"] / forward["sparse"] - 1,
                        forward["out_index"] / forward["sparse"] - 1,
                        train["sparse"] * 1e3, train["dense"] * 1e3, train["in_index"] / train["sparse"] - 1,
                        train["out_index"] / train["sparse"] - 1, range_checks, " ".join(chosen) or "-")


def _range_check_share(step, step_seconds: float, cover: float = 0.2) -> float:
    """Share of ``step``'s time spent inside ``checks.check_in_range``, which every op runs on
    each index it reads or writes through, whatever ``set_checks`` says (in steady state: the
    result is kept per index tensor and version, so a call pays a lookup). Timed over enough
    steps to cover ``cover`` seconds; the timer around each check makes this an upper bound."""
    original, spent = checks.check_in_range, []

    def timed(*args):
        start = time.perf_counter()
        try:
            original(*args)
        finally:
            spent.append(time.perf_counter() - start)

    checks.check_in_range = timed
    try:
        step()  # computes and files each check once, as a layer's first call does
        spent.clear()
        start, calls = time.perf_counter(), max(3, round(cover / step_seconds))
        for _ in range(calls):
            step()
        total = time.perf_counter() - start
    finally:
        checks.check_in_range = original
    return sum(spent) / total


def run(structures=STRUCTURES, shapes=SHAPES, tokens=TOKENS, sparsities=SPARSITIES, device: str = "cpu",
        repeats: int = 7, out: str | None = None, progress: bool = True) -> list[KernelResult]:
    if out:  # refused now, not after minutes of timing
        outputs.check_file(out, "a padst bench kernels result", outputs.json_with_keys(RESULT_KEYS))
    dense_name = "F.linear fp32" if device == "cpu" else "F.linear (cuBLAS)"
    where = machine() if device == "cpu" else torch.cuda.get_device_name()
    print(f"padst bench kernels: structured ops vs {dense_name} on {device} "
          f"({where}); medians of {repeats} interleaved runs\n", flush=True)
    results = []
    for in_features, out_features in shapes:
        for structure in structures:
            for sparsity in sparsities:
                for count in tokens:
                    select.clear()  # report the implementation picked for this very case
                    result = measure(structure, in_features, out_features, count, sparsity, device, repeats)
                    results.append(result)
                    if progress:
                        print(f"  {result.structure} {in_features}->{out_features} s={sparsity} "
                              f"tokens={count}: forward {result.forward_speedup:.2f}x", flush=True)
    print()
    print(table(results))
    if out:
        outputs.write_json(out, [{**asdict(r), **{ratio: getattr(r, ratio) for ratio in _RATIOS}} for r in results])
        print(f"\nresults written to {out}")
    return results


def table(results: list[KernelResult]) -> str:
    rows = [(r.structure, f"{r.in_features}->{r.out_features}", r.tokens, r.sparsity, f"{r.kept_fraction:.3f}",
             f"{r.forward_ms:.3f}", f"{r.forward_speedup:.2f}x", f"{r.in_index_cost * 100:+.0f}%",
             f"{r.out_index_cost * 100:+.0f}%",
             f"{r.train_ms:.3f}", f"{r.train_speedup:.2f}x", f"{r.train_in_index_cost * 100:+.0f}%",
             f"{r.train_out_index_cost * 100:+.0f}%", f"{r.range_check_share * 100:.2f}%", r.implementations)
            for r in results]
    return tabulate(rows, headers=["structure", "shape", "tokens", "sparsity", "kept", "fwd ms", "fwd vs dense",
                                   "in_index", "out_index", "fwd+bwd ms", "fwd+bwd vs dense", "fwd+bwd in_index",
                                   "fwd+bwd out_index", "range checks", "implementation"],
                    disable_numparse=True)
