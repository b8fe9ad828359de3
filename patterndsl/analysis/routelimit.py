"""Stage 4 (block plan), route patterns planned pair by pair: refuse up front what would not fit in memory.

Comes in: the engine of one head group and its rewritten route pattern, on its way to
:func:`patterndsl.analysis.routeplan.classify_by_pairs` (grids whose (group x block) tables are
too large for :mod:`~patterndsl.analysis.routetiles`, several routes, mixed polarities).
Goes out: nothing, or a :class:`~patterndsl.errors.PatternError` at the route naming the limit
and the length that fits.

That plan lists one entry per (candidate pair, tile it meets) and holds a few int64 arrays of
that length (owner, tile key, open flag, positions: about 40 bytes an entry). BiFormer on a
1024 x 1024 grid (8 x 8 regions, 128-token tiles) has 16,384 groups and blocks, each meeting 8
tiles: 1.7e10 entries, hundreds of GB; it grew to 12 GB before it was killed (2-D grids like it
and 3-D video boxes are planned as runs by :mod:`~patterndsl.analysis.routegrid` when rows hold whole
tiles; the others still come here). The count is
known before anything is listed: a group meets ``tq`` query tiles and a block ``tk`` key tiles
(from the group and block of every index, O(L)), so a candidate pair ``(a, b)`` meets
``tq[a] * tk[b]`` tiles; with every pair a candidate (``among = full``, the default) the sum is
``sum(tq) * sum(tk)``; otherwise the candidates are found first (the coarse plan of ``among``, its
cost follows the candidate pairs) and summed.
"""

from __future__ import annotations

import math

import numpy as np

from patterndsl import ir, semantics
from patterndsl.analysis import engine as eng
from patterndsl.analysis import routetiles, tiles
from patterndsl.errors import PatternError

#: Most (candidate pair, tile) entries the pair-by-pair route plan may list (about 40 bytes each: 1.3 GB).
MAX_INCIDENCES = 1 << 25


def _tiles_per_group(group: np.ndarray, side: tiles.Side, n_tiles: int, count: int) -> np.ndarray:
    """How many tiles of ``side`` each of ``count`` groups (``group`` per index) meets."""
    tile = np.empty(len(group), np.int64)
    tile[slice(None) if side.order is None else side.order] = np.repeat(
        np.arange(n_tiles, dtype=np.int64), np.diff(side.starts)
    )
    pairs = np.unique(group * n_tiles + tile)
    return np.bincount(pairs // n_tiles, minlength=count).astype(np.int64)


def incidences(engine: eng.Engine, prim: ir.Prim) -> int:
    """The (candidate pair, tile) entries the pair-by-pair plan of ``prim`` lists (see the module notes):
    exact beyond :data:`MAX_INCIDENCES`, within it perhaps a bound (every pair taken as a candidate)."""
    n_q, n_k, qgroup, kblock = semantics.route_blocks(prim, engine.ctx)
    tq = _tiles_per_group(qgroup.numpy(), engine.q, engine.nqb, n_q)
    tk = _tiles_per_group(kblock.numpy(), engine.k, engine.nkb, n_k)
    bound = int(tq.sum()) * int(tk.sum())
    among = eng.rewrite_for_plan(prim.arg("among"))
    if bound <= MAX_INCIDENCES or (isinstance(among, ir.Prim) and among.name == "full"):
        return bound
    keys = engine.route_candidates(prim)[0]
    return int((tq[keys // n_k] * tk[keys % n_k]).sum())


def check(engine: eng.Engine, node: ir.Node) -> None:
    """Raise a PatternError at the first route whose pair-by-pair plan would list more than
    :data:`MAX_INCIDENCES` entries, with the sequence length that would fit (entries grow with
    the square of the length when groups and blocks keep their size)."""
    pol = ir.polarities(node)
    for prim in pol:
        count = incidences(engine, prim)
        if count <= MAX_INCIDENCES:
            continue
        length = engine.ctx.kv_len
        scale = MAX_INCIDENCES / count
        if len(pol) == 1 and len(pol[prim]) == 1 and not ir.uses_head(prim.arg("among")):
            scale = max(scale, _table_scale(engine, prim))
        fits = int(length * math.sqrt(scale))
        raise PatternError(
            f"route at {length:,} tokens: its plan would list {count:,} (candidate pair, tile) entries, "
            f"more than the limit of {MAX_INCIDENCES:,} (about {MAX_INCIDENCES * 40 >> 20:,} MB); "
            f"about {fits:,} tokens fit with groups, blocks and tiles of these sizes; or use larger route "
            f"blocks (fewer groups and blocks), larger tiles, or a narrower among = ...",
            prim.span,
        )


def _table_scale(engine: eng.Engine, prim: ir.Prim) -> float:
    """How much the (length squared) may shrink for :mod:`routetiles`' tables to hold one route of one polarity."""
    n_q, n_k = semantics.route_blocks(prim, engine.ctx)[:2]
    entries = routetiles._DenseGeometry.MAX_ENTRIES / max(n_q * n_k, n_q * engine.nkb)
    return min(entries, routetiles.MAX_DENSE_TILES / (engine.nqb * engine.nkb))
