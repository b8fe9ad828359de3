"""Stage 4 (block plan), the rewrite pass run before planning: IR -> equivalent IR with less ambiguity.

Comes in: a canonical pattern node. Goes out: a node with the same meaning
whose structure the tile classifier handles more exactly and more cheaply:
``where`` predicates split along ``and``/``or``/``not`` into pattern
combinators (so each comparison is a half-plane the classifier decides
exactly), ``causal & window(b, a, d)`` folded into ``window(b, min(a, 0), d)``,
windows of one dilation intersected or merged into one band, and nested
``blocks`` folded. Pure: never changes the meaning (the property tests check
plans of rewritten nodes against the dense meaning of the originals).
"""

from __future__ import annotations

from patterndsl import ir
from patterndsl.primitives import residues
from patterndsl.primitives.where import one_side


def window(before: int, after: int, dilation: int) -> ir.Prim:
    """A ``window`` primitive with every argument bound."""
    return ir.Prim("window", (("before", before), ("after", after), ("dilation", dilation)))


def _qk_at_least(c: int) -> ir.Prim:
    """``where(q - k >= c)``."""
    diff = ir.Arith("-", ir.Var("q"), ir.Var("k"))
    return ir.Prim("where", (("pred", ir.Cmp(">=", diff, ir.Const(c))),))


def _is_int(e: ir.Expr) -> bool:
    """True when ``e`` is an integer expression (comparisons of booleans are left alone)."""
    if isinstance(e, (ir.Cmp, ir.Logic, ir.LNot)):
        return False
    return not (isinstance(e, ir.Const) and isinstance(e.value, bool))


def _guards_a_divisor(pred: ir.Logic) -> bool:
    """True when a later operand divides by a non-constant: ``and``/``or`` then guard it (short-circuit)."""
    return any(
        isinstance(e, ir.Arith) and e.op in ("//", "%") and not isinstance(e.right, ir.Const)
        for item in pred.items[1:]
        for e in ir.walk_expr(item)
    )


def _where(pred: ir.Expr) -> ir.Node:
    if isinstance(pred, ir.Const) and isinstance(pred.value, bool):
        return ir.FULL if pred.value else ir.EMPTY
    if one_side(pred) is not None:
        # Read on one side only: the tile rule decides it exactly as it stands; split into
        # comparisons it would leave two partial operands to decide together.
        return ir.Prim("where", (("pred", pred),))
    if residues.periods(pred) is not None:
        # Repeats with small periods: the residue rule counts it exactly as it stands, and no
        # part of it is a half-plane (each reads positions through ``%`` only).
        return ir.Prim("where", (("pred", pred),))
    if isinstance(pred, ir.Logic) and not _guards_a_divisor(pred):
        parts = [_where(p) for p in pred.items]
        return ir.inter(*parts) if pred.op == "and" else ir.union(*parts)
    if isinstance(pred, ir.LNot):
        return ir.complement(_where(pred.operand))
    if isinstance(pred, ir.Cmp) and pred.op in ("==", "!=") and not (_is_int(pred.left) and _is_int(pred.right)):
        return ir.Prim("where", (("pred", pred),))
    if isinstance(pred, ir.Cmp) and pred.op == "==":
        return ir.inter(
            ir.Prim("where", (("pred", ir.Cmp("<=", pred.left, pred.right)),)),
            ir.Prim("where", (("pred", ir.Cmp(">=", pred.left, pred.right)),)),
        )
    if isinstance(pred, ir.Cmp) and pred.op == "!=":
        return ir.complement(_where(ir.Cmp("==", pred.left, pred.right)))
    return ir.Prim("where", (("pred", pred),))


