"""Runtime stage, CPU executor: independent steps on worker threads whose torch operations run serially.

Comes in: callables that write disjoint memory (the chunks of one segment: distinct query tiles)
and the intra-op thread count of the call. Goes out: nothing; every callable has run when
:func:`run` returns. Why: a step of the math kernel is ~15 small torch operations, each one an
OpenMP parallel region that waits for its slowest thread. On a shared machine a descheduled thread
stalls every region (measured, 4K softcapped sliding window, loaded 2-core machine: 0.5 s with one
thread, 4-7 s with two). Here each worker runs whole steps with one intra-op thread, so the only
wait is for the last step. Torch releases the GIL inside its operations, so the workers overlap.

``torch.set_num_threads(1)`` in a worker sets that thread's OpenMP and MKL thread counts (thread-local)
and the process-wide default new threads start from; :func:`run` restores the latter before returning.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

_LOCK = threading.Lock()
_LOCAL = threading.local()
_pool: ThreadPoolExecutor | None = None


def _serial(task: Callable[[], None]) -> None:
    if not getattr(_LOCAL, "serial", False):
        torch.set_num_threads(1)
        _LOCAL.serial = True
    task()


def run(tasks: list[Callable[[], None]], threads: int) -> None:
    """Run ``tasks`` (independent, writing disjoint memory) on ``threads`` workers; in order here when 1.

    Args:
        tasks: the steps; exceptions propagate (the first one, after every step has finished).
        threads: the call's intra-op thread count (``torch.get_num_threads()``).
    """
    global _pool
    if threads <= 1 or len(tasks) <= 1 or getattr(_LOCAL, "serial", False):
        for task in tasks:
            task()
        return
    with _LOCK:
        if _pool is None or _pool._max_workers != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="patterndsl-cpu")
        pool = _pool
    try:
        futures = [pool.submit(_serial, task) for task in tasks]
        errors = [f.exception() for f in futures]
    finally:
        torch.set_num_threads(threads)
    for error in errors:
        if error is not None:
            raise error
