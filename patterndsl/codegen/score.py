"""Stage 5 (codegen): a score modifier and its derivative rendered as Triton functions.

Comes in: the pattern's :class:`patterndsl.scores.Score` (or None) and its layout. Goes out: the
text of two module-level constants and, with a score, two ``@triton.jit`` functions the kernel
templates call on every visited tile (full tiles too):

* ``SCORE`` / ``SLOPE`` / ``TABLES``: constexpr flags (a score; a score that is not additive in
  ``s``; a score that reads float inputs, whose gradients the backward accumulates).
* ``_score(s, i, j, h, RT, lst)``: the modified logit of the scaled logits ``s`` ``[BM, BN]``
  (natural units) at original query indices ``i`` ``[BM, 1]``, key indices ``j`` ``[1, BN]`` and
  head ``h``; run-time inputs (section 7) are read from the int32 table ``RT`` of batch element
  ``lst // NHK`` at the offsets of :class:`patterndsl.codegen.inputs.InputLayout` (float inputs
  stored as their float32 bits), indices clamped.
* ``_dscore(s, i, j, h, RT, lst)``: ``d score / d s`` (the sympy derivative), used by the backward
  only when ``SLOPE`` (an additive score needs none: ``dS = dP``).
* ``_dtables(g, s, i, j, h, RT, lst, DTAB, valid)``: with ``TABLES``, adds ``g * d score / d read``
  (``g = dL / d score``) atomically into the float32 gradient table ``DTAB`` (laid out as ``RT``)
  at every float entry the pairs read, where ``valid``.

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
    def __init__(self, layout: ir.Layout | None, inputs=None):
        self.layout = layout
        self.inputs = inputs
        self.lines: list[str] = []
        self.memo: dict[Node, str] = {}

    def address(self, node: Read) -> str:
        """``inp + offset + clamped row-major index`` of the entry ``node`` reads (``inp``: the element's slice)."""
        if self.inputs is None:
            raise BackendError(f"input '{node.name}' read in a score has no place in the kernels' run-time table")
        extents, offset = self.inputs.value(node.name)
        terms, inner = [], 1
        for n in extents:
            inner *= n
        for index, extent in zip(node.indices, extents, strict=True):
            inner //= extent
            clamped = f"tl.minimum(tl.maximum({self.value(index)}, 0), {extent - 1})"
            terms.append(clamped if inner == 1 else f"{clamped} * {inner}")
        return " + ".join(["inp", str(offset), *terms])

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
            address = self.address(node)
            text = f"tl.load({address})" + (".to(tl.float32, bitcast=True)" if node.type == FLOAT else "")
        else:
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


def _head(name: str, args: str, what: str, used: set[str], reads: bool, stride: int) -> list[str]:
    head = ["@triton.jit", f"def {name}({args}):", f"    # {what}", "    q = i + (LK - LQ)", "    k = j"]
    # The lengths as int32 tensors (module constants are constexprs, which have no .to()).
    head += [f"    {v} = tl.cast({c}, tl.int32)" for v, c in (("lq", "LQ"), ("lk", "LK")) if v.capitalize() in used]
    if reads:
        head.append(f"    inp = RT + (lst // NHK) * {stride}")
    return head


def _function(name: str, node: Node, what: str, layout: ir.Layout | None, inputs) -> str:
    r = _Renderer(layout, inputs)
    result = r.value(node, FLOAT)
    used = {sub.name for sub in walk(node) if isinstance(sub, Sym)}
    reads = any(isinstance(sub, Read) for sub in walk(node))
    head = _head(name, "s, i, j, h, RT, lst", what, used, reads, inputs.stride if reads else 0)
    # The result has the tile's shape even when the expression reads no logit (a bias alone).
    tail = f"    return {result}" if "s" in used else f"    return {result} + tl.zeros_like(s)"
    return "\n".join([*head, *r.lines, tail])


def _tables_function(score, layout: ir.Layout | None, inputs) -> str:
    """``_dtables``: ``g * d score / d read`` added atomically into ``DTAB`` at each float read's entry."""
    r = _Renderer(layout, inputs)
    adds = []
    for leaf, partial in score.partials:
        value = r.value(partial, FLOAT)
        address = r.address(leaf).replace("inp", "out", 1)
        if any(isinstance(sub, (Coord, Sym)) and getattr(sub, "name", "q") in ("q", "k") for sub in walk(leaf)):
            # The address as a whole tile (a read of k alone is one row of addresses, of q alone one column).
            adds.append(f'    tl.atomic_add({address} + 0 * i + 0 * j, g * {value}, mask=valid, sem="relaxed")')
        else:
            # One entry for the whole tile (e.g. t[h]): the tile's sum, added once.
            total = f"tl.sum(tl.sum(tl.where(valid, g * {value}, 0.0), 1), 0)"
            adds.append(f'    tl.atomic_add({address}, {total}, sem="relaxed")')
    nodes = [n for leaf, partial in score.partials for n in (leaf, partial)]
    used = {sub.name for node in nodes for sub in walk(node) if isinstance(sub, Sym)}
    what = "gradients of the float inputs: " + ", ".join(f"d score / d {to_source(leaf)}" for leaf, _ in score.partials)
    head = _head("_dtables", "g, s, i, j, h, RT, lst, DTAB, valid", what, used, True, inputs.stride)
    head.append(f"    out = DTAB + (lst // NHK) * {inputs.stride}")
    return "\n".join([*head, *r.lines, *adds])


def render(score, layout: ir.Layout | None, inputs=None) -> str:
    """The score constants and functions for a kernel module (see the module docstring).

    Args:
        score: the pattern's :class:`patterndsl.scores.Score`, or None.
        layout: the pattern's layout (grid coordinates).
        inputs: the spec's :class:`~patterndsl.codegen.inputs.InputLayout` when it has inputs.

    Returns:
        Source text to place after the floor helpers.
    """
    if score is None:
        return "SCORE = tl.constexpr(False)\nSLOPE = tl.constexpr(False)\nTABLES = tl.constexpr(False)"
    tables = bool(score.partials)
    parts = [
        "SCORE = tl.constexpr(True)",
        f"SLOPE = tl.constexpr({not score.additive})",
        f"TABLES = tl.constexpr({tables})",
        "",
        "",
        HELPERS,
        "",
        "",
        _function("_score", score.expr, f"score: {to_source(score.expr)}", layout, inputs),
    ]
    if not score.additive:
        what = f"d score / d s (sympy): {to_source(score.ds)}"
        parts += ["", "", _function("_dscore", score.ds, what, layout, inputs)]
    if tables:
        parts += ["", "", _tables_function(score, layout, inputs)]
    return "\n".join(parts)


def has_tables(score) -> bool:
    """Whether a score reads float inputs (the backward then accumulates their gradients)."""
    return score is not None and bool(score.partials)


def inputs_read(score) -> tuple[str, ...]:
    """Names of the run-time inputs a score reads (they get a place in ``RT``), in first-read order."""
    if score is None:
        return ()
    return tuple(dict.fromkeys(sub.name for sub in walk(score.expr) if isinstance(sub, Read)))


def describe(score) -> str:
    """One line for a spec's canonical text (and so the cache key): the expression and its derivative."""
    if score is None:
        return "score=None"
    return f"score={to_source(score.expr)} ds={to_source(score.ds)} additive={score.additive}"
