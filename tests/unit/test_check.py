"""check.bind / check_lengths / check_module: binding, folding and canonical IR, compared with IR built by hand."""

from __future__ import annotations

import pytest

from patterndsl import check, ir
from patterndsl.errors import HeadsError, LayoutError, PatternError, PatternTypeError, PatternValueError
from patterndsl.grammar import parse


def bind(source: str, name: str | None = None, **params) -> ir.PatternIR:
    return check.bind(parse(source), name=name, params=params, source=source)


def node(text: str, layout: str = "", **params) -> ir.Node:
    """The default node of a one-pattern source whose body is ``text``."""
    decl = ", ".join(params)
    src = f"pattern p({decl}) {{\n{layout}\n{text}\n}}"
    return check.bind(parse(src), params=params, source=src).default


def P(name: str, *args) -> ir.Prim:
    """A primitive with ``args`` in signature order and the remaining defaults filled in."""
    sig = ir.SIGNATURES[name]
    values = list(args) + [p.default for p in sig[len(args) :]]
    if name == "route" and values[4] is None:
        values[4] = values[1]
    return ir.Prim(name, tuple((p.name, v) for p, v in zip(sig, values, strict=True)))


def W(pred: ir.Expr) -> ir.Prim:
    return ir.Prim("where", (("pred", pred),))


q, k, h, Lq, Lk = (ir.Var(n) for n in ("q", "k", "h", "Lq", "Lk"))
C = ir.Const
A, B, Cc, D = P("sink", 1), P("sink", 2), P("sink", 3), P("sink", 4)


# --------------------------------------------------------------------------- primitives


@pytest.mark.parametrize(
    "text, expected",
    [
        ("full", ir.FULL),
        ("full()", ir.FULL),
        ("empty", ir.EMPTY),
        ("empty()", ir.EMPTY),
        ("causal", ir.CAUSAL),
        ("causal()", ir.CAUSAL),
        ("window(3)", P("window", 3, 0, 1)),
        ("window(3, 2)", P("window", 3, 2, 1)),
        ("window(3, 2, 4)", P("window", 3, 2, 4)),
        ("window(before = 3, dilation = 4)", P("window", 3, 0, 4)),
        ("window(dilation = 4, after = 1, before = 2)", P("window", 2, 1, 4)),
        ("window(0, 0)", P("window", 0, 0, 1)),
        ("strided(4)", P("strided", 4)),
        ("strided(stride = 4)", P("strided", 4)),
        ("blocks(8)", P("blocks", 8)),
        ("blocks(size = 8)", P("blocks", 8)),
        ("summary(4)", P("summary", 4, 1)),
        ("summary(4, 0)", P("summary", 4, 0)),
        ("summary(width = 4, stride = 4)", P("summary", 4, 4)),
        ("sink(0)", P("sink", 0)),
        ("sink(n = 4)", P("sink", 4)),
        ("global(2)", P("global", 2)),
        ("global(n = 2)", P("global", 2)),
        ("landmarks(16)", P("landmarks", 16)),
        ("landmarks(every = 16)", P("landmarks", 16)),
        ("random(2, 16)", P("random", 2, 16, 0)),
        ("random(2, 16, 7)", P("random", 2, 16, 7)),
        ("random(seed = 7, block = 16, blocks = 0)", P("random", 0, 16, 7)),
        ("route(2)", P("route", 2, 64, "mean", ir.FULL, 64)),
        ("route(2, 32, max, causal, 1)", P("route", 2, 32, "max", ir.CAUSAL, 1)),
        ("route(topk = 2, score = landmark, block = 16)", P("route", 2, 16, "landmark", ir.FULL, 16)),
        ("route(4, qblock = 8)", P("route", 4, 64, "mean", ir.FULL, 8)),
        ("route(1, among = causal - blocks(4))", P("route", 1, 64, "mean", ir.CAUSAL - P("blocks", 4), 64)),
    ],
)
def test_primitive_arguments(text, expected):
    assert node(text) == expected


def test_primitive_arguments_are_folded_expressions():
    assert node("window(2 * w + 1, after = w // 2, dilation = max(1, w - 5))", w=3) == P("window", 7, 1, 1)
    assert node("sink(-7 // 2 + 10)") == P("sink", 6)  # floor division: -7 // 2 == -4
    assert node("sink(-7 % 3)") == P("sink", 2)
    assert node("sink(abs(-5) + min(2, 3))") == P("sink", 7)


