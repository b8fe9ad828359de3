"""The content primitives ``cluster(centroids, balanced)`` and ``lsh(bits, seed)``: records and labels.

Comes in: nothing at import but the registry; at a call, ``Q``, ``K`` and the centroid input.
Goes out: two registered records and :func:`labels`, the reference rule (LANGUAGE.md section 2,
after ``route``) that gives every query and key its label(s). A pair is allowed iff the labels
are equal (``balanced = 0``, ``lsh``) or some cluster holds both (``balanced = w > 0``). The
plan treats both as data (``ir.prim_reads_inputs``): without the data they are replaced by
``empty``/``full`` by polarity (tiles they can reach are 3); at a call
:mod:`patterndsl.runtime.clusters` sorts tokens by label. The rules, for users:

- ``cluster(C)``: a token's label is ``argmax_c dot(x / |x|, C[c])`` (ties to the lower ``c``;
  a zero vector scores 0 against every centroid, a NaN score ranks as ``-inf``). ``C`` is
  ``[n, dim]`` or ``[head, n, dim]`` (the query head's centroids label that head's keys under
  grouped-query attention).
- ``cluster(C, balanced = w)``: centroid ``c`` holds the ``w`` queries and the ``w`` keys with the
  largest ``dot(x / |x|, C[c])`` (ties to the lower position; all of them when fewer exist).
- ``lsh(bits, seed)``: bit ``b`` of a token's label is 1 iff ``dot(x, P[b]) > 0`` for the planes
  ``P = hyperplanes(seed, head, dim, bits)`` (:func:`hyperplanes`, the documented generator).

Labels are computed per batch element and query head in float32 (float64 for float64 inputs),
without gradient.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from patterndsl import ir
from patterndsl import semantics as sem
from patterndsl.errors import InputError, PatternError
from patterndsl.primitives.common import param, require
from patterndsl.primitives.registry import Primitive, register

#: The names of the content primitives (their meaning needs the call's ``Q`` and ``K``).
NAMES = ("cluster", "lsh")
#: Most hyperplanes of ``lsh``: a label is one int64.
MAX_BITS = 62


@dataclass(frozen=True)
class Labels:
    """The labels of one content primitive at one call.

    Attributes:
        q: ``[batch, heads, Lq]`` int64 labels, or for ``balanced`` membership ``[batch, heads, Lq, n]`` bool.
        k: ``[batch, heads, Lk]`` (or ``[batch, heads, Lk, n]``), per *query* head.
        balanced: True when ``q``/``k`` are memberships (a token in several clusters or none).
    """

    q: torch.Tensor
    k: torch.Tensor
    balanced: bool

    def element(self, b: int) -> Labels:
        """Batch element ``b``'s labels (``[heads, ...]``), the ``selection`` value ``semantics`` reads."""
        return Labels(self.q[b], self.k[b], self.balanced)

    def allowed(self, i: torch.Tensor, j: torch.Tensor, h) -> torch.Tensor:
        """Whether query index ``i`` and key index ``j`` share a label, for one element's labels."""
        qa, kb = self.q[h, i], self.k[h, j]
        if self.balanced:
            return (qa & kb).any(-1)
        return qa == kb


# --------------------------------------------------------------------------- the rule


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _normalised(x: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    # A zero vector scores 0 against every centroid (its label is then centroid 0).
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(x))


def _first_max(scores: torch.Tensor) -> torch.Tensor:
    """Index of the largest entry along the last axis, ties to the lower index, NaN as ``-inf``."""
    # torch.argmax returns the first maximal index (documented), which is the tie rule.
    return torch.nan_to_num(scores, nan=float("-inf")).argmax(-1)


def _top_members(scores: torch.Tensor, w: int) -> torch.Tensor:
    """Bool like ``scores [..., L, n]``: token ``t`` is among centroid ``c``'s ``w`` best (ties to lower ``t``)."""
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    by = scores.transpose(-1, -2)  # [..., n, L]
    take = min(w, by.shape[-1])
    order = torch.sort(by, dim=-1, descending=True, stable=True).indices[..., :take]
    member = torch.zeros_like(by, dtype=torch.bool)
    member.scatter_(-1, order, True)
    return member.transpose(-1, -2)


