"""Every error a user can cause in the text or the parameters: its class, its location and its words.

Each case names the offending text (``at``, unique in the source); the error
must point at the first character of it, and render as
``<string>:LINE:COLUMN: message`` with the line and a caret.
"""

from __future__ import annotations

import pytest

import patterndsl
from patterndsl import check
from patterndsl.errors import (
    LayoutError,
    PatternError,
    PatternNameError,
    PatternSyntaxError,
    PatternTypeError,
    PatternValueError,
)
from patterndsl.grammar import parse


def location(source: str, at: str) -> tuple[int, int]:
    assert source.count(at) == 1, f"{at!r} must occur once in the source"
    before = source[: source.index(at)]
    return before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1


def expect(source: str, error: type, at: str, words: str, **params) -> PatternError:
    with pytest.raises(error) as info:
        patterndsl.compile(source, **params)
    err = info.value
    assert type(err) is error
    assert words in err.message, err.message
    line, column = location(source, at)
    assert (err.span.line, err.span.column) == (line, column), str(err)
    rendered = str(err)
    assert rendered.startswith(f"<string>:{line}:{column}: ")
    text_line = source.splitlines()[line - 1]
    assert f"\n    {text_line}\n    {' ' * (column - 1)}^" in rendered
    return err


SYNTAX = [
    ("pattern p { causal $ full }", "$", "unexpected character '$'"),
    ("pattern p { causal; score s ** }", "** }", "'**' has no right operand"),
    ("pattern p { window(3 }", "}", "expected ')' or ','"),
    ("pattern p {\n  let a = causal |\n  sink(4)\n  a\n}", "|\n", "'|' has no right operand"),
    ("pattern p {\n  causal\n  let a = 1\n}", "let", "statements come before the final expression"),
    ("pattern p {\n  causal\n  full\n}", "full", "one final expression"),
    ("pattern p { causal & }", "& }", "'&' has no right operand: expected an expression, found '}'"),
    ("pattern p {\n  causal &\n}", "&\n", "'&' has no right operand"),
    ("pattern p { where(q < k and) }", "and)", "'and' has no right operand"),
    ("pattern p(a b) { causal }", "b)", "unexpected name 'b'"),
    ("pattern { causal }", "{", "expected a name"),
    ("pattern p { window(after = 1, 3) }", "3)", "positional argument cannot follow a keyword"),
    ("pattern p { heads 0: full }", ":", "expected"),
    ("pattern p { sink(4) } }", "} }", "unexpected '}'"),
    ("pattern p { let 3 = 4; full }", "3 =", "unexpected number 3; expected a name"),
    ("pattern p { causal || full }", "| full", "there is no '||'"),
    ("pattern p { where(q < k && k > 0) }", "& k", "conditions with 'and'"),
]


@pytest.mark.parametrize("source, at, words", SYNTAX)
def test_syntax_errors(source, at, words):
    if at.startswith("\n"):
        # The error is at the line break itself: the end of the previous line.
        with pytest.raises(PatternSyntaxError) as info:
            patterndsl.compile(source)
        assert words in info.value.message and info.value.span.line == 2
        return
    if at == "} }":
        at = "}"
        source_check = source.replace("} }", "}  ")
        assert source_check.count("}") == 1
        with pytest.raises(PatternSyntaxError) as info:
            patterndsl.compile(source)
        assert words in info.value.message and info.value.span.column == len(source)
        return
    expect(source, PatternSyntaxError, at, words)


def test_unexpected_end_of_input_points_past_the_last_line():
    with pytest.raises(PatternSyntaxError, match="unexpected end of input") as info:
        patterndsl.compile("pattern p {\n  causal")
    assert (info.value.span.line, info.value.span.column) == (2, 9)


def test_syntax_messages_never_show_internal_token_names():
    for source in ["pattern p { ( }", "pattern p { 1 +", "pattern", "pattern p(", "pattern p { layout }", "x"]:
        with pytest.raises(PatternSyntaxError) as info:
            patterndsl.compile(source)
        assert "__" not in info.value.message and "ANON" not in info.value.message
        assert "RPAR" not in info.value.message and "NAME" not in info.value.message