GRID = "layout grid(t = 4, y = 6, x = 10)"


def test_neighborhood_broadcasts_to_every_axis():
    assert node("neighborhood(3)", GRID) == ir.Prim(
        "neighborhood", (("size", (3, 3, 3)), ("dilation", (1, 1, 1)), ("stride", (1, 1, 1)), ("causal", (False,) * 3))
    )
    got = node("neighborhood((1, 3, 5), dilation = 2, stride = (1, 2, 3), causal = (true, false, false))", GRID)
    assert got == ir.Prim(
        "neighborhood",
        (("size", (1, 3, 5)), ("dilation", (2, 2, 2)), ("stride", (1, 2, 3)), ("causal", (True, False, False))),
    )
    assert node("neighborhood(3, causal = true)", GRID).arg("causal") == (True, True, True)


def test_route_boxes_on_a_grid():
    layout = "layout grid(y = 8, x = 8)"
    assert node("route(2, block = (2, 4))", layout) == P("route", 2, (2, 4), "mean", ir.FULL, (2, 4))
    assert node("route(2, block = (2, 4), qblock = 1)", layout) == P("route", 2, (2, 4), "mean", ir.FULL, (1, 1))
    assert node("route(2, block = 4, qblock = (1, 2))", layout) == P("route", 2, (4, 4), "mean", ir.FULL, (1, 2))
    assert node("route(2, block = 4)", layout) == P("route", 2, 4, "mean", ir.FULL, 4)


# --------------------------------------------------------------------------- combinators and precedence


def test_pattern_precedence_matches_hand_built_ir():
    assert node("sink(1) | sink(2) - sink(3) & ~sink(4)") == ir.union(A, ir.difference(B, ir.inter(Cc, ~D)))
    assert node("sink(1) & sink(2) | sink(3)") == (A & B) | Cc
    assert node("sink(1) - sink(2) - sink(3)") == (A - B) - Cc
    assert node("~sink(1) & sink(2)") == ~A & B
    assert node("~(sink(1) | sink(2))") == ir.Not(ir.Union((A, B)))
    assert node("sink(1) - sink(2) & sink(3)") == A - (B & Cc)


def test_combinators_are_canonical():
    assert node("sink(1) | sink(2)") == node("sink(2) | sink(1)")
    assert node("(sink(1) | sink(2)) | sink(3)") == node("sink(1) | (sink(2) | sink(3))")
    assert node("sink(1) & sink(1)") == A
    assert node("sink(1) | full") == ir.FULL
    assert node("sink(1) & ~sink(1)") == ir.EMPTY
    assert node("~~sink(1)") == A
    assert node("sink(1) - sink(2)") == ir.Inter((A, ir.Not(B)))


def test_minus_is_subtraction_between_integers():
    assert node("sink(5 - 2 - 1)") == P("sink", 2)
    assert node("window(w - 1)", w=3) == P("window", 2, 0, 1)


# --------------------------------------------------------------------------- where


def test_where_keeps_positions_symbolic_and_folds_constants():
    assert node("where(q - k <= 2 * w)", w=3) == W(ir.Cmp("<=", ir.Arith("-", q, k), C(6)))
    assert node("where(h % 2 == 1 and k < Lk - Lq)") == W(
        ir.Logic("and", (ir.Cmp("==", ir.Arith("%", h, C(2)), C(1)), ir.Cmp("<", k, ir.Arith("-", Lk, Lq))))
    )
    assert node("where(abs(q - k) < max(n, 2))", n=5) == W(ir.Cmp("<", ir.Func("abs", (ir.Arith("-", q, k),)), C(5)))
    assert node("where(-q < 0)") == W(ir.Cmp("<", ir.Neg(q), C(0)))
    assert node("where(- -q < 0)") == W(ir.Cmp("<", q, C(0)))


def test_where_chained_comparison_is_pythons():
    assert node("where(0 <= q - k < 4)") == W(
        ir.Logic("and", (ir.Cmp("<=", C(0), ir.Arith("-", q, k)), ir.Cmp("<", ir.Arith("-", q, k), C(4))))
    )