def _fold_inter(items: tuple[ir.Node, ...]) -> list[ir.Node]:
    items = list(items)
    if ir.CAUSAL in items:
        # causal & (window | window ...) == (causal & window) | ...: each term folds into one band
        # that already lies in q >= k, so causal is absorbed.
        distributed = False
        for x, item in enumerate(items):
            if isinstance(item, ir.Union) and all(isinstance(p, ir.Prim) and p.name == "window" for p in item.items):
                items[x] = ir.union(*[ir.inter(*_fold_inter((ir.CAUSAL, p))) for p in item.items])
                distributed = True
        if distributed:
            items.remove(ir.CAUSAL)
    wins = [p for p in items if isinstance(p, ir.Prim) and p.name == "window"]
    rest = [p for p in items if p not in wins]
    by_dil: dict[int, tuple[int, int]] = {}
    for w in wins:
        d, b, a = w.arg("dilation"), w.arg("before"), w.arg("after")
        if d in by_dil:
            b0, a0 = by_dil[d]
            b, a = min(b, b0), min(a, a0)
        by_dil[d] = (b, a)
    if ir.CAUSAL in rest:
        # causal - window(b, a) with a >= 0 (dilation 1) keeps exactly q - k >= b + 1: one half-plane.
        for p in list(rest):
            w = p.item if isinstance(p, ir.Not) else None
            if (
                isinstance(w, ir.Prim)
                and w.name == "window"
                and w.arg("dilation") == 1
                and w.arg("after") >= 0
                and w.arg("before") >= 0
            ):
                rest.remove(p)
                rest.append(_qk_at_least(w.arg("before") + 1))
                if ir.CAUSAL in rest:
                    rest.remove(ir.CAUSAL)
                break
    if ir.CAUSAL in rest and by_dil:
        # causal keeps q - k >= 0: the window's "after" side shrinks to at most 0.
        rest.remove(ir.CAUSAL)
        by_dil = {d: (b, min(a, 0)) for d, (b, a) in by_dil.items()}
    blocks = sorted(p.arg("size") for p in rest if isinstance(p, ir.Prim) and p.name == "blocks")
    if len(blocks) > 1:
        keep = [s for s in blocks if not any(s % t == 0 and s != t for t in blocks)]
        rest = [p for p in rest if not (isinstance(p, ir.Prim) and p.name == "blocks")]
        rest += [ir.Prim("blocks", (("size", s),)) for s in sorted(set(keep))]
    return rest + [window(b, a, d) for d, (b, a) in by_dil.items()]


def _fold_union(items: tuple[ir.Node, ...]) -> list[ir.Node]:
    items = list(items)
    wins = [p for p in items if isinstance(p, ir.Prim) and p.name == "window"]
    rest = [p for p in items if p not in wins]
    merged: list[tuple[int, int, int]] = []  # (dilation, lo, hi) with band lo..hi in units of d
    for w in sorted(wins, key=lambda w: (w.arg("dilation"), -w.arg("after"))):
        d, lo, hi = w.arg("dilation"), -w.arg("after"), w.arg("before")
        if lo > hi:
            continue
        if merged and merged[-1][0] == d and lo <= merged[-1][2] + 1:
            _pd, plo, phi = merged[-1]
            merged[-1] = (d, plo, max(phi, hi))
        else:
            merged.append((d, lo, hi))
    blocks = sorted(p.arg("size") for p in rest if isinstance(p, ir.Prim) and p.name == "blocks")
    if len(blocks) > 1:
        keep = [s for s in blocks if not any(t % s == 0 and s != t for t in blocks)]
        rest = [p for p in rest if not (isinstance(p, ir.Prim) and p.name == "blocks")]
        rest += [ir.Prim("blocks", (("size", s),)) for s in sorted(set(keep))]
    return rest + [window(hi, -lo, d) for d, lo, hi in merged]


def simplify(node: ir.Node) -> ir.Node:
    """The rewrite pass: an equivalent node that plans with fewer ambiguous tiles.

    Args:
        node: a canonical pattern node.

    Returns:
        An equivalent canonical node.
    """
    if isinstance(node, ir.Prim):
        if node.name == "where":
            return _where(node.arg("pred"))
        return node
    if isinstance(node, ir.Not):
        return ir.complement(simplify(node.item))
    if isinstance(node, ir.Inter):
        parts = ir.inter(*[simplify(i) for i in node.items])
        if isinstance(parts, ir.Inter):
            return ir.inter(*_fold_inter(parts.items))
        return parts
    if isinstance(node, ir.Union):
        parts = ir.union(*[simplify(i) for i in node.items])
        if isinstance(parts, ir.Union):
            return ir.union(*_fold_union(parts.items))
        return parts
    return node
