"""Runtime stage, CPU executor: a band's sub-tiles as our own batched matmuls in base 2, forward and backward.

Comes in: an affine segment with one shared mask cut into sub-tiles
(:class:`~patterndsl.runtime.cpu.forward.Split`: ``n`` sub-tiles of ``rows`` query rows, sub-tile
``i`` reading the ``width`` keys from ``key0 + i * step``), the tiled ``[B, h, L, D]`` buffers of
the executor and the :class:`~patterndsl.runtime.cpu.tuning.CpuOptions`. Goes out: the segment's
output rows and log-sum-exp (forward), or its share of ``dQ``, ``dK``, ``dV`` (backward), written
into those buffers. A sliding window is the case it is for: 32 rows against 288 keys visit 89% useful pairs,
where whole 128-row tiles visit 50% (backward) and torch's fused kernel pays a full mask add and
a small-block loop per sub-tile.

Each step is a handful of batched matmuls over overlapping strided views of K and V (no copy): the
scores come out of the matmul already scaled by ``scale * log2(e)`` (and, backward, minus the rows'
``lse``), the additive mask touches only the columns some row blocks (a band's two triangular edges),
and the softmax is ``exp2`` in place. The backward computes each sub-tile's ``dK``/``dV`` window in one
matmul and adds it to the key rows in ``ceil(width / step)`` strided adds, each over distinct rows.
Steps run on :mod:`~patterndsl.runtime.cpu.pool` workers, serial inside (one task per (batch, head) row
of the buffers in the backward, whose windows overlap): no OpenMP region per operation waits for a
descheduled thread. Non-finite inputs are the caller's business (a non-finite result reruns selecting).
"""

from __future__ import annotations

import functools
import math

import torch

from patterndsl.runtime.cpu import pool

_LOG2E = 1 / math.log(2)
_LN2 = math.log(2)


def columns(blocked: torch.Tensor) -> list[tuple[int, int]]:
    """Column ranges ``[a, b)`` of a ``[rows, width]`` blocked mask where some row is blocked."""
    flags = blocked.any(0).tolist()
    runs: list[tuple[int, int]] = []
    for c, f in enumerate(flags):
        if not f:
            continue
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


def _keys(x: torch.Tensor, start: int, n: int, width: int, step: int) -> torch.Tensor:
    """``[n, width, D]`` view of ``x [L, D]`` (contiguous): item ``i`` is rows ``start + i*step .. + width``."""
    d = x.shape[1]
    return x.as_strided((n, width, d), (step * d, d, 1), x.storage_offset() + start * d)


def _keys_t(xt: torch.Tensor, start: int, n: int, width: int, step: int) -> torch.Tensor:
    """``[n, D, width]`` view of ``xt [D, L]`` (contiguous): item ``i`` is columns ``start + i*step .. + width``."""
    d, length = xt.shape
    return xt.as_strided((n, d, width), (step, length, 1), xt.storage_offset() + start)


def _transposed_ones(x: torch.Tensor) -> torch.Tensor:
    """``[x^T; 1]``: ``[D+1, L]``, contiguous."""
    out = x.new_empty(x.shape[1] + 1, x.shape[0])
    out[:-1] = x.t()
    out[-1] = 1.0
    return out


def _with_column(x: torch.Tensor, col: torch.Tensor, factor: float) -> torch.Tensor:
    """``[x, factor * col]``: ``[L, D+1]``, contiguous."""
    out = x.new_empty(x.shape[0], x.shape[1] + 1)
    out[:, :-1] = x
    torch.mul(col, factor, out=out[:, -1])
    return out


def _padded(x: torch.Tensor, pad: int) -> torch.Tensor:
    """``x [L, D]`` with ``pad`` zero rows before and after."""
    out = x.new_empty(x.shape[0] + 2 * pad, x.shape[1])
    out[:pad] = 0
    out[pad : pad + x.shape[0]] = x
    out[pad + x.shape[0] :] = 0
    return out