NAMES = [
    ("pattern p { windw(3) }", "windw", "unknown primitive 'windw' (did you mean 'window'?)"),
    ("pattern p { causl }", "causl", "unknown name 'causl' (did you mean 'causal'?)"),
    ("pattern p { window(3, dilaton = 2) }", "dilaton", "no argument 'dilaton' (did you mean 'dilation'?)"),
    ("pattern p { route(2, score = maen) }", "maen", "unknown score 'maen' (did you mean 'mean'?)"),
    ("pattern p { layout grid(y = 2, xx = 2); where(q.x == 0) }", "x ==", "no axis 'x' (did you mean 'xx'?)"),
    ("pattern p { layout gird(y = 2); full }", "gird", "unknown layout 'gird' (did you mean 'grid'?)"),
    ("pattern p { where(qq < k) }", "qq", "unknown name 'qq' (did you mean 'q'?)"),
    ("pattern p(span = 4) { where(q - k < spam) }", "spam", "(did you mean 'span'?)"),
    ("pattern p { sink(q) }", "q)", "only defined inside where"),
    ("pattern p { where(z.x == 1) }", "z.x", "only q.AXIS and k.AXIS"),
    ("pattern p(causal = 1) { full }", "causal =", "built-in name"),
    ("pattern p { let a = 1; let a = 2; full }", "a = 2", "already defined"),
    ("pattern p(n, n) { full }", "n)", "already defined"),
    ("pattern p { layout grid(y = 2, y = 2); full }", "y = 2)", "appears twice"),
    ("pattern p { let a = b; let b = 1; full }", "b;", "unknown name 'b'"),
    ("pattern p(a = b, b = 1) { full }", "b,", "may only use earlier parameters"),
    ("pattern p { sink(mean) }", "mean", "only valid as route(score = mean)"),
    ("pattern p { foo(1) }", "foo", "unknown primitive 'foo'"),
    ("pattern p { where(q = k) }", "q = k", "equality is written =="),
]


@pytest.mark.parametrize("source, at, words", NAMES)
def test_name_errors(source, at, words):
    expect(source, PatternNameError, at, words)


def test_unknown_parameter_from_python_points_at_the_pattern_name():
    expect(
        "pattern stream(width = 4) { window(width) }", PatternNameError, "stream", "(did you mean 'width'?)", widht=3
    )


def test_unknown_pattern_name_and_several_patterns():
    src = "pattern stream { causal }\npattern other { full }"
    with pytest.raises(PatternNameError, match=r"no pattern named 'strem' \(did you mean 'stream'\?\)"):
        patterndsl.compile(src, name="strem")
    with pytest.raises(PatternNameError, match=r"2 patterns .*stream, other.*name="):
        patterndsl.compile(src)
    with pytest.raises(PatternSyntaxError, match="defines no pattern"):
        patterndsl.compile("# empty")
    expect("pattern a { full }\npattern a { causal }", PatternNameError, "a { causal", "defined twice", name="a")


