"""Numba kernels for CPU tensors: multi-threaded, bitwise deterministic."""
