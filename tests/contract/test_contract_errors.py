"""Contract section 5: every user error is a PatternError subclass saying what and where, never another type."""

from __future__ import annotations

import pytest
import torch

import patterndsl
from tests.contract import oracle as o

SYNTAX = [
    ("pattern p { causal &  }", 1),
    ("pattern p {\n causal | | full\n}", 2),
    ("pattern p { causal", 1),
    ("pattern { causal }", 1),
    ("pattern p(n = ) { window(n) }", 1),
    ("pattern p {\n window(2\n}", 3),
    ("pattern p { window(2) } }", 1),
    ("pattern p {\n let = causal\n causal\n}", 2),
    ("pattern p {\n heads 0..: causal\n}", 2),
    ("pattern p { causal @ full }", 1),
    ("pattern p {\n\n  where(q <)\n}", 3),
    ("pattern p { }", 1),
    ("", None),
    ("patern p { causal }", 1),
]


@pytest.mark.parametrize("src,line", SYNTAX)
def test_syntax_errors(src, line):
    o.expect_pattern_error(lambda: patterndsl.compile(src), line=line)


@pytest.mark.parametrize(
    "src,line,wrong,suggest",
    [
        ("pattern p { windw(3) }", 1, "windw", "window"),
        ("pattern p {\n causal & sinks(2)\n}", 2, "sinks", "sink"),
        ("pattern p {\n\n window(3, dilaton = 2)\n}", 3, "dilaton", "dilation"),
        ("pattern p(span = 3) {\n window(spam)\n}", 2, "spam", "span"),
        ("pattern p {\n let band = window(2)\n causal & bnad\n}", 3, "bnad", "band"),
        ("pattern p {\n where(q < Lkk)\n}", 2, "Lkk", "Lk"),
        ("pattern p { route(2, block = 4, scroe = max) }", 1, "scroe", "score"),
        ("pattern p { route(2, block = 4, score = mena) }", 1, "mena", "mean"),
        ("pattern p { layout grid(y = 2, x = 3)\n where(q.z == k.x) }", 2, "z", None),
    ],
)
def test_unknown_names_with_did_you_mean(src, line, wrong, suggest):
    err = o.expect_pattern_error(lambda: patterndsl.compile(src), wrong, line=line)
    if suggest is not None:
        msg = str(err).lower()
        assert "did you mean" in msg and suggest.lower() in msg.split("did you mean", 1)[1]


def test_unknown_compile_parameter_suggests():
    err = o.expect_pattern_error(lambda: patterndsl.compile("pattern p(span = 3) { window(span) }", spna=2), "spna")
    assert "did you mean" in str(err).lower() and "span" in str(err).lower().split("did you mean", 1)[1]


@pytest.mark.parametrize(
    "src,params",
    [
        ("pattern p(n) { window(n) }", {}),
        ("pattern p(n = 2) { window(n) }", {"n": True}),
        ("pattern p(n = 2) { window(n) }", {"n": (1, 2)}),
        ("pattern p(n = 2) { window(n) }", {"n": "3"}),
        ("pattern p(n = 2) { window(n) }", {"n": 2.5}),
        ("pattern p(c = false) { layout grid(x = 8)\n neighborhood(3, causal = c) }", {"c": 3}),
        ("pattern p { window(true) }", {}),
        ("pattern p { window((1, 2)) }", {}),
        ("pattern p { window(causal) }", {}),
        ("pattern p { causal & 3 }", {}),
        ("pattern p { let n = 3; causal & n }", {}),
        ("pattern p { where(causal) }", {}),
        ("pattern p { where(q + 1) }", {}),
        ("pattern p(s = (1, 2)) { where(q < s) }", {}),
        ("pattern p(s = (1, 2)) { window(s) }", {}),
        ("pattern p { let w = window(2); where(q < w) }", {}),
        ("pattern p { window() }", {}),
        ("pattern p { window(1, 2, 3, 4) }", {}),
        ("pattern p { window(1, before = 2) }", {}),
        ("pattern p { blocks(0) }", {}),
        ("pattern p { strided(0) }", {}),
        ("pattern p { summary(0) }", {}),
        ("pattern p { landmarks(0) }", {}),
        ("pattern p { window(2, dilation = 0) }", {}),
        ("pattern p { random(2, 0) }", {}),
        ("pattern p { route(2, block = 0) }", {}),
        ("pattern p { route(2, block = 4, among = 3) }", {}),
        ("pattern p(a = 1, a = 2) { full }", {}),
        ("pattern p(a = b, b = 1) { full }", {}),
        ("pattern p { layout grid(y = 0, x = 3)\n full }", {}),
    ],
)
def test_missing_or_ill_typed_or_invalid_values(src, params):
    # Each is a user error; reported as a PatternError at compile time or, at the latest, at use.
    def run():
        p = patterndsl.compile(src, **params)
        p.mask(8)

    o.expect_pattern_error(run)


