"""The custom operators, one module per operator; importing this package registers them all."""

from . import common, roi_align  # noqa: F401
