"""torch.compile sees through the ops into the Triton kernels on CUDA (``roialign.ops.common``).

No GPU is needed to check the tracing itself: AOTAutograd's functional tracing (what
torch.compile runs before inductor) is applied to CPU tensors in a child process where Triton
is not interpreted, with the switch that normally looks for CUDA tensors set to the Triton
backend. The kernels are recorded, not run. Running the compiled graph needs a GPU
(``tests/test_cuda.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import roialign  # noqa: E402
from roialign.ops import common  # noqa: E402

CHILD = textwrap.dedent("""
    import json

    import torch
    from torch._functorch.aot_autograd import aot_export_module

    import roialign
    from roialign.ops import common
    from roialign.kernels.triton import roi_align as triton_roi_align

    class Forward(torch.nn.Module):
        def forward(self, x, rois):
            return (roialign.roi_align(x, rois, 7, 0.25, 0, True),)

    class BackwardInput(torch.nn.Module):
        def forward(self, grad, rois):
            return (torch.ops.roialign.roi_align_backward(grad, rois, 0.25, 7, 7, 2, 8, 20, 24, 2, True, False),)

    class BackwardRois(torch.nn.Module):
        def forward(self, grad, x, rois):
            return (torch.ops.roialign.roi_align_backward_rois(grad, x, rois, 0.25, 7, 7, 2, True),)

    x, grad = torch.randn(2, 8, 20, 24), torch.randn(2, 8, 7, 7)
    rois = torch.tensor([[0, 1.0, 1, 30, 40], [1, 5, 5, 60, 70]])
    cases = {"forward": (Forward(), (x, rois)), "backward_input": (BackwardInput(), (grad, rois)),
             "backward_rois": (BackwardRois(), (grad, x, rois))}

    def traced(name, dynamic=False):
        module, args = cases[name]
        return aot_export_module(module, args, trace_joint=False, dynamic_shapes=dynamic)[0].code

    def counts(code):  # Triton kernels, opaque roi_align ops, batch-index checks
        calls = ("triton_kernel_wrapper_functional(", "roialign.roi_align.default", "roialign.checked_rois.default")
        return [code.count(call) for call in calls]

    found = {"cpu": counts(traced("forward"))}
    common._triton_for_tracing = lambda device, operator: triton_roi_align  # as for CUDA tensors under the Triton backend
    for name in cases:
        for dynamic in (False, True):
            found[f"{name} {dynamic}"] = counts(traced(name, dynamic))
    found["export"] = counts(str(torch.export.export(Forward(), (x, rois)).graph))
    print(json.dumps(found))
""")


@pytest.fixture(scope="module")
def child_output() -> dict[str, list[int]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("dynamic", ["False", "True"])
@pytest.mark.parametrize("name", ["forward", "backward_input", "backward_rois"])
def test_traced_graph_holds_the_triton_kernel_not_the_op(child_output, name, dynamic):
    kernels, opaque, checks = child_output[f"{name} {dynamic}"]
    if not common.tracing_into_triton_supported():
        # An older torch (no wrap_triton, no torch.export switch): the op stays whole, which is
        # correct and compiles; nothing of the rule may leak into the graph.
        # ("opaque" counts roialign.roi_align itself, so it is 1 in the forward graph only.)
        assert (kernels, opaque, checks) == (0, 1 if name == "forward" else 0, 0)
        return
    assert kernels == 1 and opaque == 0
    # The forward keeps the batch-index check, which needs the boxes' values, as an opaque op.
    assert checks == (1 if name == "forward" else 0)


def test_export_and_cpu_tensors_keep_the_op_whole(child_output):
    assert child_output["export"][:2] == [0, 1]
    assert child_output["cpu"] == [0, 1, 0]


def test_only_the_triton_backend_on_cuda_is_traced_into():
    cuda = torch.device("cuda")
    assert common._triton_for_tracing(torch.device("cpu"), "roi_align") is None
    want = "roialign.kernels.triton.roi_align" if common.tracing_into_triton_supported() else None
    assert getattr(common._triton_for_tracing(cuda, "roi_align"), "__name__", None) == want
    with roialign.use_backend("reference"):
        assert common._triton_for_tracing(cuda, "roi_align") is None


def test_checked_rois_raises_and_copies():
    rois = torch.tensor([[1.0, 0, 0, 4, 4]])
    copy = torch.ops.roialign.checked_rois(rois, 2)
    assert torch.equal(copy, rois) and copy.data_ptr() != rois.data_ptr()
    with pytest.raises(IndexError, match="batch indices"):
        torch.ops.roialign.checked_rois(rois, 1)
