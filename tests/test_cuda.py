"""The Triton backend on a real GPU: run with ``python -m pytest -m gpu`` on a CUDA machine.

Excluded from the default run (CI has no GPU; the same kernels are tested there through Triton's
interpreter). Compares CUDA results with the numba backend's on CPU for the random-case table,
checks that the backward is bitwise deterministic, and compiles the op with inductor (which
must then see the Triton kernels themselves).
"""

from __future__ import annotations

import pytest
import torch

import roialign
from cases import random_case

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device")


def _both(case, dtype, device):
    # detach() first: for float64 on the CPU, to() returns the case's own tensor, and the case
    # must not be turned into a leaf that requires grad (the CUDA copy would then be no leaf).
    x = case.x.detach().to(device, dtype).requires_grad_()
    rois = case.rois.detach().to(device, dtype).requires_grad_()
    out = torch.ops.roialign.roi_align(x, rois, *case.args())
    out.backward(torch.linspace(-1, 1, out.numel(), device=device, dtype=dtype).reshape(out.shape))
    return [t.detach().cpu().double() for t in (out, x.grad, rois.grad)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(300))
def test_cuda_matches_cpu(seed, dtype):
    case = random_case(seed)
    with roialign.use_backend("numba"):
        want = _both(case, dtype, "cpu")
    with roialign.use_backend("triton"):
        got = _both(case, dtype, "cuda")
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got[0], want[0], equal_nan=True, **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    torch.testing.assert_close(got[2], want[2], equal_nan=True, atol=2e-4, rtol=1e-4)


def test_cuda_backward_is_bitwise_deterministic():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 100, 136, generator=gen).cuda().requires_grad_()
    xy = torch.rand(1024, 2, generator=gen) * 800
    rois = torch.cat((torch.randint(0, 2, (1024, 1), generator=gen).float(), xy, xy + 4 + torch.rand(1024, 2) * 300), 1)
    grads = []
    for _ in range(3):
        x.grad = None
        roialign.roi_align(x, rois.cuda(), 7, 1 / 8, 2, True).square().sum().backward()
        grads.append(x.grad.clone())
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_types(dtype):
    case = random_case(5)
    with roialign.use_backend("numba"):
        want = _both(case, torch.float32, "cpu")[0]
    got = roialign.roi_align(case.x.to("cuda", dtype), case.rois.cuda().float(), case.output_size, *case.args()[:1],
                             case.sampling_ratio, case.aligned)
    torch.testing.assert_close(got.cpu().double(), want, atol=2e-2, rtol=2e-2, equal_nan=True)


@pytest.mark.parametrize("dynamic", [False, True])
def test_cuda_compile_sees_the_triton_kernels(dynamic):
    """Inductor receives our Triton kernels (not an opaque op), forward and backward, and the
    compiled graph gives the eager numbers, gradients included."""
    from torch._inductor.utils import run_and_get_code

    def f(x, rois):
        return roialign.roi_align(x, rois, 7, 0.25, 2, True).relu().mean()

    torch._dynamo.reset()
    x = torch.randn(2, 16, 40, 50, device="cuda", requires_grad=True)
    rois = torch.tensor([[0, 4.0, 4.0, 90.0, 120.0], [1, 30.0, 8.0, 150.0, 60.0]], device="cuda",
                        requires_grad=True)
    want = f(x, rois)
    want_grads = torch.autograd.grad(want, (x, rois))
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)

    def run():
        out = compiled(x, rois)
        return out, torch.autograd.grad(out, (x, rois))

    (got, got_grads), code = run_and_get_code(run)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)
    source = "\n".join(code)
    for kernel in ("_forward_kernel", "_backward_input_kernel", "_backward_rois_kernel"):
        assert kernel in source
    assert "roialign.roi_align.default" not in source


