"""Runtime stage, CPU executor: plain ``causal`` and ``full`` run as torch's fused flash-attention kernel.

Comes in: ``q``, ``k``, ``v`` and the static :class:`BlockPlan` of a pattern whose one head group
is exactly ``causal`` or ``full`` (no score modifier, no run-time inputs, the tokens in their own
order). Goes out: the attention output and log-sum-exp (forward), or ``dq``, ``dk``, ``dv``
(backward), computed by torch's fused CPU flash-attention kernels on the tensors themselves: no
tile lists, no copies, no masks. That kernel is what ``scaled_dot_product_attention(...,
is_causal=True)`` runs, so a user who writes ``causal`` is never better off calling SDPA
(benchmarks/cpu_attention.py measures both); the tile schedule gave 1.4x its time on causal at 4K.

``causal`` is end-aligned (query ``i`` sits at position ``i + Lk - Lq``) and the kernel's
``is_causal`` is top-left aligned, so with ``Lq != Lk`` the call is cut: rows before the first key
are empty (``lse = -inf``, zero output), keys before the first query's position are a dense part,
the rest a square causal part, and the two parts merge by log-sum-exp. The backward of each part
is the kernel's backward with the *final* ``out`` and ``lse`` (the rows' statistics), which is
exact for a part of a softmax, so the parts' gradients add. Grouped-query heads pass through (the
kernel reads ``Hkv < H`` itself and sums ``dK``/``dV`` over the sharing heads); a few rows that see
every key (a decoding step) run with the rows of the heads sharing a key/value head stacked as that
head's rows. :func:`direct` serves eager calls of plain patterns without a plan. A gradient on the
log-sum-exp, the math kernel and every other pattern run through the tile schedule.
"""

from __future__ import annotations

import math

import torch

from patterndsl import ir
from patterndsl.analysis.plan import BlockPlan
from patterndsl.runtime import softmax
from patterndsl.runtime.cpu.tuning import FLASH, FLASH_BWD, CpuOptions, current
from patterndsl.runtime.cpu.views import compute_dtype, inverses

#: Patterns that run as one fused call, and whether that call is causal.
KINDS = {"causal": True, "full": False}
#: Rows (query heads sharing a key/value head x queries) up to which a dense call stacks them as one
#: head's rows: a decoding step of a grouped-query model then runs in two thirds of the per-head call.
STACKED_ROWS = 64


def plain(pattern: ir.PatternIR) -> bool | None:
    """``is_causal`` when ``pattern`` is exactly ``causal`` or ``full`` for every head (no score, no
    inputs, no layout), else None: what the fused kernel runs, from the pattern alone."""
    if pattern.score is not None or pattern.inputs or pattern.heads or pattern.layout is not None:
        return None
    node = pattern.default
    if not (isinstance(node, ir.Prim) and node.name in KINDS and not node.args):
        return None
    return KINDS[node.name]


def kind_of(plan: BlockPlan) -> bool | None:
    """``is_causal`` when ``plan`` runs as the fused kernel on the whole tensors, else None."""
    if len(plan.groups) != 1 or plan.pattern is None or plan.pattern.score is not None:
        return None
    if getattr(plan.pattern, "inputs", ()) or plan.kv_len == 0:
        return None
    node = plan.groups[0].node
    if not (isinstance(node, ir.Prim) and node.name in KINDS and not node.args):
        return None
    if inverses(plan) != (None, None):
        return None
    return KINDS[node.name]


def applies(plan: BlockPlan, q: torch.Tensor, v: torch.Tensor, opts: CpuOptions, data) -> bool:
    """Whether this call runs as the fused kernel (call before the tile schedule); the kernel wants
    one head size for queries, keys and values."""
    if data or not (opts.fused and opts.dense) or q.shape[0] == 0 or q.shape[-1] != v.shape[-1]:
        return False
    return kind_of(plan) is not None


def _parts(lq: int, lk: int, causal: bool) -> tuple[int, list[tuple[int, bool]]]:
    """``(first row with a key, [(key start, is_causal), ...])``: the calls that make up the pattern.

    A dense pattern is one part; a causal one is its dense prefix of keys (when ``Lk > Lq``) and
    the square causal part on the last ``min(Lq, Lk)`` keys.
    """
    if not causal:
        return 0, [(0, False)]
    side = min(lq, lk)
    if side == 1:  # one row sees every key (a decoding step): one dense call
        return lq - 1, [(0, False)]
    parts = [(lk - side, True)]
    if lk > side:
        parts.insert(0, (0, False))
    return lq - side, parts


