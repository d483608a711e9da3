"""Triton kernels for CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``, for tests)."""
