"""Backend choice: auto, the context manager and the environment variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import roialign


def test_auto_uses_a_fast_kernel_on_cpu_when_numba_is_installed():
    pytest.importorskip("numba")
    assert roialign.available_backends("cpu")[0] == "numba"


def test_use_backend_nests_and_restores():
    assert roialign.current_backend() == os.environ.get("ROIALIGN_BACKEND", "auto")
    with roialign.use_backend("reference"):
        assert roialign.current_backend() == "reference"
        with roialign.use_backend("auto"):
            assert roialign.current_backend() == "auto"
        assert roialign.current_backend() == "reference"


def test_unavailable_backend_is_a_clear_error():
    from roialign import _backend
    with roialign.use_backend("numba"), pytest.raises(RuntimeError, match="'numba' is not available.*CPU tensors only"):
        _backend.select(torch.device("meta"), "roi_align")
    with roialign.use_backend("triton"), pytest.raises(RuntimeError, match="'triton' is not available"):
        _backend.select(torch.device("meta"), "roi_align")


def test_environment_variable_forces_a_backend():
    code = ("import torch, roialign, roialign._backend as b;"
            "print(roialign.current_backend(), b.select(torch.device('cpu'), 'roi_align').__name__)")
    env = dict(os.environ, ROIALIGN_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["reference", "roialign.kernels.reference.roi_align"]
    env["ROIALIGN_BACKEND"] = "fastest"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "ROIALIGN_BACKEND must be one of" in proc.stderr
