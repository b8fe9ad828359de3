"""``route(...)`` with run-time inputs (LANGUAGE.md sections 2, 3, 7) on the CPU executor, against the dense meaning."""

import pytest
import torch

import patterndsl as pd

MOBA = """pattern moba_padded {
    input n: int[batch]
    causal & (blocks(16) | route(topk = 2, block = 16, qblock = 1, among = causal - blocks(16))) & where(k < n)
}"""

TAGGED = """pattern tagged {
    input tag: int[batch, token]
    where(tag[q] == 1 or tag[k] == 1) | causal & route(topk = 2, block = 16, qblock = 16)
}"""

PREFIX = """pattern prefix {
    input p: int[batch]
    input n: int[batch]
    heads 0..2: (where(k < p) | causal & route(topk = 1, block = 32, qblock = 32)) & where(k < n)
    heads 2..4: causal & route(topk = 2, block = 16, qblock = 16) | where(q < p and k < p)
}"""


def _reference(mask, q, k, v, scale, bias=0.0):
    """Dense float64 attention over ``mask [B, H, Lq, Lk]`` (plus ``bias`` on the scores): rows with no key give 0."""
    share = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(share, 1), v.repeat_interleave(share, 1)
    s = (q @ k.transpose(-1, -2) * scale + bias).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ torch.where(mask.any(-2, keepdim=True).transpose(-1, -2), v, 0.0)


def _case(seed, source, heads, kv_heads, length):
    g = torch.Generator().manual_seed(seed)
    b, d = 2, 8
    q = torch.randn(b, heads, length, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, kv_heads, length, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, kv_heads, length, d, generator=g, dtype=torch.float64)
    lo = torch.randint(length // 2, length + 1, (b,), generator=g)
    data = {
        "n": lo,
        "p": torch.randint(0, length, (b,), generator=g),
        "tag": (torch.rand(b, length, generator=g) < 0.1).long(),
        "bias": torch.randn(b, length, generator=g, dtype=torch.float64),
        "C": torch.randn(3, d, generator=g, dtype=torch.float64),
    }
    p = pd.compile(source)
    inputs = {d.name: data[d.name] for d in p.ir.inputs}
    return p, q, k, v, inputs


@pytest.mark.parametrize(
    ("seed", "source", "heads", "kv_heads", "length"),
    [(0, MOBA, 2, 1, 100), (1, TAGGED, 4, 2, 80), pytest.param(2, PREFIX, 4, 2, 100, marks=pytest.mark.slow)],
)
def test_forward_backward_match_dense_meaning(seed, source, heads, kv_heads, length):
    p, q, k, v, inputs = _case(seed, source, heads, kv_heads, length)
    mask = p.mask(length, heads=heads, q=q, k=k, **inputs)
    # Values at keys no query of a batch element attends are poisoned: they must reach nothing.
    unread = ~mask.view(2, kv_heads, -1, length, length).any(2).any(2)
    assert (unread.any() or source is TAGGED) and not unread.all()  # every tagged query reads every key
    poisoned = v.masked_fill(unread[..., None], float("nan"))
    leaves = [t.clone().requires_grad_() for t in (q, k, poisoned)]
    out = pd.attention(*leaves, p, scale=0.5, backend="cpu", **inputs)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = _reference(mask, *ref_leaves, 0.5)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    want_grads = torch.autograd.grad(want, ref_leaves, dout)
    for got, ref in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_score_reading_inputs_beside_route():
    """A score statement reading an input adds to the attention scores, never to the route's choice."""
    source = TAGGED.replace("    where", "    input bias: float[batch, token]\n    score s + bias[k]\n    where")
    p, q, k, v, inputs = _case(6, source, 2, 1, 100)
    bias = inputs["bias"]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = pd.attention(*leaves, p, backend="cpu", **inputs)
    mask = p.mask(100, heads=2, q=q, k=k, **inputs)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = _reference(mask, *ref_leaves, 8**-0.5, bias[:, None, None, :])
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    for got, ref in zip(
        torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(want.sum(), ref_leaves), strict=True
    ):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_inputs_shape_only_the_operators_around_the_route():
    """The route chooses from the original scores among its own candidates; ``where(k < n)`` then intersects."""
    p, q, k, _, inputs = _case(3, MOBA, 2, 1, 100)
    unpadded = pd.compile(MOBA.replace(" & where(k < n)", "").replace("    input n: int[batch]\n", ""))
    got = p.mask(100, heads=2, q=q, k=k, **inputs)
    keys = torch.arange(100)
    want = unpadded.mask(100, heads=2, q=q, k=k) & (keys < inputs["n"].view(-1, 1, 1, 1))
    assert torch.equal(got, want)
    assert got.any() and not got.all()


CLUSTERED = """pattern clustered {
    input C: float[3, dim]
    input n: int[batch]
    causal & (window(2) | route(1, block = 4) | cluster(C)) & where(k < n)
}"""


@pytest.mark.parametrize(("source", "caret"), [(MOBA, "route(topk = 2"), (CLUSTERED, "route(1, block = 4)")])
def test_triton_backend_refuses_with_located_error(monkeypatch, source, caret):
    """The Triton kernels cannot combine route(...) with inputs yet: a BackendError with its caret at the route."""
    from patterndsl import config
    from patterndsl.errors import BackendError

    monkeypatch.setattr(config, "triton_interpret", lambda: True)
    p, q, k, v, inputs = _case(5, source, 2, 1, 32)
    with pytest.raises(BackendError, match="CPU backend only") as info:
        p(q.float(), k.float(), v.float(), backend="triton", **inputs)
    span = info.value.span
    line = source.splitlines()[span.line - 1]
    assert line[span.column - 1 : span.end_column - 1].startswith(caret)
    assert "^" in str(info.value)


def test_cluster_route_and_input_on_cpu():
    p, q, k, v, inputs = _case(8, CLUSTERED, 2, 1, 16)
    mask = p.mask(16, heads=2, q=q, k=k, **inputs)
    out = p(q, k, v, backend="cpu", **inputs)
    torch.testing.assert_close(out, _reference(mask, q, k, v, 8**-0.5), rtol=1e-9, atol=1e-9)


def test_plan_with_inputs_is_exact_where_the_choice_cannot_matter():
    """``plan(**inputs)``: empty/full/partial tiles hold for any q and k; the rest are 3."""
    p, q, k, _, inputs = _case(7, PREFIX, 4, 2, 140)
    plan = p.plan(140, heads=4, block=(32, 32), **inputs)
    tiles = plan.tiles()
    assert {0, 2, 3} <= set(tiles.unique().tolist())
    real = torch.nn.functional.pad(torch.ones(140, 140), (0, 20, 0, 20))
    area = real.view(5, 32, 5, 32).sum((1, 3)).expand_as(tiles)
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        qs, ks = torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g)
        mask = torch.nn.functional.pad(p.mask(140, heads=4, q=qs, k=ks, **inputs), (0, 20, 0, 20))
        count = mask.view(2, 4, 5, 32, 5, 32).sum((3, 5))
        assert torch.equal(count[tiles == 0], torch.zeros_like(count[tiles == 0]))
        assert torch.equal(count[tiles == 2], area[tiles == 2])
        partial = count[tiles == 1]
        assert bool(((partial > 0) & (partial < area[tiles == 1])).all())
