"""The padst command line and the demo at this stage."""

import pytest

from padst_compiler import cli, demo


def test_demo_checks_every_structure_and_prints_the_table(capsys):
    assert cli.main(["demo", "--tokens", "64", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("Block(32x32)", "Block(64x64)", "NM(m=32)", "Diagonal()", "Unstructured()"):
        assert name in out
    assert "speed-up vs dense" in out


def test_demo_layer_check_matches_the_dense_reference():
    result = demo.check_layer(demo.NM(32), 0.9, tokens=32, repeats=1)
    assert result.max_abs_error < 1e-4
    assert result.kept_fraction == pytest.approx(3 / 32)


@pytest.mark.parametrize("argv,message", [
    (["demo", "--sparsity", "1.5"], "must be in [0, 1), got 1.5"),
    (["demo", "--tokens", "zero"], "not an integer: 'zero'"),
    (["demo", "--repeats", "0"], "must be at least 1"),
])
def test_bad_options_give_a_one_line_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_sparsity_no_structure_can_take_is_reported_without_traceback(capsys):
    assert cli.main(["demo", "--sparsity", "0.99", "--tokens", "8", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("padst demo: error:") and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["bench", "accuracy", "--steps", "0"], "must be at least 1"),
    (["bench", "model", "--layers", "x"], "not an integer: 'x'"),
    (["bench", "speed"], "invalid choice: 'speed'"),
])
def test_bench_options_are_checked_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_accuracy_benchmark_lists_every_method():
    from padst_compiler.bench import accuracy_configs
    from padst_compiler.recipe import label

    labels = [label(config) for config in accuracy_configs(steps=10)]
    assert labels[:4] == ["dense", "Unstructured() RigL", "Unstructured() SET", "Unstructured() RigL, ERK"]
    assert "Block(8x8) RigL, perm learned" in labels and "Diagonal() RigL, perm none" in labels
    assert len(labels) == 13 and all(c.lr == 1e-3 and c.steps == 10 for c in accuracy_configs(steps=10))


def test_kernel_benchmark_prints_ratios_and_writes_json(tmp_path, capsys):
    import json

    out = tmp_path / "kernels.json"
    assert cli.main(["bench", "kernels", "--tokens", "1", "--sparsity", "0.9", "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fwd vs dense" in printed and "Block(32x32)" in printed and "Diagonal()" in printed
    rows = json.loads(out.read_text())
    assert len(rows) == 8 and all(r["forward_speedup"] > 0 and r["train_speedup"] > 0 for r in rows)
