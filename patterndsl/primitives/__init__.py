"""The vocabulary of the language: one record per primitive, in one registry every stage reads.

Comes in: nothing. Goes out: :data:`REGISTRY` (name -> :class:`Primitive`),
filled by importing the family modules below, each of which holds, for its
primitives, the signature and argument rules (``check``), the dense meaning
(``semantics``), the tile rules (``analysis``: classification, needed keys,
cost, band, totals and counts) and the Triton fragment (``codegen``).
``ir.SIGNATURES``, ``ir.GRID_PRIMITIVES`` and ``ir.DYNAMIC_PRIMITIVES`` are
views of it.

How to add a primitive
----------------------
1. Write its module here (or add it to a family module): build a
   :class:`Primitive` with every field given -- a function, or an explicit
   ``None`` where it has no such rule (no argument constraint, evaluated element
   by element, reaches any key, counted by evaluation, ...) -- and
   :func:`register` it. ``band.py`` is the model for a closed formula of
   ``q - k``; ``keys.py`` for one that tests the key alone; ``where.py`` for one
   with size constraints or one that reads the head.
2. Add the module's name to :data:`FAMILIES` below (the registry line).

That is all the product needs: parsing and argument checks, printing,
``Pattern.mask``, the plan, the CPU executor and the Triton kernels find it
here. :func:`validate` (run by :func:`register`) rejects a record that leaves a
field out. Outside the product: add an example to ``EXAMPLES`` in
``tests/unit/test_registry.py`` (that test fails until you do, and checks the
new rules against the meaning), teach the independent oracles
(``tests/brute.py``, ``tests/contract/oracle.py``) if property tests should
draw it, and document it in LANGUAGE.md. ``tests/unit/test_primitive_extension.py``
adds two primitives this way inside a test.
"""

from __future__ import annotations

import importlib

from patterndsl.primitives.registry import (
    MISSING,
    REGISTRY,
    Primitive,
    lookup,
    register,
    registered,
    unregister,
    validate,
)

__all__ = ["FAMILIES", "MISSING", "REGISTRY", "Primitive", "lookup", "register", "registered", "unregister", "validate"]

#: The family modules, imported in this order (the order of ``ir.SIGNATURES``).
FAMILIES = ("basic", "band", "blocks", "keys", "where", "neighborhood", "route", "inputs", "clusters")

for _family in FAMILIES:
    importlib.import_module(f"patterndsl.primitives.{_family}")
