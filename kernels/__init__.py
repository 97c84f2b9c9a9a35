"""Sparsity structures, their compressed formats and the ``padst`` operator set.

Depends on nothing else in the project (design section 7).
"""

if __name__ != "padst_compiler.kernels":  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        f"this package must be imported as padst_compiler.kernels, not {__name__!r}; "
        "install the project (pip install -e .) and import it through padst_compiler"
    )

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
]
