"""Stage 4 (block plan), route patterns in 1-D token order: tile states from candidate runs, not pair by pair.

Comes in: the identity-order :class:`~patterndsl.analysis.engine.Engine` of one head group and
its rewritten node with one ``route`` (one polarity, ``among`` not reading ``h``, no layout).
Goes out: the same :class:`~patterndsl.analysis.routeplan.RoutedTiles` as
:func:`patterndsl.analysis.routeplan.classify`, computed from the tile level.

A route's candidates are the non-empty cells of ``among`` planned on tiles of one query group
by one key block (``qblock x block``): at a million tokens and ``qblock = 1`` there are billions
of candidate pairs but only a few runs of blocks per group (``causal - window(63)``: one run,
``[0, (q - 64) // 64]``), which the coarse-to-fine plan of ``among`` yields as runs
(:mod:`patterndsl.analysis.hierarchy`). Everything after that works on runs and on per-tile
arrays of the fine grid: a run of blocks touches a range of key tiles and covers a smaller
range whole (blocks are ranges of keys, so both are ranges); per query tile, difference
arrays over key tiles count the groups touching and covering each tile. So

* a fixed choice (candidates, forced groups' candidates) is empty / partial / full on a tile
  by those counts (full: every group of the query tile covers it);
* the box test of :mod:`~patterndsl.analysis.routeplan` (every open group can take all or none
  of its candidates in the tile) fails only where a group's candidates inside a key tile
  outnumber ``min(k_a, n_a - k_a)``: on the covered range that is the blocks per key tile,
  on the at most two partly covered end tiles of a run the overlap, summed per group;
* element-wise evaluation (with a :class:`RunTable` as the selection) is left to the tiles the
  static parts and the bounds cannot settle, as before.
"""

from __future__ import annotations

import numpy as np
import torch

from patterndsl import ir
from patterndsl.analysis import engine as eng
from patterndsl.analysis import hierarchy

#: Beyond this many tiles the per-tile arrays (several bytes per tile, a few of them) would not fit
#: the memory a plan may use; such plans go pair by pair.
MAX_DENSE_TILES = 1 << 24


def usable(engine: eng.Engine, node: ir.Node) -> bool:
    """Whether :func:`classify` applies (one route of one polarity, identity order; see :func:`_geometry`)."""
    return _geometry(engine, node) is not None


def _geometry(engine: eng.Engine, node: ir.Node, dense_limit: bool = True):
    """The geometry :func:`classify` works with, or None: one route of one polarity, ``among`` not
    reading ``h``, identity order; 1-D groups aligned to the query start (runs), else (grids) when
    the dense (group x key tile) arrays are small. ``dense_limit=False``: any number of tiles
    (:mod:`~patterndsl.analysis.routeruns` keeps no per-tile array)."""
    pol = ir.polarities(node)
    if len(pol) != 1:
        return None
    ((prim, signs),) = pol.items()
    among = prim.arg("among")
    if (
        len(signs) != 1
        or ir.uses_head(among)
        or ir.is_dynamic(among)
        or not (engine.q.identity and engine.k.identity)
        or engine.q.order is not None
        or engine.k.order is not None
        or (dense_limit and engine.nqb * engine.nkb > MAX_DENSE_TILES)
    ):
        return None
    block, qblock = prim.arg("block"), prim.arg("qblock")
    qblock = block if qblock is None else qblock
    if (
        engine.env.layout is None
        and isinstance(block, int)
        and isinstance(qblock, int)
        and engine.ctx.offset % qblock == 0
    ):
        return _Geometry(engine, prim)
    return _DenseGeometry.build(engine, prim)


