"""Benchmarks (not tests): ``padst bench model`` (``padst bench accuracy`` is the gap map,
``padst_compiler.gapmap``; ``padst bench kernels`` is ``padst_compiler.bench_kernels``)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping

import torch
from tabulate import tabulate
from torch import nn

from padst_compiler import allocator, outputs
from padst_compiler.kernels import set_checks
from padst_compiler.kernels.structures import NM, Block, Diagonal, Structure
from padst_compiler.memory import tensor_peak_bytes
from padst_compiler.timing import interleaved_medians, interleaved_samples, machine, paired_ratio

# the keys of the JSON results (--out FILE), by which an earlier result is told from another file
MODEL_RESULT_KEYS = ("tokens", "sequence", "layers", "sparsity", "d_model", "device", "machine", "freed_memory_kept",
                     "rows", "permutation_tax")
MODEL_SPREAD_KEYS = (*MODEL_RESULT_KEYS, "summary")  # --processes N
HARDEN_RESULT_KEYS = ("layers", "tokens", "rows")


def is_model_result(text: str) -> bool:
    """Whether ``text`` is a ``padst bench model`` result, of one process or of several:
    either command may replace either."""
    return outputs.json_with_keys(MODEL_RESULT_KEYS)(text) or outputs.json_with_keys(MODEL_SPREAD_KEYS)(text)


class SettingRefused(ValueError):
    """A benchmark setting this machine cannot apply (refused before any work)."""


class ProcessFailed(RuntimeError):
    """One of the fresh processes of :func:`model_speed_in_processes` failed (it printed why)."""


def _cold_compile_caches():
    """Inductor's and AOTAutograd's on-disk caches off (they would hide the compile time)."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
    if hasattr(torch._functorch.config, "enable_autograd_cache"):  # private; present in torch 2.11 - 2.13
        stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
    return stack


