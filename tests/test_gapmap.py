"""The gap map (``padst bench accuracy``): its grid, its statistics, its files, resuming."""

import json
import math
from dataclasses import asdict, replace

import pytest

from padst_compiler import cli, gapmap
from padst_compiler.gapmap import PAPER, PERMUTATIONS, TASKS, Cell


def test_the_full_grid_covers_every_axis_and_leaves_out_what_a_shape_cannot_take():
    cells = gapmap.grid()
    keys = {cell.key for cell in cells}
    for task in TASKS:
        for depth in TASKS[task].depths:
            assert Cell(task, depth, "dense").key in keys
            for sparsity in gapmap.SPARSITIES:
                assert {Cell(task, depth, ref, None, sparsity).key for ref in gapmap.REFERENCES} <= keys
                assert {Cell(task, depth, m, "NM(m=32)", sparsity).key for m in PERMUTATIONS} <= keys
            assert Cell(task, depth, PAPER, "Block(4x4)", gapmap.SPARSITIES[0]).key in keys
    # an 8x8 block on a 128-wide GPT input keeps 16 blocks a row: 1/32 of them is none at all
    assert Cell("gpt", 2, "learned", "Block(8x8)", 0.96875).key not in keys
    assert Cell("gpt", 2, "learned", "Block(8x8)", 0.9375).key in keys
    assert len(keys) == len(cells)


def test_every_method_trains_what_its_name_says():
    configs = {method: gapmap.run_config(Cell("gpt", 2, method, "Block(8x8)", 0.9375), seed=1)
               for method in PERMUTATIONS + (PAPER,)}
    assert [configs[m].permutation for m in PERMUTATIONS] == ["none", "none", "random", "learned"]
    assert configs["none+warmup"].dense_warmup and configs["none"].dense_warmup is None
    assert configs[PAPER].permutation == "birkhoff" and configs[PAPER].schedule == {"harden_at": 0.5}
    rigl = gapmap.run_config(Cell("digits", 4, "RigL", None, 0.875), seed=0)
    assert str(rigl.structure) == "Unstructured()" and rigl.model.n_layer == 4 and rigl.sparsity == 0.875
    assert gapmap.run_config(Cell("digits", 2, "dense"), seed=0).structure is None


def _record(cell, seed, metric):
    return {"cell": cell.key, "task": cell.task, "depth": cell.depth, "method": cell.method,
            "structure": cell.structure, "sparsity": cell.sparsity, "seed": seed, "metric": metric,
            "loss": metric, "seconds": 2.0 if cell.method == "learned" else 1.0, "density": 0.0625}


def test_summary_gives_mean_std_the_real_gap_and_the_share_closed():
    base = Cell("digits", 2, "none", "Diagonal()", 0.9375)
    values = {"none": [6.0, 6.2, 5.8], "learned": [5.0, 5.2, 4.8], "random": [6.0, 6.0, 6.0],
              "none+warmup": [5.5, 5.5, 5.5]}
    records = [_record(replace(base, method=m), s, v) for m, vs in values.items() for s, v in enumerate(vs)]
    rigl = Cell("digits", 2, "RigL", None, 0.9375)
    records += [_record(rigl, s, v) for s, v in enumerate([4.0, 4.1, 3.9])]
    summary = gapmap.summarize(records)
    none = summary["cells"][base.key]
    assert none["mean"] == pytest.approx(6.0) and none["std"] == pytest.approx(0.2) and none["seeds"] == 3
    (row,) = summary["comparisons"]
    assert row["gap"] == pytest.approx(2.0) and row["gap_is_real"]
    assert row["share_closed"] == pytest.approx(0.5)
    assert row["learned_minus_none_in_std"] == pytest.approx(-5.0)
    assert row["learned_time_vs_none"] == pytest.approx(2.0)
    printed = gapmap.table(summary)
    assert "6.000 ± 0.200" in printed and "+2.000 (real)" in printed and "50 %" in printed


def test_a_gap_within_the_noise_is_not_called_real():
    none, rigl = Cell("gpt", 2, "none", "Block(8x8)", 0.9375), Cell("gpt", 2, "RigL", None, 0.9375)
    records = [_record(none, s, v) for s, v in enumerate([2.40, 2.30, 2.35])]
    records += [_record(rigl, s, v) for s, v in enumerate([2.36, 2.31, 2.33])]
    (row,) = gapmap.summarize(records)["comparisons"]
    assert not row["gap_is_real"] and "share_closed" not in row


