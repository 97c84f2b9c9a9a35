"""Sparsity structures, their compressed formats and the ``padst`` operator set.

Depends on nothing else in the project (design section 7).
"""

if __name__ != "padst_compiler.kernels":  # pragma: no cover - exercised in a subprocess test
    from padst_compiler.misplaced import stand_in

    stand_in(__name__, "padst_compiler.kernels")

from padst_compiler.kernels.eager import derived, select
from padst_compiler.kernels.ops import registry  # noqa: F401  (registers torch.ops.padst.*)
from padst_compiler.kernels.ops.checks import checks_enabled, set_checks
from padst_compiler.kernels.structures import (
    NM,
    Block,
    Diagonal,
    SparseWeight,
    Structure,
    Unstructured,
)

__all__ = [
    "Block",
    "NM",
    "Diagonal",
    "Unstructured",
    "Structure",
    "SparseWeight",
    "checks_enabled",
    "set_checks",
    "cache_summary",
    "clear_caches",
]


def cache_summary() -> dict:
    """What the kernels keep between calls: results derived from live tensors, by kind (they
    are freed with their tensors), and the implementation chosen per op and shape regime
    (the only process-wide decision, a few entries per shape)."""
    return {"derived": derived.summary(), "implementation_choices": select.choices()}


def clear_caches() -> None:
    """Forget both (a benchmark that must start cold; the next calls recompute and re-measure)."""
    derived.clear()
    select.clear()