class RunTable:
    """A route's fixed choice as runs of blocks per group, indexable like the bool ``[n_groups, n_blocks]`` table.

    Attributes:
        group, lo, hi: int64 runs, sorted by ``(group, lo)``, disjoint and not touching: group
            ``group[r]`` has blocks ``lo[r] <= b < hi[r]``.
        n_blocks: key blocks of the route.
    """

    def __init__(self, group: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_blocks: int):
        self.group, self.lo, self.hi, self.n_blocks = group, lo, hi, n_blocks
        self.source = None
        self._lookup = None

    def take(self, keep: np.ndarray) -> RunTable:
        """The runs where ``keep`` is True (whole groups: ``source`` names the table they came from)."""
        out = RunTable(self.group[keep], self.lo[keep], self.hi[keep], self.n_blocks)
        out.source = self
        return out

    def to(self, device) -> RunTable:
        return self

    def _table(self):
        # [groups, most runs of a group] bounds (empty runs as lo = hi = 0): a few compares per element
        if self._lookup is None:
            n_groups = int(self.group.max()) + 1 if len(self.group) else 0
            per = np.bincount(self.group, minlength=n_groups)
            width = int(per.max()) if len(per) else 0
            lo = np.zeros((n_groups + 1, width), np.int64)
            hi = np.zeros((n_groups + 1, width), np.int64)
            rank = np.arange(len(self.group)) - np.repeat(np.cumsum(per) - per, per)
            lo[self.group, rank] = self.lo
            hi[self.group, rank] = self.hi
            self._lookup = torch.from_numpy(lo), torch.from_numpy(hi)
        return self._lookup

    def __getitem__(self, index) -> torch.Tensor:
        a, b = index
        lo, hi = self._table()
        a = a.clamp(max=len(lo) - 1)  # groups past the last run have none (the zero row)
        out = torch.zeros(torch.broadcast_tensors(a, b)[0].shape, dtype=torch.bool)
        for r in range(lo.shape[1]):
            out |= (b >= lo[a, r]) & (b < hi[a, r])
        return out


