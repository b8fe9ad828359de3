"""The primitive registry: one :class:`Primitive` record per primitive, read by every stage.

Comes in: records built by the family modules of :mod:`patterndsl.primitives`
(``basic``, ``band``, ``keys``, ``blocks``, ``where``, ``neighborhood``,
``route``), each registered with :func:`register`. Goes out: :data:`REGISTRY`,
the mapping name -> record that ``ir.SIGNATURES``, ``check``, ``semantics``,
``analysis.classify``/``engine`` and ``codegen.predicate`` look primitives up in.

Every rule field must be given: a function, or an explicit ``None`` that says
"this primitive has no such rule" (it is then evaluated element by element,
may reach any key, is counted by evaluation, ...). :func:`validate` rejects a
record that leaves any field out, so forgetting a rule fails loudly instead of
silently falling back. The meaning of every field is in :class:`Primitive`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

from patterndsl import ir


class _Missing:
    """The value of a rule field nobody gave; :func:`validate` rejects it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(frozen=True, slots=True)
class Primitive:
    """Everything one primitive means to every stage.

    Rule fields are functions or an explicit ``None`` (no such rule); a field left
    at :data:`MISSING` makes :func:`validate` (and so :func:`register`) fail.

    Attributes:
        name: the name in the language.
        params: the signature, positional order (``ir.Param``; a bare name is a
            pattern when it is empty, like ``causal``).
        check: ``(values, spans, layout) -> ir.Node | None``: argument constraints
            after types are checked, raising ``PatternValueError`` at the argument's
            span; may return a simpler equal node (``where(true)`` is ``full``).
            None: every value of the right kind is valid.
        shape_args: ``(values, spans, layout, span) -> None``: broadcasts int-or-tuple
            arguments to the layout's axes before ``check`` (grid primitives). None: nothing to shape.
        check_sizes: ``(prim, q_len, kv_len, heads, layout) -> None``: constraints that depend on
            the sizes it is used at (``heads``: the heads that use it), checked by
            ``check.check_lengths``. None: valid at every size.
        meaning: ``(prim, q, k, h, ctx, selection) -> BoolTensor``: the dense meaning at
            end-aligned positions ``q``, ``k`` (int64 tensors that broadcast), head ``h``,
            sizes ``ctx`` (``semantics.Context``) and the route choice ``selection``. Required.
        reads_head: ``(prim) -> bool``: whether this use of it depends on the head ``h`` (then
            heads are not shared, ``ir.uses_head``). None: never.
        classify: ``(prim, qp, kp, env) -> (nonempty, full, exact) | None``: symbolic tile
            classification on aligned arrays of pieces (``analysis.tiles.Pieces``); returning
            None (or a None rule) means "evaluate element by element".
        needed_keys: ``(prim, qlo, qhi, qalo, qahi, env) -> (lo, hi, axis_lo, axis_hi) | None``:
            the key positions a query tile can reach; None: any key (every key tile is a candidate).
        candidates: ``(engine, prim) -> keys | None``: enumerates the candidate tiles itself
            (sorted ``m * n_key_tiles + n``), or None to use ``needed_keys``.
        cost: rough rank of how many tiles it reaches, cheapest first inside an intersection.
        band: ``(prim, env) -> (lo, hi, modulus) | None``: the primitive as one band
            ``lo <= q - k <= hi``, ``(q - k) % modulus == 0`` (counted by formula); None: not a band.
        total: ``(prim, q_len, kv_len, layout, env) -> int | None``: allowed pairs over all
            queries by formula; None: no formula (a band falls back to its band total).
        count: ``(prim, engine, keys) -> counts | None``: allowed pairs per partial tile of a
            1-D plan by formula; None: counted as a band or by evaluation.
        triton: ``(renderer, prim) -> str``: the boolean Triton code of the primitive
            (``codegen.predicate.PredicateRenderer``); may raise ``PatternError`` when the
            primitive cannot be compiled into a kernel. None: it cannot.
        grid: the meaning needs a ``layout grid(...)``.
        dynamic: decided from the data at run time (``route``).
        joint_search: capability, ``(prim, env) -> bool``: its tiles are bounded only by interval
            reasoning (no needed-key range, no listed candidates), so inside an intersection the
            operands searched together bound the tiles far tighter than each alone. None: never.
        periods: capability, ``(prim) -> tuple[int, ...]``: moduli its tile rule is exact on
            residue classes of (besides its ``band`` modulus), so refinement splits tiles by them
            first. None: none.
        shift_periods: capability, ``(prim, env) -> (Pq, Pk) | None``: in 1-D, periods by which its
            meaning repeats (the same at ``q + Pq`` and at ``k + Pk``, every position): a region of
            tiles whose sizes they divide holds the same mask in every tile. None: not known.
        axes: capability, ``(prim, layout) -> tuple[int, ...] | None``: the grid axes (indices) its
            meaning reads, on both sides; None (or a None rule): it may read flattened positions.
            Parts of a pattern that read one axis each are counted axis by axis.
    """

    name: str
    params: tuple[ir.Param, ...] = MISSING
    check: Callable | None = MISSING
    shape_args: Callable | None = MISSING
    check_sizes: Callable | None = MISSING
    meaning: Callable = MISSING
    reads_head: Callable | None = MISSING
    classify: Callable | None = MISSING
    needed_keys: Callable | None = MISSING
    candidates: Callable | None = MISSING
    cost: int = MISSING
    band: Callable | None = MISSING
    total: Callable | None = MISSING
    count: Callable | None = MISSING
    triton: Callable | None = MISSING
    grid: bool = False
    dynamic: bool = False
    # Capabilities: optional, so a record written without them keeps its meaning (None: no such ability).
    joint_search: Callable | None = None
    periods: Callable | None = None
    shift_periods: Callable | None = None
    axes: Callable | None = None


