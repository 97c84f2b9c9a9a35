"""Skip markers shared by the kernel tests."""

import pytest

from padst_compiler.kernels.cpu import native

# The native kernels are built with the system C++ compiler on first use; a machine without
# one runs the PyTorch implementations (tested apart, see test_implementations).
needs_native = pytest.mark.skipif(native.library() is None, reason="no C++ compiler: native kernels not built")
