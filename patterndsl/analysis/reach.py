"""Stage 4 (block plan), connectivity: how many stacked layers a pattern needs to connect every allowed pair.

Comes in: a bound pattern, a sequence length and a layer count. Goes out: a
:class:`Reach` saying whether, with the pattern stacked ``layers`` times (and
residual connections, so a position keeps what it already has), every query
has received information from every key it may depend on (keys ``<=`` the
query for a causal pattern, every key otherwise), and the smallest layer
count for which that holds (None if never).

How, without L x L matrix powers: the allowed pairs come from the exact block
plan at 1x1 tiles (its CSR lists, so the cost is the number of allowed pairs);
positions are contracted into classes of *twins* (identical allowed keys and
identical attending queries), which is exact because twins are
interchangeable on any walk; distances are breadth-first searches with
networkx on the class graph. A walk of length ``n`` from key ``j`` to query
``i`` (an edge ``x -> y`` when ``y`` attends ``x``) is exactly "``i`` has seen
``j`` after ``n`` layers".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from patterndsl import ir
from patterndsl.errors import PatternValueError

if TYPE_CHECKING:
    import networkx as nx

MAX_PAIRS = 4_000_000
MAX_WORK = 300_000_000  # class-graph BFS edge visits (networkx: roughly 1e6-1e7 per second)


@dataclass(frozen=True)
class Reach:
    """Result of :func:`reachability`.

    Attributes:
        seq_len: the sequence length analysed.
        layers: the layer count asked about.
        causal: True when no query may attend a later key (then only keys ``<=`` a query are required).
        reaches: whether ``layers`` layers connect every required pair.
        min_layers: the smallest layer count that does, or None if no depth does.
        classes: number of position classes in the contracted graph.
        tile_lower_bound: with ``block`` given, the layer count the tile graph needs (a lower
            bound on ``min_layers``: an element walk is also a tile walk), else None.
    """

    seq_len: int
    layers: int
    causal: bool
    reaches: bool
    min_layers: int | None
    classes: int
    tile_lower_bound: int | None = None

    def text(self) -> str:
        """Human-readable lines for ``patterndsl show --stage reach``."""
        kind = "causal (keys <= query required)" if self.causal else "non-causal (every key required)"
        need = "never" if self.min_layers is None else str(self.min_layers)
        verdict = "yes" if self.reaches else "no"
        return "\n".join(
            [
                f"pattern: {kind}, sequence length {self.seq_len}",
                f"every query reaches every required key after {self.layers} layer(s): {verdict}",
                f"smallest number of layers that does: {need}",
                f"contracted graph: {self.classes} position classes",
            ]
            + ([] if self.tile_lower_bound is None else [f"tile-graph lower bound: {self.tile_lower_bound} layer(s)"])
        )


def _twin_classes(row_ptr: np.ndarray, cols: np.ndarray, length: int):
    # Column lists: which queries attend each key.
    order = np.argsort(cols, kind="stable")
    rows = np.repeat(np.arange(length), np.diff(row_ptr))
    col_ptr = np.zeros(length + 1, dtype=np.int64)
    col_ptr[1:] = np.cumsum(np.bincount(cols, minlength=length))
    rows_t = rows[order]
    ids: dict = {}
    cls = np.empty(length, dtype=np.int64)
    for x in range(length):
        key = (cols[row_ptr[x] : row_ptr[x + 1]].tobytes(), rows_t[col_ptr[x] : col_ptr[x + 1]].tobytes())
        cls[x] = ids.setdefault(key, len(ids))
    return cls, len(ids), rows


def _max_distance(graph: nx.DiGraph, n: int, required) -> int | None:
    """Largest shortest-walk length (>= 1 for a node to itself) over required ``(src, dst)``; None if one is missing."""
    import networkx as nx

    worst = 1
    for src in range(n):
        dist = nx.single_source_shortest_path_length(graph, src)
        for t in required(src):
            if t == src:
                d = min((dist[p_] + 1 for p_ in graph.predecessors(src) if p_ in dist), default=None)
            else:
                d = dist.get(t)
            if d is None:
                return None
            worst = max(worst, d)
    return worst


def _tile_bound(pir, seq_len: int, head: int, block, causal: bool) -> int | None:
    import networkx as nx

    from patterndsl.analysis.planner import plan

    if len(block) != 2 or block[0] != block[1]:
        raise PatternValueError(
            f"the tile-graph bound needs square tiles (a walk goes key tile -> query tile), got {block}"
        )
    p = plan(pir, seq_len, seq_len, head + 1, block=block, order="identity")
    tl = p.group_of(head).tiles
    nqb = p.n_q_tiles
    graph = nx.DiGraph()
    graph.add_nodes_from(range(nqb))
    rows = np.repeat(np.arange(nqb), np.diff(tl.row_ptr.numpy()))
    graph.add_edges_from(zip(tl.cols.tolist(), rows.tolist(), strict=True))
    bm, bn = p.block
    # required tile pairs: some key index of tile n is <= some (other) query index of tile m
    qlast = np.minimum((np.arange(nqb) + 1) * bm, seq_len) - 1

    def required(n):
        first = n * bn
        need = qlast > first if causal else np.ones(nqb, dtype=bool)
        need[n] = qlast[n] > first
        return np.flatnonzero(need).tolist()

    return _max_distance(graph, nqb, required)


def reachability(pir: ir.PatternIR, seq_len: int, layers: int = 1, head: int = 0, block=None) -> Reach:
    """Whether ``layers`` stacked layers of the pattern connect every required (query, key) pair.

    Args:
        pir: the bound pattern (must be static).
        seq_len: sequence length (queries and keys).
        layers: number of stacked layers to ask about (>= 1).
        head: which head's pattern to analyse.
        block: optional ``(BM, BN)``: also report the tile graph's layer count (a lower bound).

    Returns:
        A :class:`Reach`.

    Raises:
        PatternError: dynamic patterns, bad sizes, or a size too large for the exact analysis.
    """
    # networkx is imported here, not at module level: planning (and so every first call) never needs it.
    import networkx as nx

    from patterndsl.analysis.planner import plan

    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise PatternValueError(f"layers must be a positive integer, got {layers!r}")
    node = pir.node_for_head(head)
    if node is not None and ir.is_dynamic(node):
        raise PatternValueError("reachability needs a static pattern: route(...) is chosen at run time")
    p = plan(pir, seq_len, seq_len, head + 1, block=(1, 1), order="identity")
    tl = p.group_of(head).tiles
    if tl.nnz > MAX_PAIRS:
        raise PatternValueError(
            f"{tl.nnz} allowed pairs at length {seq_len}: too many for the exact connectivity analysis "
            f"(limit {MAX_PAIRS}); use a shorter sequence"
        )
    row_ptr, cols = tl.row_ptr.numpy(), tl.cols.numpy()
    cls, n_cls, rows = _twin_classes(row_ptr, cols, seq_len)
    causal = not bool((cols > rows).any())
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n_cls))
    edges = np.unique(cls[cols] * n_cls + cls[rows])
    graph.add_edges_from(zip((edges // n_cls).tolist(), (edges % n_cls).tolist(), strict=True))
    if n_cls * max(graph.number_of_edges(), 1) > MAX_WORK:
        raise PatternValueError(
            f"the contracted graph has {n_cls} classes and {graph.number_of_edges()} edges: too large for the "
            "exact connectivity analysis; use a shorter sequence"
        )
    size = np.bincount(cls, minlength=n_cls)
    lo = np.full(n_cls, seq_len)
    hi = np.full(n_cls, -1)
    np.minimum.at(lo, cls, np.arange(seq_len))
    np.maximum.at(hi, cls, np.arange(seq_len))

    def required(src):
        need = hi > lo[src] if causal else np.ones(n_cls, dtype=bool)
        need[src] = size[src] >= 2
        return np.flatnonzero(need).tolist()

    worst = _max_distance(graph, n_cls, required)
    bound = None if block is None else _tile_bound(pir, seq_len, head, tuple(block), causal)
    return Reach(seq_len, layers, causal, worst is not None and worst <= layers, worst, n_cls, bound)