#: Fields that must be a function (no opt-out).
_REQUIRED = frozenset({"meaning"})
#: Fields that are not rules.
_PLAIN = {"name": str, "params": tuple, "cost": int, "grid": bool, "dynamic": bool}


def validate(record: Primitive) -> Primitive:
    """Check that ``record`` gives every rule (a function or an explicit None) and well-formed fields.

    Args:
        record: the record to check.

    Returns:
        ``record``.

    Raises:
        TypeError: a field left out, a rule that is not callable, or a malformed signature.
    """
    problems = []
    for f in fields(Primitive):
        value = getattr(record, f.name)
        if value is MISSING:
            problems.append(f"'{f.name}' is not given (use None to opt out explicitly)")
        elif f.name in _PLAIN:
            if not isinstance(value, _PLAIN[f.name]) or (f.name == "cost" and isinstance(value, bool)):
                problems.append(f"'{f.name}' must be {_PLAIN[f.name].__name__}, got {value!r}")
        elif value is None and f.name in _REQUIRED:
            problems.append(f"'{f.name}' is required (no opt-out)")
        elif value is not None and not callable(value):
            problems.append(f"'{f.name}' must be a function or None, got {value!r}")
    if isinstance(record.params, tuple) and not all(isinstance(p, ir.Param) for p in record.params):
        problems.append("'params' must hold ir.Param entries")
    if problems:
        raise TypeError(f"primitive {record.name!r} is incomplete: " + "; ".join(problems))
    return record


#: Every primitive of the language: name -> record (filled by the family modules).
REGISTRY: dict[str, Primitive] = {}


def register(record: Primitive) -> Primitive:
    """Validate ``record`` and add it to :data:`REGISTRY`.

    Raises:
        TypeError: the record is incomplete (:func:`validate`).
        ValueError: a primitive of that name is already registered.
    """
    validate(record)
    if record.name in REGISTRY:
        raise ValueError(f"primitive {record.name!r} is already registered")
    REGISTRY[record.name] = record
    return record


def unregister(name: str) -> Primitive:
    """Remove a primitive from :data:`REGISTRY` and return its record."""
    return REGISTRY.pop(name)


@contextmanager
def registered(*records: Primitive) -> Iterator[None]:
    """Register ``records`` for the duration of a ``with`` block (tests and experiments)."""
    done = []
    try:
        for record in records:
            done.append(register(record).name)
        yield
    finally:
        for name in done:
            unregister(name)


def lookup(name: str) -> Primitive:
    """The record of primitive ``name``.

    Raises:
        TypeError: no such primitive (an IR node built by hand with an unknown name).
    """
    record = REGISTRY.get(name)
    if record is None:
        raise TypeError(f"unknown primitive {name!r}")
    return record
