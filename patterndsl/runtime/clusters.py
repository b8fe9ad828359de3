"""Runtime stage for ``cluster``/``lsh``: attention with tokens sorted by label at every call.

Comes in: ``q``, ``k``, ``v``, a pattern with content primitives and the call's inputs (from
:func:`patterndsl.runtime.attention`). Goes out: ``(out, lse)``, differentiable.

The pattern is cut by :func:`patterndsl.analysis.clusterplan.split`: its static part runs
through the ordinary op (its own plan and token order, either backend); each sorted part
computes the labels (:func:`patterndsl.primitives.clusters.labels`, no gradient), sorts the
tokens by label (:func:`~patterndsl.analysis.clusterplan.sorted_plan`) and runs every query
tile of ``BM`` sorted entries against its one contiguous range of sorted keys, with the
per-pair predicate of the part evaluated on the original positions. The parts allow disjoint
pairs, so :func:`lse_combine` merges them exactly. The sorted part is torch code on the
tensors' device (a :class:`torch.autograd.Function` whose backward recomputes each chunk of
tiles, flash-style); it runs the same on both backends.
"""

from __future__ import annotations

import torch

from patterndsl import ir, semantics
from patterndsl.analysis import clusterplan
from patterndsl.errors import PatternError
from patterndsl.primitives import clusters
from patterndsl.runtime import softmax
from patterndsl.sizes import Sizes

#: Query tile of the sorted order (entries): a tile needs one contiguous range of sorted keys.
BLOCK = (64, 64)
#: Tiles of the sorted order under the Triton interpreter.
INTERPRET_BLOCK = (16, 16)
#: Score elements computed at once (bounds the temporaries of one chunk of tiles).
CHUNK_ELEMENTS = 1 << 22


def has_content(pir: ir.PatternIR) -> bool:
    """True when some head rule of ``pir`` uses ``cluster(...)`` or ``lsh(...)``."""
    return any(ir.contents(node) for node in pir.nodes())


