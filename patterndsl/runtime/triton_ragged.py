"""Runtime stage: ragged batches and paged caches through the generated Triton kernels (issue 14).

Comes in: what :mod:`patterndsl.runtime.ragged` hands the op for ``backend="triton"``: ``q``
``[B, H, Lq, D]``, ``k``/``v`` ``[B, Hkv, Lk, D]`` or paged ``[pages, Hkv, page_size, D]``, the
``data`` list ``[kv_lengths, q_lengths(, block_table)]`` and the pattern. Goes out: ``(out, lse)``
and ``(dq, dk, dv)`` as the CPU path gives them.

How: the square plan family (one plan per doubling of ``Lk``, :func:`patterndsl.runtime.ragged.frame`)
gives each element's rows their key tiles, cut at ``Lk_b``; they become *pieces* (one program each:
a block of ``BM`` query rows and a run of key tiles, partial tiles first) that the kernels of
:mod:`patterndsl.codegen.ragged` walk, loading keys through the block table and reading nothing past a
length. A call with few queries (decoding, ``Lq <= 16``) runs 16-row blocks and splits each block's key
tiles into several pieces when there are too few programs to fill the device (flash decoding); the
pieces write float32 partials that the ``combine`` kernel merges by log-sum-exp. The lists are kept per
lengths, so every layer of a decoding step reuses them. Elements with more queries than keys, and
calls with a non-finite input, run element by element through the ordinary kernels
(:func:`elementwise`), which treat those exactly.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from patterndsl import kernel_cache, runtime
from patterndsl.codegen import ragged as codegen
from patterndsl.codegen.launch import ragged_launch
from patterndsl.kvcache import live_keys, owner
from patterndsl.runtime import plans, ragged, triton_backend, triton_finite


@dataclass(frozen=True)
class SplitOptions:
    """When a decoding call's row blocks are split over their key tiles (flash decoding).

    Attributes:
        programs: programs a call should launch at least (about two waves of a large GPU).
        min_tiles: key tiles a piece keeps at least.
    """

    programs: int = 256
    min_tiles: int = 4


#: The options calls read (tests replace it; nothing binds it as a default argument).
OPTIONS = SplitOptions()


@dataclass(frozen=True)
class Lists:
    """One head group's pieces for a call: ``pieces`` int32 ``[P, 10]``, ``cols`` int32, ``splits`` int32
    ``[S, 7]`` (split row blocks for ``combine``), and the number of partial slots."""

    pieces: torch.Tensor
    cols: torch.Tensor
    splits: torch.Tensor
    parts: int


_LOCK = threading.Lock()
_LISTS: OrderedDict = OrderedDict()
#: Calls whose lists are kept (every layer of a model's step repeats the same lengths).
MAX_LISTS = 16


def _tiles(device: torch.device, head_dim: int, dtype: torch.dtype, kind: str, rows: int) -> tuple[int, int]:
    """Plan rows and key tile ``BN``: the launch table's on a GPU, the interpreter's plan tiles on the CPU."""
    target = "interpret" if device.type == "cpu" else triton_backend.target_of(device)
    tiles = ragged_launch(head_dim, target, kind, codegen.DTYPES[dtype], rows).tiles
    return tiles or runtime.TRITON_BLOCK


def _row_block(pattern, plan, g: int, r0: int, rows: int, kv_len: int, bn: int):
    """Key tiles of plan rows ``r0 .. r0 + rows`` cut at ``kv_len``: ``(cols, partial flags)``."""
    rt = ragged._row_tile(plan, g, r0 // plan.block_m)
    last = (kv_len - 1) // bn
    n = bisect.bisect_right(rt.cols, last)
    cols = rt.cols[:n]
    partial = [False] * n
    for t in rt.partial:
        if t < n:
            partial[t] = True
    if n and kv_len % bn and cols[-1] == last:
        partial[-1] = True  # the tile a length cuts short
    return cols, partial


def _lists(pattern, heads, kvl: list[int], ql: list[int], bm: int, block: tuple[int, int], split: bool, device):
    """Per head group, the :class:`Lists` of one call on ``device`` (see the module docstring)."""
    key = (pattern, heads, tuple(kvl), tuple(ql), bm, block, split, OPTIONS, str(device))
    with _LOCK:
        got = _LISTS.get(key)
        if got is not None:
            _LISTS.move_to_end(key)
            return got
    blocks = []  # per element: (b, frame)
    for b, (n_kv, n_q) in enumerate(zip(kvl, ql, strict=True)):
        if n_q and n_kv:
            blocks.append((b, ragged.frame(pattern, block, heads, n_q, n_kv, True)))
    n_groups = len(blocks[0][1].plan.groups) if blocks else 0
    out = []
    for g in range(n_groups):
        rows = []
        for b, fr in blocks:
            for r0 in range((fr.row0 // bm) * bm, fr.row0 + fr.q_len, bm):
                rows.append((b, fr, r0, *_row_block(pattern, fr.plan, g, r0, bm, fr.kv_len, block[1])))
        want = split_wanted(len(rows), len(blocks[0][1].plan.groups[g].heads)) if split else 1
        out.append(
            make_lists([(b, fr.row0, r0, fr.q_len, fr.kv_len, -1, t, p) for b, fr, r0, t, p in rows], want, device)
        )
    with _LOCK:
        _LISTS[key] = out
        while len(_LISTS) > MAX_LISTS:
            _LISTS.popitem(last=False)
    return out


def make_lists(rows, want: int, device) -> Lists:
    """The :class:`Lists` of row blocks ``(b, row0, r0, Lq_b, Lk_b, kv head or -1, tiles, partial flags)``, each
    split into up to ``want`` pieces of at least ``OPTIONS.min_tiles`` tiles (partial tiles first in a piece)."""
    pieces, cols, splits, parts = [], [], [], 0
    for *head, kvh, tiles, partial in rows:
        if not tiles:
            continue
        n = min(want, max(1, len(tiles) // OPTIONS.min_tiles))
        if n > 1:
            splits.append([*head[:4], parts, n, kvh])
        for s in range(n):
            a, z = len(tiles) * s // n, len(tiles) * (s + 1) // n
            first = [t for t, p in zip(tiles[a:z], partial[a:z], strict=True) if p]
            rest = [t for t, p in zip(tiles[a:z], partial[a:z], strict=True) if not p]
            start = len(cols)
            cols += first + rest
            pieces.append([*head, start, start + len(first), len(cols), parts if n > 1 else -1, kvh])
            parts += n > 1
    tensors = (
        torch.tensor(pieces, dtype=torch.int32).reshape(-1, 10),
        torch.tensor(cols or [0], dtype=torch.int32),
        torch.tensor(splits, dtype=torch.int32).reshape(-1, 7),
    )
    return Lists(*(x.to(device) for x in tensors), parts)


def split_wanted(blocks: int, heads: int) -> int:
    """Pieces a split row block aims at so that a call of ``blocks`` row blocks of ``heads`` heads fills the device."""
    return max(1, -(-OPTIONS.programs // max(1, blocks * heads)))


def _module(pattern, groups, kind: str, q, k, paged: bool, bm: int, bn: int):
    target = "interpret" if q.device.type == "cpu" else triton_backend.target_of(q.device)
    ps = k.shape[2] if paged else 0
    h, hkv, d = q.shape[1], k.shape[1], q.shape[3]
    spec = codegen.make_spec(pattern, groups, kind, h, hkv, d, q.dtype, ps, target, bm, bn)
    return spec, kernel_cache.load(spec, codegen.render)


def _table(data, device):
    if len(data) > 2:
        table = data[2].to(device=device, dtype=torch.int32).contiguous()
        return table, table.stride(0)
    return torch.zeros(1, dtype=torch.int32, device=device), 0


def _plan_groups(pattern, heads: int, block):
    return plans.get(ragged._identity_key(pattern, block), block[1], block[1], heads).groups


def _needs_elementwise(q, k, v, data, ql: list[int], kvl: list[int]) -> bool:
    if any(n_q > n_kv > 0 for n_q, n_kv in zip(ql, kvl, strict=True)):
        return True
    cache = owner(k, v, kvl) if len(data) > 2 else None
    if cache is not None:
        # A PagedKVCache's own pages: it knows whether a non-finite value was ever appended (no pass over them).
        return not (cache.finite and triton_finite.all_finite(q))
    return not triton_finite.all_finite(q, k, v)


def forward(q, k, v, pattern, data, scale: float):
    """``(out, lse)`` of a ragged or paged call through the ragged kernels."""
    kvl, ql = data[0].tolist(), data[1].tolist()
    if _needs_elementwise(q, k, v, data, ql, kvl):
        return elementwise(q, k, v, pattern, data, scale)
    b_, h, lq, d = q.shape
    paged = len(data) > 2
    small = max(ql, default=0) <= codegen.DECODE_ROWS
    plan_rows, bn = _tiles(q.device, d, q.dtype, "forward", codegen.DECODE_ROWS if small else 64)
    bm = codegen.DECODE_ROWS if small else plan_rows
    block = (plan_rows, bn)
    out = torch.zeros(b_, h, lq, d, dtype=q.dtype, device=q.device)
    lse = torch.full((b_, h, lq), float("-inf"), dtype=torch.float32, device=q.device)
    if not q.numel() or not k.numel():
        return out, lse
    groups = _plan_groups(pattern, h, block)
    spec, module = _module(pattern, groups, "forward", q, k, paged, bm, bn)
    lists = _lists(pattern, h, kvl, ql, bm, block, small, q.device)
    launch_forward(spec, module, groups, lists, q, k, v, data, scale, out, lse, None)
    return out, lse


def launch_forward(spec, module, groups, lists, q, k, v, data, scale: float, out, lse, sel) -> None:
    """Run a forward module's kernels over per-group ``lists`` (:class:`Lists`), writing ``out`` and ``lse``.

    Args:
        spec, module: the ragged forward spec and its loaded module.
        groups: the spec's head groups (``heads`` each).
        q, k, v, data, scale: the call's.
        sel: a routed call's choice table ``SEL`` (int32, see :mod:`patterndsl.codegen.ragged`), or None.
    """
    bm, (_, h, _, d), lq = spec.block_m, q.shape, q.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    table, stride_bt = _table(data, q.device)
    aux = torch.zeros(1, dtype=torch.int8, device=q.device)
    sel = torch.full((1,), -1, dtype=torch.int32, device=q.device) if sel is None else sel
    for g, group_lists in enumerate(lists):
        if not group_lists.pieces.shape[0]:
            continue
        heads = torch.tensor(groups[g].heads, dtype=torch.int32, device=q.device)
        parts = max(group_lists.parts, 1)
        op = torch.empty(parts, h, bm, d, dtype=torch.float32, device=q.device)
        lp = torch.empty(parts, h, bm, dtype=torch.float32, device=q.device)
        getattr(module, f"fwd_g{g}")[(group_lists.pieces.shape[0], heads.numel())](
            q, k, v, out, lse, op, lp, group_lists.pieces, group_lists.cols, table, heads, aux, sel, float(scale),
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], stride_bt, lq,
            num_warps=spec.num_warps, num_stages=spec.num_stages,
        )  # fmt: skip
        if group_lists.splits.shape[0]:
            module.combine[(group_lists.splits.shape[0], heads.numel())](
                out, lse, op, lp, group_lists.splits, heads, lq, num_warps=spec.num_warps
            )


def backward(q, k, v, out, lse, dout, dlse, pattern, data, scale: float):
    """``(dq, dk, dv)`` of a ragged or paged call; ``dk``/``dv`` shaped like ``k``/``v`` (shared pages sum)."""
    kvl, ql = data[0].tolist(), data[1].tolist()
    if _needs_elementwise(q, k, v, data, ql, kvl) or not triton_finite.all_finite(dout, out):
        return elementwise_backward(q, k, v, dout, dlse, pattern, data, scale)
    _, h, lq, d = q.shape
    paged = len(data) > 2
    small = max(ql, default=0) <= codegen.DECODE_ROWS
    plan_rows, bn = _tiles(q.device, d, q.dtype, "backward", codegen.DECODE_ROWS if small else 64)
    bm = codegen.DECODE_ROWS if small else plan_rows
    block = (plan_rows, bn)
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    q, k, v, dout = (t.contiguous() for t in (q, k, v, dout))
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    if not q.numel() or not k.numel():
        return dq, dk.to(k.dtype), dv.to(v.dtype)
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    lse = lse.float().contiguous()
    groups = _plan_groups(pattern, h, block)
    spec, module = _module(pattern, groups, "backward", q, k, paged, bm, bn)
    table, stride_bt = _table(data, q.device)
    aux = torch.zeros(1, dtype=torch.int8, device=q.device)
    for g, lists in enumerate(_lists(pattern, h, kvl, ql, bm, block, False, q.device)):
        if not lists.pieces.shape[0]:
            continue
        heads = torch.tensor(groups[g].heads, dtype=torch.int32, device=q.device)
        getattr(module, f"bwd_g{g}")[(lists.pieces.shape[0], heads.numel())](
            q, k, v, dout, lse, delta.contiguous(), dq, dk, dv, lists.pieces, lists.cols, table, heads, aux,
            float(scale), *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], stride_bt, lq,
            num_warps=spec.num_warps, num_stages=spec.num_stages,
        )  # fmt: skip
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------------------- element by element


def _live(pattern, q, table, qlo: int):
    # Pages a PagedKVCache freed read as zeros: no query at qlo or later reaches them.
    return None if table is None else live_keys(pattern, q.shape[1], qlo)


def _element_plan(pattern, qb, kb):
    return plans.get(runtime._plan_key(pattern, "triton"), qb.shape[2], kb.shape[2], qb.shape[1])


def elementwise(q, k, v, pattern, data, scale: float):
    """The forward element by element on each element's unpadded problem (the ordinary kernels)."""
    kvl, ql = data[0].tolist(), data[1].tolist()
    table = data[2] if len(data) > 2 else None
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        if ql[b] and kvl[b]:
            kb, vb = ragged.element_keys(k, v, table, b, kvl[b], _live(pattern, q, table, kvl[b] - ql[b]))
            qb = q[b : b + 1, :, : ql[b]]
            o, l_ = triton_backend.forward(qb, kb, vb, _element_plan(pattern, qb, kb), scale)
            out[b : b + 1, :, : ql[b]] = o
            lse[b : b + 1, :, : ql[b]] = l_
    return out, lse


def elementwise_backward(q, k, v, dout, dlse, pattern, data, scale: float):
    """The backward element by element (see :func:`elementwise`); page gradients sum through the table."""
    kvl, ql = data[0].tolist(), data[1].tolist()
    table = data[2] if len(data) > 2 else None
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        if not (ql[b] and kvl[b]):
            continue
        kb, vb = ragged.element_keys(k, v, table, b, kvl[b], _live(pattern, q, table, kvl[b] - ql[b]))
        qb = q[b : b + 1, :, : ql[b]]
        plan = _element_plan(pattern, qb, kb)
        o, l_ = triton_backend.forward(qb, kb, vb, plan, scale)
        dl = None if dlse is None else dlse[b : b + 1, :, : ql[b]]
        gq, gk, gv = triton_backend.backward(qb, kb, vb, o, l_, dout[b : b + 1, :, : ql[b]], plan, scale, dlse=dl)
        dq[b : b + 1, :, : ql[b]] = gq
        ragged.add_element_keys(dk, dv, table, b, kvl[b], gk[0].float(), gv[0].float())
    return dq, dk.to(k.dtype), dv.to(v.dtype)
