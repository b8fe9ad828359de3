"""Stage 4 of the pipeline: the block plan.

Comes in: a bound pattern (:class:`patterndsl.ir.PatternIR`) and sizes. Goes
out: a :class:`~patterndsl.analysis.plan.BlockPlan` (:func:`plan`), its text
summary (:func:`describe`) and the multi-layer receptive field of a pattern
(:func:`reachability`).
"""

from patterndsl.analysis.plan import BlockPlan, HeadGroup, PlanStats, RunForm, Runs, TileList, tile_reduce
from patterndsl.analysis.planner import describe, plan

__all__ = ["BlockPlan", "HeadGroup", "PlanStats", "RunForm", "Runs", "TileList", "describe", "plan", "tile_reduce"]
from patterndsl.analysis.reach import Reach, reachability

__all__ += ["Reach", "reachability"]
