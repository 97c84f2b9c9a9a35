"""Optional integrations with other libraries; each module imports its library on import."""

if __name__ != "padst_compiler.integrations":  # pragma: no cover - exercised in a subprocess test
    from padst_compiler.misplaced import stand_in

    stand_in(__name__, "padst_compiler.integrations")
