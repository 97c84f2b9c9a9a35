"""padst-compiler: structured sparse training with learned permutations, compiled.

Importing this package registers the ``torch.ops.padst`` operator set. The
``padst`` torch.compile backend is found through its entry point without an import.
"""

from padst_compiler.api import optimize
from padst_compiler.kernels import NM, Block, Diagonal, SparseWeight, Structure, Unstructured

__all__ = ["Block", "NM", "Diagonal", "Unstructured", "Structure", "SparseWeight", "optimize"]
__version__ = "0.1.0"
