"""Run-time selection (runtime/routing.py) and its merge with the plan (runtime/dynamic.py).

The selection is checked against the loop-by-loop oracle of LANGUAGE.md written in
test_route_reference.py (``brute_selection``) and against the dense reference
``semantics.route_selection``; candidates from the plan of ``among`` against the
dense rule; the fast top-k against the reference top-k with deliberate ties, -inf,
+inf and -0.0; and the merged tile states against the tile reduction of the
reference mask.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import patterndsl
from patterndsl import ir, semantics
from patterndsl.analysis.plan import EMPTY, FULL, tile_reduce
from patterndsl.runtime import dynamic, plans, routing
from tests.brute import prim
from tests.unit.test_route_reference import CASES, brute_selection


def _ctx(Lq, Lk, layout=None):
    return semantics.Context(Lq, Lk, ir.Layout(tuple(layout.items())) if layout else None)


@pytest.mark.parametrize("r,Lq,Lk,layout", CASES, ids=[str(c[0]) for c in CASES])
@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (4, 2), (3, 1)])
def test_selection_matches_loop_oracle(r, Lq, Lk, layout, heads, kv_heads):
    gen = torch.Generator().manual_seed(Lq * 7 + Lk + heads)
    q = torch.randn(2, heads, Lq, 3, generator=gen)
    k = torch.randn(2, kv_heads, Lk, 3, generator=gen)
    sel = routing.select(r, q, k, _ctx(Lq, Lk, layout))
    expected, qkeys, kkeys = brute_selection(r, q.double(), k.double(), Lq, Lk, _ctx(Lq, Lk, layout).layout)
    for b, kvh, i, j in itertools.product(range(2), range(kv_heads), range(Lq), range(Lk)):
        assert bool(sel.allowed(torch.tensor(i), torch.tensor(j), b, kvh)) == (kkeys[j] in expected[b, kvh, qkeys[i]])
    assert torch.equal(sel.chosen, semantics.route_selection(r, q, k, _ctx(Lq, Lk, layout)))


def test_ties_and_fewer_candidates():
    # Identical key blocks: every candidate ties, the lowest blocks win; among leaves group 0 none.
    r = prim("route", 2, block=4, qblock=4, among=ir.difference(prim("causal"), prim("blocks", 4)))
    k = torch.randn(1, 1, 4, 5).repeat(1, 1, 5, 1)
    q = torch.randn(1, 2, 20, 5)
    chosen = routing.select(r, q, k, _ctx(20, 20)).chosen[0, 0]
    assert chosen.tolist() == [[b < min(a, 2) for b in range(5)] for a in range(5)]
    assert torch.equal(routing.select(r, q, k, _ctx(20, 20)).blocks(2)[0, 0, :2], torch.tensor([[-1, -1], [0, -1]]))


def test_gqa_heads_add_scores_and_only_route_heads_vote():
    r = prim("route", 1, block=2)
    q = torch.tensor([1.0, 1.0, -3.0, -3.0]).view(1, 2, 2, 1)
    k = torch.tensor([1.0, 1.0, -1.0, -1.0]).view(1, 1, 4, 1)
    assert routing.select(r, q, k, _ctx(2, 4)).chosen[0, 0].tolist() == [[False, True]]
    assert routing.select(r, q, k, _ctx(2, 4), heads=(0,)).chosen[0, 0].tolist() == [[True, False]]
    pir = patterndsl.compile("pattern p { heads 1..2: causal\n route(1, block = 2) }").ir
    assert routing.voters(pir, 2) == {pir.default: (0,)}


@pytest.mark.parametrize(
    "among,Lq,Lk,layout,qblock,block",
    [
        ("causal - blocks(8)", 64, 64, None, 1, 8),
        ("causal - window(5)", 40, 70, None, 3, 6),
        ("window(9, 2) | sink(3)", 50, 37, None, 4, 5),
        ("~blocks(4) & causal", 33, 33, None, 2, 4),
        ("neighborhood((3, 5))", 48, 48, {"y": 6, "x": 8}, (2, 4), (3, 2)),
        ("where(h % 2 == 0 and k <= q) | sink(1)", 30, 30, None, 5, 3),
    ],
)
def test_candidates_from_the_plan_equal_the_dense_rule(among, Lq, Lk, layout, qblock, block):
    lay = "" if layout is None else "layout grid(" + ", ".join(f"{a} = {n}" for a, n in layout.items()) + ")\n"
    src = f"pattern p {{ {lay}route(1, block = {block}, qblock = {qblock}, among = {among}) }}"
    r = patterndsl.compile(src).ir.default
    ctx = _ctx(Lq, Lk, layout)
    heads = (0, 1, 2, 3)
    got = routing.candidates(r, ctx, heads, 2, 2)
    n_q, n_k, qgroup, kblock = semantics.route_blocks(r, ctx)
    want = semantics._candidates(r.arg("among"), qgroup, kblock, n_q, n_k, ctx, heads, 2, 2)
    assert torch.equal(got.expand_as(want), want)


def test_candidates_never_evaluate_an_lq_by_lk_tensor(monkeypatch):
    seen = []
    real = semantics.evaluate

    def spy(node, i, j, *args, **kwargs):
        seen.append(torch.broadcast_shapes(torch.as_tensor(i).shape, torch.as_tensor(j).shape).numel())
        return real(node, i, j, *args, **kwargs)

    monkeypatch.setattr(semantics, "evaluate", spy)
    r = patterndsl.compile(
        "pattern p { route(2, block = 512, qblock = 1, among = causal - blocks(512) - window(100)) }"
    ).ir.default
    L = 32768
    cand = routing.candidates(r, _ctx(L, L), (0,), 1, 1)
    assert cand.shape == (1, L, 64)
    assert max(seen, default=0) < L * L // 64


def test_fast_top_k_equals_the_reference_top_k():
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        n_k = int(torch.randint(1, 9, (1,), generator=gen))
        topk = int(torch.randint(1, 10, (1,), generator=gen))
        scores = torch.randint(-2, 3, (3, 5, n_k), generator=gen).float()
        u = torch.rand(scores.shape, generator=gen)
        scores[u < 0.1] = float("-inf")
        scores[(u >= 0.1) & (u < 0.15)] = float("inf")
        scores[(u >= 0.15) & (u < 0.25)] = -0.0
        cand = torch.rand(1, 5, n_k, generator=gen) < 0.7
        assert torch.equal(routing.top(scores, cand, topk), semantics.route_top(scores, cand, topk))


MERGE_CASES = [
    ("causal & (blocks(8) | route(topk = 2, block = 8, qblock = 1, among = causal - blocks(8)))", 48, 48, (8, 8)),
    (
        "causal & (window(5) | route(2, block = 6, score = landmark, qblock = 1, among = causal - window(5)))",
        30,
        41,
        (4, 8),
    ),
    ("window(6, 6) - route(1, block = 4, qblock = 3)", 30, 30, (8, 4)),
    (
        "causal & (route(1, block = 4, among = causal) | route(1, block = 6, score = max, among = causal))",
        30,
        30,
        (8, 8),
    ),
]


@pytest.mark.parametrize("body,Lq,Lk,block", MERGE_CASES, ids=[c[0][:40] for c in MERGE_CASES])
def test_merged_tile_states_bound_the_reference(body, Lq, Lk, block):
    p = patterndsl.compile(f"pattern p {{ {body} }}")
    plan = plans.build(p.ir, Lq, Lk, 2, block, "identity")
    dp = dynamic.dynamic_plan(plan)
    gen = torch.Generator().manual_seed(Lq)
    q, k = torch.randn(2, 2, Lq, 4, generator=gen), torch.randn(2, 1, Lk, 4, generator=gen)
    selections = dynamic.select_all(dp, q, k)
    ref = tile_reduce(p.mask(Lq, Lk, 2, q=q, k=k), *block)  # [B, H, nqt, nkt]
    nkt = plan.n_kv_tiles
    (dg,) = [g for g in dp.groups if g is not None]
    states = [dynamic.route_states(dp.routes[r], selections[r], dg.dyn_keys, nkt) for r in dg.routes]
    run = dynamic.merge(dg, states)
    m, n = dg.dyn_keys // nkt, dg.dyn_keys % nkt
    for b, h in itertools.product(range(2), range(2)):
        want, got = ref[b, h, m, n], run[b, 0]
        assert bool(((got == EMPTY) <= (want == EMPTY)).all())  # empty only when really empty
        assert bool(((got == FULL) <= (want == FULL)).all())
        assert bool(((want != EMPTY) <= (got != EMPTY)).all())  # every non-empty tile is visited
        if len(dg.routes) == 1:
            # One route, all decided: exact.
            decided = states[0][b, 0] != 1
            assert torch.equal(got[decided], want[decided])
    # The static tiles are exact whatever the data.
    rows = torch.repeat_interleave(torch.arange(plan.n_q_tiles), torch.diff(dynamic.static_lists(dg, plan)[0]))
    assert torch.equal(ref[:, :, rows, dg.static_keys % nkt], dg.static_state.expand(2, 2, -1).to(ref.dtype))
