"""The predicate primitive ``where(pred)``: every rule, for every stage.

Comes in: nothing at import but the registry. Goes out: one registered record
and the linear-form helpers (:func:`linear_form`, :func:`halfplane_of`) that
recognise a predicate ``c_q * q + c_k * k + c0 >= 0``, which the tile rules
decide exactly; any other predicate is evaluated element by element.
"""

from __future__ import annotations

import numpy as np
import torch

from patterndsl import ir
from patterndsl import semantics as sem
from patterndsl.errors import PatternTypeError
from patterndsl.primitives import intervals, residues
from patterndsl.primitives.common import BIG, cdiv, distinct_rows, exact, fdiv, param
from patterndsl.primitives.registry import Primitive, register


def linear_form(expr: ir.Expr, env):
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


def halfplane_of(pred: ir.Expr, env):
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


def _halfplane(qp, kp, cq: np.ndarray, ck: np.ndarray, c0: int):
    """``sum(cq * q_coords) + sum(ck * k_coords) + c0 >= 0``; exact on any product pieces."""

    def extremes(p, c):
        lo = np.where(c >= 0, p.a, p.last) * c
        hi = np.where(c >= 0, p.last, p.a) * c
        return lo.sum(1), hi.sum(1)

    qlo, qhi = extremes(qp, cq)
    klo, khi = extremes(kp, ck)
    nonempty = qhi + khi + c0 >= 0
    full = qlo + klo + c0 >= 0
    return nonempty, full, np.ones_like(nonempty)


def _where_check(v, s, layout):
    pred = v["pred"]
    if isinstance(pred, bool):
        return ir.FULL if pred else ir.EMPTY
    return None


def _where_sizes(prim, q_len, kv_len, heads, layout):
    from patterndsl import check

    check._check_divisors(prim.arg("pred"), {"Lq": q_len, "Lk": kv_len}, heads)
    ranges = check.variable_ranges(q_len, kv_len, heads[-1] + 1, layout)  # heads: an increasing range
    check.check_int64(prim.arg("pred"), ranges, f"Lq={q_len}, Lk={kv_len}")


def _where_meaning(prim, q, k, h, ctx, selection) -> torch.Tensor:
    env = {"q": q, "k": k, "h": h, "Lq": ctx.q_len, "Lk": ctx.kv_len, "layout": ctx.layout}
    env["inputs"] = getattr(ctx, "inputs", None)
    value = sem._expr(prim.arg("pred"), env)
    is_bool = value.dtype == torch.bool if isinstance(value, torch.Tensor) else isinstance(value, bool)
    if not is_bool:
        raise PatternTypeError("where(...) needs a comparison or logic, not an integer", prim.span)
    if isinstance(value, bool):
        return sem._full_like(value, q, k, h)
    return value.expand(sem._shape_of(value, q, k, h))


def one_side(pred: ir.Expr) -> str | None:
    """``"q"`` or ``"k"`` when ``pred`` reads the positions of that side only (else None)."""
    sides = set()
    for e in ir.walk_expr(pred):
        if isinstance(e, ir.Var) and e.name in ("q", "k"):
            sides.add(e.name)
        elif isinstance(e, ir.Coord):
            sides.add(e.side)
    return sides.pop() if len(sides) == 1 else None


#: Elements of one-sided pieces evaluated at a time.
_SIDE_CHUNK = 1 << 20