def lse_combine(parts) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention results over disjoint key sets by log-sum-exp, differentiably.

    Args:
        parts: ``(out, lse)`` pairs, ``out [..., L, D]`` and ``lse [..., L]`` (0 / ``-inf`` for
            rows a part gives nothing).

    Returns:
        ``(out, lse)`` in the dtypes of the first part: softmax over the union of the parts' keys.
    """
    outs, lses = zip(*parts, strict=True)
    lse = torch.stack([x.to(lses[0].dtype) for x in lses])
    top = lse.max(0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    weights = torch.exp(lse - top)
    total = weights.sum(0)
    # Not torch.logsumexp: its gradient on a row that is -inf in every part is NaN, this one's is 0.
    merged = torch.where(total > 0, top + torch.log(total.clamp(min=1e-30)), float("-inf"))
    w = weights / total.clamp(min=1e-30)
    out = sum(o.to(w.dtype) * w[i][..., None] for i, o in enumerate(outs))
    return out.to(outs[0].dtype), merged


def attention(q, k, v, pir: ir.PatternIR, scale, return_lse: bool, backend: str, given: dict):
    """Attention under a pattern with ``cluster``/``lsh`` (module docstring); arguments as in ``runtime.attention``."""
    from patterndsl import binding
    from patterndsl.api import Pattern
    from patterndsl.runtime import attention as run
    from patterndsl.runtime import validate

    sizes = validate.check_inputs(q, k, v, scale, backend)
    bound = None
    if given or pir.inputs:
        bound = binding.bind(pir, given, sizes.kv_len, sizes.heads, sizes.head_dim, sizes.batch, q.device)
    split = clusterplan.split(pir, sizes.heads)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, q_len, _ = q.shape
    results = []
    if split.static is not None:
        static_inputs = {d.name: given[d.name] for d in split.static.inputs}
        out0, lse0 = run(
            q, k, v, Pattern(split.static), scale=sizes.scale, return_lse=True, backend=backend, inputs=static_inputs
        )
        results.append((out0.to(dtype), lse0.to(dtype)))
    if split.parts:
        results.append(sorted_parts(q, k, v, pir, split.parts, sizes.scale, bound, dtype, sizes.backend))
    if not results:
        out = q.new_zeros(batch, heads, q_len, v.shape[3])
        lse = torch.full((batch, heads, q_len), float("-inf"), dtype=dtype, device=q.device)
    else:
        out, lse = results[0] if len(results) == 1 else lse_combine(results)
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def sorted_parts(q, k, v, pir, parts, scale: float, bound, dtype, backend: str = "cpu"):
    """``(out, lse)`` over every head of the pairs only the labels add (0 / ``-inf`` on other heads)."""
    batch, heads, q_len, _ = q.shape
    share = heads // k.shape[1]
    labels = {}
    pieces, at = [], 0
    for part in parts:
        if part.prim not in labels:
            labels[part.prim] = clusters.labels(part.prim, q, k, bound)
        if part.lo > at:
            pieces.append(_nothing(q, v, part.lo - at, dtype))
        lab = labels[part.prim]
        heads_of = torch.arange(part.lo, part.hi, device=q.device)
        kk, vv = k[:, heads_of // share], v[:, heads_of // share]
        g = batch * (part.hi - part.lo)
        plan = clusterplan.sorted_plan(
            lab.q[:, part.lo : part.hi].reshape(g, *lab.q.shape[2:]),
            lab.k[:, part.lo : part.hi].reshape(g, *lab.k.shape[2:]),
            lab.balanced,
            _block(backend, q.device),
        )
        run = _Run(plan, part, Sizes(q_len, k.shape[2], pir.layout, heads), scale, dtype, backend, v.shape[3])
        pieces.append(_SortedAttention.apply(q[:, part.lo : part.hi], kk, vv, run))
        at = part.hi
    if at < heads:
        pieces.append(_nothing(q, v, heads - at, dtype))
    return torch.cat([o for o, _ in pieces], 1), torch.cat([lse for _, lse in pieces], 1)


def _nothing(q, v, heads: int, dtype):
    batch, _, q_len, _ = q.shape
    out = torch.zeros(batch, heads, q_len, v.shape[3], dtype=dtype, device=q.device)
    return out, torch.full((batch, heads, q_len), float("-inf"), dtype=dtype, device=q.device)


def _block(backend: str, device: torch.device) -> tuple[int, int]:
    # The interpreter is slow: small tiles there (tails and several tiles per range still occur).
    if backend == "triton":
        from patterndsl.codegen import clusters as gen

        return INTERPRET_BLOCK if device.type == "cpu" else (gen.BLOCK_M, gen.BLOCK_M)
    return BLOCK


class _Run:
    """What one sorted part needs besides the tensors: its plan, predicate, sizes, scale and backend."""

    def __init__(
        self, plan: clusterplan.SortedPlan, part: clusterplan.Part, sizes: Sizes, scale, dtype, backend, dv_dim
    ):
        self.plan, self.part, self.sizes, self.scale, self.dtype = plan, part, sizes, scale, dtype
        self.backend, self.dv_dim = backend, dv_dim
        #: Device copies of the plan the kernels read, made once for forward and backward.
        self.device_lists: dict = {}
        if part.pred is not None and ir.reads_inputs(part.pred):
            raise PatternError(
                f"{part.prim.name}(...) combined with run-time inputs in the same head rule is not run yet",
                part.prim.span,
            )

    def chunks(self):
        """``(tiles, width)``: slices of the flattened (group, query tile) list and their key range width."""
        width = (self.plan.stop - self.plan.start).reshape(-1)
        total = width.numel()
        if total == 0:
            return
        bm = self.plan.block[0]
        widest = max(int(width.max()), 1)
        step = max(1, CHUNK_ELEMENTS // (bm * widest))
        for a in range(0, total, step):
            tiles = torch.arange(a, min(a + step, total), device=width.device)
            yield tiles, max(int(width[tiles].max()), 1)

    def tile(self, tiles: torch.Tensor, width: int):
        """Indices and the element mask of a chunk of tiles.

        Returns:
            ``(g, rows, cols, allowed, row_ok)``: group ``[c]``, query tokens ``[c, BM]``, key tokens
            ``[c, R]`` (original indices, clamped where padded), bool ``[c, BM, R]`` and whether
            each row is a real entry (bool ``[c, BM]``).
        """
        plan, bm = self.plan, self.plan.block[0]
        tiles_per_group = plan.start.shape[1]
        g, m = tiles // tiles_per_group, tiles % tiles_per_group
        eq, ek = plan.q.index.shape[1], plan.k.index.shape[1]
        e = m[:, None] * bm + torch.arange(bm, device=tiles.device)
        row_ok = e < eq
        e = e.clamp(max=max(eq - 1, 0))
        start, stop = plan.start[g, m], plan.stop[g, m]
        f = start[:, None] + torch.arange(width, device=tiles.device)
        col_ok = f < stop[:, None]
        f = f.clamp(max=max(ek - 1, 0))
        gq, gk = g[:, None].expand_as(e), g[:, None].expand_as(f)
        rows, cols = plan.q.index[gq, e], plan.k.index[gk, f]
        qlab, klab = plan.q.label[gq, e], plan.k.label[gk, f]
        allowed = row_ok[:, :, None] & col_ok[:, None, :] & (qlab[:, :, None] == klab[:, None, :])
        part = self.part
        if part.pred is not None:
            heads = part.hi - part.lo
            h = (part.lo + g % heads)[:, None, None]
            allowed &= semantics.evaluate(part.pred, rows[:, :, None], cols[:, None, :], h, self.sizes)
        if plan.q.bits is not None:
            allowed &= _lowest_common(plan.q.bits[gq, rows], plan.k.bits[gk, cols], qlab)
        return g, rows, cols, allowed, row_ok


def _lowest_common(qbits: torch.Tensor, kbits: torch.Tensor, cluster: torch.Tensor) -> torch.Tensor:
    """Bool ``[c, BM, R]``: no cluster below the entry's ``cluster`` holds both tokens (each pair counted once)."""
    word, bit = cluster // clusterplan.WORD_BITS, cluster % clusterplan.WORD_BITS
    ok = torch.ones(*qbits.shape[:2], kbits.shape[1], dtype=torch.bool, device=qbits.device)
    full = (1 << clusterplan.WORD_BITS) - 1
    for w in range(qbits.shape[-1]):
        below = torch.where(word > w, full, torch.where(word == w, (1 << bit) - 1, 0))
        common = qbits[:, :, None, w] & kbits[:, None, :, w] & below[:, :, None]
        ok &= common == 0
    return ok


