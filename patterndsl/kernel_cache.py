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
entry is detected and rebuilt. The cache is only a cache: when it cannot be read or
written (read-only, full, a directory where an entry belongs) the kernel is rendered
and kept in memory, with one warning per directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import linecache
import os
import tempfile
import threading
import uuid
import warnings
from collections import Counter
from pathlib import Path
from types import ModuleType

from patterndsl import config

_HEADER = "# patterndsl-cache sha256="
_lock = threading.Lock()
_modules: dict[tuple[str, bool], ModuleType] = {}
_warned: set[Path] = set()
#: Counts of ``memory`` hits, ``disk`` hits, ``built`` entries and ``rebuilt`` corrupted ones.
stats: Counter = Counter()


def kernel_dir() -> Path:
    """The directory holding generated kernel files (created on demand).

    ``$PATTERNDSL_CACHE_DIR/kernels``, or a private temporary directory when that cannot be
    created. Whether it can be written is found out by writing (:func:`write_entry` failures
    are not errors: the kernel is then kept in memory).
    """
    path = config.cache_dir() / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        # A read-only cache location must not stop attention from running.
        path = Path(tempfile.gettempdir()) / f"patterndsl-kernels-{os.getuid()}"
        # If even that fails, reads miss and writes fail: every kernel is built and kept in memory.
        with contextlib.suppress(OSError):
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

    Raises:
        OSError: when the entry cannot be written (a read-only or full disk, a directory in its
            place); the temporary file is removed and the entry, if any, is left as it was.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(f"{_HEADER}{_checksum(source)}\n{source}")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _import(key: str, source: str, filename: str, interpret: bool) -> ModuleType:
    """Run ``source`` as the module of ``key``, whatever happens to the file named ``filename`` meanwhile.

    ``@triton.jit`` reads a kernel's text through :mod:`inspect`, i.e. :mod:`linecache`: the text
    is registered there under ``filename`` (with no modification time, so it is never re-read from
    disk), so the module runs the source checked here even if the file is changed, removed or was
    never written (an unwritable cache).
    """
    import triton

    module = ModuleType(f"patterndsl_kernels_{key}")
    module.__file__ = filename
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    code = compile(source, filename, "exec")
    # ``@triton.jit`` picks interpreter or compiler when the module body runs.
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        exec(code, module.__dict__)
    return module


def _store(path: Path, source: str) -> bool:
    """Write the entry, or warn (once per directory) and carry on when the cache cannot take it."""
    try:
        write_entry(path, source)
        return True
    except OSError as exc:
        if path.parent not in _warned:
            _warned.add(path.parent)
            warnings.warn(
                f"patterndsl: cannot write the kernel cache in {path.parent} ({exc}); kernels are kept in memory",
                RuntimeWarning,
                stacklevel=4,
            )
        return False


def source_for(spec, render) -> str:
    """The source of ``spec`` from disk when a valid entry exists, else freshly rendered and stored.

    Every cache failure (an unreadable, unwritable, corrupted or full cache, a directory in the
    entry's place) degrades to a fresh render with at most a warning; a bad entry is replaced
    atomically or left alone, never written in place.

    Args:
        spec: a :class:`patterndsl.codegen.KernelSpec`.
        render: ``spec -> source`` (the generator), called only on a miss.

    Returns:
        The source text.
    """
    return _source(spec, render, entry_path(spec.key))[0]


def _source(spec, render, path: Path) -> tuple[str, bool]:
    source = read_entry(path)
    if source is not None:
        stats["disk"] += 1
        return source, True
    try:
        damaged = path.exists() or path.is_symlink()
    except OSError:
        damaged = True
    stats["rebuilt" if damaged else "built"] += 1
    source = render(spec)
    return source, _store(path, source)


def load(spec, render, interpret: bool | None = None) -> ModuleType:
    """The imported kernel module of ``spec`` (memory, then disk, then generated).

    Args:
        spec: a :class:`patterndsl.codegen.KernelSpec`.
        render: ``spec -> source``, called only when no valid entry exists.
        interpret: load the kernels as interpreter functions (default: ``TRITON_INTERPRET``);
            ``False`` gives compiled-mode functions for ahead-of-time builds.

    Returns:
        The module (memory entries are kept apart per mode). Its source is the one that was
        checked (a valid entry) or rendered, never re-read from a file another process may change;
        when the cache could not store it, it is named ``<patterndsl-kernel KEY>`` instead of a file.
    """
    interpret = config.triton_interpret() if interpret is None else interpret
    mem_key = (spec.key, interpret)
    with _lock:
        module = _modules.get(mem_key)
        if module is not None:
            stats["memory"] += 1
            return module
        path = entry_path(spec.key)
        source, on_disk = _source(spec, render, path)
        module = _import(spec.key, source, str(path) if on_disk else f"<patterndsl-kernel {spec.key}>", interpret)
        _modules[mem_key] = module
        return module


def clear_memory() -> None:
    """Forget the in-memory modules (the disk entries stay)."""
    with _lock:
        _modules.clear()
