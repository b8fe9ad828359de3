"""Stage 4 (block plan), tiles that are translates: nodes that shifting both sides alike leaves unchanged.

Comes in: an engine (1-D positions, one piece per tile) and a static node whose every primitive is
a band (``lo <= q - k <= hi`` with any modulus: it reads ``q - k`` only) or repeats with periods
in ``q`` and ``k`` (its record's ``shift_periods``: ``where(k % 4 == 0)``). Goes out: the states
and allowed pairs of a set of tiles, computed on one tile per class of translates and copied.

Two tiles whose query and key pieces are the same progressions moved by one amount ``t`` (a
multiple of the periods) hold the same mask under such a node. In identity order those are the
full-size tiles of one diagonal ``n - m``; in a residue-class order, the tiles of one diagonal
inside a pair of classes. The tiles near the diagonal of ``causal & (window(127) | window(1024,
dilation = 8))`` (hundreds of thousands at a million tokens, each needing its residue classes
refined and counted) then cost one tile per class. A flat plan in identity order (square tiles)
is laid out from one tile per diagonal (:func:`run_all`).
"""

from __future__ import annotations

import math

import numpy as np

from patterndsl import ir, primitives
from patterndsl.analysis import engine as eng
from patterndsl.primitives.common import distinct_rows

#: Below this many tiles the grouping costs more than it saves.
MIN_TILES = 256
#: Largest period of translation (lcm of the primitives' periods) grouped by.
MAX_PERIOD = 1 << 12
#: Most bands whose inside / outside sets name a class of tiles (:func:`_by_bands`).
_MAX_BANDS = 16
#: Band limits beyond this are as good as unbounded.
_LIMIT = 1 << 62


def period(engine: eng.Engine, node: ir.Node) -> int | None:
    """The step ``P`` such that moving both sides by a multiple of it leaves ``node``'s mask unchanged, or None."""
    if len(engine.q.extents) != 1 or ir.is_dynamic(node):
        return None
    cache = engine.env.cache.setdefault("translation period", {})
    if node not in cache:
        step = 1
        for prim in {p for p in ir.walk(node) if isinstance(p, ir.Prim)}:
            if prim in (ir.FULL, ir.EMPTY) or eng.band_of(prim, engine.env) is not None:
                continue
            rule = primitives.lookup(prim.name).shift_periods
            found = None if rule is None else rule(prim, engine.env)
            if found is None:
                step = None
                break
            step = math.lcm(step, *found)
        cache[node] = step if step is not None and step <= MAX_PERIOD else None
    return cache[node]


def invariant(engine: eng.Engine, node: ir.Node) -> bool:
    """Whether ``node`` holds the same mask on every full-size tile of a diagonal (identity order, square tiles)."""
    q, k = engine.q, engine.k
    if not (q.identity and k.identity and q.block == k.block):
        return False
    step = period(engine, node)
    return step is not None and q.block % step == 0


def _split(engine: eng.Engine, keys: np.ndarray, step: int):
    """``(reps, inverse)``: one sorted key per class of translates among tiles ``keys``, and the class of
    each (None when that saves less than half the tiles)."""
    q, k = engine.q, engine.k
    if not (q.single_piece and k.single_piece):
        return None
    m, n = keys // engine.nkb, keys % engine.nkb
    qa, ka = q.a[m, 0], k.a[n, 0]
    rows = np.stack([q.s[m, 0], q.n[m, 0], k.s[n, 0], k.n[n, 0], ka - qa, qa % step], 1)
    uniq, inverse = distinct_rows(rows)
    if 2 * len(uniq) > len(keys):
        return None
    first = np.full(len(uniq), len(keys), np.int64)
    np.minimum.at(first, inverse, np.arange(len(keys), dtype=np.int64))
    return _in_key_order(keys, first, inverse)


def _in_key_order(keys: np.ndarray, first: np.ndarray, inverse: np.ndarray):
    # ``(reps, inverse)`` from each class's first tile and each tile's class: representatives in key
    # order (sorted, as ``keys`` are), classes renumbered alike
    order = np.argsort(first)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return keys[first[order]], rank[inverse]


