"""Stage 4 (block plan), parts: a pattern split into disjoint parts, each in its own token order and tiles.

Comes in: the bound pattern, its sizes and tile size, and the single-order plan the planner chose
(whose ``tiles()`` stays the plan's contract). Goes out: no parts (the single order is best) or
one :class:`~patterndsl.analysis.plan.BlockPlan` per part: the plan of a derived pattern whose
heads hold that part's node (``empty`` for heads the part does not touch), in the part's own token
order and tile shape. Executors run one pass per part and merge the passes by log-sum-exp
(:mod:`patterndsl.runtime.combine`); the parts are disjoint and their union is the pattern, so the
merge is exact.

Why: one permutation cannot suit a dilated window and a dense global part at once, nor heads that
want different orders. Per head group the node is written as a union of terms (intersections and
differences distributed over unions; ``global(n)`` as ``sink(n) | where(q < n)``); each
term gets its cheapest (token order, tile shape) alone; terms wanting the same one form a part,
each part minus the parts before it. Parts of different head groups with the same order and shape
share a pass. A split is kept only when its estimated work (visited pairs plus a cost per tile
and per pass, :class:`PartOptions`) is below the single order's and it visits no more pairs.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from patterndsl import ir, semantics
from patterndsl.analysis import reorder, tiles
from patterndsl.analysis.plan import BlockPlan
from patterndsl.analysis.rewrite import simplify
from patterndsl.analysis.serial import serial
from patterndsl.errors import PatternError
from patterndsl.sizes import Sizes


@dataclass(frozen=True)
class PartOptions:
    """Knobs of the split (tests set them explicitly with :func:`options`).

    Attributes:
        enabled: try splits at all.
        tile_pairs: what visiting one tile costs beyond its pairs (list entry, loads, loop), in pairs.
        pass_tiles: what one more pass costs (a launch, a merge), in tiles of the plan's size.
        max_terms: a node that is a union of more terms than this is not cut into terms (its head
            group may still get an order of its own).
        keep_above: a single-order plan at or above this block efficiency is kept without a search.
        thin: the narrow side of the thin tile shapes tried (rows or keys a part touches are few).
        min_side: a tile narrower than this costs as if it were this wide (its loads and loop do not
            shrink with it).
        max_runs: most runs of selected keys a keys-first order may have.
        max_grid: most tiles (``nqb * nkb``) of a tile shape other than the plan's own; also the
            condition for cutting ``global(n)`` into its keys and its rows (a ``where`` on the query
            alone is classified on every tile of the grid).
        sample_rows: a configuration with more than four times this many query tiles is costed on
            this many of them (evenly spaced, plus the first and last), not planned whole; the split
            found is then planned exactly and kept only if it still beats the single order
            (0: always plan whole).
    """

    enabled: bool = True
    tile_pairs: int = 1024
    pass_tiles: int = 16
    max_terms: int = 6
    keep_above: float = 0.9
    thin: int = 16
    min_side: int = 64
    max_runs: int = 4096
    max_grid: int = 1 << 20
    sample_rows: int = 16


# A context variable: a plan is built on the thread that first asks for it (the forward's), and
# whatever options are in force there decide; a plan never changes once built.
_CURRENT: contextvars.ContextVar[PartOptions | None] = contextvars.ContextVar("patterndsl_part_options", default=None)
_DEFAULT = PartOptions()


def current() -> PartOptions:
    """The options plans built without an explicit ``parts=`` use."""
    return _CURRENT.get() or _DEFAULT


@contextmanager
def options(value: PartOptions | None = None, **changes) -> Iterator[PartOptions]:
    """Plan with other split options inside the block (restored on exit).

    Cached plans (``runtime.plans``) were built with the options of their time: clear them around
    the block when the calls inside must plan again.

    Args:
        value: options to use (default: the current ones).
        **changes: fields to replace, e.g. ``pass_tiles=0``.

    Returns:
        A context manager yielding the options in force.
    """
    new = dataclasses.replace(current() if value is None else value, **changes)
    token = _CURRENT.set(new)
    try:
        yield new
    finally:
        _CURRENT.reset(token)


# ----------------------------------------------------------------------------- terms


def terms(node: ir.Node, limit: int, rows: bool = True) -> list[ir.Node]:
    """``node`` as a union of terms (they may overlap), or ``[node]`` when that takes more than ``limit`` terms.

    Args:
        node: a canonical pattern node.
        limit: most terms.
        rows: cut ``global(n)`` into ``sink(n)`` and ``where(q < n)``.

    Returns:
        Terms whose union is ``node``, in a fixed order.
    """
    found = _terms(simplify(node), limit, rows)
    if found is None:
        return [node]
    out: dict[ir.Node, None] = {}
    for term in found:
        term = simplify(term)
        if term != ir.EMPTY:
            out[term] = None
    return list(out) or [node]


def _terms(node: ir.Node, limit: int, rows: bool) -> list[ir.Node] | None:
    if isinstance(node, ir.Union):
        acc: list[ir.Node] = []
        for item in node.items:
            got = _terms(item, limit, rows)
            if got is None:
                return None
            acc += got
        return acc if len(acc) <= limit else None
    if isinstance(node, ir.Inter):
        combos: list[list[ir.Node]] = [[]]
        for item in node.items:
            got = _terms(item, limit, rows)
            if got is None:
                return None
            combos = [[*c, t] for c in combos for t in got]
            if len(combos) > limit:
                return None
        return [ir.inter(*c) for c in combos]
    if rows and isinstance(node, ir.Prim) and node.name == "global":
        # rows q < n and keys k < n want different tiles; as a where, the rows' part is found from
        # its one tile row instead of from the whole tile grid
        n = node.arg("n")
        return [ir.Prim("sink", (("n", n),)), ir.Prim("where", (("pred", ir.Cmp("<", ir.Var("q"), ir.Const(n))),))]
    return [node]


# ----------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Config:
    """A token order (as the planner's candidate) and a tile shape."""

    desc: str
    qsegs: list = field(compare=False, hash=False)
    ksegs: list = field(compare=False, hash=False)
    identity: bool
    block: tuple[int, int]

    @property
    def candidate(self) -> tuple:
        return (self.desc, self.qsegs, self.ksegs, self.identity)


#: Primitives that test the key alone, away from the sequence's start: a keys-first order
#: gathers their keys into dense key tiles.
KEY_SETS = ("summary", "landmarks")


def _conjuncts(term: ir.Node) -> tuple[ir.Node, ...]:
    return term.items if isinstance(term, ir.Inter) else (term,)


def _keys_first(term: ir.Node, sizes: Sizes, max_runs: int) -> list[tuple]:
    """Orders with the keys of a key-set conjunct first (in position order), the other keys after them."""
    if sizes.layout is not None:
        return []
    out = []
    ident_q = tiles.identity_segments(sizes.q_len, sizes.offset, (sizes.kv_len,))
    for prim in _conjuncts(term):
        if not (isinstance(prim, ir.Prim) and prim.name in KEY_SETS):
            continue
        keys = semantics.evaluate(prim, torch.zeros(1, dtype=torch.int64), torch.arange(sizes.kv_len), 0, sizes)
        sel = keys.numpy().astype(np.int8)
        edges = np.flatnonzero(np.diff(sel)) + 1
        starts = np.concatenate([[0], edges])
        ends = np.concatenate([edges, [sizes.kv_len]])
        if len(starts) > 2 * max_runs or not sel.any() or sel.all():
            continue
        chosen = sel[starts] == 1
        segs = [((int(a),), (1,), (int(b - a),)) for a, b in zip(starts[chosen], ends[chosen], strict=True)]
        segs += [((int(a),), (1,), (int(b - a),)) for a, b in zip(starts[~chosen], ends[~chosen], strict=True)]
        out.append((f"keys of {prim} first", ident_q, segs, False))
    return out


def _grid(sizes: Sizes, shape: tuple[int, int]) -> int:
    return -(-sizes.q_len // shape[0]) * -(-sizes.kv_len // shape[1])


def _visited(cand) -> tuple[int, tuple[int, int]]:
    """Tiles a planned order visits (listed, and under the coarse levels' runs) and their distinct rows and columns."""
    nqb, nkb = cand.qside.n_tiles, cand.kside.n_tiles
    rows, cols, edges = np.zeros(nqb, np.int64), np.zeros(nkb, np.int64), np.zeros(nkb + 1, np.int64)
    n_tiles = 0
    for g in cand.groups:
        # distinct tile rows and columns by counting (linear), not by sorting every key
        rows += np.bincount(g.keys // nkb, minlength=nqb)
        cols += np.bincount(g.keys % nkb, minlength=nkb)
        n_tiles += len(g.keys) + g.runs_tiles(True) + g.runs_tiles(False)
        lay = g.layered
        for m, lo, hi in () if lay is None else ((lay.row, lay.lo, lay.hi), lay.partial):
            rows += np.bincount(m, minlength=nqb)
            edges += np.bincount(lo, minlength=nkb + 1) - np.bincount(hi, minlength=nkb + 1)
    cols += np.cumsum(edges)[:nkb]  # a run covers the columns its edges enclose
    return n_tiles, (int(np.count_nonzero(rows)), int(np.count_nonzero(cols)))


def _shapes(term: ir.Node, block: tuple[int, int], thin: int, spread: tuple[int, int]) -> list[tuple[int, int]]:
    """Tile shapes worth trying besides ``block``: thin ones when the term's tiles at ``block`` lie in at
    most two tile rows (``spread[0]``) or columns (``spread[1]``), and ``random``'s own block."""
    bm, bn = block
    out: list[tuple[int, int]] = []
    if thin < bm and spread[0] <= 2:
        out.append((thin, bn))
    if thin < bn and spread[1] <= 2:
        out.append((bm, thin))
    for sub in ir.walk(term):
        if isinstance(sub, ir.Prim) and sub.name == "random":
            b = sub.arg("block")
            if thin <= b and b & (b - 1) == 0 and (b < bm or b < bn) and (b, b) not in out:
                out.append((b, b))
    return out


# ----------------------------------------------------------------------------- search


@dataclass(frozen=True)
class _Cost:
    """Estimated work of a node in a configuration: ``cost`` (pairs, tiles), ``work`` (visited pairs) and
    ``spread`` (distinct tile rows and columns it visits)."""

    cost: int
    work: int
    spread: tuple[int, int]


@dataclass(frozen=True)
class _Piece:
    """One part of one head group: its node, configuration and estimated cost and visited pairs."""

    config: Config
    node: ir.Node
    cost: int
    work: int
    spread: tuple[int, int]


def _sampled(config: Config, node: ir.Node, heads: list[int], sizes: Sizes, rows: int):
    """``(visited pairs, tiles, spread)`` of ``node`` in ``config`` estimated from a sample of its query tiles.

    The first and last query tiles (where ``global`` rows and sinks' edges sit) count exactly, the
    middles of ``rows`` equal strata of the others stand for their stratum; the distinct tile rows
    are exact when only the first and last have tiles, the distinct columns are those the sample
    visits. None when the configuration has at most ``4 * rows`` query tiles (planned whole).
    """
    from patterndsl.analysis import engine as eng
    from patterndsl.analysis.classify import Env

    extents = sizes.layout.shape if sizes.layout is not None else (sizes.kv_len,)
    bm, bn = config.block
    qside = tiles.build_side(config.qsegs, sizes.q_len, bm, sizes.offset, extents, config.identity)
    nqb = qside.n_tiles
    if not rows or nqb <= 4 * rows:
        return None
    kside = tiles.build_side(config.ksegs, sizes.kv_len, bn, 0, extents, config.identity)
    nkb = kside.n_tiles
    lens, cols = np.diff(qside.starts), np.diff(kside.starts)
    middle = np.unique(1 + ((np.arange(rows) + 0.5) * (nqb - 2) / rows).astype(np.int64))
    sample = np.concatenate([[0], middle, [nqb - 1]])
    domain = (sample[:, None] * nkb + np.arange(nkb, dtype=np.int64)[None, :]).reshape(-1)
    engine = eng.Engine(qside, kside, Env(sizes, heads[0]))
    keys, _ = engine.run(simplify(node), domain)
    m, n = keys // nkb, keys % nkb
    edge = (m == 0) | (m == nqb - 1)
    scale = (int(lens.sum()) - int(lens[0]) - int(lens[-1])) / max(int(lens[middle].sum()), 1)
    pairs = lens[m] * cols[n]
    work = (int(pairs[edge].sum()) + int(pairs[~edge].sum()) * scale) * len(heads)
    n_tiles = int(edge.sum()) + int((~edge).sum()) * (nqb - 2) / len(middle)
    touched = np.unique(m)
    inner = int((~np.isin(touched, [0, nqb - 1])).sum())
    spread = (len(touched) - inner + round(inner * (nqb - 2) / len(middle)), len(np.unique(n)))
    return work, n_tiles, spread


def _late(config: Config) -> bool:
    # reordered candidates before identity: the bound then cuts hopeless ones (a strided part in
    # identity order) early
    return config.identity


class _Search:
    """Costs of (node, configuration) pairs, memoised; one per plan."""

    def __init__(self, sizes: Sizes, block: tuple[int, int], opts: PartOptions, bound: int):
        self.sizes, self.block, self.opts, self.bound = sizes, block, opts, bound
        self._orders: dict = {}
        self._memo: dict = {}

    def configs(self, term: ir.Node, shape: tuple[int, int]) -> list[Config]:
        """The term's candidate orders at one tile shape, reordered ones before identity."""
        key = (shape, term)
        if key not in self._orders:
            found = reorder.candidates([term], self.sizes.layout, self.sizes.q_len, self.sizes.kv_len, shape)
            found += _keys_first(term, self.sizes, self.opts.max_runs)
            self._orders[key] = sorted((Config(d, qs, ks, ident, shape) for d, qs, ks, ident in found), key=_late)
        return self._orders[key]

    def cost(self, node: ir.Node, heads: list[int], config: Config, bound: int | None = None) -> _Cost | None:
        """The cost of ``node`` on ``heads`` in ``config``; None when its visited pairs reach ``bound``."""
        from patterndsl.analysis import planner

        bound = self.bound if bound is None else min(bound, self.bound)
        key = (node, heads[0] if ir.uses_head(node) else None, len(heads), config)
        got = self._memo.get(key)
        if got is not None and (got[1] is not None or got[0] >= bound):
            return got[1]
        bm, bn = config.block
        side = self.opts.min_side
        # a thin tile still loads its keys and runs its loop: it costs as if min_side wide
        area = max(bm, side) * max(bn, side) - bm * bn
        try:
            sampled = _sampled(config, node, heads, self.sizes, self.opts.sample_rows)
            if sampled is not None:
                work, n_tiles, spread = sampled
                found = None
                if work < bound:
                    found = _Cost(int(work + (self.opts.tile_pairs + area) * n_tiles * len(heads)), int(work), spread)
                self._memo[key] = (bound, found)
                return found
            if planner.loses(config.candidate, [(node, heads)], self.sizes, bm, bn, bound):
                cand = None  # its sampled query tiles visit clearly more: not planned whole
            else:
                cand = planner.plan_order(config.candidate, [(node, heads)], self.sizes, bm, bn, bound)
        except PatternError:
            cand = None  # beyond what a plan lists at this shape: not a candidate
        found = None
        if cand is not None:
            n_tiles, spread = _visited(cand)
            found = _Cost(cand.work + (self.opts.tile_pairs + area) * n_tiles * len(heads), cand.work, spread)
        self._memo[key] = (bound, found)
        return found

    def best(self, node: ir.Node, heads: list[int], seed: _Piece | None = None) -> _Piece | None:
        """The node's cheapest configuration alone: the plan's tiles first (unless ``seed`` is their best
        already), then the shapes they suggest."""
        found = seed or self._best(node, heads, self.configs(node, self.block), None)
        if found is not None:
            for shape in _shapes(node, self.block, self.opts.thin, found.spread):
                if _grid(self.sizes, shape) <= self.opts.max_grid:
                    found = self._best(node, heads, self.configs(node, shape), found)
        return found

    def _best(self, node, heads, configs: list[Config], found: _Piece | None) -> _Piece | None:
        for config in configs:
            got = self.cost(node, heads, config, None if found is None else found.cost)
            if got is not None and (found is None or got.cost < found.cost):
                found = _Piece(config, node, got.cost, got.work, got.spread)
        return found

    def split(self, node: ir.Node, heads: list[int], seed: _Piece | None = None) -> list[_Piece] | None:
        """The cheapest parts of one head group's node (one part: the node in its own best order; ``seed``:
        that order among the plan's candidates at the plan's tiles, when known)."""
        whole = self.best(node, heads, seed)
        options = [] if whole is None else [[whole]]
        thin = self.opts.thin
        rows = max(_grid(self.sizes, (thin, self.block[1])), _grid(self.sizes, (self.block[0], thin)))
        found = terms(node, self.opts.max_terms, rows <= self.opts.max_grid)
        if len(found) > 1:
            wanted: dict = {}
            for term in found:
                piece = self.best(term, heads)
                if piece is None:
                    break
                wanted.setdefault(piece.config, []).append(term)
            else:
                # in the terms' order: a term before one that contains it (sink before global)
                parts = self._parts(list(wanted.items()), heads) if len(wanted) > 1 else None
                if parts is not None:
                    options.append(parts)
        if not options:
            return None
        return min(options, key=lambda ps: sum(p.cost for p in ps) + self.pass_cost * (len(ps) - 1))

    @property
    def pass_cost(self) -> int:
        return self.opts.pass_tiles * self.block[0] * self.block[1]

    def _parts(self, groups, heads: list[int]) -> list[_Piece] | None:
        earlier = ir.EMPTY
        out = []
        for config, group_terms in groups:
            mine = ir.union(*group_terms)
            node = simplify(ir.difference(mine, earlier))
            earlier = ir.union(earlier, mine)
            if node == ir.EMPTY:
                continue
            got = self.cost(node, heads, config)
            if got is None:
                return None
            out.append(_Piece(config, node, got.cost, got.work, got.spread))
        return out


# ----------------------------------------------------------------------------- entry point


@serial
def split(pir: ir.PatternIR, single: BlockPlan, opts: PartOptions | None = None) -> tuple[BlockPlan, ...]:
    """The parts to run instead of ``single``, or ``()`` when the single order is at least as good.

    Args:
        pir: the bound pattern (static: no ``route``, no run-time inputs).
        single: its plan in the single order the planner chose.
        opts: split options (default: :func:`current`).

    Returns:
        One plan per part, each of a derived pattern (``pir`` with every head's node replaced by
        the head's part, ``empty`` where it has none), in the part's own order and tile shape.
    """
    from patterndsl.analysis import planner

    opts = current() if opts is None else opts
    nodes = pir.nodes()
    if (
        not opts.enabled
        or pir.inputs
        or any(ir.is_dynamic(n) for n in nodes)
        or single.stats.block_efficiency >= opts.keep_above
        or single.stats.visited_pairs == 0
    ):
        return ()
    sizes = Sizes(single.q_len, single.kv_len, pir.layout, single.heads)
    search = _Search(sizes, single.block, opts, single.stats.visited_pairs + 1)
    if single.stats.visited_pairs - single.stats.allowed_pairs <= search.pass_cost:
        return ()  # fewer pairs wasted than one more pass costs (every small plan): nothing to win
    passes: dict[Config, dict[int, ir.Node]] = {}
    cost = work = 0
    seed = None
    if len(single.groups) == 1:
        # one head group: the planner tried every candidate order at these tiles already
        config = Config(single.order, [], [], single.is_identity_order, single.block)
        seed = _Piece(config, single.groups[0].node, **_single_cost(single, opts))
    for group in single.groups:
        pieces = search.split(group.node, list(group.heads), seed)
        if pieces is None:
            return ()
        for piece in pieces:
            cost += piece.cost
            work += piece.work
            for h in group.heads:
                passes.setdefault(piece.config, {})[h] = piece.node
    cost += search.pass_cost * len(passes)
    if cost >= _single_cost(single, opts)["cost"] + search.pass_cost or work > single.stats.visited_pairs:
        return ()
    if any(not config.qsegs for config in passes):
        return ()  # the single order itself (a seed) in a pass of its own: nothing gained
    out = []
    for index, (config, by_head) in enumerate(passes.items()):
        part = part_pattern(pir, by_head, single.heads, index)
        bm, bn = config.block
        planned = planner.plan(part, single.q_len, single.kv_len, single.heads, (bm, bn), orders=[config.candidate])
        out.append(dataclasses.replace(planned, candidate=config.candidate))
    # the costs may be estimates from sampled tiles: the planned parts must still beat the single order
    return tuple(out) if pays(single, out, opts) else ()


def pays(single: BlockPlan, planned: list[BlockPlan], opts: PartOptions) -> bool:
    """Whether the planned parts cost less than the single order with one pass more, visiting no more pairs."""
    pass_cost = opts.pass_tiles * single.block_m * single.block_n
    exact = sum(_single_cost(part, opts, spread=False)["cost"] for part in planned) + pass_cost * len(planned)
    if exact >= _single_cost(single, opts, spread=False)["cost"] + pass_cost:
        return False
    return sum(part.stats.visited_pairs for part in planned) <= single.stats.visited_pairs


def _single_cost(single: BlockPlan, opts: PartOptions, spread: bool = True) -> dict:
    """The estimate of the single-order plan, as the fields ``cost``, ``work``, ``spread`` of a :class:`_Piece`
    (``spread=False``: cost and work only)."""
    s = single.stats
    tiles = s.tiles_full + s.tiles_partial + s.tiles_dynamic
    side = opts.min_side
    area = max(single.block_m, side) * max(single.block_n, side) - single.block_m * single.block_n
    if not spread:
        return {"cost": s.visited_pairs + (opts.tile_pairs + area) * tiles, "work": s.visited_pairs}
    rows = np.unique(np.concatenate([np.flatnonzero(np.diff(g.tiles.row_ptr.numpy())) for g in single.groups]))
    cols = np.unique(np.concatenate([np.flatnonzero(np.diff(g.tiles.col_ptr.numpy())) for g in single.groups]))
    cost = s.visited_pairs + (opts.tile_pairs + area) * tiles
    return {"cost": cost, "work": s.visited_pairs, "spread": (len(rows), len(cols))}


def part_pattern(pir: ir.PatternIR, by_head: dict[int, ir.Node], heads: int, index: int) -> ir.PatternIR:
    """``pir`` with head ``h``'s node replaced by ``by_head[h]`` (``empty`` when missing), as heads lines.

    Args:
        pir: the bound pattern.
        by_head: the part's node of each head it touches.
        heads: the head count planned for.
        index: the part's number (names the derived pattern).

    Returns:
        A :class:`~patterndsl.ir.PatternIR` covering heads ``0 <= h < heads`` with ``heads`` lines.
    """
    rules: list[ir.HeadRule] = []
    for h in range(heads):
        node = by_head.get(h, ir.EMPTY)
        if rules and rules[-1].node == node and rules[-1].hi == h:
            rules[-1] = ir.HeadRule(rules[-1].lo, h + 1, node, rules[-1].span)
        else:
            rules.append(ir.HeadRule(h, h + 1, node, pir.span))
    return dataclasses.replace(pir, name=f"{pir.name}.part{index}", heads=tuple(rules), default=None)
