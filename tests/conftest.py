import os

import pytest

import roialign


def cpu_backends() -> list[str]:
    """Backends under test on CPU tensors: ROIALIGN_TEST_BACKENDS, else every one available."""
    chosen = os.environ.get("ROIALIGN_TEST_BACKENDS")
    if chosen:
        return chosen.split(",")
    return [b for b in roialign.available_backends("cpu") if b != "triton" or os.environ.get("TRITON_INTERPRET") == "1"]


@pytest.fixture(params=cpu_backends())
def backend(request):
    with roialign.use_backend(request.param):
        yield request.param
