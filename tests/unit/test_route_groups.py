"""Route choices kept per segment of query groups (analysis/routegroups.py) read like per-group tables.

``routeruns.classify`` keeps a route's candidates as :class:`GroupRuns`: runs of blocks per segment of
consecutive groups that share them (a million groups at ``qblock = 1`` and a million tokens, a few
thousand segments). Looked up element by element, counted over ranges of groups, or expanded, such a
table must equal the per-group :class:`RunTable` it stands for, and the plans built from it must equal
the pair-by-pair plan (the reference, itself checked against the brute-force oracle).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import patterndsl
from patterndsl import ir
from patterndsl.analysis import engine as eng
from patterndsl.analysis import routegroups, routeplan, routeruns
from patterndsl.sizes import Sizes

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _random_table(seed: int) -> routegroups.GroupRuns:
    gen = np.random.default_rng(seed)
    n_groups, n_blocks = int(gen.integers(1, 60)), int(gen.integers(1, 20))
    inner = np.sort(gen.choice(np.arange(1, n_groups), size=min(n_groups - 1, int(gen.integers(0, 8))), replace=False))
    bounds = np.concatenate([[0], inner, [n_groups]]).astype(np.int64)
    seg, lo, hi = [], [], []
    for s in range(len(bounds) - 1):
        edges = np.sort(
            gen.choice(
                np.arange(n_blocks + 1), size=min(2 * int(gen.integers(0, 3)), n_blocks + 1) // 2 * 2, replace=False
            )
        )
        for a, b in edges.reshape(-1, 2):
            seg.append(s)
            lo.append(a)
            hi.append(b)
    seg, lo, hi = (np.asarray(x, np.int64) for x in (seg, lo, hi))
    order = np.lexsort((lo, seg))
    return routegroups.GroupRuns(bounds, seg[order], lo[order], hi[order], n_blocks)


def _dense(table: routegroups.GroupRuns) -> np.ndarray:
    out = np.zeros((int(table.bounds[-1]), table.n_blocks), bool)
    for s, a, b in zip(table.group, table.lo, table.hi, strict=True):
        out[table.bounds[s] : table.bounds[s + 1], a:b] = True
    return out


@pytest.mark.parametrize("seed", range(12))
def test_segment_table_reads_like_the_group_table(seed):
    table = _random_table(seed)
    dense = _dense(table)
    n_groups, n_blocks = dense.shape
    a = torch.arange(n_groups + 2)[:, None]  # groups past the last one have no block
    b = torch.arange(n_blocks)[None, :]
    want = np.zeros((n_groups + 2, n_blocks), bool)
    want[:n_groups] = dense
    assert table[a, b].numpy().tolist() == want.tolist()
    runs = table.runs()
    assert runs[a, b].numpy().tolist() == want.tolist()
    assert (np.diff(runs.group * (n_blocks + 1) + runs.lo) > 0).all()
    # groups g0 <= a < g1 holding block b, for cells inside and past the groups
    gen = np.random.default_rng(seed + 100)
    g0 = gen.integers(0, n_groups + 3, 60)
    g1 = g0 + gen.integers(0, 12, 60)
    bb = gen.integers(0, n_blocks, 60)
    expect = [int(want[x0 : min(x1, n_groups), y].sum()) for x0, x1, y in zip(g0, g1, bb, strict=True)]
    assert table.chosen_count(g0, g1, bb).tolist() == expect
    assert routeruns._chosen_count(table, g0, g1, bb).tolist() == expect
    assert (
        table.per_group(np.arange(table.segments)).tolist()
        == np.repeat(np.arange(table.segments), table.sizes).tolist()
    )


SHAPES = [(256, 256, (16, 16)), (256, 256, (24, 40)), (200, 264, (32, 16)), (192, 192, (12, 8))]


@pytest.mark.parametrize(("file", "name"), [("landmark", "landmark"), ("nsa", "nsa_select"), ("moba", "moba")])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_examples_as_segments_equal_pair_by_pair(file, name, shape):
    lq, lk, tile = SHAPES[shape]
    p = patterndsl.compile((EXAMPLES / f"{file}.pdsl").read_text(), name, block=8)
    node = eng.rewrite_for_plan(p.ir.default)
    sizes = Sizes(lq, lk)
    engine = eng.identity_engine(sizes, 0, tile)
    assert routeruns.usable(engine, node)
    got = routeruns.classify(engine, node).expanded()
    want = routeplan.classify_by_pairs(eng.identity_engine(sizes, 0, tile), node)
    for field in ("keys", "state", "route_mask", "open"):
        assert getattr(got, field).tolist() == getattr(want, field).tolist(), field
    ((prim, fixed),) = want.forced.items()
    assert got.forced[prim][1].tolist() == fixed[1].tolist()
    assert got.forced[prim][2].tolist() == fixed[2].tolist()


def test_groups_of_one_query_are_held_as_few_segments():
    # nsa_select at 16K tokens, qblock = 1: 16K groups, a new candidate run every 64 queries
    p = patterndsl.compile((EXAMPLES / "nsa.pdsl").read_text(), "nsa_select")
    node = eng.rewrite_for_plan(p.ir.default)
    engine = eng.identity_engine(Sizes(1 << 14, 1 << 14), 0, (128, 128))
    geo = routeruns.geometry(engine, node)
    ((prim, _),) = ir.polarities(node).items()
    cand = routeruns.candidates(engine, prim, geo)
    assert geo.n_q == 1 << 14 and cand.segments <= geo.n_q // 32
    assert len(cand.group) <= cand.segments
    # the same candidates as the pair-by-pair plan lists them (group a: blocks 1 <= b < a // 64 - 1)
    a = torch.arange(geo.n_q)[:, None]
    b = torch.arange(geo.n_k)[None, :]
    assert torch.equal(cand[a, b], (b >= 1) & (b < a // 64 - 1))
