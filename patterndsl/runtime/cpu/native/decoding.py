"""Runtime stage, CPU executor, native kernel: ragged and paged calls with few query rows (issue 14).

Comes in: a call's kept tile lists from :func:`patterndsl.runtime.ragged._work` (per batch element, per head
group, row tiles with their key runs and masks), ``q [B, H, Lq, D]``, the keys and values (``[B, Hkv, Lk, D]``
or pages ``[pages, Hkv, page_size, D]`` with the block table) and the scale. Goes out: ``(out, lse)``, or None
when the kernel does not serve the call (the ragged executor's torch path runs).

Why: a decoding step over a short cache costs about what its Python costs; the torch paths either copy the
keys (a paged cache read through the table) or hand torch's fused kernel one matrix interleaving both key-value
heads (twice the work, one thread). ``decode.cpp`` reads each element's keys in place through the table, one
work item per (row tile, key-value head, key split) spread over the threads, the ``H / Hkv`` query heads that
read one key-value head processed together as ``(H / Hkv) * rows`` rows against the same keys; splits are
merged by an exact log-sum-exp. An unpaged cache is the same thing with one page per element.

What it serves: float32 ``q``/``k``/``v`` with unit-stride head dimensions, a head size that is a multiple of
16 (at most 512), every query head in one head group, row tiles of at most :data:`MAX_QUERIES` queries and at
most :data:`MAX_ROWS` rows per (tile, key-value head),
and the native library built and enabled (``CpuOptions.native``, ``kernel="fused"``). A page not held that a
run reaches, or a result that is not finite, hands the call back to the torch path (which raises the located
error or selects exactly). The arrays the kernel walks are built once per kept tile list (every layer of a
decoding step reuses them), so a call costs one ctypes call and its two output tensors.
"""

from __future__ import annotations

import ctypes
import struct

import torch

from patterndsl.runtime.cpu import tuning
from patterndsl.runtime.cpu.native import build

#: Rows of one work item (query heads per key-value head times the tile's rows) the kernel takes.
MAX_ROWS = 64
#: Query rows of a row tile the kernel takes (decoding, LANGUAGE.md section 9: up to 16). Its products are
#: matrix-vector shaped: a prefill tile of 64 rows of one head ran ~4x slower than torch's fused kernel.
MAX_QUERIES = 16
#: Largest head size the kernel takes.
MAX_DIM = 512
#: Fewest keys of a split: a (row tile, key-value head) is cut into splits of at least
#: ``max(MIN_SPLIT, all the call's keys / (2 * threads))`` keys (about two work items per thread).
MIN_SPLIT = 2048

#: The kernel's argument block: 30 int64 (pointers as integers) and the scale as a double (``decode.cpp``).
_CALL = struct.Struct("=30qd")
#: Kernel return codes that hand the call back to the torch path: a page not held, a result not finite.
FALLBACK = (2, 3)


_KEPT: list = [None, None]  # [build.generation at the lookup, the function or None]


def _function():
    """The kernel's ctypes function, or None; looked up once per :func:`build.reset` generation (a lookup
    reads the environment for the cache directory, several microseconds a call)."""
    if _KEPT[0] == build.generation[0]:
        return _KEPT[1]
    lib = build.library()
    fn = None if lib is None else lib.pdsl_decode
    if fn is not None and fn.argtypes is None:
        fn.argtypes, fn.restype = [ctypes.c_char_p], ctypes.c_int
    _KEPT[:] = [build.generation[0], fn]
    return fn


class Program:
    """The kernel's view of one kept tile list: per tile ``[b, i0, n, run_lo, run_hi, mask_off, mask_heads,
    nk]``, the key runs and the masks as bytes; ``whole`` says every output row is written (no zero fill)."""

    def __init__(self, tiles: list[list[int]], runs: list[tuple[int, int]], masks: list[torch.Tensor], whole: bool):
        self.tiles = torch.tensor(tiles, dtype=torch.int64).reshape(-1, 8)
        self.runs = torch.tensor(runs, dtype=torch.int64).reshape(-1, 2)
        self.masks = torch.cat(masks) if masks else torch.zeros(1, dtype=torch.uint8)
        self.whole = whole


