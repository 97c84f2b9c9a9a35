"""The ``padst`` command line.

A user error (an option the machine cannot take, a file it cannot read, an output it must
not overwrite, see ``outputs``) is one line on stderr, ``padst COMMAND: error: ...``, and
exit status 2, as argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from padst_compiler import outputs

JSON_OUT_HELP = "also write the results as JSON to FILE (refused if FILE exists and is not a result of this benchmark)"


# `padst bench model` sizes: the options a preset sets (any option given explicitly wins)
MODEL_DEFAULTS = {"layers": 2, "d_model": 768, "heads": 12, "tokens": 4096, "sequence": 512}
MODEL_PRESETS = {
    "gpt2-small": {"layers": 12, "d_model": 768, "heads": 12},
    "d1024-24": {"layers": 24, "d_model": 1024, "heads": 16},
}


def _resolve_model_size(args) -> None:
    for option, value in {**MODEL_DEFAULTS, **MODEL_PRESETS.get(args.preset, {})}.items():
        if getattr(args, option) is None:
            setattr(args, option, value)


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _structure(text: str):
    from padst_compiler.demo import parse_structure  # torch loads only when a demo option is parsed

    try:
        return parse_structure(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="padst", description="PA-DST: structured sparse training "
                                     "with learned permutations, compiled.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="run the main job on the embedded default data",
                               description="1) Accuracy: train an MLP on scikit-learn's 8x8 digits (its first "
                                           "sparse layer reads raw pixels) dense, with unstructured RigL, with the "
                                           "structure and no permutation, and with learned permutations, several "
                                           "seeds each, and report the share of the structure's gap the "
                                           "permutation closes (a cell of `padst bench accuracy`). 2) Train a "
                                           "small PA-DST GPT on the Python standard library's source, compile it "
                                           "with the padst backend for training and inference, check both against "
                                           "eager and time them against the dense model compiled with Inductor. "
                                           "One table; results.json, an accuracy plot and the graph-diff report go "
                                           "to --out.")
    demo.add_argument("--structure", type=_structure, default="block8",
                      help="sparsity structure: blockN (N x N blocks), blockRxC, nmM (N:M with groups of M "
                           "inputs) or diagonal (default block8)")
    demo.add_argument("--sparsity", type=_sparsity, default=0.875,
                      help="fraction of weights removed; the structure must take it exactly on the 64-wide MLP "
                           "(default 0.875)")
    demo.add_argument("--seeds", type=_positive_int, default=3, help="seeds per method of the accuracy part (default 3)")
    demo.add_argument("--steps", type=_positive_int, default=300,
                      help="training steps of the PA-DST GPT (default 300)")
    demo.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train and run (default cpu)")
    demo.add_argument("--out", default="padst_demo_out", metavar="DIR",
                      help="directory for results.json, the plot and the graph-diff report (default padst_demo_out); "
                           "it must be new, empty or written by an earlier padst demo (it holds a .padst-output "
                           "file), whose results are then replaced")
    diff = commands.add_parser("diff", help="show what every padst pass did to each recorded graph",
                               description="padst diff DIR: per-pass summary, unified diffs and the first pass "
                                           "that changed the numbers, for a debug directory written with "
                                           "debug_dir=... or PADST_DEBUG_DIR. padst diff A.py B.py: diff two graphs.")
    diff.add_argument("paths", nargs="+", metavar="PATH", help="a debug directory, or two graph code files")
    diff.add_argument("--html", metavar="FILE", help="also write one self-contained HTML report (refused if FILE "
                      "exists and is not a padst graph-diff report)")
    diff.add_argument("--tolerance", type=float, default=1e-4, help="largest harmless output difference")
    diff.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    export = commands.add_parser("export", help="a saved Hugging Face causal LM as an AOTInductor package (.pt2)",
                                 description="padst export DIR FILE.pt2: build the Hugging Face model a "
                                             "padst_compiler.save folder holds (its config.json), load it, apply the "
                                             "padst inference passes and compile it with AOTInductor into one file "
                                             "that maps token ids [batch, sequence] to logits for any sequence length "
                                             "up to the model's. Run it with padst_compiler.load_package(FILE) (the "
                                             "process needs torch and padst_compiler).")
    export.add_argument("checkpoint", metavar="DIR", help="a folder written by padst_compiler.save")
    export.add_argument("out", metavar="FILE.pt2", help="the package to write (refused if it exists and is not one)")
    bench = commands.add_parser("bench", help="benchmarks (ratios and tables, not tests)")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    accuracy = benches.add_parser("accuracy", help="the gap map: where structure costs accuracy and what "
                                  "permutations recover", description="Train a grid of task (a small GPT on the "
                                  "standard library's source, an MLP on the 8x8 digits) x depth x structure x "
                                  "sparsity x permutation method, with dense, unstructured RigL and SET as "
                                  "references, several seeds per cell; print mean +- std per cell, the gap between "
                                  "no permutation and RigL and the share of it the learned permutation closes; "
                                  "write runs.jsonl (resumable), gapmap.json and gapmap.png to --out. The full "
                                  "map takes about 1.5 h on 2 cores, --quick about 6 min.")
    accuracy.add_argument("--quick", action="store_true", help="one depth, one sparsity, two structures per task")
    accuracy.add_argument("--tasks", nargs="+", choices=["digits", "gpt"], default=["digits", "gpt"])
    accuracy.add_argument("--workers", type=_positive_int, help="training processes (default: one per core)")
    accuracy.add_argument("--out", default="padst_gapmap", metavar="DIR",
                          help="directory for runs.jsonl, gapmap.json and gapmap.png (default padst_gapmap); "
                               "runs already there are not trained again. Refused if it holds other files or a "
                               "runs.jsonl that is not padst's; a last line cut short by a killed run is dropped")
    harden = benches.add_parser("harden", help="what a learned permutation costs: hardening time, warm-up step "
                                "and memory", description="Hardening time of a 768->3072 layer and of a "
                                "GPT-2-small-shaped stack of learned layers, per structure, and one forward+backward "
                                "and the weight+Adam bytes of a layer in its dense warm-up against the hard layer.")
    harden.add_argument("--structures", nargs="+", type=_structure, default=None,
                        help="structures to time (default block32 block64 nm32 diagonal)")
    harden.add_argument("--layers", type=_positive_int, default=12, help="transformer blocks in the stack (default 12)")
    harden.add_argument("--out", metavar="FILE", help=JSON_OUT_HELP)
    model = benches.add_parser("model", help="inference and training-step speed of a compiled GPT-2-sized stack",
                               description="PA-DST (padst backend) against the dense model compiled with Inductor "
                                           "and against PA-DST without permutations, CPU, medians of repeats.")
    model.add_argument("--preset", choices=sorted(MODEL_PRESETS),
                       help="a real model size: gpt2-small (12 layers, d 768) or d1024-24 (24 layers, d 1024), "
                            "4096 tokens in sequences of 512; the options below override it")
    model.add_argument("--layers", type=_positive_int, help="transformer blocks (default 2)")
    model.add_argument("--d-model", type=_positive_int, help="model width (default 768)")
    model.add_argument("--heads", type=_positive_int, help="attention heads (default 12)")
    model.add_argument("--tokens", type=_positive_int, help="tokens per batch, a multiple of --sequence (default 4096)")
    model.add_argument("--sequence", type=_positive_int,
                       help="tokens per sequence (1 with --tokens 1 times one decoding step; default 512)")
    model.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    model.add_argument("--repeats", type=_positive_int, default=5)
    model.add_argument("--keep-freed-memory", action="store_true",
                       help="first call padst_compiler.keep_freed_memory() (glibc keeps freed memory for reuse "
                            "instead of mapping large tensors afresh; both models run with it)")
    model.add_argument("--processes", type=_positive_int, default=1,
                       help="run the benchmark in this many fresh processes, one after another, and print the "
                            "mean and standard deviation of the ratios and the permutation tax over them (a tax of "
                            "a few percent is smaller than one process's run-to-run drift)")
    model.add_argument("--out", metavar="FILE", help=JSON_OUT_HELP)
    depth = benches.add_parser("depth", help="per-layer forward time from 50 to 500 layers (no slowdown with depth)",
                               description="A stack of N sparsified nn.Linear layers (Block 16x16 at 0.9, hardened "
                                           "random permutations), eager without autograd and compiled with optimize, "
                                           "beside the dense stack eagerly; per-layer medians and their spread "
                                           "across depths.")
    depth.add_argument("--layers", type=_positive_int, nargs="+", default=[50, 120, 200, 500])
    depth.add_argument("--widths", type=_positive_int, nargs="+", default=[256, 1024])
    depth.add_argument("--tokens", type=_positive_int, nargs="+", default=[16, 512])
    depth.add_argument("--eager-only", action="store_true", help="skip the compiled stacks (they take minutes)")
    depth.add_argument("--repeats", type=_positive_int, default=5)
    depth.add_argument("--out", metavar="FILE", help=JSON_OUT_HELP)
    package = benches.add_parser("export", help="the AOTInductor package of a PA-DST GPT against the dense one's",
                                 description="Export the dense GPT and the PA-DST GPT (Block 32x32 at 0.9, hardened "
                                             "permutations) to AOTInductor packages, load both and time them on the "
                                             "same token batches (1x16, 1x128, 8x512), interleaved medians. Takes a "
                                             "few minutes (two AOTInductor compiles).")
    package.add_argument("--layers", type=_positive_int, default=2, help="transformer blocks (default 2)")
    package.add_argument("--d-model", type=_positive_int, default=768, help="model width (default 768)")
    package.add_argument("--heads", type=_positive_int, default=12, help="attention heads (default 12)")
    package.add_argument("--repeats", type=_positive_int, default=7)
    package.add_argument("--out", metavar="FILE", help=JSON_OUT_HELP)
    peers = benches.add_parser("peers", help="padst against the CPU runtimes users would otherwise pick (DeepSparse)",
                               description="The 768 -> 3072 -> 768 GELU MLP at 0.9 sparsity at 1, 16 and 4096 tokens: "
                                           "PyTorch and Inductor dense, DeepSparse dense and 90 %% unstructured (in "
                                           "its own environment: make deepsparse-env), padst eager and optimize "
                                           "(Block 32x32), each as a speed-up over the fastest dense runtime; "
                                           "interleaved samples, medians. Without DeepSparse the other rows run "
                                           "and a line says how to add it.")
    peers.add_argument("--tokens", type=_positive_int, nargs="+", default=[1, 16, 4096])
    peers.add_argument("--repeats", type=_positive_int, default=7)
    peers.add_argument("--deepsparse-python", type=Path, metavar="PYTHON",
                       help="the Python of an environment with deepsparse (default $PADST_DEEPSPARSE_PYTHON or "
                            ".venv-deepsparse/bin/python)")
    peers.add_argument("--out", metavar="FILE", help=JSON_OUT_HELP)
    kernels = benches.add_parser("kernels", help="every structured op against the dense op",
                                 description="Forward, forward with a fused in_index, and forward+backward of "
                                             "each structure against F.linear, for 768->3072 and 3072->768 at "
                                             "1, 16 and 4096 tokens and sparsity 0.9 and 0.95; medians of "
                                             "interleaved repeats in one process.")
    kernels.add_argument("--tokens", type=_positive_int, nargs="+", default=[1, 16, 4096])
    kernels.add_argument("--sparsity", type=_sparsity, nargs="+", default=[0.9, 0.95])
    kernels.add_argument("--repeats", type=_positive_int, default=7)
    kernels.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    kernels.add_argument("--out", metavar="FILE", help=JSON_OUT_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench" and args.bench == "model":
        _resolve_model_size(args)
        if args.tokens % args.sequence:
            parser.error(f"--tokens {args.tokens} is not a multiple of --sequence {args.sequence}")
    if args.command == "bench" and args.bench in ("model", "export") and args.d_model % args.heads:
        parser.error(f"--d-model {args.d_model} is not a multiple of --heads {args.heads}")
    try:
        if args.command == "diff":
            return _diff(args)
        if args.command == "export":
            return _export(args)
        return _demo(args) if args.command == "demo" else _bench(args)
    except outputs.PathError as error:  # a file or folder the command cannot read or must not write
        return _error(args, error)


def _error(args, message) -> int:
    """Print the one line of a user error and return its exit status."""
    command = " ".join(["padst", args.command] + ([args.bench] if args.command == "bench" else []))
    line = str(message).replace("\n", " ")  # one line even for a file name that holds a newline
    print(f"{command}: error: {line}", file=sys.stderr)
    return 2


def _demo(args) -> int:
    from padst_compiler import demo

    try:
        summary = demo.run(structure=args.structure, sparsity=args.sparsity, steps=args.steps,
                           device=args.device, out=args.out, seeds=args.seeds)
    except ValueError as error:  # a structure the model or sparsity cannot take, a missing device, --out
        return _error(args, error)
    return 0 if summary["passed"] else 1


def _export(args) -> int:
    try:
        from padst_compiler.integrations.huggingface import export_causal_lm
    except ImportError as error:
        return _error(args, f"needs the transformers package ({error})")
    try:
        path = export_causal_lm(args.checkpoint, args.out)
    except ValueError as error:  # not a save folder, a model that does not fit it, a soft layer
        return _error(args, error)
    print(f"wrote {path}")
    return 0


def _bench(args) -> int:
    from padst_compiler import bench

    if args.bench == "accuracy":
        from padst_compiler import gapmap

        gapmap.gap_map(quick=args.quick, tasks=tuple(args.tasks), out=args.out, workers=args.workers)
    elif args.bench == "harden":
        chosen = {} if args.structures is None else {"structures": tuple(args.structures)}
        bench.hardening_speed(**chosen, layers=args.layers, out=args.out)
    elif args.bench == "model":
        import os

        import torch

        # PyTorch's profiler (the step-memory measure) prints two lines of its own to stderr on
        # every use unless its log level says otherwise; it reads the level once, at first use
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")

        if args.device == "cuda" and not torch.cuda.is_available():
            return _error(args, "--device cuda but no CUDA GPU is available")
        options = dict(layers=args.layers, tokens=args.tokens, sequence=args.sequence, repeats=args.repeats,
                       d_model=args.d_model, heads=args.heads, device=args.device,
                       keep_freed_memory=args.keep_freed_memory)
        try:
            if args.processes > 1:
                bench.model_speed_in_processes(args.processes, out=args.out, **options)
            else:
                bench.model_speed(out=args.out, **options)
        except (bench.SettingRefused, bench.ProcessFailed) as error:
            return _error(args, error)
    elif args.bench == "export":
        from padst_compiler import bench_export

        bench_export.package_speed(layers=args.layers, d_model=args.d_model, heads=args.heads,
                                   repeats=args.repeats, out=args.out)
    elif args.bench == "peers":
        from padst_compiler import bench_peers

        bench_peers.peer_speed(tokens=tuple(args.tokens), repeats=args.repeats,
                               deepsparse_python=args.deepsparse_python, out=args.out)
    elif args.bench == "depth":
        from padst_compiler import bench_depth

        bench_depth.depth_sweep(depths=tuple(args.layers), widths=tuple(args.widths), tokens=tuple(args.tokens),
                                compiled=not args.eager_only, repeats=args.repeats, out=args.out)
    else:
        return _bench_kernels(args)
    return 0


def _bench_kernels(args) -> int:
    import torch

    from padst_compiler import bench_kernels

    if args.device == "cuda" and not torch.cuda.is_available():
        return _error(args, "--device cuda but no CUDA GPU is available")
    bench_kernels.run(tokens=tuple(args.tokens), sparsities=tuple(args.sparsity), device=args.device,
                      repeats=args.repeats, out=args.out)
    return 0


def _diff(args) -> int:
    from padst_compiler import debug

    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    if len(args.paths) == 2 and not any(Path(path).is_dir() for path in args.paths):
        if args.html:
            return _error(args, "--html reports a debug directory, not two graph files")
        a, b = (outputs.read_text(path) for path in args.paths)
        print(debug.code_diff(a, b, color, tuple(args.paths)))
        return 0
    if len(args.paths) != 1:
        return _error(args, "give one debug directory or two graph files")
    if args.html:  # refused before the report is printed
        outputs.check_file(args.html, "a padst graph-diff report", debug.is_html_report)
    runs, choices = debug.load_runs(args.paths[0]), debug.kernel_choices_table(args.paths[0])
    print(debug.render_text(runs, color, args.tolerance))
    if choices:
        print(f"\n== kernel implementations picked at run time ==\n{choices}")
    if args.html:
        outputs.write_text(args.html, debug.render_html(runs, args.tolerance))
        print(f"\nHTML report written to {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
