"""Runtime stage, CPU executor: the backward pass through the same units and segments as the forward.

Comes in: the forward's ``q``, ``k``, ``v``, ``out``, ``lse``, the gradients of ``out`` (and of
``lse``), the :class:`BlockPlan` and the executor's
:class:`~patterndsl.runtime.cpu.tuning.CpuOptions`. Goes out: ``dq``, ``dk``, ``dv`` in the
inputs' dtypes (``dk``/``dv`` summed over the query heads that share a key/value head). The
backward of an affine segment is our own (:func:`_backward_affine`): batched matmuls over the
same strided views as the forward that accumulate dK/dV in place, one key-tile offset at a time,
with the rows' statistics ``lse`` and ``delta`` (:func:`patterndsl.runtime.softmax.delta`).
Gathered segments run the same matmuls on gathered copies of their tiles
(:func:`_backward_gathered`), dK/dV added with one ``index_add_`` per step; the gathered
``route`` work adds its gradients last. A call the native kernel takes whole (one unit, every head,
no grouped-query sharing, float32: :func:`_backward_native`) runs it on the call's tensors as they
are: no tiled copies, no ``delta`` pass, no pass to check that the gradients are finite.
"""

from __future__ import annotations

import torch

from patterndsl import ir
from patterndsl.analysis.plan import BlockPlan
from patterndsl.runtime import softmax
from patterndsl.runtime.cpu import augmented, dense, documents, native
from patterndsl.runtime.cpu.schedule import Segment, derived
from patterndsl.runtime.cpu.scoremod import Modifier, PairModifier, table_grads
from patterndsl.runtime.cpu.tuning import CpuOptions, resolve
from patterndsl.runtime.cpu.units import Heads, units
from patterndsl.runtime.cpu.views import (
    add_keys,
    chunks,
    cleaned,
    compute_dtype,
    finite,
    from_tiles,
    inverses,
    kv_view,
    matmul_seen,
    put,
    put_rows,
    q_view,
    scores_seen,
    take,
    to_tiles,
    window,
)

_LOG2E = 1.4426950408889634


def backward(q, k, v, out, lse, dout, plan: BlockPlan, scale: float, dlse=None, options=None, data=None):
    """Gradients of :func:`forward` through the same plan.

    Args:
        q, k, v, out, lse: the forward's inputs and outputs.
        dout: gradient of ``out``.
        plan: the forward's plan.
        scale: the forward's scale.
        dlse: gradient of ``lse`` (``[B, H, Lq]``) or None.
        options: :class:`~patterndsl.runtime.cpu.tuning.CpuOptions`; default: the current ones.
        data: the forward's run-time input tensors.

    Returns:
        ``(dq, dk, dv)`` in the dtypes and shapes of ``q``, ``k``, ``v`` (``dk``/``dv`` summed
        over the query heads that share a key/value head), and, when the pattern has float inputs
        and a score, a fourth item: their gradients in declaration order (compute dtype).
    """
    opts = resolve(options)
    if q.shape[0] == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    no_dlse = dlse is None or not bool(dlse.any())
    tables = table_grads(plan, data, compute_dtype(q.dtype))
    grads, known = None, None
    if documents.applies(plan, q, k, opts, data) and no_dlse:
        grads = documents.backward(q, k, v, out, lse, dout, plan, scale, data)
    elif dense.applies(plan, q, v, opts, data) and no_dlse and not native.takes_dense(plan, q, v, opts):
        grads = dense.backward(q, k, v, out, lse, dout, plan, scale)
    elif augmented.applies(plan, q, v, opts, tables) and no_dlse:
        grads = augmented.backward(q, k, v, out, lse, dout, plan, scale, data)
    if grads is None:
        grads, known = _backward_native(q, k, v, out, lse, dout, plan, scale, None if no_dlse else dlse, opts, data)
    if grads is None:
        grads = _backward(q, k, v, out, lse, dout, plan, scale, dlse, opts, safe=False, data=data, tables=tables)
    # Non-finite inputs or gradients must not reach the pairs the pattern blocks; the fast paths'
    # additive masks let them (0 * NaN), but whatever they reach turns non-finite, so finite
    # gradients are exact. Otherwise every segment runs again through _backward_select. (The
    # native kernel checks what it writes: ``known``.)
    if not (known if known is not None else finite(*grads, *(tables or {}).values())):
        tables = table_grads(plan, data, compute_dtype(q.dtype))
        grads = _backward(q, k, v, out, lse, dout, plan, scale, dlse, opts, safe=True, data=data, tables=tables)
    if tables is None:
        return grads
    return (*grads, list(tables.values()))