def test_a_run_resumes_and_refuses_runs_of_other_settings(tmp_path, monkeypatch):
    trained = []

    def fake_run_one(cell, seed, settings):
        trained.append((cell.key, seed))
        return {k: v for k, v in _record(cell, seed, 1.0 + seed).items()}

    monkeypatch.setattr(gapmap, "run_one", fake_run_one)
    monkeypatch.setattr(gapmap, "ProcessPoolExecutor", _InlineExecutor)
    cells = [Cell("digits", 2, "dense")]
    first = gapmap.run(cells, tmp_path, workers=1, progress=False)
    assert len(first) == TASKS["digits"].seeds == len(trained)
    again = gapmap.run(cells, tmp_path, workers=1, progress=False)  # everything is in runs.jsonl
    assert len(again) == len(first) and len(trained) == TASKS["digits"].seeds
    monkeypatch.setitem(gapmap.TASKS, "digits", replace(TASKS["digits"], steps=7))
    with pytest.raises(ValueError, match="other settings"):
        gapmap.run(cells, tmp_path, workers=1, progress=False)


def test_more_seeds_train_only_the_new_ones_and_fewer_summarise_the_first(tmp_path, monkeypatch, fake_training):
    cells = [Cell("digits", 2, "dense")]
    monkeypatch.setattr(gapmap, "grid", lambda quick, tasks: cells)
    monkeypatch.setitem(gapmap.TASKS, "digits", replace(TASKS["digits"], seeds=2))
    gapmap.gap_map(tasks=("digits",), out=tmp_path)
    monkeypatch.setitem(gapmap.TASKS, "digits", replace(TASKS["digits"], seeds=3))
    gapmap.gap_map(tasks=("digits",), out=tmp_path)
    assert [seed for _, seed in fake_training] == [0, 1, 2]  # the two recorded runs were kept
    monkeypatch.setitem(gapmap.TASKS, "digits", replace(TASKS["digits"], seeds=2))
    summary = gapmap.gap_map(tasks=("digits",), out=tmp_path)
    assert summary["cells"][cells[0].key]["seeds"] == 2 and len(fake_training) == 3


