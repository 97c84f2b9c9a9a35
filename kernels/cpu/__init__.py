"""The native C++ kernels (fp32, CPU) and their ctypes calls."""
