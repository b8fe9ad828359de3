"""Score modifiers (contract section 8): the language, the symbolic backward and the CPU executor.

The language: float parameters and literals, the ``score`` statement, typing with located
errors, folding, printing that re-parses equal. The derivative sympy derives is checked against
central finite differences. The CPU executor, on random score expressions over random patterns
(``where`` corners, per-head rules, grids, grouped-query heads, tails, empty rows, random executor
options), gives outputs, lse and gradients equal to an independent float64 reference
(``tests/score_exprs.py`` writes each expression as torch code too).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

import patterndsl
from patterndsl import analysis, scores, semantics
from patterndsl.errors import PatternError, PatternNameError, PatternTypeError, PatternValueError
from patterndsl.printer import pattern_to_source
from patterndsl.runtime import cpu
from tests.reference import reference_attention
from tests.score_exprs import float_expr, python_score
from tests.unit.test_plan_property import rand_case

GEMMA = """pattern gemma2_local(w = 4095, cap = 50.0) {   # softcapped local attention
    causal & window(w)
    score cap * tanh(s / cap)
}
"""
ALIBI = """pattern alibi(n = 8) {                          # ALiBi slopes for n heads
    causal
    score s - 2.0 ** (-8.0 * (h + 1) / n) * (q - k)
}
"""

# --------------------------------------------------------------------------- language


def test_contract_examples_compile_with_their_derivatives():
    g = patterndsl.compile(GEMMA)
    assert scores.to_source(g.ir.score.expr) == "50.0 * tanh(s / 50.0)"
    assert not g.ir.score.additive
    a = patterndsl.compile(ALIBI)
    assert a.ir.score.additive
    assert scores.to_source(a.ir.score.bias) == "-(2.0 ** (-8.0 * (h + 1) / 8) * (q - k))"


def test_float_parameters_from_python():
    assert scores.to_source(patterndsl.compile(GEMMA, cap=30.0).ir.score.expr) == "30.0 * tanh(s / 30.0)"
    # An integer for a float parameter is promoted; its printed value stays a float.
    p = patterndsl.compile(GEMMA, cap=30)
    assert dict(p.ir.params)["cap"] == 30.0 and "cap = 30.0" in pattern_to_source(p.ir)
    with pytest.raises(PatternTypeError, match="a float parameter has a float default"):
        patterndsl.compile(GEMMA, w=2.5)
    with pytest.raises(PatternValueError, match="must be finite"):
        patterndsl.compile(GEMMA, cap=float("nan"))
    # A float without a default: given from Python.
    p = patterndsl.compile("pattern p(t) { causal\n score s / t }", t=2.0)
    assert scores.to_source(p.ir.score.expr) == "s / 2.0"


ERRORS = [
    ("pattern p(c = 2.0) { where(q < c) }", "c)", PatternTypeError, "got a float (floats are only allowed in score)"),
    ("pattern p { where(q / 2 < k) }", "/", PatternTypeError, "integer division is //"),
    ("pattern p { window(2.5) }", "2.5", PatternTypeError, "must be an integer, got a float"),
    ("pattern p { where(s > 0) }", "s >", PatternNameError, "only defined in a score statement"),
    ("pattern p { causal\n score s // 2 }", "s //", PatternTypeError, "'//' needs integers, got a float"),
    ("pattern p { causal\n score s[0] }", None, PatternError, ""),
    ("pattern p { causal\n score s + tanh(q, k) }", "tanh(q, k)", PatternTypeError, "tanh() takes 1 argument"),
    ("pattern p { causal\n score s + tanhh(s) }", "tanhh", PatternNameError, "did you mean 'tanh'"),
    ("pattern p { causal\n score s + window(2) }", "window", PatternNameError, "unknown function 'window'"),
    ("pattern p { causal\n score q < k }", "q < k", PatternTypeError, "a score must be a number, got a condition"),
    ("pattern p { causal\n score select(s, 1.0, 2.0) }", "s,", PatternTypeError, "select needs a condition"),
    ("pattern p { causal\n score s + (q - k) % 0 }", "%", PatternValueError, "division by zero"),
    ("pattern p { causal\n score s + sx }", "sx", PatternNameError, "unknown name 'sx' in score"),
    ("pattern p(s = 3) { causal\n score s * 2.0 }", "s *", PatternNameError, "hides the score variable s"),
    ("pattern p { causal\n score s | s }", "|", PatternTypeError, "combines patterns"),
    ("pattern p { score s\n score s * 2.0\n causal }", "score s * 2.0", PatternError, "at most one score"),
    ("pattern p { causal\n score s + q.y }", "q.y", PatternError, "needs a layout grid"),
]


@pytest.mark.parametrize("source, at, error, words", ERRORS)
def test_type_errors_are_located(source, at, error, words):
    with pytest.raises(error) as info:
        patterndsl.compile(source)
    err = info.value
    assert words in err.message, err.message
    if at is not None:
        lines = source.splitlines()
        line, column = err.span.line, err.span.column
        assert lines[line - 1][column - 1 :].startswith(at), (err.span, source)


def test_score_keyword_is_a_name_elsewhere():
    # route's score= argument and a parameter called score keep working.
    p = patterndsl.compile("pattern p(score = 3) { window(score) }")
    assert p.ir.score is None
    patterndsl.compile("pattern p { causal & route(2, score = max) }")


def test_score_may_precede_the_final_expression_and_use_lets_and_layouts():
    src = "pattern p(c = 2.0) {\n layout grid(y = 4, x = 4)\n let w = 3\n score s + c + (q.x - k.x) * w\n full\n}"
    p = patterndsl.compile(src)
    assert scores.to_source(p.ir.score.expr) == "s + 2.0 + (q.x - k.x) * 3"
    assert p.ir.score.additive


def test_constants_fold():
    p = patterndsl.compile("pattern p(n = 4) { causal\n score s * (2.0 ** 3) + n // 3 + tanh(0.0) - min(1, 2.5) }")
    assert scores.to_source(p.ir.score.expr) == "s * 8.0 + 1 + 0.0 - 1.0"
    # Non-finite or undefined constants are left to run time, where IEEE gives them a value.
    p = patterndsl.compile("pattern p { causal\n score s + log(-1.0) }")
    assert scores.to_source(p.ir.score.expr) == "s + log(-1.0)"


@pytest.mark.parametrize("seed", range(4))
def test_printing_round_trips(seed):
    rng = random.Random(seed)
    for _ in range(40):
        axes = rng.choice([(), ("y", "x")])
        layout = "layout grid(y = 4, x = 4)\n" if axes else ""
        dsl, _ = float_expr(rng, rng.randint(0, 4), axes)
        src = f"pattern t(c = 1.5, n = 3) {{\n {layout} causal\n score {dsl} * c + n\n}}"
        first = patterndsl.compile(src).ir
        text = pattern_to_source(first)
        again = patterndsl.compile(text).ir
        assert again == first, (src, text)
        assert pattern_to_source(again) == text


def test_show_ir_prints_the_derivative(tmp_path, capsys):
    from patterndsl.cli import main

    path = tmp_path / "g.pdsl"
    path.write_text(GEMMA + ALIBI)
    assert main(["show", str(path), "--pattern", "gemma2_local", "--stage", "ir"]) == 0
    out = capsys.readouterr().out
    assert "# d score / d s = 1.0 - tanh(0.02 * s) ** 2.0" in out
    assert main(["show", str(path), "--pattern", "alibi", "--stage", "ir"]) == 0
    assert "additive in s" in capsys.readouterr().out


# --------------------------------------------------------------------------- derivatives


def _env(s, lq=40, lk=40):
    return scores.Env(
        s=s,
        q=torch.arange(lq)[:, None] + (lk - lq),
        k=torch.arange(lk)[None, :],
        h=torch.arange(2)[:, None, None],
        lq=lq,
        lk=lk,
        layout=None,
        dtype=torch.float64,
    )


@pytest.mark.parametrize("seed", range(4))
def test_derivative_matches_finite_differences(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    checked = 0
    for _ in range(30):
        dsl, _ = float_expr(rng, rng.randint(1, 4), ())
        score = patterndsl.compile(f"pattern t {{ causal\n score {dsl} }}").ir.score
        s = torch.randn(2, 40, 40, generator=gen, dtype=torch.float64) * 2
        f = lambda x, score=score: scores.evaluate(score.expr, _env(x)).to(torch.float64).expand(x.shape)  # noqa: E731
        ds = torch.ones_like(s) if score.additive else scores.evaluate(score.ds, _env(s)).expand(s.shape)
        if score.additive:
            assert torch.allclose(f(s) - s, scores.evaluate(score.bias, _env(s)).to(torch.float64).expand(s.shape))
        coarse = (f(s + 1e-4) - f(s - 1e-4)) / 2e-4
        fine = (f(s + 5e-5) - f(s - 5e-5)) / 1e-4
        # Points near a kink (abs, min, max, floor, a select on s) disagree with themselves: skipped.
        smooth = torch.isclose(coarse, fine, rtol=1e-5, atol=1e-6) & torch.isfinite(fine)
        torch.testing.assert_close(ds[smooth], fine[smooth], rtol=1e-5, atol=1e-5, msg=lambda m, d=dsl: f"{d}: {m}")
        checked += int(smooth.sum())
    assert checked > 10_000


# --------------------------------------------------------------------------- CPU executor


def _random_case(rng: random.Random):
    pir, lq, lk, heads, block = rand_case(rng)
    axes = () if pir.layout is None else pir.layout.names
    dsl, py = float_expr(rng, rng.randint(1, 4), axes)
    layout = "" if pir.layout is None else f"layout grid({', '.join(f'{n} = {e}' for n, e in pir.layout.axes)})\n"
    score = patterndsl.compile(f"pattern t {{ {layout} full\n score {dsl} }}").ir.score
    return dataclasses.replace(pir, score=score), lq, lk, heads, block, dsl, py


@pytest.mark.parametrize("seed", range(8))
def test_random_scores_on_random_patterns_match_the_reference(seed):
    rng = random.Random(1000 + seed)
    for _ in range(4):
        pir, lq, lk, heads, block, dsl, py = _random_case(rng)
        opts = cpu.CpuOptions(kernel=rng.choice(["fused", "math"]), chunk_bytes=rng.choice([1, 4 << 20]))
        plan = analysis.plan(pir, lq, lk, heads, block=block, order=rng.choice(["identity", "auto"]))
        kv_heads = rng.choice([h for h in (1, heads) if heads % h == 0])
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        dim = rng.choice([1, 4, 8])
        q = torch.randn(2, heads, lq, dim, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(2, kv_heads, lk, dim, generator=gen, dtype=torch.float64) for _ in range(2))
        dout = torch.randn(2, heads, lq, dim, generator=gen, dtype=torch.float64)
        dlse = torch.randn(2, heads, lq, generator=gen, dtype=torch.float64)
        where = f"{pir}\nscore {dsl}\nLq={lq} Lk={lk} heads={heads}/{kv_heads} block={block} order={plan.order}"
        layout = None if pir.layout is None else pir.layout.axes
        mask = semantics.mask(pir, lq, lk, heads)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        ref, ref_lse = reference_attention(qr, kr, vr, mask, 0.5, score=python_score(py, layout))
        out, lse = cpu.forward(q, k, v, plan, 0.5, options=opts)
        torch.testing.assert_close(out, ref.detach(), atol=1e-9, rtol=1e-9, msg=lambda m, w=where: f"{m}\n{w}")
        torch.testing.assert_close(lse, ref_lse.detach(), atol=1e-9, rtol=1e-9, msg=lambda m, w=where: f"{m}\n{w}")
        # The library's own dense meaning agrees too.
        sem, sem_lse = semantics.attention(pir, q, k, v, 0.5)
        torch.testing.assert_close(sem, out, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(sem_lse, lse, atol=1e-9, rtol=1e-9)
        grads = cpu.backward(q, k, v, out, lse, dout, plan, 0.5, dlse=dlse, options=opts)
        finite = torch.isfinite(ref_lse)
        loss = (ref * dout).sum() + (ref_lse.masked_fill(~finite, 0.0) * dlse).sum()
        want = torch.autograd.grad(loss, (qr, kr, vr), allow_unused=True)
        for name, g, w in zip("qkv", grads, want, strict=True):
            w = torch.zeros_like(g) if w is None else w
            torch.testing.assert_close(g, w, atol=1e-8, rtol=1e-8, msg=lambda m, n=name, x=where: f"d{n}: {m}\n{x}")


_GRADCHECKED = [GEMMA.replace("4095", "5").replace("50.0", "2.0"), ALIBI.replace("8)", "2)")]


@pytest.mark.parametrize(
    ("source", "fast"),
    [(s, True) for s in _GRADCHECKED] + [pytest.param(s, False, marks=pytest.mark.slow) for s in _GRADCHECKED],
)
def test_gradcheck(source, fast):
    """Fast mode (random Jacobian projections, default tolerances) by default; full Jacobians under slow."""
    p = patterndsl.compile(source)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 2, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: p(a, b, c, return_lse=True), (q, k, v), fast_mode=fast)


def test_float32_inputs_match_the_reference():
    p = patterndsl.compile(GEMMA.replace("50.0", "3.0").replace("4095", "40"))
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 130, 16, generator=gen) for _ in range(3))
    out, lse = p(q, k, v, return_lse=True)
    ref, ref_lse = semantics.attention(p.ir, q, k, v)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-5, rtol=2e-5)


def test_masked_pairs_never_see_the_modifier():
    # log(s) is NaN for negative logits; the pairs the pattern blocks must not carry it anywhere.
    p = patterndsl.compile("pattern p { where(k == q) \n score select(q == k, 0.0, log(s)) }")
    q = torch.randn(1, 1, 20, 4, dtype=torch.float64, requires_grad=True)
    out, lse = p(q, q, q, return_lse=True)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    (dq,) = torch.autograd.grad(out.sum() + lse.sum(), q)
    assert bool(torch.isfinite(dq).all())


def test_the_plan_is_unchanged_by_score():
    plain = patterndsl.compile("pattern p { causal & window(30) }")
    modified = patterndsl.compile("pattern p { causal & window(30)\n score 3.0 * tanh(s / 3.0) }")
    for block in [(16, 16), (64, 64)]:
        a, b = plain.plan(200, heads=2, block=block), modified.plan(200, heads=2, block=block)
        assert torch.equal(a.tiles(), b.tiles())
        assert dataclasses.replace(a.stats, plan_seconds=0) == dataclasses.replace(b.stats, plan_seconds=0)


# --------------------------------------------------------------------------- examples

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_t5_buckets_example_matches_hugging_face():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    p = patterndsl.load(EXAMPLES / "t5_buckets.pdsl", name="t5_decoder", slope=-1.0)
    assert p.ir.score.additive
    n = 300
    bias = semantics.modified_scores(p.ir, torch.zeros(1, n, n, dtype=torch.float64))[0]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    want = t5.T5Attention._relative_position_bucket(k - q, bidirectional=False, num_buckets=32, max_distance=128)
    allowed = k <= q
    assert torch.equal(bias[allowed].long(), want[allowed])


def test_gemma2_and_alibi_examples():
    local = patterndsl.load(EXAMPLES / "gemma2.pdsl", name="gemma2_local")
    glob = patterndsl.load(EXAMPLES / "gemma2.pdsl", name="gemma2_global")
    assert local.ir.score == glob.ir.score and not local.ir.score.additive
    assert scores.to_source(local.ir.score.ds) == "1.0 - tanh(0.02 * s) ** 2.0"
    alibi = patterndsl.load(EXAMPLES / "alibi.pdsl")
    bias = semantics.modified_scores(alibi.ir, torch.zeros(8, 5, 5, dtype=torch.float64))
    slopes = torch.tensor([2.0 ** (-(h + 1)) for h in range(8)], dtype=torch.float64)
    q, k = torch.arange(5)[:, None], torch.arange(5)[None, :]
    torch.testing.assert_close(bias, -slopes[:, None, None] * (q - k))


# --------------------------------------------------------------------------- hooks and keys


def test_float_input_reads_are_leaves_with_partials():
    """The hook for section 7's float tables: a read is a leaf of evaluation and a variable of differentiation."""
    from patterndsl.scores.nodes import FLOAT, INT, Read, Sym, make, num

    rel = Read("rel", (Sym("h", INT), make("-", [Sym("q", INT), Sym("k", INT)])), FLOAT)
    expr = make("+", [make("*", [num(3.0), make("tanh", [scores.nodes.S])]), make("*", [rel, rel])])
    score = scores.derive(expr)
    assert scores.to_source(score.ds) == "3.0 - 3.0 * tanh(s) ** 2.0"
    ((leaf, partial),) = score.partials
    assert leaf == rel and scores.to_source(partial) == "2.0 * rel[h, q - k]"
    table = torch.randn(2, 9, dtype=torch.float64)
    env = _env(torch.zeros(2, 5, 5, dtype=torch.float64), 5, 5)
    env.read = lambda node, idx: table[idx[0], idx[1].clamp(0, 8)]
    value = scores.evaluate(partial, env)
    q, k = torch.arange(5)[:, None], torch.arange(5)[None, :]
    torch.testing.assert_close(value, 2.0 * table[torch.arange(2)[:, None, None], (q - k).clamp(0, 8)])