TYPES = [
    ("pattern p { window((1, 2)) }", "(1, 2)", "must be an integer, got a tuple"),
    ("pattern p { window(true) }", "true", "must be an integer, got a boolean"),
    ("pattern p { window(causal) }", "causal)", "must be an integer, got a pattern"),
    ("pattern p { causal | 3 }", "3", "needs patterns, got an integer"),
    ("pattern p { 3 }", "3", "the final expression must be a pattern, got an integer"),
    ("pattern p { heads 0..2: 1 + 1 }", "1 + 1", "must be a pattern"),
    ("pattern p { layout grid(y = 4, x = 4); neighborhood((3, 3, 3)) }", "(3, 3, 3)", "has 3 entries"),
    ("pattern p { window(3, 4, 5, 6) }", "6", "at most 3 arguments"),
    ("pattern p { causal(1) }", "1", "takes none"),
    ("pattern p { window(3, before = 2) }", "before", "got argument 'before' twice"),
    ("pattern p { window() }", "window", "missing required argument 'before'"),
    ("pattern p { window(after = 2) }", "window", "missing required argument 'before'"),
    ("pattern p { sink(1 & 2) }", "1 &", "'&' (intersection) needs patterns, got an integer"),
    ("pattern p { ~3 }", "3", "needs a pattern"),
    ("pattern p { -causal }", "causal", "unary - needs an integer"),
    ("pattern p { causal + full }", "causal +", "needs integers, got a pattern"),
    ("pattern p { where(q + 1) }", "q + 1", "where() needs a condition"),
    ("pattern p { where(q < k and 3) }", "3)", "'and' needs a condition"),
    ("pattern p { where(abs(q, k) < 1) }", "abs", "abs() takes 1 argument"),
    ("pattern p(n = 2) { n(3) }", "n(3)", "cannot be called"),
    ("pattern p { route(2, among = 3) }", "3)", "must be a pattern"),
    ("pattern p { route(2, score = 1) }", "1)", "must be one of mean, max, landmark"),
    ("pattern p { window }", "window", "needs arguments"),
    ("pattern p { layout grid(y = 4, x = 4); neighborhood(3, causal = 1) }", "1)", "must be a boolean"),
    ("pattern p { layout grid(x = 4); neighborhood((true, false)) }", "(true", "must hold integers"),
    ("pattern p(a = causal) { full }", "causal)", "must be an integer, boolean or tuple"),
    ("pattern p(t = (1, causal)) { full }", "causal)", "tuple entries must be constant"),
    ("pattern p { where(q < (1, 2)) }", "(1, 2)", "needs an integer, got a tuple"),
]


@pytest.mark.parametrize("source, at, words", TYPES)
def test_type_errors(source, at, words):
    expect(source, PatternTypeError, at, words)


def test_parameter_type_errors_point_at_the_declaration():
    src = "pattern p(w = 3, flag = false) {\n  window(w) | sink(4)\n}"
    expect(src, PatternTypeError, "w = 3", "must be an integer, a boolean or a tuple", w=3.5)
    expect(src, PatternTypeError, "w = 3", "must be like its default 3", w=True)
    expect(src, PatternTypeError, "flag", "must be like its default false", flag=1)
    expect(src, PatternTypeError, "w = 3", "empty tuple", w=[])
    expect(src, PatternTypeError, "w = 3", "got str", w="3")
    expect("pattern p(n) { sink(n) }", PatternTypeError, "n) {", "needs a value for parameter 'n'")


VALUES = [
    ("pattern p { window(3, 0, 0) }", "0)", "dilation must be >= 1"),
    ("pattern p { strided(0) }", "0", "stride must be >= 1"),
    ("pattern p { blocks(-1) }", "-1", "size must be >= 1"),
    ("pattern p { summary(0) }", "0", "stride must be >= 1"),
    ("pattern p { summary(4, 5) }", "5", "width must be in 0..stride"),
    ("pattern p { summary(4, width = -1) }", "-1", "width must be in 0..stride"),
    ("pattern p { sink(-1) }", "-1", "n must be >= 0"),
    ("pattern p { global(n = -2) }", "-2", "n must be >= 0"),
    ("pattern p { landmarks(0) }", "0", "every must be >= 1"),
    ("pattern p { random(-1, 4) }", "-1", "blocks must be >= 0"),
    ("pattern p { random(1, 0) }", "0", "block must be >= 1"),
    ("pattern p { layout grid(x = 8); neighborhood(0) }", "0)", "size must be >= 1"),
    ("pattern p { layout grid(x = 8); neighborhood(3, dilation = 0) }", "0)", "dilation must be >= 1"),
    ("pattern p { layout grid(x = 8); neighborhood(3, stride = 4) }", "4)", "stride must be in 1..size"),
    ("pattern p { layout grid(x = 8); neighborhood(3, stride = 0) }", "0)", "stride must be in 1..size"),
    ("pattern p { layout grid(y = 8, x = 8); neighborhood((3, 9)) }", "(3, 9)", "does not fit axis 'x'"),
    ("pattern p { layout grid(x = 9); neighborhood(4, dilation = 3) }", "4,", "only 3 positions"),
    ("pattern p { layout grid(x = 7); neighborhood(2, dilation = 4) }", "2,", "only 1 positions"),
    ("pattern p { route(-1) }", "-1", "topk must be >= 0"),
    ("pattern p { window(-3) }", "-3", "before must be >= 0"),
    ("pattern p { window(1, after = -1) }", "-1", "after must be >= 0"),
    ("pattern p { route(1, block = 0) }", "0)", "block must be >= 1"),
    ("pattern p { route(1, qblock = 0) }", "0)", "qblock must be >= 1"),
    ("pattern p { layout grid(y = 4, x = 4); route(1, block = (2, 0)) }", "(2, 0)", "block must be >= 1"),
    ("pattern p { route(1, among = route(2)) }", "route(2)", "must be a static pattern"),
    ("pattern p { layout grid(y = 0); full }", "0)", "must be >= 1"),
    ("pattern p { heads 0..2: full; heads 1..3: causal }", "heads 1", "overlaps 0..2"),
    ("pattern p { heads 2..2: full }", "heads", "is empty"),
    ("pattern p { heads -1..2: full }", "-1", "start at 0"),
    ("pattern p { where(q // 0 == 1) }", "//", "divisor of '//' is 0"),
    ("pattern p(n = 2) { where(q % (n - 2) == 1) }", "%", "divisor of '%' is 0"),
    ("pattern p { sink(4 // (2 - 2)) }", "//", "division by zero"),
]


