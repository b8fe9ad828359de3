"""Runtime stage for ``cluster``/``lsh``: attention with tokens sorted by label at every call.

Comes in: ``q``, ``k``, ``v``, a pattern with content primitives and the call's inputs (from
:func:`patterndsl.runtime.attention`). Goes out: ``(out, lse)``, differentiable.

The pattern is cut by :func:`patterndsl.analysis.clusterplan.split`: its static part runs
through the ordinary op (its own plan and token order, either backend); each sorted part
computes the labels (:func:`patterndsl.primitives.clusters.labels`, no gradient), sorts the
tokens by label (:func:`~patterndsl.analysis.clusterplan.sorted_plan`) and runs every query
tile of ``BM`` sorted entries against its one contiguous range of sorted keys, with the
per-pair predicate of the part evaluated on the original positions (per batch element when it
reads inputs, labels or route choices). A general part (a composition that sorting does not
serve: two content primitives, a complement, ``route`` in the rule) runs the same loop in token
order over the tiles of its static reach, its predicate evaluated per call. The passes allow
disjoint pairs: one :class:`torch.autograd.Function` merges them with
:mod:`patterndsl.runtime.combine` (forward by log-sum-exp, backward of each pass on the merged
statistics). Parts run on the Triton kernels (:mod:`~patterndsl.runtime.triton_clusters`) when
their predicate is static and there is no score, else as torch code on the tensors' device,
backward recomputed by chunk of tiles, flash-style.
"""

from __future__ import annotations

import functools

import torch

from patterndsl import ir, primitives, semantics
from patterndsl.analysis import clusterplan
from patterndsl.primitives import clusters
from patterndsl.runtime import combine, op, softmax
from patterndsl.sizes import Sizes

#: Query tile of the sorted order (entries): a tile needs one contiguous range of sorted keys.
BLOCK = (64, 64)
#: Score elements computed at once (bounds the temporaries of one chunk of tiles).
CHUNK_ELEMENTS = 1 << 22


@functools.lru_cache(maxsize=256)
def has_content(pir: ir.PatternIR) -> bool:
    """True when some head rule of ``pir`` uses ``cluster(...)`` or ``lsh(...)``."""
    return any(ir.contents(node) for node in pir.nodes())


def attention(q, k, v, pir: ir.PatternIR, scale, return_lse: bool, backend: str, given: dict):
    """Attention under a pattern with ``cluster``/``lsh`` (module docstring); arguments as in ``runtime.attention``."""
    from patterndsl import binding
    from patterndsl.runtime import _plan_key, validate

    sizes = validate.check_inputs(q, k, v, scale, backend)
    bound = None
    if given or pir.inputs:
        bound = binding.bind(pir, given, sizes.kv_len, sizes.heads, sizes.head_dim, sizes.batch, q.device)
    split = clusterplan.split(pir, sizes.heads)
    runs = _runs(q, k, v, pir, split.parts, sizes, bound)  # labels from the head size as given
    v_dim = v.shape[3]
    if v_dim != sizes.head_dim:
        # One head size for every pass (as runtime.attention does): zero columns change no score.
        width = max(v_dim, sizes.head_dim)
        q, k, v = (torch.nn.functional.pad(t, (0, width - t.shape[3])) for t in (q, k, v))
    tables = () if bound is None else tuple(bound.ordered())
    static = None
    if split.static is not None:
        names = [d.name for d in pir.inputs]
        static = (_plan_key(split.static, sizes.backend), tuple(names.index(d.name) for d in split.static.inputs))
    call = _Call(static, runs, sizes.scale, sizes.backend)
    if static is None and not call.runs:
        out = q.new_zeros(*q.shape[:3], v_dim)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=_dtype(q), device=q.device)
    else:
        out, lse = _Merged.apply(q, k, v, call, *tables)
        out, lse = out[..., :v_dim].to(q.dtype), lse.to(_dtype(q))
    return (out, lse) if return_lse else out


def _dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


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


def _runs(q, k, v, pir, parts, sizes, bound) -> list:
    """One :class:`_Run` per call-time part: labels computed, tokens sorted, tiles given key ranges."""
    batch, heads, q_len, _ = q.shape
    share = heads // k.shape[1]
    data = _Data(pir, q, k, bound)
    shape = Sizes(q_len, k.shape[2], pir.layout, heads)
    block = _block(sizes.backend, q.device)
    runs = []
    for part in parts:
        if part.prim is None:
            plan = _reach_plan(pir, part, shape, batch, block, q.device)
        else:
            lab = data.labels(part.prim)
            g = batch * (part.hi - part.lo)
            plan = clusterplan.sorted_plan(
                lab.q[:, part.lo : part.hi].reshape(g, *lab.q.shape[2:]),
                lab.k[:, part.lo : part.hi].reshape(g, *lab.k.shape[2:]),
                lab.balanced,
                block,
            )
        runs.append(_Run(plan, part, shape, sizes.scale, _dtype(q), sizes.backend, v.shape[3], data, share))
    return runs


