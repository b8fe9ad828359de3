"""The kernel cache under faults (issue 11, cause 6): whatever goes wrong with the cache directory
(unwritable, unreadable, corrupted, full, a directory where an entry belongs, no directory at all),
kernels still load, with at most one warning, and no entry is ever left half written.

Tests run as root, where ``chmod`` stops nothing: unwritable directories are simulated by making
``open`` / ``os.replace`` fail with the errors a read-only or full file system gives, and real
failures come from paths no one can create (under ``/proc``, or below a file).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import triton

import patterndsl
from patterndsl import kernel_cache as cache
from patterndsl.codegen import generator, spec_for

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "pattern p { causal & window(5) | sink(1) }"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(tmp_path))
    cache.clear_memory()
    cache.stats.clear()
    cache._warned.clear()
    yield tmp_path
    cache.clear_memory()
    cache._warned.clear()


def _spec(window=5):
    return spec_for(patterndsl.compile(SOURCE.replace("5", str(window))), 64, heads=2, head_dim=16)


def _fail_writes(monkeypatch, error: OSError, where: str = "open") -> None:
    """Make writing entries fail as a read-only (or full) file system would."""
    if where == "open":
        real = open

        def fake_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                raise error
            return real(file, mode, *args, **kwargs)

        monkeypatch.setattr(cache, "open", fake_open, raising=False)
    else:

        def fake_replace(src, dst):
            raise error

        monkeypatch.setattr(cache.os, "replace", fake_replace)


class FullDisk:
    """A file whose device fills up after 100 characters of the first write."""

    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, text):
        self.fh.write(text[:100])
        self.fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def _load_quietly(spec, interpret=False) -> tuple[object, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = cache.load(spec, generator.render, interpret=interpret)
    return module, [w for w in caught if "kernel cache" in str(w.message)]


def _is_kernel_module(module, spec) -> bool:
    fn = module.fwd_g0
    return isinstance(fn, triton.runtime.JITFunction) and "def fwd_g0" in fn.src and fn.src in generator.render(spec)


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize(
    "error,where",
    [
        (PermissionError(errno.EACCES, "Permission denied"), "open"),
        (OSError(errno.EROFS, "Read-only file system"), "open"),
        (OSError(errno.ENOSPC, "No space left on device"), "open"),
        (PermissionError(errno.EACCES, "Permission denied"), "replace"),
        (OSError(errno.ENOSPC, "No space left on device"), "replace"),
    ],
)
def test_unwritable_empty_cache_builds_in_memory_with_one_warning(cache_dir, monkeypatch, error, where):
    kernels = cache_dir / "kernels"
    kernels.mkdir()
    _fail_writes(monkeypatch, error, where)
    module, warned = _load_quietly(_spec())
    assert _is_kernel_module(module, _spec())
    assert len(warned) == 1 and str(kernels) in str(warned[0].message)
    assert cache.stats["built"] == 1
    # Nothing was left behind: no entry, no temporary file.
    assert _listing(kernels) == []
    # More kernels in the same directory: built, no second warning.
    cache.clear_memory()
    module, warned = _load_quietly(_spec(6))
    assert _is_kernel_module(module, _spec(6)) and warned == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_unwritable_cache_with_corrupt_entries_is_left_alone(cache_dir, monkeypatch, damage):
    spec = _spec()
    path = cache.entry_path(spec.key)
    text = f"# patterndsl-cache sha256=0\n{generator.render(spec)}".encode()
    data = {"truncate": text[: len(text) // 2], "flip": text.replace(b"def", b"dEf", 1), "empty": b""}
    path.write_bytes(data.get(damage, b"\xff\xfe not a kernel \x00"))
    before = path.read_bytes()
    _fail_writes(monkeypatch, PermissionError(errno.EACCES, "Permission denied"))
    module, warned = _load_quietly(spec, interpret=True)
    assert hasattr(module, "fwd_g0") and len(warned) == 1
    assert cache.stats["rebuilt"] == 1
    assert path.read_bytes() == before
    assert _listing(path.parent) == [path.name]


def test_unreadable_entry_is_rebuilt_and_replaced(cache_dir, monkeypatch):
    spec = _spec()
    cache.load(spec, generator.render, interpret=False)
    cache.clear_memory()
    real = Path.read_bytes

    def fake_read(self):
        if self.suffix == ".py":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", fake_read)
    module, warned = _load_quietly(spec)
    assert _is_kernel_module(module, spec) and warned == []
    assert cache.stats["rebuilt"] == 1
    monkeypatch.setattr(Path, "read_bytes", real)
    assert cache.read_entry(cache.entry_path(spec.key)) == generator.render(spec)


def test_entry_replaced_by_a_directory(cache_dir):
    spec = _spec()
    path = cache.entry_path(spec.key)
    path.mkdir()
    (path / "inside").write_text("someone else's")
    module, warned = _load_quietly(spec)
    assert _is_kernel_module(module, spec)
    assert len(warned) == 1
    # The directory is not ours: it stays as it was, with no temporary file next to it.
    assert path.is_dir() and (path / "inside").read_text() == "someone else's"
    assert _listing(path.parent) == [path.name]
    assert cache.stats["rebuilt"] == 1


def test_full_disk_during_write_leaves_no_partial_file(cache_dir, monkeypatch):
    spec = _spec()
    (cache_dir / "kernels").mkdir()
    real = open
    monkeypatch.setattr(cache, "open", lambda *a, **k: FullDisk(real(*a, **k)), raising=False)
    module, warned = _load_quietly(spec)
    assert _is_kernel_module(module, spec) and len(warned) == 1
    assert _listing(cache_dir / "kernels") == []


def test_cache_below_a_file_falls_back_to_a_temporary_directory(cache_dir, monkeypatch, tmp_path_factory):
    # A real failure, root or not: nothing can be created below a regular file.
    blocker = cache_dir / "file"
    blocker.write_text("x")
    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(blocker))
    temp = tmp_path_factory.mktemp("tmpdir")
    monkeypatch.setattr(cache.tempfile, "gettempdir", lambda: str(temp))
    spec = _spec()
    module, warned = _load_quietly(spec)
    assert _is_kernel_module(module, spec) and warned == []
    assert cache.entry_path(spec.key).parent.parent == temp
    assert cache.read_entry(cache.entry_path(spec.key)) == generator.render(spec)


def test_no_writable_directory_anywhere_keeps_kernels_in_memory(cache_dir, monkeypatch):
    # Real failures: /proc accepts no new directories, even from root.
    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", "/proc/patterndsl-cache")
    monkeypatch.setattr(cache.tempfile, "gettempdir", lambda: "/proc/self")
    spec = _spec()
    module, warned = _load_quietly(spec)
    assert _is_kernel_module(module, spec) and len(warned) == 1
    assert module.__file__ == f"<patterndsl-kernel {spec.key}>"
    interpreted, _ = _load_quietly(spec, interpret=True)
    assert hasattr(interpreted, "fwd_g0")


RUN_READ_ONLY = textwrap.dedent(
    """
    import os, tempfile, warnings
    import torch
    import patterndsl
    from patterndsl import kernel_cache

    tempfile.gettempdir = lambda: "/proc/self"
    p = patterndsl.compile("pattern p { causal }")
    q, k, v = (torch.randn(1, 2, 16, 16, requires_grad=True) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = p(q, k, v, backend="triton")
        out.sum().backward()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert q.grad is not None and bool(torch.isfinite(q.grad).all())
    print("warnings", sum("kernel cache" in str(w.message) for w in caught))
    """
)


def test_triton_attention_runs_with_no_writable_cache():
    """The first Triton call in a process whose cache and temporary directories cannot be created runs."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "PATTERNDSL_CACHE_DIR": "/proc/pdsl"}
    done = subprocess.run(
        [sys.executable, "-c", RUN_READ_ONLY], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warnings 1" in done.stdout
