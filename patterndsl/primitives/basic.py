"""The nullary primitives ``full``, ``empty`` and ``causal``: every rule of each, for every stage.

Comes in: nothing at import but the registry. Goes out: three registered
:class:`~patterndsl.primitives.registry.Primitive` records (see there for what
each field means). ``k <= q`` compares end-aligned positions.
"""

from __future__ import annotations

import numpy as np

from patterndsl import semantics as sem
from patterndsl.primitives.common import BIG, exact
from patterndsl.primitives.registry import Primitive, register


def _constant(value: bool):
    def classify(prim, qp, kp, env):
        v = np.full(len(qp.fa), value)
        return v, v.copy(), exact(len(qp.fa))

    return classify


FULL = register(
    Primitive(
        "full",
        params=(),
        check=None,
        shape_args=None,
        check_sizes=None,
        reads_head=None,
        meaning=lambda prim, q, k, h, ctx, selection: sem._full_like(True, q, k),
        classify=_constant(True),
        needed_keys=None,
        candidates=None,
        cost=6,
        band=None,
        total=lambda prim, q_len, kv_len, layout, env: q_len * kv_len,
        count=None,
        triton=lambda r, p: r.TRUE,
    )
)

EMPTY = register(
    Primitive(
        "empty",
        params=(),
        check=None,
        shape_args=None,
        check_sizes=None,
        reads_head=None,
        meaning=lambda prim, q, k, h, ctx, selection: sem._full_like(False, q, k),
        classify=_constant(False),
        needed_keys=lambda prim, qlo, qhi, qalo, qahi, env: (
            np.full_like(qlo, BIG),
            np.full_like(qhi, -BIG),
            None,
            None,
        ),
        candidates=None,
        cost=0,
        band=None,
        total=lambda prim, q_len, kv_len, layout, env: 0,
        count=None,
        triton=lambda r, p: r.FALSE,
    )
)

CAUSAL = register(
    Primitive(
        "causal",
        params=(),
        check=None,
        shape_args=None,
        check_sizes=None,
        reads_head=None,
        meaning=lambda prim, q, k, h, ctx, selection: k <= q,
        classify=lambda prim, qp, kp, env: (kp.fmin <= qp.fmax, kp.fmax <= qp.fmin, exact(len(qp.fa))),
        needed_keys=lambda prim, qlo, qhi, qalo, qahi, env: (np.full_like(qlo, -BIG), qhi, None, None),
        candidates=None,
        cost=5,
        band=lambda prim, env: (0, BIG, 1),
        total=None,  # its band total
        count=None,  # its band count
        triton=lambda r, p: "k <= q",
    )
)
