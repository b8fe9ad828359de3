"""Regression tests of issue 11's front-end causes: each input that once gave a traceback, a wrong
answer or a useless message now gives the right answer or a located ``PatternError``.

Cause 1: products of checked values (a band end ``before * dilation``, a comparison's difference,
a layout's number of positions) are range-checked as products, so no stage overflows 64-bit integers.
"""

from __future__ import annotations

import pytest
import torch

import patterndsl as pd
from patterndsl.analysis.plan import tile_reduce
from patterndsl.errors import InputError, PatternNameError, PatternSyntaxError, PatternTypeError, PatternValueError
from tests.reference import reference_attention

LIMIT = 2**62


def _agrees_with_the_dense_meaning(pattern: pd.Pattern, lq: int, lk: int) -> None:
    """The plan's tiles and the CPU attention both follow ``mask`` (the dense meaning)."""
    dense = pattern.mask(lq, lk)
    for block in [(4, 4), (3, 5), (16, 16)]:
        plan = pattern.plan(lq, lk, block=block, order="identity")
        assert torch.equal(plan.tiles(), tile_reduce(dense, *block)), (str(pattern), lq, lk, block)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, lq, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, lk, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 1, lk, 8, generator=gen, dtype=torch.float64)
    out = pattern(q, k, v, backend="cpu")
    want, _ = reference_attention(q, k, v, dense)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize(
    "args, which",
    [
        ("2, dilation = 4611686018427387904", "before"),  # OverflowError at plan(16) before
        ("0, 3, dilation = 4611686018427387904", "after"),  # OverflowError at mask(16) before
        ("2, dilation = 4611686018427387903", "before"),  # a silent wrong plan at Lq=16, Lk=13 before
        ("4611686018427387904, 1, 2", "before"),
    ],
)
def test_window_band_ends_beyond_the_value_range_are_errors_at_the_argument(args, which):
    source = f"pattern p {{ window({args}) }}"
    with pytest.raises(PatternValueError, match=rf"window {which} \* dilation .* out of range") as err:
        pd.compile(source)
    assert err.value.span is not None and err.value.span.line == 1
    assert source[err.value.span.column - 1 :].startswith(args.split(", ")[0 if which == "before" else 1])


@pytest.mark.parametrize(
    "args",
    [
        f"2, dilation = {LIMIT // 2}",  # the band end at exactly 2**62
        f"2, dilation = {LIMIT // 2 - 1}",
        f"1, 1, dilation = {LIMIT // 2}",
        f"0, dilation = {LIMIT}",
        f"{LIMIT}",
        f"0, {LIMIT}",
        f"3, 2, dilation = {LIMIT // 3}",
    ],
)
def test_window_band_ends_at_the_limit_plan_and_attend_like_the_dense_meaning(args):
    pattern = pd.compile(f"pattern p {{ window({args}) }}")
    for lq, lk in [(16, 13), (13, 16), (16, 16), (5, 40)]:
        _agrees_with_the_dense_meaning(pattern, lq, lk)


@pytest.mark.parametrize(
    "pred",
    [
        # Each comparison is within range on its own sides, but the tile rules subtract them.
        "q - -2305843009213693952 - Lq <= -(q * 576460752303423488)",
        "q * 576460752303423488 >= -(k * 576460752303423488)",
        "q + 3458764513820540928 + k + 4611686018427387903 != k + -2305843009213693952",
        "3458764513820540928 - k - -3458764513820540928 >= k + -2305843009213693952",
        "-4611686018427387904 + Lq + -4611686018427387904 > h - -2305843009213693952",
        "q - -7 - -4611686018427387903 == q - 4611686018427387903",
    ],
)
def test_where_intermediate_values_beyond_int64_are_errors_at_the_sizes(pred):
    pattern = pd.compile(f"pattern p {{ where({pred}) }}")
    for call in (lambda: pattern.mask(16, 13), lambda: pattern.plan(16, 13)):
        with pytest.raises(PatternValueError, match="beyond 64-bit integer arithmetic") as err:
            call()
        assert err.value.location is not None


@pytest.mark.parametrize(
    "pred",
    [
        "q - k >= -4611686018427387904",
        "q * 288230376151711744 >= k * 288230376151711744",
        "k - q >= -4611686018427387904",
        "q + 4611686018427387903 >= k",
    ],
)
def test_where_with_large_constants_within_range_follows_the_dense_meaning(pred):
    pattern = pd.compile(f"pattern p {{ where({pred}) }}")
    for lq, lk in [(16, 13), (13, 16), (5, 5)]:
        _agrees_with_the_dense_meaning(pattern, lq, lk)


