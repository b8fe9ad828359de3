"""Contract section 1 (files): definitions, comments, parameters, statements, layout, let, heads."""

from __future__ import annotations

import pytest
import torch

import patterndsl
from patterndsl import PatternError
from tests.contract import oracle as o


def mask_of(src, lq=10, lk=None, heads=1, name=None, **params):
    return patterndsl.compile(src, name=name, **params).mask(lq, lk, heads)


def test_streaming_example_from_the_contract():
    src = """
# Sliding window with attention sinks (StreamingLLM).
pattern streaming(span = 1024, sinks = 4) {
    causal & (window(span) | sink(sinks))
}
"""
    got = mask_of(src, 12, span=3, sinks=2)
    want = o.to_mask(lambda q, k, h, lq, lk: o.causal(q, k) & (o.window(q, k, 3) | o.sink(q, k, 2)), 12)
    assert torch.equal(got, want)


def test_several_definitions_name_picks_one():
    src = "pattern a { causal }\npattern b(n = 2) { window(n, n) }\n"
    assert torch.equal(mask_of(src, 8, name="a"), o.to_mask(lambda q, k, *_: o.causal(q, k), 8))
    assert torch.equal(mask_of(src, 8, name="b"), o.to_mask(lambda q, k, *_: o.window(q, k, 2, 2), 8))


def test_unknown_definition_name_is_a_pattern_error():
    src = "pattern alpha { causal }\npattern beta { full }\n"
    o.expect_pattern_error(lambda: patterndsl.compile(src, name="alpah"), "alpah")


def test_comments_anywhere():
    src = """# header
pattern p(n = 3) { # after the brace
    # a whole-line comment
    let w = window(n) # trailing
    causal & w # the final expression
} # after the closing brace
"""
    assert torch.equal(mask_of(src, 9), o.to_mask(lambda q, k, *_: o.causal(q, k) & o.window(q, k, 3), 9))


@pytest.mark.parametrize("header", ["pattern p", "pattern p()"])
def test_parentheses_optional_without_params(header):
    assert torch.equal(mask_of(header + " { causal }", 6), o.to_mask(lambda q, k, *_: o.causal(q, k), 6))


def test_defaults_are_integer_expressions_of_earlier_params():
    src = "pattern p(a = 4, b = a * 2 + 1, c = b // 2 - a % 3) { where(k >= q - b and k <= q + c) }"
    # defaults: b = 9, c = 4 - 1 = 3; overriding a recomputes the later defaults: a=1 -> b=3, c=1-1=0
    want = o.to_mask(lambda q, k, *_: (k >= q - 9) & (k <= q + 3), 14)
    assert torch.equal(mask_of(src, 14), want)
    want = o.to_mask(lambda q, k, *_: (k >= q - 3) & (k <= q + 0), 14)
    assert torch.equal(mask_of(src, 14, a=1), want)
    want = o.to_mask(lambda q, k, *_: (k >= q - 5) & (k <= q + 1), 14)  # c = 5 // 2 - 1 % 3 = 1
    assert torch.equal(mask_of(src, 14, a=1, b=5), want)


def test_bool_params_default_and_override():
    src = "pattern p(c = true) { layout grid(y = 4, x = 5)\n neighborhood(3, causal = c) }"
    assert torch.equal(mask_of(src, 20), o.neighborhood_mask((4, 5), 3, is_causal=True))
    assert torch.equal(mask_of(src, 20, c=False), o.neighborhood_mask((4, 5), 3, is_causal=False))


def test_tuple_params_of_ints_and_bools():
    src = """pattern p(s = (3, 5), c = (false, true)) {
    layout grid(y = 5, x = 6)
    neighborhood(s, causal = c)
}"""
    assert torch.equal(mask_of(src, 30), o.neighborhood_mask((5, 6), (3, 5), is_causal=(False, True)))
    got = mask_of(src, 30, s=(5, 3), c=(True, False))
    assert torch.equal(got, o.neighborhood_mask((5, 6), (5, 3), is_causal=(True, False)))


