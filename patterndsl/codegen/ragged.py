"""Stage 5 (codegen): kernels for ragged batches and paged key/value caches (LANGUAGE.md section 9).

Comes in: a pattern whose meaning reads positions only (the runtime's ``ragged.position_only``), its
head groups, the launch facts (heads, key/value heads, head dim, dtype, key tile ``BN``, target)
and, for a paged cache, the page size. Goes out: a :class:`RaggedSpec` (its :attr:`RaggedSpec.key`
names the cache entry) and deterministic Triton source with, per head group, a forward kernel
``fwd_gN`` and a backward kernel ``bwd_gN`` walking *pieces* (a batch element's block of query rows
and a run of its key tiles, made per call from the square plan family), plus ``combine``, the
log-sum-exp merge of the pieces of a row block split over its key tiles (flash decoding).

Every length is read at run time from the piece (``Lq_b``, ``Lk_b``), so one module serves every
length; keys are read through the block table when paged and never at or past ``Lk_b``. The element
rule is the static predicate rendered at a length no call reaches (positions are plan rows of the
square family, where query and key positions coincide with indices).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from patterndsl import ir
from patterndsl.codegen import key
from patterndsl.codegen.generator import DTYPES, header_fields, pattern_header, template
from patterndsl.codegen.launch import padded_head_dim, ragged_launch
from patterndsl.codegen.predicate import AuxTables, render_predicate
from patterndsl.errors import BackendError

#: The length the element rules are rendered at: positions stay below it (int32 arithmetic, 2**30 keys).
POSITION_CAP = 2**30
#: Query rows of a decoding call's blocks (``tl.dot`` needs at least 16).
DECODE_ROWS = 16


@dataclass(frozen=True)
class RaggedSpec:
    """Everything a ragged module's source depends on.

    Attributes:
        kind: ``"forward"`` or ``"backward"``.
        pattern_name, pattern_params: for the header.
        groups: ``(heads, node)`` per head group.
        heads, kv_heads, head_dim: sizes baked into the source.
        dtype: the input dtype name.
        block_m: query rows per program (16 for decoding calls).
        block_n: keys per tile (the plan family's ``BN``).
        page_size: keys per page of a paged cache, 0 for ``[B, Hkv, Lk, D]`` keys.
        num_warps, num_stages, target: the launch configuration.
    """

    kind: str
    pattern_name: str
    pattern_params: str
    groups: tuple[tuple[tuple[int, ...], ir.Node], ...]
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    block_m: int
    block_n: int
    page_size: int
    num_warps: int
    num_stages: int
    target: str

    @property
    def padded_dim(self) -> int:
        return padded_head_dim(self.head_dim)

    def canonical(self) -> str:
        """A stable text of every field (nodes printed canonically)."""
        groups = [f"heads={heads} node={node}" for heads, node in self.groups]
        fields = [
            "ragged",
            self.kind,
            self.pattern_name,
            self.pattern_params,
            *groups,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.dtype,
            self.block_m,
            self.block_n,
            self.page_size,
            self.num_warps,
            self.num_stages,
            self.target,
        ]
        return "\n".join(str(f) for f in fields)

    @property
    def key(self) -> str:
        """sha256 over :func:`patterndsl.codegen.key.sources_hash` and :meth:`canonical`."""
        text = f"{key.sources_hash()}\n{self.canonical()}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def make_spec(
    pir: ir.PatternIR,
    groups,
    kind: str,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    page_size: int = 0,
    target: str = "sm_90",
    rows: int = DECODE_ROWS,
    block_n: int | None = None,
) -> RaggedSpec:
    """The spec of a ragged module.

    Args:
        pir: the pattern (its name and parameters go into the header).
        groups: the plan's head groups (``heads`` and ``node`` each).
        kind: ``"forward"`` or ``"backward"``.
        heads, kv_heads, head_dim: sizes.
        dtype: ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``.
        page_size: keys per page, or 0 when not paged.
        target: ``"sm_80"``, ``"sm_90"`` or ``"interpret"``.
        rows: query rows per program (``BM``).
        block_n: keys per tile (default: the launch table's for this pass).

    Returns:
        The :class:`RaggedSpec`.
    """
    if dtype not in DTYPES:
        raise BackendError(f"the Triton kernels take float16, bfloat16 or float32, got {dtype}")
    row = ragged_launch(head_dim, target, kind, DTYPES[dtype], rows)
    bn = block_n or (row.tiles[1] if row.tiles else 16)
    pattern_name, pattern_params = pattern_header(pir)
    return RaggedSpec(
        kind=kind,
        pattern_name=pattern_name,
        pattern_params=pattern_params,
        groups=tuple((tuple(g.heads), g.node) for g in groups),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=DTYPES[dtype],
        block_m=rows,
        block_n=bn,
        page_size=int(page_size),
        num_warps=row.num_warps,
        num_stages=row.num_stages,
        target=target,
    )


def render(spec: RaggedSpec) -> str:
    """The Triton source of a ragged spec (deterministic).

    Returns:
        Source defining the kernels :func:`kernel_names` lists.
    """
    aux = AuxTables()
    predicates, kernels, lines = [], [], []
    group = template(f"ragged_{spec.kind}_group.py.tmpl")
    for g, (heads, node) in enumerate(spec.groups):
        predicates.append(render_predicate(f"_allowed_g{g}", node, None, POSITION_CAP, POSITION_CAP, aux, spec.heads))
        kernels.append(group.substitute(g=g))
        lines.append(f"#   g{g}: heads {list(heads)}: {node}")
    ps = spec.page_size
    keys_note = (
        f"paged, PS={ps} keys per page through the block table BT [batch, max_pages]"
        if ps
        else "[batch, NHK, Lk, D], element b's keys at b"
    )
    body = template(f"ragged_{spec.kind}.py.tmpl").substitute(kernels="\n\n".join(kernels))
    text = template("ragged.py.tmpl").substitute(
        header_fields(spec),
        CAP=POSITION_CAP,
        PAGED=bool(ps),
        PS=max(ps, 1),
        PAGE_TILES=bool(ps) and ps % spec.block_n == 0,
        keys_note=keys_note,
        group_lines="\n".join(lines),
        predicates="\n\n".join(predicates),
        body=body.rstrip("\n"),
    )
    if aux.chunks:
        raise BackendError("ragged kernels take patterns without random(...) tables")
    return text.rstrip("\n") + "\n"


def kernel_names(spec: RaggedSpec) -> list[str]:
    """The kernels a ragged spec's source defines."""
    if spec.kind == "forward":
        return [f"fwd_g{g}" for g in range(len(spec.groups))] + ["combine"]
    return [f"bwd_g{g}" for g in range(len(spec.groups))]
