"""Stage 4 (block plan), route patterns in 1-D token order, as runs: O(runs) work and memory, not O(tiles).

Comes in: what :mod:`patterndsl.analysis.routetiles` takes (the identity-order engine of one head
group and its rewritten node with one ``route`` of one polarity, ``among`` not reading ``h``, 1-D
groups aligned to the query start). Goes out: :class:`RoutedRuns`, the same tiles as
:class:`~patterndsl.analysis.routeplan.RoutedTiles` held as runs of key tiles per query tile
(state, open and route-mask flags constant on each run); :meth:`RoutedRuns.expanded` lists them.

At a million tokens a route pattern has about 33 million tiles a head whose state the data
decides (``causal`` below the diagonal), in a few runs per query tile. Every per-tile quantity
:func:`routetiles.classify` reads (the static bounds' states, the candidate and forced choices'
cover counts, the box test's over-the-cap flags) is constant between a few breakpoints per query
tile: a :class:`Steps` function. The classification overlays them and decides each segment at
once with the formulas of :func:`routetiles.classify`; only segments where the static bounds are
neither settled nor the route alone are listed tile by tile and decided as before (cells or
elements). Candidates come from ``among`` planned on tiles of ``qblock * 2**j`` queries by one
key block, coarse rows first (full tiles give every group of the row the block; partial ones are
split in two rows until a tile is one group), so the element-level boundary of ``among`` is met
only in a few tiles per query tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patterndsl import ir
from patterndsl.analysis import cellshift, hierarchy, routeedges, routegroups, routetiles, tiles, tileshift
from patterndsl.analysis import engine as eng

#: Rows of query groups a first-level candidate tile holds at most (as a power of two times ``qblock``).
GROUP_ROWS = 128


@dataclass(frozen=True)
class Steps:
    """A function over tiles, piecewise constant along each query tile's key tiles.

    ``key`` (sorted) holds the start ``m * (nkb + 1) + n`` of every segment, each query tile's
    first segment starting at ``n = 0``; a segment ends where the next one of its row starts,
    or at ``nkb``. ``value`` is the function on the segment.
    """

    key: np.ndarray
    value: np.ndarray
    width: int

    def at(self, starts: np.ndarray) -> np.ndarray:
        """The value on the segments starting at ``starts`` (keys of a finer segmentation)."""
        return self.value[np.searchsorted(self.key, starts, "right") - 1]


def _compact(key: np.ndarray, value: np.ndarray, width: int) -> Steps:
    if not len(key):
        return Steps(key, value, width)
    new = np.ones(len(key), bool)
    new[1:] = (value[1:] != value[:-1]) | (key[1:] // width != key[:-1] // width)
    return Steps(key[new], value[new], width)


def _rle(key: np.ndarray, weight: np.ndarray):
    """Consecutive equal keys summed (events come grouped by row: most collapse before the sort)."""
    if len(key) < 2:
        return key, weight
    new = np.concatenate([[True], key[1:] != key[:-1]])
    if new.all():  # nothing collapses (a grid route's events): no copies
        return key, weight
    first = np.flatnonzero(new)
    return key[first], np.add.reduceat(weight, first)


def ranges(m, lo, hi, weight, nqb: int, nkb: int) -> Steps:
    """The sum of ``weight`` over the ranges ``(m, [lo, hi))`` that hold each tile."""
    width = nkb + 1
    ok = lo < hi
    m, lo, hi = m[ok], lo[ok], hi[ok]
    weight = np.broadcast_to(np.asarray(weight, np.int64), ok.shape)[ok]
    k1, w1 = _rle(m * width + lo, weight)
    k2, w2 = _rle(m * width + hi, -weight)
    rows = np.arange(nqb, dtype=np.int64) * width
    key, delta = _summed(np.concatenate([rows, k1, k2]), np.concatenate([np.zeros(nqb, np.int64), w1, w2]))
    value = np.cumsum(delta)
    col = key % width
    keep = col < nkb
    key, value, col = key[keep], value[keep], col[keep]
    new = np.ones(len(key), bool)  # _compact, every row starting at col 0
    new[1:] = (value[1:] != value[:-1]) | (col[1:] == 0)
    return Steps(key[new], value[new], width)


def _summed(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``keys`` (non-negative) sorted, with the ``weights`` (integers) of each summed.

    Each weight rides in the low digits of its key, so that one plain sort (numpy's vectorised one,
    a few times faster than an argsort or ``np.unique(return_inverse=True)`` on a million keys) orders
    both; an argsort when the packed keys would not fit in 62 bits."""
    if not len(keys):
        return keys, weights
    bound = int(np.abs(weights).max())
    shift = (2 * bound).bit_length()
    if int(keys.max()) < (1 << (62 - shift)):
        packed = np.sort((keys << shift) | (weights + bound))
        keys, weights = packed >> shift, (packed & ((1 << shift) - 1)) - bound
    else:
        order = np.argsort(keys, kind="stable")
        keys, weights = keys[order], weights[order]
    first = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[first], np.add.reduceat(weights, first)


