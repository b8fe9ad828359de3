"""Runtime stage, CPU executor: recycled memory for large outputs.

Comes in: a shape and dtype the executor is about to fill completely (``torch.empty`` semantics).
Goes out: a tensor, on memory a previous call's output no longer uses when there is some.

Why: glibc serves allocations above its largest mmap threshold (32 MiB) with a fresh ``mmap`` and
gives them back with ``munmap`` when freed, so every call's 32 MiB output (a 16K sliding window,
8 heads, D=64) is faulted in and zeroed by the operating system again: ~12 ms of a ~47 ms forward
on this 2-core machine (34.6 ms with ``MALLOC_MMAP_THRESHOLD_`` raised, the same kernel). Smaller
blocks are recycled by glibc itself, so only buffers of at least :data:`MIN_BYTES` come here.

A held buffer is reused only when nothing but this pool refers to its storage (no tensor, view,
autograd saved tensor, NumPy array or DLPack capsule: each holds a reference to the storage),
so a tensor handed out is never written again while anyone can read it. The pool keeps at most
``PATTERNDSL_CPU_POOL_MB`` (default 256) of buffers; 0 turns it off.
"""

from __future__ import annotations

import math
import threading

import torch

from patterndsl import config

#: Below this glibc recycles freed blocks itself (its mmap threshold adapts up to 32 MiB).
MIN_BYTES = 32 << 20

_lock = threading.Lock()
_held: list[torch.UntypedStorage] = []


def _unused(storage: torch.UntypedStorage) -> bool:
    """True when only the pool's own reference to ``storage`` is left."""
    return torch._C._storage_Use_Count(storage._cdata) == 1


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on CPU, on recycled memory when the tensor is large.

    The contents are arbitrary (as ``torch.empty``): callers write every element.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    limit = config.cpu_pool_bytes()
    if nbytes < MIN_BYTES or nbytes > limit:
        return torch.empty(shape, dtype=dtype)
    with _lock:
        storage = next((s for s in _held if s.nbytes() == nbytes and _unused(s)), None)
        if storage is None:
            storage = torch.empty(nbytes, dtype=torch.uint8).untyped_storage()
            _held.append(storage)
            _trim(limit)
        # Not a view of anything (``_base`` is None): a fresh tensor on the held storage.
        return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


def _trim(limit: int) -> None:
    """Drop unused buffers, oldest first, until the pool holds at most ``limit`` bytes."""
    total = sum(s.nbytes() for s in _held)
    for s in list(_held):
        if total <= limit:
            break
        if _unused(s):
            _held.remove(s)
            total -= s.nbytes()
    # Buffers still in use stay counted; they are dropped once unused and over the limit.


def held_bytes() -> int:
    """Bytes of the buffers the pool holds (in use or not)."""
    with _lock:
        return sum(s.nbytes() for s in _held)


def clear() -> None:
    """Forget every held buffer (tensors using one keep it alive until they go)."""
    with _lock:
        _held.clear()
