"""Whole-model CPU benchmark: torchvision's detectors with torchvision's RoIAlign and with roialign's.

One model object is run unpatched ("torchvision") and under ``roialign.patch_torchvision()``
("roialign"), in pairs whose order alternates (torchvision, roialign, roialign, torchvision,
...) so that drifts in machine load hit both alike. For each model and mode it measures:

* the whole step, in unprofiled passes: ``eval`` is a forward under ``torch.no_grad``; ``train``
  is a forward with ground truth, the sum of the losses and its backward (no optimizer step);
* the time inside RoIAlign, in separate profiled passes (also alternating): the wall time covered
  by the profiler's events of the RoIAlign operators, their autograd nodes and backward operators
  (any event whose name holds ``roi_align`` or ``roialign``, apart from the autograd engine's
  ``evaluate_function`` wrapper), as the union of their time intervals, so nested events (the op
  inside its autograd wrapper, the backward op inside its node) are counted once. Events inside
  the forward and the backward are told apart by ``record_function`` ranges around each;
* correctness, in the warm-up pass of each provider (which also compiles the Numba kernels):
  eval compares the box head's pooled features (the proposals come from the RPN, before any
  RoIAlign, so they are the same; max abs difference relative to the features' max abs), the mask
  head's (at the detected boxes, which themselves differ slightly), the detections' sorted scores
  and each box's distance to the nearest box of the other run (NMS can reorder near-ties with
  random weights); train compares every loss term and all parameter gradients (relative to
  their max abs), with the same seed for the RPN's and the ROI heads' samplers.

Models have random weights from a fixed seed, a box score threshold that lets 10 x detections (box,
class) candidates of the image through to NMS (random weights score every class about 1/91) and
BatchNorm layers (the default without pretrained weights) whose running statistics are
set from the benchmark image once and then frozen (momentum 0), so that eval activations have
realistic magnitudes and training steps do not change the model. The ground truth is 8 random boxes
(box-shaped masks); with random weights few proposals overlap them, so in training the mask head
sees about as many positive RoIs as there are objects (a trained RPN gives up to 128): the table's
"RoIs box/mask head" column says how many boxes each head pooled.
Run ``python benchmarks/bench_models.py --help`` for the options, ``python -m roialign bench
--models`` for a short version.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

import roialign

PROVIDERS = ("torchvision", "roialign")
MODELS = ("maskrcnn", "mobilenet")
MODES = ("eval", "train")
MODEL_TITLES = {"maskrcnn": "maskrcnn_resnet50_fpn", "mobilenet": "fasterrcnn_mobilenet_v3_large_fpn"}


# ----------------------------------------------------------------------------------------------
# Models and data.


def build_model(name: str, height: int, width: int, proposals: int, detections: int = 100,
                seed: int = 0) -> torch.nn.Module:
    """A torchvision detector with random weights; its transform keeps a ``height x width`` image as is.

    ``maskrcnn``: torchvision's defaults (up to 1000 proposals in eval, 512 sampled for the
    heads in training) unless ``proposals`` is smaller. ``mobilenet``: the RPN set so that
    ``proposals`` boxes reach the box head in eval (no score threshold, NMS at IoU 0.9) and
    ``proposals`` are sampled for the box head in training. ``detections``: at most this many
    detections per image, which is what the mask head runs on in eval. BatchNorm statistics and
    score threshold: see :func:`_calibrate_batchnorm` and :func:`_calibrate_score_threshold`.
    """
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, maskrcnn_resnet50_fpn

    torch.manual_seed(seed)
    common = dict(weights=None, weights_backbone=None, min_size=min(height, width), max_size=max(height, width),
                  box_detections_per_img=detections)
    if name == "maskrcnn":
        extra = {}
        if proposals < 1000:
            extra = dict(rpn_pre_nms_top_n_test=proposals, rpn_post_nms_top_n_test=proposals,
                         rpn_pre_nms_top_n_train=2 * proposals, rpn_post_nms_top_n_train=2 * proposals,
                         box_batch_size_per_image=min(512, proposals // 2))
        model = maskrcnn_resnet50_fpn(**common, **extra)
    elif name == "mobilenet":
        model = fasterrcnn_mobilenet_v3_large_fpn(
            **common, rpn_score_thresh=0.0, rpn_nms_thresh=0.9,
            rpn_pre_nms_top_n_test=2 * proposals, rpn_post_nms_top_n_test=proposals,
            rpn_pre_nms_top_n_train=2 * proposals, rpn_post_nms_top_n_train=2 * proposals,
            box_batch_size_per_image=proposals)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    image = make_data(height, width, seed=seed)[0]
    _calibrate_batchnorm(model, image)
    _calibrate_score_threshold(model, image, candidates=10 * detections)
    return model


def _calibrate_batchnorm(model: torch.nn.Module, image: torch.Tensor) -> None:
    """Set the BatchNorm layers' running statistics to those of ``image``, then freeze them.

    With random weights and the initial statistics (mean 0, variance 1), activations in eval
    shrink layer after layer (to ~1e-8 in MobileNetV3's features), and no box scores above
    chance. One forward of the backbone in train mode with momentum 1 makes eval normalise as
    training does; momentum 0 afterwards keeps training steps from changing the statistics.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = 1.0
    was_training = model.training
    model.train()
    with torch.no_grad():
        model.backbone(model.transform([image])[0].tensors)
    for m in norms:
        m.momentum = 0.0
    model.train(was_training)


def _calibrate_score_threshold(model: torch.nn.Module, image: torch.Tensor, candidates: int) -> None:
    """Set the box head's score threshold so that ``candidates`` (box, class) pairs of ``image`` pass it.

    With random weights every class scores about 1/91: torchvision's threshold (0.05) lets no
    detection through (the mask head would not run in eval), no threshold sends all 90 classes of
    every proposal to NMS (90,000 boxes for 1000 proposals, far more than a trained detector).
    """
    was_training = model.training
    model.eval()
    heads = model.roi_heads
    with torch.no_grad():
        images, _ = model.transform([image])
        features = model.backbone(images.tensors)
        proposals, _ = model.rpn(images, features)
        logits, _ = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, proposals, images.image_sizes)))
    scores = logits.softmax(-1)[:, 1:].flatten().sort(descending=True).values
    if scores.numel() > candidates:
        heads.score_thresh = float(scores[candidates - 1] + scores[candidates]) / 2
    else:
        heads.score_thresh = 0.0
    model.train(was_training)


