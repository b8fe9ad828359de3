"""The grid primitive ``neighborhood(size, dilation, stride, causal)``: every rule, for every stage.

Comes in: nothing at import but the registry. Goes out: one registered record
and the per-axis window tables (:func:`window_table`, :func:`neighborhood_axes`)
the reordering heuristics read too. The rule itself, NATTEN's, is
:func:`patterndsl.semantics.neighborhood_axis` (LANGUAGE.md section 6).
"""

from __future__ import annotations

import functools

import numpy as np

from patterndsl import ir
from patterndsl import semantics as sem
from patterndsl.errors import PatternError
from patterndsl.primitives.common import BIG, broadcast_to_axes, need_layout, param, per_axis, require
from patterndsl.primitives.registry import Primitive, register

_ARGS = ("size", "dilation", "stride", "causal")


def neighborhood_axes(prim: ir.Prim, layout: ir.Layout):
    """Per axis: ``(extent, size, dilation, stride, causal)``."""
    rank = len(layout.shape)
    return list(zip(layout.shape, *(per_axis(prim.arg(a), rank) for a in _ARGS), strict=True))


@functools.lru_cache(maxsize=64)
def window_table(n: int, s: int, d: int, r: int, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """For every coordinate ``x < n``: the allowed key group indices ``tlo[x] <= t <= thi[x]`` (do not modify)."""
    x = np.arange(n, dtype=np.int64)
    g = x % d
    p = x // d
    m = (n - g + d - 1) // d
    if causal:
        lead = np.minimum((p // r) * r + r - 1, m - 1)
        return _frozen(np.maximum(lead - s + 1, 0), p)
    left, right = s // 2, s // 2 + (s % 2 - 1)
    lead = np.minimum((p // r) * r + r // 2, m - 1)
    centre = np.minimum(np.maximum(lead, left), m - 1 - right)
    return _frozen(centre - left, centre + right)


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False
    return arrays


# --------------------------------------------------------------------------- arguments


def _shape_args(values, spans, layout, span):
    broadcast_to_axes("neighborhood", _ARGS, values, spans, need_layout("neighborhood", layout, span))


def _check(v, s, layout):
    for axis, n, size, dilation, stride in zip(
        layout.names, layout.shape, v["size"], v["dilation"], v["stride"], strict=True
    ):
        if not isinstance(n, int):
            continue  # an extent not known while checking a file without parameter values
        where = f" on axis '{axis}'"
        require(size >= 1, f"neighborhood size must be >= 1{where}, got {size}", s["size"])
        require(dilation >= 1, f"neighborhood dilation must be >= 1{where}, got {dilation}", s["dilation"])
        require(
            1 <= stride <= size, f"neighborhood stride must be in 1..size ({size}){where}, got {stride}", s["stride"]
        )
        # The shortest dilation group is the last one, g = d - 1: m = ceil((n - g) / d).
        shortest = -(-(n - dilation + 1) // dilation)
        require(
            size <= shortest,
            f"neighborhood size {size} with dilation {dilation} does not fit axis '{axis}' of length {n} "
            f"(a dilation group has only {max(shortest, 0)} positions)",
            s["size"],
        )


# --------------------------------------------------------------------------- meaning


def _meaning(prim, q, k, h, ctx, selection):
    layout = sem._need_layout(ctx, prim)
    rank = len(layout.shape)
    sizes = sem._per_axis(prim.arg("size"), rank, "neighborhood size")
    dils = sem._per_axis(prim.arg("dilation"), rank, "neighborhood dilation")
    strides = sem._per_axis(prim.arg("stride"), rank, "neighborhood stride")
    causals = sem._per_axis(prim.arg("causal"), rank, "neighborhood causal")
    out = None
    for axis, (x, y) in enumerate(zip(sem.grid_coords(q, layout), sem.grid_coords(k, layout), strict=True)):
        part = sem.neighborhood_axis(x, y, layout.shape[axis], sizes[axis], dils[axis], strides[axis], causals[axis])
        out = part if out is None else out & part
    return out


# --------------------------------------------------------------------------- tile rules


def _mod(x, d: int):
    """``x % d`` (floored) of an int64 array: a mask when ``d`` is a power of two (a division per element
    was half of a dilated neighborhood's plan in identity order)."""
    return x & (d - 1) if d & (d - 1) == 0 else x % d


def _div(x, d: int):
    """``x // d`` (floored) of an int64 array: a shift when ``d`` is a power of two."""
    return x >> (d.bit_length() - 1) if d & (d - 1) == 0 else x // d


def _residue_range(a, s, n, d: int, g: int):
    """First and last element ``== g (mod d)`` of a progression (step 1 or a multiple of d)."""
    last = a + s * (n - 1)
    if d == 1:  # one group: every progression is in it (the modulo passes cost most of a plan's time)
        return np.ones(np.shape(a), bool), a, last
    first = a + _mod(g - a, d)
    end = last - _mod(last - g, d)
    single = (_mod(s, d) == 0) | (n == 1)
    present = np.where(single, _mod(a, d) == g, first <= last)
    first = np.where(single, a, first)
    end = np.where(single, last, end)
    return present, first, end


def _group_hit(tlo, thi, n: int, d: int, g, q, k) -> np.ndarray:
    """Whether some query of progression ``q`` in dilation group ``g`` has a key of ``k`` in its window."""
    qpres, x0, x1 = _residue_range(*q, d, g)
    kpres, y0, y1 = _residue_range(*k, d, g)
    x0c, x1c = np.clip(x0, 0, n - 1), np.clip(x1, 0, n - 1)
    if d == 1:
        return (tlo[x0c] <= y1) & (y0 <= thi[x1c])
    return qpres & kpres & (tlo[x0c] <= _div(y1, d)) & (_div(y0, d) <= thi[x1c])


def _classify(prim, qp, kp, env):
    if env.layout is None:
        return None
    axes = neighborhood_axes(prim, env.layout)
    size = len(qp.a)  # not qp.fa: the flattened view is never read here
    nonempty = np.ones(size, dtype=bool)
    full = np.ones(size, dtype=bool)
    ok = np.ones(size, dtype=bool)
    for x, (n, s, d, r, causal) in enumerate(axes):
        tlo, thi = window_table(n, s, d, r, causal)
        xa, xs, xn = qp.a[:, x], qp.s[:, x], qp.n[:, x]
        ya, ys, yn = kp.a[:, x], kp.s[:, x], kp.n[:, x]
        if d == 1:
            # No dilation: one group, no residues (the general case below, with its modulo passes,
            # was most of a 3-D plan's time on grids whose rows do not hold whole tiles).
            xf, xl = np.clip(xa, 0, n - 1), np.clip(xa + xs * (xn - 1), 0, n - 1)
            yl = ya + ys * (yn - 1)
            nonempty &= (tlo[xf] <= yl) & (ya <= thi[xl])
            full &= (tlo[xl] <= ya) & (yl <= thi[xf])
            ok &= ((xn == 1) | ((xs == 1) & (r <= s))) & ((yn == 1) | (ys == 1))
            continue
        # Within a group, windows move monotonically with the query and consecutive windows
        # overlap (stride <= size), so the union over a run of queries is one interval.
        q_ok = (xn == 1) | (((xs == 1) | (xs == d)) & (r <= s))
        k_ok = (yn == 1) | (ys == 1) | (ys == d)
        q_single = (xn == 1) | (_mod(xs, d) == 0)
        k_single = (yn == 1) | (_mod(ys, d) == 0)
        # A piece inside one dilation group (a single position, or a step of whole groups, as in
        # the dilation-group orders) meets only its own group: one residue per pair, not d.
        group = 0 if d == 1 else np.where(q_single, _mod(xa, d), _mod(ya, d))
        axis_n = _group_hit(tlo, thi, n, d, group, (xa, xs, xn), (ya, ys, yn))
        mixed = np.flatnonzero(~q_single & ~k_single)
        for g in range(d if len(mixed) else 0):
            axis_n[mixed] |= _group_hit(
                tlo, thi, n, d, g, (xa[mixed], xs[mixed], xn[mixed]), (ya[mixed], ys[mixed], yn[mixed])
            )
        same = q_single & k_single if d == 1 else q_single & k_single & (_mod(xa, d) == _mod(ya, d))
        xl = np.clip(xa + xs * (xn - 1), 0, n - 1)
        xf = np.clip(xa, 0, n - 1)
        yl = ya + ys * (yn - 1)
        axis_f = same & ((tlo[xl] <= _div(ya, d)) & (_div(yl, d) <= thi[xf]))
        nonempty &= axis_n
        full &= axis_f
        ok &= q_ok & k_ok
    return nonempty | ~ok, full & ok, ok


def _needed_keys(prim, qlo, qhi, qalo, qahi, env):
    if env.layout is None:
        return None
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
            x0 = qalo[:, x] + _mod(g - qalo[:, x], d)
            x1 = qahi[:, x] - _mod(qahi[:, x] - g, d)
            live = x0 <= x1
            lo_best = np.where(live, np.minimum(lo_best, ylo[np.clip(x0, 0, n - 1)]), lo_best)
            hi_best = np.where(live, np.maximum(hi_best, yhi[np.clip(x1, 0, n - 1)]), hi_best)
        alo[:, x], ahi[:, x] = lo_best, hi_best
    w = np.asarray([int(np.prod(env.layout.shape[x + 1 :])) for x in range(len(axes))], np.int64)
    return (alo * w).sum(1), (ahi * w).sum(1), alo, ahi


def _groups(side, dil: np.ndarray) -> np.ndarray | None:
    # The dilation group of every piece (one number per piece), when each piece lies in one group.
    if not ((side.n == 1) | (side.s % dil == 0)).all():
        return None
    radix = np.cumprod(np.concatenate([[1], dil[:-1]])).astype(np.int64)
    return ((side.a % dil) * radix).sum(1)


def _candidates(engine, prim):
    # Dilation-group orders: a query tile pairs only with key tiles of its own group on every axis,
    # which its bounds alone do not tell (they span every group): 16x fewer candidates at dilation
    # 4 on two axes. Any other order: the needed key ranges (None).
    layout = engine.env.layout
    if layout is None:
        return None
    dil = np.asarray([a[2] for a in neighborhood_axes(prim, layout)], np.int64)
    gq = None if (dil == 1).all() else _groups(engine.q, dil)
    gk = None if gq is None else _groups(engine.k, dil)
    if gk is None:
        return None
    if not (engine.q.single_piece and engine.k.single_piece):  # tiles across boxes or groups: piece by piece
        return engine.overlap_pieces(prim, gq, gk)
    from patterndsl.analysis.gridcands import Cells

    (qlo, qhi, qalo, qahi), (_, _, kalo, kahi) = engine.bounds()
    _, _, alo, ahi = _needed_keys(prim, qlo, qhi, qalo, qahi, engine.env)
    # the group as one more axis, a single position wide: every group's candidates in one pass
    cells = Cells(np.column_stack([kalo, gk]), np.column_stack([kahi, gk]))
    if cells.usable:
        rows, cols = np.arange(engine.nqb, dtype=np.int64), np.arange(engine.nkb, dtype=np.int64)
        return cells.meeting(np.column_stack([alo, gq]), np.column_stack([ahi, gq]), rows, cols, engine.nkb)
    parts = []
    for g in np.unique(gq).tolist():
        rows, cols = np.flatnonzero(gq == g), np.flatnonzero(gk == g)
        if len(cols):
            parts.append(engine.overlap_axes(alo[rows], ahi[rows], rows, cols))
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _total(prim, q_len, kv_len, layout, env):
    if layout is None:
        return None
    total = 1
    for n, s, d, r, c in neighborhood_axes(prim, layout):
        lo, hi = window_table(n, s, d, r, c)
        total *= int((hi - lo + 1).sum())
    return total


# --------------------------------------------------------------------------- Triton


def _triton_axis(r, axis: str, n: int, size: int, dil: int, stride: int, causal: bool) -> str:
    x, y = r.coord("q", axis), r.coord("k", axis)
    parts = []
    if dil == 1:
        p, t, glen = x, y, str(n)
    else:
        g = r.bind("g_", f"{x} % {dil}")
        parts.append(f"{y} % {dil} == {g}")
        p = r.bind("p_", f"{x} // {dil}")
        t = r.bind("t_", f"{y} // {dil}")
        glen = r.bind("len_", f"({n} - {g} + {dil - 1}) // {dil}")
    base = p if stride == 1 else f"({p} // {stride}) * {stride}"
    if causal:
        lead = r.bind("lead_", f"tl.minimum({base} + {stride - 1}, {glen} - 1)")
        parts += [f"{t} <= {p}", f"{lead} - {t} < {size}"]
    else:
        left = size // 2
        right = size // 2 + (size % 2 - 1)
        lead = r.bind("lead_", f"tl.minimum({base} + {stride // 2}, {glen} - 1)")
        centre = r.bind("c_", f"tl.minimum(tl.maximum({lead}, {left}), {glen} - {1 + right})")
        parts += [f"{t} >= {centre} - {left}", f"{t} <= {centre} + {right}"]
    return r.all_of(parts)


def _triton(r, p) -> str:
    if r.layout is None:
        raise PatternError("neighborhood(...) needs a layout grid(...)")
    rank = len(r.layout.axes)

    def per_axis(value):
        return tuple(value) if isinstance(value, tuple) else (value,) * rank

    sizes, dils, strides, causals = (per_axis(p.arg(a)) for a in _ARGS)
    parts = [
        _triton_axis(r, name, extent, sizes[a], dils[a], strides[a], bool(causals[a]))
        for a, (name, extent) in enumerate(r.layout.axes)
    ]
    return r.all_of(parts)


NEIGHBORHOOD = register(
    Primitive(
        "neighborhood",
        params=(
            param("size", "ints"),
            param("dilation", "ints", 1),
            param("stride", "ints", 1),
            param("causal", "bools", False),
        ),
        check=_check,
        shape_args=_shape_args,
        check_sizes=None,
        reads_head=None,
        meaning=_meaning,
        classify=_classify,
        needed_keys=_needed_keys,
        candidates=_candidates,
        cost=1,
        band=None,
        total=_total,
        count=None,  # by evaluation
        triton=_triton,
        grid=True,
    )
)
