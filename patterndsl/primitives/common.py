"""Small helpers the primitive families share: tile-rule arithmetic and argument checks.

Comes in: numpy arrays of tile piece ends (tile rules) or bound argument values
(argument rules). Goes out: arrays and raised ``PatternError``s. Nothing here
knows any particular primitive.
"""

from __future__ import annotations

import math

import numpy as np

from patterndsl import ir
from patterndsl.errors import LayoutError, PatternTypeError, PatternValueError

BIG = 1 << 50  # stands in for an unbounded band end; far beyond any position
#: The largest magnitude of an integer a pattern may hold or derive from its arguments (a band
#: end, an offset): the check stage keeps folded values here, so that every later stage can add
#: a position to it (or subtract one) and stay within 64-bit arithmetic.
VALUE_LIMIT = 1 << 62


def fdiv(a, b):
    return np.floor_divide(a, b)


def cdiv(a, b):
    return -np.floor_divide(-a, b)


def distinct_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of an int array and the index of each row's distinct row.

    A lexicographic sort: ``np.unique(axis=0)`` sorts a structured view, many times slower. When
    the columns' ranges fit one int64 as mixed-radix digits (first column most significant, so the
    same order), one key per row: marked in a table when its range is at most a few times the rows
    (linear: the pieces of every candidate tile of a one-sided ``where`` are a few thousand distinct
    rows repeated hundreds of times), else sorted once.
    """
    if len(rows) and rows.ndim == 2:
        low = rows.min(0)
        span = [int(hi) - int(lo) + 1 for hi, lo in zip(rows.max(0).tolist(), low.tolist(), strict=True)]
        if math.prod(span) < 1 << 62:
            radix = np.ones(rows.shape[1], np.int64)
            for c in range(rows.shape[1] - 2, -1, -1):
                radix[c] = radix[c + 1] * span[c + 1]
            key = (rows - low) @ radix
            top = int(key.max())
            if top < 4 * len(rows) + 4096:
                present = np.zeros(top + 1, bool)
                present[key] = True
                inv = (np.cumsum(present) - 1)[key]
                uniq = np.empty((int(present.sum()), rows.shape[1]), rows.dtype)
                uniq[inv] = rows
                return uniq, inv
            _, first, inv = np.unique(key, return_index=True, return_inverse=True)
            return rows[first], inv.reshape(-1)
    order = np.lexsort(rows.T[::-1])
    first = np.ones(len(rows), bool)
    first[1:] = (rows[order[1:]] != rows[order[:-1]]).any(1)
    inv = np.empty(len(rows), np.int64)
    inv[order] = np.cumsum(first) - 1
    return rows[order[first]], inv


def exact(size: int) -> np.ndarray:
    """The ``exact`` answer of a tile rule that decides every pair of pieces."""
    return np.ones(size, dtype=bool)


def require(ok: bool, message: str, span: ir.Span | None) -> None:
    """Raise ``PatternValueError(message)`` at ``span`` unless ``ok``."""
    if not ok:
        raise PatternValueError(message, span)


def require_in_range(value: int, what: str, span: ir.Span | None) -> None:
    """Raise ``PatternValueError`` at ``span`` unless ``|value| <= VALUE_LIMIT``.

    For quantities an argument rule derives from several arguments (a product such as
    ``before * dilation``): each argument is bounded alone when it is folded, their
    products are not.
    """
    require(
        abs(value) <= VALUE_LIMIT,
        f"{what} = {value:.3g} is out of range (|value| must be at most 2**62)",
        span,
    )


def per_axis(value, rank: int) -> tuple:
    """A grid argument as one entry per layout axis (a scalar stands for every axis)."""
    return value if isinstance(value, tuple) else (value,) * rank


def broadcast_to_axes(name: str, keys, values: dict, spans: dict, layout: ir.Layout) -> None:
    """Replace each int-or-tuple argument in ``keys`` by one entry per layout axis, in place.

    Values not known while checking a file without parameter values (neither an int
    nor a tuple) are left alone.

    Raises:
        PatternTypeError: a tuple whose length is not the layout's rank.
    """
    rank = len(layout.axes)
    for key in keys:
        value = values[key]
        if not isinstance(value, (int, tuple)):
            continue
        if not isinstance(value, tuple):
            values[key] = (value,) * rank
        elif len(value) != rank:
            raise PatternTypeError(
                f"{name}() argument '{key}' has {len(value)} entries but the layout has {rank} axes "
                f"({', '.join(layout.names)})",
                spans[key],
            )


def need_layout(name: str, layout: ir.Layout | None, span: ir.Span | None) -> ir.Layout:
    if layout is None:
        raise LayoutError(f"{name}() needs a layout grid(...) declared before it", span)
    return layout


def param(name: str, kind: str, *default) -> ir.Param:
    """A signature entry: required when no default is given."""
    return ir.Param(name, kind, default[0] if default else None, not default)
