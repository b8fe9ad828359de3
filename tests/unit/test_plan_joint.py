"""An intersection's joint search (Engine.search with narrow / whole) against the dense meaning.

The joint search lists the tiles in the pass that finds the boundary narrow (no count first) and
marks the tiles under hulls where every operand surely holds: those are full without classifying
the operands there. Every such tile must be full in the dense mask, the listed tiles must be the
plain search's, a narrow search must give up exactly when the count gives up, and the engine's
states must equal the dense reference's.
"""

from __future__ import annotations

import numpy as np
import pytest

import patterndsl
from patterndsl import semantics
from patterndsl.analysis import engine as eng
from patterndsl.sizes import Sizes

CASES = [
    ("causal & ~(sink(8) | where(q // 8 - k // 8 <= 1))", 300, 300, (16, 8)),
    ("causal & (sink(8) | where(q // 8 - k // 8 <= 1))", 300, 300, (16, 16)),
    ("causal & where(q // 32 - k // 32 <= 2)", 256, 320, (16, 24)),
    ("where(k >= q // 3) & ~where(abs(q // 16 - k // 16) <= 1)", 240, 240, (8, 8)),
]


def _dense_states(node, sizes: Sizes, tile) -> np.ndarray:
    mask = semantics.mask(patterndsl.compile(f"pattern p {{ {node} }}").ir, sizes.q_len, sizes.kv_len, 1)[0]
    bm, bn = tile
    nqb, nkb = -(-sizes.q_len // bm), -(-sizes.kv_len // bn)
    out = np.zeros(nqb * nkb, np.int8)
    for m in range(nqb):
        for n in range(nkb):
            t = mask[m * bm : (m + 1) * bm, n * bn : (n + 1) * bn]
            out[m * nkb + n] = 2 if bool(t.all()) else int(bool(t.any()))
    return out


@pytest.mark.parametrize("index", range(len(CASES)))
def test_joint_search_matches_the_dense_plan(index):
    source, lq, lk, tile = CASES[index]
    sizes = Sizes(lq, lk)
    node = eng.rewrite_for_plan(patterndsl.compile(f"pattern p {{ {source} }}").ir.default)
    want = _dense_states(source, sizes, tile)
    engine = eng.identity_engine(sizes, 0, tile)
    decide = engine.node_decide(node)
    plain = engine.search(decide)
    counted = engine.search(decide, count_only=True)
    found = engine.search(decide, narrow=True, whole=True)
    assert (found is None) == (counted is None)
    if found is not None:
        keys, sure = found
        assert keys.tolist() == plain.tolist() and counted == len(keys)
        assert (want[keys[sure]] == 2).all()  # surely true on a hull: full
        assert (want[np.setdiff1d(np.arange(len(want)), keys)] == 0).all()  # nothing allowed left out
    keys, state = eng.identity_engine(sizes, 0, tile).run(node)
    assert keys.tolist() == np.flatnonzero(want).tolist()
    assert state.tolist() == want[want > 0].tolist()
