"""PA-DST training: structured sparse layers with learned permutations (design section 2)."""

if __name__ != "padst_compiler.training":  # pragma: no cover - exercised in a subprocess test
    raise ImportError(f"this package must be imported as padst_compiler.training, not {__name__!r}")

from padst_compiler.kernels.structures import NM, Block, Diagonal, Structure, Unstructured

__all__ = ["Block", "NM", "Diagonal", "Unstructured", "Structure"]
