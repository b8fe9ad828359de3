"""Property tests of ``cluster``/``lsh`` on random data: masks, outputs, lse and gradients vs float64 references.

Random compositions (causal, windows, sinks, blocks, global, per-head rules) around one content
primitive (both label rules, balanced or not, per-head or shared centroids), random ``Lq != Lk``,
grouped-query heads and ties forced by duplicated vectors and centroids. The mask is compared with
the contract oracle (tests/clusters_reference.py), the attention with dense float64 attention over
that mask. Fixed seeds: a few by default, more under ``slow``.
"""

from __future__ import annotations

import random

import pytest
import torch

import patterndsl as pd
from tests.clusters_reference import content_mask
from tests.reference import reference_attention

BODIES = [
    "{x}",
    "causal & {x}",
    "causal & (window({w}) | {x})",
    "{x} | sink({s})",
    "global({s}) | (causal & {x})",
    "(blocks({b}) & {x}) | window({w}, {w})",
    "causal & ({x} | strided({b}))",
]


def _case(seed: int):
    rnd = random.Random(seed)
    heads_kv = rnd.choice([1, 2])
    heads = heads_kv * rnd.choice([1, 2])
    dim = rnd.choice([4, 8])
    lk = rnd.randint(5, 26)
    lq = rnd.choice([lk, rnd.randint(3, lk)])
    n = rnd.randint(1, 5)
    kind = rnd.choice(["cluster", "balanced", "lsh"])
    per_head = rnd.random() < 0.5
    if kind == "lsh":
        x = f"lsh({rnd.randint(1, 4)}, seed = {rnd.randint(0, 9)})"
    else:
        x = "cluster(C)" if kind == "cluster" else f"cluster(C, balanced = {rnd.randint(1, 8)})"
    body = rnd.choice(BODIES).format(x=x, w=rnd.randint(0, 4), s=rnd.randint(1, 3), b=rnd.randint(2, 5))
    decl = "" if kind == "lsh" else f"input C: float[{'head, ' if per_head else ''}{n}, dim]\n"
    split = heads > 1 and rnd.random() < 0.3
    rule = f"heads 0..1: causal & window(2)\nheads 1..{heads}: {body}" if split else body
    source = f"pattern p {{\n{decl}{rule}\n}}"
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, lq, dim, generator=g, dtype=torch.float64)
    k = torch.randn(2, heads_kv, lk, dim, generator=g, dtype=torch.float64)
    v = torch.randn(2, heads_kv, lk, dim, generator=g, dtype=torch.float64)
    inputs = {}
    if kind != "lsh":
        c = torch.randn(*((heads,) if per_head else ()), n, dim, generator=g, dtype=torch.float64)
        if n > 1 and rnd.random() < 0.5:
            c[..., -1, :] = c[..., 0, :]
        inputs["C"] = c
    if rnd.random() < 0.5:  # ties: repeated tokens and keys equal to queries
        q[:, :, 1::2] = q[:, :, :1]
        m = min(lq, lk)
        k[:, :, :m] = q[:, :heads_kv, :m]
    return source, q, k, v, inputs


def _check(seed: int):
    source, q, k, v, inputs = _case(seed)
    p = pd.compile(source)
    heads, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    mask = p.mask(lq, lk, heads, q=q, k=k, **inputs)
    assert torch.equal(mask, content_mask(p.ir, q, k, **inputs)), source
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = p(q, k, v, return_lse=True, **inputs)
    ref_out, ref_lse = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9, msg=source)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), source
    finite = ~torch.isinf(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-9, atol=1e-9, msg=source)
    g = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    gl = torch.randn(lse.shape, generator=g, dtype=torch.float64) * finite

    def loss(o, lse_):
        return (o * go).sum() + (torch.where(finite, lse_, 0.0) * gl).sum()

    ours = torch.autograd.grad(loss(out, lse), (q, k, v))
    ref = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=source)


@pytest.mark.parametrize("seed", range(3))
def test_random_compositions(seed):
    _check(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 25))
def test_random_compositions_more(seed):
    _check(seed)