def make_data(height: int, width: int, n_objects: int = 8, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """One random image ``[3, H, W]`` in [0, 1] and ``n_objects`` random boxes, labels and box-shaped masks."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=gen)
    sizes = torch.rand(n_objects, 2, generator=gen) * 0.4 + 0.1
    bw, bh = sizes[:, 0] * width, sizes[:, 1] * height
    x1 = torch.rand(n_objects, generator=gen) * (width - bw)
    y1 = torch.rand(n_objects, generator=gen) * (height - bh)
    boxes = torch.stack((x1, y1, x1 + bw, y1 + bh), dim=1)
    labels = torch.randint(1, 91, (n_objects,), generator=gen)
    masks = torch.zeros(n_objects, height, width, dtype=torch.uint8)
    for k, (a, b, c, d) in enumerate(boxes.round().long().tolist()):
        masks[k, b:d, a:c] = 1
    return image, dict(boxes=boxes, labels=labels, masks=masks)


# ----------------------------------------------------------------------------------------------
# One step, timed, profiled or checked.


def _provider_context(provider: str):
    return roialign.patch_torchvision() if provider == "roialign" else nullcontext()


def _forward(model, image, target, mode: str):
    if mode == "eval":
        with torch.no_grad():
            return model([image])
    return model([image], [target])


def _step(model, image, target, mode: str, seed: int, marks: bool = False):
    """One eval forward or one training step (forward, sum of losses, backward); returns the forward's output."""
    if mode == "eval":
        model.eval()
    else:
        model.train()
        model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the RPN's and ROI heads' samplers draw from the global generator
    with (torch.profiler.record_function("bench::forward") if marks else nullcontext()):
        out = _forward(model, image, target, mode)
    if mode == "train":
        with (torch.profiler.record_function("bench::backward") if marks else nullcontext()):
            sum(out.values()).backward()
    return out


def timed_step(model, image, target, mode: str, provider: str, seed: int) -> float:
    """Seconds for one unprofiled step; Python's garbage collector is run before and kept off during it."""
    with _provider_context(provider):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            _step(model, image, target, mode, seed)
            return time.perf_counter() - start
        finally:
            gc.enable()


def is_roi_align_event(name: str) -> bool:
    """A RoIAlign operator, its autograd wrapper or node, or a backward operator, of torchvision or roialign."""
    lower = name.lower()
    return ("roi_align" in lower or "roialign" in lower) and not lower.startswith("autograd::engine::")


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profiled_step(model, image, target, mode: str, provider: str, seed: int) -> dict:
    """One profiled step: milliseconds inside RoIAlign in the forward and the backward, the profiled
    step's own time, and the names of the events counted."""
    gc.collect()
    with _provider_context(provider):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            _step(model, image, target, mode, seed, marks=True)
            seconds = time.perf_counter() - start
    events = list(prof.events())
    ranges = {phase: [(e.time_range.start, e.time_range.end) for e in events if e.name == f"bench::{phase}"]
              for phase in ("forward", "backward")}
    roi = [e for e in events if is_roi_align_event(e.name)]
    result = dict(step_ms=seconds * 1e3, names=sorted({e.name for e in roi}))
    for phase, spans in ranges.items():
        inside = [(e.time_range.start, e.time_range.end) for e in roi
                  if any(a <= e.time_range.start and e.time_range.end <= b for a, b in spans)]
        result[f"{phase}_ms"] = _union_us(inside) / 1e3
    return result


def _nearest_box_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max over the boxes of either set of the L-inf distance (pixels) to the nearest box of the other."""
    if len(a) == 0 or len(b) == 0:
        return 0.0 if len(a) == len(b) else float("inf")
    d = (a[:, None, :].double() - b[None, :, :].double()).abs().amax(dim=2)
    return float(max(d.amin(dim=1).max(), d.amin(dim=0).max()))


def checked_step(model, image, target, mode: str, provider: str, seed: int) -> dict:
    """The warm-up step, with what the correctness comparison needs: pooled features and detections
    (eval), losses and parameter gradients (train), and the number of boxes into the box head."""
    captured: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    heads = model.roi_heads
    hooks = []
    for head in ("box", "mask"):
        pool = getattr(heads, f"{head}_roi_pool", None)
        if pool is None:
            continue
        hooks.append(pool.register_forward_hook(
            lambda mod, args, out, head=head: captured.__setitem__(f"{head}_features", out.detach().clone())))
        hooks.append(pool.register_forward_pre_hook(
            lambda mod, args, head=head: counts.__setitem__(head, sum(len(p) for p in args[1]))))
    try:
        with _provider_context(provider):
            out = _step(model, image, target, mode, seed)
    finally:
        for hook in hooks:
            hook.remove()
    result = dict(captured, box_rois=counts.get("box", 0), mask_rois=counts.get("mask"))
    if mode == "eval":
        result["detections"] = {k: v.detach().clone() for k, v in out[0].items()}
    else:
        result["losses"] = {k: float(v.detach()) for k, v in out.items()}
        result["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    return result


def compare(a: dict, b: dict, mode: str) -> dict:
    """Max differences between the torchvision run ``a`` and the roialign run ``b`` (see the module docstring)."""
    def feature_diff(key):  # max abs difference relative to the max abs value
        if key not in a or key not in b:
            return None
        if a[key].shape != b[key].shape:
            return float("nan")  # e.g. the mask head ran on different numbers of detections
        if a[key].numel() == 0:
            return 0.0
        x, y = a[key].double(), b[key].double()
        scale = float(x.abs().max())
        return float((x - y).abs().max()) / (scale if scale > 0 else 1.0)

    result = dict(box_features_max_rel_diff=feature_diff("box_features"),
                  mask_features_max_rel_diff=feature_diff("mask_features"))
    if mode == "eval":
        da, db = a["detections"], b["detections"]
        sa = da["scores"].double().sort(descending=True).values
        sb = db["scores"].double().sort(descending=True).values
        n = min(len(sa), len(sb))
        result.update(detections=f"{len(sa)}/{len(sb)}",
                      scores_max_diff=float((sa[:n] - sb[:n]).abs().max()) if n else 0.0,
                      boxes_max_diff=_nearest_box_distance(da["boxes"], db["boxes"]))
    else:
        la, lb = a["losses"], b["losses"]
        result["loss_max_diff"] = max(abs(la[k] - lb[k]) for k in la)
        num = max((float((a["grads"][k] - b["grads"][k]).abs().max()) for k in a["grads"]), default=0.0)
        den = max((float(g.abs().max()) for g in a["grads"].values()), default=0.0)
        result["grads_max_rel_diff"] = num / den if den else num
        result["losses"] = " ".join(f"{k.replace('loss_', '')}={la[k]:.6g}/{lb[k]:.6g}" for k in la)
    return result


# ----------------------------------------------------------------------------------------------
# One model and mode, both providers.


def bench_case(model: torch.nn.Module, name: str, mode: str, height: int, width: int, threads: int, repeats: int,
               profile_repeats: int, seed: int = 0, log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Rows (one per provider) for a model (from :func:`build_model`) and a mode, and the names of
    the profiled RoIAlign events."""
    torch.set_num_threads(threads)
    image, target = make_data(height, width, seed=seed)

    started = time.perf_counter()
    checks = {p: checked_step(model, image, target, mode, p, seed) for p in PROVIDERS}  # warm-up too
    correctness = compare(checks["torchvision"], checks["roialign"], mode)
    log(f"  {name} {mode}: warm-up and check {time.perf_counter() - started:.1f} s")

    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    # Pairs alternate their order (ABBA), so that neither provider always runs first.
    for i in range(repeats):
        for p in PROVIDERS[::1 if i % 2 == 0 else -1]:
            times[p].append(timed_step(model, image, target, mode, p, seed) * 1e3)
    profiles: dict[str, list[dict]] = {p: [] for p in PROVIDERS}
    for i in range(profile_repeats):
        for p in PROVIDERS[::1 if i % 2 == 0 else -1]:
            profiles[p].append(profiled_step(model, image, target, mode, p, seed))
    log(f"  {name} {mode}: {repeats} timed and {profile_repeats} profiled pairs "
        f"{time.perf_counter() - started:.1f} s")

    rows = []
    for p in PROVIDERS:
        t = sorted(times[p])
        q = statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else [t[0]] * 3
        fwd = statistics.median(r["forward_ms"] for r in profiles[p])
        bwd = statistics.median(r["backward_ms"] for r in profiles[p]) if mode == "train" else 0.0
        roi = statistics.median(r["forward_ms"] + r["backward_ms"] for r in profiles[p])
        step = statistics.median(t)
        row = dict(model=name, mode=mode, image=f"{height}x{width}", threads=threads,
                   box_head_rois=checks[p]["box_rois"], mask_head_rois=checks[p]["mask_rois"], provider=p,
                   repeats=len(t),
                   step_ms=round(step, 2), step_min_ms=round(t[0], 2), step_max_ms=round(t[-1], 2),
                   step_q1_ms=round(q[0], 2), step_q3_ms=round(q[2], 2),
                   roi_align_ms=round(roi, 3), roi_align_fwd_ms=round(fwd, 3), roi_align_bwd_ms=round(bwd, 3),
                   roi_align_share=round(roi / step, 4), rest_ms=round(step - roi, 2),
                   profile_repeats=len(profiles[p]),
                   profiled_step_ms=round(statistics.median(r["step_ms"] for r in profiles[p]), 2))
        rows.append(row)
    tv, ours = rows
    for row in rows:
        row["step_speedup_vs_torchvision"] = round(tv["step_ms"] / row["step_ms"], 3)
        row["roi_align_speedup_vs_torchvision"] = (round(tv["roi_align_ms"] / row["roi_align_ms"], 2)
                                                   if row["roi_align_ms"] > 0 else None)
    for key in ("box_features_max_rel_diff", "mask_features_max_rel_diff", "detections", "scores_max_diff",
                "boxes_max_diff", "loss_max_diff", "grads_max_rel_diff", "losses"):
        tv[key] = correctness.get(key) if key == "detections" else None  # the comparison is on roialign's row
        ours[key] = correctness.get(key)
    names = {p: sorted({n for r in profiles[p] for n in r["names"]}) for p in PROVIDERS}
    return rows, names


# ----------------------------------------------------------------------------------------------
# Output.


def _fmt(value, spec: str = ".3g") -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def print_tables(rows: list[dict]) -> None:
    print("| model | mode | image | RoIs box/mask head | provider | step ms median (min-max) "
          "| RoIAlign ms (fwd + bwd) | RoIAlign share | rest ms | RoIAlign tv/ours | step tv/ours |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        split = (f"{r['roi_align_ms']:.1f} ({r['roi_align_fwd_ms']:.1f} + {r['roi_align_bwd_ms']:.1f})"
                 if r["mode"] == "train" else f"{r['roi_align_ms']:.1f}")
        rois = f"{r['box_head_rois']}/{_fmt(r['mask_head_rois'], 'd')}"
        print(f"| {r['model']} | {r['mode']} | {r['image']} | {rois} | {r['provider']} "
              f"| {r['step_ms']:.1f} ({r['step_min_ms']:.1f}-{r['step_max_ms']:.1f}) | {split} "
              f"| {100 * r['roi_align_share']:.1f}% | {r['rest_ms']:.1f} "
              f"| {_fmt(r['roi_align_speedup_vs_torchvision'], '.2f')} | {r['step_speedup_vs_torchvision']:.3f} |")
    print("\nCorrectness, roialign against torchvision in the same run: pooled features and gradients, max abs "
          "difference / max abs value; scores (sorted) and losses, max abs difference; boxes, distance in pixels "
          "to the nearest box of the other run; detections, torchvision/roialign:\n")
    print("| model | mode | box-head pooled features (rel.) | mask-head pooled features (rel.) | detections "
          "| sorted scores | boxes (px) | losses | parameter grads (rel.) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["provider"] != "roialign":
            continue
        print(f"| {r['model']} | {r['mode']} | {_fmt(r['box_features_max_rel_diff'], '.2e')} "
              f"| {_fmt(r['mask_features_max_rel_diff'], '.2e')} | {_fmt(r['detections'])} "
              f"| {_fmt(r['scores_max_diff'], '.2e')} | {_fmt(r['boxes_max_diff'], '.2e')} "
              f"| {_fmt(r['loss_max_diff'], '.2e')} | {_fmt(r['grads_max_rel_diff'], '.2e')} |")
    for r in rows:
        if r["provider"] == "roialign" and r.get("losses"):
            print(f"\nlosses {r['model']} (torchvision/roialign): {r['losses']}")


def write_png(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
    except ImportError as error:
        raise SystemExit("--png needs matplotlib (pip install matplotlib)") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["model"], r["mode"]) for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases) + 0.6, 4.5), squeeze=False)
    for ax, (model, mode) in zip(axes[0], cases):
        pair = {r["provider"]: r for r in rows if (r["model"], r["mode"]) == (model, mode)}
        names = [p for p in PROVIDERS if p in pair]
        roi = [pair[p]["roi_align_ms"] for p in names]
        rest = [pair[p]["rest_ms"] for p in names]
        ax.bar(names, roi, color="tab:red", label="RoIAlign (fwd + bwd)")
        ax.bar(names, rest, bottom=roi, color="tab:gray", label="rest of the step")
        for k, p in enumerate(names):
            ax.plot([k, k], [pair[p]["step_min_ms"], pair[p]["step_max_ms"]], color="black", linewidth=1)
        ours = pair.get("roialign")
        subtitle = "" if ours is None else (f"\nstep x{ours['step_speedup_vs_torchvision']:.2f}, RoIAlign "
                                            f"x{_fmt(ours['roi_align_speedup_vs_torchvision'], '.1f')}")
        ax.set_title(f"{model} {mode}{subtitle}", fontsize=9)
        ax.set_ylabel("ms per step (median; line: min-max)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"torchvision detectors, CPU, threads={rows[0]['threads']}, image {rows[0]['image']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_line(threads: int) -> str:
    import numba
    import torchvision

    from ._bench import _cpu_name

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "?"
    return (f"roialign {roialign.__version__}; torch {torch.__version__}; torchvision {torchvision.__version__}; "
            f"numba {numba.__version__}; python {platform.python_version()}; {platform.machine()} {_cpu_name()}, "
            f"{os.cpu_count()} cores ({cores} usable); {threads} threads; load average {load}; "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def _size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from eval, train")
    parser.add_argument("--repeats", type=int, default=None, help="timed pairs (default 5)")
    parser.add_argument("--profile-repeats", type=int, default=None,
                        help="profiled pairs for the RoIAlign time (default: as --repeats)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch.get_num_threads(); 1 with --smoke)")
    parser.add_argument("--size", default=None, help="image HxW (default 800x1088, kept as is by the models)")
    parser.add_argument("--proposals", type=int, default=None,
                        help="boxes into the box head in eval (default 1000); mobilenet samples as many in training")
    parser.add_argument("--detections", type=int, default=None,
                        help="detections per image, the mask head's boxes in eval (default 100, torchvision's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=None, help="write the rows to this CSV file")
    parser.add_argument("--png", default=None, help="write a bar chart to this PNG file (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="full-size image, 2 timed pairs, 1 profiled pair")
    parser.add_argument("--smoke", action="store_true",
                        help="160x224 image, 64 proposals, 10 detections, 1 pair, 1 thread: checks that it "
                             "runs, measures nothing")
    args = parser.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            parser.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for m in modes:
        if m not in MODES:
            parser.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    repeats = args.repeats or (1 if args.smoke else 2 if args.quick else 5)
    profile_repeats = args.profile_repeats or (1 if args.smoke or args.quick else repeats)
    height, width = _size(args.size) if args.size else ((160, 224) if args.smoke else (800, 1088))
    proposals = args.proposals or (64 if args.smoke else 1000)
    detections = args.detections or (10 if args.smoke else 100)
    # --smoke checks that everything runs: one thread, since two OpenMP threads on a busy machine can
    # make each step many times slower (threads wait at barriers for a descheduled peer).
    threads = args.threads or (1 if args.smoke else torch.get_num_threads())
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # not installed, or built for another torch
        parser.error(f"the model benchmark needs torchvision, which cannot be imported: {error}")
    if args.png:  # fail now, not after the measurement
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--png needs matplotlib (pip install matplotlib)")

    torch.set_num_threads(threads)
    print(machine_line(threads))
    print(f"image {height}x{width} (one, random), random weights (seed {args.seed}), up to {proposals} proposals "
          f"and {detections} detections; {repeats} timed pairs and "
          f"{profile_repeats} profiled pairs per model and mode, in alternating order (ABBA); "
          f"'tv/ours' = torchvision time / roialign time\n")
    rows, names = [], {}
    for name in models:
        model = build_model(name, height, width, proposals, detections, args.seed)  # eval and train share it
        for mode in modes:
            case_rows, case_names = bench_case(model, name, mode, height, width, threads, repeats, profile_repeats,
                                               args.seed)
            rows += case_rows
            for p, n in case_names.items():
                names.setdefault(p, set()).update(n)
    print()
    print_tables(rows)
    print("\nRoIAlign time: union of the profiled events " +
          "; ".join(f"{p}: {', '.join(sorted(n))}" for p, n in names.items()))
    print("share = RoIAlign time (profiled passes) / whole step (unprofiled passes); "
          "rest = step - RoIAlign")
    if args.csv:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nwrote {args.csv}")
    if args.png:
        write_png(rows, args.png)
        print(f"wrote {args.png}")
    return rows


if __name__ == "__main__":
    main()
