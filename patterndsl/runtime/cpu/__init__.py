"""Runtime stage: the CPU executor, forward and backward, driven by a block plan.

Comes in: ``q``, ``k``, ``v`` (``[batch, heads, seq, head_dim]``, any float dtype, grouped-query
heads allowed), the :class:`~patterndsl.analysis.plan.BlockPlan` of the pattern at these sizes
and, optionally, :class:`CpuOptions` (``with cpu.options(kernel="math"):`` or ``options=``).
Goes out: the attention output and its log-sum-exp (and, for the backward pass, ``dq``, ``dk``,
``dv``) in the original token order. The modules follow the run: :mod:`.schedule` turns tile
lists into segments (affine runs over strided views, gathered buckets, runs merged by
log-sum-exp), :mod:`.units` decides what one call runs (per head group, and per batch element
for ``route``), :mod:`.views` lays tensors out in tiles and views a segment's tiles,
:mod:`.forward` and :mod:`.backward` run the steps, :mod:`.gather` runs the per-row ``route``
blocks, and :mod:`.tuning` holds every knob. The functions re-exported here (``forward``,
``backward``, ``schedule``) shadow the submodules of the same name as attributes of this
package: reach a submodule's internals with ``from patterndsl.runtime.cpu.forward import ...``.
"""

from __future__ import annotations

# Each ``from`` import loads its submodule first, then binds the function over the attribute
# the import system set for that submodule: the package attributes are the functions.
from patterndsl.runtime.cpu.backward import backward
from patterndsl.runtime.cpu.forward import forward
from patterndsl.runtime.cpu.schedule import Schedule, Segment, schedule, schedules
from patterndsl.runtime.cpu.tuning import CpuOptions, current, options, set_options

__all__ = [
    "CpuOptions",
    "Schedule",
    "Segment",
    "backward",
    "current",
    "forward",
    "options",
    "schedule",
    "schedules",
    "set_options",
]
