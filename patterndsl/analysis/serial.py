"""Stage 4 (block plan): torch operations of the planner run on the calling thread alone.

The planner evaluates elements only on tiles interval reasoning cannot settle: small tensors,
many operations. With the default intra-op thread count each operation above torch's grain size
is an OpenMP parallel region, and the first one of a process starts the thread team; on a shared
machine every region then waits for a descheduled thread. Measured, a fresh process on a loaded
2-core machine, ``window(32, 32, dilation = 8) | global(4)`` at 16K: 552 boxes of at most 8 x 16
pairs evaluated in 122 ms CPU with two threads, 1.6 ms with one (the whole plan 143 -> 16 ms).

``torch.set_num_threads`` sets the calling thread's OpenMP and MKL counts and the default of
threads started meanwhile; :func:`serial` restores it on the way out, and is a no-op when the
thread runs serially already (a nested plan, a worker of ``runtime/cpu/pool.py``).

It also pauses Python's cyclic garbage collector: a plan makes Python objects in bursts (the
8,192 box segments of a grid order at a million tokens are 40,000 tuples), and with torch
imported a full collection walks some 170,000 objects, 0.1-0.2 s on a loaded machine, several
times a plan (``nat`` at 1M: 0.47 -> 0.31 s). Reference counting still frees everything; the
collector runs again on the way out.
"""

from __future__ import annotations

import functools
import gc

import torch


def serial(fn):
    """``fn`` with torch's intra-op threads set to 1 and the cyclic collector paused while it runs (both restored)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        collecting = gc.isenabled()
        gc.disable()
        try:
            return _one_thread(fn, *args, **kwargs)
        finally:
            if collecting:
                gc.enable()

    return wrapper


def _one_thread(fn, *args, **kwargs):
    threads = torch.get_num_threads()
    if threads <= 1:
        return fn(*args, **kwargs)
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
