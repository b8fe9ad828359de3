"""Plans of patterns with run-time inputs: the static bound (3 where the data decides) and the exact call-time plan."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import patterndsl as pd
from patterndsl.analysis import inputplan
from patterndsl.analysis.plan import tile_reduce
from tests.inputs_reference import random_documents, random_pattern_source

PACKED = """pattern packed(w = 5, n = 2) {
    input doc: int[batch, token]
    within(doc, causal & (window(w) | sink(n)))
}"""


def exact(p, q_len, kv_len, heads, block, order="auto", **inputs):
    """The call-time tiles equal the dense tile reduction; the static tiles that are not 3 agree with them."""
    plan = p.plan(q_len, kv_len, heads, block=block, order=order, **inputs)
    mask = p.mask(q_len, kv_len, heads, **inputs)
    ref = tile_reduce(mask[:, :, plan.q_order][:, :, :, plan.kv_order], *block)
    assert plan.tiles().shape == ref.shape
    assert torch.equal(plan.tiles(), ref)
    static = p.plan(q_len, kv_len, heads, block=block, order=order).tiles()
    decided = (static != 3).expand_as(ref)
    assert torch.equal(static.expand_as(ref)[decided], ref[decided])
    return plan


def test_static_plan_marks_data_dependent_tiles_3_and_keeps_the_rest_exact():
    p = pd.compile("pattern p {\n input prefix: int[batch]\n causal & (window(3) | where(k < prefix))\n}")
    tiles = p.plan(32, 32, 1, block=(8, 8)).tiles()[0]
    causal = tile_reduce(pd.compile("pattern c { causal & window(3) }").mask(32), 8, 8)[0]
    upper = tile_reduce(pd.compile("pattern c { causal }").mask(32), 8, 8)[0]
    assert torch.equal(tiles == 0, upper == 0)
    assert bool((tiles[(upper != 0) & (causal != upper)] == 3).all())


def test_within_causal_documents_plan_is_exact_and_only_boundary_boxes_are_evaluated():
    p = pd.compile(PACKED)
    doc = pd.segments([13, 1, 30, 20])
    plan = exact(p, 64, 64, 1, (8, 8), doc=doc)
    assert plan.work["tiles_evaluated"] == 0


def test_within_plain_causal_needs_no_element_work():
    p = pd.compile("pattern d {\n input doc: int[batch, token]\n within(doc, causal & window(9))\n}")
    static = p.plan(128, 128, 1, block=(16, 16)).tiles()[0]
    assert not bool(torch.triu(static, 1).any()), "within's bands bound it statically: nothing above the diagonal"
    doc = pd.segments([5, 40, 1, 1, 17, 64])
    plan = exact(p, 128, 128, 2, (16, 16), doc=doc)
    assert plan.work["elements_evaluated"] == 0


@pytest.mark.parametrize("seed", range(6))
def test_random_documents_batches_lq_lk_and_heads(seed):
    rng = random.Random(seed)
    p = pd.compile(PACKED, w=rng.randint(0, 9), n=rng.randint(0, 3))
    kv = rng.randint(1, 70)
    q_len = rng.randint(1, kv + 5)
    doc = torch.stack([random_documents(rng, kv) for _ in range(rng.randint(1, 3))])
    exact(p, q_len, kv, rng.randint(1, 3), (rng.choice([4, 8]), rng.choice([4, 16])), doc=doc)


def test_longformer_tags_and_prefixes_are_exact():
    p = pd.compile(
        "pattern l(w = 2) {\n input tag: int[batch, token]\n window(w, w) | where(tag[q] == 1 or tag[k] == 1)\n}"
    )
    tag = torch.zeros(2, 40, dtype=torch.int64)
    tag[0, [0, 17]] = 1
    tag[1, 39] = 1
    plan = exact(p, 40, 40, 1, (8, 8), tag=tag)
    # Rows of tags and columns of tags are row/column sets: no element work on them.
    assert plan.work["elements_evaluated"] <= 8 * 8 * 12
    q = pd.compile("pattern x {\n input prefix: int[batch]\n causal | where(k < prefix)\n}")
    exact(q, 37, 50, 2, (8, 8), prefix=torch.tensor([0, 23, 49]).view(3))


@pytest.mark.parametrize("seed", range(12))
def test_random_patterns_with_inputs(seed):
    rng = random.Random(100 + seed)
    _, p, make_inputs, q_len, kv, heads = draw(rng, 48, 3)
    exact(p, q_len, kv, heads, (rng.choice([4, 8]), rng.choice([4, 8])), **make_inputs(rng, kv, heads))


def draw(rng: random.Random, max_len: int, max_heads: int):
    """A random pattern with inputs and sizes: ``(source, pattern, make_inputs, Lq, Lk, heads)``."""
    source, make_inputs = random_pattern_source(rng)
    kv = rng.randint(1, max_len)
    return source, pd.compile(source), make_inputs, rng.randint(1, kv + 4), kv, rng.randint(1, max_heads)


def test_call_plan_keeps_static_groups_and_batch_shared_inputs():
    p = pd.compile(PACKED)
    doc = pd.segments([3, 5])
    plan = p.plan(8, 8, 2, block=(4, 4), doc=doc)
    assert isinstance(plan, inputplan.InputPlan)
    assert plan.tiles().shape == (1, 2, 2, 2)
    both = p.plan(8, 8, 2, block=(4, 4), doc=torch.stack([doc, doc.flip(0)]))
    assert both.tiles().shape == (2, 2, 2, 2)


@pytest.mark.parametrize("seed", range(16))
def test_random_masks_equal_the_independent_reference(seed):
    from tests.inputs_reference import reference_mask

    rng = random.Random(500 + seed)
    source, p, make_inputs, q_len, kv, heads = draw(rng, 24, 2)
    inputs = make_inputs(rng, kv, heads)
    want = reference_mask(make_inputs.oracle, inputs, q_len, kv, heads)
    assert torch.equal(p.mask(q_len, kv, heads, **inputs), want), source


def test_packed_documents_with_sinks_need_no_element_work():
    p = pd.load(Path(__file__).resolve().parents[2] / "examples" / "packed_documents.pdsl", w=40, sinks=4)
    doc = pd.segments([100, 1, 3, 200, 208])
    plan = exact(p, 512, 512, 1, (32, 32), doc=doc)
    assert plan.work["elements_evaluated"] == 0


REORDERED = """pattern r {
    input tag: int[batch, token]
    input prefix: int[batch]
    window(3, 3, dilation = 4) | strided(5) & where(tag[k] == 1 or q < prefix)
}"""


@pytest.mark.parametrize("seed", range(4))
def test_reordering_applies_where_valid_for_any_data(seed):
    rng = random.Random(seed)
    p = pd.compile(REORDERED)
    kv = rng.randint(40, 90)
    q_len = rng.randint(30, kv)
    g = torch.Generator().manual_seed(seed)
    tag = (torch.rand(2, kv, generator=g) < 0.2).long()
    prefix = torch.tensor([rng.randint(0, kv), rng.randint(0, kv)])
    plan = exact(p, q_len, kv, 2, (8, 8), tag=tag, prefix=prefix)
    assert plan.static.order == "classes mod 4"
    exact(p, q_len, kv, 2, (8, 8), order="identity", tag=tag, prefix=prefix)


def test_within_keeps_token_order():
    p = pd.compile("pattern d {\n input doc: int[batch, token]\n within(doc, window(2, dilation = 3))\n}")
    plan = exact(p, 40, 40, 1, (8, 8), doc=pd.segments([17, 23]))
    assert plan.static.order == "identity"


def test_call_plan_statistics_count_every_batch_element():
    p = pd.compile(REORDERED)
    g = torch.Generator().manual_seed(1)
    tag = (torch.rand(2, 60, generator=g) < 0.2).long()
    prefix = torch.tensor([5, 30])
    plan = p.plan(50, 60, 3, block=(8, 8), tag=tag, prefix=prefix)
    mask = p.mask(50, 60, 3, tag=tag, prefix=prefix)
    tiles = plan.tiles()
    assert plan.stats.allowed_pairs == int(mask.sum())
    assert plan.stats.tiles_full == int((tiles == 2).sum()) and plan.stats.tiles_partial == int((tiles == 1).sum())
    assert plan.stats.total_pairs == 2 * 3 * 50 * 60
    assert 0 < plan.stats.density < 1
    assert plan.n_q_tiles == 7 and plan.block_m == 8 and plan.order == plan.static.order


@pytest.mark.parametrize("seed", range(4))
def test_within_plans_the_whole_batch_at_once_exactly(seed):
    # Several batch elements, each its own documents (runs never cross elements), Lq above and below Lk.
    rng = random.Random(300 + seed)
    p = pd.compile(PACKED, w=rng.randint(0, 9), n=rng.randint(0, 3))
    kv = rng.randint(2, 90)
    q_len = rng.choice([kv, rng.randint(1, kv), kv + rng.randint(1, 7)])
    doc = torch.stack([random_documents(rng, kv) for _ in range(rng.randint(2, 5))])
    doc[1:, 0] = doc[:-1, -1]  # an element may start with the id the previous one ends with
    exact(p, q_len, kv, 2, (rng.choice([4, 8]), rng.choice([4, 16])), doc=doc)
