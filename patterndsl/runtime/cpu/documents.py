"""Runtime stage, CPU executor: ``within(SEG, P)`` runs document by document.

Comes in: ``q``, ``k``, ``v``, the static :class:`BlockPlan` of a pattern whose one head group is
``within(SEG, P)`` (``P`` reading no input), and the run-time input tensors. Goes out: the
attention output and log-sum-exp (forward), or ``dq``, ``dk``, ``dv`` (backward), with every
segment (run of equal ``SEG`` values) computed as its own problem on views of its rows: no tile is
shared between documents, so a document that fits in one tile row or column costs its own
``n x n`` pairs, never a full masked tile.

Per document, ``P`` on its ``n x n`` square is classified exactly
(:mod:`patterndsl.analysis.segments`, every document at once): where it equals ``causal`` or
``full`` (``within(doc, causal & (window(w) | sink(4)))`` on every document of at most ``w + 1``
tokens) the document is one call of torch's fused CPU flash-attention kernel; any other runs the
tile executor on ``P``'s own static plan at the document's length (cached per length), when there
are at most :data:`MAX_OWN` such documents (else the whole call runs its tile schedule). The kinds
are read once per input tensor version (kept with the call-time plan,
:mod:`patterndsl.runtime.inputs`).

Grouped-query heads repeat a segment's keys and values for the query heads that share them (and
sum their gradients back). Anything else (several head groups, ``Lq != Lk``, a gradient on the
log-sum-exp, the math kernel) runs through the tile schedule of the whole call.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from patterndsl import ir
from patterndsl.analysis import segments as seg_plan
from patterndsl.analysis.plan import EMPTY, FULL, BlockPlan
from patterndsl.runtime.cpu.tuning import FLASH, FLASH_BWD, CpuOptions
from patterndsl.runtime.cpu.views import compute_dtype

#: Bodies of ``within`` that run as one fused call per segment, and whether that call is causal.
BODIES = {"causal": True, "full": False}
#: A document's kinds: one fused call (causal or not), or ``P``'s own plan at its length.
CAUSAL, DENSE, OWN = 1, 0, 2
#: Most documents run on their own plans in one call: each is a tile-executor call of its own, so
#: beyond a few (``w`` smaller than most documents) the whole call's tile schedule is cheaper.
MAX_OWN = 8
#: Static plans of bodies at document lengths kept.
MAX_DOC_PLANS = 256

_LOCK = threading.Lock()
_DOC_PLANS: OrderedDict = OrderedDict()


def body_of(plan: BlockPlan) -> ir.Node | None:
    """``P`` when ``plan`` runs document by document, else None (a score keeps the tile schedule)."""
    if len(plan.groups) != 1 or plan.q_len != plan.kv_len or plan.pattern is None or plan.pattern.score is not None:
        return None
    node = plan.groups[0].node
    if not (isinstance(node, ir.Prim) and node.name == "within"):
        return None
    body = node.arg("body")
    return None if ir.reads_inputs(body) else body


def _kinds(body: ir.Node, length: torch.Tensor, block) -> torch.Tensor:
    """Per document of ``length``: :data:`CAUSAL`, :data:`DENSE` or :data:`OWN` (``P`` on its square)."""
    if isinstance(body, ir.Prim) and body.name in BODIES and not body.args:
        return torch.full_like(length, CAUSAL if BODIES[body.name] else DENSE)
    cuts = seg_plan.cuts_of(body)
    if cuts is None or cuts.blocks or not len(length):  # block edges: as many cuts as blocks in a document
        return torch.full_like(length, OWN)
    causal = ir.Prim("causal", ())
    square = (torch.zeros_like(length), length - 1, torch.zeros_like(length), length - 1, length)
    width = (int(length.max()),) * 2
    is_full = seg_plan.classify(body, square, width) == FULL
    extra = seg_plan.classify(ir.inter(body, ir.complement(causal)), square, width)
    missing = seg_plan.classify(ir.inter(causal, ir.complement(body)), square, width)
    is_causal = (extra == EMPTY) & (missing == EMPTY)
    return torch.where(is_full, DENSE, torch.where(is_causal, CAUSAL, OWN))


def documents(plan: BlockPlan, data: list, batch: int) -> list[list[tuple[int, int, int]]]:
    """Per batch element: ``(start, length, kind)`` of every segment, cached with the call-time plan."""
    from patterndsl.runtime import inputs
    from patterndsl.runtime.plans import per_plan

    cp = inputs.call_plan(plan, data, batch)
    name = plan.groups[0].node.arg("seg")
    body = body_of(plan)

    def build():
        out = []
        for b in range(1 if cp.states.stride(0) == 0 or cp.batch == 1 else cp.batch):
            seg = cp.inputs.element(b)[name].reshape(-1).cpu()
            cut = torch.ones(seg.numel(), dtype=torch.bool)
            cut[1:] = seg[1:] != seg[:-1]
            start = torch.nonzero(cut).reshape(-1)
            length = torch.diff(start, append=torch.tensor([seg.numel()]))
            kind = _kinds(body, length, plan.block)
            out.append(list(zip(start.tolist(), length.tolist(), kind.tolist(), strict=True)))
        return out

    return per_plan(cp, ("cpu-documents",), build)


def _doc_plan(plan: BlockPlan, body: ir.Node, n: int) -> BlockPlan:
    """``body``'s static plan at length ``n`` (the document's own coordinates), cached."""
    from patterndsl.analysis import planner

    key = (body, n, plan.heads, plan.block)
    with _LOCK:
        got = _DOC_PLANS.get(key)
        if got is not None:
            _DOC_PLANS.move_to_end(key)
            return got
    pir = plan.pattern
    got = planner.plan(ir.PatternIR(pir.name, pir.params, None, (), body, pir.span), n, n, plan.heads, plan.block)
    with _LOCK:
        _DOC_PLANS[key] = got
        while len(_DOC_PLANS) > MAX_DOC_PLANS:
            _DOC_PLANS.popitem(last=False)
    return got


def applies(plan: BlockPlan, q: torch.Tensor, k: torch.Tensor, opts: CpuOptions, data) -> bool:
    """Whether this call runs document by document."""
    if not (bool(data) and opts.fused and FLASH is not None and q.shape[0] > 0):
        return False
    if body_of(plan) is None or getattr(plan.pattern, "score", None) is not None:
        return False
    own = sum(kind == OWN for segs in documents(plan, data, q.shape[0]) for _, _, kind in segs)
    return own <= MAX_OWN


def _elements(docs: list, batch: int):
    """``(batch slice, segments)`` pairs: one for the whole batch when the segments are shared."""
    if len(docs) == 1:
        return [(slice(None), docs[0])]
    return [(slice(b, b + 1), docs[b]) for b in range(batch)]


def _heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """Key/value rows ``[B, Hkv, n, D]`` repeated for the ``group`` query heads that read each."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def forward(q, k, v, plan: BlockPlan, scale: float, data) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` as :func:`patterndsl.runtime.cpu.forward.forward` returns them (call :func:`applies` first)."""
    from patterndsl.runtime.cpu.forward import forward as tile_forward

    body = body_of(plan)
    dt = compute_dtype(q.dtype)
    qc, kc, vc = (x.to(dt) for x in (q, k, v))
    b, h, lq, d = q.shape
    group = h // k.shape[1]
    out = torch.empty(b, h, lq, d, dtype=dt)
    lse = torch.empty(b, h, lq, dtype=dt)
    for bs, segs in _elements(documents(plan, data, b), b):
        for a, n, kind in segs:
            rows = slice(a, a + n)
            if kind == OWN:
                o, l_ = tile_forward(qc[bs, :, rows], kc[bs, :, rows], vc[bs, :, rows], _doc_plan(plan, body, n), scale)
            else:
                ks, vs = _heads(kc[bs, :, rows], group), _heads(vc[bs, :, rows], group)
                o, l_ = FLASH(qc[bs, :, rows], ks, vs, 0.0, kind == CAUSAL, scale=scale)[:2]
            out[bs, :, rows] = o
            lse[bs, :, rows] = l_
    return out.to(q.dtype), lse


