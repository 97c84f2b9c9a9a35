"""The padst command line: the end-to-end demo, its options, the benchmark options."""

import json
import os
import subprocess
import sys

import pytest
import torch

from padst_compiler import bench, bench_depth, bench_kernels, cli, debug, demo, outputs
from padst_compiler.kernels import NM, Block, Diagonal
from padst_compiler.models import GPTConfig

TINY_GPT = GPTConfig(block_size=32, n_layer=1, n_head=2, d_model=64)


@pytest.mark.slow
def test_tiny_demo_prints_the_table_and_writes_the_report(tmp_path, capsys):
    summary = demo.run(structure=Block(8, 8), sparsity=0.875, steps=4, device="cpu", out=tmp_path,
                       model=TINY_GPT, batch_size=4, seeds=2)
    out = capsys.readouterr().out
    assert summary["passed"], out
    for row in ("digits test error % (2 seeds): dense", "unstructured RigL", "Block(8x8) 0.875, no permutation",
                "Block(8x8) 0.875, learned permutation", "share of the structure's gap to RigL closed",
                "GPT PA-DST Block(8x8) 0.875: validation loss", "learned permutations hardened 4 of 4 layers",
                "compiled training (padst) matches eager, 3 steps yes", "optimize() inference matches eager",
                "inference ms: PA-DST (padst) / dense (Inductor)", "permutations, inference graph",
                str(tmp_path / "graph_diff.html")):
        assert row in " ".join(out.split()), row
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(len(runs) == 2 for runs in results["accuracy"]["runs"].values())
    assert set(results["accuracy"]["gap_closed"]) == {"gap", "real", "share", "learned_minus_none"}
    assert len(results["gpt"]["curve"]) == 5  # step 0 and every step of 4
    assert results["gathers"]["inference"]["before"] == 4  # one hardened permutation per layer
    assert results["gathers"]["inference"]["after"] <= results["gathers"]["inference"]["before"]
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "padst graph diff" in (tmp_path / "graph_diff.html").read_text()
    assert [p.name for p in debug.load_runs(tmp_path / "padst_debug")[0].passes][0] == "canonicalize"


def test_a_compiled_result_off_by_more_than_the_tolerance_does_not_match():
    eager = torch.ones(3)
    assert demo.compare_to_eager([(eager + 1e-6, eager)]).matches
    mismatch = demo.compare_to_eager([(eager + 1e-6, eager), (eager + 0.01, eager)])
    assert not mismatch.matches and mismatch.max_abs_diff == pytest.approx(0.01)
    assert mismatch.describe().startswith("NO (max |diff| 1.0e-02)")


def test_the_demo_exits_non_zero_when_a_check_fails(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "run", lambda **options: {"passed": False})
    assert cli.main(["demo", "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize("text,structure", [("block8", Block(8, 8)), ("Block16", Block(16, 16)),
                                            ("block8x16", Block(8, 16)), ("nm32", NM(32)),
                                            ("diagonal", Diagonal())])
def test_structure_names(text, structure):
    assert demo.parse_structure(text) == structure