def test_cuda_compiled_graph_still_raises_for_bad_batch_index():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, r: roialign.roi_align(x, r, 2, 1.0, 2, True), fullgraph=True)
    with pytest.raises(IndexError, match="batch indices"):
        compiled(torch.randn(2, 4, 10, 12, device="cuda"), torch.tensor([[2.0, 1, 1, 5, 5]], device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(100))
def test_cuda_rotated_matches_cpu(seed, dtype):
    from test_rotated import random_rotated_case

    x, rois, scale, pooled, sr, aligned, clockwise, degrees = random_rotated_case(seed)
    unit = "degrees" if degrees else "radians"

    def run(device):
        xt = x.detach().to(device, dtype).requires_grad_()  # detach(): see _both
        rt = rois.detach().to(device).requires_grad_()
        out = roialign.roi_align_rotated(xt, rt, pooled, scale, sr, aligned=aligned, clockwise=clockwise,
                                         angle_unit=unit)
        out.backward(torch.linspace(-1, 1, out.numel(), device=device, dtype=dtype).reshape(out.shape))
        return [t.detach().cpu().double() for t in (out, xt.grad, rt.grad)]

    with roialign.use_backend("numba"):
        want = run("cpu")
    with roialign.use_backend("triton"):
        got = run("cuda")
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got[0], want[0], equal_nan=True, **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    torch.testing.assert_close(got[2], want[2], equal_nan=True, atol=2e-4, rtol=1e-4)


def test_cuda_rotated_gradcheck_and_determinism():
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, device="cuda", requires_grad=True)
    coords = torch.tensor([[3.3, 3.1, 4.2, 2.7, 17.0], [1.2, 5.6, 5.3, 3.9, -130.0]], dtype=torch.float64,
                          device="cuda", requires_grad=True)
    batch = torch.tensor([[0.0], [1.0]], dtype=torch.float64, device="cuda")
    with roialign.use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda a, b: roialign.roi_align_rotated(a, torch.cat((batch, b), 1), (3, 2), 1.0, 2), (x, coords))
        gen = torch.Generator().manual_seed(0)
        feats = torch.randn(2, 256, 100, 136, generator=gen).cuda().requires_grad_()
        rois = torch.cat((torch.randint(0, 2, (1024, 1), generator=gen).float(), torch.rand(1024, 2, generator=gen) * 800,
                          4 + torch.rand(1024, 2, generator=gen) * 300, torch.rand(1024, 1, generator=gen) * 360), 1)
        grads = []
        for _ in range(3):
            feats.grad = None
            roialign.roi_align_rotated(feats, rois.cuda(), 7, 1 / 8, 2).square().sum().backward()
            grads.append(feats.grad.clone())
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("mode", ["max", "onnx_max"])
@pytest.mark.parametrize("seed", range(60))
def test_cuda_max_mode_matches_cpu(seed, mode):
    case = random_case(seed)
    args = (case.output_size, case.spatial_scale, case.sampling_ratio, case.aligned)

    def run(device):
        x = case.x.detach().to(device).requires_grad_()
        rois = case.rois.detach().to(device).requires_grad_()
        out = roialign.roi_align(x, rois, *args, mode=mode)
        out.backward(torch.linspace(-1, 1, out.numel(), device=device, dtype=out.dtype).reshape(out.shape))
        return [t.detach().cpu() for t in (out, x.grad, rois.grad)]

    with roialign.use_backend("numba"):
        want = run("cpu")
    with roialign.use_backend("triton"):
        got = run("cuda")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, atol=1e-10, rtol=1e-10)


def test_cuda_max_mode_backward_is_bitwise_deterministic():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 100, 136, generator=gen).cuda().requires_grad_()
    xy = torch.rand(1024, 2, generator=gen) * 800
    rois = torch.cat((torch.randint(0, 2, (1024, 1), generator=gen).float(), xy, xy + 4 + torch.rand(1024, 2) * 300), 1)
    for mode in ("max", "onnx_max"):
        grads = []
        for _ in range(3):
            x.grad = None
            roialign.roi_align(x, rois.cuda(), 7, 1 / 8, 2, True, mode=mode).square().sum().backward()
            grads.append(x.grad.clone())
        assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("seed", range(40))
def test_cuda_prroi_pool_matches_cpu(seed):
    case = random_case(seed)

    def run(device):
        x = case.x.detach().to(device).requires_grad_()
        rois = case.rois.detach().to(device).requires_grad_()
        out = roialign.prroi_pool(x, rois, case.output_size, case.spatial_scale)
        out.backward(torch.linspace(-1, 1, out.numel(), device=device, dtype=out.dtype).reshape(out.shape))
        return [t.detach().cpu() for t in (out, x.grad, rois.grad)]

    with roialign.use_backend("numba"):
        want = run("cpu")
    with roialign.use_backend("triton"):
        got = run("cuda")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_prroi_pool_dtypes_and_determinism(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 100, 136, generator=gen).to("cuda", dtype).requires_grad_()
    xy = torch.rand(1024, 2, generator=gen) * 800
    rois = torch.cat((torch.randint(0, 2, (1024, 1), generator=gen).float(), xy, xy + 4 + torch.rand(1024, 2) * 300), 1)
    rois = rois.cuda().requires_grad_()
    grads = []
    for _ in range(2):
        x.grad, rois.grad = None, None
        out = roialign.prroi_pool(x, rois, 7, 1 / 8)
        out.float().square().sum().backward()
        grads.append((out.detach().clone(), x.grad.clone(), rois.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1]))
    with roialign.use_backend("numba"):
        want = roialign.prroi_pool(x.detach().cpu().float(), rois.detach().cpu(), 7, 1 / 8)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grads[0][0].cpu().float(), want, atol=tol, rtol=tol)
