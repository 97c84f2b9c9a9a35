"""Inductor integration: Triton templates for the forward ops and the traced Triton
kernels of the backward ops (CUDA)."""
