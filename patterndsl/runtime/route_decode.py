"""Runtime stage: decoding steps of ``route(...)`` patterns from block summaries kept in the cache (issue 14).

Comes in: a small paged call (``Lq`` up to :data:`MAX_ROWS` queries per element, no gradient) over the
pages of a :class:`patterndsl.PagedKVCache` whose pattern is the call's, and that cache's
:class:`BlockSummaries`. Goes out: ``(out, lse)`` equal to the element-by-element call (LANGUAGE.md
sections 2 and 9), or None when the call is not one this path serves (the caller then runs the general
path).

Steps that need gradients (or are traced by ``torch.compile``) are not served here: the summaries hold no
graph. They run element by element through the op (:func:`patterndsl.runtime.ragged.per_element`), which
gathers each element's pages by differentiable indexing, recomputes the choice by pooling all its key blocks
(``O(Lk * head_dim)`` per step, what the forward of a training step over those keys costs anyway; the same
choice as the summaries' up to rounding) and recomputes ``P`` from ``lse`` in the backward; the pages'
gradients sum through the block table.

Why: a route scores every key block by its pooled keys. Recomputing that pooling over the whole cache at
every step costs ``O(Lk * head_dim)``; the cache instead keeps, per route, element and key-value head, each
key block's pooling (a running sum and count for ``mean``, a running maximum for ``max``, the last key for
``landmark``), updated as keys are appended, so a block's summary changes only while it is being filled.
A step then pools its own queries, scores them against the summaries, takes each group's top-k among its
candidates, and attends over the keys the static part of the pattern reaches plus the chosen blocks.

How, per element ``b`` with ``Lq_b`` queries over ``Lk_b`` keys:

- candidates: the ``among`` pattern's row tiles for the element's rows (the ragged plan family,
  :func:`patterndsl.runtime.ragged.row_tiles`): full tiles make their keys' blocks candidates of every
  group in the rows, partial tiles are evaluated on the rows only;
- the keys a row may attend: at a pair where every route is false the pattern equals its *static part*
  (every route replaced by ``empty``), so the allowed keys lie in the static part's row tiles plus the
  chosen blocks; the mask on those keys is the pattern's *corners* (each route replaced by ``empty`` or
  ``full``) picked per pair by the routes' choices (exact, any polarity);
- on the CPU (:func:`forward`) the keys are gathered through the block table (only those positions) and
  attended as one tile by the ragged executor's tile math; on Triton (:func:`forward_triton`) the same choice
  goes to the ragged split-K kernels as a small table of chosen blocks
  (:mod:`patterndsl.runtime.triton_ragged_route`), which read the static part's key tiles and the chosen
  blocks' through the block table in place, with kernels built once for every step.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import torch

from patterndsl import ir, semantics
from patterndsl.errors import InputError
from patterndsl.runtime import paged, ragged, routing

#: Query rows per element up to which a call counts as a decoding step here.
MAX_ROWS = 16
#: Routes per head rule up to which the corners (2^r static patterns) are evaluated.
MAX_ROUTES = 3
#: Primitives whose meaning reads only the two positions: the ragged plan family serves them.
_POSITIONS = ragged.POSITION_PRIMS | {"blocks", "summary", "landmarks"}


def summarized(prim: ir.Prim) -> bool:
    """Whether a route's block summaries can be kept incrementally (blocks are runs of positions)."""
    return not isinstance(prim.arg("block"), tuple) and not isinstance(prim.arg("qblock"), tuple)


