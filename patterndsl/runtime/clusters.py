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

from patterndsl import ir, primitives, semantics
from patterndsl.analysis import clusterplan
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


def ragged(q, k, v, pir: ir.PatternIR, scale, return_lse: bool, backend: str, given: dict, lengths):
    """A ragged or paged call (LANGUAGE.md section 9) of a content pattern: each element on its own problem.

    Element ``b`` is the call of its first ``q_lengths[b]`` queries over its ``kv_lengths[b]`` keys, with
    its inputs (a batched input's row ``b``, ``token`` dimensions cut to ``kv_lengths[b]``): labels,
    balanced memberships and the pattern are computed on what exists. Arguments as in
    ``runtime.attention``; ``lengths`` is ``(kv_lengths, q_lengths, block_table)``.
    """
    from patterndsl.kvcache import live_keys
    from patterndsl.runtime import ragged as rag
    from patterndsl.runtime import validate

    kv_lengths, q_lengths, block_table = lengths
    if block_table is None:
        sizes = validate.check_inputs(q, k, v, scale, backend)
    else:
        rag.check_paged(q, k, v)
        sizes = validate.check_inputs(q, q, q, scale, backend)
    data = rag.check_call(q, k, v, kv_lengths, q_lengths, block_table)
    rag.check_values(q, k, data)
    kvl, ql = data[0].tolist(), data[1].tolist()
    table = data[2] if len(data) > 2 else None
    batch, heads, q_len, _ = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for b in range(batch):
        out = q.new_zeros(1, heads, q_len, v.shape[3])
        lse = torch.full((1, heads, q_len), float("-inf"), dtype=dtype, device=q.device)
        if ql[b] and kvl[b]:
            live = None if table is None else live_keys(pir, heads, kvl[b] - ql[b])
            kb, vb = rag.element_keys(k, v, table, b, kvl[b], live)
            mine = _element_inputs(pir, given, b, kvl[b])
            o, l_ = attention(q[b : b + 1, :, : ql[b]], kb, vb, pir, sizes.scale, True, sizes.backend, mine)
            out = torch.cat([o, out[:, :, ql[b] :]], 2)
            lse = torch.cat([l_.to(dtype), lse[:, :, ql[b] :]], 2)
        outs.append(out)
        lses.append(lse)
    out, lse = torch.cat(outs), torch.cat(lses)
    return (out, lse) if return_lse else out


def _element_inputs(pir: ir.PatternIR, given: dict, b: int, kv_len: int) -> dict:
    """Element ``b``'s inputs: a batched tensor's row ``b`` (kept as a batch of one), tokens cut to ``kv_len``."""
    out = {}
    for decl in pir.inputs:
        t = given.get(decl.name)
        if t is None or not isinstance(t, torch.Tensor):
            out[decl.name] = t
            continue
        dims = decl.dims
        if decl.batched and t.dim() == len(dims):
            t = t[b : b + 1] if t.shape[0] > 1 else t
        elif decl.batched:
            dims = dims[1:]
        lead = t.dim() - len(dims)
        for axis, name in enumerate(dims):
            if name == "token":
                t = t.narrow(lead + axis, 0, min(kv_len, t.shape[lead + axis]))
        out[decl.name] = t
    out.update({name: t for name, t in given.items() if name not in out})
    return out


