"""The gap map (``padst bench accuracy``): its grid, its statistics, its files, resuming."""

import json
import math
from dataclasses import replace

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
