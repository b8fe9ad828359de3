"""Runtime stage: non-finite inputs on the Triton backend, handled in the launcher (issue 11, cause 7).

Comes in: the inputs of a Triton forward or backward call and its block plan. Goes out: whether
anything is not finite (one reduction per tensor and one host sync when all is finite: the
kernels then run unchanged), and otherwise the rows the kernels must not compute
(:class:`Rows`), the inputs cleaned for them and the exact values of those rows afterwards.

The kernels add nothing for a blocked pair in a partial tile (they select), but the products
``P @ V``, ``dS @ K``, ``P^T dO`` and ``dS^T Q`` still read every key of a tile, and ``0 * NaN``
is NaN. So the kernels run on copies where non-finite values are 0, and the rows that must see
a non-finite value are computed here, exactly as the CPU executor's selecting path computes
them (:mod:`patterndsl.runtime.cpu.forward`, ``_backward_select``): scores of blocked pairs
selected to ``-inf``, ``P`` and ``dS`` selected to 0, and products that read a non-finite value
through a non-zero weight are NaN (:func:`~patterndsl.runtime.cpu.views.matmul_seen`). Those
rows are the query rows with a non-finite query (or, in the backward, output, output gradient,
``lse`` or ``dlse``) and the rows the pattern connects to a key whose key or value row is not
finite. The latter are found by evaluating the pattern on the non-finite key columns only
(``Lq x`` their number per head group, never ``Lq x Lk``); the rows found are then computed in
chunks of rows against every key.

``route`` chooses from the data as given: a non-finite key makes its block's pooled score NaN,
and a NaN score ranks below every number (:func:`patterndsl.semantics.route_top`), the same
choice on every path; the pattern is evaluated with that choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patterndsl import ir, semantics
from patterndsl.runtime import dynamic, softmax
from patterndsl.runtime.cpu.views import cleaned, matmul_seen, scores_seen

#: Elements of one chunk's ``[rows, Lk]`` score matrix in the exact recomputation.
CHUNK_ELEMENTS = 1 << 22


def all_finite(*tensors: torch.Tensor | None) -> bool:
    """Whether every value is finite: one float32-accumulated sum per tensor and one host sync.

    A sum of huge finite values may overflow; the caller then takes the exact path, which finds
    nothing to fix.
    """
    sums = [t.sum(dtype=torch.float32 if t.dtype != torch.float64 else t.dtype) for t in tensors if t is not None]
    return not sums or bool(torch.isfinite(torch.stack([s.double() for s in sums]).sum()))


def clean(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its non-finite values replaced by 0 (the kernels' copy)."""
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


