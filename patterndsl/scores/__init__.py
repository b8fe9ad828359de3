"""Score modifiers (``score EXPR``, contract section 8): typed float expressions of the logit.

Comes in: the syntax of a ``score`` statement and what its names mean (from ``check.py``).
Goes out: a :class:`Score` (the typed, folded expression, its sympy-derived derivatives and,
for biases, the additive split) that semantics, the CPU executor and the Triton renderer read.
Modules: :mod:`.nodes` (nodes, types, folding, printing), :mod:`.bind` (syntax -> nodes),
:mod:`.symbolic` (derivatives), :mod:`.evaluate` (torch evaluation on tiles of pairs), :mod:`.tables`
(reads of run-time inputs and the scatter of their gradients).
"""

from __future__ import annotations

from patterndsl.scores.bind import VARIABLES, Names, bind
from patterndsl.scores.evaluate import Env, evaluate, evaluate_in_place
from patterndsl.scores.nodes import ANY, BOOL, FLOAT, FUNCTIONS, INT, Node, to_source, walk
from patterndsl.scores.symbolic import Score, derive, describe_derivatives
from patterndsl.scores.tables import Tables, scatter

__all__ = [
    "ANY",
    "BOOL",
    "FLOAT",
    "FUNCTIONS",
    "INT",
    "VARIABLES",
    "Env",
    "Names",
    "Node",
    "Score",
    "Tables",
    "bind",
    "derive",
    "describe_derivatives",
    "evaluate",
    "evaluate_in_place",
    "scatter",
    "to_source",
    "walk",
]