def test_layout_positions_are_a_checked_product():
    source = "pattern p { layout grid(y = 1099511627776, x = 1099511627776, z = 8); neighborhood(3) }"
    with pytest.raises(PatternValueError, match=r"holds .* positions, more than 2\*\*62") as err:
        pd.compile(source)
    assert err.value.location == "<string>:1:13"


@pytest.mark.parametrize("source", ["window(-3)", "window(0, -1)", "window(after = -2, before = 1)", "sink(-1)"])
def test_negative_counts_are_errors_everywhere(source):
    with pytest.raises(PatternValueError, match="must be >= 0") as err:
        pd.compile(f"pattern p {{ {source} }}")
    assert err.value.location is not None


def test_route_topk_is_a_count_and_zero_chooses_nothing():
    pattern = pd.compile("pattern p { causal & route(0, block = 4) | sink(1) }")
    assert not pattern.is_dynamic
    assert pattern.ir.default == pd.compile("pattern p { sink(1) }").ir.default
    with pytest.raises(PatternValueError, match="topk must be >= 0"):
        pd.compile("pattern p { route(-1) }")


# Cause 2: long literals.


def test_leading_zeros_do_not_count_towards_the_length_of_a_number():
    pattern = pd.compile("pattern p { window(" + "0" * 4300 + "7) }")
    assert pattern.ir.default == pd.compile("pattern p { window(7) }").ir.default
    assert (
        pd.compile("pattern p { sink(" + "0" * 5000 + ") }").ir.default
        == pd.compile("pattern p { sink(0) }").ir.default
    )


@pytest.mark.parametrize("digits", ["9" * 31, "1" + "0" * 4300, "0" * 10 + "9" * 5000])
def test_a_number_too_long_is_a_located_error(digits):
    source = f"pattern p {{\n  window({digits})\n}}"
    with pytest.raises(PatternSyntaxError, match="number too large") as err:
        pd.compile(source)
    assert err.value.location == "<string>:2:10"


# Cause 9: error messages that point at the problem.


@pytest.mark.parametrize(
    "body, column",
    [
        ("(" * 3000 + "causal" + ")" * 3000, 13 + 64),
        ("~" * 5000 + "causal", 13 + 64),
        ("~(" * 40 + "causal" + ")" * 40, 13 + 64),
        ("where(" + "-" * 3000 + "q < k)", 13 + 6 + 63),
        ("where(" + "not " * 100 + "q < k)", 13 + 6 + 63 * 4),
    ],
)
def test_deep_nesting_points_at_the_level_that_nests_too_deeply(body, column):
    source = "pattern p {\n  causal &\n" + " " * 12 + body + " }"
    with pytest.raises(PatternSyntaxError, match="nests more than 64 levels deep") as err:
        pd.compile(source)
    assert err.value.location == f"<string>:3:{column}"


def test_nesting_up_to_the_limit_runs_through_every_stage():
    for body in [
        "(" * 64 + "causal" + ")" * 64,
        "~" * 64 + "causal",
        "where(" + "(q + " * 63 + "1" + ")" * 63 + " > k)",
    ]:
        pattern = pd.compile(f"pattern p {{ {body} }}")
        assert torch.equal(pd.compile(str(pattern)).mask(8), pattern.mask(8))
        pattern.plan(8)
        x = torch.randn(1, 1, 8, 4)
        pattern(x, x, x, backend="cpu")


def test_a_flat_union_of_ten_thousand_terms_compiles():
    terms = [f"window({i})" if i % 2 else f"sink({i})" for i in range(10_000)]
    pattern = pd.compile("pattern p { " + " | ".join(terms) + " }")
    assert len(pattern.ir.default.items) == 10_000
    assert torch.equal(pattern.mask(8)[0], pd.compile("pattern p { window(9999) | sink(9998) }").mask(8)[0])


def test_lets_that_nest_or_double_the_tree_are_refused_at_the_expression():
    lets = "; ".join(f"let a{i + 1} = ~(a{i} & window({i}))" for i in range(60))
    source = f"pattern p {{ let a0 = causal; {lets}; a60 | sink(1) }}"
    with pytest.raises(PatternValueError, match="nests more than 100 levels deep") as err:
        pd.compile(source)
    assert err.value.span.column == source.index("a60 |") + 1
    lets = "; ".join(f"let a{i + 1} = (a{i} | sink({i + 1})) & ~(a{i} & window({i + 1}))" for i in range(20))
    source = f"pattern p {{ let a0 = causal\n  {lets}\n  heads 0..1: a20\n  causal }}"
    with pytest.raises(PatternValueError, match="more than 50000 primitives and operators") as err:
        pd.compile(source)
    assert err.value.location == f"<string>:3:{len('  heads 0..1: ') + 1}"


