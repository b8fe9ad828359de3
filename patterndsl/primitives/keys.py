"""The key-set primitives ``sink``, ``global``, ``summary`` and ``landmarks``: every rule of each.

Comes in: nothing at import but the registry. Goes out: four registered
records. All but ``global`` test the key alone, so a tile's allowed pairs are
its rows times the allowed keys of its key pieces.
"""

from __future__ import annotations

import numpy as np
import torch

from patterndsl import semantics as sem
from patterndsl.primitives.common import BIG, exact, param, require
from patterndsl.primitives.registry import Primitive, register
from patterndsl.primitives.sums import clamp


def _check_count(v, s, layout):
    require(v["n"] >= 0, f"the count n must be >= 0, got {v['n']}", s["n"])


def _by_keys(per_piece):
    """A ``count`` rule from ``per_piece(prim, a, s, n)``: allowed keys of each key progression ``a + s*u``."""

    def count(prim, engine, keys):
        q, k = engine.q, engine.k
        if k.a.shape[1] != 1:
            return None  # per-piece rules of 1-D progressions only
        got = per_piece(prim, k.a[:, 0], k.s[:, 0], k.n[:, 0])
        if got is None:
            return None
        m, n = keys // engine.nkb, keys % engine.nkb
        rows = np.diff(q.starts)[m]
        per_tile = np.bincount(k.tile, got, k.n_tiles).astype(np.int64)
        return rows * per_tile[n]

    return count


# --------------------------------------------------------------------------- sink(n)


def _sink_count(prim, engine, keys):
    # rows x the keys below n in the key tile (any layout: Side.below)
    m, n = keys // engine.nkb, keys % engine.nkb
    per_tile = np.bincount(engine.k.tile, engine.k.below(prim.arg("n")), engine.k.n_tiles).astype(np.int64)
    return np.diff(engine.q.starts)[m] * per_tile[n]


SINK = register(
    Primitive(
        "sink",
        params=(param("n", "int"),),
        check=_check_count,
        shape_args=None,
        check_sizes=None,
        reads_head=None,
        meaning=lambda prim, q, k, h, ctx, selection: (k < prim.arg("n")).expand(sem._shape_of(q, k)),
        classify=lambda prim, qp, kp, env: (kp.fmin < prim.arg("n"), kp.fmax < prim.arg("n"), exact(len(qp.fa))),
        needed_keys=lambda prim, qlo, qhi, qalo, qahi, env: (
            np.full_like(qlo, -BIG),
            np.full_like(qhi, prim.arg("n") - 1),
            None,
            None,
        ),
        candidates=None,
        cost=2,
        band=None,
        total=lambda prim, q_len, kv_len, layout, env: q_len * max(0, min(prim.arg("n"), kv_len)),
        count=_sink_count,
        triton=lambda r, p: f"k < {p.arg('n')}",
    )
)


# --------------------------------------------------------------------------- global(n)


def _global_classify(prim, qp, kp, env):
    n = prim.arg("n")
    return (qp.fmin < n) | (kp.fmin < n), (qp.fmax < n) | (kp.fmax < n), exact(len(qp.fa))


def _global_total(prim, q_len, kv_len, layout, env):
    # queries q = Lk - Lq .. Lk - 1: those below n see every key, the others the first n
    n = prim.arg("n")
    early = clamp(n - (kv_len - q_len), 0, q_len)
    return early * kv_len + (q_len - early) * clamp(n, 0, kv_len)


def _global_count(prim, engine, keys):
    q, k = engine.q, engine.k
    m, n = keys // engine.nkb, keys % engine.nkb
    rows = np.diff(q.starts)[m]
    cols = np.diff(k.starts)[n]
    lim = prim.arg("n")
    # pairs with q >= n and k >= n are the only ones refused (any layout: Side.below)
    q_low = np.bincount(q.tile, q.below(lim), q.n_tiles)
    k_low = np.bincount(k.tile, k.below(lim), k.n_tiles)
    refused = (rows - q_low.astype(np.int64)[m]) * (cols - k_low.astype(np.int64)[n])
    return rows * cols - refused


