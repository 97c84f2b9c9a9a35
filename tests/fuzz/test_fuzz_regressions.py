"""Bugs the fuzz suite found, each shrunk to a minimal reproduction.

Each test states the behaviour the contract asks for and is marked ``xfail(strict=True)``
while the bug stands: it fails today (so it is recorded, not skipped), and passes, failing
the strict xfail, once the bug is fixed; then drop the marker and the matching exclusion
in the fuzz test that names this test.
"""

import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from padst_compiler.kernels import NM, Block, Unstructured
from padst_compiler.training import DSTScheduler, harden_permutations, sparsify
from padst_compiler.training.layer import decode_record

pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")]


def _quiet_sparsify(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify(model, *args, **kwargs)


# ------------------------------------------------------------------------- sparsify


def test_random_permutation_keeps_the_dense_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(3, 4)
    want = model(x)
    sparsify(model, Block(1, 1), 0.0, permutation="random", side="input")
    torch.testing.assert_close(model(x), want)


def test_hardening_a_learned_permutation_of_one_feature():
    model = nn.Sequential(nn.Linear(1, 1))
    sparsify(model, Block(1, 1), 0.0)  # permutation="learned", side "auto" -> input, 1 feature
    assert harden_permutations(model) == 1
    assert model[0].hard


def test_include_and_exclude_must_be_pattern_lists():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    try:
        sparsify(model, Block(2, 2), 0.5, permutation="none", include="1*")
    except (TypeError, ValueError):
        pass
    else:  # taken as one pattern: only layer "1" matches
        assert isinstance(model[0], nn.Linear), "include='1*' converted layer '0'"
    with pytest.raises((TypeError, ValueError)):
        sparsify(nn.Sequential(nn.Linear(4, 4)), Block(2, 2), 0.5, permutation="none", include=[], exclude=3)


def test_sparsify_keeps_multihead_attention_working():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    x = torch.randn(2, 3, 8)
    want = model[0](x, x, x)[0]
    sparsify(model, Block(2, 2), 0.0, permutation="none")
    torch.testing.assert_close(model[0](x, x, x)[0], want)


def test_a_zero_sized_layer_is_named_or_converted():
    model = nn.Sequential(nn.Linear(4, 0))
    try:
        _quiet_sparsify(model, NM(2), 0.5, permutation="none")
    except ValueError as error:
        assert "'0'" in str(error)


def test_sparsify_refuses_a_bad_seed_or_soft_noise():
    for bad in ({"permutation": "random", "seed": 0.5}, {"permutation": "random", "seed": 2**70},
                {"permutation": "birkhoff", "soft_noise": math.nan},
                {"permutation": "birkhoff", "soft_noise": math.inf}):
        model = nn.Sequential(nn.Linear(4, 4))
        with pytest.raises((ValueError, TypeError), match="seed|soft_noise"):
            _quiet_sparsify(model, Block(2, 2), 0.5, **bad)
        assert isinstance(model[0], nn.Linear)


@pytest.mark.parametrize("model", [lambda: nn.Sequential(nn.ReLU()),
                                   lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 0))],
                         ids=["no linear", "a zero-sized linear"])
def test_erk_over_no_layer_or_an_empty_layer(model):
    model = model()
    try:
        _quiet_sparsify(model, Unstructured(), 0.5, permutation="none", distribution="erk")
    except ValueError:
        pass


# ------------------------------------------------------------------------- scheduler


def _scheduler_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    sparsify(model, Block(2, 2), 0.5, permutation="birkhoff")
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("weight", [math.nan, math.inf], ids=str)
def test_scheduler_refuses_a_nan_or_infinite_penalty_weight(weight):
    model, optimizer = _scheduler_model()
    with pytest.raises(ValueError, match="penalty_weight"):
        DSTScheduler(model, optimizer, total_steps=10, penalty_weight=weight)


@pytest.mark.parametrize("option", ["update_every", "sinkhorn_iterations"])
def test_scheduler_refuses_booleans_as_counts(option):
    model, optimizer = _scheduler_model()
    with pytest.raises(ValueError, match=option):
        DSTScheduler(model, optimizer, total_steps=10, **{option: True})


# ----------------------------------------------------------------------- checkpoints


def _model(seed, permutation="none"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4))
    sparsify(model, Block(2, 2), 0.5, permutation=permutation)
    return model


@pytest.mark.parametrize("edit", [{"seed": None}, {"seed": "x"}, {"averaged_steps": None}, "drop hard"], ids=str)
def test_unreadable_extra_state_loads_nothing(edit):
    state = _model(0).state_dict()
    extra = dict(decode_record(state["0._extra_state"]))
    if edit == "drop hard":
        del extra["hard"]
    else:
        extra.update(edit)
    state["0._extra_state"] = extra
    model = _model(1)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError):
        model.load_state_dict(state)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), f"{key} was loaded by a refused checkpoint"


@pytest.mark.parametrize("case", ["hard=False without warm-up", "emptied warm-up weight while soft"])
def test_a_hard_flag_that_disagrees_with_the_warmup_state_is_refused(case):
    if case == "hard=False without warm-up":
        state = _model(0).state_dict()
        state["0._extra_state"] = {**decode_record(state["0._extra_state"]), "hard": False}
        model = _model(1)
    else:
        state = _model(0, "learned").state_dict()
        state["0.dense_weight_proxy"] = torch.empty(0)
        state["0.dense_weight_average"] = torch.empty(0)
        model = _model(1, "learned")
    try:
        model.load_state_dict(state)
    except ValueError:
        return
    model(torch.randn(2, 4))  # loaded: then the layer must work


# --------------------------------------------------------------------------- raw ops


def run_isolated(script: str) -> None:
    """Run ``script`` in a fresh interpreter (a raw-op case may crash the process) and require it to pass."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_raw_ops_refuse_negative_sizes_by_name():
    # in a subprocess, like every raw-op fuzz case: a size the checks miss must not crash the session
    script = """
import torch
from padst_compiler.kernels import NM, Diagonal
diag, nm = Diagonal().project(torch.randn(1, 1), 0.0), NM(1).project(torch.randn(1, 1), 0.0)
calls = [lambda: torch.ops.padst.diag_linear(torch.randn(2, 1), diag.values, diag.index, -1),
         lambda: torch.ops.padst.nm_linear_grad_input(torch.randn(1, 1), nm.values, nm.index, -1, None, None)]
for call in calls:
    try:
        call()
    except ValueError as error:
        assert str(error).startswith("padst::"), error
    else:
        raise AssertionError("a negative size was accepted")
"""
    run_isolated(script)


def test_block_values_with_zero_width_blocks_are_refused_by_name():
    script = """
import torch
from padst_compiler.kernels import Block
weight = Block(1, 1).project(torch.randn(1, 1), 0.0)
try:
    torch.ops.padst.block_linear(torch.randn(1, 1), weight.values[..., :0], weight.index, 1)
except ValueError as error:
    assert str(error).startswith("padst::block_linear"), error
else:
    raise AssertionError("zero-width blocks were accepted")
"""
    run_isolated(script)
