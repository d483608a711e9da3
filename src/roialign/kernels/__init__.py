"""Kernels behind torch.ops.roialign: each module offers forward, backward_input and backward_rois."""
