"""Context parallelism, planning at scale: the key tiles of every query tile in closed form.

Comes in: a static pattern, the sequence length, the heads and the tile size. Goes out: the
:class:`~patterndsl.distributed.traffic.Visits` the plan implies (identity order), or None when
the pattern uses something this module has no closed form for (the caller plans instead).

The pattern is written as a union of terms (``~`` and ``-`` by De Morgan: the complement of a
term is the union of the other sides of its bounds); a term is an intersection of a band
``a <= q - k <= b`` (``causal``, ``window`` without dilation, any primitive whose ``band`` rule
has modulus 1), a key interval (``sink``, ``global``'s keys, ``blocks``' block) and a query
interval (``global``'s queries, ``blocks``' block), each bound possibly different per query tile
(``blocks``: one term per block a tile row meets). Within one tile row (queries ``q0..q1``) a
term reaches, for each query ``q``, the keys ``max(klo, q - b) .. min(khi, q - a)``: both ends grow
by at most one per query, so the keys reached by the row's queries are the single interval from
the first query that reaches any key to the last one, ``q`` in ``[max(q0, qlo, klo + a),
min(q1, qhi, khi + b)]``. A key tile is visited iff some term's interval meets it: exact, and
``O(terms x tiles)`` with no tile list of the attention's size. On a grid, unions of
``neighborhood`` primitives (dilation 1) have a closed form too (:func:`_grid_visits`).
"""

from __future__ import annotations

import numpy as np

from patterndsl import ir

#: Most terms a pattern's union of intersections may expand to before planning is cheaper.
MAX_TERMS = 64
#: Tile rows of a grid pattern whose runs are listed at once (bounds the memory of one step).
ROW_CHUNK = 1 << 14
#: Bounds of a term: band ``a, b`` on ``q - k``, keys ``klo..khi``, queries ``qlo..qhi`` (inclusive).
FIELDS = ("a", "b", "klo", "khi", "qlo", "qhi")


def _terms(node: ir.Node, rows: dict, env) -> list[dict] | None:
    """``node`` as a list of terms (dicts of per-row bounds that broadcast), or None if not expressible."""
    from patterndsl import primitives

    if isinstance(node, ir.Union):
        out = []
        for item in node.items:
            got = _terms(item, rows, env)
            if got is None:
                return None
            out.extend(got)
        return out if len(out) <= MAX_TERMS else None
    if isinstance(node, ir.Inter):
        out = [{}]
        for item in node.items:
            got = _terms(item, rows, env)
            if got is None or len(out) * len(got) > MAX_TERMS:
                return None
            out = [_meet(x, y) for x in out for y in got]
        return out
    if isinstance(node, ir.Not):
        got = _terms(node.item, rows, env)
        return None if got is None else _complement(got)
    if not isinstance(node, ir.Prim):
        return None
    name = node.name
    if name == "full":
        return [{}]
    if name == "empty":
        return []
    if name == "sink":
        return [{"khi": node.arg("n") - 1}]
    if name == "global":
        return [{"qhi": node.arg("n") - 1}, {"khi": node.arg("n") - 1}]
    if name == "blocks":
        size = node.arg("size")
        j0, j1 = rows["q0"] // size, rows["q1"] // size
        spread = int((j1 - j0).max(initial=0)) + 1
        if spread > MAX_TERMS:
            return None
        out = []
        for t in range(spread):
            j = np.minimum(j0 + t, j1)
            out.append({"klo": j * size, "khi": j * size + size - 1, "qlo": j * size, "qhi": j * size + size - 1})
        return out
    record = primitives.lookup(name)
    if record.dynamic or record.grid or record.band is None:
        return None
    got = record.band(node, env)
    if got is None or got[2] != 1:
        return None
    return [{"a": got[0], "b": got[1]}]


#: The complement of each bound: the other side of it, as a bound of the other kind.
_OTHER_SIDE = {
    "a": ("b", -1),
    "b": ("a", 1),
    "klo": ("khi", -1),
    "khi": ("klo", 1),
    "qlo": ("qhi", -1),
    "qhi": ("qlo", 1),
}


def _complement(terms: list[dict]) -> list[dict] | None:
    """``~(t1 | t2 | ...)`` as terms: the intersection over terms of the union of each bound's other side."""
    out = [{}]
    for term in terms:
        sides = [{other: term[key] + step} for key, (other, step) in _OTHER_SIDE.items() if key in term]
        if len(out) * len(sides) > MAX_TERMS:
            return None
        out = [_meet(x, y) for x in out for y in sides]
    return out


def _meet(x: dict, y: dict) -> dict:
    """The intersection of two terms: the larger lower bounds and the smaller upper bounds."""
    out = dict(x)
    for key, value in y.items():
        if key not in out:
            out[key] = value
        elif key in ("a", "klo", "qlo"):
            out[key] = np.maximum(out[key], value)
        else:
            out[key] = np.minimum(out[key], value)
    return out


