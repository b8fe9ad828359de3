"""Errors a user can cause, at every stage.

Every stage raises a subclass of :class:`PatternError`. An error that comes
from source text carries a :class:`~patterndsl.ir.Span` and renders as
``FILE:LINE:COLUMN: message`` followed by the offending line and a caret.
Errors about tensors, shapes or backends carry no span and render as the
message alone.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: A source line longer than this is shown as the part around the error's caret, this many
#: characters on each side.
_LONG_LINE = 160
_CONTEXT = 60


def listing(names: Iterable[str], limit: int = 10) -> str:
    """``a, b, c`` for a message, with at most ``limit`` names (``..., and 2990 more``)."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... and {len(names) - limit} more"


class PatternError(Exception):
    """Base class of every error patterndsl raises on purpose.

    Args:
        message: what was wrong, in one sentence.
        span: where in the source (a :class:`patterndsl.ir.Span`), if known.
        source: the full source text, used to print the line and a caret.
    """

    def __init__(self, message: str, span=None, source: str | None = None):
        self.message = message
        self.span = span
        self.source = source
        super().__init__(self.render())

    def with_source(self, source: str | None, filename: str | None = None) -> PatternError:
        """Return a copy of this error that knows the source text (and file name)."""
        span = self.span
        if span is not None and filename is not None and span.file in (None, "<string>"):
            span = span.with_file(filename)
        err = type(self).__new__(type(self))
        PatternError.__init__(err, self.message, span, source if source is not None else self.source)
        return err

    @property
    def location(self) -> str | None:
        """``FILE:LINE:COLUMN`` of the error, or None when it has no source position."""
        if self.span is None:
            return None
        return f"{self.span.file or '<string>'}:{self.span.line}:{self.span.column}"

    def render(self) -> str:
        if self.span is None:
            return self.message
        head = f"{self.location}: {self.message}"
        if not self.source:
            return head
        lines = self.source.splitlines()
        if not 1 <= self.span.line <= len(lines):
            return head
        text = lines[self.span.line - 1].expandtabs(1)
        start = self.span.column - 1
        width = 1
        if self.span.end_line == self.span.line and self.span.end_column > self.span.column:
            width = self.span.end_column - self.span.column
        # A generated source can have very long lines: show the part around the caret.
        left = max(0, start - _CONTEXT) if len(text) > _LONG_LINE else 0
        if left:
            text, start = "..." + text[left:], start - left + 3
        if len(text) > _LONG_LINE and len(text) > start + _CONTEXT + width:
            text = text[: start + _CONTEXT + width] + "..."
        width = min(width, len(text) - start)
        caret = " " * start + "^" * max(1, width)
        return f"{head}\n    {text}\n    {caret}"

    def __str__(self) -> str:
        return self.render()


class PatternSyntaxError(PatternError):
    """The text does not follow the grammar."""


class PatternNameError(PatternError):
    """An unknown primitive, parameter, variable, axis or pattern name."""


class PatternTypeError(PatternError):
    """A value of the wrong type or arity (a tuple where an integer goes, ...)."""


class PatternValueError(PatternError):
    """A value out of range: zero divisor, negative size, neighborhood larger than its axis, ..."""


class LayoutError(PatternError):
    """A layout that does not fit the sequence lengths, or a grid feature without a layout."""


class HeadsError(PatternError):
    """Heads not covered by any ``heads`` line and no default expression."""


class InputError(PatternError):
    """Tensors of the wrong shape, dtype, device or head count."""


class BackendError(PatternError):
    """A backend that cannot run here (e.g. ``backend="triton"`` on CPU without the interpreter)."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
