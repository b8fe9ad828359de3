"""Score modifiers: evaluating a score expression (or a derivative) on tensors of pairs.

Comes in: a score node and an :class:`Env` holding, broadcastable against each other, the
logits ``s``, the query and key positions, the heads, the lengths and the layout. Goes out: a
tensor in the environment's float dtype (int64 / bool for integer / condition nodes). Used by
the dense reference (:mod:`patterndsl.semantics`) in float64 and by the CPU executor on the
tiles it visits; integer parts compute in int64 with floor semantics, as ``where`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from patterndsl.errors import PatternValueError
from patterndsl.ir import Layout
from patterndsl.scores.nodes import BOOL, FLOAT, INT, Coord, Node, Num, Op, Read, Sym


@dataclass
class Env:
    """What the variables of a score expression hold for the pairs being evaluated.

    Attributes:
        s: the scaled logits (float), or None when the expression does not read ``s``.
        q, k: int64 positions (end-aligned query positions, key positions), broadcastable.
        h: int64 head indices, broadcastable (or a Python int).
        lq, lk: the lengths.
        layout: the pattern's layout, for grid coordinates.
        dtype: the float dtype of the computation.
        read: ``f(read_node, index_tensors) -> tensor`` for run-time inputs (section 7), or None.
    """

    s: torch.Tensor | None
    q: torch.Tensor
    k: torch.Tensor
    h: torch.Tensor | int
    lq: int
    lk: int
    layout: Layout | None
    dtype: torch.dtype
    read: Callable[[Read, list[torch.Tensor]], torch.Tensor] | None = None
    memo: dict = field(default_factory=dict)


def evaluate(node: Node, env: Env) -> torch.Tensor:
    """The value of ``node`` for every pair of ``env`` (shared sub-expressions evaluated once).

    Args:
        node: a score node.
        env: see :class:`Env`.

    Returns:
        A tensor: ``env.dtype`` for float nodes, int64 for integers, bool for conditions.

    Raises:
        PatternValueError: an integer ``//`` or ``%`` by zero.
    """
    if node in env.memo:
        return env.memo[node]
    value = _eval(node, env)
    env.memo[node] = value
    return value


def _as(value: torch.Tensor, kind: str, env: Env) -> torch.Tensor:
    if kind == FLOAT and value.dtype != env.dtype:
        return value.to(env.dtype)
    return value


def _coords(pos: torch.Tensor, layout: Layout, axis: str) -> torch.Tensor:
    """Row-major grid coordinate ``axis`` of flattened positions (last axis fastest)."""
    stride = 1
    for name, extent in reversed(layout.axes):
        if name == axis:
            return torch.div(pos, stride, rounding_mode="floor") % extent
        stride *= extent
    raise KeyError(axis)


def _divisor(b: torch.Tensor, node: Op) -> torch.Tensor:
    if bool((b == 0).any()):
        raise PatternValueError(f"division by zero in score: the divisor of '{node.op}' is 0 for some pair", node.span)
    return b


_UNARY = {"tanh": torch.tanh, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "erf": torch.erf}
_BINARY = {
    "+": torch.add,
    "-": torch.sub,
    "*": torch.mul,
    "/": torch.div,
    "**": torch.pow,
    "min": torch.minimum,
    "max": torch.maximum,
    "==": torch.eq,
    "!=": torch.ne,
    "<": torch.lt,
    "<=": torch.le,
    ">": torch.gt,
    ">=": torch.ge,
}


def _eval(node: Node, env: Env) -> torch.Tensor:
    if isinstance(node, Num):
        dtype = {FLOAT: env.dtype, INT: torch.int64, BOOL: torch.bool}[node.type]
        return torch.tensor(node.value, dtype=dtype)
    if isinstance(node, Sym):
        values = {"s": env.s, "q": env.q, "k": env.k, "h": env.h, "Lq": env.lq, "Lk": env.lk}
        return torch.as_tensor(values[node.name])
    if isinstance(node, Coord):
        return _coords(env.q if node.side == "q" else env.k, env.layout, node.axis)
    if isinstance(node, Read):
        return env.read(node, [evaluate(i, env) for i in node.indices])
    op = node.op
    args = [evaluate(a, env) for a in node.args]
    if op == "select":
        return torch.where(args[0], _as(args[1], node.type, env), _as(args[2], node.type, env))
    if op in _UNARY:
        return _UNARY[op](_as(args[0], FLOAT, env))
    if op in ("/", "**"):
        return _BINARY[op](_as(args[0], FLOAT, env), _as(args[1], FLOAT, env))
    if op in _BINARY:
        kind = FLOAT if FLOAT in (a.type for a in node.args) else INT
        return _BINARY[op](*(_as(a, kind, env) for a in args))
    if op == "//":
        return torch.div(args[0], _divisor(args[1], node), rounding_mode="floor")
    if op == "%":
        return torch.remainder(args[0], _divisor(args[1], node))
    if op == "neg":
        return torch.neg(args[0])
    if op == "abs":
        return torch.abs(args[0])
    if op == "floor":
        return torch.floor(args[0]).to(torch.int64) if node.args[0].type == FLOAT else args[0]
    if op == "and":
        out = args[0]
        for a in args[1:]:
            out = out & a
        return out
    if op == "or":
        out = args[0]
        for a in args[1:]:
            out = out | a
        return out
    if op == "not":
        return ~args[0]
    raise TypeError(f"unknown score operator {op!r}")


_IN_PLACE_UNARY = {"tanh": "tanh_", "exp": "exp_", "log": "log_", "sqrt": "sqrt_", "erf": "erf_", "abs": "abs_"}


def _spine(node: Node, leaf: Node) -> list[tuple[Op, int]] | None:
    """The path from ``leaf`` (read exactly once) up to ``node``: ``(op, index of the argument holding it)``."""
    count = sum(1 for sub in _walk(node) if sub == leaf)
    if count != 1:
        return None
    path = []
    while node != leaf:
        index = next(i for i, a in enumerate(node.args) if any(sub == leaf for sub in _walk(a)))
        path.append((node, index))
        node = node.args[index]
    return path[::-1]


def _walk(node: Node):
    from patterndsl.scores.nodes import walk

    return walk(node)


def evaluate_in_place(node: Node, env: Env) -> torch.Tensor:
    """:func:`evaluate` of a float expression that reads ``s`` once, computed in ``env.s``'s own memory.

    The operators on the path from ``s`` to the root (``s / cap``, ``tanh``, ``cap * ...``, ``s + bias``)
    are applied with in-place torch operations on the logits, the other operands evaluated as usual:
    no per-operator buffers of the tile's size. An operator with no in-place form on that path (``s ** 2``,
    ``select``) is evaluated out of place and the path continues in place on its result.

    Args:
        node: a float score node; env: as for :func:`evaluate`, ``env.s`` a tensor the caller owns.

    Returns:
        The value, in ``env.s``'s memory when every step ran in place.
    """
    from patterndsl.scores.nodes import S

    path = _spine(node, S) if isinstance(env.s, torch.Tensor) and env.s.dtype == env.dtype else None
    if not path:
        return evaluate(node, env)
    buf = env.s
    for op_node, index in path:
        others = [evaluate(a, env) for i, a in enumerate(op_node.args) if i != index]
        op = op_node.op
        if op in _IN_PLACE_UNARY:
            buf = getattr(buf, _IN_PLACE_UNARY[op])()
        elif op == "neg":
            buf = buf.neg_()
        elif op in ("+", "*"):
            buf = buf.add_(others[0]) if op == "+" else buf.mul_(others[0])
        elif op in ("-", "/") and index == 0:
            buf = buf.sub_(others[0]) if op == "-" else buf.div_(others[0])
        elif op == "-":
            buf = buf.neg_().add_(others[0])
        elif op == "/":
            buf = buf.reciprocal_().mul_(others[0])
        elif op in ("min", "max") and others[0].dtype != torch.bool:
            fn = torch.minimum if op == "min" else torch.maximum
            buf = fn(buf, others[0].to(buf.dtype), out=buf)
        else:
            # No in-place form: this step out of place, with the path so far memoised as its argument.
            env.memo[op_node.args[index]] = buf
            env.memo.pop(op_node, None)
            buf = _as(evaluate(op_node, env), FLOAT, env)
    return buf
