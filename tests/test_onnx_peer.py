"""onnxruntime's RoiAlign as an independent peer, and ONNX's published node-test values."""

from __future__ import annotations

import pytest
import torch

import roialign
from cases import random_case

pytest.importorskip("onnxruntime")
from roialign._peers import OnnxRoiAlign  # noqa: E402


def test_onnx_published_values(backend):
    """onnx/backend/test/case/node/roialign.py, test_roialign_aligned_{false,true} (published to 4 decimals)."""
    x = torch.tensor(ONNX_X).reshape(1, 1, 10, 10)
    rois = torch.tensor([[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9]], dtype=torch.float32)
    for aligned, want in ((False, ONNX_Y_ALIGNED_FALSE), (True, ONNX_Y_ALIGNED_TRUE)):
        out = roialign.roi_align(x, rois, 5, 1.0, 2, aligned)
        torch.testing.assert_close(out.flatten(), torch.tensor(want), atol=1e-4, rtol=0)


def boxes_onnxruntime_accepts(case):
    rois = case.rois.float()
    if case.sampling_ratio <= 0:
        # onnxruntime fails ("Integer overflow") on inverted boxes with adaptive sampling; compare the rest.
        rois = rois[(rois[:, 3] >= rois[:, 1]) & (rois[:, 4] >= rois[:, 2])]
    return rois


@pytest.mark.parametrize("seed", [s for s in range(0, 300, 3) if len(boxes_onnxruntime_accepts(random_case(s)))])
def test_matches_onnxruntime(backend, seed):
    case = random_case(seed)
    x, rois = case.x.float(), boxes_onnxruntime_accepts(case)
    peer = OnnxRoiAlign(case.output_size, case.spatial_scale, case.sampling_ratio, case.aligned)
    want = peer(x.numpy(), rois.numpy())
    out = torch.ops.roialign.roi_align(x, rois, *case.args())
    torch.testing.assert_close(out, torch.from_numpy(want), atol=2e-5, rtol=1e-5)


ONNX_X = [
    0.2764, 0.7150, 0.1958, 0.3416, 0.4638, 0.0259, 0.2963, 0.6518, 0.4856, 0.7250,
    0.9637, 0.0895, 0.2919, 0.6753, 0.0234, 0.6132, 0.8085, 0.5324, 0.8992, 0.4467,
    0.3265, 0.8479, 0.9698, 0.2471, 0.9336, 0.1878, 0.4766, 0.4308, 0.3400, 0.2162,
    0.0206, 0.1720, 0.2155, 0.4394, 0.0653, 0.3406, 0.7724, 0.3921, 0.2541, 0.5799,
    0.4062, 0.2194, 0.4473, 0.4687, 0.7109, 0.9327, 0.9815, 0.6320, 0.1728, 0.6119,
    0.3097, 0.1283, 0.4984, 0.5068, 0.4279, 0.0173, 0.4388, 0.0430, 0.4671, 0.7119,
    0.1011, 0.8477, 0.4726, 0.1777, 0.9923, 0.4042, 0.1869, 0.7795, 0.9946, 0.9689,
    0.1366, 0.3671, 0.7011, 0.6234, 0.9867, 0.5585, 0.6985, 0.5609, 0.8788, 0.9928,
    0.5697, 0.8511, 0.6711, 0.9406, 0.8751, 0.7496, 0.1650, 0.1049, 0.1559, 0.2514,
    0.7012, 0.4056, 0.7879, 0.3461, 0.0415, 0.2998, 0.5094, 0.3727, 0.5482, 0.0502,
]
ONNX_Y_ALIGNED_FALSE = [
    0.4664, 0.4466, 0.3405, 0.5688, 0.6068, 0.3714, 0.4296, 0.3835, 0.5562, 0.3510,
    0.2768, 0.4883, 0.5222, 0.5528, 0.4171, 0.4713, 0.4844, 0.6904, 0.4920, 0.8774,
    0.6239, 0.7125, 0.6289, 0.3355, 0.3495,
    0.3022, 0.4305, 0.4696, 0.3978, 0.5423, 0.3656, 0.7050, 0.5165, 0.3172, 0.7015,
    0.2912, 0.5059, 0.6476, 0.6235, 0.8299, 0.5916, 0.7389, 0.7048, 0.8372, 0.8893,
    0.6227, 0.6153, 0.7097, 0.6154, 0.4585,
    0.2384, 0.3379, 0.3717, 0.6100, 0.7601, 0.3767, 0.3785, 0.7147, 0.9243, 0.9727,
    0.5749, 0.5826, 0.5709, 0.7619, 0.8770, 0.5355, 0.2566, 0.2141, 0.2796, 0.3600,
    0.4365, 0.3504, 0.2887, 0.3661, 0.2349,
]
ONNX_Y_ALIGNED_TRUE = [
    0.5178, 0.3434, 0.3229, 0.4474, 0.6344, 0.4031, 0.5366, 0.4428, 0.4861, 0.4023,
    0.2512, 0.4002, 0.5155, 0.6954, 0.3465, 0.3350, 0.4601, 0.5881, 0.3439, 0.6849,
    0.4932, 0.7141, 0.8217, 0.4719, 0.4039,
    0.3070, 0.2187, 0.3337, 0.4880, 0.4870, 0.1871, 0.4914, 0.5561, 0.4192, 0.3686,
    0.1433, 0.4608, 0.5971, 0.5310, 0.4982, 0.2788, 0.4386, 0.6022, 0.7000, 0.7524,
    0.5774, 0.7024, 0.7251, 0.7338, 0.8163,
    0.2393, 0.4075, 0.3379, 0.2525, 0.4743, 0.3671, 0.2702, 0.4105, 0.6419, 0.8308,
    0.5556, 0.4543, 0.5564, 0.7502, 0.9300, 0.6626, 0.5617, 0.4813, 0.4954, 0.6663,
    0.6636, 0.3721, 0.2056, 0.1928, 0.2478,
]
