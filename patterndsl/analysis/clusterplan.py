"""Analysis stage for ``cluster``/``lsh``: the split of a pattern and the call-time plan in sorted order.

Comes in: a bound pattern with content primitives (``ir.contents``) and, at a call, the labels
of :func:`patterndsl.primitives.clusters.labels`. Goes out:

- :func:`split`: the pattern as a *static part* (every content primitive replaced by ``empty``,
  planned and run in its own token order by the ordinary pipeline) and, per head rule with a
  content primitive ``x``, a *sorted part* ``x & (N[x := full] - N[x := empty])``: the pairs only
  the labels add. The two are disjoint, so their attention results merge exactly by
  log-sum-exp. ``causal & (window(63) | cluster(C))`` is ``causal & window(63)`` plus
  ``cluster(C) & (causal - window(63))``: in sorted order ``causal - window(63)`` is a per-pair
  predicate on the original positions.
- :func:`sorted_plan`: tokens sorted by label (stable: per batch element and query head, ties
  keep position order), so every label's pairs are contiguous; each query tile of ``BM`` sorted
  entries then needs one contiguous range of sorted keys. With ``balanced`` a token belongs to
  several clusters or none: it appears once per cluster it belongs to (an *entry*), and a pair is
  counted only in the lowest cluster holding both (membership bit sets), so entries stay disjoint.

The static plan of such a pattern (``Pattern.plan`` without data) is the one of
:mod:`patterndsl.analysis.inputplan`: the tiles labels can reach are 3.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from patterndsl import ir

#: Cluster bits held per int64 word of a membership bit set (positive words: no sign bit).
WORD_BITS = 62


@dataclass(frozen=True)
class Part:
    """A part of one head rule run at call time: heads ``lo <= h < hi``.

    A *sorted* part (``prim`` set) allows the pairs with equal labels of ``prim`` that ``pred``
    (None: every such pair) also allows, in ``prim``'s sorted order. A *general* part (``prim`` is
    None) allows the pairs of ``pred``, whose meaning needs the call's labels, route choices or
    inputs; it runs in token order over the tiles of the static pattern ``reach``, which holds every
    pair it can allow.
    """

    lo: int
    hi: int
    prim: ir.Prim | None
    pred: ir.Node | None
    reach: ir.Node | None = None


@dataclass(frozen=True)
class Split:
    """A content pattern cut in two: ``static`` (None when it allows nothing) and the call-time ``parts``."""

    static: ir.PatternIR | None
    parts: tuple[Part, ...]


def _no_content(node: ir.Node) -> ir.Node:
    return ir.substitute(node, lambda p, s: ir.EMPTY if p.name in ir.CONTENT_PRIMITIVES else p)


def _content_lower(node: ir.Node) -> ir.Node:
    """``node`` with each content primitive replaced by its lower bound (``empty`` at +1, ``full`` at -1)."""
    return ir.substitute(node, lambda p, s: (ir.EMPTY if s > 0 else ir.FULL) if p.name in ir.CONTENT_PRIMITIVES else p)


def _sorted(node: ir.Node, found) -> Part | None:
    """The sorted part of a rule with one content primitive that only adds pairs and a static rest, else None."""
    if len(found) != 1:
        return None
    prim = found[0]
    if _signs(node, prim) != {1}:
        return None
    pred = _minus(ir.replace(node, {prim: ir.FULL}), _no_content(node))
    if ir.is_dynamic(pred):
        return None
    return Part(0, 0, prim, None if pred == ir.FULL else pred)


@functools.lru_cache(maxsize=64)
def split(pir: ir.PatternIR, heads: int) -> Split:
    """Cut ``pir`` (at ``heads`` query heads) into its static part and its call-time parts (module docstring).

    A ``route`` is chosen by the query heads whose rule holds it (``semantics.route_selection``'s
    voters). When the static part would hold it in fewer rules than the pattern (the same
    ``route(...)`` in several head rules, removed from some of them by a content primitive), every
    rule holding it runs whole as a general part instead, whose choice has the pattern's voters.
    """
    from patterndsl import semantics

    segments = semantics.head_segments(pir, heads)
    moved = _moved_routes(pir, heads, _route_heads(segments))
    rules, default = _static_rules(pir, moved)
    parts = []
    for lo, hi, node in segments:
        node = ir.hoist_contents(node)
        if moved.intersection(ir.routes(node)):
            parts.append(Part(lo, hi, None, node, ir.input_bound(ir.route_bound(node, lower=False), lower=False)))
            continue
        found = ir.contents(node)
        if not found:
            continue
        part = _sorted(node, found)
        if part is not None:
            if part.pred != ir.EMPTY:
                parts.append(Part(lo, hi, part.prim, part.pred))
            continue
        # General: the pairs allowed whatever the labels stay static; the rest is evaluated per call.
        lower = _content_lower(node)
        pred = node if lower == ir.EMPTY else ir.inter(node, ir.complement(lower))
        upper = ir.input_bound(ir.route_bound(node, lower=False), lower=False)
        floor = ir.input_bound(ir.route_bound(lower, lower=True), lower=True)
        reach = upper if floor == ir.EMPTY else ir.inter(upper, ir.complement(floor))
        if reach != ir.EMPTY:
            parts.append(Part(lo, hi, None, pred, reach))
    nodes = [r.node for r in rules] + ([default] if default is not None else [])
    static = None
    if any(n != ir.EMPTY for n in nodes):
        used = {d.name for n in nodes for d in pir.inputs if _reads(n, d.name)}
        used |= _score_reads(pir)
        inputs = tuple(d for d in pir.inputs if d.name in used)
        static = ir.PatternIR(pir.name, pir.params, pir.layout, rules, default, pir.span, inputs, score=pir.score)
    return Split(static, tuple(parts))


def _static_node(node: ir.Node, moved: frozenset = frozenset()) -> ir.Node:
    """What the static part runs of a rule: the pairs it allows whatever the labels (nothing for a moved route)."""
    if moved.intersection(ir.routes(node)):
        return ir.EMPTY
    node = ir.hoist_contents(node)
    found = ir.contents(node)
    if not found:
        return node
    return _no_content(node) if _sorted(node, found) is not None else _content_lower(node)


def _static_rules(pir: ir.PatternIR, moved: frozenset = frozenset()):
    """The static part's head rules and default, the rules holding a route of ``moved`` emptied."""
    rules = tuple(ir.HeadRule(r.lo, r.hi, _static_node(r.node, moved), r.span) for r in pir.heads)
    return rules, None if pir.default is None else _static_node(pir.default, moved)


