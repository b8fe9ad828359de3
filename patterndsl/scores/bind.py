"""Score modifiers, stage 2: the syntax of a ``score`` expression -> typed nodes.

Comes in: the syntax expression of a ``score EXPR`` statement
(:class:`~patterndsl.grammar.syntax.Expr`) and what its names mean (built by ``check.py`` from
the pattern's parameters, lets and layout). Goes out: a typed :class:`~patterndsl.scores.nodes.Node`
with constants folded, or a located :class:`~patterndsl.errors.PatternError` (an unknown name, an
operand of the wrong type, a float where an integer is needed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from patterndsl.errors import PatternNameError, PatternTypeError, PatternValueError, did_you_mean
from patterndsl.grammar import syntax
from patterndsl.ir import Layout, check_grid_axis
from patterndsl.scores import nodes
from patterndsl.scores.nodes import ANY, COMPARISONS, FLOAT, FUNCTIONS, INT, Coord, Node, Read, Sym, make, num

#: The variables of a score expression and their types.
VARIABLES = {"s": FLOAT, "q": INT, "k": INT, "h": INT, "Lq": INT, "Lk": INT}
#: How deep a score expression may nest (every stage that reads it walks it recursively).
MAX_DEPTH = 100


@dataclass(frozen=True)
class Names:
    """What the names of a score expression mean.

    Attributes:
        values: parameter and let names -> an int, float or bool (a constant), ``None`` for a
            parameter whose value is not known (checking a file), or a string describing a value
            that is no number (``"a pattern"``, ``"a tuple"``).
        layout: the pattern's layout (for ``q.AXIS``), or None.
        inputs: run-time inputs (section 7) by name (:class:`~patterndsl.ir.InputDecl`), read as ``NAME[...]``.
    """

    values: Mapping[str, object]
    layout: Layout | None = None
    inputs: Mapping[str, object] | None = None


def bind(expr: syntax.Expr, names: Names) -> Node:
    """Type-check and fold a score expression.

    Args:
        expr: the syntax of the expression after ``score``.
        names: see :class:`Names`.

    Returns:
        A float-typed node (an integer expression is promoted to float).

    Raises:
        PatternError: located at the offending part of ``expr``.
    """
    node = _Binder(names).eval(expr)
    if node.type not in (INT, FLOAT, ANY):
        raise PatternTypeError(f"a score must be a number, got {nodes.describe(node)}", expr.span)
    if nodes.depth(node) > MAX_DEPTH:
        raise PatternValueError(f"the score is more than {MAX_DEPTH} operations deep", expr.span)
    return node


class _Binder:
    def __init__(self, names: Names):
        self.names = names

    def eval(self, e: syntax.Expr) -> Node:
        method = getattr(self, "_" + type(e).__name__.lower(), None)
        if method is None:
            raise PatternTypeError("this expression has no meaning in a score", e.span)
        return method(e)

    def _number(self, e: syntax.Number) -> Node:
        return num(e.value, e.span)

    def _boolean(self, e: syntax.Boolean) -> Node:
        return num(e.value, e.span)

    def _name(self, e: syntax.Name) -> Node:
        name = e.name
        values = self.names.values
        if name in values:
            if name in VARIABLES:
                raise PatternNameError(
                    f"'{name}' is a parameter here, which hides the score variable {name}; rename the parameter",
                    e.span,
                )
            value = values[name]
            if value is None:
                return Sym(name, ANY, e.span)
            if isinstance(value, str):
                raise PatternTypeError(f"'{name}' is {value}, not a number", e.span)
            return num(value, e.span)
        if name in VARIABLES:
            return Sym(name, VARIABLES[name], e.span)
        if name in (self.names.inputs or {}):
            return self._read(name, (), e)
        if name in FUNCTIONS:
            raise PatternTypeError(f"'{name}' is a function; call it as {name}(...)", e.span)
        candidates = [*values, *VARIABLES, *(self.names.inputs or {})]
        raise PatternNameError(f"unknown name '{name}' in score{did_you_mean(name, candidates)}", e.span)

    def _attribute(self, e: syntax.Attribute) -> Node:
        check_grid_axis(e.base, e.attr, self.names.layout, e.span, e.attr_span)
        return Coord(e.base, e.attr, INT, e.span)

    def _index(self, e: syntax.Index) -> Node:
        if e.base not in (self.names.inputs or {}):
            hint = did_you_mean(e.base, list(self.names.inputs or {}))
            raise PatternNameError(f"'{e.base}' is not a declared input{hint}; only inputs are indexed", e.base_span)
        return self._read(e.base, e.indices, e)

    def _read(self, name: str, indices: tuple[syntax.Expr, ...], e: syntax.Expr) -> Node:
        """``NAME[indices]`` checked against the input's declaration (section 7): a :class:`~nodes.Read`."""
        decl = self.names.inputs[name]
        dims = decl.index_dims
        if len(indices) != len(dims):
            shown = ", ".join("q" if d == "token" else "h" if d == "head" else "..." for d in dims)
            declared = f"{decl.kind}[{', '.join(str(d) for d in decl.dims)}]"
            got = f"{len(indices)} ind{'ex' if len(indices) == 1 else 'ices'}"
            raise PatternTypeError(
                f"input '{name}' is {declared}: index it as {name}[{shown}] (batch is never written), got {got}", e.span
            )
        out = []
        for dim, index in zip(dims, indices, strict=True):
            value = self.eval(index)
            if value.type not in (INT, ANY):
                raise PatternTypeError(
                    f"an index of '{name}' must be an integer, got {nodes.describe(value)} (floor() makes one)",
                    index.span,
                )
            if dim == "token" and value not in (Sym("q", INT), Sym("k", INT)):
                raise PatternTypeError(f"a token dimension of '{name}' is indexed by a position, q or k", index.span)
            if dim == "head" and value != Sym("h", INT):
                raise PatternTypeError(f"the head dimension of '{name}' is indexed by h", index.span)
            out.append(value)
        return Read(name, tuple(out), FLOAT if decl.kind == "float" else INT, e.span)

    def _tuple(self, e: syntax.Tuple) -> Node:
        raise PatternTypeError("a score is a number, not a tuple", e.span)

    def _call(self, e: syntax.Call) -> Node:
        if e.func not in FUNCTIONS:
            hint = did_you_mean(e.func, list(FUNCTIONS))
            raise PatternNameError(
                f"unknown function '{e.func}' in score{hint}; score functions are {', '.join(FUNCTIONS)}", e.func_span
            )
        if e.keywords:
            raise PatternTypeError(f"{e.func}() takes no keyword arguments", e.keywords[0].span)
        arity = FUNCTIONS[e.func]
        if len(e.args) != arity:
            noun = "argument" if arity == 1 else "arguments"
            raise PatternTypeError(f"{e.func}() takes {arity} {noun}, got {len(e.args)}", e.span)
        return make(e.func, [self.eval(a) for a in e.args], e.span)

    def _unary(self, e: syntax.Unary) -> Node:
        if e.op == "~":
            raise PatternTypeError("~ (complement) is for patterns; a score negates with -", e.span)
        return make("neg" if e.op == "-" else "not", [self.eval(e.operand)], e.span)

    def _binary(self, e: syntax.Binary) -> Node:
        # A long flat chain arrives as a left-deep spine: folded in a loop, not by recursion.
        spine = [e]
        while isinstance(spine[-1].left, syntax.Binary):
            spine.append(spine[-1].left)
        value = self.eval(spine[-1].left)
        for node in reversed(spine):
            if node.op in ("|", "&"):
                word = "or" if node.op == "|" else "and"
                raise PatternTypeError(f"'{node.op}' combines patterns; conditions combine with '{word}'", node.op_span)
            value = make(node.op, [value, self.eval(node.right)], node.span, node.op_span)
        return value

    def _compare(self, e: syntax.Compare) -> Node:
        operands = [self.eval(x) for x in e.operands]
        parts = [
            make(op, [operands[i], operands[i + 1]], e.span, e.op_spans[i])
            for i, op in enumerate(e.ops)
            if op in COMPARISONS
        ]
        return parts[0] if len(parts) == 1 else make("and", parts, e.span)

    def _boolop(self, e: syntax.BoolOp) -> Node:
        return make(e.op, [self.eval(x) for x in e.items], e.span)
