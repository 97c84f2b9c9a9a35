"""The graph-diff tool: recording, summary, first bad pass, HTML, and the padst diff command."""

import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

import padst_compiler
from padst_compiler import cli, debug, pipeline
from padst_compiler.models import GPT, GPTConfig
from padst_compiler.passes.graph import OUT_INDEX, is_structured, set_structured_args, structured_args
from padst_compiler.training import Block, sparsify

PASSES = ["canonicalize", "propagate", "fuse", "fold", "cleanup"]


def small_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, d_model=32))
    return sparsify(model, Block(8, 8), 0.5, permutation="random", side="input")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    torch._dynamo.reset()
    directory = tmp_path_factory.mktemp("debug")
    padst_compiler.optimize(small_gpt(), [torch.randint(0, 256, (2, 16))], mode="inference", debug_dir=directory)
    return directory


@pytest.mark.slow
def test_a_gpt_run_records_every_pass_with_counts_and_differences(recorded):
    (run,) = debug.load_runs(recorded)
    assert [p.name for p in run.passes] == PASSES
    canonicalize, *_, cleanup = run.passes
    assert canonicalize.counts_before["permutes"] == 0 and canonicalize.counts_after["permutes"] == 4
    assert cleanup.counts_after["permutes"] == 0 and cleanup.counts_after["block_linear"] == 4
    assert all(p.max_abs_diff is not None and p.max_abs_diff < 1e-5 for p in run.passes)
    assert debug.first_bad_pass(run) is None
    table = debug.summary_table(run)
    assert "canonicalize  yes        0 -> 4" in table


@pytest.mark.slow
def test_html_report_is_self_contained_and_holds_every_pass(recorded, tmp_path):
    report = tmp_path / "report.html"
    assert cli.main(["diff", str(recorded), "--html", str(report), "--color", "never"]) == 0
    text = report.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text

    class Passes(HTMLParser):
        found = []

        def handle_starttag(self, tag, attrs):
            if tag == "details":
                self.found.append(dict(attrs)["data-pass"])

    parser = Passes()
    parser.feed(text)
    assert parser.found == PASSES


def swap_two_features(gm, ctx):
    """Test-only broken pass: the first structured op writes two output features swapped."""
    node = next(n for n in gm.graph.nodes if is_structured(n))
    args = structured_args(node)
    size = args[3]
    swapped = torch.arange(size)
    swapped[[0, 1]] = swapped[[1, 0]]
    current = ctx.constant(args[OUT_INDEX]) if args[OUT_INDEX] is not None else torch.arange(size)
    args[OUT_INDEX] = ctx.add_constant(gm, current[swapped], "_broken")
    set_structured_args(node, args)
    return True


