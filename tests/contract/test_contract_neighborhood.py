"""Contract sections 2 and 6: neighborhood(size, dilation, stride, causal) against a hand-written section 6 rule."""

from __future__ import annotations

import math

import pytest
import torch

import patterndsl
from tests.contract import oracle as o


def layout(extents):
    names = ["t", "y", "x"][-len(extents) :]
    return "layout grid(" + ", ".join(f"{n} = {e}" for n, e in zip(names, extents, strict=True)) + ")"


def lit(v):
    if isinstance(v, tuple):
        return "(" + ", ".join(lit(x) for x in v) + ")"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def na_pattern(extents, size, dilation=1, stride=1, is_causal=False):
    src = (
        f"pattern p {{\n {layout(extents)}\n neighborhood({lit(size)}, dilation = {lit(dilation)}, "
        f"stride = {lit(stride)}, causal = {lit(is_causal)})\n}}"
    )
    return patterndsl.compile(src)


CASES = [
    # 1-D: odd/even sizes, dilation, stride, causal
    ((9,), 3, 1, 1, False),
    ((9,), 4, 1, 1, False),
    ((10,), 5, 1, 1, False),
    ((10,), 2, 1, 1, False),
    ((11,), 3, 2, 1, False),
    ((11,), 4, 2, 1, False),
    ((12,), 3, 3, 1, False),
    ((12,), 3, 1, 2, False),
    ((13,), 4, 1, 3, False),
    ((13,), 3, 2, 2, False),
    ((9,), 3, 1, 1, True),
    ((10,), 4, 1, 1, True),
    ((11,), 3, 2, 1, True),
    ((12,), 3, 1, 2, True),
    ((13,), 3, 2, 3, True),
    ((7,), 7, 1, 1, False),
    ((7,), 1, 1, 1, False),
    # 2-D
    ((5, 6), 3, 1, 1, False),
    ((6, 5), (3, 4), (1, 1), (1, 1), False),
    ((6, 7), (3, 3), (2, 1), (1, 2), False),
    ((7, 6), (4, 3), (1, 2), (2, 1), (True, False)),
    ((5, 8), (2, 3), (2, 2), (1, 3), (False, True)),
    # 3-D
    ((3, 4, 5), (2, 3, 3), 1, 1, (True, False, False)),
    ((4, 4, 6), (3, 3, 2), (1, 1, 2), (2, 1, 1), False),
    ((3, 6, 4), 3, (1, 2, 1), (1, 1, 2), (False, False, True)),
]


@pytest.mark.parametrize("extents,size,dilation,stride,is_causal", CASES)
def test_neighborhood_matches_section_6(extents, size, dilation, stride, is_causal):
    got = na_pattern(extents, size, dilation, stride, is_causal).mask(math.prod(extents))
    want = o.neighborhood_mask(extents, size, dilation, stride, is_causal)
    assert torch.equal(got, want)


@pytest.mark.parametrize("n,s,d,r", [(9, 3, 1, 1), (10, 4, 1, 1), (11, 4, 2, 1), (12, 5, 1, 2), (13, 3, 3, 3)])
def test_noncausal_sees_exactly_size_keys(n, s, d, r):
    m = na_pattern((n,), s, d, r).mask(n)[0]
    assert m.sum(-1).tolist() == [s] * n


def test_2d_noncausal_sees_product_of_sizes():
    m = na_pattern((6, 7), (3, 5), (2, 1)).mask(42)[0]
    assert m.sum(-1).tolist() == [15] * 42


def test_border_window_is_shifted_not_truncated():
    m = na_pattern((8,), 3).mask(8)[0]
    assert torch.nonzero(m[0]).flatten().tolist() == [0, 1, 2]
    assert torch.nonzero(m[7]).flatten().tolist() == [5, 6, 7]
    assert torch.nonzero(m[4]).flatten().tolist() == [3, 4, 5]


def test_even_size_has_one_more_key_on_the_left():
    m = na_pattern((10,), 4).mask(10)[0]
    assert torch.nonzero(m[5]).flatten().tolist() == [3, 4, 5, 6]


def test_causal_window_ends_at_query():
    m = na_pattern((10,), 3, is_causal=True).mask(10)[0]
    for x in range(10):
        assert torch.nonzero(m[x]).flatten().tolist() == list(range(max(0, x - 2), x + 1))


def test_dilation_groups_are_separate():
    m = na_pattern((12,), 3, 3).mask(12)[0]
    for x in range(12):
        assert all(y % 3 == x % 3 for y in torch.nonzero(m[x]).flatten().tolist())


def test_stride_queries_in_one_group_share_window():
    m = na_pattern((12,), 3, 1, 3).mask(12)[0]
    for x in range(0, 12, 3):
        assert torch.equal(m[x], m[x + 1]) and torch.equal(m[x], m[x + 2])


@pytest.mark.parametrize(
    "extents,size,dilation",
    [((5,), 6, 1), ((9,), 5, 2), ((10,), 4, 3), ((4, 6), (5, 3), 1), ((4, 6), 3, (1, 3))],
)
def test_size_larger_than_group_is_an_error(extents, size, dilation):
    # size > m for some dilation group: a user error, reported as a PatternError (at compile or at use).
    def run():
        na_pattern(extents, size, dilation).mask(math.prod(extents))

    o.expect_pattern_error(run)


def test_neighborhood_without_layout_is_an_error():
    o.expect_pattern_error(lambda: patterndsl.compile("pattern p { neighborhood(3) }"), "layout")


def test_neighborhood_tuple_of_wrong_length_is_an_error():
    o.expect_pattern_error(
        lambda: patterndsl.compile("pattern p { layout grid(y = 4, x = 4)\n neighborhood((3, 3, 3)) }")
    )


def test_neighborhood_combines_with_other_patterns():
    p = patterndsl.compile("pattern p { layout grid(y = 4, x = 5)\n neighborhood(3) & causal | sink(2) }")
    na = o.neighborhood_mask((4, 5), 3)
    want = (na & o.to_mask(lambda q, k, *_: o.causal(q, k), 20)) | o.to_mask(lambda q, k, *_: o.sink(q, k, 2), 20)
    assert torch.equal(p.mask(20), want)
