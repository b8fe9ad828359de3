"""Test helpers that count calls without changing what the called code does."""

from __future__ import annotations


def count_calls(monkeypatch, module, names=("forward", "backward")) -> dict[str, int]:
    """Wraps ``module.NAME`` for each name so that every call is counted; returns the live counts by name."""
    seen = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return seen
