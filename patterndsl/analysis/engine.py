"""Stage 4 (block plan), the tile-set algebra: from a pattern node to the state of every non-empty tile.

Comes in: a (rewritten) pattern node, the query and key :class:`~patterndsl.analysis.tiles.Side`
and the sizes. Goes out: the sorted keys ``m * n_key_tiles + n`` of the tiles
that may be non-empty, with a state per tile (1 partial, 2 full, 3 decided at
run time). Only candidate tiles are ever touched: primitives enumerate the key
tiles a query tile can reach, intersections hand the tiles that survived so far
to the next operand as its domain, and a complement works inside its domain.

Combining rule (three-valued, Kleene style), per tile, with a fourth state inside the
algebra, *open* (4: not decided yet; maybe empty, partial or full):

* ``~A``: 0 <-> 2, 1 stays 1, 3 stays 3, open stays open.
* ``A & B``: any operand 0 gives 0; all 2 gives 2; else any 3 gives 3; else any open operand,
  or two or more partial operands (the tile may be empty), gives open; else 1.
* ``A | B``: any operand 2 gives 2; all 0 gives 0; else any 3 gives 3; else any open operand,
  or two or more partial operands (the tile may be full), gives open; else 1.
* A primitive whose tile rule cannot decide a tile leaves it open.
* :meth:`Engine.run` decides the open tiles of the node it was given, once for the whole node:
  the tile is cut into boxes that the tile rules classify symbolically (:meth:`Engine.refine`)
  and only the boxes still undecided are evaluated element by element, so no operand is
  evaluated on its own and then again as part of the whole.
* Under a node that contains ``route``, operands are decided first, and a tile still ambiguous
  cannot be evaluated statically and is marked 3. A ``route`` primitive is 3 on every tile that
  meets one of its candidate (query group, key block) pairs and 0 elsewhere.

Every tile whose state needs element-wise evaluation is counted in ``evaluated``, and its
elements in ``elements`` (:class:`Tally`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import numpy as np
import torch

from patterndsl import ir, primitives, semantics
from patterndsl.analysis import classify as cls
from patterndsl.analysis.axes import AxisSplit
from patterndsl.analysis.bandcount import Combination, band_pairs
from patterndsl.analysis.tiles import Pieces, Side
from patterndsl.errors import PatternError, PatternValueError
from patterndsl.primitives import sums
from patterndsl.sizes import Sizes

EMPTY, PARTIAL, FULL, DYNAMIC = 0, 1, 2, 3
#: Inside the algebra only: a tile not decided yet (maybe empty, partial or full); the node at
#: the top of a static subtree decides its open tiles once (:meth:`Engine.run`), so operands
#: are not evaluated one by one and then again as a whole.
OPEN = 4
_EVAL_CHUNK = 1 << 22  # elements per batched evaluation
_PAIR_CHUNK = 1 << 22  # tile pairs per symbolic classification batch
#: Beyond this many ascending runs of key tiles, candidates are not found by binary search per run.
_MAX_CHAINS = 1024
_REFINE_LEVELS = 8  # halvings of an undecided tile into boxes before its elements are evaluated
_REFINE_BOXES = 64  # undecided boxes per tile beyond which the tile stops being refined
_DENSE_TILES = 1 << 24  # up to this many tiles (or group x tile pairs), count with bincount, not sorting


#: Most tiles (or tile pieces) one plan step may list: beyond it the plan is refused with a
#: PatternError rather than running out of memory (2**28 int64 keys are 2 GiB, and a plan
#: step holds a few arrays per tile).
MAX_TILES = 1 << 28


def check_tiles(count: int) -> None:
    """Refuse a plan that would list more than :data:`MAX_TILES` tiles (a PatternError, not a MemoryError)."""
    if count > MAX_TILES:
        raise PatternValueError(
            f"the block plan would list {count:,} tiles, more than {MAX_TILES:,}: "
            f"use larger tiles (block=...) or shorter sequences"
        )


def expand_runs(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All ``(row, col)`` with ``lo <= col < hi`` for each run, row-major."""
    counts = np.maximum(hi - lo, 0)
    total = int(counts.sum())
    check_tiles(total)
    r = np.repeat(rows, counts)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return r, starts + np.arange(total, dtype=np.int64)


def sorted_set(keys: np.ndarray) -> np.ndarray:
    """``np.unique(keys)`` of integers by a sort (numpy 2's hashed unique took 0.26 s on 800,000 random int64
    keys here, the sort 5 ms)."""
    keys = np.sort(keys)
    new = np.ones(len(keys), bool)
    new[1:] = keys[1:] != keys[:-1]
    return keys[new]


class OverBudget(Exception):
    """Raised when a candidate order would need more element-wise evaluation than it may spend."""


@dataclasses.dataclass
class Tally:
    """The element-wise work of one head group's planning, kept by its engine and the engines derived from it.

    Attributes:
        evaluated: tiles whose state was decided by evaluating their elements.
        counted: tiles whose allowed pairs were counted by evaluating their elements.
        elements: (query, key) pairs evaluated element-wise, for states and for counts.
        classified: tiles classified by a primitive's tile rule.
        searched: (query tile, key-tile range) boxes decided by :meth:`Engine.search`.
        budget: elements that may still be evaluated (None: no limit); past it :class:`OverBudget`.
    """

    evaluated: int = 0
    counted: int = 0
    elements: int = 0
    classified: int = 0
    searched: int = 0
    budget: int | None = None

    def spend(self, tiles: int, area: int) -> None:
        """Record ``tiles`` tiles of ``area`` elements evaluated; raises :class:`OverBudget` past the budget."""
        self.evaluated += tiles
        if self.budget is not None:
            self.budget -= tiles * area
            if self.budget < 0:
                raise OverBudget


#: Piece pairs :meth:`Engine.classify_pairs` gives a tile rule at a time.
CLASSIFY_CHUNK = 1 << 17


class _Caches:
    """What an engine computes once for its sides and sizes: shared by the engines derived from it."""

    __slots__ = ("axis_counts", "bounds", "chains", "memo", "reach", "route_tiles", "routes")

    def __init__(self):
        self.bounds = None
        #: ``{primitive: tiles it reaches, or None when that is not cheap to count}``.
        self.reach: dict[ir.Prim, int | None] = {}
        #: ``{node: {tile key: (some allowed, some not, allowed pairs)}}`` of tiles evaluated element-wise.
        self.memo: dict[ir.Node, dict[int, tuple[bool, bool, int]]] = {}
        self.chains = None
        #: ``{route: (cand, n_q, n_k, qgroup, kblock)}`` (see :meth:`Engine.route_candidates`).
        self.routes: dict[ir.Prim, tuple] = {}
        #: ``{route: (gq, gk)}`` (see :meth:`Engine._route_tiles`).
        self.route_tiles: dict[ir.Prim, tuple] = {}
        #: ``{node: (sorted tile keys, allowed pairs)}`` counted axis by axis while classifying.
        self.axis_counts: dict[ir.Node, tuple[np.ndarray, np.ndarray]] = {}


#: A route's fixed choice: sorted chosen pair keys ``a * n_blocks + b``, and the tiles they meet
#: with their states (:meth:`Engine.choice_tiles`).
Fixed = tuple[np.ndarray, np.ndarray, np.ndarray]


