"""Runtime stage: the gathered part of ``route`` attention on CPU, forward and backward.

Comes in: ``q``, ``k``, ``v`` and, from :mod:`patterndsl.runtime.dynamic`, for
each (head group, batch element, key-value head) the key blocks whose keys a
set of query rows attends in full (where the pattern equals its route, the
"gathered" work), plus the output and log-sum-exp the tile path already
computed. Goes out: those buffers with the gathered blocks merged in (online
softmax merge by log-sum-exp), and in the backward pass the gradients of the
gathered pairs added to ``dq``, ``dk``, ``dv``.

Why a second path: with per-token selection (``qblock = 1``, MoBA, NSA,
Landmark) the rows of one query tile choose different blocks, so the union
over a tile covers most earlier blocks and a tile-by-tile run does many times
the useful work. Gathering, per key block, exactly the rows that chose it does
the useful work only, with no mask. Memory is O(rows of one block x block
size) per step, never ``Lq x Lk``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patterndsl import ir
from patterndsl.runtime import dynamic, routing

#: Query rows per step of the backward pass (bounds the ``rows x block`` score matrix).
ROW_CHUNK = 2048


@dataclass(frozen=True)
class Work:
    """The gathered work of one (head group, batch element, key-value head)."""

    heads: list[int]
    batch: int
    kv_head: int
    blocks: torch.Tensor
    row_ptr: torch.Tensor
    rows: torch.Tensor
    key_ptr: torch.Tensor
    keys: torch.Tensor


def plan_work(lists: list[dynamic.Lists], selections: dict[ir.Prim, routing.Selection], q_len: int, bm: int):
    """The :class:`Work` items of this call (those with at least one gathered block)."""
    out = []
    for item in lists:
        blocks, row_ptr, rows = dynamic.gathered_rows(item, selections, q_len, bm)
        if not len(blocks):
            continue
        prim = item.group.routes[0]
        key_ptr, keys = dynamic.block_keys(prim, selections[prim])
        out.append(Work(list(item.heads), item.batch, item.kv_head, blocks, row_ptr, rows, key_ptr, keys))
    return out


def _keys_of(w: Work, t: int) -> slice | torch.Tensor:
    """Key indices of the ``t``-th gathered block: a slice when they are a run (1-D blocks)."""
    c = int(w.blocks[t])
    a, b = int(w.key_ptr[c]), int(w.key_ptr[c + 1])
    idx = w.keys[a:b]
    if b > a and int(idx[-1]) - int(idx[0]) == b - a - 1:
        return slice(int(idx[0]), int(idx[0]) + b - a)
    return idx


def _block(w: Work, t: int, x: torch.Tensor, dtype) -> torch.Tensor:
    """Keys (or values) of the ``t``-th gathered block: ``[Kc, D]`` in ``dtype``."""
    return x[w.batch, w.kv_head][_keys_of(w, t)].to(dtype)


def _add_block(w: Work, t: int, dst: torch.Tensor, value: torch.Tensor) -> None:
    """``dst[batch, kv_head, keys of block t] += value``."""
    keys = _keys_of(w, t)
    if isinstance(keys, slice):
        dst[w.batch, w.kv_head, keys] += value
    else:
        dst[w.batch, w.kv_head].index_add_(0, keys, value)


def forward(q, k, v, out: torch.Tensor, lse: torch.Tensor, work: list[Work], scale: float) -> None:
    """Merge the gathered blocks into ``out`` / ``lse`` (compute-dtype buffers ``[B, H, Lq, (D)]``) in place."""
    from patterndsl.runtime import cpu

    dt = out.dtype
    for w in work:
        qb = q[w.batch, w.heads].to(dt)
        hg = len(w.heads)
        parts_o, parts_l = [], []
        for t in range(len(w.blocks)):
            rows = w.rows[int(w.row_ptr[t]) : int(w.row_ptr[t + 1])]
            kc, vc = _block(w, t, k, dt), _block(w, t, v, dt)
            qr = qb[:, rows]
            if cpu._use_fused():
                kx = kc.expand(hg, -1, -1) if hg == 1 else kc.expand(hg, -1, -1).contiguous()
                vx = vc.expand(hg, -1, -1) if hg == 1 else vc.expand(hg, -1, -1).contiguous()
                o, lc = cpu._FLASH(qr[None], kx[None], vx[None], 0.0, False, scale=scale)[:2]
                o, lc = o[0], lc[0].to(dt)
            else:
                s = torch.matmul(qr * scale, kc.T)
                lc = torch.logsumexp(s, -1)
                o = torch.matmul(torch.exp(s - lc[..., None]), vc)
            parts_o.append(o)
            parts_l.append(lc)
        _merge(out, lse, w, torch.cat(parts_o, 1), torch.cat(parts_l, 1))


def _merge(out: torch.Tensor, lse: torch.Tensor, w: Work, o: torch.Tensor, lc: torch.Tensor) -> None:
    merge_rows(out, lse, slice(w.batch, w.batch + 1), w.heads, w.rows, o[None], lc[None])


def merge_rows(out, lse, bs: slice, heads, rows: torch.Tensor, o: torch.Tensor, lc: torch.Tensor) -> None:
    """Online-softmax merge of parts into ``out[bs, heads]`` / ``lse[bs, heads]``, all at once.

    Part ``p`` is a normalised output ``o[:, :, p]`` with log-sum-exp ``lc[:, :, p]`` for query
    row ``rows[p]`` (rows may repeat); the merged row is ``sum_i o_i exp(l_i - M) / sum_i
    exp(l_i - M)`` over the row's parts and what is already there, ``M`` their largest ``l_i``.

    Args:
        out, lse: ``[B, H, Lq, D]`` / ``[B, H, Lq]`` buffers in the compute dtype.
        bs: batch slice; heads: list of query heads or None for all.
        rows: int64 ``[P]``; o: ``[b, h, P, D]``; lc: ``[b, h, P]``.
    """
    ob = out[bs] if heads is None else out[bs, heads]
    lb = lse[bs] if heads is None else lse[bs, heads]
    o, lc = o.to(ob.dtype), lc.to(lb.dtype)
    top = lb.scatter_reduce(2, rows.expand_as(lc), lc, "amax", include_self=True)
    finite = torch.isfinite(top)
    top0 = torch.where(finite, top, torch.zeros_like(top))
    # Parts (or earlier rows) with lse = -inf weigh 0; rows with nothing anywhere stay 0 / -inf.
    w_old = torch.exp(lb - top0)
    w_part = torch.exp(lc - top0[:, :, rows])
    den = w_old.index_add(2, rows, w_part)
    num = (ob * w_old[..., None]).index_add_(2, rows, o * w_part[..., None])
    merged_o = torch.where(finite[..., None], num / den.clamp(min=1e-30)[..., None], torch.zeros_like(ob))
    merged_l = torch.where(finite, top0 + torch.log(den.clamp(min=1e-30)), lb)
    if heads is None:
        out[bs], lse[bs] = merged_o, merged_l
    else:
        out[bs, heads], lse[bs, heads] = merged_o, merged_l


def backward(q, k, v, out, lse, dout, dlse, grads: dict, work: list[Work], scale: float) -> None:
    """Add the gradients of the gathered pairs to ``grads['dq'|'dk'|'dv']`` (compute dtype, in place).

    ``lse`` is the final log-sum-exp of every row and ``delta = rowsum(dO * O) - dlse``, so
    each part's gradient is the usual flash-attention backward with the global statistics.
    """
    dq, dk, dv = grads["dq"], grads["dk"], grads["dv"]
    dt = dq.dtype
    for w in work:
        qb = q[w.batch, w.heads].to(dt)
        dob = dout[w.batch, w.heads].to(dt)
        delta = (dob * out[w.batch, w.heads].to(dt)).sum(-1)
        if dlse is not None:
            delta = delta - dlse[w.batch, w.heads].to(dt)
        lb = lse[w.batch, w.heads].to(dt)
        dqb = torch.zeros_like(qb)
        for t in range(len(w.blocks)):
            all_rows = w.rows[int(w.row_ptr[t]) : int(w.row_ptr[t + 1])]
            kc, vc = _block(w, t, k, dt), _block(w, t, v, dt)
            dkc, dvc = torch.zeros_like(kc), torch.zeros_like(vc)
            for a in range(0, len(all_rows), ROW_CHUNK):
                rows = all_rows[a : a + ROW_CHUNK]
                qr, dor = qb[:, rows], dob[:, rows]
                p = torch.exp(torch.matmul(qr * scale, kc.T) - lb[:, rows, None])
                dvc += torch.matmul(p.transpose(-1, -2), dor).sum(0)
                ds = p * (torch.matmul(dor, vc.T) - delta[:, rows, None])
                dqb[:, rows] += torch.matmul(ds, kc) * scale
                dkc += torch.matmul(ds.transpose(-1, -2), qr).sum(0) * scale
            _add_block(w, t, dk, dkc)
            _add_block(w, t, dv, dvc)
        dq[w.batch, w.heads] += dqb
