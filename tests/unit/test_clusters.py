"""``cluster(...)`` and ``lsh(...)``: language, checks and the reference mask against tests/clusters_reference.py."""

from __future__ import annotations

import pytest
import torch

import patterndsl as pd
from patterndsl.analysis import clusterplan
from patterndsl.errors import InputError, PatternError, PatternTypeError, PatternValueError
from patterndsl.primitives import clusters
from tests.clusters_reference import content_mask, planes
from tests.reference import reference_attention

ROUTING = """
pattern routing(n = 4, w = 0) {
    input C: float[n, dim]
    causal & (window(2) | cluster(C, balanced = w))
}
pattern per_head(n = 3) {
    input C: float[head, n, dim]
    cluster(C)
}
pattern hashed(bits = 3, seed = 0) {
    causal & (sink(1) | lsh(bits, seed = seed))
}
pattern negated(n = 3) {
    input C: float[n, dim]
    window(4, 4) - cluster(C)
}
pattern mixed(n = 3) {
    input C: float[n, dim]
    heads 0..1: window(1)
    heads 1..2: cluster(C, balanced = 4) | lsh(2)
}
"""


def _data(batch=2, heads=2, kv_heads=1, lq=11, lk=11, dim=4, seed=0, dup=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, lq, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, lk, dim, generator=g, dtype=torch.float64)
    if dup:  # ties: duplicated vectors (queries equal to keys, repeated tokens)
        q[:, :, 1::3] = q[:, :, 0:1]
        k[:, :, : min(lq, lk) // 2] = q[:, :1, : min(lq, lk) // 2]
        k[:, :, -1] = 0.0  # a zero vector scores 0 everywhere
    return q, k, g


CASES = [
    ("routing", {}, dict()),
    ("routing", {"w": 3}, dict()),
    ("routing", {"w": 20}, dict(lq=7, lk=12)),
    ("per_head", {}, dict(heads=4, kv_heads=2)),
    ("hashed", {"seed": 7}, dict(lq=9, lk=13)),
    ("negated", {}, dict(dup=True)),
    ("mixed", {}, dict(kv_heads=2, dup=True)),
    ("routing", {"w": 2}, dict(dup=True, heads=2, kv_heads=2)),
]


@pytest.mark.parametrize(("name", "params", "sizes"), CASES)
def test_mask_matches_the_contract_reference(name, params, sizes):
    p = pd.compile(ROUTING, name, **params)
    q, k, g = _data(**sizes)
    inputs = {}
    if p.ir.inputs:
        decl = p.ir.inputs[0]
        n = p.params["n"]
        shape = (q.shape[1], n, q.shape[3]) if "head" in decl.dims else (n, q.shape[3])
        c = torch.randn(*shape, generator=g, dtype=torch.float64)
        if sizes.get("dup"):
            c[..., 1, :] = c[..., 0, :]  # two equal centroids: ties to the lower index
        inputs["C"] = c
    got = p.mask(q.shape[2], k.shape[2], q.shape[1], q=q, k=k, **inputs)
    assert torch.equal(got, content_mask(p.ir, q, k, **inputs))


def test_hyperplanes_follow_the_documented_generator():
    for seed, head, dim, bits in [(0, 0, 4, 3), (5, 2, 8, 2), (-3, 1, 3, 1)]:
        got = clusters.hyperplanes(seed, head, dim, bits)
        assert torch.equal(got, torch.tensor(planes(seed, head, dim, bits), dtype=torch.float64))
    # More bits only add planes.
    assert torch.equal(clusters.hyperplanes(1, 0, 4, 5)[:2], clusters.hyperplanes(1, 0, 4, 2))


def test_labels_carry_no_gradient_and_are_float32_at_least():
    p = pd.compile(ROUTING, "routing")
    q = torch.randn(1, 1, 6, 4, dtype=torch.float16, requires_grad=True)
    k = torch.randn(1, 1, 6, 4, dtype=torch.float16)
    prim = next(s for s in p.ir.nodes()[0].items[1].items if s.name == "cluster")
    c = torch.randn(4, 4)
    bound = pd.binding.bind(p.ir, {"C": c}, 6, 1)
    lab = clusters.labels(prim, q, k, bound)
    assert not lab.q.requires_grad and lab.q.dtype == torch.int64
    ref = clusters.labels(prim, q.float(), k.float(), bound)
    assert torch.equal(lab.q, ref.q) and torch.equal(lab.k, ref.k)


def test_errors_are_located():
    with pytest.raises(PatternTypeError, match="float\\[n, dim\\]") as e:
        pd.compile("pattern t { input C: int[4, dim]\n cluster(C) }")
    assert e.value.span is not None and e.value.span.line == 2
    with pytest.raises(PatternTypeError, match="'cent' is not an input \\(did you mean 'cents'"):
        pd.compile("pattern t { input cents: float[4, dim]\n cluster(cent) }")
    with pytest.raises(PatternTypeError, match="float\\[n, dim\\]"):
        pd.compile("pattern t { input C: float[token, dim]\n cluster(C) }")
    with pytest.raises(PatternValueError, match="balanced must be >= 0") as e:
        pd.compile("pattern t { input C: float[4, dim]\n cluster(C, balanced = -1) }")
    assert e.value.span.column > 1
    with pytest.raises(PatternValueError, match="lsh bits must be between 1 and 62"):
        pd.compile("pattern t { lsh(0) }")
    with pytest.raises(PatternError, match="pass q= and k="):
        pd.compile("pattern t { causal & lsh(2) }").mask(8)
    p = pd.compile(ROUTING, "routing")
    q, k, _ = _data()
    with pytest.raises(InputError, match="head size is 4"):
        p.mask(11, 11, 2, q=q, k=k, C=torch.randn(4, 5))
    with pytest.raises(InputError, match="'C'"):
        p.mask(11, 11, 2, q=q, k=k)


def test_static_plan_marks_tiles_labels_can_reach():
    p = pd.compile(ROUTING, "routing")
    tiles = p.plan(16, block=(4, 4)).tiles()
    # Below the diagonal band only the cluster reaches (3); above causal nothing; the diagonal is exact.
    assert (tiles[0].triu(1) == 0).all()
    below = torch.ones(4, 4, dtype=torch.bool).tril(-1)
    assert (tiles[0][below] == 3).all()
    assert (tiles[0].diagonal() == 1).all()
    assert p.plan(16, block=(4, 4), order="identity").tiles().eq(3).sum() > 0
    # Centroids alone do not give labels (Q and K do): the plan with them keeps its 3 tiles, after checking them.
    assert torch.equal(p.plan(16, block=(4, 4), C=torch.randn(4, 4)).tiles(), tiles[None])
    with pytest.raises(InputError, match="'C'"):
        p.plan(16, block=(4, 4), C=torch.randn(3, 4))


def test_roundtrip_printing():
    for name in ("routing", "hashed", "mixed"):
        p = pd.compile(ROUTING, name)
        again = pd.compile(str(p))
        assert again.ir == p.ir


# --------------------------------------------------------------------------- call-time plan and attention


def _inputs_for(p, q, g, dup=False):
    if not p.ir.inputs:
        return {}
    decl = p.ir.inputs[0]
    n = p.params["n"]
    shape = (q.shape[1], n, q.shape[3]) if "head" in decl.dims else (n, q.shape[3])
    c = torch.randn(*shape, generator=g, dtype=torch.float64)
    if dup:
        c[..., 1, :] = c[..., 0, :]
    return {"C": c}


def test_split_keeps_the_window_in_order_and_sorts_the_rest():
    p = pd.compile(ROUTING, "routing")
    split = clusterplan.split(p.ir, 2)
    assert split.static.default == pd.compile("pattern s { causal & window(2) }").ir.default
    (part,) = split.parts
    assert part.prim.name == "cluster" and (part.lo, part.hi) == (0, 2)
    assert part.pred == pd.compile("pattern s { causal - window(2) }").ir.default
    alone = clusterplan.split(pd.compile(ROUTING, "per_head").ir, 3)
    assert alone.static is None and alone.parts[0].pred is None


@pytest.mark.parametrize("balanced", [False, True])
def test_sorted_plan_ranges_hold_every_pair_with_equal_labels(balanced):
    g = torch.Generator().manual_seed(3)
    if balanced:
        ql = torch.rand(2, 37, 5, generator=g) < 0.3
        kl = torch.rand(2, 29, 5, generator=g) < 0.3
        # Memberships of a balanced rule: every cluster holds the same number of tokens.
        ql[:, :, :] = False
        kl[:, :, :] = False
        for c in range(5):
            ql[:, torch.randperm(37, generator=g)[:6], c] = True
            kl[:, torch.randperm(29, generator=g)[:4], c] = True
    else:
        ql, kl = torch.randint(0, 6, (2, 37), generator=g), torch.randint(0, 6, (2, 29), generator=g)
    plan = clusterplan.sorted_plan(ql, kl, balanced, (8, 8))
    assert (plan.q.label[:, 1:] >= plan.q.label[:, :-1]).all() and (plan.k.label[:, 1:] >= plan.k.label[:, :-1]).all()
    for grp in range(2):
        for e in range(plan.q.label.shape[1]):
            lab = plan.q.label[grp, e]
            m = e // 8
            inside = torch.arange(plan.k.label.shape[1])
            inside = (inside >= plan.start[grp, m]) & (inside < plan.stop[grp, m])
            assert ((plan.k.label[grp] == lab) <= inside).all()
        # Stable: equal labels keep the order of positions.
        same = plan.q.label[grp, 1:] == plan.q.label[grp, :-1]
        assert (plan.q.index[grp, 1:][same] > plan.q.index[grp, :-1][same]).all()
    if not balanced:
        assert plan.stats()["efficiency"] >= clusterplan.unsorted_efficiency(ql, kl, (8, 8))["efficiency"]
        # Visited pairs, counted tile by tile from the dense picture of the sorted order.
        visited = 0
        for grp in range(2):
            same = plan.q.label[grp][:, None] == plan.k.label[grp][None, :]
            for m in range(plan.start.shape[1]):
                for n in range(-(-29 // 8)):
                    tile = same[m * 8 : (m + 1) * 8, n * 8 : (n + 1) * 8]
                    lo, hi = int(plan.start[grp, m]), int(plan.stop[grp, m])
                    if hi > lo and n * 8 < hi and (n + 1) * 8 > lo:
                        visited += tile.numel()
                    else:
                        assert not tile.any()
        stats = plan.stats()
        assert stats["visited"] == visited and stats["allowed"] == int(
            sum((plan.q.label[x][:, None] == plan.k.label[x][None, :]).sum() for x in range(2))
        )


def _grads(out, lse, tensors, seed=0):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    gl = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    loss = (out.double() * go).sum() + (torch.where(torch.isinf(lse), 0.0, lse.double()) * gl).sum()
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize(("name", "params", "sizes"), CASES)
def test_attention_matches_the_reference(name, params, sizes):
    p = pd.compile(ROUTING, name, **params)
    q, k, g = _data(**sizes)
    v = torch.randn(k.shape, generator=g, dtype=torch.float64)
    inputs = _inputs_for(p, q, g, sizes.get("dup", False))
    mask = content_mask(p.ir, q, k, **inputs)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = p(q, k, v, return_lse=True, **inputs)
    ref_out, ref_lse = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(lse[~torch.isinf(lse)], ref_lse[~torch.isinf(ref_lse)], rtol=1e-10, atol=1e-10)
    for a, b in zip(_grads(out, lse, (q, k, v)), _grads(ref_out, ref_lse, (q, k, v)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_attention_float32_and_value_head_size():
    p = pd.compile(ROUTING, "routing", w=3)
    q, k, g = _data(heads=4, kv_heads=2, lq=20, lk=33)
    v = torch.randn(2, 2, 33, 6, generator=g, dtype=torch.float64)
    c = torch.randn(4, 4, generator=g, dtype=torch.float64)
    mask = content_mask(p.ir, q, k, C=c)
    out, lse = p(q.float(), k.float(), v.float(), return_lse=True, C=c.float())
    ref_out, _ = reference_attention(q, k, v, mask)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and out.shape == (2, 4, 20, 6)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)


def test_attention_runs_route_beside_lsh_in_one_rule_and_apart():
    # Negated and mixed rules run in CASES; tests/unit/test_clusters_compose.py has every composition.
    q, k, _ = _data(dup=True)
    routed = pd.compile("pattern t { causal & (route(2, block = 4) | lsh(2)) }")
    out, lse = routed(q, k, k, return_lse=True)
    ref, ref_lse = reference_attention(q, k, k, routed.mask(11, 11, 2, q=q, k=k))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    # Apart, in their own head rules, they run (route in the static part, lsh sorted).
    apart = pd.compile("pattern t { heads 0..1: causal & route(1, block = 4)\n heads 1..2: causal & lsh(2) }")
    out, lse = apart(q, k, k, return_lse=True)
    ref, ref_lse = reference_attention(q, k, k, apart.mask(11, 11, 2, q=q, k=k))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


# --------------------------------------------------------------------------- helpers and the example


def test_update_centroids_is_the_ema_of_normalised_members():
    g = torch.Generator().manual_seed(5)
    c = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    x = torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64)
    lab = torch.tensor([[[0, 0, 1, 1, 1, 0, 0, 1, 0], [2, 2, 2, 2, 2, 2, 2, 2, 0]]])
    got = pd.update_centroids(c, x, lab, 0.75)
    shared = pd.update_centroids(c[0], x[0, 0], lab[0, 0], 0.5)
    for h in range(2):
        for j in range(3):
            members = [x[0, h, t] / x[0, h, t].norm() for t in range(9) if lab[0, h, t] == j]
            mean = torch.stack(members).mean(0) if members else None
            torch.testing.assert_close(got[h, j], c[h, j] if not members else 0.75 * c[h, j] + 0.25 * mean)
            if h == 0:
                torch.testing.assert_close(shared[j], c[0, j] if not members else 0.5 * c[0, j] + 0.5 * mean)
    with pytest.raises(InputError, match="decay"):
        pd.update_centroids(c, x, lab, 1.5)
    with pytest.raises(InputError, match="labels must lie"):
        pd.update_centroids(c, x, lab + 1, 0.5)


def test_routing_transformer_example_and_labels_helper():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "routing_transformer.pdsl"
    p = pd.load(path, nheads=4, span=3, n=3)
    q, k, g = _data(heads=4, kv_heads=2, lq=10, lk=10)
    c = torch.randn(4, 3, 4, generator=g, dtype=torch.float64)
    mask = p.mask(10, 10, 4, q=q, k=k, centroids=c)
    assert torch.equal(mask, content_mask(p.ir, q, k, centroids=c))
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    assert torch.equal(mask[:, :2], ((j <= i) & (i - j <= 3)).expand(2, 2, 10, 10))
    lab = pd.cluster_labels(p, q, k, centroids=c)
    assert lab.q.shape == (2, 4, 10) and torch.equal(
        mask[:, 2:], (lab.q[:, 2:, :, None] == lab.k[:, 2:, None]) & (j <= i)
    )


def test_the_merge_of_the_passes_is_exact_and_finite_on_rows_nothing_allows():
    # A static pass (window & sink) and a call-time pass (lsh above the diagonal): the last rows get nothing.
    p = pd.compile("pattern t { (window(1) & sink(1)) | (lsh(2) - causal) }")
    q, k, g = _data(dup=True)
    v = torch.randn(k.shape, generator=g, dtype=torch.float64)
    mask = p.mask(11, 11, 2, q=q, k=k)
    assert not mask[..., -1, :].any() and mask[..., 0, :].any()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = p(*leaves, return_lse=True)
    ref, ref_lse = reference_attention(*leaves, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and (out[..., -1, :] == 0).all()
    grads = _grads(out, lse, leaves)
    assert all(torch.isfinite(t).all() for t in grads)
    for a, b in zip(grads, _grads(ref, ref_lse, leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
