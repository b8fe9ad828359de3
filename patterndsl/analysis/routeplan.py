"""Stage 4 (block plan), patterns with ``route``: which tiles the run-time choice can change.

Comes in: the analysis :class:`~patterndsl.analysis.engine.Engine` of one head group and its
rewritten node containing ``route``. Goes out: the non-empty tiles with a state each (1
partial, 2 full, 3 decided at run time) and, per tile, whether its element mask reads a
route's choice (the executors must then evaluate it with the run-time selection).

A *possible selection* gives every query group ``a`` any ``k_a = min(topk, n_a)`` of its
``n_a`` candidate blocks, groups and routes independently. A group with ``n_a <= topk`` is
*forced*: it always gets all its candidates. With ``Forced`` (the pairs of forced groups)
and ``Cand`` (all candidate pairs), every selection ``R`` has ``Forced ⊆ R ⊆ Cand``, so the
pattern with each route fixed to ``Forced`` or ``Cand`` by polarity bounds it from below and
above (a route found under both polarities is bounded by ``empty`` / ``full`` instead, as
:func:`patterndsl.semantics.route_bounds` does). Both bounds are static patterns, planned by
the engine with the route as a fixed choice. A tile where the two bounds agree has that
state for every selection. Where they differ the tile is 3 when both bounds are reachable on
it (*box* tiles: every open group meeting it can take all or none of its candidates in the
tile: ``c_in <= k_a <= n_a - c_in``); otherwise, with a single route of one polarity, the
tile is decided exactly from its elements (which blocks of each group hold elements the
choice switches, and how many of its picks a group can or must spend there), and in the
remaining cases (several routes, mixed polarity) it is 3 without proof, which the
statistics count (``extra["tiles_dynamic_unproven"]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from patterndsl import ir, semantics
from patterndsl.analysis import engine as eng


class RouteFacts:
    """The candidates of one route at the engine's sizes, split by whether the choice is forced.

    Attributes:
        cand: sorted candidate pair keys ``a * n_blocks + b``.
        forced: the candidate pairs of forced groups (always chosen).
        n_cand: int64 ``[n_groups]`` candidates per group.
        take: int64 ``[n_groups]`` blocks each group gets (``min(topk, n_cand)``).
        qgroup, kblock: group of every query index, block of every key index.
    """

    def __init__(self, engine: eng.Engine, prim: ir.Prim):
        self.cand, self.n_q, self.n_k, self.qgroup, self.kblock = engine.route_candidates(prim)
        self.n_cand = np.bincount(self.cand // self.n_k, minlength=self.n_q).astype(np.int64)
        self.take = np.minimum(prim.arg("topk"), self.n_cand)
        self.open = self.n_cand > self.take
        if ir.uses_head(prim.arg("among")):
            # The candidates are a union over heads (Engine.route_candidates): a group's run-time
            # candidates may be fewer, so nothing is forced; every candidate tile stays decided
            # at run time.
            self.open = self.n_cand > 0
        self.forced = self.cand[~self.open[self.cand // self.n_k]]


def _states_on(keys: np.ndarray, k2: np.ndarray, s2: np.ndarray) -> np.ndarray:
    out = np.zeros(len(keys), np.int8)
    pos = np.searchsorted(keys, k2)
    out[pos] = s2
    return out


@dataclass(frozen=True)
class RoutedTiles:
    """The tiles of a route pattern for one head group (what :func:`classify` returns).

    Attributes:
        keys, state: sorted non-empty tile keys and their states (1 partial, 2 full, 3 run time).
        route_mask: bool per tile: some route may allow an element there (the mask must be
            computed with the selection).
        open: bool per tile: open candidates meet it (its mask may change with the choice).
        unproven: tiles marked 3 without proof that two choices differ there.
        forced: ``{route: Fixed}``, every route fixed to its forced choice: with
            ``engine.fixing(forced)`` the pattern is exact on every tile no open group's
            candidates meet (used to count allowed pairs).
    """

    keys: np.ndarray
    state: np.ndarray
    route_mask: np.ndarray
    open: np.ndarray
    unproven: int
    forced: dict[ir.Prim, eng.Fixed]


def classify(engine: eng.Engine, node: ir.Node) -> RoutedTiles:
    """Tile states of a route pattern, 3 exactly where two possible selections differ (see module notes).

    Args:
        engine: the head group's engine (identity order, no fixed choice).
        node: the rewritten pattern node, containing ``route``.

    Returns:
        The :class:`RoutedTiles`, or in 1-D a :class:`~patterndsl.analysis.routeruns.RoutedRuns` (the same
        tiles as runs; ``expanded()`` lists them).
    """
    from patterndsl.analysis import routegrid, routelimit, routeruns, routetiles

    runs = routegrid.classify(engine, node)  # 2-D grids of box groups and blocks, as runs
    if runs is not None:
        return runs
    geo = routeruns.geometry(engine, node)
    if geo is not None:
        return routeruns.classify(engine, node, geo)
    if routetiles.usable(engine, node):
        return routetiles.classify(engine, node)
    routelimit.check(engine, node)
    return classify_by_pairs(engine, node)


def classify_by_pairs(engine: eng.Engine, node: ir.Node) -> RoutedTiles:
    """:func:`classify` from the candidate pairs one by one: any route pattern (grids, several routes)."""
    pol = ir.polarities(node)
    facts = {p: RouteFacts(engine, p) for p in pol}
    mixed = {p for p, signs in pol.items() if len(signs) > 1}
    # One incidence per route: the candidate pairs' tiles; forced and open ones are subsets.
    incidence, cand_fix, forced_fix = {}, {}, {}
    for p, f in facts.items():
        owner, tk = engine.route_incidence(p, f.cand)
        is_open = f.open[f.cand[owner] // f.n_k]
        incidence[p] = (owner, tk, is_open)
        cand_fix[p] = (f.cand, *engine.choice_tiles(p, tk))
        forced_fix[p] = (f.forced, *engine.choice_tiles(p, tk[~is_open]))
    low_fix = {p: (forced_fix[p] if pol[p] == {1} else cand_fix[p]) for p in facts if p not in mixed}
    up_fix = {p: (cand_fix[p] if pol[p] == {1} else forced_fix[p]) for p in facts if p not in mixed}
    rewrite = eng.rewrite_for_plan
    lower, upper = rewrite(ir.route_bound(node, True, mixed)), rewrite(ir.route_bound(node, False, mixed))
    keys, up = engine.fixing(up_fix).run(upper)
    k2, s2 = engine.fixing(low_fix).run(lower, keys)
    low = _states_on(keys, k2, s2)
    state = up.copy()
    maybe = np.flatnonzero(low != up)
    # Tiles open candidate pairs meet (the only ones a choice can change), and which of
    # those fail the box test; tiles any candidate meets read a route.
    reads = np.zeros(len(keys), bool)
    opened = np.zeros(len(keys), bool)
    boxed = np.ones(len(maybe), bool)
    for p, f in facts.items():
        owner, tk, is_open = incidence[p]
        at = _positions(keys, tk)
        reads[at[at >= 0]] = True
        opened[at[(at >= 0) & is_open]] = True
        boxed &= _box(engine, p, f, owner[is_open], tk[is_open], keys[maybe])
    if mixed:
        boxed[:] = False  # empty / full bounds are not choices: the box proves nothing
    state[maybe[boxed]] = eng.DYNAMIC
    rest = maybe[~boxed]
    unproven = 0
    if len(rest):
        if len(facts) == 1 and not mixed:
            ((p, f),) = facts.items()
            sign = min(pol[p])
            alone = _route_alone(engine, node, keys[rest])
            if alone.any():
                at = rest[alone]
                state[at] = _alone_states(
                    engine, p, f, sign, keys[at], opened[at], incidence[p], cand_fix[p], forced_fix[p]
                )
            rest = rest[~alone]
            sel_lo = {p: eng.PairTable(low_fix[p][0], f.n_k)}
            sel_up = {p: eng.PairTable(up_fix[p][0], f.n_k)}
            state[rest] = exact_states(engine, node, f, sign, keys[rest], sel_lo, sel_up)
        else:
            state[rest] = eng.DYNAMIC
            unproven = len(rest)
    keep = state > 0
    route_mask = (reads & (state != eng.FULL))[keep]
    return RoutedTiles(keys[keep], state[keep], route_mask, opened[keep], unproven, forced_fix)


def _route_alone(engine: eng.Engine, node: ir.Node, keys: np.ndarray) -> np.ndarray:
    """Per tile: the static bounds (the route as empty / full) are empty and full there, so the
    pattern is the route itself (or its complement) on the tile."""
    rewrite = eng.rewrite_for_plan
    up = _states_on(keys, *engine.run(rewrite(ir.route_bound(node, False)), keys))
    low = _states_on(keys, *engine.run(rewrite(ir.route_bound(node, True)), keys))
    return (low == eng.EMPTY) & (up == eng.FULL)


def _alone_states(engine, prim, f: RouteFacts, sign, keys, opened, incidence, cand_fix, forced_fix) -> np.ndarray:
    """:func:`exact_states` on tiles where the pattern is the route alone, from the incidence's counts.

    The elements the choice switches there are the cells of the open groups' candidates, so a
    group's blocks holding them are its open candidates meeting the tile.
    """
    owner, tk, is_open = incidence
    at = _positions(keys, tk)
    sel = (at >= 0) & is_open
    a = f.cand[owner[sel]] // f.n_k
    t = at[sel]
    # candidate blocks of each (tile, group): each (pair, tile) is listed once
    tg, act = np.unique(t * f.n_q + a, return_counts=True)
    tt, g = tg // f.n_q, tg % f.n_q
    all_ok = np.ones(len(keys), bool)
    none_ok = np.ones(len(keys), bool)
    np.logical_and.at(all_ok, tt, act <= f.take[g])
    np.logical_and.at(none_ok, tt, f.n_cand[g] - act >= f.take[g])
    lo_fix, hi_fix = (forced_fix, cand_fix) if sign > 0 else (cand_fix, forced_fix)
    lo_at, hi_at = _positions(lo_fix[1], keys), _positions(hi_fix[1], keys)
    if sign > 0:  # the lower bound's route meets the tile; the upper one fills it
        fixed_on = lo_at >= 0
        hi_full = (hi_at >= 0) & (hi_fix[2][hi_at] == eng.FULL)
    else:  # the lower bound's complement meets it (the route does not fill it); the upper one's is full
        fixed_on = ~((lo_at >= 0) & (lo_fix[2][lo_at] == eng.FULL))
        hi_full = hi_at < 0
    return states_from_counts(sign, fixed_on, hi_full, opened, all_ok, none_ok)


def _positions(sorted_keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of each value in ``sorted_keys`` (unique), -1 where absent."""
    if not len(sorted_keys):
        return np.full(len(values), -1, np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, values), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == values, pos, -1)


