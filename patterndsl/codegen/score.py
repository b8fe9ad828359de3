"""Stage 5 (codegen): a score modifier and its derivative rendered as Triton functions.

Comes in: the pattern's :class:`patterndsl.scores.Score` (or None) and its layout. Goes out: the
text of two module-level constants and, with a score, two ``@triton.jit`` functions the kernel
templates call on every visited tile (full tiles too):

* ``SCORE`` / ``SLOPE``: constexpr flags (a score; a score that is not additive in ``s``).
* ``_score(s, i, j, h)``: the modified logit of the scaled logits ``s`` ``[BM, BN]`` (natural
  units) at original query indices ``i`` ``[BM, 1]``, key indices ``j`` ``[1, BN]`` and head ``h``.
* ``_dscore(s, i, j, h)``: ``d score / d s`` (the sympy derivative), used by the backward only
  when ``SLOPE`` (an additive score needs none: ``dS = dP``).

Each operator of a node is one line assigned to a temporary (shared sub-expressions once). The
table :data:`_CALLS` maps functions to Triton; ``tanh`` and ``**`` have helpers because the
interpreter has no libdevice. Integer parts compute in int32 with floor semantics
(``_fdiv``/``_fmod`` of :mod:`patterndsl.codegen.predicate`).
"""

from __future__ import annotations

from patterndsl import ir
from patterndsl.errors import BackendError
from patterndsl.scores.nodes import BOOL, COMPARISONS, FLOAT, INT, Coord, Node, Num, Op, Read, Sym, to_source, walk

HELPERS = """@triton.jit
def _tanh(x):
    # tanh without libdevice (absent under the interpreter), in one exp and one division (few registers:
    # it runs on every tile); exp overflowing to inf gives 1, to 0 gives -1; absolute error ~1e-7.
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _pow(a, b):
    # a ** b for a > 0 (and 0 ** b = 0 for b > 0); NaN for a < 0, as torch.pow with a non-integer b.
    return tl.exp2(b * tl.log2(a))"""

_CALLS = {"exp": "tl.exp", "log": "tl.log", "sqrt": "tl.sqrt", "erf": "tl.erf", "abs": "tl.abs", "tanh": "_tanh"}
_VARS = {"s": "s", "q": "q", "k": "k", "h": "h", "Lq": "lq", "Lk": "lk"}


