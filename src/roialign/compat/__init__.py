"""Drop-in signatures of other libraries' RoIAlign (``roialign.compat.mmcv``), backed by roialign's kernels."""
