"""``cluster(...)`` and ``lsh(...)``: language, checks and the reference mask against tests/clusters_reference.py."""

from __future__ import annotations

import pytest
import torch

import patterndsl as pd
from patterndsl.errors import InputError, PatternError, PatternTypeError, PatternValueError
from patterndsl.primitives import clusters
from tests.clusters_reference import content_mask, planes

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


def test_roundtrip_printing():
    for name in ("routing", "hashed", "mixed"):
        p = pd.compile(ROUTING, name)
        again = pd.compile(str(p))
        assert again.ir == p.ir
