"""Stage 4 (block plan), coarse to fine: the tiles of a static 1-D pattern in identity order, level by level.

Comes in: the engine of the fine tiles (identity order, no layout) and a static pattern node.
Goes out: :class:`Layered` — runs of full tiles found whole at coarse levels, and the fine
tiles (sorted keys and states) inside the coarse tiles that are neither empty nor full.

A plan with many non-empty tiles (``causal`` at a million tokens has 33 million) is mostly the
inside of large regions: a coarse tile (``2**l x 2**l`` fine tiles) that the tile rules find
full is full in every fine tile under it (each fine tile's pairs are some of its pairs), and
one they find empty is empty in all of them. So the tiles are classified from a coarse grid
of about :data:`TOP_TILES` tiles down, halving the tile size at each level and classifying
only the four children of the coarse tiles still undecided; element-wise evaluation happens
at the fine level only. The work follows the boundary of the allowed region (about
``nqb * levels`` tiles for ``causal``), and the full regions stay runs, never listed tile by
tile (:class:`~patterndsl.analysis.plan.Runs`; the lists are built when an executor reads them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patterndsl import ir, primitives
from patterndsl.analysis import coarsen, tiles
from patterndsl.analysis import engine as eng

#: Tiles of the first (coarsest) level.
TOP_TILES = 1 << 12
#: Plans of at most this many tiles are classified directly at the fine level.
FLAT_TILES = 1 << 16
#: The levels are used when at least one in this many non-empty tiles of the first level is full
#: (0: always).
PAYS = 4
#: Outside the identity order, the first level with at least this many non-empty tiles (or the
#: last one) is the one tested.
PAYS_TILES = 256


@dataclass(frozen=True)
class Layered:
    """One head group's non-empty tiles: fine tiles listed, full regions as runs.

    Attributes:
        keys: sorted fine keys ``m * nkb + n`` classified at the fine level (not under a full run).
        state: their states (1 partial, 2 full).
        row, lo, hi: runs of full fine tiles: query tile ``row[i]`` and key tiles ``lo[i] <= n < hi[i]``
            (disjoint from ``keys``).
        partial: ``(row, lo, hi)`` runs of partial fine tiles found by :func:`_columns` (disjoint from
            the others), and ``partial_allowed`` the allowed pairs they hold.
    """

    keys: np.ndarray
    state: np.ndarray
    row: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    partial: tuple[np.ndarray, np.ndarray, np.ndarray]
    partial_allowed: int


def levels(nqb: int, nkb: int) -> int:
    """Coarse levels above the fine tiles: 0 (classify directly) for small plans."""
    if nqb * nkb <= FLAT_TILES:
        return 0
    lvl = 0
    while -(-nqb >> lvl) * -(-nkb >> lvl) > TOP_TILES:
        lvl += 1
    return lvl


def usable(node: ir.Node, qside: tiles.Side, kside: tiles.Side, layout, reordered: bool = False) -> bool:
    """Whether :func:`classify` applies: a static node, 1-D positions in identity order (or any order
    with ``reordered``: :mod:`~patterndsl.analysis.coarsen`), many tiles."""
    return (
        layout is None
        and ((qside.identity and kside.identity) or reordered)
        and not ir.is_dynamic(node)
        and levels(qside.n_tiles, kside.n_tiles) > 0
    )


def _coarse_side(fine: tiles.Side, factor: int) -> tiles.Side:
    if not fine.identity:
        return coarsen.coarse_side(fine, factor)
    segs = tiles.identity_segments(fine.length, fine.offset, fine.extents)
    return tiles.build_side(segs, fine.length, fine.block * factor, fine.offset, fine.extents, True)


def classify(engine: eng.Engine, node: ir.Node) -> Layered | None:
    """The non-empty tiles of ``node`` on ``engine``'s sides, coarse levels first.

    Args:
        engine: the fine engine (its sides in identity order); coarse engines share its
            environment and tally.
        node: a static pattern node (rewritten for planning).

    Returns:
        A :class:`Layered`, or None when the first level finds too few full tiles for the levels
        to pay (random or strided columns in every coarse tile): then classify the fine tiles directly.
    """
    nqb, nkb = engine.nqb, engine.nkb
    top = levels(nqb, nkb)
    domain = None
    runs = {True: ([], [], []), False: ([], [], [])}  # full, partial
    partial_allowed = 0
    decide = engine.node_decide(node)
    identity = engine.q.identity and engine.k.identity
    test = True
    for lvl in range(top, 0, -1):
        f = 1 << lvl
        qs, ks = _coarse_side(engine.q, f), _coarse_side(engine.k, f)
        coarse = eng.Engine(qs, ks, engine.env, tally=engine.tally, coarse=True)
        keys, state = coarse.run(node, domain)
        nkc = ks.n_tiles
        cm, cn = keys // nkc, keys % nkc
        full = state == eng.FULL
        partial = np.zeros(len(full), bool)
        allowed = 0
        if identity:  # key columns and periodic regions are found on position ranges
            uniform, allowed = _columns(engine, node, decide, cm[~full], cn[~full], f)
            partial[np.flatnonzero(~full)[uniform]] = True
        if test and (identity or len(full) >= PAYS_TILES or lvl == 1):
            # in another order the first level may be a few class pairs, all undecided: the test
            # waits for a level with enough tiles to tell
            test = False
            if PAYS and int(full.sum() + partial.sum()) * PAYS < len(full):
                return None  # few whole regions: the levels would classify about every tile several times
        partial_allowed += allowed
        for kind, sel in ((True, full), (False, partial)):
            # A coarse run covers the same key range in each of its fine rows.
            fm, flo, fhi = merge_runs(cm[sel], cn[sel], cn[sel] + 1)
            sub = np.arange(f, dtype=np.int64)
            r = (fm[:, None] * f + sub[None, :]).reshape(-1)
            ok = r < nqb
            runs[kind][0].append(r[ok])
            runs[kind][1].append(np.repeat(flo * f, f)[ok])
            runs[kind][2].append(np.minimum(np.repeat(fhi * f, f), nkb)[ok])
        # The four children of every undecided coarse tile are the next level's domain.
        half = f >> 1
        nq1, nk1 = -(-nqb // half), -(-nkb // half)
        rest = ~full & ~partial
        pm, pn = cm[rest], cn[rest]
        two = np.arange(2, dtype=np.int64)
        m = (pm[:, None, None] * 2 + two[None, :, None]).repeat(2, axis=2)
        n = (pn[:, None, None] * 2 + two[None, None, :]).repeat(2, axis=1)
        ok = (m < nq1) & (n < nk1)
        domain = np.sort(m[ok] * nk1 + n[ok])
        if not len(domain):
            break
    if domain is not None and not len(domain):
        keys, state = np.zeros(0, np.int64), np.zeros(0, np.int8)
    else:
        keys, state = engine.run(node, domain)
    cat = {
        kind: [np.concatenate(x).astype(np.int64) if x else np.zeros(0, np.int64) for x in parts]
        for kind, parts in runs.items()
    }
    return Layered(keys, state, *merge_runs(*cat[True]), merge_runs(*cat[False]), partial_allowed)


#: Undecided key ranges :func:`_columns` may hold for one key tile at once (beyond it the tile fails).
_COLUMN_BOXES = 8


def _columns(
    engine: eng.Engine, node: ir.Node, decide, cm: np.ndarray, cn: np.ndarray, f: int
) -> tuple[np.ndarray, int]:
    """Which undecided coarse tiles ``(cm, cn)`` (factor ``f``) are partial in every fine tile, column by column.

    Coarse tiles of one coarse key column and consecutive coarse rows form a region; for every fine key
    tile ``n`` of the column, its key range is cut (halving) into ranges the tile rules find full or
    empty for *all* the region's queries. When every ``n`` is cut completely into such ranges and has
    both kinds, every fine tile of the region holds an allowed and a blocked pair (partial), and its
    allowed pairs are its rows times the keys of the full ranges: key columns such as
    ``causal & (blocks(128) | summary(128, 8))`` below the diagonal (every tile partial, ~L^2/2 tiles)
    become runs. Regions that pass :func:`_periodic_test` (cheaper, tried first with every trim) are
    not column-tested. A region that fails a test is retried without its first, its last, both end
    coarse rows, or its first two (the diagonal or the band's edges usually lie there); what fails
    both is refined as before.

    Returns:
        ``(uniform, allowed)``: bool per coarse tile, and the allowed pairs of the uniform tiles.
    """
    uniform = np.zeros(len(cm), bool)
    if not len(cm):
        return uniform, 0
    order = np.lexsort((cm, cn))
    m, n = cm[order], cn[order]
    new = np.ones(len(m), bool)
    new[1:] = (n[1:] != n[:-1]) | (m[1:] != m[:-1] + 1)
    start = np.flatnonzero(new)
    end = np.append(start[1:], len(m)) - 1
    total = 0
    done = np.zeros(len(start), bool)
    # Periodic regions first (one fine tile each, every trim), then the column test on the others,
    # one fine key tile (the middle one) of each region first: most regions that fail, fail there.
    for periodic in (True, False):
        for head, tail in ((0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (2, 1)):
            todo = np.flatnonzero(~done & (end - start >= head + tail))
            a, b = start[todo] + head, end[todo] - tail
            if periodic:
                ok, allowed = _periodic_test(engine, node, n[a], m[a], m[b], f)
                total += int(allowed.sum())
            else:
                ok, _ = _column_test(engine, decide, n[a], m[a], m[b], f, sample=True)
                maybe = np.flatnonzero(ok)
                ok[maybe], allowed = _column_test(engine, decide, n[a][maybe], m[a][maybe], m[b][maybe], f)
                total += int(allowed[ok[maybe]].sum())
            done[todo[ok]] = True
            for x, y in zip(a[ok].tolist(), b[ok].tolist(), strict=True):
                uniform[order[x : y + 1]] = True
    return uniform, total


def _periodic_test(engine: eng.Engine, node: ir.Node, col, m0, m1, f) -> tuple[np.ndarray, np.ndarray]:
    """Per region: every fine tile is partial because every fine tile holds the same mask; and its allowed pairs.

    That holds when each primitive of ``node`` is, on the region's box, either decided whole (full
    or empty) by its tile rule, or repeats with periods dividing the tile sizes (its record's
    ``shift_periods``: ``where(k % 4 == 0)``), or a band ``lo <= q - k <= hi, (q - k) % mod == 0`` whose limits the
    region's ``q - k`` stays inside with ``mod`` dividing both tile sizes (the Sparse Transformer's
    ``strided`` below its window): shifting a fine tile by whole tiles changes no primitive's mask.
    The regions hold full-size tiles only; one representative fine tile is classified (and counted)
    for each, and regions whose representative is partial pass.
    """
    q, k = engine.q, engine.k
    ok = np.zeros(len(col), bool)
    r0, r1 = m0 * f, np.minimum((m1 + 1) * f, q.n_tiles)
    c0, c1 = col * f, np.minimum(col * f + f, k.n_tiles)
    # full-size fine tiles only
    ok = ((r1 * q.block <= q.length) & (c1 * k.block <= k.length)) if len(col) else ok
    if not ok.any():
        return np.zeros(len(col), bool), np.zeros(0, np.int64)
    qlo, qhi = q.offset + r0 * q.block, q.offset + r1 * q.block - 1
    klo, khi = c0 * k.block, c1 * k.block - 1
    from patterndsl.primitives.intervals import Boxes

    box = Boxes(qlo, qhi, klo, khi, qlo[:, None], qhi[:, None], klo[:, None], khi[:, None])
    for prim in {p for p in ir.walk(node) if isinstance(p, ir.Prim)}:
        band = eng.band_of(prim, engine.env)
        if band is not None:
            lo, hi, mod = band
            inside = (qlo - khi >= lo) & (qhi - klo <= hi) & (q.block % mod == 0) & (k.block % mod == 0)
            outside = (qhi - klo < lo) | (qlo - khi > hi)
            ok &= inside | outside
            continue
        if _repeats_by_tiles(prim, engine):
            continue  # the same mask in every fine tile of any region
        can_true, can_false, sound = engine.prim_decide(prim)(box)
        ok &= sound & ~(can_true & can_false)
    if not ok.any():
        return ok, np.zeros(0, np.int64)
    rep = r0[ok] * engine.nkb + c0[ok]
    order = np.argsort(rep)
    keys, state = engine.run(node, rep[order])
    st = np.zeros(len(rep), np.int8)
    st[order[np.searchsorted(rep[order], keys)]] = state
    partial = st == eng.PARTIAL
    counts = np.zeros(len(rep), np.int64)
    counts[partial] = eng.count_tiles(engine, node, rep[partial])
    tiles = ((r1 - r0) * (c1 - c0))[ok]
    which = np.flatnonzero(ok)
    ok[which[~partial]] = False
    return ok, (counts * tiles)[partial]


def _repeats_by_tiles(prim: ir.Prim, engine: eng.Engine) -> bool:
    # A primitive whose meaning repeats with periods that divide the tile sizes (``where(k % 4 == 0)``).
    rule = primitives.lookup(prim.name).shift_periods
    found = None if rule is None else rule(prim, engine.env)
    return found is not None and engine.q.block % found[0] == 0 and engine.k.block % found[1] == 0


def _column_test(engine: eng.Engine, decide, col, m0, m1, f, sample=False) -> tuple[np.ndarray, np.ndarray]:
    """Per region (coarse key column ``col``, coarse rows ``m0..m1``): all partial, and its allowed pairs.

    With ``sample``, only the middle fine key tile of each region is tested (a necessary condition).
    """
    from patterndsl.primitives.intervals import Boxes

    q, k = engine.q, engine.k
    if not len(col):
        return np.zeros(0, bool), np.zeros(0, np.int64)
    # the region's query positions and its fine key tiles
    qlo = q.offset + m0 * f * q.block
    qhi = q.offset + np.minimum((m1 + 1) * f * q.block, q.length) - 1
    n0, n1 = col * f, np.minimum(col * f + f, k.n_tiles)
    if sample:
        n0 = (n0 + n1) // 2
        n1 = n0 + 1
    count = n1 - n0
    region = np.repeat(np.arange(len(col)), count)
    tile = np.repeat(n0 - (np.cumsum(count) - count), count) + np.arange(int(count.sum()))
    pairs = len(tile)
    has_full, has_empty, bad = np.zeros(pairs, bool), np.zeros(pairs, bool), np.zeros(pairs, bool)
    full_keys = np.zeros(pairs, np.int64)
    owner = np.arange(pairs)
    lo, hi = tile * k.block, np.minimum((tile + 1) * k.block, k.length) - 1
    while len(owner):
        r = region[owner]
        ql, qh = qlo[r], qhi[r]
        box = Boxes(ql, qh, lo, hi, ql[:, None], qh[:, None], lo[:, None], hi[:, None])
        can_true, can_false, sound = decide(box)
        full, empty = sound & ~can_false, sound & ~can_true
        has_full[owner[full]] = True
        has_empty[owner[empty]] = True
        full_keys += np.bincount(owner[full], (hi - lo + 1)[full], pairs).astype(np.int64)
        open_ = ~full & ~empty
        bad[owner[open_ & (lo == hi)]] = True
        split = open_ & (lo < hi)
        owner, lo, hi = owner[split], lo[split], hi[split]
        mid = (lo + hi) // 2
        owner, lo, hi = np.repeat(owner, 2), np.stack([lo, mid + 1], 1).ravel(), np.stack([mid, hi], 1).ravel()
        bad |= np.bincount(owner, minlength=pairs) > _COLUMN_BOXES
        # one bad key tile fails its region: drop the region's other ranges too
        failed = np.bincount(region, bad, len(col)) > 0
        keep = ~failed[region[owner]]
        owner, lo, hi = owner[keep], lo[keep], hi[keep]
    pair_ok = ~bad & has_full & has_empty
    ok = np.bincount(region, ~pair_ok, len(col)) == 0
    allowed = np.bincount(region, full_keys, len(col)).astype(np.int64) * (qhi - qlo + 1)
    return ok, allowed


def merge_runs(key: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union of intervals ``[lo, hi)`` per ``key``: sorted, disjoint, non-adjacent ``(key, lo, hi)``."""
    keep = hi > lo
    key, lo, hi = key[keep], lo[keep], hi[keep]
    if key.size == 0:
        return key, lo, hi
    order = np.lexsort((lo, key))
    key, lo, hi = key[order], lo[order], hi[order]
    span = int(max(hi.max(), 1)) + 1
    a, b = key * span + lo, key * span + hi
    reach = np.maximum.accumulate(b)
    new = np.ones(key.size, dtype=bool)
    new[1:] = a[1:] > reach[:-1]
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], key.size) - 1
    return key[starts], lo[starts], reach[ends] - key[starts] * span