def test_a_file_with_thousands_of_patterns_gives_a_short_message():
    source = "\n".join(f"pattern p{i} {{ causal }}" for i in range(3000))
    with pytest.raises(
        PatternNameError, match=r"defines 3000 patterns \(p0, p1, .*, p9, \.\.\. and 2990 more\)"
    ) as err:
        pd.compile(source)
    assert len(str(err.value)) < 200
    with pytest.raises(PatternNameError, match=r"defined: p0, .* and 2990 more") as err:
        pd.compile(source, name="nope")
    assert len(str(err.value)) < 200


def test_an_error_on_a_very_long_line_shows_the_part_around_the_caret():
    terms = ["causal"] * 2000
    terms[1000] = "3"
    source = "pattern p { " + " | ".join(terms) + " }"
    with pytest.raises(PatternTypeError, match="needs patterns, got an integer") as err:
        pd.compile(source)
    _, text, caret = str(err.value).split("\n")
    assert len(text) < 200 and text.startswith("    ...") and text.endswith("...")
    assert text[caret.index("^")] == "3"


@pytest.mark.parametrize(
    "lq, lk, words",
    [
        (0, 3, "q has sequence length 0 (shape (1, 2, 0, 4)); attention needs at least one query"),
        (
            3,
            0,
            "k and v have sequence length 0 (shape (1, 1, 0, 4) and (1, 1, 0, 4)); attention needs at least one key",
        ),
    ],
)
def test_zero_length_tensors_are_named(lq, lk, words):
    pattern = pd.compile("pattern p { causal }")
    q, k = torch.randn(1, 2, lq, 4), torch.randn(1, 1, lk, 4)
    with pytest.raises(InputError) as err:
        pattern(q, k, k.clone())
    assert str(err.value) == words
    with pytest.raises(InputError, match="sequence length 0"):
        pattern.mask(max(lq, 1), max(lk, 1), heads=2, q=q, k=k)


def test_size_checks_do_not_loop_over_heads():
    # check_lengths works on head ranges: a huge head count costs nothing here (the plan is issue 11 item 4).
    from patterndsl import check

    check.check_lengths(pd.compile("pattern p { where(k % (h + 1) == 0) }").ir, 16, 16, 2**40)
    with pytest.raises(pd.PatternError, match=r"heads 2\.\.5, 7\.\.1099511627776 are not covered") as err:
        check.check_lengths(pd.compile("pattern p { heads 0..2: causal; heads 5..7: full }").ir, 16, 16, 2**40)
    assert err.value.location is not None
    with pytest.raises(PatternValueError, match=r"divisor of '%' is 0 .* for head 1"):
        check.check_lengths(pd.compile("pattern p { heads 0..1: causal; where(k % (h - 1) == 0) }").ir, 16, 16, 3)


# Cause 5: every public function checks its arguments and answers with a PatternError naming them.


