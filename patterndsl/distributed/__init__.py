"""Context parallelism: attention over a sequence sharded across the ranks of a process group.

Public API (LANGUAGE.md section 11): :func:`shard` (token layouts from the plan), :func:`cost`
(per-rank work and traffic from the plan alone) and :func:`attention` (the distributed forward and
backward, equal to single-process attention). Ranks exchange exactly the key/value tiles their
query tiles visit and do not own.
"""

from patterndsl.distributed.costs import cost
from patterndsl.distributed.layout import Layout, shard
from patterndsl.distributed.parallel import attention, last_traffic
from patterndsl.distributed.traffic import RankCost

__all__ = ["Layout", "RankCost", "attention", "cost", "last_traffic", "shard"]
