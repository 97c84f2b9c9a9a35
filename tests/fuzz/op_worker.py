"""Adversarial raw-op cases, run in a subprocess by ``test_fuzz_ops.py`` (a crash here must
not take the test session with it; the pattern of tests/kernels/bad_index_cases.py, whose
checks switch and implementation selector this reuses, driven by hypothesis).

Each example builds a valid call of ``block_linear`` / ``nm_linear`` / ``diag_linear`` (or
``permute``), then runs one to three steps on the *same* tensor objects. A step may edit
index values in place (a new version: what the ops memoized must follow), swap in a
tensor of the wrong dtype, shape or layout, pass a wrong size argument, toggle the value
checks and force an implementation. Every step must end in one of:

- a ``ValueError`` naming the op (``padst::...``) where the call breaks the op's contract
  (shapes, dtypes, an index value outside its tensor; a repeated unit or a permutation
  that is not one while the checks are on);
- a finite result of the right shape where only repeats break it and the checks are off;
- the dense reference's numbers where the call is valid.

The contract is restated here independently of kernels/ (``classify``). Prints one line
per step before running it (so the last line before a crash names it), then
``N examples, M steps: ...``; exits 0 only if every step held.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "kernels"))


def _load_profiles() -> None:
    """Register and load the hypothesis profiles of tests/conftest.py (HYPOTHESIS_PROFILE)."""
    spec = importlib.util.spec_from_file_location("_fuzz_profiles", HERE.parent / "conftest.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


_load_profiles()

import bad_index_cases as base  # noqa: E402  (its checks switch and implementation selector)
import op_cases as oc  # noqa: E402

from padst_compiler.kernels import NM, Block  # noqa: E402

HUGE = [1 << 40, -(1 << 40), (1 << 63) - 1, -(1 << 63), (1 << 31), -(1 << 31) - 1]
WRONG_INDEX_DTYPES = [torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool]
outcomes: Counter = Counter()


# ------------------------------------------------------------------ the op contract


def _is_float(t) -> bool:
    return t.dtype.is_floating_point


def _index_ok(index, shape) -> bool:
    return index.dtype == torch.int64 and tuple(index.shape) == tuple(shape)


def _range(index, bound) -> bool:
    return index.numel() == 0 or (int(index.min()) >= 0 and int(index.max()) < bound)


def classify_structured(structure, x, values, index, out_features, bias, in_index, out_index) -> str:
    """"format", "range", "semantic" or "valid" for a forward call (the backward ops check the
    forward call they stand for)."""
    if x.dim() == 0 or not _is_float(x) or values.dtype != x.dtype:
        return "format"
    in_features = x.shape[-1]
    if isinstance(structure, Block):
        if values.dim() != 4:
            return "format"
        n_rows, kept, rows, cols = values.shape
        if not _index_ok(index, (n_rows, kept)) or n_rows * rows != out_features or cols == 0 or in_features % cols:
            return "format"
        bound = in_features // cols
        problems = [(index, bound, "rows")]
    elif isinstance(structure, NM):
        if index.dim() != 3:
            return "format"
        _, groups, kept = index.shape
        if not _index_ok(index, (out_features, groups, kept)) or tuple(values.shape) != (out_features, groups * kept):
            return "format"
        if groups == 0 or in_features % groups or kept > in_features // groups:
            return "format"
        bound = in_features // groups
        problems = [(index, bound, "rows")]
    else:
        if values.dim() != 2:
            return "format"
        n_diag, length = values.shape
        longer, shorter = max(out_features, in_features), min(out_features, in_features)
        if not _index_ok(index, (n_diag,)) or shorter <= 0 or longer % shorter or length != longer:
            return "format"
        bound = longer
        problems = [(index, bound, "diag")]
    if bias is not None and (tuple(bias.shape) != (out_features,) or bias.dtype != x.dtype):
        return "format"
    for perm, length in ((in_index, in_features), (out_index, out_features)):
        if perm is not None:
            if not _index_ok(perm, (length,)):
                return "format"
            problems.append((perm, length, "perm"))
    if not all(_range(t, bound) for t, bound, _ in problems):
        return "range"
    for t, _, kind in problems:
        if kind == "perm" and not oc.is_permutation(t, t.numel()):
            return "semantic"
        if kind != "perm" and not oc.semantic_ok(structure, t, out_features, in_features):
            return "semantic"
    return "valid"


def classify_call(target, structure, a) -> str:
    if target == "permute":
        x, index = a["x"], a["index"]
        if x.dim() == 0 or not _index_ok(index, (x.shape[-1],)):
            return "format"
        if not _range(index, x.shape[-1]):
            return "range"
        return "valid" if oc.is_permutation(index, x.shape[-1]) else "semantic"
    if target == "forward":
        return classify_structured(structure, a["x"], a["values"], a["index"], a["out_features"], a["bias"],
                                   a["in_index"], a["out_index"])
    grad = a["grad"]
    if grad.dim() == 0:
        return "format"
    if target == "grad_input":
        x = grad.new_empty(0, a["in_features"]) if a["in_features"] >= 0 else None
        if x is None:
            return "format"
        return classify_structured(structure, x, a["values"], a["index"], grad.shape[-1], None, a["in_index"],
                                   a["out_index"])
    x = a["x"]
    if x.dim() == 0 or x.shape[:-1] != grad.shape[:-1] or x.dtype != grad.dtype:
        return "format"
    return classify_structured(structure, x, a["values"], a["index"], grad.shape[-1], None, a["in_index"],
                               a["out_index"])


# --------------------------------------------------------------------- the steps

EDITS = ["index_values", "index_repeat", "in_index_values", "out_index_values", "restore",
         "index_values_in_range", "in_index_values_in_range", "out_index_values_in_range"]
SWAPS = ["index_dtype", "index_shape", "index_noncontiguous", "values_shape", "values_dtype",
         "values_noncontiguous", "bias_shape", "bias_dtype", "x_dtype", "x_0d", "x_features", "x_noncontiguous",
         "grad_features", "grad_rows", "grad_0d", "size_argument", "in_index_shape", "in_index_noncontiguous"]
TARGETS = ["forward", "grad_input", "grad_values", "permute"]

values_for_index = st.one_of(st.integers(-3, 40), st.sampled_from(HUGE))


@st.composite
def steps(draw):
    return [{"edits": draw(st.lists(st.tuples(st.sampled_from(EDITS), st.lists(st.tuples(st.floats(0, 1),
                                                                                         values_for_index),
                                                                               min_size=1, max_size=3)),
                                    max_size=2)),
             "swaps": draw(st.lists(st.sampled_from(SWAPS), max_size=2, unique=True)),
             "swap_seed": draw(st.integers(0, 1000)),
             "target": draw(st.sampled_from(TARGETS)),
             "checks": draw(st.booleans()),
             "implementation": draw(st.sampled_from(oc.IMPLEMENTATIONS)),
             "requires_grad": draw(st.booleans())}
            for _ in range(draw(st.integers(1, 3)))]


def _edit(t: torch.Tensor | None, positions, bound: int | None = None) -> None:
    """Set entries of ``t`` in place; with ``bound``, to values inside ``[0, bound)`` (repeats,
    other units, another permutation)."""
    if t is None or t.numel() == 0:
        return
    flat = t.view(-1)
    for where, value in positions:
        flat[min(int(where * t.numel()), t.numel() - 1)] = value if bound is None else value % bound


def apply_swaps(a: dict, swaps, seed: int, case) -> dict:
    """Arguments of one call with some tensors replaced by wrong or oddly laid out ones."""
    gen = torch.Generator().manual_seed(seed)
    a = dict(a)
    pick = lambda options: options[int(torch.randint(len(options), (), generator=gen))]  # noqa: E731
    for swap in swaps:
        if swap == "index_dtype":
            dtype = pick(WRONG_INDEX_DTYPES)
            a["index"] = a["index"].to(dtype)
        elif swap == "index_shape":
            index = a["index"]
            a["index"] = pick([index.reshape(-1), index.unsqueeze(0), index[..., :-1] if index.dim() else index,
                               torch.cat([index, index], dim=-1) if index.dim() else index.view(1)])
        elif swap == "index_noncontiguous":
            a["index"] = torch.stack([a["index"], a["index"]], dim=-1)[..., 0]
        elif swap == "values_shape":
            values = a["values"]
            a["values"] = pick([values.reshape(-1), values.unsqueeze(0), values[..., :-1] if values.dim() else values])
        elif swap == "values_dtype":
            a["values"] = a["values"].to(pick([torch.float16, torch.bfloat16, torch.float64, torch.float32]))
        elif swap == "values_noncontiguous":
            a["values"] = torch.stack([a["values"], -a["values"]], dim=-1)[..., 0]
        elif swap == "bias_shape":
            a["bias"] = torch.zeros(case.out_features + pick([-1, 1, 3]) if case.out_features > 1 else 2,
                                    dtype=a["x"].dtype)
        elif swap == "bias_dtype":
            a["bias"] = torch.zeros(case.out_features, dtype=pick([torch.float16, torch.int64]))
        elif swap == "x_dtype":
            a["x"] = a["x"].to(pick([torch.int64, torch.float16, torch.bool]))
        elif swap == "x_0d":
            a["x"] = torch.tensor(1.0, dtype=a["x"].dtype)
        elif swap == "x_features":
            a["x"] = torch.randn(*a["x"].shape[:-1], pick([0, 1, 2, 4, 8, 12]), generator=gen).to(a["x"].dtype)
        elif swap == "x_noncontiguous":
            a["x"] = oc.laid_out(a["x"], pick(["transposed", "strided"]))
        elif swap == "grad_features":
            a["grad"] = torch.randn(*a["grad"].shape[:-1], pick([0, 1, 3, 8]), generator=gen).to(a["grad"].dtype)
        elif swap == "grad_rows":
            a["grad"] = torch.randn(pick([0, 1, 2]), 3, case.out_features, generator=gen).to(a["grad"].dtype)
        elif swap == "grad_0d":
            a["grad"] = torch.tensor(1.0, dtype=a["grad"].dtype)
        elif swap == "size_argument":
            # never negative: negative sizes are covered by
            # test_fuzz_regressions.py::test_raw_ops_refuse_negative_sizes_by_name
            a["out_features"] = max(0, case.out_features + pick([-1, 1, -case.out_features, 1 << 40]))
            a["in_features"] = max(0, case.in_features + pick([-1, 1, -case.in_features, 5]))
        elif swap == "in_index_shape":
            a["in_index"] = torch.arange(case.in_features + pick([-1, 1]))
        elif swap == "in_index_noncontiguous" and a["in_index"] is not None:
            a["in_index"] = torch.stack([a["in_index"], a["in_index"]], dim=-1)[..., 0]
    return a


def call(target, structure, a):
    forward, grad_input, grad_values = oc.ops_of(structure)
    if target == "forward":
        return forward(a["x"], a["values"], a["index"], a["out_features"], a["bias"], a["in_index"], a["out_index"])
    if target == "grad_input":
        return grad_input(a["grad"], a["values"], a["index"], a["in_features"], a["in_index"], a["out_index"])
    if target == "grad_values":
        return grad_values(a["grad"], a["x"], a["values"], a["index"], a["in_index"], a["out_index"])
    return torch.ops.padst.permute(a["x"], a["index"])


def reference(target, structure, a):
    if target == "permute":
        return a["x"].index_select(-1, a["index"])
    if target == "forward":
        return oc.dense_reference(structure, a["x"], a["values"], a["index"], a["out_features"], a["bias"],
                                  a["in_index"], a["out_index"])
    grad = a["grad"]
    x = a["x"] if target == "grad_values" else grad.new_zeros(*grad.shape[:-1], a["in_features"])
    t = oc.Tensors(a["values"], a["index"], x, None, a["in_index"], a["out_index"], grad)
    dx, dvalues = oc.reference_grads(structure, t, grad.shape[-1])
    return dx if target == "grad_input" else dvalues


def run_step(case, tensors: dict, step: dict, number: int) -> None:
    with torch.no_grad():  # in-place edits of the call's own tensors: new versions, same objects
        for kind, positions in step["edits"]:
            if kind == "restore":
                for name, original in tensors["originals"].items():
                    if tensors[name] is not None:
                        tensors[name].copy_(original)
            elif kind == "index_repeat" and tensors["index"].numel():
                tensors["index"].view(-1)[:] = tensors["index"].view(-1)[0]
            else:
                name = kind.replace("_values", "").replace("_in_range", "")
                bound = None
                if kind.endswith("_in_range"):
                    bound = {"index": oc.n_units(case.structure, case.out_features, case.in_features),
                             "in_index": case.in_features, "out_index": case.out_features}[name]
                _edit(tensors[name], positions, bound)
    a = apply_swaps({"x": tensors["x"], "values": tensors["values"], "index": tensors["index"],
                     "bias": tensors["bias"], "in_index": tensors["in_index"], "out_index": tensors["out_index"],
                     "grad": tensors["grad"], "out_features": case.out_features, "in_features": case.in_features},
                    step["swaps"], step["swap_seed"], case)
    target = step["target"]
    if target == "permute":
        a["index"] = a["in_index"] if a["in_index"] is not None else a["index"]
    if step["requires_grad"]:
        for name in ("x", "values"):
            if a[name].dtype.is_floating_point:
                a[name] = a[name].detach().requires_grad_()
    if isinstance(case.structure, Block) and target != "permute" and a["values"].dim() == 4 \
            and a["values"].shape[3] == 0:
        # zero-width blocks are covered by
        # test_fuzz_regressions.py::test_block_values_with_zero_width_blocks_are_refused_by_name
        outcomes["skipped: zero-width blocks"] += 1
        return
    kind = classify_call(target, case.structure, a)
    print(f"step {number}: {case} {target} {kind} checks={step['checks']} impl={step['implementation']} "
          f"edits={step['edits']} swaps={step['swaps']}/{step['swap_seed']}", flush=True)
    try:
        with base.set_checks(step["checks"]), oc.implementation(step["implementation"]):
            result = call(target, case.structure, a)
    except ValueError as error:
        message = str(error)
        outcomes[f"{kind}: refused"] += 1
        assert message.startswith("padst::"), f"a ValueError that does not name the op: {message}"
        assert kind in ("format", "range") or (kind == "semantic" and step["checks"]), \
            f"a {kind} call (checks={step['checks']}) was refused: {message}"
        return
    outcomes[f"{kind}: result"] += 1
    assert kind == "valid" or (kind == "semantic" and not step["checks"]), \
        f"a {kind} call (checks={step['checks']}) returned a result instead of a padst:: ValueError"
    inputs_finite = all(oc.finite(a[n]) for n in ("x", "values", "grad") if a[n].dtype.is_floating_point)
    if inputs_finite:
        assert oc.finite(result), "a finite call returned non-finite numbers"
    if kind == "valid" or target == "permute":  # permute of any in-range index is a plain gather
        with torch.no_grad():
            want = reference(target, case.structure, {k: v.detach() if torch.is_tensor(v) else v
                                                      for k, v in a.items()})
        torch.testing.assert_close(result.detach(), want, **oc.tolerances(want.dtype))


examples = 0
step_count = 0


@oc.budget(2.0)
@given(case=oc.cases(), plan=steps())
def adversarial_calls_are_refused_or_right(case, plan):
    global examples, step_count
    examples += 1
    t = oc.make_tensors(case)
    if t.in_index is None:
        t.in_index = torch.arange(case.in_features)  # a permutation to edit (identity)
    tensors = {"x": t.x, "values": t.values, "index": t.index, "bias": t.bias, "in_index": t.in_index,
               "out_index": t.out_index, "grad": t.grad}
    tensors["originals"] = {name: tensors[name].clone() for name in ("index", "in_index", "out_index")
                            if tensors[name] is not None}
    for number, step in enumerate(plan):
        step_count += 1
        run_step(case, tensors, step, number)


def main() -> int:
    try:
        adversarial_calls_are_refused_or_right()
    except BaseException:  # noqa: BLE001 - report hypothesis' falsifying example and fail
        traceback.print_exc()
        print(f"FAILED after {examples} examples, {step_count} steps", flush=True)
        return 1
    summary = ", ".join(f"{key} {count}" for key, count in sorted(outcomes.items()))
    print(f"{examples} examples, {step_count} steps: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
