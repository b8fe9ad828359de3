"""Stage 5 (codegen): what the kernel cache key hashes besides the spec itself.

Comes in: nothing (the package's own files). Goes out: :func:`sources_hash`, a
sha256 over :data:`KEY_SOURCES`, the explicit list of files whose text shapes
the generated source. A spec's key is that hash plus the spec's canonical text
(:meth:`patterndsl.codegen.generator.KernelSpec.key`); nothing else goes in, so
an unrelated edit keeps every cached kernel and a related one can never serve a
stale one. A file belongs here when a function in it decides generated text:
the templates and the generators (``generator.py``, ``ragged.py``), the predicate renderer, the closed-form bound
renderer, the launch table (tiles, warps, dot precision in the header), the
route-table layout, the run-time input table (``codegen/inputs.py``), ``check``
(``expr_bounds`` picks int32 or int64 arithmetic in predicates), ``semantics``
(``route_blocks`` gives the route tables' extents baked into routed kernels),
``ir`` (the substitution pass builds the route corners that routed kernels
evaluate) and the primitive family modules (each holds its primitives' Triton
fragment).
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from patterndsl.primitives import FAMILIES

#: The package root every entry of :data:`KEY_SOURCES` is relative to.
PACKAGE = Path(__file__).resolve().parents[1]

#: Every file whose text shapes generated Triton source (paths relative to the package).
KEY_SOURCES: tuple[str, ...] = (
    "codegen/generator.py",
    "codegen/launch.py",
    "codegen/routes.py",
    "codegen/inputs.py",
    "codegen/predicate.py",
    "codegen/bounds.py",
    "codegen/score.py",
    "scores/nodes.py",
    "scores/symbolic.py",
    "codegen/templates/common.py.tmpl",
    "codegen/templates/forward.py.tmpl",
    "codegen/templates/forward_group.py.tmpl",
    "codegen/templates/backward.py.tmpl",
    "codegen/templates/backward_group.py.tmpl",
    "codegen/ragged.py",
    "codegen/templates/ragged.py.tmpl",
    "codegen/templates/ragged_forward.py.tmpl",
    "codegen/templates/ragged_forward_group.py.tmpl",
    "codegen/templates/ragged_backward.py.tmpl",
    "codegen/templates/ragged_backward_group.py.tmpl",
    "check.py",
    "semantics.py",
    "ir.py",
    # Each primitive family module holds its primitives' Triton fragments.
    *(f"primitives/{family}.py" for family in FAMILIES),
)


def file_digest(path: Path) -> str:
    """sha256 of one file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@cache
def sources_hash() -> str:
    """sha256 over the names and contents of :data:`KEY_SOURCES` (computed once per process)."""
    h = hashlib.sha256()
    for name in KEY_SOURCES:
        h.update(f"{name}\0{file_digest(PACKAGE / name)}\n".encode())
    return h.hexdigest()
