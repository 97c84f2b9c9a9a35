"""padst-compiler: structured sparse training with learned permutations, compiled.

Importing this package registers the ``torch.ops.padst`` operator set. The
``padst`` torch.compile backend is found through its entry point without an import.
"""

import importlib

from padst_compiler.kernels import NM, Block, Diagonal, SparseWeight, Structure, Unstructured

__all__ = ["Block", "NM", "Diagonal", "Unstructured", "Structure", "SparseWeight", "optimize", "save", "load",
           "densify", "export", "load_package", "keep_freed_memory"]
_LAZY = {"optimize": "padst_compiler.api", "save": "padst_compiler.checkpoint",
         "load": "padst_compiler.checkpoint", "densify": "padst_compiler.training.densify",
         "export": "padst_compiler.deploy", "load_package": "padst_compiler.deploy",
         "keep_freed_memory": "padst_compiler.allocator"}
__version__ = "0.1.0"


def __getattr__(name: str):
    """The entry points below the kernels are imported on first use: importing the kernels (or
    the training package) must not import the compiler."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'padst_compiler' has no attribute {name!r}")
