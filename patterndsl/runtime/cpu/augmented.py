"""Runtime stage, CPU executor: a bias ``g(q) + u(k)`` on plain ``causal`` or ``full``, folded into the head dimension.

Comes in: ``q``, ``k``, ``v``, the static :class:`BlockPlan` of a pattern whose one head group is
exactly ``causal`` or ``full`` (tokens in their own order) and whose score is ``s + bias`` with a
bias that splits into a query part and a key part (:func:`patterndsl.scores.separable.separable`:
ALiBi's ``-m_h * (q - k)``, a per-key bias), and the run-time inputs the bias reads. Goes out: the
attention output and log-sum-exp (forward), or ``dq``, ``dk``, ``dv`` (backward), computed by torch's
fused CPU flash-attention kernels as the unmodified pattern is (:mod:`.dense`), with one more column.

The bias is ``x_k + y_q`` with ``x_k = bias(q*, k)`` and ``y_q = bias(q, k*) - bias(q*, k*)`` for
fixed positions ``q*``, ``k*`` (float64). ``y_q`` is constant along a row: it moves the row's
log-sum-exp and nothing else. ``x_k`` enters the kernel's product: ``q' = [scale * q, 1]``,
``k' = [k, x_k - c]``, ``v' = [v, 0]`` with the kernel's scale 1 give ``q' . k' = s + x_k - c``, so the
kernel's softmax is the modified one and ``lse = lse' + c + y_q``. The column is float32 inside the
product: its rounding error is relative to ``|x_k - c|``, so ``c`` is taken close to the largest
``x_k`` a row sees (the weights that matter have ``x_k - c`` within the rows' score range of 0). For
``full`` every row sees every key and one ``c`` per head serves; for ``causal`` a row sees the keys up to
its own position, so the rows run in chunks of ``C`` (one size, a power of two) whose rows' largest
visible ``x_k`` lie within :data:`SPREAD` of each other, ``c`` the chunk's last row's: a chunk is one
causal call on its diagonal square (all chunks' squares in one call) and one dense call on the keys
before it, merged by log-sum-exp once at the end. ALiBi's steepest head (``m = 1/2``) gives ``C = 2 *
SPREAD``; the kernel's cost for ``D + 1`` columns is about 1.1x its cost for ``D`` (measured, 4K).

Float inputs the bias reads get no gradient here: their backward runs through the tile schedule.
"""

from __future__ import annotations

import functools

import torch

from patterndsl import ir, scores
from patterndsl.analysis.plan import BlockPlan
from patterndsl.runtime import softmax
from patterndsl.runtime.cpu import pool
from patterndsl.runtime.cpu.tuning import FLASH, FLASH_BWD, CpuOptions
from patterndsl.runtime.cpu.views import compute_dtype, inverses
from patterndsl.scores.separable import separable
from patterndsl.scores.tables import Tables

#: Largest ``|x_k - c|`` at a row's largest visible ``x_k`` (in logits): the product's rounding error on a
#: weight that matters is then below ``2**-17`` (``ulp(256) / 2``); the unmodified kernel's is about
#: ``ulp(|s|) / 2``.
SPREAD = 255.0
#: Fewest rows of a causal chunk (a steeper bias than this allows runs through the tile schedule).
MIN_ROWS = 64

_KINDS = {"causal": True, "full": False}


def kind_of(plan: BlockPlan) -> bool | None:
    """``is_causal`` when ``plan`` is plain ``causal`` / ``full`` in token order with a separable bias, else None."""
    pattern = plan.pattern
    score = None if pattern is None else pattern.score
    if score is None or not score.additive or not separable(score.bias):
        return None
    if len(plan.groups) != 1 or plan.kv_len == 0 or plan.q_len == 0:
        return None
    node = plan.groups[0].node
    if not (isinstance(node, ir.Prim) and node.name in _KINDS and not node.args):
        return None
    if inverses(plan) != (None, None):
        return None
    return _KINDS[node.name]


def applies(plan: BlockPlan, q: torch.Tensor, v: torch.Tensor, opts: CpuOptions, tables=None) -> bool:
    """Whether this call runs here (before the tile schedule). ``tables``: the backward's float-input
    gradients (their pattern runs through the tile schedule, which scatters them)."""
    if tables or FLASH is None or FLASH_BWD is None or not (opts.fused and opts.dense):
        return False
    if q.shape[0] == 0 or q.shape[-1] != v.shape[-1]:
        return False
    return kind_of(plan) is not None