class _Call:
    """One call's passes: the static part's op (``(plan key, indices of its inputs)`` or None) and the runs."""

    def __init__(self, static, runs: list, scale: float, backend: str):
        self.static, self.runs, self.scale, self.backend = static, runs, scale, backend


class _Merged(torch.autograd.Function):
    """``(q, k, v, call, *tables) -> (out, lse)``: every pass of a call merged by :mod:`~patterndsl.runtime.combine`.

    The passes allow disjoint pairs: the forward merges their ``(out, lse)`` by log-sum-exp, the
    backward runs each pass's own backward on the merged ``out`` and ``lse`` and adds the gradients
    (``combine``'s module docstring says why that is exact). ``tables`` are the call's inputs in
    declaration order; float tables that require grad get the gradients of the score.
    """

    @staticmethod
    def forward(ctx, q, k, v, call: _Call, *tables):
        passes = [functools.partial(_part_forward, q, k, v, run, tables) for run in call.runs]
        if call.static is not None:
            key, at = call.static
            data = [tables[i] for i in at]
            passes.append(functools.partial(op.attention_fwd, q, k, v, key, data, call.scale, call.backend))
        out, lse = combine.forward(passes)
        ctx.call = call
        ctx.save_for_backward(q, k, v, out, lse, *tables)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *tables = ctx.saved_tensors
        call = ctx.call
        dout = torch.zeros_like(out) if dout is None else dout
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        wanted = [i for i, t in enumerate(tables) if ctx.needs_input_grad[4 + i] and t.is_floating_point()]
        passes = [
            functools.partial(_part_backward, q, k, v, out, lse, dout, dlse, run, tables, wanted) for run in call.runs
        ]
        if call.static is not None:
            passes.append(functools.partial(_static_backward, q, k, v, out, lse, dout, dlse, call, tables, wanted))
        grads = combine.backward(passes)
        dtables = [None] * len(tables)
        for i, grad in zip(wanted, grads[3:], strict=True):
            dtables[i] = grad.to(tables[i].dtype)
        return grads[0].to(q.dtype), grads[1].to(k.dtype), grads[2].to(v.dtype), None, *dtables


def _slices(q, k, v, run):
    part = run.part
    kv_heads = torch.arange(part.lo, part.hi, device=q.device) // run.share
    return q[:, part.lo : part.hi], k[:, kv_heads], v[:, kv_heads], kv_heads


def _part_forward(q, k, v, run, tables):
    """One part's ``(out, lse)`` over every head (0 / ``-inf`` outside its heads)."""
    qs, ks, vs, _ = _slices(q, k, v, run)
    o, lse_part = run.forward(qs, ks, vs, tables)
    out = torch.zeros(*q.shape[:3], v.shape[3], dtype=run.dtype, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=run.dtype, device=q.device)
    out[:, run.part.lo : run.part.hi] = o
    lse[:, run.part.lo : run.part.hi] = lse_part
    return out, lse


def _part_backward(q, k, v, out, lse, dout, dlse, run, tables, wanted):
    """One part's share of ``(dq, dk, dv, *d wanted tables)`` from the merged ``out`` and ``lse``."""
    qs, ks, vs, kv_heads = _slices(q, k, v, run)
    lo, hi = run.part.lo, run.part.hi
    dqs, dks, dvs, dtables = run.backward(
        qs, ks, vs, out[:, lo:hi], lse[:, lo:hi], dout[:, lo:hi], dlse[:, lo:hi], tables, wanted
    )
    dq = torch.zeros(q.shape, dtype=dqs.dtype, device=q.device)
    dq[:, lo:hi] = dqs
    dk = torch.zeros(k.shape, dtype=dks.dtype, device=q.device).index_add_(1, kv_heads, dks)
    dv = torch.zeros(v.shape, dtype=dvs.dtype, device=q.device).index_add_(1, kv_heads, dvs)
    return (dq, dk, dv, *dtables)


