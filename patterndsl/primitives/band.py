"""The band primitives ``window`` and ``strided``: every rule of each, for every stage.

Comes in: nothing at import but the registry. Goes out: two registered records
and :func:`band`, the tile rule of any band ``lo <= q - k <= hi`` with
``(q - k) % modulus == 0`` (other families and tests reuse it).
"""

from __future__ import annotations

import numpy as np
import torch

from patterndsl.primitives.common import BIG, cdiv, fdiv, param, require, require_in_range
from patterndsl.primitives.registry import Primitive, register
from patterndsl.primitives.sums import floor_sum_down

# --------------------------------------------------------------------------- tile rule


def inverse_mod(values: np.ndarray, mod: np.ndarray) -> np.ndarray:
    """Inverses of ``values`` modulo ``mod`` (coprime; 0 where ``mod`` is 1), one ``pow`` per distinct pair."""
    out = np.zeros_like(values)
    live = mod > 1
    if not live.any():
        return out
    m1 = int(mod.max()) + 1
    v, m = values[live] % mod[live], mod[live]
    if m1 < 1 << 31:
        # one int64 key per (value mod m, m): a 1-D unique, far cheaper than unique rows
        uniq, inv = np.unique(v * m1 + m, return_inverse=True)
        pairs = zip((uniq // m1).tolist(), (uniq % m1).tolist(), strict=True)
    else:
        uniq, inv = np.unique(np.stack([v, m], 1), axis=0, return_inverse=True)
        pairs = uniq.tolist()
    out[live] = np.array([pow(a, -1, b) for a, b in pairs], dtype=np.int64)[inv.reshape(-1)]
    return out


def band(qp, kp, lo: int, hi: int, modulus: int):
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
    blo = np.maximum(cdiv(lo - d0, step), wmin)
    bhi = np.minimum(fdiv(hi - d0, step), wmax)
    if modulus == 1:
        nonempty = blo <= bhi
        return nonempty, nonempty & (blo == wmin) & (bhi == wmax), ok
    g = np.gcd(step, modulus)
    solvable = d0 % g == 0
    mod2 = modulus // g
    inv = inverse_mod(step // g, mod2)
    w0 = np.where(mod2 > 1, ((-d0 // np.where(solvable, g, 1)) * inv) % np.maximum(mod2, 1), 0)
    first = blo + (w0 - blo) % np.maximum(mod2, 1)
    nonempty = solvable & (blo <= bhi) & (first <= bhi)
    in_band = (blo == wmin) & (bhi == wmax)
    single = wmin == wmax
    congruent = np.where(single, (d0 + step * wmin) % modulus == 0, solvable & (mod2 == 1))
    return nonempty, nonempty & in_band & congruent, ok


# --------------------------------------------------------------------------- window(before, after, dilation)


def _window_band(prim, env=None):
    d = prim.arg("dilation")
    return -prim.arg("after") * d, prim.arg("before") * d, d


def _window_check(v, s, layout):
    for count in ("before", "after"):
        require(v[count] >= 0, f"window {count} must be >= 0, got {v[count]}", s[count])
    require(v["dilation"] >= 1, f"window dilation must be >= 1, got {v['dilation']}", s["dilation"])
    # The band ends are products: each factor is in range alone, the product need not be.
    for count in ("before", "after"):
        require_in_range(v[count] * v["dilation"], f"window {count} * dilation", s[count])


def _window_meaning(prim, q, k, h, ctx, selection):
    a = prim.kwargs
    d = a["dilation"]
    diff = q - k
    band = (diff <= a["before"] * d) & (diff >= -a["after"] * d)
    return band if d == 1 else band & (torch.remainder(diff, d) == 0)


def _window_keys(prim, qlo, qhi, qalo, qahi, env):
    d = prim.arg("dilation")
    return qlo - prim.arg("before") * d, qhi + prim.arg("after") * d, None, None


def _window_triton(r, p) -> str:
    before, after, dil = p.arg("before"), p.arg("after"), p.arg("dilation")
    parts = [f"k >= q - {before * dil}", f"k <= q + {after * dil}"]
    if dil != 1:
        parts.append(f"(q - k) % {dil} == 0")  # the sign of a remainder never changes "== 0"
    return r.all_of(parts)


WINDOW = register(
    Primitive(
        "window",
        params=(param("before", "int"), param("after", "int", 0), param("dilation", "int", 1)),
        check=_window_check,
        shape_args=None,
        check_sizes=None,
        reads_head=None,
        meaning=_window_meaning,
        classify=lambda prim, qp, kp, env: band(qp, kp, *_window_band(prim)),
        needed_keys=_window_keys,
        candidates=None,
        cost=1,
        band=_window_band,
        total=None,  # its band total
        count=None,  # its band count
        triton=_window_triton,
    )
)


# --------------------------------------------------------------------------- strided(stride)


def _strided_total(prim, q_len, kv_len, layout, env):
    # per query q: (Lk - 1 - q) // s - (-1 - q) // s keys
    s, q0 = prim.arg("stride"), kv_len - q_len
    return floor_sum_down(q0, kv_len - 1, kv_len - 1, s) - floor_sum_down(q0, kv_len - 1, -1, s)


STRIDED = register(
    Primitive(
        "strided",
        params=(param("stride", "int"),),
        check=lambda v, s, layout: require(
            v["stride"] >= 1, f"strided stride must be >= 1, got {v['stride']}", s["stride"]
        ),
        shape_args=None,
        check_sizes=None,
        reads_head=None,
        meaning=lambda prim, q, k, h, ctx, selection: torch.remainder(q - k, prim.arg("stride")) == 0,
        classify=lambda prim, qp, kp, env: band(qp, kp, -BIG, BIG, prim.arg("stride")),
        needed_keys=None,
        candidates=None,
        cost=5,
        band=lambda prim, env: (-BIG, BIG, prim.arg("stride")),
        total=_strided_total,
        count=None,  # its band count
        triton=lambda r, p: f"(q - k) % {p.arg('stride')} == 0",
    )
)