@pytest.mark.parametrize("source", ["pattern p { causal }", "pattern p { causal & route(2, block = 16) }"])
@pytest.mark.parametrize(
    "options, words",
    [
        ({"foo": 1}, "kernel_source() has no option 'foo'"),
        ({"head_dm": 64}, "has no option 'head_dm' (did you mean 'head_dim'?)"),
        ({"head_dim": 0}, "head_dim must be between 1 and 256, got 0"),
        ({"head_dim": -4}, "head_dim must be between 1 and 256, got -4"),
        ({"head_dim": 1000}, "head_dim must be between 1 and 256, got 1000"),
        ({"head_dim": "64"}, "head_dim must be an integer, got str"),
        ({"dtype": torch.int32}, "dtype must be one of torch.float16, torch.bfloat16, torch.float32, got torch.int32"),
        ({"dtype": "x"}, "dtype must be one of"),
        ({"kind": "sideways"}, "kind must be one of 'forward', 'backward', got 'sideways'"),
        ({"target": 90}, "target must be 'sm_XY'"),
        ({"target": "sm_x"}, "target must be 'sm_XY'"),
        ({"block": (0, 64)}, "block[0] must be >= 1, got 0"),
        ({"block": 64}, "block must be a pair of tile sizes"),
        ({"kv_heads": 0}, "kv_heads must be >= 1, got 0"),
        ({"order": "best"}, "order must be one of 'auto', 'identity', got 'best'"),
        ({"num_warps": 3}, "num_warps must be a power of two, got 3"),
        ({"num_stages": 0}, "num_stages must be between 1 and 8, got 0"),
    ],
)
def test_kernel_source_options_are_checked(source, options, words):
    with pytest.raises(pd.PatternError) as err:
        pd.compile(source).kernel_source(64, **options)
    assert words in str(err.value)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: pd.load(None), "load() needs a file path (str or os.PathLike), got NoneType"),
        (lambda: pd.load(3), "got int"),
        (lambda: pd.compile("pattern p { causal }", name=["p"]), "name must be a str"),
        (lambda: pd.compile(b"pattern p { causal }"), "pattern source must be a str, got bytes"),
        (lambda: P.plan(16, block=(0, 4)), "block[0] must be >= 1, got 0"),
        (lambda: P.plan(16, block="ab"), "block must be a pair"),
        (lambda: P.plan(16, order="sideways"), "order must be one of 'auto', 'identity'"),
        (lambda: P.plan(16.0), "q_len must be a positive integer, got float"),
        (lambda: P.plan(16, heads=0), "heads must be >= 1, got 0"),
        (lambda: P.mask(1 << 15), "mask() would build 1.07e+09 entries"),
        (lambda: P.mask(16, heads=True), "heads must be a positive integer, got bool"),
        (lambda: P(X, X, X, return_lse="yes"), "return_lse must be True or False, got str"),
        (lambda: P(X, X, X, backend="gpu"), "backend must be one of"),
        (lambda: P(X, X, X, scale="x"), "scale"),
        (lambda: pd.attention(X, X, X, "causal"), "attention() needs a patterndsl.Pattern, got str"),
    ],
)
def test_public_functions_check_their_arguments(call, words):
    with pytest.raises(pd.PatternError) as err:
        call()
    assert words in str(err.value)


P = pd.compile("pattern p { causal }")
X = torch.randn(1, 1, 4, 8)


def test_a_long_integer_chain_in_a_condition_is_refused_at_the_condition():
    source = "pattern p { where(" + " + ".join(["q"] * 3000) + " < k) }"
    with pytest.raises(PatternValueError, match="more than 100 operations deep") as err:
        pd.compile(source)
    assert err.value.location == "<string>:1:19"
    pattern = pd.compile("pattern p { where(" + " + ".join(["q"] * 90) + " < k * 91) }")
    assert torch.equal(pattern.mask(8)[0], pd.compile("pattern p { where(90 * q < 91 * k) }").mask(8)[0])


def test_the_cli_says_bad_values_came_from_param(tmp_path, capsys):
    from patterndsl import cli

    path = tmp_path / "p.pdsl"
    path.write_text("pattern p(n = 2) { causal & window(n) }\npattern g { causal }\n")
    assert cli.main(["show", str(path), "--pattern", "p", "--param", "n=-1", "--stage", "ir"]) == 1
    assert "window before must be >= 0, got -1 (parameter 'n' = -1 from --param)" in capsys.readouterr().err
    assert cli.main(["show", str(path), "--pattern", "p", "--param", "m=1", "--stage", "ir"]) == 1
    assert "--param m= names no parameter of pattern 'p'" in capsys.readouterr().err
    assert cli.main(["show", str(path), "--stage", "ir"]) == 1
    assert "pass --pattern NAME to pick one" in capsys.readouterr().err


