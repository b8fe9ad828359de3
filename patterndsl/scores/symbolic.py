"""Score modifiers: the symbolic backward, derived with sympy when a pattern is compiled.

Comes in: a typed score expression (:mod:`patterndsl.scores.nodes`). Goes out: a
:class:`Score` record holding the expression, its derivative with respect to the logit ``s``
(and, for float inputs that carry a gradient, with respect to each element read), simplified
and converted back to score nodes so that every backend renders it like the expression itself,
and, when the expression is additive in ``s`` (``s + bias``), the bias: the backward then needs
no derivative (``dS = dP``).

Every maximal part of the expression that does not depend on a variable of differentiation
(an integer expression, a bias of positions and heads, a condition) enters sympy as one opaque
symbol and comes back unchanged, so sympy never reinterprets integer floor division or the
conditions of ``select``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from patterndsl.scores.nodes import BOOL, COMPARISONS, FLOAT, Node, Num, Read, S, make, num, walk


@dataclass(frozen=True)
class Score:
    """A bound ``score`` statement.

    Attributes:
        expr: the modified logit, a float expression of ``s`` and the rest.
        ds: ``d expr / d s``.
        bias: ``expr - s`` when the expression is additive in ``s`` (``ds`` is then exactly 1), else None.
        partials: ``(read, d expr / d read)`` for every float input element the expression reads.
        derived_by: ``"sympy"`` (how the derivatives were obtained, for ``show --stage ir``).
    """

    expr: Node
    ds: Node = field(compare=False)
    bias: Node | None = field(compare=False, default=None)
    partials: tuple[tuple[Read, Node], ...] = field(compare=False, default=())

    @property
    def additive(self) -> bool:
        return self.bias is not None


@functools.lru_cache(maxsize=256)
def derive(expr: Node) -> Score:
    """The :class:`Score` of a score expression: its derivatives, by sympy.

    Args:
        expr: a typed, folded score expression.

    Returns:
        The record with ``ds``, ``bias`` (additive expressions) and ``partials`` (float reads).
    """
    import sympy as sp

    wrt: dict[Node, object] = {S: sp.Symbol("s", real=True)}
    for sub in walk(expr):
        if isinstance(sub, Read) and sub.type == FLOAT and sub not in wrt:
            wrt[sub] = sp.Symbol(f"t{len(wrt)}", real=True)
    conv = _ToSympy(sp, wrt)
    f = conv.convert(expr)
    back = {symbol: node for node, symbol in {**wrt, **conv.opaque}.items()}
    s = wrt[S]
    d = sp.diff(f, s)
    bias = None
    if d.is_Number and float(d) == 1.0:
        bias = _best(sp, f - s, back)
    ds = num(1.0) if bias is not None else _best(sp, d, back)
    partials = tuple((leaf, _best(sp, sp.diff(f, symbol), back)) for leaf, symbol in wrt.items() if leaf != S)
    return Score(expr, ds, bias, partials)


def describe_derivatives(score: Score) -> str:
    """Comment lines (``# ...``) naming the derivatives of ``score`` (``patterndsl show --stage ir``)."""
    from patterndsl.scores.nodes import to_source

    if score.additive:
        lines = [
            f"# d score / d s = 1 (additive in s: score = s + bias, bias = {to_source(score.bias)}; "
            "the backward uses dS = dP)"
        ]
    else:
        lines = [f"# d score / d s = {to_source(score.ds)}"]
    lines += [f"# d score / d {to_source(leaf)} = {to_source(d)}" for leaf, d in score.partials]
    lines.append("# (derived with sympy when the pattern was compiled)")
    return "\n".join(lines)


def _best(sp, e, back) -> Node:
    """``e`` as score nodes: its simplified form when that converts to a smaller tree, else ``e`` itself."""
    plain = _FromSympy(sp, back).convert(e)
    # sympy's full simplify costs seconds on piecewise forms (abs, min, max, select); it runs only
    # on small smooth expressions, where it pays (everything else keeps sympy's canonical form).
    hard = (sp.Piecewise, sp.Abs, sp.sign, sp.Heaviside, sp.Min, sp.Max)
    if sp.count_ops(e) > _SIMPLIFY_OPS or e.has(*hard):
        return plain
    try:
        simple = _FromSympy(sp, back).convert(sp.simplify(e))
    except _Unsupported:
        return plain
    return simple if _size(simple) < _size(plain) else plain


#: Derivatives with more operations than this keep sympy's canonical form (see :func:`_best`).
_SIMPLIFY_OPS = 16


def _size(node: Node) -> int:
    return sum(1 for _ in walk(node))


class _Unsupported(Exception):
    """A sympy construct with no score-node form (a simplified form may have one; the plain one converts)."""


class _ToSympy:
    def __init__(self, sp, wrt: dict[Node, object]):
        self.sp, self.wrt = sp, wrt
        self.opaque: dict[Node, object] = {}
        self.funcs = {"tanh": sp.tanh, "exp": sp.exp, "log": sp.log, "sqrt": sp.sqrt, "erf": sp.erf, "abs": sp.Abs}

    def convert(self, node: Node):
        sp = self.sp
        if node in self.wrt:
            return self.wrt[node]
        if isinstance(node, Num) and node.type != BOOL:
            return sp.Float(node.value) if node.type == FLOAT else sp.Integer(node.value)
        if node.type != FLOAT or not any(sub in self.wrt for sub in walk(node)):
            # Constant with respect to every variable of differentiation: one opaque symbol.
            if node not in self.opaque:
                # Conditions are symbols without assumptions: sympy reads those as booleans.
                name = f"{'b' if node.type == BOOL else 'c'}{len(self.opaque)}"
                self.opaque[node] = sp.Symbol(name) if node.type == BOOL else sp.Symbol(name, real=True)
            return self.opaque[node]
        if node.op == "**" and not any(sub in self.wrt for sub in walk(node.args[0])):
            # c ** x as exp(x * log(c)), log(c) opaque: sympy would take log(c) of a negative
            # constant as a complex number; at run time it is NaN, as c ** x itself.
            log_c = self.convert(make("log", [node.args[0]]) if node.args[0].type != BOOL else node.args[0])
            return sp.exp(self.convert(node.args[1]) * log_c)
        op, args = node.op, [self.convert(a) for a in node.args]
        if op in self.funcs:
            return self.funcs[op](args[0])
        table = {
            "+": lambda a, b: a + b,
            "-": lambda a, b: a - b,
            "*": lambda a, b: a * b,
            "/": lambda a, b: a / b,
            "**": lambda a, b: a**b,
            "neg": lambda a: -a,
            "min": sp.Min,
            "max": sp.Max,
            "select": lambda c, a, b: sp.Piecewise((a, c), (b, True)),
        }
        return table[op](*args)


class _FromSympy:
    def __init__(self, sp, back: dict[object, Node]):
        self.sp, self.back = sp, back

    def convert(self, e) -> Node:
        sp = self.sp
        if e in self.back:
            return self.back[e]
        if e is sp.true or e is sp.false:
            return num(bool(e))
        if e.is_Number or isinstance(e, sp.NumberSymbol):
            return num(float(e))
        if isinstance(e, sp.Add):
            return self._sum(e.args)
        if isinstance(e, sp.Mul):
            return self._product(e)
        if isinstance(e, sp.Pow):
            return self._power(e.base, e.exp)
        unary = {sp.tanh: "tanh", sp.exp: "exp", sp.log: "log", sp.erf: "erf", sp.Abs: "abs"}
        if e.func in unary and len(e.args) == 1:
            return make(unary[e.func], [self.convert(e.args[0])])
        if isinstance(e, (sp.Min, sp.Max)):
            name = "min" if isinstance(e, sp.Min) else "max"
            out = self.convert(e.args[0])
            for arg in e.args[1:]:
                out = make(name, [out, self.convert(arg)])
            return out
        if isinstance(e, sp.Piecewise):
            return self._piecewise(e.args)
        if isinstance(e, (sp.sign, sp.Heaviside)):
            x = self.convert(e.args[0])
            low, mid = (-1.0, 0.0) if isinstance(e, sp.sign) else (0.0, 0.5)
            inner = make("select", [make("<", [x, num(0.0)]), num(low), num(mid)])
            return make("select", [make(">", [x, num(0.0)]), num(1.0), inner])
        if isinstance(e, (sp.cosh, sp.sinh)):
            x = self.convert(e.args[0])
            plus, minus = make("exp", [x]), make("exp", [make("neg", [x])])
            both = make("+" if isinstance(e, sp.cosh) else "-", [plus, minus])
            return make("*", [num(0.5), both])
        if isinstance(e, sp.sech):
            return make("/", [num(1.0), self.convert(sp.cosh(e.args[0]))])
        if isinstance(e, sp.core.relational.Relational) and e.rel_op in COMPARISONS:
            return make(e.rel_op, [self.convert(e.lhs), self.convert(e.rhs)])
        if isinstance(e, (sp.And, sp.Or)):
            return make("and" if isinstance(e, sp.And) else "or", [self.convert(a) for a in e.args])
        if isinstance(e, sp.Not):
            return make("not", [self.convert(e.args[0])])
        raise _Unsupported(str(e))

    def _sum(self, terms) -> Node:
        plus, minus = [], []
        for term in terms:
            coeff, rest = term.as_coeff_Mul()
            if coeff.is_Number and coeff < 0:
                if rest == 1:
                    minus.append(num(float(-coeff)))
                elif float(coeff) == -1.0:
                    minus.append(self.convert(rest))
                else:
                    minus.append(make("*", [num(float(-coeff)), self.convert(rest)]))
            else:
                plus.append(self.convert(term))
        out = plus[0] if plus else make("neg", [minus.pop(0)])
        for term in plus[1:]:
            out = make("+", [out, term])
        for term in minus:
            out = make("-", [out, term])
        return out

    def _product(self, e) -> Node:
        sp = self.sp
        top, bottom = [], []
        coeff, _ = e.as_coeff_Mul()
        negative = coeff.is_Number and coeff < 0
        if negative:
            e = -e
        for factor in sp.Mul.make_args(e):
            if factor.is_Number and float(factor) == 1.0:
                continue
            base, exp = factor.as_base_exp()
            if exp.is_Number and exp < 0:
                bottom.append(self._power(base, -exp))
            else:
                top.append(self.convert(factor))
        out = top[0] if top else num(1.0)
        for factor in top[1:]:
            out = make("*", [out, factor])
        for factor in bottom:
            out = make("/", [out, factor])
        return make("neg", [out]) if negative else out

    def _power(self, base, exp) -> Node:
        sp = self.sp
        x = self.convert(base)
        if exp == sp.Rational(1, 2):
            return make("sqrt", [x])
        if exp == 1:
            return x
        if exp.is_Number and exp < 0:
            return make("/", [num(1.0), self._power(base, -exp)])
        return make("**", [x, self.convert(exp) if not exp.is_Number else num(float(exp))])

    def _piecewise(self, pairs) -> Node:
        value, cond = pairs[0]
        if cond is self.sp.true or len(pairs) == 1:
            return self.convert(value)
        rest = self._piecewise(pairs[1:])
        return make("select", [self.convert(cond), self.convert(value), rest])