@pytest.mark.slow
def test_a_deliberately_broken_pass_is_named_as_the_first_bad_pass(tmp_path, monkeypatch, capsys):
    broken = pipeline.Pass("swap_features", swap_two_features)
    monkeypatch.setattr(pipeline, "PASSES", pipeline.PASSES[:2] + (broken,) + pipeline.PASSES[2:])
    torch._dynamo.reset()
    padst_compiler.optimize(small_gpt(), [torch.randint(0, 256, (2, 16))], mode="inference", debug_dir=tmp_path)
    (run,) = debug.load_runs(tmp_path)
    assert debug.first_bad_pass(run).name == "swap_features"
    assert cli.main(["diff", str(tmp_path), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "first pass that changed the numbers: swap_features" in out
    assert "-- swap_features --" in out and "\033[" not in out


def test_empty_and_corrupt_directories_fail_with_a_clear_message(tmp_path, capsys):
    assert cli.main(["diff", str(tmp_path)]) == 2
    assert "holds no padst run" in capsys.readouterr().err
    (tmp_path / "run-001").mkdir()
    (tmp_path / "run-001" / "summary.json").write_text("{not json")
    assert cli.main(["diff", str(tmp_path)]) == 2
    assert "run-001 is not a readable padst run" in capsys.readouterr().err
    assert cli.main(["diff", str(tmp_path / "missing")]) == 2


def test_two_graph_files_are_diffed_without_comment_noise(tmp_path, capsys):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def forward(self, x):\n    # File: /very/long/path.py:12 in forward, code: y = f(x)\n"
                 "    y = torch.relu(x);  x = None\n    return y\n")
    b.write_text("def forward(self, x):\n    y = torch.tanh(x);  x = None\n    return y\n")
    assert cli.main(["diff", str(a), str(b), "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert "\033[31m-    y = torch.relu(x)\033[0m" in out and "\033[32m+    y = torch.tanh(x)\033[0m" in out
    assert "File:" not in out and "x = None" not in out


def test_snapshots_go_to_the_structured_trace(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(debug, "trace_structured", lambda kind, metadata_fn, payload_fn: seen.append(
        (kind, metadata_fn()["name"], payload_fn())))
    record = pipeline.PassRecord("fuse", True, 0.1, {"permutes": 1}, {"permutes": 0}, "before", "after", 0.0)
    debug.write_run(tmp_path, pipeline.PipelineResult(gm=None, records=[record]), original_code="x")
    assert seen == [("artifact", "padst_run-001_01-fuse", "after")]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (Debian package chromium)")
def test_the_html_report_renders_in_headless_chromium(recorded, tmp_path):
    report = tmp_path / "report.html"
    report.write_text(debug.render_html(debug.load_runs(recorded)))
    result = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", report.as_uri()],
                            capture_output=True, text=True, timeout=120)
    for name in PASSES:
        assert f'data-pass="{name}"' in result.stdout


@pytest.mark.slow
def test_kernel_choices_are_written_and_shown_by_padst_diff(recorded, tmp_path, capsys):
    from padst_compiler.kernels.eager import select

    directory = tmp_path / "debug"
    shutil.copytree(recorded, directory)
    weight = Block(8, 8).project(torch.randn(32, 48), 0.5)
    with select.set_autotune(True):
        weight.linear(torch.randn(5, 48))
    debug.write_kernel_choices(directory)
    assert cli.main(["diff", str(directory), "--color", "never"]) == 0
    printed = capsys.readouterr().out
    assert "kernel implementations picked at run time" in printed
    assert "block_forward" in printed and "chosen" in printed


# ----------------------------------------------- padst diff: bad files and --html, one line each


@pytest.fixture
def one_run(tmp_path):
    """A debug directory holding one recorded run, written without compiling anything."""
    record = pipeline.PassRecord("fuse", True, 0.1, {"permutes": 1}, {"permutes": 0}, "before", "after", 0.0)
    debug.write_run(tmp_path / "debug", pipeline.PipelineResult(gm=None, records=[record]), original_code="x")
    return tmp_path / "debug"


def refused_diff(argv, capsys) -> str:
    assert cli.main(["diff", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("padst diff: error: ") and captured.out == "", captured
    return lines[0]


def _break_summary(root):
    (root / "run-001" / "summary.json").write_text('{"passes": [{"name": "fu')


def _break_kernel_choices(root):
    (root / debug.KERNEL_CHOICES).write_text('[{"op": "block_forward", "regime"')


def _wrong_kernel_choices(root):
    (root / debug.KERNEL_CHOICES).write_text('{"op": 1}')


@pytest.mark.parametrize("damage,message", [
    (_break_summary, "run-001 is not a readable padst run"),
    (_break_kernel_choices, "kernel_choices.json is not a readable padst kernel-choices file"),
    (_wrong_kernel_choices, "kernel_choices.json is not a readable padst kernel-choices file"),
    (lambda root: (root / "run-001" / "01-fuse.after.py").write_bytes(b"\xff\xfe"), "is not a UTF-8 text file"),
    (lambda root: (root / "run-001" / "01-fuse.before.py").unlink(), "01-fuse.before.py: no such file"),
])
def test_diff_of_a_damaged_debug_directory_is_one_line(damage, message, one_run, capsys):
    damage(one_run)
    assert message in refused_diff([str(one_run), "--color", "never"], capsys)


def test_diff_of_two_files_names_the_one_it_cannot_read(tmp_path, capsys):
    good, binary, plain = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "plain"
    good.write_text("x = 1\n")
    binary.write_bytes(b"\x00\xff\xfe")
    plain.write_text("not a folder")
    assert f"{binary} is not a UTF-8 text file" in refused_diff([str(good), str(binary)], capsys)
    assert f"{tmp_path / 'gone.py'}: no such file" in refused_diff([str(good), str(tmp_path / "gone.py")], capsys)
    assert "cannot read" in refused_diff([str(good), str(plain / "inside.py")], capsys)
    assert "give one debug directory or two graph files" in refused_diff([str(good), str(tmp_path)], capsys)
    assert "--html reports a debug directory" in refused_diff([str(good), str(good), "--html", "r.html"], capsys)


@pytest.mark.parametrize("content", [b"<html>my own page</html>", b"", b"\x89PNG\r\n"])
def test_diff_html_refuses_a_file_it_did_not_write(content, one_run, tmp_path, capsys):
    report = tmp_path / "report.html"
    report.write_bytes(content)
    stamp = report.stat().st_mtime_ns
    assert "report.html exists and is not a padst graph-diff report" in refused_diff(
        [str(one_run), "--html", str(report)], capsys)
    assert report.read_bytes() == content and report.stat().st_mtime_ns == stamp


def test_diff_html_replaces_its_own_earlier_report(one_run, tmp_path, capsys):
    report = tmp_path / "report.html"
    report.write_text(debug.render_html([]))
    assert cli.main(["diff", str(one_run), "--html", str(report), "--color", "never"]) == 0
    assert 'data-pass="fuse"' in report.read_text() and capsys.readouterr().err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["debug", "report.html"]  # no temporary file left
