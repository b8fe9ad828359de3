"""The device-side call-time plan of ``within(SEG, P)``: exact tiles, no element work, no host synchronisation."""

from __future__ import annotations

import random

import pytest
import torch
from torch.overrides import TorchFunctionMode

import patterndsl as pd
from patterndsl.analysis import inputplan, segments
from patterndsl.analysis.plan import tile_reduce
from patterndsl.runtime import inputs as runtime_inputs

BODIES = [
    "causal",
    "full",
    "empty",
    "causal & (window(5) | sink(3))",
    "window(2, 3) | global(2)",
    "blocks(4) & ~causal",
    "causal - blocks(3)",
    "sink(1) | window(0)",
    "~window(3, 1) & global(5)",
    "(blocks(2) | sink(2)) & window(4, 4)",
]


def _pattern(body: str):
    return pd.compile(f"pattern p {{\n    input doc: int[batch, token]\n    within(doc, {body})\n}}")


def _random_doc(rng: random.Random, batch: int, length: int) -> torch.Tensor:
    if rng.random() < 0.3:  # ids that repeat after a change: still separate runs
        return torch.tensor([[rng.randint(0, 2) for _ in range(length)] for _ in range(batch)])
    return torch.tensor([[int(rng.random() < 0.25) for _ in range(length)] for _ in range(batch)]).cumsum(1)


class SyncCounter(TorchFunctionMode):
    """Records the calls that read a device value back to the host (or size a tensor by data) on CUDA."""

    READS = frozenset({"item", "tolist", "numpy", "__bool__", "__int__", "__index__", "__float__", "cpu"})
    SIZED = frozenset({"nonzero", "masked_select", "unique", "unique_consecutive", "bincount", "repeat_interleave"})

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.READS or name in self.SIZED:
            self.calls.append(name)
        if name in ("__getitem__", "__setitem__"):
            index = args[1] if len(args) > 1 else None
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in parts):
                self.calls.append(f"{name}[bool]")
        if name == "where" and len(args) == 1 and not kwargs:
            self.calls.append("where(cond)")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("seed", range(4))
def test_within_states_equal_the_dense_tile_reduction(seed):
    rng = random.Random(seed)
    for _ in range(12):
        body = rng.choice(BODIES)
        p = _pattern(body)
        lk = rng.randint(1, 40)
        lq = lk if rng.random() < 0.7 else rng.randint(1, 48)
        batch = rng.randint(1, 3)
        doc = _random_doc(rng, batch, lk)
        block = (rng.choice([1, 4, 8, 16]), rng.choice([1, 4, 8, 16]))
        ref = tile_reduce(p.mask(lq, lk, 1, doc=doc)[:, 0], *block)
        for static in (False, True):
            got = segments.within_states(doc, p.ir.default.arg("body"), lq, block, static=static)
            assert torch.equal(got, ref), (body, lq, lk, block, static, doc.tolist())


def test_one_document_and_length_one_documents():
    p = _pattern("causal & (window(3) | sink(2))")
    body = p.ir.default.arg("body")
    for doc in (torch.zeros(1, 37, dtype=torch.int64), torch.arange(37)[None], pd.segments([1, 1, 30, 1, 4])[None]):
        ref = tile_reduce(p.mask(37, 37, 1, doc=doc)[:, 0], 8, 8)
        assert torch.equal(segments.within_states(doc, body, 37, (8, 8)), ref)


def test_bodies_it_cannot_cut_go_to_the_host_path():
    assert segments.cuts_of(_pattern("window(3, dilation=2)").ir.default.arg("body")) is None
    assert segments.cuts_of(_pattern("strided(3) & causal").ir.default.arg("body")) is None
    assert not segments.supported(_pattern("blocks(1) & causal").ir.default.arg("body"), (64, 64))
    # ... and are still exact there.
    p = _pattern("causal & window(3, dilation=2)")
    doc = pd.segments([3, 9, 20])
    ref = tile_reduce(p.mask(32, 32, 1, doc=doc), 8, 8)
    assert torch.equal(p.plan(32, 32, 1, block=(8, 8), doc=doc).tiles(), ref)


def test_call_plan_with_static_shapes_reads_nothing_back_to_the_host():
    p = _pattern("causal & (window(5) | sink(3))")
    doc = pd.segments([3, 17, 1, 40, 3])[None].expand(2, -1).contiguous()
    doc[1] = pd.segments([60, 4])
    static = p.plan(64, 64, 4, block=(16, 16))
    bound = runtime_inputs.inputs_of(static, [doc], 2)
    with SyncCounter() as counter:
        plan = inputplan.call_plan(static, bound, static_shapes=True)
    assert counter.calls == []
    ref = tile_reduce(p.mask(64, 64, 4, doc=doc), 16, 16)
    assert torch.equal(plan.tiles(), ref)
    # The counter sees what it must: the exact-size path reads sizes back.
    with SyncCounter() as counter:
        inputplan.call_plan(static, bound, static_shapes=False)
    assert "nonzero" in counter.calls


def test_runtime_plan_is_cached_per_input_version():
    p = _pattern("causal & (window(5) | sink(3))")
    static = p.plan(32, 32, 2, block=(8, 8))
    doc = pd.segments([5, 27])[None]
    runtime_inputs.clear()
    first = runtime_inputs.call_plan(static, [doc], 1)
    assert runtime_inputs.call_plan(static, [doc], 1) is first
    doc[0, 10:] = 7  # in place: a new version, a new plan
    again = runtime_inputs.call_plan(static, [doc], 1)
    assert again is not first
    assert torch.equal(again.tiles(), tile_reduce(p.mask(32, 32, 2, doc=doc), 8, 8))


def test_triton_lists_equal_csr_with_partial_first_and_read_nothing_back():
    from patterndsl.runtime import triton_backend, triton_inputs

    gen = torch.Generator().manual_seed(0)
    for shape in ((5, 7), (1, 1), (3, 4), (0, 3)):
        dense = torch.randint(0, 3, shape, generator=gen).to(torch.int8)
        full = dense == 2
        rows, cols = torch.nonzero(dense, as_tuple=True)
        ptr = torch.zeros(shape[0] + 1, dtype=torch.int64)
        ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
        want = triton_backend.split_lists(ptr, cols, full[rows, cols])
        with SyncCounter() as counter:
            got = triton_inputs._lists(dense, full)
        assert counter.calls == []
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        n = int(want[0][-1])
        assert torch.equal(got[2][:n], want[2][:n])
