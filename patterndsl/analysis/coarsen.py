"""Stage 4 (block plan), coarse tiles of a reordered 1-D side: the coarse levels outside the identity order.

Comes in: a 1-D :class:`~patterndsl.analysis.tiles.Side` in any token order (residue classes) and a
factor ``f``. Goes out: the side of tiles ``f`` times longer on the same order, coarse tile ``c``
holding exactly fine tiles ``c*f .. c*f + f - 1`` (tiles are consecutive runs of the order, so
they nest), its pieces the fine pieces joined where one progression continues the previous one.

The coarse-to-fine classification (:mod:`patterndsl.analysis.hierarchy`) needs nothing more than
such nested sides: a rule that finds a coarse tile full or empty finds it so in every fine tile
under it. In residue classes (``causal & strided(64)`` grouped mod 64) a class pair is one causal
triangle of full tiles, so the plan keeps it as runs instead of listing (and first searching)
every tile: at a million tokens that was 69 million candidate tiles and 11 s.
"""

from __future__ import annotations

import numpy as np

from patterndsl.analysis.tiles import Side


def coarse_side(fine: Side, factor: int) -> Side:
    """The side of ``factor`` consecutive tiles of ``fine`` each (1-D positions, any order).

    Args:
        fine: a 1-D side.
        factor: fine tiles per coarse tile.

    Returns:
        A :class:`Side` sharing ``fine``'s order (not copied), never marked identity.
    """
    tile = fine.tile // factor
    a, s, n = fine.a[:, 0], fine.s[:, 0], fine.n[:, 0]
    # a piece continues the one before it: same coarse tile, same step, starting where it ends (the
    # pieces of one segment cut at fine tile ends)
    joins = np.zeros(len(tile), bool)
    if len(tile) > 1:
        joins[1:] = (tile[1:] == tile[:-1]) & (s[1:] == s[:-1]) & (a[1:] == a[:-1] + s[:-1] * n[:-1])
    first = np.flatnonzero(~joins)
    count = np.add.reduceat(n, first) if len(first) else n[:0]
    nt = -(-fine.length // (fine.block * factor))
    ptr = np.zeros(nt + 1, np.int64)
    ptr[1:] = np.cumsum(np.bincount(tile[first], minlength=nt))
    starts = np.minimum(np.arange(nt + 1, dtype=np.int64) * fine.block * factor, fine.length)
    return Side(
        fine.length, fine.block * factor, fine.offset, fine.extents, fine.strides, fine.order, ptr, tile[first],
        a[first][:, None], s[first][:, None], count[:, None], False, starts,
    )  # fmt: skip