def _parts(plan: BlockPlan, batch: int, heads: int, data) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [B|1, H|1, Lk], y [B|1, H|1, Lq])`` float64 with ``bias(q, k) = x_k + y_q`` (rows before the first
    key position included: their ``y`` is never used)."""
    pattern = plan.pattern
    lq, lk = plan.q_len, plan.kv_len
    where = torch.arange(batch).view(-1, 1, 1)
    read = Tables(pattern.inputs, data, where) if pattern.inputs and data else None
    h = torch.arange(heads).view(1, -1, 1)
    q_ref, k_ref = torch.tensor(lk - 1), torch.tensor(0)

    def bias(q, k):
        env = scores.Env(None, q, k, h, lq, lk, pattern.layout, torch.float64, read)
        return scores.evaluate(pattern.score.bias, env).to(torch.float64)

    x = bias(q_ref, torch.arange(lk).view(1, 1, -1))
    y = bias((torch.arange(lq) + (lk - lq)).clamp(min=0).view(1, 1, -1), k_ref) - bias(q_ref, k_ref)
    return _lead(x, lk), _lead(y, lq)


def _lead(t: torch.Tensor, length: int) -> torch.Tensor:
    t = t.reshape((1,) * (3 - t.dim()) + tuple(t.shape))
    return t.expand(t.shape[0], t.shape[1], length)


def _chunk_rows(x: torch.Tensor, lq: int, lk: int) -> int | None:
    """Rows per causal chunk (``ceil(rows / n)``, the fewest chunks ``n``, at least :data:`MIN_ROWS` rows) whose
    rows' largest visible
    ``x_k`` lie within ``2 * SPREAD`` of each other; None when even :data:`MIN_ROWS` rows spread further."""
    row0 = max(0, lq - lk)
    seen = x.cummax(-1).values[..., lk - lq + row0 :]  # [.., rows]: the largest x_k row r sees
    rows = lq - row0

    def fits(size: int) -> bool:
        starts = torch.arange(0, rows, size)
        ends = (starts + size).clamp(max=rows) - 1
        return float((seen[..., ends] - seen[..., starts]).amax()) <= 2 * SPREAD

    # The spread grows with the chunk: bisect on the number of chunks, all but the last of equal size
    # (no short tail call).
    lo, hi = 1, max(1, rows // MIN_ROWS)
    if not fits(-(-rows // hi)):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(-(-rows // mid)) else (mid + 1, hi)
    return -(-rows // lo)


def _groups(x: torch.Tensor, lq: int, lk: int, causal: bool) -> list[tuple[slice | list[int], int]] | None:
    """``(heads, rows per chunk)`` per group of heads that run together: one group when the bias reads no
    head or the pattern is ``full``, else the heads by the chunk size their slope allows (a steep head
    runs shorter chunks, a gentle one longer, faster ones). None when a head is too steep."""
    every = slice(None)
    if not causal:
        return [(every, lq)]
    if x.shape[1] == 1:
        size = _chunk_rows(x, lq, lk)
        return None if size is None else [(every, size)]
    sizes: dict[int, list[int]] = {}
    for h in range(x.shape[1]):
        size = _chunk_rows(x[:, h : h + 1], lq, lk)
        if size is None:
            return None
        sizes.setdefault(size, []).append(h)
    out = []
    for size, heads in sizes.items():
        contiguous = heads == list(range(heads[0], heads[-1] + 1))
        out.append((slice(heads[0], heads[-1] + 1) if contiguous else heads, size))
    return out


class _Layout:
    """The calls of one group of heads at these sizes: chunks of rows and their shifts ``c``.

    Attributes:
        row0: the first row with a key (causal with ``Lq > Lk``: the rows before it are empty).
        size: rows per chunk; starts: the chunks' first rows; shifts: ``c`` per chunk ``[B|1, h|1]``
            (the largest ``x_k`` the chunk's middle row sees: every row's is within ``SPREAD``).
        off: ``Lk - Lq`` (row ``r`` sits at key position ``r + off``).
    """

    def __init__(self, x: torch.Tensor, lq: int, lk: int, causal: bool, size: int):
        self.off = lk - lq
        self.causal = causal
        self.row0 = max(0, lq - lk) if causal else 0
        self.size = size
        if causal:
            seen = x.cummax(-1).values
            self.starts = list(range(self.row0, lq, size))
            self.shifts = [seen[..., (a + min(a + size, lq) - 1) // 2 + self.off] for a in self.starts]
        else:
            self.starts, self.shifts = [0], [x.amax(-1)]

    def row_shift(self, lq: int) -> torch.Tensor:
        """``c`` per row ``[B|1, h|1, Lq]`` (0 on empty rows)."""
        first = self.shifts[0]
        out = torch.zeros(*first.shape, lq, dtype=first.dtype)
        for a, c in zip(self.starts, self.shifts, strict=True):
            out[..., a : a + self.size] = c[..., None]
        return out


def layout_of(plan: BlockPlan, batch: int, heads: int, data):
    """``(x, y, [(heads, layout)])`` for a call, one entry per query head (its chunk size that of its group:
    see :func:`_groups`), or None when a causal bias is too steep for :data:`MIN_ROWS` rows."""
    x, y = _parts(plan, batch, heads, data)
    causal = bool(kind_of(plan))
    groups = _groups(x, plan.q_len, plan.kv_len, causal)
    if groups is None:
        return None
    layouts = []
    for hs, size in groups:
        for head in torch.arange(heads)[hs].tolist():
            xh = x if x.shape[1] == 1 else x[:, head : head + 1]
            layouts.append((slice(head, head + 1), _Layout(xh, plan.q_len, plan.kv_len, causal, size)))
    return x, y, layouts


def _flushing(task):
    """``task`` run with denormals flushed to zero on the thread that runs it (the setting restored after).

    A bias makes many weights tiny: ``exp`` of a row's far keys lands in float32's denormal range, and
    products of denormals are ~100x slower on x86 (measured, ALiBi causal 4K, one thread: forward 1.6 s,
    forward+backward 8.6 s; flushed: 0.8 s and 2.7 s). A weight below ``2**-126`` of a row whose largest
    weight is at least ``1 / Lk`` changes no float32 sum, so flushing changes nothing that is kept.
    """

    def run() -> None:
        flushed = (torch.tensor([1e-30]) * 1e-10).item() == 0.0
        torch.set_flush_denormal(True)
        try:
            with torch.no_grad():  # grad mode is per thread: a worker's starts enabled
                task()
        finally:
            if not flushed:
                torch.set_flush_denormal(False)

    return run


def _run(tasks) -> None:
    """The heads' tasks on worker threads (the flag is per thread, and torch's own intra-op threads do not
    take it: each worker runs its calls serially, :mod:`patterndsl.runtime.cpu.pool`)."""
    pool.run([_flushing(task) for task in tasks], torch.get_num_threads())


def _augment(x: torch.Tensor, heads: torch.Tensor, value: float | None, dtype, scale: float | None) -> torch.Tensor:
    """``[scale * x[:, heads], value]`` along the head dim, contiguous in ``dtype`` (``heads``: the head of
    ``x`` each head of the group reads; a key/value head repeats for the query heads sharing it; ``scale``
    None: unscaled)."""
    b, _, length, d = x.shape
    first, count = int(heads[0]), len(heads)
    if bool((heads == torch.arange(first, first + count)).all()):
        src = x[:, first : first + count]  # a range of heads: a view
    else:
        src = x.index_select(1, heads)
    out = torch.empty(b, len(heads), length, d + 1, dtype=dtype)
    if scale is None or scale == 1.0:
        out[..., :d] = src
    else:
        torch.mul(src, scale, out=out[..., :d])
    out[..., d] = 0.0 if value is None else value
    return out


def _set_column(kx: torch.Tensor, x: torch.Tensor, c: torch.Tensor, keys: slice) -> None:
    """Write ``x_k - c`` (float64, rounded once) into the bias column of ``kx`` for ``keys``."""
    d = kx.shape[-1] - 1
    kx[:, :, keys, d] = (x[..., keys] - c[..., None]).to(kx.dtype)


def _diagonal(t: torch.Tensor, lay: _Layout, lq: int, key_side: bool):
    """The chunks' diagonal squares of ``t`` (``[B, h, L, ...]``, contiguous) as ``[(view [B*h, n, C, ...],
    first row)]``: the whole chunks as one view, the last shorter chunk as another."""
    b, h = t.shape[:2]
    shift = lay.off if key_side else 0
    rows = lq - lay.row0
    whole = rows // lay.size
    out = []
    if whole:
        start = lay.row0 + shift
        part = t[:, :, start : start + whole * lay.size]
        out.append((part.reshape(b * h, whole, lay.size, *t.shape[3:]), lay.row0))
    if rows % lay.size:
        start = lay.row0 + whole * lay.size
        part = t[:, :, start + shift : lq + shift]
        out.append((part.reshape(b * h, 1, lq - start, *t.shape[3:]), start))
    return out


def _chunks(lay: _Layout, lq: int):
    """``(c, rows, keys before the chunk's square)`` per chunk."""
    for a, c in zip(lay.starts, lay.shifts, strict=True):
        yield c, slice(a, min(a + lay.size, lq)), a + lay.off


def _group(q, k, v, x, y, hs, scale: float):
    """One group of heads: its query heads and the key/value head each reads (int64), its ``x`` and ``y``,
    and the augmented ``q'``, ``k'``, ``v'`` (the bias column of ``k'`` still to be written)."""
    heads, dt = q.shape[1], compute_dtype(q.dtype)
    q_heads = torch.arange(heads)[hs]
    kv_heads = q_heads // (heads // k.shape[1])
    xg, yg = (t if t.shape[1] == 1 else t[:, hs] for t in (x, y))
    qx = _augment(q, q_heads, 1.0, dt, scale)
    return q_heads, kv_heads, xg, yg, qx, _augment(k, kv_heads, None, dt, None), _augment(v, kv_heads, None, dt, None)


def forward(q, k, v, plan: BlockPlan, scale: float, data=None):
    """``(out, lse)`` as :func:`patterndsl.runtime.cpu.forward.forward` returns them (:func:`applies` first),
    or None when the causal bias is too steep (the caller then runs the tile schedule)."""
    b, h, lq, d = q.shape
    parts = layout_of(plan, b, h, data)
    if parts is None:
        return None
    x, y, layouts = parts
    dt = compute_dtype(q.dtype)
    out = torch.empty(b, h, lq, d, dtype=q.dtype)
    lse = torch.empty(b, h, lq, dtype=dt)

    def head(hs, lay: _Layout) -> None:
        _, _, xg, yg, qx, kx, vx = _group(q, k, v, x, y, hs, scale)
        o, lp = _forward_group(qx, kx, vx, xg, lay, lq)
        lp = lp + (lay.row_shift(lq) + yg).to(dt)
        if lay.row0:
            lp[:, :, : lay.row0] = float("-inf")
        out[:, hs] = o[..., :d]
        lse[:, hs] = lp

    _run([functools.partial(head, hs, lay) for hs, lay in layouts])
    return out, lse


def _forward_group(qx, kx, vx, x, lay: _Layout, lq: int):
    """The kernel's output ``[B, h, Lq, D+1]`` and ``lse'`` (of the augmented scores) for one group of heads."""
    b, h, _, d1 = qx.shape
    if not lay.causal:
        _set_column(kx, x, lay.shifts[0], slice(None))
        return FLASH(qx, kx, vx, 0.0, False, scale=1.0)[:2]
    for c, rows, _ in _chunks(lay, lq):
        _set_column(kx, x, c, slice(rows.start + lay.off, rows.stop + lay.off))
    views = [_diagonal(t, lay, lq, side) for t, side in ((qx, False), (kx, True), (vx, True))]
    prefixed = [(c, rows, keys) for c, rows, keys in _chunks(lay, lq) if keys > 0]
    if len(views[0]) == 1 and views[0][0][1] == 0 and views[0][0][0].shape[1] == 1 and not prefixed:
        # One chunk on every row and no key before it: the kernel's output is the group's.
        o, lp = FLASH(views[0][0][0], views[1][0][0], views[2][0][0], 0.0, True, scale=1.0)[:2]
        return o.view(b, h, lq, d1), lp.view(b, h, lq)
    out = torch.zeros(b, h, lq, d1, dtype=qx.dtype)
    lse = torch.full((b, h, lq), float("-inf"), dtype=qx.dtype)
    for (qv, r), (kv, _), (vv, _) in zip(*views, strict=True):
        o, lp = FLASH(qv, kv, vv, 0.0, True, scale=1.0)[:2]
        n = qv.shape[1] * qv.shape[2]
        out[:, :, r : r + n] = o.reshape(b, h, n, d1)
        lse[:, :, r : r + n] = lp.reshape(b, h, n)
    if not prefixed:
        return out, lse
    first = prefixed[0][1].start
    prefix_o = torch.empty(b, h, lq - first, d1, dtype=qx.dtype)
    prefix_l = torch.empty(b, h, lq - first, dtype=qx.dtype)
    for c, rows, keys in prefixed:
        _set_column(kx, x, c, slice(0, keys))
        o, lp = FLASH(qx[:, :, rows], kx[:, :, :keys], vx[:, :, :keys], 0.0, False, scale=1.0)[:2]
        part = slice(rows.start - first, rows.stop - first)
        prefix_o[:, :, part] = o
        prefix_l[:, :, part] = lp
    softmax.merge_into(out[:, :, first:], lse[:, :, first:], prefix_o, prefix_l)
    return out, lse


def backward(q, k, v, out, lse, dout, plan: BlockPlan, scale: float, data=None):
    """``(dq, dk, dv)`` as :func:`patterndsl.runtime.cpu.backward.backward` returns them (no gradient on lse),
    or None when the causal bias is too steep (the caller then runs the tile schedule)."""
    b, h, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    parts = layout_of(plan, b, h, data)
    if parts is None:
        return None
    x, y, layouts = parts
    dt = compute_dtype(q.dtype)
    dq = torch.empty(b, h, lq, d, dtype=q.dtype)
    dk, dv = torch.zeros(b, hk, lk, d, dtype=dt), torch.zeros(b, hk, lk, d, dtype=dt)
    parts = {}

    def head(hs, lay: _Layout) -> None:
        q_heads, kv_heads, xg, yg, qx, kx, vx = _group(q, k, v, x, y, hs, scale)
        ox, gx = _augment(out, q_heads, None, dt, None), _augment(dout, q_heads, None, dt, None)
        # The kernel's rows' statistics: lse of the augmented scores (c and y_q off), +inf on empty rows.
        lg = lse[:, hs].to(dt)
        lx = (lg - (lay.row_shift(lq) + yg).to(dt)).masked_fill_(lg == float("-inf"), float("inf"))
        gq, gk, gv = _backward_group(gx, qx, kx, vx, ox, lx.contiguous(), xg, lay, lq)
        dq[:, hs] = gq[..., :d].mul_(scale)
        parts[hs.start] = (kv_heads, gk[..., :d], gv[..., :d])

    _run([functools.partial(head, hs, lay) for hs, lay in layouts])
    # Query heads sharing a key/value head add into it here, in one thread.
    for kv_heads, gk, gv in parts.values():
        dk.index_add_(1, kv_heads, gk)
        dv.index_add_(1, kv_heads, gv)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _backward_group(gx, qx, kx, vx, ox, lx, x, lay: _Layout, lq: int):
    """The kernel's ``dq'``, ``dk'``, ``dv'`` (``[B, h, L, D+1]``) for one group of heads."""
    if not lay.causal:
        _set_column(kx, x, lay.shifts[0], slice(None))
        return FLASH_BWD(gx, qx, kx, vx, ox, lx, 0.0, False, scale=1.0)
    b, h, lk, d1 = kx.shape
    dq = torch.zeros(b, h, lq, d1, dtype=qx.dtype)
    dk, dv = torch.zeros(b, h, lk, d1, dtype=qx.dtype), torch.zeros(b, h, lk, d1, dtype=qx.dtype)
    for c, rows, _ in _chunks(lay, lq):
        _set_column(kx, x, c, slice(rows.start + lay.off, rows.stop + lay.off))
    sides = ((gx, False), (qx, False), (kx, True), (vx, True), (ox, False), (lx[..., None], False))
    views = [_diagonal(t, lay, lq, side) for t, side in sides]
    for (gv, r), (qv, _), (kv, _), (vv, _), (ov, _), (lv, _) in zip(*views, strict=True):
        n = qv.shape[1] * qv.shape[2]
        grads = FLASH_BWD(gv, qv, kv, vv, ov, lv[..., 0], 0.0, True, scale=1.0)
        for buf, g, shift in zip((dq, dk, dv), grads, (0, lay.off, lay.off), strict=True):
            buf[:, :, r + shift : r + n + shift] = g.reshape(b, h, n, d1)
    for c, rows, keys in _chunks(lay, lq):
        if keys <= 0:
            continue
        _set_column(kx, x, c, slice(0, keys))
        r = (gx[:, :, rows], qx[:, :, rows], kx[:, :, :keys], vx[:, :, :keys], ox[:, :, rows], lx[:, :, rows])
        gq, gk, gv = FLASH_BWD(*r, 0.0, False, scale=1.0)
        dq[:, :, rows] += gq
        dk[:, :, :keys] += gk
        dv[:, :, :keys] += gv
    return dq, dk, dv