def _backward_native(q, k, v, out, lse, dout, plan: BlockPlan, scale: float, dlse, opts: CpuOptions, data):
    """The whole call as one native kernel call on the tensors as they are, or ``(None, None)``.

    For one unit over every batch element and head without grouped-query sharing and float32
    tensors: the kernel reads the rows of each tile through the plan's orders (no permuted or
    padded copies of Q, K, V, dO), computes ``delta`` and ``lse2`` from ``out``, ``lse`` and
    ``dlse`` itself (no pass of their own), writes dQ, dK, dV in the call's order (no copies back)
    and says whether they are finite (no pass over them to find out).

    Returns:
        ``((dq, dk, dv), finite)``, or ``(None, None)`` when the call does not qualify.
    """
    h, hkv = q.shape[1], k.shape[1]
    tensors = (q, k, v, out, dout, lse) + (() if dlse is None else (dlse,))
    if h != hkv or any(x.dtype != torch.float32 for x in tensors) or not native.supports(plan, q, v, opts):
        return None, None
    todo, work = units(plan, q, k, opts, data)
    if work is not None or len(todo) != 1 or todo[0][0] != slice(None) or todo[0][2]:
        return None, None
    sched = todo[0][1]
    if Heads.of(sched, h, 1).q is not None:
        return None, None
    q_rows, k_rows = derived(plan, ("native-rows",), _source_rows)
    t = {"q": q, "k": k, "v": v, "do": dout, "out": out, "lse": lse, "dlse": dlse, "q_rows": q_rows, "k_rows": k_rows}
    ok = native.backward(native.program(sched, plan.n_q_tiles, plan.block), t, scale)
    return (t["dq"], t["dk"], t["dv"]), ok


