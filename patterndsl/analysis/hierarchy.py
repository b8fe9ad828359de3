"""Stage 4 (block plan), coarse to fine: the tiles of a static 1-D pattern in identity order, level by level.

Comes in: the engine of the fine tiles (identity order, no layout) and a static pattern node.
Goes out: :class:`Layered` — runs of full tiles found whole at coarse levels, and the fine
tiles (sorted keys and states) inside the coarse tiles that are neither empty nor full.

A plan with many non-empty tiles (``causal`` at a million tokens has 33 million) is mostly the
inside of large regions: a coarse tile (``2**l x 2**l`` fine tiles) that the tile rules find
full is full in every fine tile under it (each fine tile's pairs are some of its pairs), and
one they find empty is empty in all of them. So the tiles are classified from a coarse grid
of about :data:`TOP_TILES` tiles down, halving the tile size at each level and classifying
only the four children of the coarse tiles still undecided; element-wise evaluation happens
at the fine level only. The work follows the boundary of the allowed region (about
``nqb * levels`` tiles for ``causal``), and the full regions stay runs, never listed tile by
tile (:class:`~patterndsl.analysis.plan.Runs`; the lists are built when an executor reads them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patterndsl import ir
from patterndsl.analysis import engine as eng
from patterndsl.analysis import tiles

#: Tiles of the first (coarsest) level.
TOP_TILES = 1 << 12
#: Plans of at most this many tiles are classified directly at the fine level.
FLAT_TILES = 1 << 16
#: The levels are used when at least one in this many non-empty tiles of the first level is full
#: (0: always).
PAYS = 4


@dataclass(frozen=True)
class Layered:
    """One head group's non-empty tiles: fine tiles listed, full regions as runs.

    Attributes:
        keys: sorted fine keys ``m * nkb + n`` classified at the fine level (not under a full run).
        state: their states (1 partial, 2 full).
        row, lo, hi: runs of full fine tiles: query tile ``row[i]`` and key tiles ``lo[i] <= n < hi[i]``
            (disjoint from ``keys``).
    """

    keys: np.ndarray
    state: np.ndarray
    row: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def levels(nqb: int, nkb: int) -> int:
    """Coarse levels above the fine tiles: 0 (classify directly) for small plans."""
    if nqb * nkb <= FLAT_TILES:
        return 0
    lvl = 0
    while -(-nqb >> lvl) * -(-nkb >> lvl) > TOP_TILES:
        lvl += 1
    return lvl


def usable(node: ir.Node, qside: tiles.Side, kside: tiles.Side, layout) -> bool:
    """Whether :func:`classify` applies: a static node, 1-D positions in identity order, many tiles."""
    return (
        layout is None
        and qside.identity
        and kside.identity
        and not ir.is_dynamic(node)
        and levels(qside.n_tiles, kside.n_tiles) > 0
    )


def _coarse_side(fine: tiles.Side, factor: int) -> tiles.Side:
    segs = tiles.identity_segments(fine.length, fine.offset, fine.extents)
    return tiles.build_side(segs, fine.length, fine.block * factor, fine.offset, fine.extents, True)


def classify(engine: eng.Engine, node: ir.Node) -> Layered | None:
    """The non-empty tiles of ``node`` on ``engine``'s sides, coarse levels first.

    Args:
        engine: the fine engine (its sides in identity order); coarse engines share its
            environment and tally.
        node: a static pattern node (rewritten for planning).

    Returns:
        A :class:`Layered`, or None when the first level finds too few full tiles for the levels
        to pay (random or strided columns in every coarse tile): then classify the fine tiles directly.
    """
    nqb, nkb = engine.nqb, engine.nkb
    top = levels(nqb, nkb)
    domain = None
    rows, los, his = [], [], []
    for lvl in range(top, 0, -1):
        f = 1 << lvl
        qs, ks = _coarse_side(engine.q, f), _coarse_side(engine.k, f)
        coarse = eng.Engine(qs, ks, engine.env, tally=engine.tally, coarse=True)
        keys, state = coarse.run(node, domain)
        nkc = ks.n_tiles
        cm, cn = keys // nkc, keys % nkc
        full = state == eng.FULL
        if lvl == top and PAYS and int(full.sum()) * PAYS < len(full):
            return None  # few whole regions: the levels would classify about every tile several times
        # A coarse run of full tiles covers the same key range in each of its fine rows.
        fm, flo, fhi = merge_runs(cm[full], cn[full], cn[full] + 1)
        sub = np.arange(f, dtype=np.int64)
        r = (fm[:, None] * f + sub[None, :]).reshape(-1)
        ok = r < nqb
        rows.append(r[ok])
        los.append(np.repeat(flo * f, f)[ok])
        his.append(np.minimum(np.repeat(fhi * f, f), nkb)[ok])
        # The four children of every undecided coarse tile are the next level's domain.
        half = f >> 1
        nq1, nk1 = -(-nqb // half), -(-nkb // half)
        pm, pn = cm[~full], cn[~full]
        two = np.arange(2, dtype=np.int64)
        m = (pm[:, None, None] * 2 + two[None, :, None]).repeat(2, axis=2)
        n = (pn[:, None, None] * 2 + two[None, None, :]).repeat(2, axis=1)
        ok = (m < nq1) & (n < nk1)
        domain = np.sort(m[ok] * nk1 + n[ok])
        if not len(domain):
            break
    if domain is not None and not len(domain):
        keys, state = np.zeros(0, np.int64), np.zeros(0, np.int8)
    else:
        keys, state = engine.run(node, domain)
    cat = [np.concatenate(x).astype(np.int64) if x else np.zeros(0, np.int64) for x in (rows, los, his)]
    return Layered(keys, state, *merge_runs(*cat))


def merge_runs(key: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union of intervals ``[lo, hi)`` per ``key``: sorted, disjoint, non-adjacent ``(key, lo, hi)``."""
    keep = hi > lo
    key, lo, hi = key[keep], lo[keep], hi[keep]
    if key.size == 0:
        return key, lo, hi
    order = np.lexsort((lo, key))
    key, lo, hi = key[order], lo[order], hi[order]
    span = int(max(hi.max(), 1)) + 1
    a, b = key * span + lo, key * span + hi
    reach = np.maximum.accumulate(b)
    new = np.ones(key.size, dtype=bool)
    new[1:] = a[1:] > reach[:-1]
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], key.size) - 1
    return key[starts], lo[starts], reach[ends] - key[starts] * span
