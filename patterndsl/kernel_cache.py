"""The kernel cache, below both code generation and the runtime (each imports it, it imports neither).

Comes in: a spec with a ``key`` (:class:`patterndsl.codegen.KernelSpec`: the key
hashes the package version, the sources listed in ``codegen.key.KEY_SOURCES``,
the canonical IR, baked-in shapes, dtype, tiles, num_warps/stages and target)
and a ``render`` function. Goes out: the generated module, imported
from a real file so ``@triton.jit`` can read its source. Lookup order: memory,
then ``config.cache_dir() / "kernels" / KEY.py``, then generate. Files are
written under a temporary name and moved into place with ``os.replace``, so
concurrent writers of the same key all succeed and readers never see half a
file; the first line holds a sha256 of the rest, so a truncated or corrupted
entry is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import threading
import uuid
from collections import Counter
from pathlib import Path
from types import ModuleType

from patterndsl import config

_HEADER = "# patterndsl-cache sha256="
_lock = threading.Lock()
_modules: dict[tuple[str, bool], ModuleType] = {}
#: Counts of ``memory`` hits, ``disk`` hits, ``built`` entries and ``rebuilt`` corrupted ones.
stats: Counter = Counter()


def kernel_dir() -> Path:
    """The directory holding generated kernel files (created on demand)."""
    path = config.cache_dir() / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        # A read-only cache location must not stop attention from running.
        path = Path(tempfile.gettempdir()) / f"patterndsl-kernels-{os.getuid()}"
        path.mkdir(parents=True, exist_ok=True)
    return path


def entry_path(key: str) -> Path:
    """Where the entry of ``key`` lives on disk."""
    return kernel_dir() / f"{key}.py"


def _checksum(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def read_entry(path: Path) -> str | None:
    """The source stored at ``path``, or None when missing, truncated or corrupted.

    Args:
        path: an entry file.

    Returns:
        The source text (without the checksum line) or None.
    """
    try:
        data = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    first, sep, source = data.partition("\n")
    if not sep or not first.startswith(_HEADER):
        return None
    return source if first[len(_HEADER) :] == _checksum(source) else None


def write_entry(path: Path, source: str) -> None:
    """Write ``source`` with its checksum line atomically (temporary name + ``os.replace``).

    Args:
        path: the entry file.
        source: the generated source.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(f"{_HEADER}{_checksum(source)}\n{source}")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _import(key: str, path: Path, interpret: bool) -> ModuleType:
    import triton

    name = f"patterndsl_kernels_{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # ``@triton.jit`` picks interpreter or compiler when the module body runs.
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        spec.loader.exec_module(module)
    return module


def source_for(spec, render) -> str:
    """The source of ``spec`` from disk when a valid entry exists, else freshly rendered and stored.

    Args:
        spec: a :class:`patterndsl.codegen.KernelSpec`.
        render: ``spec -> source`` (the generator), called only on a miss.

    Returns:
        The source text.
    """
    path = entry_path(spec.key)
    source = read_entry(path)
    if source is not None:
        stats["disk"] += 1
        return source
    stats["rebuilt" if path.exists() else "built"] += 1
    source = render(spec)
    write_entry(path, source)
    return source


def load(spec, render, interpret: bool | None = None) -> ModuleType:
    """The imported kernel module of ``spec`` (memory, then disk, then generated).

    Args:
        spec: a :class:`patterndsl.codegen.KernelSpec`.
        render: ``spec -> source``, called only when no valid entry exists.
        interpret: load the kernels as interpreter functions (default: ``TRITON_INTERPRET``);
            ``False`` gives compiled-mode functions for ahead-of-time builds.

    Returns:
        The module (memory entries are kept apart per mode).
    """
    interpret = config.triton_interpret() if interpret is None else interpret
    mem_key = (spec.key, interpret)
    with _lock:
        module = _modules.get(mem_key)
        if module is not None:
            stats["memory"] += 1
            return module
        source_for(spec, render)
        path = entry_path(spec.key)
        module = _import(spec.key, path, interpret)
        if read_entry(path) is None:
            # Another writer or a disk fault changed the file under us: rebuild once more.
            write_entry(path, render(spec))
            module = _import(spec.key, path, interpret)
        _modules[mem_key] = module
        return module


def clear_memory() -> None:
    """Forget the in-memory modules (the disk entries stay)."""
    with _lock:
        _modules.clear()
