"""The run-time input table of the generated kernels (codegen/inputs.py): layout, packing, segment tables."""

from __future__ import annotations

import random

import pytest
import torch

import patterndsl as pd
from patterndsl.codegen import inputs as ci
from patterndsl.errors import InputError
from patterndsl.primitives.inputs import runs

SOURCE = """pattern p {
    input lag: int[batch, head]
    input doc: int[token]
    input tab: int[5]
    where(k <= q + lag[h] and tab[q % 7] != 1) | within(doc, causal)
}"""


def test_segment_tables_match_the_runs_of_every_row():
    rng = random.Random(7)
    for _ in range(20):
        n = rng.randint(1, 40)
        seg = torch.tensor([[rng.randint(0, 2) for _ in range(n)] for _ in range(3)])
        start, length = ci.segment_tables(seg)
        for b in range(3):
            run, first, size = runs(seg[b])
            assert torch.equal(start[b], first[run]) and torch.equal(length[b], size[run])


def test_layout_and_pack_place_every_input_per_batch_element():
    p = pd.compile(SOURCE)
    lay = ci.layout(p.ir.inputs, [p.ir.default], 10, 3, 16)
    assert lay.values == (("lag", (3,), 0), ("tab", (5,), 3))
    assert lay.segments == (("doc", 8, None),)  # within(doc, causal) needs no lengths
    assert lay.stride == 18
    lag = torch.tensor([[1, 2, 3], [4, 5, 6]])
    doc = pd.segments([4, 1, 5])
    tab = torch.arange(5) * 10
    rt = ci.pack(lay, p.ir.inputs, [lag, doc, tab], batch=2).view(2, 18)
    assert rt.dtype == torch.int32
    assert rt[:, :3].tolist() == lag.tolist()
    assert rt[0, 3:8].tolist() == rt[1, 3:8].tolist() == tab.tolist()  # shared by the batch
    assert rt[1, 8:18].tolist() == [0, 0, 0, 0, 4, 5, 5, 5, 5, 5]
    reads_lk = pd.compile(SOURCE.replace("causal)", "where(k >= Lk - 2))")).ir.default
    lengths = ci.layout(p.ir.inputs, [reads_lk], 10, 3, 16)
    assert lengths.segments == (("doc", 8, 18),) and lengths.stride == 28
    rt = ci.pack(lengths, p.ir.inputs, [lag, doc, tab], batch=2).view(2, 28)
    assert rt[1, 18:28].tolist() == [4, 4, 4, 4, 1, 5, 5, 5, 5, 5]


def test_values_outside_int32_are_refused_with_the_input_named():
    p = pd.compile(SOURCE)
    lay = ci.layout(p.ir.inputs, [p.ir.default], 10, 3, 16)
    lag = torch.tensor([[1, 2**31, 3]])
    with pytest.raises(InputError, match=r"'lag'.*int32") as err:
        ci.pack(lay, p.ir.inputs, [lag, pd.segments([10]), torch.zeros(5, dtype=torch.int64)], batch=1)
    assert err.value.span is not None


def test_a_segment_input_is_not_read_as_values():
    # within's SEG needs no value table: only the starts and lengths of its runs are packed.
    p = pd.compile("pattern d {\n input doc: int[batch, token]\n within(doc, causal)\n}")
    lay = ci.layout(p.ir.inputs, [p.ir.default], 64, 1, 16)
    assert lay.values == () and lay.stride == 64