class Engine:
    """Classifies tiles of one pattern node for one head on two sides.

    Args:
        qside, kside: the tile layouts of queries and keys.
        env: sizes, layout, head and caches for the classifiers.
        budget: at most this many elements may be evaluated (None: no limit); beyond it
            :class:`OverBudget` is raised, so a reordering candidate cannot cost more than it saves.
        fixed: ``{route: Fixed}``: those routes are classified as static patterns with that
            choice (the bounds of route patterns); see :meth:`fixing`.
        tally: where the element-wise work is recorded (a new one holding ``budget`` when None).
        coarse: tiles the rules cannot decide are reported partial (maybe empty, partial or full)
            instead of evaluated: the coarse levels of :mod:`patterndsl.analysis.hierarchy`, whose
            partial tiles are split into finer tiles and classified again.
    """

    def __init__(
        self,
        qside: Side,
        kside: Side,
        env: cls.Env,
        budget: int | None = None,
        *,
        fixed: dict[ir.Prim, Fixed] | None = None,
        tally: Tally | None = None,
        coarse: bool = False,
        _caches: _Caches | None = None,
    ):
        self.q, self.k, self.env = qside, kside, env
        self.nkb = kside.n_tiles
        self.nqb = qside.n_tiles
        self.ctx = env.sizes
        self.fixed = fixed
        self.tally = Tally(budget=budget) if tally is None else tally
        self.coarse = coarse
        self._caches = _Caches() if _caches is None else _caches
        #: ``(prim, floor)``, set by a planner comparing orders: the run of ``prim`` at the top (its candidates
        #: from its own bounds) calls ``floor(keys)`` once with tiles known non-empty after the first piece
        #: pair of each tile, before the others are classified pair by pair; ``floor`` may raise
        #: :class:`OverBudget` (an order whose known tiles alone visit more pairs than the best order's).
        self.watch: tuple[ir.Prim, Callable[[np.ndarray], None]] | None = None

    def fixing(self, fixed: dict[ir.Prim, Fixed] | None) -> Engine:
        """This engine with each route of ``fixed`` classified as a static pattern with that choice.

        The new engine shares the sides, the caches and the tally; ``self`` is unchanged.
        """
        return Engine(self.q, self.k, self.env, fixed=fixed, tally=self.tally, _caches=self._caches)

    @property
    def evaluated(self) -> int:
        """Tiles decided by element-wise evaluation so far (in the shared :class:`Tally`)."""
        return self.tally.evaluated

    @property
    def budget(self) -> int | None:
        """Elements that may still be evaluated (None: no limit)."""
        return self.tally.budget

    # ----------------------------------------------------------------- entry

    def run(self, node: ir.Node, domain: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Non-empty tiles of ``node`` (within ``domain``, sorted keys, when given) and their states."""
        if domain is None:
            domain = self._class_domain(node)
        if not self.coarse:
            from patterndsl.analysis import diagonal

            # one tile per diagonal, when the node allows it
            along = diagonal.run_all(self, node) if domain is None else diagonal.run(self, node, domain)
            if along is not None:
                return along
        keys, state = self._dispatch(node, domain)
        return self._settle(node, keys, state)

    def _settle(self, node: ir.Node, keys: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decide the tiles left :data:`OPEN` under ``node`` (once, for the whole node) and drop the empty ones."""
        open_ = np.flatnonzero(state == OPEN)
        if not len(open_):
            return keys, state
        state = state.copy()
        if self.coarse:
            state[open_] = PARTIAL
            return keys, state
        state[open_] = self.evaluate(node, keys[open_])
        keep = state > 0
        return keys[keep], state[keep]

    def _run(self, node: ir.Node, domain: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        # Like run, but a static node may leave tiles OPEN for the node above to decide.
        if domain is None:
            domain = self._class_domain(node)
        return self._dispatch(node, domain)

    def _dispatch(self, node: ir.Node, domain: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        # _run once the class-order candidates were looked for (run did it already: not twice).
        if isinstance(node, (ir.Inter, ir.Union)) and AxisSplit(node, self.env.layout).usable:
            return self._by_axes(node, domain)
        if isinstance(node, ir.Inter):
            return self._inter(node, domain)
        if isinstance(node, ir.Union):
            return self._union(node, domain)
        if isinstance(node, ir.Not):
            return self._not(node, domain)
        if primitives.lookup(node.name).dynamic:
            return self._route(node, domain)
        return self._prim(node, domain)

    def _class_domain(self, node: ir.Node) -> np.ndarray | None:
        # Outside the identity order, a node of bands takes its candidates from the bands mapped
        # through the order (exact per class pair), not from position hulls that meet every class.
        if (self.q.identity and self.k.identity) or ir.is_dynamic(node):
            return None
        from patterndsl.analysis import classbands

        return classbands.candidates(self, node)

    def _joint_search_pays(self, node: ir.Node) -> bool:
        # Operands with a needed-key range or listed candidates are bounded one by one already;
        # a primitive bounded only by intervals (its record's ``joint_search``) is where the
        # operands' joint bounds can be far tighter than each alone.
        for p in ir.walk(node):
            if isinstance(p, ir.Prim):
                rule = primitives.lookup(p.name).joint_search
                if rule is not None and rule(p, self.env):
                    return True
        return False

    def _reach(self, node: ir.Node) -> tuple[int, int]:
        """Sort key inside an intersection: the tiles an operand reaches (counted by :meth:`search`
        when its boundary is narrow), then the rough rank of :func:`_cost`; fewest first."""
        count = self._reach_count(node)
        return (self.nqb * self.nkb + 1 if count is None else count), _cost(node)

    def _reach_count(self, node: ir.Node) -> int | None:
        # A bound on the tiles of a node: exact-ish for primitives, a sum over a union, a
        # minimum over an intersection; None when not cheap to know.
        if isinstance(node, ir.Union):
            parts = [self._reach_count(item) for item in node.items]
            return None if any(p is None for p in parts) else sum(parts)
        if isinstance(node, ir.Inter):
            parts = [p for p in (self._reach_count(item) for item in node.items) if p is not None]
            return min(parts) if parts else None
        if not isinstance(node, ir.Prim) or primitives.lookup(node.name).dynamic or node in (ir.FULL, ir.EMPTY):
            return None
        if node not in self._caches.reach:
            found = self._ranges_reach(node)
            self._caches.reach[node] = self.search(self.prim_decide(node), count_only=True) if found is None else found
        return self._caches.reach[node]

    def _ranges_reach(self, prim: ir.Prim) -> int | None:
        """On a grid, about how many tiles ``prim`` reaches from its needed-key ranges (per query tile, the
        range's positions over a key tile's), or None without per-axis ranges. An estimate, for ordering
        an intersection's operands: a neighborhood's windows are no narrow band of flattened positions, so
        the search gave up on it and ``causal & neighborhood(7)`` started from causal's half of every tile
        (61 million tiles at a million tokens)."""
        if self.env.layout is None or len(self.env.layout.shape) < 2:
            return None
        (qlo, qhi, qalo, qahi), _ = self._bounds()
        need = cls.needed_keys(prim, qlo, qhi, qalo, qahi, self.env)
        if need is None or need[2] is None:
            return None
        volume = np.maximum(need[3] - need[2] + 1, 0).prod(1)
        return int(np.ceil(volume / self.k.block).sum())

    def _operand(self, parent: ir.Node, item: ir.Node, domain):
        # Under a node with a route, an open tile cannot wait for the node (it is not evaluated
        # statically there): operands are settled first.
        return self.run(item, domain) if ir.is_dynamic(parent) else self._run(item, domain)

    # ----------------------------------------------------------------- candidates

    def _bounds(self):
        if self._caches.bounds is None:
            self._caches.bounds = (self.q.tile_bounds(), self.k.tile_bounds())
        return self._caches.bounds

    def all_keys(self) -> np.ndarray:
        check_tiles(self.nqb * self.nkb)
        return np.arange(self.nqb * self.nkb, dtype=np.int64)

    def _key_chains(self):
        # Maximal runs of key tiles whose lower and upper bounds both ascend: inside one,
        # the tiles overlapping a range are a contiguous run found by binary search.
        if self._caches.chains is None:
            (_, _, _, _), (klo, khi, _, _) = self._bounds()
            breaks = np.nonzero((klo[1:] < klo[:-1]) | (khi[1:] < khi[:-1]))[0] + 1
            edges = np.concatenate([[0], breaks, [len(klo)]])
            self._caches.chains = list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))
        return self._caches.chains

    def _overlap(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Keys of pairs ``(m, n)`` where key tile ``n``'s position bounds meet ``[lo[m], hi[m]]``."""
        (_, _, _, _), (klo, khi, _, _) = self._bounds()
        chains = self._key_chains()
        if len(chains) > _MAX_CHAINS:
            keys = self.all_keys()
            m, n = keys // self.nkb, keys % self.nkb
            return keys[(khi[n] >= lo[m]) & (klo[n] <= hi[m])]
        rows = np.arange(self.nqb, dtype=np.int64)
        parts = []
        for c0, c1 in chains:
            start = c0 + np.searchsorted(khi[c0:c1], lo, "left")
            end = c0 + np.searchsorted(klo[c0:c1], hi, "right")
            m, n = expand_runs(rows, start, end)
            parts.append(m * self.nkb + n)
        keys = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        # the chains partition the key tiles: no key is found twice, so sorting is enough
        return np.sort(keys) if len(chains) > 1 else keys

    def _overlap_axes(self, alo: np.ndarray, ahi: np.ndarray, rows=None, cols=None) -> np.ndarray:
        """Keys of pairs ``(m, n)`` where key tile ``n``'s per-axis bounds meet ``[alo[m], ahi[m]]``.

        For key tiles that are boxes in no flattened order (grid box orders): key tiles sorted by
        their first-axis start; a query tile's candidates start within one tile's extent before
        its range, so only those are tested, not every key tile. ``rows`` / ``cols`` (sorted tile
        indices, ``alo``/``ahi`` given for ``rows``) restrict the pairs to those query and key tiles.
        """
        from patterndsl.analysis.gridcands import Cells

        (_, _, _, _), (_, _, kalo, kahi) = self._bounds()
        rows = np.arange(self.nqb, dtype=np.int64) if rows is None else rows
        cols = np.arange(self.nkb, dtype=np.int64) if cols is None else cols
        kalo, kahi = kalo[cols], kahi[cols]
        cells = Cells(kalo, kahi)
        if cells.usable:
            return cells.meeting(alo, ahi, rows, cols, self.nkb)
        order = np.argsort(kalo[:, 0], kind="stable")
        start = kalo[order, 0]
        reach = int((kahi[:, 0] - kalo[:, 0]).max()) if len(kalo) else 0
        first = np.searchsorted(start, alo[:, 0] - reach, "left")
        last = np.searchsorted(start, ahi[:, 0], "right")
        # query tiles a chunk at a time: the pairs tested before filtering stay bounded in memory
        ends = np.cumsum(last - first)
        found, r0 = [], 0
        while r0 < len(rows):
            r1 = max(r0 + 1, int(np.searchsorted(ends, ends[r0] - (last[r0] - first[r0]) + _PAIR_CHUNK, "right")))
            at = np.arange(r0, min(r1, len(rows)), dtype=np.int64)
            i, pos = expand_runs(at, first[at], last[at])
            n = order[pos]
            keep = ((kahi[n] >= alo[i]) & (kalo[n] <= ahi[i])).all(1)
            found.append(rows[i[keep]] * self.nkb + cols[n[keep]])
            r0 = int(at[-1]) + 1
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def overlap_axes(self, alo: np.ndarray, ahi: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Sorted keys of pairs of query tiles ``rows`` and key tiles ``cols`` whose per-axis bounds meet
        (``[alo[i], ahi[i]]`` for ``rows[i]``): for tile rules that know which key tiles can pair at all."""
        return self._overlap_axes(alo, ahi, rows, cols)

    def overlap_pieces(self, prim: ir.Prim, qgroup: np.ndarray, kgroup: np.ndarray) -> np.ndarray | None:
        """Candidate tiles of ``prim`` from its needed key ranges piece by piece, pieces meeting only within
        the same group (``qgroup`` / ``kgroup``, one number per piece); see :meth:`_overlap_pieces`."""
        return self._overlap_pieces(prim, qgroup, kgroup)

    def bounds(self):
        """``((qlo, qhi, qalo, qahi), (klo, khi, kalo, kahi))``: per tile, flattened and per-axis position bounds."""
        return self._bounds()

    def prim_decide(self, prim: ir.Prim):
        """A ``decide`` for :meth:`search` from the primitive's tile rule, applied to hull boxes.

        A hull holds every position of the tiles under it (and maybe more): a rule's "none
        allowed" or "all allowed" on the hull holds for those tiles too.
        """

        def decide(box):
            qb = _BoxSide(box.qalo, np.ones_like(box.qalo), box.qahi - box.qalo + 1, self.q)
            kb = _BoxSide(box.kalo, np.ones_like(box.kalo), box.kahi - box.kalo + 1, self.k)
            nonempty, full, ok = cls.classify(prim, qb.pieces(), kb.pieces(), self.env)
            return nonempty | ~ok, ~full | ~ok, np.ones(len(nonempty), bool)

        return decide

    def node_decide(self, node: ir.Node):
        """A ``decide`` for :meth:`search` for a whole node: its primitives' rules, combined three-valued."""
        if isinstance(node, ir.Not):
            inner = self.node_decide(node.item)

            def negate(box):
                t, f, ok = inner(box)
                return f, t, ok

            return negate
        if isinstance(node, (ir.Inter, ir.Union)):
            parts = [self.node_decide(item) for item in node.items]
            conj = isinstance(node, ir.Inter)

            def combine(box):
                got = [p(box) for p in parts]
                t, f, ok = got[0]
                for t2, f2, ok2 in got[1:]:  # pairwise: no stacked copies
                    t, f, ok = (t & t2, f | f2, ok & ok2) if conj else (t | t2, f & f2, ok & ok2)
                return t, f, ok

            return combine
        if primitives.lookup(node.name).dynamic:
            return lambda box: (np.ones(len(box.qlo), bool),) * 3
        return self.prim_decide(node)

    def search(self, decide, count_only: bool = False, narrow: bool = False, whole: bool = False):
        """Candidate tiles by branch and bound over key-tile ranges, per query tile.

        A binary tree over the key tiles holds each node's hull (position bounds); per query
        tile, a node whose hull the predicate surely fails is dropped, one it surely holds on
        is taken whole, and the others are split, so the work follows the boundary of the
        allowed region (about ``nqb * log(nkb)`` boxes), not ``nqb * nkb``.

        Args:
            decide: ``Boxes -> (can_true, can_false, sound)`` (see :mod:`patterndsl.primitives.intervals`);
                unsound boxes are split down to single tiles and kept.

            count_only: only count the tiles, and give up (None) when the boundary is not
                narrow (more than a few undecided ranges per query tile).
            narrow: list the tiles, but give up (None) like ``count_only`` (one pass where a
                count, then the listing, took two).
            whole: also return, per tile, whether ``decide`` found the predicate surely true on a
                hull holding it (then every pair of the tile is allowed).

        Returns:
            Sorted keys ``m * nkb + n`` of the tiles that may hold an allowed pair (or their number;
            with ``whole``, the keys and a bool per key).
        """
        from patterndsl.primitives.intervals import Boxes

        (qlo, qhi, qalo, qahi), (klo, khi, kalo, kahi) = self._bounds()
        levels = [(klo, khi, kalo, kahi)]
        while len(levels[-1][0]) > 1:
            lo, hi, alo, ahi = levels[-1]
            if len(lo) % 2:
                lo, hi = np.append(lo, lo[-1]), np.append(hi, hi[-1])
                alo, ahi = np.concatenate([alo, alo[-1:]]), np.concatenate([ahi, ahi[-1:]])
            levels.append(
                (
                    np.minimum(lo[0::2], lo[1::2]),
                    np.maximum(hi[0::2], hi[1::2]),
                    np.minimum(alo[0::2], alo[1::2]),
                    np.maximum(ahi[0::2], ahi[1::2]),
                )
            )
        m = np.arange(self.nqb if self.nkb else 0, dtype=np.int64)
        j = np.zeros(len(m), np.int64)
        found = []
        total = 0
        for level in range(len(levels) - 1, -1, -1):
            if not len(m):
                break
            lo, hi, alo, ahi = levels[level]
            box = Boxes(qlo[m], qhi[m], lo[j], hi[j], qalo[m], qahi[m], alo[j], ahi[j])
            can_true, can_false, sound = decide(box)
            self.tally.searched += len(m)
            sure = sound & ~can_false
            if sure.any():
                width = 1 << level
                first = j[sure] * width
                if count_only:
                    total += int((np.minimum(first + width, self.nkb) - first).sum())
                else:  # as runs, listed at the end (not at all when a narrow search gives up)
                    found.append((m[sure], first, np.minimum(first + width, self.nkb), np.ones(len(first), bool)))
            rest = ~sure & (can_true | ~sound)
            m, j = m[rest], j[rest]
            if (count_only or narrow) and len(m) > 8 * self.nqb + 1024:
                return None
            if level == 0:
                total += len(m)
                found.append((m, j, j + 1, np.zeros(len(m), bool)))
                break
            m = np.repeat(m, 2)
            j = (np.repeat(j, 2) * 2) + np.tile(np.array([0, 1], np.int64), len(j))
            real = (j << (level - 1)) < self.nkb
            m, j = m[real], j[real]
        if count_only:
            return total
        if not found:
            return (np.zeros(0, np.int64), np.zeros(0, bool)) if whole else np.zeros(0, np.int64)
        m, lo, hi, flag = (np.concatenate(f) for f in zip(*found, strict=True))
        run, cols = expand_runs(np.arange(len(m), dtype=np.int64), lo, hi)
        keys = m[run] * self.nkb + cols
        order = np.argsort(keys, kind="stable")
        return (keys[order], flag[run][order]) if whole else keys[order]

    def _candidates(self, prim: ir.Prim) -> np.ndarray:
        (qlo, qhi, qalo, qahi), _ = self._bounds()
        listed = primitives.lookup(prim.name).candidates
        keys = None if listed is None else listed(self, prim)
        if keys is not None:
            return keys
        need = cls.needed_keys(prim, qlo, qhi, qalo, qahi, self.env)
        if need is None:
            return self.all_keys()
        lo, hi, alo, ahi = need
        if alo is not None:
            # per-axis ranges: a flattened range of a grid box spans whole planes of other tiles
            keys = None if self.q.single_piece and self.k.single_piece else self._overlap_pieces(prim)
            return self._overlap_axes(alo, ahi) if keys is None else keys
        return self._overlap(lo, hi)

    def _overlap_pieces(self, prim: ir.Prim, qgroup=None, kgroup=None) -> np.ndarray | None:
        """:meth:`_overlap_axes` of the needed key ranges over the sides' :meth:`~Side.boxes`: a tile far
        smaller than the box bounding it is searched piece by piece (None when the key boxes are too
        sparse to bin).

        A tile across grid rows or boxes (boxes cut at the grid's edges, a tile across dilation
        groups, across planes of a 3-D grid) can be bounded by a box far larger than its pieces, up to
        every column of its rows: its pieces' ranges find the key tiles their union can reach.
        ``qgroup`` / ``kgroup``: one more coordinate per piece that must be equal (a dilation group)."""
        from patterndsl.analysis.gridcands import Cells

        (qt, qlo, qhi, qalo, qahi, qg), qcut = self.q.boxes(qgroup)
        (kt, _, _, kalo, kahi, kg), kcut = self.k.boxes(kgroup)
        need = cls.needed_keys(prim, qlo, qhi, qalo, qahi, self.env)
        if need is None or need[2] is None:
            return None
        alo, ahi = need[2], need[3]
        if qgroup is not None:
            alo, ahi = np.column_stack([alo, qg]), np.column_stack([ahi, qg])
            kalo, kahi = np.column_stack([kalo, kg]), np.column_stack([kahi, kg])
        cells = Cells(kalo, kahi)
        if not cells.usable:
            return None
        keys = cells.meeting(alo, ahi, qt, kt, self.nkb)
        return sorted_set(keys) if qcut or kcut else keys

    # ----------------------------------------------------------------- primitives

    def _prim(self, prim: ir.Prim, domain: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if prim == ir.EMPTY:
            return np.zeros(0, np.int64), np.zeros(0, np.int8)
        keys = self._candidates(prim) if domain is None else domain
        if prim == ir.FULL:
            return keys, np.full(len(keys), FULL, np.int8)
        floor = None
        if self.watch is not None and self.watch[0] is prim and domain is None:
            floor, self.watch = self.watch[1], None  # once: every candidate is in one chunk below
        # Chunks bound the temporaries of the classifiers to a few times the chunk, not the candidates.
        out_k, out_s = [], []
        for s in range(0, len(keys), _PAIR_CHUNK):
            part = keys[s : s + _PAIR_CHUNK]
            state = self.classify_pairs(prim, part, settle=False, floor=floor)
            keep = state > 0
            out_k.append(part[keep])
            out_s.append(state[keep])
        if len(out_k) == 1:
            return out_k[0], out_s[0]
        if not out_k:
            return keys[:0], np.zeros(0, np.int8)
        return np.concatenate(out_k), np.concatenate(out_s)

    def classify_pairs(self, prim: ir.Prim, keys: np.ndarray, settle: bool = True, floor=None) -> np.ndarray:
        """States of the tiles ``keys`` under one static primitive (symbolic, evaluation where needed).

        With ``settle`` False, tiles the rule cannot decide are :data:`OPEN` instead of evaluated.
        ``floor``: called with the tiles of several pieces that their first piece pair shows non-empty
        (see :attr:`watch`).
        The rule sees :data:`CLASSIFY_CHUNK` piece pairs at a time (a rule's temporaries are a few
        dozen numbers per pair: at a million tokens in tiles of several pieces, hundreds of MB at once).
        """
        self.tally.classified += len(keys)
        m, n = keys // self.nkb, keys % self.nkb
        state = np.empty(len(keys), np.int8)
        ok = np.empty(len(keys), bool)
        per = None
        if not (self.q.single_piece and self.k.single_piece):
            per = np.diff(self.q.ptr)[m] * np.diff(self.k.ptr)[n]
        rest = np.arange(len(keys))
        if per is not None and (per > 1).any():
            # Tiles of several pieces: first one piece pair per tile, the largest pieces. A pair holding
            # both an allowed and a blocked pair makes its tile partial whatever the other pairs hold (and
            # a tile of one piece pair is decided by it): only the other tiles are classified pair by pair.
            qi, ki = self.q.largest[m], self.k.largest[n]
            for t0 in range(0, len(keys), CLASSIFY_CHUNK):
                part = slice(t0, t0 + CLASSIFY_CHUNK)
                state[part], ok[part] = self._classify_chunk(prim, qi[part], ki[part], None)
            if floor is not None:
                floor(keys[ok & (state != EMPTY)])
            rest = np.flatnonzero(~ok | ((per > 1) & (state != PARTIAL)))
            m, n, per = m[rest], n[rest], per[rest]
        ends = np.arange(1, len(rest) + 1) if per is None else np.cumsum(per)
        t0 = 0
        while t0 < len(rest):
            before = int(ends[t0 - 1]) if t0 else 0
            t1 = max(t0 + 1, int(np.searchsorted(ends, before + CLASSIFY_CHUNK, "right")))
            part = rest[t0:t1]
            state[part], ok[part] = self._classify_chunk(prim, m[t0:t1], n[t0:t1], None if per is None else per[t0:t1])
            t0 = t1
        bad = np.nonzero(~ok)[0]
        if len(bad):
            state[bad] = self.evaluate(prim, keys[bad]) if settle else OPEN
        return state

    def _classify_chunk(self, prim: ir.Prim, m: np.ndarray, n: np.ndarray, per) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`classify_pairs` on tiles ``(m, n)`` (``per``: their piece pairs; None: one piece pair each,
        ``m`` and ``n`` then being piece indices): the rule's states and where the rule decided."""
        if per is None:
            qi, ki, seg = m, n, None
        else:
            ck = np.diff(self.k.ptr)[n]
            pair = np.repeat(np.arange(len(m)), per)
            local = np.arange(int(per.sum()), dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
            qi = self.q.ptr[m][pair] + local // ck[pair]
            ki = self.k.ptr[n][pair] + local % ck[pair]
            seg = np.cumsum(per) - per
        nonempty, full, ok = cls.classify(prim, self.q.piece_view(qi), self.k.piece_view(ki), self.env)
        if seg is not None and len(m):
            nonempty = np.logical_or.reduceat(nonempty, seg)
            full = np.logical_and.reduceat(full, seg)
            ok = np.logical_and.reduceat(ok, seg)
        return np.where(full, FULL, np.where(nonempty, PARTIAL, EMPTY)).astype(np.int8), ok

    # ----------------------------------------------------------------- evaluation

    def evaluate(self, node: ir.Node, keys: np.ndarray) -> np.ndarray:
        """Exact states of tiles ``keys`` the algebra left open: box refinement, then elements (counted).

        The tiles are cut into smaller boxes and classified symbolically (:meth:`refine`);
        only the boxes still undecided have their elements evaluated.
        """
        out = np.zeros(len(keys), np.int8)
        if not len(keys):
            return out
        selection = self.selection(node)
        if ir.is_dynamic(node) and selection is None:
            out[:] = DYNAMIC
            return out
        if ir.is_dynamic(node):
            self.tally.spend(len(keys), self.q.block * self.k.block)
            self.tally.elements += len(keys) * self.q.block * self.k.block
            for part, i, j, valid in self.chunks(keys):
                val = semantics.evaluate(node, i, j, self.env.head, self.ctx, selection)
                anyv = (val & valid).flatten(1).any(1)
                allv = (val | ~valid).flatten(1).all(1)
                st = torch.where(allv & anyv, FULL, torch.where(anyv, PARTIAL, EMPTY))
                out[part] = st.numpy().astype(np.int8)
            return out
        from patterndsl.analysis import diagonal

        along = diagonal.evaluate(self, node, keys)  # one tile per class of translates, when the node allows it
        if along is not None:
            return along
        if self.tally.budget is not None and len(keys) * self.q.block * self.k.block > self.tally.budget:
            # A candidate order that could need more evaluation than it may spend is refused
            # before any work, as if every open tile were evaluated whole.
            raise OverBudget
        ref = self.refine(node, keys, counting=False)
        any_t, any_f = ref.any_true, ref.any_false
        if len(ref.owner):
            t, f, _ = self._evaluate_boxes(node, keys, ref, selection, counting=False)
            any_t = any_t | t
            any_f = any_f | f
        out[:] = np.where(any_t & ~any_f, FULL, np.where(any_t, PARTIAL, EMPTY))
        return out

    def _evaluate_boxes(self, node: ir.Node, keys: np.ndarray, ref: Refined, selection, counting: bool):
        """Evaluate the undecided boxes of ``ref`` (counted), reusing tiles evaluated before.

        Returns per tile of ``keys``: some element allowed, some not, and the allowed pairs of the
        whole tile (valid for tiles with undecided boxes: all their other boxes were decided whole).
        """
        memo = self._caches.memo.setdefault(node, {})
        owners = np.unique(ref.owner)
        known = np.array([int(k) in memo for k in keys[owners]], bool)
        t = np.zeros(len(keys), bool)
        f = np.zeros(len(keys), bool)
        count = np.zeros(len(keys), np.int64)
        for o in owners[known]:
            t[o], f[o], count[o] = memo[int(keys[o])]
        fresh = owners[~known]
        if len(fresh):
            sub = ref.subset(np.isin(ref.owner, fresh))
            area = sub.area()
            if counting:
                self.tally.counted += len(fresh)
            else:
                self.tally.spend(len(fresh), 0)
            self.tally.elements += area
            if self.tally.budget is not None:
                self.tally.budget -= area
                if self.tally.budget < 0:
                    raise OverBudget
            t2, f2, c2 = sub.evaluate(self, node, selection)
            for o in fresh.tolist():
                t[o] = bool(t2[o] or ref.any_true[o])
                f[o] = bool(f2[o] or ref.any_false[o])
                count[o] = int(ref.true_area[o] + c2[o])
                memo[int(keys[o])] = (t[o], f[o], count[o])
        return t, f, count

    def box_states(self, node: ir.Node, qp, kp, leaves: dict | None = None, sure: bool = False) -> np.ndarray:
        """Per box (aligned query / key pieces): 2 every pair allowed, 0 none, 1 not known symbolically.

        ``leaves``, when given, receives every primitive's own states (``{prim: int8 [B]}``, 0 / 1 / 2).
        With ``sure``, a box known to hold both an allowed and a blocked pair is 3: one operand
        known partial there and every other one deciding nothing (full under ``&``, empty under ``|``).
        """
        if isinstance(node, ir.Not):
            return _FLIP_SURE[self.box_states(node.item, qp, kp, leaves, sure)]
        if isinstance(node, (ir.Inter, ir.Union)):
            states = np.stack([self.box_states(item, qp, kp, leaves, sure) for item in node.items])
            absorb, neutral = (0, 2) if isinstance(node, ir.Inter) else (2, 0)
            out = np.where((states == absorb).any(0), absorb, np.where((states == neutral).all(0), neutral, 1))
            if sure:
                one = ((states == 3).sum(0) == 1) & ((states == 3) | (states == neutral)).all(0)
                out = np.where(one, 3, out)
            return out.astype(np.int8)
        if leaves is not None and node in leaves and not sure:
            return leaves[node]
        if primitives.lookup(node.name).dynamic:
            st = np.ones(len(qp.fa), np.int8)
            known = np.zeros(len(qp.fa), bool)
        else:
            nonempty, full, ok = cls.classify(node, qp, kp, self.env)
            st = np.where(ok & full & nonempty, 2, np.where(ok & ~nonempty, 0, 1)).astype(np.int8)
            known = ok & nonempty & ~full
        if leaves is not None:
            leaves[node] = st
        return np.where(known, 3, st).astype(np.int8) if sure else st

    def refine(self, node: ir.Node, keys: np.ndarray, counting: bool) -> Refined:
        """Cut tiles ``keys`` into boxes, halving undecided boxes, and classify each box symbolically.

        Args:
            node: a static pattern node.
            keys: tile keys.
            counting: keep refining tiles known to be partial (their allowed pairs are wanted),
                and add up the area of the boxes known to be all allowed.

        Returns:
            The :class:`Refined` boxes: per tile whether some box is all allowed / all
            disallowed and the allowed area found, and the boxes left undecided.
        """
        owner, qi, ki = self._piece_pairs(keys)
        split = AxisSplit(node, self.env.layout)
        if split.usable:
            # Parts that read one grid axis each: every box counted axis by axis, none left open.
            count = self._split_count(split, qi, ki)
            area = self.q.n[qi].prod(1) * self.k.n[ki].prod(1)
            size = len(keys)
            if len(owner) == size:
                any_t, any_f, true_area = count > 0, count < area, count
            else:
                any_t = np.bincount(owner, count > 0, size) > 0
                any_f = np.bincount(owner, count < area, size) > 0
                true_area = np.bincount(owner, count, size).astype(np.int64)
            none = np.zeros(0, np.int64)
            qb = _BoxSide(self.q.a[none], self.q.s[none], self.q.n[none], self.q)
            kb = _BoxSide(self.k.a[none], self.k.s[none], self.k.n[none], self.k)
            return Refined(any_t, any_f, true_area, none, qb, kb)
        qb = _BoxSide(self.q.a[qi], self.q.s[qi], self.q.n[qi], self.q)
        kb = _BoxSide(self.k.a[ki], self.k.s[ki], self.k.n[ki], self.k)
        period = _period(node, self.env) if len(self.q.extents) == 1 else 1
        if period > 1:
            # Bands with a modulus (dilations, strides) are checkerboards finer than any
            # contiguous box: start from the residue classes, on which they are exact.
            owner, qb, kb = _by_residue(owner, qb, kb, period)
        any_t = np.zeros(len(keys), bool)
        any_f = np.zeros(len(keys), bool)
        true_area = np.zeros(len(keys), np.int64)
        combo = self._combination(node)
        for level in range(_REFINE_LEVELS + 1):
            if not len(owner):
                break
            qp, kp, leaves = qb.pieces(), kb.pieces(), {}
            # Classifying only: a box surely partial settles its tile (3, both kinds of pair).
            st = self.box_states(node, qp, kp, leaves, sure=not counting)
            area = qb.n.prod(1) * kb.n.prod(1)
            live = st == 1
            allowed = np.where(st == 2, area, 0)
            if combo.usable and live.any():
                # Boxes where only bands are undecided: counted in closed form, never evaluated.
                sel = np.flatnonzero(live)
                count, exact = combo.count(
                    qb.take(sel).pieces(), kb.take(sel).pieces(), {p: v[sel] for p, v in leaves.items()}
                )
                done = sel[exact]
                allowed[done] = count[exact]
                st = st.copy()
                st[done] = np.where(count[exact] == 0, 0, np.where(count[exact] == area[done], 2, 3))
                live[done] = False
            any_t[owner[(st == 2) | (st == 3)]] = True
            any_f[owner[(st == 0) | (st == 3)]] = True
            true_area += np.bincount(owner, weights=allowed, minlength=len(keys)).astype(np.int64)
            if not counting:
                live &= ~(any_t & any_f)[owner]
            owner, qb, kb = owner[live], qb.take(live), kb.take(live)
            if level == _REFINE_LEVELS or not len(owner):
                break
            per = np.bincount(owner, minlength=len(keys))
            # Tiles whose undecided boxes multiply (no boundary, a pattern finer than the boxes)
            # stop here: their remaining boxes are evaluated element by element.
            split = (per[owner] <= _REFINE_BOXES) & (area[live] > 1)
            if not split.any():
                break
            keep = ~split
            sq = qb.n.prod(1) >= kb.n.prod(1)
            q1, q2 = qb.take(split).halve(sq[split])
            k1, k2 = kb.take(split).halve(~sq[split])
            owner = np.concatenate([owner[keep], owner[split], owner[split]])
            qb = _BoxSide.cat([qb.take(keep), q1, q2])
            kb = _BoxSide.cat([kb.take(keep), k1, k2])
        return Refined(any_t, any_f, true_area, owner, qb, kb)

    def _piece_pairs(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(owner, qi, ki)``: every (query piece, key piece) pair of tiles ``keys`` and the tile's index."""
        m, n = keys // self.nkb, keys % self.nkb
        if self.q.single_piece and self.k.single_piece:
            return np.arange(len(keys)), m, n
        cq, ck = np.diff(self.q.ptr)[m], np.diff(self.k.ptr)[n]
        owner, local = expand_runs(np.arange(len(keys)), np.zeros(len(keys), np.int64), cq * ck)
        return owner, self.q.ptr[m][owner] + local // ck[owner], self.k.ptr[n][owner] + local % ck[owner]

    def _split_count(self, split: AxisSplit, qi: np.ndarray, ki: np.ndarray) -> np.ndarray:
        """:meth:`AxisSplit.count_pieces`, its elements tallied against the budget."""
        count, spent = split.count_pieces(self, qi, ki)
        self.tally.elements += spent
        if self.tally.budget is not None:
            self.tally.budget -= spent
            if self.tally.budget < 0:
                raise OverBudget
        return count

    def count_by_terms(self, node: ir.Node, keys: np.ndarray) -> np.ndarray | None:
        """Allowed pairs of tiles ``keys`` when ``node`` holds a ``global`` and is, on the grid, a union of
        products over axes with it (:meth:`AxisSplit.counting`): every piece pair counted by
        inclusion-exclusion over the terms, nothing refined or evaluated element by element; else None.
        ``neighborhood(7) | global(16)`` on a 125 x 125 grid: its tiles where the global rows and the
        neighborhood are both partial were halved 8 times and then evaluated (4.4 ms of a 20 ms plan)."""
        split = AxisSplit.counting(node, self.env.layout)
        if split is None:
            return None
        owner, qi, ki = self._piece_pairs(keys)
        return np.bincount(owner, self._split_count(split, qi, ki), len(keys)).astype(np.int64)

    def total_by_terms(self, node: ir.Node) -> int | None:
        """Allowed pairs of ``node`` over every query and key when it holds a ``global`` and is, on the
        grid, a union of products over axes with it (:meth:`AxisSplit.counting`, :meth:`AxisSplit.total`):
        the plan's total without counting a tile; else None."""
        split = AxisSplit.counting(node, self.env.layout)
        found = None if split is None else split.total(self)
        if found is None:
            return None
        self.tally.elements += found[1]
        return found[0]

    def _combination(self, node: ir.Node) -> Combination:
        return Combination(node, lambda prim: band_of(prim, self.env))

    def chunks(self, keys: np.ndarray):
        """The elements of tiles ``keys``, a bounded number at a time: the one chunked evaluation loop.

        Yields:
            ``(part, i, j, valid)``: the slice of ``keys`` covered, original query indices ``i``
            ``[T, BM, 1]`` and key indices ``j`` ``[T, 1, BN]`` (int64, padding clamped to 0) and
            bool ``valid`` ``[T, BM, BN]`` (both indices real), ready for :func:`semantics.evaluate`.
        """
        m, n = keys // self.nkb, keys % self.nkb
        step = max(1, _EVAL_CHUNK // max(self.q.block * self.k.block, 1))
        for s in range(0, len(keys), step):
            qi = self.q.tile_indices(m[s : s + step])
            ki = self.k.tile_indices(n[s : s + step])
            valid = torch.from_numpy(qi >= 0)[:, :, None] & torch.from_numpy(ki >= 0)[:, None, :]
            i = torch.from_numpy(np.maximum(qi, 0))[:, :, None]
            j = torch.from_numpy(np.maximum(ki, 0))[:, None, :]
            yield slice(s, s + step), i, j, valid

    # ----------------------------------------------------------------- combinators

    def _inter(self, node: ir.Inter, domain):
        if domain is None and not ir.is_dynamic(node) and self._joint_search_pays(node):
            # The operands together bound the tiles far better than any one alone
            # (``causal & where(q // 256 - k // 256 <= 2)`` is a band; neither operand is).
            # Only when the boundary is narrow: where no operand prunes (columns in every
            # key tile), the search would split down to every tile.
            found = self.search(self.node_decide(node), narrow=True, whole=True)
            if found is not None and found[1].any():
                # tiles under a hull on which every operand surely holds are full: only the others
                # are classified operand by operand
                keys, sure = found
                k2, s2 = self._inter(node, keys[~sure]) if not sure.all() else (keys[:0], np.zeros(0, np.int8))
                out = np.concatenate([keys[sure], k2])
                order = np.argsort(out, kind="stable")
                state = np.concatenate([np.full(int(sure.sum()), FULL, np.int8), s2.astype(np.int8)])
                return out[order], state[order]
            domain = None if found is None else found[0]
        # Within a domain the operands only filter it: their rough cost orders them (counting each
        # one's reach over every query tile would cost more than the domain itself).
        items = sorted(node.items, key=self._reach if domain is None else _cost)
        keys, state = self._operand(node, items[0], domain)
        partial = (state == PARTIAL).astype(np.int64)
        dyn = state == DYNAMIC
        open_ = state == OPEN
        for item in items[1:]:
            if not len(keys):
                break
            k2, s2 = self._operand(node, item, keys)
            pos = np.searchsorted(keys, k2)
            keys, partial, dyn, open_ = keys[pos], partial[pos], dyn[pos], open_[pos]
            partial = partial + (s2 == PARTIAL)
            dyn = dyn | (s2 == DYNAMIC)
            open_ = open_ | (s2 == OPEN)
        state = np.where(dyn, DYNAMIC, np.where(partial == 0, FULL, PARTIAL)).astype(np.int8)
        # Two partial operands may leave the tile empty: decided by the node (here or above).
        state[~dyn & (open_ | (partial >= 2))] = OPEN
        if ir.is_dynamic(node):
            keys, state = self._settle(node, keys, state)
        keep = state > 0
        return keys[keep], state[keep]

    def _by_axes(self, node: ir.Node, domain):
        # Parts that read one grid axis each: the candidates' counts, axis by axis, are their
        # states at once (no operand classified on its own, no tile left open).
        if domain is None:
            domain = self._bounded_domain(node)
        terms = AxisSplit(node, self.env.layout).terms
        if domain is None and terms is not None:
            domain = self._terms_domain(terms)
        if domain is None:
            domain = self.search(self.node_decide(node))
        ref = self.refine(node, domain, counting=True)
        m, n = domain // self.nkb, domain % self.nkb
        area = np.diff(self.q.starts)[m] * np.diff(self.k.starts)[n]
        state = np.where(ref.true_area == area, FULL, PARTIAL).astype(np.int8)
        keep = ref.true_area > 0
        self._caches.axis_counts[node] = (domain[keep], ref.true_area[keep])  # the plan's counts, not again
        return domain[keep], state[keep]

    def counted_by_axes(self, node: ir.Node, keys: np.ndarray) -> np.ndarray | None:
        """Allowed pairs of tiles ``keys`` when classifying ``node`` counted them all already (else None)."""
        found = self._caches.axis_counts.get(node)
        if found is None or not len(keys):
            return None
        known, count = found
        pos = np.minimum(np.searchsorted(known, keys), max(len(known) - 1, 0))
        return count[pos] if len(known) and (known[pos] == keys).all() else None

    def _terms_domain(self, terms: list[dict]) -> np.ndarray | None:
        """Candidate tiles of a union of products over axes (:attr:`AxisSplit.terms`): per term, the key
        tiles within every factor's needed-key ranges (per axis, as :meth:`_bounded_domain`), over the
        sides' :meth:`~Side.boxes`; the union over terms. None when some term has no factor bounding its
        keys (a branch and bound over key-tile ranges then)."""
        from patterndsl.analysis.gridcands import Cells

        (qt, qlo, qhi, qalo, qahi, _), _ = self.q.boxes()
        (kt, _, _, kalo, kahi, _), _ = self.k.boxes()
        cells = Cells(kalo, kahi)
        if not cells.usable:
            return None
        parts = []
        for term in terms:
            factors = dict.fromkeys(f for fs in term.values() for f in fs)
            ranges = self._joint_ranges(factors, (qlo, qhi, qalo, qahi))
            if ranges is None:
                return None
            parts.append(cells.meeting(*ranges, qt, kt, self.nkb))
        return sorted_set(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def _joint_ranges(self, items, bounds) -> tuple[np.ndarray, np.ndarray] | None:
        """The per-axis key ranges within every one of ``items``' needed-key ranges, for query boxes
        ``bounds = (lo, hi, alo, ahi)``; None when no item bounds the keys per axis."""
        alo = ahi = None
        for item in items:
            need = cls.needed_keys(item, *bounds, self.env) if isinstance(item, ir.Prim) else None
            if need is None or need[2] is None:
                continue
            alo = need[2] if alo is None else np.maximum(alo, need[2])
            ahi = need[3] if ahi is None else np.minimum(ahi, need[3])
        return None if alo is None else (alo, ahi)

    def _bounded_domain(self, node: ir.Node) -> np.ndarray | None:
        # An intersection on a grid whose operands bound the key coordinates (each its needed-key
        # ranges): the key tiles within every operand's ranges, per axis; None when none bounds them.
        if not isinstance(node, ir.Inter) or self.env.layout is None:
            return None
        ranges = self._joint_ranges(node.items, self._bounds()[0])
        return None if ranges is None else self._overlap_axes(*ranges)

    def _union(self, node: ir.Union, domain):
        results = [self._operand(node, item, domain) for item in node.items]
        allk = np.concatenate([r[0] for r in results])
        alls = np.concatenate([r[1] for r in results])
        keys, inv = np.unique(allk, return_inverse=True)
        # bincount, not ufunc.at: the same sums many times faster
        full, dyn, open_, partial = (np.bincount(inv, alls == s, len(keys)) for s in (FULL, DYNAMIC, OPEN, PARTIAL))
        full, dyn, open_ = full > 0, dyn > 0, open_ > 0
        state = np.where(full, FULL, np.where(dyn, DYNAMIC, PARTIAL)).astype(np.int8)
        # Two partial operands may fill the tile: decided by the node (here or above).
        state[~full & ~dyn & (open_ | (partial >= 2))] = OPEN
        if ir.is_dynamic(node):
            keys, state = self._settle(node, keys, state)
        keep = state > 0
        return keys[keep], state[keep]

    def _not(self, node: ir.Not, domain):
        base = self.all_keys() if domain is None else domain
        k2, s2 = self._operand(node, node.item, base)
        state = np.full(len(base), FULL, np.int8)
        pos = np.searchsorted(base, k2)
        flip = np.array([FULL, PARTIAL, EMPTY, DYNAMIC, OPEN], np.int8)
        state[pos] = flip[s2]
        keep = state > 0
        return base[keep], state[keep]

    # ----------------------------------------------------------------- route

    def route_candidates(self, prim: ir.Prim) -> tuple[np.ndarray, int, int, np.ndarray, np.ndarray]:
        """The (query group, key block) pairs where ``among`` allows some pair, from the plan of ``among``.

        ``among`` is planned on a coarse side whose tiles are route's query groups and key
        blocks, so the cost follows the candidate pairs, never ``Lq x Lk``.

        Returns:
            ``(keys, n_groups, n_blocks, qgroup, kblock)``: sorted ``a * n_blocks + b`` of the
            candidate pairs, the counts, the group of every query index and the block of every
            key index (as in :func:`patterndsl.semantics.route_blocks`).
        """
        if prim in self._caches.routes:
            return self._caches.routes[prim]
        among = prim.arg("among")
        if ir.is_dynamic(among):
            raise PatternError("route(among = ...) cannot itself contain route(...)", prim.span)
        n_q, n_k, qgroup, kblock = semantics.route_blocks(prim, self.ctx)
        qgroup, kblock = qgroup.numpy(), kblock.numpy()
        boxes = isinstance(prim.arg("block"), tuple) or isinstance(prim.arg("qblock"), tuple)
        qbox = kbox = None
        if boxes:
            rank = len(self.env.layout.shape)
            block, qblock = prim.arg("block"), prim.arg("qblock")
            kbox = tuple(semantics._per_axis(block, rank, "route block"))
            qbox = tuple(semantics._per_axis(block if qblock is None else qblock, rank, "route qblock"))
        qcoarse = _group_side(qgroup, n_q, self.q, self.env.offset, self.env.layout, boxes, qbox)
        kcoarse = _group_side(kblock, n_k, self.k, 0, self.env.layout, boxes, kbox)
        # Under grouped-query attention the heads sharing a key-value head share one choice
        # among the union of their candidates, and a plan does not know the grouping: when
        # among reads h, a head's candidates are the union over every head (a superset of any
        # group's), and RouteFacts treats every group as open (no choice is forced).
        heads = range(self.env.heads) if ir.uses_head(among) and self.env.heads else [self.env.head]
        found = []
        for h in heads:
            env = self.env if h == self.env.head else dataclasses.replace(self.env, head=h, cache={})
            sub = Engine(qcoarse, kcoarse, env)
            node = rewrite_for_plan(among)
            shifted = None
            if boxes and len(heads) == 1:  # group boxes repeating by translation: the engine run once per class
                from patterndsl.analysis import cellshift

                shifted = cellshift.route_box_candidates(self, prim, node, sub)
            found.append(sub.run(node, None)[0] if shifted is None else shifted)
            self.tally.evaluated += sub.evaluated
        ckeys = found[0] if len(found) == 1 else np.unique(np.concatenate(found))
        info = (ckeys, n_q, n_k, qgroup, kblock)
        self._caches.routes[prim] = info
        return info

    def _route_tiles(self, prim: ir.Prim) -> tuple[np.ndarray, np.ndarray]:
        """``(gq, gk)``: which tiles each group / block of ``prim`` meets, sorted ``group * n_tiles + tile`` (one
        entry per pair); listed on first use (a grid route planned as runs never reads them)."""
        if prim not in self._caches.route_tiles:
            _, _, _, qgroup, kblock = self.route_candidates(prim)
            qtile = np.empty(len(qgroup), np.int64)
            qtile[slice(None) if self.q.order is None else self.q.order] = np.repeat(
                np.arange(self.nqb), np.diff(self.q.starts)
            )
            ktile = np.empty(len(kblock), np.int64)
            ktile[slice(None) if self.k.order is None else self.k.order] = np.repeat(
                np.arange(self.nkb), np.diff(self.k.starts)
            )
            gq, gk = sorted_set(qgroup * self.nqb + qtile), sorted_set(kblock * self.nkb + ktile)
            self._caches.route_tiles[prim] = (gq, gk)
        return self._caches.route_tiles[prim]

    def route_incidence(self, prim: ir.Prim, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tiles met by (query group, key block) pairs of a route, one entry per (pair, tile).

        Args:
            prim: the ``route`` primitive.
            pairs: sorted pair keys ``a * n_blocks + b``.

        Returns:
            ``(owner, keys)``: ``pairs[owner[t]]`` meets tile ``keys[t]`` (``m * n_key_tiles + n``);
            each (pair, tile) once, so counting entries per tile counts the pairs meeting it.
        """
        _, n_q, n_k, _, _ = self.route_candidates(prim)
        gq, gk = self._route_tiles(prim)
        a, b = pairs // n_k, pairs % n_k
        gq_ptr = np.searchsorted(gq // self.nqb, np.arange(n_q + 1))
        gk_ptr = np.searchsorted(gk // self.nkb, np.arange(n_k + 1))
        rows, pos = expand_runs(np.arange(len(a)), gq_ptr[a], gq_ptr[a + 1])
        m = gq[pos] % self.nqb
        r2, pos2 = expand_runs(np.arange(len(rows)), gk_ptr[b[rows]], gk_ptr[b[rows] + 1])
        return rows[r2], m[r2] * self.nkb + gk[pos2] % self.nkb

    def route_pairs_per_tile(self, prim: ir.Prim) -> tuple[np.ndarray, np.ndarray]:
        """``(groups, blocks)``: how many query groups meet each query tile, key blocks each key tile."""
        gq, gk = self._route_tiles(prim)
        return np.bincount(gq % self.nqb, minlength=self.nqb), np.bincount(gk % self.nkb, minlength=self.nkb)

    def route_tiles_per_group(self, prim: ir.Prim) -> np.ndarray:
        """How many query tiles each query group of ``prim`` meets."""
        n_q = self.route_candidates(prim)[1]
        return np.bincount(self._route_tiles(prim)[0] // self.nqb, minlength=n_q)

    def selection(self, node: ir.Node) -> dict | None:
        """The fixed choice of every route in ``node`` as :func:`semantics.evaluate` takes it, or None."""
        routes = ir.routes(node)
        if not routes:
            return {}
        if self.fixed is None or any(p not in self.fixed for p in routes):
            return None
        # a fixed choice is sorted pair keys, or already a table (routetiles.RunTable)
        return {
            p: PairTable(c, self.route_candidates(p)[2]) if isinstance(c := self.fixed[p][0], np.ndarray) else c
            for p in routes
        }

    def choice_tiles(self, prim: ir.Prim, tkeys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """States of the tiles a fixed choice meets, from its incidence (``keys`` of :meth:`route_incidence`).

        A fixed choice is a union of (group x block) rectangles that partition a tile: the
        tile is full exactly when every pair meeting it is chosen.
        """
        if self.nqb * self.nkb <= _DENSE_TILES:
            count = np.bincount(tkeys, minlength=self.nqb * self.nkb)
            keys = np.flatnonzero(count)
            count = count[keys]
        else:
            keys, count = np.unique(tkeys, return_counts=True)
        groups, blocks = self.route_pairs_per_tile(prim)
        state = np.where(count == groups[keys // self.nkb] * blocks[keys % self.nkb], FULL, PARTIAL)
        return keys, state.astype(np.int8)

    def _route(self, prim: ir.Prim, domain):
        fixed = None if self.fixed is None else self.fixed.get(prim)
        if fixed is None:
            keys = np.unique(self.route_incidence(prim, self.route_candidates(prim)[0])[1])
            state = np.full(len(keys), DYNAMIC, np.int8)
        else:
            _, keys, state = fixed
        if domain is not None:
            keep = np.isin(keys, domain, assume_unique=True)
            keys, state = keys[keep], state[keep]
        return keys, state


#: :meth:`Engine.box_states` under ``~``: all <-> none, unknown and surely partial stay.
_FLIP_SURE = np.array([2, 1, 0, 3], np.int8)

#: Largest period by which :meth:`Engine.refine` first splits boxes into residue classes.
_MAX_PERIOD = 8


def _period(node: ir.Node, env) -> int:
    """The lcm of the moduli of the bands in ``node`` when small (else 1)."""
    period = 1
    moduli = []
    for prim in ir.walk(node):
        band = band_of(prim, env)
        if band is not None:
            moduli.append(band[2])
        elif isinstance(prim, ir.Prim) and primitives.lookup(prim.name).periods is not None:
            moduli += primitives.lookup(prim.name).periods(prim)
    for mod in moduli:
        if mod > 1:
            period = period * mod // math.gcd(period, mod)
            if period > _MAX_PERIOD:
                return 1
    return period


def _by_residue(owner: np.ndarray, qb: _BoxSide, kb: _BoxSide, period: int):
    """Every (query, key) box pair split into the pairs of residue classes mod ``period`` (1-D)."""
    if ((qb.s[:, 0] % period == 0) | (qb.n[:, 0] <= 1)).all() and (
        (kb.s[:, 0] % period == 0) | (kb.n[:, 0] <= 1)
    ).all():
        return owner, qb, kb  # one residue class each already (the residue-class orders)
    parts_o, parts_q, parts_k = [], [], []
    keys = [kb.residue(side_k, period) for side_k in range(period)]
    for side_q in range(period):
        q = qb.residue(side_q, period)
        for k in keys:
            live = (q.n[:, 0] > 0) & (k.n[:, 0] > 0)
            parts_o.append(owner[live])
            parts_q.append(q.take(live))
            parts_k.append(k.take(live))
    return np.concatenate(parts_o), _BoxSide.cat(parts_q), _BoxSide.cat(parts_k)


class _BoxSide:
    """One side of a batch of boxes: per-axis progressions ``a + s * t``, ``t < n`` (int64 ``[B, D]``)."""

    __slots__ = ("a", "n", "s", "side")

    def __init__(self, a: np.ndarray, s: np.ndarray, n: np.ndarray, side: Side):
        self.a, self.s, self.n, self.side = a, s, n, side

    def pieces(self):
        return Pieces.of(self.a, self.s, self.n, self.side)

    @property
    def strides(self):
        return self.side.strides

    @property
    def extents(self):
        return self.side.extents

    def take(self, sel) -> _BoxSide:
        return _BoxSide(self.a[sel], self.s[sel], self.n[sel], self.side)

    def halve(self, cut: np.ndarray) -> tuple[_BoxSide, _BoxSide]:
        """Both halves (along the longest axis) of the boxes where ``cut``; the others twice unchanged."""
        rows = np.arange(len(self.a))
        axis = np.argmax(self.n, axis=1)
        full = self.n[rows, axis]
        head = np.where(cut, full // 2, full)
        n1, n2, a2 = self.n.copy(), self.n.copy(), self.a.copy()
        n1[rows, axis] = head
        n2[rows, axis] = np.where(cut, full - head, full)
        a2[rows, axis] += np.where(cut, self.s[rows, axis] * head, 0)
        return _BoxSide(self.a, self.s, n1, self.side), _BoxSide(a2, self.s, n2, self.side)

    def residue(self, r: int, period: int) -> _BoxSide:
        """The elements of each (1-D) box whose position is ``r`` mod ``period`` (count 0 when none).

        For any step ``s`` the class is a progression again, of step ``s * period / gcd(s, period)``.
        """
        a, s, n = self.a[:, 0], self.s[:, 0], self.n[:, 0]
        g = np.gcd(s, period)
        mod = period // g
        # first t >= 0 with a + s * t == r (mod period): solvable when g divides r - a
        ok = (r - a) % g == 0
        # the inverse of s / g modulo mod (mod <= period is small: search it)
        x = np.arange(period, dtype=np.int64)[None, :]
        inv = (((s // g)[:, None] * x) % mod[:, None] == 1 % mod[:, None]).argmax(1)
        t0 = np.where(mod > 1, (((r - a) // np.where(ok, g, 1)) * inv) % np.maximum(mod, 1), 0)
        count = np.where(ok & (t0 < n), (n - t0 + mod - 1) // mod, 0)
        return _BoxSide((a + s * t0)[:, None], (s * mod)[:, None], count[:, None], self.side)

    @staticmethod
    def cat(parts: list[_BoxSide]) -> _BoxSide:
        return _BoxSide(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("a", "s", "n")), parts[0].side)

    def indices(self) -> np.ndarray:
        """Original indices of every box's elements, int64 ``[B, W]`` (-1 = padding)."""
        size = self.n.prod(1)
        width = int(size.max()) if len(size) else 0
        t = np.arange(width, dtype=np.int64)[None, :]
        pos = np.zeros((len(size), width), np.int64)
        inner = np.ones(len(size), np.int64)
        for x in range(self.n.shape[1] - 1, -1, -1):
            coord = self.a[:, x : x + 1] + self.s[:, x : x + 1] * ((t // inner[:, None]) % self.n[:, x : x + 1])
            pos += coord * self.side.strides[x]
            inner = inner * self.n[:, x]
        return np.where(t < size[:, None], pos - self.side.offset, -1)


@dataclasses.dataclass
class Refined:
    """What :meth:`Engine.refine` settled: per tile, and the boxes it left undecided.

    Attributes:
        any_true, any_false: bool ``[T]``: some box of the tile is all allowed / all disallowed.
        true_area: int64 ``[T]``: pairs in the tile's all-allowed boxes.
        owner: int64 ``[B]``: the tile of each undecided box.
        qb, kb: the undecided boxes' query and key sides.
    """

    any_true: np.ndarray
    any_false: np.ndarray
    true_area: np.ndarray
    owner: np.ndarray
    qb: _BoxSide
    kb: _BoxSide

    def area(self) -> int:
        """Pairs in the undecided boxes."""
        return int((self.qb.n.prod(1) * self.kb.n.prod(1)).sum())

    def _values(self, engine: Engine, node: ir.Node, selection):
        # Largest boxes first, so a chunk pads its boxes to similar sizes.
        size = self.qb.n.prod(1) * self.kb.n.prod(1)
        order = np.argsort(-size, kind="stable")
        s = 0
        while s < len(order):
            step = max(1, _EVAL_CHUNK // max(int(size[order[s]]), 1))
            part = order[s : s + step]
            qi, ki = self.qb.take(part).indices(), self.kb.take(part).indices()
            valid = torch.from_numpy(qi >= 0)[:, :, None] & torch.from_numpy(ki >= 0)[:, None, :]
            i = torch.from_numpy(np.maximum(qi, 0))[:, :, None]
            j = torch.from_numpy(np.maximum(ki, 0))[:, None, :]
            yield part, semantics.evaluate(node, i, j, engine.env.head, engine.ctx, selection), valid
            s += step

    def subset(self, sel: np.ndarray) -> Refined:
        """The same tiles with only the undecided boxes ``sel``."""
        qb, kb = self.qb.take(sel), self.kb.take(sel)
        return Refined(self.any_true, self.any_false, self.true_area, self.owner[sel], qb, kb)

    def evaluate(self, engine: Engine, node: ir.Node, selection) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per tile, over the undecided boxes: whether an element is allowed, whether one is not, how many are."""
        t = np.zeros(len(self.any_true), bool)
        f = np.zeros(len(self.any_true), bool)
        c = np.zeros(len(self.any_true), np.int64)
        for part, val, valid in self._values(engine, node, selection):
            t[self.owner[part][(val & valid).flatten(1).any(1).numpy()]] = True
            f[self.owner[part][(~val & valid).flatten(1).any(1).numpy()]] = True
            np.add.at(c, self.owner[part], (val & valid).flatten(1).sum(1).numpy())
        return t, f, c


class PairTable:
    """A route's fixed choice as sorted pair keys, indexable like the bool ``[n_groups, n_blocks]`` table.

    :func:`patterndsl.semantics.evaluate` reads a selection as ``table[a, b]``; this answers
    that by binary search, so no ``n_groups x n_blocks`` table is built.
    """

    def __init__(self, keys: np.ndarray, n_blocks: int):
        self.keys = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.int64))
        self.n_blocks = n_blocks

    def to(self, device) -> PairTable:
        return self

    def __getitem__(self, index) -> torch.Tensor:
        a, b = index
        want = a * self.n_blocks + b
        if not len(self.keys):
            return torch.zeros(want.shape, dtype=torch.bool)
        pos = torch.searchsorted(self.keys, want.reshape(-1)).clamp(max=len(self.keys) - 1).reshape(want.shape)
        return self.keys[pos] == want


def _group_side(group: np.ndarray, count: int, fine: Side, offset: int, layout, boxes: bool, box=None) -> Side:
    """A side whose tiles are route's query groups / key blocks (boxes of extents ``box``, or runs of positions)."""
    if box is not None and offset == 0 and len(group) == math.prod(layout.shape):
        return _box_side(fine, tuple(layout.shape), box)
    order = np.argsort(group, kind="stable").astype(np.int64)
    starts = np.searchsorted(group[order], np.arange(count + 1)).astype(np.int64)
    idx = order
    if layout is not None and not boxes:
        return _runs_side(group, count, fine, order, starts)
    if layout is None:
        pos = idx + offset
        lo = np.full(count, np.iinfo(np.int64).max)
        hi = np.full(count, np.iinfo(np.int64).min)
        np.minimum.at(lo, group[idx], pos)
        np.maximum.at(hi, group[idx], pos)
        a, s, n = lo[:, None], np.ones((count, 1), np.int64), (hi - lo + 1)[:, None]
    else:
        coords = np.stack(np.unravel_index(idx, layout.shape), 1).astype(np.int64)
        d = coords.shape[1]
        lo = np.full((count, d), np.iinfo(np.int64).max)
        hi = np.full((count, d), np.iinfo(np.int64).min)
        # idx is sorted by group: each group's extremes by one reduceat over its run (ufunc.at is slow)
        some = np.flatnonzero(starts[1:] > starts[:-1])
        if len(some):
            lo[some] = np.minimum.reduceat(coords, starts[some], axis=0)
            hi[some] = np.maximum.reduceat(coords, starts[some], axis=0)
        a, s, n = lo, np.ones((count, d), np.int64), hi - lo + 1
    tile = np.arange(count, dtype=np.int64)
    ptr = np.arange(count + 1, dtype=np.int64)
    return Side(fine.length, 1, offset, fine.extents, fine.strides, order, ptr, tile, a, s, n, False, starts)


def _box_side(fine: Side, shape: tuple[int, ...], box: tuple[int, ...]) -> Side:
    """:func:`_group_side` of the boxes of a whole grid (every position once, in order), without a sort: the
    positions of each box row-major, box after box (the grid padded to whole boxes, its axes regrouped)."""
    box = tuple(min(b, n) for n, b in zip(shape, box, strict=True))  # a box past an axis is that axis
    n_boxes = [-(-n // b) for n, b in zip(shape, box, strict=True)]
    d = len(shape)
    padded = np.full([g * b for g, b in zip(n_boxes, box, strict=True)], -1, np.int64)
    padded[tuple(slice(0, n) for n in shape)] = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    split = padded.reshape([x for g, b in zip(n_boxes, box, strict=True) for x in (g, b)])
    order = split.transpose(list(range(0, 2 * d, 2)) + list(range(1, 2 * d, 2))).reshape(-1)
    order = order[order >= 0]
    # each box's first coordinates and extents per axis
    digits = np.unravel_index(np.arange(math.prod(n_boxes), dtype=np.int64), n_boxes)
    a = np.stack([g * b for g, b in zip(digits, box, strict=True)], 1).astype(np.int64)
    n = np.minimum(a + np.asarray(box, np.int64), np.asarray(shape, np.int64)) - a
    count = len(a)
    starts = np.zeros(count + 1, np.int64)
    np.cumsum(n.prod(1), out=starts[1:])
    tile = np.arange(count, dtype=np.int64)
    ptr = np.arange(count + 1, dtype=np.int64)
    return Side(fine.length, 1, 0, fine.extents, fine.strides, order, ptr, tile, a, np.ones_like(a), n, False, starts)


def _runs_side(group, count, fine: Side, order, starts) -> Side:
    # Groups that are runs of flattened grid positions: cut each run into sub-boxes.
    from patterndsl.analysis.tiles import range_boxes

    lo = order[starts[:-1]]
    hi = order[starts[1:] - 1] + 1
    shape = np.asarray(fine.extents, np.int64)[None, :]
    tile, a, n = range_boxes(shape, lo, np.where(starts[1:] > starts[:-1], hi, lo))
    ptr = np.zeros(count + 1, np.int64)
    ptr[1:] = np.cumsum(np.bincount(tile, minlength=count))
    return Side(fine.length, 1, 0, fine.extents, fine.strides, order, ptr, tile, a, np.ones_like(a), n, False, starts)


def _cost(node: ir.Node) -> int:
    """Rough rank of how many tiles a node can reach: cheapest first inside an intersection."""
    if isinstance(node, ir.Prim):
        return primitives.lookup(node.name).cost
    if isinstance(node, ir.Inter):
        return min(_cost(i) for i in node.items)
    if isinstance(node, ir.Union):
        return max(_cost(i) for i in node.items)
    return 8


def rewrite_for_plan(node: ir.Node) -> ir.Node:
    """Deferred import of the rewrite pass (kept in its own module)."""
    from patterndsl.analysis.rewrite import simplify

    return simplify(node)


def band_of(node: ir.Node, env: cls.Env | None = None):
    """``(lo, hi, modulus)`` when ``node`` is one band ``lo <= q - k <= hi``, ``(q - k) % modulus == 0``.

    With ``env`` (1-D), a ``where`` half-plane ``c * (q - k) + c0 >= 0`` counts as a band too.
    """
    if not isinstance(node, ir.Prim):
        return None
    rule = primitives.lookup(node.name).band
    return None if rule is None else rule(node, env)


def symbolic_total(node: ir.Node, q_len: int, kv_len: int, layout, env=None) -> int | None:
    """Allowed pairs of a single primitive over all queries by formula (at most O(Lq) work), or None.

    The count does not depend on the token order, so it serves every candidate order.
    """
    if not isinstance(node, ir.Prim):
        return None
    rule = primitives.lookup(node.name).total
    total = None if rule is None else rule(node, q_len, kv_len, layout, env)
    return band_total(node, q_len, kv_len, env) if total is None else total


def band_total(node: ir.Node, q_len: int, kv_len: int, env=None) -> int | None:
    """Allowed pairs of a single-band node over all queries, one formula per query row (O(Lq)), or None."""
    band = band_of(node, env)
    if band is None:
        return None
    lo, hi, mod = band
    off = kv_len - q_len
    if mod == 1:
        return _band_total_closed(lo, hi, off, off + q_len - 1, kv_len)
    return sums.band_pairs(lo, hi, mod, off, off + q_len - 1, kv_len)


def _band_total_closed(lo: int, hi: int, q0: int, q1: int, kv_len: int) -> int:
    # r(q) = min(Lk-1, q-lo) - max(0, q-hi) + 1 is linear between its two kinks (q = hi and
    # q = Lk-1+lo), with slope -1, 0 or 1; sum max(r, 0) piece by piece as arithmetic series.
    def r(q):
        return min(kv_len - 1, q - lo) - max(0, q - hi) + 1

    cuts = sorted({q0, q1 + 1} | {c for c in (hi + 1, kv_len + lo) if q0 < c <= q1})
    total = 0
    for s, e in itertools.pairwise(cuts):
        e -= 1
        rs = r(s)
        slope = r(s + 1) - rs if e > s else 0
        if slope == 0:
            total += (e - s + 1) * max(rs, 0)
            continue
        if slope > 0:
            a = max(s, s + 1 - rs)
            b = e
        else:
            a, b = s, min(e, s + rs - 1)
        if a <= b:
            ra, rb = rs + slope * (a - s), rs + slope * (b - s)
            total += (ra + rb) * (b - a + 1) // 2
    return total


def without_route(node: ir.Node) -> ir.Node:
    """``node`` with every ``route`` replaced by ``empty``: its meaning on tiles no route reaches."""
    return ir.substitute(node, lambda prim, sign: ir.EMPTY if prim.name in ir.DYNAMIC_PRIMITIVES else prim)


def count_tiles(engine: Engine, node: ir.Node, keys: np.ndarray, state: np.ndarray | None = None) -> np.ndarray:
    """Allowed pairs in each tile ``keys`` (tiles partial under ``node``), following the algebra.

    A partial tile of ``A & B`` whose other operands are full there has the partial operand's
    count; of ``A | B`` whose other operands are empty there, likewise; of ``~A``, the area
    minus ``A``'s count. Single bands are counted by formula; what is left is evaluated.
    """
    from patterndsl.analysis import diagonal

    out = np.zeros(len(keys), np.int64)
    if not len(keys):
        return out
    along = diagonal.count(engine, node, keys)  # one tile per diagonal, when the node allows it
    if along is not None:
        return along
    memo = engine._caches.memo.get(node)
    if memo:
        # Tiles evaluated while classifying have their counts already.
        seen = np.array([int(k) in memo for k in keys], bool)
        if seen.any():
            out[seen] = [memo[int(k)][2] for k in keys[seen]]
            rest = np.flatnonzero(~seen)
            out[rest] = count_tiles(engine, node, keys[rest])
            return out
    if isinstance(node, ir.Not):
        m, n = keys // engine.nkb, keys % engine.nkb
        area = np.diff(engine.q.starts)[m] * np.diff(engine.k.starts)[n]
        return area - count_tiles(engine, node.item, keys)
    if isinstance(node, (ir.Inter, ir.Union)) and AxisSplit(node, engine.env.layout).usable:
        known = engine.counted_by_axes(node, keys)
        return count_allowed(engine, node, keys) if known is None else known  # axis by axis, all operands at once
    if isinstance(node, (ir.Inter, ir.Union)) and not ir.is_dynamic(node):
        other = FULL if isinstance(node, ir.Inter) else EMPTY
        states = []
        for item in node.items:
            k2, s2 = engine.run(item, keys)
            st = np.zeros(len(keys), np.int8)
            st[np.searchsorted(keys, k2)] = s2
            states.append(st)
        states = np.stack(states)
        single = ((states == PARTIAL).sum(0) == 1) & ((states == PARTIAL) | (states == other)).all(0)
        for x, item in enumerate(node.items):
            sel = np.flatnonzero(single & (states[x] == PARTIAL))
            if len(sel):
                out[sel] = count_tiles(engine, item, keys[sel])
        rest = np.flatnonzero(~single)
        if len(rest):
            # several partial operands: by products over axes when the node is one, else by refining
            counted = engine.count_by_terms(node, keys[rest])
            out[rest] = count_allowed(engine, node, keys[rest]) if counted is None else counted
        return out
    return count_allowed(engine, node, keys)


def _separable_count(engine: Engine, node: ir.Node, keys: np.ndarray) -> np.ndarray | None:
    """Counts for primitives that test the key (or query) alone: rows x allowed keys per tile (a rule
    returns None where it cannot count: the per-piece rules of 1-D progressions on a grid)."""
    if not isinstance(node, ir.Prim):
        return None
    rule = primitives.lookup(node.name).count
    return None if rule is None else rule(node, engine, keys)


def count_allowed(engine: Engine, node: ir.Node, keys: np.ndarray) -> np.ndarray:
    """Allowed pairs in each tile ``keys`` (partial tiles): by formula for a single band, else by evaluation.

    A band is counted row by row of each query piece against each key progression, so the
    cost is one number per query row of a partial tile, never per pair.
    """
    out = np.zeros(len(keys), np.int64)
    if not len(keys):
        return out
    band = band_of(node, engine.env)
    q, k = engine.q, engine.k
    separable = _separable_count(engine, node, keys)
    if separable is not None:
        return separable
    if band is not None and len(q.extents) == 1:
        # Every piece pair a trapezoid: counted in O(1) when both pieces share a step.
        m, n = keys // engine.nkb, keys % engine.nkb
        cq, ck = np.diff(q.ptr)[m], np.diff(k.ptr)[n]
        owner, local = expand_runs(np.arange(len(keys)), np.zeros(len(keys), np.int64), cq * ck)
        qi = q.ptr[m][owner] + local // ck[owner]
        ki = k.ptr[n][owner] + local % ck[owner]
        count, ok = band_pairs(q.piece_view(qi), k.piece_view(ki), *band)
        if ok.all():
            return np.bincount(owner, weights=count, minlength=len(keys)).astype(np.int64)
    if band is not None and len(q.extents) == 1:
        lo, hi, mod = band
        m, n = keys // engine.nkb, keys % engine.nkb
        cq = np.diff(q.ptr)[m]
        ck = np.diff(k.ptr)[n]
        per = cq * ck
        pair = np.repeat(np.arange(len(keys)), per)
        local = np.arange(int(per.sum()), dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
        qi = q.ptr[m][pair] + local // ck[pair]
        ki = k.ptr[n][pair] + local % ck[pair]
        ks = np.where(k.n[ki, 0] > 1, k.s[ki, 0], mod)
        if ((ks == 1) | (ks % mod == 0)).all():
            width = int(q.n[qi, 0].max())
            t = np.arange(width, dtype=np.int64)[None, :]
            live = t < q.n[qi, 0][:, None]
            qpos = q.a[qi, 0][:, None] + q.s[qi, 0][:, None] * t
            ka, kn = k.a[ki, 0][:, None], k.n[ki, 0][:, None]
            kss = ks[:, None]
            # keys k = ka + ks*u, 0 <= u < kn, with qpos - hi <= k <= qpos - lo.
            u0 = np.maximum(-np.floor_divide(-(qpos - hi - ka), kss), 0)
            u1 = np.minimum(np.floor_divide(qpos - lo - ka, kss), kn - 1)
            step1 = kss == 1
            # step 1: count k in [ka+u0, ka+u1] with k == qpos (mod mod)
            lo_k, hi_k = ka + u0, ka + u1
            c1 = np.floor_divide(hi_k - qpos, mod) - np.floor_divide(lo_k - 1 - qpos, mod)
            # step a multiple of mod: the congruence is the same for every key of the piece
            c2 = np.where((qpos - ka) % mod == 0, u1 - u0 + 1, 0)
            cnt = np.where(step1, c1, c2)
            cnt = np.where((u0 <= u1) & live, cnt, 0)
            np.add.at(out, pair, cnt.sum(1))
            return out
    selection = engine.selection(node)
    if selection is None:
        node = without_route(node)
    if not ir.is_dynamic(node):
        ref = engine.refine(node, keys, counting=True)
        out = ref.true_area.copy()
        if len(ref.owner):
            _, _, count = engine._evaluate_boxes(node, keys, ref, selection, counting=True)
            owners = np.unique(ref.owner)
            out[owners] = count[owners]
        return out
    for part, i, j, valid in engine.chunks(keys):
        val = semantics.evaluate(node, i, j, engine.env.head, engine.ctx, selection)
        out[part] = (val & valid).flatten(1).sum(1).numpy()
    engine.tally.counted += len(keys)
    engine.tally.elements += len(keys) * engine.q.block * engine.k.block
    return out


def identity_engine(sizes: Sizes, head: int, block: tuple[int, int] | int) -> Engine:
    """An :class:`Engine` on the identity token order (as plans of ``route`` patterns use).

    Args:
        sizes: lengths, layout and the pattern's query heads (0: unknown; see :class:`Sizes`).
        head: the head index the pattern is classified for.
        block: tile sizes ``(BM, BN)`` (an int for both).

    Returns:
        The engine; its tile keys are ``m * n_key_tiles + n``.
    """
    from patterndsl.analysis import tiles
    from patterndsl.analysis.classify import Env

    bm, bn = (block, block) if isinstance(block, int) else block
    q_len, kv_len, layout = sizes.q_len, sizes.kv_len, sizes.layout
    if layout is None:
        extents = (kv_len,)
        qsegs = tiles.identity_segments(q_len, sizes.offset, extents)
        ksegs = tiles.identity_segments(kv_len, 0, extents)
    else:
        extents = layout.shape
        qsegs = ksegs = tiles.identity_segments(q_len, 0, extents)
    qside = tiles.build_side(qsegs, q_len, bm, sizes.offset, extents, True)
    kside = tiles.build_side(ksegs, kv_len, bn, 0, extents, True)
    return Engine(qside, kside, Env(sizes, head))
