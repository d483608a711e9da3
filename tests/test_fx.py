"""torch.fx.symbolic_trace records our functionals as single calls (leaves), however they are reached."""

import pytest
import torch

import roialign


def _leaf_targets(gm: torch.fx.GraphModule) -> list[str]:
    return [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function"]


def test_module_traces_to_one_call_and_runs_the_same():
    module = roialign.ROIAlign(5, 0.5, -1)
    gm = torch.fx.symbolic_trace(module)
    assert _leaf_targets(gm) == ["roi_align"]
    x = torch.randn(2, 3, 12, 10)
    rois = torch.tensor([[0, 1.0, 1, 14, 17], [1, 3, 2, 9, 9]])
    assert torch.equal(gm(x, rois), module(x, rois))


@pytest.mark.parametrize("list_of_boxes", [False, True])
def test_functional_through_the_package_binding_is_a_leaf(list_of_boxes):
    class Net(torch.nn.Module):
        def forward(self, x, boxes):
            # Reached as an attribute of the package, not through the defining module's globals.
            return roialign.roi_align(x, [boxes] if list_of_boxes else boxes, 3, 0.5, 2, True) * 2

    gm = torch.fx.symbolic_trace(Net())
    assert _leaf_targets(gm).count("roi_align") == 1
    x = torch.randn(1, 2, 9, 9)
    boxes = torch.tensor([[1.0, 1, 12, 14]]) if list_of_boxes else torch.tensor([[0, 1.0, 1, 12, 14]])
    assert torch.equal(gm(x, boxes), Net()(x, boxes))
