"""Context parallelism, token layouts: which query (and key) tiles every rank holds.

Comes in: a pattern, the sequence length, the number of ranks, a strategy and the tile size
(and the run-time inputs of ``within`` for the per-document strategy). Goes out: a
:class:`Layout`: per rank a sorted set of whole tiles (the last tile of the sequence may be
short), so ranks hold different numbers of tokens when ``seq_len`` does not divide. Strategies:
``contiguous`` (equal runs of tiles), ``balanced`` (the head/tail "zigzag": ``2 * world``
runs, rank ``r`` holding runs ``r`` and ``2 * world - 1 - r``, which evens out causal work),
``documents`` (each packed document stays on one rank unless it is heavier than a rank's share,
then it is zigzagged over as many ranks as it needs; documents are placed heaviest first on the
least loaded rank) and ``auto`` (the least largest per-rank work, then the least traffic). Work
and traffic come from the plan's runs (:mod:`patterndsl.distributed.traffic`).
"""

from __future__ import annotations

import functools
import heapq
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from patterndsl import ir
from patterndsl.distributed import traffic
from patterndsl.errors import InputError, PatternTypeError, did_you_mean

STRATEGIES = ("auto", "contiguous", "balanced", "documents")


@dataclass(frozen=True, eq=False)
class Layout:
    """How a sequence of ``seq_len`` tokens is split over ``world_size`` ranks, in tiles of ``block``.

    Attributes:
        seq_len, world_size, block: the sizes.
        strategy: the strategy that made it.
        rank_tiles: per rank, the sorted int64 tile indices it holds.
        report: for the chosen layout, per rank ``tiles`` (query x key tiles visited: the work) and
            ``received_tokens`` (key/value tokens received from other ranks: the traffic), with
            their maxima and means; filled by :func:`shard`.
    """

    seq_len: int
    world_size: int
    block: int
    strategy: str
    rank_tiles: tuple[np.ndarray, ...]
    report: dict = field(default_factory=dict, compare=False)

    def tiles(self, rank: int) -> np.ndarray:
        return self.rank_tiles[rank]

    def indices(self, rank: int) -> torch.Tensor:
        """int64 global positions of rank ``rank``'s tokens, in the order its shard holds them."""
        t = self.rank_tiles[rank]
        pos = (t[:, None] * self.block + np.arange(self.block)[None, :]).reshape(-1)
        return torch.from_numpy(pos[pos < self.seq_len].astype(np.int64))

    def indices_count(self, rank: int) -> int:
        return int(traffic.tokens(self.rank_tiles[rank], self.rank_tiles[rank] + 1, self.block, self.seq_len).sum())

    @functools.cached_property
    def _chunks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        owner = np.full(-(-self.seq_len // self.block), -1, dtype=np.int64)
        for r, t in enumerate(self.rank_tiles):
            owner[t] = r
        new = np.ones(owner.size, dtype=bool)
        new[1:] = owner[1:] != owner[:-1]
        starts = np.flatnonzero(new)
        ends = np.append(starts[1:], owner.size)
        return starts.astype(np.int64), ends.astype(np.int64), owner[starts]

    def chunks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(start, end, owner)``: the maximal runs of consecutive tiles held by one rank, in order."""
        return self._chunks

    def __repr__(self) -> str:
        sizes = [self.indices_count(r) for r in range(self.world_size)]
        return (
            f"<Layout {self.strategy} seq_len={self.seq_len} world_size={self.world_size} block={self.block} "
            f"tokens={min(sizes)}..{max(sizes)}>"
        )


def _even(count: int, parts: int) -> np.ndarray:
    """Boundaries of ``parts`` runs of ``count`` items whose sizes differ by at most one."""
    return np.array([count * i // parts for i in range(parts + 1)], dtype=np.int64)


def contiguous(seq_len: int, world: int, block: int) -> Layout:
    cut = _even(-(-seq_len // block), world)
    tiles = tuple(np.arange(cut[r], cut[r + 1], dtype=np.int64) for r in range(world))
    return Layout(seq_len, world, block, "contiguous", tiles)


def _zigzag(first: int, count: int, ranks: int) -> list[np.ndarray]:
    """Tiles ``first .. first + count`` as ``2 * ranks`` runs, rank ``r`` taking runs ``r`` and ``2 ranks - 1 - r``."""
    cut = first + _even(count, 2 * ranks)
    return [
        np.concatenate((np.arange(cut[r], cut[r + 1]), np.arange(cut[2 * ranks - 1 - r], cut[2 * ranks - r]))).astype(
            np.int64
        )
        for r in range(ranks)
    ]


def balanced(seq_len: int, world: int, block: int) -> Layout:
    return Layout(seq_len, world, block, "balanced", tuple(_zigzag(0, -(-seq_len // block), world)))


def documents(seq_len: int, world: int, block: int, starts: np.ndarray, work: np.ndarray) -> Layout:
    """Whole documents on the least loaded rank, heaviest first; a document heavier than a share is zigzagged.

    Args:
        starts: sorted first positions of the documents (starting with 0).
        work: visited key tiles of every query tile.
    """
    n_tiles = work.size
    first_tile = np.unique(np.minimum(starts // block, n_tiles))
    bounds = np.append(first_tile[first_tile < n_tiles], n_tiles)
    share = max(work.sum() / world, 1)
    units = []
    cum = np.concatenate(([0], np.cumsum(work)))
    for a, b in itertools.pairwise(bounds):
        a, b = int(a), int(b)
        parts = int(min(world, b - a, max(1, np.ceil((cum[b] - cum[a]) / share))))
        units.extend(_zigzag(a, b - a, parts) if parts > 1 else [np.arange(a, b, dtype=np.int64)])
    units.sort(key=lambda u: -int(work[u].sum()))
    heap = [(0, r) for r in range(world)]
    held: list[list[np.ndarray]] = [[] for _ in range(world)]
    for unit in units:
        load, r = heapq.heappop(heap)
        held[r].append(unit)
        heapq.heappush(heap, (load + int(work[unit].sum()), r))
    tiles = tuple(np.sort(np.concatenate(h)).astype(np.int64) if h else np.zeros(0, np.int64) for h in held)
    return Layout(seq_len, world, block, "documents", tiles)


def within_starts(pattern, seq_len: int, inputs: dict) -> np.ndarray | None:
    """First positions of the segments of the pattern's ``within`` input (every batch element's), or None."""
    names = [
        sub.arg("seg")
        for node in _nodes(pattern.ir)
        for sub in ir.walk(node)
        if isinstance(sub, ir.Prim) and sub.name == "within"
    ]
    if not names or names[0] not in inputs:
        return None
    ids = torch.as_tensor(inputs[names[0]])
    ids = ids.reshape(-1, ids.shape[-1])[:, :seq_len]
    change = (ids[:, 1:] != ids[:, :-1]).any(dim=0)
    return np.concatenate(([0], (torch.nonzero(change).flatten() + 1).numpy())).astype(np.int64)


def _nodes(pir: ir.PatternIR) -> list[ir.Node]:
    return [r.node for r in pir.heads] + ([pir.default] if pir.default is not None else [])


def pattern_heads(pattern) -> int:
    """The head count to plan for when none is given: enough to cover every ``heads A..B`` line."""
    return max([1] + [r.hi for r in pattern.ir.heads])


def evaluate(layout: Layout, vis: traffic.Visits) -> dict:
    """The work (visited tiles) and traffic (received tokens) of every rank of ``layout``."""
    costs = traffic.rank_costs(vis, layout, 1)
    tiles = np.array([c.tiles for c in costs], dtype=np.int64)
    recv = np.array([c.bytes_received for c in costs], dtype=np.int64)
    return {
        "tiles": tiles.tolist(),
        "received_tokens": recv.tolist(),
        "max_tiles": int(tiles.max()),
        "mean_tiles": float(tiles.mean()),
        "max_received_tokens": int(recv.max()),
        "mean_received_tokens": float(recv.mean()),
    }


def shard(pattern, seq_len, world_size, strategy="auto", block=128, heads=None, **inputs) -> Layout:
    """A token layout for ``pattern`` at ``seq_len`` tokens over ``world_size`` ranks (LANGUAGE.md section 11).

    Args:
        pattern: a :class:`patterndsl.Pattern` (static, or with run-time inputs given here).
        seq_len: tokens of the whole sequence.
        world_size: ranks.
        strategy: ``"auto"``, ``"contiguous"``, ``"balanced"`` or ``"documents"`` (needs the input
            of the pattern's ``within``).
        block: tile size (tokens) of the layout and of the plan the traffic follows.
        heads: query heads to plan for (default: enough for every ``heads`` line).
        **inputs: the pattern's run-time inputs, whole.

    Returns:
        The :class:`Layout`, its ``report`` holding the work and traffic of every rank.
    """
    from patterndsl.api import Pattern, _choice, _integer

    if not isinstance(pattern, Pattern):
        raise PatternTypeError(f"shard() needs a patterndsl.Pattern, got {type(pattern).__name__}")
    seq_len = _integer("seq_len", seq_len)
    world_size = _integer("world_size", world_size)
    block = _integer("block", block)
    _choice("strategy", strategy, STRATEGIES)
    heads = pattern_heads(pattern) if heads is None else _integer("heads", heads)
    vis = traffic.plan_visits(pattern, seq_len, heads, block, inputs)
    starts = within_starts(pattern, seq_len, inputs)
    if strategy == "documents" and starts is None:
        hint = did_you_mean(strategy, ("contiguous", "balanced"))
        raise InputError(
            f"strategy='documents' needs a pattern with within(SEG, ...) and its SEG input given to shard(){hint}"
        )
    makers = {
        "contiguous": lambda: contiguous(seq_len, world_size, block),
        "balanced": lambda: balanced(seq_len, world_size, block),
    }
    if starts is not None:
        makers["documents"] = lambda: documents(seq_len, world_size, block, starts, vis.work())
    if strategy != "auto":
        layout = makers[strategy]()
        layout.report.update(evaluate(layout, vis))
        return layout
    best = None
    for make in makers.values():
        layout = make()
        layout.report.update(evaluate(layout, vis))
        key = (layout.report["max_tiles"], layout.report["max_received_tokens"], layout.report["mean_received_tokens"])
        if best is None or key < best[0]:
            best = (key, layout)
    return best[1]
