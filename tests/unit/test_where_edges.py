"""`where` edge cases that cross stages: short-circuit guards and 64-bit overflow.

Python's `and`/`or` short-circuit, so `q > 0 and k % q == 0` never divides by
zero; the dense meaning, the plan (whose rewrite pass splits predicates) and
the CPU path must agree. Predicates that could leave 64-bit integers are
refused at plan/mask time instead of wrapping silently.
"""

import pytest
import torch

import patterndsl
from patterndsl.analysis.plan import tile_reduce
from patterndsl.errors import PatternValueError
from tests.reference import reference_attention

GUARDED = [
    ("where(q > 0 and k % q == 0)", lambda q, k: q > 0 and k % q == 0),
    ("where(q == 0 or k % q == 0) & causal", lambda q, k: (q == 0 or k % q == 0) and k <= q),
    (
        "where(not (q > 1) or k // (q - 1) == 1) | window(1)",
        lambda q, k: (q <= 1 or k // (q - 1) == 1) or q - 1 <= k <= q,
    ),
]


@pytest.mark.parametrize("body,rule", GUARDED)
def test_guarded_divisions_follow_python_short_circuit(body, rule):
    p = patterndsl.compile(f"pattern p {{ {body} }}")
    mask = p.mask(24)[0]
    expect = torch.tensor([[rule(q, k) for k in range(24)] for q in range(24)])
    assert torch.equal(mask, expect)
    for order in ("identity", "auto"):
        plan = p.plan(24, block=(8, 8), order=order)
        permuted = mask[plan.q_order][:, plan.kv_order]
        assert torch.equal(plan.tiles()[0], tile_reduce(permuted[None], 8, 8)[0])
    q, k, v = (torch.randn(1, 1, 24, 8, dtype=torch.float64) for _ in range(3))
    out = p(q, k, v, backend="cpu")
    ref, _ = reference_attention(q, k, v, mask[None, None], 8**-0.5)
    torch.testing.assert_close(out, ref)


def test_head_guarded_division_is_checked_per_head():
    p = patterndsl.compile("pattern p { where(h > 0 and k % h == 0) }")
    m = p.mask(4, heads=3)
    assert not m[0].any()
    assert m[1].all()
    assert torch.equal(m[2][0], torch.tensor([True, False, True, False]))
    with pytest.raises(PatternValueError, match="head 0"):
        patterndsl.compile("pattern p { where(k % h == 0) }").mask(4, heads=2)


def test_unguarded_zero_divisor_still_fails():
    with pytest.raises(PatternValueError, match="division by zero"):
        patterndsl.compile("pattern p { where(q >= 0 and k % q == 0) }").mask(4)


@pytest.mark.parametrize("expr", ["q * 4611686018427387904 > k", "(q - Lk) * (k + 1) * 2305843009213693952 < 0"])
def test_predicates_that_could_overflow_int64_are_refused(expr):
    p = patterndsl.compile(f"pattern p {{\n    where({expr})\n}}")
    with pytest.raises(PatternValueError, match="64-bit") as info:
        p.mask(8)
    assert ":2:" in str(info.value) and "^" in str(info.value)
    with pytest.raises(PatternValueError, match="64-bit"):
        p.plan(8)


def test_large_but_safe_products_are_exact():
    p = patterndsl.compile("pattern p { where(q * 1099511627776 >= k * 1099511627776) }")
    assert torch.equal(p.mask(16)[0], torch.ones(16, 16).tril().bool())
