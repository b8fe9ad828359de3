"""neighborhood(...): LANGUAGE.md section 6 against brute force and against NATTEN's own formulation.

NATTEN (SHI-Labs/NATTEN, ``backends/flex.py``, ``get_na_flex_mask``) states the
rule with a "corrected" group length ``n // d + 1 - ((g + d - n % d) // d)`` and
the window test ``0 <= c - t <= left or 0 <= t - c <= right``; the older CUDA/CPU
kernels use ``get_window_start``. Both are restated here in our own words as
independent oracles, together with the facts the language promises (exactly
``size`` keys per axis, windows shifted inward at borders, dilation groups,
shared windows within a stride group, causal windows ending at the query).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from patterndsl import semantics
from tests.brute import brute_mask, neighborhood_1d, pattern, prim


def natten_flex_axis(x, y, n, s, d, r, causal):
    """NATTEN's flex-attention mask on one axis, restated."""
    g = x % d
    if y % d != g:
        return False
    p, t = x // d, y // d
    m = n // d + 1 - ((g + (d - n % d)) // d)
    if causal:
        leader = min((p // r) * r + r - 1, m - 1)
        return p - t >= 0 and leader - t < s
    left, right = s // 2, s // 2 + (s % 2 - 1)
    leader = min((p // r) * r + r // 2, m - 1)
    centre = min(max(leader, left), m - 1 - right)
    return 0 <= centre - t <= left or 0 <= t - centre <= right


def natten_window_start(x, n, s):
    """NATTEN's classic ``get_window_start`` for dilation 1 and odd kernel ``s``."""
    half = s // 2
    return max(x - half, 0) + (n - x - half - 1 if x + half >= n else 0)


def axis_configs():
    for n in (5, 8, 13):
        for s, d, r, causal in itertools.product((1, 2, 3, 4, 5), (1, 2, 3), (1, 2, 3), (False, True)):
            if s * d <= n and r <= s:  # NATTEN's validity rules: s * d <= n, stride <= size
                yield n, s, d, r, causal


AXIS = list(axis_configs())


def axis_mask(n, s, d, r, causal):
    x = torch.arange(n)[:, None]
    y = torch.arange(n)[None, :]
    return semantics.neighborhood_axis(x, y, n, s, d, r, causal)


@pytest.mark.parametrize("n,s,d,r,causal", AXIS)
def test_axis_rule_matches_section_6_and_natten(n, s, d, r, causal):
    got = axis_mask(n, s, d, r, causal).tolist()
    assert got == [[neighborhood_1d(x, y, n, s, d, r, causal) for y in range(n)] for x in range(n)]
    assert got == [[natten_flex_axis(x, y, n, s, d, r, causal) for y in range(n)] for x in range(n)]


@pytest.mark.parametrize("n,s,d,r", sorted({c[:4] for c in AXIS}))
def test_non_causal_sees_exactly_size_keys(n, s, d, r):
    m = axis_mask(n, s, d, r, False)
    assert (m.sum(1) == s).all()


@pytest.mark.parametrize("n", [5, 8, 13])
@pytest.mark.parametrize("s", [1, 3, 5])
def test_window_shifted_inward_as_natten_get_window_start(n, s):
    m = axis_mask(n, s, 1, 1, False)
    for x in range(n):
        start = natten_window_start(x, n, s)
        expected = [start <= y < start + s for y in range(n)]
        assert m[x].tolist() == expected
        if s // 2 <= x < n - s // 2:
            assert start == x - s // 2  # interior: centred on the query


@pytest.mark.parametrize("n,s,d,r,causal", [c for c in AXIS if c[2] > 1])
def test_dilation_groups_run_their_own_neighborhood(n, s, d, r, causal):
    m = axis_mask(n, s, d, r, causal)
    for g in range(d):
        members = torch.arange(g, n, d)
        sub = m[members][:, members]
        assert torch.equal(sub, axis_mask(len(members), s, 1, r, causal))
        others = torch.tensor([y for y in range(n) if y % d != g], dtype=torch.long)
        if len(others):
            assert not m[members][:, others].any()


@pytest.mark.parametrize("n,s,d,r", sorted({c[:4] for c in AXIS if c[3] > 1}))
def test_stride_group_shares_one_window(n, s, d, r):
    m = axis_mask(n, s, d, r, False)
    for x in range(n):
        for x2 in range(n):
            if x % d == x2 % d and (x // d) // r == (x2 // d) // r:
                assert torch.equal(m[x], m[x2])


@pytest.mark.parametrize("n,s,d,r", sorted({c[:4] for c in AXIS}))
def test_causal_window_ends_at_the_query(n, s, d, r):
    m = axis_mask(n, s, d, r, True)
    x = torch.arange(n)[:, None]
    y = torch.arange(n)[None, :]
    assert not (m & (y > x)).any()
    assert m.diagonal().all()
    if r == 1:
        p = torch.arange(n) // d
        assert torch.equal(m.sum(1), torch.clamp(p + 1, max=s))


GRIDS = [
    ({"x": 9}, dict(size=3)),
    ({"x": 10}, dict(size=4, dilation=2, stride=2)),
    ({"x": 10}, dict(size=(4,), causal=(True,))),
    ({"y": 5, "x": 6}, dict(size=3)),
    ({"y": 5, "x": 6}, dict(size=(2, 3), dilation=(2, 1), stride=(1, 3), causal=(False, True))),
    ({"y": 6, "x": 7}, dict(size=(3, 4), dilation=(1, 1), stride=(2, 2), causal=(True, False))),
    ({"t": 3, "y": 4, "x": 5}, dict(size=(2, 3, 3))),
    ({"t": 4, "y": 4, "x": 6}, dict(size=(2, 2, 3), dilation=(2, 1, 2), stride=(1, 2, 3), causal=(True, False, True))),
]


def grid_prim(layout, args):
    rank = len(layout)
    full = {"size": 1, "dilation": 1, "stride": 1, "causal": False} | args
    values = {k: v if isinstance(v, tuple) else (v,) * rank for k, v in full.items()}
    return prim("neighborhood", values["size"], values["dilation"], values["stride"], values["causal"])


@pytest.mark.parametrize("layout,args", GRIDS)
def test_grid_neighborhood_matches_brute_force(layout, args):
    pir = pattern(grid_prim(layout, args), layout)
    L = pir.layout.size
    got = semantics.mask(pir, L)
    assert torch.equal(got, brute_mask(pir, L))
    # the primitive is the AND over axes of the per-axis rule
    node = pir.default
    rank = len(layout)
    coords = torch.stack(semantics.grid_coords(torch.arange(L), pir.layout), 1)
    expected = torch.ones(L, L, dtype=torch.bool)
    for a in range(rank):
        n = pir.layout.shape[a]
        sizes, dils, strides, causals = (node.arg(k)[a] for k in ("size", "dilation", "stride", "causal"))
        expected &= axis_mask(n, sizes, dils, strides, causals)[coords[:, a]][:, coords[:, a]]
    assert torch.equal(got[0], expected)
    if not any(node.arg("causal")):
        total = 1
        for s in node.arg("size"):
            total *= s
        assert (got[0].sum(1) == total).all()
