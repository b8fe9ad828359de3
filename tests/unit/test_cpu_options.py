"""The CPU executor's options: set explicitly (argument or context manager), they reach the code that uses them.

Each test counts what a knob controls (the chunks a segment is cut into, the schedule it builds)
rather than only checking results, so a knob that silently stops reaching its use fails here:
the chunk-budget tests failed against the old ``budget=CHUNK_BYTES`` default argument, which a
monkeypatched module global never changed.
"""

from __future__ import annotations

import inspect
import pkgutil
import threading
from importlib import import_module

import pytest
import torch

import patterndsl
from patterndsl import runtime
from patterndsl.analysis.plan import plan_from_mask
from patterndsl.runtime import cpu
from patterndsl.runtime.cpu.schedule import Segment
from tests.reference import reference_attention

SLIDING = "pattern p { causal & window(100) }"


def _plan(source: str, length: int):
    pattern = patterndsl.compile(source)
    mask = pattern.mask(length, length, 1)
    return pattern, plan_from_mask(mask, (64, 64), pattern=pattern.ir, nodes=[pattern.ir.default])


def _inputs(length: int, heads: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, length, 16, generator=gen) for _ in range(3)]


@pytest.fixture
def slices(monkeypatch):
    """Every ``Segment.slice`` call as ``(length of the parent, length of the slice)``."""
    calls = []
    real = Segment.slice

    def spy(self, a, b):
        calls.append((len(self), b - a))
        return real(self, a, b)

    monkeypatch.setattr(Segment, "slice", spy)
    return calls


def test_math_chunk_budget_reaches_the_chunks(slices):
    """One byte per chunk: the math kernel runs every segment one query tile at a time."""
    pattern, plan = _plan(SLIDING, 1024)
    q, k, v = _inputs(1024)
    segments = cpu.schedules(plan)[0].segments
    assert max(len(s) for s in segments) > 1
    out, _ = cpu.forward(q, k, v, plan, 0.25, options=cpu.CpuOptions(kernel="math", chunk_bytes=1))
    assert sorted(slices) == sorted((len(s), 1) for s in segments for _ in range(len(s)))
    ref, _ = reference_attention(q, k, v, pattern.mask(1024, 1024, 1), 0.25)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    slices.clear()
    # The default budget holds each of these segments in one chunk.
    cpu.forward(q, k, v, plan, 0.25, options=cpu.CpuOptions(kernel="math"))
    assert sorted(slices) == sorted((len(s), len(s)) for s in segments)


def test_chunk_budget_set_by_the_context_manager_reaches_the_op(slices, monkeypatch):
    """Through ``Pattern.__call__`` and autograd (no options argument on that path)."""
    monkeypatch.setattr(runtime, "CPU_BLOCK", (64, 64))
    pattern = patterndsl.compile(SLIDING)
    q, k, v = (t.requires_grad_() for t in _inputs(1024))
    with cpu.options(kernel="math", chunk_bytes=1):
        out = pattern(q, k, v)
        forward_calls = len(slices)
        out.sum().backward()
    assert forward_calls >= 1024 // 64
    # The backward's gathered segment (the two narrow leading tiles) is cut per tile too.
    assert len(slices) > forward_calls and all(n == 1 for _, n in slices)


def test_fused_chunk_budget_reaches_gathered_steps(slices):
    """The fused kernel chunks gathered segments by ``fused_budget()``, with one thread or several."""
    _, plan = _plan(SLIDING, 1024)
    q, k, v = _inputs(1024)
    (gathered,) = [s for s in cpu.schedules(plan)[0].segments if s.affine is None]
    tiny = cpu.CpuOptions(kernel="fused", fused_chunk_bytes=1, fused_chunk_bytes_serial=1, native=False)
    out, lse = cpu.forward(q, k, v, plan, 0.25, options=tiny)
    assert slices == [(len(gathered), 1)] * len(gathered)
    slices.clear()
    cpu.backward(q, k, v, out, lse, torch.ones_like(out), plan, 0.25, options=tiny)
    assert slices == [(len(gathered), 1)] * len(gathered)


def test_fused_budget_follows_the_thread_count():
    opts = cpu.CpuOptions(fused_chunk_bytes=3, fused_chunk_bytes_serial=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert opts.fused_budget() == 5
        torch.set_num_threads(2)
        assert opts.fused_budget() == 3
    finally:
        torch.set_num_threads(threads)


def test_schedules_follow_the_options():
    """Schedules are cached per plan *and* options: another ``wide_min`` gets another schedule."""
    _, plan = _plan("pattern p { causal }", 1024)
    default = cpu.schedules(plan)
    assert cpu.schedules(plan) is default
    assert any(s.merge for s in default[0].segments)
    off = cpu.schedules(plan, cpu.CpuOptions(wide_min=0))
    assert not any(s.merge for s in off[0].segments)
    with cpu.options(wide_min=0):
        assert cpu.schedules(plan) is off
    loose = cpu.schedules(plan, cpu.CpuOptions(min_affine=10_000, wide_min=0))
    assert all(s.affine is None for s in loose[0].segments)


def test_context_manager_nests_and_restores():
    base = cpu.current()
    with cpu.options(kernel="math") as outer:
        assert cpu.current() is outer and outer.kernel == "math"
        with cpu.options(chunk_bytes=7) as inner:
            assert (inner.kernel, inner.chunk_bytes) == ("math", 7)
        assert cpu.current() is outer
        with pytest.raises(RuntimeError), cpu.options(wide_min=3):
            raise RuntimeError
        assert cpu.current() is outer
    assert cpu.current() is base


def test_options_are_seen_from_other_threads():
    """Autograd may run the backward on another thread: it must see the options of the block."""
    seen = []
    with cpu.options(kernel="math"):
        worker = threading.Thread(target=lambda: seen.append(cpu.current().kernel))
        worker.start()
        worker.join()
    assert seen == ["math"]


@pytest.mark.parametrize(
    "changes",
    [{"kernel": "flash"}, {"chunk_bytes": 0}, {"affine_bwd_tiles": 0}, {"wide_min": -1}, {"gather_row_chunk": 0}],
)
def test_invalid_options_are_refused(changes):
    with pytest.raises(ValueError, match=next(iter(changes))):
        cpu.CpuOptions(**changes)


def test_no_executor_function_binds_a_value_as_default_argument():
    """Knobs travel in the options value: a default bound at definition time would freeze one."""
    package = import_module("patterndsl.runtime.cpu")
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = import_module(f"patterndsl.runtime.cpu.{info.name}")
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ != module.__name__:
                continue
            for param in inspect.signature(fn).parameters.values():
                if param.default is not inspect.Parameter.empty and param.default is not None:
                    found.append(f"{module.__name__}.{name}({param.name}={param.default!r})")
    assert not found


def test_package_entry_points():
    """The names other modules call are the functions, not the submodules they share a name with."""
    assert inspect.isfunction(cpu.forward) and cpu.forward.__module__ == "patterndsl.runtime.cpu.forward"
    assert inspect.isfunction(cpu.backward) and inspect.isfunction(cpu.schedule)
    assert inspect.isfunction(cpu.schedules) and inspect.isfunction(cpu.options)
