"""Stage 4 (block plan), grid patterns whose parts each read one axis: counted axis by axis.

Comes in: a static node on a grid layout and boxes (per-axis progressions of query and key
coordinates). Goes out: the allowed pairs of every box. When the node is an intersection (or a
union) of parts that each read one grid axis (``where(k.x >= q.x // 8 * 8 - 3)``, HaloNet's
blocks with halos), a box's pairs are a product over axes: a pair is allowed exactly when its
coordinates on each axis are, so the count is the product of per-axis counts (a union is the
complement of the intersection of the complements). Each axis is evaluated on the distinct
(query range, key range) pairs of that axis only, a few hundred elements where the boxes hold
millions of pairs.
"""

from __future__ import annotations

import numpy as np
import torch

from patterndsl import ir, primitives, semantics
from patterndsl.primitives.common import distinct_rows

#: Elements evaluated at a time.
_CHUNK = 1 << 22


def _axes_of(node: ir.Node, layout: ir.Layout) -> frozenset | None:
    """Grid axes the node reads (None: flattened positions or unknown)."""
    out = frozenset()
    for p in ir.walk(node):
        if not isinstance(p, ir.Prim):
            continue
        rule = primitives.lookup(p.name).axes
        axes = None if rule is None else rule(p, layout)
        if axes is None:
            return None
        out |= frozenset(axes)
    return out


