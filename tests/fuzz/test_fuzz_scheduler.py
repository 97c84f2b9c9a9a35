"""Fuzzing ``DSTScheduler``: random options (valid or not) on a sparsified MLP, then a few
training steps with random batches (zero tokens included).

Options that break the documented ranges must be refused with ``ValueError`` / ``TypeError``
before the model or the optimizer is touched. Otherwise every step must keep each layer's
structure (an index the value checks accept, the same shapes, the same kept count),
finite values, and the model's function equal to the reference computation from its own
tensors; from the hardening step on no layer is still warming up.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from padst_compiler.kernels import set_checks
from padst_compiler.training import NM, Block, DSTScheduler, Diagonal, PADSTLinear, sparsify

from .op_cases import budget
from .support import assert_matches_reference

pytestmark = pytest.mark.fuzz

FRACTIONS = st.one_of(st.floats(0, 1), st.sampled_from([0.0, 0.1, 0.5, 1.0]))
BAD_NUMBERS = [math.nan, math.inf, -math.inf, -0.5, 1.5, "0.5", None]


@st.composite
def scheduler_options(draw):
    bad = draw(st.sampled_from([None] * 4 + ["total_steps", "update_every", "drop_fraction", "t_end", "growth",
                                             "penalty_weight", "penalty_start", "harden_threshold", "harden_at",
                                             "sinkhorn_iterations", "reselect_at"]))
    options = {"total_steps": draw(st.integers(1, 12)), "update_every": draw(st.integers(1, 4)),
               "drop_fraction": draw(FRACTIONS), "t_end": draw(FRACTIONS),
               "growth": draw(st.sampled_from(["rigl", "set"])), "penalty_weight": draw(st.sampled_from([0.0, 0.5, 1.0])),
               "harden_threshold": draw(st.sampled_from([0.0, 0.22, 0.9])), "harden_at": draw(FRACTIONS),
               "sinkhorn_iterations": draw(st.integers(1, 5)),
               "reselect_at": tuple(draw(st.lists(st.floats(0.01, 0.99), max_size=2))),
               "anneal": draw(st.booleans()), "seed": draw(st.integers(0, 100))}
    options["penalty_start"] = options["penalty_weight"] * draw(st.sampled_from([1.0, 0.5, 0.1]))
    if options["penalty_weight"] == 0:
        options["penalty_start"] = None
    if bad in ("total_steps", "update_every", "sinkhorn_iterations"):
        # (True for the other two: test_fuzz_regressions.py::test_scheduler_refuses_booleans_as_counts)
        options[bad] = draw(st.sampled_from([0, -1, 1.5, "2", None] + [True] * (bad == "total_steps")))
    elif bad == "growth":
        options[bad] = draw(st.sampled_from(["RigL", "", None, 1]))
    elif bad == "reselect_at":
        options[bad] = draw(st.sampled_from([(0.0,), (1.0,), (math.nan,), (-0.5,), 0.5]))
    elif bad == "penalty_start" and options["penalty_weight"] > 0:
        # (a NaN or infinite penalty weight: test_fuzz_regressions.py::
        # test_scheduler_refuses_a_nan_or_infinite_penalty_weight)
        options[bad] = draw(st.sampled_from([0.0, -1.0, options["penalty_weight"] * 2, math.nan, "1"]))
    elif bad == "penalty_weight":
        options[bad] = draw(st.sampled_from([-1.0, -math.inf, "1"]))
        options["penalty_start"] = None
    elif bad is not None and bad != "penalty_start":
        options[bad] = draw(st.sampled_from(BAD_NUMBERS))
    return options


def option_problem(o) -> str | None:
    """Why ``DSTScheduler(model, optimizer, **o)`` must be refused, or None."""
    def real(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if o["growth"] not in ("rigl", "set"):
        return "growth"
    if not count(o["total_steps"]) or not count(o["update_every"]) or not count(o["sinkhorn_iterations"]):
        return "a count"
    if not real(o["penalty_weight"]) or o["penalty_weight"] < 0:
        return "penalty_weight"
    start = o["penalty_weight"] if o["penalty_start"] is None else o["penalty_start"]
    if o["penalty_weight"] > 0 and not (real(start) and 0 < start <= o["penalty_weight"]):
        return "penalty_start"
    if not real(o["harden_threshold"]) or not 0 <= o["harden_threshold"] < 1:
        return "harden_threshold"
    for name in ("drop_fraction", "t_end", "harden_at"):
        if not real(o[name]) or not 0 <= o[name] <= 1:
            return name
    if not isinstance(o["reselect_at"], (tuple, list)) or \
            not all(real(f) and 0 < f < 1 for f in o["reselect_at"]):
        return "reselect_at"
    return None


@st.composite
def setups(draw):
    return {"widths": draw(st.lists(st.sampled_from([4, 8]), min_size=2, max_size=3)),
            "structure": draw(st.sampled_from([Block(2, 2), Block(4, 2), NM(2), NM(4), Diagonal()])),
            "sparsity": draw(st.sampled_from([0.5, 0.75])),
            "permutation": draw(st.sampled_from(["learned", "birkhoff", "random", "none"])),
            "side": draw(st.sampled_from(["input", "output", "auto"])),
            "tokens": draw(st.lists(st.integers(0, 5), min_size=1, max_size=4)),
            "seed": draw(st.integers(0, 1000))}


def snapshot(model, optimizer):
    return ([(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
            [(n, b.detach().clone()) for n, b in model.named_buffers()],
            [(type(m), getattr(m, "capture_dense_grad", None)) for m in model.modules()],
            repr(optimizer.state_dict()))


def same(a, b) -> bool:
    params_a, buffers_a, modules_a, opt_a = a
    params_b, buffers_b, modules_b, opt_b = b
    return modules_a == modules_b and opt_a == opt_b and len(params_a) == len(params_b) and \
        all(n == m and torch.equal(x, y) and r == s for (n, x, r), (m, y, s) in zip(params_a, params_b)) and \
        all(n == m and torch.equal(x, y) for (n, x), (m, y) in zip(buffers_a, buffers_b))


@budget(1.0)
@given(setup=setups(), o=scheduler_options())
def test_scheduler_refuses_bad_options_and_keeps_every_structure(setup, o):
    torch.manual_seed(setup["seed"])
    widths = setup["widths"]
    model = nn.Sequential(*[m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.Tanh())])
    sparsify(model, setup["structure"], setup["sparsity"], permutation=setup["permutation"], side=setup["side"],
             seed=setup["seed"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = snapshot(model, optimizer)
    problem = option_problem(o)
    try:
        sched = DSTScheduler(model, optimizer, **o)
    except (ValueError, TypeError) as error:
        assert problem is not None, f"refused valid options: {error!r}"
        assert same(before, snapshot(model, optimizer)), "a refused scheduler changed the model or optimizer"
        return
    assert problem is None, f"accepted options that break the contract ({problem})"

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PADSTLinear)]
    shapes = {name: (tuple(m.values.shape), tuple(m.index.shape)) for name, m in layers}
    kept = {name: m.structure.kept_count(m.values, m.index) for name, m in layers}
    gen = torch.Generator().manual_seed(setup["seed"])
    for step, tokens in enumerate(setup["tokens"] * 3):
        x = torch.randn(tokens, widths[0], generator=gen)
        target = torch.randn(tokens, widths[-1], generator=gen)
        loss = (model(x) - target).square().sum() + sched.permutation_penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sched.step()
        for name, layer in layers:
            assert (tuple(layer.values.shape), tuple(layer.index.shape)) == shapes[name], name
            assert layer.structure.kept_count(layer.values, layer.index) == kept[name], name
            assert torch.isfinite(layer.values).all(), name
            if sched.step_count >= sched.harden_step:
                assert not layer.warming_up, f"{name} still warming up at step {sched.step_count}"
        with set_checks(True), torch.no_grad():
            model(torch.randn(2, widths[0], generator=gen))  # the value checks accept every index
        assert_matches_reference(model, [torch.randn(3, widths[0], generator=gen)], torch.float32)
