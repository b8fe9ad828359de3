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

import collections
import functools
import itertools

import numpy as np
import torch

from patterndsl import ir, primitives, semantics
from patterndsl.primitives.common import distinct_rows
from patterndsl.primitives.neighborhood import neighborhood_axes

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
        static = self.usable
        for item in items if self.usable else ():
            axes = _axes_of(item, layout)
            if axes is None or len(axes) != 1:
                self.usable = False
                break
            groups.setdefault(next(iter(axes)), []).append(item)
        self.usable = self.usable and len(groups) > 1
        combine = ir.union if self.union else ir.inter
        self.parts = {x: combine(*group) for x, group in groups.items()} if self.usable else {}
        #: A union of products over axes (:func:`_product_terms`), counted by inclusion-exclusion; None
        #: when the parts above apply or the node is not of that form.
        self.terms = None
        lone = isinstance(node, ir.Prim) and node.name == "neighborhood"  # counted as one product
        if static and not self.usable and (isinstance(node, (ir.Inter, ir.Union)) or lone):
            self.terms = _product_terms(node, layout)
            self.usable = self.terms is not None

    @classmethod
    def counting(cls, node: ir.Node, layout: ir.Layout | None) -> AxisSplit | None:
        """A split that counts ``node`` (holding a ``global``) as a union of products over axes, the
        global's rows and columns among the terms (:func:`_product_terms` with ``keys_too``); None
        when it is not one. For counting only: the terms of a global's rows bound no key."""
        if (
            layout is None
            or ir.is_dynamic(node)
            or not any(isinstance(p, ir.Prim) and p.name == "global" for p in ir.walk(node))
        ):
            return None
        terms = _product_terms(node, layout, keys_too=True)
        if terms is None:
            return None
        split = cls(ir.EMPTY, None)
        split.union, split.usable, split.terms = True, True, terms
        return split

    def count_pieces(self, engine, qi: np.ndarray, ki: np.ndarray) -> tuple[np.ndarray, int]:
        """Allowed pairs of every pair of pieces ``(engine.q piece qi[i], engine.k piece ki[i])`` and the
        elements evaluated for them.

        A pair's count is the product over axes of per-axis counts, each evaluated once per distinct
        (query progression, key progression) of that axis: the distinct progressions are found on the
        sides' pieces (a few thousand) and a pair of pieces is a pair of their indices, so no
        ``[pairs, 6]`` rows are built and sorted (HaloNet at a million tokens: 314,000 tiles a head).
        """
        if self.terms is not None:
            return self._count_terms(engine, qi, ki)
        q, k = engine.q, engine.k
        total = np.ones(len(qi), np.int64)
        elements = 0
        for x in range(q.n.shape[1]):
            if x not in self.parts:
                total *= q.n[qi, x] * k.n[ki, x]
                continue
            uniq, inv = _axis_pairs(q, k, qi, ki, x)
            allowed, spent = self._axis_counts(engine, x, uniq)
            elements += spent
            c = allowed[inv]
            total *= q.n[qi, x] * k.n[ki, x] - c if self.union else c
        if self.union:
            total = q.n[qi].prod(1) * k.n[ki].prod(1) - total
        return total, elements

    def _count_terms(self, engine, qi: np.ndarray, ki: np.ndarray) -> tuple[np.ndarray, int]:
        """:meth:`count_pieces` of a union of products over axes: by inclusion-exclusion over the terms,
        the pairs of an intersection of terms being the product over axes of its per-axis counts (each
        term's factor on an axis is one ``[n, n]`` matrix, a subset's the AND of its terms'). The matrices
        and their prefix sums are kept (:func:`_cached`) for the next engine of the same plan (every
        candidate order and sample asks for the same ones)."""
        q, k = engine.q, engine.k
        rank = q.n.shape[1]
        where, term_matrix, spent = self._term_tables(engine)
        pairs = {}
        total = np.zeros(len(qi), np.int64)
        for r in range(1, len(self.terms) + 1):
            for subset in itertools.combinations(self.terms, r):
                prod = np.ones(len(qi), np.int64)
                for x in range(rank):
                    found = tuple(tuple(term[x]) for term in subset if x in term)
                    if not found:
                        prod *= q.n[qi, x] * k.n[ki, x]
                        continue
                    if x not in pairs:
                        pairs[x] = _axis_pairs(q, k, qi, ki, x)
                    uniq, inv = pairs[x]

                    def matrix(x=x, found=found):
                        return functools.reduce(np.logical_and, [term_matrix(x, f) for f in found])

                    key = _key(("and", found, x, *where), [f for fs in found for f in fs])
                    prod *= _lattice_counts(matrix, uniq, key)[inv]
                total += prod if r % 2 else -prod
        return total, spent[0]

    def _term_tables(self, engine):
        """``(where, term_matrix, spent)``: the plan's key of the tables, ``term_matrix(x, factors)`` (the
        kept matrix of a term's factors on axis ``x``) and the elements evaluated making them (``spent[0]``)."""
        where = (engine.env.layout, engine.env.head, engine.env.offset, engine.ctx.q_len, engine.ctx.kv_len)
        spent = [0]

        def term_matrix(x, factors):
            def make():
                out = self._term_matrix(engine, x, factors)
                spent[0] += out.size
                return out

            return _cached(_key(("term", tuple(factors), x, *where), factors), make)

        return where, term_matrix, spent

    def total(self, engine) -> tuple[int, int] | None:
        """Allowed pairs of a union of products over axes over the whole grid (every query and key), and
        the elements evaluated for them: by inclusion-exclusion over the terms, an intersection's pairs
        being the product over axes of its AND matrix's true entries. None when the queries are not the
        whole grid (``Lq < Lk``) or the node is not such a union."""
        layout = engine.env.layout
        if self.terms is None or layout is None or not engine.ctx.q_len == engine.ctx.kv_len == layout.size:
            return None
        _, term_matrix, spent = self._term_tables(engine)
        total = 0
        for r in range(1, len(self.terms) + 1):
            for subset in itertools.combinations(self.terms, r):
                prod = 1
                for x, extent in enumerate(layout.shape):
                    found = [tuple(term[x]) for term in subset if x in term]
                    if not found:
                        prod *= extent * extent
                        continue
                    matrix = functools.reduce(np.logical_and, [term_matrix(x, f) for f in found])
                    prod *= int(np.count_nonzero(matrix))
                total += prod if r % 2 else -prod
        return total, spent[0]

    def _term_matrix(self, engine, x: int, factors) -> np.ndarray:
        """The AND of a term's factors on axis ``x``, ``[n, n]`` bool over (query, key) coordinates."""
        n = engine.q.extents[x]
        out = np.ones((n, n), bool)
        for factor in factors:
            if isinstance(factor, ir.Prim) and factor.name == "neighborhood":  # NATTEN's rule on this axis
                _n, size, dil, stride, causal = neighborhood_axes(factor, engine.env.layout)[x]
                c = torch.arange(n, dtype=torch.int64)
                out &= semantics.neighborhood_axis(c[:, None], c[None, :], n, size, dil, stride, causal).numpy()
            else:
                out &= _node_axis_matrix(factor, engine, x, n, n)
        return out

    def _axis_counts(self, engine, x: int, uniq: np.ndarray) -> tuple[np.ndarray, int]:
        # Positions with every other coordinate 0: the part reads axis x alone.
        sizes = uniq[:, 2] * uniq[:, 5]
        nq, nk = engine.q.extents[x], engine.k.extents[x]
        if nq * nk <= min(int(sizes.sum()), _DENSE_AXIS):
            spent = []  # the matrix is evaluated once per plan (kept, as a product union's are)

            def matrix():
                spent.append(nq * nk)
                return self._axis_matrix(engine, x, nq, nk)

            where = (engine.env.layout, engine.env.head, engine.env.offset, engine.ctx.q_len, engine.ctx.kv_len)
            key = _key(("part", self.parts[x], x, *where), [self.parts[x]])
            return _lattice_counts(matrix, uniq, key), sum(spent)
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
        return _node_axis_matrix(self.parts[x], engine, x, nq, nk)


