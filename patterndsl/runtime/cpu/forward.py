"""Runtime stage, CPU executor: the forward pass, one step per segment of each unit's schedule.

Comes in: ``q``, ``k``, ``v`` (``[batch, heads, seq, head_dim]``, any float dtype, grouped-query
heads allowed), the pattern's :class:`BlockPlan` and the executor's
:class:`~patterndsl.runtime.cpu.tuning.CpuOptions`. Goes out: the attention output and its
log-sum-exp in the original token order. A step is one call of torch's fused CPU
flash-attention kernel on the segment's ``[batch*heads, tiles, rows, D]`` views (``kernel =
"fused"``; affine segments with one shared mask run as narrower sub-tiles, :func:`split`), or
batched matmuls with an exact two-pass softmax in chunks of ``chunk_bytes`` (``kernel =
"math"``; with a score modifier its chunks run on worker threads, each serially,
:mod:`~patterndsl.runtime.cpu.pool`). ``merge`` segments, merge units and the gathered ``route``
work combine with what the rows hold by log-sum-exp (:func:`patterndsl.runtime.softmax.merge_into`).
Memory is O(Lq * keys visited per query), never L x L. A blocked pair never influences an output:
when a call's result is not finite it runs again selecting (math kernel, ``masked_fill`` on scores,
cleaned values), so a NaN or Inf in a key or value reaches exactly the rows that attend it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from patterndsl.analysis.plan import BlockPlan
from patterndsl.runtime import softmax
from patterndsl.runtime.cpu import augmented, dense, documents, memory, native, pool
from patterndsl.runtime.cpu.schedule import Segment
from patterndsl.runtime.cpu.scoremod import Modifier, PairModifier
from patterndsl.runtime.cpu.tuning import FLASH, CpuOptions, resolve
from patterndsl.runtime.cpu.units import Heads, units
from patterndsl.runtime.cpu.views import (
    chunks,
    cleaned,
    compute_dtype,
    finite,
    flat,
    from_tiles,
    inverses,
    kv_view,
    matmul_seen,
    partial_columns,
    put,
    put_rows,
    q_view,
    rows_view,
    scores,
    take,
    to_tiles,
)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, scale: float, options=None, data=None):
    """Attention restricted to ``plan``, on CPU.

    Args:
        q: ``[B, H, Lq, D]``.
        k, v: ``[B, Hkv, Lk, D]`` with ``Hkv`` dividing ``H``.
        plan: the pattern's block plan at ``(Lq, Lk, H)``; tiles marked 3 (``route``) are
            decided from ``q`` and ``k`` at this call.
        scale: softmax scale.
        options: :class:`~patterndsl.runtime.cpu.tuning.CpuOptions`; default: the current ones.
        data: the run-time input tensors of the pattern, in declaration order (LANGUAGE.md section 7).

    Returns:
        ``(out, lse)``: ``out`` ``[B, H, Lq, D]`` in ``q``'s dtype, ``lse`` ``[B, H, Lq]`` float32
        (float64 for float64 inputs; ``-inf`` and a zero output for rows with no allowed key).
    """
    b, h, lq, _ = q.shape
    dt = compute_dtype(q.dtype)
    opts = resolve(options)
    if b == 0:
        return q.new_zeros(q.shape), torch.zeros(b, h, lq, dtype=dt)
    done = None
    if documents.applies(plan, q, k, opts, data):
        done = documents.forward(q, k, v, plan, scale, data)
    elif dense.applies(plan, q, v, opts, data) and not native.takes_dense(plan, q, v, opts):
        done = dense.forward(q, k, v, plan, scale)
    elif augmented.applies(plan, q, v, opts):
        done = augmented.forward(q, k, v, plan, scale, data)
    out, lse, clean = (*done, None) if done else _forward(q, k, v, plan, scale, opts, safe=False, data=data)
    # Non-finite keys or values must not reach the rows that do not attend them, but torch's fused
    # kernel only adds -inf to the scores of blocked pairs (NaN + -inf is NaN, and 0 * NaN in P @ V
    # is NaN). Whatever a non-finite input reaches turns non-finite, so a finite result is exact;
    # otherwise the call runs again selecting (the math kernel: masked_fill on the scores, cleaned V).
    # Checking the output, not the inputs, keeps finite calls at one pass over ``out`` and a sum of
    # ``lse`` (none when one native unit wrote every row: it reports whether any is not finite).
    if clean is None:
        clean = finite(out) and not bool(torch.isnan(lse.sum()))
    if not clean:
        out, lse, _ = _forward(q, k, v, plan, scale, replace(opts, kernel="math"), safe=True, data=data)
    return out, lse


def _forward(q, k, v, plan: BlockPlan, scale: float, opts: CpuOptions, safe: bool, data=None):
    b, h, lq, d = q.shape
    dt = compute_dtype(q.dtype)
    todo, work = units(plan, q, k, opts, data)
    # One unit over every head and batch element hands its buffers out directly, without a final copy.
    single = len(todo) == 1 and todo[0][0] == slice(None) and work is None
    # Gathered route work merges into the outputs afterwards: keep them in the compute dtype until then.
    out = None if single else torch.zeros(b, h, lq, d, dtype=q.dtype if work is None else dt)
    lse = None if single else torch.full((b, h, lq), float("-inf"), dtype=dt)
    bm, bn = plan.block
    q_inv, k_inv = inverses(plan)
    lq_pad, lk_pad = plan.n_q_tiles * bm, plan.n_kv_tiles * bn
    score = plan.pattern.score is not None
    run = _forward_fused if opts.fused and not score else _forward_math
    use_native = not safe and native.supports(plan, q, v, opts)
    clean = None
    for bs, sched, merge in todo:
        hd = Heads.of(sched, h, h // k.shape[1])
        # A score modifier runs on every visited tile (full ones too), through the math kernel.
        modify = Modifier(plan, hd.q, hd.count, data, torch.arange(b)[bs]) if score else None
        qb, kb, vb = q[bs], k[bs], v[bs]
        nb = qb.shape[0]
        qp = to_tiles(qb, hd.q, plan.q_order, q_inv is None, lq_pad, dt)
        kp = to_tiles(kb, hd.kv, plan.kv_order, k_inv is None, lk_pad, dt)
        vp = to_tiles(vb, hd.kv, plan.kv_order, k_inv is None, lk_pad, dt)
        vp, vbad = cleaned(vp) if safe else (vp, None)
        # Every covered query tile is written by exactly one segment; only the others need clearing.
        op = memory.empty((nb, hd.count, lq_pad, d), dt)
        lp = torch.empty(nb, hd.count, lq_pad, dtype=dt)
        idle = sched.idle_q_tiles
        if idle.numel():
            op.view(nb, hd.count, -1, bm, d)[:, :, idle] = 0
            lp.view(nb, hd.count, -1, bm)[:, :, idle] = float("-inf")
        if use_native:
            # Every query tile's rows, idle ones too, in one call over the schedule's tile lists.
            clean = native.forward(native.program(sched, plan.n_q_tiles, plan.block), qp, kp, vp, op, lp, scale)
        for seg in () if use_native else sched.segments:
            if modify is not None and vbad is None and opts.fused and modify.score.additive:
                _forward_biased(qp, kp, vp, op, lp, seg, plan.block, scale, opts, modify)
            elif modify is not None or vbad is not None:
                _forward_math(qp, kp, vp, op, lp, seg, plan.block, scale, opts, vbad, modify)
            else:
                run(qp, kp, vp, op, lp, seg, plan.block, scale, opts)
        if single:
            out = from_tiles(op, lq, q_inv).to(q.dtype).contiguous()
            lse = from_tiles(lp, lq, q_inv).contiguous()
        elif merge:
            rows_o, rows_l = take(out, bs, hd.q), take(lse, bs, hd.q)
            softmax.merge_into(rows_o, rows_l, from_tiles(op, lq, q_inv), from_tiles(lp, lq, q_inv))
            put(out, bs, hd.q, rows_o)
            put(lse, bs, hd.q, rows_l)
        else:
            put(out, bs, hd.q, from_tiles(op, lq, q_inv))
            put(lse, bs, hd.q, from_tiles(lp, lq, q_inv))
    if work is not None:
        from patterndsl.runtime.cpu import gather

        modify = None if plan.pattern.score is None else PairModifier(plan)
        gather.forward(q, k, v, out, lse, work, scale, opts, safe=safe, modify=modify)
        out = out.to(q.dtype)
    # One native unit wrote every row and said whether any is not finite (in float32: a narrower dtype
    # may overflow in the cast); otherwise None: the caller checks.
    return out, lse, clean if single and use_native and not todo[0][2] and q.dtype == dt else None


def _emit(op: torch.Tensor, lp: torch.Tensor, seg: Segment, bm: int, o: torch.Tensor, lse: torch.Tensor) -> None:
    """Write a segment's output rows ``o [B, h, n, BM, D]`` and ``lse [B, h, n, BM]``, or merge them.

    A ``merge`` segment (affine) combines with what the rows hold by log-sum-exp, in place;
    rows where both sides are empty stay 0 / -inf.
    """
    if not seg.merge:
        put_rows(op, seg, bm, o)
        put_rows(lp, seg, bm, lse)
        return
    old_o, old_l = q_view(op, seg, bm), q_view(lp[..., None], seg, bm)[..., 0]
    softmax.merge_into(old_o, old_l, o, lse)


@dataclass(frozen=True)
class Split:
    """An affine segment run as ``parts`` times more query tiles of ``BM/parts`` rows each.

    A query tile's rows do not all reach its whole key window (a sliding window's first rows
    stop early, its last rows start late); sub-tile ``i`` (rows ``i*rows ..``) visits only
    keys ``key0 + i*step .. + width``, which is again affine, with one shared mask.
    """

    parts: int
    rows: int
    key0: int
    step: int
    width: int
    blocked: torch.Tensor
    bias: torch.Tensor


def split(seg: Segment, block, dtype: torch.dtype, split_rows: int) -> Split | None:
    """The sub-tile form of an affine segment with one shared mask, when it visits fewer keys.

    Args:
        seg: the segment; block: ``(BM, BN)``; dtype: the compute dtype of the mask's bias.
        split_rows: query rows per sub-tile (``CpuOptions.split_rows``; 0: never split).

    Returns:
        The :class:`Split`, or None when the segment runs as whole tiles.
    """
    key = ("split", dtype, split_rows)
    if key in seg._cache:
        return seg._cache[key]
    bm, bn = block
    out = None
    shared = seg.blocked is not None and seg.blocked.shape[0] == 1
    wanted = split_rows and seg.affine is not None and shared and not seg.merge
    if wanted and bm % split_rows == 0 and bm > split_rows:
        parts, rows = bm // split_rows, split_rows
        step = seg.affine[1] * bn
        allowed = ~seg.blocked[0].view(parts, rows, -1)
        reach = allowed.any(1)  # [parts, width*BN]
        if step % parts == 0 and bool(reach.any(1).all()):
            sub = step // parts
            cols = torch.arange(reach.shape[1])
            lo = min(int(cols[r].min()) - i * sub for i, r in enumerate(reach))
            hi = max(int(cols[r].max()) + 1 - i * sub for i, r in enumerate(reach))
            lo, hi = lo - lo % 8, hi + (-hi) % 8
            width = hi - lo
            fits = lo >= 0 and hi + (parts - 1) * sub <= reach.shape[1] and width <= 0.95 * reach.shape[1]
            if fits:
                masks = [seg.blocked[0, i * rows : (i + 1) * rows, lo + i * sub : hi + i * sub] for i in range(parts)]
                if all(torch.equal(masks[0], m) for m in masks[1:]):
                    bias = torch.zeros(masks[0].shape, dtype=dtype).masked_fill_(masks[0], float("-inf"))
                    out = Split(parts, rows, seg.affine[0] * bn + lo, sub, width, masks[0], bias[None, None])
    seg._cache[key] = out
    return out


def _forward_fused(qp, kp, vp, op, lp, seg0: Segment, block, scale: float, opts: CpuOptions) -> None:
    bm, bn = block
    b, h, _, d = qp.shape
    sp = split(seg0, block, qp.dtype, opts.split_rows)
    if sp is not None:
        _forward_fused_split(qp, kp, vp, op, lp, seg0, sp, bm, scale)
        return
    if seg0.affine is not None:
        _forward_fused_step(qp, kp, vp, op, lp, seg0, block, scale)
        return
    # Gathered keys are copies ([n, width*BN, D] for K and V): chunks bound that memory.
    seg0.bias(qp.dtype)
    for seg in chunks(seg0, 2 * b * h * bn * d * qp.element_size(), opts.fused_budget()):
        _forward_fused_step(qp, kp, vp, op, lp, seg, block, scale)


def _forward_fused_step(qp, kp, vp, op, lp, seg: Segment, block, scale: float) -> None:
    bm, bn = block
    b, h = qp.shape[:2]
    qc, kc, vc = flat(q_view(qp, seg, bm)), flat(kv_view(kp, seg, bn)), flat(kv_view(vp, seg, bn))
    o, lse = FLASH(qc, kc, vc, 0.0, False, attn_mask=seg.bias(qp.dtype), scale=scale)
    lse = lse.unflatten(0, (b, h))
    empty = seg.empty_rows()
    if empty is not None:
        # The kernel reports lse = 0 for rows with no allowed key; the contract says -inf.
        lse = lse.masked_fill(empty, float("-inf"))
    _emit(op, lp, seg, bm, o.unflatten(0, (b, h)), lse)


def _forward_biased(qp, kp, vp, op, lp, seg0: Segment, block, scale: float, opts: CpuOptions, modify) -> None:
    """An additive score (``s + bias``) through the fused kernel: the bias, ``-inf`` on blocked pairs, is
    its float ``attn_mask``, built per chunk of the fused budget. A non-finite result reruns selecting."""
    bm, bn = block
    b, h, _, d = qp.shape
    per_tile = b * h * bn * (bm + 2 * d) * qp.element_size()  # the bias and the gathered K/V of a key tile
    for seg in chunks(seg0, per_tile, opts.fused_budget()):
        qc, kc, vc = flat(q_view(qp, seg, bm)), flat(kv_view(kp, seg, bn)), flat(kv_view(vp, seg, bn))
        mask, shift = modify.bias(seg, qp.dtype, b)
        o, lse = FLASH(qc, kc, vc, 0.0, False, attn_mask=mask, scale=scale)
        lse = lse.unflatten(0, (b, h)) if shift is None else lse.unflatten(0, (b, h)) + shift
        empty = seg.empty_rows()
        if empty is not None:
            lse = lse.masked_fill(empty, float("-inf"))
        _emit(op, lp, seg, bm, o.unflatten(0, (b, h)), lse)


def _forward_math(qp, kp, vp, op, lp, seg0: Segment, block, scale: float, opts: CpuOptions, vbad=None, modify=None):
    """Matmuls and an exact softmax; blocked pairs are selected out (``masked_fill``), so a non-finite key
    there changes nothing, and with ``vbad`` (where the cleaned ``vp`` held non-finite values) neither
    does a non-finite value (:func:`~patterndsl.runtime.cpu.views.matmul_seen`). ``modify``: the score
    modifier (:class:`~patterndsl.runtime.cpu.scoremod.Modifier`), applied before the selection."""
    bm, bn = block
    b, h = qp.shape[:2]
    cols = partial_columns(seg0, bn)

    def step(seg: Segment) -> None:
        s = scores(q_view(qp, seg, bm) * scale, kv_view(kp, seg, bn), seg, modify, cols)
        m = s.amax(-1, keepdim=True)
        m.masked_fill_(m == float("-inf"), 0.0)
        s.sub_(m).exp_()
        den = s.sum(-1, keepdim=True)
        # Rows with no allowed key have den = 0 and a zero numerator: clamp makes them 0, not NaN.
        vbad_seg = None if vbad is None else kv_view(vbad, seg, bn)
        o = matmul_seen(s, kv_view(vp, seg, bn), vbad_seg).div_(den.clamp(min=1.0))
        _emit(op, lp, seg, bm, o, (m + den.log()).squeeze(-1))

    parts = list(chunks(seg0, b * h * bm * bn * qp.element_size(), opts.chunk_bytes))
    # A score modifier's steps (distinct query tiles each) run on worker threads, serially inside (pool).
    threads = torch.get_num_threads() if modify is not None else 1
    pool.run([functools.partial(step, seg) for seg in parts], threads)


def _forward_fused_split(qp, kp, vp, op, lp, seg: Segment, sp: Split, bm: int, scale: float) -> None:
    b, h, _, d = qp.shape
    r0, r1 = int(seg.q_tiles[0]) * bm, (int(seg.q_tiles[0]) + len(seg)) * bm
    n = len(seg) * sp.parts
    qc = flat(qp[:, :, r0:r1].view(b, h, n, sp.rows, d))
    kc, vc = (flat(rows_view(x, sp.key0, n, sp.width, sp.step)) for x in (kp, vp))
    o, lse = FLASH(qc, kc, vc, 0.0, False, attn_mask=sp.bias, scale=scale)
    # The kernel's lse is laid out [batch, rows, heads]: reshape, not view.
    lse = lse.reshape(b, h, n, sp.rows)
    empty = sp.blocked.all(-1)
    if bool(empty.any()):
        lse = lse.masked_fill(empty, float("-inf"))
    op[:, :, r0:r1] = o.reshape(b, h, -1, d)
    lp[:, :, r0:r1] = lse.reshape(b, h, -1)