def test_kernel_cache_key_includes_the_score():
    from patterndsl.codegen import spec_for

    keys = {
        spec_for(patterndsl.compile(f"pattern p {{ causal\n{score} }}"), 256, heads=2, target="interpret").key
        for score in ("", "score s * 2.0", "score s * 3.0", "score s + 0.5 * (q - k)")
    }
    assert len(keys) == 4


@pytest.mark.parametrize("body", ["causal & window(16)", "window(8, 0) | sink(2)"])
def test_a_constant_bias_shifts_lse_only(body):
    # A separable bias with neither a query nor a key part is a 0-dimensional tensor on the fused path (it raised
    # IndexError there): the output is unchanged and lse moves by the constant.
    p = patterndsl.compile(f"pattern p {{ {body}\n score s + 0.5 }}")
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 150, 16, generator=gen, requires_grad=True) for _ in range(3))
    out, lse = p(q, k, v, return_lse=True)
    ref, ref_lse = semantics.attention(p.ir, *(t.detach().double() for t in (q, k, v)))
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-5, rtol=2e-5)
    (dq,) = torch.autograd.grad(out.sum() + lse.sum(), q)
    qd = q.detach().double().requires_grad_()
    o64, l64 = semantics.attention(p.ir, qd, k.detach().double(), v.detach().double())
    (dq64,) = torch.autograd.grad(o64.sum() + l64.sum(), qd)
    torch.testing.assert_close(dq, dq64.float(), atol=1e-4, rtol=1e-4)