def _on_kernels(run: _Run, q: torch.Tensor) -> bool:
    if run.backend != "triton":
        return False
    from patterndsl.runtime import triton_clusters

    return triton_clusters.supported(run, q, run.dv_dim)


class _SortedAttention(torch.autograd.Function):
    """One sorted part: ``(q [B, Hp, Lq, D], k, v [B, Hp, Lk, D]) -> (out, lse)``; backward recomputes by chunk."""

    @staticmethod
    def forward(ctx, q, k, v, run: _Run):
        ctx.run = run
        if _on_kernels(run, q):
            from patterndsl.runtime import triton_clusters

            out, lse = triton_clusters.forward(q, k, v, run)
            ctx.save_for_backward(q, k, v, out, lse)
            return out.to(run.dtype), lse.to(run.dtype)
        batch, heads, q_len, _ = q.shape
        dv_dim = v.shape[3]
        dtype = run.dtype
        qf, kf, vf = (t.reshape(batch * heads, -1, t.shape[3]).to(dtype) for t in (q, k, v))
        out = torch.zeros(batch * heads * q_len, dv_dim, dtype=dtype, device=q.device)
        lse = torch.full((batch * heads * q_len,), float("-inf"), dtype=dtype, device=q.device)
        for tiles, width in run.chunks():
            g, rows, cols, allowed, row_ok = run.tile(tiles, width)
            s = torch.matmul(qf[g[:, None], rows], kf[g[:, None], cols].transpose(-1, -2)) * run.scale
            s = torch.where(allowed, s, float("-inf"))
            top = s.amax(-1, keepdim=True)
            top = torch.where(torch.isfinite(top), top, 0.0)
            p = torch.exp(s - top)
            total = p.sum(-1)
            o = torch.matmul(p, vf[g[:, None], cols]) / total.clamp(min=1e-30)[..., None]
            part_lse = torch.where(total > 0, top[..., 0] + torch.log(total), float("-inf"))
            flat = (g[:, None] * q_len + rows)[row_ok]
            if run.plan.q.bits is None:  # every token is one entry: its result is written once
                out[flat] = o[row_ok]
                lse[flat] = part_lse[row_ok]
            else:  # a token in several clusters: its entries saw disjoint keys
                softmax.merge_into(out, lse, o[row_ok], part_lse[row_ok], flat)
        out = out.view(batch, heads, q_len, dv_dim)
        lse = lse.view(batch, heads, q_len)
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        run = ctx.run
        if _on_kernels(run, q):
            from patterndsl.runtime import triton_clusters

            dout = torch.zeros_like(out) if dout is None else dout
            delta = softmax.delta(dout, out, dlse)
            return (*triton_clusters.backward(q, k, v, dout, lse, delta, run), None)
        batch, heads, q_len, d = q.shape
        kv_len, dv_dim = k.shape[2], v.shape[3]
        dtype = run.dtype
        qf, kf, vf = (t.reshape(batch * heads, -1, t.shape[3]).to(dtype) for t in (q, k, v))
        dout = torch.zeros_like(out) if dout is None else dout.to(dtype)
        dlse = None if dlse is None else dlse.to(dtype)
        delta = softmax.delta(dout, out, dlse, dtype).reshape(-1)
        lse_flat, do_flat = lse.reshape(-1), dout.reshape(-1, dv_dim)
        dq = torch.zeros(batch * heads * q_len, d, dtype=dtype, device=q.device)
        dk = torch.zeros(batch * heads * kv_len, d, dtype=dtype, device=q.device)
        dv = torch.zeros(batch * heads * kv_len, dv_dim, dtype=dtype, device=q.device)
        for tiles, width in run.chunks():
            g, rows, cols, allowed, _ = run.tile(tiles, width)
            qt, kt, vt = qf[g[:, None], rows], kf[g[:, None], cols], vf[g[:, None], cols]
            qrow = (g[:, None] * q_len + rows).reshape(-1)
            krow = (g[:, None] * kv_len + cols).reshape(-1)
            s = torch.matmul(qt, kt.transpose(-1, -2)) * run.scale
            row_lse = lse_flat[qrow].view(rows.shape)
            p = torch.where(allowed, torch.exp(s - torch.where(torch.isfinite(row_lse), row_lse, 0.0)[..., None]), 0.0)
            do = do_flat[qrow].view(*rows.shape, dv_dim)
            dv.index_add_(0, krow, torch.matmul(p.transpose(-1, -2), do).reshape(-1, dv_dim))
            ds = p * (torch.matmul(do, vt.transpose(-1, -2)) - delta[qrow].view(rows.shape)[..., None])
            dq.index_add_(0, qrow, (torch.matmul(ds, kt) * run.scale).reshape(-1, d))
            dk.index_add_(0, krow, (torch.matmul(ds.transpose(-1, -2), qt) * run.scale).reshape(-1, d))
        return (
            dq.view(q.shape).to(q.dtype),
            dk.view(k.shape).to(k.dtype),
            dv.view(v.shape).to(v.dtype),
            None,
        )
