"""Score modifiers: recognising biases that split into a query part and a key part.

Comes in: the bias of an additive score (``score = s + bias``, :class:`patterndsl.scores.Score`).
Goes out: whether the bias is ``g(q) + u(k)`` (each part may also read heads, lengths, parameters
and inputs). Such a bias (ALiBi's ``-m_h * (q - k)``, a per-key bias) changes the softmax only
through ``u(k)``: a query's row of biases is the row of a reference query ``q0`` plus the constant
``f(q, k*) - f(q0, k*)``, which moves the row's log-sum-exp and nothing else. The CPU executor
then builds one row of biases per query tile, broadcast over the tile's rows, instead of one
value per pair (:mod:`patterndsl.runtime.cpu.scoremod`), and on plain ``causal`` / ``full`` folds
``u(k)`` into one more head column of the fused kernel (:mod:`patterndsl.runtime.cpu.augmented`).
"""

from __future__ import annotations

from patterndsl.scores.nodes import Coord, Node, Op, Sym, children, walk


def sides(node: Node) -> frozenset[str]:
    """Which positions ``node`` depends on: a subset of ``{"q", "k"}``."""
    out = set()
    for sub in walk(node):
        if isinstance(sub, Sym) and sub.name in ("q", "k"):
            out.add(sub.name)
        elif isinstance(sub, Coord):
            out.add(sub.side)
    return frozenset(out)


def separable(node: Node) -> bool:
    """True when ``node`` is provably ``g(q) + u(k)``: sums and differences of one-sided terms, scaled by constants.

    The test is structural (sound, not complete): ``tanh(q - k)`` is refused, as is anything that
    is not a sum of parts each reading at most one of ``q`` and ``k``.
    """
    if len(sides(node)) < 2:
        return True
    if not isinstance(node, Op):
        return False
    if node.op in ("+", "-"):
        return all(separable(a) for a in children(node))
    if node.op == "neg":
        return separable(node.args[0])
    if node.op == "*":
        a, b = node.args
        return (not sides(a) and separable(b)) or (not sides(b) and separable(a))
    if node.op == "/":
        return not sides(node.args[1]) and separable(node.args[0])
    return False
