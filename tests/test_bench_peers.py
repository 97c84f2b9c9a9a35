"""``padst bench peers``: every runtime against the fastest dense one, DeepSparse in its own process."""

import json
import os
import sys
from pathlib import Path

import pytest

from padst_compiler import bench_peers, cli, outputs

SMALL = {"d": 320, "hidden": 1280, "tokens": (1,), "repeats": 1}  # Block(32x32) at 0.9 fits; compiles fast
DEEPSPARSE = os.environ.get("PADST_DEEPSPARSE_PYTHON") or str(bench_peers.DEFAULT_DEEPSPARSE_PYTHON)


@pytest.mark.slow
def test_without_deepsparse_the_other_runtimes_run_and_a_line_says_how_to_add_it(tmp_path, capsys):
    out = tmp_path / "peers.json"
    rows = bench_peers.peer_speed(**SMALL, deepsparse_python=tmp_path / "no-python", out=str(out))
    printed = capsys.readouterr().out
    assert f"DeepSparse left out: there is no Python at {tmp_path / 'no-python'}" in printed
    assert "make deepsparse-env" in printed
    assert set(rows[0]["ms"]) == {"PyTorch dense", "Inductor dense", "padst eager", "padst optimize"}
    assert rows[0]["vs_fastest_dense"][rows[0]["fastest_dense"]] == 1.0
    saved = json.loads(out.read_text())
    assert saved["deepsparse"] is None and saved["rows"] == rows
    outputs.check_file(out, "a result", outputs.json_with_keys(bench_peers.RESULT_KEYS))  # a rerun may replace it


def test_a_python_without_deepsparse_is_named_with_its_error(tmp_path):
    worker, missing = bench_peers._start_deepsparse(Path(sys.executable), {"d": 8, "hidden": 8, "sparsity": 0.5,
                                                                           "tokens": [1], "seed": 0,
                                                                           "folder": str(tmp_path)})
    assert worker is None
    assert f"{sys.executable} could not run it (ModuleNotFoundError: No module named 'deepsparse')" in missing


def test_peers_options_are_checked(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "peers", "--tokens", "0"])
    assert "must be at least 1" in capsys.readouterr().err


@pytest.mark.skipif(not Path(DEEPSPARSE).is_file(), reason="DeepSparse's own environment is optional: "
                    "`make deepsparse-env` or PADST_DEEPSPARSE_PYTHON")
def test_deepsparse_worker_compiles_both_engines_and_times_them(tmp_path):
    worker = bench_peers.DeepSparseWorker(Path(DEEPSPARSE), {"d": 64, "hidden": 256, "sparsity": 0.9,
                                                             "tokens": [1, 4], "seed": 0, "folder": str(tmp_path)})
    try:
        assert worker.version.startswith("1.")
        for variant in ("dense", "sparse"):
            assert 0 < worker.sampler(variant, 4)(3) < 10
        with pytest.raises(RuntimeError, match="KeyError"):
            worker.sampler("dense", 2)(1)  # no engine for 2 tokens
    finally:
        worker.close()
    assert worker.process.returncode == 0