def sorted_parts(q, k, v, pir, parts, scale: float, bound, dtype, backend: str = "cpu"):
    """``(out, lse)`` over every head of the pairs the call-time parts add (0 / ``-inf`` on other heads)."""
    batch, heads, q_len, _ = q.shape
    share = heads // k.shape[1]
    data = _Data(pir, q, k, bound)
    tables = () if bound is None else tuple(bound.ordered())
    sizes = Sizes(q_len, k.shape[2], pir.layout, heads)
    pieces, at = [], 0
    for part in parts:
        if part.lo > at:
            pieces.append(_nothing(q, v, part.lo - at, dtype))
        heads_of = torch.arange(part.lo, part.hi, device=q.device)
        kk, vv = k[:, heads_of // share], v[:, heads_of // share]
        block = _block(backend, q.device)
        if part.prim is None:
            plan = _reach_plan(pir, part, sizes, batch, block, q.device)
        else:
            lab = data.labels(part.prim)
            g = batch * (part.hi - part.lo)
            plan = clusterplan.sorted_plan(
                lab.q[:, part.lo : part.hi].reshape(g, *lab.q.shape[2:]),
                lab.k[:, part.lo : part.hi].reshape(g, *lab.k.shape[2:]),
                lab.balanced,
                block,
            )
        run = _Run(plan, part, sizes, scale, dtype, backend, v.shape[3], data, share)
        pieces.append(_SortedAttention.apply(q[:, part.lo : part.hi], kk, vv, run, *tables))
        at = part.hi
    if at < heads:
        pieces.append(_nothing(q, v, heads - at, dtype))
    return torch.cat([o for o, _ in pieces], 1), torch.cat([lse for _, lse in pieces], 1)


class _Data:
    """What a call's parts read besides ``q``, ``k``, ``v``: labels, route choices, inputs, the score.

    Labels and route choices are computed once per call, on first use, without gradient.
    """

    def __init__(self, pir: ir.PatternIR, q, k, bound):
        self.pir, self.q, self.k, self.bound = pir, q, k, bound
        self._labels: dict = {}
        self._routes: dict = {}
        self._voters = {}
        for lo, hi, node in semantics.head_segments(pir, q.shape[1]):
            for prim in ir.routes(node):
                self._voters.setdefault(prim, []).extend(range(lo, hi))

    def labels(self, prim: ir.Prim) -> clusters.Labels:
        if prim not in self._labels:
            self._labels[prim] = clusters.labels(prim, self.q, self.k, self.bound)
        return self._labels[prim]

    def route(self, prim: ir.Prim, sizes: Sizes) -> torch.Tensor:
        """Bool ``[batch, kv_heads, groups, blocks]``: the choice of ``route`` (``semantics.route_selection``)."""
        if prim not in self._routes:
            ctx = semantics.Context(sizes.q_len, sizes.kv_len, sizes.layout)
            self._routes[prim] = semantics.route_selection(prim, self.q, self.k, ctx, self._voters[prim])
        return self._routes[prim]


def _reach_plan(pir, part: clusterplan.Part, sizes: Sizes, batch: int, block, device) -> clusterplan.SortedPlan:
    """A general part's plan in token order: each query tile's key range covers the tiles ``part.reach`` visits."""
    from patterndsl.api import Pattern

    bm, bn = block
    reach = ir.PatternIR(pir.name, pir.params, pir.layout, (), part.reach, pir.span, ())
    tiles = Pattern(reach).plan(sizes.q_len, sizes.kv_len, part.hi, block=block, order="identity").tiles()
    nz = tiles[part.lo : part.hi] != 0  # [Hp, nqb, nkb]
    nkb = nz.shape[-1]
    first = nz.int().argmax(-1)
    last = nkb - 1 - nz.flip(-1).int().argmax(-1)
    some = nz.any(-1)
    start = torch.where(some, first * bn, 0)
    stop = torch.where(some, torch.clamp((last + 1) * bn, max=sizes.kv_len), 0)
    g = batch * (part.hi - part.lo)
    start, stop = (t.unsqueeze(0).expand(batch, -1, -1).reshape(g, -1).to(device) for t in (start, stop))

    def side(length: int) -> clusterplan.Side:
        index = torch.arange(length, device=device).expand(g, -1)
        return clusterplan.Side(index, torch.zeros_like(index), None)

    return clusterplan.SortedPlan(side(sizes.q_len), side(sizes.kv_len), (bm, bn), start, stop)


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
    """What one part needs besides the tensors: its plan, predicate, sizes, scale, backend and the call's data."""

    def __init__(
        self,
        plan: clusterplan.SortedPlan,
        part: clusterplan.Part,
        sizes: Sizes,
        scale,
        dtype,
        backend,
        dv_dim,
        data: _Data | None = None,
        share: int = 1,
    ):
        self.plan, self.part, self.sizes, self.scale, self.dtype = plan, part, sizes, scale, dtype
        self.backend, self.dv_dim, self.data, self.share = backend, dv_dim, data, share
        #: Device copies of the plan the kernels read, made once for forward and backward.
        self.device_lists: dict = {}
        pred = part.pred
        #: The predicate needs the batch element (inputs, labels, route choices): evaluated per group.
        self.per_element = pred is not None and (ir.reads_inputs(pred) or ir.is_dynamic(pred))
        self.score = None if data is None else data.pir.score

    @property
    def plain(self) -> bool:
        """True when the part is a sorted part with a static predicate and no score (what the kernels run)."""
        return self.part.prim is not None and not self.per_element and self.score is None

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
        if self.part.pred is not None:
            allowed &= self.pairs(g, rows, cols)
        if plan.q.bits is not None:
            allowed &= _lowest_common(plan.q.bits[gq, rows], plan.k.bits[gk, cols], qlab)
        return g, rows, cols, allowed, row_ok

    def heads(self, g: torch.Tensor) -> torch.Tensor:
        """The query head of each group."""
        return self.part.lo + g % (self.part.hi - self.part.lo)

    def pairs(self, g: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Bool ``[c, BM, R]``: the part's predicate at original positions (per group when it reads the call)."""
        pred = self.part.pred
        if not self.per_element:
            h = self.heads(g)[:, None, None]
            return semantics.evaluate(pred, rows[:, :, None], cols[:, None, :], h, self.sizes)
        data, hp = self.data, self.part.hi - self.part.lo
        out = torch.empty(rows.shape[0], rows.shape[1], cols.shape[1], dtype=torch.bool, device=rows.device)
        for gg in torch.unique(g).tolist():
            at = (g == gg).nonzero()[:, 0]
            b, h = gg // hp, self.part.lo + gg % hp
            ctx = self.sizes if data.bound is None else primitives.inputs.Bound(self.sizes, data.bound.element(b))
            chosen = {p: data.labels(p).element(b) for p in ir.contents(pred)}
            chosen.update({p: data.route(p, self.sizes)[b, h // self.share] for p in ir.routes(pred)})
            out[at] = semantics.evaluate(pred, rows[at][:, :, None], cols[at][:, None, :], h, ctx, chosen)
        return out

    def scores(self, s: torch.Tensor, g: torch.Tensor, rows, cols, tables) -> torch.Tensor:
        """The logits after the pattern's ``score`` (``semantics.modified_scores`` at gathered pairs)."""
        if self.score is None:
            return s
        from patterndsl import scores

        hp = self.part.hi - self.part.lo
        read = None
        if tables:
            read = scores.Tables(self.data.pir.inputs, list(tables), (g // hp)[:, None, None])
        sizes = self.sizes
        env = scores.Env(
            s=s,
            q=rows[:, :, None] + (sizes.kv_len - sizes.q_len),
            k=cols[:, None, :],
            h=self.heads(g)[:, None, None],
            lq=sizes.q_len,
            lk=sizes.kv_len,
            layout=sizes.layout,
            dtype=s.dtype,
            read=read,
        )
        return scores.evaluate(self.score.expr, env).to(s.dtype).expand(s.shape)


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
    if run.backend != "triton" or not run.plain:
        return False
    from patterndsl.runtime import triton_clusters

    return triton_clusters.supported(run, q, run.dv_dim)


class _SortedAttention(torch.autograd.Function):
    """One part: ``(q [B, Hp, Lq, D], k, v [B, Hp, Lk, D], run, *tables) -> (out, lse)``.

    ``tables`` are the call's inputs in declaration order (the score reads them; float tables that
    require grad get their gradients). The backward recomputes by chunk.
    """

    @staticmethod
    def forward(ctx, q, k, v, run: _Run, *tables):
        ctx.run = run
        if _on_kernels(run, q):
            from patterndsl.runtime import triton_clusters

            out, lse = triton_clusters.forward(q, k, v, run)
            ctx.save_for_backward(q, k, v, out, lse, *tables)
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
            s = run.scores(s, g, rows, cols, tables)
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
        ctx.save_for_backward(q, k, v, out, lse, *tables)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *tables = ctx.saved_tensors
        run = ctx.run
        if _on_kernels(run, q):
            from patterndsl.runtime import triton_clusters

            dout = torch.zeros_like(out) if dout is None else dout
            delta = softmax.delta(dout, out, dlse)
            return (*triton_clusters.backward(q, k, v, dout, lse, delta, run), None, *(None for _ in tables))
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
        wanted = [i for i, t in enumerate(tables) if ctx.needs_input_grad[4 + i] and t.is_floating_point()]
        leaves = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(tables)]
        dtables = [torch.zeros_like(t) if i in wanted else None for i, t in enumerate(tables)]
        for tiles, width in run.chunks():
            g, rows, cols, allowed, _ = run.tile(tiles, width)
            qt, kt, vt = qf[g[:, None], rows], kf[g[:, None], cols], vf[g[:, None], cols]
            qrow = (g[:, None] * q_len + rows).reshape(-1)
            krow = (g[:, None] * kv_len + cols).reshape(-1)
            raw = torch.matmul(qt, kt.transpose(-1, -2)) * run.scale
            with torch.enable_grad():
                leaf = raw.detach().requires_grad_(run.score is not None)
                s = run.scores(leaf, g, rows, cols, leaves)
            row_lse = lse_flat[qrow].view(rows.shape)
            shift = torch.where(torch.isfinite(row_lse), row_lse, 0.0)[..., None]
            p = torch.where(allowed, torch.exp(s.detach() - shift), 0.0)
            do = do_flat[qrow].view(*rows.shape, dv_dim)
            dv.index_add_(0, krow, torch.matmul(p.transpose(-1, -2), do).reshape(-1, dv_dim))
            ds = p * (torch.matmul(do, vt.transpose(-1, -2)) - delta[qrow].view(rows.shape)[..., None])
            if run.score is not None:
                got = torch.autograd.grad(s, [leaf] + [leaves[i] for i in wanted], ds, allow_unused=True)
                ds = got[0]
                for i, grad in zip(wanted, got[1:], strict=True):
                    if grad is not None:
                        dtables[i] += grad
            dq.index_add_(0, qrow, (torch.matmul(ds, kt) * run.scale).reshape(-1, d))
            dk.index_add_(0, krow, (torch.matmul(ds.transpose(-1, -2), qt) * run.scale).reshape(-1, d))
        return (
            dq.view(q.shape).to(q.dtype),
            dk.view(k.shape).to(k.dtype),
            dv.view(v.shape).to(v.dtype),
            None,
            *dtables,
        )
