"""Small factories for test inputs: random RoIAlign problems with every awkward kind of box."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Case:
    x: torch.Tensor  # [N, C, H, W] float64
    rois: torch.Tensor  # [K, 5] float64
    spatial_scale: float
    output_size: tuple[int, int]
    sampling_ratio: int
    aligned: bool

    def args(self) -> tuple:
        return (self.spatial_scale, *self.output_size, self.sampling_ratio, self.aligned)


BOX_KINDS = ("inside", "partial", "outside", "empty", "inverted", "point", "large")


def random_box(rng: np.random.Generator, height: int, width: int, scale: float, kind: str) -> list[float]:
    """One box (x1, y1, x2, y2) in input-image coordinates; ``height``/``width`` are feature-map sizes."""
    span = np.array([width, height, width, height]) / scale

    def inside():
        a = rng.uniform(0, 1, 2) * span[:2]
        b = a + rng.uniform(0.05, 1, 2) * span[:2]
        return [a[0], a[1], b[0], b[1]]

    if kind == "inside":
        return inside()
    if kind == "partial":
        box = np.array(inside()) + np.concatenate([rng.uniform(-0.7, 0.7, 2)] * 2) * np.tile(span[:2], 2)
        return box.tolist()
    if kind == "outside":
        side = rng.integers(4)
        box = np.array(inside())
        shift = span[side % 2] * (1.3 if side < 2 else -1.3) - (2 / scale if side >= 2 else -2 / scale)
        box[[side % 2, side % 2 + 2]] += shift
        return box.tolist()
    if kind == "empty":
        box = inside()
        axis = rng.integers(2)
        box[axis + 2] = box[axis]
        return box
    if kind == "inverted":
        x1, y1, x2, y2 = inside()
        return [x2, y2, x1, y1] if rng.integers(2) else [x2, y1, x1, y2]
    if kind == "point":
        x, y = rng.uniform(-0.2, 1.2, 2) * span[:2]
        return [x, y, x, y]
    if kind == "large":
        a = -rng.uniform(0.1, 1.0, 2) * span[:2]
        b = span[:2] * rng.uniform(1.0, 2.0, 2)
        return [a[0], a[1], b[0], b[1]]
    raise AssertionError(kind)


def random_case(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 3)), int(rng.integers(1, 4))
    h, w = int(rng.integers(1, 11)), int(rng.integers(1, 11))
    scale = float(rng.choice([1.0, 0.5, 0.25, 1 / 3, 2.0]))
    output_size = (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    sampling_ratio = int(rng.integers(-1, 5))
    aligned = bool(rng.integers(2))
    k = int(rng.integers(0, 6))
    rois = []
    for _ in range(k):
        kind = BOX_KINDS[int(rng.integers(len(BOX_KINDS)))]
        rois.append([float(rng.integers(n))] + random_box(rng, h, w, scale, kind))
    x = torch.from_numpy(rng.standard_normal((n, c, h, w)))
    rois_t = torch.tensor(rois, dtype=torch.float64).reshape(k, 5)
    return Case(x, rois_t, scale, output_size, sampling_ratio, aligned)