class _Geometry:
    """How groups and blocks meet the fine tiles (1-D, identity order, ranges of indices)."""

    def __init__(self, engine: eng.Engine, prim: ir.Prim):
        block, qblock = prim.arg("block"), prim.arg("qblock")
        self.block, self.qblock = block, block if qblock is None else qblock
        qs, ks = engine.q.starts, engine.k.starts
        self.nqb, self.nkb = engine.nqb, engine.nkb
        q_len = engine.ctx.q_len
        self.n_q = -(-q_len // self.qblock)
        self.n_k = -(-engine.ctx.kv_len // block)
        # blocks [bt0, bt1) meet key tile n; groups [g0, g1) meet query tile m
        self.bt0 = ks[:-1] // block
        self.bt1 = (ks[1:] - 1) // block + 1
        self.groups_per_tile = (qs[1:] - 1) // self.qblock + 1 - qs[:-1] // self.qblock
        self.q_starts, self.q_len, self._bm = qs, q_len, engine.q.block
        self._regular = len(qs) == self.nqb + 1 and (qs[:-1] == np.arange(self.nqb, dtype=np.int64) * self._bm).all()
        self._qt = None

    def group_tiles(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Query tiles ``[qt0, qt1)`` that groups ``a`` meet."""
        first, last = a * self.qblock, np.minimum((a + 1) * self.qblock, self.q_len) - 1
        if self._regular:
            return first // self._bm, last // self._bm + 1  # tiles of BM queries from the first: no search
        return np.searchsorted(self.q_starts, first, "right") - 1, np.searchsorted(self.q_starts, last, "right")

    def _per_group(self) -> tuple[np.ndarray, np.ndarray]:
        # every group's query tiles, built when first read (routeruns works on segments of groups)
        if self._qt is None:
            self._qt = self.group_tiles(np.arange(self.n_q, dtype=np.int64))
        return self._qt

    @property
    def qt0(self) -> np.ndarray:
        return self._per_group()[0]

    @property
    def qt1(self) -> np.ndarray:
        return self._per_group()[1]

    def spans(self, runs: RunTable):
        """Per run: key tiles touched ``[t0, t1)`` and covered whole ``[f0, f1)`` (``f0 >= f1``: none)."""
        t0 = np.searchsorted(self.bt1, runs.lo, "right")
        t1 = np.searchsorted(self.bt0, runs.hi, "left")
        f0 = np.searchsorted(self.bt0, runs.lo, "left")
        f1 = np.searchsorted(self.bt1, runs.hi, "right")
        return t0, t1, f0, f1

    def rows(self, group: np.ndarray):
        """``(run, m)``: every query tile ``m`` of each run's group."""
        return eng.expand_runs(np.arange(len(group), dtype=np.int64), self.qt0[group], self.qt1[group])

    def count(self, m: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Per tile ``[nqb, nkb]``: how many of the ranges ``(m, [lo, hi))`` hold it."""
        width = self.nkb + 1
        ok = lo < hi
        m, lo, hi = m[ok], lo[ok], hi[ok]
        size = self.nqb * width
        diff = np.bincount(m * width + lo, minlength=size) - np.bincount(m * width + hi, minlength=size)
        return np.cumsum(diff.reshape(self.nqb, width), axis=1)[:, : self.nkb]

    def candidates(self, engine: eng.Engine, prim: ir.Prim) -> RunTable:
        """The candidate blocks of every group as runs: ``among`` planned on ``qblock x block`` tiles.

        A tile of that plan is one (group, key block) cell; it is non-empty exactly when ``among``
        allows a pair in the cell. Large plans come from the coarse levels as runs.
        """
        sub = eng.identity_engine(engine.ctx, engine.env.head, (self.qblock, self.block))
        sub = eng.Engine(sub.q, sub.k, engine.env, tally=engine.tally)
        among = eng.rewrite_for_plan(prim.arg("among"))
        layered = None
        if hierarchy.usable(among, sub.q, sub.k, None):
            layered = hierarchy.classify(sub, among)
        if layered is None:
            keys, _ = sub.run(among)
            row, lo, hi = keys // sub.nkb, keys % sub.nkb, keys % sub.nkb + 1
        else:
            keys = layered.keys
            pr, plo, phi = layered.partial
            row = np.concatenate([keys // sub.nkb, layered.row, pr])
            lo = np.concatenate([keys % sub.nkb, layered.lo, plo])
            hi = np.concatenate([keys % sub.nkb + 1, layered.hi, phi])
        return _merged(row.astype(np.int64), lo.astype(np.int64), hi.astype(np.int64), self.n_k)

    def cover(self, runs: RunTable):
        """``(touched, covered)`` per tile ``[nqb, nkb]``: groups whose runs touch / hold it whole."""
        t0, t1, f0, f1 = self.spans(runs)
        r, m = self.rows(runs.group)
        return self.count(m, t0[r], t1[r]), self.count(m, f0[r], f1[r])

    def over(self, runs: RunTable, cap: np.ndarray) -> np.ndarray:
        """Bool ``[nqb, nkb]``: some group of ``runs`` has more than ``cap[group]`` candidates in the tile.

        A tile covered whole by a run holds ``bt1 - bt0`` of its blocks (no other run of the group
        meets it); a tile a run touches in part holds the overlaps of every run of the group there.
        """
        t0, t1, f0, f1 = self.spans(runs)
        g = runs.group
        nb = self.bt1 - self.bt0
        c = cap[g]
        over = np.zeros((self.nqb, self.nkb), bool)
        # covered ranges: every tile over the cap, none, or (blocks per tile vary) tile by tile
        whole = (c < nb.min()) if len(nb) else np.zeros(len(g), bool)
        mixed = ~whole & (c < nb.max()) & (f0 < f1) if len(nb) else whole
        r, m = self.rows(g[whole])
        idx = np.flatnonzero(whole)[r]
        over |= self.count(m, f0[idx], f1[idx]) > 0
        if mixed.any():
            sel = np.flatnonzero(mixed)
            run, n = eng.expand_runs(sel, f0[sel], f1[sel])
            hot = nb[n] > c[run]
            self._mark(over, g[run[hot]], n[hot])
        # ends: touched but not covered whole (at most two tiles per run)
        first_end = np.where(f0 < f1, np.minimum(f0, t1), t1)
        run_a = np.flatnonzero(t0 < first_end)
        ends_r = [run_a, np.flatnonzero((f0 < f1) & (f1 < t1))]
        ends_n = [t0[run_a], f1[ends_r[1]]]
        if not (f0 < f1).all():
            # a run covering no tile whole touches at most two tiles: t0 and t0 + 1
            two = np.flatnonzero((f0 >= f1) & (t1 - t0 == 2))
            ends_r.append(two)
            ends_n.append(t0[two] + 1)
        er, en = np.concatenate(ends_r), np.concatenate(ends_n)
        if len(er):
            overlap = np.minimum(runs.hi[er], self.bt1[en]) - np.maximum(runs.lo[er], self.bt0[en])
            gn, inv = np.unique(g[er] * self.nkb + en, return_inverse=True)
            total = np.bincount(inv, weights=overlap).astype(np.int64)
            hot = total > cap[gn // self.nkb]
            self._mark(over, gn[hot] // self.nkb, gn[hot] % self.nkb)
        return over

    def _mark(self, grid: np.ndarray, group: np.ndarray, n: np.ndarray) -> None:
        """Set ``grid[m, n]`` for every query tile ``m`` of each ``group``."""
        r, m = self.rows(group)
        grid[m, n[r]] = True


class _DenseGeometry:
    """Groups and blocks of any shape (grid boxes): one row per group over key tiles.

    From the incidences (query tile, group) and (block, key tile): a choice's blocks per
    (group, key tile) are sums of its bool ``[groups, blocks]`` table over each key tile's blocks,
    and per tile the groups of its query tile are summed the same way (:func:`_row_sums`).
    """

    #: Largest (groups x blocks) or (groups x key tiles) table built; beyond it the pair-by-pair plan is used.
    MAX_ENTRIES = 1 << 23

    def __init__(self, n_q, n_k, q_pairs, k_pairs, nqb, nkb):
        self.n_q, self.n_k, self.nqb, self.nkb = n_q, n_k, nqb, nkb
        (qm, self.qa), (self.kb, kn) = q_pairs, k_pairs
        self.q_starts = np.searchsorted(qm, np.arange(nqb))
        self.k_starts = np.searchsorted(kn, np.arange(nkb))
        self.nb = np.bincount(kn, minlength=nkb)
        self.groups_per_tile = np.bincount(qm, minlength=nqb).astype(np.int64)
        self._count = np.uint8 if max(self.nb.max(), self.groups_per_tile.max()) < 255 else np.int32
        self._held = None  # (candidate table, its blocks per group and key tile)

    @classmethod
    def build(cls, engine: eng.Engine, prim: ir.Prim):
        from patterndsl import semantics

        n_q, n_k, qgroup, kblock = semantics.route_blocks(prim, engine.ctx)
        nqb, nkb = engine.nqb, engine.nkb
        if max(n_q * n_k, n_q * nkb) > cls.MAX_ENTRIES:
            return None
        qtile = np.searchsorted(engine.q.starts, np.arange(engine.ctx.q_len), "right") - 1
        ktile = np.searchsorted(engine.k.starts, np.arange(engine.ctx.kv_len), "right") - 1
        q_pairs = np.unique(qtile * n_q + qgroup.numpy())  # sorted by query tile
        k_pairs = np.unique(ktile * n_k + kblock.numpy())  # sorted by key tile
        return cls(n_q, n_k, (q_pairs // n_q, q_pairs % n_q), (k_pairs % n_k, k_pairs // n_k), nqb, nkb)

    def candidates(self, engine: eng.Engine, prim: ir.Prim) -> RunTable:
        """The candidate pairs of ``among``'s coarse plan (:meth:`Engine.route_candidates`) as runs."""
        keys = engine.route_candidates(prim)[0]
        a, b = keys // self.n_k, keys % self.n_k
        return _merged(a, b, b + 1, self.n_k)

    def _blocks(self, runs: RunTable) -> np.ndarray:
        """``[n_q, nkb]``: blocks of ``runs`` each group has in each key tile.

        A table whose groups keep all their runs of the first table asked about (the candidates:
        forced and open groups are such) reuses its counts, rows of other groups zeroed.
        """
        if self._held is not None and runs.source is self._held[0]:
            rows = np.zeros(self.n_q, self._count)
            rows[runs.group] = 1
            return self._held[1] * rows[:, None]
        chosen = np.zeros((self.n_k, self.n_q), self._count)  # block-major: the sums run over rows
        r, b = eng.expand_runs(np.arange(len(runs.group)), runs.lo, runs.hi)
        chosen[b, runs.group[r]] = 1
        held = np.ascontiguousarray(_row_sums(chosen, self.kb, self.k_starts, self._count).T)
        if self._held is None:
            self._held = (runs, held)
        return held

    def _per_tile(self, per_group: np.ndarray) -> np.ndarray:
        """``[nqb, nkb]``: sums over the groups of each query tile of a ``[n_q, nkb]`` 0/1 table."""
        return _row_sums(per_group.astype(self._count), self.qa, self.q_starts, self._count).astype(np.int64)

    def cover(self, runs: RunTable):
        held = self._blocks(runs)
        return self._per_tile(held > 0), self._per_tile(held == self.nb)

    def over(self, runs: RunTable, cap: np.ndarray) -> np.ndarray:
        return self._per_tile(self._blocks(runs) > cap[:, None]) > 0


def _row_sums(rows: np.ndarray, index: np.ndarray, starts: np.ndarray, dtype) -> np.ndarray:
    """``[len(starts), width]``: segment ``i`` sums ``rows[index[starts[i]:starts[i + 1]]]`` (the last to the end).

    One gather and add per position inside the segments (a few dozen): ``np.add.reduceat`` along
    the first axis took 0.5 s for the 16K x 1K table of BiFormer at 128K tokens, this 3 ms, and its
    time per tile grew with the table, not with the tiles.
    """
    length = np.diff(np.append(starts, len(index)))
    out = np.zeros((len(starts), rows.shape[1]), dtype)
    for k in range(int(length.max()) if len(length) else 0):
        seg = np.flatnonzero(length > k)
        if len(seg) == len(starts):
            out += rows[index[starts + k]]
        else:
            out[seg] += rows[index[starts[seg] + k]]
    return out


def _merged(row: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_blocks: int) -> RunTable:
    """Disjoint runs ``(row, [lo, hi))`` (in any order) merged where they touch, sorted."""
    if not len(row):
        return RunTable(row, lo, hi, n_blocks)
    key = row * n_blocks + lo
    if len(key) > 1 and not (key[1:] > key[:-1]).all():
        order = np.argsort(key, kind="stable")
        row, lo, hi = row[order], lo[order], hi[order]
    new = np.ones(len(row), bool)
    new[1:] = (row[1:] != row[:-1]) | (lo[1:] != hi[:-1])
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(row)) - 1
    return RunTable(row[first], lo[first], hi[last], n_blocks)


def _cells(engine: eng.Engine, geo, keys: np.ndarray):
    """The (group x block) cells of tiles ``keys`` when they nest in the tiles (1-D), else None.

    Returns:
        ``(sub, tile, a, b)``: the engine on ``qblock x block`` tiles, and per cell (sorted by
        cell key ``a * n_k + b``) its tile's index in ``keys``, its group and block.
    """
    if not isinstance(geo, _Geometry) or engine.q.block % geo.qblock or engine.k.block % geo.block:
        return None
    per_q, per_k = engine.q.block // geo.qblock, engine.k.block // geo.block
    m, n = keys // geo.nkb, keys % geo.nkb
    rows, ga = eng.expand_runs(np.arange(len(keys)), m * per_q, np.minimum((m + 1) * per_q, geo.n_q))
    at, b = eng.expand_runs(np.arange(len(rows)), n[rows] * per_k, np.minimum((n[rows] + 1) * per_k, geo.n_k))
    tile, a = rows[at], ga[at]
    sub = eng.identity_engine(engine.ctx, engine.env.head, (geo.qblock, geo.block))
    sub = eng.Engine(sub.q, sub.k, engine.env, tally=engine.tally)
    order = np.argsort(a * geo.n_k + b, kind="stable")
    return sub, tile[order], a[order], b[order]


def _cell_states(engine: eng.Engine, node: ir.Node, cells):
    """``(lower, upper)`` states on each cell of the static bounds (the route as empty / full)."""
    sub, _, a, b = cells
    keys = a * sub.nkb + b
    rewrite = eng.rewrite_for_plan
    low = routeplan_states(sub, rewrite(ir.route_bound(node, True)), keys)
    up = routeplan_states(sub, rewrite(ir.route_bound(node, False)), keys)
    return low, up


def routeplan_states(engine: eng.Engine, node: ir.Node, keys: np.ndarray) -> np.ndarray:
    """States of a static ``node`` on the sorted tiles ``keys`` (0 where empty)."""
    from patterndsl.analysis import routeplan

    return routeplan._states_on(keys, *engine.run(node, keys))


def _tile_from_cells(cells, s_cells, table: RunTable, sign: int, n_tiles: int) -> np.ndarray:
    """Per tile, the pattern's state with the route fixed to ``table``: on each cell the route is
    all or nothing, so the pattern there is the static upper bound (route chosen, at +1) or the
    lower one."""
    _, tile, a, b = cells
    low, up = s_cells
    chosen = table[torch.from_numpy(a), torch.from_numpy(b)].numpy()
    state = np.where(chosen == (sign > 0), up, low)
    cells_in = np.bincount(tile, minlength=n_tiles)
    full = np.bincount(tile, weights=state == eng.FULL, minlength=n_tiles) == cells_in
    some = np.bincount(tile, weights=state > eng.EMPTY, minlength=n_tiles) > 0
    return np.where(full, eng.FULL, np.where(some, eng.PARTIAL, eng.EMPTY)).astype(np.int8)


def _choice_state(geo, fix, keys: np.ndarray, sign: int) -> np.ndarray:
    """States on tiles ``keys`` of a fixed choice (``_fixed``'s), or of its complement at ``sign`` -1."""
    m, n = keys // geo.nkb, keys % geo.nkb
    state = np.where(fix[3][m, n], np.where(fix[4][m, n], eng.FULL, eng.PARTIAL), eng.EMPTY).astype(np.int8)
    return state if sign > 0 else (eng.FULL - state).astype(np.int8)


def _fixed(geo, runs: RunTable):
    """A fixed choice as the engine takes it: ``(table, keys, states)`` of the tiles it meets."""
    touched, covered = geo.cover(runs)
    touched = touched > 0
    full = covered == geo.groups_per_tile[:, None]
    keys = np.flatnonzero(touched.reshape(-1))
    state = np.where(full.reshape(-1)[keys], eng.FULL, eng.PARTIAL).astype(np.int8)
    return runs, keys, state, touched, full


def classify(engine: eng.Engine, node: ir.Node):
    """Tile states of a route pattern (see :func:`usable`), equal to :func:`routeplan.classify`'s.

    Args:
        engine: the head group's engine (identity order, no fixed choice).
        node: the rewritten pattern node, containing one ``route``.

    Returns:
        The :class:`~patterndsl.analysis.routeplan.RoutedTiles`.
    """
    from patterndsl.analysis import routeplan

    ((prim, signs),) = ir.polarities(node).items()
    sign = min(signs)
    geo = _geometry(engine, node)
    cand = geo.candidates(engine, prim)
    n_cand = np.bincount(cand.group, weights=cand.hi - cand.lo, minlength=geo.n_q).astype(np.int64)
    take = np.minimum(prim.arg("topk"), n_cand)
    is_open = n_cand > take
    run_open = is_open[cand.group]
    cand_fix = _fixed(geo, cand)
    forced_fix = _fixed(geo, cand.take(~run_open))
    low_fix = {prim: forced_fix if sign > 0 else cand_fix}
    up_fix = {prim: cand_fix if sign > 0 else forced_fix}
    rewrite = eng.rewrite_for_plan
    # The static bounds (the route as empty / full by polarity) settle a tile for every choice
    # where they agree (a tile some pair of the lower bound holds and the upper one does not fill
    # is partial whatever is chosen): only the other tiles need the fixed choices, and the
    # elements of the settled ones are never evaluated.
    s_keys, s_up = engine.run(rewrite(ir.route_bound(node, False)))
    s_low = routeplan._states_on(s_keys, *engine.run(rewrite(ir.route_bound(node, True)), s_keys))
    settled = s_low == s_up
    # Where the static bounds are empty and full the pattern is the route itself (or its
    # complement, at -1): each bound's state is its fixed choice's, no engine pass needed.
    alone = ~settled & (s_low == eng.EMPTY) & (s_up == eng.FULL)
    other = ~settled & ~alone
    lower, upper = rewrite(ir.route_bound(node, True, ())), rewrite(ir.route_bound(node, False, ()))
    cells = _cells(engine, geo, s_keys[other])
    if cells is not None:
        # groups and blocks nest in tiles: each bound from the static bounds on its cells
        k_o = s_keys[other]
        s_cells = _cell_states(engine, node, cells)
        up_o = _tile_from_cells(cells, s_cells, up_fix[prim][0], sign, len(k_o))
        low_o = _tile_from_cells(cells, s_cells, low_fix[prim][0], sign, len(k_o))
        k_o, up_o, low_o = k_o[up_o > 0], up_o[up_o > 0], low_o[up_o > 0]
    else:
        k_o, up_o = engine.fixing({prim: up_fix[prim][:3]}).run(upper, s_keys[other])
        low_o = routeplan._states_on(k_o, *engine.fixing({prim: low_fix[prim][:3]}).run(lower, k_o))
    k_a = s_keys[alone]
    up_a, low_a = _choice_state(geo, up_fix[prim], k_a, sign), _choice_state(geo, low_fix[prim], k_a, sign)
    k_a, up_a, low_a = k_a[up_a > 0], up_a[up_a > 0], low_a[up_a > 0]
    keys = np.concatenate([k_o, k_a, s_keys[settled]])
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    up = np.concatenate([up_o, up_a, s_up[settled]])[order]
    low = np.concatenate([low_o, low_a, s_up[settled]])[order]
    state = up.copy()
    maybe = np.flatnonzero(low != up)
    m, n = keys // geo.nkb, keys % geo.nkb
    reads = cand_fix[3][m, n]
    open_runs = cand.take(run_open)
    opened = geo.cover(open_runs)[0][m, n] > 0
    # a group with more candidates in a tile than it takes cannot take them all, one with more
    # than it leaves cannot avoid them all
    all_bad = geo.over(open_runs, take)[m[maybe], n[maybe]]
    none_bad = geo.over(open_runs, n_cand - take)[m[maybe], n[maybe]]
    boxed = ~(all_bad | none_bad)
    state[maybe[boxed]] = eng.DYNAMIC
    rest = maybe[~boxed]
    # Where the static bounds are empty and full, the pattern is the route itself (or its
    # complement): the exact rule of routeplan.exact_states reads only per-tile counts there.
    s_at = np.searchsorted(s_keys, keys[rest])
    alone = (s_low[s_at] == eng.EMPTY) & (s_up[s_at] == eng.FULL)
    if alone.any():
        at = rest[alone]
        mm, nn = m[at], n[at]
        lo_fix, hi_fix = (forced_fix, cand_fix) if sign > 0 else (cand_fix, forced_fix)
        # the lower bound's route is non-empty / its complement is non-empty
        fixed_on = lo_fix[3][mm, nn] if sign > 0 else ~lo_fix[4][mm, nn]
        hi_full = hi_fix[4][mm, nn] if sign > 0 else ~hi_fix[3][mm, nn]
        switching = opened[at]
        state[at] = routeplan.states_from_counts(
            sign, fixed_on, hi_full, switching, ~all_bad[~boxed][alone], ~none_bad[~boxed][alone]
        )
    rest = rest[~alone]
    if len(rest):
        facts = _Facts(engine, prim, n_cand, take)
        sel_lo, sel_up = {prim: low_fix[prim][0]}, {prim: up_fix[prim][0]}
        state[rest] = routeplan.exact_states(engine, node, facts, sign, keys[rest], sel_lo, sel_up)
    keep = state > 0
    route_mask = (reads & (state != eng.FULL))[keep]
    forced = {prim: forced_fix[:3]}
    return routeplan.RoutedTiles(keys[keep], state[keep], route_mask, opened[keep], 0, forced)


class _Facts:
    """What :func:`routeplan.exact_states` reads of a route's candidates."""

    def __init__(self, engine: eng.Engine, prim: ir.Prim, n_cand: np.ndarray, take: np.ndarray):
        from patterndsl import semantics

        self.n_q, self.n_k, qgroup, kblock = semantics.route_blocks(prim, engine.ctx)
        self.qgroup, self.kblock = qgroup.numpy(), kblock.numpy()
        self.n_cand, self.take = n_cand, take
