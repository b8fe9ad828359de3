"""Every environment variable patterndsl reads, in one place.

Comes in: the process environment. Goes out: plain values the other stages use.
Read at call time (not import time) so tests can change them with monkeypatch.
"""

from __future__ import annotations

import os
from pathlib import Path


def triton_interpret() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors under the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def cache_dir() -> Path:
    """Kernel cache root: ``PATTERNDSL_CACHE_DIR``, else ``$XDG_CACHE_HOME/patterndsl``, else ``~/.cache/patterndsl``.

    Returns:
        The directory (not created here).
    """
    explicit = os.environ.get("PATTERNDSL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "patterndsl"


def debug_verify() -> bool:
    """``PATTERNDSL_DEBUG=1`` re-verifies the IR after every pass and plans against the dense mask."""
    return os.environ.get("PATTERNDSL_DEBUG", "0") not in ("", "0")


def native_enabled() -> bool:
    """``PATTERNDSL_NATIVE=0`` keeps the CPU executor off its native C++ kernel (the torch path runs)."""
    return os.environ.get("PATTERNDSL_NATIVE", "1") not in ("0", "false", "False")


def native_compiler() -> str:
    """The C++ compiler that builds the native CPU kernel: ``PATTERNDSL_CXX``, else ``CXX``, else ``g++``."""
    return os.environ.get("PATTERNDSL_CXX") or os.environ.get("CXX") or "g++"


def cpu_pool_bytes() -> int:
    """``PATTERNDSL_CPU_POOL_MB`` (default 256): bytes of large CPU outputs kept for reuse; 0 turns that off.

    Raises:
        PatternError: the value is not a non-negative whole number (the message names the variable).
    """
    raw = os.environ.get("PATTERNDSL_CPU_POOL_MB", "256")
    mb = int(raw) if raw.strip().isdigit() else -1
    if mb < 0:
        from patterndsl.errors import PatternError

        raise PatternError(f"environment variable PATTERNDSL_CPU_POOL_MB: expected a whole number of MiB, got {raw!r}")
    return mb << 20
