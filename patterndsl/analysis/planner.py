"""Stage 4 (block plan), the entry point: bound pattern + sizes -> :class:`BlockPlan`.

Comes in: a checked :class:`~patterndsl.ir.PatternIR`, lengths, head count,
tile size and the ordering policy. Goes out: the block plan — head groups
with their CSR/CSC tile lists, runs and closed forms, the token permutations
and statistics. The pipeline is: check lengths -> group heads -> rewrite each
group's node -> for every candidate order, classify tiles (engine) -> keep the
order with the least visited work -> assemble lists, forms and statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from patterndsl import config, ir
from patterndsl.analysis import axes, hierarchy, reorder, routeplan, routeruns, tiles
from patterndsl.analysis import engine as eng
from patterndsl.analysis.classify import Env
from patterndsl.analysis.plan import BlockPlan, HeadGroup, PlanStats, Runs, RunTiles, TileFlags, TileList
from patterndsl.analysis.rewrite import simplify
from patterndsl.analysis.serial import serial
from patterndsl.errors import HeadsError, PatternTypeError, PatternValueError
from patterndsl.sizes import Sizes


def _validate(block, order) -> tuple[int, int]:
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in block)
    ):
        raise PatternTypeError(f"block must be a pair of positive integers (BM, BN), got {block!r}")
    if block[0] <= 0 or block[1] <= 0:
        raise PatternValueError(f"block sizes must be positive, got {tuple(block)!r}")
    if order not in ("auto", "identity"):
        raise PatternValueError(f"order must be 'auto' or 'identity', got {order!r}")
    return int(block[0]), int(block[1])


#: Largest length, head count and tile grid a plan represents: tile keys ``m * n_kv_tiles + n``
#: and positions times small coefficients stay inside int64.
MAX_LENGTH = 1 << 48
MAX_HEADS = 1 << 20
#: Tiles per side. A plan keeps per-tile arrays on each side and its work and peak memory grow by
#: about 20-60 us and 0.5-2 KB per tile of a side (causal at 2**19 query tiles: ~20 s, ~550 MB on a
#: loaded machine), so a side beyond this is refused at once rather than built for minutes in
#: gigabytes: 2**26 tokens in 128-token tiles, 2**31 tokens in 4096-token tiles.
MAX_SIDE_TILES = 1 << 19


def _representable(q_len, kv_len, heads, bm: int, bn: int) -> None:
    """Refuse sizes the plan cannot represent (a PatternError, not an overflow or a runaway loop)."""
    for name, value, limit in (
        ("q_len", q_len, MAX_LENGTH),
        ("kv_len", kv_len, MAX_LENGTH),
        ("heads", heads, MAX_HEADS),
    ):
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise PatternValueError(f"{name}={value} is beyond what a block plan represents (at most {limit})")
    kv_len = q_len if kv_len is None else kv_len
    if isinstance(q_len, int) and isinstance(kv_len, int):
        nqb, nkb = -(-q_len // bm), -(-kv_len // bn)
        # Per-tile arrays on each side are the least a plan holds.
        if max(nqb, nkb) > MAX_SIDE_TILES:
            fit = tuple(
                max(b, 1 << (-(-length // MAX_SIDE_TILES) - 1).bit_length())
                for b, length in ((bm, q_len), (bn, kv_len))
            )
            raise PatternValueError(
                f"{nqb:,} x {nkb:,} tiles of {bm}x{bn}: a side of more than {MAX_SIDE_TILES:,} tiles is beyond what a "
                f"block plan represents; use larger tiles (block={fit}) or shorter sequences"
            )
        if nqb * nkb >= 1 << 62:
            raise PatternValueError(f"{nqb} x {nkb} tiles are beyond what a block plan represents (< 2**62)")


#: Longest side a token order other than the identity is built for: it is a permutation held as
#: int64 per token (128 MiB at 2**24, 16 GiB at 2**31), so longer sides are planned in identity order.
MAX_ORDER_LENGTH = 1 << 24


def _materialisable(cands: list, q_len: int, kv_len: int) -> list:
    """The candidate orders whose permutations a plan may build: all, or the identity beyond MAX_ORDER_LENGTH."""
    if max(q_len, kv_len) <= MAX_ORDER_LENGTH:
        return cands
    kept = [c for c in cands if c[3]]
    if not kept:
        raise PatternValueError(
            f"Lq={q_len}, Lk={kv_len}: a token order other than the identity is built for at most "
            f"{MAX_ORDER_LENGTH:,} tokens a side"
        )
    return kept


#: Head groups a plan holds where ``heads`` lines read ``h`` (one group, planned alone, per such head).
MAX_HEAD_GROUPS = 1 << 8


def _head_groups(pir: ir.PatternIR, heads: int) -> tuple[list[tuple[ir.Node, list[int]]], list[int]]:
    """Heads grouped by their pattern: work follows the ``heads`` lines, one group per head only where ``h`` is read."""
    from patterndsl.semantics import head_segments

    segments = head_segments(pir, heads)
    per_head = sum(hi - lo for lo, hi, node in segments if ir.uses_head(node))
    if per_head > MAX_HEAD_GROUPS:
        lines = ", ".join(f"{lo}..{hi}" for lo, hi, node in segments if ir.uses_head(node))
        span = next((r.span for r in pir.heads if r.lo < heads and ir.uses_head(r.node)), pir.span)
        raise HeadsError(
            f"heads {lines} read h: {per_head:,} heads planned one by one, more than a block plan holds "
            f"({MAX_HEAD_GROUPS:,}); use fewer heads",
            span,
        )
    groups: list[tuple[ir.Node, list[int]]] = []
    index: dict = {}
    group_of = np.empty(heads, np.int64)
    for lo, hi, node in segments:
        if ir.uses_head(node):
            for h in range(lo, hi):
                group_of[h] = len(groups)
                groups.append((node, [h]))
            continue
        if node not in index:
            index[node] = len(groups)
            groups.append((node, []))
        groups[index[node]][1].extend(range(lo, hi))
        group_of[lo:hi] = index[node]
    return groups, group_of.tolist()


@dataclass(frozen=True)
class _Classified:
    """One head group's tiles in one order, and the engine that found them (for counting).

    ``keys``/``state`` list the tiles, except those in ``layered``'s runs (full and partial tiles
    found whole at coarse levels, :mod:`~patterndsl.analysis.hierarchy`).
    """

    keys: np.ndarray
    state: np.ndarray
    engine: eng.Engine
    routed: routeplan.RoutedTiles | None  # patterns with route: what the choice may change
    layered: hierarchy.Layered | None = None

    def _runs(self, full: bool):
        if self.layered is None:
            return None
        lay = self.layered
        return (lay.row, lay.lo, lay.hi) if full else lay.partial

    def runs_area(self, rows: np.ndarray, cols: np.ndarray, full: bool) -> int:
        """Pairs of the tiles under the full (or partial) runs (``rows``/``cols``: each tile's length per side)."""
        runs = self._runs(full)
        if runs is None:
            return 0
        m, lo, hi = runs
        csum = np.concatenate([[0], np.cumsum(cols)])
        return int((rows[m] * (csum[hi] - csum[lo])).sum())

    def runs_tiles(self, full: bool) -> int:
        runs = self._runs(full)
        return 0 if runs is None else int((runs[2] - runs[1]).sum())

    def area(self, rows: np.ndarray, cols: np.ndarray) -> int:
        """Pairs of every listed and run tile."""
        n = len(cols)
        listed = int((rows[self.keys // n] * cols[self.keys % n]).sum())
        if isinstance(self.routed, routeruns.RoutedRuns):
            listed += int(_run_areas(self.routed, rows, cols).sum())
        return listed + self.runs_area(rows, cols, True) + self.runs_area(rows, cols, False)


def _run_areas(runs, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Pairs of each run ``(row, lo, hi)`` of tiles (``rows``/``cols``: each tile's length per side)."""
    csum = np.concatenate([[0], np.cumsum(cols)])
    return rows[runs.row] * (csum[runs.hi] - csum[runs.lo])


@dataclass(frozen=True)
class _Candidate:
    """One order's plan of every head group, and the pairs its tiles visit."""

    desc: str
    qside: tiles.Side
    kside: tiles.Side
    groups: tuple[_Classified, ...]
    work: int


#: Element evaluations a reordering candidate may spend before it is dropped.
CANDIDATE_BUDGET = 1 << 24


#: A candidate order with more query tiles than this is first planned on this many of them.
SAMPLE_ROWS = 16
#: A candidate whose sampled estimate is at least this many times the best order's visited pairs is skipped.
SAMPLE_MARGIN = 1.1


def loses(candidate: tuple, groups, sizes: Sizes, bm: int, bn: int, bound: int) -> bool:
    """True when the order ``candidate`` (as :func:`plan_order` takes it) will not visit fewer than ``bound`` pairs.

    Decided on a sample of its query tiles (:func:`_sampled_work`, at least :data:`SAMPLE_MARGIN`
    times ``bound``): a heuristic that only ever drops a candidate order, never changes a tile.
    """
    return _sampled_work(*candidate, groups, sizes, bm, bn) >= SAMPLE_MARGIN * bound


#: An order other than the identity whose sample extrapolates to more non-empty tiles (over its head
#: groups) is not planned: it would list them one by one, where the identity keeps runs.
MAX_LISTED_TILES = 1 << 20

#: Beyond this many tiles, every candidate order is estimated before any is planned whole.
ESTIMATE_FIRST_TILES = 1 << 16


def _plan_sequence(cands: list, groups, sizes: Sizes, bm: int, bn: int):
    """``(estimate, sequence)``: each candidate's sampled visited pairs (:func:`_sampled_work`, on first
    use) and the order in which to plan the candidates whole.

    Beyond :data:`ESTIMATE_FIRST_TILES` tiles, the candidate with the fewest estimated pairs is planned
    first, so its pairs bound the others from the start (they are then skipped on their estimates
    alone); the identity stays first unless some order's estimate beats it by more than
    :data:`SAMPLE_MARGIN`. A dilated grid neighborhood's identity order at a million tokens took
    seconds to plan for an order that never wins. Below it, the identity is planned first and the
    others are estimated only to be skipped (a sample costs about what a small plan does).
    """
    found: dict[int, float] = {}

    def estimate(i: int) -> float:
        if i not in found:
            found[i] = _sampled_work(*cands[i], groups, sizes, bm, bn)
            # the sides kept for a whole plan: the identity's and the lowest estimate's, the orders that
            # may be planned first (every order's at once held 25 MB more at a million tokens)
            low = min(found, key=lambda j: (found[j], j))
            for j in found:
                if j not in (0, low):
                    _forget(cands[j], sizes, bm, bn)
        return found[i]

    tiles_ = -(-sizes.q_len // bm) * -(-sizes.kv_len // bn)
    if len(cands) == 1:
        return estimate, [0]
    if tiles_ <= ESTIMATE_FIRST_TILES:
        first = 0
    else:
        low = min(estimate(i) for i in range(len(cands)))
        first = 0 if estimate(0) <= SAMPLE_MARGIN * low else [estimate(i) for i in range(len(cands))].index(low)
    # the others by their estimates, fewest pairs first: the best of them bounds the rest from the start
    # (in list order, a 2-D dilated neighborhood's 16K plan planned three box orders whole, where the
    # best one alone skips the others on their estimates); ties go to the earlier order as before
    rest = sorted((i for i in range(len(cands)) if i != first), key=lambda i: (estimate(i), i))
    return estimate, [first, *rest]


def _sampled_work(desc, qsegs, ksegs, identity, groups, sizes: Sizes, bm, bn) -> float:
    """The visited pairs of a candidate order extrapolated from :data:`SAMPLE_ROWS` evenly spaced query tiles.

    Every key tile of each sampled query tile is classified exactly (``Engine.run`` on that domain),
    so the cost is ``SAMPLE_ROWS * n_key_tiles`` tiles, while planning the order whole costs its
    non-empty tiles: for Sparse Transformer "strided" at 1M in residue classes (no coarse levels
    outside the identity order) that was tens of millions of tiles for an order that never wins.
    Only the choice of order depends on the estimate, never a tile's state. 0 (plan it whole) when
    the order has at most ``2 * SAMPLE_ROWS`` query tiles; infinite when the sample alone needs more
    element evaluations than the candidate budget. Measured at 16K, the estimate was within 5% of the
    visited pairs for every suite order (middle rows of strata: an edge row with ``global`` weighs one
    stratum, not ``n_tiles / SAMPLE_ROWS``); an order is skipped only beyond :data:`SAMPLE_MARGIN` times
    the best one.
    """
    qside, kside = _sides(qsegs, ksegs, identity, sizes, bm, bn)
    if qside.n_tiles <= 2 * SAMPLE_ROWS:
        return 0.0
    rows, cols = np.diff(qside.starts), np.diff(kside.starts)
    # SAMPLE_ROWS rows spread by the golden ratio: one row per stratum, never aligned with the
    # period of a residue-class order (the strata's middles were each class's first tile, where
    # causal leaves the fewest keys: 7x too few tiles for "strided" in classes mod 128); the first
    # and last rows (global rows, sinks) are outliers and never taken
    spread = np.modf((np.arange(SAMPLE_ROWS) + 1) * 0.6180339887498949)[0]
    sample = np.unique(np.clip((spread * qside.n_tiles).astype(np.int64), 1, qside.n_tiles - 2))
    # the sampled query tiles as a side of their own: their candidates come from the primitives'
    # bounds, as in a whole plan, rather than from every key tile
    sampled = qside.take(sample)
    work = listed = 0
    for node, heads in groups:
        engine = eng.Engine(sampled, kside, Env(sizes, heads[0]), CANDIDATE_BUDGET)
        try:
            keys, _ = engine.run(simplify(node))
        except eng.OverBudget:
            return math.inf  # its sample alone needs more element evaluations than the whole order may spend
        work += int((rows[sample][keys // kside.n_tiles] * cols[keys % kside.n_tiles]).sum()) * len(heads)
        listed += len(keys)
    if not identity and listed * qside.n_tiles > MAX_LISTED_TILES * len(sample):
        # another order lists every non-empty tile (no coarse runs): Sparse Transformer "strided" in
        # classes mod 128 at 1M visits fewer pairs but lists 7M tiles (20 s, 1.4 GB to plan)
        return math.inf
    return work * sizes.q_len / max(int(rows[sample].sum()), 1)


#: The sides laid out during the current :func:`plan` (None outside it), by candidate order: an order's
#: sample and its whole plan share them (at a million tokens, laying out a box order's sides took
#: 7 ms, and most of a sample's time). ``key -> (qsegs, ksegs, qside, kside)``; the segments are kept
#: so that a key's ``id``s stay theirs.
_laid_out: dict | None = None


def _sides(qsegs, ksegs, identity, sizes: Sizes, bm: int, bn: int, last=False) -> tuple[tiles.Side, tiles.Side]:
    """The query and key sides of a candidate order (laid out once per :func:`plan`; ``last``: its last
    use, the entry is dropped)."""
    key = (id(qsegs), id(ksegs), identity, sizes, bm, bn)
    hit = None if _laid_out is None else _laid_out.get(key)
    if hit is not None and hit[0] is qsegs and hit[1] is ksegs:
        if last:
            del _laid_out[key]
        return hit[2], hit[3]
    if last:
        return _lay_out(qsegs, ksegs, identity, sizes, bm, bn)
    qside, kside = _lay_out(qsegs, ksegs, identity, sizes, bm, bn)
    if _laid_out is not None:
        _laid_out[key] = (qsegs, ksegs, qside, kside)
    return qside, kside


def _forget(candidate: tuple, sizes: Sizes, bm: int, bn: int) -> None:
    """Drops the sides of ``candidate`` (an order skipped: they are not used again)."""
    _, qsegs, ksegs, identity = candidate
    if _laid_out is not None:
        _laid_out.pop((id(qsegs), id(ksegs), identity, sizes, bm, bn), None)


def _lay_out(qsegs, ksegs, identity, sizes: Sizes, bm: int, bn: int) -> tuple[tiles.Side, tiles.Side]:
    extents = sizes.layout.shape if sizes.layout is not None else (sizes.kv_len,)
    qside = tiles.build_side(qsegs, sizes.q_len, bm, sizes.offset, extents, identity)
    return qside, _key_side(qside, qsegs, ksegs, sizes, bn, extents, identity)


def _key_side(qside: tiles.Side, qsegs, ksegs, sizes: Sizes, bn: int, extents, identity) -> tiles.Side:
    # The query side again when both sides are cut alike (grid box orders): built once, not twice.
    if ksegs is qsegs and sizes.offset == 0 and bn == qside.block and sizes.kv_len == sizes.q_len:
        return qside
    return tiles.build_side(ksegs, sizes.kv_len, bn, 0, extents, identity)


def _plan_order(desc, qsegs, ksegs, identity, groups, sizes: Sizes, bm, bn, bound=None, limit=False):
    """Plan every head group in one order; None when the order cannot beat ``bound`` visited pairs.

    With a bound (or ``limit``: an order planned before the identity, which remains to fall back
    on), at most :data:`CANDIDATE_BUDGET` elements are evaluated, else None.
    """
    qside, kside = _sides(qsegs, ksegs, identity, sizes, bm, bn, last=True)
    rows, cols = np.diff(qside.starts), np.diff(kside.starts)
    found = []
    work = 0
    budget = None if bound is None and not limit else CANDIDATE_BUDGET
    for node, heads in groups:
        env = Env(sizes, heads[0])
        engine = eng.Engine(qside, kside, env, budget)
        rewritten = simplify(node)
        layered = None
        try:
            if ir.is_dynamic(node):
                routed = routeplan.classify(engine, rewritten)
                if isinstance(routed, routeruns.RoutedRuns):
                    keys, state = np.zeros(0, np.int64), np.zeros(0, np.int8)  # the tiles are runs
                else:
                    keys, state = routed.keys, routed.state
            else:
                routed = None
                if hierarchy.usable(rewritten, qside, kside, sizes.layout, reordered=True):
                    layered = hierarchy.classify(engine, rewritten)
                if layered is None:
                    if bound is not None and isinstance(rewritten, ir.Prim):
                        engine.watch = (rewritten, _floor(bound - work, len(heads), rows, cols, kside.n_tiles))
                    keys, state = engine.run(rewritten)
                else:
                    keys, state = layered.keys, layered.state
        except eng.OverBudget:
            return None
        finally:
            engine.watch = None  # the engine counts later (assembly): never against this bound
        budget = engine.budget
        got = _Classified(keys, state, engine, routed, layered)
        work += got.area(rows, cols) * len(heads)
        if bound is not None and work >= bound:
            return None
        found.append(got)
    return _Candidate(desc, qside, kside, tuple(found), work)


def _floor(room: int, heads: int, rows: np.ndarray, cols: np.ndarray, nkb: int):
    """An :attr:`Engine.watch <patterndsl.analysis.engine.Engine.watch>` floor: raises ``OverBudget`` once
    the tiles it was given visit at least ``room`` pairs over ``heads`` heads.

    They are a part of the order's non-empty tiles, so it would visit at least as many pairs: it
    cannot beat the bound, and :func:`_plan_order` gives it up as it would after the whole plan (the
    video neighborhood's 2x8x8 and 4x4x8 box orders at a million tokens on a 63 x 125 x 125 grid, their
    estimates within :data:`SAMPLE_MARGIN` of the identity's, were planned whole to lose by 9% and 12%).
    """

    def floor(keys: np.ndarray) -> None:
        if int((rows[keys // nkb] * cols[keys % nkb]).sum()) * heads >= room:
            raise eng.OverBudget

    return floor


def plan_order(candidate: tuple, groups, sizes: Sizes, bm: int, bn: int, bound: int | None = None):
    """Classify the tiles of head groups in one candidate order (no lists, no counts): for the split search.

    Args:
        candidate: ``(description, query segments, key segments, identity)`` as ``reorder.candidates`` gives.
        groups: ``[(node, heads)]``.
        sizes: the sizes.
        bm, bn: the tile size.
        bound: give up (None) once the visited pairs reach this.

    Returns:
        The candidate (``work``: visited pairs over heads; ``groups[i].keys``: visited tiles), or None.
    """
    return _plan_order(*candidate, groups, sizes, bm, bn, bound)


@serial
def plan(
    pir: ir.PatternIR,
    q_len: int,
    kv_len: int | None = None,
    heads: int = 1,
    block=(128, 128),
    order="auto",
    orders=None,
    parts=None,
):
    """The block plan of a pattern at given sizes (``Pattern.plan``).

    Args:
        pir: the bound pattern.
        q_len: number of queries ``Lq``.
        kv_len: number of keys ``Lk`` (default ``Lq``).
        heads: number of query heads.
        block: tile sizes ``(BM, BN)``.
        order: ``"auto"`` (may reorder tokens to make tiles denser) or ``"identity"``.
        orders: the candidate orders to choose from (``reorder.candidates``' entries) instead of
            the pattern's own: plans of related patterns (the bounds of a pattern with run-time
            inputs) then share one token order. No parts are tried then.
        parts: options of the split into parts with their own orders (``analysis.parts.PartOptions``;
            default: the current ones); only with ``order="auto"``.

    Returns:
        A :class:`~patterndsl.analysis.plan.BlockPlan`.

    Raises:
        PatternError: bad sizes, block or order, a layout that does not fit, heads not covered.
    """

    global _laid_out

    start = time.perf_counter()
    axes.clear_tables()  # the axis tables of one plan, shared by its candidate orders and samples
    outer, _laid_out = _laid_out, {}
    try:
        return _plan(pir, q_len, kv_len, heads, block, order, orders, parts, start)
    finally:
        axes.clear_tables()
        _laid_out = outer


def _plan(pir, q_len, kv_len, heads, block, order, orders, parts, start):
    """:func:`plan` (its arguments, and the time it started)."""
    from patterndsl import check

    bm, bn = _validate(block, order)
    _representable(q_len, kv_len, heads, bm, bn)
    check.check_lengths(pir, q_len, kv_len, heads)
    kv_len = q_len if kv_len is None else kv_len
    if any(ir.reads_inputs(node) for node in pir.nodes()):
        from patterndsl.analysis import inputplan

        return inputplan.static_plan(pir, q_len, kv_len, heads, (bm, bn), order)
    groups, head_group = _head_groups(pir, heads)
    nodes = [n for n, _ in groups]
    cands = reorder.candidates(nodes, pir.layout, q_len, kv_len, (bm, bn)) if orders is None else list(orders)
    if order == "identity":
        cands = cands[:1]
    cands = _materialisable(cands, q_len, kv_len)
    sizes = Sizes(q_len, kv_len, pir.layout, heads)
    try:
        best = None
        tried = 0
        estimate, sequence = _plan_sequence(cands, groups, sizes, bm, bn)
        best_index = sequence[0]

        def rank(i: int) -> int:
            return -1 if i == sequence[0] else i

        for i in sequence:
            desc, qsegs, ksegs, identity = cands[i]
            if (
                best is not None
                and rank(i) > rank(best_index)
                and all((g.state == eng.FULL).all() and not g.runs_tiles(False) for g in best.groups)
            ):
                _forget(cands[i], sizes, bm, bn)
                continue  # every visited pair is allowed: no order visits fewer (an earlier one may tie)
            tried += 1
            bound = None if best is None else best.work
            if bound is not None and estimate(i) >= SAMPLE_MARGIN * bound:
                _forget(cands[i], sizes, bm, bn)
                continue  # its sampled query tiles visit clearly more than the best order: it will not win
            # planned before the identity (a better estimate): budgeted, the identity remains
            limit = bound is None and not identity and any(c[3] for c in cands)
            # ties go to the order planned first when the others were planned in list order: the first
            # of the sequence, then the earlier in the list (whatever order they are planned in now)
            tie = 1 if bound is not None and rank(i) < rank(best_index) else 0
            cand = _plan_order(
                desc, qsegs, ksegs, identity, groups, sizes, bm, bn, None if bound is None else bound + tie, limit
            )
            if cand is not None:
                best, best_index = cand, i
        out = _assemble(pir, best, groups, head_group, sizes, bm, bn, start, tried)
        if order == "auto" and orders is None:
            out = _with_parts(pir, out, parts)
    except MemoryError:
        raise PatternValueError(
            f"not enough memory for the block plan at Lq={q_len}, Lk={kv_len} with {bm}x{bn} tiles: "
            f"use larger tiles (block=...) or shorter sequences"
        ) from None
    if config.debug_verify():
        _verify_dense(out, nodes)
    return out


def _with_parts(pir, single: BlockPlan, options) -> BlockPlan:
    from patterndsl.analysis import parts

    if any(ir.is_dynamic(n) for n in pir.nodes()):
        return single  # a route's tiles are chosen at each call, in token order: one pass
    # searched on first use (an executor's first call): Pattern.plan() alone stays as fast as before
    options = parts.current() if options is None else options
    source = functools.cache(functools.partial(parts.split, pir, single, options))
    stats = dataclasses.replace(single.stats, parts_source=source)
    return dataclasses.replace(single, parts_source=source, stats=stats)


#: Largest ``heads * Lq * Lk`` checked against the dense mask under ``PATTERNDSL_DEBUG=1``.
DEBUG_VERIFY_LIMIT = 1 << 24


def _verify_dense(p: BlockPlan, nodes) -> None:
    """Debug mode: compare the plan with the tile reduction of the dense meaning (small sizes only)."""
    from patterndsl import semantics
    from patterndsl.analysis.plan import tile_reduce

    if any(ir.is_dynamic(n) for n in nodes) or p.heads * p.q_len * p.kv_len > DEBUG_VERIFY_LIMIT:
        return
    dense = semantics.mask(p.pattern, p.q_len, p.kv_len, p.heads)
    ref = tile_reduce(dense[:, p.q_order][:, :, p.kv_order], p.block_m, p.block_n)
    if not torch.equal(ref, p.tiles()) or p.stats.allowed_pairs != int(dense.sum()):
        raise AssertionError(f"block plan of {p.pattern.name!r} differs from its dense mask (order {p.order})")
    if p.parts:
        # each part was verified when it was planned; here: disjoint, and together the pattern
        total = sum(semantics.mask(part.pattern, p.q_len, p.kv_len, p.heads).to(torch.int8) for part in p.parts)
        if not torch.equal(total, dense.to(torch.int8)):
            raise AssertionError(f"the parts of {p.pattern.name!r} are not a partition of its mask")


def _form(node, qside, kside, runs, nqb, nkb):
    from patterndsl.analysis.forms import run_form

    return run_form(node, qside, kside, runs, nqb, nkb)


def _assemble(pir, cand: _Candidate, groups, head_group, sizes: Sizes, bm, bn, start, n_orders):
    q_len, kv_len, heads = sizes.q_len, sizes.kv_len, sizes.heads
    nqb, nkb = cand.qside.n_tiles, cand.kside.n_tiles
    rows = np.diff(cand.qside.starts)
    cols = np.diff(cand.kside.starts)
    stats = PlanStats(total_pairs=heads * q_len * kv_len)
    out_groups = []
    evaluated = 0
    for (node, hs), found in zip(groups, cand.groups, strict=True):
        keys, state, engine, routed = found.keys, found.state, found.engine, found.routed
        # The order is chosen: its counts are due whatever budget its classification had left (a
        # budgeted order that won raised OverBudget here, out of Pattern.plan, when its counts needed more).
        engine.tally.budget = None
        if isinstance(routed, routeruns.RoutedRuns):
            out_groups.append(_routed_runs_group(pir, node, hs, found, stats, rows, cols, cand))
            evaluated += engine.tally.evaluated
            _add_tally(stats, engine)
            continue
        m, n = keys // nkb, keys % nkb
        area = rows[m] * cols[n]
        partial = state == eng.PARTIAL
        rewritten = simplify(node)
        dyn = state == eng.DYNAMIC
        counted = partial
        if routed is not None:
            # Tiles open candidates meet may change mask with the choice: bounded, not counted.
            dyn = routed.open & (state != eng.FULL)
            counted = partial & ~dyn
            unproven = routed.unproven * len(hs)
            stats.extra["tiles_dynamic_unproven"] = stats.extra.get("tiles_dynamic_unproven", 0) + unproven
        allowed = eng.symbolic_total(rewritten, q_len, kv_len, pir.layout, engine.env)
        if allowed is None and routed is None:
            allowed = engine.total_by_terms(rewritten)  # a grid's union with a global: by products over axes
        if allowed is None and routed is not None:
            # Tiles no route reaches count without the routes (cheaper than with the choice).
            forced = engine.fixing(routed.forced)
            counts = eng.count_tiles(forced, rewritten, keys[counted & routed.route_mask]).sum()
            counts += eng.count_tiles(engine, rewritten, keys[counted & ~routed.route_mask]).sum()
            allowed = int(area[state == eng.FULL].sum()) + int(counts)
        elif allowed is None:
            counts = eng.count_tiles(engine, rewritten, keys[counted])
            allowed = int(area[state == eng.FULL].sum()) + int(counts.sum()) + found.runs_area(rows, cols, True)
            allowed += 0 if found.layered is None else found.layered.partial_allowed
        nh = len(hs)
        if dyn.any():
            # run-time tiles: their allowed pairs depend on the data; record the bound
            stats.extra["dynamic_pairs_bound"] = stats.extra.get("dynamic_pairs_bound", 0) + int(area[dyn].sum()) * nh
        stats.allowed_pairs += allowed * nh
        stats.visited_pairs += found.area(rows, cols) * nh
        stats.tiles_full += (int((state == eng.FULL).sum()) + found.runs_tiles(True)) * nh
        stats.tiles_partial += (int(partial.sum()) + found.runs_tiles(False)) * nh
        stats.tiles_dynamic += int((state == eng.DYNAMIC).sum()) * nh
        stats.tiles_empty += (nqb * nkb - len(keys) - found.runs_tiles(True) - found.runs_tiles(False)) * nh
        evaluated += engine.tally.evaluated
        _add_tally(stats, engine)
        if found.layered is None:
            tl = TileList.from_sorted(m, n, state, nqb, nkb)
            runs = Runs.from_tiles(tl, nqb)
        else:
            lay = found.layered
            pr, plo, phi = lay.partial
            runs = Runs.merged(
                np.concatenate([m, lay.row, pr]),
                np.concatenate([n, lay.lo, plo]),
                np.concatenate([n + 1, lay.hi, phi]),
                np.concatenate(
                    [
                        state.astype(np.int8),
                        np.full(len(lay.row), eng.FULL, np.int8),
                        np.full(len(pr), eng.PARTIAL, np.int8),
                    ]
                ),
            )
            tl = RunTiles(runs, nqb, nkb)
        form = None
        if cand.qside.identity:
            form = functools.partial(_form, rewritten, cand.qside, cand.kside, runs, nqb, nkb)
        rmask = None if routed is None else TileFlags.from_flags(routed.route_mask, tl, nqb, nkb)
        out_groups.append(HeadGroup(tuple(hs), node, tl, runs, form, rmask))
    stats.tiles_evaluated = evaluated
    stats.extra["orders_tried"] = n_orders
    stats.plan_seconds = time.perf_counter() - start
    q_order = None if cand.qside.order is None else torch.from_numpy(cand.qside.order.astype(np.int64, copy=False))
    kv_order = None if cand.kside.order is None else torch.from_numpy(cand.kside.order.astype(np.int64, copy=False))
    return BlockPlan(
        pir, q_len, kv_len, heads, bm, bn, q_order, kv_order, cand.desc, tuple(out_groups), tuple(head_group), stats
    )


def _add_tally(stats: PlanStats, engine: eng.Engine) -> None:
    stats.elements_evaluated += engine.tally.elements + engine.env.elements
    counted_tiles = stats.extra.get("tiles_counted_by_evaluation", 0) + engine.tally.counted
    stats.extra["tiles_counted_by_evaluation"] = counted_tiles
    stats.extra["tiles_classified"] = stats.extra.get("tiles_classified", 0) + engine.tally.classified
    stats.extra["boxes_searched"] = stats.extra.get("boxes_searched", 0) + engine.tally.searched


def _routed_runs_group(pir, node, hs, found: _Classified, stats: PlanStats, rows, cols, cand) -> HeadGroup:
    """A route pattern's head group from its runs (:mod:`~patterndsl.analysis.routeruns`): lists, route
    mask and statistics without listing a tile, except the partial ones whose pairs are counted."""
    rr, engine = found.routed, found.engine
    nqb, nkb, nh = cand.qside.n_tiles, cand.kside.n_tiles, len(hs)
    area = _run_areas(rr, rows, cols)
    lens = rr.hi - rr.lo
    full, partial = rr.state == eng.FULL, rr.state == eng.PARTIAL
    # Tiles open candidates meet may change mask with the choice: bounded, not counted.
    dyn = rr.open & ~full
    counted = partial & ~dyn
    rewritten = simplify(node)
    allowed = eng.symbolic_total(rewritten, cand.qside.length, cand.kside.length, pir.layout, engine.env)
    if allowed is None:
        # Tiles no route reaches count without the routes (cheaper than with the choice).
        reach = rr.keys_where(counted & rr.route_mask)
        counts = eng.count_tiles(engine.fixing(rr.forced_on(reach)), rewritten, reach).sum()
        counts += eng.count_tiles(engine, rewritten, rr.keys_where(counted & ~rr.route_mask)).sum()
        allowed = int(area[full].sum()) + int(counts)
    if dyn.any():
        stats.extra["dynamic_pairs_bound"] = stats.extra.get("dynamic_pairs_bound", 0) + int(area[dyn].sum()) * nh
    stats.extra["tiles_dynamic_unproven"] = stats.extra.get("tiles_dynamic_unproven", 0)
    stats.allowed_pairs += allowed * nh
    stats.visited_pairs += int(area.sum()) * nh
    stats.tiles_full += int(lens[full].sum()) * nh
    stats.tiles_partial += int(lens[partial].sum()) * nh
    stats.tiles_dynamic += int(lens[rr.state == eng.DYNAMIC].sum()) * nh
    stats.tiles_empty += (nqb * nkb - int(lens.sum())) * nh
    runs = Runs.merged(rr.row, rr.lo, rr.hi, rr.state)
    tl = RunTiles(runs, nqb, nkb)
    on = rr.route_mask
    rmask = TileFlags(*_merged_flags(rr.row[on], rr.lo[on], rr.hi[on]), tl, nqb, nkb)
    form = None
    if cand.qside.identity:
        form = functools.partial(_form, rewritten, cand.qside, cand.kside, runs, nqb, nkb)
    return HeadGroup(tuple(hs), node, tl, runs, form, rmask)


def _merged_flags(row: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Sorted disjoint runs with touching ones joined."""
    if not len(row):
        return row, lo, hi
    new = np.ones(len(row), bool)
    new[1:] = (row[1:] != row[:-1]) | (lo[1:] != hi[:-1])
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(row)) - 1
    return row[first], lo[first], hi[last]


def describe(plan: BlockPlan) -> str:
    """The plan's statistics as text lines (for ``patterndsl show --stage plan``).

    Args:
        plan: a block plan.

    Returns:
        Several lines of ``name: value`` text.
    """
    s = plan.stats
    lines = [
        f"sizes: Lq={plan.q_len} Lk={plan.kv_len} heads={plan.heads} tile={plan.block_m}x{plan.block_n} "
        f"({plan.n_q_tiles}x{plan.n_kv_tiles} tiles)",
        f"order: {plan.order}",
        f"head groups: {len(plan.groups)}",
        f"density: {s.density:.4f} ({s.allowed_pairs} of {s.total_pairs} pairs allowed)",
        f"tiles: {s.tiles_full} full, {s.tiles_partial} partial, {s.tiles_empty} empty"
        + (f", {s.tiles_dynamic} decided at run time" if s.tiles_dynamic else ""),
        f"visited pairs: {s.visited_pairs}",
        f"block efficiency: {s.block_efficiency:.4f} (allowed / visited)",
        "estimated forward FLOPs (head_dim 64, batch 1): " + ", ".join(f"{k} {v:.3g}" for k, v in s.flops(64).items()),
        f"tiles evaluated element-wise: {s.tiles_evaluated} ({s.elements_evaluated} elements)",
        f"closed-form bounds: {sum(g.forms is not None for g in plan.groups)} of {len(plan.groups)} groups",
        f"plan time: {s.plan_seconds * 1e3:.2f} ms",
    ]
    if plan.parts:
        lines.append(
            f"parts: {len(plan.parts)} ("
            + ", ".join(f"{p.order} {p.block_m}x{p.block_n}" for p in plan.parts)
            + f"): {s.executed_pairs} visited pairs, block efficiency {s.executed_efficiency:.4f}"
        )
    return "\n".join(lines)