class _InlineExecutor:
    """A stand-in for the process pool that runs each job at submit time."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        from concurrent.futures import Future

        future = Future()
        future.set_result(fn(*args))
        return future


def test_one_real_run_gives_a_finite_metric_and_the_density_it_kept():
    settings = replace(TASKS["digits"], steps=30)
    record = gapmap.run_one(Cell("digits", 2, "learned", "NM(m=32)", 0.9375), seed=0, settings=settings)
    assert 0 <= record["metric"] <= 100 and math.isfinite(record["loss"])
    assert record["density"] == pytest.approx(1 / 16)


def test_the_plot_and_json_are_written(tmp_path):
    cells = [Cell("digits", 2, m, "Diagonal()", 0.9375) for m in PERMUTATIONS]
    records = [_record(c, s, 5.0 + s) for c in cells for s in range(3)]
    records += [_record(Cell("digits", 2, "RigL", None, 0.9375), s, 4.0 + s) for s in range(3)]
    summary = gapmap.summarize(records)
    path = gapmap.plot(summary, tmp_path / "map.png")
    assert path.stat().st_size > 1000
    json.dumps(summary)  # serialisable as it is


def test_accuracy_command_refuses_unknown_tasks(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "accuracy", "--tasks", "imagenet"])
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err


# ------------------------------------------------------- its folder: refused, resumed, repaired


@pytest.fixture
def fake_training(monkeypatch):
    """Runs that cost nothing: the point is the folder, not the numbers."""
    trained = []

    def fake_run_one(cell, seed, settings):
        trained.append((cell.key, seed))
        return _record(cell, seed, 1.0 + seed)

    monkeypatch.setattr(gapmap, "run_one", fake_run_one)
    monkeypatch.setattr(gapmap, "ProcessPoolExecutor", _InlineExecutor)
    return trained


def _runs_file(records) -> str:
    return "".join(json.dumps({**record, "settings": asdict(TASKS[record["task"]])}) + "\n" for record in records)


DENSE = Cell("digits", 2, "dense")
GOOD_LINE = _runs_file([_record(DENSE, 0, 3.0)])


def _foreign_file(out):
    (out / "runs.jsonl").write_text(GOOD_LINE)
    (out / "notes.txt").write_text("mine")


@pytest.mark.parametrize("make,message", [
    (_foreign_file, "holds notes.txt, which padst bench accuracy does not write"),
    (lambda out: (out / "gapmap.json").write_text("{}"), "is not empty and was not written by padst bench accuracy"),
    (lambda out: (out / "runs.jsonl").write_text(GOOD_LINE + "not json\n" + GOOD_LINE),
     "runs.jsonl: line 2 is not a padst run record"),
    (lambda out: (out / "runs.jsonl").write_text('{"cell": "mine"}\n'), "runs.jsonl: line 1 is not a padst run record"),
    (lambda out: (out / "runs.jsonl").write_bytes(b"\xff\xfe{}\n"), "runs.jsonl is not a UTF-8 text file"),
    (lambda out: (out / "runs.jsonl").mkdir(), "runs.jsonl is a directory, not a file"),
    (lambda out: (out / "runs.jsonl").write_text(GOOD_LINE.replace('"steps": 1500', '"steps": 7')),
     "holds runs trained with other settings"),
])
def test_the_accuracy_command_refuses_a_folder_or_runs_it_did_not_write(make, message, tmp_path, monkeypatch,
                                                                         capsys):
    def no_grid(*args):
        raise AssertionError("refused only once the grid was built")

    monkeypatch.setattr(gapmap, "grid", no_grid)
    make(tmp_path)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    assert cli.main(["bench", "accuracy", "--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("padst bench accuracy: error: ") and message in lines[0], lines
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()} == before


def test_the_accuracy_command_refuses_a_file_for_its_folder(tmp_path, capsys):
    out = tmp_path / "map"
    out.write_text("mine")
    assert cli.main(["bench", "accuracy", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"padst bench accuracy: error: {out} exists and is not a directory\n"
    assert out.read_text() == "mine"


def test_a_map_resumes_in_the_folder_it_wrote_and_writes_its_files_whole(tmp_path, monkeypatch, capsys,
                                                                         fake_training):
    cells = [Cell("digits", 2, m, "Diagonal()", 0.9375) for m in PERMUTATIONS] + [Cell("digits", 2, "RigL", None,
                                                                                         0.9375)]
    monkeypatch.setattr(gapmap, "grid", lambda quick, tasks: cells)
    out = tmp_path / "map"
    for _ in range(2):
        assert cli.main(["bench", "accuracy", "--tasks", "digits", "--out", str(out)]) == 0
    assert len(fake_training) == len(cells) * TASKS["digits"].seeds  # the second run trained nothing
    assert sorted(p.name for p in out.iterdir()) == [".padst-output", "gapmap.json", "gapmap.png", "runs.jsonl"]
    assert json.loads((out / "gapmap.json").read_text())["comparisons"]
    assert capsys.readouterr().err == ""


def test_a_killed_runs_cut_short_last_line_is_dropped_with_a_warning(tmp_path, capsys, fake_training):
    (tmp_path / "runs.jsonl").write_text(GOOD_LINE + GOOD_LINE[:40])
    records = gapmap.run([DENSE], tmp_path, workers=1, progress=False)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("padst bench accuracy: warning: ") and "cut short" in lines[0]
    assert len(records) == TASKS["digits"].seeds and (DENSE.key, 0) not in fake_training
    written = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert written[0] == GOOD_LINE.strip() and len(written) == TASKS["digits"].seeds
    assert all(json.loads(line)["cell"] == DENSE.key for line in written)


def test_the_published_map_folder_resumes_as_the_readme_says(tmp_path):
    import shutil
    from pathlib import Path

    copy = shutil.copytree(Path(__file__).parents[1] / "results" / "gapmap", tmp_path / "gapmap")  # no marker file
    log, records = gapmap.open_log(copy, ("digits",))  # its GPT runs predate the task's learning-rate ramp
    assert log == copy / "runs.jsonl" and len(records) == len(log.read_text().splitlines())
    assert not (copy / ".padst-output").exists()
