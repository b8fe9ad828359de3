"""Test oracle: ``cluster``/``lsh`` labels and masks, written from ../shared/LANGUAGE.md section 2.

Independent of ``patterndsl.semantics`` and ``patterndsl.primitives.clusters`` (it never imports
them): plain Python loops in float64 over small tensors. Static primitives go through
:mod:`tests.brute`. The ``lsh`` generator is the one documented in ``docs/SEMANTICS.md``.
Comes in: a bound pattern, ``Q``, ``K`` and the centroid tensors. Goes out: a bool mask
``[batch, heads, Lq, Lk]``.
"""

from __future__ import annotations

import math

import torch

from patterndsl import ir
from tests import brute


def _unit(x):
    norm = math.sqrt(sum(float(v) ** 2 for v in x))
    return [0.0 for _ in x] if norm == 0 else [float(v) / norm for v in x]


def _dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def planes(seed, head, dim, bits):
    """The documented hyperplanes: splitmix64 from ``seed*M + head*G + dim``, Box-Muller per entry."""
    state = (seed * 0x2545F4914F6CDD1D + head * 0x9E3779B97F4A7C15 + dim) % brute.M64
    values = []
    for _ in range(bits * dim):
        state, z1 = brute.splitmix_next(state)
        state, z2 = brute.splitmix_next(state)
        u1 = ((z1 >> 11) + 1) / 2**53
        u2 = (z2 >> 11) / 2**53
        values.append(math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2))
    return [values[b * dim : (b + 1) * dim] for b in range(bits)]


def token_sets(prim, vectors, head, centroids):
    """One head's tokens: a list of label sets (a set per token), from the contract text."""
    if prim.name == "lsh":
        ps = planes(prim.kwargs["seed"], head, len(vectors[0]), prim.kwargs["bits"])
        return [{sum(1 << b for b, p in enumerate(ps) if _dot(x, p) > 0)} for x in vectors]
    cs = centroids
    sims = [[_dot(_unit(x), c) for c in cs] for x in vectors]
    w = prim.kwargs["balanced"]
    if w == 0:
        out = []
        for row in sims:
            best = max(row)
            out.append({row.index(best)})
        return out
    sets = [set() for _ in vectors]
    for c in range(len(cs)):
        ranked = sorted(range(len(vectors)), key=lambda t, c=c: (-sims[t][c], t))
        for t in ranked[:w]:
            sets[t].add(c)
    return sets


def allowed(node, q, k, h, Lq, Lk, layout, sets):
    """``brute.allowed`` with the content primitives read from ``sets[prim] = (query sets, key sets)``."""
    if isinstance(node, ir.Union):
        return any(allowed(x, q, k, h, Lq, Lk, layout, sets) for x in node.items)
    if isinstance(node, ir.Inter):
        return all(allowed(x, q, k, h, Lq, Lk, layout, sets) for x in node.items)
    if isinstance(node, ir.Not):
        return not allowed(node.item, q, k, h, Lq, Lk, layout, sets)
    if node.name in ("cluster", "lsh"):
        qs, ks = sets[node]
        return bool(qs[q - (Lk - Lq)] & ks[k])
    return brute.allowed(node, q, k, h, Lq, Lk, layout)


def content_mask(pir, q, k, **inputs):
    """Bool ``[batch, heads, Lq, Lk]``: the pattern's meaning with labels from ``q``, ``k``."""
    batch, heads, Lq, _ = q.shape
    Lk = k.shape[2]
    share = heads // k.shape[1]
    out = torch.zeros(batch, heads, Lq, Lk, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            node = pir.node_for_head(h)
            sets = {}
            for sub in ir.walk(node):
                if isinstance(sub, ir.Prim) and sub.name in ("cluster", "lsh"):
                    cs = None
                    if sub.name == "cluster":
                        c = inputs[sub.kwargs["centroids"]].double()
                        cs = (c if c.dim() == 2 else c[h]).tolist()
                    qv, kv = q[b, h].double().tolist(), k[b, h // share].double().tolist()
                    sets[sub] = (token_sets(sub, qv, h, cs), token_sets(sub, kv, h, cs))
            for i in range(Lq):
                for j in range(Lk):
                    out[b, h, i, j] = allowed(node, i + Lk - Lq, j, h, Lq, Lk, pir.layout, sets)
    return out
