"""scripts/gpu_check.sh refuses clearly where torch sees no GPU (on a GPU machine it is run
by hand: it takes minutes)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: run scripts/gpu_check.sh itself")
def test_the_gpu_check_refuses_in_one_line_without_a_gpu(tmp_path):
    done = subprocess.run([str(SCRIPT), str(tmp_path / "out")], env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"gpu_check: error: no CUDA GPU is visible to torch ({sys.executable})"
    assert not (tmp_path / "out").exists()
