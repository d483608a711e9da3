"""Draw docs/rotated_convention.png: where roi_align_rotated samples for the same box at 0 and
+30 degrees, in detectron2's convention (counter-clockwise on the screen) and with mmcv's
``clockwise=True``.

The shaded pixels are not drawn from a formula: they are the input gradient of the pooled
output's sum, computed by roialign itself, so they show exactly which pixels the op reads.
Run: ``python docs/rotated_convention.py`` (needs matplotlib).
"""

from __future__ import annotations

import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import roialign  # noqa: E402

SIZE = 48
BOX = (24.0, 24.0, 30.0, 10.0)  # centre x, centre y, width, height in pixels


def footprint(angle: float, clockwise: bool) -> torch.Tensor:
    x = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0.0, *BOX, angle]], dtype=torch.float64)
    out = roialign.roi_align_rotated(x, rois, (4, 12), 1.0, 2, clockwise=clockwise)
    out.sum().backward()
    return x.grad[0, 0]


def outline(angle_deg: float, clockwise: bool) -> tuple[list[float], list[float]]:
    """The box's corners in pixel-centre coordinates (the op's -0.5 shift), turned as the op turns them."""
    cx, cy, w, h = BOX
    t = math.radians(-angle_deg if clockwise else angle_deg)
    xs, ys = [], []
    for yy, xx in ((-h / 2, -w / 2), (-h / 2, w / 2), (h / 2, w / 2), (h / 2, -w / 2), (-h / 2, -w / 2)):
        ys.append(yy * math.cos(t) - xx * math.sin(t) + cy - 0.5)
        xs.append(yy * math.sin(t) + xx * math.cos(t) + cx - 0.5)
    return xs, ys


def main() -> None:
    panels = [(0.0, False, "angle = 0"),
              (30.0, False, "angle = +30 (detectron2; mmcv clockwise=False)\ncounter-clockwise on screen"),
              (30.0, True, "angle = +30, clockwise=True (mmrotate)\nclockwise on screen")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (angle, clockwise, title) in zip(axes, panels):
        ax.imshow(footprint(angle, clockwise).numpy(), cmap="Blues", origin="upper")
        xs, ys = outline(angle, clockwise)
        ax.plot(xs, ys, color="crimson", lw=1.5)
        # The box's own x axis (its "width" direction), from the centre.
        ax.annotate("", xy=((xs[1] + xs[2]) / 2, (ys[1] + ys[2]) / 2), xytext=(BOX[0] - 0.5, BOX[1] - 0.5),
                    arrowprops=dict(arrowstyle="->", color="crimson"))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x (columns)")
        ax.set_ylabel("y (rows, pointing down)")
    fig.suptitle("roi_align_rotated: pixels read (input gradient), box outline and its width axis", fontsize=10)
    fig.tight_layout()
    target = pathlib.Path(__file__).with_name("rotated_convention.png")
    fig.savefig(target, dpi=90)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
