"""Optional integrations with other libraries; each module imports its library on import."""

if __name__ != "padst_compiler.integrations":  # pragma: no cover - exercised in a subprocess test
    raise ImportError(f"this package must be imported as padst_compiler.integrations, not {__name__!r}")
