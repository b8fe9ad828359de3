"""``cluster``/``lsh`` composed with everything: two content primitives, complements, ``route``, ``score``,
int inputs and ragged batches, against float64 references on random data.

The masks come from an oracle written here from LANGUAGE.md sections 2 and 7 (label sets from
tests/clusters_reference.py, plain Python per pair; ``route`` compositions use ``Pattern.mask``, the
project's reference for route choices); outputs, lse and gradients from dense float64 attention.
"""

from __future__ import annotations

import pytest
import torch

import patterndsl as pd
from patterndsl.errors import PatternValueError
from tests.clusters_reference import token_sets
from tests.reference import reference_attention

DECL = "input C: float[3, dim]\ninput doc: int[batch, token]\n"
LSH2 = pd.compile("pattern t { lsh(2, seed = 3) }").ir.default
LSH1 = pd.compile("pattern t { lsh(1) }").ir.default
CL = pd.compile("pattern t { input C: float[3, dim]\n cluster(C) }").ir.default


def _data(seed: int, lq: int = 13, lk: int = 16, heads: int = 4, kv_heads: int = 2, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, lq, 4, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, lk, 4, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, lk, 4, generator=g, dtype=torch.float64)
    q[:, :, 1::3] = q[:, :, :1]  # ties: repeated queries
    c = torch.randn(3, 4, generator=g, dtype=torch.float64)
    doc = torch.tensor([[0] * 5 + [1] * (lk - 9) + [2] * 4, [3] * (lk - 2) + [4] * 2])[:batch]
    return q, k, v, {"C": c, "doc": doc}


