"""Peers for tests and benchmarks: onnxruntime's RoiAlign (opset 16) as a callable. Needs onnx and onnxruntime."""

from __future__ import annotations

import numpy as np


class OnnxRoiAlign:
    """A one-node ONNX model: ``half_pixel`` for aligned=True, ``output_half_pixel`` for aligned=False."""

    def __init__(self, output_size, spatial_scale, sampling_ratio, aligned, dtype=np.float32, threads=None):
        import onnxruntime as ort
        from onnx import TensorProto, helper

        elem = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE}[dtype]
        node = helper.make_node(
            "RoiAlign", ["X", "rois", "batch_indices"], ["Y"], mode="avg",
            output_height=output_size[0], output_width=output_size[1], sampling_ratio=max(sampling_ratio, 0),
            spatial_scale=float(spatial_scale),
            coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel")
        graph = helper.make_graph(
            [node], "roialign",
            [helper.make_tensor_value_info("X", elem, None), helper.make_tensor_value_info("rois", elem, None),
             helper.make_tensor_value_info("batch_indices", TensorProto.INT64, None)],
            [helper.make_tensor_value_info("Y", elem, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # Idle workers would otherwise spin for a while after each run and slow whatever runs next.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.dtype = dtype

    def __call__(self, x: np.ndarray, rois: np.ndarray) -> np.ndarray:
        rois = np.asarray(rois)
        return self.session.run(None, {
            "X": np.ascontiguousarray(x, dtype=self.dtype),
            "rois": np.ascontiguousarray(rois[:, 1:5], dtype=self.dtype),
            "batch_indices": rois[:, 0].astype(np.int64)})[0]
