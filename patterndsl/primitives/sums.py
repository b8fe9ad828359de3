"""Vocabulary helpers: exact sums over query rows in closed form, for the records' ``total`` rules.

Comes in: integer ranges and the constants of one primitive. Goes out: Python integers. A
``total`` (allowed pairs over all queries) must cost the same at ``Lq = 2**40`` as at ``Lq = 16``:
a plan's memory and time follow its tiles, never ``L``, so these sums are formulas, not arrays.
"""

from __future__ import annotations

import itertools


def _floor_prefix(x: int, m: int) -> int:
    """``sum(t // m for t in range(x))`` for ``x >= 0``, extended to every integer ``x``.

    The extension keeps ``F(x) - F(x - 1) == (x - 1) // m``, so differences sum any range.
    """
    t = x // m
    return m * t * (t - 1) // 2 + t * (x - t * m)


def floor_sum(a: int, b: int, c: int, m: int) -> int:
    """``sum((q + c) // m for q in range(a, b + 1))`` (0 when ``b < a``); ``m >= 1``."""
    if b < a:
        return 0
    return _floor_prefix(b + c + 1, m) - _floor_prefix(a + c, m)


def floor_sum_down(a: int, b: int, c: int, m: int) -> int:
    """``sum((c - q) // m for q in range(a, b + 1))`` (0 when ``b < a``); ``m >= 1``."""
    return floor_sum(-b, -a, c, m)


def clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(x, hi))


def band_pairs(lo: int, hi: int, mod: int, q0: int, q1: int, kv_len: int) -> int:
    """Pairs ``(q, k)`` with ``q0 <= q <= q1``, ``0 <= k < kv_len``, ``lo <= q - k <= hi`` and ``(q - k) % mod == 0``.

    Per query the keys are ``max(0, q - hi) <= k <= min(kv_len - 1, q - lo)`` on the residue class of
    ``q``: ``(k1 - q) // mod - (k0 - 1 - q) // mod`` of them. The two ends switch form at
    ``q = hi`` and ``q = kv_len - 1 + lo``; between those cuts each end is a constant or a floor of
    ``q`` over ``mod``, summed by :func:`floor_sum`.
    """
    if lo > hi or kv_len <= 0:
        return 0
    a, b = max(q0, lo), min(q1, hi + kv_len - 1)  # the queries with at least one key in the band's range
    if b < a:
        return 0
    cuts = sorted({a, b + 1} | {c for c in (hi, kv_len - 1 + lo + 1) if a < c <= b})
    total = 0
    for s, e in itertools.pairwise(cuts):
        e -= 1
        # upper end k1 - q: -lo while q <= kv_len - 1 + lo, else kv_len - 1 - q
        if s <= kv_len - 1 + lo:
            total += (e - s + 1) * (-lo // mod)
        else:
            total += floor_sum_down(s, e, kv_len - 1, mod)
        # lower end k0 - 1 - q: -1 - q while q < hi, else -hi - 1
        if s < hi:
            total -= floor_sum_down(s, e, -1, mod)
        else:
            total -= (e - s + 1) * ((-hi - 1) // mod)
    return total