def closed_visits(pattern, seq_len: int, heads: int, block: int):
    """The :class:`Visits` of a static 1-D ``pattern`` in closed form, or None when it has none here."""
    from patterndsl.analysis import planner
    from patterndsl.analysis.classify import Env
    from patterndsl.distributed import traffic
    from patterndsl.sizes import Sizes

    pir = pattern.ir
    if pir.inputs:
        return None
    n = -(-seq_len // block)
    m = np.arange(n, dtype=np.int64)
    rows = {"q0": m * block, "q1": np.minimum(m * block + block, seq_len) - 1}
    groups, _ = planner._head_groups(pir, heads)
    if pir.layout is not None:
        return _grid_visits(groups, pir.layout, rows, block)
    sizes = Sizes(seq_len, seq_len, None, heads)
    edge = 2 * seq_len + 2
    out_row, out_lo, out_hi = [], [], []
    for node, hs in groups:
        terms = _terms(node, rows, Env(sizes, hs[0]))
        if terms is None:
            return None
        for term in terms:
            a = np.clip(term.get("a", -edge), -edge, edge)
            b = np.clip(term.get("b", edge), -edge, edge)
            klo = np.maximum(term.get("klo", 0), 0)
            khi = np.minimum(term.get("khi", seq_len - 1), seq_len - 1)
            qf = np.maximum(np.maximum(rows["q0"], term.get("qlo", 0)), klo + a)
            ql = np.minimum(np.minimum(rows["q1"], term.get("qhi", seq_len - 1)), khi + b)
            ok = (qf <= ql) & (a <= b) & (klo <= khi)
            lo = np.broadcast_to(np.maximum(klo, qf - b), (n,))[ok]
            hi = np.broadcast_to(np.minimum(khi, ql - a), (n,))[ok]
            out_row.append(m[ok])
            out_lo.append(lo // block)
            out_hi.append(hi // block + 1)
    if not out_row:
        return traffic.Visits(*(np.zeros(0, np.int64) for _ in range(3)), n)
    row, lo, hi = (np.concatenate(x).astype(np.int64) for x in (out_row, out_lo, out_hi))
    return traffic.Visits(*traffic.merge_runs(row, lo, hi), n)


# --------------------------------------------------------------------------- grids


def _neighborhoods(node: ir.Node) -> list[ir.Prim] | None:
    """The ``neighborhood`` primitives whose union ``node`` is (dilation 1), or None."""
    items = node.items if isinstance(node, ir.Union) else (node,)
    if not all(isinstance(p, ir.Prim) and p.name == "neighborhood" for p in items):
        return None
    return list(items)


def _grid_visits(groups, layout: ir.Layout, rows: dict, block: int):
    """Visits of a union of ``neighborhood`` primitives with dilation 1 on a grid, or None.

    A tile row's queries are lines of the last axis (``x0..x1`` at fixed leading coordinates).
    On every axis the key window of a coordinate is an interval whose ends never decrease and
    consecutive windows overlap (stride <= size), so a line reaches the box of the leading
    coordinates' windows times ``tlo[x0]..thi[x1]`` on the last axis: one key run per key
    coordinate of the leading axes (at most ``size`` per axis).
    """
    from patterndsl.distributed import traffic
    from patterndsl.primitives.neighborhood import neighborhood_axes, window_table

    shape = tuple(layout.shape)
    if not all(isinstance(e, int) for e in shape):
        return None
    found = []
    for node, _ in groups:
        prims = _neighborhoods(node)
        if prims is None:
            return None
        for prim in prims:
            axes = neighborhood_axes(prim, layout)
            if any(d != 1 for _, _, d, _, _ in axes):
                return None
            found.append(([a[1] for a in axes], [window_table(e, s, d, r, c) for e, s, d, r, c in axes]))
    n = rows["q0"].size
    parts = []
    for a in range(0, n, ROW_CHUNK):
        chunk = {key: value[a : a + ROW_CHUNK] for key, value in rows.items()}
        row, lo, hi = (
            np.concatenate(x) for x in zip(*(_box_runs(*f, shape, chunk, block) for f in found), strict=True)
        )
        row, lo, hi = traffic.merge_runs(row + a, lo, hi)
        parts.append((row, lo, hi))
    row, lo, hi = (np.concatenate(x).astype(np.int64) for x in zip(*parts, strict=True))
    return traffic.Visits(row, lo, hi, n)


def _box_runs(sizes: list[int], tables: list, shape: tuple[int, ...], rows: dict, block: int):
    """``(row, lo, hi)`` key tile runs (unmerged) of one neighborhood for the tile rows ``rows``."""
    width = shape[-1]
    first_line, last_line = rows["q0"] // width, rows["q1"] // width
    spread = int((last_line - first_line).max(initial=0)) + 1
    out_row, out_lo, out_hi = [], [], []
    for t in range(spread):
        line = first_line + t
        live = line <= last_line
        row, line = np.flatnonzero(live), line[live]
        x0 = np.maximum(rows["q0"][live] - line * width, 0)
        x1 = np.minimum(rows["q1"][live] - line * width, width - 1)
        xlo, xhi = tables[-1][0][x0], tables[-1][1][x1]
        # Leading axes: every key coordinate of the box, as offsets inside each window.
        coords = np.unravel_index(line, shape[:-1]) if len(shape) > 1 else ()
        flat, ok = np.zeros_like(line)[None, :], np.ones_like(line, dtype=bool)[None, :]
        for axis, c in enumerate(coords):
            tlo, thi = tables[axis]
            key = tlo[c][None, :] + np.arange(sizes[axis], dtype=np.int64)[:, None]
            good = key <= thi[c][None, :]
            flat = (flat[:, None, :] * shape[axis] + key[None, :, :]).reshape(-1, line.size)
            ok = (ok[:, None, :] & good[None, :, :]).reshape(-1, line.size)
        base = flat * width
        out_row.append(np.broadcast_to(row, flat.shape)[ok])
        out_lo.append((base + xlo)[ok] // block)
        out_hi.append((base + xhi)[ok] // block + 1)
    return (np.concatenate(x).astype(np.int64) for x in (out_row, out_lo, out_hi))