@pytest.mark.parametrize("argv,message", [
    (["demo", "--sparsity", "1.5"], "must be in [0, 1), got 1.5"),
    (["demo", "--steps", "0"], "must be at least 1"),
    (["demo", "--steps", "many"], "not an integer: 'many'"),
    (["demo", "--structure", "block"], "unknown structure 'block': use blockN"),
    (["demo", "--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_bad_options_give_a_one_line_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["demo", "--structure", "block64"], "layer 'blocks.0.attn.qkv' of shape 384x128 (out x in) cannot take "
                                         "Block(64x64): sparsity 0.875 keeps no block of the 2 in a block-row"),
    (["demo", "--structure", "block32"], "layer 'hidden.0' of shape 64x64 (out x in) cannot take Block(32x32): "
                                         "sparsity 0.875 keeps no block of the 2 in a block-row"),
    (["demo", "--structure", "nm32", "--sparsity", "0.9"], "layer 'hidden.0' of the digits MLP keeps 0.0938 of "
                                                           "its weights with NM(m=32), not 1 - 0.9"),
    (["demo", "--structure", "nm3"], "m = 3 does not divide in_features 128"),
    (["demo", "--out", __file__], "exists and is not a directory"),
    pytest.param(["demo", "--device", "cuda"], "no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")),
])
def test_what_the_model_or_machine_cannot_take_is_refused_before_training(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(argv if "--out" in argv else [*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("padst demo: error: ") and len(captured.err.strip().splitlines()) == 1
    assert message in captured.err
    assert captured.out == "" and not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["bench", "accuracy", "--workers", "0"], "must be at least 1"),
    (["bench", "model", "--layers", "x"], "not an integer: 'x'"),
    (["bench", "model", "--tokens", "100"], "--tokens 100 is not a multiple of --sequence 512"),
    (["bench", "speed"], "invalid choice: 'speed'"),
    (["bench", "depth", "--widths", "0"], "must be at least 1"),
    (["bench", "model", "--preset", "gpt2-small", "--heads", "5"], "--d-model 768 is not a multiple of --heads 5"),
    (["bench", "export", "--heads", "5"], "--d-model 768 is not a multiple of --heads 5"),
])
def test_bench_options_are_checked_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_kernel_benchmark_prints_ratios_and_writes_json(tmp_path, capsys):
    import json

    out = tmp_path / "kernels.json"
    assert cli.main(["bench", "kernels", "--tokens", "1", "--sparsity", "0.9", "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fwd vs dense" in printed and "Block(32x32)" in printed and "Diagonal()" in printed
    assert "out_index" in printed and "fwd+bwd in_index" in printed and "range checks" in printed
    rows = json.loads(out.read_text())
    assert len(rows) == 8 and all(r["forward_speedup"] > 0 and r["train_speedup"] > 0 for r in rows)
    assert all(0 < r["range_check_share"] < 1 and min(r["in_index_cost"], r["out_index_cost"],
                                                        r["train_in_index_cost"], r["train_out_index_cost"]) > -1
               for r in rows)
    outputs.check_file(out, "a result", outputs.json_with_keys(bench_kernels.RESULT_KEYS))  # a rerun may replace it


def test_depth_benchmark_prints_per_layer_times_and_their_spread(tmp_path, capsys):
    import json

    out = tmp_path / "depth.json"
    argv = ["bench", "depth", "--layers", "2", "3", "--widths", "160", "--tokens", "4", "--repeats", "1",
            "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "padst optimize us/layer" in printed and "slowest / fastest per-layer time across depths" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["depth"], r["tokens"]) for r in rows] == [(2, 4), (3, 4)]
    assert all(r["padst eager us/layer"] > 0 and r["padst optimize us/layer"] > 0 and r["compile_s"] > 0 for r in rows)
    outputs.check_file(out, "a result", outputs.json_with_keys(bench_depth.RESULT_KEYS))  # a rerun may replace it


@pytest.mark.slow
def test_model_benchmark_reports_speed_and_the_tensor_memory_of_a_training_step(tmp_path):
    """In a process of its own: keeping freed memory is a process-wide setting."""
    out = tmp_path / "model.json"
    command = "import sys; from padst_compiler.cli import main; sys.exit(main(sys.argv[1:]))"
    printed = subprocess.run([sys.executable, "-c", command, "bench", "model", *BENCH_JSON["model"],
                              "--keep-freed-memory", "--out", str(out)], capture_output=True, text=True, check=True)
    assert "train peak MiB" in printed.stdout and "freed memory kept" in printed.stdout
    assert "profiler_start" not in printed.stderr  # PyTorch's profiler kept quiet
    result = json.loads(out.read_text())
    assert set(result) == set(bench.MODEL_RESULT_KEYS) and bench.is_model_result(out.read_text())  # a rerun replaces it
    assert result["freed_memory_kept"] is True
    assert set(result["permutation_tax"]) == {"inference", "train_step"}
    rows = {r["model"]: r for r in result["rows"]}
    assert all(r["inference_ms"] > 0 and r["train_step_ms"] > 0 and r["compile_s"] > 0 for r in rows.values())
    for r in rows.values():  # the step's gradients alone are as large as the linear weights
        assert r["train_peak_mib"] == pytest.approx(r["parameter_mib"] + r["step_peak_mib"])
        assert r["step_peak_mib"] > 0.5 * r["parameter_mib"]
    dense, sparse = rows["dense (Inductor)"], rows["PA-DST (padst)"]
    assert sparse["parameter_mib"] < dense["parameter_mib"] / 5 and sparse["train_peak_mib"] < dense["train_peak_mib"]


@pytest.mark.slow
def test_model_benchmark_in_fresh_processes_prints_and_writes_the_spread_over_them(tmp_path):
    out = tmp_path / "model.json"
    command = "import sys; from padst_compiler.cli import main; sys.exit(main(sys.argv[1:]))"
    printed = subprocess.run([sys.executable, "-c", command, "bench", "model", *BENCH_JSON["model"],
                              "--processes", "2", "--out", str(out)], capture_output=True, text=True, check=True)
    assert printed.stdout.count("train peak MiB") == 2 and "PA-DST over 2 processes" in printed.stdout
    result = json.loads(out.read_text())
    assert [row["process"] for row in result["rows"]] == [1, 1, 1, 2, 2, 2] and len(result["permutation_tax"]) == 2
    spread = result["summary"]["train step vs dense"]
    assert spread["values"] == [row["train_speedup"] for row in result["rows"] if row["model"] == "PA-DST (padst)"]
    assert set(result) == set(bench.MODEL_SPREAD_KEYS)
    outputs.check_file(out, "a result", bench.is_model_result)  # a rerun may replace it


def test_the_spread_over_processes_is_the_mean_and_sample_deviation_of_each_process_value():
    def result(inference, train, tax):
        rows = [{"model": "dense (Inductor)", "inference_speedup": 1.0, "train_speedup": 1.0},
                {"model": "PA-DST (padst)", "inference_speedup": inference, "train_speedup": train}]
        return {"rows": rows, "permutation_tax": {"inference": tax, "train_step": -tax}}

    spread = bench.process_spread([result(3.0, 2.0, 0.01), result(2.0, 3.0, 0.03)])
    assert spread["inference vs dense"] == {"mean": 2.5, "sd": pytest.approx(0.5 ** 0.5), "values": [3.0, 2.0]}
    assert spread["permutation tax: train step"]["mean"] == pytest.approx(-2.0)
    assert spread["permutation tax: inference"]["values"] == pytest.approx([1.0, 3.0])


def test_a_failed_benchmark_process_is_one_line(monkeypatch, tmp_path, capsys):
    out = tmp_path / "model.json"
    monkeypatch.setattr(sys, "executable", "false")  # a child that exits 1 at once
    line = refused(["bench", "model", *BENCH_JSON["model"], "--processes", "2", "--out", str(out)],
                   "padst bench model", capsys)
    assert "process 1 of 2 failed (exit code 1); nothing was written" in line and not out.exists()


@pytest.mark.slow
def test_export_benchmark_times_both_packages(tmp_path, capsys):
    out = tmp_path / "export.json"
    assert cli.main(["bench", "export", *BENCH_JSON["export"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dense package ms" in printed and "export + compile" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["sequence"]) for r in rows] == [(1, 16), (1, 128), (8, 512)]
    assert all(r["dense_ms"] > 0 and r["padst_ms"] > 0 and r["speedup"] > 0 for r in rows)


# ------------------------------------------------- user errors: one line, exit 2, nothing touched


def files_under(root):
    """Bytes and modification time of every file under ``root``: what a refused command must leave."""
    return {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(root.rglob("*")) if path.is_file()}


def refused(argv, command, capsys) -> str:
    """Run the command line, expecting one error line on stderr and exit status 2; returns the line."""
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), lines
    return lines[0]


@pytest.fixture
def no_demo_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the demo started training")

    monkeypatch.setattr(demo.demo_accuracy, "compare", fail)


def _foreign_folder(out):
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "padst_debug").mkdir()
    (out / "padst_debug" / "keep.py").write_text("mine too")


def _foreign_results(out):
    out.mkdir()
    (out / "results.json").write_text('{"mine": true}')


def _another_commands_folder(out):
    out.mkdir()
    (out / outputs.MARKER).write_text("padst bench accuracy\n")
    (out / "gapmap.json").write_text("{}")


@pytest.mark.parametrize("make,message", [
    (_foreign_folder, "holds notes.txt, which padst demo does not write"),
    (_foreign_results, "is not empty and was not written by padst demo"),
    (_another_commands_folder, "was written by 'padst bench accuracy', not by padst demo"),
])
def test_demo_refuses_an_output_folder_it_did_not_write_and_leaves_it_alone(make, message, tmp_path, capsys,
                                                                            no_demo_training):
    out = tmp_path / "out"
    make(out)
    before = files_under(out)
    assert message in refused(["demo", "--out", str(out)], "padst demo", capsys)
    assert files_under(out) == before


def test_demo_replaces_what_an_earlier_demo_wrote(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / outputs.MARKER).write_text("padst demo\n")
    (out / "padst_debug" / "run-001").mkdir(parents=True)
    (out / "results.json").write_text("{}")

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # past the output checks: stop before training

    monkeypatch.setattr(demo.demo_accuracy, "compare", stop)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["demo", "--out", str(out)])
    assert not (out / "padst_debug").exists() and (out / "results.json").exists()  # replaced at the end
    assert capsys.readouterr().err == ""


BENCH_JSON = {  # tiny settings: a check that does not refuse must not cost minutes
    "harden": ["--structures", "block64", "--layers", "1"],
    "model": ["--layers", "1", "--tokens", "1", "--sequence", "1", "--repeats", "1"],
    "depth": ["--layers", "2", "--widths", "160", "--tokens", "4", "--repeats", "1", "--eager-only"],
    "kernels": ["--tokens", "1", "--sparsity", "0.9", "--repeats", "1"],
    "export": ["--layers", "1", "--d-model", "320", "--heads", "4", "--repeats", "1"],
    "peers": ["--tokens", "1", "--repeats", "1"],
}


ANOTHER_BENCHMARKS_RESULT = {
    "harden": b'{"tokens": 1, "sequence": 1, "layers": 1, "sparsity": 0.9, "rows": []}',  # bench model's
    "model": b'{"structure": "Block(16x16)", "sparsity": 0.9, "rows": []}',  # bench depth's
    "depth": b'{"layers": 12, "tokens": 4096, "rows": []}',  # bench harden's
    "kernels": b'{"layers": 12, "tokens": 4096, "rows": []}',
    "export": b'{"layers": 12, "tokens": 4096, "rows": []}',
    "peers": b'{"layers": 12, "tokens": 4096, "rows": []}',
}


@pytest.mark.parametrize("name", list(BENCH_JSON))
@pytest.mark.parametrize("content", [b'{"mine": [1, 2]}', None, b'{"tokens": 4096, "sequ', b"\x89PNG\r\n\x1a\n\xff"],
                         ids=["foreign JSON", "another benchmark's result", "truncated", "binary"])
def test_bench_json_out_refuses_a_file_it_did_not_write(name, content, tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_bytes(content or ANOTHER_BENCHMARKS_RESULT[name])
    before = files_under(tmp_path)
    line = refused(["bench", name, *BENCH_JSON[name], "--out", str(out)], f"padst bench {name}", capsys)
    assert f"exists and is not a padst bench {name} result" in line
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("name", list(BENCH_JSON))
def test_bench_json_out_refuses_a_folder_or_a_missing_folder(name, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    argv = ["bench", name, *BENCH_JSON[name], "--out"]
    assert "is a directory" in refused([*argv, str(tmp_path / "folder")], f"padst bench {name}", capsys)
    assert "there is no folder" in refused([*argv, str(tmp_path / "missing" / "a.json")], f"padst bench {name}",
                                           capsys)
    assert not (tmp_path / "missing").exists() and list((tmp_path / "folder").iterdir()) == []


def test_harden_benchmark_overwrites_its_own_earlier_result(tmp_path, monkeypatch, capsys):
    from padst_compiler import bench, training

    monkeypatch.setattr(training, "harden_permutations", lambda model: None)  # the file is the point, not timing
    monkeypatch.setattr(training.PADSTLinear, "harden", lambda layer: None)
    monkeypatch.setattr(bench, "interleaved_medians", lambda fns, repeats: {name: 1e-3 for name in fns})
    out = tmp_path / "harden.json"
    for _ in range(2):
        assert cli.main(["bench", "harden", *BENCH_JSON["harden"], "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["structure"] == "Block(64x64)"
    assert [p.name for p in tmp_path.iterdir()] == ["harden.json"]  # no temporary file left
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
def test_kernel_benchmark_on_a_missing_gpu_is_one_line(capsys):
    assert "no CUDA GPU is available" in refused(["bench", "kernels", "--device", "cuda"], "padst bench kernels",
                                                 capsys)


def test_model_benchmark_refuses_to_keep_freed_memory_without_glibc_and_writes_nothing(tmp_path, monkeypatch,
                                                                                          capsys):
    from padst_compiler import allocator, bench

    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(bench, "speed_samples", lambda *args: pytest.fail("the benchmark started"))
    out = tmp_path / "model.json"
    line = refused(["bench", "model", *BENCH_JSON["model"], "--keep-freed-memory", "--out", str(out)],
                   "padst bench model", capsys)
    assert "--keep-freed-memory is a glibc setting" in line and not out.exists()
    assert not allocator.freed_memory_kept() or "mmap_max=0" in os.environ.get("GLIBC_TUNABLES", "")


def test_model_benchmark_presets_set_the_size_and_explicit_options_win():
    args = cli.build_parser().parse_args(["bench", "model", "--preset", "d1024-24", "--layers", "3"])
    cli._resolve_model_size(args)
    assert (args.layers, args.d_model, args.heads, args.tokens, args.sequence) == (3, 1024, 16, 4096, 512)
    args = cli.build_parser().parse_args(["bench", "model"])
    cli._resolve_model_size(args)
    assert (args.layers, args.d_model, args.heads) == (2, 768, 12)
