"""Connectivity of stacked layers: the contracted-graph answer equals brute-force boolean matrix powers."""

from __future__ import annotations

import pytest
import torch

import patterndsl as pd
from patterndsl import analysis
from patterndsl.errors import PatternError


def brute(mask: torch.Tensor, max_layers: int = 200):
    """Smallest n with (I + M)^n covering every required pair, by dense powers (small sizes only)."""
    n = mask.shape[0]
    causal = not bool(torch.triu(mask, 1).any())
    required = torch.tril(torch.ones(n, n, dtype=torch.bool)) if causal else torch.ones(n, n, dtype=torch.bool)
    step = (mask | torch.eye(n, dtype=torch.bool)).to(torch.float64)
    reach = torch.eye(n, dtype=torch.float64)
    for layers in range(1, max_layers + 1):
        reach = ((step @ reach) > 0).to(torch.float64)
        if bool((reach > 0)[required].all()):
            return causal, layers
    return causal, None


BODIES = [
    "causal & window(3)",
    "window(2, 2)",
    "causal & (window(4) | strided(5))",
    "causal & (blocks(6) | summary(6))",
    "causal & (sink(1) | window(2))",
    "blocks(4)",
    "strided(3)",
    "global(2) | window(1, 1)",
    "causal & window(2, dilation = 3)",
    "causal & (random(2, 4, seed = 1) | window(1))",
    "layout grid(y = 6, x = 6)\n neighborhood(3)",
]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("length", [1, 7, 30])
def test_matches_matrix_powers(body, length):
    if "grid" in body and length != 36:
        length = 36
    p = pd.compile(f"pattern t {{ {body} }}")
    causal, want = brute(p.mask(length)[0])
    for layers in (1, 3, 40):
        r = analysis.reachability(p.ir, length, layers=layers, block=(4, 4))
        assert r.causal == causal
        assert r.min_layers == want
        assert r.reaches == (want is not None and want <= layers)
        if r.tile_lower_bound is not None and want is not None:
            assert r.tile_lower_bound <= want
    assert "layers" in r.text()


def test_sparse_transformer_style_two_layers():
    # strided + local: every query reaches every earlier key in two layers (Child et al. 2019)
    p = pd.compile("pattern s(n = 8) { causal & (window(n - 1) | strided(n)) }")
    r = analysis.reachability(p.ir, 64, layers=2)
    assert r.reaches and r.min_layers == 2


def test_errors():
    p = pd.compile("pattern t { causal }")
    with pytest.raises(PatternError):
        analysis.reachability(p.ir, 10, layers=0)
    dyn = pd.compile("pattern d { route(topk = 1, block = 4) }")
    with pytest.raises(PatternError):
        analysis.reachability(dyn.ir, 16, layers=2)
