"""grammar.parse: every syntax form, the line-break rules, comments, spans and operator precedence."""

from __future__ import annotations

import pytest

from patterndsl.errors import PatternError, PatternSyntaxError
from patterndsl.grammar import parse, syntax


def one(body: str, header: str = "pattern p") -> syntax.PatternDef:
    module = parse(f"{header} {{\n{body}\n}}")
    assert len(module.patterns) == 1
    return module.patterns[0]


def final(text: str) -> syntax.Expr:
    return one(text).final


def shape(e: syntax.Expr):
    """A compact nested form of an expression, without spans."""
    if isinstance(e, syntax.Number):
        return e.value
    if isinstance(e, syntax.Boolean):
        return e.value
    if isinstance(e, syntax.Name):
        return e.name
    if isinstance(e, syntax.Attribute):
        return f"{e.base}.{e.attr}"
    if isinstance(e, syntax.Binary):
        return (e.op, shape(e.left), shape(e.right))
    if isinstance(e, syntax.Unary):
        return (e.op, shape(e.operand))
    if isinstance(e, syntax.Compare):
        return ("cmp", e.ops, tuple(shape(x) for x in e.operands))
    if isinstance(e, syntax.BoolOp):
        return (e.op, *(shape(x) for x in e.items))
    if isinstance(e, syntax.Tuple):
        return ("tuple", *(shape(x) for x in e.items))
    if isinstance(e, syntax.Call):
        return ("call", e.func, tuple(shape(a) for a in e.args), tuple((k.name, shape(k.value)) for k in e.keywords))
    raise TypeError(e)


# --------------------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a | b - c & ~d", ("|", "a", ("-", "b", ("&", "c", ("~", "d"))))),
        ("a & b | c", ("|", ("&", "a", "b"), "c")),
        ("a - b - c", ("-", ("-", "a", "b"), "c")),
        ("~a & b", ("&", ("~", "a"), "b")),
        ("~(a | b)", ("~", ("|", "a", "b"))),
        ("a - b & c", ("-", "a", ("&", "b", "c"))),
        ("1 + 2 * 3", ("+", 1, ("*", 2, 3))),
        ("-a * b", ("*", ("-", "a"), "b")),
        ("a // b % c", ("%", ("//", "a", "b"), "c")),
        ("a + b | c", ("|", ("+", "a", "b"), "c")),
        ("a & b * c", ("&", "a", ("*", "b", "c"))),
        ("a < b == c", ("cmp", ("<", "=="), ("a", "b", "c"))),
        ("not a < b", ("not", ("cmp", ("<",), ("a", "b")))),
        ("a or b and not c", ("or", "a", ("and", "b", ("not", "c")))),
        ("a and b and c", ("and", "a", "b", "c")),
        ("(a or b) and c", ("and", ("or", "a", "b"), "c")),
        ("- - a", ("-", ("-", "a"))),
        ("~~a", ("~", ("~", "a"))),
        ("q.x - k.y", ("-", "q.x", "k.y")),
    ],
)
def test_precedence(text, expected):
    assert shape(final(text)) == expected


def test_atoms_and_calls():
    assert shape(final("f(1, (2, 3), (4,), x = true, y = false)")) == (
        "call",
        "f",
        (1, ("tuple", 2, 3), ("tuple", 4)),
        (("x", True), ("y", False)),
    )
    assert shape(final("f()")) == ("call", "f", (), ())
    assert shape(final("f(1, 2,)")) == ("call", "f", (1, 2), ())
    assert shape(final("((a))")) == "a"


def test_positional_after_keyword_is_a_syntax_error():
    with pytest.raises(PatternSyntaxError, match="positional argument cannot follow") as info:
        parse("pattern p { window(after = 1, 3) }")
    assert (info.value.span.line, info.value.span.column) == (1, 31)


# --------------------------------------------------------------------------- definitions


def test_multiple_patterns_params_and_comments():
    module = parse(
        "# header comment\n"
        "pattern a(x, y = x + 1, z = true, t = (3, 7, 7)) { causal }  # trailing\n"
        "pattern b { full }\n"
        "pattern c() { empty }\n"
    )
    assert [p.name for p in module.patterns] == ["a", "b", "c"]
    a = module.patterns[0]
    assert [p.name for p in a.params] == ["x", "y", "z", "t"]
    assert a.params[0].default is None
    assert shape(a.params[1].default) == ("+", "x", 1)
    assert shape(a.params[3].default) == ("tuple", 3, 7, 7)
    assert module.patterns[1].params == () and module.patterns[2].params == ()
    assert a.span.line == 2 and a.name_span.column == 9