def speed_samples(inference: Mapping[str, Callable[[], object]],
                  training: Mapping[str, tuple[nn.Module, Callable[[], torch.Tensor]]],
                  repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds of one inference call and of one training step (zero the gradients, forward
    to a scalar, backward) per candidate and round, each set interleaved (``timing``), with
    the index value checks off: they are a debugging aid, not part of the kernels' cost."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)

    def infer(fn):
        with torch.no_grad():
            fn()
        sync()

    def step(model, scalar):
        model.zero_grad(set_to_none=True)
        scalar().backward()
        sync()

    with set_checks(False):
        infer_times = interleaved_samples({name: (lambda f=fn: infer(f)) for name, fn in inference.items()},
                                          repeats=repeats)
        train_times = interleaved_samples({name: (lambda m=model, f=fn: step(m, f))
                                           for name, (model, fn) in training.items()}, repeats=repeats)
    return infer_times, train_times


def speed_medians(inference: Mapping[str, Callable[[], object]],
                  training: Mapping[str, tuple[nn.Module, Callable[[], torch.Tensor]]],
                  repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of :func:`speed_samples`."""
    return tuple({name: statistics.median(times) for name, times in samples.items()}
                 for samples in speed_samples(inference, training, repeats))


def model_speed(layers: int = 2, tokens: int = 4096, sequence: int = 512, sparsity: float = 0.9,
                repeats: int = 5, out: str | None = None, d_model: int = 768, heads: int = 12,
                device: str = "cpu", keep_freed_memory: bool = False) -> list[dict]:
    """A GPT stack (MLP 4x ``d_model``): inference and one training step of the compiled
    PA-DST model (Block 32x32, hardened permutations) against the dense model compiled with
    Inductor and against the same PA-DST model without permutations (the permutation tax);
    medians of interleaved repeats in one process (ratios: medians of per-round ratios,
    ``timing.paired_ratio``), the inference compile time with compile caches off (model
    construction excluded), parameter bytes and the peak tensor memory of a training step.
    ``keep_freed_memory``: first apply :func:`padst_compiler.allocator.keep_freed_memory`
    (process-wide; both models then run with it)."""
    import time

    from padst_compiler.api import optimize

    if out:  # refused now, not after minutes of timing
        outputs.check_file(out, "a padst bench model result", is_model_result)
    if keep_freed_memory and not allocator.keep_freed_memory():
        raise SettingRefused("--keep-freed-memory is a glibc setting, and this C library is not glibc")
    from padst_compiler.models import GPT, GPTConfig
    from padst_compiler.training import sparsify

    config = GPTConfig(block_size=sequence, n_layer=layers, n_head=heads, d_model=d_model)
    idx = torch.randint(0, 256, (tokens // sequence, sequence), generator=torch.Generator().manual_seed(0))
    idx = idx.to(device)

    def build(permutation):
        torch.manual_seed(0)
        model = GPT(config)
        if permutation is not None:  # "random" is hardened from the start: same cost as a learned one
            sparsify(model, Block(32, 32), sparsity, permutation=permutation, strict=True)
        return model.to(device)

    variants = {"dense (Inductor)": (None, "inductor"), "PA-DST (padst)": ("random", "padst"),
                "PA-DST no permutation (padst)": ("none", "padst")}
    inference, training, compile_seconds, memory = {}, {}, {}, {}
    for name, (permutation, backend) in variants.items():
        torch._dynamo.reset()
        model = build(permutation)
        start = time.perf_counter()
        with _cold_compile_caches():  # a fair compile time: no graph reused from disk
            if backend == "padst":
                inference[name] = optimize(model, [idx], mode="inference")
            else:
                inference[name] = torch.compile(model.eval(), backend="inductor")
                with torch.no_grad():
                    inference[name](idx)
        compile_seconds[name] = time.perf_counter() - start
        model = build(permutation)
        compiled = torch.compile(model, backend=backend)
        compiled(idx).float().mean().backward()
        memory[name] = _training_step_memory(model, lambda c=compiled: c(idx).float().mean(), device)
        training[name] = (model, compiled)

    infer_times, train_times = speed_samples(
        {name: (lambda n=name: inference[n](idx)) for name in variants},
        {name: (model, lambda c=compiled: c(idx).float().mean()) for name, (model, compiled) in training.items()},
        repeats)
    dense, permuted, unpermuted = variants
    rows = [{"model": name, "inference_ms": statistics.median(infer_times[name]) * 1e3,
             "train_step_ms": statistics.median(train_times[name]) * 1e3,
             "inference_speedup": paired_ratio(infer_times[dense], infer_times[name]),
             "train_speedup": paired_ratio(train_times[dense], train_times[name]), "compile_s": compile_seconds[name],
             **memory[name]}
            for name in variants]

    def ms(value):  # a one-token step takes about a millisecond
        return f"{value:.0f}" if value >= 100 else f"{value:.2f}"

    where = machine() if device == "cpu" else torch.cuda.get_device_name()
    kept = allocator.freed_memory_kept()
    print(f"GPT {layers} layers, d {d_model}, {tokens} tokens ({sequence} per sequence), {device}: {where}"
          + (", freed memory kept" if kept else ""))
    print(tabulate([(r["model"], ms(r["inference_ms"]), f"{r['inference_speedup']:.2f}x",
                     ms(r["train_step_ms"]), f"{r['train_speedup']:.2f}x", f"{r['compile_s']:.0f}",
                     f"{r['parameter_mib']:.0f}", f"{r['step_peak_mib']:.0f}", f"{r['train_peak_mib']:.0f}")
                    for r in rows],
                   headers=["model", "inference ms", "vs dense", "train step ms", "vs dense", "compile s (inference)",
                            "params MiB", "step adds MiB", "train peak MiB"],
                   disable_numparse=True))
    tax = {kind: paired_ratio(times[permuted], times[unpermuted]) - 1
           for kind, times in (("inference", infer_times), ("train_step", train_times))}
    print(f"permutation tax: inference {tax['inference'] * 100:+.1f} %, training step {tax['train_step'] * 100:+.1f} % "
          f"(ratios: medians of per-round ratios over {len(infer_times[dense])} and {len(train_times[dense])} rounds)")
    if out:
        outputs.write_json(out, {"tokens": tokens, "sequence": sequence, "layers": layers, "sparsity": sparsity,
                                 "d_model": d_model, "device": device, "machine": where,
                                 "freed_memory_kept": kept, "rows": rows,
                                 "permutation_tax": tax})
    return rows


def model_speed_in_processes(processes: int, out: str | None = None, **options) -> dict[str, dict]:
    """:func:`model_speed` (same ``options``) in ``processes`` fresh processes, one after
    another: one process's ratios drift by more than the permutation tax from run to run
    (where its memory landed, the machine's phase), so a tax of a few percent, or a ratio
    near a target, is a mean over processes. Prints each process's table, then the mean and
    standard deviation over processes of the PA-DST ratios and the permutation tax, and
    returns those; ``out`` gets every process's rows (with its number) and the summary."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    if processes < 2:
        raise ValueError(f"a spread over processes needs at least 2, got {processes}")
    if out:
        outputs.check_file(out, "a padst bench model result", is_model_result)
    argv = [flag for name, value in options.items() if value not in (None, False)
            for flag in ([f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)]))]
    results = []
    with tempfile.TemporaryDirectory(prefix="padst-bench-") as folder:
        for number in range(1, processes + 1):
            path = Path(folder) / f"{number}.json"
            print(f"process {number} of {processes}", flush=True)
            done = subprocess.run([sys.executable, "-m", "padst_compiler.cli", "bench", "model", *argv,
                                   "--out", str(path)])
            if done.returncode:
                raise ProcessFailed(f"process {number} of {processes} failed (exit code {done.returncode}); "
                                   "nothing was written")
            results.append(outputs.read_json(path))
    summary = process_spread(results)
    print(f"PA-DST over {processes} processes (mean ± standard deviation; each process's value):")

    def shown(name, value, sd=None):  # the tax in percent, the ratios as factors
        if "tax" in name:
            return f"{value:+.1f}" + ("" if sd is None else f" ± {sd:.1f} %")
        return f"{value:.2f}" + ("" if sd is None else f" ± {sd:.2f}x")

    print(tabulate([(name, shown(name, s["mean"], s["sd"]), ", ".join(shown(name, v) for v in s["values"]))
                    for name, s in summary.items()], headers=["", "mean ± sd", "per process"], disable_numparse=True))
    if out:
        first = results[0]
        sizes = {key: first[key] for key in MODEL_RESULT_KEYS if key not in ("rows", "permutation_tax")}
        outputs.write_json(out, {**sizes,
                                 "rows": [{**row, "process": number} for number, result in enumerate(results, 1)
                                          for row in result["rows"]],
                                 "permutation_tax": [result["permutation_tax"] for result in results],
                                 "summary": summary})
    return summary


def process_spread(results: list[dict]) -> dict[str, dict]:
    """The PA-DST ratios and the permutation tax (percent) of several :func:`model_speed`
    results: each one's value, their mean and sample standard deviation."""
    def permuted(result):
        return next(row for row in result["rows"] if row["model"] == "PA-DST (padst)")

    values = {"inference vs dense": [permuted(r)["inference_speedup"] for r in results],
              "train step vs dense": [permuted(r)["train_speedup"] for r in results],
              "permutation tax: inference": [100 * r["permutation_tax"]["inference"] for r in results],
              "permutation tax: train step": [100 * r["permutation_tax"]["train_step"] for r in results]}
    return {name: {"mean": statistics.mean(v), "sd": statistics.stdev(v), "values": v} for name, v in values.items()}


def _training_step_memory(model: nn.Module, scalar: Callable[[], torch.Tensor], device: str) -> dict[str, float]:
    """Parameter and buffer MiB, the peak tensor MiB one training step (forward and
    backward, gradients set to None before it) adds, and their sum: the model's memory at
    the peak of a step, optimizer state aside (see :mod:`padst_compiler.memory`)."""
    mib = 2 ** 20
    parameters = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / mib
    model.zero_grad(set_to_none=True)
    step = tensor_peak_bytes(lambda: scalar().backward(), device) / mib
    return {"parameter_mib": parameters, "step_peak_mib": step, "train_peak_mib": parameters + step}


def hardening_speed(structures: tuple[Structure, ...] = (Block(32, 32), Block(64, 64), NM(32), Diagonal()), layers: int = 12,
                    tokens: int = 4096, repeats: int = 5, out: str | None = None) -> dict:
    """What the learned permutation costs: hardening time of one 768 -> 3072 layer and of a
    GPT-2-small-shaped stack (``layers`` blocks of qkv 768->2304, proj 768->768, fc 768->3072,
    proj 3072->768) per structure, and the price of the dense warm-up against the hard layer:
    one forward+backward at ``tokens`` tokens (median of interleaved repeats) and the bytes of
    weights plus Adam moments."""
    import time

    from padst_compiler.training import PADSTLinear, harden_permutations, sparsify

    if out:  # refused now, not after minutes of timing
        outputs.check_file(out, "a padst bench harden result", outputs.json_with_keys(HARDEN_RESULT_KEYS))
    shapes = {"qkv": (768, 2304), "proj": (768, 768), "fc": (768, 3072), "fc_proj": (3072, 768)}
    rows = []
    for structure in structures:
        torch.manual_seed(0)
        layer = PADSTLinear(768, 3072, structure, 0.9, permutation="learned")
        start = time.perf_counter()
        layer.harden()
        one_layer = time.perf_counter() - start
        stack = nn.Sequential(*(nn.Linear(*shapes[kind]) for _ in range(layers) for kind in shapes))
        sparsify(stack, structure, 0.9, permutation="learned")
        start = time.perf_counter()
        harden_permutations(stack)
        whole_stack = time.perf_counter() - start

        warm, hard = (PADSTLinear(768, 3072, structure, 0.9, permutation=mode) for mode in ("learned", "random"))
        x = torch.randn(tokens, 768, requires_grad=True)
        with set_checks(False):
            times = interleaved_medians({"warm-up": lambda: warm(x).sum().backward(),
                                         "hard": lambda: hard(x).sum().backward()}, repeats=repeats)

        def trained_bytes(module):  # trainable tensors, each with two Adam moments
            return 3 * sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad) + \
                sum(b.numel() * b.element_size() for b in module.buffers() if b is not None)

        rows.append({"structure": str(structure), "harden_768x3072_s": one_layer, "harden_stack_s": whole_stack,
                     "warmup_step_ms": times["warm-up"] * 1e3, "hard_step_ms": times["hard"] * 1e3,
                     "warmup_mib": trained_bytes(warm) / 2 ** 20, "hard_mib": trained_bytes(hard) / 2 ** 20})
    print(tabulate([(r["structure"], f"{r['harden_768x3072_s']:.2f}", f"{r['harden_stack_s']:.1f}",
                     f"{r['warmup_step_ms']:.1f} / {r['hard_step_ms']:.1f}",
                     f"{r['warmup_mib']:.1f} / {r['hard_mib']:.1f}") for r in rows],
                   headers=["structure", "harden 768->3072 s", f"harden {layers}-layer stack s",
                            f"fwd+bwd {tokens} tok ms: warm-up / hard", "weights+Adam MiB: warm-up / hard"],
                   disable_numparse=True))
    if out:
        outputs.write_json(out, {"layers": layers, "tokens": tokens, "rows": rows})
    return {"rows": rows}
