"""Progress bars for long command-line work (``bench``, large ``plot`` s), drawn with tqdm.

A bar appears only when stderr is a terminal, so piped or captured output (tests, CI logs,
``patterndsl bench > file``) stays exactly as before. Library calls never draw bars.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager


def enabled(stream=None) -> bool:
    """True when progress should be drawn: ``stream`` (default stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_description_str(self, text: str) -> None:
        pass


@contextmanager
def bar(total: int, desc: str, stream=None):
    """A progress bar of ``total`` steps on ``stream`` (stderr); silent when that is not a terminal.

    Yields an object with ``update(n=1)`` and ``set_description_str(text)``.
    """
    if not enabled(stream):
        yield _Silent()
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, file=sys.stderr if stream is None else stream, leave=False) as t:
        yield t
