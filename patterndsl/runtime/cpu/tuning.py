"""Runtime stage, CPU executor: the tuning knobs, as one frozen value, and the fused kernels they choose.

Comes in: nothing but what a caller or a test sets (``with cpu.options(kernel="math"):``, or an
explicit ``options=`` argument to :func:`patterndsl.runtime.cpu.forward` / ``backward``). Goes
out: the :class:`CpuOptions` every step of the executor reads, passed down from the entry point
(never read from a module global bound as a default argument), and torch's fused CPU
flash-attention ops when they exist. The values are measurements on the shared 2-core machine
(see benchmarks/cpu_attention.py); none changes results, only how the work is cut.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

# torch's fused CPU flash-attention kernels (internal aten ops); without them the math path runs.
FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


@dataclass(frozen=True)
class CpuOptions:
    """How the CPU executor cuts its work. Results are the same for every value; only speed and memory change.

    Attributes:
        kernel: inner kernel per segment: ``"fused"`` runs torch's CPU flash-attention kernel on the
            segment's tile views (one call per segment, fp32 accumulation, no score matrix in
            memory); ``"math"`` runs matmul + two-pass softmax in chunks. Fused is the default
            because it issues far fewer parallel regions (benchmarks/cpu_attention.py --kernel).
        chunk_bytes: score-matrix bytes per chunk of the math kernel: large enough for efficient
            batched matmuls, small enough that the softmax passes stay in cache.
        fused_chunk_bytes: bytes of per-tile keys or dK/dV a gathered fused step may hold at once
            (in the backward: its gathered keys and values, ``P`` and ``dS``), with several threads:
            every kernel call and add is a parallel region, and on a shared machine each waits for
            its slowest thread, so few large calls win (16K sliding window, 2 threads: 8 MiB chunks
            2-6 s, 32-64 MiB 0.4-2 s; BigBird 4K backward, loaded: 4 MiB 9.9 s, 64 MiB 2.7 s).
        fused_chunk_bytes_serial: the same with one thread, where no region waits: buffers small
            enough for the allocator to recycle instead of faulting in fresh pages win (1 thread:
            8 MiB ~490 ms CPU, 64 MiB ~550-670 ms).
        dense: a pattern that is exactly ``causal`` or ``full`` runs as torch's fused kernel on the
            whole tensors (:mod:`patterndsl.runtime.cpu.dense`, what SDPA's ``is_causal`` runs),
            not through the tile schedule (causal 4K: 1.4x the kernel's time). False keeps the tiles.
        min_affine: affine segments shorter than this are pooled into gathered buckets (fewer,
            larger steps).
        wide_min: a loose query tile (in no equal-width affine run) whose key tiles include at
            least this many consecutive full tiles runs them as a separate segment, unmasked over a
            strided view, merged by log-sum-exp: causal and global rows run at dense speed instead
            of as padded, gathered (copied) buckets (causal 8K: 3.0 s and 4.9 GB before). 0 disables.
        split_runs: loose rows whose key tiles form several contiguous runs, each at least this
            long, are split into one affine piece per run; 0 disables.
        split_rows: forward only: affine segments run as sub-tiles of this many query rows over
            narrower key windows (0 disables). Measured on the 256-key sliding window at 16K: the
            forward ~10% faster; the fused backward was slower with 32-row units (and with 128-row
            ones), so it keeps the tiles. Our own bmm/exp2 steps on the same sub-tiles (K^T kept for
            NN score matmuls, edge-only masks, a key-major backward) measured slower or equal, forward
            and backward (commits 8895e64 and 9668791 of branch s7-17c, reverted).
        affine_bwd_tiles: query tiles per step of the in-place affine backward (per head): the
            step's ``[n, BM, width*BN]`` probabilities stay cache-sized (16K sliding window,
            2 threads: 32-64 best).
        affine_bwd_bytes: ... and fewer when one such score buffer would exceed this many bytes
            (wide key windows).
        gather_row_chunk: query rows per step of the gathered (``route``) backward (bounds the
            ``rows x block`` score matrix).
        native: run each schedule through the native C++ kernel (:mod:`patterndsl.runtime.cpu.native`:
            one online softmax per query tile over all its key tiles, no gathered copies) where it
            supports the call and could be built; False keeps the torch steps above.
        native_dense: a square plain ``causal`` call runs the native kernel on its tiles instead of
            torch's fused kernel on the whole tensors (``dense``): causal 4K, one thread, CPU time,
            forward ~0.85x and forward+backward ~0.8x of the fused kernel's (what SDPA's
            ``is_causal`` runs). ``full`` and ``Lq != Lk`` keep the fused kernel.
    """

    kernel: str = "fused"
    chunk_bytes: int = 4 << 20
    fused_chunk_bytes: int = 64 << 20
    fused_chunk_bytes_serial: int = 8 << 20
    dense: bool = True
    min_affine: int = 4
    wide_min: int = 8
    split_runs: int = 2
    split_rows: int = 32
    affine_bwd_tiles: int = 32
    affine_bwd_bytes: int = 4 << 20
    gather_row_chunk: int = 2048
    native: bool = True
    native_dense: bool = True

    def __post_init__(self):
        if self.kernel not in ("fused", "math"):
            raise ValueError(f"kernel must be 'fused' or 'math', got {self.kernel!r}")
        positive = ("chunk_bytes", "fused_chunk_bytes", "fused_chunk_bytes_serial", "min_affine")
        for name in (*positive, "affine_bwd_tiles", "affine_bwd_bytes", "gather_row_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("wide_min", "split_runs", "split_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (off) or more, got {getattr(self, name)}")

    @property
    def fused(self) -> bool:
        """Whether steps run torch's fused kernels (chosen, and present in this torch)."""
        return self.kernel == "fused" and FLASH is not None and FLASH_BWD is not None

    def fused_budget(self) -> int:
        """Bytes a gathered fused step may hold, for the intra-op thread count of this call."""
        return self.fused_chunk_bytes_serial if torch.get_num_threads() == 1 else self.fused_chunk_bytes

    def schedule_key(self) -> tuple[int, int, int]:
        """The knobs a :class:`~patterndsl.runtime.cpu.schedule.Schedule` depends on (its cache key)."""
        return (self.min_affine, self.wide_min, self.split_runs)


# A plain module variable, not a ContextVar: autograd may run the backward on another thread,
# which must see the options its forward saw.
_LOCK = threading.Lock()
_current = CpuOptions()


def current() -> CpuOptions:
    """The options calls without an explicit ``options=`` argument use."""
    return _current


def resolve(options: CpuOptions | None) -> CpuOptions:
    """``options``, or :func:`current` when None (read at call time)."""
    return _current if options is None else options


@contextmanager
def options(value: CpuOptions | None = None, **changes) -> Iterator[CpuOptions]:
    """Run the block with other executor options, restored on exit.

    Args:
        value: options to use (default: the current ones).
        **changes: fields to replace in them, e.g. ``kernel="math", chunk_bytes=1``.

    Returns:
        A context manager yielding the options in force inside the block.
    """
    global _current
    new = replace(_current if value is None else value, **changes)
    with _LOCK:
        old, _current = _current, new
    try:
        yield new
    finally:
        with _LOCK:
            _current = old


def set_options(value: CpuOptions) -> CpuOptions:
    """Make ``value`` the process-wide options (for scripts such as benchmarks); returns the old ones."""
    global _current
    with _LOCK:
        old, _current = _current, value
    return old
