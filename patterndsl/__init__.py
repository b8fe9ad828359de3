"""patterndsl: a compiler for attention sparsity patterns.

Public API only; see ``../shared/LANGUAGE.md`` section 3 and docs/ARCHITECTURE.md.
"""

from patterndsl.api import Pattern, attention, compile, load
from patterndsl.errors import PatternError
from patterndsl.kvcache import PagedKVCache
from patterndsl.primitives.clusters import cluster_labels, update_centroids
from patterndsl.primitives.inputs import segments

__all__ = [
    "PagedKVCache",
    "Pattern",
    "PatternError",
    "attention",
    "cluster_labels",
    "compile",
    "load",
    "segments",
    "update_centroids",
]
__version__ = "0.1.0"
