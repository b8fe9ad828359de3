"""A ``transformers`` ``Cache`` built on :class:`patterndsl.PagedKVCache` (LANGUAGE.md section 10).

Each layer keeps its keys in a paged cache under the layer's pattern, so only the keys the
pattern can still reach are held (a StreamingLLM pattern keeps its sinks and its window; memory
follows the pattern) and positions stay each row's own: a row's logical position 0 is its first
real token.

How a step flows: the model calls ``update`` with the step's new keys and values, which the layer
holds as *pending* and returns as a 5-D handle ``[1, batch, kv_heads, n, head_dim]`` (a view of
the new keys); the attention function of :mod:`patterndsl.integrations.transformers` sees the
fifth dimension (a static property, so tracing needs no data-dependent branch), and
:func:`commit` appends the new tokens that its mask marks real (a left-padded prompt appends each
row's own count; decoding steps append one token to every row at once) and returns the page
pools with their block table and lengths.

Under ``torch.compile``: ``update`` and the paged attention run eagerly (``torch.compiler.disable``:
the page bookkeeping is host-side Python), so a compiled model generates with a ``PatternCache``
with graph breaks around each layer's cache step, while the rest (projections, MLPs) is compiled;
``fullgraph=True`` refuses such a graph break, so it covers prefill and training (no cache, or
``transformers``' own caches), not generation with a ``PatternCache``.
"""

from __future__ import annotations

import torch

from patterndsl.errors import PatternError
from patterndsl.kvcache import PagedKVCache

__all__ = ["EAGER_REASON", "PatternCache", "commit"]

#: Why the cache step is not traced (shown by torch.compile when ``fullgraph=True`` meets it).
EAGER_REASON = (
    "a patterndsl PatternCache keeps its pages with host-side Python bookkeeping; generate with it under "
    "torch.compile(fullgraph=False), or use fullgraph=True for prefill and training"
)

#: id(handle) -> the layer whose pending keys the handle stands for (one entry per layer at most).
_PENDING: dict[int, _PagedLayer] = {}


@torch.compiler.disable(reason=EAGER_REASON)
def commit(handle: torch.Tensor, real: torch.Tensor | None):
    """Append the pending keys behind ``handle`` (those ``real`` marks, ``[batch, n]`` bool, or all)
    to their layer's paged cache; returns ``(k_pages, v_pages, block_table, kv_lengths)``."""
    layer = _PENDING.pop(id(handle), None)
    if layer is None or layer.pending is None or layer.pending[0] is not handle:
        raise PatternError("a 5-D key tensor reached the patterndsl attention without a PatternCache update behind it")
    handle, values = layer.pending
    layer.pending = None
    return layer.append(handle[0], values[0], real)


def _layer_base():
    from transformers.cache_utils import CacheLayerMixin

    return CacheLayerMixin


class _PagedLayer(_layer_base()):
    is_sliding = False
    is_compileable = False

    def __init__(self, pattern, num_pages: int, page_size: int, heads: int):
        super().__init__()
        self.pattern, self.num_pages, self.page_size, self.heads = pattern, num_pages, page_size, heads
        self.paged: PagedKVCache | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.seen = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        b, hkv, _, d = key_states.shape
        self.paged = PagedKVCache(
            self.pattern,
            self.num_pages,
            self.page_size,
            hkv,
            d,
            dtype=key_states.dtype,
            device=key_states.device,
            batch=b,
            heads=self.heads,
        )
        self.is_initialized = True

    @torch.compiler.disable(reason=EAGER_REASON)
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:
            _PENDING.pop(id(self.pending[0]), None)  # a step whose attention never ran
        handle, values = key_states[None], value_states[None]
        self.pending = (handle, values)
        _PENDING[id(handle)] = self
        self.seen += key_states.shape[2]
        return handle, values

    def append(self, key_states, value_states, real):
        """Add the ``real`` new tokens of each row; the cache's view afterwards."""
        if real is None or bool(real.all()):
            self.paged.append(key_states, value_states)
        else:
            for row in range(key_states.shape[0]):
                keep = real[row]
                if bool(keep.any()):
                    self.paged.append(
                        key_states[row : row + 1, :, keep], value_states[row : row + 1, :, keep], rows=[row]
                    )
        return self.paged.view()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def pages_in_use(self) -> int:
        return 0 if self.paged is None else self.paged.pages_in_use()


def _cache_base():
    from transformers import Cache

    return Cache


class PatternCache(_cache_base()):
    """A ``transformers`` cache whose layers are :class:`PagedKVCache` s under each layer's pattern.

    Args:
        model: a model built with a patterndsl ``attn_implementation`` (its patterns are used).
        num_pages: pages per layer (each ``[kv_heads, page_size, head_dim]``).
        page_size: positions per page.

    Pass it as ``past_key_values=`` to ``generate`` or ``forward``.
    """

    def __init__(self, model, num_pages: int = 256, page_size: int = 16):
        from patterndsl.integrations.transformers import layer_patterns

        patterns = layer_patterns(model)
        heads = model.config.num_attention_heads
        super().__init__(layers=[_PagedLayer(p, num_pages, page_size, heads) for p in patterns])

    def pages_in_use(self) -> list[int]:
        """Pages held by each layer."""
        return [layer.pages_in_use() for layer in self.layers]