def _route_heads(segments) -> dict:
    out: dict = {}
    for lo, hi, node in segments:
        for prim in ir.routes(node):
            out.setdefault(prim, set()).update(range(lo, hi))
    return out


def _moved_routes(pir: ir.PatternIR, heads: int, voters: dict) -> frozenset:
    """The routes whose rules all leave the static part: those it would hold with other voters than ``voters``.

    Emptying a rule may take another route from some of its voters too, hence the fixed point.
    """
    from patterndsl import semantics

    moved: frozenset = frozenset()
    while True:
        rules, default = _static_rules(pir, moved)
        static = ir.PatternIR(pir.name, pir.params, pir.layout, rules, default, pir.span, ())
        after = _route_heads(semantics.head_segments(static, heads))
        more = {prim for prim, hs in after.items() if hs != voters[prim]}
        if not more:
            return moved
        moved |= more


def _score_reads(pir: ir.PatternIR) -> set[str]:
    if pir.score is None:
        return set()
    from patterndsl.scores import nodes

    return {n.name for n in nodes.walk(pir.score.expr) if isinstance(n, nodes.Read)}


def _minus(upper: ir.Node, lower: ir.Node) -> ir.Node:
    """``upper - lower`` (``lower`` inside ``upper``), less the terms of ``lower`` that ``upper`` already requires."""
    ups = upper.items if isinstance(upper, ir.Inter) else (upper,)
    lows = lower.items if isinstance(lower, ir.Inter) else (lower,)
    rest = [x for x in lows if x not in ups]
    if not rest:
        return ir.EMPTY
    return ir.inter(upper, ir.complement(ir.inter(*rest)))


