"""A ``route`` block chosen for a score of ``+inf`` is not dropped by the CPU's log-sum-exp merge (issue 11).

Found by the interpreter replay ``_poisoned_cases(39, 1933961413)``: under
``route(...) | window(...)`` a key with a ``-inf`` component gave some rows a ``+inf`` score, so
``route`` chose its block for them (the reference does too). The CPU runs chosen blocks gathered and
merges each block's ``(out, lse)`` into the row (:func:`patterndsl.runtime.softmax.merge_into`); the
merge treated a part with ``lse = +inf`` like an empty one (``lse = -inf``) and kept the row's earlier
``lse``, finite, as if the whole block had never been chosen, while the Triton launcher's exact rows
(and the CPU's selecting kernels) give such a row NaN. A part with ``lse = +inf`` now makes its row
NaN, as one with ``lse = NaN`` does.
"""

from __future__ import annotations

import pytest
import torch

import patterndsl
from patterndsl.runtime import softmax
from tests.reference import reference_attention

SOURCE = "pattern p { route(topk = 2, block = 3, score = mean, among = full, qblock = 1) | window(3, 2, dilation = 4) }"
L, D, BAD_KEY, COMPONENT = 45, 8, 39, 5


def test_merge_of_a_plus_inf_part_makes_the_row_nan():
    o = torch.ones(3, 2)
    lse = torch.tensor([0.5, float("-inf"), 1.0])
    o_new = torch.tensor([[float("nan")] * 2, [2.0, 2.0], [3.0, 3.0]])
    lse_new = torch.tensor([float("inf"), float("-inf"), float("nan")])
    softmax.merge_into(o, lse, o_new, lse_new)
    assert torch.isnan(lse[0]) and torch.isnan(o[0]).all()
    assert lse[1] == float("-inf") and torch.equal(o[1], torch.zeros(2))  # nothing anywhere: 0 / -inf
    assert torch.isnan(lse[2])
    # with rows: two parts of row 0, one of them +inf
    o, lse = torch.zeros(2, 2), torch.full((2,), float("-inf"))
    softmax.merge_into(o, lse, torch.ones(3, 2), torch.tensor([0.0, float("inf"), 0.0]), torch.tensor([0, 0, 1]))
    assert torch.isnan(lse[0]) and lse[1] == 0.0 and torch.equal(o[1], torch.ones(2))


def inputs():
    """float32 q, k, v ``[1, 2, L, D]``: in head 0, key ``BAD_KEY`` has a ``-inf`` component that every query
    multiplies by a negative number (every row's score of that key, and of its route block, is ``+inf``)."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, L, D, generator=gen) for _ in range(3))
    q[0, 0, :, COMPONENT] = -q[0, 0, :, COMPONENT].abs() - 0.5
    k[0, 0, BAD_KEY, COMPONENT] = float("-inf")
    return q, k, v


@pytest.mark.parametrize("kernel", ["fused", "math"])
def test_cpu_rows_that_chose_the_plus_inf_block_are_not_finite(kernel):
    from patterndsl.runtime import cpu

    p = patterndsl.compile(SOURCE)
    q, k, v = inputs()
    mask = p.mask(L, L, 2, q=q, k=k)
    assert bool(mask[0, 0, :, BAD_KEY].all())  # the reference chose the block for every row of head 0
    with cpu.options(kernel=kernel):
        out, lse = p(q, k, v, scale=0.5, return_lse=True)
    assert not bool(torch.isfinite(lse[0, 0]).any()), lse[0, 0]
    assert not bool(torch.isfinite(out[0, 0]).any(-1).any())
    # head 1 reads no poisoned key: exact
    clean = k.masked_fill(~torch.isfinite(k), 0.0).double()
    ref_out, ref_lse = reference_attention(q.double(), clean, v.double(), mask, 0.5)
    torch.testing.assert_close(out[0, 1].double(), ref_out[0, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[0, 1].double(), ref_lse[0, 1], atol=1e-5, rtol=1e-5)
