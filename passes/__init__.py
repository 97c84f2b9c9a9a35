"""Compiler passes over torch.fx graphs, one module per pass (design section 5)."""

if __name__ != "padst_compiler.passes":  # pragma: no cover - exercised in a subprocess test
    raise ImportError(f"this package must be imported as padst_compiler.passes, not {__name__!r}")