def backward(q, k, v, out, lse, dout, plan: BlockPlan, scale: float, data):
    """``(dq, dk, dv)`` as :func:`patterndsl.runtime.cpu.backward.backward` returns them (no gradient on lse)."""
    from patterndsl.runtime.cpu.backward import backward as tile_backward

    body = body_of(plan)
    dt = compute_dtype(q.dtype)
    qc, kc, vc, oc, gc = (x.to(dt) for x in (q, k, v, out, dout))
    lc = lse.to(dt)
    b, hkv = q.shape[0], k.shape[1]
    group = q.shape[1] // hkv
    dq, dk, dv = (torch.empty(x.shape, dtype=dt) for x in (q, k, v))
    for bs, segs in _elements(documents(plan, data, b), b):
        for a, n, kind in segs:
            r = slice(a, a + n)
            if kind == OWN:
                own = _doc_plan(plan, body, n)
                dq[bs, :, r], dk[bs, :, r], dv[bs, :, r] = tile_backward(
                    qc[bs, :, r], kc[bs, :, r], vc[bs, :, r], oc[bs, :, r], lc[bs, :, r], gc[bs, :, r], own, scale
                )
                continue
            ks, vs = _heads(kc[bs, :, r], group), _heads(vc[bs, :, r], group)
            gq, gk, gv = FLASH_BWD(
                gc[bs, :, r], qc[bs, :, r], ks, vs, oc[bs, :, r], lc[bs, :, r], 0.0, kind == CAUSAL, scale=scale
            )
            dq[bs, :, r] = gq
            if group > 1:
                gk, gv = (g.unflatten(1, (hkv, group)).sum(2) for g in (gk, gv))
            dk[bs, :, r], dv[bs, :, r] = gk, gv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
