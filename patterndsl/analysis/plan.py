"""Stage 4 data: the block plan that drives every executor.

Comes in: built by :mod:`patterndsl.analysis` from a bound pattern (or, for
tests and as the reference, by :func:`plan_from_mask` from a dense mask).
Goes out: per group of heads that share one pattern, which key tiles each
query tile visits (CSR lists and compact runs), the transposed lists the
backward pass needs, the token permutations, and statistics.

Tile states: 0 empty, 1 partial (the predicate must be applied), 2 full (no
mask work), 3 decided at run time (``route``). Tiles live in the *reordered*
token space: query tile ``m`` holds reordered query positions
``m*BM .. m*BM+BM-1``, which are original query indices
``q_order[m*BM : m*BM+BM]`` (likewise keys with ``kv_order``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from patterndsl import ir
from patterndsl.sizes import Sizes

EMPTY, PARTIAL, FULL, DYNAMIC = 0, 1, 2, 3


def _rows_of(row_ptr: torch.Tensor, nqb: int):
    # numpy: torch.repeat_interleave carries a large fixed cost per call on CPU.
    ptr = row_ptr.numpy()
    return np.repeat(np.arange(nqb, dtype=np.int64), np.diff(ptr))


@dataclass(frozen=True)
class TileList:
    """Non-empty tiles of one head group in both orientations (CSR / CSC).

    Attributes:
        row_ptr: int64 ``[nqb + 1]``; query tile ``m`` owns ``cols[row_ptr[m]:row_ptr[m+1]]``.
        cols: int64 ``[nnz]`` key tile indices, ascending within a row.
        state: int8 ``[nnz]`` 1 partial, 2 full, 3 run-time.
        col_ptr: int64 ``[nkb + 1]``; key tile ``n`` owns ``rows[col_ptr[n]:col_ptr[n+1]]``.
        rows: int64 ``[nnz]`` query tile indices, ascending within a column.
        state_t: int8 ``[nnz]`` states in the transposed order.
    """

    row_ptr: torch.Tensor
    cols: torch.Tensor
    state: torch.Tensor
    col_ptr: torch.Tensor
    rows: torch.Tensor
    state_t: torch.Tensor

    @property
    def nnz(self) -> int:
        return int(self.cols.numel())

    @staticmethod
    def from_dense(tiles: torch.Tensor) -> TileList:
        """Build from a dense int8 ``[nqb, nkb]`` tile map (small maps; tests and fallbacks)."""
        nqb, nkb = tiles.shape
        rows, cols = torch.nonzero(tiles, as_tuple=True)
        return TileList.from_coo(rows, cols, tiles[rows, cols].to(torch.int8), nqb, nkb)

    @staticmethod
    def from_coo(rows, cols, state, nqb: int, nkb: int) -> TileList:
        """Build from unsorted COO triples (no duplicates)."""
        rows = rows.to(torch.int64)
        cols = cols.to(torch.int64)
        state = state.to(torch.int8)
        order = torch.argsort(rows * max(nkb, 1) + cols)
        r, c, s = rows[order], cols[order], state[order]
        row_ptr = torch.zeros(nqb + 1, dtype=torch.int64)
        row_ptr[1:] = torch.cumsum(torch.bincount(r, minlength=nqb), 0)
        order_t = torch.argsort(c * max(nqb, 1) + r)
        col_ptr = torch.zeros(nkb + 1, dtype=torch.int64)
        col_ptr[1:] = torch.cumsum(torch.bincount(c, minlength=nkb), 0)
        return TileList(row_ptr, c, s, col_ptr, r[order_t], s[order_t])

    @staticmethod
    def from_sorted(m: np.ndarray, n: np.ndarray, state: np.ndarray, nqb: int, nkb: int) -> TileList:
        """Build from tiles ``(m, n)`` sorted row-major (numpy arrays; one stable sort for the CSC side)."""
        # torch only wraps the results: its per-op overhead dominates at these sizes.
        row_ptr = np.zeros(nqb + 1, dtype=np.int64)
        np.cumsum(np.bincount(m, minlength=nqb), out=row_ptr[1:])
        # a stable sort of 16-bit keys is a radix sort in numpy: much faster than on int64
        order_t = np.argsort(n.astype(np.uint16) if nkb <= 1 << 16 else n, kind="stable")
        col_ptr = np.zeros(nkb + 1, dtype=np.int64)
        np.cumsum(np.bincount(n, minlength=nkb), out=col_ptr[1:])
        st = state.astype(np.int8, copy=False)
        return TileList(
            torch.from_numpy(row_ptr),
            torch.from_numpy(n.astype(np.int64, copy=False)),
            torch.from_numpy(st),
            torch.from_numpy(col_ptr),
            torch.from_numpy(m.astype(np.int64, copy=False)[order_t]),
            torch.from_numpy(st[order_t]),
        )

    def to_dense(self, nqb: int, nkb: int) -> torch.Tensor:
        out = torch.zeros(nqb, nkb, dtype=torch.int8)
        rows = torch.from_numpy(_rows_of(self.row_ptr, nqb))
        out[rows, self.cols] = self.state
        return out


@dataclass(frozen=True)
class Runs:
    """Compact runs: query tile ``row[i]`` visits key tiles ``lo[i] <= n < hi[i]``, all in ``state[i]``.

    Sorted by ``(row, lo)``; adjacent runs of the same state are merged.
    """

    row: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    state: torch.Tensor

    @staticmethod
    def from_tiles(tl: TileList, nqb: int) -> Runs:
        rows = _rows_of(tl.row_ptr, nqb)
        cols = tl.cols.numpy()
        state = tl.state.numpy()
        if rows.size == 0:
            z = torch.zeros(0, dtype=torch.int64)
            return Runs(z, z, z, z.to(torch.int8))
        new = np.ones(rows.size, dtype=bool)
        new[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1) | (state[1:] != state[:-1])
        starts = np.flatnonzero(new)
        ends = np.append(starts[1:], rows.size)
        return Runs(
            torch.from_numpy(rows[starts]),
            torch.from_numpy(cols[starts].copy()),
            torch.from_numpy(cols[ends - 1] + 1),
            torch.from_numpy(state[starts].copy()),
        )

    @staticmethod
    def merged(row: np.ndarray, lo: np.ndarray, hi: np.ndarray, state: np.ndarray) -> Runs:
        """Runs from disjoint runs in any order: sorted by ``(row, lo)``, touching runs of one state merged."""
        order = np.lexsort((lo, row))
        row, lo, hi, state = row[order], lo[order], hi[order], state[order]
        new = np.ones(row.size, dtype=bool)
        new[1:] = (row[1:] != row[:-1]) | (lo[1:] != hi[:-1]) | (state[1:] != state[:-1])
        starts = np.flatnonzero(new)
        ends = np.append(starts[1:], row.size)[: len(starts)] - 1
        return Runs(
            torch.from_numpy(row[starts].astype(np.int64)),
            torch.from_numpy(lo[starts].astype(np.int64)),
            torch.from_numpy(hi[ends].astype(np.int64)),
            torch.from_numpy(state[starts].astype(np.int8)),
        )

    @property
    def tiles(self) -> int:
        """Tiles the runs cover."""
        return int((self.hi - self.lo).sum())

    def __len__(self) -> int:
        return int(self.row.numel())


class RunTiles(TileList):
    """A :class:`TileList` kept as :class:`Runs` and listed tile by tile on the first read of its arrays.

    Plans whose tiles are mostly long runs (``causal`` at a million tokens: 33 million tiles in
    8,192 runs) hold the runs only; an executor that reads the lists pays for them then.
    """

    def __init__(self, runs: Runs, nqb: int, nkb: int):
        object.__setattr__(self, "_source", (runs, nqb, nkb))

    @functools.cached_property
    def _listed(self) -> TileList:
        runs, nqb, nkb = self._source
        lo, hi = runs.lo.numpy(), runs.hi.numpy()
        counts = hi - lo
        total = int(counts.sum())
        m = np.repeat(runs.row.numpy(), counts)
        n = np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(total, dtype=np.int64)
        return TileList.from_sorted(m, n, np.repeat(runs.state.numpy(), counts), nqb, nkb)

    row_ptr = property(lambda self: self._listed.row_ptr)
    cols = property(lambda self: self._listed.cols)
    state = property(lambda self: self._listed.state)
    col_ptr = property(lambda self: self._listed.col_ptr)
    rows = property(lambda self: self._listed.rows)
    state_t = property(lambda self: self._listed.state_t)

    @property
    def nnz(self) -> int:
        return self._source[0].tiles

    def to_dense(self, nqb: int, nkb: int) -> torch.Tensor:
        runs = self._source[0]
        out = torch.zeros(nqb, nkb, dtype=torch.int8)
        for r, a, b, st in zip(*(t.tolist() for t in (runs.row, runs.lo, runs.hi, runs.state)), strict=True):
            out[r, a:b] = st
        return out

    def __repr__(self) -> str:
        runs, nqb, nkb = self._source
        return f"RunTiles({len(runs)} runs, {self.nnz} tiles of {nqb}x{nkb})"


class TileFlags:
    """A bool per tile of a head group's lists (in the order of ``tiles.cols``), held as runs of True tiles.

    A route pattern at a million tokens has tens of millions of tiles whose mask reads the choice,
    in a few runs per query tile: the flags stay runs (``row``, ``lo``, ``hi``: query tile ``row[i]``,
    key tiles ``lo[i] <= n < hi[i]``, sorted and disjoint) until :meth:`tensor` lists them.
    """

    def __init__(self, row: np.ndarray, lo: np.ndarray, hi: np.ndarray, tiles: TileList, nqb: int, nkb: int):
        self.row, self.lo, self.hi = (np.asarray(a, np.int64) for a in (row, lo, hi))
        self._tiles, self._nqb, self._nkb = tiles, nqb, nkb

    @staticmethod
    def from_flags(flags: np.ndarray, tiles: TileList, nqb: int, nkb: int) -> TileFlags:
        """From a bool per tile of ``tiles`` (row-major order)."""
        rows = _rows_of(tiles.row_ptr, nqb)[flags]
        cols = tiles.cols.numpy()[flags]
        new = np.ones(len(rows), bool)
        new[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1)
        first = np.flatnonzero(new)
        last = (np.append(first[1:], len(rows)) - 1)[: len(first)]
        return TileFlags(rows[first], cols[first], cols[last] + 1, tiles, nqb, nkb)

    @property
    def runs(self) -> int:
        return len(self.row)

    def at(self, m: np.ndarray, n: np.ndarray) -> np.ndarray:
        """The flags of tiles ``(m, n)`` (numpy), without listing the others."""
        width = self._nkb + 1
        starts = self.row * width + self.lo
        key = np.asarray(m, np.int64) * width + np.asarray(n, np.int64)
        i = np.searchsorted(starts, key, "right") - 1
        ok = i >= 0
        i = np.maximum(i, 0)
        return ok & (key < self.row[i] * width + self.hi[i]) if len(starts) else np.zeros(key.shape, bool)

    def tensor(self) -> torch.Tensor:
        """bool ``[nnz]`` in the order of ``tiles.cols`` (lists every tile)."""
        rows = _rows_of(self._tiles.row_ptr, self._nqb)
        return torch.from_numpy(self.at(rows, self._tiles.cols.numpy()))

    def tolist(self) -> list[bool]:
        return self.tensor().tolist()

    def __len__(self) -> int:
        return self._tiles.nnz

    def __repr__(self) -> str:
        return f"TileFlags({self.runs} runs)"


@dataclass(frozen=True)
class RunForm:
    """Closed form of a head group's tiles, for kernels that compute loop bounds instead of loading lists.

    Query tile ``m`` visits key tiles ``lo(m) <= n < hi(m)``; of those,
    ``full_lo(m) <= n < full_hi(m)`` are full and the rest partial (an empty
    full range is allowed: ``full_lo >= full_hi``). Expressions are sympy
    expressions in the integer symbol ``m`` built from ``+ - *``, ``floor``,
    ``Min`` and ``Max`` only, and are exact for every ``0 <= m < nqb`` (the
    analysis verifies them against the lists before attaching them).
    """

    m: Any
    lo: Any
    hi: Any
    full_lo: Any
    full_hi: Any


@dataclass(frozen=True)
class HeadGroup:
    """Heads that share one pattern node, and so one tile structure.

    Attributes:
        heads: the query-head indices in this group.
        node: the bound pattern of these heads (``where`` may still read ``h``:
            then the group has one head).
        tiles: CSR/CSC tile lists.
        runs: the same tiles as compact runs.
        forms: a :class:`RunForm` when the tiles have a closed form, else None. Derived on
            first use from ``form_source`` (the derivation imports sympy, which costs a CPU
            user's first call 0.4 s and is needed only by kernels and inspection).
        form_source: computes ``forms``; None when the group has no closed form.
        route_mask: for patterns with ``route``, a :class:`TileFlags` (runs; ``tensor()`` gives bool
            ``[nnz]`` in the order of ``tiles.cols``):
            some route may allow an element of this tile (state 1 or 3), so its element mask
            must be computed with the run-time selection, even where the tile's *state* is the
            same for every choice. False on full tiles (no mask work) and on partial tiles where
            every route is false on the whole tile (the mask is the pattern with each route
            replaced by ``empty``). None for static patterns.
    """

    heads: tuple[int, ...]
    node: ir.Node
    tiles: TileList
    runs: Runs
    form_source: Callable[[], RunForm | None] | None = field(default=None, repr=False, compare=False)
    route_mask: TileFlags | None = None

    @functools.cached_property
    def forms(self) -> RunForm | None:
        return None if self.form_source is None else self.form_source()


@dataclass
class PlanStats:
    """Numbers reported by ``BlockPlan.stats`` and ``patterndsl show --stage plan``."""

    # sum over heads; for route patterns, pairs of the tiles whose mask no choice can change
    # (the others' area is extra["dynamic_pairs_bound"])
    allowed_pairs: int = 0
    total_pairs: int = 0  # heads * Lq * Lk
    tiles_empty: int = 0  # sum over heads
    tiles_partial: int = 0
    tiles_full: int = 0
    tiles_dynamic: int = 0
    visited_pairs: int = 0  # pairs inside visited (non-empty) tiles, clipped to the lengths
    tiles_evaluated: int = 0  # tiles whose state needed element-wise evaluation
    elements_evaluated: int = 0  # (query, key) pairs evaluated element-wise, for tile states and counts
    plan_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    #: Computes the plan's parts (``BlockPlan.parts``) on first use, shared with the plan; None: no parts.
    parts_source: Callable[[], tuple] | None = field(default=None, repr=False, compare=False)

    @property
    def part_stats(self) -> tuple[PlanStats, ...]:
        """When the plan runs as parts, each part's own statistics (the ``executed_*`` totals are over them)."""
        return () if self.parts_source is None else tuple(p.stats for p in self.parts_source())

    @property
    def executed_pairs(self) -> int:
        """Pairs in the tiles the executors visit: summed over the parts when the plan has parts."""
        stats = self.part_stats
        return sum(p.visited_pairs for p in stats) if stats else self.visited_pairs

    @property
    def executed_tiles(self) -> int:
        """Tiles the executors visit (summed over heads, and over the parts when the plan has parts)."""
        stats = self.part_stats or (self,)
        return sum(p.tiles_full + p.tiles_partial + p.tiles_dynamic for p in stats)

    @property
    def executed_efficiency(self) -> float:
        """Allowed pairs over :attr:`executed_pairs`: the block efficiency of what runs."""
        return self.allowed_pairs / self.executed_pairs if self.executed_pairs else 1.0

    @property
    def density(self) -> float:
        return self.allowed_pairs / self.total_pairs if self.total_pairs else 0.0

    @property
    def block_efficiency(self) -> float:
        return self.allowed_pairs / self.visited_pairs if self.visited_pairs else 1.0

    def flops(self, head_dim: int, batch: int = 1) -> dict[str, float]:
        """Estimated forward FLOPs: useful (allowed pairs) and executed (visited pairs)."""
        per_pair = 4 * head_dim * batch
        return {"useful": per_pair * self.allowed_pairs, "executed": per_pair * self.executed_pairs}


@dataclass
class BlockPlan:
    """The block structure of a pattern at given lengths, heads and tile size.

    Attributes:
        pattern: the bound pattern (:class:`patterndsl.ir.PatternIR`).
        q_len, kv_len, heads: the sizes planned for.
        block_m, block_n: tile sizes ``BM``, ``BN``.
        q_perm, kv_perm: int64 permutations, new position -> original index, or None for the
            identity (not materialised; :attr:`q_order` / :attr:`kv_order` build it when read).
        order: ``"identity"`` or a short description of the reordering chosen.
        groups: head groups; ``head_group[h]`` is the index of head ``h``'s group.
        stats: :class:`PlanStats`.
        parts_source: computes :attr:`parts` on first use (the split is searched then, so a plan
            only inspected never pays for it); the parts, when not empty, are what the executors
            run instead of ``groups``: disjoint parts whose union is the pattern, each a plan of
            its own (its ``pattern`` gives every head that head's part, ``empty`` where it has
            none) with its own ``q_order``, ``kv_order`` and tile shape; the passes merge by
            log-sum-exp (``analysis.parts``). ``groups``, ``tiles()`` and the orders above stay
            those of the whole pattern in one order.
        candidate: for a part, the token order it was planned in (a ``reorder.candidates``
            entry), so that a re-plan with other tiles keeps it; None otherwise.
    """

    pattern: Any
    q_len: int
    kv_len: int
    heads: int
    block_m: int
    block_n: int
    q_perm: torch.Tensor | None
    kv_perm: torch.Tensor | None
    order: str
    groups: tuple[HeadGroup, ...]
    head_group: tuple[int, ...]
    stats: PlanStats
    parts_source: Callable[[], tuple] | None = field(default=None, repr=False, compare=False)
    candidate: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def block(self) -> tuple[int, int]:
        return (self.block_m, self.block_n)

    @property
    def parts(self) -> tuple[BlockPlan, ...]:
        """The disjoint parts the executors run instead of ``groups`` (see the class), or ``()``."""
        return () if self.parts_source is None else self.parts_source()

    @property
    def sizes(self) -> Sizes:
        """The sizes planned for, with the pattern's layout and query heads."""
        return Sizes(self.q_len, self.kv_len, getattr(self.pattern, "layout", None), self.heads)

    @property
    def n_q_tiles(self) -> int:
        return -(-self.q_len // self.block_m)

    @property
    def n_kv_tiles(self) -> int:
        return -(-self.kv_len // self.block_n)

    @property
    def is_identity_order(self) -> bool:
        return self.order == "identity"

    @property
    def q_order(self) -> torch.Tensor:
        """int64 ``[Lq]``: new query position -> original index (built on each read for the identity)."""
        return torch.arange(self.q_len, dtype=torch.int64) if self.q_perm is None else self.q_perm

    @property
    def kv_order(self) -> torch.Tensor:
        """int64 ``[Lk]``: new key position -> original index (built on each read for the identity)."""
        return torch.arange(self.kv_len, dtype=torch.int64) if self.kv_perm is None else self.kv_perm

    def group_of(self, h: int) -> HeadGroup:
        return self.groups[self.head_group[h]]

    def tiles(self) -> torch.Tensor:
        """int8 ``[heads, nqb, nkb]``: 0 empty, 1 partial, 2 full, 3 decided at run time."""
        per_group = [g.tiles.to_dense(self.n_q_tiles, self.n_kv_tiles) for g in self.groups]
        return torch.stack([per_group[self.head_group[h]] for h in range(self.heads)])

    def transposed(self, h: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For head ``h``: ``(col_ptr, rows, state)``, each key tile's query tiles (for backward)."""
        tl = self.group_of(h).tiles
        return tl.col_ptr, tl.rows, tl.state_t


def tile_reduce(mask: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Reduce a dense bool mask ``[..., Lq, Lk]`` to tile states ``[..., nqb, nkb]`` (reference).

    A tile is full when every in-range pair is allowed; the padding past the
    lengths does not count.
    """
    *lead, lq, lk = mask.shape
    nqb, nkb = -(-lq // block_m), -(-lk // block_n)
    padded = torch.zeros(*lead, nqb * block_m, nkb * block_n, dtype=torch.int32)
    valid = torch.zeros_like(padded)
    padded[..., :lq, :lk] = mask.to(torch.int32)
    valid[..., :lq, :lk] = 1
    shape = (*lead, nqb, block_m, nkb, block_n)
    allowed = padded.reshape(shape).sum(dim=(-3, -1))
    inrange = valid.reshape(shape).sum(dim=(-3, -1))
    out = torch.zeros_like(allowed, dtype=torch.int8)
    out[allowed > 0] = PARTIAL
    out[(allowed == inrange) & (allowed > 0)] = FULL
    return out


def plan_from_mask(
    mask: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    q_order: torch.Tensor | None = None,
    kv_order: torch.Tensor | None = None,
    pattern: Any = None,
    nodes: list[ir.Node] | None = None,
) -> BlockPlan:
    """Reference plan built from a dense mask ``[heads, Lq, Lk]`` (tests and small sizes only).

    Args:
        mask: the dense meaning in original order.
        block: ``(BM, BN)``.
        q_order, kv_order: permutations (new -> original); identity when None.
        pattern: the bound pattern to record, if any.
        nodes: per-head pattern nodes (heads with equal nodes and equal masks share a group).

    Returns:
        A :class:`BlockPlan` whose ``tiles()`` is the tile reduction of the permuted mask.
    """
    heads, lq, lk = mask.shape
    bm, bn = block
    qo = torch.arange(lq) if q_order is None else q_order.to(torch.int64)
    ko = torch.arange(lk) if kv_order is None else kv_order.to(torch.int64)
    q_perm = None if q_order is None else qo
    kv_perm = None if kv_order is None else ko
    permuted = mask[:, qo][:, :, ko]
    dense = tile_reduce(permuted, bm, bn)
    groups: list[HeadGroup] = []
    head_group: list[int] = []
    seen: dict[tuple, int] = {}
    for h in range(heads):
        node = nodes[h] if nodes is not None else ir.FULL
        key = (node, permuted[h].numpy().tobytes())
        if key not in seen:
            tl = TileList.from_dense(dense[h])
            seen[key] = len(groups)
            groups.append(HeadGroup((h,), node, tl, Runs.from_tiles(tl, dense.shape[1])))
        else:
            g = groups[seen[key]]
            groups[seen[key]] = HeadGroup((*g.heads, h), g.node, g.tiles, g.runs, g.form_source)
        head_group.append(seen[key])
    nqb, nkb = dense.shape[1:]
    stats = PlanStats(
        allowed_pairs=int(mask.sum()),
        total_pairs=heads * lq * lk,
        tiles_empty=int((dense == EMPTY).sum()),
        tiles_partial=int((dense == PARTIAL).sum()),
        tiles_full=int((dense == FULL).sum()),
    )
    rows_len = torch.clamp(lq - torch.arange(nqb) * bm, max=bm)
    cols_len = torch.clamp(lk - torch.arange(nkb) * bn, max=bn)
    area = rows_len[:, None] * cols_len[None, :]
    stats.visited_pairs = int((area[None] * (dense > 0)).sum())
    order = "identity" if q_order is None and kv_order is None else "custom"
    return BlockPlan(pattern, lq, lk, heads, bm, bn, q_perm, kv_perm, order, tuple(groups), tuple(head_group), stats)