def _bands(engine: eng.Engine, node: ir.Node) -> list[tuple[int, int, int]]:
    """The distinct bands ``(lo, hi, mod)`` among ``node``'s primitives (limits clipped to int64)."""
    cache = engine.env.cache.setdefault("translation bands", {})
    if node not in cache:
        found = {eng.band_of(p, engine.env) for p in ir.walk(node) if isinstance(p, ir.Prim)} - {None}
        cache[node] = sorted((max(lo, -_LIMIT), min(hi, _LIMIT), mod) for lo, hi, mod in found)
    return cache[node]


def _by_bands(engine: eng.Engine, node: ir.Node, keys: np.ndarray):
    """``(reps, inverse)`` like :func:`_split`, in identity order with square tiles (:func:`invariant`).

    A full-size tile on a diagonal where every band of ``node`` is decided whole (``q - k`` outside its
    limits on the whole tile, or inside them with the modulus dividing the tile) holds the same mask
    as every other such tile with the same bands inside: its other primitives repeat with periods
    dividing the tile on each side alone, so moving its queries, then its keys, by whole tiles changes
    nothing. Those tiles form one class per set of bands inside; a diagonal that cuts a band is a
    class of its own, and an edge tile (shorter than the tile) is one alone.
    """
    q, k = engine.q, engine.k
    bands = _bands(engine, node)
    size = q.block
    m, n = keys // engine.nkb, keys % engine.nkb
    full = (m < q.length // size) & (n < k.length // size)
    diff = q.a[m, 0] - k.a[n, 0]  # q - k at the tile's first pair: one value per diagonal
    low, high = diff - (size - 1), diff + (size - 1)
    cut = ~full
    code = np.zeros(len(keys), np.int64)
    for bit, (lo, hi, mod) in enumerate(bands):
        inside = (low >= lo) & (high <= hi) & (size % mod == 0)
        cut |= ~(inside | (high < lo) | (low > hi))
        code |= inside.astype(np.int64) << bit
    if cut.any():
        # a diagonal of its own (numbered past every set of bands), an edge tile alone past those
        diag = m - n
        base = 1 << len(bands)
        code[cut] = base + diag[cut] - int(diag.min())
        edge = np.flatnonzero(~full)
        code[edge] = base + int(diag.max()) - int(diag.min()) + 1 + np.arange(len(edge))
    # classes numbered densely (codes are below 2**len(bands) + tiles): counted, not sorted
    present = np.bincount(code) > 0
    inverse = (np.cumsum(present) - 1)[code]
    classes = int(present.sum())
    if 2 * classes > len(keys):
        return None
    first = np.full(classes, len(keys), np.int64)
    np.minimum.at(first, inverse, np.arange(len(keys), dtype=np.int64))
    return _in_key_order(keys, first, inverse)


def _along(engine: eng.Engine, node: ir.Node, keys: np.ndarray, values) -> np.ndarray | None:
    # ``values(keys) -> int64 per key`` on one tile per class of translates, copied to the others.
    if len(keys) < MIN_TILES:
        return None
    step = period(engine, node)
    if step is not None and invariant(engine, node) and len(_bands(engine, node)) <= _MAX_BANDS:
        split = _by_bands(engine, node, keys)
    else:
        split = None if step is None else _split(engine, keys, step)
    if split is None:
        return None
    reps, inverse = split
    return values(reps)[inverse]


def run(engine: eng.Engine, node: ir.Node, domain: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Non-empty tiles of ``node`` within ``domain`` and their states, one tile per class (None: not worth it)."""
    state = _along(engine, node, domain, lambda part: _states(engine, node, part))
    if state is None:
        return None
    keep = state > 0
    return domain[keep], state[keep].astype(np.int8)


def evaluate(engine: eng.Engine, node: ir.Node, keys: np.ndarray) -> np.ndarray | None:
    """Exact states of open tiles ``keys`` (:meth:`Engine.evaluate`), one tile per class (None: not worth it)."""
    state = _along(engine, node, keys, lambda part: engine.evaluate(node, part))
    return None if state is None else state.astype(np.int8)


def count(engine: eng.Engine, node: ir.Node, keys: np.ndarray) -> np.ndarray | None:
    """Allowed pairs of tiles ``keys``, one tile per class (None: not worth it).

    The representatives are counted on the whole node at once (one box refinement, where the bands'
    closed forms and the periodic primitives' residue tables apply), not through the algebra operand
    by operand: they are a few tiles, and each operand pass costs a refinement of its own.
    """
    return _along(engine, node, keys, lambda part: eng.count_allowed(engine, node, part))


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
