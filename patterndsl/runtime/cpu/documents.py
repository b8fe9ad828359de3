"""Runtime stage, CPU executor: ``within(SEG, causal)`` and ``within(SEG, full)`` run document by document.

Comes in: ``q``, ``k``, ``v``, the static :class:`BlockPlan` of a pattern whose one head group is
``within(SEG, causal)`` or ``within(SEG, full)``, and the run-time input tensors. Goes out: the
attention output and log-sum-exp (forward), or ``dq``, ``dk``, ``dv`` (backward), with every
segment (run of equal ``SEG`` values) computed as its own dense or causal problem by torch's fused
CPU flash-attention kernel on views of its rows: no tile is shared between documents and no mask
is built, so a document costs what it would cost alone. The segments are read once per input
tensor version (kept with the call-time plan, :mod:`patterndsl.runtime.inputs`).

Grouped-query heads repeat a segment's keys and values for the query heads that share them (and
sum their gradients back). Anything else (several head groups, other bodies, ``Lq != Lk``, a
gradient on the log-sum-exp, the math kernel) runs through the tile schedule.
"""

from __future__ import annotations

import torch

from patterndsl import ir
from patterndsl.analysis.plan import BlockPlan
from patterndsl.runtime.cpu.tuning import FLASH, FLASH_BWD, CpuOptions
from patterndsl.runtime.cpu.views import compute_dtype

#: Bodies of ``within`` that run as one fused call per segment, and whether that call is causal.
BODIES = {"causal": True, "full": False}


def body_of(plan: BlockPlan) -> bool | None:
    """``is_causal`` of the segments' problem when ``plan`` runs document by document, else None."""
    if len(plan.groups) != 1 or plan.q_len != plan.kv_len or plan.pattern is None:
        return None
    if plan.pattern.score is not None:
        return None  # torch's fused kernel cannot apply a score modifier
    node = plan.groups[0].node
    if not (isinstance(node, ir.Prim) and node.name == "within"):
        return None
    body = node.arg("body")
    if not (isinstance(body, ir.Prim) and body.name in BODIES and not body.args):
        return None
    return BODIES[body.name]


def documents(plan: BlockPlan, data: list, batch: int) -> list[list[tuple[int, int]]]:
    """Per batch element: ``(start, length)`` of every segment, cached with the call-time plan."""
    from patterndsl.runtime import inputs
    from patterndsl.runtime.plans import per_plan

    cp = inputs.call_plan(plan, data, batch)
    name = plan.groups[0].node.arg("seg")

    def build():
        out = []
        for b in range(1 if cp.states.stride(0) == 0 or cp.batch == 1 else cp.batch):
            seg = cp.inputs.element(b)[name].reshape(-1).cpu()
            cut = torch.ones(seg.numel(), dtype=torch.bool)
            cut[1:] = seg[1:] != seg[:-1]
            start = torch.nonzero(cut).reshape(-1).tolist()
            ends = [*start[1:], seg.numel()]
            out.append([(a, e - a) for a, e in zip(start, ends, strict=True)])
        return out

    return per_plan(cp, ("cpu-documents",), build)


def applies(plan: BlockPlan, q: torch.Tensor, k: torch.Tensor, opts: CpuOptions, data) -> bool:
    """Whether this call runs document by document."""
    return bool(data) and opts.fused and FLASH is not None and q.shape[0] > 0 and body_of(plan) is not None


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
    causal = body_of(plan)
    dt = compute_dtype(q.dtype)
    qc, kc, vc = (x.to(dt) for x in (q, k, v))
    b, h, lq, d = q.shape
    group = h // k.shape[1]
    out = torch.empty(b, h, lq, d, dtype=dt)
    lse = torch.empty(b, h, lq, dtype=dt)
    for bs, segs in _elements(documents(plan, data, b), b):
        for a, n in segs:
            rows = slice(a, a + n)
            ks, vs = _heads(kc[bs, :, rows], group), _heads(vc[bs, :, rows], group)
            o, l_ = FLASH(qc[bs, :, rows], ks, vs, 0.0, causal, scale=scale)[:2]
            out[bs, :, rows] = o
            lse[bs, :, rows] = l_
    return out.to(q.dtype), lse


def backward(q, k, v, out, lse, dout, plan: BlockPlan, scale: float, data):
    """``(dq, dk, dv)`` as :func:`patterndsl.runtime.cpu.backward.backward` returns them (no gradient on lse)."""
    causal = body_of(plan)
    dt = compute_dtype(q.dtype)
    qc, kc, vc, oc, gc = (x.to(dt) for x in (q, k, v, out, dout))
    lc = lse.to(dt)
    b, hkv = q.shape[0], k.shape[1]
    group = q.shape[1] // hkv
    dq, dk, dv = (torch.empty(x.shape, dtype=dt) for x in (q, k, v))
    for bs, segs in _elements(documents(plan, data, b), b):
        for a, n in segs:
            r = slice(a, a + n)
            ks, vs = _heads(kc[bs, :, r], group), _heads(vc[bs, :, r], group)
            gq, gk, gv = FLASH_BWD(
                gc[bs, :, r], qc[bs, :, r], ks, vs, oc[bs, :, r], lc[bs, :, r], 0.0, causal, scale=scale
            )
            dq[bs, :, r] = gq
            if group > 1:
                gk, gv = (g.unflatten(1, (hkv, group)).sum(2) for g in (gk, gv))
            dk[bs, :, r], dv[bs, :, r] = gk, gv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
