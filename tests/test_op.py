"""The custom op: opcheck on a table of sample inputs, torch.compile(fullgraph=True) and torch.export."""

from __future__ import annotations

import pytest
import torch

import roialign


def sample_inputs():
    gen = torch.Generator().manual_seed(0)

    def make(n, c, h, w, rois, dtype=torch.float32, requires_grad=True, channels_last=False):
        x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        r = torch.tensor(rois, dtype=torch.float64 if dtype == torch.float64 else torch.float32).reshape(-1, 5)
        return x.requires_grad_(requires_grad), r.requires_grad_(requires_grad)

    boxes = [[0, 0.5, 1.0, 6.0, 5.5], [1, -2.0, 3.0, 4.0, 12.0], [0, 3.0, 3.0, 3.0, 3.0]]
    yield make(2, 3, 8, 9, boxes) + (0.5, 3, 2, 2, True)
    yield make(2, 3, 8, 9, boxes, torch.float64) + (1.0, 2, 3, 0, False)
    yield make(2, 3, 8, 9, boxes, channels_last=True) + (1.0, 2, 2, -1, True)
    yield make(2, 3, 8, 9, [], requires_grad=False) + (1.0, 2, 2, 1, False)
    yield make(1, 2, 5, 5, boxes[:1], requires_grad=False) + (0.25, 1, 1, 4, False)


@pytest.mark.parametrize("args", list(sample_inputs()), ids=lambda a: f"{list(a[0].shape)}-{a[1].shape[0]}")
def test_opcheck(backend, args):
    torch.library.opcheck(torch.ops.roialign.roi_align.default, args)


def test_backward_ops_opcheck(backend):
    rois = torch.tensor([[0, 0.5, 1.0, 6.0, 5.5], [1, -2.0, 3.0, 4.0, 12.0]])
    grad = torch.randn(2, 3, 2, 2)
    x = torch.randn(2, 3, 8, 9)
    torch.library.opcheck(torch.ops.roialign.roi_align_backward.default,
                          (grad, rois, 0.5, 2, 2, 2, 3, 8, 9, 2, True, False))
    torch.library.opcheck(torch.ops.roialign.roi_align_backward.default,
                          (grad, rois, 0.5, 2, 2, 2, 3, 8, 9, 2, True, True))
    torch.library.opcheck(torch.ops.roialign.roi_align_backward_rois.default, (grad, x, rois, 0.5, 2, 2, 2, True))


def _model(x, rois):
    return roialign.roi_align(x, rois, (3, 2), 0.5, 0, aligned=True).relu().sum(dim=(2, 3))


def test_compile_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()
    x = torch.randn(2, 4, 10, 12, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 2.0, 14.0, 17.0], [1, -3.0, 0.5, 8.0, 9.0]], requires_grad=True)
    eager = _model(x, rois)
    ge = torch.autograd.grad(eager.sum(), (x, rois))
    compiled = torch.compile(_model, fullgraph=True, backend="aot_eager")
    out = compiled(x, rois)
    gc = torch.autograd.grad(out.sum(), (x, rois))
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gc, ge)


def test_compile_with_inductor_and_dynamic_shapes(backend):
    torch._dynamo.reset()
    compiled = torch.compile(_model, fullgraph=True, dynamic=True)
    for k in (3, 5):
        x = torch.randn(2, 4, 10, 12)
        rois = torch.cat((torch.randint(0, 2, (k, 1)).float(), torch.rand(k, 4) * 10), 1)
        torch.testing.assert_close(compiled(x, rois), _model(x, rois))


@pytest.mark.parametrize("dynamic", [None, True])
def test_compile_fullgraph_with_spatial_scale_traced_as_a_symbol(dynamic):
    # torch.compile traces a float argument as a symbol from its second value on (or at once with
    # dynamic=True), module attributes too; the argument checks once called math.isfinite on it,
    # which Dynamo cannot trace ("torch.* op returned non-Tensor"). torchvision's op compiles.
    x = torch.randn(2, 3, 16, 16)
    boxes = torch.tensor([[0, 1.0, 1.0, 10.0, 12.0], [1, 2.3, 0.5, 15.0, 9.0]])
    rotated = torch.tensor([[0, 8.0, 8.0, 6.0, 4.0, 30.0]])
    calls = [lambda x, s: roialign.roi_align(x, boxes, 3, s, 2, True),
             lambda x, s: roialign.roi_align(x, boxes, 3, s, 2, True, mode="max"),
             lambda x, s: roialign.prroi_pool(x, boxes, 3, s),
             lambda x, s: roialign.roi_align_rotated(x, rotated, 3, s, 2)]
    for fn in calls:
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="eager", fullgraph=True, dynamic=dynamic)
        for scale in (0.5, 0.25, 0.125):
            assert torch.equal(compiled(x, scale), fn(x, scale))
        lenient = torch.compile(fn, backend="eager", dynamic=dynamic)  # fullgraph turns errors into Unsupported
        for bad in (0.0, -0.5, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="spatial_scale"):
                lenient(x, bad)
    torch._dynamo.reset()
    module = roialign.ROIAlign(3, 0.5, 2)
    compiled = torch.compile(module, backend="eager", fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x, boxes), module(x, boxes))


