"""``python -m roialign demo``: the seed's example; ``python -m roialign bench``: a short CPU benchmark
(``--models``: of torchvision's detectors with and without roialign instead of the op alone)."""

from __future__ import annotations

import argparse
import sys

import torch

import roialign


def demo() -> None:
    """The torch_npu documentation's example, forward and backward, for both ``aligned`` values."""
    torch.set_printoptions(precision=4, sci_mode=False)
    print(f"roialign {roialign.__version__}, torch {torch.__version__}, backend for CPU tensors: "
          f"{roialign.available_backends('cpu')[0] if roialign.current_backend() == 'auto' else roialign.current_backend()}")
    print("input: 1x1x6x6 = 1..36, rois = [[0, -2, -2, 22, 22]], output_size (3, 3), spatial_scale 0.25, "
          "sampling_ratio 2\n")
    for aligned in (False, True):
        x = torch.arange(1.0, 37.0).reshape(1, 1, 6, 6).requires_grad_()
        rois = torch.tensor([[0, -2.0, -2.0, 22.0, 22.0]], requires_grad=True)
        model = roialign.ROIAlign((3, 3), 0.25, 2, aligned=aligned)
        out = model(x, rois)
        out.sum().backward()
        print(f"{model}")
        print(f"output {tuple(out.shape)}:\n{out.detach()[0, 0]}")
        print(f"d(output.sum()) / d(input):\n{x.grad[0, 0]}")
        print(f"d(output.sum()) / d(rois) (batch index, x1, y1, x2, y2):\n{rois.grad[0]}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m roialign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the seed's example, forward and backward")
    bench = sub.add_parser("bench", help="a short CPU benchmark against the available peers")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    bench.add_argument("--models", nargs="?", const="maskrcnn,mobilenet", default=None, metavar="LIST",
                       help="instead of the op: torchvision's Mask R-CNN and Faster R-CNN MobileNetV3 (or the "
                            "comma-separated LIST of maskrcnn, mobilenet), eval and train step, patched and "
                            "unpatched, 2 pairs (benchmarks/bench_models.py for the full version)")
    args = parser.parse_args(argv)
    threads = ["--threads", str(args.threads)] if getattr(args, "threads", None) else []
    if args.command == "demo":
        demo()
    elif args.models:
        from . import _bench_models
        _bench_models.main(["--quick", "--models", args.models] + threads)
    else:
        from . import _bench
        _bench.main(["--quick"] + threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