def test_param_without_default_must_be_supplied():
    src = "pattern p(n, m = 1) { window(n, m) }"
    o.expect_pattern_error(lambda: patterndsl.compile(src), "n")
    assert torch.equal(mask_of(src, 9, n=2), o.to_mask(lambda q, k, *_: o.window(q, k, 2, 1), 9))


def test_statements_end_at_semicolon_or_line_end():
    src = "pattern p { let a = causal; let b = window(2)\n let c = sink(1); a & (b | c) }"
    want = o.to_mask(lambda q, k, *_: o.causal(q, k) & (o.window(q, k, 2) | o.sink(q, k, 1)), 10)
    assert torch.equal(mask_of(src, 10), want)


def test_line_break_inside_parentheses_does_not_end_a_statement():
    src = """pattern p {
    let w = (window(2)
             | sink(1))
    let v = window(
        1,
        1)
    causal & w | v
}"""
    want = o.to_mask(
        lambda q, k, *_: (o.causal(q, k) & (o.window(q, k, 2) | o.sink(q, k, 1))) | o.window(q, k, 1, 1), 10
    )
    assert torch.equal(mask_of(src, 10), want)


@pytest.mark.parametrize(
    "body",
    [
        "    causal\n    & window(2)\n",
        "    causal &\n    window(2)\n",
        "    let s = sink(1)\n    causal\n    & (window(2)\n    | s)\n    - where(q == 5)\n",
    ],
    ids=["leading-operator", "trailing-operator", "after-statements"],
)
def test_final_expression_may_span_lines(body):
    src = "pattern p {\n" + body + "}"
    m = mask_of(src, 10)
    if "s)" in body:
        want = o.to_mask(
            lambda q, k, *_: (o.causal(q, k) & (o.window(q, k, 2) | o.sink(q, k, 1))) & ~(q == 5) & (k >= 0), 10
        )
    else:
        want = o.to_mask(lambda q, k, *_: o.causal(q, k) & o.window(q, k, 2), 10)
    assert torch.equal(m, want)


def test_let_binds_integers_and_patterns():
    src = "pattern p(n = 2) { let w = n * 2; let band = window(w, 1); band & where(q - k != w - 1) }"
    want = o.to_mask(lambda q, k, *_: o.window(q, k, 4, 1) & (q - k != 3), 12)
    assert torch.equal(mask_of(src, 12), want)


def test_layout_grid_gives_coordinates():
    src = "pattern p { layout grid(t = 2, y = 3, x = 4)\n where(q.t == k.t and q.x == k.x) }"

    def rule(q, k, *_):
        qt, _qy, qx = o.coords(q, (2, 3, 4))
        kt, _ky, kx = o.coords(k, (2, 3, 4))
        return (qt == kt) & (qx == kx)

    assert torch.equal(mask_of(src, 24), o.to_mask(rule, 24))


def test_layout_at_most_once():
    src = "pattern p {\n layout grid(y = 2, x = 2)\n layout grid(y = 4)\n full\n}"
    o.expect_pattern_error(lambda: patterndsl.compile(src), "layout", line=3)


@pytest.mark.parametrize(
    "lq,lk",
    [(11, 12), (12, 11), (13, 13), (11, 11)],
    ids=["queries-short", "keys-short", "both-long", "both-short"],
)
def test_layout_extent_must_match_sequence(lq, lk):
    p = patterndsl.compile("pattern p { layout grid(y = 3, x = 4)\n causal }")
    assert p.mask(12).shape == (1, 12, 12)
    o.expect_pattern_error(lambda: p.mask(lq, lk))
    o.expect_pattern_error(lambda: p.plan(lq, lk, block=(4, 4)))
    q, k, v = o.rand_qkv(lq=lq, lk=lk)
    o.expect_pattern_error(lambda: p(q, k, v))


def test_layout_with_unequal_lengths_is_an_error_even_if_one_matches():
    p = patterndsl.compile("pattern p { layout grid(x = 8)\n causal }")
    o.expect_pattern_error(lambda: p.mask(8, 16))
    o.expect_pattern_error(lambda: p.mask(16, 8))