def summary_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype route scores are computed in for keys of ``dtype`` (float32 at least)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class BlockSummaries:
    """Each route's pooled keys per key block, per batch element and key-value head.

    ``sums[prim]`` is ``[batch, kv_heads, capacity, head_dim]``: for ``score = mean`` the sum of the block's
    keys (in the order they were appended, as :func:`patterndsl.semantics.route_scores` adds them), for
    ``max`` their elementwise maximum, for ``landmark`` the block's last key; ``counts[prim]`` the keys
    appended to each block.
    """

    def __init__(self, prims, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.prims = tuple(prims)
        self.dtype = summary_dtype(dtype)
        self.sums = {p: torch.zeros(batch, kv_heads, 0, head_dim, dtype=self.dtype, device=device) for p in self.prims}
        self.counts = {p: torch.zeros(batch, 0, dtype=torch.int64, device=device) for p in self.prims}

    def _grow(self, prim: ir.Prim, blocks: int) -> None:
        sums = self.sums[prim]
        if sums.shape[2] >= blocks:
            return
        cap = max(blocks, 2 * sums.shape[2], 4)
        fill = float("-inf") if prim.arg("score") == "max" else 0.0
        more = sums.new_full((*sums.shape[:2], cap - sums.shape[2], sums.shape[3]), fill)
        self.sums[prim] = torch.cat([sums, more], 2)
        counts = self.counts[prim]
        self.counts[prim] = torch.cat([counts, counts.new_zeros(counts.shape[0], cap - counts.shape[1])], 1)

    def append(self, b: int, start: int, keys: torch.Tensor) -> None:
        """Fold element ``b``'s keys ``[kv_heads, n, head_dim]`` at positions ``start ...`` into the summaries
        (``keys`` as the cache stores them: the scores read the stored values)."""
        n = keys.shape[1]
        if not n:
            return
        kf = keys.to(self.dtype)
        pos = torch.arange(start, start + n, device=keys.device)
        for prim in self.prims:
            block = prim.arg("block")
            ids = torch.div(pos, block, rounding_mode="floor")
            self._grow(prim, int(ids[-1]) + 1)
            sums, score = self.sums[prim][b], prim.arg("score")
            if score == "max":
                sums.scatter_reduce_(1, ids.view(1, -1, 1).expand_as(kf), kf, "amax", include_self=True)
            elif score == "landmark":
                last = torch.full((int(ids[-1]) + 1,), -1, dtype=torch.int64, device=keys.device)
                last.scatter_reduce_(0, ids, torch.arange(n, device=keys.device), "amax", include_self=True)
                got = torch.nonzero(last >= 0).flatten()
                sums[:, got] = kf[:, last[got]]
            else:
                sums.index_add_(1, ids, kf)
            self.counts[prim][b].index_add_(0, ids, torch.ones_like(ids))

    def pooled(self, prim: ir.Prim, b: int, n_blocks: int) -> torch.Tensor:
        """``poolk`` of element ``b``'s first ``n_blocks`` key blocks: ``[kv_heads, n_blocks, head_dim]``."""
        x = self.sums[prim][b, :, :n_blocks]
        if prim.arg("score") in ("max", "landmark"):
            return x
        members = self.counts[prim][b, :n_blocks].clamp(min=1).to(x.dtype)
        return x / members.view(1, -1, 1)


# --------------------------------------------------------------------------- static pieces of the pattern


def _static_ir(pattern: ir.PatternIR, fn) -> ir.PatternIR:
    """``pattern`` with every head rule's node ``fn(node)`` (and no run-time inputs, score or layout)."""
    rules = tuple(dataclasses.replace(r, node=fn(r.node)) for r in pattern.heads)
    default = None if pattern.default is None else fn(pattern.default)
    return dataclasses.replace(pattern, heads=rules, default=default, score=None, inputs=())


@functools.lru_cache(maxsize=64)
def static_part(pattern: ir.PatternIR) -> ir.PatternIR:
    """``pattern`` with every route replaced by ``empty``: what a pair where no route holds is decided by."""
    return _static_ir(pattern, lambda node: ir.replace(node, {p: ir.EMPTY for p in ir.routes(node)}))


@functools.lru_cache(maxsize=64)
def among_ir(pattern: ir.PatternIR, prim: ir.Prim) -> ir.PatternIR:
    """A pattern whose every head is ``prim``'s ``among`` (its candidates' rule)."""
    return dataclasses.replace(pattern, heads=(), default=prim.arg("among"), score=None, inputs=(), layout=None)


@functools.lru_cache(maxsize=256)
def _positional(pattern: ir.PatternIR) -> bool:
    for node in pattern.nodes():
        for sub in ir.walk(node):
            if isinstance(sub, ir.Prim) and (sub.name not in _POSITIONS or ragged._reads_sizes(sub)):
                return False
    return True


@functools.lru_cache(maxsize=64)
def serves(pattern: ir.PatternIR) -> bool:
    """Whether this path serves ``pattern``: routes over runs of positions, at most :data:`MAX_ROUTES` per head
    rule, ``among`` and the static part reading positions only, no layout, inputs or score."""
    if pattern.layout is not None or pattern.inputs or pattern.score is not None:
        return False
    prims = {p for node in pattern.nodes() for p in ir.routes(node)}
    if not prims or not all(summarized(p) for p in prims):
        return False
    if any(len(ir.routes(node)) > MAX_ROUTES for node in pattern.nodes()):
        return False
    return _positional(static_part(pattern)) and all(_positional(among_ir(pattern, p)) for p in prims)


def _tiles(pattern: ir.PatternIR, heads: int, kv_heads: int, q_len: int, kv_len: int):
    """``[(group, [tile, ...]), ...]`` of one element's rows in ``pattern``'s ragged plan family."""
    fr = ragged.frame(pattern, ragged.BLOCK, heads, q_len, kv_len, q_len <= kv_len)
    return [(gr, list(ragged.row_tiles(fr, gr))) for gr in ragged._groups(fr.plan, heads, kv_heads)]


# --------------------------------------------------------------------------- the choice


def _groups_of(prim: ir.Prim, q_len: int, kv_len: int) -> tuple[int, torch.Tensor]:
    """``(n_groups, group of each query index)`` as :func:`patterndsl.semantics.route_blocks` numbers them."""
    qblock = prim.arg("qblock")
    offset = kv_len - q_len
    qgroup = torch.div(torch.arange(q_len) + offset, qblock, rounding_mode="floor") - offset // qblock
    return int(qgroup[-1]) + 1, qgroup


def _candidates(pattern, prim, voters, heads, kv_heads, q_len, kv_len, qgroup, n_q):
    """Bool ``[kv_heads, n_groups, n_blocks]``: blocks ``among`` lets some row of the group reach (for some
    voting head of the key-value head)."""
    block, share = prim.arg("block"), heads // kv_heads
    n_k = -(-kv_len // block)
    per_head = torch.zeros(heads, n_q, n_k, dtype=torch.bool)
    onehot = torch.nn.functional.one_hot(qgroup, n_q).T.to(torch.float32)  # [n_q, Lq]
    for gr, tiles in _tiles(among_ir(pattern, prim), heads, kv_heads, q_len, kv_len):
        hs = list(gr.heads)
        for t in tiles:
            blocks = torch.div(t.keys, block, rounding_mode="floor")
            rows = onehot[:, t.i0 : t.i1]
            if t.allowed is None:
                hit = (rows.sum(1) > 0)[:, None].expand(n_q, t.keys.numel())[None]
            else:
                hit = torch.matmul(rows, t.allowed.to(torch.float32)) > 0  # [Hg or 1, n_q, nk]
            got = torch.zeros(hit.shape[0], n_q, n_k).index_add_(2, blocks, hit.to(torch.float32)) > 0
            per_head[hs] |= got.expand(len(hs), n_q, n_k)
    out = torch.zeros(kv_heads, n_q, n_k, dtype=torch.bool)
    for h in voters:
        out[h // share] |= per_head[h]
    return out


def _choose(pattern, summaries, b, q, heads, kv_heads, q_len, kv_len):
    """``{route: (chosen [kv_heads, n_groups, n_blocks], qgroup [Lq])}`` of element ``b``'s rows."""
    out = {}
    for prim, voters in _voters(pattern, heads).items():
        n_q, qgroup = _groups_of(prim, q_len, kv_len)
        n_k = -(-kv_len // prim.arg("block"))
        pooled_k = summaries.pooled(prim, b, n_k)
        dtype = torch.float64 if torch.float64 in (q.dtype, pooled_k.dtype) else torch.float32
        summed = semantics.route_query_pool(prim, q[b : b + 1, :, :q_len], qgroup, n_q, voters, kv_heads, dtype)
        scores = summed[0] @ pooled_k.to(dtype).transpose(-1, -2)
        cand = _candidates(pattern, prim, voters, heads, kv_heads, q_len, kv_len, qgroup, n_q).to(scores.device)
        out[prim] = (routing.top(scores, cand, prim.arg("topk")), qgroup)
    return out


@functools.lru_cache(maxsize=64)
def _voters(pattern: ir.PatternIR, heads: int):
    return routing.voters(pattern, heads)


# --------------------------------------------------------------------------- one element


def _keys(pattern, chosen, heads, kv_heads, q_len, kv_len) -> torch.Tensor:
    """Ascending key positions the rows may attend: the static part's row tiles and the chosen blocks."""
    parts = [t.keys for _, tiles in _tiles(static_part(pattern), heads, kv_heads, q_len, kv_len) for t in tiles]
    for prim, (sel, _) in chosen.items():
        block = prim.arg("block")
        blocks = torch.nonzero(sel.any(0).any(0)).flatten()
        keys = (blocks[:, None] * block + torch.arange(block)).flatten()
        parts.append(keys[keys < kv_len])
    if not parts:
        return torch.zeros(0, dtype=torch.int64)
    return torch.unique(torch.cat(parts))


@functools.lru_cache(maxsize=256)
def _corners(node: ir.Node):
    """``(routes, ((choice, node with each route empty or full as chosen), ...), reads h)`` of a head's node."""
    prims = ir.routes(node)
    corners = tuple(
        (corner, ir.replace(node, {p: (ir.FULL if on else ir.EMPTY) for p, on in zip(prims, corner, strict=True)}))
        for corner in itertools.product((False, True), repeat=len(prims))
    )
    return prims, corners, ir.uses_head(node)


def _allowed(pattern, chosen, heads, kv_heads, q_len, kv_len, keys) -> torch.Tensor:
    """Bool ``[heads, Lq, nk]``: the pattern at the rows and ``keys``, each route as chosen (per key-value head)."""
    ctx = semantics.Context(q_len, kv_len, None)
    share = heads // kv_heads
    rows = torch.arange(q_len)[:, None]
    out = torch.zeros(heads, q_len, keys.numel(), dtype=torch.bool)
    done = {}
    for h in range(heads):
        node = pattern.node_for_head(h)
        if node is None:
            continue
        prims, corners, per_head = _corners(node)
        # Heads of one key-value head share the choice: one evaluation serves them unless the node reads h.
        memo = (node, h if per_head else h // share)
        if memo in done:
            out[h] = out[done[memo]]
            continue
        done[memo] = h
        picks = []
        for prim in prims:
            sel, qgroup = chosen[prim]
            picks.append(sel[h // share][qgroup[:, None], torch.div(keys, prim.arg("block"), rounding_mode="floor")])
        for corner, here in corners:
            where = torch.ones(q_len, keys.numel(), dtype=torch.bool)
            for pick, on in zip(picks, corner, strict=True):
                where &= pick if on else ~pick
            if bool(where.any()):
                out[h] |= where & semantics.evaluate(here, rows, keys[None, :], h, ctx)
    return out


def _gather(k, v, table, b: int, keys: torch.Tensor, allowed: torch.Tensor):
    """Element ``b``'s keys and values at positions ``keys`` through the table: ``[kv_heads, nk, head_dim]``
    (``allowed``: the pattern there, read only where a page is missing)."""
    ps = k.shape[2]
    keys = keys.to(table.device)
    page, off = table[b, torch.div(keys, ps, rounding_mode="floor")], keys % ps
    missing = page < 0
    if bool(missing.any()):
        lost = missing & allowed.any(0).any(0).to(missing.device)
        if bool(lost.any()):
            raise InputError(
                f"block_table has no page (-1) for key position {int(keys[lost][0])} of batch element {b}, which "
                "a query of this call may attend"
            )
        page = page.clamp(min=0)
    kk, vv = paged.flat_rows(k, page, off), paged.flat_rows(v, page, off)
    if kk is None or vv is None:
        kk, vv = k[page, :, off].transpose(0, 1), v[page, :, off].transpose(0, 1)
    if bool(missing.any()):
        kk, vv = (x.masked_fill(missing[None, :, None], 0.0) for x in (kk, vv))
    return kk, vv


def _elements(q, k, v, pattern: ir.PatternIR, data, summaries: BlockSummaries):
    """Per element with queries and reachable keys: ``(b, q_len, keys, allowed, kk, vv)``: the key positions the
    rows may attend under the routes' choice from the summaries, the pattern there (bool ``[heads, Lq_b, nk]``)
    and those keys and values gathered through the block table."""
    kvl, ql = ragged.check_values(q, k, data)
    heads, kv_heads = q.shape[1], k.shape[1]
    for b in range(q.shape[0]):
        q_len, kv_len = ql[b], kvl[b]
        if not q_len or not kv_len:
            continue
        chosen = _choose(pattern, summaries, b, q, heads, kv_heads, q_len, kv_len)
        keys = _keys(pattern, chosen, heads, kv_heads, q_len, kv_len)
        if not keys.numel():
            continue
        allowed = _allowed(pattern, chosen, heads, kv_heads, q_len, kv_len, keys)
        kk, vv = _gather(k, v, data[2], b, keys, allowed)
        yield b, q_len, keys, allowed, kk, vv


def forward(q, k, v, pattern: ir.PatternIR, data, scale: float, summaries: BlockSummaries):
    """``(out, lse)`` of a paged decoding call of a route pattern from the cache's block summaries.

    Args:
        q: ``[batch, heads, Lq, head_dim]``, ``Lq <= MAX_ROWS``.
        k, v: the cache's pages ``[pages, kv_heads, page_size, head_dim]``.
        pattern: the call's (and the cache's) pattern; :func:`serves` holds.
        data: ``[kv_lengths, q_lengths, block_table]`` (int64), the lengths equal to the cache's.
        scale: the softmax scale.
        summaries: the cache's :class:`BlockSummaries`.

    Returns:
        ``(out, lse)`` as the element-by-element call gives them.

    Raises:
        InputError: a page not held that a query of the call attends.
    """
    batch, heads, lq, _ = q.shape
    dt = ragged._compute_dtype(q.dtype)
    out = torch.zeros(batch, heads, lq, v.shape[3], dtype=q.dtype)
    lse = torch.full((batch, heads, lq), float("-inf"), dtype=dt)
    group = _all_heads(heads, k.shape[1])
    for b, q_len, keys, allowed, kk, vv in _elements(q, k, v, pattern, data, summaries):
        tile = ragged.Tile(0, q_len, keys, None if bool(allowed.all()) else allowed)
        fused = ragged.FLASH is not None and q.dtype == torch.float32
        o, row_lse = ragged._run_tile(group, q, b, kk, vv, tile, scale, dt, fused)
        out[b, :, :q_len] = o.to(q.dtype)
        lse[b, :, :q_len] = row_lse
    return out, lse


def forward_triton(
    q, k, v, pattern: ir.PatternIR, data, scale: float, summaries: BlockSummaries, *, cache_finite: bool
):
    """:func:`forward` through the ragged split-K kernels, or None (a non-finite input or an element with more
    queries than keys: the general path).

    The choice is the same (:func:`_choose`, from the summaries, on the tensors' device); the kernels
    (:mod:`patterndsl.runtime.triton_ragged_route`) take it as a small table of chosen blocks per element, key/value
    head and query group, walk the static part's key tiles and the chosen blocks' through the block table, and are
    built once for every step (nothing in them depends on a length or on the choice).

    Args:
        q, k, v, pattern, data, scale, summaries: as :func:`forward`.
        cache_finite: every value the cache was given is finite (the kernels' products would turn a non-finite
            key or value beside an attended one into NaN; the general path treats those exactly).
    """
    from patterndsl.runtime import triton_finite, triton_ragged_route

    if not cache_finite or not triton_finite.all_finite(q):
        return None
    kvl, ql = ragged.check_values(q, k, data)
    if any(n_q > n_kv for n_q, n_kv in zip(ql, kvl, strict=True)):
        return None  # more queries than keys: plan rows are not positions there (the general path is exact)
    heads, kv_heads = q.shape[1], k.shape[1]
    choices = {}
    for b in range(q.shape[0]):
        if ql[b] and kvl[b]:
            choices[b] = _choose(pattern, summaries, b, q, heads, kv_heads, ql[b], kvl[b])

    def attended(b: int, keys: torch.Tensor) -> torch.Tensor:
        return _allowed(pattern, choices[b], heads, kv_heads, ql[b], kvl[b], keys).any(0).any(0)

    return triton_ragged_route.forward(q, k, v, pattern, data, scale, choices, attended)


@functools.lru_cache(maxsize=32)
def _all_heads(heads: int, kv_heads: int) -> ragged.Group:
    return ragged.Group(0, ir.FULL, tuple(range(heads)), heads, kv_heads)