def _signs(node: ir.Node, prim: ir.Prim) -> set[int]:
    """The polarities ``prim`` occurs under in ``node`` (+1 even complements, -1 odd; ``ir.substitute``)."""
    out: set[int] = set()

    def record(p: ir.Prim, sign: int) -> ir.Node:
        if p == prim:
            out.add(sign)
        return p

    ir.substitute(node, record)
    return out


def _reads(node: ir.Node, name: str) -> bool:
    for sub in ir.walk(node):
        if not isinstance(sub, ir.Prim):
            continue
        for _, value in sub.args:
            if value == name and sub.name == "within":
                return True
            if isinstance(value, ir.Expr) and any(
                isinstance(e, ir.InputRef) and e.name == name for e in ir.walk_expr(value)
            ):
                return True
    return False


def per_element(static, inputs):
    """The plan of a content pattern for given inputs: ``static``'s tiles (3 where labels reach) per batch element.

    Args:
        static: the plan without data (a ``BlockPlan``).
        inputs: the call's validated inputs (``binding.Inputs``).

    Returns:
        An ``inputplan.InputPlan`` whose ``tiles()`` is ``[batch, heads, nqb, nkb]``.
    """
    from patterndsl.analysis.inputplan import InputPlan

    nqb, nkb = static.n_q_tiles, static.n_kv_tiles
    states = torch.stack([g.tiles.to_dense(nqb, nkb) for g in static.groups])
    return InputPlan(static, states.unsqueeze(0).expand(inputs.batch, -1, -1, -1), inputs)


# --------------------------------------------------------------------------- the sorted plan


@dataclass(frozen=True)
class Side:
    """One side's entries in sorted order, per group (batch element x head of a part).

    Attributes:
        index: int64 ``[G, E]``: the token (original index) of each entry.
        label: int64 ``[G, E]``: its label (nondecreasing along ``E``).
        bits: int64 ``[G, L, words]`` membership bit sets of the tokens (``balanced``), else None.
    """

    index: torch.Tensor
    label: torch.Tensor
    bits: torch.Tensor | None


@dataclass(frozen=True)
class SortedPlan:
    """The call-time plan of one sorted part.

    Attributes:
        q, k: the sorted sides.
        block: ``(BM, BN)``: query tiles are ``BM`` sorted entries; ``BN`` counts visited key tiles.
        start, stop: int64 ``[G, n_q_tiles]``: the range of sorted key entries each query tile needs.
    """

    q: Side
    k: Side
    block: tuple[int, int]
    start: torch.Tensor
    stop: torch.Tensor

    def stats(self) -> dict:
        """Pairs with equal labels, pairs in visited ``BM x BN`` tiles (sorted order), their ratio."""
        bm, bn = self.block
        eq = self.q.label.shape[1]
        rows = (eq - torch.arange(self.start.shape[1]) * bm).clamp(max=bm)
        lo = torch.div(self.start, bn, rounding_mode="floor") * bn
        hi = torch.minimum(-torch.div(-self.stop, bn, rounding_mode="floor") * bn, torch.tensor(self.k.label.shape[1]))
        visited = int((rows * torch.where(self.stop > self.start, hi - lo, 0)).sum())
        allowed = label_pairs(self.q.label, self.k.label)
        return {"allowed": allowed, "visited": visited, "efficiency": allowed / max(visited, 1)}


def label_pairs(qlab: torch.Tensor, klab: torch.Tensor) -> int:
    """Entry pairs with equal labels, summed over groups (``[G, Eq]``, ``[G, Ek]``)."""
    labels, inverse = torch.unique(torch.cat([qlab, klab], 1), return_inverse=True)
    g = qlab.shape[0]
    n = len(labels)
    offs = torch.arange(g)[:, None] * n
    cq = torch.bincount((inverse[:, : qlab.shape[1]] + offs).reshape(-1), minlength=g * n)
    ck = torch.bincount((inverse[:, qlab.shape[1] :] + offs).reshape(-1), minlength=g * n)
    return int((cq * ck).sum())


