"""``torch.nn`` modules built on :func:`patterndsl.attention` (LANGUAGE.md section 10).

:class:`Attention` is self-attention with its own projections: ``[batch, seq, embed_dim]`` in and
out, a pattern over the ``seq`` positions (1-D, or a grid ``layout`` flattened row-major as the
pattern's layout says), grouped-query heads and optional rotary embeddings.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from patterndsl.api import Pattern, attention, compile, load
from patterndsl.errors import PatternError, PatternTypeError

__all__ = ["Attention", "as_pattern", "rotary"]


def as_pattern(pattern, **params) -> Pattern:
    """A :class:`Pattern` from a ``Pattern`` (``params`` must then be empty), source text or a path."""
    if isinstance(pattern, Pattern):
        if params:
            raise PatternError(
                f"parameters {sorted(params)} given with an already bound Pattern {pattern.name!r}; "
                "bind them when compiling it"
            )
        return pattern
    # Every definition has a body in braces: text without one that names a file is a path, whatever its suffix.
    if isinstance(pattern, os.PathLike) or (
        isinstance(pattern, str) and "{" not in pattern and (pattern.endswith(".pdsl") or os.path.isfile(pattern))
    ):
        return load(pattern, **params)
    if isinstance(pattern, str):
        return compile(pattern, **params)
    raise PatternTypeError(f"pattern must be a Pattern, source text or a path, got {type(pattern).__name__}")


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (rotate-half form, as in Llama) of ``x`` ``[batch, heads, seq, dim]``.

    ``positions`` is ``[seq]`` or ``[batch, seq]``; ``dim`` must be even.
    """
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [(batch,) seq, dim / 2]
    angles = torch.cat((angles, angles), dim=-1)
    if angles.dim() == 3:
        angles = angles[:, None]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head self-attention under a pattern.

    Args:
        pattern: a :class:`Pattern`, source text, or a path to a ``.pdsl`` file.
        embed_dim: model width; ``num_heads`` must divide it.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query), default ``num_heads``; must divide ``num_heads``.
        bias: biases on the four projections.
        rope: rotary embeddings on queries and keys (positions ``0 .. seq - 1``, or ``positions=``
            given to ``forward``); ``True`` or the rotary base as a number.
        **params: the pattern's parameters (with source text or a path).

    ``forward(x, positions=None, **inputs)``: ``x`` is ``[batch, seq, embed_dim]`` (or, for a pattern
    with a grid layout, ``[batch, *grid, embed_dim]``); ``inputs`` are the pattern's run-time inputs
    (LANGUAGE.md section 7). Returns a tensor of the shape of ``x``.
    """

    def __init__(
        self,
        pattern,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        bias: bool = True,
        rope: bool | float = False,
        **params,
    ):
        super().__init__()
        self.pattern = as_pattern(pattern, **params)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PatternTypeError(f"Attention: {name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise PatternError(f"Attention: num_heads={num_heads} does not divide embed_dim={embed_dim}")
        if num_heads % num_kv_heads:
            raise PatternError(f"Attention: num_kv_heads={num_kv_heads} does not divide num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        if rope and self.head_dim % 2:
            raise PatternError(f"Attention: rope needs an even head size, got {self.head_dim}")
        self.rope_base = None if not rope else (10000.0 if rope is True else float(rope))
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias)
        self.o_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def extra_repr(self) -> str:
        return (
            f"pattern={self.pattern!r}, embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, rope={self.rope_base is not None}"
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, **inputs) -> torch.Tensor:
        if positions is not None and any(decl.name == "positions" for decl in self.pattern.ir.inputs):
            # The pattern's own input of that name (LANGUAGE.md section 10: forward(x, **inputs)).
            inputs["positions"], positions = positions, None
        layout = self.pattern.ir.layout
        grid = [] if layout is None else list(layout.shape)
        if x.dim() == 2 + len(grid) and len(grid) > 1 and list(x.shape[1:-1]) == grid:
            return self.forward(x.flatten(1, -2), positions, **inputs).view(x.shape)
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shapes = f"[batch, seq, {self.embed_dim}]" + (
                f" or [batch, {', '.join(map(str, grid))}, {self.embed_dim}]" if len(grid) > 1 else ""
            )
            raise PatternError(f"Attention: x must be {shapes}, got {list(x.shape)}")
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope_base is not None:
            if positions is None:
                positions = torch.arange(seq, device=x.device)
            q, k = rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base)
        out = attention(q.contiguous(), k.contiguous(), v.contiguous(), self.pattern, **inputs)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.embed_dim))
