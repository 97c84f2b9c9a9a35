"""Triton kernels of the structured ops and their launchers (CUDA, or CPU tensors under
``TRITON_INTERPRET=1``)."""
