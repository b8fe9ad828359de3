"""Runtime stage, CPU executor, native kernel: a schedule's segments as one key-tile list per query tile.

Comes in: a :class:`~patterndsl.runtime.cpu.schedule.Schedule` (affine, gathered and merge
segments, their ``blocked`` masks) and the plan's tile shape. Goes out: a :class:`Program`, the
CSR the C++ kernel walks: per query tile its key tiles, each full (mask -1) or partial with the
index of its mask. Masks are stored as bits, key-major (``[M, BN, BM/16]`` uint16: bit ``r`` of
word ``(mask, j, g)`` says row ``16 g + r`` may attend key ``j``), the layout the kernel's
transposed score blocks read 16 rows at a time. A segment's shared mask is stored once for all
its tiles; padding tiles (every pair blocked) are dropped. Built once per schedule (kept with
its first segment, which belongs to that schedule only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patterndsl.runtime.cpu.schedule import Schedule


@dataclass(frozen=True)
class Program:
    """The kernel's view of one schedule.

    Attributes:
        row_ptr: int64 ``[n_q_tiles + 1]``, entries of query tile ``m`` are ``row_ptr[m]:row_ptr[m+1]``.
        ent_k: int32 ``[E]`` key tile of each entry.
        ent_mask: int32 ``[E]`` mask index of each entry, -1 when every pair of the tile is allowed.
        masks: int16 ``[M, BN, BM/16]``, the allowed pairs as bits (read as uint16 by the kernel).
        block: ``(BM, BN)``.
    """

    row_ptr: torch.Tensor
    ent_k: torch.Tensor
    ent_mask: torch.Tensor
    masks: torch.Tensor
    block: tuple[int, int]

    @property
    def n_q_tiles(self) -> int:
        return int(self.row_ptr.numel()) - 1


def bits(allowed: torch.Tensor) -> torch.Tensor:
    """``allowed [M, BM, BN]`` (bool) as key-major row bits ``[M, BN, BM/16]`` (int16 holding uint16 bits)."""
    m, bm, bn = allowed.shape
    x = allowed.transpose(1, 2).reshape(m, bn, bm // 16, 16).to(torch.int32)
    words = (x << torch.arange(16, dtype=torch.int32)).sum(-1, dtype=torch.int32)
    # int32 -> int16 keeps the low 16 bits: the kernel reads them as uint16.
    return words.to(torch.int16).contiguous()


def _build(sched: Schedule, n_q_tiles: int, block: tuple[int, int]) -> Program:
    bm, bn = block
    qs, ks, ids, allowed = [], [], [], []
    count = 0
    for seg in sched.segments:
        n, width = len(seg), seg.width
        q_tiles = seg.q_tiles[:, None].expand(n, width)
        if seg.blocked is None:
            keep = torch.ones(n, width, dtype=torch.bool)
            mask_id = torch.full((n, width), -1, dtype=torch.int32)
        else:
            s0 = seg.blocked.shape[0]
            tiles = seg.blocked.view(s0, bm, width, bn).permute(0, 2, 1, 3)  # [s0, width, BM, BN]
            some, every = tiles.any(-1).any(-1), tiles.all(-1).all(-1)
            partial = some & ~every
            ids0 = torch.full((s0, width), -1, dtype=torch.int32)
            p = int(partial.sum())
            ids0[partial] = torch.arange(count, count + p, dtype=torch.int32)
            count += p
            allowed.append(~tiles[partial])
            keep, mask_id = (~every).expand(n, width), ids0.expand(n, width)
        qs.append(q_tiles[keep])
        ks.append(seg.kv_tiles[keep])
        ids.append(mask_id[keep])
    q_all = torch.cat(qs) if qs else torch.zeros(0, dtype=torch.int64)
    order = torch.argsort(q_all, stable=True)
    counts = torch.bincount(q_all, minlength=n_q_tiles)
    row_ptr = torch.zeros(n_q_tiles + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    ent_k = (torch.cat(ks) if ks else torch.zeros(0, dtype=torch.int64))[order].to(torch.int32).contiguous()
    ent_mask = (torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int32))[order].contiguous()
    masks = bits(torch.cat(allowed)) if allowed else torch.zeros(0, bn, bm // 16, dtype=torch.int16)
    return Program(row_ptr, ent_k, ent_mask, masks, (bm, bn))


def program(sched: Schedule, n_q_tiles: int, block: tuple[int, int]) -> Program:
    """The :class:`Program` of ``sched`` (built once per schedule).

    Args:
        sched: one head group's schedule; n_q_tiles: the plan's query tiles; block: ``(BM, BN)``.

    Returns:
        Its key-tile lists and masks.
    """
    if not sched.segments:
        return _build(sched, n_q_tiles, block)
    cache = sched.segments[0]._cache
    key = ("native-program", n_q_tiles, block)
    if key not in cache:
        cache[key] = _build(sched, n_q_tiles, block)
    return cache[key]