def _source_rows(plan: BlockPlan) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Source row of each padded plan position (int32, -1 for padding), queries and keys; None: the identity."""
    q_inv, k_inv = inverses(plan)
    out = []
    for inv, order, length, pad in (
        (q_inv, plan.q_order, plan.q_len, plan.n_q_tiles * plan.block[0]),
        (k_inv, plan.kv_order, plan.kv_len, plan.n_kv_tiles * plan.block[1]),
    ):
        if inv is None and length == pad:
            out.append(None)
            continue
        rows = torch.full((pad,), -1, dtype=torch.int32)
        rows[:length] = order if inv is not None else torch.arange(length)
        out.append(rows)
    return out[0], out[1]


def _backward(
    q, k, v, out, lse, dout, plan: BlockPlan, scale: float, dlse, opts: CpuOptions, safe: bool, data=None, tables=None
):
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    dt = compute_dtype(q.dtype)
    bm, bn = plan.block
    q_inv, k_inv = inverses(plan)
    # One head group without grouped-query sharing hands its buffers out directly.
    direct = len(plan.groups) == 1 and h == hkv and not ir.is_dynamic(plan.groups[0].node) and not data
    if not direct:
        dq = torch.zeros_like(q)
        dk_acc = torch.zeros(b, hkv, lk, d, dtype=dt)
        dv_acc = torch.zeros(b, hkv, lk, d, dtype=dt)
    q_id, k_id = q_inv is None, k_inv is None
    lq_pad, lk_pad = plan.n_q_tiles * bm, plan.n_kv_tiles * bn
    empty = lse == float("-inf")
    # Every segment needs delta = rowsum(dO * O) - dlse and lse with +inf on rows with no allowed
    # key (P is then exactly 0, never NaN).
    delta = softmax.delta(dout, out, dlse, dt)
    lse_inf = lse.to(dt).masked_fill(empty, float("inf"))
    extra = {"delta": delta, "lse": lse_inf, "lse2": lse_inf * _LOG2E}
    todo, work = units(plan, q, k, opts, data)
    use_native = not safe and native.supports(plan, q, v, opts)
    if work is not None:
        direct = False
        dq = torch.zeros(q.shape, dtype=dt)
    for bs, sched, merge in todo:
        hd = Heads.of(sched, h, h // hkv)
        nb = q[bs].shape[0]
        t = {
            "q": to_tiles(q[bs], hd.q, plan.q_order, q_id, lq_pad, dt),
            "do": to_tiles(dout[bs], hd.q, plan.q_order, q_id, lq_pad, dt),
            "k": to_tiles(k[bs], hd.kv, plan.kv_order, k_id, lk_pad, dt),
            "v": to_tiles(v[bs], hd.kv, plan.kv_order, k_id, lk_pad, dt),
        }
        if safe:
            # The scores also read the keys as given (views.scores_seen), the products the cleaned copies.
            t["k_raw"] = t["k"]
            for name in ("q", "do", "k", "v"):
                t[name], t["bad_" + name] = cleaned(t[name])
        for name, value in extra.items():
            t[name] = to_tiles(value[bs][..., None], hd.q, plan.q_order, q_id, lq_pad, dt)[..., 0]
        # dK/dV accumulate over query tiles; dQ rows are written once per covered tile.
        # (The native kernel makes its own, written whole.)
        if not use_native:
            t["dk"], t["dv"] = torch.zeros(t["k"].shape, dtype=dt), torch.zeros(t["v"].shape, dtype=dt)
            t["dq"] = torch.empty(t["q"].shape, dtype=dt)
            if sched.idle_q_tiles.numel():
                t["dq"].view(nb, hd.count, -1, bm, d)[:, :, sched.idle_q_tiles] = 0
        # A score modifier runs on every visited tile, through the selecting backward.
        score = plan.pattern.score
        modify = None if score is None else Modifier(plan, hd.q, hd.count, data, torch.arange(b)[bs], tables)
        if use_native:
            native.backward(native.program(sched, plan.n_q_tiles, plan.block), t, scale)
        for seg in () if use_native else sched.segments:
            if safe or modify is not None:
                _backward_select(t, seg, plan.block, scale, opts, modify)
            elif seg.affine is not None:
                _backward_affine(t, seg, plan.block, scale, opts)
            else:
                _backward_gathered(t, seg, plan.block, scale, opts)
        dq_g = from_tiles(t["dq"], lq, q_inv)
        dk_g, dv_g = from_tiles(t["dk"], lk, k_inv), from_tiles(t["dv"], lk, k_inv)
        if direct:
            return tuple(g.to(x.dtype).contiguous() for g, x in ((dq_g, q), (dk_g, k), (dv_g, v)))
        if merge:
            put(dq, bs, hd.q, take(dq, bs, hd.q) + dq_g)
        else:
            put(dq, bs, hd.q, dq_g)
        # Query heads sharing a key/value head add their contributions.
        if hd.kv is None:
            dk_acc[bs] += dk_g
            dv_acc[bs] += dv_g
            continue
        idx = torch.tensor(hd.kv, dtype=torch.int64)
        dk_acc[bs].index_add_(1, idx, dk_g)
        dv_acc[bs].index_add_(1, idx, dv_g)
    if work is not None:
        from patterndsl.runtime.cpu import gather

        grads = {"dq": dq, "dk": dk_acc, "dv": dv_acc}
        modify = None if plan.pattern.score is None else PairModifier(plan)
        gather.backward(q, k, v, lse, dout, delta, grads, work, scale, opts, safe=safe, modify=modify)
    return dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)


def _column_biases(seg: Segment, bn: int, dtype: torch.dtype) -> list[tuple[int, torch.Tensor]]:
    """``(w, bias [1 or n, BM, BN])`` (0 / -inf) for the key-tile offsets ``w`` of ``seg`` that need a mask.

    Adding a bias is several times faster than ``masked_fill_`` with a broadcast mask on CPU.
    """
    key = ("columns", dtype)
    if key not in seg._cache:
        out = []
        bias = seg.bias(dtype)
        if bias is not None:
            for w in range(seg.width):
                cols = slice(w * bn, (w + 1) * bn)
                if bool(seg.blocked[:, :, cols].any()):
                    out.append((w, bias[0, :, :, cols]))
        seg._cache[key] = out
    return seg._cache[key]


@torch.no_grad()
def _backward_affine(t: dict, seg: Segment, block, scale: float, opts: CpuOptions) -> None:
    """Backward of an affine segment, with dK/dV accumulated in place.

    Per head and step of ``opts.affine_bwd_tiles`` query tiles (fewer when one step's score
    buffer would exceed ``opts.affine_bwd_bytes``): ``P`` and ``dS`` over the
    whole key window are one batched matmul each (``[n, BM, width*BN]`` against an
    overlapping strided view of K/V, no copy), and ``dQ`` one more. For a fixed key-tile
    offset ``w`` the query tiles of a segment reach distinct key tiles, so ``dK``/``dV``
    take one ``baddbmm_`` per offset straight into their strided tiles: no per-tile key
    buffers to zero, hold and add back (what torch's fused CPU backward needs). With
    ``step == 0`` every query tile reaches the same key tiles, and their contributions
    are one ``addmm_`` over all rows. ``P`` is computed in base 2 (``exp2`` of scores
    scaled by ``log2 e``, the scale folded into the matmul; torch's ``exp2`` was 2.7x
    faster than its ``exp`` on CPU, in torch 2.13 they cost about the same). The step's
    two score buffers are allocated once, so no step faults in fresh pages. Needs
    ``t["lse2"]`` (+inf on rows with no allowed key) and ``t["delta"]`` (``rowsum(dO * O) -
    dlse``); handles any ``dlse``.
    """
    bm, bn = block
    nb, hc, _, d = t["q"].shape
    if len(seg) < nb * hc:
        # Short segments (split rows, edges): fewer steps when the heads are the batch.
        _backward_affine_by_tile(t, seg, block, scale)
        return
    lo0, step = seg.affine
    width, m0 = seg.width, int(seg.q_tiles[0])
    columns = _column_biases(seg, bn, t["q"].dtype)
    per_tile = bm * width * bn * t["q"].element_size()
    chunk = max(1, min(opts.affine_bwd_tiles, len(seg), opts.affine_bwd_bytes // per_tile))
    p_buf = t["q"].new_empty(chunk, bm, width * bn)
    ds_buf = torch.empty_like(p_buf)
    for b in range(nb):
        for h in range(hc):
            q, do, k, v = (t[name][b, h] for name in ("q", "do", "k", "v"))
            dq, dk, dv = (t[name][b, h] for name in ("dq", "dk", "dv"))
            lse2, delta = t["lse2"][b, h], t["delta"][b, h]
            for a in range(0, len(seg), chunk):
                n = min(chunk, len(seg) - a)
                rows = slice((m0 + a) * bm, (m0 + a + n) * bm)
                qc, doc = q[rows].view(n, bm, d), do[rows].view(n, bm, d)
                tile = lo0 + step * a
                kw, vw = window(k, tile, n, step, width, bn), window(v, tile, n, step, width, bn)
                biases = [(w, bias if bias.shape[0] == 1 else bias[a : a + n]) for w, bias in columns]
                p, ds = _probs_and_ds(
                    qc, doc, kw, vw, lse2[rows].view(n, bm, 1), delta[rows].view(n, bm, 1), biases, bn, scale,
                    p_buf[:n], ds_buf[:n],
                )  # fmt: skip
                if seg.merge:
                    dq[rows].view(n, bm, d).baddbmm_(ds, kw, alpha=scale)
                else:
                    torch.bmm(ds, kw, out=dq[rows].view(n, bm, d))
                    dq[rows].mul_(scale)
                if step == 0 or n == 1:
                    span = slice(tile * bn, (tile + width) * bn)
                    dv[span].addmm_(p.view(-1, width * bn).t(), doc.reshape(-1, d))
                    dk[span].addmm_(ds.view(-1, width * bn).t(), qc.reshape(-1, d), alpha=scale)
                    continue
                for w in range(width):
                    cols = slice(w * bn, (w + 1) * bn)
                    window(dv, tile + w, n, step, 1, bn).baddbmm_(p[:, :, cols].transpose(1, 2), doc)
                    window(dk, tile + w, n, step, 1, bn).baddbmm_(ds[:, :, cols].transpose(1, 2), qc, alpha=scale)


def _probs_and_ds(qc, doc, kw, vw, lse2, delta, biases, bn: int, scale: float, p_out, ds_out):
    """One backward step's ``P`` and ``dS`` (``[batch, rows, width*BN]``), written into ``p_out`` and ``ds_out``.

    ``P = exp2(scale * log2(e) * Q K^T - lse2)`` with the additive ``biases`` ``(w, 0/-inf)`` on
    the key-tile columns ``w`` that need a mask, and ``dS = P * (dO V^T - delta)``. The row
    statistics enter as the matmuls' added term (``baddbmm``): one pass over each buffer fewer
    than a scale and a subtraction after the product.
    """
    p = torch.baddbmm(lse2.neg(), qc, kw.transpose(1, 2), alpha=scale * _LOG2E, out=p_out)
    for w, bias in biases:
        p[:, :, w * bn : (w + 1) * bn].add_(bias)
    p.exp2_()
    ds = torch.baddbmm(delta.neg(), doc, vw.transpose(1, 2), out=ds_out)
    ds.mul_(p)
    return p, ds


def _backward_affine_by_tile(t: dict, seg: Segment, block, scale: float) -> None:
    """:func:`_backward_affine` with the (batch, head) pairs as the matmul batch, one query tile per step.

    ``x[:, :, rows]`` of a ``[B, h, L, D]`` buffer is a ``[B*h, rows, D]`` view, so every step is
    the same handful of batched matmuls whatever the number of heads.
    """
    bm, bn = block
    nb, hc, _, d = t["q"].shape
    bh = nb * hc
    lo0, step = seg.affine
    width, m0 = seg.width, int(seg.q_tiles[0])
    columns = _column_biases(seg, bn, t["q"].dtype)
    q, do, k, v, dq, dk, dv = (t[name] for name in ("q", "do", "k", "v", "dq", "dk", "dv"))
    p_buf = q.new_empty(bh, bm, width * bn)
    ds_buf = torch.empty_like(p_buf)
    for i in range(len(seg)):
        rows = slice((m0 + i) * bm, (m0 + i + 1) * bm)
        keys = slice((lo0 + step * i) * bn, (lo0 + step * i + width) * bn)
        qc, doc = q[:, :, rows].view(bh, bm, d), do[:, :, rows].view(bh, bm, d)
        kw, vw = k[:, :, keys].view(bh, width * bn, d), v[:, :, keys].view(bh, width * bn, d)
        biases = [(w, bias[0] if bias.shape[0] == 1 else bias[i]) for w, bias in columns]
        lse2, delta = t["lse2"][:, :, rows].reshape(bh, bm, 1), t["delta"][:, :, rows].reshape(bh, bm, 1)
        p, ds = _probs_and_ds(qc, doc, kw, vw, lse2, delta, biases, bn, scale, p_buf, ds_buf)
        # beta = 0 ignores what the rows held (they are not initialised for writing segments).
        dq[:, :, rows].view(bh, bm, d).baddbmm_(ds, kw, beta=1 if seg.merge else 0, alpha=scale)
        dv[:, :, keys].view(bh, width * bn, d).baddbmm_(p.transpose(1, 2), doc)
        dk[:, :, keys].view(bh, width * bn, d).baddbmm_(ds.transpose(1, 2), qc, alpha=scale)


@torch.no_grad()
def _backward_gathered(t: dict, seg0: Segment, block, scale: float, opts: CpuOptions) -> None:
    """Backward of a gathered segment: batched matmuls over every (batch, head, query tile) at once.

    Per step of query tiles (its score buffers and gathered keys under the fused budget,
    :meth:`~patterndsl.runtime.cpu.tuning.CpuOptions.fused_budget`: few large steps win with
    several threads on a shared machine), the tiles' rows and key windows are gathered once (copies, as in
    the forward), ``P`` comes from ``exp2`` with the segment's additive mask and ``dS``, ``dQ``,
    ``dK``, ``dV`` are one ``bmm`` each; the per-tile key gradients go into dK/dV with one
    ``index_add_`` over every (tile, offset) (a key tile may repeat across a gathered segment's
    query tiles, so the affine path's strided adds do not apply). Against torch's fused backward
    this allocates no zeroed per-tile dK/dV buffers, reads no ``out`` (``delta`` is computed once
    per call) and handles a gradient on the log-sum-exp. Needs ``t["lse2"]`` and ``t["delta"]``.
    """
    bm, bn = block
    b, h, _, d = t["q"].shape
    dt = t["q"].dtype
    # P and dS, and the gathered keys and values, per key tile of a query tile.
    per_tile = b * h * bn * (2 * bm + 2 * d) * t["q"].element_size()
    for seg in chunks(seg0, per_tile, opts.fused_budget() if opts.fused else opts.chunk_bytes):
        rows = b * h * len(seg)
        qc, doc = (q_view(t[name], seg, bm).reshape(rows, bm, d) for name in ("q", "do"))
        kc, vc = (kv_view(t[name], seg, bn).reshape(rows, -1, d) for name in ("k", "v"))
        lse2, delta = (q_view(t[name][..., None], seg, bm).reshape(rows, bm, 1) for name in ("lse2", "delta"))
        p = torch.bmm(qc, kc.transpose(1, 2)).mul_(scale * _LOG2E).sub_(lse2)
        bias = seg.bias(dt)
        if bias is not None:
            p.view(b * h, len(seg), bm, -1).add_(bias[0])
        p.exp2_()
        ds = torch.bmm(doc, vc.transpose(1, 2)).sub_(delta).mul_(p)
        dq = torch.bmm(ds, kc).mul_(scale).view(b, h, len(seg), bm, d)
        if seg.merge:
            dq += q_view(t["dq"], seg, bm)
        put_rows(t["dq"], seg, bm, dq)
        add_keys(t["dv"], seg, bn, torch.bmm(p.transpose(1, 2), doc))
        add_keys(t["dk"], seg, bn, torch.bmm(ds.transpose(1, 2), qc).mul_(scale))


def _backward_select(t: dict, seg0: Segment, block, scale: float, opts: CpuOptions, modify=None) -> None:
    """The backward of any segment when some input or gradient is not finite: blocked pairs are selected out.

    ``P`` and ``dS`` are set to exactly 0 on blocked pairs after they are computed (a row whose
    ``lse`` or ``delta`` is NaN would otherwise give NaN there), and every product reads the cleaned
    operands ``t[name]`` (non-finite values replaced by 0) with ``t["bad_" + name]`` marking where
    they were (:func:`~patterndsl.runtime.cpu.views.matmul_seen`): a NaN reaches exactly the
    gradients of the pairs that read it. Handles affine, gathered and ``merge`` segments alike.
    With a score modifier ``modify`` (:class:`~patterndsl.runtime.cpu.scoremod.Modifier`), ``P`` is
    the softmax of the modified logits and ``dS`` is multiplied by ``d score / d s`` (unless the
    score is additive in ``s``) before the selection.
    """
    bm, bn = block
    b, h = t["q"].shape[:2]
    for seg in chunks(seg0, b * h * bm * bn * t["q"].element_size(), opts.chunk_bytes):
        qc, doc = q_view(t["q"], seg, bm), q_view(t["do"], seg, bm)
        kc, vc = kv_view(t["k"], seg, bn), kv_view(t["v"], seg, bn)
        bad = {name: None if t.get("bad_" + name) is None else view(t["bad_" + name], seg, size)
               for name, view, size in (("q", q_view, bm), ("do", q_view, bm), ("k", kv_view, bn))}  # fmt: skip
        # A key whose infinite component gives a -inf score has P = 0 there, as in the forward.
        raw = scores_seen(qc * scale, kc, kv_view(t.get("k_raw", t["k"]), seg, bn), bad["k"])
        if modify is not None:
            p = modify(raw, seg)
        else:
            p, raw = raw, None
        if seg.blocked is not None:
            p.masked_fill_(seg.blocked, float("-inf"))
        p.sub_(q_view(t["lse"][..., None], seg, bm)).exp_()
        ds = torch.matmul(doc, vc.transpose(-1, -2)).sub_(q_view(t["delta"][..., None], seg, bm)).mul_(p)
        if modify is not None:
            # ds is dL / d score here: float tables the score reads take their share first.
            modify.accumulate(ds, raw, seg)
        slope = None if modify is None else modify.derivative(raw, seg)
        if slope is not None:
            ds.mul_(slope)
        if seg.blocked is not None:
            p.masked_fill_(seg.blocked, 0.0)
            ds.masked_fill_(seg.blocked, 0.0)
        add_keys(t["dv"], seg, bn, matmul_seen(p.transpose(-1, -2), doc, bad["do"]))
        add_keys(t["dk"], seg, bn, matmul_seen(ds.transpose(-1, -2), qc, bad["q"]).mul_(scale))
        dq = matmul_seen(ds, kc, bad["k"]).mul_(scale)
        if seg.merge:
            dq += q_view(t["dq"], seg, bm)
        put_rows(t["dq"], seg, bm, dq)