GLOBAL = register(
    Primitive(
        "global",
        params=(param("n", "int"),),
        check=_check_count,
        shape_args=None,
        check_sizes=None,
        reads_head=None,
        meaning=lambda prim, q, k, h, ctx, selection: (q < prim.arg("n")) | (k < prim.arg("n")),
        classify=_global_classify,
        needed_keys=lambda prim, qlo, qhi, qalo, qahi, env: (
            np.full_like(qlo, -BIG),
            np.where(qlo < prim.arg("n"), BIG, prim.arg("n") - 1),
            None,
            None,
        ),
        candidates=None,
        cost=4,
        band=None,
        total=_global_total,
        count=_global_count,
        triton=lambda r, p: f"(q < {p.arg('n')}) | (k < {p.arg('n')})",
    )
)


# --------------------------------------------------------------------------- summary(stride, width), landmarks(every)


def _summary(kp, stride: int, width: int):
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


def _periodic_total(q_len: int, kv_len: int, stride: int, width: int) -> int:
    w = min(max(width, 0), stride)
    periods, rest = divmod(kv_len, stride)
    return q_len * (periods * w + max(0, rest - (stride - w)))


def _periodic_keys(stride: int, width: int, a, s, n):
    """Allowed keys ``k % stride >= stride - width`` per key progression (runs of step 1 only), or None."""
    w = min(max(width, 0), stride)
    if not ((s == 1) | (n == 1)).all():
        return None

    def upto(x):  # allowed keys in [0, x)
        periods, rest = np.divmod(x, stride)
        return periods * w + np.maximum(0, rest - (stride - w))

    return upto(a + n) - upto(a)


def _check_summary(v, s, layout):
    require(v["stride"] >= 1, f"summary stride must be >= 1, got {v['stride']}", s["stride"])
    require(
        0 <= v["width"] <= v["stride"],
        f"summary width must be in 0..stride ({v['stride']}), got {v['width']}",
        s["width"],
    )


SUMMARY = register(
    Primitive(
        "summary",
        params=(param("stride", "int"), param("width", "int", 1)),
        check=_check_summary,
        shape_args=None,
        check_sizes=None,
        reads_head=None,
        meaning=lambda prim, q, k, h, ctx, selection: (
            torch.remainder(k, prim.arg("stride")) >= prim.arg("stride") - prim.arg("width")
        ).expand(sem._shape_of(q, k)),
        classify=lambda prim, qp, kp, env: _summary(kp, prim.arg("stride"), prim.arg("width")),
        needed_keys=None,
        candidates=None,
        cost=4,
        band=None,
        total=lambda prim, q_len, kv_len, layout, env: _periodic_total(
            q_len, kv_len, prim.arg("stride"), prim.arg("width")
        ),
        count=_by_keys(lambda prim, a, s, n: _periodic_keys(prim.arg("stride"), prim.arg("width"), a, s, n)),
        triton=lambda r, p: f"k % {p.arg('stride')} >= {p.arg('stride') - p.arg('width')}",
    )
)

LANDMARKS = register(
    Primitive(
        "landmarks",
        params=(param("every", "int"),),
        check=lambda v, s, layout: require(
            v["every"] >= 1, f"landmarks every must be >= 1, got {v['every']}", s["every"]
        ),
        shape_args=None,
        check_sizes=None,
        reads_head=None,
        meaning=lambda prim, q, k, h, ctx, selection: (
            torch.remainder(k, prim.arg("every")) == prim.arg("every") - 1
        ).expand(sem._shape_of(q, k)),
        classify=lambda prim, qp, kp, env: _summary(kp, prim.arg("every"), 1),
        needed_keys=None,
        candidates=None,
        cost=4,
        band=None,
        total=lambda prim, q_len, kv_len, layout, env: _periodic_total(q_len, kv_len, prim.arg("every"), 1),
        count=_by_keys(lambda prim, a, s, n: _periodic_keys(prim.arg("every"), 1, a, s, n)),
        triton=lambda r, p: f"k % {p.arg('every')} == {p.arg('every') - 1}",
    )
)