def _box(engine: eng.Engine, prim, f: RouteFacts, owner, tkeys, maybe: np.ndarray) -> np.ndarray:
    """Per tile of ``maybe``: can every open group meeting it take all or none of its candidates there.

    ``owner`` / ``tkeys``: the incidence of the open candidate pairs (``owner`` indexes ``f.cand``).
    The candidates of group ``a`` inside tile ``(m, n)`` do not depend on ``m``: they are
    counted per (group, key tile), where each (pair, key tile) is listed once per query tile
    the group meets.
    """
    out = np.ones(len(maybe), bool)
    if not len(maybe) or not len(tkeys):
        return out
    nkb = engine.nkb
    a = f.cand[owner] // f.n_k
    an = a * nkb + tkeys % nkb
    if engine.route_pairs_per_tile(prim)[1].max() <= 1:
        c_in = np.ones(len(an), np.int64) * engine.route_tiles_per_group(prim)[a]  # one block per key tile
    elif f.n_q * nkb <= eng._DENSE_TILES:
        c_in = np.bincount(an, minlength=f.n_q * nkb)[an]
    else:
        _, inv, cnt = np.unique(an, return_inverse=True, return_counts=True)
        c_in = cnt[inv]
    c_in = c_in // engine.route_tiles_per_group(prim)[a]
    bad = (c_in > f.take[a]) | (f.n_cand[a] - c_in < f.take[a])
    at = _positions(maybe, tkeys[bad])
    out[at[at >= 0]] = False
    return out


