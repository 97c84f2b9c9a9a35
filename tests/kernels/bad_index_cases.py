"""Every raw op, every implementation, indices that point outside their tensors or repeat
(run in a subprocess by test_memory_safety.py, with the value checks off: a crash here must
not take the test session with it). Prints one line per case; exits 0 only if every case
either raised a ValueError that names the index or returned a finite result."""

import sys

import torch

from padst_compiler.kernels import NM, Block, Diagonal, set_checks
from padst_compiler.kernels.eager import select

OUT, IN, TOKENS = 64, 64, (1, 5, 33)
OPS = {"block": torch.ops.padst.block_linear, "nm": torch.ops.padst.nm_linear, "diag": torch.ops.padst.diag_linear}
STRUCTURES = {"block": Block(8, 8), "nm": NM(8), "diag": Diagonal()}


def bad_indices(name, index):
    """(label, index, must_raise): out of range must raise, repeats must not crash."""
    huge = index.clone().view(-1)
    huge[0] = 1 << 40
    past = index.clone().view(-1)
    past[-1] = {"block": IN // 8, "nm": 8, "diag": max(OUT, IN)}[name]
    negative = index.clone().view(-1)
    negative[0] = -1
    repeated = index.clone().view(-1)
    repeated[:] = repeated[0]
    return [("huge", huge.view_as(index), True), ("one past the end", past.view_as(index), True),
            ("negative", negative.view_as(index), True), ("repeated", repeated.view_as(index), False)]


def bad_permutations():
    perm = torch.randperm(IN)
    return [("permutation holding its length", torch.where(perm == 0, IN, perm), True),
            ("permutation holding 1 << 40", torch.where(perm == 0, 1 << 40, perm), True),
            ("duplicated permutation", torch.zeros(IN, dtype=torch.long), False)]


def calls(name, values, index, x, in_index=None, out_index=None):
    op = OPS[name]
    grad = torch.randn(x.shape[0], OUT)
    grad_input = getattr(torch.ops.padst, f"{name}_linear_grad_input")
    grad_values = getattr(torch.ops.padst, f"{name}_linear_grad_values")
    return {"forward": lambda: op(x, values, index, OUT, None, in_index, out_index),
            "grad_input": lambda: grad_input(grad, values, index, IN, in_index, out_index),
            "grad_values": lambda: grad_values(grad, x, values, index, in_index, out_index)}


def main() -> int:
    failures = cases = 0
    for name, structure in STRUCTURES.items():
        weight = structure.project(torch.randn(OUT, IN), 0.75)
        for implementation in ("native", "torch", "dense"):
            for tokens in TOKENS:
                x = torch.randn(tokens, IN)
                trials = [(label, index, None, None, must_raise) for label, index, must_raise in
                          bad_indices(name, weight.index)]
                trials += [(f"in_index {label}", weight.index, perm, None, must_raise)
                           for label, perm, must_raise in bad_permutations()]
                trials += [(f"out_index {label}", weight.index, None, perm, must_raise)
                           for label, perm, must_raise in bad_permutations()]
                for label, index, in_index, out_index, must_raise in trials:
                    for call, run in calls(name, weight.values, index, x, in_index, out_index).items():
                        cases += 1
                        try:
                            with set_checks(False), select.only(implementation):
                                result = run()
                            outcome = "finite" if bool(torch.isfinite(result).all()) else "NOT FINITE"
                        except ValueError as error:
                            outcome = f"ValueError: {error}"
                        ok = outcome.startswith("ValueError") and "outside" in outcome if must_raise \
                            else outcome == "finite"
                        failures += not ok
                        print(f"{'ok ' if ok else 'BAD'} {name} {implementation} {tokens} tokens {label} {call}: "
                              f"{outcome}", flush=True)
    print(f"{cases} cases, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
