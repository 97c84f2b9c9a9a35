"""padst-compiler: structured sparse training with learned permutations, compiled.

Importing this package registers the ``torch.ops.padst`` operator set.
"""

from padst_compiler.kernels import NM, Block, Diagonal, SparseWeight, Structure, Unstructured

__all__ = ["Block", "NM", "Diagonal", "Unstructured", "Structure", "SparseWeight"]
__version__ = "0.1.0"
