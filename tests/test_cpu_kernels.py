"""The numba backend: determinism, threads, fork, both forward kernels, warm-up."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

import oracle  # noqa: E402
import roialign  # noqa: E402
from roialign.kernels.cpu import roi_align as cpu_roi_align  # noqa: E402


def problem(seed=0, k=300):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 24, 30, 40, generator=gen)
    xy = torch.rand(k, 2, generator=gen) * torch.tensor([150.0, 110.0])
    wh = 2 + torch.rand(k, 2, generator=gen) * 60
    rois = torch.cat((torch.randint(0, 2, (k, 1), generator=gen).float(), xy, xy + wh), 1)
    return x, rois


def run(x, rois, threads=None):
    if threads is not None:
        torch.set_num_threads(threads)
    x = x.detach().clone().requires_grad_()
    rois = rois.detach().clone().requires_grad_()
    with roialign.use_backend("numba"):
        out = roialign.roi_align(x, rois, (7, 5), 0.25, 0, True)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), x.grad, rois.grad


def test_backward_is_bitwise_deterministic_and_independent_of_threads():
    x, rois = problem()
    before = torch.get_num_threads()
    try:
        results = [run(x, rois, threads) for threads in (2, 2, 1, 3)]
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_concurrent_calls_from_python_threads():
    x, rois = problem(1)
    want = run(x, rois)
    got, errors = [None] * 6, []

    def work(i):
        try:
            got[i] = run(x, rois)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and all(g is not None for g in got)
    for g in got:
        for a, b in zip(want, g):
            assert torch.equal(a, b)


def test_jobs_run_on_pytorchs_openmp_threads_where_it_has_them(monkeypatch):
    """On Linux with PyTorch's GNU OpenMP, a kernel's jobs run on PyTorch's OpenMP threads (foreign
    to Python, so they show up as dummy threads), else on our pool's; an error in a job is raised
    by the call either way, and the jobs after it do not start."""
    import sys
    import time

    from roialign.kernels.cpu.threads import workers

    expected = sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info()
    assert (workers._gomp is not None) == expected
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for openmp in (True, False):
            monkeypatch.setattr(workers, "openmp", openmp)
            names = []

            def job(i):
                time.sleep(0.01)  # releases the GIL: both threads take jobs
                names.append(threading.current_thread().name)
                if i == 7:
                    raise ValueError("job 7")

            workers.run(job, [(i,) for i in range(6)])
            others = {n for n in names if n != threading.current_thread().name}
            assert len(names) == 6 and len(others) == 1
            assert others.pop().startswith("Dummy" if openmp and expected else "roialign")
            names.clear()
            with pytest.raises(ValueError, match="job 7"):
                workers.run(job, [(i,) for i in range(7, 40)])
            assert len(names) < 33
    finally:
        torch.set_num_threads(before)


def test_both_kinds_of_threads_give_the_same_bits(monkeypatch):
    from roialign.kernels.cpu.threads import workers

    x, rois = problem(4)
    before = torch.get_num_threads()
    try:
        results = []
        for openmp in (True, False):
            monkeypatch.setattr(workers, "openmp", openmp)
            results.append(run(x, rois, 2))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _kernels_only(x, rois):
    """Forward and both backward operators, without autograd or other large PyTorch ops."""
    with roialign.use_backend("numba"):
        out = torch.ops.roialign.roi_align(x, rois, 0.25, 7, 5, 0, True)
        grad_x = torch.ops.roialign.roi_align_backward(out, rois, 0.25, 7, 5, *x.shape, 0, True, False)
        grad_rois = torch.ops.roialign.roi_align_backward_rois(out, x, rois, 0.25, 7, 5, 0, True)
    return [t.numpy() for t in (out, grad_x, grad_rois)]


def _child(queue):
    queue.put(_kernels_only(*problem(2)))


def test_forked_child_after_parent_used_the_kernels():
    """The child gets a fresh thread pool; the parent's (now missing) threads are never waited on.

    (PyTorch's own OpenMP-parallel operators are not fork-safe: a forked child that keeps more than
    one torch thread must avoid them, which is why DataLoader workers run with one; see below.)"""
    want = _kernels_only(*problem(2))  # the parent's pool now exists and has run
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    for a, b in zip(want, got):
        assert np.array_equal(a, b)


class _Crops(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        x, rois = problem(10 + i, k=50)
        return run(x, rois)


def test_dataloader_workers_started_with_fork():
    run(*problem(0))  # the parent has used the kernels, forward and backward, with its threads
    loader = torch.utils.data.DataLoader(_Crops(), batch_size=None, num_workers=2, multiprocessing_context="fork",
                                         timeout=120)
    for i, got in enumerate(loader):
        for a, b in zip(_Crops()[i], got):
            assert torch.equal(a, b)


@pytest.mark.parametrize("planar", [False, True])
def test_both_forward_kernels_match_the_oracle(monkeypatch, planar):
    monkeypatch.setattr(cpu_roi_align, "_planar_is_cheaper", lambda *args: planar)
    x, rois = problem(3, k=20)
    x = x[:, :3].contiguous()
    with roialign.use_backend("numba"):
        out = roialign.roi_align(x, rois, 3, 0.25, 2, False)
    want, _, _ = oracle.roi_align(x.double().numpy(), rois.double().numpy(), 0.25, 3, 3, 2, False)
    torch.testing.assert_close(out.double(), torch.from_numpy(want), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("sampling_ratio, aligned", [(2, True), (0, False), (3, True)])
def test_every_forward_path_gives_the_same_bits(monkeypatch, dtype, sampling_ratio, aligned):
    """The planar kernel (NCHW read in place), the transposing one with taps added one per pass or
    grouped (eight per pass for float maps, four for halves), and channels_last input (bfloat16 read as words of two channels, or one by one) are
    chosen by problem size and alignment, never by a result: their outputs must be bitwise
    identical (signed zeros included)."""
    x, rois = problem(7, k=60)
    x, rois = x.to(dtype), rois.to(dtype)
    x[1, 3, 4, 5] = float("inf")
    x[:, 2] = -0.0  # a channel of negative zeros: every sum of it must come out +0.0
    x[0, 4, :6] = -x[0, 4, :6].abs()
    rois[5, 2] = float("nan")  # NaN in every output of that box
    rois[6, 3] = rois[6, 1] - 3  # inverted
    outputs = []
    words = cpu_roi_align.bfloat16_words
    for planar, layout, grouped, by_words in ((True, torch.contiguous_format, 0, True),
                                              (False, torch.contiguous_format, 0, True),
                                              (False, torch.contiguous_format, 1 << 60, True),
                                              (False, torch.channels_last, 0, True),
                                              (False, torch.channels_last, 0, False),
                                              (False, torch.channels_last, 1 << 60, True)):
        monkeypatch.setattr(cpu_roi_align, "_planar_is_cheaper", lambda *args, planar=planar: planar)
        monkeypatch.setattr(cpu_roi_align, "GROUPED_RUN_BYTES", grouped)
        monkeypatch.setattr(cpu_roi_align, "bfloat16_words", words if by_words else lambda a: None)
        with roialign.use_backend("numba"):
            outputs.append(roialign.roi_align(x.contiguous(memory_format=layout), rois, (5, 4), 0.25,
                                              sampling_ratio, aligned))
    bits = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    assert outputs[0][5].isnan().all()
    assert (outputs[0][torch.arange(len(rois)) != 5, 2].view(bits) == 0).all()  # +0.0, not -0.0
    for out in outputs[1:]:
        assert torch.equal(out.isnan(), outputs[0].isnan())
        assert torch.equal(out.nan_to_num().view(bits), outputs[0].nan_to_num().view(bits))


def _reference_counts_in_loops(llvm_ir: str, name: str) -> list[str]:
    """The ``NRT_incref``/``NRT_decref`` calls inside a loop of the compiled function ``name``: the
    natural loops of its control-flow graph (LLVM's is reducible), found from the back edges of
    a depth-first walk."""
    import re

    def symbol(function: str) -> str:
        match = re.match(r"define [^@]*@([^\s(]+)\(", function)
        return match.group(1) if match else ""

    body = next(f for f in re.split(r"\n(?=define )", llvm_ir)
                if symbol(f).startswith("_ZN") and f"{name}B" in symbol(f) and "cpython" not in symbol(f))
    blocks, label = {}, "entry"
    for line in body.split("\n")[1:]:
        match = re.match(r"^([\w.\-]+):", line)
        if match:
            label = match.group(1)
        blocks.setdefault(label, []).append(line)
    succ = {b: set(re.findall(r"label %([\w.\-]+)", "\n".join(lines))) for b, lines in blocks.items()}
    pred = {b: set() for b in blocks}
    for b, targets in succ.items():
        for t in targets:
            pred.setdefault(t, set()).add(b)
    start = next(iter(blocks))
    state, back, stack = {start: 1}, [], [(start, iter(sorted(succ[start])))]
    while stack:
        node, successors = stack[-1]
        target = next(successors, None)
        if target is None:
            state[node] = 2
            stack.pop()
        elif state.get(target) == 1:
            back.append((node, target))
        elif target not in state:
            state[target] = 1
            stack.append((target, iter(sorted(succ.get(target, ())))))
    in_loops = set()
    for tail, head in back:
        loop, work = {head, tail}, [tail]
        while work:
            node = work.pop()
            for p in pred.get(node, ()) if node != head else ():
                if p not in loop:
                    loop.add(p)
                    work.append(p)
        in_loops |= loop
    return [line.strip() for b in in_loops for line in blocks.get(b, []) if "@NRT_incref" in line or "@NRT_decref" in line]


@pytest.mark.parametrize("kernel, dtype", [("roi_align", torch.float32), ("roi_align rows", torch.float32),
                                           ("prroi_pool", torch.float32), ("roi_align", torch.bfloat16),
                                           ("roi_align rows", torch.bfloat16), ("roi_align words", torch.bfloat16)])
def test_hot_forward_loops_take_no_reference_counts(kernel, dtype, monkeypatch):
    """Numba takes a reference count on each array an inlined helper is given, which LLVM removes
    only for some shapes of the helper (see ``common.weigh_taps``); left in a loop they are atomic
    operations per bin. The channels-last forwards (RoIAlign's box by box, for NCHW input, and by
    rows, for channels_last input) are compiled afresh (the cached code cannot be inspected) and
    their loops searched, for float32 and for bfloat16 (read as bit patterns, widened per tap, or
    as words of two channels)."""
    import numba

    from roialign.kernels.cpu import prroi_pool as cpu_prroi

    module, name = {"roi_align": (cpu_roi_align, "_forward_nhwc"), "roi_align rows": (cpu_roi_align, "_forward_bins"),
                    "roi_align words": (cpu_roi_align, "_forward_bins_words"), "prroi_pool": (cpu_prroi, "_forward")}[kernel]
    fresh = numba.njit(nogil=True)(getattr(module, name).py_func)
    monkeypatch.setattr(module, name, fresh)
    monkeypatch.setattr(cpu_roi_align, "GROUPED_RUN_BYTES", 0)
    if kernel == "roi_align rows":  # bfloat16 element by element, not as words of two channels
        monkeypatch.setattr(cpu_roi_align, "bfloat16_words", lambda a: None)
    x = torch.randn(1, 8, 9, 10, dtype=dtype)
    if kernel != "roi_align":
        x = x.contiguous(memory_format=torch.channels_last)
    rois = torch.tensor([[0, 1.0, 1.5, 7.0, 6.0], [0, 0.5, 0.5, 3.0, 2.0]])
    with roialign.use_backend("numba"):
        if kernel.startswith("roi_align"):
            roialign.roi_align(x, rois, 3, 1.0, 2, True)
        else:
            roialign.prroi_pool(x, rois, 3, 1.0)
    assert fresh.signatures
    for signature in fresh.signatures:
        assert _reference_counts_in_loops(fresh.inspect_llvm(signature), name) == []


def test_warmup_compiles_everything(monkeypatch):
    import numba

    from roialign.ops import common as ops_common

    # fresh dispatchers, so that only warmup() can have compiled (or loaded) these two
    for module, name in ((cpu_roi_align, "_forward_bins_words"), (ops_common, "_first_bad_index")):
        monkeypatch.setattr(module, name, numba.njit(nogil=True, cache=True)(getattr(module, name).py_func))
    roialign.warmup()
    # bfloat16 read as words of two channels, and the batch-index check in float32 and float64
    assert cpu_roi_align._forward_bins_words.signatures
    assert len(ops_common._first_bad_index.signatures) >= 2
    from roialign.kernels.cpu import roi_align_max

    # float32 and float64 of each max-mode kernel are compiled (or loaded from the cache) by now
    for kernel in (roi_align_max._forward, roi_align_max._backward_input, roi_align_max._backward_rois):
        assert len(kernel.signatures) >= 2, (kernel, kernel.signatures)
    # and the transposes of channels_last output gradients: half bit patterns and float32 read
    # through a permuted (non-contiguous) view
    from roialign.kernels.cpu import common

    layouts = {(args[0].dtype.name, args[0].layout, args[3].dtype.name) for args in common.transpose_boxes.signatures}
    for source, target in (("float32", "float64"), ("int16", "float32"), ("uint16", "float64")):
        assert (source, "A", target) in layouts, layouts


@pytest.mark.parametrize("seed", range(4))
def test_counting_order_is_a_stable_sort_of_the_non_negative_keys(seed):
    """The row order of the forwards: the same permutation as NumPy's stable sort, negative keys
    (boxes with nothing to pool) left out."""
    from roialign.kernels.cpu.common import counting_order

    rng = np.random.default_rng(seed)
    key = rng.integers(-1, [1, 3, 40, 1000][seed], size=[0, 7, 300, 5000][seed]).astype(np.int64)
    expected = np.argsort(key, kind="stable")
    expected = expected[key[expected] >= 0]
    got = counting_order(key)
    assert got.dtype == np.int64 and np.array_equal(got, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [50, 200_000])  # a counting sort, then a merge sort of the keys
def test_band_order_sorts_every_box_by_image_band_then_first_column(dtype, width):
    """The order in which the box-by-box kernels take the boxes: all of them, once, by image, by
    band of first rows (as tall as the boxes' mean height, each clamped to [1, H] pixel rows), then
    by first column (ties in index order), whatever their coordinates."""
    from roialign.kernels.cpu.common import band_order

    rng = np.random.default_rng(0)
    boxes = np.column_stack([rng.integers(0, 3, 200), rng.uniform(-20, 60, (200, 4))]).astype(dtype)
    boxes[:, 3:] += np.abs(rng.normal(0, 20, (200, 2))).astype(dtype)
    boxes[:5, 2] = [np.nan, np.inf, -np.inf, 1e30, -1e30]
    boxes[5:8, 1] = [np.nan, np.inf, -1e30]
    boxes[8:11, 0] = [-1, 7, np.nan]  # out of range: clamped into the key (the kernels skip them)
    order = band_order(boxes, 0.5, 3, 40, width)
    assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(200))
    b64 = boxes.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        heights = (b64[:, 4] - b64[:, 2]) * 0.5
        band = max(1, int(np.clip(heights[np.isfinite(heights)], 1, 40).mean()))
        image = np.clip(np.nan_to_num(np.floor(b64[:, 0])), 0, 2)
        top = np.clip(np.nan_to_num(np.floor(b64[:, 2] * 0.5), nan=0.0, posinf=40, neginf=-1), -1, 40)
        left = np.clip(np.nan_to_num(np.floor(b64[:, 1] * 0.5), nan=0.0, posinf=width, neginf=-1), -1, width)
    assert 1 < band < 40
    assert np.array_equal(order, np.lexsort((np.arange(200), left, (top + 1) // band, image)))


def test_scratch_copies_are_reused_bounded_and_never_leak_into_results():
    """The channels-last copy of an NCHW map goes to a scratch buffer that later calls reuse:
    a result computed before must not change, maps of other sizes must not see stale data,
    and at most _KEEP buffers stay idle."""
    from roialign.kernels.cpu import buffers

    buffers.release_scratch()
    gen = torch.Generator().manual_seed(9)
    boxes = torch.tensor([[0, 1.0, 2.0, 30.0, 20.0], [0, -5.0, 4.0, 12.0, 40.0]])
    results = []
    for shape in [(1, 16, 32, 40), (1, 16, 32, 40), (1, 8, 24, 24), (1, 16, 32, 40), (1, 3, 50, 60), (1, 16, 32, 39),
                  (1, 5, 9, 9), (1, 16, 32, 40)]:
        x = torch.randn(*shape, generator=gen)
        out = roialign.roi_align(x, boxes, 4, 1.0, 2, aligned=True)
        with roialign.use_backend("reference"):
            expected = roialign.roi_align(x, boxes, 4, 1.0, 2, aligned=True)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        results.append((out, out.clone()))
        assert len(buffers._scratch._idle) <= buffers._Scratch._KEEP
    for out, kept in results:
        assert torch.equal(out, kept)
    assert buffers._scratch._idle
    buffers.release_scratch()
    assert not buffers._scratch._idle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_results_and_gradients_never_share_a_scratch_buffer(channels_last, dtype):
    """Outputs and gradients returned by every operator stay as they were while later calls of
    the same shapes reuse the scratch buffers (map copies, max-mode winners and gradients)."""
    gen = torch.Generator().manual_seed(11)
    boxes = torch.tensor([[0, 1.0, 2.0, 30.0, 20.0], [1, -5.0, 4.0, 12.0, 40.0], [0, 3.0, 3.0, 9.0, 9.5]], dtype=dtype)
    rotated = torch.tensor([[0, 15.0, 11.0, 20.0, 9.0, 30.0], [1, 8.0, 20.0, 14.0, 30.0, -60.0]], dtype=dtype)
    calls = {"avg": lambda x: roialign.roi_align(x, boxes, 4, 1.0, 2, aligned=True),
             "max": lambda x: roialign.roi_align(x, boxes, 4, 1.0, 2, aligned=True, mode="max"),
             "onnx_max": lambda x: roialign.roi_align(x, boxes, 4, 1.0, 2, aligned=True, mode="onnx_max"),
             "rotated": lambda x: roialign.roi_align_rotated(x, rotated, 4, 1.0, 0),
             "prroi": lambda x: roialign.prroi_pool(x, boxes, 4, 1.0)}
    for name, call in calls.items():
        kept = []
        for _ in range(3):
            x = torch.randn(2, 24, 33, 37, generator=gen, dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            out = call(x)
            (grad,) = torch.autograd.grad(out, x, torch.randn(out.shape, generator=gen, dtype=dtype))
            assert grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            kept.append((out.detach(), out.detach().clone(), grad, grad.clone()))
        for out, out_copy, grad, grad_copy in kept:
            assert torch.equal(out, out_copy) and torch.equal(grad, grad_copy), name


# --- PrRoIPool: the two ways the Numba kernels read the map ---------------------------------------


@pytest.mark.parametrize("taps", [0, 3, 12])
@pytest.mark.parametrize("seed", range(0, 100, 4))
def test_prroi_pool_reads_the_map_or_its_integral_image_alike(seed, taps, monkeypatch):
    """Boxes with narrow bins read the pixels themselves, others the integral image; 0 sends
    every box through the integral image, 3 splits the random cases' boxes between the two."""
    import oracle_prroi
    from cases import random_case
    from roialign.kernels.cpu import prroi_pool as cpu_prroi

    monkeypatch.setattr(cpu_prroi, "_DIRECT_TAPS", taps)
    monkeypatch.setattr(cpu_prroi, "_DIRECT_TAPS_BACKWARD", taps)
    case = random_case(seed)
    x = case.x.detach().clone().requires_grad_()
    rois = case.rois.detach().clone().requires_grad_()
    with roialign.use_backend("numba"):
        out = roialign.prroi_pool(x, rois, case.output_size, case.spatial_scale)
    grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    out.backward(grad)
    args = (case.spatial_scale, case.output_size)
    np.testing.assert_allclose(out.detach().numpy(), oracle_prroi.prroi_pool(x.detach().numpy(), rois.detach().numpy(),
                                                                             *args), atol=1e-10, rtol=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), oracle_prroi.input_gradient(grad.numpy(), x.shape, rois.detach().numpy(),
                                                                           *args), atol=1e-10, rtol=1e-10)
    box_grad = rois.grad.clone()
    rois.grad = None
    with roialign.use_backend("reference"):
        roialign.prroi_pool(x.detach(), rois, case.output_size, case.spatial_scale).backward(grad)
    torch.testing.assert_close(box_grad, rois.grad, atol=1e-9, rtol=1e-9, equal_nan=True)


@pytest.mark.parametrize("taps", [0, 6])
def test_prroi_pool_paths_on_a_mixed_workload(taps, monkeypatch):
    """Many boxes of every size on a larger map: both paths in one call, against the reference."""
    from roialign.kernels.cpu import prroi_pool as cpu_prroi

    monkeypatch.setattr(cpu_prroi, "_DIRECT_TAPS", taps)
    monkeypatch.setattr(cpu_prroi, "_DIRECT_TAPS_BACKWARD", taps)
    x, rois = problem(3, k=200)
    x = x.double()
    rois = rois.double()
    results = []
    for backend in ("numba", "reference"):
        leaf, boxes = x.clone().requires_grad_(), rois.clone().requires_grad_()
        with roialign.use_backend(backend):
            out = roialign.prroi_pool(leaf, boxes, 7, 1.0)
        out.backward(torch.cos(out.detach()))
        results.append((out.detach(), leaf.grad, boxes.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    if taps:
        direct = cpu_prroi._Geometry(rois, 1.0, 7, 7, 2, 30, 40, taps).direct
        assert direct.any() and not direct.all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_prroi_pool_input_gradient_bands_and_blocks_give_the_same_bits(channels_last, monkeypatch):
    """The input gradient is accumulated in bands of rows (the integral image's suffix sums
    carried from band to band) per block of channels: neither the band height nor the blocks
    (set by the thread count) may change a bit, with boxes on both paths and an image without."""
    from roialign.kernels.cpu import prroi_pool as cpu_prroi

    monkeypatch.setattr(cpu_prroi, "_DIRECT_TAPS_BACKWARD", 6)
    x, rois = problem(3, k=200)
    rois[:, 0] = 0  # image 1 gets no boxes
    rois[:, 1:] *= 0.3  # most boxes on the map, bins of up to 6 pixels
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(rois.shape[0], x.shape[1], 3, 3, generator=torch.Generator().manual_seed(1))
    direct = cpu_prroi._Geometry(rois, 1.0, 3, 3, x.shape[0], x.shape[2], x.shape[3], 6).direct
    assert direct.any() and not direct.all()
    results, before = [], torch.get_num_threads()
    try:
        for band_bytes, threads in ((cpu_prroi.BAND_BYTES, 2), (1, 1), (1, 3), (5000, 2)):
            monkeypatch.setattr(cpu_prroi, "BAND_BYTES", band_bytes)
            torch.set_num_threads(threads)
            results.append(cpu_prroi.backward(grad, x, rois, 1.0, 3, 3, channels_last, True, False)[0])
    finally:
        torch.set_num_threads(before)
    assert results[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(results[0][1], torch.zeros_like(results[0][1]))
    for other in results[1:]:
        assert torch.equal(other, results[0])


def test_prroi_pool_backward_chooses_each_image_path_by_counted_cost():
    """A box whose bins fit the direct tables goes through the integral image only where that is
    fewer updates, and only if its image's boxes together save more than the integral image's
    fixed cost; a box too wide for the direct tables forces the integral image for its image."""
    from roialign.kernels.cpu import prroi_pool as cpu_prroi

    wide = [0.0, 40.0, 20.0, 60.0]  # bins of 10 pixels: fit 12 taps, far fewer integral updates
    small = [2.0, 2.0, 5.0, 5.0]  # bins of 1.5 pixels: fewer updates through the map
    huge = [0.0, 0.0, 63.0, 63.0]  # bins of 31.5 pixels: do not fit
    rois = torch.tensor([[0] + wide, [0] + small] + [[1] + wide] * 200 + [[1] + small] + [[2] + huge, [2] + small,
                                                                                           [2] + wide])
    geo = cpu_prroi._Geometry(rois, 1.0, 2, 2, 3, 64, 64, 12, (1.0, 4.0))
    assert geo.direct[:2].all()  # image 0: one wide box saves less than the suffix sums cost
    assert not geo.direct[2:202].any() and geo.direct[202]  # image 1: 200 of them do
    assert list(geo.direct[203:]) == [False, True, False]  # image 2: forced; each box by its cost
    # the forward sends every box that fits through the map
    forward_paths = cpu_prroi._Geometry(rois, 1.0, 2, 2, 3, 64, 64, 12).direct
    assert list(forward_paths[[0, 2, 203, 204]]) == [True, True, False, True]


def test_kernels_ask_for_the_widest_vectors():
    """``common.wide_vectors`` marks the calling kernel so that LLVM vectorises it with 512-bit
    vectors where the CPU has AVX-512 (it prefers 256-bit ones there by default). The mark must
    reach the compiled function, and on an AVX-512 host the machine code must use zmm registers.
    The same kernel without the mark is the control."""
    import llvmlite.binding as llvm
    import numba

    from roialign.kernels.cpu.common import wide_vectors

    def add(acc, pixels, w):
        for c in range(acc.shape[0]):
            acc[c] = acc[c] + w * pixels[c]

    def marked(acc, pixels, w):
        wide_vectors()
        for c in range(acc.shape[0]):
            acc[c] = acc[c] + w * pixels[c]

    plain, wide = numba.njit(add), numba.njit(marked)
    acc, pixels = np.zeros(256, np.float32), np.arange(256, dtype=np.float32)
    for fn in (plain, wide):
        fn(acc, pixels, np.float32(0.5))
    assert np.array_equal(acc, pixels)  # 0.5 * pixels, twice
    attribute = '"prefer-vector-width"="512"'
    assert attribute in wide.inspect_llvm(wide.signatures[0])
    assert attribute not in plain.inspect_llvm(plain.signatures[0])
    if llvm.get_host_cpu_features().get("avx512f", False):
        assert "zmm" in wide.inspect_asm(wide.signatures[0])


def test_compute_type_is_typed_as_the_numpy_class_it_stands_for():
    # The kernels' T argument: typed as np.float32/np.float64 are (so the same compiled kernels
    # serve both), and a NumPy dtype outside the kernels.
    import numba

    from roialign.kernels.cpu import common
    for stand_in, np_type in ((common.FLOAT32, np.float32), (common.FLOAT64, np.float64)):
        assert numba.typeof(stand_in) == numba.typeof(np_type)
        assert np.empty(3, stand_in).dtype == np_type
        assert np.dtype(stand_in).itemsize == np.dtype(np_type).itemsize
    assert common.compute_type(torch.float64) is common.FLOAT64
    assert common.compute_type(torch.float32) is common.FLOAT32


@pytest.mark.parametrize("total", [1, 2, 7, 8, 9, 100, 1001])
@pytest.mark.parametrize("parts", [1, 3, 8, 16])
def test_job_ranges_cover_every_item_once(total, parts):
    from roialign.kernels.cpu.threads import ranges
    got = ranges(total, parts)
    assert len(got) == min(total, parts)
    assert got[0][0] == 0 and got[-1][1] == total
    assert all(lo < hi for lo, hi in got) and all(a[1] == b[0] for a, b in zip(got, got[1:]))
    lengths = [hi - lo for lo, hi in got]
    assert max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradient_reaches_the_backward_as_bit_patterns(dtype):
    # A channels-last half gradient is read in place, an NCHW one transposed as bit patterns
    # (half the bytes of a widened copy); both give the same runs as widening first.
    from roialign.kernels.cpu.common import channel_runs
    from roialign.kernels.cpu.half_types import kernel_array
    grad = torch.randn(5, 6, 3, 2, dtype=dtype)
    expected = grad.float().permute(0, 2, 3, 1).reshape(5, 6, 6).numpy()
    cl = grad.contiguous(memory_format=torch.channels_last)
    with channel_runs(cl, torch.float32, halves=True) as runs:
        assert np.shares_memory(runs, kernel_array(cl))
        assert np.array_equal(torch.from_numpy(runs.view(np.int16)).view(dtype).float().numpy(), expected)
    with channel_runs(grad, torch.float32, halves=True) as runs:
        assert runs.dtype == kernel_array(grad).dtype
        assert np.array_equal(torch.from_numpy(runs.view(np.int16)).view(dtype).float().numpy(), expected)
    for g in (grad, cl):
        with channel_runs(g, torch.float32) as runs:
            assert runs.dtype == np.float32 and np.array_equal(runs, expected)


def _fake_cache(root, index, level, kind, size, shared):
    folder = root / f"index{index}"
    folder.mkdir()
    for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
        (folder / name).write_text(f"{value}\n")


@pytest.mark.parametrize("size, shared, expected", [
    ("2048K", "0", 2 << 20),          # one core's own L2
    ("2048K", "0,64", 1 << 20),       # shared by two hyperthreads: each thread's half
    ("4M", "0-3", 1 << 20),           # a cluster of four cores
    ("64K", "0", 256 << 10),          # kept within [256 KiB, 8 MiB]
    ("32768K", "0", 8 << 20),
])
def test_band_budget_is_one_threads_share_of_the_l2_cache(tmp_path, size, shared, expected):
    from roialign.kernels.cpu.threads import l2_cache_bytes
    _fake_cache(tmp_path, 0, 1, "Data", "48K", "0")
    _fake_cache(tmp_path, 1, 1, "Instruction", "32K", "0")
    _fake_cache(tmp_path, 2, 2, "Unified", size, shared)
    _fake_cache(tmp_path, 3, 3, "Unified", "300M", "0-127")
    assert l2_cache_bytes(str(tmp_path), default=12345) == expected


def test_band_budget_has_a_default_where_the_cache_is_not_reported(tmp_path):
    from roialign.kernels.cpu.threads import l2_cache_bytes
    assert l2_cache_bytes(str(tmp_path / "missing"), default=12345) == 12345
    _fake_cache(tmp_path, 0, 1, "Data", "48K", "0")
    assert l2_cache_bytes(str(tmp_path), default=12345) == 12345


def test_band_rows_fill_the_budget_but_leave_two_bands_per_thread():
    from roialign.kernels.cpu.threads import band_rows
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert band_rows(1 << 20, 1000, 10_000, 1) == (1 << 20) // 1000
        assert band_rows(1 << 20, 1 << 21, 100, 1) == 1  # a row over budget is still a band
        assert band_rows(4 << 20, 32 << 10, 128, 1) == 32  # 4 bands, not one of 128 rows
        assert band_rows(4 << 20, 32 << 10, 128, 2) == 64
        torch.set_num_threads(1)
        assert band_rows(4 << 20, 32 << 10, 128, 1) == 64
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("side", [1, 3, 16, 1 << 20])
def test_tile_order_sorts_bins_by_tile_then_row(side):
    """The channels_last forward's order: every bin of every box to pool, once, by image, band of
    ``side`` rows, block of ``side`` columns and row where it starts reading, ties in index order."""
    from roialign.kernels.cpu.roi_align import _tile_order, tile_side

    rng = np.random.default_rng(side)
    n_box, ph, pw, height, width = 40, 3, 4, 30, 50
    yi = rng.integers(0, height, (n_box, ph, 2)).astype(np.int64)
    xi = rng.integers(0, width, (n_box, pw, 2)).astype(np.int64)
    yn, xn = rng.integers(0, 3, (n_box, ph)).astype(np.int64), rng.integers(0, 3, (n_box, pw)).astype(np.int64)
    batch = rng.integers(0, 2, n_box).astype(np.int64)
    key = np.where(rng.random((n_box, ph)) < 0.1, -1, 0).astype(np.int64)
    got = _tile_order(key, yi, yn, xi, xn, batch, height, width, side)

    def tile_key(item):
        k, rest = divmod(item, ph * pw)
        q, p = divmod(rest, pw)
        row = yi[k, q, 0] if yn[k, q] else 0
        col = xi[k, p, 0] if xn[k, p] else 0
        return (batch[k], row // side, col // side, row % side, item)

    wanted = sorted((i for i in range(n_box * ph * pw) if key[i // (ph * pw), i // pw % ph] >= 0), key=tile_key)
    assert got.tolist() == wanted
    assert 8 <= tile_side(1) == 64 and tile_side(1 << 30) == 8 and tile_side(2048) <= tile_side(1024)


def test_aligned_empty_starts_on_a_cache_line():
    """The input gradient's bands start on 64-byte boundaries (Numba's arrays on 32-byte ones)."""
    import numba

    from roialign.kernels.cpu.common import aligned_empty

    @numba.njit
    def addresses(n, dtype):
        out = np.empty(12, np.int64)
        keep = []
        for i in range(12):
            a = aligned_empty(n + i, dtype)
            a[:] = 0
            keep.append(a)
            out[i] = a.ctypes.data % 64 + 1000 * (a.shape[0] != n + i)
        return out

    for dtype in (np.float32, np.float64):
        for n in (1, 7, 64, 1000, 100_000):
            assert (addresses(n, dtype) == 0).all(), (dtype, n)