def exact_states(engine: eng.Engine, node, f, sign: int, keys, sel_lo, sel_up) -> np.ndarray:
    """Exact states of tiles ``keys`` when the pattern has one route, of one polarity, from their elements.

    ``f`` holds the route's ``n_q``, ``n_k``, ``qgroup``, ``kblock``, ``n_cand`` and ``take`` (a
    :class:`RouteFacts`); ``sel_lo`` / ``sel_up`` are the lower / upper bound's fixed choices as
    :func:`patterndsl.semantics.evaluate` takes a selection.

    On such a tile an element the two bounds disagree on is allowed exactly when its pair is
    chosen (``sign`` +1) or not chosen (-1); elements the bounds agree on are fixed. Per group,
    ``act`` counts the candidate blocks holding such elements: the tile can be empty / full
    when every group can choose (or avoid) all of its ``act`` blocks within its ``k_a`` picks.
    """
    engine.tally.evaluated += 2 * len(keys)
    engine.tally.elements += 2 * len(keys) * engine.q.block * engine.k.block
    out = np.zeros(len(keys), np.int8)
    qgroup, kblock = torch.from_numpy(f.qgroup), torch.from_numpy(f.kblock)
    for part, i, j, valid in engine.chunks(keys):
        lo = semantics.evaluate(node, i, j, engine.env.head, engine.ctx, sel_lo) & valid
        hi = semantics.evaluate(node, i, j, engine.env.head, engine.ctx, sel_up) & valid
        fixed_on = lo.flatten(1).any(1).numpy()
        hi_full = (hi | ~valid).flatten(1).all(1).numpy()
        switch = lo != hi
        t, r, c = torch.nonzero(switch, as_tuple=True)
        a, b = qgroup[i[t, r, 0]].numpy(), kblock[j[t, 0, c]].numpy()
        # distinct (tile, group, block) holding switched elements, then blocks per (tile, group)
        tgb = np.unique((t.numpy() * f.n_q + a) * f.n_k + b)
        tg, act = np.unique(tgb // f.n_k, return_counts=True)
        g, tt = tg % f.n_q, tg // f.n_q
        can_all = act <= f.take[g]  # the group can choose every such block
        can_none = f.n_cand[g] - act >= f.take[g]  # ... or avoid every one
        width = len(i)
        all_ok = np.ones(width, bool)
        none_ok = np.ones(width, bool)
        np.logical_and.at(all_ok, tt, can_all)
        np.logical_and.at(none_ok, tt, can_none)
        switching = np.bincount(tt, minlength=width) > 0
        out[part] = states_from_counts(sign, fixed_on, hi_full, switching, all_ok, none_ok)
    return out


def states_from_counts(sign: int, fixed_on, hi_full, switching, all_ok, none_ok) -> np.ndarray:
    """Per tile, the state every choice gives it, or 3 (see :func:`exact_states`).

    Args:
        sign: the route's polarity.
        fixed_on: bool, the lower bound allows some pair of the tile.
        hi_full: bool, the upper bound allows every pair.
        switching: bool, some element of the tile changes with the choice.
        all_ok / none_ok: bool, every group can choose / avoid all its blocks holding such elements.
    """
    if sign > 0:  # allowed when chosen
        can_empty, can_full = ~fixed_on & none_ok, hi_full & all_ok
    else:  # allowed when not chosen
        can_empty, can_full = ~fixed_on & all_ok, hi_full & none_ok
    always_full = hi_full & ~switching
    can_nonempty = fixed_on | switching
    least = np.where(can_empty, eng.EMPTY, np.where(always_full, eng.FULL, eng.PARTIAL))
    most = np.where(can_full, eng.FULL, np.where(can_nonempty, eng.PARTIAL, eng.EMPTY))
    return np.where(least == most, least, eng.DYNAMIC).astype(np.int8)