@pytest.mark.parametrize("source, at, words", VALUES)
def test_value_errors(source, at, words):
    expect(source, PatternValueError, at, words)


LAYOUTS = [
    ("pattern p { neighborhood(3) }", "neighborhood", "needs a layout"),
    ("pattern p { where(q.x == k.x) }", "q.x", "needs a layout"),
    ("pattern p { neighborhood(3) | full\n }", "neighborhood", "needs a layout"),
    ("pattern p { layout grid(x = 2); layout grid(y = 2); full }", "layout grid(y", "at most one layout"),
    ("pattern p { route(1, block = (2, 2)) }", "(2, 2)", "needs a layout"),
]


@pytest.mark.parametrize("source, at, words", LAYOUTS)
def test_layout_errors(source, at, words):
    expect(source, LayoutError, at, words)


def test_body_without_expression_or_heads():
    expect("pattern p { let a = causal }", PatternSyntaxError, "p {", "neither a final pattern expression nor heads")
    expect("pattern p { }", PatternSyntaxError, "p {", "neither")


def test_errors_from_files_name_the_file(tmp_path):
    path = tmp_path / "bad.pdsl"
    path.write_text("pattern p {\n  window(3) | sinc(4)\n}\n")
    with pytest.raises(PatternNameError) as info:
        patterndsl.load(path)
    assert str(info.value).startswith(f"{path}:2:15: unknown primitive 'sinc' (did you mean 'sink'?)")
    errors = check.check_module(parse(path.read_text(), str(path)))
    assert [str(e).splitlines()[0] for e in errors] == [str(info.value).splitlines()[0]]


def test_errors_about_python_values_point_at_the_declaration():
    src = "pattern p(a, d = 1) {\n  layout grid(y = 4, x = 4)\n  window(dilation = d, before = a) | neighborhood(a)\n}"
    err = expect(src, PatternTypeError, "a, d", "got a boolean (parameter 'a' = true from Python)", a=True)
    assert "window() argument 'before'" in err.message
    expect(src, PatternValueError, "d = 1", "dilation must be >= 1", a=1, d=0)
    expect(src, PatternTypeError, "a, d", "got a tuple (1, 2, 3)", a=(1, 2, 3))
    src = "pattern p(a) {\n  layout grid(y = 4, x = 4)\n  neighborhood(a)\n}"
    expect(src, PatternTypeError, "a) {", "has 3 entries", a=(1, 2, 3))


def test_huge_integers_are_errors_not_crashes():
    with pytest.raises(PatternSyntaxError, match="number too large"):
        patterndsl.compile("pattern p { sink(" + "9" * 5000 + ") }")
    expect("pattern p { sink(99999999999 * 99999999999) }", PatternValueError, "*", "integer out of range")
    expect("pattern p(n) { sink(n) }", PatternValueError, "n) {", "out of range", n=10**100)
    assert patterndsl.compile("pattern p { sink(2 * 2305843009213693952) }").ir.default.arg("n") == 2**62
