"""Every Triton kernel must compile for a GPU, which the interpreted tests cannot tell.

Without a GPU, the Triton kernels are tested through Triton's interpreter, which runs their
Python on CPU tensors and never calls ``triton.compile``: a kernel that read a module global
that is not a ``tl.constexpr`` passed every interpreted test and failed to compile on every GPU.
Triton compiles for a GPU it does not have, so this test compiles each kernel of both operators
down to a cubin for sm_90, for float32, float64 and bfloat16 feature maps and for integer
arguments equal to 1 (which Triton turns into constants), with Triton's own ptxas.

The compilation runs in subprocesses (``compile_triton_kernels.py``, which also holds the
kernels' tables): conftest.py switches the interpreter on in this process before any kernel is
defined, and an interpreted kernel cannot be compiled.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import roialign

HELPER = Path(__file__).with_name("compile_triton_kernels.py")
KERNELS = [f"{module}.{kernel}" for module in ("roi_align", "roi_align_rotated")
           for kernel in ("_forward_kernel", "_backward_input_kernel", "_backward_rois_kernel")]
CASES = ("fp32", "fp64", "bf16", "ones")  # each kernel: the feature map's dtype, or every integer argument 1
TIMEOUT_S = 600


def _processes() -> int:
    """One compiling process per core, up to two: the compilations are ptxas and single-threaded
    Python, and two halve the wall time on CI's two cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(2, cores))


def _environment(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS")}
    # A fresh cache, always: Triton 3.2's cache key misses what a kernel reads from the module's
    # globals, so a cached kernel from before the change under test would hide its failure.
    env["TRITON_CACHE_DIR"] = str(cache)
    # The roialign this process imported, wherever it is installed from.
    root = str(Path(roialign.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _run(tmp_path: Path) -> tuple[list[dict], list[str]]:
    """The records of every compiling process, and the stderr of each that crashed."""
    n = _processes()
    env = _environment(tmp_path / "triton-cache")
    # Output to files: a process stuck on a full pipe would wait for the other to finish.
    outputs = [(tmp_path / f"shard{i}.out", tmp_path / f"shard{i}.err") for i in range(n)]
    processes = []
    for i, (out, err) in enumerate(outputs):
        with open(out, "w") as stdout, open(err, "w") as stderr:
            processes.append(subprocess.Popen([sys.executable, str(HELPER), f"--shard={i}/{n}"], env=env,
                                              stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL))
    try:
        for process in processes:
            process.wait(timeout=TIMEOUT_S)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    records, crashes = [], []
    for process, (out, err) in zip(processes, outputs):
        for line in out.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # something else printed on stdout
                pass
        if process.returncode not in (0, 10, 11, 12):  # not one of the helper's own answers
            crashes.append(f"{' '.join(process.args[1:])} exited with {process.returncode}:\n"
                           f"{err.read_text()[-4000:]}")
    return records, crashes


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    records, crashes = _run(tmp_path)
    assert not crashes, "\n\n".join(crashes)

    # No CUDA backend or no ptxas is a broken install here (CI gets Triton from torch's CUDA
    # build, with both), not a reason to skip.
    toolchain = next((r for r in records if r.get("toolchain") is False), None)
    if toolchain is not None:
        pytest.fail(f"Triton {toolchain['triton']} cannot compile a trivial kernel for sm_90: its CUDA backend or "
                    f"ptxas is missing (install torch's CUDA build, which brings Triton with ptxas).\n"
                    f"{toolchain['error']}", pytrace=False)
    table = next((r for r in records if r.get("table") is False), None)
    if table is not None:
        pytest.fail(table["error"], pytrace=False)

    # One report per kernel: which cases failed, and each distinct error once.
    failed: dict[str, dict[str, list[str]]] = {}
    for record in records:
        if not record["ok"]:
            failed.setdefault(record["kernel"], {}).setdefault(record["error"], []).append(record["case"])
    if failed:
        report = []
        for kernel, errors in failed.items():
            for error, cases in errors.items():
                report.append(f"{kernel} failed to compile for sm_90 ({', '.join(cases)}):\n{error}")
        pytest.fail("\n\n".join(report), pytrace=False)

    # Every kernel compiled in every case: guards against the helper's tables dropping one.
    compiled = {(r["kernel"], r["case"].split(",")[0]) for r in records if r["ok"]}
    missing = [f"{kernel} ({case})" for kernel in KERNELS for case in CASES if (kernel, case) not in compiled]
    assert not missing, f"not compiled: {', '.join(missing)}"
