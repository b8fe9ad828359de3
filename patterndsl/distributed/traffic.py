"""Context parallelism, planning: which key tiles every rank reads, owns and receives.

Comes in: a pattern's block plan (static, or exact for a call's run-time inputs) at identity
order and a :class:`~patterndsl.distributed.layout.Layout`. Goes out: per query tile the key
tiles it visits (compact runs, the union over heads, head groups and batch elements), per rank
the union of its query tiles' runs (the key tiles it reads), and the pieces of that union that
other ranks own (what it receives in the forward, and what it returns as dK/dV in the
backward). Everything works on runs (``row, lo, hi``) and on the layout's chunks of consecutive
tiles, never on an ``L x L`` mask or a per-rank scan of every tile, so that :func:`cost` stays
cheap at 1,024 ranks; the attention uses the same functions, so the bytes it moves are the
bytes :func:`cost` predicts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from patterndsl import ir
from patterndsl.analysis.hierarchy import merge_runs
from patterndsl.distributed import closed
from patterndsl.errors import PatternError, PatternValueError

#: Primitives whose tiles depend on the attention's data: not distributed yet (LANGUAGE.md section 11).
UNSUPPORTED = ("route", "cluster", "lsh")


def refuse_dynamic(pattern) -> None:
    """A PatternError naming the data-dependent primitives of ``pattern`` (route, cluster, lsh)."""
    pir = pattern.ir
    nodes = [r.node for r in pir.heads] + ([pir.default] if pir.default is not None else [])
    found = sorted({sub.name for n in nodes for sub in ir.walk(n) if isinstance(sub, ir.Prim)} & set(UNSUPPORTED))
    if found:
        prim = next(sub for n in nodes for sub in ir.walk(n) if isinstance(sub, ir.Prim) and sub.name in found)
        raise PatternError(
            f"pattern '{pir.name}' uses {', '.join(found)}: context parallelism does not distribute "
            "data-dependent primitives yet (route, cluster, lsh)",
            getattr(prim, "span", None),
            pattern.source,
        )


@dataclass(frozen=True)
class Visits:
    """Key tiles every query tile visits (any head, group or batch element): merged runs.

    Attributes:
        row, lo, hi: int64 numpy arrays: query tile ``row[i]`` visits key tiles ``lo[i] <= n < hi[i]``;
            sorted by ``(row, lo)``, disjoint and not adjacent within a row.
        n_tiles: number of query (= key) tiles.
    """

    row: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n_tiles: int

    def work(self) -> np.ndarray:
        """int64 ``[n_tiles]``: how many key tiles each query tile visits."""
        return np.bincount(self.row, weights=self.hi - self.lo, minlength=self.n_tiles).astype(np.int64)

    def of_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The runs of query tiles ``rows`` (sorted): ``(row, lo, hi)``."""
        starts = np.searchsorted(self.row, rows, "left")
        ends = np.searchsorted(self.row, rows, "right")
        idx = _ranges(starts, ends)
        return self.row[idx], self.lo[idx], self.hi[idx]


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[i], ends[i])`` without a Python loop."""
    counts = ends - starts
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    return np.arange(total, dtype=np.int64) + offsets


def visits(plan) -> Visits:
    """The merged runs of a :class:`BlockPlan` (union over head groups) or an ``InputPlan`` (and batch)."""
    static = getattr(plan, "static", None)
    if static is not None:
        any_tile = (plan.states > 0).any(dim=1).any(dim=0)
        rows, cols = torch.nonzero(any_tile, as_tuple=True)
        row, col = rows.numpy().astype(np.int64), cols.numpy().astype(np.int64)
        return Visits(*merge_runs(row, col, col + 1), static.n_q_tiles)
    row = np.concatenate([g.runs.row.numpy() for g in plan.groups]).astype(np.int64)
    lo = np.concatenate([g.runs.lo.numpy() for g in plan.groups]).astype(np.int64)
    hi = np.concatenate([g.runs.hi.numpy() for g in plan.groups]).astype(np.int64)
    return Visits(*merge_runs(row, lo, hi), plan.n_q_tiles)


@dataclass(frozen=True)
class Needs:
    """What one rank reads and receives.

    Attributes:
        tiles: query x key tiles its query tiles visit.
        lo, hi: the key tiles it reads, as merged runs.
        pieces: ``(owner, lo, hi)`` int64 arrays: the parts of those runs each rank owns, sorted
            by key tile (the owner is this rank for what it has itself).
    """

    tiles: int
    lo: np.ndarray
    hi: np.ndarray
    pieces: tuple[np.ndarray, np.ndarray, np.ndarray]


def needs(vis: Visits, layout, rank: int) -> Needs:
    """Rank ``rank``'s key tiles (read, owned, received), from the runs of its query tiles."""
    rows = layout.tiles(rank)
    _row, lo, hi = vis.of_rows(rows)
    tiles = int((hi - lo).sum())
    _, lo, hi = merge_runs(np.zeros_like(lo), lo, hi)
    cstart, cend, cown = layout.chunks()
    first = np.searchsorted(cend, lo, "right")
    last = np.searchsorted(cstart, hi, "left")
    idx = _ranges(first, last)
    which = np.repeat(np.arange(lo.size), last - first)
    plo = np.maximum(cstart[idx], lo[which])
    phi = np.minimum(cend[idx], hi[which])
    return Needs(tiles, lo, hi, (cown[idx], plo, phi))


