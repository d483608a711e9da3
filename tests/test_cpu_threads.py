"""The CPU kernels' thread pool (``kernels/cpu/threads.py``) under callers in several Python threads."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("numba")


def test_our_pool_survives_callers_that_ask_for_other_thread_counts(monkeypatch):
    """torch.set_num_threads is per thread, so callers may ask our pool for different sizes at
    once. A caller that makes the pool grow must not shut it down under another caller about to
    submit to it ("cannot schedule new futures after shutdown"): here the first caller's first
    submission waits until the pool it took is shut down, or for a second, whichever comes first."""
    from roialign.kernels.cpu import threads as cpu_threads

    shut_down, started = threading.Event(), threading.Event()

    class Pool(cpu_threads.ThreadPoolExecutor):
        waited = False

        def submit(self, *args, **kwargs):
            if threading.current_thread().name == "small" and not Pool.waited:
                Pool.waited = True
                started.set()
                shut_down.wait(timeout=1.0)
            return super().submit(*args, **kwargs)

        def shutdown(self, *args, **kwargs):
            shut_down.set()
            return super().shutdown(*args, **kwargs)

    monkeypatch.setattr(cpu_threads, "ThreadPoolExecutor", Pool)
    sizes = {"small": 2, "large": 3}

    class Workers(cpu_threads._Workers):
        openmp = False

        def size(self):
            return sizes[threading.current_thread().name]

    pool = Workers()
    done, errors = {}, []

    def caller():
        name = threading.current_thread().name
        try:
            if name == "large":
                started.wait(timeout=5.0)
            out = []
            pool.run(lambda i: (time.sleep(0.005), out.append(i)), [(i,) for i in range(8)])
            done[name] = sorted(out)
        except Exception as error:  # reported below
            errors.append(error)

    callers = [threading.Thread(target=caller, name=name) for name in sizes]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=30)
    assert not errors, errors
    assert done == {"small": list(range(8)), "large": list(range(8))}
    kept = pool._pool
    again = threading.Thread(target=lambda: pool.run(lambda i: None, [(0,), (1,)]), name="small")
    again.start()
    again.join(timeout=30)
    assert pool._pool is kept  # a smaller request reuses the larger pool