def test_where_constant_predicates_fold_to_full_and_empty():
    assert node("where(true)") == ir.FULL
    assert node("where(1 > 2)") == ir.EMPTY
    assert node("where(q < k and 1 < 2)") == W(ir.Cmp("<", q, k))
    assert node("where(q < k or 2 < 1)") == W(ir.Cmp("<", q, k))
    assert node("where(q < k or 1 < 2)") == ir.FULL
    assert node("where(not not (q < k))") == W(ir.Cmp("<", q, k))


def test_where_logic_flattens():
    a, b, c = (ir.Cmp("<", q, C(i)) for i in (1, 2, 3))
    assert node("where(q < 1 and (q < 2 and q < 3))") == W(ir.Logic("and", (a, b, c)))


def test_where_grid_coordinates():
    got = node("where(q.y == k.y and q.x - k.x < 2)", "layout grid(y = 4, x = 4)")
    yq, yk, xq, xk = ir.Coord("q", "y"), ir.Coord("k", "y"), ir.Coord("q", "x"), ir.Coord("k", "x")
    assert got == W(ir.Logic("and", (ir.Cmp("==", yq, yk), ir.Cmp("<", ir.Arith("-", xq, xk), C(2)))))


def test_where_integer_lets_are_constants():
    assert node("let d = 2 * 3\nwhere(q - k < d)") == W(ir.Cmp("<", ir.Arith("-", q, k), C(6)))


# --------------------------------------------------------------------------- definitions


def test_lets_params_defaults_and_values():
    pir = bind("pattern p(w = 4, n = w // 2, flag = true, t = (1, 2)) { let a = window(w); a | sink(n) }")
    assert pir.params == (("w", 4), ("n", 2), ("flag", True), ("t", (1, 2)))
    assert pir.default == P("window", 4, 0, 1) | P("sink", 2)
    pir = bind("pattern p(w = 4, n = w // 2) { sink(n) }", w=10)
    assert pir.params == (("w", 10), ("n", 5)) and pir.default == P("sink", 5)
    pir = bind("pattern p(w = 4, n = w // 2) { sink(n) }", n=1)
    assert pir.params == (("w", 4), ("n", 1))


def test_python_parameter_values():
    class Index:
        def __index__(self):
            return 7

    assert bind("pattern p(n) { sink(n) }", n=Index()).params == (("n", 7),)
    assert bind("pattern p(t) { layout grid(y = 4, x = 4); neighborhood(t) }", t=[3, 1]).params == (("t", (3, 1)),)
    assert bind("pattern p(c = false) { layout grid(x = 8); neighborhood(3, causal = c) }", c=True).default.arg(
        "causal"
    ) == (True,)


def test_layout_and_heads():
    pir = bind("pattern p(H = 4) { layout grid(y = H, x = 2 * H)\nheads 2..4: causal\nheads 0..2: full\nempty }")
    assert pir.layout == ir.Layout((("y", 4), ("x", 8)))
    assert [(r.lo, r.hi, r.node) for r in pir.heads] == [(0, 2, ir.FULL), (2, 4, ir.CAUSAL)]
    assert pir.default == ir.EMPTY
    assert pir.node_for_head(3) == ir.CAUSAL and pir.node_for_head(9) == ir.EMPTY
    assert bind("pattern p { heads 0..1: causal }").default is None


def test_pick_by_name():
    src = "pattern a { causal }\npattern b { full }"
    assert check.bind(parse(src), "b").default == ir.FULL
    assert check.bind(parse("pattern only { full }")).name == "only"


def test_statement_spans_ride_along():
    pir = bind("pattern p {\n  heads 0..1: causal\n  window(3)\n}")
    assert pir.heads[0].span.line == 2 and pir.default.span.line == 3 and pir.span.line == 1


# --------------------------------------------------------------------------- check_lengths


def test_check_lengths_accepts_matching_sizes():
    pir = bind("pattern p { layout grid(y = 4, x = 4); heads 0..2: neighborhood(3); causal }")
    check.check_lengths(pir, 16, None, 8)
    check.check_lengths(pir, 16, 16, 1)
    check.check_lengths(bind("pattern p { causal }"), 3, 100, 1)