def tokens(lo: np.ndarray, hi: np.ndarray, block: int, seq_len: int) -> np.ndarray:
    """Tokens in key tiles ``lo <= n < hi`` (the last tile may be short)."""
    return np.minimum(hi * block, seq_len) - np.minimum(lo * block, seq_len)


@dataclass(frozen=True)
class RankCost:
    """One rank's share of a context-parallel attention (see :func:`cost`).

    Attributes:
        rank: the rank.
        tokens: query tokens it holds.
        tiles: query x key tiles its queries visit (union over heads).
        key_tiles: distinct key tiles it reads; ``received_tiles`` of them from other ranks.
        bytes_received: forward: the keys and values of the tiles it reads and does not own.
        bytes_received_backward: backward: the dK and dV other ranks computed for its keys.
    """

    rank: int
    tokens: int
    tiles: int
    key_tiles: int
    received_tiles: int
    bytes_received: int
    bytes_received_backward: int


def rank_costs(vis: Visits, layout, token_bytes: int) -> list[RankCost]:
    """Every rank's :class:`RankCost` (``token_bytes``: bytes of one token's key and value, all batch and heads)."""
    world, block, seq_len = layout.world_size, layout.block, layout.seq_len
    fwd = np.zeros(world, dtype=np.int64)
    bwd = np.zeros(world, dtype=np.int64)
    out = []
    for r in range(world):
        need = needs(vis, layout, r)
        owner, plo, phi = need.pieces
        remote = owner != r
        counts = tokens(plo[remote], phi[remote], block, seq_len)
        fwd[r] = int(counts.sum())
        np.add.at(bwd, owner[remote], counts)
        out.append((r, need, int((phi[remote] - plo[remote]).sum())))
    return [
        RankCost(
            r,
            int(layout.indices_count(r)),
            need.tiles,
            int((need.hi - need.lo).sum()),
            received,
            int(fwd[r]) * token_bytes,
            int(bwd[r]) * token_bytes,
        )
        for r, need, received in out
    ]


def check_block(block) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise PatternValueError(f"block must be a positive integer (the tile size), got {block!r:.60}")
    return block


# --------------------------------------------------------------------------- runs at scale

#: Largest fine-tile domain classified in one engine call (bounds the memory of one step).
DOMAIN_CHUNK = 1 << 22
#: Up to about this many fine tiles (bounded from the coarse tiles) the plan lists them directly.
DIRECT_TILES = 1 << 23


def coarse_factor(n_tiles: int) -> int:
    """Fine tiles per side of a coarse tile: about ``(n/2)^(1/3)``, a power of two (1: plan directly).

    It balances the coarse tiles of a dense pattern (``(n/c)^2 / 2``) against the fine tiles of
    the partial coarse tiles on its edge (about ``n * c``).
    """
    if n_tiles <= 2048:
        return 1
    return 1 << max(0, round(np.log2((n_tiles / 2) ** (1 / 3))))