def test_mask_evaluates_per_head_group_not_per_head(monkeypatch):
    """Pattern.mask follows heads lines: a huge head count costs a few evaluations (one per rule, chunked
    when the rule reads ``h``), and a size beyond what a dense mask holds is a PatternError."""
    from patterndsl import semantics

    calls = []
    real = semantics.evaluate
    monkeypatch.setattr(semantics, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    p = pd.compile("pattern p { heads 0..3: causal; heads 5..9: where(k % (h + 1) == 0); window(1) }")
    m = p.mask(2, 2, 2**26)
    assert m.shape == (2**26, 2, 2) and len(calls) <= 8, len(calls)
    assert torch.equal(m[7], torch.tensor([[True, False], [True, False]]))  # k % 8 == 0
    assert torch.equal(m[4], m[2**26 - 1]) and torch.equal(m[4], torch.tensor([[True, False], [True, True]]))
    for call in (lambda: p.mask(2, 2, 2**40), lambda: semantics.mask(p.ir, 1, 1, 2**40)):
        with pytest.raises(PatternValueError, match="at most 2\\*\\*28"):
            call()


@pytest.mark.parametrize("seed", range(3))
def test_mask_by_head_groups_equals_mask_head_by_head(seed):
    import random

    from patterndsl import ir, semantics
    from tests.unit.test_plan_property import _route, rand_case

    rng = random.Random(300 + seed)
    for n in range(20):
        pir, lq, lk, heads, _ = rand_case(rng)
        heads = rng.choice([heads, 5, 6])
        rules = (ir.HeadRule(1, 3, ir.Prim("where", (("pred", ir.Cmp("<=", ir.Var("k"), ir.Var("h"))),))),)
        node = rng.choice([ir.union, ir.inter])(pir.default, _route(rng, pir.layout)) if n % 3 == 0 else pir.default
        pir = ir.PatternIR("t", (), pir.layout, rules if rng.random() < 0.5 else pir.heads, node)
        i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
        ctx = semantics.Context(lq, lk, pir.layout)
        kv_heads = rng.choice([h for h in (1, 2, heads) if heads % h == 0])
        q, k = torch.randn(2, heads, lq, 4), torch.randn(2, kv_heads, lk, 4)
        got = semantics.mask(pir, lq, lk, heads, q=q, k=k)
        voters = {p: [h for h in range(heads) if p in ir.walk(pir.node_for_head(h))] for p in ir.routes(pir.default)}
        sel = {p: semantics.route_selection(p, q, k, ctx, hs) for p, hs in voters.items()}
        for b in range(2):
            for h in range(heads):
                chosen = {p: s[b, h // (heads // kv_heads)] for p, s in sel.items()}
                want = semantics.evaluate(pir.node_for_head(h), i, j, h, ctx, chosen)
                assert torch.equal(got[b, h], want), (pir, lq, lk, heads, b, h)


def test_kernel_spec_of_an_identity_order_builds_nothing_of_size_l(monkeypatch):
    """The campaign's kernel_source(7, 2**31) spent its time building arange(Lk) to compare the plan's
    implicit identity order with; an identity order is None and needs no comparison."""
    from patterndsl.analysis.plan import BlockPlan
    from patterndsl.codegen import generator

    p = pd.compile("pattern p { causal & window(5) | sink(1) }")
    plan = p.plan(40, 2**20, 2, block=(16, 16), order="identity")

    def refuse(self):
        raise AssertionError("an identity order was materialised")

    monkeypatch.setattr(BlockPlan, "q_order", property(refuse))
    monkeypatch.setattr(BlockPlan, "kv_order", property(refuse))
    spec = generator.make_spec(plan, "forward", 16, torch.float16, 2, "sm_90")
    assert not spec.q_reordered and not spec.k_reordered


def test_show_reach_follows_heads_lines_not_the_head_count(tmp_path):
    import contextlib
    import io

    from patterndsl import cli

    def run(*argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in argv])
        return code, out.getvalue(), err.getvalue()

    s2 = ["show", "examples/s2_attention.pdsl", "--param", "local=8", "--seq", 32, "--stage", "reach"]
    code, out, _ = run(*s2, "--heads", 2**40)
    assert code == 0 and out.count("smallest number of layers") == 5 and "heads 4..1099511627776:" in out
    source = tmp_path / "h.pdsl"
    source.write_text("pattern p { causal & where(k >= q - h) }")
    code, out, _ = run("show", source, "--seq", 16, "--stage", "reach", "--heads", 3)
    assert code == 0 and "head 2:" in out
    code, _, err = run("show", source, "--seq", 16, "--stage", "reach", "--heads", 2**40)
    assert code == 1 and "at most 64" in err


def test_a_side_of_more_tiles_than_a_plan_represents_is_refused_at_once():
    # 2**31 keys in 64-token tiles: 2**25 tiles on the key side, refused before any per-tile array is built
    # (this took 25 s and 3.6 GB); so is plan(2**31) in 128-token tiles (37-89 s and over 5 GB before
    # a MemoryError). The message names tiles that fit, and those plan.
    import re
    import time

    import patterndsl
    from patterndsl.analysis import planner

    p = patterndsl.compile("pattern p { causal & window(5) | sink(1) }")
    start = time.process_time()
    for args, block, fit in [
        ((2, 2**31), (64, 64), (64, 4096)),
        ((2**31,), (128, 128), (4096, 4096)),
        ((2**26 + 1,), (128, 128), (256, 256)),
    ]:
        with pytest.raises(patterndsl.PatternError, match=re.escape(f"use larger tiles (block={fit})")):
            p.plan(*args, block=block)
    assert time.process_time() - start < 2.0
    plan = p.plan(2, 2**31, block=(64, 4096))
    assert plan.n_kv_tiles == planner.MAX_SIDE_TILES and plan.stats.allowed_pairs == 2 * 6 + 2
