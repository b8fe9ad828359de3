"""Printing round-trips and IR equality is canonical, as hypothesis properties.

Random pattern sources (random trees of primitives with random arguments in
positional or keyword form, combinators, ``where`` predicates, lets, heads
lines, layouts and parameters) are bound; the printed form of the bound
pattern, and of every node and predicate inside it, must bind back to an
equal IR. Algebraic rewrites that the IR canonicalises must compare equal.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patterndsl import check, ir
from patterndsl.grammar import parse
from patterndsl.printer import expr_to_source, node_to_source, pattern_to_source

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
AXES = ("t", "y", "x")


def bind_text(source: str) -> ir.PatternIR:
    return check.bind(parse(source), source=source)


@st.composite
def layouts(draw):
    """None, or a list of (axis, extent) pairs."""
    if draw(st.booleans()):
        return None
    rank = draw(st.integers(1, 3))
    return [(name, draw(st.integers(2, 6))) for name in AXES[-rank:]]


def layout_text(layout) -> str:
    if layout is None:
        return ""
    return "layout grid(" + ", ".join(f"{n} = {e}" for n, e in layout) + ")\n"


@st.composite
def call(draw, name: str, values: list):
    """``name(...)`` with a random split between positional and keyword arguments."""
    sig = ir.SIGNATURES[name]
    given_args = [(p.name, v) for p, v in zip(sig, values, strict=False) if v is not None]
    n_pos = draw(st.integers(0, len(given_args)))
    # Positional arguments must be a prefix of the signature.
    prefix = 0
    while prefix < n_pos and prefix < len(values) and values[prefix] is not None:
        prefix += 1
    parts = [v for _, v in given_args[:prefix]]
    keywords = [f"{k} = {v}" for k, v in given_args[prefix:]]
    parts += draw(st.permutations(keywords)) if keywords else []
    return f"{name}({', '.join(parts)})"


def ints(lo: int, hi: int):
    return st.integers(lo, hi).map(str)


def maybe(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def int_exprs(draw, layout, depth: int = 2):
    atoms = [ints(-5, 9), st.sampled_from(["q", "k", "h", "Lq", "Lk", "n"])]
    if layout:
        atoms.append(st.builds(lambda s, a: f"{s}.{a}", st.sampled_from("qk"), st.sampled_from([n for n, _ in layout])))
    if depth == 0:
        return draw(st.one_of(*atoms))
    sub = int_exprs(layout, depth - 1)
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.one_of(*atoms))
    if kind == 1:
        op = draw(st.sampled_from(["+", "-", "*"]))
        return f"({draw(sub)} {op} {draw(sub)})"
    if kind == 2:
        op = draw(st.sampled_from(["//", "%"]))
        divisor = draw(st.one_of(st.sampled_from(["q", "k", "h", "Lk"]), st.integers(1, 7).map(str)))
        return f"({draw(sub)} {op} {divisor})"
    if kind == 3:
        return f"-{draw(sub)}"
    if kind == 4:
        return f"abs({draw(sub)})"
    fn = draw(st.sampled_from(["min", "max"]))
    return f"{fn}({draw(sub)}, {draw(sub)})"


@st.composite
def predicates(draw, layout, depth: int = 2):
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        n = draw(st.integers(1, 2))
        ops = [draw(st.sampled_from(["==", "!=", "<", "<=", ">", ">="])) for _ in range(n)]
        operands = [draw(int_exprs(layout)) for _ in range(n + 1)]
        text = operands[0] + "".join(f" {op} {x}" for op, x in zip(ops, operands[1:], strict=True))
        return draw(st.sampled_from([text, f"({text})"]))
    sub = predicates(layout, depth - 1)
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return f"not ({draw(sub)})"
    if kind == 1:
        return draw(st.sampled_from(["true", "false"])) + f" or {draw(sub)}"
    op = draw(st.sampled_from(["and", "or"]))
    return f"({draw(sub)} {op} {draw(sub)})"


def tuple_text(values) -> str:
    return "(" + ", ".join(map(str, values)) + ("," if len(values) == 1 else "") + ")"


@st.composite
def neighborhoods(draw, layout):
    dilation = draw(st.integers(1, 2))
    # Every extent is >= 2, so a size up to extent // dilation fits each dilation group.
    sizes = [draw(st.integers(1, extent // dilation)) for _, extent in layout]
    strides = [draw(st.integers(1, size)) for size in sizes]
    causal = [draw(st.booleans()) for _ in layout]
    if draw(st.booleans()):
        values = [str(min(sizes)), str(dilation), None, draw(st.sampled_from(["true", "false"]))]
    else:
        causal_text = tuple_text(["true" if c else "false" for c in causal])
        values = [tuple_text(sizes), str(dilation), tuple_text(strides), causal_text]
    return draw(call("neighborhood", values))


@st.composite
def static_prims(draw, layout):
    name = draw(
        st.sampled_from(
            ["full", "empty", "causal", "window", "strided", "blocks", "summary", "sink", "global", "landmarks"]
            + ["random", "where"]
            + (["neighborhood"] if layout else [])
        )
    )
    if name in ("full", "empty", "causal"):
        return name + draw(st.sampled_from(["", "()"]))
    if name == "window":
        values = [draw(ints(0, 6)), draw(maybe(ints(0, 6))), draw(maybe(ints(1, 4)))]
    elif name == "strided":
        values = [draw(ints(1, 5))]
    elif name == "blocks":
        values = [draw(ints(1, 9))]
    elif name == "summary":
        stride = draw(st.integers(1, 6))
        values = [str(stride), draw(maybe(ints(0, stride)))]
    elif name in ("sink", "global"):
        values = [draw(ints(0, 5))]
    elif name == "landmarks":
        values = [draw(ints(1, 6))]
    elif name == "random":
        values = [draw(ints(0, 3)), draw(ints(1, 8)), draw(maybe(ints(0, 5)))]
    elif name == "where":
        return f"where({draw(predicates(layout))})"
    else:
        return draw(neighborhoods(layout))
    return draw(call(name, values))


@st.composite
def combine(draw, leaves, depth: int):
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return draw(leaves)
    sub = combine(leaves, depth - 1)
    kind = draw(st.integers(0, 4))
    if kind == 4:
        return f"~({draw(sub)})"
    op = "|&-"[kind % 3]
    return f"({draw(sub)} {op} {draw(sub)})"


@st.composite
def routes(draw, layout):
    block = draw(ints(1, 8))
    qblock = draw(maybe(ints(1, 8)))
    if layout and draw(st.booleans()):
        block = tuple_text([draw(st.integers(1, 4)) for _ in layout])
    among = draw(maybe(combine(static_prims(layout), 1)))
    score = draw(maybe(st.sampled_from(ir.SCORES)))
    return draw(call("route", [draw(ints(1, 4)), block, score, among, qblock]))


@st.composite
def patterns(draw, layout, depth: int = 3):
    leaves = st.one_of(static_prims(layout), routes(layout)) if draw(st.booleans()) else static_prims(layout)
    return draw(combine(leaves, depth))


@st.composite
def sources(draw):
    layout = draw(layouts())
    lines = [layout_text(layout)]
    if draw(st.booleans()):
        lines.append(f"let a = {draw(patterns(layout, 1))}\n")
        lines.append("let m = n * 2 + 1\n")
        extra = " | a | window(m)"
    else:
        extra = ""
    n_heads = draw(st.integers(0, 2))
    for i in range(n_heads):
        lines.append(f"heads {2 * i}..{2 * i + draw(st.integers(1, 2))}: {draw(patterns(layout, 2))}\n")
    if n_heads == 0 or draw(st.booleans()):
        lines.append(draw(patterns(layout)) + extra + "\n")
    n = draw(st.integers(0, 4))
    return f"pattern gen(n = {n}, flag = true, t = (1, 2)) {{\n" + "".join(lines) + "}\n"


def nodes_of(pir: ir.PatternIR):
    roots = [r.node for r in pir.heads] + ([pir.default] if pir.default is not None else [])
    for root in roots:
        yield from ir.walk(root)


def assert_round_trip(source: str) -> None:
    pir = bind_text(source)
    printed = pattern_to_source(pir)
    again = bind_text(printed)
    assert again == pir, f"{source}\n--- printed ---\n{printed}"
    assert pattern_to_source(again) == printed


@SETTINGS
@given(sources())
def test_printed_pattern_binds_to_an_equal_ir(source):
    assert_round_trip(source)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sources())
def test_printed_pattern_binds_to_an_equal_ir_many(source):
    assert_round_trip(source)


@SETTINGS
@given(sources())
def test_every_printed_node_and_predicate_binds_back(source):
    pir = bind_text(source)
    layout = "" if pir.layout is None else layout_text(list(pir.layout.axes))
    for node in nodes_of(pir):
        text = node_to_source(node)
        assert bind_text(f"pattern p {{\n{layout}{text}\n}}").default == node, text
        if isinstance(node, ir.Prim) and node.name == "where":
            pred = expr_to_source(node.arg("pred"))
            assert bind_text(f"pattern p {{\n{layout}where({pred})\n}}").default == node, pred


@st.composite
def three(draw):
    layout = draw(layouts())
    return layout_text(layout), [draw(patterns(layout, 2)) for _ in range(3)]


def body(layout: str, text: str) -> ir.Node:
    return bind_text(f"pattern p(n = 2) {{\n{layout}{text}\n}}").default


@SETTINGS
@given(three())
def test_ir_equality_is_canonical(case):
    layout, (a, b, c) = case
    for op in ("|", "&"):
        assert body(layout, f"({a}) {op} ({b})") == body(layout, f"({b}) {op} ({a})")
        assert body(layout, f"(({a}) {op} ({b})) {op} ({c})") == body(layout, f"({a}) {op} (({b}) {op} ({c}))")
        assert body(layout, f"({a}) {op} ({a})") == body(layout, a)
    assert body(layout, f"({a}) - ({b})") == body(layout, f"({a}) & ~({b})")
    assert body(layout, f"~~({a})") == body(layout, a)
    # Complementary pairs fold when the pair itself is an operand (ir.union / ir.inter look one level deep).
    assert body(layout, f"({a}) | (({b}) | ~({a}))") in (ir.FULL, body(layout, f"({b}) | ~({a}) | ({a})"))
    assert hash(body(layout, f"({a}) | ({b})")) == hash(body(layout, f"({b}) | ({a})"))


def test_printer_handles_the_awkward_cases():
    cases = [
        "pattern p { layout grid(y = 4, x = 4); route(2, block = (2, 2)) }",
        "pattern p { layout grid(y = 4, x = 4); route(2, block = (2, 2), qblock = 1) }",
        "pattern p { layout grid(y = 4, x = 4); neighborhood((3, 1), stride = (1, 1), causal = (false, true)) }",
        "pattern p(n = -3) { window(-n, -(n + 2)) }",
        "pattern p { where(q - -3 < -(k * 2) and not (h == 1 or Lq // 2 > k % -3)) }",
        "pattern p { where(q - (k - 1) > (q - k) - 1 and -(q + k) < -q * k) }",
        "pattern p { where(min(q, -k) <= abs(-q)) }",
        "pattern p { heads 2..4: causal; heads 0..2: ~(window(3) | sink(1)) }",
        "pattern p(t = (1,), f = false) { full }",
        "pattern p { route(1, among = causal - blocks(4), score = landmark) }",
    ]
    for source in cases:
        pir = bind_text(source)
        assert bind_text(pattern_to_source(pir)) == pir, pattern_to_source(pir)


@SETTINGS
@given(st.lists(sources(), min_size=2, max_size=2))
def test_sort_keys_are_structural_and_agree_with_equality(pair):
    """Keys order every union / intersection strictly; equal keys exactly for equal nodes; stable in a pickle."""
    import pickle

    a, b = (list(nodes_of(bind_text(s))) for s in pair)
    for node in a + b:
        if isinstance(node, (ir.Union, ir.Inter)):
            keys = [ir.sort_key(item) for item in node.items]
            assert keys == sorted(keys) and len(set(map(repr, keys))) == len(keys), node
            rebuilt = type(node)(tuple(reversed(node.items)))
            assert rebuilt == node and hash(rebuilt) == hash(node) and ir.sort_key(rebuilt) == ir.sort_key(node)
        again = pickle.loads(pickle.dumps(node))
        assert again == node and hash(again) == hash(node)
    for x in a[:8]:
        for y in b[:8]:
            assert (ir.sort_key(x) == ir.sort_key(y)) == (x == y), (x, y)