def static_visits(pattern, seq_len: int, heads: int, block: int, factor: int | None = None) -> Visits:
    """:func:`visits` of a static pattern without listing every visited tile: two levels of tiles.

    The pattern is classified first in coarse tiles of ``factor * block`` tokens (identity order).
    A full coarse tile makes every fine tile inside visited, an empty one none; only the fine
    tiles inside partial coarse tiles are classified, by the same engine restricted to them.
    Causal at 16M tokens (8.6G fine tiles, which no tile list holds) costs about ``n * factor``
    fine tiles. Exact: equal to the runs of ``Pattern.plan(..., order="identity")``. Patterns with
    a closed form (:mod:`patterndsl.distributed.closed`) skip all this unless ``factor`` is given.
    """
    from patterndsl import check
    from patterndsl.analysis import engine as eng
    from patterndsl.analysis import planner, tiles
    from patterndsl.analysis.classify import Env
    from patterndsl.analysis.rewrite import simplify
    from patterndsl.sizes import Sizes

    pir = pattern.ir
    refuse_dynamic(pattern)
    check.check_lengths(pir, seq_len, seq_len, heads)
    if factor is None:
        exact = closed.closed_visits(pattern, seq_len, heads, block)
        if exact is not None:
            return exact
    n = -(-seq_len // block)
    c = coarse_factor(n) if factor is None else factor
    if c <= 1:
        return visits(pattern.plan(seq_len, seq_len, heads, block=(block, block), order="identity"))
    extents = pir.layout.shape if pir.layout is not None else (seq_len,)
    segs = tiles.identity_segments(seq_len, 0, extents)
    sizes = Sizes(seq_len, seq_len, pir.layout, heads)
    coarse_side = tiles.build_side(segs, seq_len, c * block, 0, extents, True)
    fine_side = tiles.build_side(segs, seq_len, block, 0, extents, True)
    nc = coarse_side.n_tiles
    groups, _ = planner._head_groups(pir, heads)
    coarse = [eng.Engine(coarse_side, coarse_side, Env(sizes, hs[0])).run(simplify(node)) for node, hs in groups]
    if factor is None and sum(keys.size for keys, _ in coarse) * c * c <= DIRECT_TILES:
        # Few enough fine tiles for the plan's own candidates (faster than classifying a domain).
        return visits(pattern.plan(seq_len, seq_len, heads, block=(block, block), order="identity"))
    rows, los, his = [], [], []
    for (node, hs), (keys, state) in zip(groups, coarse, strict=True):
        node = simplify(node)
        cm, cn = keys // nc, keys % nc
        full = state == eng.FULL
        # Every fine row of a full coarse tile visits all its fine columns: runs of full coarse
        # tiles first (one per coarse row for causal), then one fine run per fine row of each.
        fm, flo, fhi = merge_runs(cm[full], cn[full], cn[full] + 1)
        sub = np.arange(c)
        r = (fm[:, None] * c + sub[None, :]).reshape(-1)
        ok = r < n
        rows.append(r[ok])
        los.append(np.repeat(flo * c, c)[ok])
        his.append(np.minimum(np.repeat(fhi * c, c), n)[ok])
        # Partial coarse tiles: classify their fine tiles.
        pm, pn = cm[~full], cn[~full]
        fine = eng.Engine(fine_side, fine_side, Env(sizes, hs[0]))
        per = max(1, DOMAIN_CHUNK // (c * c))
        for a in range(0, pm.size, per):
            m = (pm[a : a + per, None, None] * c + sub[None, :, None]).repeat(c, axis=2)
            k = (pn[a : a + per, None, None] * c + sub[None, None, :]).repeat(c, axis=1)
            ok = (m < n) & (k < n)
            domain = np.sort(m[ok] * n + k[ok])  # distinct: the coarse tiles are
            found, _ = fine.run(node, domain)
            rows.append(found // n)
            los.append(found % n)
            his.append(found % n + 1)
    row, lo, hi = (np.concatenate(x).astype(np.int64) for x in (rows, los, his))
    return Visits(*merge_runs(row, lo, hi), n)


def plan_visits(pattern, seq_len: int, heads: int, block: int, inputs: dict) -> Visits:
    """The runs every layout, cost and exchange of ``pattern`` is computed from (identity order)."""
    refuse_dynamic(pattern)
    if inputs or pattern.ir.inputs:
        return visits(pattern.plan(seq_len, seq_len, heads, block=(block, block), order="identity", **inputs))
    return static_visits(pattern, seq_len, heads, block)