def tile_steps(keys: np.ndarray, value: np.ndarray, nqb: int, nkb: int) -> Steps:
    """Values on single tiles ``keys`` (``m * nkb + n``), 0 elsewhere."""
    m = keys // nkb
    n = keys - m * nkb
    value = value.astype(np.int64)
    if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
        return ranges(m, n, n + 1, value, nqb, nkb)
    # sorted distinct tiles (an engine's plan): each tile's segment, then a zero one unless the next tile
    # follows or the row ends, already in order; the rows' zero segments inserted before their first tile
    width = nkb + 1
    start = m * width + n
    ends = n < nkb - 1
    ends[:-1] &= start[1:] != start[:-1] + 1
    take = np.stack([np.ones(len(start), bool), ends], 1)
    key = np.stack([start, start + 1], 1)[take]
    val = np.stack([value, np.zeros_like(value)], 1)[take]
    bare = np.ones(nqb, bool)
    bare[m[n == 0]] = False
    rows = np.flatnonzero(bare) * width
    at = np.searchsorted(key, rows)
    key, val = np.insert(key, at, rows), np.insert(val, at, 0)
    return _compact(key, val, width)


def overlay(steps: list[Steps], nkb: int):
    """A common segmentation: ``(m, lo, hi, values)`` with each function's value per segment."""
    width = nkb + 1
    key, values = merged(steps)
    m = key // width
    lo = key - m * width
    # a segment ends where the next one starts, unless that one starts a row (every function has a
    # segment at the start of every row, so they all do)
    hi = np.append(lo[1:], 0)
    hi[hi == 0] = nkb
    return m, lo, hi, values


