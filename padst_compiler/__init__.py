"""padst-compiler: structured sparse training with learned permutations, compiled.

Importing this package registers the ``torch.ops.padst`` operator set. The
``padst`` torch.compile backend is found through its entry point without an import.
"""

from padst_compiler.kernels import NM, Block, Diagonal, SparseWeight, Structure, Unstructured

__all__ = ["Block", "NM", "Diagonal", "Unstructured", "Structure", "SparseWeight", "optimize"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``optimize`` is imported on first use: importing the kernels (or the training package)
    must not import the compiler."""
    if name == "optimize":
        from padst_compiler.api import optimize

        return optimize
    raise AttributeError(f"module 'padst_compiler' has no attribute {name!r}")
