"""Runtime stage, CPU executor: the gathered part of ``route`` attention, forward and backward.

Comes in: ``q``, ``k``, ``v`` and, from :mod:`patterndsl.runtime.dynamic`, for
each (head group, batch element, key-value head) the key blocks whose keys a
set of query rows attends in full (where the pattern equals its route, the
"gathered" work), plus the output and log-sum-exp the tile path already
computed, and the executor's :class:`~patterndsl.runtime.cpu.tuning.CpuOptions`.
Goes out: those buffers with the gathered blocks merged in
(:func:`patterndsl.runtime.softmax.merge_into`), and in the backward pass the
gradients of the gathered pairs added to ``dq``, ``dk``, ``dv``.

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
from patterndsl.runtime import dynamic, routing, softmax
from patterndsl.runtime.cpu.tuning import FLASH, CpuOptions
from patterndsl.runtime.cpu.views import cleaned, matmul_seen, scores_seen


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


def forward(q, k, v, out, lse, work: list[Work], scale: float, opts: CpuOptions, safe: bool, modify=None) -> None:
    """Merge the gathered blocks into ``out`` / ``lse`` (compute-dtype buffers ``[B, H, Lq, (D)]``) in place.

    ``safe`` (the selecting run of a call with non-finite inputs): ``P @ V`` reads a non-finite value only
    through a non-zero weight (:func:`~patterndsl.runtime.cpu.views.matmul_seen`), as the selecting kernels.
    ``modify``: the score (:class:`~patterndsl.runtime.cpu.scoremod.PairModifier`), through the math path.
    """
    dt = out.dtype
    for w in work:
        qb = q[w.batch, w.heads].to(dt)
        hg = len(w.heads)
        parts_o, parts_l = [], []
        for t in range(len(w.blocks)):
            rows = w.rows[int(w.row_ptr[t]) : int(w.row_ptr[t + 1])]
            kc, vc = _block(w, t, k, dt), _block(w, t, v, dt)
            qr = qb[:, rows]
            if opts.fused and modify is None:
                kx = kc.expand(hg, -1, -1) if hg == 1 else kc.expand(hg, -1, -1).contiguous()
                vx = vc.expand(hg, -1, -1) if hg == 1 else vc.expand(hg, -1, -1).contiguous()
                o, lc = FLASH(qr[None], kx[None], vx[None], 0.0, False, scale=scale)[:2]
                o, lc = o[0], lc[0].to(dt)
            else:
                s = torch.matmul(qr * scale, kc.T)
                if modify is not None:
                    s = modify(s, w.heads, rows, _keys_of(w, t))
                lc = torch.logsumexp(s, -1)
                weights = torch.exp(s - lc[..., None])
                o = matmul_seen(weights, *cleaned(vc)) if safe else torch.matmul(weights, vc)
            parts_o.append(o)
            parts_l.append(lc)
        _merge(out, lse, w, torch.cat(parts_o, 1), torch.cat(parts_l, 1))


def _merge(out: torch.Tensor, lse: torch.Tensor, w: Work, o: torch.Tensor, lc: torch.Tensor) -> None:
    """Merge the parts ``o [h, P, D]`` / ``lc [h, P]`` of rows ``w.rows`` into ``out`` / ``lse``."""
    rows_o, rows_l = out[w.batch, w.heads], lse[w.batch, w.heads]
    softmax.merge_into(rows_o, rows_l, o, lc, w.rows)
    out[w.batch, w.heads], lse[w.batch, w.heads] = rows_o, rows_l


def backward(
    q, k, v, lse, dout, delta, grads: dict, work: list[Work], scale: float, opts: CpuOptions, safe: bool, modify=None
) -> None:
    """Add the gradients of the gathered pairs to ``grads['dq'|'dk'|'dv']`` (compute dtype, in place).

    ``lse`` is the final log-sum-exp of every row and ``delta`` (``[B, H, Lq]``) is
    :func:`patterndsl.runtime.softmax.delta` of the final output, so each part's gradient is the
    usual flash-attention backward with the global statistics. ``safe``: as in :func:`forward`, every
    product reads a non-finite operand only through a non-zero weight, the scores too (:func:`.views.scores_seen`).
    ``modify``: the score, as in :func:`forward` (``dS`` times its derivative in ``s``).
    """
    dq, dk, dv = grads["dq"], grads["dk"], grads["dv"]
    dt = dq.dtype
    chunk = opts.gather_row_chunk
    for w in work:
        qb = q[w.batch, w.heads].to(dt)
        dob = dout[w.batch, w.heads].to(dt)
        row_delta = delta[w.batch, w.heads].to(dt)
        lb = lse[w.batch, w.heads].to(dt)
        dqb = torch.zeros_like(qb)
        for t in range(len(w.blocks)):
            all_rows = w.rows[int(w.row_ptr[t]) : int(w.row_ptr[t + 1])]
            kc, vc = _block(w, t, k, dt), _block(w, t, v, dt)
            dkc, dvc = torch.zeros_like(kc), torch.zeros_like(vc)
            for a in range(0, len(all_rows), chunk):
                rows = all_rows[a : a + chunk]
                qr, dor = qb[:, rows], dob[:, rows]
                if modify is not None:
                    _backward_modified(qr, dor, kc, vc, lb[:, rows, None], row_delta[:, rows, None], scale, modify,
                                       (w.heads, rows, _keys_of(w, t)), (dqb, rows, dkc, dvc))  # fmt: skip
                    continue
                if safe:  # as _backward_select: dP from the cleaned copies, NaN only through a non-zero weight
                    (qs, bad_q), (ks, bad_k), (dos, bad_do) = cleaned(qr), cleaned(kc), cleaned(dor)
                    p = scores_seen(qs * scale, ks, kc, bad_k).sub_(lb[:, rows, None]).exp_()
                    dvc += matmul_seen(p.transpose(-1, -2), dos, bad_do).sum(0)
                    ds = p * (torch.matmul(dos, cleaned(vc)[0].T) - row_delta[:, rows, None])
                    dqb[:, rows] += matmul_seen(ds, ks, bad_k) * scale
                    dkc += matmul_seen(ds.transpose(-1, -2), qs, bad_q).sum(0) * scale
                    continue
                p = torch.exp(torch.matmul(qr * scale, kc.T) - lb[:, rows, None])
                dvc += torch.matmul(p.transpose(-1, -2), dor).sum(0)
                ds = p * (torch.matmul(dor, vc.T) - row_delta[:, rows, None])
                dqb[:, rows] += torch.matmul(ds, kc) * scale
                dkc += torch.matmul(ds.transpose(-1, -2), qr).sum(0) * scale
            _add_block(w, t, dk, dkc)
            _add_block(w, t, dv, dvc)
        dq[w.batch, w.heads] += dqb


def _backward_modified(qr, dor, kc, vc, lse, delta, scale: float, modify, where, into) -> None:
    """One chunk of gathered rows with a score: ``P`` of the modified logits, ``dS`` times ``d score / d s``."""
    dqb, rows, dkc, dvc = into
    raw = torch.matmul(qr * scale, kc.T)
    p = torch.exp(modify(raw, *where) - lse)
    dvc += torch.matmul(p.transpose(-1, -2), dor).sum(0)
    ds = p * (torch.matmul(dor, vc.T) - delta)
    slope = modify.derivative(raw, *where)
    if slope is not None:
        ds = ds * slope
    dqb[:, rows] += torch.matmul(ds, kc) * scale
    dkc += torch.matmul(ds.transpose(-1, -2), qr).sum(0) * scale
