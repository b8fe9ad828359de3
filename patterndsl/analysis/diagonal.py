"""Stage 4 (block plan), tiles along diagonals: nodes that shifting both sides by one tile leaves unchanged.

Comes in: an engine (identity order, 1-D positions, square tiles) and a static node whose every
primitive is a band (``lo <= q - k <= hi`` with any modulus: it reads ``q - k`` only) or repeats
with periods that divide the tile size (its record's ``shift_periods``: ``where(k % 4 == 0)``).
Goes out: the states and allowed pairs of a set of tiles, computed on one full-size tile per
diagonal ``n - m`` and copied along it.

Moving from tile ``(m, n)`` to ``(m + 1, n + 1)`` adds the tile size to every query and key
position; such a node holds the same mask on both tiles when both are full size. The tiles near
the diagonal of ``causal & (window(127) | window(1024, dilation = 8))`` (tens of thousands at a
million tokens, each needing its residue classes refined) then cost one tile per diagonal.
"""

from __future__ import annotations

import numpy as np

from patterndsl import ir, primitives
from patterndsl.analysis import engine as eng

#: Below this many tiles the grouping costs more than it saves.
MIN_TILES = 256


def invariant(engine: eng.Engine, node: ir.Node) -> bool:
    """Whether ``node`` holds the same mask on every full-size tile of a diagonal on ``engine``'s sides."""
    q, k = engine.q, engine.k
    if not (q.identity and k.identity and len(q.extents) == 1 and q.block == k.block) or ir.is_dynamic(node):
        return False
    cache = engine.env.cache.setdefault("diagonal invariant", {})
    if node not in cache:
        cache[node] = all(_shifts(p, engine) for p in ir.walk(node) if isinstance(p, ir.Prim))
    return cache[node]


def _shifts(prim: ir.Prim, engine: eng.Engine) -> bool:
    if prim in (ir.FULL, ir.EMPTY) or eng.band_of(prim, engine.env) is not None:
        return True
    rule = primitives.lookup(prim.name).shift_periods
    found = None if rule is None else rule(prim, engine.env)
    return found is not None and engine.q.block % found[0] == 0 and engine.k.block % found[1] == 0


def _split(engine: eng.Engine, keys: np.ndarray):
    """``(reps, inverse, full)``: one sorted key per diagonal of the full-size tiles ``keys[full]``,
    and the representative of each of them (None when that saves less than half the tiles)."""
    q, k = engine.q, engine.k
    m, n = keys // engine.nkb, keys % engine.nkb
    full = ((m + 1) * q.block <= q.length) & ((n + 1) * k.block <= k.length)
    diag = (n - m)[full]
    uniq, first, inverse = np.unique(diag, return_index=True, return_inverse=True)
    if not len(diag) or 2 * len(uniq) > len(diag):
        return None
    order = np.argsort(first)  # representatives in key order: they are sorted then
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return keys[full][first[order]], rank[inverse.reshape(-1)], full


def _along(engine: eng.Engine, node: ir.Node, keys: np.ndarray, values) -> np.ndarray | None:
    # ``values(keys) -> int64 per key`` on one full-size tile per diagonal (and on the edge tiles), copied along.
    if len(keys) < MIN_TILES or not invariant(engine, node):
        return None
    split = _split(engine, keys)
    if split is None:
        return None
    reps, inverse, full = split
    out = np.zeros(len(keys), np.int64)
    out[full] = values(reps)[inverse]
    edge = np.flatnonzero(~full)
    if len(edge):
        out[edge] = values(keys[edge])
    return out


def run(engine: eng.Engine, node: ir.Node, domain: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Non-empty tiles of ``node`` within ``domain`` and their states, one tile per diagonal (None: not worth it)."""

    state = _along(engine, node, domain, lambda part: _states(engine, node, part))
    if state is None:
        return None
    keep = state > 0
    return domain[keep], state[keep].astype(np.int8)


def count(engine: eng.Engine, node: ir.Node, keys: np.ndarray) -> np.ndarray | None:
    """Allowed pairs of tiles ``keys``, one tile per diagonal (None: not worth it)."""
    return _along(engine, node, keys, lambda part: eng.count_tiles(engine, node, part))


def run_all(engine: eng.Engine, node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """Every non-empty tile of ``node`` and its state, from one full-size tile per diagonal (None: not worth it).

    The diagonals' representatives are classified (``n_q + n_k`` tiles), the full-size tiles of the
    non-empty diagonals are laid out row by row from them, and the edge tiles (a last query row or
    key column shorter than the tile) are classified on their own.
    """
    q, k = engine.q, engine.k
    if engine.nqb * engine.nkb < MIN_TILES or not invariant(engine, node):
        return None
    qf, kf = q.length // q.block, k.length // k.block  # full-size tiles per side
    if not qf or not kf:
        return None
    diag = np.arange(-(qf - 1), kf, dtype=np.int64)
    first = np.maximum(-diag, 0)
    reps = first * engine.nkb + first + diag  # the first full-size tile of every diagonal
    order = np.argsort(reps)
    found, state = engine.run(node, reps[order])
    rep_state = np.zeros(len(reps), np.int8)
    rep_state[order[np.searchsorted(reps[order], found)]] = state
    live = diag[rep_state > 0]
    # full-size tiles row by row: (m, m + d) for the live diagonals d, in key order; then the last
    # key column in each row, when it is an edge tile
    eng.check_tiles(qf * (len(live) + 1))
    m = np.arange(qf, dtype=np.int64)[:, None]
    cols = [m + live[None, :]]
    states = [np.broadcast_to(rep_state[rep_state > 0][None, :], (qf, len(live)))]
    if kf < engine.nkb:
        edge = np.arange(qf, dtype=np.int64) * engine.nkb + kf
        cols.append(np.full((qf, 1), kf, np.int64))
        states.append(_states(engine, node, edge)[:, None])
    col, st = np.concatenate(cols, 1), np.concatenate(states, 1)
    # full-size columns from the diagonals, the edge column from its own classification
    keep = (col >= 0) & ((col < kf) | (np.arange(col.shape[1]) >= len(live))[None, :]) & (st > 0)
    keys = (m * engine.nkb + col)[keep]
    state = st[keep].astype(np.int8)
    if qf < engine.nqb:
        row = qf * engine.nkb + np.arange(engine.nkb, dtype=np.int64)
        last = _states(engine, node, row)
        keys = np.concatenate([keys, row[last > 0]])
        state = np.concatenate([state, last[last > 0].astype(np.int8)])
    return keys, state


def _states(engine: eng.Engine, node: ir.Node, keys: np.ndarray) -> np.ndarray:
    found, state = engine.run(node, keys)
    out = np.zeros(len(keys), np.int64)
    out[np.searchsorted(keys, found)] = state
    return out
