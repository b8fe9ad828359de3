"""Stage 4 (block plan), per-primitive tile classification by interval and congruence reasoning.

Comes in: one static primitive and pairs of tile pieces (query piece x key
piece, each a product of per-axis arithmetic progressions, see
:mod:`patterndsl.analysis.tiles`). Goes out: per pair, whether some element
is allowed (``N``), whether every element is allowed (``F``), and whether the
answer is exact (``ok``); pairs that are not exact are evaluated element-wise
by the engine. Every rule here reasons on the progressions' ends, steps and
residues, never on individual positions (apart from per-axis tables of a grid
axis's length for neighborhoods). Also: the "needed key range" of a query
tile, used to enumerate candidate tiles without scanning all pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from patterndsl import ir
from patterndsl.analysis.tiles import Pieces
from patterndsl.sizes import Sizes

BIG = 1 << 50  # stands in for an unbounded band end; far beyond any position


@dataclass
class Env:
    """What the classifiers need besides the pieces: the sizes, the head, caches.

    ``q_len``, ``kv_len``, ``layout``, ``heads`` and ``offset`` read the :class:`Sizes`;
    ``heads`` is the query head count of the whole pattern (0: unknown): ``route``
    candidates whose ``among`` reads ``h`` are the union over these heads (see
    ``Engine.route_candidates``).
    """

    sizes: Sizes
    head: int
    cache: dict = field(default_factory=dict)

    @property
    def q_len(self) -> int:
        return self.sizes.q_len

    @property
    def kv_len(self) -> int:
        return self.sizes.kv_len

    @property
    def layout(self) -> ir.Layout | None:
        return self.sizes.layout

    @property
    def heads(self) -> int:
        return self.sizes.heads

    @property
    def offset(self) -> int:
        return self.sizes.offset


def _fdiv(a, b):
    return np.floor_divide(a, b)


def _cdiv(a, b):
    return -np.floor_divide(-a, b)


# --------------------------------------------------------------------------- band with congruence


def _inverse_mod(values: np.ndarray, mod: np.ndarray) -> np.ndarray:
    out = np.zeros_like(values)
    if not len(values) or (mod <= 1).all():
        return out
    pairs, inverse = np.unique(np.stack([values, mod], 1), axis=0, return_inverse=True)
    table = np.array([pow(int(v) % int(m), -1, int(m)) if m > 1 else 0 for v, m in pairs], dtype=np.int64)
    return table[inverse.reshape(-1)]


def band(qp: Pieces, kp: Pieces, lo: int, hi: int, modulus: int):
    """``lo <= q - k <= hi`` and ``(q - k) % modulus == 0`` on flattened positions.

    Exact when both pieces are progressions with one common step (or one side is a single
    position): then ``q - k = D0 + step * w`` for every integer ``w`` in a known range.
    """
    qs = np.where(qp.fn > 1, qp.fs, 0)
    ks = np.where(kp.fn > 1, kp.fs, 0)
    step = np.maximum(qs, ks)
    ok = qp.isap & kp.isap & ((qs == 0) | (ks == 0) | (qs == ks))
    step = np.where(step == 0, 1, step)
    d0 = qp.fa - kp.fa
    wmin, wmax = -(kp.fn - 1), qp.fn - 1
    blo = np.maximum(_cdiv(lo - d0, step), wmin)
    bhi = np.minimum(_fdiv(hi - d0, step), wmax)
    if modulus == 1:
        nonempty = blo <= bhi
        return nonempty, nonempty & (blo == wmin) & (bhi == wmax), ok
    g = np.gcd(step, modulus)
    solvable = d0 % g == 0
    mod2 = modulus // g
    inv = _inverse_mod(step // g, mod2)
    w0 = np.where(mod2 > 1, ((-d0 // np.where(solvable, g, 1)) * inv) % np.maximum(mod2, 1), 0)
    first = blo + (w0 - blo) % np.maximum(mod2, 1)
    nonempty = solvable & (blo <= bhi) & (first <= bhi)
    in_band = (blo == wmin) & (bhi == wmax)
    single = wmin == wmax
    congruent = np.where(single, (d0 + step * wmin) % modulus == 0, solvable & (mod2 == 1))
    return nonempty, nonempty & in_band & congruent, ok


# --------------------------------------------------------------------------- simple primitives


def _halfplane(qp: Pieces, kp: Pieces, cq: np.ndarray, ck: np.ndarray, c0: int):
    """``sum(cq * q_coords) + sum(ck * k_coords) + c0 >= 0``; exact on any product pieces."""

    def extremes(p: Pieces, c):
        lo = np.where(c >= 0, p.a, p.last) * c
        hi = np.where(c >= 0, p.last, p.a) * c
        return lo.sum(1), hi.sum(1)

    qlo, qhi = extremes(qp, cq)
    klo, khi = extremes(kp, ck)
    nonempty = qhi + khi + c0 >= 0
    full = qlo + klo + c0 >= 0
    return nonempty, full, np.ones_like(nonempty)


def _blocks(qp: Pieces, kp: Pieces, size: int):
    # A progression whose step is at most ``size`` meets every block between its ends.
    ok = qp.isap & kp.isap & ((qp.fn == 1) | (qp.fs <= size)) & ((kp.fn == 1) | (kp.fs <= size))
    qb0, qb1 = _fdiv(qp.fmin, size), _fdiv(qp.fmax, size)
    kb0, kb1 = _fdiv(kp.fmin, size), _fdiv(kp.fmax, size)
    nonempty = (np.maximum(qb0, kb0) <= np.minimum(qb1, kb1)) & ok
    full = (qb0 == qb1) & (kb0 == kb1) & (qb0 == kb0)
    return nonempty | ~ok, full, ok


def _summary(kp: Pieces, stride: int, width: int):
    """``k % stride >= stride - width``: depends on the key piece only."""
    top = stride - width
    if width <= 0:
        z = np.zeros(len(kp.fa), dtype=bool)
        return z, z, np.ones_like(z)
    if width >= stride:
        o = np.ones(len(kp.fa), dtype=bool)
        return o, o, o
    step = np.where(kp.fn > 1, kp.fs, stride)
    g = np.gcd(step, stride)
    period = stride // g
    r0 = kp.fa % stride
    # Case 1: the piece runs through all residues r == fa (mod g).
    every = kp.fn >= period
    base = kp.fa % g
    first_top = top + (base - top) % g
    n_every = first_top <= stride - 1
    f_every = base >= top
    # Case 2: step 1 and fewer than ``stride`` elements: residues r0 .. r0 + fn - 1, maybe wrapping.
    end = r0 + kp.fn - 1
    wraps = end >= stride
    n_run = wraps | (end >= top)
    f_run = ~wraps & (r0 >= top)
    run = (step == 1) & ~every
    nonempty = np.where(every, n_every, n_run)
    full = np.where(every, f_every, f_run)
    ok = kp.isap & (every | run)
    return nonempty | ~ok, full & ok, ok


def _random(prim: ir.Prim, qp: Pieces, kp: Pieces, env: Env):
    size = prim.arg("block")
    table = _random_table(prim, env)
    nkb = -(-env.kv_len // size)
    qb_lo = env.offset // size
    ok = qp.isap & kp.isap & ((qp.fn == 1) | (qp.fs == 1)) & ((kp.fn == 1) | (kp.fs == 1))
    qb0, qb1 = _fdiv(qp.fmin, size), _fdiv(qp.fmax, size)
    kb0, kb1 = _fdiv(kp.fmin, size), _fdiv(kp.fmax, size)
    hits = np.zeros(len(qb0), dtype=np.int64)
    span = int((qb1 - qb0).max()) + 1 if len(qb0) else 0
    for o in range(span):
        row = qb0 + o
        live = row <= qb1
        base = (row - qb_lo) * nkb
        hits += np.where(live, np.searchsorted(table, base + kb1, "right") - np.searchsorted(table, base + kb0), 0)
    want = (qb1 - qb0 + 1) * (kb1 - kb0 + 1)
    return (hits > 0) | ~ok, (hits == want) & ok, ok


def _random_table(prim: ir.Prim, env: Env) -> np.ndarray:
    """Sorted flattened ``(query block - first) * n_key_blocks + key block`` of every drawn pair."""
    key = ("random", prim)
    if key not in env.cache:
        from patterndsl import semantics

        size = prim.arg("block")
        nkb = -(-env.kv_len // size)
        qb_lo = env.offset // size
        qb_hi = (env.kv_len - 1) // size + 1
        tab = semantics.random_table(prim.arg("seed"), range(qb_lo, qb_hi), nkb, prim.arg("blocks")).numpy()
        rows = np.arange(qb_hi - qb_lo, dtype=np.int64)[:, None]
        env.cache[key] = np.sort((rows * nkb + tab).reshape(-1))
    return env.cache[key]


# --------------------------------------------------------------------------- neighborhood


def _per_axis(value, rank: int) -> tuple:
    return value if isinstance(value, tuple) else (value,) * rank


def neighborhood_axes(prim: ir.Prim, layout: ir.Layout):
    """Per axis: ``(extent, size, dilation, stride, causal)``."""
    rank = len(layout.shape)
    return list(
        zip(
            layout.shape,
            _per_axis(prim.arg("size"), rank),
            _per_axis(prim.arg("dilation"), rank),
            _per_axis(prim.arg("stride"), rank),
            _per_axis(prim.arg("causal"), rank),
            strict=True,
        )
    )


def window_table(n: int, s: int, d: int, r: int, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """For every coordinate ``x < n``: the allowed key group indices ``tlo[x] <= t <= thi[x]``."""
    x = np.arange(n, dtype=np.int64)
    g = x % d
    p = x // d
    m = (n - g + d - 1) // d
    if causal:
        lead = np.minimum((p // r) * r + r - 1, m - 1)
        return np.maximum(lead - s + 1, 0), p
    left, right = s // 2, s // 2 + (s % 2 - 1)
    lead = np.minimum((p // r) * r + r // 2, m - 1)
    centre = np.minimum(np.maximum(lead, left), m - 1 - right)
    return centre - left, centre + right


def _residue_range(a, s, n, d: int, g: int):
    """First and last element ``== g (mod d)`` of a progression (step 1 or a multiple of d)."""
    last = a + s * (n - 1)
    first = a + (g - a) % d
    end = last - (last - g) % d
    single = (s % d == 0) | (n == 1)
    present = np.where(single, a % d == g, first <= last)
    first = np.where(single, a, first)
    end = np.where(single, last, end)
    return present, first, end


def _neighborhood(prim: ir.Prim, qp: Pieces, kp: Pieces, env: Env):
    axes = neighborhood_axes(prim, env.layout)
    size = len(qp.fa)
    nonempty = np.ones(size, dtype=bool)
    full = np.ones(size, dtype=bool)
    ok = np.ones(size, dtype=bool)
    for x, (n, s, d, r, causal) in enumerate(axes):
        key = ("nbh", n, s, d, r, causal)
        if key not in env.cache:
            env.cache[key] = window_table(n, s, d, r, causal)
        tlo, thi = env.cache[key]
        xa, xs, xn = qp.a[:, x], qp.s[:, x], qp.n[:, x]
        ya, ys, yn = kp.a[:, x], kp.s[:, x], kp.n[:, x]
        # Within a group, windows move monotonically with the query and consecutive windows
        # overlap (stride <= size), so the union over a run of queries is one interval.
        q_ok = (xn == 1) | (((xs == 1) | (xs == d)) & (r <= s))
        k_ok = (yn == 1) | (ys == 1) | (ys == d)
        axis_n = np.zeros(size, dtype=bool)
        for g in range(d):
            qpres, x0, x1 = _residue_range(xa, xs, xn, d, g)
            kpres, y0, y1 = _residue_range(ya, ys, yn, d, g)
            x0c, x1c = np.clip(x0, 0, n - 1), np.clip(x1, 0, n - 1)
            hit = qpres & kpres & (tlo[x0c] <= y1 // d) & (y0 // d <= thi[x1c])
            axis_n |= hit
        q_single = (xn == 1) | (xs % d == 0)
        k_single = (yn == 1) | (ys % d == 0)
        same = q_single & k_single & (xa % d == ya % d)
        xl = np.clip(xa + xs * (xn - 1), 0, n - 1)
        xf = np.clip(xa, 0, n - 1)
        yl = ya + ys * (yn - 1)
        axis_f = same & (tlo[xl] <= ya // d) & (yl // d <= thi[xf])
        nonempty &= axis_n
        full &= axis_f
        ok &= q_ok & k_ok
    return nonempty | ~ok, full & ok, ok


# --------------------------------------------------------------------------- where(...)


def linear_form(expr: ir.Expr, env: Env):
    """``expr`` as per-axis coefficients on query and key coordinates plus a constant, or None.

    Returns ``(cq, ck, c0)`` with ``cq``/``ck`` int64 ``[D]`` (D = layout axes, or 1 for
    1-D positions), when ``expr`` is linear in ``q``, ``k`` (and ``q.AXIS``, ``k.AXIS``).
    """
    d = len(env.layout.shape) if env.layout is not None else 1
    strides = [int(np.prod(env.layout.shape[x + 1 :])) for x in range(d)] if env.layout is not None else [1]

    def lin(e):
        if isinstance(e, ir.Const) and not isinstance(e.value, bool):
            return np.zeros(d, np.int64), np.zeros(d, np.int64), int(e.value)
        if isinstance(e, ir.Var):
            z = np.zeros(d, np.int64)
            if e.name == "q":
                return np.asarray(strides, np.int64), z, 0
            if e.name == "k":
                return z, np.asarray(strides, np.int64), 0
            value = {"h": env.head, "Lq": env.q_len, "Lk": env.kv_len}.get(e.name)
            return None if value is None else (z, z.copy(), value)
        if isinstance(e, ir.Coord) and env.layout is not None:
            z = np.zeros(d, np.int64)
            c = z.copy()
            c[env.layout.names.index(e.axis)] = 1
            return (c, z, 0) if e.side == "q" else (z, c, 0)
        if isinstance(e, ir.Neg):
            inner = lin(e.operand)
            return None if inner is None else (-inner[0], -inner[1], -inner[2])
        if isinstance(e, ir.Arith) and e.op in "+-*":
            left, right = lin(e.left), lin(e.right)
            if left is None or right is None:
                return None
            if e.op == "+":
                return left[0] + right[0], left[1] + right[1], left[2] + right[2]
            if e.op == "-":
                return left[0] - right[0], left[1] - right[1], left[2] - right[2]
            for const, other in ((left, right), (right, left)):
                if not const[0].any() and not const[1].any():
                    c = const[2]
                    return other[0] * c, other[1] * c, other[2] * c
            return None
        return None

    return lin(expr)


def halfplane_of(pred: ir.Expr, env: Env):
    """A comparison ``L op R`` as ``f >= 0`` with ``f`` linear, or None (``==``/``!=`` are rewritten earlier)."""
    if not isinstance(pred, ir.Cmp) or pred.op not in ("<", "<=", ">", ">="):
        return None
    left, right = linear_form(pred.left, env), linear_form(pred.right, env)
    if left is None or right is None:
        return None
    if pred.op in ("<=", "<"):
        left, right = right, left
    cq, ck, c0 = left[0] - right[0], left[1] - right[1], left[2] - right[2]
    if pred.op in ("<", ">"):
        c0 -= 1
    return cq, ck, c0


# --------------------------------------------------------------------------- dispatch


def classify(prim: ir.Prim, qp: Pieces, kp: Pieces, env: Env):
    """``(N, F, ok)`` for a static primitive on aligned arrays of query/key pieces."""
    name, size = prim.name, len(qp.fa)
    if name == "full" or name == "empty":
        v = np.full(size, name == "full")
        return v, v.copy(), np.ones(size, dtype=bool)
    if name == "causal":
        return kp.fmin <= qp.fmax, kp.fmax <= qp.fmin, np.ones(size, dtype=bool)
    if name == "sink":
        n = prim.arg("n")
        return kp.fmin < n, kp.fmax < n, np.ones(size, dtype=bool)
    if name == "global":
        n = prim.arg("n")
        return (qp.fmin < n) | (kp.fmin < n), (qp.fmax < n) | (kp.fmax < n), np.ones(size, dtype=bool)
    if name == "window":
        d = prim.arg("dilation")
        return band(qp, kp, -prim.arg("after") * d, prim.arg("before") * d, d)
    if name == "strided":
        return band(qp, kp, -BIG, BIG, prim.arg("stride"))
    if name == "blocks":
        return _blocks(qp, kp, prim.arg("size"))
    if name == "summary":
        return _summary(kp, prim.arg("stride"), prim.arg("width"))
    if name == "landmarks":
        return _summary(kp, prim.arg("every"), 1)
    if name == "random":
        return _random(prim, qp, kp, env)
    if name == "neighborhood" and env.layout is not None:
        return _neighborhood(prim, qp, kp, env)
    if name == "where":
        pred = prim.arg("pred")
        if isinstance(pred, ir.Const) and isinstance(pred.value, bool):
            v = np.full(size, pred.value)
            return v, v.copy(), np.ones(size, dtype=bool)
        hp = halfplane_of(pred, env)
        if hp is not None:
            return _halfplane(qp, kp, *hp)
    o = np.ones(size, dtype=bool)
    return o, np.zeros(size, dtype=bool), np.zeros(size, dtype=bool)


def needed_keys(prim: ir.Prim, qlo: np.ndarray, qhi: np.ndarray, qalo, qahi, env: Env):
    """Flattened key-position range ``[lo, hi]`` a query tile with positions in ``[qlo, qhi]`` can reach.

    Returns ``(lo, hi, axis_lo, axis_hi)`` (per-axis ranges or None), or None when the
    primitive may reach any key (the candidates are then all key tiles).
    """
    name = prim.name
    if name == "window":
        d = prim.arg("dilation")
        return qlo - prim.arg("before") * d, qhi + prim.arg("after") * d, None, None
    if name == "blocks":
        size = prim.arg("size")
        return _fdiv(qlo, size) * size, _fdiv(qhi, size) * size + size - 1, None, None
    if name == "sink":
        return np.full_like(qlo, -BIG), np.full_like(qhi, prim.arg("n") - 1), None, None
    if name == "empty":
        return np.full_like(qlo, BIG), np.full_like(qhi, -BIG), None, None
    if name == "causal":
        return np.full_like(qlo, -BIG), qhi, None, None
    if name == "global":
        n = prim.arg("n")
        return np.full_like(qlo, -BIG), np.where(qlo < n, BIG, n - 1), None, None
    if name == "neighborhood" and env.layout is not None:
        axes = neighborhood_axes(prim, env.layout)
        alo, ahi = np.empty_like(qalo), np.empty_like(qahi)
        for x, (n, s, d, r, causal) in enumerate(axes):
            tlo, thi = window_table(n, s, d, r, causal)
            ylo = (np.arange(n) % d) + d * tlo
            yhi = (np.arange(n) % d) + d * thi
            # Window ends are monotone within a group; the extremes over [x0, x1] are at
            # each group's first/last member inside the range.
            lo_best = np.full(len(qalo), BIG)
            hi_best = np.full(len(qalo), -BIG)
            for g in range(d):
                x0 = qalo[:, x] + (g - qalo[:, x]) % d
                x1 = qahi[:, x] - (qahi[:, x] - g) % d
                live = x0 <= x1
                lo_best = np.where(live, np.minimum(lo_best, ylo[np.clip(x0, 0, n - 1)]), lo_best)
                hi_best = np.where(live, np.maximum(hi_best, yhi[np.clip(x1, 0, n - 1)]), hi_best)
            alo[:, x], ahi[:, x] = lo_best, hi_best
        w = np.asarray([int(np.prod(env.layout.shape[x + 1 :])) for x in range(len(axes))], np.int64)
        return (alo * w).sum(1), (ahi * w).sum(1), alo, ahi
    if name == "where":
        hp = halfplane_of(prim.arg("pred"), env)
        if hp is not None and env.layout is None:
            cq, ck, c0 = hp
            # cq*q + ck*k + c0 >= 0 with a single key coefficient bounds k on one side.
            if ck[0] > 0:
                lo = _cdiv(-(c0 + np.maximum(cq[0] * qlo, cq[0] * qhi)), ck[0])
                return lo, np.full_like(qhi, BIG), None, None
            if ck[0] < 0:
                hi = _fdiv(c0 + np.maximum(cq[0] * qlo, cq[0] * qhi), -ck[0])
                return np.full_like(qlo, -BIG), hi, None, None
    return None


def gcd_all(values) -> int:
    """gcd of an iterable of ints (0 for none)."""
    out = 0
    for v in values:
        out = math.gcd(out, int(v))
    return out
