"""Stage 4 (block plan), closed-form pair counts of bands and of boolean combinations of bands on boxes.

Comes in: boxes (aligned query / key pieces, each a flattened arithmetic progression) and
bands ``lo <= q - k <= hi`` with ``(q - k) % modulus == 0``. Goes out: per box, the number
of allowed pairs, in O(1) per box and band (O(2**b) for a combination of ``b`` bands), never
per row or per pair. A band inside a box is a trapezoid: along the diagonals ``q - k = d`` of
a rectangle the pair counts rise by one, stay flat and fall by one, so the pairs of a band are
a sum of linear functions over an arithmetic progression of ``d``. A boolean combination of
bands (``causal & (window(127) | strided(128))``) is counted on the regions of the bands'
Venn diagram: every intersection of bands is a band again (the largest ``lo``, the smallest
``hi``, the lcm of the moduli), and the regions follow by inclusion and exclusion.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from patterndsl import ir, primitives
from patterndsl.primitives.band import inverse_mod
from patterndsl.primitives.common import cdiv, fdiv

#: Most bands a combination may have to be counted on its Venn regions (``2**b`` band counts).
MAX_BANDS = 4
#: Beyond any difference of two positions (lengths stay below 2**48).
_HUGE = 1 << 50


def _progression_sum(s, e, mod, res, a, b):
    """Sum of ``a + b * d`` over ``d`` in ``[s, e]`` with ``d % mod == res`` (arrays; small values)."""
    first = s + (res - s) % mod
    last = e - (e - res) % mod
    n = np.where(last >= first, (last - first) // mod + 1, 0)
    return n * a + b * (n * (first + last) // 2)


def trapezoid(A, B, c, lo, hi, mod, res):
    """``sum of min(d - A + 1, B - d + 1, c)`` over ``d`` in ``[lo, hi] & [A, B]``, ``d % mod == res``.

    That is the pairs ``(u, v)`` of ``[0, nu) x [0, nv)`` with ``u - v = d`` for ``A = 1 - nv``,
    ``B = nu - 1``, ``c = min(nu, nv)``.
    """
    lo, hi = np.maximum(lo, A), np.minimum(hi, B)
    rise = _progression_sum(lo, np.minimum(hi, A + c - 1), mod, res, 1 - A, 1)
    flat = _progression_sum(np.maximum(lo, A + c), np.minimum(hi, B - c), mod, res, c, 0)
    fall = _progression_sum(np.maximum(np.maximum(lo, A + c), B - c + 1), hi, mod, res, B + 1, -1)
    return np.where(lo <= hi, rise + flat + fall, 0)


def band_pairs(qp, kp, lo: int, hi: int, modulus: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of each aligned box ``(qp[i], kp[i])`` in the band, and whether the count is exact.

    Exact when both sides are progressions with one common step (or one side is a single
    position): then ``q - k = d0 + step * (u - v)`` over a rectangle of ``(u, v)``.
    """
    qs = np.where(qp.fn > 1, qp.fs, 0)
    ks = np.where(kp.fn > 1, kp.fs, 0)
    ok = qp.isap & kp.isap & ((qs == 0) | (ks == 0) | (qs == ks))
    step = np.maximum(np.maximum(qs, ks), 1)
    d0 = qp.fa - kp.fa
    nu, nv = qp.fn, kp.fn
    wlo = cdiv(lo - d0, step)
    whi = fdiv(hi - d0, step)
    # step * w == -d0 (mod modulus): w == w0 (mod modulus / g) when g = gcd(step, modulus) divides d0
    g = np.gcd(step, modulus)
    solvable = d0 % g == 0
    mod2 = modulus // g
    w0 = ((-d0 // np.where(solvable, g, 1)) * inverse_mod(step // g, mod2)) % mod2
    count = trapezoid(1 - nv, nu - 1, np.minimum(nu, nv), wlo, whi, mod2, w0)
    return np.where(solvable & (nu > 0) & (nv > 0), count, 0), ok


def _leaves(node: ir.Node) -> list[ir.Prim]:
    seen = {}
    for p in ir.walk(node):
        if isinstance(p, ir.Prim):
            seen.setdefault(p, None)
    return list(seen)


def _truth(node: ir.Node, value: dict) -> np.ndarray | bool:
    """The boolean value of ``node`` from its leaves' values (bools or bool arrays)."""
    if isinstance(node, ir.Prim):
        return value[node]
    if isinstance(node, ir.Not):
        return np.logical_not(_truth(node.item, value))
    parts = [_truth(item, value) for item in node.items]
    combine = np.logical_and if isinstance(node, ir.Inter) else np.logical_or
    out = parts[0]
    for part in parts[1:]:
        out = combine(out, part)
    return out


class Combination:
    """A static node seen as a boolean function of its bands and its other primitives.

    Args:
        node: a static pattern node.
        band_of: ``prim -> (lo, hi, modulus) | None``.
    """

    def __init__(self, node: ir.Node, band_of):
        self.node = node
        self.leaves = _leaves(node)
        self.bands = {p: band_of(p) for p in self.leaves}
        self.bands = {p: b for p, b in self.bands.items() if b is not None}
        self.usable = 0 < len(self.bands) <= MAX_BANDS and not any(
            primitives.lookup(p.name).dynamic for p in self.leaves
        )

    def count(self, qp, kp, states: dict) -> tuple[np.ndarray, np.ndarray]:
        """Allowed pairs per box where every non-band primitive is decided, and where that holds.

        Args:
            qp, kp: aligned box sides (pieces).
            states: ``{prim: int8 [B]}`` each leaf's state on each box (0 none, 1 unknown, 2 all).

        Returns:
            ``(count, exact)``: int64 and bool ``[B]``; ``count`` is meaningful where ``exact``.
        """
        size = len(qp.fa)
        exact = np.ones(size, bool)
        for p in self.leaves:
            if p not in self.bands:
                exact &= states[p] != 1
        bands = list(self.bands)
        if not self.usable or not exact.any():
            return np.zeros(size, np.int64), np.zeros(size, bool)
        area = qp.n.prod(1) * kp.n.prod(1)
        inter = {(): area}
        for r in range(1, len(bands) + 1):
            for sub in itertools.combinations(range(len(bands)), r):
                ends = [self.bands[bands[i]] for i in sub]
                lo, hi = max(e[0] for e in ends), min(e[1] for e in ends)
                mod = math.lcm(*(e[2] for e in ends))
                if mod > _HUGE:
                    # no difference of positions reaches a multiple of it but 0
                    lo, hi, mod = max(lo, 0), min(hi, 0), 1
                if lo > hi:
                    inter[sub] = np.zeros(size, np.int64)
                    continue
                inter[sub], ok = band_pairs(qp, kp, lo, hi, mod)
                exact &= ok
        value = {p: states[p] == 2 for p in self.leaves if p not in self.bands}
        total = np.zeros(size, np.int64)
        everything = set(range(len(bands)))
        for r in range(len(bands) + 1):
            for inside in itertools.combinations(range(len(bands)), r):
                # pairs in exactly the bands ``inside``: inclusion and exclusion over the others
                rest = sorted(everything - set(inside))
                region = np.zeros(size, np.int64)
                for r2 in range(len(rest) + 1):
                    for more in itertools.combinations(rest, r2):
                        region += (-1) ** r2 * inter[tuple(sorted(inside + more))]
                for i, p in enumerate(bands):
                    value[p] = i in inside
                truth = np.broadcast_to(_truth(self.node, value), (size,))
                total += np.where(truth, region, 0)
        return total, exact
