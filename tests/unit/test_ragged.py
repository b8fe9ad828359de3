"""Ragged batches and paged caches on the CPU path (LANGUAGE.md section 9): outputs and gradients vs float64.

Each batch element is checked against the float64 reference on its own unpaged, unpadded problem
(``Pattern.mask(q_lengths[b], kv_lengths[b])`` over the first rows and keys).
"""

from __future__ import annotations

import random

import pytest
import torch

import patterndsl as pd
from patterndsl.errors import InputError
from patterndsl.runtime import ragged
from tests.reference import reference_attention

SOURCES = [
    "pattern a(w = 9, s = 3) { causal & (window(w) | sink(s)) }",
    "pattern a { causal }",
    "pattern a(w = 6) { window(w, w) }",
    "pattern a(w = 5, s = 7) { causal & (window(w) | strided(s)) }",
    "pattern a { where(abs(q // 8 - k // 8) <= 1) | global(3) }",
    "pattern a(c = 16) { causal & blocks(c) }",
    "pattern a(p = 10) { causal | where(q < p and k < p) }",
    "pattern a { heads 0..1: causal & window(7)\n causal & sink(2) }",
    "pattern a { causal & where((q - k) % 3 == 0) }",
]


def _tensors(batch, heads, kv_heads, q_len, kv_len, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=g, dtype=dtype)
    return q, k, v


def _reference(p, q, k, v, kvl, ql):
    """Per element float64 outputs, lse and gradients (of ``sum(out * dout)``) on the unpadded problem."""
    out = []
    for b in range(q.shape[0]):
        lq, lk = int(ql[b]), int(kvl[b])
        qq = q[b : b + 1, :, :lq].double().requires_grad_()
        kk = k[b : b + 1, :, :lk].double().requires_grad_()
        vv = v[b : b + 1, :, :lk].double().requires_grad_()
        if lq == 0 or lk == 0:
            # Nothing to attend: zero rows and lse = -inf (the gradients are zeros too).
            o = (qq[..., :1] * 0 + (kk.sum() + vv.sum()) * 0).expand(*qq.shape[:3], v.shape[3])
            lse = torch.full(qq.shape[:3], float("-inf"), dtype=torch.float64)
            out.append((qq, kk, vv, o, lse))
            continue
        o, lse = reference_attention(qq, kk, vv, p.mask(lq, lk, q.shape[1]))
        out.append((qq, kk, vv, o, lse))
    return out