def test_heads_lines_with_final_expression():
    src = """pattern p(w = 1) {
    heads 0..2: window(w)
    heads 2..3: sink(2)
    causal
}"""
    got = mask_of(src, 8, heads=5)
    rules = [
        lambda q, k: o.window(q, k, 1),
        lambda q, k: o.window(q, k, 1),
        lambda q, k: o.sink(q, k, 2),
        lambda q, k: o.causal(q, k),
        lambda q, k: o.causal(q, k),
    ]
    want = o.to_mask(lambda q, k, h, *_: rules[h](q, k), 8, heads=5)
    assert torch.equal(got, want)


def test_heads_lines_without_final_expression():
    src = "pattern p {\n heads 0..1: causal\n heads 1..3: window(1, 1)\n}"
    p = patterndsl.compile(src)
    want = o.to_mask(lambda q, k, h, *_: o.causal(q, k) if h == 0 else o.window(q, k, 1, 1), 6, heads=3)
    assert torch.equal(p.mask(6, heads=3), want)
    assert torch.equal(p.mask(6, heads=2), want[:2])
    # Head 3 is covered by no line and there is no final expression: an error once 4 heads are used.
    o.expect_pattern_error(lambda: p.mask(6, heads=4))
    o.expect_pattern_error(lambda: p.plan(6, heads=4, block=(2, 2)))
    q, k, v = o.rand_qkv(hq=4, lq=6)
    o.expect_pattern_error(lambda: p(q, k, v))


def test_heads_with_expression_of_params():
    src = "pattern p(n = 2) {\n heads 0..n: causal\n heads n..n * 2: full\n}"
    p = patterndsl.compile(src, n=1)
    want = o.to_mask(lambda q, k, h, *_: o.causal(q, k) if h < 1 else o.full_like(q, k), 5, heads=2)
    assert torch.equal(p.mask(5, heads=2), want)


def test_lq_lk_in_where_and_end_alignment():
    src = "pattern p { where(k >= Lk - 3 or q == Lq) }"
    got = mask_of(src, 4, 9)
    want = o.to_mask(lambda q, k, h, lq, lk: (k >= lk - 3) | (q == lq), 4, 9)
    assert torch.equal(got, want)


def test_mask_is_bool_heads_q_kv():
    m = patterndsl.compile("pattern p { causal }").mask(3, 5, heads=2)
    assert m.dtype == torch.bool and tuple(m.shape) == (2, 3, 5)


def test_compile_returns_pattern_and_load_reads_a_file(tmp_path):
    path = tmp_path / "two.pdsl"
    path.write_text("pattern a(n = 1) { window(n) }\npattern b { full }\n")
    p = patterndsl.load(str(path), name="a", n=3)
    assert isinstance(p, patterndsl.Pattern)
    assert torch.equal(p.mask(7), o.to_mask(lambda q, k, *_: o.window(q, k, 3), 7))
    p = patterndsl.load(path, name="b")
    assert bool(p.mask(4).all())


def test_load_missing_file_is_a_pattern_error(tmp_path):
    o.expect_pattern_error(lambda: patterndsl.load(str(tmp_path / "nope.pdsl")), "nope.pdsl")


def test_param_not_declared_is_rejected():
    o.expect_pattern_error(lambda: patterndsl.compile("pattern p(span = 2) { window(span) }", spam=3), "spam")


def test_pattern_error_is_exported_exception():
    assert issubclass(PatternError, Exception)


def test_let_used_by_heads_lines_and_final_expression():
    src = """pattern p(half = 2, n_global = 1, local_heads = 1) {
    let globals = global(n_global)
    heads 0..local_heads: window(half, half) | globals
    window(half, half, 2) | globals
}"""
    got = patterndsl.compile(src).mask(12, heads=3)
    want = o.to_mask(
        lambda q, k, h, *_: (o.window(q, k, 2, 2) if h < 1 else o.window(q, k, 2, 2, 2)) | o.global_(q, k, 1),
        12,
        heads=3,
    )
    assert torch.equal(got, want)