def side_facts(prim, p, side: str, env) -> tuple[np.ndarray, np.ndarray]:
    """Per piece ``p`` of ``side``, the allowed positions of a one-sided predicate, and the piece's size.

    Each distinct piece is evaluated once per plan (``env.cache``); its elements are added to
    ``env.elements``. Exact for any predicate that reads one side: a box is then empty, full
    or partial as its piece on that side is.
    """
    rows = np.concatenate([p.a, p.s, p.n], 1)
    if not len(rows):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    uniq, inv = distinct_rows(rows)
    cache = env.cache.setdefault(("one side", prim, side), {})
    keys = [tuple(r) for r in uniq.tolist()]
    fresh = [i for i, key in enumerate(keys) if key not in cache]
    d = p.a.shape[1]
    strides = np.asarray(
        [int(np.prod(env.layout.shape[x + 1 :])) for x in range(d)] if env.layout is not None else [1], np.int64
    )
    sizes = uniq[:, 2 * d :].prod(1)
    start = 0
    while start < len(fresh):
        width = int(sizes[fresh[start]])
        part = fresh[start : start + max(1, _SIDE_CHUNK // max(width, 1))]
        width = int(sizes[part].max())
        a, s, n = uniq[part, :d], uniq[part, d : 2 * d], uniq[part, 2 * d :]
        t = np.arange(width, dtype=np.int64)[None, :]
        pos = np.zeros((len(part), width), np.int64)
        inner = np.ones(len(part), np.int64)
        for x in range(d - 1, -1, -1):
            pos += (a[:, x : x + 1] + s[:, x : x + 1] * ((t // inner[:, None]) % n[:, x : x + 1])) * strides[x]
            inner = inner * n[:, x]
        valid = t < sizes[part][:, None]
        env.elements += int(sizes[part].sum())
        tensor = torch.from_numpy(np.where(valid, pos, pos[:, :1]))
        value = _where_meaning(prim, tensor, tensor, env.head, env.sizes, None).numpy() & valid
        for i, c in zip(part, value.sum(1).tolist(), strict=True):
            cache[keys[i]] = c
        start += len(part)
    allowed = np.array([cache[key] for key in keys], np.int64)
    return allowed[inv.reshape(-1)], sizes[inv.reshape(-1)]


def _where_classify(prim, qp, kp, env):
    pred = prim.arg("pred")
    if isinstance(pred, ir.Const) and isinstance(pred.value, bool):
        v = np.full(len(qp.fa), pred.value)
        return v, v.copy(), exact(len(qp.fa))
    facts = env.cache.setdefault("where facts", {})  # the predicate's forms, once per plan (not per box batch)
    if (pred, env.head) not in facts:
        facts[pred, env.head] = halfplane_of(pred, env), one_side(pred)
    hp, side = facts[pred, env.head]
    if hp is not None:
        return _halfplane(qp, kp, *hp)
    periodic = residues.classify(prim, qp, kp, env)
    if periodic is not None:
        return periodic  # repeats with small periods in q and k: counted from residue histograms
    # Interval bounds over the pieces' hulls settle the pairs where the predicate cannot be
    # true or cannot be false; the engine refines the rest.
    can_true, can_false, sound = intervals.decide(pred, intervals.pieces_boxes(qp, kp), env)
    nonempty, full, ok = can_true, ~can_false, sound & ~(can_true & can_false)
    if side is not None and not ok.all():
        # Read on one side only: the pieces of that side decide the rest exactly.
        rest = np.flatnonzero(~ok)
        this, other = (qp, kp) if side == "q" else (kp, qp)
        allowed, size = side_facts(prim, this.take(rest), side, env)
        some = other.n[rest].prod(1) > 0
        nonempty[rest] = some & (allowed > 0)
        full[rest] = some & (allowed == size)
        ok[rest] = True
    return nonempty, full, ok


def _invert(e: ir.Expr, lo, hi):
    # ``lo <= e <= hi`` (arrays, None: unbounded) with ``e`` increasing in one key coordinate (``k.y``,
    # ``k.y + c``, ``k.y - c``, ``X // c`` with c > 0): ``(axis name, lo, hi)`` of that coordinate, or None.
    if isinstance(e, ir.Coord):
        return (e.axis, lo, hi) if e.side == "k" else None
    if not isinstance(e, ir.Arith) or not isinstance(e.right, ir.Const) or isinstance(e.right.value, bool):
        return None
    c = int(e.right.value)
    shift = {"+": -c, "-": c}.get(e.op)
    if shift is not None:
        return _invert(e.left, None if lo is None else lo + shift, None if hi is None else hi + shift)
    if e.op == "//" and c > 0:
        return _invert(e.left, None if lo is None else lo * c, None if hi is None else hi * c + c - 1)
    return None


def _coord_keys(pred: ir.Expr, qlo, qhi, qalo, qahi, env):
    # ``f(k.AXIS) op E`` (either side) with ``f`` increasing (``k.y``, ``(k.y + 3) // 7``) and ``E``
    # reading no key: the key coordinate lies where ``f`` meets E's interval over the query tile
    # (HaloNet's ``q.y // 8 * 8 - 3 <= k.y``, Swin's ``q.y // 7 == k.y // 7`` split in two), every
    # other axis anywhere. Per-axis ranges clipped to the grid (a flattened range of a box spans planes).
    if not isinstance(pred, ir.Cmp) or pred.op == "!=":
        return None
    for op, key, other in ((pred.op, pred.left, pred.right), (_FLIP[pred.op], pred.right, pred.left)):
        if any(
            (isinstance(e, ir.Var) and e.name == "k") or (isinstance(e, ir.Coord) and e.side == "k")
            for e in ir.walk_expr(other)
        ):
            continue  # E must read no key position or coordinate (one_side is None for mixed sides too)
        zero = np.zeros_like(qlo)
        boxes = intervals.Boxes(qlo, qhi, zero, zero, qalo, qahi, np.zeros_like(qalo), np.zeros_like(qahi))
        sound = np.ones(len(qlo), bool)
        lo, hi = intervals._as_int(intervals._eval(other, boxes, env, sound), len(qlo))
        if not sound.all():
            return None
        # in float64 (no int64 overflow on far-off bounds), widened by 2 after rounding: a superset
        lo, hi = lo.astype(np.float64) + (op == ">"), hi.astype(np.float64) - (op == "<")
        found = _invert(key, lo if op in (">=", ">", "==") else None, hi if op in ("<=", "<", "==") else None)
        if found is None:
            continue
        axis, klo, khi = found
        shape = np.asarray(env.layout.shape, np.int64)
        alo = np.zeros_like(qalo)
        ahi = np.broadcast_to(shape - 1, qahi.shape).copy()
        x = env.layout.names.index(axis)
        if klo is not None:
            alo[:, x] = np.clip(np.floor(klo) - 2, 0, shape[x])
        if khi is not None:
            ahi[:, x] = np.clip(np.ceil(khi) + 2, -1, shape[x] - 1)
        w = np.asarray([int(np.prod(env.layout.shape[a + 1 :])) for a in range(len(shape))], np.int64)
        return (alo * w).sum(1), (ahi * w).sum(1), alo, ahi
    return None


_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "=="}


def _where_keys(prim, qlo, qhi, qalo, qahi, env):
    if env.layout is not None:
        return _coord_keys(prim.arg("pred"), qlo, qhi, qalo, qahi, env)
    hp = halfplane_of(prim.arg("pred"), env)
    if hp is not None and env.layout is None:
        cq, ck, c0 = hp
        # cq*q + ck*k + c0 >= 0 with a single key coefficient bounds k on one side.
        if ck[0] > 0:
            lo = cdiv(-(c0 + np.maximum(cq[0] * qlo, cq[0] * qhi)), ck[0])
            return lo, np.full_like(qhi, BIG), None, None
        if ck[0] < 0:
            hi = fdiv(c0 + np.maximum(cq[0] * qlo, cq[0] * qhi), -ck[0])
            return np.full_like(qlo, -BIG), hi, None, None
    return None


def _where_candidates(engine, prim):
    # A half-plane has its needed key range; a constant reaches every key or none. Any other
    # predicate: branch and bound over key-tile ranges with its interval bounds.
    pred = prim.arg("pred")
    if isinstance(pred, ir.Const) or halfplane_of(pred, engine.env) is not None:
        return None
    return engine.search(lambda boxes: intervals.decide(pred, boxes, engine.env))


def _where_count(prim, engine, keys):
    if isinstance(prim.arg("pred"), ir.Const) or len(engine.q.extents) != 1:
        return None
    periodic = residues.tile_counts(prim, engine, keys)
    if periodic is not None:
        return periodic
    # One-sided predicates: a tile's pairs are its other side's size times its allowed positions.
    side = one_side(prim.arg("pred"))
    if side is None:
        return None
    this, other = (engine.q, engine.k) if side == "q" else (engine.k, engine.q)
    allowed, _ = side_facts(prim, this.piece_view(np.arange(len(this.tile))), side, engine.env)
    per_tile = np.bincount(this.tile, allowed, this.n_tiles).astype(np.int64)
    m, n = keys // engine.nkb, keys % engine.nkb
    mine, theirs = (m, n) if side == "q" else (n, m)
    return per_tile[mine] * np.diff(other.starts)[theirs]


def _where_band(prim, env):
    # In 1-D, a half-plane c * (q - k) + c0 >= 0 is a band.
    if env is None or env.layout is not None:
        return None
    hp = halfplane_of(prim.arg("pred"), env)
    if hp is not None and hp[0][0] == -hp[1][0] and hp[0][0] != 0:
        c, c0 = int(hp[0][0]), int(hp[2])
        if c > 0:  # q - k >= -c0 / c
            return -((c0) // c), BIG, 1
        return -BIG, (c0 // -c), 1  # q - k <= c0 / -c
    return None


def _where_periods(prim) -> tuple[int, ...]:
    # ``x % c`` is exact on residue classes of ``c`` (the interval rules track congruences).
    return tuple(
        abs(e.right.value)
        for e in ir.walk_expr(prim.arg("pred"))
        if isinstance(e, ir.Arith) and e.op == "%" and isinstance(e.right, ir.Const)
    )


def _where_shift_periods(prim, env) -> tuple[int, int] | None:
    # In 1-D: the meaning repeats when q moves by Pq and k by Pk (residues.periods).
    return None if env.layout is not None else residues.periods(prim.arg("pred"))


def _where_axes(prim, layout) -> tuple[int, ...] | None:
    # Grid coordinates name their axis; q and k themselves are flattened positions (every axis).
    axes = set()
    for e in ir.walk_expr(prim.arg("pred")):
        if isinstance(e, ir.Var) and e.name in ("q", "k"):
            return None
        if isinstance(e, ir.Coord):
            axes.add(layout.names.index(e.axis))
    return tuple(sorted(axes))


def _where_triton(r, p) -> str:
    pred = p.arg("pred")
    r.wide = r.needs_int64(pred)
    try:
        code, _ = r.expr(pred)
    finally:
        r.wide = False
    return code


WHERE = register(
    Primitive(
        "where",
        params=(param("pred", "pred"),),
        check=_where_check,
        shape_args=None,
        check_sizes=_where_sizes,
        reads_head=lambda prim: any(isinstance(e, ir.Var) and e.name == "h" for e in ir.walk_expr(prim.arg("pred"))),
        meaning=_where_meaning,
        classify=_where_classify,
        needed_keys=_where_keys,
        candidates=_where_candidates,
        cost=7,
        band=_where_band,
        total=None,  # its band total when it is a band
        count=_where_count,  # one-sided predicates; else its band count when a band, else by evaluation
        triton=_where_triton,
        joint_search=lambda prim, env: halfplane_of(prim.arg("pred"), env) is None,
        periods=_where_periods,
        shift_periods=_where_shift_periods,
        axes=_where_axes,
    )
)