def test_empty_file_and_comment_only_file():
    assert parse("").patterns == ()
    assert parse("# nothing\n\n").patterns == ()


def test_statements_in_order():
    text = "layout grid(y = 4, x = 8)\nlet w = window(3)\nlet n = 2 * 3; heads 0..2: w\nheads 2..n: causal\nw | sink(n)"
    p = one(text)
    kinds = [type(s).__name__ for s in p.statements]
    assert kinds == ["Layout", "Let", "Let", "Heads", "Heads"]
    layout = p.statements[0]
    assert layout.kind == "grid" and [a.name for a in layout.axes] == ["y", "x"]
    assert shape(p.statements[3].lo) == 0 and shape(p.statements[4].hi) == "n"
    assert shape(p.final) == ("|", "w", ("call", "sink", ("n",), ()))


def test_heads_only_body_and_empty_body():
    assert one("heads 0..2: causal").final is None
    module = parse("pattern p { heads 0..2: causal }\npattern q { heads 0..1: full; heads 1..2: empty }")
    assert [len(p.statements) for p in module.patterns] == [1, 2]
    assert all(p.final is None for p in module.patterns)
    assert one("").statements == () and one("").final is None


# --------------------------------------------------------------------------- line breaks


def test_final_expression_spans_lines():
    expected = ("|", "causal", ("&", ("call", "sink", (4,), ()), "full"))
    assert shape(final("causal\n    | sink(4)\n    & full")) == expected


def test_statement_ends_at_line_end():
    with pytest.raises(PatternSyntaxError, match="end of line") as info:
        parse("pattern p {\n let a = causal |\n sink(4)\n a }")
    assert info.value.span.line == 2


def test_line_break_inside_parentheses_continues_a_statement():
    p = one("let a = (causal\n | sink(4))\nlayout grid(\n y = 4,\n x = 4\n)\na")
    assert shape(p.statements[0].value) == ("|", "causal", ("call", "sink", (4,), ()))
    assert len(p.statements[1].axes) == 2


def test_semicolons_and_blank_lines():
    p = one(";\n\nlet a = 1;; let b = 2;\n\n# comment\n\nlet c = 3  # why\n\nfull;")
    assert [s.name for s in p.statements] == ["a", "b", "c"]
    assert shape(p.final) == "full"


def test_statement_after_final_expression_is_an_error():
    with pytest.raises(PatternSyntaxError, match="statements come before the final expression"):
        parse("pattern p {\n causal\n let a = 1\n}")


def test_two_final_expressions_are_an_error():
    with pytest.raises(PatternSyntaxError, match="one final expression") as info:
        parse("pattern p {\n causal\n full\n}")
    assert (info.value.span.line, info.value.span.column) == (3, 2)


def test_keywords_are_reserved():
    with pytest.raises(PatternSyntaxError):
        parse("pattern p { let let = 1; full }")
    with pytest.raises(PatternSyntaxError):
        parse("pattern pattern { full }")
    # A name that only starts with a keyword is an ordinary name.
    assert shape(final("heads_n | letter | notes | android")) == (
        "|",
        ("|", ("|", "heads_n", "letter"), "notes"),
        "android",
    )


# --------------------------------------------------------------------------- spans


def test_spans_are_one_based_and_cover_the_text():
    src = "pattern p {\n  causal & window(3)\n}"
    expr = parse(src).patterns[0].final
    assert (expr.span.line, expr.span.column, expr.span.end_column) == (2, 3, 21)
    assert (expr.op_span.column, expr.op_span.end_column) == (10, 11)
    call = expr.right
    assert (call.func_span.column, call.func_span.end_column) == (12, 18)


def test_filename_is_in_every_span():
    module = parse("pattern p { causal }", "x.pdsl")
    assert module.filename == "x.pdsl"
    assert module.patterns[0].span.file == "x.pdsl"
    assert module.patterns[0].final.span.file == "x.pdsl"


def test_ranges_and_floor_division_lex_apart():
    p = one("heads 0..n//2: causal\nheads n//2..n: full")
    assert shape(p.statements[0].hi) == ("//", "n", 2)
    assert shape(p.statements[1].lo) == ("//", "n", 2) and shape(p.statements[1].hi) == "n"


def test_windows_line_endings_and_trailing_comments():
    module = parse("pattern p {\r\n  let a = window(3)  # a comment; with a semicolon\r\n  a | sink(1)\r\n}\r\n")
    p = module.patterns[0]
    assert [s.name for s in p.statements] == ["a"]
    assert shape(p.final) == ("|", "a", ("call", "sink", (1,), ()))


def test_source_must_be_text():
    with pytest.raises(PatternError, match="must be a str"):
        parse(b"pattern p { full }")
