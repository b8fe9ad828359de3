"""Context parallelism, planning at scale: the key tiles of every query tile in closed form (1-D patterns).

Comes in: a static 1-D pattern, the sequence length, the heads and the tile size. Goes out: the
:class:`~patterndsl.distributed.traffic.Visits` the plan implies (identity order), or None when
the pattern uses something this module has no closed form for (the caller plans instead).

The pattern is written as a union of terms; a term is an intersection of a band
``a <= q - k <= b`` (``causal``, ``window`` without dilation, any primitive whose ``band`` rule
has modulus 1), a key interval (``sink``, ``global``'s keys, ``blocks``' block) and a query
interval (``global``'s queries, ``blocks``' block), each bound possibly different per query tile
(``blocks``: one term per block a tile row meets). Within one tile row (queries ``q0..q1``) a
term reaches, for each query ``q``, the keys ``max(klo, q - b) .. min(khi, q - a)``: both ends grow
by at most one per query, so the keys reached by the row's queries are the single interval from
the first query that reaches any key to the last one, ``q`` in ``[max(q0, qlo, klo + a),
min(q1, qhi, khi + b)]``. A key tile is visited iff some term's interval meets it: exact, and
``O(terms x tiles)`` with no tile list of the attention's size.
"""

from __future__ import annotations

import numpy as np

from patterndsl import ir

#: Most terms a pattern's union of intersections may expand to before planning is cheaper.
MAX_TERMS = 64
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
    if pir.layout is not None or pir.inputs:
        return None
    n = -(-seq_len // block)
    m = np.arange(n, dtype=np.int64)
    rows = {"q0": m * block, "q1": np.minimum(m * block + block, seq_len) - 1}
    groups, _ = planner._head_groups(pir, heads)
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