def _static_backward(q, k, v, out, lse, dout, dlse, call, tables, wanted):
    """The static part's share through the op's backward; the gradients of its float inputs mapped back."""
    key, at = call.static
    data = [tables[i] for i in at]
    dq, dk, dv, floats = op.attention_bwd(
        dout.to(q.dtype), dlse.to(lse.dtype), q, k, v, out.to(q.dtype), lse, key, data, call.scale, call.backend
    )
    by_index = dict(zip([i for i in at if tables[i].is_floating_point()], floats, strict=True))
    return (dq, dk, dv, *(by_index.get(i, torch.zeros_like(tables[i])) for i in wanted))


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


def _block(backend: str, device: torch.device) -> tuple[int, int]:
    # The interpreter is slow: small tiles there (tails and several tiles per range still occur).
    if backend == "triton":
        from patterndsl.codegen import clusters as gen

        return gen.INTERPRET_BLOCK if device.type == "cpu" else (gen.BLOCK_M, gen.BLOCK_M)
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

    def forward(self, q, k, v, tables):
        """``(out, lse)`` of the part over its heads (:func:`_forward`)."""
        return _forward(self, q, k, v, tables)

    def backward(self, q, k, v, out, lse, dout, dlse, tables, wanted):
        """The part's gradients from the merged ``out``/``lse`` (:func:`_backward`)."""
        return _backward(self, q, k, v, out, lse, dout, dlse, tables, wanted)

    @property
    def plain(self) -> bool:
        """True when the part is a sorted part with a static predicate and no score (what the kernels run)."""
        return self.part.prim is not None and not self.per_element and self.score is None

    def chunks(self):
        """``(tiles, width)``: chunks of the flattened (group, query tile) list and their widest key range.

        Tiles are taken by increasing range width (they are independent), so a chunk pads its
        ranges to a width close to each of its own; a chunk holds about ``CHUNK_ELEMENTS`` scores.
        """
        width = (self.plan.stop - self.plan.start).reshape(-1)
        order = torch.argsort(width, stable=True)
        order = order[width[order] > 0]  # a tile with no key range computes nothing
        wide = width[order].tolist()
        bm = self.plan.block[0]
        a = 0
        while a < len(wide):
            # Widths never decrease along ``order``: a chunk's widest range is its last tile's.
            b = min(len(wide), a + max(1, CHUNK_ELEMENTS // (bm * wide[a])))
            while b > a + 1 and bm * wide[b - 1] * (b - a) > CHUNK_ELEMENTS:
                b = a + (b - a) // 2
            yield order[a:b], wide[b - 1]
            a = b

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


def _forward(run: _Run, q, k, v, tables):
    """One part over its heads: ``(q [B, Hp, Lq, D], k, v [B, Hp, Lk, D]) -> (out, lse)`` in ``run.dtype``."""
    if _on_kernels(run, q):
        from patterndsl.runtime import triton_clusters

        out, lse = triton_clusters.forward(q, k, v, run)
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
    return out.view(batch, heads, q_len, dv_dim), lse.view(batch, heads, q_len)


def _backward(run: _Run, q, k, v, out, lse, dout, dlse, tables, wanted):
    """One part's ``(dq, dk, dv, [d table for table in wanted])`` from the merged ``out``/``lse`` of its heads.

    Recomputed by chunk of tiles; with a score, ``d score / d s`` and the float tables' gradients
    come from autograd on each chunk.
    """
    if _on_kernels(run, q):
        from patterndsl.runtime import triton_clusters

        delta = softmax.delta(dout, out, dlse)
        dq, dk, dv = triton_clusters.backward(q, k, v, dout, lse, delta, run)
        return dq, dk, dv, []
    batch, heads, q_len, d = q.shape
    kv_len, dv_dim = k.shape[2], v.shape[3]
    dtype = run.dtype
    qf, kf, vf = (t.reshape(batch * heads, -1, t.shape[3]).to(dtype) for t in (q, k, v))
    delta = softmax.delta(dout, out, dlse, dtype).reshape(-1)
    lse_flat, do_flat = lse.to(dtype).reshape(-1), dout.to(dtype).reshape(-1, dv_dim)
    dq = torch.zeros(batch * heads * q_len, d, dtype=dtype, device=q.device)
    dk = torch.zeros(batch * heads * kv_len, d, dtype=dtype, device=q.device)
    dv = torch.zeros(batch * heads * kv_len, dv_dim, dtype=dtype, device=q.device)
    leaves = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(tables)]
    dtables = [torch.zeros_like(tables[i]) for i in wanted]
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
            for acc, grad in zip(dtables, got[1:], strict=True):
                if grad is not None:
                    acc += grad
        dq.index_add_(0, qrow, (torch.matmul(ds, kt) * run.scale).reshape(-1, d))
        dk.index_add_(0, krow, (torch.matmul(ds.transpose(-1, -2), qt) * run.scale).reshape(-1, d))
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), dtables
