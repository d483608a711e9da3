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


# The API calls the operator's implementation directly for plain eager CPU calls with nothing to
# record (``ops.common.dispatcher_needed``); everything else must still reach the dispatcher.


class _SeenOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _dispatched(monkeypatch, call) -> tuple[bool, torch.Tensor]:
    """(whether ``call()`` went through the custom op's dispatcher entry, its result)."""
    from roialign.ops import roi_align as op

    direct = []
    impl = op.forward_impl
    monkeypatch.setattr(op, "forward_impl", lambda *a: direct.append(1) or impl(*a))
    out = call()
    monkeypatch.setattr(op, "forward_impl", impl)
    return not direct, out


def test_plain_eager_calls_skip_the_dispatcher_with_the_same_result(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 12, 10, generator=gen).contiguous(memory_format=torch.channels_last)
    rois = torch.tensor([[0, 1.0, 2.0, 30.0, 25.0], [1, -4.0, 0.0, 12.0, 40.0]])
    dispatched, out = _dispatched(monkeypatch, lambda: roialign.roi_align(x, rois, 3, 0.25, 2, True))
    assert not dispatched
    reference = torch.ops.roialign.roi_align(x, rois, 0.25, 3, 3, 2, True)
    assert torch.equal(out, reference) and out.stride() == reference.stride()
    with torch.no_grad():  # inputs that require grad, with grad mode off, need no graph either
        assert not _dispatched(monkeypatch, lambda: roialign.roi_align(x.requires_grad_(), rois, 3, 0.25, 2, True))[0]


def test_calls_that_something_watches_still_reach_the_dispatcher(monkeypatch):
    x = torch.randn(1, 4, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 7.0]])

    def call(inp=x, boxes=rois):
        return roialign.roi_align(inp, boxes, 2, 1.0, 2, True)

    dispatched, out = _dispatched(monkeypatch, lambda: call(x.detach().requires_grad_()))
    assert dispatched and out.grad_fn is not None  # a graph to record
    with _SeenOps() as mode:
        assert _dispatched(monkeypatch, call)[0]
    assert "roialign.roi_align.default" in mode.seen
    with torch.profiler.profile() as prof:
        assert _dispatched(monkeypatch, call)[0]
    assert any(e.name == "roialign::roi_align" for e in prof.events())
    with torch.device("cpu"):  # a TorchFunctionMode
        assert _dispatched(monkeypatch, call)[0]
    assert _dispatched(monkeypatch, lambda: torch.jit.trace(lambda t: call(t), (x,), check_trace=False))[0]
    assert _dispatched(monkeypatch, lambda: torch.func.vmap(lambda t: t.sum() * call().sum())(torch.ones(2)))[0]
    assert _dispatched(monkeypatch, lambda: call(torch.nn.Parameter(x, requires_grad=False)))[0]  # a subclass