def _centroids(prim: ir.Prim, inputs: dict, heads: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``[heads, n, dim]`` centroids of one batch element (a shared set is expanded over heads)."""
    name = prim.arg("centroids")
    if inputs is None or name not in inputs:
        raise InputError(f"cluster({name}) needs input '{name}': pass {name}=... to the call", prim.span)
    c = inputs[name]
    if c.shape[-1] != dim:
        raise InputError(f"input '{name}' has centroids of size {c.shape[-1]}, but the head size is {dim}", prim.span)
    c = c.to(dtype)
    return c.expand(heads, -1, -1) if c.dim() == 2 else c


def labels(prim: ir.Prim, q: torch.Tensor, k: torch.Tensor, inputs=None) -> Labels:
    """The labels ``prim`` gives every query and key of a call (the reference rule, module docstring).

    Args:
        prim: a ``cluster`` or ``lsh`` primitive.
        q: ``[batch, heads, Lq, dim]``; k: ``[batch, kv_heads, Lk, dim]`` (``kv_heads`` divides ``heads``).
        inputs: the call's run-time inputs (``binding.Inputs``), for ``cluster``'s centroids.

    Returns:
        :class:`Labels` per batch element and query head; no gradient.
    """
    with torch.no_grad():
        batch, heads, _, dim = q.shape
        dtype = _compute_dtype(q)
        qf = q.detach().to(dtype)
        kf = k.detach().to(dtype).repeat_interleave(heads // k.shape[1], 1)
        if prim.name == "lsh":
            planes = torch.stack([hyperplanes(prim.arg("seed"), h, dim, prim.arg("bits")) for h in range(heads)])
            planes = planes.to(dtype=dtype, device=q.device)  # [heads, bits, dim]
            weight = 2 ** torch.arange(prim.arg("bits"), dtype=torch.int64, device=q.device)
            return Labels(
                ((qf @ planes.transpose(-1, -2)[None]) > 0).long() @ weight,
                ((kf @ planes.transpose(-1, -2)[None]) > 0).long() @ weight,
                False,
            )
        outs_q, outs_k = [], []
        w = prim.arg("balanced")
        for b in range(batch):
            element = None if inputs is None else inputs.element(b)
            c = _centroids(prim, element, heads, dim, dtype).to(q.device).transpose(-1, -2)  # [heads, dim, n]
            sq, sk = _normalised(qf[b]) @ c, _normalised(kf[b]) @ c
            if w > 0:
                outs_q.append(_top_members(sq, w))
                outs_k.append(_top_members(sk, w))
            else:
                outs_q.append(_first_max(sq))
                outs_k.append(_first_max(sk))
        return Labels(torch.stack(outs_q), torch.stack(outs_k), w > 0)


def update_centroids(
    centroids: torch.Tensor, vectors: torch.Tensor, labels: torch.Tensor, decay: float
) -> torch.Tensor:
    """One exponential-moving-average k-means step, as the Routing Transformer updates its centroids.

    Each centroid moves towards the mean of the normalised vectors labelled with it:
    ``C[c] <- decay * C[c] + (1 - decay) * mean(x / |x| for x labelled c)``; a centroid no vector
    is labelled with keeps its value. Per head when ``centroids`` is ``[head, n, dim]``.

    Args:
        centroids: ``[n, dim]`` or ``[head, n, dim]``.
        vectors: ``[..., L, dim]``; with per-head centroids ``[batch, head, L, dim]`` (or ``[head, L, dim]``).
        labels: int ``[..., L]`` in ``[0, n)``, the same leading shape (e.g. the query labels of a call).
        decay: in ``[0, 1]``: the weight of the old centroid.

    Returns:
        The new centroids, same shape and dtype (no gradient; ``centroids`` is not written).

    Raises:
        InputError: shapes that do not fit, labels out of range or a decay outside ``[0, 1]``.
    """
    if not 0.0 <= float(decay) <= 1.0:
        raise InputError(f"update_centroids: decay must be in [0, 1], got {decay}")
    if centroids.dim() not in (2, 3) or vectors.shape[-1] != centroids.shape[-1]:
        raise InputError(
            f"update_centroids: centroids [n, dim] or [head, n, dim] and vectors [..., L, dim] of the same dim, "
            f"got {tuple(centroids.shape)} and {tuple(vectors.shape)}"
        )
    if labels.shape != vectors.shape[:-1] or labels.is_floating_point():
        raise InputError(f"update_centroids: labels must be integers shaped {tuple(vectors.shape[:-1])}")
    heads, n, dim = (1, *centroids.shape) if centroids.dim() == 2 else centroids.shape
    if labels.numel() and (labels.min() < 0 or labels.max() >= n):
        raise InputError(f"update_centroids: labels must lie in [0, {n})")
    with torch.no_grad():
        x = _normalised(vectors.detach().to(_compute_dtype(centroids)))
        if centroids.dim() == 3:
            if vectors.dim() == 3:
                x, labels = x[None], labels[None]
            if vectors.dim() not in (3, 4) or x.shape[1] != heads:
                raise InputError(f"update_centroids: per-head centroids need vectors [batch, {heads}, L, dim]")
            x, labels = x.transpose(0, 1).reshape(heads, -1, dim), labels.transpose(0, 1).reshape(heads, -1)
        else:
            x, labels = x.reshape(1, -1, dim), labels.reshape(1, -1)
        sums = torch.zeros(heads, n, dim, dtype=x.dtype, device=x.device)
        sums.scatter_add_(1, labels[..., None].expand_as(x), x)
        counts = torch.zeros(heads, n, dtype=x.dtype, device=x.device)
        counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=x.dtype))
        old = centroids.detach().to(x.dtype).reshape(heads, n, dim)
        mean = sums / counts.clamp(min=1)[..., None]
        new = torch.where(counts[..., None] > 0, decay * old + (1 - decay) * mean, old)
        return new.reshape(centroids.shape).to(centroids.dtype)


def cluster_labels(pattern, q, k, **inputs) -> Labels:
    """The labels a pattern's ``cluster(...)``/``lsh(...)`` gives the tokens of a call (``patterndsl.cluster_labels``).

    Args:
        pattern: a :class:`patterndsl.Pattern` with exactly one content primitive.
        q, k: as for attention; ``**inputs``: its run-time inputs (the centroids).

    Returns:
        :class:`patterndsl.primitives.clusters.Labels` ``[batch, heads, L]`` (memberships with
        ``balanced``), e.g. for :func:`patterndsl.update_centroids`.
    """
    from patterndsl import binding, tensors

    pir = pattern.ir
    found = list(dict.fromkeys(p for node in pir.nodes() for p in ir.contents(node)))
    if len(found) != 1:
        raise PatternError(f"cluster_labels() needs a pattern with one cluster(...)/lsh(...), it has {len(found)}")
    sizes = tensors.check(q, k, dtypes=tensors.FLOAT_DTYPES, who="cluster_labels()")
    bound = binding.bind(
        pir, inputs, sizes.kv_len, sizes.heads, sizes.head_dim, sizes.batch, q.device, "cluster_labels()"
    )
    return labels(found[0], q, k, bound if pir.inputs else None)


@functools.lru_cache(maxsize=256)
def hyperplanes(seed: int, head: int, dim: int, bits: int) -> torch.Tensor:
    """The random hyperplanes of ``lsh(bits, seed)`` for one head: float64 ``[bits, dim]``.

    The documented generator: splitmix64 (:func:`patterndsl.semantics.random_blocks`' ``next``)
    from the initial state ``(seed * 0x2545F4914F6CDD1D + head * 0x9E3779B97F4A7C15 + dim) mod 2^64``.
    Entries are drawn plane by plane, coordinate by coordinate, each a standard normal by
    Box-Muller from two draws ``z1``, ``z2``: ``u1 = ((z1 >> 11) + 1) / 2^53``,
    ``u2 = (z2 >> 11) / 2^53``, entry ``= sqrt(-2 ln u1) * cos(2 pi u2)``. Plane ``b`` does not
    depend on ``bits`` (more bits only add planes).
    """
    state = (seed * sem._SEED_MUL + head * sem._GOLDEN + dim) & sem._MASK64
    out = []
    for _ in range(bits * dim):
        state, z1 = sem._splitmix_next(state)
        state, z2 = sem._splitmix_next(state)
        u1 = ((z1 >> 11) + 1) / 2.0**53
        u2 = (z2 >> 11) / 2.0**53
        out.append(math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2))
    return torch.tensor(out, dtype=torch.float64).reshape(bits, dim)


# --------------------------------------------------------------------------- records


def _meaning(prim, q, k, h, ctx, selection) -> torch.Tensor:
    if selection is None or prim not in selection:
        raise PatternError(
            f"{prim.name}(...) labels tokens from the data: pass q= and k= (the attention inputs) to compute its mask",
            prim.span,
        )
    chosen: Labels = selection[prim]
    i = torch.as_tensor(q) - ctx.offset
    qi, kj = torch.broadcast_tensors(i, torch.as_tensor(k))
    inside = (qi >= 0) & (qi < ctx.q_len) & (kj >= 0) & (kj < ctx.kv_len)
    hh = torch.as_tensor(h, dtype=torch.int64)
    out = chosen.allowed(qi.clamp(0, ctx.q_len - 1), kj.clamp(0, ctx.kv_len - 1), hh.to(qi.device))
    return out & inside


def _cluster_check(v, s, layout):
    require(v["balanced"] >= 0, f"cluster balanced must be >= 0, got {v['balanced']}", s["balanced"])


def _lsh_check(v, s, layout):
    require(1 <= v["bits"] <= MAX_BITS, f"lsh bits must be between 1 and {MAX_BITS}, got {v['bits']}", s["bits"])


def _record(name: str, params: tuple, check) -> Primitive:
    return Primitive(
        name,
        params=params,
        check=check,
        shape_args=None,
        check_sizes=None,
        # Labels are per query head (a head's centroids or hyperplanes): never shared across heads.
        reads_head=lambda prim: True,
        meaning=_meaning,
        classify=None,  # never planned statically: replaced by empty/full (ir.input_bound)
        needed_keys=None,
        candidates=None,
        cost=8,
        band=None,
        total=None,
        count=None,
        triton=None,  # run in the sorted order by runtime/clusters.py, not as a fragment
    )


CLUSTER = register(_record("cluster", (param("centroids", "centroids"), param("balanced", "int", 0)), _cluster_check))
LSH = register(_record("lsh", (param("bits", "int"), param("seed", "int", 0)), _lsh_check))