def test_compiled_graph_still_raises_for_bad_batch_index(backend):
    torch._dynamo.reset()
    compiled = torch.compile(_model, fullgraph=True, backend="aot_eager")
    with pytest.raises(IndexError, match="batch indices"):
        compiled(torch.randn(2, 4, 10, 12), torch.tensor([[2.0, 1, 1, 5, 5]]))


def test_export():
    model = roialign.ROIAlign((7, 7), 1 / 4, 2, aligned=True)
    x = torch.randn(1, 8, 32, 32)
    rois = torch.tensor([[0, 4.0, 4.0, 60.0, 90.0], [0, 10.0, 0.0, 30.0, 20.0]])
    exported = torch.export.export(model, (x, rois))
    assert any("roialign.roi_align" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x, rois), model(x, rois))


# The API calls each forward operator's implementation directly for plain eager CPU calls with
# nothing to record (``ops.common.call_op``); everything else must still reach the dispatcher.


class _SeenOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _forwards():
    """(name, ops module, op name, call(input, boxes)) of each forward the API reaches."""
    from roialign.ops import prroi_pool, roi_align, roi_align_max, roi_align_rotated

    rotated = lambda r: torch.cat((r[:, :1], (r[:, 1:3] + r[:, 3:5]) / 2, r[:, 3:5] - r[:, 1:3],  # noqa: E731
                                   torch.full_like(r[:, :1], 30.0)), dim=1)
    return [("roi_align", roi_align, "roi_align", lambda x, r: roialign.roi_align(x, r, 3, 0.25, 2, True)),
            ("max", roi_align_max, "roi_align_max", lambda x, r: roialign.roi_align(x, r, 3, 0.25, 2, True, mode="max")),
            ("prroi_pool", prroi_pool, "prroi_pool", lambda x, r: roialign.prroi_pool(x, r, 3, 0.25)),
            ("rotated", roi_align_rotated, "roi_align_rotated",
             lambda x, r: roialign.roi_align_rotated(x, rotated(r), 3, 0.25, 2))]


def _dispatched(monkeypatch, module, call) -> tuple[bool, torch.Tensor]:
    """(whether ``call()`` went through the custom op's dispatcher entry, its result)."""
    direct = []
    impl = module.forward_impl
    monkeypatch.setattr(module, "forward_impl", lambda *a: direct.append(1) or impl(*a))
    out = call()
    monkeypatch.setattr(module, "forward_impl", impl)
    return not direct, out


@pytest.mark.parametrize("name, module, op, forward", _forwards(), ids=lambda v: v if isinstance(v, str) else "")
def test_plain_eager_calls_skip_the_dispatcher_with_the_same_result(monkeypatch, name, module, op, forward):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 12, 10, generator=gen).contiguous(memory_format=torch.channels_last)
    rois = torch.tensor([[0, 1.0, 2.0, 30.0, 25.0], [1, -4.0, 0.0, 12.0, 40.0]])
    dispatched, out = _dispatched(monkeypatch, module, lambda: forward(x, rois))
    assert not dispatched
    with _SeenOps():  # the same call through the dispatcher
        dispatched, reference = _dispatched(monkeypatch, module, lambda: forward(x, rois))
    assert dispatched
    assert torch.equal(out, reference) and out.stride() == reference.stride()
    with torch.no_grad():  # inputs that require grad, with grad mode off, need no graph either
        assert not _dispatched(monkeypatch, module, lambda: forward(x.detach().requires_grad_(), rois))[0]


@pytest.mark.parametrize("name, module, op, forward", _forwards(), ids=lambda v: v if isinstance(v, str) else "")
def test_calls_that_something_watches_still_reach_the_dispatcher(monkeypatch, name, module, op, forward):
    x = torch.randn(1, 4, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 26.0, 27.0]])

    def call(inp=x, boxes=rois):
        return forward(inp, boxes)

    dispatched, out = _dispatched(monkeypatch, module, lambda: call(x.detach().requires_grad_()))
    assert dispatched and out.grad_fn is not None  # a graph to record
    with _SeenOps() as mode:
        assert _dispatched(monkeypatch, module, call)[0]
    assert f"roialign.{op}.default" in mode.seen
    with torch.profiler.profile() as prof:
        assert _dispatched(monkeypatch, module, call)[0]
    assert any(e.name == f"roialign::{op}" for e in prof.events())
    with torch.device("cpu"):  # a TorchFunctionMode
        assert _dispatched(monkeypatch, module, call)[0]
    assert _dispatched(monkeypatch, module, lambda: torch.jit.trace(lambda t: call(t), (x,), check_trace=False))[0]
    assert _dispatched(monkeypatch, module, lambda: torch.func.vmap(lambda t: t.sum() * call().sum())(torch.ones(2)))[0]
    assert _dispatched(monkeypatch, module, lambda: call(torch.nn.Parameter(x, requires_grad=False)))[0]  # a subclass