def test_error_names_line_and_column_of_offence():
    src = "pattern ok { causal }\n\npattern bad(n = 4) {\n    causal & windw(n)\n}\n"
    err = o.expect_pattern_error(lambda: patterndsl.compile(src, name="bad"), "windw", line=4)
    assert ":4:14:" in str(err)


def test_loaded_file_errors_name_the_file(tmp_path):
    path = tmp_path / "broken.pdsl"
    path.write_text("pattern p {\n causal &\n}\n")
    err = o.expect_pattern_error(lambda: patterndsl.load(str(path)))
    assert "broken.pdsl" in str(err)


@pytest.mark.parametrize(
    "shape_q,shape_k,shape_v",
    [
        ((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 7, 4)),  # k/v sequence mismatch
        ((1, 2, 8, 4), (1, 2, 8, 5), (1, 2, 8, 5)),  # head_dim mismatch q vs k
        ((1, 2, 8), (1, 2, 8), (1, 2, 8)),  # 3-D
        ((1, 1, 2, 8, 4), (1, 1, 2, 8, 4), (1, 1, 2, 8, 4)),  # 5-D
        ((2, 2, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4)),  # batch mismatch
        ((1, 4, 8, 4), (1, 3, 8, 4), (1, 3, 8, 4)),  # kv heads do not divide
        ((1, 2, 8, 4), (1, 4, 8, 4), (1, 4, 8, 4)),  # more kv heads than query heads
        ((1, 2, 8, 4), (1, 2, 8, 4), (1, 1, 8, 4)),  # k and v head counts differ
        ((1, 2, 0, 4), (1, 2, 8, 4), (1, 2, 8, 4)),  # empty sequence
    ],
)
def test_tensor_shape_errors(shape_q, shape_k, shape_v):
    p = patterndsl.compile("pattern p { causal }")
    q, k, v = torch.randn(shape_q), torch.randn(shape_k), torch.randn(shape_v)
    o.expect_pattern_error(lambda: p(q, k, v))
    o.expect_pattern_error(lambda: patterndsl.attention(q, k, v, p))


@pytest.mark.parametrize(
    "dq,dk,dv",
    [
        (torch.float32, torch.float16, torch.float32),
        (torch.float32, torch.float32, torch.bfloat16),
        (torch.int64, torch.int64, torch.int64),
        (torch.bool, torch.bool, torch.bool),
        (torch.complex64, torch.complex64, torch.complex64),
    ],
)
def test_tensor_dtype_errors(dq, dk, dv):
    p = patterndsl.compile("pattern p { causal }")
    q, k, v = (torch.ones(1, 1, 4, 4).to(d) for d in (dq, dk, dv))
    o.expect_pattern_error(lambda: p(q, k, v))


def test_tensor_device_errors():
    p = patterndsl.compile("pattern p { causal }")
    q, k, v = o.rand_qkv(b=1, hq=1, lq=4, d=4)
    o.expect_pattern_error(lambda: p(q, k.to("meta"), v))
    o.expect_pattern_error(lambda: p(q.to("meta"), k.to("meta"), v.to("meta")))


def test_non_tensor_inputs_are_pattern_errors():
    p = patterndsl.compile("pattern p { causal }")
    q, k, v = o.rand_qkv(b=1, hq=1, lq=4, d=4)
    o.expect_pattern_error(lambda: p(q.numpy(), k, v))
    o.expect_pattern_error(lambda: patterndsl.attention(q, k, v, "pattern p { causal }"))


def test_head_count_not_covered_by_heads_lines():
    p = patterndsl.compile("pattern p {\n heads 0..2: causal\n}")
    q, k, v = o.rand_qkv(b=1, hq=3, lq=4, d=4)
    err = o.expect_pattern_error(lambda: p(q, k, v))
    assert "2" in str(err) and "head" in str(err).lower()


@pytest.mark.parametrize("call", ["mask", "plan"])
@pytest.mark.parametrize("args", [(0,), (-1,), (4, 0), (4, 4, 0)])
def test_bad_sizes_are_pattern_errors(call, args):
    p = patterndsl.compile("pattern p { causal }")
    o.expect_pattern_error(lambda: getattr(p, call)(*args))


@pytest.mark.parametrize("kw", [{"block": (0, 4)}, {"block": (4,)}, {"order": "random"}])
def test_bad_plan_options_are_pattern_errors(kw):
    p = patterndsl.compile("pattern p { causal }")
    o.expect_pattern_error(lambda: p.plan(8, **kw))
