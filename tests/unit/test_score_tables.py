"""Float inputs in ``score`` (contract sections 7 and 8): learned tables read per pair, with gradients.

The CPU executor's outputs, log-sum-exp and gradients (q, k, v and every float table) equal the
float64 reference (:func:`patterndsl.semantics.attention`, differentiated by autograd), for
additive biases (the fused path) and nonlinear scores (the selecting path), per-head, batched
and token-indexed tables, GQA, tails and 2-D grids; ``gradcheck`` on a small float64 case.
"""

from __future__ import annotations

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
