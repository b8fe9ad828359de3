"""The CPU executor's recycled output memory: reused only when nothing refers to it any more."""

import numpy as np
import pytest
import torch

import patterndsl
from patterndsl import PatternError, semantics
from patterndsl.runtime.cpu import memory


@pytest.fixture
def small_pool(monkeypatch):
    """Buffers of 4 KiB and more go through the pool (32 MiB in real use), starting empty."""
    monkeypatch.setattr(memory, "MIN_BYTES", 4096)
    memory.clear()
    yield
    memory.clear()


def test_a_freed_buffer_is_reused(small_pool):
    a = memory.empty((4, 1024), torch.float32)
    ptr = a.data_ptr()
    del a
    b = memory.empty((4, 1024), torch.float32)
    assert b.data_ptr() == ptr and b._base is None and b.shape == (4, 1024)
    assert memory.held_bytes() == 4 * 1024 * 4


@pytest.mark.parametrize("hold", ["tensor", "view", "numpy", "dlpack", "saved"])
def test_a_buffer_anything_refers_to_is_not_reused(small_pool, hold):
    a = memory.empty((4, 1024), torch.float32)
    a.fill_(7.0)
    ptr = a.data_ptr()
    if hold == "tensor":
        keep = a
    elif hold == "view":
        keep = a[1:, ::2]
    elif hold == "numpy":
        keep = a.numpy()
    elif hold == "dlpack":
        keep = torch.utils.dlpack.to_dlpack(a)
    else:  # saved by autograd for a backward that has not run yet
        w = torch.ones(1024, requires_grad=True)
        keep = (a * w).sum()
    del a
    b = memory.empty((4, 1024), torch.float32)
    b.fill_(-1.0)
    assert b.data_ptr() != ptr
    if hold == "numpy":
        assert np.all(keep == 7.0)
    elif hold in ("tensor", "view"):
        assert bool((keep == 7.0).all())
    elif hold == "saved":
        keep.backward()
        assert bool((w.grad == 28.0).all())


def test_small_and_disabled_allocations_bypass_the_pool(small_pool, monkeypatch):
    memory.empty((16,), torch.float32)
    assert memory.held_bytes() == 0
    monkeypatch.setenv("PATTERNDSL_CPU_POOL_MB", "0")
    memory.empty((4, 1024), torch.float32)
    assert memory.held_bytes() == 0


def test_the_pool_keeps_at_most_its_limit_of_unused_buffers(small_pool, monkeypatch):
    monkeypatch.setattr(memory, "MIN_BYTES", 1 << 19)
    monkeypatch.setenv("PATTERNDSL_CPU_POOL_MB", "2")
    live = [memory.empty((1 << 17,), torch.float32) for _ in range(3)]  # 3 x 512 KiB in use
    assert memory.held_bytes() == 3 << 19
    del live
    for size in (1 << 18, 3 << 17):  # new sizes: old unused buffers are dropped to stay within 2 MiB
        memory.empty((size,), torch.float32)
    assert memory.held_bytes() <= 2 << 20


@pytest.mark.parametrize("value", ["-1", "lots", "1.5"])
def test_a_bad_pool_size_is_a_pattern_error(small_pool, monkeypatch, value):
    monkeypatch.setenv("PATTERNDSL_CPU_POOL_MB", value)
    with pytest.raises(PatternError, match="PATTERNDSL_CPU_POOL_MB"):
        memory.empty((4, 1024), torch.float32)


def test_attention_outputs_kept_by_the_caller_are_never_overwritten(small_pool):
    """Two calls' outputs alive at once (and a backward through the first) stay exact.

    At 128 rows (one whole tile) the kernel's output buffer is the returned tensor itself.
    """
    p = patterndsl.compile("pattern p { causal & window(7) }")
    torch.manual_seed(0)
    x = [torch.randn(1, 2, 128, 16, dtype=torch.float32, requires_grad=True) for _ in range(6)]
    out1 = p(*x[:3])
    out2 = p(*x[3:])
    for out, (q, k, v) in ((out1, x[:3]), (out2, x[3:])):
        ref, _ = semantics.attention(p.ir, q.detach().double(), k.detach().double(), v.detach().double())
        torch.testing.assert_close(out.detach().double(), ref, atol=1e-5, rtol=1e-5)
    assert out1.data_ptr() != out2.data_ptr()
    held = {s.data_ptr() for s in memory._held}
    assert out1.data_ptr() in held and out2.data_ptr() in held  # the outputs are the pool's memory
    ptr1 = out1.data_ptr()
    out1.sum().backward()
    del out1
    out3 = p(*x[:3])  # the first output's memory is free again
    assert out3.data_ptr() == ptr1
