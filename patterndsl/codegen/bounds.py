"""Stage 5 of the pipeline (codegen): closed-form key-tile bounds printed as Triton integer code.

Comes in: a :class:`patterndsl.analysis.plan.RunForm` (sympy expressions in
the query-tile index ``m`` built from ``+ - *``, ``floor``, ``Min`` and
``Max``). Goes out: Triton expressions of the kernel variable ``m``, or
:class:`Unrenderable` when an expression falls outside that vocabulary, in
which case the generator falls back to CSR index lists.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy


class Unrenderable(Exception):
    """The expression cannot be printed as exact Triton integer code."""


def _integer(e: sympy.Expr) -> str:
    if not e.is_Integer:
        raise Unrenderable(f"non-integer constant {e}")
    value = int(e)
    return str(value) if value >= 0 else f"({value})"


def _add(e: sympy.Add) -> str:
    terms = [render(t) for t in sympy.Add.make_args(e)]
    return "(" + " + ".join(terms) + ")"


def _mul(e: sympy.Mul) -> str:
    coeff, rest = e.as_coeff_Mul()
    factors = [render(f) for f in sympy.Mul.make_args(rest)]
    if coeff != 1:
        factors.insert(0, _integer(coeff))
    return "(" + " * ".join(factors) + ")"


def _floor(e: sympy.floor) -> str:
    num, den = sympy.fraction(sympy.together(e.args[0]))
    if not den.is_Integer or int(den) <= 0:
        raise Unrenderable(f"floor with a non-constant divisor: {e}")
    num = sympy.expand(num) if not num.has(sympy.floor, sympy.Min, sympy.Max) else num
    if int(den) == 1:
        return render(num)
    # Triton's // truncates towards zero; _fdiv rounds towards minus infinity.
    return f"_fdiv({render(num)}, {int(den)})"


def _ceiling(e: sympy.ceiling) -> str:
    return f"(-{_floor(sympy.floor(-e.args[0]))})"


def _minmax(fn: str) -> Callable[[sympy.Expr], str]:
    def rule(e: sympy.Expr) -> str:
        args = [render(a) for a in sorted(e.args, key=sympy.default_sort_key)]
        code = args[0]
        for a in args[1:]:
            code = f"tl.{fn}({code}, {a})"
        return code

    return rule


_RULES: dict[type, Callable[[sympy.Expr], str]] = {
    sympy.Add: _add,
    sympy.Mul: _mul,
    sympy.floor: _floor,
    sympy.ceiling: _ceiling,
    sympy.Min: _minmax("minimum"),
    sympy.Max: _minmax("maximum"),
}


def render(e) -> str:
    """Print one bound as Triton code of the integer ``m``.

    Args:
        e: a sympy expression (or a plain int) in the symbol named ``m``.

    Returns:
        The code text.

    Raises:
        Unrenderable: for anything but integers, ``m``, ``+ - *``, floor/ceiling of a
            rational-linear argument with a constant divisor, ``Min`` and ``Max``.
    """
    e = sympy.sympify(e)
    if e.is_Integer:
        return _integer(e)
    if e.is_Symbol:
        if e.name != "m":
            raise Unrenderable(f"unknown symbol {e}")
        return "m"
    for kind, rule in _RULES.items():
        if isinstance(e, kind):
            return rule(e)
    raise Unrenderable(f"cannot print {e} ({type(e).__name__})")


def render_form(form) -> dict[str, str] | None:
    """Print the four bounds of a RunForm, or None when any is unrenderable.

    Args:
        form: a :class:`patterndsl.analysis.plan.RunForm` whose symbol is ``form.m``.

    Returns:
        ``{"lo", "hi", "full_lo", "full_hi"}`` -> code, or None.
    """
    if form is None:
        return None
    m = sympy.Symbol("m", integer=True, nonnegative=True)
    out = {}
    try:
        for name in ("lo", "hi", "full_lo", "full_hi"):
            expr = sympy.sympify(getattr(form, name))
            if form.m is not None:
                expr = expr.subs(form.m, m)
            out[name] = render(expr)
    except Unrenderable:
        return None
    return out