def unsorted_efficiency(qlab: torch.Tensor, klab: torch.Tensor, block: tuple[int, int]) -> dict:
    """Block efficiency of the same label pairs in the original token order (unbalanced labels ``[G, L]``).

    A ``BM x BN`` tile is visited when some label occurs among its queries and among its keys.
    """
    bm, bn = block
    labels, inverse = torch.unique(torch.cat([qlab, klab], 1), return_inverse=True)
    n = len(labels)
    g, lq = qlab.shape
    lk = klab.shape[1]
    visited = 0
    for row in range(g):
        pq = _presence(inverse[row, :lq], bm, n)
        pk = _presence(inverse[row, lq:], bn, n)
        hit = (pq.float() @ pk.float().T) > 0
        rows = torch.full((pq.shape[0],), bm)
        rows[-1] = lq - bm * (pq.shape[0] - 1)
        cols = torch.full((pk.shape[0],), bn)
        cols[-1] = lk - bn * (pk.shape[0] - 1)
        visited += int((hit * rows[:, None] * cols[None, :]).sum())
    allowed = label_pairs(qlab, klab)
    return {"allowed": allowed, "visited": visited, "efficiency": allowed / max(visited, 1)}


def _presence(ids: torch.Tensor, block: int, n: int) -> torch.Tensor:
    tiles = -(-len(ids) // block)
    out = torch.zeros(tiles * n, dtype=torch.bool)
    out[torch.arange(len(ids)) // block * n + ids] = True
    return out.view(tiles, n)


def _bits(member: torch.Tensor) -> torch.Tensor:
    """``[G, L, n]`` bool -> ``[G, L, words]`` int64 bit sets (cluster ``c`` is bit ``c % 62`` of word ``c // 62``)."""
    n = member.shape[-1]
    words = -(-n // WORD_BITS)
    pad = torch.nn.functional.pad(member, (0, words * WORD_BITS - n)).view(*member.shape[:-1], words, WORD_BITS)
    weight = 2 ** torch.arange(WORD_BITS, dtype=torch.int64, device=member.device)
    return (pad.long() * weight).sum(-1)


def _side(lab: torch.Tensor, balanced: bool) -> Side:
    """Sorted entries of one side from ``[G, L]`` labels or ``[G, L, n]`` memberships."""
    if not balanced:
        label, index = torch.sort(lab, dim=-1, stable=True)
        return Side(index, label, None)
    g, length, n = lab.shape
    # Every centroid holds the same number of tokens (min(w, L)): members of (g, c) in position order.
    rows = lab.transpose(-1, -2).reshape(g * n, length).nonzero()
    width = rows.shape[0] // max(g * n, 1)
    index = rows[:, 1].view(g, n * width)
    label = torch.arange(n, device=lab.device).repeat_interleave(width).expand(g, -1).contiguous()
    return Side(index, label, _bits(lab))


def sorted_plan(q_labels: torch.Tensor, k_labels: torch.Tensor, balanced: bool, block: tuple[int, int]) -> SortedPlan:
    """Sort both sides by label and give each query tile its range of sorted keys.

    Args:
        q_labels, k_labels: ``[G, L]`` int64 labels, or ``[G, L, n]`` bool memberships (``balanced``).
        balanced: which of the two.
        block: ``(BM, BN)``.

    Returns:
        A :class:`SortedPlan`; ``O(L log L)`` per group, nothing ``Lq x Lk``.
    """
    bm = block[0]
    qs, ks = _side(q_labels, balanced), _side(k_labels, balanced)
    g, eq = qs.label.shape
    tiles = -(-eq // bm)
    first = torch.arange(tiles, device=qs.label.device) * bm
    last = torch.clamp(first + bm, max=eq) - 1
    if eq == 0 or ks.label.shape[1] == 0:
        zero = torch.zeros(g, tiles, dtype=torch.int64)
        return SortedPlan(qs, ks, block, zero, zero)
    lo = qs.label[:, first].contiguous()
    hi = qs.label[:, last].contiguous()
    start = torch.searchsorted(ks.label, lo, right=False)
    stop = torch.searchsorted(ks.label, hi, right=True)
    return SortedPlan(qs, ks, block, start, stop)