class _Oracle:
    """``same(prim, b, h, i, j)``: the query at index ``i`` and the key ``j`` share a label (contract text)."""

    def __init__(self, q, k, c):
        self.q, self.k, self.c, self.memo = q, k, c, {}

    def same(self, prim, b, h, i, j) -> bool:
        key = (prim, b, h)
        if key not in self.memo:
            share = self.q.shape[1] // self.k.shape[1]
            cs = self.c.tolist() if prim.name == "cluster" else None
            self.memo[key] = (
                token_sets(prim, self.q[b, h].tolist(), h, cs),
                token_sets(prim, self.k[b, h // share].tolist(), h, cs),
            )
        qs, ks = self.memo[key]
        return bool(qs[i] & ks[j])


def _segment(ids, pos):
    s = e = pos
    while s > 0 and ids[s - 1] == ids[pos]:
        s -= 1
    while e + 1 < len(ids) and ids[e + 1] == ids[pos]:
        e += 1
    return s, e - s + 1


# (source, oracle(o, doc, b, h, i, j, x, y) with x, y the end-aligned positions)
CASES = [
    (
        "cluster(C) | lsh(2, seed = 3)",
        lambda o, d, b, h, i, j, x, y: o.same(CL, b, h, i, j) or o.same(LSH2, b, h, i, j),
    ),
    (
        "causal & (cluster(C) | lsh(2, seed = 3))",
        lambda o, d, b, h, i, j, x, y: y <= x and (o.same(CL, b, h, i, j) or o.same(LSH2, b, h, i, j)),
    ),
    ("causal - cluster(C)", lambda o, d, b, h, i, j, x, y: y <= x and not o.same(CL, b, h, i, j)),
    ("~lsh(1) | sink(2)", lambda o, d, b, h, i, j, x, y: y < 2 or not o.same(LSH1, b, h, i, j)),
    (
        "causal & ~(lsh(1) & window(3))",
        lambda o, d, b, h, i, j, x, y: y <= x and not (o.same(LSH1, b, h, i, j) and x - 3 <= y),
    ),
    (
        "within(doc, causal & cluster(C))",
        lambda o, d, b, h, i, j, x, y: _segment(d[b], x) == _segment(d[b], y) and y <= x and o.same(CL, b, h, i, j),
    ),
    (
        "within(doc, window(1) | cluster(C))",
        lambda o, d, b, h, i, j, x, y: (
            _segment(d[b], x) == _segment(d[b], y) and (x - 1 <= y <= x or o.same(CL, b, h, i, j))
        ),
    ),
    (
        "causal & (window(2) | cluster(C)) & where(doc[q] == doc[k])",
        lambda o, d, b, h, i, j, x, y: y <= x and d[b][x] == d[b][y] and (x - 2 <= y or o.same(CL, b, h, i, j)),
    ),
]


def _mask(oracle, q, k, inputs):
    batch, heads, lq, _ = q.shape
    lk = k.shape[2]
    o = _Oracle(q, k, inputs["C"])
    d = inputs["doc"].tolist()
    out = torch.zeros(batch, heads, lq, lk, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(lq):
                for j in range(lk):
                    out[b, h, i, j] = oracle(o, d, b, h, i, j, i + lk - lq, j)
    return out


def _grads(out, lse, leaves, seed=7):
    g = torch.Generator().manual_seed(seed)
    finite = torch.isfinite(lse)
    go = torch.randn(out.shape, generator=g, dtype=out.dtype)
    gl = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    loss = (out * go).sum() + torch.where(finite, lse * gl, 0.0).sum()
    return torch.autograd.grad(loss, leaves)


def _compare(p, q, k, v, inputs, mask, score=None, extra=()):
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    out, lse = p(*leaves, return_lse=True, **inputs)
    ref_out, ref_lse = reference_attention(*leaves, mask, score=score)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-10, atol=1e-10)
    for a, b in zip(_grads(out, lse, leaves + extra), _grads(ref_out, ref_lse, leaves + extra), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("source, oracle", CASES, ids=[c[0] for c in CASES])
def test_compositions_match_the_float64_reference(source, oracle):
    q, k, v, inputs = _data(len(source))
    p = pd.compile("pattern t {\n" + DECL + source + "\n}")
    used = {n: t for n, t in inputs.items() if any(d.name == n for d in p.ir.inputs)}
    mask = _mask(oracle, q, k, inputs)
    assert torch.equal(p.mask(q.shape[2], k.shape[2], q.shape[1], q=q, k=k, **used), mask)
    _compare(p, q, k, v, used, mask)


def test_the_main_composition_keeps_its_sorted_order_and_int_inputs_keep_it_too():
    from patterndsl.analysis import clusterplan

    for source in (
        "causal & (window(63) | cluster(C))",
        "causal & (window(2) | cluster(C)) & where(doc[q] == doc[k])",
        "within(doc, causal & cluster(C))",
    ):
        parts = clusterplan.split(pd.compile("pattern t {\n" + DECL + source + "\n}").ir, 4).parts
        assert [p.prim.name for p in parts] == ["cluster"], source
    general = clusterplan.split(pd.compile("pattern t {\n" + DECL + "causal - cluster(C)\n}").ir, 4).parts
    assert [p.prim for p in general] == [None]


def test_with_route_in_the_same_rule_and_in_other_rules():
    q, k, v, inputs = _data(3, lq=16)
    c = {"C": inputs["C"]}
    for source in (
        "input C: float[3, dim]\ncausal & (window(2) | route(1, block = 4) | cluster(C))",
        "causal & route(2, block = 4) & ~lsh(1)",
        "input C: float[3, dim]\nheads 0..2: causal & route(1, block = 4)\nheads 2..4: causal & cluster(C)",
    ):
        p = pd.compile("pattern t {\n" + source + "\n}")
        given = c if "C" in source else {}
        _compare(p, q, k, v, given, p.mask(16, 16, 4, q=q, k=k, **given))


def test_with_a_score_and_a_learned_table():
    q, k, v, inputs = _data(4)
    mask = _mask(CASES[1][1], q, k, inputs)
    body = "causal & (cluster(C) | lsh(2, seed = 3))\nscore s * 0.5 - 0.25 * (q - k)"
    p = pd.compile("pattern t {\ninput C: float[3, dim]\n" + body + "\n}")
    _compare(p, q, k, v, {"C": inputs["C"]}, mask, score=lambda s, x, y, h, lq, lk: s * 0.5 - 0.25 * (x - y))
    bias = torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=torch.float64, requires_grad=True)
    body = "input bias: float[head]\ncausal & (window(2) | cluster(C))\nscore s + bias[h]"
    p = pd.compile("pattern t {\ninput C: float[3, dim]\n" + body + "\n}")
    mask = _mask(lambda o, d, b, h, i, j, x, y: y <= x and (x - 2 <= y or o.same(CL, b, h, i, j)), q, k, inputs)
    _compare(
        p, q, k, v, {"C": inputs["C"], "bias": bias}, mask, score=lambda s, x, y, h, lq, lk: s + bias[h], extra=(bias,)
    )


def test_ragged_batches_run_each_element_on_what_exists():
    q, k, v, inputs = _data(5, lq=16, batch=2)
    kvl, ql = torch.tensor([16, 9]), torch.tensor([16, 4])
    p = pd.compile("pattern t {\n" + DECL + "within(doc, causal & cluster(C, balanced = 3))\n}")
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    out, lse = p(*leaves, return_lse=True, kv_lengths=kvl, q_lengths=ql, **inputs)
    refs = []
    for b in range(2):
        qb = leaves[0][b : b + 1, :, : ql[b]]
        kb, vb = (t[b : b + 1, :, : kvl[b]] for t in leaves[1:])
        mine = {"C": inputs["C"], "doc": inputs["doc"][b : b + 1, : kvl[b]]}
        mask = p.mask(int(ql[b]), int(kvl[b]), 4, q=qb.detach(), k=kb.detach(), **mine)
        ref_out, ref_lse = reference_attention(qb, kb, vb, mask)
        torch.testing.assert_close(out[b : b + 1, :, : ql[b]], ref_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[b : b + 1, :, : ql[b]], ref_lse, rtol=1e-10, atol=1e-10)
        assert (out[b, :, ql[b] :] == 0).all() and torch.isinf(lse[b, :, ql[b] :]).all()
        refs.append((ref_out * ref_out).sum())
    ours = torch.autograd.grad(sum((out[b, :, : ql[b]] ** 2).sum() for b in range(2)), leaves)
    ref = torch.autograd.grad(sum(refs), leaves)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# The same route in several head rules, a label removing it from some of them (heads 2..4 of the first,
# heads 1 and 3 of the second, whose static part would hold no route): a route is chosen by every head
# that holds it, so each rule holding it runs whole in token order. In the second, route(2) shares head 2
# with route(1) and follows it; head 4 keeps its static part and its sorted part.
SHARED = [
    ("heads 0..2: causal & route(1, block = 4)\nheads 2..4: causal & route(1, block = 4) & lsh(1)", 4),
    (
        "input C: float[3, dim]\n"
        "heads 0..1: causal & route(1, block = 4)\n"
        "heads 1..2: causal & (window(2) | route(1, block = 4) & cluster(C))\n"
        "heads 2..3: causal & (route(1, block = 4) | route(2, block = 8))\n"
        "heads 3..4: (causal & route(2, block = 8) & ~lsh(1)) | sink(1)\n"
        "causal & (window(1) | lsh(1))",
        5,
    ),
]


@pytest.mark.parametrize("source, heads", SHARED, ids=["one-route", "two-routes"])
def test_a_route_chosen_by_heads_a_label_removes_keeps_its_voters(source, heads):
    from patterndsl import ir
    from patterndsl.analysis import clusterplan

    q, k, v, inputs = _data(6, lq=16, heads=heads, kv_heads=1)  # one key-value head: every query head votes
    p = pd.compile("pattern t {\n" + source + "\n}")
    split = clusterplan.split(p.ir, heads)
    general = [(x.lo, x.hi) for x in split.parts if x.prim is None]
    assert general == ([(0, 2), (2, 4)] if heads == 4 else [(0, 1), (1, 2), (2, 3), (3, 4)])
    assert split.static is None or not any(ir.routes(n) for n in split.static.nodes())
    given = {"C": inputs["C"]} if "C" in source else {}
    mask = p.mask(16, 16, heads, q=q, k=k, **given)
    _compare(p, q, k, v, given, mask)
    # The choice is the pattern's: heads 0 and 1 voting alone would choose other blocks here.
    alone = pd.compile("pattern t { causal & route(1, block = 4) }").mask(16, 16, 2, q=q[:, :2], k=k)
    assert not torch.equal(mask[:, :1], alone[:, :1])


def test_kernel_source_names_every_pass():
    main = pd.compile("pattern t {\ninput C: float[3, dim]\ncausal & (window(63) | cluster(C))\n}")
    text = main.kernel_source(256, heads=2, head_dim=40, target="sm_80")
    assert text == main.kernel_source(256, heads=2, head_dim=40, target="sm_80")
    heads = [line for line in text.splitlines() if line.startswith("# ===")]
    assert heads == ["# === static part (its own plan and token order)", "# === heads 0..2: cluster(C) in sorted order"]
    assert "def _cluster_fwd" in text and "def _cluster_bwd" in text and "D = tl.constexpr(64)" in text
    general = pd.compile("pattern t {\ninput C: float[3, dim]\n(causal & window(4)) | (sink(2) - cluster(C))\n}")
    text = general.kernel_source(128, target="interpret")
    assert "run in torch in token order" in text and "_cluster_fwd" not in text and "static part" in text
    balanced = pd.compile("pattern t {\ninput C: float[70, dim]\ncausal & (window(3) | cluster(C, balanced = 4))\n}")
    assert "WORDS = tl.constexpr(2)" in balanced.kernel_source(128)  # 70 clusters: two words of membership bits


def test_a_paged_cache_reads_each_element_through_its_table():
    q, k, v, inputs = _data(8, lq=4, lk=16, batch=2)
    p = pd.compile("pattern t {\ninput C: float[3, dim]\ncausal & (sink(1) | cluster(C) | lsh(1))\n}")
    page = 4
    table = torch.tensor([[3, 0, 5, 1], [2, 7, 4, 6]])
    kp = torch.zeros(8, 2, page, 4, dtype=torch.float64)
    vp = torch.zeros_like(kp)
    for b in range(2):
        for i in range(4):
            kp[table[b, i]] = k[b, :, i * page : (i + 1) * page]
            vp[table[b, i]] = v[b, :, i * page : (i + 1) * page]
    kvl = torch.tensor([16, 11])
    out, lse = p(q, kp, vp, return_lse=True, kv_lengths=kvl, block_table=table, C=inputs["C"])
    for b in range(2):
        n = int(kvl[b])
        want, want_lse = p(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], return_lse=True, C=inputs["C"])
        torch.testing.assert_close(out[b : b + 1], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[b : b + 1], want_lse, rtol=1e-12, atol=1e-12)


def test_a_label_inside_routes_among_is_refused_at_compile_time_with_a_location():
    with pytest.raises(PatternValueError, match="among cannot use lsh") as e:
        pd.compile("pattern t { causal & route(1, block = 4, among = causal & lsh(1)) }")
    assert e.value.span is not None and e.value.span.column > 40