class AxisSplit:
    """A static grid node as an intersection or union of parts that each read one axis.

    Args:
        node: a static pattern node.
        layout: the grid layout (None: not usable).
    """

    def __init__(self, node: ir.Node, layout: ir.Layout | None):
        self.union = isinstance(node, ir.Union)
        items = node.items if isinstance(node, (ir.Inter, ir.Union)) else (node,)
        groups: dict[int, list[ir.Node]] = {}
        self.usable = layout is not None and not ir.is_dynamic(node)
        for item in items if self.usable else ():
            axes = _axes_of(item, layout)
            if axes is None or len(axes) != 1:
                self.usable = False
                break
            groups.setdefault(next(iter(axes)), []).append(item)
        self.usable = self.usable and len(groups) > 1
        combine = ir.union if self.union else ir.inter
        self.parts = {x: combine(*group) for x, group in groups.items()} if self.usable else {}

    def count_pieces(self, engine, qi: np.ndarray, ki: np.ndarray) -> tuple[np.ndarray, int]:
        """Allowed pairs of every pair of pieces ``(engine.q piece qi[i], engine.k piece ki[i])`` and the
        elements evaluated for them.

        A pair's count is the product over axes of per-axis counts, each evaluated once per distinct
        (query progression, key progression) of that axis: the distinct progressions are found on the
        sides' pieces (a few thousand) and a pair of pieces is a pair of their indices, so no
        ``[pairs, 6]`` rows are built and sorted (HaloNet at a million tokens: 314,000 tiles a head).
        """
        q, k = engine.q, engine.k
        total = np.ones(len(qi), np.int64)
        elements = 0
        for x in range(q.n.shape[1]):
            if x not in self.parts:
                total *= q.n[qi, x] * k.n[ki, x]
                continue
            quniq, qid = distinct_rows(np.stack([q.a[:, x], q.s[:, x], q.n[:, x]], 1))
            kuniq, kid = distinct_rows(np.stack([k.a[:, x], k.s[:, x], k.n[:, x]], 1))
            code = qid[qi] * len(kuniq) + kid[ki]
            if len(quniq) * len(kuniq) <= 4 * len(code) + 4096:
                present = np.zeros(len(quniq) * len(kuniq), bool)
                present[code] = True
                codes = np.flatnonzero(present)
                inv = (np.cumsum(present) - 1)[code]
            else:
                codes, inv = np.unique(code, return_inverse=True)
            uniq = np.concatenate([quniq[codes // len(kuniq)], kuniq[codes % len(kuniq)]], 1)
            allowed, spent = self._axis_counts(engine, x, uniq)
            elements += spent
            c = allowed[inv.reshape(-1)]
            total *= q.n[qi, x] * k.n[ki, x] - c if self.union else c
        if self.union:
            total = q.n[qi].prod(1) * k.n[ki].prod(1) - total
        return total, elements

    def _axis_counts(self, engine, x: int, uniq: np.ndarray) -> tuple[np.ndarray, int]:
        # Positions with every other coordinate 0: the part reads axis x alone.
        sizes = uniq[:, 2] * uniq[:, 5]
        nq, nk = engine.q.extents[x], engine.k.extents[x]
        if nq * nk <= min(int(sizes.sum()), _DENSE_AXIS):
            return _lattice_counts(self._axis_matrix(engine, x, nq, nk), uniq), nq * nk
        stride = engine.q.strides[x]
        out = np.zeros(len(uniq), np.int64)
        sizes = uniq[:, 2] * uniq[:, 5]
        start = 0
        while start < len(uniq):
            step = max(1, _CHUNK // max(int(sizes[start:].max()), 1))
            part = uniq[start : start + step]
            wq, wk = int(part[:, 2].max()), int(part[:, 5].max())
            tq, tk = np.arange(wq, dtype=np.int64)[None, :], np.arange(wk, dtype=np.int64)[None, :]
            qi = (part[:, 0:1] + part[:, 1:2] * np.minimum(tq, part[:, 2:3] - 1)) * stride
            ki = (part[:, 3:4] + part[:, 4:5] * np.minimum(tk, part[:, 5:6] - 1)) * stride
            valid = torch.from_numpy((tq < part[:, 2:3])[:, :, None] & (tk < part[:, 5:6])[:, None, :])
            i = torch.from_numpy(qi - engine.env.offset)[:, :, None]
            j = torch.from_numpy(ki)[:, None, :]
            val = semantics.evaluate(self.parts[x], i, j, engine.env.head, engine.ctx) & valid
            out[start : start + len(part)] = val.flatten(1).sum(1).numpy()
            start += len(part)
        return out, int(sizes.sum())

    def _axis_matrix(self, engine, x: int, nq: int, nk: int) -> np.ndarray:
        """The part of axis ``x`` on every (query coordinate, key coordinate) of that axis, ``[nq, nk]`` bool."""
        stride = engine.q.strides[x]
        i = torch.arange(nq, dtype=torch.int64)[:, None] * stride - engine.env.offset
        j = torch.arange(nk, dtype=torch.int64)[None, :] * engine.k.strides[x]
        val = semantics.evaluate(self.parts[x], i, j, engine.env.head, engine.ctx)
        return val.expand(nq, nk).numpy()


#: Most elements of one axis's (query coordinate, key coordinate) matrix :meth:`AxisSplit._axis_counts`
#: evaluates whole (when that is fewer than the distinct progressions' pairs).
_DENSE_AXIS = 1 << 24


def _lattice_counts(matrix: np.ndarray, uniq: np.ndarray) -> np.ndarray:
    """Per row ``(aq, sq, nq, ak, sk, nk)`` of ``uniq``, the true entries of ``matrix`` at rows ``aq + sq * t``
    (``t < nq``) and columns ``ak + sk * u`` (``u < nk``): four lookups in the 2-D prefix sums of the
    sub-lattice ``matrix[aq % sq :: sq, ak % sk :: sk]``, one table per distinct (steps, residues)."""
    aq, sq, nq, ak, sk, nk = (uniq[:, c].astype(np.int64) for c in range(6))
    sq, sk = np.where(nq > 1, sq, 1), np.where(nk > 1, sk, 1)  # one coordinate: any step
    rq, rk = aq % sq, ak % sk
    out = np.zeros(len(uniq), np.int64)
    lattices, which = distinct_rows(np.stack([sq, rq, sk, rk], 1))
    for g, (step_q, res_q, step_k, res_k) in enumerate(lattices.tolist()):
        rows = np.flatnonzero(which == g)
        sub = matrix[res_q::step_q, res_k::step_k]
        prefix = np.zeros((sub.shape[0] + 1, sub.shape[1] + 1), np.int64)
        np.cumsum(np.cumsum(sub, 0), 1, out=prefix[1:, 1:])
        i0, j0 = (aq[rows] - res_q) // step_q, (ak[rows] - res_k) // step_k
        i1, j1 = i0 + nq[rows], j0 + nk[rows]
        out[rows] = prefix[i1, j1] - prefix[i0, j1] - prefix[i1, j0] + prefix[i0, j0]
    return out
