"""Stage 4 (block plan), the edge-column test of 1-D route candidates on the key columns it reads.

Comes in: the engine of a level of :func:`patterndsl.analysis.routeruns.candidates` (tiles of
``rows`` queries by one key block), ``among``, and the partial tiles ``(m, n)`` of that level.
Goes out: per tile, whether ``among`` allows every query of the tile with the block's first key or
with its last one (every group of the tile then has the block as a candidate).

The test classifies ``rows x 1`` tiles on one or two key columns per partial tile. Laid out on
tiles of one key over the whole key range, that is a side of a million tiles at a million keys
(its per-tile arrays rebuilt and re-read per pass); here the key side holds only the columns the
test reads (:func:`column_side`: one single-position piece per column), so its cost follows the
partial tiles.
"""

from __future__ import annotations

import numpy as np

from patterndsl import ir
from patterndsl.analysis import engine as eng
from patterndsl.analysis import routetiles, tiles


def column_side(keys: np.ndarray, kv_len: int) -> tiles.Side:
    """A key side whose tile ``t`` is the single key ``keys[t]`` (sorted, distinct, 1-D)."""
    n = len(keys)
    ones = np.ones((n, 1), np.int64)
    ptr = np.arange(n + 1, dtype=np.int64)
    return tiles.Side(
        n, 1, 0, (kv_len,), (1,), keys.astype(np.int64), ptr, ptr[:-1].copy(), keys[:, None].astype(np.int64),
        ones, ones.copy(), False, ptr.copy(),
    )  # fmt: skip


def edge_column_full(qside: tiles.Side, env, tally, among: ir.Node, block: int, m: np.ndarray, n: np.ndarray):
    """Per tile ``(m, n)`` of ``qside``'s query tiles by key block ``n``: ``among`` allows every query of
    the tile with the block's first key, or every one with its last.

    A band's edge crosses a block: ``causal - window(63)`` gives the first query of a 128-query tile
    only the first key of a block, so the tile is partial, but the column of that key is full.
    """
    kv_len = env.sizes.kv_len
    first, last = n * block, np.minimum((n + 1) * block, kv_len) - 1
    cols = np.unique(np.concatenate([first, last]))
    sub = eng.Engine(qside, column_side(cols, kv_len), env, tally=tally)
    out = np.zeros(len(m), bool)
    for key in (first, last):
        sel = np.flatnonzero(~out)
        if not len(sel):
            break
        keys = m[sel] * len(cols) + np.searchsorted(cols, key[sel])
        order = np.argsort(keys, kind="stable")
        state = routetiles.routeplan_states(sub, among, keys[order])
        out[sel[order[state == eng.FULL]]] = True
    return out
