"""Grid plans at scale (issue 19): the binned key-tile candidates, per-axis counts and grid routes
against exact references at small sizes."""

from __future__ import annotations

import numpy as np
import pytest

from patterndsl.analysis.gridcands import Cells


def _brute(kalo, kahi, alo, ahi, rows, cols, nkb):
    meet = ((kahi[None] >= alo[:, None]) & (kalo[None] <= ahi[:, None])).all(2)
    i, t = np.nonzero(meet)
    return np.sort(rows[i] * nkb + cols[t])


@pytest.mark.parametrize("long_tiles", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_cells_meeting_matches_brute_force(seed, long_tiles):
    # with long tiles, a few span every column (box-order tiles across grid rows on an odd grid): they are
    # binned in cells of their own, in one or two levels, the others in short cells; the same pairs
    rng = np.random.default_rng(seed)
    d = 2 + seed % 2 if long_tiles else 1 + seed % 3
    n = int(rng.integers(40, 90) if long_tiles else rng.integers(1, 60))
    kalo = rng.integers(0, 40, (n, d))
    kahi = kalo + rng.integers(0, 4 if long_tiles else 9, (n, d))
    if long_tiles:
        long_ = rng.choice(n, 1 + seed % 3, replace=False)
        kalo[long_, -1], kahi[long_, -1] = 0, 60
        if seed % 2:
            kahi[long_[:1], 0] = kalo[long_[:1], 0] + 30  # one tile longer still, on another axis
    nq = int(rng.integers(1, 30))
    alo = rng.integers(-5, 45, (nq, d))
    ahi = alo + rng.integers(-2, 12, (nq, d))
    rows = np.sort(rng.choice(100, nq, replace=False)).astype(np.int64)
    cols = np.sort(rng.choice(200, n, replace=False)).astype(np.int64)
    cells = Cells(kalo, kahi)
    assert cells.usable and (cells.parts is not None) == long_tiles
    got = cells.meeting(alo, ahi, rows, cols, 200)
    np.testing.assert_array_equal(got, _brute(kalo, kahi, alo, ahi, rows, cols, 200))


def _grid_source(grid, body: str) -> str:
    """A pattern of ``body`` on a grid of axes ``t, y, x`` (the last ``len(grid)`` of them)."""
    dims = ", ".join(f"{a} = {n}" for a, n in zip("tyx"[-len(grid) :], grid, strict=True))
    return f"pattern p {{ layout grid({dims})\n {body} }}"


def _exact(source, length, heads=1, block=(16, 16), orders=("auto",)):
    import torch

    import patterndsl as pd
    from patterndsl import semantics
    from patterndsl.analysis.plan import tile_reduce

    pattern = pd.compile(source)
    dense = semantics.mask(pattern.ir, length, length, heads)
    for order in orders:
        plan = pattern.plan(length, heads=heads, block=block, order=order)
        ref = tile_reduce(dense[:, plan.q_order][:, :, plan.kv_order], *block)
        assert torch.equal(plan.tiles(), ref), (source, order)
        assert plan.stats.allowed_pairs == int(dense.sum())


@pytest.mark.parametrize(
    "grid, body",
    [
        (
            (24, 20),
            "where(k.y >= q.y // 4 * 4 - 2 and k.y < q.y // 4 * 4 + 6"
            " and k.x >= q.x // 4 * 4 - 2 and k.x < q.x // 4 * 4 + 6)",
        ),
        ((16, 32), "where(k.y // 4 == q.y // 4 or k.x // 8 == q.x // 8)"),
        ((12, 10), "where(k.y >= q.y - 1 and k.y <= q.y + 2 and k.x // 3 == q.x // 3)"),
    ],
)
def test_per_axis_counts_match_the_dense_mask(grid, body):
    # HaloNet-like blocks with halos (tiles of several pieces when rows do not divide the tiles), and
    # a union: counted axis by axis from the sides' pieces, the classification's counts reused
    _exact(f"pattern p {{ layout grid(y = {grid[0]}, x = {grid[1]})\n {body} }}", grid[0] * grid[1])


@pytest.mark.parametrize(
    "size, grid", [(5, (16, 32)), (3, (20, 12)), (7, (32, 16)), ("3, dilation = (2, 3)", (16, 24))]
)
def test_grid_neighborhood_orders_match_the_dense_mask(size, grid):
    # the dilated case: in dilation-group orders every group's candidates come from one binned pass
    source = f"pattern p {{ layout grid(y = {grid[0]}, x = {grid[1]})\n neighborhood({size}) }}"
    _exact(source, grid[0] * grid[1], orders=("identity", "auto"))


GRID_AMONG = ["full", "neighborhood(3)", "where(k.y <= q.y)", "neighborhood(5) - neighborhood(1)"]
GRID_BODY = ["{r}", "neighborhood(3) | {r}", "where(k.x <= q.x) & {r}", "~{r}", "neighborhood(5) - {r}"]


def _grid_case(seed: int):
    """A random 2-D route pattern with box groups and blocks, on a grid whose rows hold whole tiles."""
    gen = np.random.default_rng(seed)
    box = (int(gen.integers(1, 5)), int(gen.integers(1, 6)))
    qbox = box if gen.random() < 0.6 else (int(gen.integers(1, 5)), int(gen.integers(1, 6)))
    tile = (int(gen.choice([4, 8, 16])), int(gen.choice([4, 8, 16])))
    w = int(np.lcm(*tile)) * int(gen.integers(1, 3))
    w = w if w >= 8 else 2 * w  # neighborhood(5) fits
    h = int(gen.integers(5, 13))
    among = str(gen.choice(GRID_AMONG))
    route = f"route(topk = {int(gen.integers(1, 5))}, block = {box}, qblock = {qbox}, among = {among})"
    body = str(gen.choice(GRID_BODY)).format(r=route)
    return f"pattern p {{ layout grid(y = {h}, x = {w})\n {body} }}", h * w, tile


@pytest.mark.parametrize("seed", range(12))
def test_grid_route_runs_expand_to_the_pair_by_pair_plan(seed):
    from tests.unit.test_route_grid_runs import equal_to_pairs

    equal_to_pairs(*_grid_case(seed))


@pytest.mark.parametrize("tile", [(16, 16), (64, 64)])
def test_the_interpreter_case_of_a_grid_route_is_planned_as_runs(tile):
    """tests/interpreter/test_route_kernels.py's ``grid_route_runs`` (16 x 16 Triton tiles there) takes routegrid."""
    import patterndsl
    from patterndsl.analysis import engine as eng
    from patterndsl.analysis import routegrid
    from patterndsl.sizes import Sizes
    from tests.interpreter.test_route_kernels import _source

    p = patterndsl.compile(_source("grid_route_runs"))
    node = eng.rewrite_for_plan(p.ir.default)
    assert routegrid.geometry(eng.identity_engine(Sizes(384, 384, p.ir.layout), 0, tile), node) is not None


@pytest.mark.parametrize("tiles", [(8, 8), (4, 16)])
def test_a_grid_route_planned_as_runs_runs_on_the_cpu(tiles, monkeypatch):

    import patterndsl
    import patterndsl.runtime as rt
    from tests.reference import check_cpu_against_reference

    monkeypatch.setattr(rt, "CPU_BLOCK", tiles)
    source = "pattern p { layout grid(y = 6, x = 16)\n neighborhood(3) | route(topk = 2, block = (2, 4)) }"
    p = patterndsl.compile(source)
    check_cpu_against_reference(p, 96, seed=1)


@pytest.mark.parametrize(
    "extents, dilation, box",
    [
        ((12, 20), (1, 1), (2, 4)),
        ((12, 24), (2, 3), (2, 4)),
        ((9, 14), (2, 3), (2, 4)),
        ((4, 6, 10), (1, 2, 1), (2, 1, 4)),
    ],
)
def test_box_segments_carry_their_tuples_as_arrays(extents, dilation, box):
    from patterndsl.analysis import tiles

    segs = tiles.box_segments(extents, dilation, box)
    for f, arr in enumerate(segs.arrays):
        assert arr.tolist() == [list(seg[f]) for seg in segs]
    if (segs.arrays[2].prod(1) == 8).all():
        # one tile a box: laid out from the arrays or from the tuples alone, the same side
        length = int(np.prod(extents))
        a = tiles.build_side(segs, length, 8, 0, extents, False)
        b = tiles.build_side(list(segs), length, 8, 0, extents, False)
        assert np.array_equal(a.order, b.order) and np.array_equal(a.a, b.a) and np.array_equal(a.n, b.n)
        assert sorted(a.order.tolist()) == list(range(length))


def test_a_grid_route_past_its_element_budget_is_left_to_the_other_plans(monkeypatch):
    import torch

    import patterndsl
    from patterndsl.analysis import routegrid

    source = (
        "pattern p { layout grid(y = 8, x = 16)\n"
        " neighborhood(3) | route(topk = 2, block = (2, 3), among = neighborhood(5)) }"
    )  # blocks 3 wide do not nest in 8-key tiles: the tiles the cells do not decide are evaluated
    calls = []
    classify = routegrid.classify

    def spy(engine, node):
        out = classify(engine, node)
        calls.append((out is None, engine.tally.budget))
        return out

    monkeypatch.setattr(routegrid, "classify", spy)
    runs = patterndsl.compile(source).plan(128, heads=1, block=(8, 8))
    assert calls == [(False, None)] and runs.stats.elements_evaluated > 0  # static part and route both partial
    monkeypatch.setattr(routegrid, "MAX_ELEMENTS", 1)
    other = patterndsl.compile(source).plan(128, heads=1, block=(8, 8))
    assert calls[1:] == [(True, None)]  # given up, the tally as it was
    assert torch.equal(other.tiles(), runs.tiles())
    assert other.stats.elements_evaluated == runs.stats.elements_evaluated


@pytest.mark.parametrize(
    "size, grid, block",
    [
        ("5", (23, 21), (16, 16)),  # rows of 21 in 16-token tiles: tiles across rows
        ("3, dilation = 2", (25, 19), (16, 16)),  # dilation groups of odd sizes: tiles across groups
        ("(3, 5), dilation = (2, 3)", (22, 27), (32, 32)),
        ("(3, 3, 5), dilation = (1, 2, 1)", (5, 9, 13), (16, 16)),
    ],
)
def test_odd_grid_candidates_piece_by_piece(size, grid, block):
    # Tiles of several pieces (a tile across grid rows, boxes cut at the edge, dilation groups): the
    # plan is exact, and the tiles classified are the non-empty ones plus few, not every tile a box
    # bounding a whole tile meets (on a 1000 x 1000 grid that was 7x the non-empty tiles).
    import math

    import patterndsl as pd

    source = _grid_source(grid, f"neighborhood({size})")
    length = math.prod(grid)
    _exact(source, length, block=block, orders=("identity", "auto"))
    for order in ("identity", "auto"):
        plan = pd.compile(source).plan(length, block=block, order=order)
        nonempty = plan.stats.tiles_full + plan.stats.tiles_partial
        assert plan.stats.extra["tiles_classified"] <= 1.25 * nonempty, (order, plan.order)


@pytest.mark.parametrize("seed", range(4))
def test_lattice_counts_match_brute_force(seed):
    # an axis's counts from the 2-D prefix sums of one matrix, for progressions with steps and residues
    from patterndsl.analysis.axes import _lattice_counts

    rng = np.random.default_rng(seed)
    matrix = rng.random((23, 19)) < 0.4
    rows = []
    for _ in range(60):
        sq, sk = (int(v) for v in rng.integers(1, 4, 2))
        aq, ak = int(rng.integers(0, 23)), int(rng.integers(0, 19))
        nq = int(rng.integers(1, (22 - aq) // sq + 2))
        nk = int(rng.integers(1, (18 - ak) // sk + 2))
        rows.append((aq, sq, nq, ak, sk, nk))
    uniq = np.asarray(rows, np.int64)
    want = [int(matrix[aq : aq + sq * nq : sq][:, ak : ak + sk * nk : sk].sum()) for aq, sq, nq, ak, sk, nk in rows]
    assert _lattice_counts(matrix, uniq).tolist() == want


@pytest.mark.parametrize("grid", [(25, 21), (13, 30)])
def test_halonet_on_odd_grids_counts_axes_from_one_matrix(grid):
    # rows that do not hold whole tiles: many distinct (query, key) progressions per axis, counted from
    # one matrix per axis (HaloNet on 125 x 125 evaluated 37.7M elements that way, now 18K)
    import patterndsl as pd

    body = (
        "where(k.y >= q.y // 4 * 4 - 2 and k.y < q.y // 4 * 4 + 6"
        " and k.x >= q.x // 4 * 4 - 2 and k.x < q.x // 4 * 4 + 6)"
    )
    source = f"pattern p {{ layout grid(y = {grid[0]}, x = {grid[1]})\n {body} }}"
    _exact(source, grid[0] * grid[1], orders=("identity",))
    plan = pd.compile(source).plan(grid[0] * grid[1], block=(16, 16), order="identity")
    assert 0 < plan.stats.elements_evaluated <= 2 * (grid[0] ** 2 + grid[1] ** 2)


def test_classify_pairs_in_chunks_gives_the_same_plan(monkeypatch):
    # the rule sees a few piece pairs at a time (bounded memory); chunks cut inside a tile's pieces never
    import torch

    import patterndsl as pd
    from patterndsl.analysis import engine

    source = "pattern p { layout grid(t = 5, y = 9, x = 13)\n neighborhood((3, 3, 5), dilation = (1, 2, 1)) }"
    whole = pd.compile(source).plan(585, block=(16, 16), order="identity")
    monkeypatch.setattr(engine, "CLASSIFY_CHUNK", 7)
    chunked = pd.compile(source).plan(585, block=(16, 16), order="identity")
    assert torch.equal(whole.tiles(), chunked.tiles())
    assert whole.stats.allowed_pairs == chunked.stats.allowed_pairs
    _exact(source, 585, orders=("identity",))


PRODUCT_UNIONS = [
    ((16, 24), "neighborhood(5) | where(k.y == q.y)"),  # a neighborhood and row attention
    ((20, 13), "neighborhood(3) | where(k.x // 4 == q.x // 4)"),
    ((18, 18), "neighborhood(3) | neighborhood(5, dilation = 2)"),
    ((17, 22), "neighborhood(5) & where(k.x <= q.x)"),
    ((12, 20), "(neighborhood(3) & where(k.x >= q.x)) | where(k.y == q.y) | where(k.y == q.y + 2)"),
    ((6, 7, 9), "neighborhood((3, 3, 5), causal = (true, false, false)) | where(k.t == q.t and k.t < 2)"),
    ((19, 13), "causal & neighborhood(5)"),  # causal on a grid: disjoint products over axes
    ((5, 6, 7), "causal & neighborhood((3, 3, 3), dilation = (1, 2, 1))"),
]


@pytest.mark.parametrize("grid, body", PRODUCT_UNIONS)
def test_unions_of_products_over_axes_are_counted_exactly(grid, body):
    # a neighborhood is a product over axes of NATTEN's rule on each axis: a union of such products
    # (and of nodes reading one axis) is counted by inclusion-exclusion from one matrix per axis and term
    import math

    import patterndsl as pd
    from patterndsl.analysis.axes import AxisSplit

    source = _grid_source(grid, body)
    pattern = pd.compile(source)
    assert AxisSplit(pattern.ir.default, pattern.ir.layout).terms is not None
    length = math.prod(grid)
    _exact(source, length, orders=("identity", "auto"))
    plan = pattern.plan(length, block=(16, 16), order="identity")
    assert plan.stats.elements_evaluated <= 8 * sum(n * n for n in grid)  # a few matrices, no tile's pairs
    if body.count("where") <= 1:
        # every term bounds its keys (a neighborhood's windows, `k.y == q.y`): candidates from those
        # ranges, no branch and bound over key-tile ranges
        assert plan.stats.extra["boxes_searched"] == 0


@pytest.mark.parametrize("other", ["global(16)", "sink(5)"])
def test_a_neighborhood_with_a_flat_primitive_counts_its_tiles_per_axis(other):
    # a tile where only the neighborhood is partial has the neighborhood's count: a product over axes of
    # per-axis counts (it was evaluated element by element, 0.3 s for neighborhood(7) | global(16) at 16K;
    # here 64K elements, 13K after: the tiles where both operands are partial)
    import patterndsl as pd

    source = f"pattern p {{ layout grid(y = 40, x = 37)\n neighborhood(5) | {other} }}"
    _exact(source, 1480, block=(64, 64), orders=("identity", "auto"))
    plan = pd.compile(source).plan(1480, block=(64, 64), order="identity")
    assert plan.stats.elements_evaluated <= 20_000


def test_an_intersection_on_a_grid_starts_from_its_neighborhood():
    # the operands' reach orders an intersection: a neighborhood's windows are not a narrow band of flat
    # positions, so it counted as reaching every tile and causal (half of them) went first
    import patterndsl as pd

    source = "pattern p { layout grid(y = 64, x = 60)\n causal & neighborhood(5) & where(q != k + 3) }"
    _exact(source, 3840, orders=("identity",))
    plan = pd.compile(source).plan(3840, block=(16, 16), order="identity")
    nonempty = plan.stats.tiles_full + plan.stats.tiles_partial
    # each of the three operands classifies the neighborhood's candidates: 11,864 (from causal: 64,476)
    assert plan.stats.extra["tiles_classified"] <= 12 * nonempty


def test_route_boxes_larger_than_the_grid_are_its_axes():
    # a route box past an axis is that axis: the boxes' side was laid out on the grid padded to whole
    # boxes, 112 GiB for qblock = (7, 2147483647) on a 2 x 3 grid (a fuzz case; MemoryError)
    import numpy as np

    import patterndsl as pd

    source = "pattern p {{ layout grid(y = 6, x = 5)\n route(1, block = 2, qblock = {}, among = neighborhood(3)) }}"
    big, same = (pd.compile(source.format(q)) for q in ("(7, 2147483647)", "(6, 5)"))
    a, b = (p.plan(30, block=(16, 16)) for p in (big, same))
    assert np.array_equal(a.tiles().numpy(), b.tiles().numpy())
    assert a.stats.visited_pairs == b.stats.visited_pairs


@pytest.mark.parametrize(
    "grid, args",
    [
        ((9, 13), "(3, 5)"),
        ((7, 6, 11), "(3, 3, 5), causal = (true, false, false)"),
        ((12, 10), "(5, 3), stride = (2, 1)"),
        ((14, 11), "3, dilation = (2, 1)"),
        ((17, 14), "3, dilation = (4, 3)"),  # residues by mask (a power of two) and by division
    ],
)
def test_the_neighborhood_tile_rule_matches_its_meaning_on_pieces(grid, args):
    # random per-axis progressions (steps 1 to 3) as query and key pieces: where the rule says it is
    # exact, some pair / every pair allowed is what the elements say (the undilated axes take a path of
    # their own, without residues)
    import itertools
    import math

    import torch

    import patterndsl as pd
    from patterndsl import semantics
    from patterndsl.analysis.classify import Env, classify
    from patterndsl.analysis.tiles import Pieces
    from patterndsl.sizes import Sizes

    pir = pd.compile(_grid_source(grid, f"neighborhood({args})")).ir
    length = math.prod(grid)
    node = pir.node_for_head(0)
    env = Env(Sizes(length, length, pir.layout, 1), 0)
    rng = np.random.default_rng(len(grid) + len(args))
    strides = np.asarray([math.prod(grid[x + 1 :]) for x in range(len(grid))])

    def pieces(count):
        a, s, n = (np.zeros((count, len(grid)), np.int64) for _ in range(3))
        for x, ext in enumerate(grid):
            s[:, x] = np.where(rng.random(count) < 0.8, 1, rng.integers(2, 4, count))
            a[:, x] = rng.integers(0, ext, count)
            n[:, x] = 1 + rng.integers(0, (ext - 1 - a[:, x]) // s[:, x] + 1)
        return a, s, n

    side = type("S", (), {"strides": tuple(strides.tolist()), "extents": grid})()
    qa, qs, qn = pieces(300)
    ka, ks, kn = pieces(300)
    nonempty, full, ok = classify(node, Pieces.of(qa, qs, qn, side), Pieces.of(ka, ks, kn, side), env)
    assert ok.mean() > 0.3, ok.mean()
    for p in np.flatnonzero(ok).tolist():

        def positions(a, s, n, p=p):
            axes = [a[p, x] + s[p, x] * np.arange(n[p, x]) for x in range(len(grid))]
            return torch.tensor([int((np.asarray(c) * strides).sum()) for c in itertools.product(*axes)])

        i, j = positions(qa, qs, qn), positions(ka, ks, kn)
        dense = semantics.evaluate(node, i[:, None], j[None, :], 0, Sizes(length, length, pir.layout, 1))
        assert bool(nonempty[p]) == bool(dense.any()), p
        assert bool(full[p]) == bool(dense.all()), p


@pytest.mark.parametrize(
    "grid, body",
    [
        ((13, 21), "neighborhood(5)"),
        ((5, 9, 13), "neighborhood((3, 3, 5))"),
        ((13, 21), "where(k.y <= q.y and k.x >= q.x - 2)"),
        ((13, 21), "where(k.x == q.x)"),
        ((11, 23), "global(20)"),
        ((11, 23), "sink(20)"),
        ((13, 21), "causal"),
    ],
)
def test_tiles_of_several_pieces_are_classified_first_by_their_largest_pieces(grid, body, monkeypatch):
    # a tile across grid rows is partial as soon as its largest query and key pieces hold both kinds of
    # pair: the others are classified piece pair by piece pair, the plan is the dense mask's, and the
    # rule sees fewer piece pairs than the tiles' products of pieces
    import math

    import patterndsl as pd
    from patterndsl.analysis import classify as cls
    from patterndsl.analysis import engine

    source = _grid_source(grid, body)
    length = math.prod(grid)
    _exact(source, length, heads=2, orders=("identity", "auto"))
    seen = {"pairs": 0, "products": 0}
    rule = cls.classify
    pairs = engine.Engine.classify_pairs

    def counting(prim, qp, kp, env):
        seen["pairs"] += len(qp.a)
        return rule(prim, qp, kp, env)

    def products(self, prim, keys, *args, **kwargs):
        seen["products"] += int((np.diff(self.q.ptr)[keys // self.nkb] * np.diff(self.k.ptr)[keys % self.nkb]).sum())
        return pairs(self, prim, keys, *args, **kwargs)

    monkeypatch.setattr(engine.cls, "classify", counting)
    monkeypatch.setattr(engine.Engine, "classify_pairs", products)
    pd.compile(source).plan(length, block=(16, 16), order="identity")
    if body.startswith("neighborhood"):
        assert seen["pairs"] < 0.7 * seen["products"], seen


GLOBAL_UNIONS = [
    ((13, 11), "neighborhood(5) | global(7)"),  # fewer global tokens than a row
    ((13, 11), "neighborhood(3) | global(29)"),  # two rows and a part
    ((9, 12), "neighborhood(5) | global(24)"),  # whole rows only
    ((5, 7, 6), "neighborhood(3) | global(50)"),  # 3-D: a plane, a row and a part
    ((5, 7, 6), "neighborhood((3, 5, 3)) | global(4) | where(k.x == q.x)"),
    ((11, 10), "(neighborhood(5) & where(k.x <= q.x)) | global(13)"),
    ((12, 9), "neighborhood(3, dilation = 2) | global(0)"),
]


@pytest.mark.parametrize("grid, body", GLOBAL_UNIONS)
@pytest.mark.parametrize("block", [(16, 16), (24, 16)])
def test_a_grid_union_with_a_global_is_counted_by_products_over_axes(grid, body, block):
    # global(n) is q < n or k < n: on a grid, raster prefixes (q.y == 0 and q.x < n), products over axes
    # joining the neighborhood's terms; the plan's allowed pairs are their inclusion-exclusion over the
    # whole grid, and tiles where several operands are partial are counted by the same terms
    import math

    import patterndsl as pd
    from patterndsl.analysis import axes, engine

    source = _grid_source(grid, body)
    length = math.prod(grid)
    _exact(source, length, block=block, orders=("identity", "auto"))
    node = pd.compile(source).ir.default
    eng = engine.identity_engine(engine.Sizes(length, length, pd.compile(source).ir.layout, 1), 0, block)
    assert axes.AxisSplit.counting(node, eng.env.layout) is not None
    keys, state = eng.run(node)
    partial = keys[state == engine.PARTIAL]
    by_terms = eng.count_by_terms(node, partial)
    assert by_terms is not None
    np.testing.assert_array_equal(by_terms, engine.count_allowed(eng, node, partial))
    full = keys[state == engine.FULL]
    area = (np.diff(eng.q.starts)[full // eng.nkb] * np.diff(eng.k.starts)[full % eng.nkb]).sum()
    assert eng.total_by_terms(node) == int(area) + int(by_terms.sum())


def test_a_global_covering_the_grid_is_left_to_the_tiles():
    # global(n >= Lk) allows every pair: no raster prefix to write, the other counts apply
    import patterndsl as pd
    from patterndsl.analysis import axes

    pattern = pd.compile(_grid_source((4, 5), "neighborhood(3) | global(20)"))
    assert axes.AxisSplit.counting(pattern.ir.default, pattern.ir.layout) is None
    _exact(_grid_source((4, 5), "neighborhood(3) | global(20)"), 20, block=(8, 8))


@pytest.mark.parametrize(
    "body", ["where(k.x <= q.x) & (neighborhood(5) | global(13))", "~(neighborhood(3) | global(7)) | where(k.y == 0)"]
)
def test_a_nested_union_with_a_global_counts_its_shared_tiles_by_terms(body, monkeypatch):
    # under an intersection or a complement the plan's total is not one product union: its tiles are
    # counted, a tile where the neighborhood and the global are both partial by the union's terms
    from patterndsl.analysis import engine

    calls = []
    real = engine.Engine.count_by_terms

    def spy(self, node, keys):
        out = real(self, node, keys)
        calls.append(out is not None and len(keys) > 0)
        return out

    monkeypatch.setattr(engine.Engine, "count_by_terms", spy)
    _exact(_grid_source((11, 10), body), 110, block=(16, 16), orders=("identity", "auto"))
    assert any(calls)
