"""Runtime stage, CPU executor, native kernel: building ``attention.cpp`` once per source, flags and CPU.

Comes in: the C++ sources shipped next to this module (package data), the compiler named by
:func:`patterndsl.config.native_compiler` and the CPU's feature flags. Goes out: the loaded
shared library (:class:`ctypes.CDLL`), or None with the reason logged once (no compiler, no
AVX-512, a failed build, ``PATTERNDSL_NATIVE=0``): the executor then runs its torch path.

The library lives in ``config.cache_dir() / "native" / "attention-KEY.so"``, ``KEY`` a sha256
of the source, the compiler's version line, the flags and the CPU features, so a changed source
or another machine sharing the cache builds its own entry. Concurrent processes serialise the
build on a lock file (``fcntl.flock``) and write under a temporary name moved into place with
``os.replace``, so nobody loads half a file. It is plain C++ loaded through ctypes (no torch
headers, no Python module: a build takes ~3 s instead of the ~45 s of a torch extension); its
OpenMP calls bind to the ``libgomp.so.1`` torch already loaded, so it shares torch's threads.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from patterndsl import config

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention.cpp")
#: Every source of the library: the tile kernels, and the decoding kernel (``decode.cpp``, issue 14).
SOURCES = (SOURCE, Path(__file__).with_name("decode.cpp"))
#: Headers the sources include (part of the cache key).
HEADERS = (Path(__file__).with_name("simd.h"),)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
#: CPU features the kernel needs (it is written with AVX-512 intrinsics).
NEEDED = ("avx512f", "avx512bw", "avx512dq", "avx512vl")

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
#: Why the last attempt gave no library (None after a success), for logs and tests.
last_reason: list[str | None] = [None]
#: Counts :func:`reset` calls: what callers derived from :func:`library` holds while it is unchanged.
generation: list[int] = [0]


def cpu_features() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.splitlines()[0] if out.stdout else ""


def cache_key(source: str, cxx_version: str, features: frozenset[str]) -> str:
    """The cache key of a build: sha256 of the source, the compiler, the flags and the CPU features."""
    h = hashlib.sha256()
    for part in (source, cxx_version, " ".join(FLAGS), " ".join(sorted(features))):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def library_dir() -> Path:
    """Where built libraries are kept (``config.cache_dir() / "native"``, created on demand)."""
    path = config.cache_dir() / "native"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        # A read-only cache location must not cost the kernel: build in a private temporary directory.
        path = Path(tempfile.gettempdir()) / f"patterndsl-native-{os.getuid()}"
        path.mkdir(parents=True, exist_ok=True)
    return path


def _compile(cxx: str, sources: tuple[Path, ...], target: Path) -> None:
    """Compile ``sources`` into the one library ``target`` through a temporary file in the same directory."""
    fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, *(str(s) for s in sources), "-o", tmp]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {out.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> ctypes.CDLL:
    if not config.native_enabled():
        raise RuntimeError("disabled by PATTERNDSL_NATIVE=0")
    features = cpu_features()
    missing = [f for f in NEEDED if f not in features]
    if missing:
        raise RuntimeError(f"the CPU lacks {', '.join(missing)}")
    cxx = shutil.which(config.native_compiler())
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({config.native_compiler()!r} not found)")
    source = "\0".join(s.read_text() for s in (*SOURCES, *HEADERS))
    key = cache_key(source, _compiler_version(cxx), features)
    directory = library_dir()
    target = directory / f"attention-{key}.so"
    if not target.exists():
        with open(directory / f"attention-{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
            if not target.exists():
                log.info("patterndsl: building the native CPU attention kernel into %s", target)
                _compile(cxx, SOURCES, target)
    lib = ctypes.CDLL(str(target))
    if lib.pdsl_native_version() != 1:
        raise RuntimeError(f"{target} is not this version of the kernel")
    return lib


def library() -> ctypes.CDLL | None:
    """The native kernel library, built and loaded on the first call; None when it cannot be had.

    Returns:
        The loaded library, or None (the reason is logged once per process and kept in
        :data:`last_reason`): callers then run the torch path.
    """
    key = str(config.cache_dir())
    with _lock:
        if key not in _loaded:
            try:
                _loaded[key] = _build()
                last_reason[0] = None
            except Exception as exc:  # any failure means: run the torch path
                _loaded[key] = None
                last_reason[0] = str(exc)
                log.warning("patterndsl: native CPU attention kernel unavailable (%s); using the torch path", exc)
        return _loaded[key]


def reset() -> None:
    """Forget loaded libraries and failures (tests; a changed environment)."""
    with _lock:
        _loaded.clear()
        last_reason[0] = None
        generation[0] += 1
