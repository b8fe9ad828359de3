"""The one validator of attention tensors, shared by every stage that takes ``q``, ``k``, ``v``.

Comes in: the tensors a user handed to ``attention``, ``Pattern.__call__``, ``Pattern.mask(q=, k=)``
or a backend entry point, and what the caller supports (dtypes) or expects (sizes). Goes out: their
:class:`Sizes`, or an :class:`~patterndsl.errors.InputError` whose message names the tensor and says
what was wrong. It depends on torch and the error types only, so the dense reference
(:mod:`patterndsl.semantics`) and the runtime (:mod:`patterndsl.runtime.validate`, the backends)
check with the same code and the same words.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patterndsl.errors import InputError

#: Floating dtypes attention is defined for (computed in float32 at least, float64 for float64).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Sizes:
    """The sizes of one validated call.

    Attributes:
        batch, heads, kv_heads: ``B``, query heads ``H``, key/value heads ``Hkv`` (divides ``H``).
        q_len, kv_len, head_dim: ``Lq``, ``Lk``, ``D``.
    """

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).replace("torch.", "")


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def check_kinds(named: dict[str, object]) -> None:
    """Each value is a 4-dimensional tensor and all of them are on one device.

    Args:
        named: ``{"q": q, "k": k, ...}`` in the order the user wrote them.

    Raises:
        InputError: a value that is not a tensor, has another rank, or lives on another device.
    """
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name} must have 4 dimensions [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
    devices = [t.device for t in named.values()]
    if len(set(devices)) > 1:
        raise InputError(f"{_listing(list(named))} must be on one device, got {_listing([str(d) for d in devices])}")


def check_dtypes(named: dict[str, torch.Tensor], allowed: tuple[torch.dtype, ...], who: str) -> None:
    """Each tensor has a dtype ``who`` supports, and all have the same one.

    Args:
        named: tensors checked by :func:`check_kinds`.
        allowed: the supported dtypes.
        who: what supports them, for the message (``"the cpu backend"``).

    Raises:
        InputError: an unsupported dtype, or two different ones.
    """
    for name, t in named.items():
        if t.dtype not in allowed:
            names = ", ".join(dtype_name(d) for d in allowed)
            raise InputError(f"{name} has dtype {dtype_name(t.dtype)}; {who} supports {names}")
    dtypes = [t.dtype for t in named.values()]
    if len(set(dtypes)) > 1:
        raise InputError(
            f"{_listing(list(named))} must have one dtype, got {_listing([dtype_name(d) for d in dtypes])}"
        )


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> Sizes:
    """``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]`` and ``v [B, Hkv, Lk, Dv]`` fit together.

    ``Dv`` may differ from ``D`` (as in SDPA); ``Hkv`` must divide ``H`` (grouped-query attention).

    Args:
        q, k: 4-dimensional tensors (see :func:`check_kinds`).
        v: likewise, or None when only the scores matter (``Pattern.mask``).

    Returns:
        The :class:`Sizes`.

    Raises:
        InputError: naming the tensors whose sizes disagree.
    """
    kv = {"k": k} if v is None else {"k": k, "v": v}
    b, h, lq, d = q.shape
    if any(t.shape[0] != b for t in kv.values()):
        have = ", ".join(f"{name} has {t.shape[0]}" for name, t in {"q": q, **kv}.items())
        raise InputError(f"batch sizes differ: {have}")
    hkv, lk = k.shape[1], k.shape[2]
    if v is not None and v.shape[1] != hkv:
        raise InputError(f"k and v must have the same number of heads, got {hkv} and {v.shape[1]}")
    if v is not None and v.shape[2] != lk:
        raise InputError(f"k and v must have the same sequence length, got {lk} and {v.shape[2]}")
    if k.shape[3] != d:
        raise InputError(f"head_dim differs: q has {d}, k has {k.shape[3]}")
    if v is not None and v.shape[3] == 0:
        raise InputError(f"v must have head_dim >= 1, got shape {tuple(v.shape)}")
    if hkv == 0 or h % hkv != 0:
        verb = "has" if v is None else "have"
        raise InputError(f"{_listing(list(kv))} {verb} {hkv} heads, which does not divide the {h} query heads")
    if h == 0 or d == 0:
        raise InputError(f"q must have at least one head and head_dim >= 1, got shape {tuple(q.shape)}")
    if lq == 0:
        raise InputError(f"q has sequence length 0 (shape {tuple(q.shape)}); attention needs at least one query")
    if lk == 0:
        verb = "has" if v is None else "have"
        shapes = _listing([str(tuple(t.shape)) for t in kv.values()])
        raise InputError(
            f"{_listing(list(kv))} {verb} sequence length 0 (shape {shapes}); attention needs at least one key"
        )
    return Sizes(b, h, hkv, lq, lk, d)


def check_sizes(sizes: Sizes, heads: int, q_len: int, kv_len: int, source: str) -> None:
    """The tensors have the sizes something else was built for.

    Args:
        sizes: from :func:`check_shapes`.
        heads, q_len, kv_len: the expected sizes.
        source: what expects them, for the message (``"mask(...)"``, ``"the plan"``).

    Raises:
        InputError: naming the tensor and the size that differs.
    """
    if sizes.heads != heads:
        raise InputError(f"q has {sizes.heads} heads but {source} is for heads={heads}")
    if sizes.q_len != q_len:
        raise InputError(f"q has sequence length {sizes.q_len} but {source} is for q_len={q_len}")
    if sizes.kv_len != kv_len:
        raise InputError(f"k has sequence length {sizes.kv_len} but {source} is for kv_len={kv_len}")


def check(q, k, v=None, *, dtypes: tuple[torch.dtype, ...], who: str) -> Sizes:
    """:func:`check_kinds`, :func:`check_dtypes` and :func:`check_shapes` in that order.

    Args:
        q, k, v: as the user passed them (``v`` None when only the scores matter).
        dtypes, who: see :func:`check_dtypes`.

    Returns:
        The :class:`Sizes`.

    Raises:
        InputError: the first thing wrong, naming the tensor.
    """
    named = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    check_kinds(named)
    check_dtypes(named, dtypes, who)
    return check_shapes(q, k, v)