def _node_axis_matrix(node: ir.Node, engine, x: int, nq: int, nk: int) -> np.ndarray:
    """``node`` (reading axis ``x`` alone) on every (query coordinate, key coordinate) of that axis, ``[nq, nk]``
    bool: positions with every other coordinate 0."""
    i = torch.arange(nq, dtype=torch.int64)[:, None] * engine.q.strides[x] - engine.env.offset
    j = torch.arange(nk, dtype=torch.int64)[None, :] * engine.k.strides[x]
    val = semantics.evaluate(node, i, j, engine.env.head, engine.ctx)
    return val.expand(nq, nk).numpy()


def _axis_pairs(q, k, qi: np.ndarray, ki: np.ndarray, x: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (query progression, key progression) pairs on axis ``x`` of the piece pairs ``(qi, ki)``
    (rows ``(aq, sq, nq, ak, sk, nk)``) and each piece pair's row."""
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
    return uniq, inv.reshape(-1)


#: Most terms a union of products over axes may have (its intersections: ``2 ** terms - 1``, 63 at most).
MAX_TERMS = 6


def _causal_alternatives(layout: ir.Layout) -> list[dict]:
    """``causal`` (``k <= q`` in row-major positions) on a grid as disjoint products over axes: the key's
    first differing coordinate is lower, or every coordinate is equal up to a last one not higher."""
    names = layout.names
    out = []
    for i in range(len(names)):
        term = {}
        for j in range(i + 1):
            op = "==" if j < i else ("<=" if i == len(names) - 1 else "<")
            pred = ir.Cmp(op, ir.Coord("k", names[j]), ir.Coord("q", names[j]))
            term[j] = [ir.Prim("where", (("pred", pred),))]
        out.append(term)
    return out


def _below_terms(side: str, n: int, layout: ir.Layout) -> list[dict] | None:
    """``side < n`` (a row-major position) on a grid as disjoint products over axes: the coordinates equal
    to ``n``'s mixed-radix digits up to one that is lower (``q < 16`` on a 125-wide grid: ``q.y == 0 and
    q.x < 16``); digits 0 give no term. None when ``n`` covers the grid (the node is then simpler)."""
    if n >= layout.size:
        return None
    digits, rest = [], max(n, 0)
    for extent in reversed(layout.shape):
        digits.append(rest % extent)
        rest //= extent
    digits.reverse()
    out = []
    for i, digit in enumerate(digits):
        if digit == 0:
            continue
        term = {}
        for j in range(i + 1):
            op, value = ("==", digits[j]) if j < i else ("<", digit)
            pred = ir.Cmp(op, ir.Coord(side, layout.names[j]), ir.Const(value))
            term[j] = [ir.Prim("where", (("pred", pred),))]
        out.append(term)
    return out


def _global_alternatives(atom: ir.Prim, layout: ir.Layout) -> list[dict] | None:
    """``global(n)`` (``q < n or k < n``) on a grid as products over axes (:func:`_below_terms` of each side)."""
    rows = _below_terms("q", atom.arg("n"), layout)
    cols = _below_terms("k", atom.arg("n"), layout)
    return None if rows is None or cols is None else rows + cols


def _joined(a: dict, b: dict) -> dict:
    """The intersection of two products over axes: per axis, both factor lists."""
    return {x: a.get(x, []) + b.get(x, []) for x in sorted(a.keys() | b.keys())}


def _product_terms(node: ir.Node, layout: ir.Layout, keys_too: bool = False) -> list[dict] | None:
    """``node`` as a union of products over axes, or None.

    A term is an intersection of factors, each a neighborhood (NATTEN's rule is a product over axes of a
    rule on one axis) or a node reading one grid axis; ``causal`` stands for its disjoint products over
    axes (:func:`_causal_alternatives`), distributed over the other factors of its intersection
    (``causal & neighborhood(7)``: two terms on a 2-D grid). Terms reading one axis alone are joined into
    one term per axis (``where(k.y == q.y) | where(k.y == q.y + 1)``). Returns per term
    ``{axis: [factors]}``, a neighborhood listed on every axis; None without a neighborhood (the parts of
    :class:`AxisSplit` cover the rest), with more than :data:`MAX_TERMS` terms, with axes the terms cannot
    be laid out over (more than :data:`_DENSE_AXIS` coordinate pairs), or with any other factor.
    With ``keys_too``, ``global(n)`` stands for its products over axes too (:func:`_global_alternatives`;
    for counting only: the terms of its rows bound no key).
    """
    rank = len(layout.shape)
    if rank < 2 or any(n * n > _DENSE_AXIS for n in layout.shape):
        return None
    items = node.items if isinstance(node, ir.Union) else (node,)
    terms, single, product = [], {}, False
    for item in items:
        atoms = item.items if isinstance(item, ir.Inter) else (item,)
        alternatives: list[dict[int, list]] = [{}]  # the item's terms: products over axes
        for atom in atoms:
            if isinstance(atom, ir.Prim) and atom.name == "causal":
                choices = _causal_alternatives(layout)
            elif keys_too and isinstance(atom, ir.Prim) and atom.name == "global":
                choices = _global_alternatives(atom, layout)
                if choices is None:
                    return None
            elif isinstance(atom, ir.Prim) and atom.name == "neighborhood":
                product = True
                choices = [{x: [atom] for x in range(rank)}]
            else:
                axes = _axes_of(atom, layout)
                if axes is None or len(axes) != 1:
                    return None
                choices = [{next(iter(axes)): [atom]}]
            alternatives = [_joined(a, c) for a in alternatives for c in choices]
            if len(alternatives) > MAX_TERMS:
                return None
        for term in alternatives:
            if len(term) == 1 and not any(isinstance(f, ir.Prim) and f.name == "neighborhood" for f in atoms):
                ((x, factors),) = term.items()
                single.setdefault(x, []).append(factors)
            else:
                terms.append(term)
    # one term per axis: its factors as they are (their key ranges bound it), or the union of several
    terms += [
        {x: group[0] if len(group) == 1 else [ir.union(*(ir.inter(*f) for f in group))]} for x, group in single.items()
    ]
    return terms if product and len(terms) <= MAX_TERMS else None


#: Most elements of one axis's (query coordinate, key coordinate) matrix :meth:`AxisSplit._axis_counts`
#: evaluates whole (when that is fewer than the distinct progressions' pairs).
_DENSE_AXIS = 1 << 24


def _lattice_counts(matrix, uniq: np.ndarray, key=None) -> np.ndarray:
    """Per row ``(aq, sq, nq, ak, sk, nk)`` of ``uniq``, the true entries of ``matrix`` at rows ``aq + sq * t``
    (``t < nq``) and columns ``ak + sk * u`` (``u < nk``): four lookups in the 2-D prefix sums of the
    sub-lattice ``matrix[aq % sq :: sq, ak % sk :: sk]``, one table per distinct (steps, residues).
    ``matrix``: the bool matrix, or a function making it (not called when every table is kept under
    ``key``)."""
    aq, sq, nq, ak, sk, nk = (uniq[:, c].astype(np.int64) for c in range(6))
    sq, sk = np.where(nq > 1, sq, 1), np.where(nk > 1, sk, 1)  # one coordinate: any step
    rq, rk = aq % sq, ak % sk
    out = np.zeros(len(uniq), np.int64)
    lattices, which = distinct_rows(np.stack([sq, rq, sk, rk], 1))
    made = []

    def prefix_of(step_q, res_q, step_k, res_k):
        if not made:
            made.append(matrix() if callable(matrix) else matrix)
        sub = made[0][res_q::step_q, res_k::step_k]
        dtype = np.int32 if sub.size < 2**31 else np.int64
        prefix = np.zeros((sub.shape[0] + 1, sub.shape[1] + 1), dtype)
        np.cumsum(np.cumsum(sub, 0, dtype=dtype), 1, out=prefix[1:, 1:])
        return prefix

    for g, lattice in enumerate(lattices.tolist()):
        step_q, res_q, step_k, res_k = lattice
        rows = np.flatnonzero(which == g)
        if key is None:
            prefix = prefix_of(*lattice)
        else:
            prefix = _cached((key, tuple(lattice)), lambda lattice=lattice: prefix_of(*lattice))
        i0, j0 = (aq[rows] - res_q) // step_q, (ak[rows] - res_k) // step_k
        i1, j1 = i0 + nq[rows], j0 + nk[rows]
        out[rows] = prefix[i1, j1].astype(np.int64) - prefix[i0, j1] - prefix[i1, j0] + prefix[i0, j0]
    return out


#: Bytes of axis matrices and prefix tables :func:`_cached` keeps (least recently used dropped first).
MAX_TABLE_BYTES = 64 << 20
_TABLES: collections.OrderedDict = collections.OrderedDict()


def clear_tables() -> None:
    """Drop the tables :func:`_cached` keeps (the planner does, before and after each plan)."""
    _TABLES.clear()


def _key(key: tuple, nodes) -> tuple | None:
    """``key``, or None (nothing kept) when one of ``nodes`` reads a run-time input: its matrix follows
    the call's data, which no key holds."""
    return None if any(ir.reads_inputs(node) for node in nodes) else key


def _cached(key, make):
    """``make()``, kept under ``key`` (matrices and prefix sums of axis counts: a plan's candidate orders
    and samples ask for the same ones), up to :data:`MAX_TABLE_BYTES`; not kept when ``key`` is None."""
    if key is None:
        return make()
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    value = make()
    value.flags.writeable = False
    _TABLES[key] = value
    total = sum(v.nbytes for v in _TABLES.values())
    while total > MAX_TABLE_BYTES and len(_TABLES) > 1:
        _, dropped = _TABLES.popitem(last=False)
        total -= dropped.nbytes
    return value
