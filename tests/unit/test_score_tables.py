"""Float inputs in ``score`` (contract sections 7 and 8): learned tables read per pair, with gradients.

The CPU executor's outputs, log-sum-exp and gradients (q, k, v and every float table) equal the
float64 reference (:func:`patterndsl.semantics.attention`, differentiated by autograd), for
additive biases (the fused path) and nonlinear scores (the selecting path), per-head, batched
and token-indexed tables, GQA, tails and 2-D grids; ``gradcheck`` on a small float64 case.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import patterndsl as pd
from patterndsl import semantics
from patterndsl.errors import PatternError

CASES = {
    "relative_bias": (
        """pattern p(w = 5) {
            input rel: float[head, 2 * w + 1]
            causal & window(w)
            score s + rel[h, k - q + w]
        }""",
        lambda h, lk: {"rel": (h, 11)},
    ),
    "softcapped_bias": (
        """pattern p(w = 6, cap = 3.0) {
            input rel: float[head, 2 * w + 1]
            window(w, w) | sink(2)
            score cap * tanh((s + rel[h, k - q + w]) / cap)
        }""",
        lambda h, lk: {"rel": (h, 13)},
    ),
    "scaled_by_table": (
        """pattern p {
            input temp: float[head]
            input key_bias: float[batch, token]
            causal
            score s * exp(temp[h]) + key_bias[k] * key_bias[q]
        }""",
        lambda h, lk: {"temp": (h,), "key_bias": (2, lk)},
    ),
    "learned_alibi_and_key_bias": (
        """pattern p {
            input slope: float[head]
            input key_bias: float[batch, token]
            causal | sink(3)
            score s + slope[h] * (k - q) + key_bias[k]
        }""",
        lambda h, lk: {"slope": (h,), "key_bias": (2, lk)},
    ),
    "grid_windows": (
        """pattern p(win = 3) {
            layout grid(y = 6, x = 6)
            input rel: float[head, 2 * win - 1, 2 * win - 1]
            where(q.y // win == k.y // win and q.x // win == k.x // win)
            score s + rel[h, q.y - k.y + win - 1, q.x - k.x + win - 1]
        }""",
        lambda h, lk: {"rel": (h, 5, 5)},
    ),
}


def _tensors(shapes, dtype, gen):
    return {name: (0.5 * torch.randn(*shape, generator=gen, dtype=dtype)).requires_grad_() for name, shape in shapes}


def _run(source, shapes, b, h, hkv, lq, lk, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = pd.compile(source)
    q = torch.randn(b, h, lq, 8, generator=gen, dtype=dtype).requires_grad_()
    k, v = (torch.randn(b, hkv, lk, 8, generator=gen, dtype=dtype).requires_grad_() for _ in range(2))
    tables = _tensors(shapes(h, lk).items(), dtype, gen)
    out, lse = p(q, k, v, return_lse=True, backend="cpu", **tables)
    ref, ref_lse = semantics.attention(p.ir, q, k, v, data=tables)
    dout = torch.randn(out.shape, generator=gen, dtype=dtype)
    leaves = (q, k, v, *tables.values())
    got = torch.autograd.grad((out * dout).sum() + lse.sum(), leaves)
    want = torch.autograd.grad((ref * dout).sum() + ref_lse.sum(), leaves)
    return (out, lse, *got), (ref, ref_lse, *want)


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_lse_and_gradients_equal_the_float64_reference(name):
    source, shapes = CASES[name]
    lk = 36
    got, want = _run(source, shapes, 2, 4, 2, 36 if name == "grid_windows" else 29, lk, torch.float32)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w.to(g.dtype), atol=2e-5, rtol=2e-4)


@pytest.mark.slow
def test_gradcheck_float64_learned_table():
    p = pd.compile(CASES["softcapped_bias"][0])
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rel = torch.randn(2, 13, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, rel):
        out, lse = p(q, k, v, rel=rel, return_lse=True, backend="cpu")
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v, rel), fast_mode=True)


def test_a_table_without_grad_gets_none_and_int_inputs_still_work():
    p = pd.compile(
        """pattern p {
            input rel: float[head, 64]
            input doc: int[token]
            within(doc, causal)
            score s + rel[h, min(q - k, 63)]
        }"""
    )
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=gen, requires_grad=True) for _ in range(3))
    rel = torch.randn(2, 64, generator=gen)
    doc = torch.arange(40) // 13
    out = p(q, k, v, rel=rel, doc=doc)
    out.sum().backward()
    assert rel.grad is None and q.grad is not None
    ref, _ = semantics.attention(p.ir, q.detach(), k.detach(), v.detach(), data={"rel": rel, "doc": doc})
    torch.testing.assert_close(out.detach(), ref.float(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("input t: float[head]\n causal\n score s + t[k]", "indexed by h"),
        ("input t: float[head, 4]\n causal\n score s + t[h, s]", "must be an integer"),
        ("input t: float[head, 4]\n causal\n score s + t[h, t[h, 0]]", "must be an integer"),
        ("input t: float[head, 4]\n causal\n score s + t[h]", "index it as"),
        ("input t: float[head, 4]\n causal\n score s + u[h]", "not a declared input"),
        ("input t: float[token]\n where(t[k] > 0.0)", "float"),
    ],
)
def test_misused_inputs_in_a_score_are_located_errors(body, message):
    with pytest.raises(PatternError, match=message) as err:
        pd.compile(f"pattern p {{\n {body}\n}}")
    assert err.value.span is not None


def test_show_ir_prints_the_partial_derivative_of_each_table():
    from patterndsl.scores import describe_derivatives

    p = pd.compile(CASES["softcapped_bias"][0])
    text = describe_derivatives(p.ir.score)
    assert "d score / d rel[h, k - q + 6]" in text
    assert "tanh" in text


# --------------------------------------------------------------------------- examples

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _swin_reference(q, k, v, table, win, side):
    """Swin's own window attention (its relative_position_index construction), independent of patterndsl."""
    b, h, n, d = q.shape
    coords = torch.stack(torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (win - 1)
    index = rel[..., 0] * (2 * win - 1) + rel[..., 1]  # [win*win, win*win]
    bias = table.reshape(h, -1)[:, index]  # [h, win*win, win*win]

    def windows(x):  # [b, h, side*side, d] -> [b, h, windows, win*win, d]
        x = x.reshape(b, h, side // win, win, side // win, win, d).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, h, -1, win * win, d)

    qw, kw, vw = windows(q), windows(k), windows(v)
    p = torch.softmax(qw @ kw.transpose(-1, -2) * d**-0.5 + bias[:, None], -1)
    out = (p @ vw).reshape(b, h, side // win, side // win, win, win, d).permute(0, 1, 2, 4, 3, 5, 6)
    return out.reshape(b, h, n, d)


def test_swin_example_equals_swin_window_attention_with_its_table_gradient():
    win, side, h = 3, 6, 2
    p = pd.load(EXAMPLES / "swin_relative_bias.pdsl", name="swin", win=win, height=side, width=side)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, side * side, 8, generator=gen, requires_grad=True) for _ in range(3))
    table = torch.randn(h, 2 * win - 1, 2 * win - 1, generator=gen, requires_grad=True)
    out = p(q, k, v, rel=table)
    want = _swin_reference(q, k, v, table, win, side)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    dout = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad((out * dout).sum(), (q, k, v, table))
    ref = torch.autograd.grad((want * dout).sum(), (q, k, v, table))
    for g, w in zip(got, ref, strict=True):
        torch.testing.assert_close(g, w, atol=5e-5, rtol=5e-5)


def test_shifted_swin_windows_and_learned_t5_against_the_float64_reference():
    shifted = pd.load(EXAMPLES / "swin_relative_bias.pdsl", name="swin_shifted", win=4, height=8, width=8)
    m = shifted.mask(64, 64, 1, rel=torch.zeros(1, 7, 7))[0, 0]
    y, x = torch.arange(64) // 8, torch.arange(64) % 8
    wy, wx = (y + 2) // 4, (x + 2) // 4
    assert torch.equal(m, (wy[:, None] == wy[None, :]) & (wx[:, None] == wx[None, :]))
    t5 = pd.load(EXAMPLES / "t5_buckets.pdsl", name="t5_learned")
    for p, shapes, length in ((shifted, {"rel": (3, 7, 7)}, 64), (t5, {"rel": (3, 32)}, 150)):
        source = str(p)
        got, want = _run(source, lambda h, lk, s=shapes: s, 1, 3, 3, length, length, torch.float32)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w.to(g.dtype), atol=3e-5, rtol=3e-4)


def test_learned_t5_reads_hugging_face_buckets():
    hf = pytest.importorskip("transformers.models.t5.modeling_t5")
    p = pd.load(EXAMPLES / "t5_buckets.pdsl", name="t5_learned")
    n, h = 300, 2
    rel = torch.randn(h, 32, dtype=torch.float64)
    bias = semantics.modified_scores(p.ir, torch.zeros(1, h, n, n, dtype=torch.float64), data={"rel": rel})[0]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    bucket = hf.T5Attention._relative_position_bucket(k - q, bidirectional=False, num_buckets=32, max_distance=128)
    allowed = (k <= q).expand(h, n, n)
    assert torch.equal(bias[allowed], rel[:, bucket][allowed])


def test_biases_of_the_form_g_q_plus_u_k_are_recognised():
    from patterndsl.scores.separable import separable

    def bias(text):
        return pd.compile(f"pattern p {{ causal\n score s + {text} }}").ir.score.bias

    assert separable(bias("-2.0 ** (-(h + 1) / 2) * (q - k)"))
    assert separable(bias("0.5 * k - q / 3 + h"))
    assert not separable(bias("tanh(0.1 * (q - k))"))
    assert not separable(bias("0.01 * (q - k) * (q - k)"))
    assert not separable(bias("0.1 * ((q - k) // 4)"))


@pytest.mark.parametrize(
    ("text", "reuses"),
    [
        ("cap * tanh(s / cap)", True),
        ("2.0 - s / (h + 1)", True),
        ("min(s, 3.0) + 0.1 * (q - k)", True),
        ("-exp(abs(s) / 4.0) + max(s * 0.0, 1.0) * 0.0", False),  # s read twice: evaluated as usual
        ("sqrt(s ** 2.0 + 1.0) * cap", False),  # ** out of place, then in place on its new buffer
        ("select(q > k, s, -s)", False),
    ],
)
def test_in_place_evaluation_equals_evaluate(text, reuses):
    from patterndsl import scores

    score = pd.compile(f"pattern p(cap = 5.0) {{ full\n score {text} }}").ir.score
    s = torch.randn(3, 4, 6, dtype=torch.float64) * 4

    def env(x):
        q, k = torch.arange(4)[:, None] + 2, torch.arange(6)[None, :]
        return scores.Env(x, q, k, torch.arange(3)[:, None, None], 4, 6, None, torch.float64)

    want = scores.evaluate(score.expr, env(s.clone())).expand(s.shape)
    buf = s.clone()
    got = scores.evaluate_in_place(score.expr, env(buf))
    torch.testing.assert_close(got.expand(s.shape), want)
    assert (got.data_ptr() == buf.data_ptr()) == reuses
