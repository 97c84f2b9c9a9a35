"""Compiler passes over torch.fx graphs, one module per pass (design section 5)."""

if __name__ != "padst_compiler.passes":  # pragma: no cover - exercised in a subprocess test
    from padst_compiler.misplaced import stand_in

    stand_in(__name__, "padst_compiler.passes")