def paged(k, v, kvl, page_size, rng, share=0):
    """A paged copy of ``k``/``v``: random physical pages, unused table entries -1, the first ``share``
    pages of element 1 the same physical pages as element 0's (their contents must agree)."""
    batch, hkv, _, d = k.shape
    counts = [-(-int(n) // page_size) for n in kvl]
    width = max(max(counts), 1) + rng.randint(0, 2)
    total = sum(counts) + 3
    phys = list(range(total))
    rng.shuffle(phys)
    table = torch.full((batch, width), -1, dtype=torch.int64)
    kp = torch.randn(total, hkv, page_size, d, dtype=k.dtype)
    vp = torch.randn(total, hkv, page_size, d, dtype=k.dtype)
    nxt = 0
    for b in range(batch):
        for p in range(counts[b]):
            if b == 1 and p < share:
                table[b, p] = table[0, p]
                continue
            page = phys[nxt]
            nxt += 1
            table[b, p] = page
            lo, hi = p * page_size, min((p + 1) * page_size, int(kvl[b]))
            kp[page, :, : hi - lo] = k[b, :, lo:hi]
            vp[page, :, : hi - lo] = v[b, :, lo:hi]
    return kp, vp, table


def shared_paged(k, v, kvl, page_size, rng):
    """:func:`paged` with element 1 sharing element 0's first pages (a shared prompt); ``k``/``v`` are made
    to agree there first (in place)."""
    share = 0
    if k.shape[0] > 1:
        share = min(int(kvl[0]), int(kvl[1])) // page_size
        k[1, :, : share * page_size] = k[0, :, : share * page_size]
        v[1, :, : share * page_size] = v[0, :, : share * page_size]
    return paged(k, v, kvl, page_size, rng, share)


def _check(p, q, k, v, kvl, ql, atol, block_table=None, kp=None, vp=None, backend="cpu"):
    q = q.clone().requires_grad_()
    kk = (k if kp is None else kp).clone().requires_grad_()
    vv = (v if vp is None else vp).clone().requires_grad_()
    out, lse = p(q, kk, vv, kv_lengths=kvl, q_lengths=ql, block_table=block_table, return_lse=True, backend=backend)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, kk, vv), dout)
    want_dk, want_dv = torch.zeros(kk.shape, dtype=torch.float64), torch.zeros(vv.shape, dtype=torch.float64)
    for b, (rq, rk, rv, ro, rl) in enumerate(_reference(p, q.detach(), k, v, kvl, ql)):
        lq, lk = int(ql[b]), int(kvl[b])
        assert torch.allclose(out[b, :, :lq].double(), ro[0], atol=atol)
        assert torch.equal(out[b, :, lq:], torch.zeros_like(out[b, :, lq:]))
        assert bool(torch.isneginf(lse[b, :, lq:]).all())
        fin = torch.isfinite(rl[0])
        assert torch.equal(fin, torch.isfinite(lse[b, :, :lq]))
        assert torch.allclose(lse[b, :, :lq].double()[fin], rl[0][fin], atol=atol)
        gq, gk, gv = torch.autograd.grad(ro, (rq, rk, rv), dout[b : b + 1, :, :lq].double())
        assert torch.allclose(dq[b, :, :lq].double(), gq[0], atol=atol * 10)
        assert torch.equal(dq[b, :, lq:], torch.zeros_like(dq[b, :, lq:]))
        if block_table is None:
            want_dk[b, :, :lk], want_dv[b, :, :lk] = gk[0], gv[0]
        else:
            ps = kk.shape[2]
            for j in range(lk):
                page = int(block_table[b, j // ps])
                want_dk[page, :, j % ps] += gk[0, :, j]
                want_dv[page, :, j % ps] += gv[0, :, j]
    assert torch.allclose(dk.double(), want_dk, atol=atol * 10)
    assert torch.allclose(dv.double(), want_dv, atol=atol * 10)


def _case(seed):
    rng = random.Random(1400 + seed)
    p = pd.compile(rng.choice(SOURCES))
    batch = rng.randint(1, 4)
    kv_heads = rng.randint(1, 2)
    heads = 2 * kv_heads
    lk_max = rng.randint(1, 150)
    kvl = torch.tensor([rng.randint(0, lk_max) for _ in range(batch)])
    kvl[0] = lk_max
    lq_max = rng.choice([1, 3, 16, lk_max])
    ql = torch.tensor([rng.randint(0, min(lq_max, int(n))) for n in kvl])
    dtype = rng.choice([torch.float32, torch.float64])
    q, k, v = _tensors(batch, heads, kv_heads, lq_max, lk_max, 8, dtype, seed)
    return rng, p, q, k, v, kvl, ql, (1e-4 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("seed", range(12))
def test_ragged_lengths_match_float64_reference(seed):
    _, p, q, k, v, kvl, ql, atol = _case(seed)
    _check(p, q, k, v, kvl, ql, atol)


@pytest.mark.parametrize("seed", [*range(4), *(pytest.param(i, marks=pytest.mark.slow) for i in range(4, 12))])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_paged_layouts_match_float64_reference(seed, page_size):
    rng, p, q, k, v, kvl, ql, atol = _case(seed)
    kp, vp, table = shared_paged(k, v, kvl, page_size, rng)
    _check(p, q, k, v, kvl, ql, atol, block_table=table, kp=kp, vp=vp)


def test_queries_longer_than_keys_are_end_aligned():
    p = pd.compile(SOURCES[0])
    q, k, v = _tensors(2, 2, 1, 12, 10, 8, torch.float64, 0)
    _check(p, q, k, v, torch.tensor([10, 4]), torch.tensor([12, 7]), 1e-9)


def test_decoding_step_by_step_equals_prefill_last_rows():
    p = pd.compile("pattern s(w = 20) { causal & (window(w) | sink(4)) }")
    q, k, v = _tensors(2, 4, 2, 90, 90, 8, torch.float64, 3)
    full = p(q, k, v)
    start = torch.tensor([30, 55])
    for step in range(25):
        kvl = start + step
        rows = torch.stack([q[b, :, int(kvl[b]) - 1] for b in range(2)])[:, :, None]
        out = p(rows, k, v, kv_lengths=kvl)
        for b in range(2):
            assert torch.allclose(out[b, :, 0], full[b, :, int(kvl[b]) - 1], atol=1e-12)


def test_family_plans_serve_new_lengths_without_replanning(monkeypatch):
    p = pd.compile("pattern s(w = 40) { causal & (window(w) | sink(4)) }")
    q, k, v = _tensors(1, 2, 2, 1, 600, 8, torch.float32, 0)
    p(q, k, v, kv_lengths=torch.tensor([300]))
    built = []
    from patterndsl.runtime import plans

    real = plans.build
    monkeypatch.setattr(plans, "build", lambda *a: built.append(a[1:3]) or real(*a))
    for n in range(301, 513, 7):
        p(q, k, v, kv_lengths=torch.tensor([n]))
    p(q, k, v, kv_lengths=torch.tensor([512]))
    assert built == []  # 301..512 all sit in the plan at S = 512
    p(q, k, v, kv_lengths=torch.tensor([513]))
    assert built == [(1024, 1024)]


def test_position_only_patterns():
    assert ragged.position_only(pd.compile(SOURCES[0]).ir)
    assert not ragged.position_only(pd.compile(SOURCES[5]).ir)  # blocks: its plan reads the sizes
    assert not ragged.position_only(pd.compile("pattern a { where(k >= Lk - 3) }").ir)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kv_lengths": [3, 4]}, "kv_lengths must be an int tensor"),
        ({"kv_lengths": torch.tensor([3.0, 4.0])}, "kv_lengths must be an integer tensor"),
        ({"kv_lengths": torch.tensor([3, 4, 5])}, r"kv_lengths must have shape \[batch\] = \[2\]"),
        ({"kv_lengths": torch.tensor([3, 40])}, "kv_lengths holds 40, outside 0..20"),
        ({"q_lengths": torch.tensor([-1, 4])}, "q_lengths holds -1"),
        ({"q_lengths": torch.tensor([5, 9])}, "q_lengths holds 9, outside 0..5"),
        ({"block_table": torch.zeros(2, 3, dtype=torch.int64)}, "needs kv_lengths"),
    ],
)
def test_bad_lengths_are_errors_naming_the_argument(kwargs, match):
    p = pd.compile(SOURCES[1])
    q, k, v = _tensors(2, 2, 1, 5, 20, 8, torch.float32, 0)
    with pytest.raises(InputError, match=match):
        p(q, k, v, **kwargs)


def test_bad_tables_are_errors():
    p = pd.compile(SOURCES[1])
    q = torch.randn(2, 2, 1, 8)
    kp = vp = torch.randn(4, 1, 16, 8)
    with pytest.raises(InputError, match=r"block_table\[1, 1\] = 4 is not a page"):
        p(q, kp, vp, kv_lengths=torch.tensor([3, 20]), block_table=torch.tensor([[0, -1], [1, 4]]))
    with pytest.raises(InputError, match=r"block_table must have shape \[batch, max_pages\]"):
        p(q, kp, vp, kv_lengths=torch.tensor([3, 20]), block_table=torch.tensor([0, 1]))
    with pytest.raises(InputError, match=r"holds 40, outside 0\.\.32"):
        p(q, kp, vp, kv_lengths=torch.tensor([3, 40]), block_table=torch.tensor([[0, -1], [1, 2]]))
    # A page the pattern reads must be held; one it cannot read may be -1.
    with pytest.raises(InputError, match=r"no page .* key position 16 of batch element 1"):
        p(q, kp, vp, kv_lengths=torch.tensor([3, 20]), block_table=torch.tensor([[0, -1], [1, -1]]))
    sw = pd.compile("pattern s { causal & (window(3) | sink(2)) }")
    out = sw(q, kp, vp, kv_lengths=torch.tensor([3, 40]), block_table=torch.tensor([[0, -1, -1], [1, -1, 2]]))
    assert torch.isfinite(out).all()
    with pytest.raises(InputError, match="kv heads, which does not divide"):
        two = torch.randn(4, 2, 16, 8)
        p(torch.randn(1, 3, 1, 8), two, two, kv_lengths=torch.tensor([3]), block_table=torch.tensor([[0]]))


ROUTES = [
    "pattern r { causal & route(topk = 1, block = 4) }",
    "pattern r { causal & (sink(2) | route(2, block = 5, qblock = 3, among = causal)) }",
]


@pytest.mark.parametrize("source", ROUTES)
@pytest.mark.parametrize("paged_layout", [False, True])
def test_route_patterns_run_per_element(source, paged_layout):
    p = pd.compile(source)
    rng = random.Random(7)
    q, k, v = _tensors(3, 4, 2, 9, 40, 8, torch.float64, 1)
    kvl, ql = torch.tensor([40, 17, 0]), torch.tensor([9, 3, 2])
    if not paged_layout:
        _check_route(p, q, k, v, kvl, ql, None, None, None)
        return
    kp, vp, table = paged(k, v, kvl, 16, rng)
    _check_route(p, q, k, v, kvl, ql, kp, vp, table)


def _check_route(p, q, k, v, kvl, ql, kp, vp, table):
    q = q.clone().requires_grad_()
    kk = (k if kp is None else kp).clone().requires_grad_()
    vv = (v if vp is None else vp).clone().requires_grad_()
    out, lse = p(q, kk, vv, kv_lengths=kvl, q_lengths=ql, block_table=table, return_lse=True)
    (gq,) = torch.autograd.grad(out.sum(), (q,))
    for b in range(q.shape[0]):
        lq, lk = int(ql[b]), int(kvl[b])
        if not lk:
            assert torch.equal(out[b], torch.zeros_like(out[b])) and bool(torch.isneginf(lse[b]).all())
            continue
        qq = q.detach()[b : b + 1, :, :lq].requires_grad_()
        mask = p.mask(lq, lk, q.shape[1], q=qq.detach(), k=k[b : b + 1, :, :lk])
        ro, rl = reference_attention(qq, k[b : b + 1, :, :lk], v[b : b + 1, :, :lk], mask)
        assert torch.allclose(out[b, :, :lq].double(), ro[0], atol=1e-9)
        assert torch.allclose(lse[b, :, :lq].double(), rl[0], atol=1e-9)
        assert bool(torch.isneginf(lse[b, :, lq:]).all())
        (rq,) = torch.autograd.grad(ro.sum(), (qq,))
        assert torch.allclose(gq[b, :, :lq].double(), rq[0], atol=1e-8)


def test_torch_compile_fullgraph_with_lengths():
    p = pd.compile(SOURCES[0])
    q, k, v = _tensors(2, 2, 1, 4, 40, 8, torch.float32, 0)
    q.requires_grad_()
    f = torch.compile(lambda q, k, v, kvl, ql: p(q, k, v, kv_lengths=kvl, q_lengths=ql), fullgraph=True)
    for kvl, ql in (([40, 13], [4, 2]), ([7, 33], [1, 4])):
        kvl, ql = torch.tensor(kvl), torch.tensor(ql)
        out = f(q, k, v, kvl, ql)
        want = p(q, k, v, kv_lengths=kvl, q_lengths=ql)
        assert torch.allclose(out, want, atol=1e-6)
        (g,) = torch.autograd.grad(out.sum(), (q,))
        (w,) = torch.autograd.grad(want.sum(), (q,))
        assert torch.allclose(g, w, atol=1e-6)


@pytest.mark.parametrize(("dtype", "dim"), [(torch.float32, 8), (torch.float64, 8), (torch.float32, 16)])
def test_non_finite_keys_and_values_reach_only_the_rows_that_attend_them(dtype, dim):
    # dim 16 in float32: the native decoding kernel's call, handed back to the selecting path (a NaN at a zero weight)
    p = pd.compile("pattern w { causal & window(5) }")
    q, k, v = _tensors(2, 2, 1, 3, 30, dim, dtype, 2)
    k[:, :, 2] = float("nan")
    v[:, :, 3] = float("inf")
    kvl, ql = torch.tensor([30, 6]), torch.tensor([3, 3])
    out, lse = p(q, k, v, kv_lengths=kvl, q_lengths=ql, return_lse=True)
    assert bool(torch.isfinite(out[0]).all()) and bool(torch.isfinite(lse[0]).all())
    clean_k, clean_v = k.clone(), v.clone()
    clean_k[:, :, 2] = 0.0
    clean_v[:, :, 3] = 0.0
    want = p(q[:1], clean_k[:1], clean_v[:1], kv_lengths=kvl[:1], q_lengths=ql[:1])
    assert torch.allclose(out[0], want[0], atol=1e-6)
    assert not bool(torch.isfinite(out[1]).all())  # element 1's rows attend positions 2 and 3


def test_a_decoding_step_reads_only_the_keys_its_rows_reach(monkeypatch):
    p = pd.compile("pattern s { causal & (window(100) | sink(4)) }")
    q, k, v = _tensors(2, 2, 1, 2, 40000, 8, torch.float32, 0)
    read = []
    real = ragged.Keys.get

    def counting(self, tile):
        read.append(sum(z - a for a, z in tile.runs))
        return real(self, tile)

    monkeypatch.setattr(ragged.Keys, "get", counting)
    out = p(q, k, v, kv_lengths=torch.tensor([39999, 20000]))
    # Each element's two rows reach the sink tile and the window's tiles: at most 4 tiles of 64 keys.
    assert len(read) == 2 and max(read) <= 4 * 64
    assert out.shape == q.shape
