"""The CPU kernels' threads, and how work is cut into jobs for them.

The kernels are compiled ``nogil`` and their jobs run on ``torch.get_num_threads()`` threads:
PyTorch's own OpenMP threads where it has them, else a pool of our own, recreated after ``fork``
(see :class:`_Workers`). Each operator splits its work so that each job owns its part of the
result and computes it in a fixed order, which makes results bitwise identical for any number of
threads, and any cut into jobs, without atomics or locks. How finely work is cut may therefore
depend on the host (:data:`BAND_BYTES` follows its L2 cache) without changing a bit.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch



def _torch_libgomp():
    """``GOMP_parallel`` of the GNU OpenMP runtime PyTorch runs its operators on, or None: Linux
    only, and only the copy PyTorch ships (or the only one loaded), never a guess between two."""
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line}
        ours = [p for p in paths if os.path.dirname(p) == os.path.join(os.path.dirname(torch.__file__), "lib")]
        chosen = ours or (list(paths) if len(paths) == 1 else [])
        if len(chosen) != 1:
            return None
        parallel = ctypes.CDLL(chosen[0]).GOMP_parallel
    except (OSError, AttributeError):
        return None
    parallel.argtypes = [_GOMP_BODY, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    return parallel


_GOMP_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _Workers:
    """Runs the jobs of a ``nogil`` kernel on ``torch.get_num_threads()`` threads.

    Where PyTorch runs on GNU OpenMP (its Linux wheels), the jobs run on PyTorch's own OpenMP
    threads, through libgomp's ``GOMP_parallel``. After a parallel PyTorch operator those threads
    keep spinning for a few milliseconds; threads of our own would share the cores with them, and
    on 2 cores a RoIAlign forward right after one took 1.1-1.9x as long. Elsewhere, in a process
    forked from this one (GNU OpenMP does not survive a fork), or with ``openmp = False``, a
    thread pool of our own runs them. Which threads run a job never changes a result.
    """

    openmp = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._size = 0
        self._gomp = _torch_libgomp()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        # The parent's threads do not exist in a forked child: never touch their pool there.
        self._lock = threading.Lock()
        self._pool, self._size, self._gomp = None, 0, None

    def size(self) -> int:
        return max(1, torch.get_num_threads())

    def run(self, fn, jobs) -> None:
        """Call ``fn(*job)`` for every job on up to ``size()`` threads, the caller's included.

        Threads take the next job as they finish one (boxes differ in cost). The caller works
        too, so a call always finishes even when the pool is busy with other callers' jobs. An
        exception in a job stops the jobs not yet started and is raised here.
        """
        size = self.size()
        n = min(size, len(jobs))
        if n <= 1:
            for job in jobs:
                fn(*job)
            return
        pending = iter(jobs)
        take = threading.Lock()
        errors: list[BaseException] = []

        def drain(_=None) -> None:
            try:
                while not errors:
                    with take:
                        job = next(pending, None)
                    if job is None:
                        return
                    fn(*job)
            except BaseException as error:  # noqa: BLE001 - raised again by the caller
                errors.append(error)

        if self.openmp and self._gomp is not None:
            self._gomp(_GOMP_BODY(drain), None, n, 0)  # every thread of the team, the caller's too
        else:
            # The pool only grows (callers in other threads may ask for other thread counts:
            # torch.set_num_threads is per thread), and jobs are submitted under the lock, so a
            # pool is never shut down between a caller taking it and submitting to it; a
            # replaced pool finishes what it was given.
            with self._lock:
                if self._pool is None or self._size < size - 1:
                    if self._pool is not None:
                        self._pool.shutdown(wait=False)
                    self._pool = ThreadPoolExecutor(max_workers=size - 1, thread_name_prefix="roialign")
                    self._size = size - 1
                helpers = [self._pool.submit(drain) for _ in range(n - 1)]
            drain()
            for helper in helpers:
                helper.result()
        if errors:
            raise errors[0]


workers = _Workers()


def ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """``[0, total)`` cut into ``parts`` (at most ``total``) non-empty ranges of nearly equal length."""
    parts = max(1, min(parts, total))
    edges = [total * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:])]


def l2_cache_bytes(cpu_dir: str = "/sys/devices/system/cpu/cpu0/cache", default: int = 1 << 20) -> int:
    """One thread's share of the level-2 cache (its size over the CPUs sharing it), as Linux
    reports it for CPU 0, kept within [256 KiB, 8 MiB]; ``default`` where it cannot be read."""
    try:
        for entry in sorted(os.listdir(cpu_dir)):
            path = os.path.join(cpu_dir, entry)
            if not entry.startswith("index"):
                continue
            with open(os.path.join(path, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            if level != "2" or kind not in ("Unified", "Data"):
                continue
            with open(os.path.join(path, "size")) as f:
                size = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            size_bytes = int(size.rstrip("KMG")) * scale
            try:
                with open(os.path.join(path, "shared_cpu_list")) as f:
                    sharing = _count_cpus(f.read())
            except (OSError, ValueError):
                sharing = 1
            return min(8 << 20, max(256 << 10, size_bytes // max(1, sharing)))
    except (OSError, ValueError):
        pass
    return default


def _count_cpus(listing: str) -> int:
    """CPUs in a Linux CPU list such as ``0-3,8,10-11``."""
    count = 0
    for part in listing.strip().split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


# Rows of an input gradient accumulated together by one job (every operator's banded backward):
# one thread's share of the L2 cache, so that a band stays in cache while the boxes that cross it
# add to it. Measured (Intel Xeon, 2 MB of L2 per core, RoIAlign input gradient, 2 threads, median
# of 5 alternations against 1 MB bands): 2 MB bands 0.71-0.94 of the time in float64, 0.76-1.01
# in float32, 0.78-0.99 in bfloat16; 4 MB bands no better, and 0.5 MB ones up to 1.9x slower.
# Bands of any height give the same bits (tested).
BAND_BYTES = l2_cache_bytes()

# RoIAlign's and the rotated RoIAlign's input gradients redo a box's taps (or samples) in every
# band the box crosses, so a thin band pays that again and again: their bands are twice as large.
# Measured (AMD EPYC, 1 MB of L2 per core, 2 threads, median of 5-7 alternations, input gradient
# alone, boxhead-P2, train-P3 and mask-14, both layouts): against 1 MB bands, 2 MB ones took
# 0.69-0.95 of the time for RoIAlign in float32, float64 and bfloat16, and 0.62-0.82 for the
# rotated one; 4 MB ones were faster still on boxhead-P2 but slower on mask-14's NCHW gradient
# (and 8 MB slower on mask-14 in every layout). On the Intel host above, with 2 MB of L2, 4 MB
# bands were as fast as 2 MB ones. PrRoIPool builds its tables once per call: with 2 MB bands
# it took 0.96-1.10 of the time, so it keeps BAND_BYTES.
TAP_BAND_BYTES = 2 * BAND_BYTES


def band_rows(budget: int, row_bytes: int, height: int, images: int) -> int:
    """Rows per band: as many as fit in ``budget`` bytes, but few enough for two bands per thread,
    so that threads can even out bands of unequal cost (a 4 MB map in 2 MB bands kept one of two
    threads waiting: its backward took 1.04-1.12x as long as in 1 MB bands, on 2 threads)."""
    rows = max(1, budget // max(1, row_bytes))
    return max(1, min(rows, -(-height * images // (2 * workers.size()))))
