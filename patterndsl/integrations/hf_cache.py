"""A ``transformers`` ``Cache`` built on :class:`patterndsl.PagedKVCache` (LANGUAGE.md section 10).

Each layer keeps its keys in a paged cache under the layer's pattern, so only the keys the
pattern can still reach are held (a StreamingLLM pattern keeps its sinks and its window; memory
follows the pattern) and positions stay each row's own: a row's logical position 0 is its first
real token. ``update`` returns the page pools; the attention function of
:mod:`patterndsl.integrations.transformers` recognises them and reads them through the block table.

Padding: the mask function records which new tokens of each row are real (``note_real``); only
those are appended (a left-padded prompt appends each row's own count, one append per row with
padding; decoding steps append one token to every row at once).

Eager only: the paged bookkeeping is Python (``is_compileable = False``).
"""

from __future__ import annotations

import torch

from patterndsl.kvcache import PagedKVCache

__all__ = ["PatternCache"]

#: id(page pool) -> (pool, block_table, kv_lengths) of the latest update of a layer.
_VIEWS: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
#: which new tokens of each row are real ([batch, n] bool), written by the mask function.
_REAL: dict[str, torch.Tensor | None] = {"new": None}


def note_real(valid_q: torch.Tensor | None) -> None:
    """Record which of the coming tokens are real (called by the mask function)."""
    _REAL["new"] = valid_q


def paged_view(key: torch.Tensor):
    """``(block_table, kv_lengths)`` when ``key`` is a page pool this module returned, else None."""
    found = _VIEWS.get(id(key))
    if found is None or found[0] is not key:
        return None
    return found[1], found[2]


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

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        real = _REAL["new"]
        n = key_states.shape[2]
        if real is None or real.shape != (key_states.shape[0], n) or bool(real.all()):
            self.paged.append(key_states, value_states)
        else:
            for row in range(key_states.shape[0]):
                keep = real[row]
                if bool(keep.any()):
                    self.paged.append(
                        key_states[row : row + 1, :, keep], value_states[row : row + 1, :, keep], rows=[row]
                    )
        self.seen += n
        k, v, table, lengths = self.paged.view()
        _VIEWS.clear() if len(_VIEWS) > 64 else None
        _VIEWS[id(k)] = (k, table, lengths)
        return k, v

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
