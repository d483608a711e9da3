"""The custom operators, one module per operator; importing this package registers them all."""

from . import common, multiscale_roi_align, prroi_pool, roi_align, roi_align_max, roi_align_rotated  # noqa: F401
