"""Stage 2 of the pipeline: syntax tree -> checked, canonical IR.

Comes in: a :class:`~patterndsl.grammar.syntax.Module` from ``grammar.parse``
and parameter values from Python. Goes out: an :class:`~patterndsl.ir.PatternIR`
with every parameter bound, names resolved, types and arities checked,
constants folded (floor semantics), neighborhood arguments broadcast to one
entry per layout axis, and combinators built through ``ir.union``/``inter``/
``complement``/``difference`` so the result is canonical. Also
:func:`check_lengths`, the size checks run at mask/plan/run time, and
:func:`check_module`, the whole-file check behind ``patterndsl check``.
Nothing here evaluates Python; the expression evaluator below is the only
interpreter of source expressions.
"""

from __future__ import annotations

import math
import operator
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from patterndsl import ir, primitives, scores
from patterndsl.errors import (
    HeadsError,
    LayoutError,
    PatternError,
    PatternNameError,
    PatternSyntaxError,
    PatternTypeError,
    PatternValueError,
    did_you_mean,
    listing,
)
from patterndsl.grammar import syntax
from patterndsl.primitives.common import require as _check

__all__ = ["bind", "check_lengths", "check_module"]

_FUNCTIONS = ir.Func.ARITY
_ARITH: dict[str, Callable[[int, int], int]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "//": operator.floordiv,
    "%": operator.mod,
}
_COMPARE: dict[str, Callable[[int, int], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_MAX_INT = 2**62
_FOLD_FUNC: dict[str, Callable[..., int]] = {"abs": abs, "min": min, "max": max}


def _reserved(name: str) -> bool:
    """Names a parameter or let may not take: they would hide a primitive or a where variable."""
    return name in primitives.REGISTRY or name in ir.Var.NAMES or name in _FUNCTIONS


@dataclass(frozen=True, slots=True)
class _Unknown:
    """A value not known while checking a file without parameter values (``patterndsl check``).

    ``kind`` is ``"int"``, ``"bool"``, ``"pattern"`` or ``"scalar"`` (a parameter:
    an integer, boolean or tuple, never a pattern); every check that needs the
    value itself is skipped, every other check still runs.
    """

    kind: str


Value = Any  # int | bool | tuple | ir.Node | ir.Expr | _Unknown


def _is(value: Value, kind: str) -> bool:
    """True when ``value`` may be of ``kind`` ("int", "bool", "pattern")."""
    if isinstance(value, _Unknown):
        return value.kind == kind or (value.kind == "scalar" and kind in ("int", "bool"))
    if kind == "int":
        return (isinstance(value, int) and not isinstance(value, bool)) or _expr_kind(value) == "int"
    if kind == "bool":
        return isinstance(value, bool) or _expr_kind(value) == "bool"
    return isinstance(value, ir.Node)


def _expr_kind(value: Value) -> str | None:
    if isinstance(value, (ir.Cmp, ir.Logic, ir.LNot)):
        return "bool"
    if isinstance(value, ir.InputRef) and value.kind == "float":
        return "float"
    if isinstance(value, ir.Expr):
        return "int"
    return None


def _describe(value: Value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float (floats are only allowed in score)"
    if isinstance(value, tuple):
        return "a tuple"
    if isinstance(value, ir.Node):
        return "a pattern"
    if _expr_kind(value) == "bool":
        return "a condition"
    if _expr_kind(value) == "float":
        return f"float input '{value.name}' (float inputs may appear only in score and as cluster centroids)"
    if _expr_kind(value) == "int":
        return "an integer expression of positions"
    return "a value"


def _const(value: Value) -> ir.Expr:
    return value if isinstance(value, ir.Expr) else ir.Const(value)


# --------------------------------------------------------------------------- scope


@dataclass
class _Scope:
    """Names visible in one pattern body while it is being bound."""

    values: dict[str, Value] = field(default_factory=dict)
    spans: dict[str, ir.Span] = field(default_factory=dict)
    #: While checking without parameter values an extent may be an ``_Unknown``.
    layout: ir.Layout | None = None
    #: Parameters whose values came from Python: type errors about them point at their declaration.
    passed: set[str] = field(default_factory=set)
    #: Run-time inputs declared so far (section 7), by name.
    inputs: dict[str, ir.InputDecl] = field(default_factory=dict)
    #: ``(message, span)`` of indices ``patterndsl check`` cannot prove in range.
    warnings: list = field(default_factory=list)

    def declare(self, name: str, span: ir.Span, what: str) -> None:
        if _reserved(name):
            raise PatternNameError(f"'{name}' is a built-in name and cannot be used as a {what} name", span)
        if name in self.spans:
            first = self.spans[name]
            raise PatternNameError(f"'{name}' is already defined (line {first.line}, column {first.column})", span)
        self.spans[name] = span


# --------------------------------------------------------------------------- expression evaluator


class _Evaluator:
    """Evaluates syntax expressions to values, folding constants; ``where`` mode keeps q/k/h symbolic."""

    def __init__(self, scope: _Scope):
        self.scope = scope

    def eval(self, e: syntax.Expr, where: bool = False) -> Value:
        method = getattr(self, "_" + type(e).__name__.lower())
        return method(e, where)

    def span_of(self, e: syntax.Expr) -> ir.Span:
        """Where an error about ``e`` points: a parameter given from Python is blamed at its declaration."""
        if isinstance(e, syntax.Name) and e.name in self.scope.passed:
            return self.scope.spans[e.name]
        return e.span

    def type_error(self, message: str, e: syntax.Expr) -> PatternTypeError:
        """A type error about ``e`` (see :meth:`span_of`), naming the Python value when it is one."""
        return PatternTypeError(message + self.python_note(e), self.span_of(e))

    def python_note(self, e: syntax.Expr) -> str:
        """`` (parameter 'n' = 3 from Python)`` when ``e`` names a parameter given from Python, else ``""``."""
        if isinstance(e, syntax.Name) and e.name in self.scope.passed:
            return f" (parameter '{e.name}' = {value_text(self.scope.values[e.name])} from Python)"
        return ""

    # -- typed entry points

    def int_value(self, e: syntax.Expr, what: str) -> int | _Unknown:
        value = self.eval(e)
        if isinstance(value, _Unknown) and _is(value, "int"):
            return value
        if not (isinstance(value, int) and not isinstance(value, bool)):
            raise self.type_error(f"{what} must be an integer, got {_describe(value)}", e)
        return value

    def pattern_value(self, e: syntax.Expr, what: str) -> ir.Node | _Unknown:
        value = self.eval(e)
        if not _is(value, "pattern"):
            raise PatternTypeError(f"{what} must be a pattern, got {_describe(value)}", e.span)
        return value

    # -- atoms

    def _number(self, e: syntax.Number, where: bool) -> int | float:
        return e.value if isinstance(e.value, float) else _bounded(e.value, e.span)

    def _boolean(self, e: syntax.Boolean, where: bool) -> bool:
        return e.value

    def _name(self, e: syntax.Name, where: bool) -> Value:
        name = e.name
        if where and name in ir.Var.NAMES:
            return ir.Var(name, e.span)
        if name in self.scope.inputs:
            return _input_ref(self, self.scope.inputs[name], (), e, where)
        if name in self.scope.values:
            return self.scope.values[name]
        if name in self.scope.spans:
            raise PatternNameError(f"'{name}' is not defined yet: a default may only use earlier parameters", e.span)
        if name in primitives.REGISTRY and not primitives.REGISTRY[name].params:
            return ir.Prim(name, (), e.span)
        if name in primitives.REGISTRY:
            raise PatternTypeError(f"primitive '{name}' needs arguments: {name}(...)", e.span)
        if name in ir.Var.NAMES:
            raise PatternNameError(f"'{name}' is only defined inside where(...)", e.span)
        if name == "s":
            raise PatternNameError("'s' (the scaled logit) is only defined in a score statement", e.span)
        if name in _FUNCTIONS:
            raise PatternTypeError(f"'{name}' is a function; call it as {name}(...)", e.span)
        if name in ir.SCORES:
            raise PatternNameError(f"'{name}' is a route score; it is only valid as route(score = {name})", e.span)
        candidates = [*self.scope.values, *primitives.REGISTRY]
        if where:
            candidates += [*ir.Var.NAMES, *_FUNCTIONS]
        raise PatternNameError(f"unknown name '{name}'{did_you_mean(name, candidates)}", e.span)

    def _attribute(self, e: syntax.Attribute, where: bool) -> Value:
        if e.base in ("q", "k") and not where:
            raise PatternNameError(f"'{e.base}.{e.attr}' is only defined inside where(...)", e.span)
        ir.check_grid_axis(e.base, e.attr, self.scope.layout, e.span, e.attr_span)
        return ir.Coord(e.base, e.attr, e.span)

    def _index(self, e: syntax.Index, where: bool) -> Value:
        decl = self.scope.inputs.get(e.base)
        if decl is None:
            if e.base in self.scope.values or e.base in self.scope.spans:
                raise PatternTypeError(f"'{e.base}' is not an input and cannot be indexed", e.base_span)
            hint = did_you_mean(e.base, self.scope.inputs)
            raise PatternNameError(
                f"unknown input '{e.base}'{hint} (declare it: input {e.base}: int[...])", e.base_span
            )
        return _input_ref(self, decl, e.indices, e, where)

    def _tuple(self, e: syntax.Tuple, where: bool) -> Value:
        items = []
        for item in e.items:
            value = self.eval(item, where)
            if isinstance(value, _Unknown):
                return _Unknown("scalar")
            if not isinstance(value, int):
                raise PatternTypeError(
                    f"tuple entries must be constant integers or booleans, got {_describe(value)}", item.span
                )
            items.append(value)
        return tuple(items)

    def _call(self, e: syntax.Call, where: bool) -> Value:
        if e.func in primitives.REGISTRY:
            return _bind_primitive(e, self)
        if e.func in _FUNCTIONS:
            return self._function(e, where)
        if e.func in self.scope.values:
            raise PatternTypeError(f"'{e.func}' is not a primitive and cannot be called", e.func_span)
        if e.func in scores.FUNCTIONS:
            raise PatternTypeError(f"{e.func}() is a score function: floats are only allowed in score", e.func_span)
        hint = did_you_mean(e.func, [*primitives.REGISTRY, *_FUNCTIONS])
        raise PatternNameError(f"unknown primitive '{e.func}'{hint}", e.func_span)

    def _function(self, e: syntax.Call, where: bool) -> Value:
        arity = _FUNCTIONS[e.func]
        if e.keywords:
            raise PatternTypeError(f"{e.func}() takes no keyword arguments", e.keywords[0].span)
        if len(e.args) != arity:
            noun = "argument" if arity == 1 else "arguments"
            raise PatternTypeError(f"{e.func}() takes {arity} {noun}, got {len(e.args)}", e.span)
        args = [self._int_operand(a, where, f"{e.func}()") for a in e.args]
        if any(isinstance(a, _Unknown) for a in args):
            return _Unknown("int")
        if all(isinstance(a, int) for a in args):
            return _FOLD_FUNC[e.func](*args)
        return ir.Func(e.func, tuple(_const(a) for a in args), e.span)

    # -- operators

    def _int_operand(self, e: syntax.Expr, where: bool, op: str) -> Value:
        value = self.eval(e, where)
        if not _is(value, "int"):
            hint = ""
            if isinstance(value, ir.Node) and op in ("+", "*", "//", "%"):
                hint = " (patterns combine with | & - ~)"
            raise self.type_error(f"{op} needs an integer, got {_describe(value)}{hint}", e)
        return value

    def _bool_operand(self, e: syntax.Expr, where: bool, op: str) -> Value:
        value = self.eval(e, where)
        if not _is(value, "bool"):
            hint = " (patterns combine with | & ~)" if isinstance(value, ir.Node) else ""
            raise self.type_error(f"'{op}' needs a condition, got {_describe(value)}{hint}", e)
        return value

    def _unary(self, e: syntax.Unary, where: bool) -> Value:
        if e.op == "not":
            value = self._bool_operand(e.operand, where, "not")
            if isinstance(value, _Unknown):
                return _Unknown("bool")
            if isinstance(value, bool):
                return not value
            return value.operand if isinstance(value, ir.LNot) else ir.LNot(value, e.span)
        value = self.eval(e.operand, where)
        if e.op == "~":
            if not _is(value, "pattern"):
                raise self.type_error(
                    f"~ (complement) needs a pattern, got {_describe(value)} (negate integers with -)", e.operand
                )
            return value if isinstance(value, _Unknown) else ir.complement(value, e.span)
        if not _is(value, "int"):
            hint = " (the complement of a pattern is ~)" if isinstance(value, ir.Node) else ""
            raise self.type_error(f"unary - needs an integer, got {_describe(value)}{hint}", e.operand)
        if isinstance(value, _Unknown):
            return _Unknown("int")
        if isinstance(value, int):
            return -value
        return value.operand if isinstance(value, ir.Neg) else ir.Neg(value, e.span)

    def _binary(self, e: syntax.Binary, where: bool) -> Value:
        # ``a OP b OP c ...`` arrives as a left-deep spine (grammar/): it is folded in a loop, so a
        # long flat chain is no recursion, and each run of one of ``| &`` is combined by a single
        # ``ir.union``/``ir.inter`` call (one sort, not one insertion per operand).
        spine = [e]
        while isinstance(spine[-1].left, syntax.Binary):
            spine.append(spine[-1].left)
        spine.reverse()
        value = self.eval(spine[0].left, where)
        run: list[Value] = []
        for at, node in enumerate(spine):
            if node.op not in ("|", "&"):
                value = self._step(node, value, where)
                continue
            if not run:
                run.append(self._pattern_operand(value, node, node.left))
            run.append(self._pattern_operand(self.eval(node.right, where), node, node.right))
            if at + 1 == len(spine) or spine[at + 1].op != node.op:
                value, run = _combined(node.op, run, node.span), []
        return value

    def _step(self, e: syntax.Binary, left: Value, where: bool) -> Value:
        """``left OP e.right`` for ``+ - * // %`` (``-`` of patterns is their difference)."""
        if e.op == "-" and _is(left, "pattern"):
            right = self._pattern_operand(self.eval(e.right, where), e, e.right)
            return _combined("-", [left, right], e.span)
        if not _is(left, "int"):
            hint = " (patterns combine with | & - ~)" if isinstance(left, ir.Node) else ""
            raise self.type_error(f"'{e.op}' needs integers, got {_describe(left)}{hint}", e.left)
        if e.op in ("/", "**"):
            raise PatternTypeError(
                f"'{e.op}' gives a float, and floats are only allowed in score (integer division is //)", e.op_span
            )
        right = self._int_operand(e.right, where, f"'{e.op}'")
        return _arith(e.op, left, right, e.op_span)

    def _pattern_operand(self, value: Value, e: syntax.Binary, side: syntax.Expr) -> Value:
        if not _is(value, "pattern"):
            names = {"|": "union", "&": "intersection", "-": "difference"}
            hints = {"|": " (for conditions use 'or')", "&": " (for conditions use 'and')", "-": ""}
            raise self.type_error(f"'{e.op}' ({names[e.op]}) needs patterns, got {_describe(value)}{hints[e.op]}", side)
        return value

    def _compare(self, e: syntax.Compare, where: bool) -> Value:
        operands = [self._int_operand(x, where, f"'{e.ops[0]}'") for x in e.operands]
        parts = []
        for i, op in enumerate(e.ops):
            a, b = operands[i], operands[i + 1]
            if isinstance(a, _Unknown) or isinstance(b, _Unknown):
                parts.append(_Unknown("bool"))
            elif isinstance(a, int) and isinstance(b, int):
                parts.append(_COMPARE[op](a, b))
            else:
                parts.append(ir.Cmp(op, _const(a), _const(b), e.op_spans[i]))
        return _logic("and", parts, e.span)

    def _boolop(self, e: syntax.BoolOp, where: bool) -> Value:
        return _logic(e.op, [self._bool_operand(x, where, e.op) for x in e.items], e.span)


def _combined(op: str, operands: list[Value], span: ir.Span) -> Value:
    """``|``, ``&`` (any number of operands) or ``-`` (two) of checked pattern operands."""
    if any(isinstance(v, _Unknown) for v in operands):
        return _Unknown("pattern")
    if op == "|":
        return ir.union(*operands, span=span)
    if op == "&":
        return ir.inter(*operands, span=span)
    return ir.difference(*operands, span=span)


def _bounded(value: int, span: ir.Span | None) -> int:
    """Keep folded integers within int64 range, where every later stage computes."""
    if abs(value) > _MAX_INT:
        raise PatternValueError(f"integer out of range: |value| must be at most 2**62 ({_MAX_INT})", span)
    return value


def _arith(op: str, left: Value, right: Value, span: ir.Span) -> Value:
    if op in ("//", "%") and isinstance(right, int) and right == 0:
        raise PatternValueError(f"division by zero: the divisor of '{op}' is 0", span)
    if isinstance(left, _Unknown) or isinstance(right, _Unknown):
        return _Unknown("int")
    if isinstance(left, int) and isinstance(right, int):
        return _bounded(_ARITH[op](left, right), span)
    return ir.Arith(op, _const(left), _const(right), span)


def _logic(op: str, parts: list[Value], span: ir.Span | None) -> Value:
    """``and``/``or`` over conditions with constants folded and nested chains flattened."""
    absorbing = op == "or"  # the constant that decides the result
    items: list[ir.Expr] = []
    unknown = False
    for part in parts:
        if isinstance(part, _Unknown):
            unknown = True
        elif isinstance(part, bool):
            if part == absorbing:
                return absorbing
        elif isinstance(part, ir.Logic) and part.op == op:
            items.extend(part.items)
        else:
            items.append(part)
    if unknown:
        return _Unknown("bool")
    if not items:
        return not absorbing
    if len(items) == 1:
        return items[0]
    return ir.Logic(op, tuple(items), span)


# --------------------------------------------------------------------------- run-time inputs


def _dims_text(decl: ir.InputDecl) -> str:
    return f"{decl.kind}[{', '.join(str(d) for d in decl.dims)}]"


def _input_ref(ev: _Evaluator, decl: ir.InputDecl, indices: tuple, e: syntax.Expr, where: bool) -> Value:
    """``NAME[indices]`` (or bare ``NAME``) checked against the declaration: an ``ir.InputRef``."""
    name = decl.name
    if not where:
        raise PatternTypeError(
            f"input '{name}' is only usable inside where(...), score and as the first argument of within", e.span
        )
    dims = decl.index_dims
    if len(indices) != len(dims):
        if not indices:
            shown = ", ".join("q" if d == "token" else "h" if d == "head" else "..." for d in dims)
            raise PatternTypeError(f"input '{name}' is {_dims_text(decl)}: index it as {name}[{shown}]", e.span)
        raise PatternTypeError(
            f"input '{name}' is {_dims_text(decl)}: it takes {len(dims)} "
            f"ind{'ex' if len(dims) == 1 else 'ices'} (batch is never written), got {len(indices)}",
            e.span,
        )
    out = []
    for dim, index in zip(dims, indices, strict=True):
        value = ev._int_operand(index, True, f"an index of '{name}'")
        if isinstance(value, _Unknown):
            return _Unknown("int")
        if dim == "token" and not (isinstance(value, ir.Var) and value.name in ("q", "k")):
            raise PatternTypeError(
                f"a token dimension of '{name}' is indexed by a position, q or k (got {_describe(value)})", index.span
            )
        if dim == "head" and not (isinstance(value, ir.Var) and value.name == "h"):
            raise PatternTypeError(f"the head dimension of '{name}' is indexed by h", index.span)
        if isinstance(dim, int) or dim == "dim":
            _warn_range(ev.scope, name, dim, value, index.span)
        out.append(_const(value))
    return ir.InputRef(name, tuple(out), decl.kind, e.span)


#: An upper bound on positions, heads and lengths when the sizes are not known (check time).
UNKNOWN_SIZE = 2**62


def _warn_range(scope: _Scope, name: str, dim, value: Value, span: ir.Span) -> None:
    """Record a warning unless the index is provably inside the table extent ``dim``."""
    if isinstance(value, int) and isinstance(dim, int) and 0 <= value < dim:
        return
    # Grid coordinates are bounded by the layout; positions, heads and lengths are not known here, so
    # they range up to a bound no call reaches (an index like q % 4 or min(q, 3) is still provable;
    # q is negative for the first queries when Lq > Lk).
    if (
        isinstance(dim, int)
        and isinstance(value, ir.Expr)
        and not any(isinstance(x, ir.InputRef) for x in ir.walk_expr(value))
    ):
        ranges = {"q": (-UNKNOWN_SIZE, UNKNOWN_SIZE), "k": (0, UNKNOWN_SIZE), "h": (0, UNKNOWN_SIZE)}
        ranges |= {"Lq": (0, UNKNOWN_SIZE), "Lk": (0, UNKNOWN_SIZE)}
        for a, n in scope.layout.axes if scope.layout is not None else ():
            ranges["q", a] = ranges["k", a] = (0, n - 1)
        lo, hi = expr_bounds(value, ranges)
        if lo >= 0 and hi < dim:
            return
    from patterndsl.printer import value_to_source

    extent = f"[0, {dim})" if isinstance(dim, int) else "the head size"
    scope.warnings.append(
        (
            f"cannot prove that index '{value_to_source(value)}' of input '{name}' stays in {extent}; "
            "an index outside reads the nearest entry",
            span,
        )
    )


def _bind_input(stmt: syntax.Input, ev: _Evaluator) -> ir.InputDecl:
    scope = ev.scope
    if stmt.name in scope.inputs:
        first = scope.inputs[stmt.name].span
        raise PatternNameError(f"input '{stmt.name}' is declared twice (first on line {first.line})", stmt.name_span)
    scope.declare(stmt.name, stmt.name_span, "input")
    if stmt.kind not in ("int", "float"):
        hint = did_you_mean(stmt.kind, ["int", "float"])
        raise PatternTypeError(f"an input is int[...] or float[...], got '{stmt.kind}'{hint}", stmt.kind_span)
    dims: list = []
    for at, d in enumerate(stmt.dims):
        if isinstance(d, syntax.Name) and d.name in ir.INPUT_DIMS:
            if d.name == "batch" and at:
                raise PatternTypeError("'batch' may only be the first dimension of an input", d.span)
            if d.name in dims:
                raise PatternTypeError(f"an input has at most one '{d.name}' dimension", d.span)
            dims.append(d.name)
            continue
        if isinstance(d, syntax.Name) and d.name not in scope.values:
            hint = did_you_mean(d.name, [*ir.INPUT_DIMS, *scope.values])
            raise PatternNameError(
                f"unknown dimension '{d.name}'{hint}: a dimension is batch, token, head, dim or an integer extent",
                d.span,
            )
        extent = ev.int_value(d, "a table extent")
        if not isinstance(extent, _Unknown):
            _check(extent >= 1, f"a table extent must be >= 1, got {extent}", d.span)
        dims.append(extent)
    return ir.InputDecl(stmt.name, stmt.kind, tuple(dims), stmt.span)


def _input_argument(expr: syntax.Expr, ev: _Evaluator, takes: str, ok, needs: str) -> str:
    """An argument that names an input (``within``'s segments, ``cluster``'s centroids), checked by ``ok(decl)``."""
    inputs = ev.scope.inputs
    if not isinstance(expr, syntax.Name) or expr.name not in inputs:
        name = expr.name if isinstance(expr, syntax.Name) else None
        hint = did_you_mean(name, inputs) if name else ""
        what = f"'{name}' is not an input{hint}" if name else "got an expression"
        raise PatternTypeError(f"{takes}: {what}", expr.span)
    decl = inputs[expr.name]
    if not ok(decl):
        raise PatternTypeError(f"{needs}, '{decl.name}' is {_dims_text(decl)}", expr.span)
    return decl.name


def _segments_argument(expr: syntax.Expr, ev: _Evaluator) -> str:
    """``within``'s first argument: the name of an ``int[batch, token]`` or ``int[token]`` input."""
    return _input_argument(
        expr,
        ev,
        "within(...) takes an int[batch, token] input first",
        lambda d: d.kind == "int" and d.index_dims == ("token",),
        "within(...) needs an int[batch, token] or int[token] input",
    )


def _centroids(decl: ir.InputDecl) -> bool:
    dims = decl.index_dims
    shaped = len(dims) in (2, 3) and dims[-1] == "dim" and not isinstance(dims[-2], str)
    return decl.kind == "float" and shaped and (len(dims) == 2 or dims[0] == "head")


def _centroids_argument(expr: syntax.Expr, ev: _Evaluator) -> str:
    """``cluster``'s first argument: the name of a ``float[n, dim]`` or ``float[head, n, dim]`` input."""
    return _input_argument(
        expr,
        ev,
        "cluster(...) takes a float[n, dim] input of centroids first",
        _centroids,
        "cluster(...) needs a float[n, dim] or float[head, n, dim] input",
    )


# --------------------------------------------------------------------------- primitives


def _bind_primitive(call: syntax.Call, ev: _Evaluator) -> Value:
    """Bind ``call`` to its signature, check every argument and build the ``ir.Prim``."""
    name = call.func
    record = primitives.lookup(name)
    sig = record.params
    names = [p.name for p in sig]
    if len(call.args) > len(sig):
        extra = call.args[len(sig)]
        takes = f"at most {len(sig)} argument{'s' if len(sig) != 1 else ''} ({', '.join(names)})" if sig else "none"
        raise PatternTypeError(f"{name}() takes {takes}, got {len(call.args)}", extra.span)
    given: dict[str, syntax.Expr] = {}
    for param, arg in zip(sig, call.args, strict=False):
        given[param.name] = arg
    for kw in call.keywords:
        if kw.name not in names:
            hint = did_you_mean(kw.name, names)
            listing = ", ".join(names) if names else "no arguments"
            if any(p.kind == "pred" for p in sig):
                hint += " (equality is written ==)"
            raise PatternNameError(f"{name}() has no argument '{kw.name}'{hint}; it takes {listing}", kw.span)
        if kw.name in given:
            raise PatternTypeError(f"{name}() got argument '{kw.name}' twice", kw.span)
        given[kw.name] = kw.value
    missing = [p.name for p in sig if p.required and p.name not in given]
    if missing:
        raise PatternTypeError(f"{name}() is missing required argument '{missing[0]}'", call.span)

    values: dict[str, Value] = {}
    spans: dict[str, ir.Span] = {}
    for param in sig:
        if param.name in given:
            expr = given[param.name]
            values[param.name] = _argument(name, param, expr, ev)
            spans[param.name] = ev.span_of(expr)
        else:
            values[param.name] = param.default
            spans[param.name] = call.span
    try:
        if record.shape_args is not None:
            record.shape_args(values, spans, ev.scope.layout, call.span)
        if any(isinstance(v, _Unknown) for v in values.values()):
            return _Unknown("pattern")
        if record.check is not None:
            simpler = record.check(values, spans, ev.scope.layout)
            if simpler is not None:
                return simpler
    except PatternError as err:
        # A rule blames an argument by its span; when that argument is a value from Python, say so.
        note = next((ev.python_note(e) for p, e in given.items() if spans[p] == err.span and ev.python_note(e)), "")
        if not note:
            raise
        raise type(err)(err.message + note, err.span) from None
    return ir.Prim(name, tuple((p.name, values[p.name]) for p in sig), call.span)


def _argument(prim: str, param: ir.Param, expr: syntax.Expr, ev: _Evaluator) -> Value:
    what = f"{prim}() argument '{param.name}'"
    if param.kind == "score":
        if isinstance(expr, syntax.Name) and expr.name in ir.SCORES:
            return expr.name
        if isinstance(expr, syntax.Name):
            hint = did_you_mean(expr.name, ir.SCORES)
            raise PatternNameError(f"unknown score '{expr.name}'{hint}; scores are {', '.join(ir.SCORES)}", expr.span)
        raise PatternTypeError(f"{what} must be one of {', '.join(ir.SCORES)}", expr.span)
    if param.kind == "segments":
        return _segments_argument(expr, ev)
    if param.kind == "centroids":
        return _centroids_argument(expr, ev)
    if param.kind == "pred":
        value = ev.eval(expr, where=True)
        if not _is(value, "bool"):
            raise ev.type_error(f"where() needs a condition, got {_describe(value)}", expr)
        if isinstance(value, ir.Expr):
            _check_expr_depth(value, expr.span)
        return value
    value = ev.eval(expr)
    if isinstance(value, _Unknown):
        return value
    if param.kind == "pattern":
        if not isinstance(value, ir.Node):
            raise ev.type_error(f"{what} must be a pattern, got {_describe(value)}", expr)
        if ir.is_dynamic(value):
            raise PatternValueError(f"{what} must be a static pattern (no route inside)", expr.span)
        return value
    want_bool = param.kind == "bools"
    noun = "a boolean" if want_bool else "an integer"
    if isinstance(value, tuple) and param.kind in ("ints", "bools"):
        if any(want_bool != isinstance(item, bool) for item in value):
            plural = "booleans" if want_bool else "integers"
            raise ev.type_error(f"{what} must hold {plural}, got {value_text(value)}", expr)
        return value
    if isinstance(value, tuple):
        raise ev.type_error(f"{what} must be {noun}, got a tuple {value_text(value)}", expr)
    if want_bool != isinstance(value, bool) or not isinstance(value, int):
        raise ev.type_error(f"{what} must be {noun}, got {_describe(value)}", expr)
    return value


def value_text(value: Value) -> str:
    """Source text of a constant value, for messages."""
    from patterndsl.printer import value_to_source

    return value_to_source(value)


# --------------------------------------------------------------------------- parameters


# Errors about values passed from Python point at the parameter's declaration (which parameter) and
# say that the value came from Python, naming the keyword argument: the file is not wrong.


def _python_param(name: str, value: Any, decl: syntax.Param) -> Any:
    """Validate one parameter value passed from Python; lists become tuples."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (tuple, list)):
        if not value:
            raise PatternTypeError(
                f"the keyword argument {name}= passed from Python for parameter '{name}' must not be an empty tuple",
                decl.span,
            )
        return tuple(_python_scalar(name, item, decl) for item in value)
    return _python_scalar(name, value, decl)


def _python_scalar(name: str, value: Any, decl: syntax.Param) -> int | bool | float:
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PatternValueError(
                f"the keyword argument {name}={value} passed from Python for parameter '{name}' must be finite",
                decl.span,
            )
        return value
    if hasattr(type(value), "__index__") and not isinstance(value, float):
        try:
            number = operator.index(value)
        except TypeError:
            pass
        else:
            if abs(number) > _MAX_INT:
                raise PatternValueError(
                    f"the keyword argument {name}={number:.3g} passed from Python for parameter '{name}' "
                    "is out of range (|value| must be at most 2**62)",
                    decl.span,
                )
            return number
    raise PatternTypeError(
        f"the keyword argument {name}= passed from Python for parameter '{name}' must be an integer, "
        f"a float, a boolean or a tuple of integers or booleans, got {type(value).__name__}",
        decl.span,
    )


def _same_kind(a: Any, b: Any) -> bool:
    """Booleans and integers do not mix; an integer may stand for a tuple and back (grid arguments).

    A float parameter takes a float or an integer (promoted); an integer parameter no float.
    """
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(b, float) and not isinstance(a, (bool, tuple))
    flat_a = a if isinstance(a, tuple) else (a,)
    flat_b = b if isinstance(b, tuple) else (b,)
    return {isinstance(x, bool) for x in flat_a} == {isinstance(x, bool) for x in flat_b}


def _bind_params(pdef: syntax.PatternDef, params: dict, scope: _Scope, ev: _Evaluator, lenient: bool) -> list:
    declared = [p.name for p in pdef.params]
    for key in params:
        if key not in declared:
            hint = did_you_mean(str(key), declared)
            have = f"its parameters are {listing(declared)}" if declared else "it has no parameters"
            raise PatternNameError(
                f"the keyword argument {key}= passed from Python names no parameter of pattern '{pdef.name}'{hint}; "
                f"{have}",
                pdef.name_span,
            )
    for decl in pdef.params:
        scope.declare(decl.name, decl.span, "parameter")
    bound = []
    for decl in pdef.params:
        default = None
        if decl.default is not None:
            default = ev.eval(decl.default)
            if not isinstance(default, (int, float, tuple, _Unknown)):
                raise PatternTypeError(
                    f"the default of parameter '{decl.name}' must be an integer, boolean or tuple, or a float, "
                    f"got {_describe(default)}",
                    decl.default.span,
                )
        if decl.name in params:
            value = _python_param(decl.name, params[decl.name], decl)
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            scope.passed.add(decl.name)
            if isinstance(value, float) and not isinstance(default, (float, _Unknown, type(None))):
                raise PatternTypeError(
                    f"the keyword argument {decl.name}={value!r} passed from Python for parameter '{decl.name}' "
                    f"must be an integer, a boolean or a tuple like its default {value_text(default)} "
                    f"(a float parameter has a float default, e.g. {decl.name} = 1.0)",
                    decl.span,
                )
            if default is not None and not isinstance(default, _Unknown) and not _same_kind(value, default):
                raise PatternTypeError(
                    f"the keyword argument {decl.name}={reprlib.repr(value)} passed from Python for parameter "
                    f"'{decl.name}' must be like its default {value_text(default)}",
                    decl.span,
                )
        elif decl.default is not None:
            value = default
        elif lenient:
            value = _Unknown("scalar")
        else:
            raise PatternTypeError(f"pattern '{pdef.name}' needs a value for parameter '{decl.name}'", decl.span)
        scope.values[decl.name] = value
        bound.append((decl.name, value))
    return bound


# --------------------------------------------------------------------------- statements


def _bind_layout(stmt: syntax.Layout, ev: _Evaluator) -> ir.Layout:
    if stmt.kind != "grid":
        raise PatternNameError(f"unknown layout '{stmt.kind}'{did_you_mean(stmt.kind, ['grid'])}", stmt.kind_span)
    if not stmt.axes:
        raise PatternValueError("layout grid(...) needs at least one axis", stmt.span)
    axes = []
    seen: set[str] = set()
    for axis in stmt.axes:
        if axis.name in seen:
            raise PatternNameError(f"layout axis '{axis.name}' appears twice", axis.span)
        seen.add(axis.name)
        extent = ev.int_value(axis.extent, f"the extent of axis '{axis.name}'")
        if not isinstance(extent, _Unknown):
            _check(extent >= 1, f"the extent of axis '{axis.name}' must be >= 1, got {extent}", axis.extent.span)
        axes.append((axis.name, extent))
    size = math.prod(e for _, e in axes if not isinstance(e, _Unknown))
    # Each extent is in range alone; the number of positions is their product.
    _check(size <= _MAX_INT, f"layout grid(...) holds {size:.3g} positions, more than 2**62", stmt.span)
    return ir.Layout(tuple(axes), stmt.span)


def _bind_definition(
    pdef: syntax.PatternDef, params: dict, lenient: bool = False, warnings: list | None = None
) -> ir.PatternIR | None:
    """Bind one definition; with ``lenient`` unknown parameters are allowed and None is returned.

    ``warnings`` (when given) receives ``(message, span)`` of what could not be proved safe.
    """
    scope = _Scope(warnings=[] if warnings is None else warnings)
    ev = _Evaluator(scope)
    bound = _bind_params(pdef, params, scope, ev, lenient)
    rules: list[ir.HeadRule] = []
    layout_seen: syntax.Layout | None = None
    score_seen: syntax.Score | None = None
    for stmt in pdef.statements:
        if isinstance(stmt, syntax.Score):
            if score_seen is not None:
                raise PatternSyntaxError(
                    f"a pattern has at most one score statement (first one on line {score_seen.span.line})", stmt.span
                )
            score_seen = stmt
        elif isinstance(stmt, syntax.Layout):
            if layout_seen is not None:
                raise LayoutError(
                    f"a pattern has at most one layout (first one on line {layout_seen.span.line})", stmt.span
                )
            layout_seen = stmt
            scope.layout = _bind_layout(stmt, ev)
        elif isinstance(stmt, syntax.Input):
            decl = _bind_input(stmt, ev)
            scope.inputs[decl.name] = decl
        elif isinstance(stmt, syntax.Let):
            value = ev.eval(stmt.value)
            scope.declare(stmt.name, stmt.name_span, "let")
            scope.values[stmt.name] = value
        else:
            rule = _bind_heads(stmt, ev, rules)
            if rule is not None:
                rules.append(rule)
    default = None
    if pdef.final is not None:
        default = ev.pattern_value(pdef.final, "the final expression")
    elif not pdef.statements or not any(isinstance(s, syntax.Heads) for s in pdef.statements):
        raise PatternSyntaxError(
            f"pattern '{pdef.name}' has neither a final pattern expression nor heads lines", pdef.name_span
        )
    if default is not None and not isinstance(default, _Unknown):
        _check_extent(default, pdef.final.span)
    score = None if score_seen is None else _bind_score(score_seen, scope)
    if isinstance(default, _Unknown) or any(isinstance(v, _Unknown) for _, v in bound) or lenient:
        return None
    inputs = tuple(scope.inputs.values())
    for node in [r.node for r in rules] + ([default] if default is not None else []):
        for prim in ir.routes(node):
            for content in ir.contents(prim.arg("among")):
                # Labels are per query head, the choice per key-value head group: candidates would differ
                # between the heads that share one choice.
                raise PatternValueError(
                    f"route(...)'s among cannot use {content.name}(...): its candidates are shared by the query "
                    "heads of a key-value head, labels are per query head",
                    content.span or prim.span,
                )
    if inputs:
        _check_route_inputs([r.node for r in rules] + ([default] if default is not None else []))
    rules.sort(key=lambda r: r.lo)
    return ir.PatternIR(pdef.name, tuple(bound), scope.layout, tuple(rules), default, pdef.span, inputs, score=score)


def _check_route_inputs(nodes: list[ir.Node]) -> None:
    """Refuse a ``route`` whose ``among`` reads run-time inputs.

    A route's candidates are planned once per size from ``among`` alone
    (:func:`patterndsl.runtime.routing.candidates`); inputs elsewhere in the pattern only shape the
    operators around the route (LANGUAGE.md sections 2 and 7), which the call-time plan handles.
    """
    for node in nodes:
        for prim in ir.routes(node):
            among = prim.arg("among")
            for sub in ir.walk(among):
                if isinstance(sub, ir.Prim) and ir.prim_reads_inputs(sub):
                    raise PatternValueError(
                        "route(...)'s among cannot read run-time inputs yet: its candidates are planned once "
                        "per size; read the inputs outside the route, e.g. (route(...) & where(...))",
                        sub.span or prim.span,
                    )


def _bind_score(stmt: syntax.Score, scope: _Scope) -> scores.Score | None:
    """The score statement's expression, typed and folded, with its derivatives (None while unknown)."""

    def meaning(value: Value) -> object:
        if isinstance(value, _Unknown):
            return None if value.kind in ("int", "scalar") else f"{_describe(value)}"
        if isinstance(value, (int, float)):
            return value
        return _describe(value)

    names = scores.Names({name: meaning(v) for name, v in scope.values.items()}, scope.layout, scope.inputs)
    expr = scores.bind(stmt.value, names)
    if any(n.type == scores.ANY for n in scores.walk(expr)):
        return None
    return scores.derive(expr)


#: How deep a bound pattern may nest and how many nodes it may have with every ``let`` written
#: out where it is used. Syntax nesting is limited by the grammar, but lets nest without
#: parentheses, and a let used twice in the next one doubles the tree each time: every later
#: stage walks the tree, recursively and once per use.
MAX_DEPTH = 100
MAX_NODES = 50_000


def _check_extent(node: ir.Node, span: ir.Span) -> None:
    """Refuse a pattern deeper than :data:`MAX_DEPTH` or larger than :data:`MAX_NODES` (no recursion)."""
    depth: dict[int, int] = {}
    size: dict[int, int] = {}
    stack = [(node, False)]
    while stack:
        current, done = stack.pop()
        key = id(current)
        if key in size:
            continue
        kids = ir.children(current)
        if not done:
            stack.append((current, True))
            stack.extend((kid, False) for kid in kids if id(kid) not in size)
            continue
        depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
        size[key] = 1 + sum(size[id(k)] for k in kids)
        if depth[key] > MAX_DEPTH:
            raise PatternValueError(
                f"the pattern nests more than {MAX_DEPTH} levels deep once its lets are written out", span
            )
        if size[key] > MAX_NODES:
            raise PatternValueError(
                f"the pattern has more than {MAX_NODES} primitives and operators once its lets are written "
                "out where they are used",
                span,
            )


def _check_expr_depth(expr: ir.Expr, span: ir.Span) -> None:
    """Refuse a condition deeper than :data:`MAX_DEPTH` (a long flat ``q + q + ...`` is a deep binary tree)."""
    depth: dict[int, int] = {}
    stack = [(expr, False)]
    while stack:
        current, done = stack.pop()
        kids = ir.expr_children(current)
        if not done:
            stack.append((current, True))
            stack.extend((kid, False) for kid in kids if id(kid) not in depth)
            continue
        depth[id(current)] = 1 + max((depth[id(k)] for k in kids), default=0)
        if depth[id(current)] > MAX_DEPTH:
            raise PatternValueError(
                f"the condition is more than {MAX_DEPTH} operations deep; write it with fewer operations", span
            )


def _bind_heads(stmt: syntax.Heads, ev: _Evaluator, rules: list[ir.HeadRule]) -> ir.HeadRule | None:
    lo = ev.int_value(stmt.lo, "the first head of a heads range")
    hi = ev.int_value(stmt.hi, "the end of a heads range")
    node = ev.pattern_value(stmt.body, "the pattern of a heads line")
    if not isinstance(node, _Unknown):
        _check_extent(node, stmt.body.span)
    if isinstance(lo, _Unknown) or isinstance(hi, _Unknown) or isinstance(node, _Unknown):
        return None
    _check(lo >= 0, f"heads ranges start at 0 or later, got {lo}", stmt.lo.span)
    _check(lo < hi, f"heads range {lo}..{hi} is empty (it means {lo} <= h < {hi})", stmt.span)
    for rule in rules:
        if lo < rule.hi and rule.lo < hi:
            raise PatternValueError(
                f"heads range {lo}..{hi} overlaps {rule.lo}..{rule.hi} (line {rule.span.line})", stmt.span
            )
    return ir.HeadRule(lo, hi, node, stmt.span)


# --------------------------------------------------------------------------- entry points


def _pick(module: syntax.Module, name: str | None) -> syntax.PatternDef:
    defs = module.patterns
    if not defs:
        raise PatternSyntaxError("the source defines no pattern (expected 'pattern NAME { ... }')")
    seen: dict[str, syntax.PatternDef] = {}
    for pdef in defs:
        if pdef.name in seen:
            first = seen[pdef.name].span
            raise PatternNameError(
                f"pattern '{pdef.name}' is defined twice (first on line {first.line})", pdef.name_span
            )
        seen[pdef.name] = pdef
    if name is None:
        if len(defs) > 1:
            raise PatternNameError(
                f"the source defines {len(defs)} patterns ({listing(seen)}); pass name=... to pick one"
            )
        return defs[0]
    if name not in seen:
        raise PatternNameError(f"no pattern named '{name}'{did_you_mean(str(name), seen)}; defined: {listing(seen)}")
    return seen[name]


def _guard(run: Callable[[], Any], source: str | None, filename: str | None = None) -> Any:
    try:
        return run()
    except PatternError as err:
        raise err.with_source(source, filename) from None
    except RecursionError:
        raise PatternSyntaxError("the pattern is nested too deeply to check").with_source(source, filename) from None


def bind(module: syntax.Module, name: str | None = None, params: dict | None = None, source: str | None = None):
    """Check one pattern definition and bind its parameters into canonical IR.

    Args:
        module: the parsed source (``grammar.parse``).
        name: which definition; may be omitted when the source has exactly one.
        params: parameter values from Python (ints, bools, tuples or lists of those).
        source: the source text, attached to errors for caret rendering.

    Returns:
        The bound :class:`ir.PatternIR`.

    Raises:
        PatternError: any syntax-independent error (names, types, arity, values, layouts, heads).
    """
    params = dict(params or {})
    source = source if source is not None else module.source
    return _guard(lambda: _bind_definition(_pick(module, name), params), source, module.filename)


def check_module(
    module: syntax.Module, source: str | None = None, filename: str | None = None, warnings: list | None = None
) -> list[PatternError]:
    """Check every definition of a file as far as possible without parameter values.

    Parameters without a default are treated as unknown: everything that does not
    depend on their value (names, arity, types of other arguments, layouts, ...)
    is still checked.

    Args:
        module: the parsed source.
        source: the source text (for caret rendering); defaults to ``module.source``.
        filename: the file name shown in messages; defaults to ``module.filename``.

    Returns:
        The errors found, at most one per definition, in source order (empty when all is well).
        ``warnings`` (a list, when given) receives one rendered text per index that could not be
        proved in range (``FILE:LINE:COLUMN: warning: ...``).
    """
    source = source if source is not None else module.source
    filename = filename if filename is not None else module.filename
    errors: list[PatternError] = []
    if not module.patterns:
        return [PatternSyntaxError("the file defines no pattern").with_source(source, filename)]
    seen: dict[str, int] = {}
    for pdef in module.patterns:
        if pdef.name in seen:
            err = PatternNameError(
                f"pattern '{pdef.name}' is defined twice (first on line {seen[pdef.name]})", pdef.name_span
            )
            errors.append(err.with_source(source, filename))
            continue
        seen[pdef.name] = pdef.span.line
        found: list = []
        try:
            _guard(lambda pdef=pdef, found=found: _bind_definition(pdef, {}, True, found), source, filename)
        except PatternError as err:
            errors.append(err)
        if warnings is not None:
            for message, span in found:
                text = PatternError(message, span).with_source(source, filename).render()
                warnings.append(text.replace(": " + message, ": warning: " + message, 1))
    return errors


# --------------------------------------------------------------------------- size checks


def check_lengths(pir: ir.PatternIR, q_len: int, kv_len: int | None, heads: int) -> None:
    """Check the sizes a pattern is used at (called by mask, plan and the attention ops).

    Args:
        pir: the bound pattern.
        q_len: number of queries ``Lq`` (>= 1).
        kv_len: number of keys ``Lk`` (>= 1), or None for ``Lq``.
        heads: number of query heads (>= 1).

    Raises:
        PatternTypeError / PatternValueError: sizes that are not positive integers.
        LayoutError: a layout whose extents do not multiply to the length, or ``Lq != Lk`` with a layout.
        HeadsError: heads covered by no ``heads`` line when there is no final expression.
        PatternValueError: a ``//`` or ``%`` whose divisor is 0 at these lengths.
    """
    q_len = _size("q_len", q_len)
    kv_len = q_len if kv_len is None else _size("kv_len", kv_len)
    heads = _size("heads", heads)
    layout = pir.layout
    if layout is not None:
        if q_len != kv_len:
            raise LayoutError(
                f"pattern '{pir.name}' has a layout, so query and key lengths must be equal (got {q_len} and {kv_len})",
                layout.span,
            )
        if layout.size != q_len:
            shape = ", ".join(f"{n} = {e}" for n, e in layout.axes)
            raise LayoutError(
                f"layout grid({shape}) holds {layout.size} positions but the sequence length is {q_len}", layout.span
            )
    if pir.default is None:
        uncovered = _uncovered(pir, heads)
        if uncovered:
            shown = ", ".join(f"{r.start}" if len(r) == 1 else f"{r.start}..{r.stop}" for r in uncovered)
            raise HeadsError(
                f"pattern '{pir.name}' has no final expression and heads {shown} are not covered "
                f"by any heads line (heads = {heads})",
                pir.span,
            )
    for used_by, node in _used_nodes(pir, heads):
        for prim in ir.walk(node):
            rule = primitives.lookup(prim.name).check_sizes if isinstance(prim, ir.Prim) else None
            if rule is not None:
                rule(prim, q_len, kv_len, used_by, layout)


_INT64 = 2**63 - 1


def variable_ranges(q_len: int, kv_len: int, heads: int, layout: ir.Layout | None) -> dict:
    """Inclusive ``(lo, hi)`` of every variable a ``where`` predicate can read at these sizes.

    Keys are variable names (``q``, ``k``, ``h``, ``Lq``, ``Lk``) and ``("q"|"k", axis)`` for grid coordinates.
    """
    ranges: dict = {
        "q": (kv_len - q_len, kv_len - 1),
        "k": (0, kv_len - 1),
        "h": (0, max(heads - 1, 0)),
        "Lq": (q_len, q_len),
        "Lk": (kv_len, kv_len),
    }
    if layout is not None:
        for name, extent in layout.axes:
            ranges["q", name] = ranges["k", name] = (0, extent - 1)
    return ranges


def expr_bounds(expr: ir.Expr, ranges: dict) -> tuple[int, int]:
    """Interval bounds ``(lo, hi)`` of an integer expression (booleans give ``(0, 1)``).

    Sound but not tight: used to reject predicates that could overflow 64-bit
    arithmetic and by code generators to pick 32- or 64-bit integers.

    Args:
        expr: a ``where`` expression or sub-expression.
        ranges: from :func:`variable_ranges`.

    Returns:
        Inclusive bounds as Python ints.
    """
    if isinstance(expr, ir.Const):
        return int(expr.value), int(expr.value)
    if isinstance(expr, ir.Var):
        return ranges[expr.name]
    if isinstance(expr, ir.Coord):
        return ranges[expr.side, expr.axis]
    if isinstance(expr, ir.InputRef) and ("input", expr.name) in ranges:
        return ranges["input", expr.name]  # the generated kernels' value range of an input
    if isinstance(expr, ir.Neg):
        lo, hi = expr_bounds(expr.operand, ranges)
        return -hi, -lo
    if isinstance(expr, ir.Func):
        bounds = [expr_bounds(a, ranges) for a in expr.args]
        if expr.fn == "abs":
            ((lo, hi),) = bounds
            return (0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), max(abs(lo), abs(hi))
        pick = min if expr.fn == "min" else max
        return pick(b[0] for b in bounds), pick(b[1] for b in bounds)
    if isinstance(expr, ir.Arith):
        (a, b), (c, d) = expr_bounds(expr.left, ranges), expr_bounds(expr.right, ranges)
        if expr.op == "+":
            return a + c, b + d
        if expr.op == "-":
            return a - d, b - c
        if expr.op == "*":
            corners = (a * c, a * d, b * c, b * d)
            return min(corners), max(corners)
        if expr.op == "//":
            # |x // y| <= |x| for every non-zero integer y (and x // y == -1 for small negative x).
            big = max(abs(a), abs(b), 1)
            return -big, big
        # Floor semantics: x % y lies in [0, y) for y > 0 and in (y, 0] for y < 0.
        if c > 0:
            return 0, d - 1
        if d < 0:
            return c + 1, 0
        big = max(abs(c), abs(d))
        return -big, big
    return 0, 1


def expr_magnitude(expr: ir.Expr, ranges: dict) -> int:
    """A bound on ``|x|`` for the value of ``expr`` and for every partial sum of its terms.

    Later stages rearrange sums: the tile rules turn ``L op R`` into a linear form
    ``cq * q + ck * k + c0`` and add its pieces in whatever order, so a predicate is only
    safe when the sum of the magnitudes of its additive terms fits, not just its range
    (``expr_bounds``). Products and the non-linear operators fall back to ``expr_bounds``.

    Args:
        expr: a ``where`` expression or sub-expression.
        ranges: from :func:`variable_ranges`.

    Returns:
        A non-negative Python int.
    """
    if isinstance(expr, ir.Neg):
        return expr_magnitude(expr.operand, ranges)
    if isinstance(expr, ir.Arith) and expr.op in "+-*":
        left, right = expr_magnitude(expr.left, ranges), expr_magnitude(expr.right, ranges)
        return left * right if expr.op == "*" else left + right
    lo, hi = expr_bounds(expr, ranges)
    return max(abs(lo), abs(hi))


def check_int64(pred: ir.Expr, ranges: dict, sizes: str) -> None:
    """Reject a predicate some of whose intermediate values can leave 64-bit integers.

    Checks every sub-expression and, for each comparison ``L op R``, the difference
    ``L - R`` (which the tile rules and the kernels compute), with
    :func:`expr_magnitude`.

    Args:
        pred: the ``where`` predicate.
        ranges: from :func:`variable_ranges`.
        sizes: the sizes, for the message (``"Lq=16, Lk=13"``).

    Raises:
        PatternValueError: at the offending sub-expression.
    """
    from patterndsl.printer import expr_to_source

    for sub in ir.walk_expr(pred):
        if isinstance(sub, ir.Cmp):
            need = expr_magnitude(sub.left, ranges) + expr_magnitude(sub.right, ranges) + 1
            what = f"the comparison '{expr_to_source(sub)}' needs values up to {need:.3g}"
        elif isinstance(sub, (ir.Logic, ir.LNot)):
            continue
        else:
            need = expr_magnitude(sub, ranges)
            what = f"'{expr_to_source(sub)}' can reach {need:.3g}"
        if need > _INT64:
            raise PatternValueError(f"{what} at {sizes}, beyond 64-bit integer arithmetic (|value| < 2**63)", sub.span)


def _size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise PatternTypeError(f"{name} must be a positive integer, got {type(value).__name__}")
    value = operator.index(value)
    if value < 1:
        raise PatternValueError(f"{name} must be >= 1, got {value}")
    return value


def _uncovered(pir: ir.PatternIR, heads: int) -> list[range]:
    """The heads below ``heads`` that no ``heads`` line covers, as ranges (no per-head loop)."""
    gaps, start = [], 0
    for rule in pir.heads:  # sorted by ``lo`` and disjoint
        if rule.lo > start:
            gaps.append(range(start, min(rule.lo, heads)))
        start = max(start, rule.hi)
    gaps.append(range(start, heads))
    return [g for g in gaps if len(g)]


def _used_nodes(pir: ir.PatternIR, heads: int):
    """(heads, node) for every pattern some head below ``heads`` uses, with the heads (a range) that use it."""
    for rule in pir.heads:
        if rule.lo < heads:
            yield range(rule.lo, min(rule.hi, heads)), rule.node
    if pir.default is not None:
        for rest in _uncovered(pir, heads):
            yield rest, pir.default


#: A divisor that depends on the head is checked head by head up to this many heads; beyond, the
#: dense meaning decides per element, as it does for divisors that depend on positions.
_DIVISOR_HEADS = 4096


def _check_divisors(pred: ir.Expr, env: dict[str, int], head_range) -> None:
    # A division behind ``and``/``or`` may be short-circuited away for some pairs or heads;
    # the dense meaning decides those per element.
    guarded = {
        id(e)
        for logic in ir.walk_expr(pred)
        if isinstance(logic, ir.Logic)
        for item in logic.items[1:]
        for e in ir.walk_expr(item)
    }
    for sub in ir.walk_expr(pred):
        if not (isinstance(sub, ir.Arith) and sub.op in ("//", "%")) or id(sub) in guarded:
            continue
        names = {e.name for e in ir.walk_expr(sub.right) if isinstance(e, ir.Var)}
        if any(isinstance(e, ir.Coord) for e in ir.walk_expr(sub.right)) or names & {"q", "k"}:
            continue  # depends on positions; the dense meaning decides per pair
        if "h" in names and len(head_range) > _DIVISOR_HEADS:
            continue
        for h in head_range if "h" in names else (None,):
            if _fold(sub.right, {**env, "h": h}) == 0:
                at = f" for head {h}" if h is not None else ""
                raise PatternValueError(
                    f"division by zero: the divisor of '{sub.op}' is 0 at Lq={env['Lq']}, Lk={env['Lk']}{at}",
                    sub.span,
                )


def _fold(expr: ir.Expr, env: dict[str, int | None]) -> int | bool | None:
    """The value of an integer expression over ``env`` (None when a variable is unknown or a divisor is 0)."""
    if isinstance(expr, ir.Const):
        return expr.value
    if isinstance(expr, ir.Var):
        return env.get(expr.name)
    if isinstance(expr, ir.Neg):
        value = _fold(expr.operand, env)
        return None if value is None else -value
    if isinstance(expr, ir.Arith):
        left, right = _fold(expr.left, env), _fold(expr.right, env)
        if left is None or right is None or (expr.op in ("//", "%") and right == 0):
            return None
        return _ARITH[expr.op](left, right)
    if isinstance(expr, ir.Func):
        args = [_fold(a, env) for a in expr.args]
        return None if any(a is None for a in args) else _FOLD_FUNC[expr.fn](*args)
    return None
