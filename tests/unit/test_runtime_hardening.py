"""Hardening of the runtime (issue 11): zero batches, float64 computed in float64 throughout, and the fake
kernels' log-sum-exp dtype."""

from __future__ import annotations

import pytest
import torch

import patterndsl
from patterndsl.runtime import op, plans

CAUSAL = "pattern p { causal }"
WINDOW = "pattern p { window(2) | sink(1) }"
PER_HEAD = "pattern p {\n heads 0..1: causal\n window(1, 3)\n}"
MOBA = "pattern p { causal & (blocks(4) | route(topk = 1, block = 4, qblock = 1, among = causal - blocks(4))) }"


@pytest.mark.parametrize("src", [CAUSAL, WINDOW, MOBA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_batch_gives_empty_outputs_and_gradients(src, dtype):
    p = patterndsl.compile(src)
    q, k, v = (torch.randn(0, 2, 8, 4, dtype=dtype, requires_grad=True) for _ in range(3))
    out, lse = p(q, k, v, return_lse=True)
    assert out.shape == (0, 2, 8, 4) and out.dtype == dtype
    assert lse.shape == (0, 2, 8) and lse.dtype == op.lse_dtype(dtype)
    (out.sum() + lse.sum()).backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape


def test_zero_batch_through_the_executor_directly():
    from patterndsl.runtime import cpu

    p = patterndsl.compile(CAUSAL)
    plan = p.plan(8, block=(4, 4))
    q = torch.randn(0, 2, 8, 4)
    out, lse = cpu.forward(q, q, q, plan, 0.5)
    assert out.shape == q.shape and lse.shape == (0, 2, 8)
    grads = cpu.backward(q, q, q, out, lse, out, plan, 0.5)
    assert [g.shape for g in grads] == [q.shape] * 3


def test_zero_length_sequences_are_a_pattern_error_not_a_crash():
    p = patterndsl.compile(CAUSAL)
    x = torch.randn(1, 2, 0, 4)
    with pytest.raises(patterndsl.PatternError):
        p(x, x, x)


_FULL = pytest.mark.slow


@pytest.mark.parametrize(
    ("src", "fast"),
    [(CAUSAL, True), (WINDOW, True), (PER_HEAD, True), pytest.param(MOBA, True, marks=_FULL)]
    + [pytest.param(s, False, marks=_FULL) for s in (CAUSAL, WINDOW, PER_HEAD)],
)
def test_float64_gradcheck_at_default_tolerances(src, fast):
    """float64 inputs are computed in float64 throughout: torch's gradcheck passes with its defaults,
    for the output and for the log-sum-exp (which is float64 too). The default run uses gradcheck's
    fast mode (random projections of the Jacobian, same tolerances); the full Jacobians run under slow."""
    p = patterndsl.compile(src)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = p(q, k, v, return_lse=True)
    assert out.dtype == lse.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda q, k, v: p(q, k, v), (q, k, v), fast_mode=fast)
    lse_of = lambda q, k, v: p(q, k, v, return_lse=True)[1].nan_to_num(neginf=0.0)  # noqa: E731
    assert torch.autograd.gradcheck(lse_of, (q, k, v), fast_mode=fast)


@pytest.mark.parametrize("kernel", ["fused", "math"])
def test_float64_lse_is_float64_exact(kernel):
    from patterndsl.runtime import cpu

    p = patterndsl.compile(WINDOW)
    q, k, v = (torch.randn(2, 2, 33, 8, dtype=torch.float64) for _ in range(3))
    with cpu.options(kernel=kernel):
        _, lse = p(q, k, v, return_lse=True)
    mask = p.mask(33)
    s = (q @ k.transpose(-1, -2) * 8**-0.5).masked_fill(~mask, float("-inf"))
    assert lse.dtype == torch.float64
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_fake_lse_dtype_follows_the_inputs(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = plans.register(patterndsl.compile(CAUSAL).ir, (16, 16), "auto")
    q = torch.randn(1, 2, 8, 4, dtype=dtype)
    out, lse = op.attention_fwd(q, q, q, key, [], 0.5, "cpu")
    with FakeTensorMode() as mode:
        fq = mode.from_tensor(q)
        fake_out, fake_lse = op.attention_fwd(fq, fq, fq, key, [], 0.5, "cpu")
    assert fake_lse.dtype == lse.dtype == op.lse_dtype(dtype)
    assert fake_out.dtype == out.dtype == dtype


@pytest.mark.parametrize("kernel", ["fused", "math"])
@pytest.mark.parametrize("what", ["k", "v", "kv"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_in_the_last_key_stays_in_the_row_that_sees_it(kernel, what, value):
    """The issue's case: causal at L = 40 with a non-finite last key. As with SDPA's is_causal, only the
    last row sees it; every other row's output and gradient are finite and exact."""
    from patterndsl.runtime import cpu

    p = patterndsl.compile(CAUSAL)
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    kb, vb = k.clone(), v.clone()
    for name in what:
        (kb if name == "k" else vb)[0, 0, -1] = value
    leaves = [t.clone().requires_grad_() for t in (q, kb, vb)]
    with cpu.options(kernel=kernel):
        out = p(*leaves)
        (out[:, :, :-1] ** 2).sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves, is_causal=True)
    (ref[:, :, :-1] ** 2).sum().backward()
    torch.testing.assert_close(out[:, :, :-1], ref[:, :, :-1], atol=1e-12, rtol=1e-12)
    if value != value:
        assert bool(torch.isnan(out[0, 0, -1]).any())
    # Row 39 of head 0 attends every key, so only dQ of the other rows is defined there; head 1 holds
    # no poison at all and must be exact everywhere.
    dq, ref_dq = leaves[0].grad, ref_leaves[0].grad
    torch.testing.assert_close(dq[:, 0, :-1], ref_dq[:, 0, :-1], atol=1e-12, rtol=1e-12)
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(leaf.grad[:, 1], ref_leaf.grad[:, 1], atol=1e-12, rtol=1e-12)


def test_merging_a_nan_part_gives_nan_not_an_empty_row():
    """A part that read a NaN (lse NaN) keeps its row NaN; the merge used to take it for an empty row
    (lse -inf), so a gathered route block with a NaN key vanished from the row that attends it."""
    from patterndsl.runtime import softmax

    o, lse = torch.zeros(3, 2), torch.tensor([float("-inf"), float("-inf"), 0.5])
    softmax.merge_into(o, lse, torch.ones(2, 2), torch.tensor([float("nan"), 1.0]), torch.tensor([0, 1]))
    assert bool(torch.isnan(lse[0])) and bool(torch.isnan(o[0]).all())
    assert lse[1] == 1.0 and torch.equal(o[1], torch.ones(2)) and lse[2] == 0.5 and torch.equal(o[2], torch.zeros(2))
    o, lse = torch.zeros(2, 2), torch.tensor([float("-inf"), 0.0])
    softmax.merge_into(o, lse, torch.ones(2, 2), torch.tensor([float("nan"), float("-inf")]))
    assert bool(torch.isnan(lse[0])) and lse[1] == 0.0 and torch.equal(o[1], torch.zeros(2))


def test_a_nan_route_score_ranks_lowest_whatever_its_sign():
    """A non-finite key makes its block's score NaN; the CPU's integer top-k and the reference's sorts rank it
    below every number (a NaN with the sign bit set used to rank lowest in one and highest in the other)."""
    from patterndsl import semantics
    from patterndsl.runtime import routing

    nan = torch.tensor(float("nan"))
    neg_nan = -nan if bool(torch.signbit(-nan)) else nan.neg()
    scores = torch.tensor([[0.5, 2.0, -1.0, float("-inf")]]).repeat(3, 1)
    scores[0, 1] = nan
    scores[1, 1] = neg_nan
    scores[2, 0] = float("-inf")
    cand = torch.ones(3, 4, dtype=torch.bool)
    for topk in (1, 2, 3, 4):
        want = semantics.route_top(scores, cand, topk)
        assert torch.equal(routing.top(scores, cand, topk), want), topk
        assert torch.equal(routing.top(scores.double(), cand, topk), want), topk
    assert semantics.route_top(scores, cand, 1)[:2].nonzero()[:, 1].tolist() == [0, 0]
    # NaN ties with -inf and the lower block wins: [0.5, NaN, -1, -inf] -> 0, 2, then block 1 before 3.
    assert semantics.route_top(scores, cand, 3)[0].tolist() == [True, True, True, False]


@pytest.mark.parametrize("kernel", ["fused", "math"])
def test_gathered_route_block_with_a_nan_key_reaches_its_rows(kernel):
    """MoBA (per-token route, gathered on the CPU) with a NaN in one key: exactly the rows whose mask holds
    that key are NaN; every other row is exact."""
    from patterndsl.runtime import cpu
    from tests.reference import reference_attention

    p = patterndsl.compile(MOBA)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 24, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    k[0, 1, 9] = float("nan")
    mask = p.mask(24, 24, 2, q=q, k=k)
    poisoned = mask[..., 9] & torch.tensor([False, True])[None, :, None]  # head 1's key 9 only
    assert bool(poisoned.any()) and not bool(poisoned.all())
    with cpu.options(kernel=kernel):
        out, lse = p(q, k, v, return_lse=True)
    assert bool(torch.isnan(lse[poisoned]).all()) and bool(torch.isnan(out[poisoned]).all())
    ref, ref_lse = reference_attention(q, k.masked_fill(torch.isnan(k), 0.0), v, mask)
    torch.testing.assert_close(out[~poisoned], ref[~poisoned])
    torch.testing.assert_close(lse[~poisoned], ref_lse[~poisoned])


def test_rows_a_non_finite_key_reaches_come_from_its_columns_only(monkeypatch):
    """The Triton launcher finds the rows to compute itself by evaluating the pattern on the non-finite key
    columns only (never Lq x Lk), per head group, under GQA and with Lq != Lk; they equal the dense answer."""
    from patterndsl import semantics
    from patterndsl.runtime import triton_finite

    p = patterndsl.compile("pattern p { heads 0..2: causal & window(3); heads 2..3: where(k <= q - h); sink(1) }")
    plan = p.plan(12, 20, 4, block=(4, 4), order="auto")
    bad = torch.zeros(2, 2, 20, dtype=torch.bool)
    bad[0, 0, [9, 17]] = True
    bad[1, 1, 0] = True
    widths = []
    real = semantics.evaluate
    monkeypatch.setattr(semantics, "evaluate", lambda n, i, j, *a: widths.append(j.shape[-1]) or real(n, i, j, *a))
    got = triton_finite.connected(plan, bad, {}, 4)
    assert max(widths) <= 2 and len(widths) <= 2 * 3, widths
    mask = p.mask(12, 20, 4)
    want = (mask[None] & bad.repeat_interleave(2, dim=1)[:, :, None, :]).any(-1)
    assert torch.equal(got, want)