def program(work, batch: int, heads: int, kv_heads: int, q_len: int) -> Program | None:
    """The :class:`Program` of ``work`` (``[(b, [(group, [tile, ...]), ...]), ...]``), or None when the kernel
    does not take it (a head group that is not every head, a tile of too many rows, a tile list made lazily)."""
    share = heads // kv_heads
    tiles, runs, masks = [], [], []
    at = 0
    rows = 0
    for b, groups in work:
        for gr, tile_list in groups:
            if not gr.all or not isinstance(tile_list, list):
                return None
            for t in tile_list:
                n = t.i1 - t.i0
                nk = int(t.keys.numel())
                if n > MAX_QUERIES or n * share > MAX_ROWS or not t.runs or nk == 0:
                    return None
                mask_off, mask_heads = -1, 1
                if t.allowed is not None and not bool(t.allowed.all()):
                    allowed = t.allowed
                    if allowed.shape[0] not in (1, heads):
                        return None
                    mask_heads = allowed.shape[0]
                    flat = allowed.contiguous().view(torch.uint8).flatten()
                    mask_off = at
                    at += flat.numel()
                    masks.append(flat)
                tiles.append([b, t.i0, n, len(runs), len(runs) + len(t.runs), mask_off, mask_heads, nk])
                runs.extend(t.runs)
                rows += n
    return Program(tiles, runs, masks, whole=rows * heads == batch * heads * q_len)


def serves(q, k, v) -> bool:
    """Whether the call's tensors and the executor options let the kernel run (see the module docstring)."""
    opts = tuning.current()
    if not opts.native or opts.kernel != "fused":
        return False
    d = q.shape[3]
    if q.dtype != torch.float32 or k.dtype != torch.float32 or v.dtype != torch.float32:
        return False
    if d % 16 or d > MAX_DIM or v.shape[3] != d or k.shape[3] != d:
        return False
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1 or q.device.type != "cpu":
        return False
    return _function() is not None


_UNPAGED_TABLES: dict[int, torch.Tensor] = {}


def _unpaged_table(batch: int) -> torch.Tensor:
    """``[[0], [1], ...]``: element ``b``'s keys are "page" ``b`` of an unpaged ``[B, Hkv, Lk, D]``."""
    got = _UNPAGED_TABLES.get(batch)
    if got is None:
        got = _UNPAGED_TABLES[batch] = torch.arange(batch, dtype=torch.int64)[:, None].contiguous()
    return got


def forward(prog: Program, q, k, v, kv_lengths, table, scale: float):
    """``(out, lse)`` of the call whose tile list ``prog`` describes, or None (the torch path decides).

    Args:
        prog: from :func:`program`; q, k, v: the call's tensors (checked by :func:`serves`); kv_lengths: int64
            ``[B]``, checked within the tensors; table: the int64 block table (a paged cache) or None, its
            entries checked by the kernel (an entry outside the cache hands the call back); scale: the softmax
            scale.
    """
    b_, h, lq, d = q.shape
    if table is None:
        table, ps, n_pages = _unpaged_table(b_), k.shape[2], k.shape[0]
    else:
        ps, n_pages = k.shape[2], k.shape[0]
    if prog.whole:
        out = torch.empty(b_, h, lq, d)
        lse = torch.empty(b_, h, lq)
    else:
        out = torch.zeros(b_, h, lq, d)
        lse = torch.full((b_, h, lq), float("-inf"))
    qs, ks, vs = q.stride(), k.stride(), v.stride()
    # One packed block (bytes, passed as a pointer): the kernel only reads it.
    block = _CALL.pack(
        q.data_ptr(), qs[0], qs[1], qs[2], k.data_ptr(), v.data_ptr(), ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
        ps, n_pages, table.data_ptr(), table.stride(0), kv_lengths.data_ptr(), b_, out.data_ptr(), lse.data_ptr(),
        h, lq, d, k.shape[1], prog.tiles.shape[0], prog.tiles.data_ptr(), prog.runs.data_ptr(), prog.masks.data_ptr(),
        MIN_SPLIT, torch.get_num_threads(), scale,
    )  # fmt: skip
    rc = _function()(block)
    if rc in FALLBACK:
        return None
    if rc:
        raise RuntimeError(f"native decoding refused its arguments (code {rc})")
    return out, lse
