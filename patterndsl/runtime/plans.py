"""Runtime stage: the registry that lets a torch custom op receive a block plan by name.

Comes in: a bound pattern (:class:`patterndsl.ir.PatternIR`) with a tile size
and an ordering policy, registered once under a short string key; later, that
key plus the run-time sizes ``(Lq, Lk, heads)``. Goes out: the
:class:`~patterndsl.analysis.plan.BlockPlan` for those sizes, built on first
use and cached. Custom ops can only take tensors and plain scalars, so the op
carries the key; the sizes come from the tensors it is given, which keeps the
key a constant under ``torch.compile`` even when shapes are symbolic. Run-time
inputs a plan reads (documents, lengths, tables) are tensors, so they travel
beside the key in the op's ``data`` list rather than in the key.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

from patterndsl import ir
from patterndsl.errors import PatternError


@dataclass(frozen=True)
class PlanSpec:
    """What a key stands for: the pattern and how to tile it."""

    pattern: ir.PatternIR
    block: tuple[int, int]
    order: str


class Keys:
    """Specs interned under short string keys: ops carry the key, never the object.

    One instance per kind of call (static plans here, ragged calls in ``runtime/ragged.py``);
    ``make(spec, n)`` names the ``n``-th spec, and a prefix of its own keeps kinds apart.
    """

    def __init__(self, what: str):
        self.what = what
        self._lock = threading.Lock()
        self._specs: dict[str, object] = {}
        self._keys: dict[object, str] = {}

    def register(self, spec, make) -> str:
        """The key of ``spec``, made by ``make(spec, n)`` on its first registration."""
        with self._lock:
            key = self._keys.get(spec)
            if key is None:
                key = make(spec, len(self._specs))
                self._specs[key] = spec
                self._keys[spec] = key
        return key

    def __contains__(self, key) -> bool:
        return key in self._specs

    def spec(self, key: str):
        """The spec under ``key``; a PatternError for a key this process never registered."""
        try:
            return self._specs[key]
        except KeyError:
            raise PatternError(
                f"unknown {self.what} key {key!r}: patterns are registered by patterndsl.attention"
            ) from None


_LOCK = threading.Lock()
_REGISTRY = Keys("plan")
_PLANS: OrderedDict[tuple[str, int, int, int], object] = OrderedDict()
#: Plans kept in memory; each is small (tile lists, never an L x L tensor).
MAX_PLANS = 64


def register(pattern: ir.PatternIR, block: tuple[int, int], order: str) -> str:
    """Register a pattern with its tiling and return the string key ops carry.

    Args:
        pattern: the bound pattern.
        block: tile sizes ``(BM, BN)``.
        order: ``"auto"`` or ``"identity"``.

    Returns:
        A short key such as ``"p3:64x64:auto"``; the same spec always gets the same key.
    """
    spec = PlanSpec(pattern, (int(block[0]), int(block[1])), order)
    return _REGISTRY.register(spec, lambda s, n: f"p{n}:{s.block[0]}x{s.block[1]}:{s.order}")


def spec(key: str) -> PlanSpec:
    """The spec registered under ``key``.

    Raises:
        PatternError: for a key this process never registered.
    """
    return _REGISTRY.spec(key)


def get(key: str, q_len: int, kv_len: int, heads: int):
    """The block plan of ``key`` at these sizes, built on first use.

    Args:
        key: from :func:`register`.
        q_len, kv_len, heads: the run-time sizes.

    Returns:
        A :class:`~patterndsl.analysis.plan.BlockPlan`.

    Raises:
        PatternError: sizes that do not fit the pattern (layout extents, heads not covered).
    """
    cache_key = (key, int(q_len), int(kv_len), int(heads))
    with _LOCK:
        plan = _PLANS.get(cache_key)
        if plan is not None:
            _PLANS.move_to_end(cache_key)
            return plan
    s = spec(key)
    plan = build(s.pattern, int(q_len), int(kv_len), int(heads), s.block, s.order)
    with _LOCK:
        _PLANS[cache_key] = plan
        while len(_PLANS) > MAX_PLANS:
            _PLANS.popitem(last=False)
    return plan


def build(pattern: ir.PatternIR, q_len: int, kv_len: int, heads: int, block: tuple[int, int], order: str):
    """Check the sizes against the pattern and build its plan (uncached).

    Args:
        pattern: the bound pattern.
        q_len, kv_len, heads: sizes.
        block: ``(BM, BN)``.
        order: ``"auto"`` or ``"identity"``.

    Returns:
        A :class:`~patterndsl.analysis.plan.BlockPlan`.
    """
    from patterndsl import analysis, check

    check.check_lengths(pattern, q_len, kv_len, heads)
    return analysis.plan(pattern, q_len, kv_len, heads, block=block, order=order)


def clear() -> None:
    """Forget every cached plan (keys stay valid; plans are rebuilt on demand)."""
    with _LOCK:
        _PLANS.clear()


# Data derived from one plan (schedules, device tensors, kernel specs, ...), keyed by the plan's
# id and a tag, dropped when the plan is collected. The weak reference guards against a new
# plan reusing a collected one's id before its finalizer ran.
_PER_PLAN: dict[tuple, tuple] = {}


def per_plan(plan, what, build):
    """``build()`` computed once per (plan, ``what``) and kept while the plan lives.

    Args:
        plan: a ``BlockPlan`` (any weak-referenceable object).
        what: a hashable tag naming the derived value and whatever else it depends on.
        build: zero-argument callable computing the value.

    Returns:
        The cached value.
    """
    key = (id(plan), what)
    entry = _PER_PLAN.get(key)
    if entry is None or entry[0]() is not plan:
        entry = (weakref.ref(plan), build())
        _PER_PLAN[key] = entry
        weakref.finalize(plan, _PER_PLAN.pop, key, None)
    return entry[1]
