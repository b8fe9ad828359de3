"""IR -> source text: the readable form shown by ``patterndsl show --stage ir``.

Comes in: canonical IR (:mod:`patterndsl.ir`). Goes out: pattern-language
text that parses and checks back to an equal IR (printing round-trips). The
order of the terms of unions and intersections is the IR's structural order
(:func:`patterndsl.ir.sort_key`); printing never decides it.
"""

from __future__ import annotations

from typing import Any

from patterndsl import ir

# Binding strength of pattern operators; larger binds tighter.
_P_UNION, _P_DIFF, _P_INTER, _P_NOT, _P_ATOM = 1, 2, 3, 4, 5
# Binding strength of expression operators.
_E_PREC = {"or": 1, "and": 2, "not": 3, "cmp": 4, "+": 6, "-": 6, "*": 7, "//": 7, "%": 7, "neg": 8}


def value_to_source(value: Any) -> str:
    """Render one argument value (int, bool, tuple, name, Node or Expr)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        inner = ", ".join(value_to_source(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, str):
        return value
    if isinstance(value, ir.Node):
        return node_to_source(value)
    if isinstance(value, ir.Expr):
        return expr_to_source(value)
    raise TypeError(f"cannot print {value!r}")


def _prim(node: ir.Prim) -> str:
    sig = ir.SIGNATURES[node.name]
    if not sig:
        return node.name
    parts = []
    for param, (name, value) in zip(sig, node.args, strict=True):
        if param.required:
            parts.append(value_to_source(value))
            continue
        default = param.default
        if node.name == "route" and name == "qblock":
            default = node.arg("block")
        if value == default and type(value) is type(default):
            continue
        # Grid primitives broadcast a scalar to every axis, so an all-default tuple prints as nothing;
        # route keeps a tuple block as a tuple (a box on the grid), so it must stay printed.
        if node.name in ir.GRID_PRIMITIVES and isinstance(value, tuple) and len(set(value)) == 1:
            if value[0] == default and type(value[0]) is type(default):
                continue
            value = value[0]
        parts.append(f"{name} = {value_to_source(value)}")
    return f"{node.name}({', '.join(parts)})"


def _node(node: ir.Node) -> tuple[str, int]:
    if isinstance(node, ir.Prim):
        return _prim(node), _P_ATOM
    if isinstance(node, ir.Not):
        text, prec = _node(node.item)
        return "~" + (text if prec >= _P_NOT else f"({text})"), _P_NOT
    if isinstance(node, ir.Union):
        return " | ".join(_wrap(item, _P_UNION + 1) for item in node.items), _P_UNION
    if isinstance(node, ir.Inter):
        return " & ".join(_wrap(item, _P_INTER) for item in node.items), _P_INTER
    raise TypeError(f"not a pattern node: {node!r}")


def _wrap(node: ir.Node, need: int) -> str:
    text, prec = _node(node)
    return text if prec >= need else f"({text})"


def node_to_source(node: ir.Node) -> str:
    """Render a pattern node as pattern-language text."""
    return _node(node)[0]


def _expr(expr: ir.Expr) -> tuple[str, int]:
    if isinstance(expr, ir.Const):
        text = value_to_source(expr.value)
        return text, (_E_PREC["neg"] if isinstance(expr.value, int) and expr.value < 0 else 99)
    if isinstance(expr, ir.Var):
        return expr.name, 99
    if isinstance(expr, ir.Coord):
        return f"{expr.side}.{expr.axis}", 99
    if isinstance(expr, ir.InputRef):
        if not expr.indices:
            return expr.name, 99
        return f"{expr.name}[{', '.join(expr_to_source(a) for a in expr.indices)}]", 99
    if isinstance(expr, ir.Arith):
        prec = _E_PREC[expr.op]
        left = _ewrap(expr.left, prec)
        right = _ewrap(expr.right, prec + 1)
        return f"{left} {expr.op} {right}", prec
    if isinstance(expr, ir.Neg):
        return "-" + _ewrap(expr.operand, _E_PREC["neg"]), _E_PREC["neg"]
    if isinstance(expr, ir.Func):
        return f"{expr.fn}({', '.join(expr_to_source(a) for a in expr.args)})", 99
    if isinstance(expr, ir.Cmp):
        prec = _E_PREC["cmp"]
        return f"{_ewrap(expr.left, prec + 1)} {expr.op} {_ewrap(expr.right, prec + 1)}", prec
    if isinstance(expr, ir.Logic):
        prec = _E_PREC[expr.op]
        return f" {expr.op} ".join(_ewrap(item, prec + 1) for item in expr.items), prec
    if isinstance(expr, ir.LNot):
        prec = _E_PREC["not"]
        return "not " + _ewrap(expr.operand, prec), prec
    raise TypeError(f"not an expression: {expr!r}")


def _ewrap(expr: ir.Expr, need: int) -> str:
    text, prec = _expr(expr)
    return text if prec >= need else f"({text})"


def expr_to_source(expr: ir.Expr) -> str:
    """Render a ``where`` expression as pattern-language text."""
    return _expr(expr)[0]


def pattern_to_source(pattern: ir.PatternIR) -> str:
    """Render a whole bound pattern definition; parameters appear with their bound values."""
    params = ", ".join(f"{name} = {value_to_source(value)}" for name, value in pattern.params)
    lines = [f"pattern {pattern.name}({params}) {{"]
    if pattern.layout is not None:
        axes = ", ".join(f"{name} = {extent}" for name, extent in pattern.layout.axes)
        lines.append(f"    layout grid({axes})")
    for decl in pattern.inputs:
        lines.append(f"    input {decl.name}: {decl.kind}[{', '.join(str(d) for d in decl.dims)}]")
    for rule in pattern.heads:
        lines.append(f"    heads {rule.lo}..{rule.hi}: {node_to_source(rule.node)}")
    if pattern.default is not None:
        lines.append(f"    {node_to_source(pattern.default)}")
    if pattern.score is not None:
        from patterndsl.scores import to_source

        lines.append(f"    score {to_source(pattern.score.expr)}")
    lines.append("}")
    return "\n".join(lines) + "\n"