def merged(steps: list[Steps]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The segment starts of every function of ``steps`` (over the same query tiles) together, sorted, and
    each function's value on them (the same object given twice is read once).

    Each start carries the index of its function in its low bits: one sort merges them, and a function's
    segment at a start is the count of its own starts up to there (no binary search per function)."""
    distinct = list({id(s): s for s in steps}.values())
    # a function of one value everywhere (its starts those of the rows, which every function has) is no
    # part of the merge
    rows = min(len(s.key) for s in distinct)
    flat = {id(s): s.value[0] for s in distinct if 0 < rows == len(s.key) and s.value.min() == s.value.max()}
    if len(flat) == len(distinct):
        flat.pop(id(distinct[0]))
    distinct = [s for s in distinct if id(s) not in flat]
    shift = max(1, (len(distinct) - 1).bit_length())
    top = max((int(s.key[-1]) for s in distinct if len(s.key)), default=0)
    if top >= 1 << (62 - shift):
        key = sorted_unique(np.concatenate([s.key for s in distinct]))
        found = {id(s): s.at(key) for s in distinct}
    else:
        tagged = np.sort(np.concatenate([(s.key << shift) | i for i, s in enumerate(distinct)]))
        every, source = tagged >> shift, tagged & ((1 << shift) - 1)
        last = np.flatnonzero(np.append(every[1:] != every[:-1], True))  # the last entry of each start
        key = every[last]
        found = {id(s): s.value[np.cumsum(source == i)[last] - 1] for i, s in enumerate(distinct)}
    found.update({i: np.full(len(key), v) for i, v in flat.items()})
    return key, [found[id(s)] for s in steps]


def sorted_unique(keys: np.ndarray) -> np.ndarray:
    """``np.unique(keys)`` of a concatenation of sorted arrays: a stable sort merges the sorted runs (numpy's
    hashed unique takes seconds on the tens of millions of keys a grid route's Steps hold at a million tokens)."""
    keys = np.sort(keys, kind="stable")
    new = np.ones(len(keys), bool)
    new[1:] = keys[1:] != keys[:-1]
    return keys[new]


def static_steps(engine: eng.Engine, node: ir.Node) -> Steps:
    """States of a static node on every tile (coarse levels first where they pay)."""
    nqb, nkb = engine.nqb, engine.nkb
    if node in (ir.FULL, ir.EMPTY):  # one segment a query tile, never a list of every tile
        rows = np.arange(nqb, dtype=np.int64)
        return ranges(rows, rows * 0, np.full(nqb, nkb), int(node == ir.FULL) * eng.FULL, nqb, nkb)
    lay = None
    if hierarchy.usable(node, engine.q, engine.k, engine.env.layout):
        lay = hierarchy.classify(engine, node)
    if lay is None:
        found = cellshift.static_tiles(engine, node)  # grids: one query row per translation class
        keys, state = engine.run(node) if found is None else found
        return tile_steps(keys, state, nqb, nkb)
    pr, plo, phi = lay.partial
    m = np.concatenate([lay.keys // nkb, lay.row, pr])
    lo = np.concatenate([lay.keys % nkb, lay.lo, plo])
    hi = np.concatenate([lay.keys % nkb + 1, lay.hi, phi])
    value = np.concatenate([lay.state.astype(np.int64), np.full(len(lay.row), eng.FULL), np.full(len(pr), eng.PARTIAL)])
    return ranges(m, lo, hi, value, nqb, nkb)


def _sub_engine(engine: eng.Engine, shape: tuple[int, int], cache: dict) -> eng.Engine:
    """The engine on tiles of ``shape`` sharing ``engine``'s environment and tally (built once per plan:
    its sides are per-tile arrays, a million long at one query per tile; each side is built once and
    shared by the shapes having it: the candidates' levels share their key side)."""
    if shape not in cache:
        sides = cache.setdefault(SIDES, {})
        ctx = engine.ctx
        layout = engine.env.layout
        extents = (ctx.kv_len,) if layout is None else tuple(layout.shape)  # a grid's tiles: runs of a row
        for which, block, length, offset in (("q", shape[0], ctx.q_len, ctx.offset), ("k", shape[1], ctx.kv_len, 0)):
            if (which, block) not in sides:
                segments = tiles.identity_segments(length, offset if layout is None else 0, extents)
                sides[which, block] = tiles.build_side(segments, length, block, offset, extents, True)
        cache[shape] = eng.Engine(sides["q", shape[0]], sides["k", shape[1]], engine.env, tally=engine.tally)
    return cache[shape]


#: The key of the sides :func:`_sub_engine` keeps in its cache (``(side, block)``: the side).
SIDES = "sides"


def candidates(engine: eng.Engine, prim: ir.Prim, geo, cache: dict | None = None) -> routegroups.GroupRuns:
    """The candidate blocks of every group as runs over segments of groups (see the module notes: rows
    halved where partial; :mod:`~patterndsl.analysis.routegroups`: no per-group array)."""
    qblock, block, n_q = geo.qblock, geo.block, geo.n_q
    among = eng.rewrite_for_plan(prim.arg("among"))
    top = max(0, (max(min(engine.q.block, GROUP_ROWS) // qblock, 1)).bit_length() - 1)
    rows = []
    domain = None
    cache = {} if cache is None else cache
    for j in range(top, -1, -1):
        sub = _sub_engine(engine, (qblock << j, block), cache)
        nk = sub.nkb
        runs = None
        if domain is None:
            lay = hierarchy.classify(sub, among) if hierarchy.usable(among, sub.q, sub.k, None) else None
            if lay is None:
                keys, state = sub.run(among)
            else:
                pr, plo, phi = lay.partial
                pm, pn = eng.expand_runs(pr, plo, phi)
                keys = np.concatenate([lay.keys, pm * nk + pn])
                state = np.concatenate([lay.state, np.full(len(pm), eng.PARTIAL, np.int8)])
                runs = (lay.row, lay.lo, lay.hi)
        else:
            keys, state = sub.run(among, domain)
        m, n = keys // nk, keys % nk
        take = (state == eng.FULL) | (j == 0)  # a non-empty tile of one group is a candidate
        if 0 < j < top and not take.all():
            # tiles partial in their parent's row too (a first level's partial tiles are mostly edges
            # that halving settles: blocks aligned with among's own edges, nsa_select)
            take |= routeedges.edge_column_full(sub.q, engine.env, engine.tally, among, block, m, n)
        tm, tlo, thi = m[take], n[take], n[take] + 1
        if runs is not None:
            tm, tlo, thi = np.concatenate([tm, runs[0]]), np.concatenate([tlo, runs[1]]), np.concatenate([thi, runs[2]])
        merged = routetiles._merged(tm, tlo, thi, nk)  # a row's runs merged before it is cut into segments
        g0 = merged.group << j
        rows.append((g0, np.minimum(g0 + (1 << j), n_q), merged.lo, merged.hi))
        if j == 0:
            break
        pm, pn = m[~take], n[~take]
        child = np.stack([pm * 2, pm * 2 + 1], 1).reshape(-1)
        cn = np.repeat(pn, 2)
        nq_next = -(-engine.ctx.q_len // (qblock << (j - 1)))
        ok = child < nq_next
        domain = np.sort(child[ok] * nk + cn[ok])
        if not len(domain):
            break
    return routegroups.segmented(rows, geo)


class _Spans:
    """The candidate runs with the key tiles each touches / covers whole and the query tiles of its group.

    ``geo`` may see segments of groups in the groups' place (:class:`routegroups.SegmentGeometry`):
    ``sizes`` then gives each segment's groups, the weight of its runs in the counts.
    """

    def __init__(self, geo, cand, run_open: np.ndarray, sizes: np.ndarray | None = None):
        self.geo, self.cand = geo, cand
        self.t0, self.t1, self.f0, self.f1 = geo.spans(cand)
        self.row_run, self.row_m = geo.rows(cand.group)  # (run, query tile) pairs
        # Neighbouring groups of a query tile mostly have runs over the same key tiles (a million
        # groups at qblock = 1, a few distinct spans per query tile): counted once, with a weight.
        r = self.row_run
        fields = [self.row_m, self.t0[r], self.t1[r], self.f0[r], self.f1[r], run_open[r]]
        new = np.ones(len(r), bool)
        for f in fields:
            new[1:] |= f[1:] != f[:-1]
        first = np.flatnonzero(new)
        if sizes is None:
            self.weight = np.diff(np.append(first, len(r)))
        else:
            self.weight = np.add.reduceat(sizes[cand.group[r]], first) if len(first) else first
        self.m, self.tt0, self.tt1, self.ff0, self.ff1, self.open = (f[first] for f in fields)

    def cover(self, which: bool | None, covered: bool = True):
        """``(touched, covered)`` Steps: groups of the runs (all; open only: True; forced only: False)
        touching / holding each tile whole (``covered=False``: ``(touched, None)``)."""
        sel = np.ones(len(self.m), bool) if which is None else self.open == which
        m, w, geo = self.m[sel], self.weight[sel], self.geo
        touched = ranges(m, self.tt0[sel], self.tt1[sel], w, geo.nqb, geo.nkb)
        return touched, ranges(m, self.ff0[sel], self.ff1[sel], w, geo.nqb, geo.nkb) if covered else None

    def over(self, keep: np.ndarray, cap: np.ndarray) -> Steps:
        """Bool Steps: some group of the kept runs has more than ``cap[group]`` candidates in the tile
        (:meth:`routetiles._Geometry.over` as ranges)."""
        geo = self.geo
        g, lo, hi = self.cand.group, self.cand.lo, self.cand.hi
        t0, t1, f0, f1 = self.t0, self.t1, self.f0, self.f1
        nb = geo.bt1 - geo.bt0
        c = cap[g]
        out_m, out_lo, out_hi = [], [], []
        if len(nb):
            # a group has at most the blocks of a tile in it: caps of that many or more are never passed
            keep = keep & (c < nb.max())
            whole = keep & (c < nb.min())
            sel = whole[self.row_run]
            r = self.row_run[sel]
            out_m.append(self.row_m[sel])
            out_lo.append(f0[r])
            out_hi.append(f1[r])
            mixed = np.flatnonzero(keep & ~whole & (c < nb.max()) & (f0 < f1))
            if len(mixed):
                run, n = eng.expand_runs(mixed, f0[mixed], f1[mixed])
                hot = nb[n] > c[run]
                self._mark(out_m, out_lo, out_hi, g[run[hot]], n[hot])
        # ends: touched but not covered whole (at most two tiles per run), summed per (group, tile)
        er, en = end_tiles(keep, t0, t1, f0, f1)
        if len(er):
            overlap = np.minimum(hi[er], geo.bt1[en]) - np.maximum(lo[er], geo.bt0[en])
            key = g[er] * geo.nkb + en
            order = np.argsort(key, kind="stable")  # three sorted lists: merged in linear time
            key, overlap = key[order], overlap[order]
            key, total = _rle(key, overlap)
            hot = total > cap[key // geo.nkb]
            self._mark(out_m, out_lo, out_hi, key[hot] // geo.nkb, key[hot] % geo.nkb)
        m, lo_, hi_ = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (out_m, out_lo, out_hi))
        s = ranges(m, lo_, hi_, 1, geo.nqb, geo.nkb)
        return _compact(s.key, (s.value > 0).astype(np.int64), s.width)

    def _mark(self, out_m, out_lo, out_hi, group, n):
        r, m = self.geo.rows(group)
        out_m.append(m)
        out_lo.append(n[r])
        out_hi.append(n[r] + 1)


def end_tiles(keep: np.ndarray, t0, t1, f0, f1) -> tuple[np.ndarray, np.ndarray]:
    """``(range, tile)`` of every tile a kept range touches ``[t0, t1)`` but does not hold whole
    ``[f0, f1)`` (``f0 >= f1``: none): at most two a range, its first and last."""
    first_end = np.where(f0 < f1, np.minimum(f0, t1), t1)
    run_a = np.flatnonzero(keep & (t0 < first_end))
    run_b = np.flatnonzero(keep & (f0 < f1) & (f1 < t1))
    two = np.flatnonzero(keep & (f0 >= f1) & (t1 - t0 == 2))
    return np.concatenate([run_a, run_b, two]), np.concatenate([t0[run_a], f1[run_b], t0[two] + 1])


def _choice(on: np.ndarray, full: np.ndarray, sign: int) -> np.ndarray:
    """State of a fixed choice (touched / covered by every group) or of its complement at ``sign`` -1."""
    st = np.where(on, np.where(full, eng.FULL, eng.PARTIAL), eng.EMPTY).astype(np.int8)
    return st if sign > 0 else (eng.FULL - st).astype(np.int8)


@dataclass(frozen=True)
class RoutedRuns:
    """A route pattern's tiles for one head group as runs (what :func:`classify` returns).

    Attributes:
        row, lo, hi: query tile ``row[i]`` holds key tiles ``lo[i] <= n < hi[i]``, sorted, disjoint.
        state, open, route_mask: per run, as per tile in
            :class:`~patterndsl.analysis.routeplan.RoutedTiles` (state 1, 2 or 3; never empty).
        unproven: 0 (every 3 is proven).
        prim: the route; ``forced``: its forced choice as runs, ``forced_cover``: its
            ``(touched, covered)`` Steps (for :meth:`forced_on`).
        nkb: key tiles.
    """

    row: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    state: np.ndarray
    open: np.ndarray
    route_mask: np.ndarray
    prim: ir.Prim
    forced_runs: routegroups.GroupRuns
    forced_cover: tuple
    groups_per_tile: np.ndarray
    nkb: int
    unproven: int = 0

    @property
    def tiles(self) -> int:
        return int((self.hi - self.lo).sum())

    def keys_where(self, sel: np.ndarray) -> np.ndarray:
        """Sorted tile keys of the runs ``sel`` (bool per run)."""
        m, n = eng.expand_runs(self.row[sel], self.lo[sel], self.hi[sel])
        return m * self.nkb + n

    def forced_on(self, keys: np.ndarray) -> dict:
        """``{route: Fixed}``: the forced choice with the tiles among ``keys`` (sorted) it meets."""
        width = self.nkb + 1
        at = keys // self.nkb * width + keys % self.nkb
        touched, covered = (s.at(at) for s in self.forced_cover)
        on = touched > 0
        full = covered[on] == self.groups_per_tile[keys[on] // self.nkb]
        state = np.where(full, eng.FULL, eng.PARTIAL).astype(np.int8)
        return {self.prim: (self.forced_runs, keys[on], state)}

    def expanded(self):
        """The same tiles listed one by one (a :class:`~patterndsl.analysis.routeplan.RoutedTiles`)."""
        from patterndsl.analysis import routeplan

        counts = self.hi - self.lo
        keys = self.keys_where(np.ones(len(self.row), bool))
        rep = [np.repeat(a, counts) for a in (self.state, self.open, self.route_mask)]
        forced = self.forced_on(np.arange(len(self.groups_per_tile) * self.nkb, dtype=np.int64))
        return routeplan.RoutedTiles(keys, rep[0], rep[2], rep[1], self.unproven, forced)


def geometry(engine: eng.Engine, node: ir.Node):
    """The 1-D geometry of :mod:`routetiles` (any number of tiles) when :func:`classify` applies, else None."""
    geo = routetiles._geometry(engine, node, dense_limit=False)
    return geo if isinstance(geo, routetiles._Geometry) else None


def usable(engine: eng.Engine, node: ir.Node) -> bool:
    """Whether :func:`classify` applies (see :func:`geometry`)."""
    return geometry(engine, node) is not None


def classify(engine: eng.Engine, node: ir.Node, geo=None) -> RoutedRuns:
    """Tile states of a route pattern (see :func:`usable`) as runs, equal to :func:`routetiles.classify`'s.

    Args:
        engine: the head group's engine (identity order, no fixed choice).
        node: the rewritten pattern node, containing one ``route``.
        geo: its :func:`geometry`, when known.

    Returns:
        The :class:`RoutedRuns`.
    """
    from patterndsl.analysis import routegrid, routeplan

    ((prim, signs),) = ir.polarities(node).items()
    sign = min(signs)
    geo = geometry(engine, node) if geo is None else geo
    nkb = geo.nkb
    cache: dict = {}
    grid = getattr(geo, "grid", False)  # routegrid's geometry: its own candidates and spans
    if grid:
        cand = routegrid.candidates(engine, prim, geo)
        n_cand = np.bincount(cand.group, weights=cand.hi - cand.lo, minlength=geo.n_q).astype(np.int64)
    else:
        cand = candidates(engine, prim, geo, cache)
        # per segment of groups (its groups have the same candidates)
        n_cand = np.bincount(cand.group, weights=cand.hi - cand.lo, minlength=cand.segments).astype(np.int64)
    take = np.minimum(prim.arg("topk"), n_cand)
    run_open = (n_cand > take)[cand.group]
    if hasattr(geo, "run_spans"):  # routepieces' geometry: tiles across grid rows
        spans = geo.run_spans(cand, run_open)
    elif grid:
        spans = routegrid.GridSpans(geo, cand, run_open)
    else:
        spans = _Spans(routegroups.SegmentGeometry(geo, cand), cand, run_open, cand.sizes)
    cand_cover, forced_cover = spans.cover(None), spans.cover(False)
    open_touch = spans.cover(True, covered=False)[0]
    all_bad, none_bad = spans.over(run_open, take), spans.over(run_open, n_cand - take)
    del spans  # per-run arrays (a million runs at qblock = 1): not needed past here
    route = [*cand_cover, *forced_cover, open_touch, all_bad, none_bad]
    if grid:  # over the shared query tiles: overlaid there, copied to every query tile once
        index, shared = geo.spread_all(route)
        route = [index]
        forced_cover = tuple(geo.spread(s) for s in forced_cover)
    rewrite = eng.rewrite_for_plan
    s_up = static_steps(engine, rewrite(ir.route_bound(node, False)))
    s_low = static_steps(engine, rewrite(ir.route_bound(node, True)))
    m, lo, hi, values = overlay([s_up, s_low, *route], nkb)
    if grid:
        values = values[:2] + routegrid.read_at(shared, values[2])
    up_s, low_s, ct, cc, ft, fc, ot, ab, nb_ = values
    gpt = geo.groups_per_tile[m]
    fix = {"cand": (ct > 0, cc == gpt), "forced": (ft > 0, fc == gpt)}
    lo_fix, hi_fix = (fix["forced"], fix["cand"]) if sign > 0 else (fix["cand"], fix["forced"])
    up_fix, low_fix = (hi_fix, lo_fix)
    settled = low_s == up_s
    alone = ~settled & (low_s == eng.EMPTY) & (up_s == eng.FULL)
    other = ~settled & ~alone
    # settled and alone segments: decided per segment
    up = np.where(alone, _choice(*up_fix, sign), up_s).astype(np.int8)
    low = np.where(alone, _choice(*low_fix, sign), up_s).astype(np.int8)
    state = up.copy()
    boxed = ~((ab > 0) | (nb_ > 0))
    maybe = (low != up) & ~other
    state[maybe & boxed] = eng.DYNAMIC
    rest = maybe & ~boxed
    if rest.any():
        fixed_on = lo_fix[0][rest] if sign > 0 else ~lo_fix[1][rest]
        hi_full = hi_fix[1][rest] if sign > 0 else ~hi_fix[0][rest]
        state[rest] = routeplan.states_from_counts(sign, fixed_on, hi_full, ot[rest] > 0, ab[rest] == 0, nb_[rest] == 0)
    reads, opened = ct > 0, ot > 0
    keep = ~other & (state > 0)  # empty segments are no runs
    out = [(m[keep], lo[keep], hi[keep], state[keep], opened[keep], reads[keep])]
    if other.any():
        segs = (m, lo, hi)
        tiles = _other_tiles(engine, node, prim, sign, geo, cand, n_cand, take, values, segs, other, cache)
        keep = tiles[3] > 0
        out.append(tuple(a[keep] for a in tiles))
    om, olo, ohi, ost, oop, ord_ = (np.concatenate(a) for a in zip(*out, strict=True))
    rmask = ord_ & (ost != eng.FULL)
    if len(out) > 1:
        # the segments and the other tiles, each sorted by (row, start) and disjoint: a stable sort merges them
        order = np.argsort(om * (nkb + 1) + olo, kind="stable")
        om, olo, ohi, ost, oop, rmask = (a[order] for a in (om, olo, ohi, ost, oop, rmask))
    new = np.ones(len(om), bool)
    new[1:] = (om[1:] != om[:-1]) | (olo[1:] != ohi[:-1]) | (ost[1:] != ost[:-1])
    new[1:] |= (oop[1:] != oop[:-1]) | (rmask[1:] != rmask[:-1])
    first = np.flatnonzero(new)
    last = (np.append(first[1:], len(om)) - 1)[: len(first)]
    forced = cand.take(~run_open)
    return RoutedRuns(
        om[first],
        olo[first],
        ohi[last],
        ost[first].astype(np.int8),
        oop[first],
        rmask[first],
        prim,
        forced,
        forced_cover,
        geo.groups_per_tile,
        nkb,
    )


def _other_tiles(engine, node, prim, sign, geo, cand, n_cand, take, values, segs, other, cache):
    """Segments where the static bounds neither agree nor are the route alone, tile by tile (as before)."""
    from patterndsl.analysis import routeplan

    m, lo, hi = (a[other] for a in segs)
    counts = hi - lo
    tm, tn = eng.expand_runs(m, lo, hi)
    keys = tm * geo.nkb + tn
    up_s, low_s, ct, cc, ft, fc, ot, ab, nb_ = (np.repeat(v[other], counts) for v in values)
    gpt = geo.groups_per_tile[tm]
    run_open = (n_cand > take)[cand.group]
    tables = {"cand": cand, "forced": cand.take(~run_open)}
    on = {"cand": (ct > 0, cc == gpt), "forced": (ft > 0, fc == gpt)}
    lo_name, hi_name = ("forced", "cand") if sign > 0 else ("cand", "forced")
    up_name, low_name = hi_name, lo_name
    rewrite = eng.rewrite_for_plan
    lower, upper = rewrite(ir.route_bound(node, True, ())), rewrite(ir.route_bound(node, False, ()))
    # groups and blocks nest in the tiles (on a grid: along a row, ``geo.qblock`` / ``geo.block`` being
    # the boxes' extents on the last axis)
    nested = getattr(geo, "cells", True) and engine.q.block % geo.qblock == 0 and engine.k.block % geo.block == 0
    if not getattr(geo, "cells", True):  # tiles across grid rows: cells of row pieces (routepieces)
        from patterndsl.analysis import routepieces

        tabs = [tables[up_name], tables[low_name]]
        up, low = routepieces.tile_bounds(engine, node, geo, keys, tabs, sign, (low_s, up_s))
    elif nested:
        static = (low_s, up_s)
        up, low = _tile_bounds(engine, node, geo, keys, [tables[up_name], tables[low_name]], sign, static, cache)
    else:

        def fixed(name):
            t, f = on[name]
            st = np.where(f[t], eng.FULL, eng.PARTIAL).astype(np.int8)
            return {prim: (tables[name], keys[t], st)}

        up = routeplan._states_on(keys, *engine.fixing(fixed(up_name)).run(upper, keys))
        low = routeplan._states_on(keys, *engine.fixing(fixed(low_name)).run(lower, keys))
    state = up.copy()
    maybe = np.flatnonzero(low != up)
    boxed = (ab[maybe] == 0) & (nb_[maybe] == 0)
    state[maybe[boxed]] = eng.DYNAMIC
    rest = maybe[~boxed]
    if len(rest):
        per_group = getattr(cand, "per_group", None)  # segments of groups (1-D) or one row per group (grid)
        counts = (per_group(n_cand), per_group(take)) if per_group else (n_cand, take)
        facts = routetiles._Facts(engine, prim, *counts)
        sel_lo, sel_up = {prim: tables[low_name]}, {prim: tables[up_name]}
        state[rest] = routeplan.exact_states(engine, node, facts, sign, keys[rest], sel_lo, sel_up)
    return tm, tn, tn + 1, state, ot > 0, ct > 0


def _chosen_count(table: routetiles.RunTable, g0: np.ndarray, g1: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per cell, how many of the groups ``g0 <= a < g1`` have block ``b`` in ``table``.

    When every group has at most one run and the runs' starts and ends do not decrease from group
    to group (``causal - window(63)``: ``[0, (q - 64) // 64 + 1)``), the groups holding ``b`` are
    a range found by two binary searches; else the pairs are listed (in chunks).
    """
    if isinstance(table, routegroups.GroupRuns):
        return table.chosen_count(g0, g1, b)
    lo, hi = (t.numpy() for t in table._table())
    if _monotone(lo, hi):
        first, last = lo[:-1, 0], hi[:-1, 0]  # the zero row past the last group dropped
        upper = np.minimum(g1, np.searchsorted(first, b, "right"))  # groups below start at or before b
        lower = np.maximum(g0, np.searchsorted(last, b, "right"))  # groups from there end after b
        return np.maximum(upper - lower, 0).astype(np.int64)
    return _chosen_count_listed(lo, hi, g0, g1, b)


def _monotone(lo: np.ndarray, hi: np.ndarray) -> bool:
    """Every group has at most one run, their starts and ends not decreasing (``[groups + 1, runs]`` bounds)."""
    return lo.shape[1] == 1 and bool((np.diff(lo[:-1, 0]) >= 0).all() and (np.diff(hi[:-1, 0]) >= 0).all())


#: Most (group, block) pairs :func:`_counter` lists a choice as (8 bytes each).
MAX_LISTED_PAIRS = 1 << 24


def _counter(table, n_q: int):
    """``count(g0, g1, b)``, :func:`_chosen_count` of ``table``. A per-group table of at most
    :data:`MAX_LISTED_PAIRS` pairs whose runs are not one non-decreasing run a group (a grid's candidates
    under ``among = neighborhood(...)``) is listed once as pair keys sorted by (block, group): each cell
    is then two binary searches, not a pass over its groups."""
    if isinstance(table, routetiles.RunTable) and int((table.hi - table.lo).sum()) <= MAX_LISTED_PAIRS:
        lo, hi = (t.numpy() for t in table._table())
        if not _monotone(lo, hi):
            r, blocks = eng.expand_runs(np.arange(len(table.group), dtype=np.int64), table.lo, table.hi)
            keys = np.sort(blocks * n_q + table.group[r])

            def count(g0, g1, b):
                return np.searchsorted(keys, b * n_q + g1) - np.searchsorted(keys, b * n_q + g0)

            return count
    return lambda g0, g1, b: _chosen_count(table, g0, g1, b)


def _chosen_count_listed(lo: np.ndarray, hi: np.ndarray, g0: np.ndarray, g1: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`_chosen_count` from the (cell, group) pairs, from the ``[groups + 1, runs]`` bounds."""
    return routegroups.count_listed(lo, hi, np.arange(len(lo), dtype=np.int64), g0, g1, b)


def _cell_states(sub: eng.Engine, node: ir.Node, keys: np.ndarray) -> np.ndarray:
    """States of a static bound on the cells ``keys`` (``full`` / ``empty``, as a union's upper bound
    often is: no engine pass)."""
    if node in (ir.FULL, ir.EMPTY):
        return np.full(len(keys), eng.FULL if node == ir.FULL else eng.EMPTY, np.int8)
    return routetiles.routeplan_states(sub, node, keys)


def _tile_bounds(engine: eng.Engine, node: ir.Node, geo, keys: np.ndarray, tables: list, sign: int, static, cache):
    """Per tile ``keys`` and per choice in ``tables``, the pattern's state with the route fixed to it.

    Groups and blocks nest in the tiles. A tile is cut into cells of ``qblock * 2**j`` queries by
    one block: where the static bounds (the route as empty / full) agree on a cell, that is its
    state for any choice; where they are empty and full, the cell is the route alone (full when
    every group of the cell has the block, empty when none has); elsewhere the route is all or
    nothing on each group's row: the upper bound where chosen (at +1), else the lower one. A cell
    whose groups all take the upper bound is the upper bound's, one whose groups all take the lower
    one the lower one's (near the diagonal of ``causal & (window(63) | route(...))`` every group
    of a cell has the block, or none has); only cells mixing both are halved, down to one group
    (:func:`routetiles._tile_from_cells` on every cell, coarse rows first), and only in tiles not
    yet known to be neither empty nor full. ``static``, the static bounds' ``(lower, upper)`` states
    on each tile, say so from the start where the lower one is non-empty (the tile is for every
    choice) or the upper one not full.

    On a grid (``geo`` from :mod:`~patterndsl.analysis.routegrid`) a cell's rows and columns are pieces
    of one row of the grid (``qblock``, ``block``: the boxes' extents on the last axis), the groups of
    a cell row consecutive group columns of one outer box (``geo.cell_groups``), and a cell column
    one block's piece (``geo.cell_blocks``). Tiles equal up to a shift of the grid's outer axes (the
    windows and the choices repeating) are decided once per class (:mod:`~patterndsl.analysis.tileshift`).
    """
    rewrite = eng.rewrite_for_plan
    low_node, up_node = rewrite(ir.route_bound(node, True)), rewrite(ir.route_bound(node, False))
    # tiles equal up to a shift of the grid (away from its borders): decided once per class
    shift = tileshift.tile_classes(engine, geo, (low_node, up_node), keys, tables, static)
    if shift is not None:
        keys, static, inverse = shift
    per_q, per_k = engine.q.block // geo.qblock, engine.k.block // geo.block
    top = (per_q & -per_q).bit_length() - 1  # cells of 2**top groups tile a query tile
    n_t = len(keys)
    low_s, up_s = static
    full = [up_s == eng.FULL for _ in tables]
    some = [low_s > eng.EMPTY for _ in tables]
    m, n = keys // geo.nkb, keys % geo.nkb
    step = per_q >> top
    counters = [_counter(table, geo.n_q) for table in tables]
    chunk = max(1, CELL_CHUNK // (step * per_k))
    for t0 in range(0, n_t, chunk):  # tiles a chunk at a time: the cells' arrays stay small
        part = np.arange(t0, min(t0 + chunk, n_t), dtype=np.int64)
        owner, r = eng.expand_runs(part, m[part] * step, (m[part] + 1) * step)
        _cells_of_tiles(
            engine, geo, (owner, r, n), (per_k, top), (low_node, up_node), counters, sign, (full, some), cache
        )
    states = zip(full, some, strict=True)
    out = [np.where(f, eng.FULL, np.where(sm, eng.PARTIAL, eng.EMPTY)).astype(np.int8) for f, sm in states]
    return out if shift is None else [s[inverse] for s in out]


#: Cells :func:`_tile_bounds` lays out at once (a chunk of tiles; several int64 arrays per cell).
CELL_CHUNK = 1 << 18


def _cells_of_tiles(engine, geo, rows, shape, bounds, counters, sign, acc, cache) -> None:
    """:func:`_tile_bounds` on the tiles of ``rows`` (``owner``: tile index of each cell row ``r`` of the top
    level; ``n``: every tile's key tile), folded into ``acc`` (per table, full and some per tile)."""
    owner, r, n = rows
    per_k, top = shape
    low_node, up_node = bounds
    full, some = acc
    # col: a cell's column of keys (a block in 1-D; on a grid a block's piece of one row)
    at, col = eng.expand_runs(np.arange(len(owner), dtype=np.int64), n[owner] * per_k, (n[owner] + 1) * per_k)
    owner, r = owner[at], r[at]
    ok = col < -(-engine.ctx.kv_len // geo.block)
    owner, r, col = owner[ok], r[ok], col[ok]
    grid = getattr(geo, "grid", False)
    b = geo.cell_blocks(col) if grid else col
    for j in range(top, -1, -1):
        sub = _sub_engine(engine, (geo.qblock << j, geo.block), cache)
        ok = r < sub.nqb
        owner, r, col, b = owner[ok], r[ok], col[ok], b[ok]
        ck = r * sub.nkb + col
        order = np.argsort(ck, kind="stable")
        owner, r, col, b, ck = owner[order], r[order], col[order], b[order], ck[order]
        if grid:  # cells repeating along the outer axes (away from the borders): decided once per class
            low, up = cellshift.cell_states(sub, (low_node, up_node), r, col, _cell_states)
        else:
            low, up = (_cell_states(sub, bound, ck) for bound in (low_node, up_node))
        g0, g1 = geo.cell_groups(r, j) if grid else (r << j, np.minimum((r + 1) << j, geo.n_q))
        rest = decide_cells((low, up), (g0, g1, b), owner, counters, sign, (full, some))
        if not rest.any():
            break
        owner = np.repeat(owner[rest], 2)
        b, col = np.repeat(b[rest], 2), np.repeat(col[rest], 2)
        r = (r[rest][:, None] * 2 + np.arange(2)[None, :]).reshape(-1)


def decide_cells(bounds, cells, owner, counters, sign, acc) -> np.ndarray:
    """One level of :func:`_cells_of_tiles`: the cells' states under each choice (the static bounds ``(low, up)``
    on each cell, its groups ``[g0, g1)`` and block ``b`` in ``cells``) folded into ``acc`` (per table, full and
    some per tile ``owner``); returns the cells to halve (mixing groups that take the upper bound and groups
    that take the lower one, in tiles not yet settled)."""
    low, up = bounds
    g0, g1, b = cells
    full, some = acc
    n_t = len(full[0])
    alone = (low == eng.EMPTY) & (up == eng.FULL)
    between = np.flatnonzero((low != up) & ~alone)
    size = g1 - g0
    rest = np.zeros(len(low), bool)
    for i, count in enumerate(counters):
        state = low.copy()
        done = ~rest
        if alone.any():
            c = count(g0[alone], g1[alone], b[alone])
            if sign < 0:
                c = size[alone] - c
            state[alone] = np.where(c == size[alone], eng.FULL, np.where(c > 0, eng.PARTIAL, eng.EMPTY))
        if len(between):
            # rows taking the upper bound (the route chosen at +1, not chosen at -1): all of them,
            # the cell is the upper bound's; none, the lower one's; else its rows are halved
            c = count(g0[between], g1[between], b[between])
            u = c if sign > 0 else size[between] - c
            state[between] = np.where(u == size[between], up[between], low[between])
            mixed = between[(u > 0) & (u < size[between])]
            done[mixed] = False
            rest[mixed] = True
        # a cell done for this table but halved for another: its halves repeat its state (all / any)
        d = np.flatnonzero(done)
        full[i][owner[d[state[d] != eng.FULL]]] = False  # (ufunc.at's and / or, as plain stores)
        some[i][owner[d[state[d] > eng.EMPTY]]] = True
    # a tile found neither full nor empty under every choice is settled: its other cells need no halving
    unsettled = np.zeros(n_t, bool)
    for f, sm in zip(full, some, strict=True):
        unsettled |= f | ~sm
    rest &= unsettled[owner]
    return rest