@pytest.mark.parametrize(
    "source, sizes, error, words",
    [
        ("pattern p { layout grid(y = 4, x = 4); full }", (15, None, 1), LayoutError, "16 positions"),
        ("pattern p { layout grid(y = 4, x = 4); full }", (16, 8, 1), LayoutError, "must be equal"),
        ("pattern p { heads 0..2: causal; heads 3..5: full }", (16, 16, 6), HeadsError, "heads 2, 5 are not covered"),
        ("pattern p { heads 1..2: causal }", (4, 4, 5), HeadsError, "heads 0, 2..5"),
        ("pattern p { where(q % (Lk - 8) == 0) }", (8, 8, 1), PatternValueError, "divisor of '%' is 0"),
        ("pattern p { where(q // (Lq - Lk) == 0) }", (4, 4, 1), PatternValueError, "divisor of '//'"),
        ("pattern p { where(q // (h - 1) == 0) }", (4, 4, 2), PatternValueError, "for head 1"),
        ("pattern p { causal }", (0, 4, 1), PatternValueError, "q_len must be >= 1"),
        ("pattern p { causal }", (4, 0, 1), PatternValueError, "kv_len must be >= 1"),
        ("pattern p { causal }", (4, 4, 0), PatternValueError, "heads must be >= 1"),
        ("pattern p { causal }", (4.0, 4, 1), PatternTypeError, "q_len must be a positive integer"),
        ("pattern p { causal }", (4, 4, True), PatternTypeError, "heads"),
    ],
)
def test_check_lengths_errors(source, sizes, error, words):
    with pytest.raises(error, match=words):
        check.check_lengths(bind(source), *sizes)


def test_check_lengths_divisor_only_for_heads_that_use_it():
    pir = bind("pattern p { heads 0..1: causal; where(q // (h) == 0) }")
    check.check_lengths(pir, 4, 4, 3)  # head 0 has its own line, so h == 0 never divides
    pir = bind("pattern p { where(q // (Lk - 8) == 0) }")
    check.check_lengths(pir, 4, 9, 1)


def test_check_lengths_error_span_points_at_the_operator():
    pir = bind("pattern p {\n  where(q % (Lk - 8) == 0)\n}")
    with pytest.raises(PatternValueError) as info:
        check.check_lengths(pir, 8, 8, 1)
    assert (info.value.span.line, info.value.span.column) == (2, 11)


# --------------------------------------------------------------------------- check_module


def test_check_module_checks_patterns_without_parameter_values():
    src = (
        "pattern good(n) { window(n) | sink(n) }\n"
        "pattern typo(n) { window(n) | sinc(n) }\n"
        "pattern arity(n) { window(n, 1, 2, 3) }\n"
        "pattern grid(n) { layout grid(y = n, x = 4); where(q.z == 0) }\n"
        "pattern types(n) { causal & n }\n"
        "pattern fine(n = 3, m) { layout grid(y = m, x = n); neighborhood((3, 3)) }\n"
    )
    errors = check.check_module(parse(src, "f.pdsl"))
    found = [(e.span.line, type(e).__name__) for e in errors]
    assert found == [(2, "PatternNameError"), (3, "PatternTypeError"), (4, "PatternNameError"), (5, "PatternTypeError")]
    assert all(str(e).startswith(f"f.pdsl:{e.span.line}:") for e in errors)
    assert "did you mean 'sink'" in str(errors[0])


def test_check_module_duplicate_and_empty():
    errors = check.check_module(parse("pattern a { full }\npattern a { causal }"))
    assert len(errors) == 1 and "defined twice" in errors[0].message and errors[0].span.line == 2
    assert "no pattern" in check.check_module(parse("# nothing"))[0].message


def test_check_module_with_unknown_layout_extent_still_checks_tuple_lengths():
    errors = check.check_module(parse("pattern p(n) { layout grid(y = n, x = 4); neighborhood((3, 3, 3)) }"))
    assert len(errors) == 1 and isinstance(errors[0], PatternTypeError) and "2 axes" in errors[0].message


def test_errors_are_pattern_errors_with_source():
    src = "pattern p { windw(3) }"
    with pytest.raises(PatternError) as info:
        check.bind(parse(src), source=src)
    assert "    pattern p { windw(3) }\n                ^^^^^" in str(info.value)