def _bad_rows(t: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(t).all(-1)


def non_finite_rows(out, lse, dout, dlse) -> torch.Tensor:
    """Bool ``[B, H, Lq]``: rows whose output, output gradient, ``lse`` (NaN or ``+inf``; ``-inf`` is a
    row with no allowed key) or ``dlse`` is not finite."""
    rows = _bad_rows(out) | _bad_rows(dout) | torch.isnan(lse) | (lse == float("inf"))
    return rows if dlse is None else rows | ~torch.isfinite(dlse)


@dataclass
class Rows:
    """The query rows computed here instead of by the kernels.

    Attributes:
        rows: bool ``[B, H, Lq]`` (on the inputs' device).
        selection: per ``route`` primitive its :class:`~patterndsl.runtime.routing.Selection`
            made from this call's (original) ``q`` and ``k``; empty for static patterns.
    """

    rows: torch.Tensor
    selection: dict


def _selection(plan, q: torch.Tensor, k: torch.Tensor) -> dict:
    if not any(ir.is_dynamic(g.node) for g in plan.groups):
        return {}
    return dynamic.select_all(dynamic.dynamic_plan(plan), q, k)


def _chosen(selection: dict, b: int, kvh: int) -> dict | None:
    return {p: s.chosen[b, kvh].cpu() for p, s in selection.items()} or None


def _head_sets(plan, kv_head: int, share: int):
    """``(node, head, heads)`` per pattern evaluation the heads of one key-value head need: once per head
    group when its node does not read ``h`` (every head then gets the same rows), else per head."""
    lo, hi = kv_head * share, (kv_head + 1) * share
    for group in plan.groups:
        heads = [h for h in group.heads if lo <= h < hi]
        if not heads:
            continue
        if ir.uses_head(group.node):
            yield from ((group.node, h, [h]) for h in heads)
        else:
            yield group.node, heads[0], heads


def connected(plan, bad_keys: torch.Tensor, selection: dict, heads: int) -> torch.Tensor:
    """Query rows the pattern connects to a marked key.

    Args:
        plan: the block plan (its pattern, sizes and head groups).
        bad_keys: bool ``[B, Hkv, Lk]``.
        selection: the route selections of this call (see :class:`Rows`).
        heads: query heads ``H``.

    Returns:
        Bool ``[B, H, Lq]`` on the CPU. Work: ``Lq x`` the marked keys of each (batch element,
        key-value head), per head group.
    """
    batch, kv_heads, _ = bad_keys.shape
    share = heads // kv_heads
    out = torch.zeros(batch, heads, plan.q_len, dtype=torch.bool)
    i = torch.arange(plan.q_len)[:, None]
    for b, kvh in bad_keys.any(-1).nonzero().tolist():
        j = bad_keys[b, kvh].nonzero()[:, 0].cpu()
        chosen = _chosen(selection, b, kvh)
        for node, h, hs in _head_sets(plan, kvh, share):
            hit = torch.zeros(plan.q_len, dtype=torch.bool)
            for start in range(0, len(j), max(1, CHUNK_ELEMENTS // plan.q_len)):
                cols = j[start : start + max(1, CHUNK_ELEMENTS // plan.q_len)][None, :]
                hit |= semantics.evaluate(node, i, cols, h, plan.sizes, chosen).any(1)
            out[b, hs] = hit
    return out


def rows_to_fix(plan, q, k, v, extra: torch.Tensor | None = None) -> Rows:
    """The rows of a call with some non-finite input that the kernels must not compute.

    Args:
        plan: the block plan; q, k, v: the call's original inputs.
        extra: bool ``[B, H, Lq]`` rows to add (the backward's non-finite outputs and gradients).

    Returns:
        The :class:`Rows`.
    """
    selection = _selection(plan, q, k)
    bad_keys = _bad_rows(k) | _bad_rows(v)
    rows = _bad_rows(q)
    if extra is not None:
        rows |= extra
    if bool(bad_keys.any()):
        rows |= connected(plan, bad_keys, selection, q.shape[1]).to(rows.device)
    return Rows(rows, selection)


def _row_chunks(plan, fix: Rows, share: int):
    """``(b, h, kvh, idx, allowed)`` per chunk of rows to compute: ``idx`` int64 row indices and
    ``allowed`` bool ``[len(idx), Lk]`` on the device, exact per element."""
    j = torch.arange(plan.kv_len)[None, :]
    step = max(1, CHUNK_ELEMENTS // max(plan.kv_len, 1))
    for b, h in fix.rows.any(-1).nonzero().tolist():
        kvh = h // share
        node = plan.group_of(h).node
        chosen = _chosen(fix.selection, b, kvh)
        rows = fix.rows[b, h].nonzero()[:, 0]
        for start in range(0, len(rows), step):
            idx = rows[start : start + step]
            allowed = semantics.evaluate(node, idx.cpu()[:, None], j, h, plan.sizes, chosen)
            yield b, h, kvh, idx, allowed.to(idx.device)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Score:
    """The pattern's ``score`` on the exact rows (None-safe: no score, no change): the modified logits,
    ``d score / d s`` and the float tables' gradients, as the CPU's selecting path applies them
    (:mod:`patterndsl.runtime.cpu.scoremod`), for one (batch element, head) and chunk of rows at a time.

    Args:
        plan: the block plan; data: the call's input tensors (declaration order) or None.
        grads: float input name -> gradient accumulator shaped like its tensor (backward), or None.
    """

    def __init__(self, plan, data=None, grads: dict | None = None):
        pattern = plan.pattern
        self.plan = plan
        self.score = getattr(pattern, "score", None)
        self.data = list(data) if data and pattern.inputs else None
        self.grads = grads or {}

    def env(self, s: torch.Tensor, b: int, h: int, idx: torch.Tensor):
        from patterndsl import scores
        from patterndsl.scores.tables import Tables

        plan, dev = self.plan, s.device
        read = None
        if self.data is not None:
            read = Tables(plan.pattern.inputs, self.data, torch.tensor(b, device=dev))
        return scores.Env(
            s=s,
            q=(idx.to(dev) + (plan.kv_len - plan.q_len))[:, None],
            k=torch.arange(plan.kv_len, device=dev)[None, :],
            h=torch.tensor(h, device=dev),
            lq=plan.q_len,
            lk=plan.kv_len,
            layout=plan.pattern.layout,
            dtype=s.dtype,
            read=read,
        )

    def __call__(self, s: torch.Tensor, b: int, h: int, idx: torch.Tensor) -> torch.Tensor:
        """The modified logits ``[rows, Lk]`` of raw logits ``s``."""
        if self.score is None:
            return s
        from patterndsl import scores

        return scores.evaluate(self.score.expr, self.env(s, b, h, idx)).to(s.dtype).expand(s.shape).clone()

    def backward(self, ds: torch.Tensor, raw: torch.Tensor, b: int, h: int, idx, allowed: torch.Tensor):
        """``ds`` (``dL / d score``) becomes ``dL / d s`` in place; the float tables take their share first."""
        if self.score is None:
            return
        from patterndsl import scores
        from patterndsl.scores.tables import Tables, scatter

        env = self.env(raw, b, h, idx)
        for read, partial in self.score.partials:
            if read.name not in self.grads:
                continue
            values = (ds * scores.evaluate(partial, env).to(ds.dtype)).masked_fill(~allowed, 0.0)
            indices = [scores.evaluate(i, env) for i in read.indices]
            tables = Tables(self.plan.pattern.inputs, self.data, torch.tensor(b, device=ds.device))
            scatter(self.grads[read.name], tables, read, indices, values)
        if not self.score.additive:
            ds.mul_(scores.evaluate(self.score.ds, env).to(ds.dtype))


def table_accumulators(decls, data) -> dict[str, torch.Tensor]:
    """Zeroed float32 gradients of the float inputs (name -> shaped like its tensor), declaration order."""
    return {
        d.name: torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        for d, t in zip(decls, data, strict=True)
        if d.kind == "float"
    }


def forward_rows(q, k, v, plan, scale: float, fix: Rows, out: torch.Tensor, lse: torch.Tensor, data=None) -> None:
    """Write the exact ``out`` and ``lse`` of the rows of ``fix`` (in place), from the original inputs.

    As the CPU's math kernel: the score modifier on the logits (``data``: the call's run-time inputs),
    blocked scores selected to ``-inf``, a softmax shifted by the row maximum, ``P @ V`` with NaN where
    a non-zero weight reads a non-finite value.
    """
    dt = compute_dtype(q.dtype)
    share = q.shape[1] // k.shape[1]
    modify = _Score(plan, data)
    for b, h, kvh, idx, allowed in _row_chunks(plan, fix, share):
        kc = k[b, kvh].to(dt)
        vc, vbad = cleaned(v[b, kvh].to(dt))
        s = modify((q[b, h, idx].to(dt) * scale) @ kc.T, b, h, idx)
        s.masked_fill_(~allowed, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m.masked_fill_(m == float("-inf"), 0.0)
        s.sub_(m).exp_()
        den = s.sum(-1, keepdim=True)
        o = matmul_seen(s, vc, vbad).div_(den.clamp(min=1.0))
        out[b, h, idx] = o.to(out.dtype)
        lse[b, h, idx] = (m + den.log()).squeeze(-1).to(lse.dtype)


def backward_inputs(q, k, v, out, lse, dout, dlse, fix: Rows):
    """The kernels' inputs when ``fix`` holds rows: non-finite values 0, and the rows of ``fix`` with
    ``lse = +inf`` (``P = 0``) and a zero output and ``dlse`` (``delta = 0``), so the kernels give
    them and their pairs nothing."""
    rows = fix.rows
    lse = lse.to(torch.float32).masked_fill(rows, float("inf"))
    out = out.masked_fill(rows[..., None], 0.0)
    dlse = None if dlse is None else dlse.masked_fill(rows, 0.0)
    return clean(q), clean(k), clean(v), clean(out), lse, clean(dout), dlse


def backward_rows(
    q, k, v, out, lse, dout, dlse, plan, scale: float, fix: Rows, dq, dk_heads, dv_heads, data=None, tables=None
) -> None:
    """Add the exact gradients of the rows of ``fix``: their ``dq`` (written) and their pairs' share of
    ``dk_heads``/``dv_heads`` (``[B, H, Lk, D]``, added), as the CPU's ``_backward_select``, with the score
    modifier and its derivative; ``tables`` (float input name -> gradient shaped like its tensor) take
    the rows' share of the float inputs' gradients (the kernels gave those rows nothing)."""
    dt = compute_dtype(q.dtype)
    share = q.shape[1] // k.shape[1]
    modify = _Score(plan, data, tables)
    for b, h, kvh, idx, allowed in _row_chunks(plan, fix, share):
        qc, bad_q = cleaned(q[b, h, idx].to(dt))
        doc, bad_do = cleaned(dout[b, h, idx].to(dt))
        kc, bad_k = cleaned(k[b, kvh].to(dt))
        vc, _ = cleaned(v[b, kvh].to(dt))
        row_lse = lse[b, h, idx].to(dt)
        row_lse = row_lse.masked_fill(row_lse == float("-inf"), float("inf"))
        delta = softmax.delta(dout[b, h, idx], out[b, h, idx], None if dlse is None else dlse[b, h, idx], dt)
        # As the forward's: a key whose infinite component gives a -inf score has P = 0 (scoring its cleaned
        # copy would give a finite score and a P the forward never had).
        raw = scores_seen(qc * scale, kc, k[b, kvh].to(dt), bad_k)
        p = modify(raw, b, h, idx).masked_fill_(~allowed, float("-inf")).sub_(row_lse[:, None]).exp_()
        ds = (doc @ vc.T).sub_(delta[:, None]).mul_(p)
        modify.backward(ds, raw, b, h, idx, allowed)
        p.masked_fill_(~allowed, 0.0)
        ds.masked_fill_(~allowed, 0.0)
        dv_heads[b, h] += matmul_seen(p.T, doc, bad_do).to(dv_heads.dtype)
        dk_heads[b, h] += matmul_seen(ds.T, qc, bad_q).mul_(scale).to(dk_heads.dtype)
        dq[b, h, idx] = matmul_seen(ds, kc, bad_k).mul_(scale).to(dq.dtype)
