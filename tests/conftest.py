import importlib.util
import os

import pytest
import torch

# Without a GPU, the Triton kernels are tested on CPU tensors through Triton's interpreter, which
# must be switched on before any kernel is defined.
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import roialign  # noqa: E402


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    import numpy
    import triton
    from interpreter_probe import interpreter_problem

    problem = interpreter_problem()
    if problem is not None:
        pytest.exit(f"Triton {triton.__version__}'s interpreter cannot run the Triton backend's tests with numpy "
                    f"{numpy.__version__} ({problem}); triton <= 3.5 needs numpy < 2.4 for them", returncode=3)

# The interpreter runs each Triton program in Python: it gets every k-th case of the long tables,
# and the modules below (correctness, peers, layouts, bad input), less the tests marked
# ``interpreter_heavy``; opcheck, compile and gradcheck of this backend belong to a GPU run.
INTERPRETED_STRIDE = {"seed": 10}
INTERPRETED_MODULES = {"test_bands.py", "test_correctness.py", "test_errors.py", "test_layouts.py", "test_onnx_peer.py",
                       "test_rotated.py", "test_max_mode.py", "test_prroi_pool.py"}


def cpu_backends() -> list[str]:
    """Backends under test on CPU tensors: ROIALIGN_TEST_BACKENDS, else every one available."""
    chosen = os.environ.get("ROIALIGN_TEST_BACKENDS")
    if chosen:
        return chosen.split(",")
    return roialign.available_backends("cpu")


@pytest.fixture(params=cpu_backends())
def backend(request):
    with roialign.use_backend(request.param):
        yield request.param


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        interpreted = params.get("backend") == "triton"
        seed = params.get("seed")
        skip = interpreted and (item.path.name not in INTERPRETED_MODULES
                                or item.get_closest_marker("interpreter_heavy") is not None
                                or (seed is not None and seed % INTERPRETED_STRIDE["seed"] != 0))
        (drop if skip else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