def _operand(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` with a unit stride on the head dim (the kernel reads rows as contiguous
    vectors whatever the strides say; any other layout is accepted as it is)."""
    x = x if x.dtype == dtype else x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


def forward(q, k, v, plan: BlockPlan, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` as :func:`patterndsl.runtime.cpu.forward.forward` returns them (call :func:`applies` first)."""
    return _forward(q, k, v, bool(kind_of(plan)), scale)


def direct(q, k, v, pattern: ir.PatternIR, scale: float) -> torch.Tensor | None:
    """The output of an eager call of a :func:`plain` pattern, without a plan (the kernel calls follow from
    the sizes, and a decoding step, whose ``Lk`` grows every step, would plan anew at each), in the
    kernel's own layout (``[B, Lq, H, D]`` memory); None when the fused kernel does not serve the call
    or its result is not finite (the caller then runs the executor, which selects: see
    :func:`patterndsl.runtime.cpu.forward.forward`)."""
    causal = plain(pattern)
    opts = current()
    if causal is None or FLASH is None or not (opts.fused and opts.dense):
        return None
    if q.shape[0] == 0 or k.shape[2] == 0 or q.shape[-1] != v.shape[-1]:
        return None
    out, _ = _forward(q, k, v, causal, scale)
    # Only ``out`` is handed back, and a non-finite value the kernel read (even at a blocked pair, where
    # NaN + -inf is NaN) reaches it through ``P @ V`` or the row's sum: a finite ``out`` is exact.
    return out if math.isfinite(out.sum().item()) else None


def _forward(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    dt = compute_dtype(q.dtype)
    qc, kc, vc = (_operand(x, dt) for x in (q, k, v))
    b, h, lq, d = q.shape
    lk = k.shape[2]
    row0, parts = _parts(lq, lk, causal)
    if row0 == 0 and len(parts) == 1:
        start, causal = parts[0]
        share = h // k.shape[1]
        if not causal and share > 1 and share * lq <= STACKED_ROWS:
            # A few rows (a decoding step) that see every key: the rows of the query heads reading one
            # key/value head are one problem of that head (the kernel reads each key once, not per head).
            stacked = qc.reshape(b, k.shape[1], share * lq, d)
            out, lse = FLASH(stacked, kc[:, :, start:], vc[:, :, start:], 0.0, False, scale=scale)[:2]
            out, lse = out.reshape(b, h, lq, d), lse.reshape(b, h, lq)
        else:
            out, lse = FLASH(qc, kc[:, :, start:], vc[:, :, start:], 0.0, causal, scale=scale)[:2]
        return (out if out.dtype == q.dtype else out.to(q.dtype)), lse
    out = torch.zeros(b, h, lq, d, dtype=dt)
    lse = torch.full((b, h, lq), float("-inf"), dtype=dt)
    rows = slice(row0, lq)
    for i, (start, causal) in enumerate(parts):
        # The dense prefix stops where the causal part's keys start.
        stop = parts[i + 1][0] if i + 1 < len(parts) else lk
        keys = slice(start, stop)
        o, lp = FLASH(qc[:, :, rows], kc[:, :, keys], vc[:, :, keys], 0.0, causal, scale=scale)[:2]
        # In place on views of the buffers (zeros / -inf before the first part).
        softmax.merge_into(out[:, :, rows], lse[:, :, rows], o, lp)
    return out.to(q.dtype), lse


def backward(q, k, v, out, lse, dout, plan: BlockPlan, scale: float):
    """``(dq, dk, dv)`` as :func:`patterndsl.runtime.cpu.backward.backward` returns them (no gradient on lse)."""
    dt = compute_dtype(q.dtype)
    qc, kc, vc, oc, gc = (_operand(x, dt) for x in (q, k, v, out, dout))
    lc = lse.to(dt)
    lq = q.shape[2]
    row0, parts = _parts(lq, plan.kv_len, bool(kind_of(plan)))
    if row0 == 0 and len(parts) == 1:
        start, causal = parts[0]
        dq, dk, dv = FLASH_BWD(gc, qc, kc, vc, oc, lc, 0.0, causal, scale=scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    dq = torch.zeros(q.shape, dtype=dt)
    dk, dv = torch.zeros(k.shape, dtype=dt), torch.zeros(v.shape, dtype=dt)
    rows = slice(row0, lq)
    for i, (start, causal) in enumerate(parts):
        stop = parts[i + 1][0] if i + 1 < len(parts) else plan.kv_len
        keys = slice(start, stop)
        r = (gc[:, :, rows], qc[:, :, rows], kc[:, :, keys], vc[:, :, keys], oc[:, :, rows], lc[:, :, rows])
        gq, gk, gv = FLASH_BWD(*r, 0.0, causal, scale=scale)
        dq[:, :, rows] += gq
        dk[:, :, keys] += gk
        dv[:, :, keys] += gv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
