"""Test-session settings shared by every test module."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers on two cores: more OpenMP threads per worker only spin against each
    # other (a 12 ms matmul was seen to take 1.6 s that way).
    torch.set_num_threads(1)
