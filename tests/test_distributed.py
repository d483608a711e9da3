"""A patched torchvision Mask R-CNN trains under DistributedDataParallel, bitwise reproducibly.

Two CPU processes (gloo, one thread each) train the same model for two SGD steps, each on its
own random images and targets. After the steps both replicas must hold bitwise equal
parameters, and a second complete run from the same seeds must end bitwise equal to the first
(losses, gradients and parameters). The model's RoIAlign calls (the box and mask poolers and the
mask targets) must go through ``torch.ops.roialign``, so the test cannot pass unpatched.

Each worker is this file run as a script (``python test_distributed.py RANK ...``) and reports
through a JSON file: the losses as exact hex floats, and a SHA-256 of every parameter,
gradient and buffer, so that a mismatch names the tensors that differ.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORLD_SIZE = 2
STEPS = 2
SEED = 1234
LR = 0.01
IMAGES_PER_RANK = 2
PROCESS_TIMEOUT_S = 300  # per run, for both workers together; the collectives time out after 120 s

pytest.importorskip("torchvision")


# --------------------------------------------------------------------------------------------
# The worker (runs in a subprocess)
# --------------------------------------------------------------------------------------------

def _digest(tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def _build_model():
    """Mask R-CNN (torchvision's class, its box and mask heads) on a small MobileNetV3-FPN backbone."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True, trainable_layers=6)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    return MaskRCNN(backbone, num_classes=3, min_size=160, max_size=224, rpn_anchor_generator=anchors,
                    rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150, box_batch_size_per_image=64)


def _make_batch(generator):
    """Random images of different sizes, each with 1 to 3 random boxes, their labels and masks."""
    import torch

    images, targets = [], []
    for _ in range(IMAGES_PER_RANK):
        height = int(torch.randint(140, 200, (), generator=generator))
        width = int(torch.randint(140, 200, (), generator=generator))
        images.append(torch.rand(3, height, width, generator=generator))
        count = int(torch.randint(1, 4, (), generator=generator))
        x1 = torch.rand(count, generator=generator) * (width - 60)
        y1 = torch.rand(count, generator=generator) * (height - 60)
        w = 20 + torch.rand(count, generator=generator) * 40
        h = 20 + torch.rand(count, generator=generator) * 40
        boxes = torch.stack([x1, y1, x1 + w, y1 + h], dim=1)
        masks = torch.zeros(count, height, width, dtype=torch.uint8)
        for k, (a, b, c, d) in enumerate(boxes.round().long().tolist()):
            masks[k, b:d, a:c] = 1
        labels = torch.randint(1, 3, (count,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


def _worker(rank: int, init_file: str, out_file: str) -> None:
    import torch
    import torch.distributed as dist
    import torchvision
    from op_counter import CountOps  # this file runs as a script from tests/

    import roialign

    torch.set_num_threads(1)
    original_roi_align = torchvision.ops.poolers.roi_align

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=120))
    report = {"rank": rank, "losses": [], "grads": [], "calls": {}}
    try:
        with roialign.patch_torchvision():
            import torchvision.models.detection.roi_heads as roi_heads

            report["patched"] = {
                "poolers": torchvision.ops.poolers.roi_align is not original_roi_align
                and torchvision.ops.poolers.roi_align.__module__.startswith("roialign"),
                "roi_heads": roi_heads.roi_align.__module__.startswith("roialign"),
            }
            torch.manual_seed(SEED)  # the same initial weights on both ranks (DDP broadcasts rank 0's anyway)
            model = _build_model()
            model.train()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
            torch.manual_seed(SEED + 1 + rank)  # each rank's own sampling in the RPN and the ROI heads
            data = torch.Generator().manual_seed(SEED + 100 + rank)  # and its own images
            counter = CountOps()
            for _ in range(STEPS):
                images, targets = _make_batch(data)
                with counter:
                    losses = ddp(images, targets)
                    loss = sum(losses.values())
                    optimizer.zero_grad()
                    loss.backward()
                optimizer.step()
                report["losses"].append({name: value.item().hex() for name, value in sorted(losses.items())})
                report["grads"].append({name: _digest(p.grad) for name, p in model.named_parameters()
                                        if p.grad is not None})
            report["calls"] = counter.calls
            report["params"] = {name: _digest(p) for name, p in model.named_parameters()}
            report["buffers"] = {name: _digest(b) for name, b in model.named_buffers()}
            report["backend"] = roialign.current_backend()
    finally:
        dist.destroy_process_group()
    Path(out_file).write_text(json.dumps(report))


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------

def _run(directory: Path) -> list[dict]:
    """One complete distributed run: both workers, each reporting to a JSON file in ``directory``."""
    directory.mkdir()
    init_file = directory / "rendezvous"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on the loopback interface
    workers = []
    for rank in range(WORLD_SIZE):
        log = open(directory / f"rank{rank}.log", "w+")
        command = [sys.executable, str(Path(__file__).resolve()), str(rank), str(init_file),
                   str(directory / f"rank{rank}.json")]
        workers.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    try:
        for process, _ in workers:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process, _ in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
    failures = []
    for rank, (process, log) in enumerate(workers):
        log.seek(0)
        output = log.read()
        log.close()
        if process.returncode != 0:
            failures.append(f"rank {rank} exited with {process.returncode} (negative: killed by a signal, "
                            f"e.g. at the {PROCESS_TIMEOUT_S} s limit):\n{output[-4000:]}")
    assert not failures, "\n".join(failures)
    return [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def _differing(first: dict, second: dict) -> list[str]:
    assert first.keys() == second.keys()
    return [name for name in first if first[name] != second[name]]


def test_ddp_training_is_bitwise_reproducible(tmp_path):
    first = _run(tmp_path / "first")

    for report in first:
        assert report["patched"] == {"poolers": True, "roi_heads": True}, report["patched"]
        calls = report["calls"]
        # Per step: the box and mask poolers and the mask targets run forward; both poolers backward.
        assert calls.get("roialign.roi_align.default", 0) >= 3 * STEPS, calls
        assert calls.get("roialign.roi_align_backward.default", 0) >= 2 * STEPS, calls
        assert not any(name.startswith("torchvision.") for name in calls), calls
        assert "loss_mask" in report["losses"][0]

    # (1) The replicas agree: all-reduced gradients, then parameters after every step.
    rank0, rank1 = first
    assert rank0["losses"] != rank1["losses"], "the ranks should train on different data"
    for step in range(STEPS):
        assert not _differing(rank0["grads"][step], rank1["grads"][step]), \
            f"step {step + 1}: the replicas' gradients differ after all-reduce"
    assert not _differing(rank0["params"], rank1["params"]), "the replicas' parameters differ"

    # (2) A second complete run from the same seeds ends bitwise equal.
    second = _run(tmp_path / "second")
    for rank in range(WORLD_SIZE):
        a, b = first[rank], second[rank]
        assert a["losses"] == b["losses"], f"rank {rank}: the losses differ between runs"
        for step in range(STEPS):
            differing = _differing(a["grads"][step], b["grads"][step])
            assert not differing, f"rank {rank}, step {step + 1}: gradients differ between runs: {differing}"
        assert not _differing(a["params"], b["params"]), f"rank {rank}: parameters differ between runs"
        assert not _differing(a["buffers"], b["buffers"]), f"rank {rank}: buffers differ between runs"


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
