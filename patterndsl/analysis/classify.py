"""Stage 4 (block plan), per-primitive tile classification by interval and congruence reasoning.

Comes in: one static primitive and pairs of tile pieces (query piece x key
piece, each a product of per-axis arithmetic progressions, see
:mod:`patterndsl.analysis.tiles`). Goes out: per pair, whether some element
is allowed (``N``), whether every element is allowed (``F``), and whether the
answer is exact (``ok``); pairs that are not exact are evaluated element-wise
by the engine. Also: the "needed key range" of a query tile, used to
enumerate candidate tiles without scanning all pairs. The rules themselves
are the ``classify`` and ``needed_keys`` fields of each primitive's registry
record (:mod:`patterndsl.primitives`); every rule reasons on the
progressions' ends, steps and residues, never on individual positions (apart
from per-axis tables of a grid axis's length for neighborhoods).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from patterndsl import ir, primitives
from patterndsl.analysis.tiles import Pieces
from patterndsl.primitives.band import band
from patterndsl.primitives.common import BIG
from patterndsl.primitives.neighborhood import neighborhood_axes, window_table
from patterndsl.primitives.where import halfplane_of, linear_form
from patterndsl.sizes import Sizes

__all__ = [
    "BIG",
    "Env",
    "band",
    "classify",
    "gcd_all",
    "halfplane_of",
    "linear_form",
    "needed_keys",
    "neighborhood_axes",
    "window_table",
]


@dataclass
class Env:
    """What the classifiers need besides the pieces: the sizes, the head, caches.

    ``q_len``, ``kv_len``, ``layout``, ``heads`` and ``offset`` read the :class:`Sizes`;
    ``heads`` is the query head count of the whole pattern (0: unknown): ``route``
    candidates whose ``among`` reads ``h`` are the union over these heads (see
    ``Engine.route_candidates``).
    """

    sizes: Sizes
    head: int
    cache: dict = field(default_factory=dict)
    #: Elements tile rules evaluated themselves (one-sided ``where`` pieces), for the plan's stats.
    elements: int = 0

    @property
    def q_len(self) -> int:
        return self.sizes.q_len

    @property
    def kv_len(self) -> int:
        return self.sizes.kv_len

    @property
    def layout(self) -> ir.Layout | None:
        return self.sizes.layout

    @property
    def heads(self) -> int:
        return self.sizes.heads

    @property
    def offset(self) -> int:
        return self.sizes.offset


def classify(prim: ir.Prim, qp: Pieces, kp: Pieces, env: Env):
    """``(N, F, ok)`` for a static primitive on aligned arrays of query/key pieces.

    The primitive's ``classify`` rule decides; without one (or when it declines), every
    pair may be non-empty, none is known full, and none is exact (evaluated by the engine).
    """
    rule = primitives.lookup(prim.name).classify
    out = None if rule is None else rule(prim, qp, kp, env)
    if out is not None:
        return out
    size = len(qp.fa)
    o = np.ones(size, dtype=bool)
    return o, np.zeros(size, dtype=bool), np.zeros(size, dtype=bool)


def needed_keys(prim: ir.Prim, qlo: np.ndarray, qhi: np.ndarray, qalo, qahi, env: Env):
    """Flattened key-position range ``[lo, hi]`` a query tile with positions in ``[qlo, qhi]`` can reach.

    Returns ``(lo, hi, axis_lo, axis_hi)`` (per-axis ranges or None), or None when the
    primitive may reach any key (the candidates are then all key tiles).
    """
    rule = primitives.lookup(prim.name).needed_keys
    return None if rule is None else rule(prim, qlo, qhi, qalo, qahi, env)


def gcd_all(values) -> int:
    """gcd of an iterable of ints (0 for none)."""
    out = 0
    for v in values:
        out = math.gcd(out, int(v))
    return out