def _steps(n: int, per_item: int, budget: int) -> list[tuple[int, int]]:
    size = max(1, budget // max(per_item, 1))
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _masks(sp, dtype):
    """``(column ranges, bias [rows, width] 0/-inf, empty rows [rows, 1] or None)``, cached on ``sp``'s mask."""
    cols = columns(sp.blocked)
    bias = sp.bias.reshape(sp.bias.shape[-2:]).to(dtype)
    empty = sp.blocked.all(-1)
    return cols, bias, (empty[:, None] if bool(empty.any()) else None)


def forward(qp, kp, vp, op, lp, seg, sp, bm: int, scale: float, budget: int) -> None:
    """The segment's output rows and log-sum-exp into ``op`` / ``lp`` (``[B, h, Lpad(, D)]``)."""
    b, h, _, d = qp.shape
    r0 = int(seg.q_tiles[0]) * bm
    n, rows = len(seg) * sp.parts, sp.rows
    cols, bias, empty = _masks(sp, qp.dtype)
    steps = _steps(n, rows * sp.width * qp.element_size(), budget)

    @torch.no_grad()  # grad mode is per thread: the workers' too
    def task(bi: int, hi: int) -> None:
        # K^T with unit stride along the keys: Q K^T is then a plain (NN) matmul, 1.7x the speed of reading
        # K's rows transposed (MKL, 32 x 64 x 288 steps: 156 against 89 GFLOP/s). One head at a time: a
        # cache-sized transpose is 3x faster than the whole tensor's.
        kt = kp[bi, hi].t().contiguous()
        buf = qp.new_empty(steps[0][1] - steps[0][0], rows, sp.width)
        for a, z in steps:
            nn = z - a
            start = r0 + a * rows
            qc = qp[bi, hi, start : start + nn * rows].view(nn, rows, d)
            kw = _keys_t(kt, sp.key0 + a * sp.step, nn, sp.width, sp.step)
            vw = _keys(vp[bi, hi], sp.key0 + a * sp.step, nn, sp.width, sp.step)
            s = torch.baddbmm(buf[:nn], qc, kw, beta=0, alpha=scale * _LOG2E, out=buf[:nn])
            for c0, c1 in cols:
                s[:, :, c0:c1].add_(bias[:, c0:c1])
            m = s.amax(-1, keepdim=True)
            if empty is not None:
                m.masked_fill_(m == float("-inf"), 0.0)
            s.sub_(m).exp2_()
            den = s.sum(-1, keepdim=True)
            # A row with an allowed key holds exp2(0) = 1; rows with none hold 0 (and a zero numerator).
            den.clamp_(min=1.0)
            o = op[bi, hi, start : start + nn * rows].view(nn, rows, d)
            torch.bmm(s, vw, out=o)
            o.div_(den)
            lse = den.log2_().add_(m).mul_(_LN2)
            if empty is not None:
                lse.masked_fill_(empty, float("-inf"))
            lp[bi, hi, start : start + nn * rows] = lse.view(-1)

    tasks = [functools.partial(task, bi, hi) for bi in range(b) for hi in range(h)]
    pool.run(tasks, torch.get_num_threads() if len(tasks) >= 2 * torch.get_num_threads() else 1)


def backward(t: dict, seg, sp, bm: int, scale: float, budget: int) -> None:
    """The segment's share of ``t["dq"]`` (written, or added when ``seg.merge``), ``t["dk"]``, ``t["dv"]`` (added).

    Needs ``t["lse2"]`` (base-2 log-sum-exp, +inf on rows with no allowed key) and ``t["delta"]``.
    """
    q = t["q"]
    b, h, _, d = q.shape
    r0 = int(seg.q_tiles[0]) * bm
    n, rows, width, step = len(seg) * sp.parts, sp.rows, sp.width, sp.step
    cols, bias, _ = _masks(sp, q.dtype)
    # P, dS (rows x width) and the dK/dV windows (width x D) of one sub-tile.
    steps = _steps(n, (2 * rows + 2 * d) * width * q.element_size(), budget)
    pieces = [(j, min(j + step, width)) for j in range(0, width, step)] if step else []

    @torch.no_grad()
    def task(bi: int, hi: int) -> None:
        qh, doh, kh, vh = (t[name][bi, hi] for name in ("q", "do", "k", "v"))
        dqh, dkh, dvh = (t[name][bi, hi] for name in ("dq", "dk", "dv"))
        lse2, delta = t["lse2"][bi, hi], t["delta"][bi, hi]
        # K^T and V^T: the scores are plain (NN) matmuls (see forward).
        kt, vt = kh.t().contiguous(), vh.t().contiguous()
        for a, z in steps:
            nn = z - a
            span = slice(r0 + a * rows, r0 + z * rows)
            qc, doc = qh[span].view(nn, rows, d), doh[span].view(nn, rows, d)
            k0 = sp.key0 + a * step
            kw = _keys(kh, k0, nn, width, step)
            ktw, vtw = _keys_t(kt, k0, nn, width, step), _keys_t(vt, k0, nn, width, step)
            p = torch.baddbmm(lse2[span].view(nn, rows, 1).neg(), qc, ktw, alpha=scale * _LOG2E)
            for c0, c1 in cols:
                p[:, :, c0:c1].add_(bias[:, c0:c1])
            p.exp2_()
            ds = torch.baddbmm(delta[span].view(nn, rows, 1).neg(), doc, vtw)
            ds.mul_(p)
            dq = dqh[span].view(nn, rows, d)
            dq.baddbmm_(ds, kw, beta=1 if seg.merge else 0, alpha=scale)
            gk = torch.bmm(ds.transpose(1, 2), qc)
            gv = torch.bmm(p.transpose(1, 2), doc)
            if not step:
                # Every sub-tile reads the same keys: their windows add up first.
                dkh[k0 : k0 + width].add_(gk.sum(0), alpha=scale)
                dvh[k0 : k0 + width].add_(gv.sum(0))
                continue
            # Rows j..j+step of consecutive windows are distinct key rows: one strided add per piece.
            for j, e in pieces:
                _keys(dkh, k0 + j, nn, e - j, step).add_(gk[:, j:e], alpha=scale)
                _keys(dvh, k0 + j, nn, e - j, step).add_(gv[:, j:e])

    # dK/dV windows of one (batch, head) overlap from step to step: one task per (batch, head) row.
    tasks = [functools.partial(task, bi, hi) for bi in range(b) for hi in range(h)]
    pool.run(tasks, torch.get_num_threads() if len(tasks) >= 2 * torch.get_num_threads() else 1)


def skewable(sp) -> bool:
    """Whether :func:`backward_skewed` serves ``sp``: sub-tiles as tall as their step, windows whole steps."""
    return sp.step > 0 and sp.rows == sp.step and sp.width % sp.step == 0


def backward_skewed(t: dict, seg, sp, bm: int, scale: float, budget: int) -> None:
    """:func:`backward` with ``dK``/``dV`` per key block: one matmul each over every query row that reaches the block.

    With sub-tiles of ``R`` rows, step ``R`` and ``W = m*R`` keys, key block ``j`` (``R`` keys) is column block
    ``j - i`` of sub-tiles ``i = j-m+1 .. j``. Those ``m`` blocks of ``dS`` are gathered (one strided copy) into
    an ``[m*R, R]`` matrix, and ``dK`` of the block is its transpose times the ``m*R`` query rows: a matmul
    with a long inner dimension, not ``m`` short ones, written straight into the block's key rows (likewise
    ``dV`` from ``P``). The last ``m - 1`` sub-tiles of a step stay in the buffers (moved to their front)
    for the key blocks the next step completes; the query rows are padded with ``m - 1`` zero sub-tiles
    at both ends, and so are the buffers.
    """
    q = t["q"]
    b, h, _, d = q.shape
    r0 = int(seg.q_tiles[0]) * bm
    n, rows, width = len(seg) * sp.parts, sp.rows, sp.width
    m = width // rows
    halo = m - 1
    tile = rows * width
    cols, bias, _ = _masks(sp, q.dtype)
    steps = _steps(n, 3 * tile * q.element_size(), budget)
    chunk = steps[0][1] - steps[0][0]

    @torch.no_grad()
    def task(bi: int, hi: int) -> None:
        qh, doh, kh, vh = (t[name][bi, hi] for name in ("q", "do", "k", "v"))
        dqh, dkh, dvh = (t[name][bi, hi] for name in ("dq", "dk", "dv"))
        lse2, delta = t["lse2"][bi, hi], t["delta"][bi, hi]
        # Scores as plain (NN) matmuls with the rows' statistics inside: [Q, -lse2/alpha] @ [K^T; 1] and
        # [dO, -delta] @ [V^T; 1] (no pass over P or dS to subtract them).
        alpha = scale * _LOG2E
        seg_rows = slice(r0, r0 + n * rows)
        kt1, vt1 = _transposed_ones(kh), _transposed_ones(vh)
        q1 = _with_column(qh[seg_rows], lse2[seg_rows], -1 / alpha)
        do1 = _with_column(doh[seg_rows], delta[seg_rows], -1.0)
        # Query rows and dO padded with halo zero sub-tiles at both ends.
        qpad, dopad = (_padded(x[seg_rows], halo * rows) for x in (qh, doh))
        pbuf, dsbuf = (qh.new_empty(chunk + 2 * halo, rows, width) for _ in range(2))
        pbuf[:halo] = 0
        dsbuf[:halo] = 0
        gbuf = qh.new_empty(chunk + halo, m * rows, rows)
        for a, z in steps:
            nn = z - a
            span = slice(r0 + a * rows, r0 + z * rows)
            local = slice(a * rows, z * rows)
            k0 = sp.key0 + a * rows
            kw = _keys(kh, k0, nn, width, rows)
            ktw, vtw = _keys_t(kt1, k0, nn, width, rows), _keys_t(vt1, k0, nn, width, rows)
            p, ds = pbuf[halo : halo + nn], dsbuf[halo : halo + nn]
            torch.baddbmm(p, q1[local].view(nn, rows, d + 1), ktw, beta=0, alpha=alpha, out=p)
            for c0, c1 in cols:
                p[:, :, c0:c1].add_(bias[:, c0:c1])
            p.exp2_()
            torch.bmm(do1[local].view(nn, rows, d + 1), vtw, out=ds)
            ds.mul_(p)
            dqh[span].view(nn, rows, d).baddbmm_(ds, kw, beta=1 if seg.merge else 0, alpha=scale)
            last = z == n
            if last:
                # The key blocks past the last sub-tile read zeros where no sub-tile follows.
                pbuf[halo + nn : 2 * halo + nn] = 0
                dsbuf[halo + nn : 2 * halo + nn] = 0
            nj = nn + (halo if last else 0)
            qwin = _keys(qpad, a * rows, nj, m * rows, rows)
            dowin = _keys(dopad, a * rows, nj, m * rows, rows)
            g = gbuf[:nj]
            for buf, wins, dst, factor in ((dsbuf, qwin, dkh, scale), (pbuf, dowin, dvh, 1.0)):
                # Key block a + i: column block m-1-c of buffer position i + c, for c = 0 .. m-1.
                blocks = buf.as_strided((nj, m, rows, rows), (tile, tile - rows, width, 1), halo * rows)
                g.view(nj, m, rows, rows).copy_(blocks)
                _keys(dst, k0, nj, rows, rows).baddbmm_(g.transpose(1, 2), wins, alpha=factor)
            if not last and halo:
                # The step's last halo sub-tiles move to the front for the next step's key blocks.
                for buf in (pbuf, dsbuf):
                    buf[:halo] = buf[nn : nn + halo].clone()

    tasks = [functools.partial(task, bi, hi) for bi in range(b) for hi in range(h)]
    pool.run(tasks, torch.get_num_threads() if len(tasks) >= 2 * torch.get_num_threads() else 1)