class _Renderer:
    def __init__(self, layout: ir.Layout | None):
        self.layout = layout
        self.lines: list[str] = []
        self.memo: dict[Node, str] = {}

    def value(self, node: Node, want: str | None = None) -> str:
        """Text of ``node`` (a literal, a variable or a temporary), as a float when ``want`` is FLOAT."""
        text = self._value(node)
        if want == FLOAT and node.type == INT:
            return repr(float(node.value)) if isinstance(node, Num) else f"tl.cast({text}, tl.float32)"
        return text

    def _value(self, node: Node) -> str:
        if isinstance(node, Num):
            if node.type == BOOL:
                return "True" if node.value else "False"
            return repr(node.value) if node.type == FLOAT else str(node.value)
        if isinstance(node, Sym):
            return _VARS[node.name]
        if node in self.memo:
            return self.memo[node]
        if isinstance(node, Read):
            # check.py refuses input reads in a score today; should one arrive, say so rather than crash.
            raise BackendError("run-time inputs in a score are not rendered into Triton kernels yet: use backend='cpu'")
        text = self._coord(node) if isinstance(node, Coord) else self._op(node)
        name = f"t{len(self.memo)}"
        self.lines.append(f"    {name} = {text}")
        self.memo[node] = name
        return name

    def _coord(self, node: Coord) -> str:
        stride = 1
        for axis, extent in reversed(self.layout.axes):
            if axis == node.axis:
                return f"({node.side} // {stride}) % {extent}"
            stride *= extent
        raise KeyError(node.axis)

    def _op(self, node: Op) -> str:
        op, args = node.op, node.args
        floats = FLOAT in (a.type for a in args if a.type != BOOL)
        want = FLOAT if floats else None
        if op == "select":
            c = self.value(args[0])
            return f"tl.where({c}, {self.value(args[1], node.type)}, {self.value(args[2], node.type)})"
        if op in _CALLS:
            return f"{_CALLS[op]}({self.value(args[0], FLOAT if op != 'abs' else None)})"
        if op in ("min", "max"):
            a, b = (self.value(x, want) for x in args)
            return f"tl.{op}imum({a}, {b})"
        if op == "floor":
            x = self.value(args[0])
            return f"tl.floor({x}).to(tl.int32)" if args[0].type == FLOAT else x
        if op == "neg":
            return f"-{self.value(args[0])}"
        if op == "not":
            return f"~{self.value(args[0])}"
        if op in ("and", "or"):
            return f" {'&' if op == 'and' else '|'} ".join(self.value(a) for a in args)
        if op == "//":
            return f"_fdiv({self.value(args[0])}, {self.value(args[1])})"
        if op == "%":
            return f"_fmod({self.value(args[0])}, {self.value(args[1])})"
        if op == "**":
            return self._power(args[0], args[1])
        if op == "/":
            want = FLOAT
        if op in COMPARISONS or op in ("+", "-", "*", "/"):
            return f"{self.value(args[0], want)} {op} {self.value(args[1], want)}"
        raise AssertionError(f"score operator {op!r} has no Triton rendering")  # bind.py admits no other

    def _power(self, base: Node, exponent: Node) -> str:
        if isinstance(exponent, Num) and float(exponent.value) in (1.0, 2.0, 3.0, 4.0, 0.5, -1.0, -2.0):
            x = self.value(base, FLOAT)
            e = float(exponent.value)
            if e == 0.5:
                return f"tl.sqrt({x})"
            product = " * ".join([x] * int(abs(e)))
            return product if e > 0 else f"1.0 / ({product})"
        return f"_pow({self.value(base, FLOAT)}, {self.value(exponent, FLOAT)})"


def _function(name: str, node: Node, what: str, layout: ir.Layout | None) -> str:
    r = _Renderer(layout)
    result = r.value(node, FLOAT)
    head = [
        "@triton.jit",
        f"def {name}(s, i, j, h):",
        f"    # {what}",
        "    q = i + (LK - LQ)",
        "    k = j",
    ]
    # The lengths as int32 tensors (module constants are constexprs, which have no .to()).
    used = {sub.name for sub in walk(node) if isinstance(sub, Sym)}
    head += [f"    {v} = tl.cast({c}, tl.int32)" for v, c in (("lq", "LQ"), ("lk", "LK")) if v.capitalize() in used]
    # The result has the tile's shape even when the expression reads no logit (a bias alone).
    tail = f"    return {result}" if "s" in used else f"    return {result} + tl.zeros_like(s)"
    return "\n".join([*head, *r.lines, tail])


def render(score, layout: ir.Layout | None) -> str:
    """The score constants and functions for a kernel module (see the module docstring).

    Args:
        score: the pattern's :class:`patterndsl.scores.Score`, or None.
        layout: the pattern's layout (grid coordinates).

    Returns:
        Source text to place after the floor helpers.
    """
    if score is None:
        return "SCORE = tl.constexpr(False)\nSLOPE = tl.constexpr(False)"
    parts = [
        "SCORE = tl.constexpr(True)",
        f"SLOPE = tl.constexpr({not score.additive})",
        "",
        "",
        HELPERS,
        "",
        "",
        _function("_score", score.expr, f"score: {to_source(score.expr)}", layout),
    ]
    if not score.additive:
        parts += ["", "", _function("_dscore", score.ds, f"d score / d s (sympy): {to_source(score.ds)}", layout)]
    return "\n".join(parts)


def describe(score) -> str:
    """One line for a spec's canonical text (and so the cache key): the expression and its derivative."""
    if score is None:
        return "score=None"
    return f"score={to_source(score.expr)} ds={to_source(score.ds)} additive={score.additive}"
