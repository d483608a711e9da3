"""Kernels behind ``torch.ops.roialign``, one folder per backend and one file per operator.

``reference/`` (pure PyTorch, any device), ``cpu/`` (Numba) and ``triton/`` (CUDA); in each,
``common.py`` holds what that backend's operators share. An operator's module offers
``forward``, ``backward_input`` and ``backward_rois``.
"""
