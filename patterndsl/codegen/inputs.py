"""Stage 5 (codegen): the element rule of head groups whose pattern reads run-time inputs.

Comes in: a head group's node (``within(SEG, P)``, ``where`` over ``NAME[idx]``), the spec's
input declarations and the baked-in sizes. Goes out: the text of
``_allowed_gN(i, j, h, AUX, RT, lst)`` (plus one ``@triton.jit`` function per ``within`` for its
pattern in segment coordinates), the :class:`InputLayout` of the int32 table ``RT`` it reads,
and :func:`pack`, which fills ``RT`` from one call's input tensors.

``RT`` for a spec with inputs (there is no ``route``: the checker refuses both together): one
slice of ``stride`` int32 entries per batch element ``b = lst // NHK`` (every key/value head of
an element reads the same slice). In a slice, at offsets baked into the source: every input an
expression reads, its non-batch entries row-major (a shared input is copied to every slice);
then for every input used as ``within``'s ``SEG``, the first position (``start``) and, when its
pattern reads ``Lq`` or ``Lk``, the length of the segment holding each token position, ``[Lk]`` each.

Element rule. ``NAME[i1, i2]`` loads ``RT[slice + offset + clamp(i1) * extent2 + clamp(i2)]``
(indices clamped to their dimension, LANGUAGE.md section 7). ``within(SEG, P)`` at ``(q, k)``
loads the segment start ``s`` and length ``n`` of ``clamp(q)`` and the start of ``k``: the pair
is allowed iff both starts agree and ``P`` holds at ``(q - s, k - s)`` with ``Lq = Lk = n``
(:func:`patterndsl.primitives.inputs.local`, the same clamping). Values are int32 in ``RT``;
:func:`pack` refuses an input with an entry outside that range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patterndsl import ir
from patterndsl.codegen.predicate import FALSE, TRUE, AuxTables, PredicateRenderer, _leaf
from patterndsl.errors import BackendError, InputError

_INT32 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class InputLayout:
    """Where one batch element's inputs sit in its ``RT`` slice.

    Attributes:
        values: ``(name, extents, offset)`` of every input an expression reads.
        segments: ``(name, start_offset, length_offset)`` of every ``within`` segment input
            (``length_offset`` None when no ``within`` over it reads ``Lq`` or ``Lk``).
        stride: int32 entries per batch element.
        kv_len: ``Lk`` (the extent of ``token`` dimensions and of the segment tables).
    """

    values: tuple[tuple[str, tuple[int, ...], int], ...]
    segments: tuple[tuple[str, int, int | None], ...]
    stride: int
    kv_len: int

    def value(self, name: str) -> tuple[tuple[int, ...], int]:
        return next((ext, off) for n, ext, off in self.values if n == name)

    def segment(self, name: str) -> tuple[int, int | None]:
        return next((start, length) for n, start, length in self.segments if n == name)


def extents(decl: ir.InputDecl, kv_len: int, heads: int, head_dim: int) -> tuple[int, ...]:
    """The non-batch extents of an input at these sizes (``token`` = ``Lk``, ``head``, ``dim``, tables)."""
    sizes = {"token": kv_len, "head": heads, "dim": head_dim}
    return tuple(sizes[d] if isinstance(d, str) else int(d) for d in decl.index_dims)


def layout(
    decls: tuple[ir.InputDecl, ...], nodes, kv_len: int, heads: int, head_dim: int, also: tuple[str, ...] = ()
) -> InputLayout:  # fmt: skip
    """The ``RT`` slice layout of the inputs ``nodes`` (and a score: ``also``) read (declaration order; see the
    module docstring). Float inputs a score reads are stored as their float32 bits."""
    read, segs = set(also), {}
    for node in nodes:
        for sub in ir.walk(node):
            if not isinstance(sub, ir.Prim):
                continue
            if sub.name == "within":
                name = sub.arg("seg")
                segs[name] = segs.get(name, False) or _reads_lengths(sub.arg("body"))
            for _, value in sub.args:
                if isinstance(value, ir.Expr):
                    read.update(e.name for e in ir.walk_expr(value) if isinstance(e, ir.InputRef))
    values, offset = [], 0
    for decl in decls:
        if decl.name in read:
            ext = extents(decl, kv_len, heads, head_dim)
            values.append((decl.name, ext, offset))
            offset += _product(ext)
    segments = []
    for decl in decls:
        if decl.name in segs:
            lengths = offset + kv_len if segs[decl.name] else None
            segments.append((decl.name, offset, lengths))
            offset += 2 * kv_len if segs[decl.name] else kv_len
    return InputLayout(tuple(values), tuple(segments), offset, kv_len)


def _reads_lengths(body: ir.Node) -> bool:
    # Whether within's pattern reads Lq or Lk (a segment's length): only then are lengths packed.
    for sub in ir.walk(body):
        if isinstance(sub, ir.Prim):
            for _, value in sub.args:
                if isinstance(value, ir.Expr) and any(
                    isinstance(e, ir.Var) and e.name in ("Lq", "Lk") for e in ir.walk_expr(value)
                ):
                    return True
    return False


def volume(values) -> int:
    """The number of entries of extents ``values``."""
    return _product(values)


def _product(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


# --------------------------------------------------------------------------- packing one call's inputs


def _per_batch(decl: ir.InputDecl, t: torch.Tensor, batch: int, ext: tuple[int, ...]) -> torch.Tensor:
    # [batch, *ext] view of a batched, shared ([1, ...]) or batch-less input.
    if not (decl.batched and t.dim() == len(decl.dims)):
        t = t.unsqueeze(0)
    if tuple(t.shape[1:]) != ext:
        raise BackendError(
            f"input '{decl.name}' has shape {list(t.shape)}; the kernels were generated for extents {list(ext)}",
            decl.span,
        )
    return t.expand(batch, *ext)


def segment_tables(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the first position and the length of its maximal run of equal values.

    Args:
        seg: ``[batch, L]`` integer tensor.

    Returns:
        int64 ``(start, length)``, ``[batch, L]`` each.
    """
    b, n = seg.shape
    pos = torch.arange(n, device=seg.device).expand(b, n)
    change = torch.ones(b, n, dtype=torch.bool, device=seg.device)
    change[:, 1:] = seg[:, 1:] != seg[:, :-1]
    start = torch.cummax(torch.where(change, pos, 0), dim=1).values
    last = torch.ones(b, n, dtype=torch.bool, device=seg.device)  # the last position of its run
    last[:, :-1] = change[:, 1:]
    end = torch.where(last, pos + 1, n).flip(1).cummin(dim=1).values.flip(1)
    return start, end - start


def pack(lay: InputLayout, decls: tuple[ir.InputDecl, ...], data: list[torch.Tensor], batch: int) -> torch.Tensor:
    """The int32 ``RT`` of one call: ``batch`` slices of ``lay.stride`` entries.

    Args:
        lay: the spec's :class:`InputLayout`.
        decls: the pattern's declarations; data: their tensors in that order (validated).
        batch: the call's batch size.

    Returns:
        int32 ``[batch * stride]`` on the inputs' device.

    Raises:
        InputError: an input read as a value holds an entry outside the int32 range.
    """
    by_name = {d.name: (d, t) for d, t in zip(decls, data, strict=True)}
    device = data[0].device if data else torch.device("cpu")
    parts = []
    for name, ext, _ in lay.values:
        decl, t = by_name[name]
        if decl.kind != "int":
            # A score's float table: its float32 bits (the kernels load them back with a bitcast).
            bits = _per_batch(decl, t.detach(), batch, ext).reshape(batch, -1).to(torch.float32).contiguous()
            parts.append(bits.view(torch.int32))
            continue
        narrow = t.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32)  # fits: no read-back
        if t.numel() and not narrow and (int(t.min()) < _INT32[0] or int(t.max()) > _INT32[1]):
            raise InputError(
                f"input '{name}' holds values outside the int32 range; the Triton kernels read int inputs as int32",
                decl.span,
            )
        parts.append(_per_batch(decl, t, batch, ext).reshape(batch, -1).to(torch.int32))
    for name, _, lengths in lay.segments:
        decl, t = by_name[name]
        seg = _per_batch(decl, t, batch, (lay.kv_len,))
        start, length = segment_tables(seg)
        parts += [start.to(torch.int32)] + ([length.to(torch.int32)] if lengths is not None else [])
    if not parts:
        return torch.zeros(1, dtype=torch.int32, device=device)
    return torch.cat(parts, 1).reshape(-1).contiguous()


# --------------------------------------------------------------------------- rendering


class _SegmentRenderer(PredicateRenderer):
    """``within``'s pattern in a segment's coordinates: ``q``, ``k`` from its start, ``Lq = Lk = n``."""

    uses_length = False

    def expr(self, e: ir.Expr) -> tuple[str, bool]:
        if isinstance(e, ir.Var) and e.name in ("Lq", "Lk"):
            self.uses_length = True
            return _leaf(self, "n", "n"), True
        return super().expr(e)

    def where_ranges(self) -> dict:
        # q - s lies in [min(0, Lk - Lq), Lk - 1] (a query before every key reads segment 0), k - s in
        # [0, Lk - 1], and a segment's length in [1, Lk].
        ranges = super().where_ranges()
        ranges["q"] = (min(0, self.kv_len - self.q_len), self.kv_len - 1)
        ranges["Lq"] = ranges["Lk"] = (1, max(self.kv_len, 1))
        return ranges


class InputRenderer(PredicateRenderer):
    """The element rule of a group that reads inputs: input loads and ``within`` as fragments."""

    def __init__(self, name: str, lay: InputLayout, layout, q_len, kv_len, aux: AuxTables, heads: int):
        super().__init__(layout, q_len, kv_len, aux, heads)
        self.name = name
        self.input_layout = lay
        self.functions: list[str] = []

    def where_ranges(self) -> dict:
        ranges = super().where_ranges()
        for name, _, _ in self.input_layout.values:
            ranges["input", name] = _INT32
        return ranges

    def expr(self, e: ir.Expr) -> tuple[str, bool]:
        if isinstance(e, ir.InputRef):
            return self._input(e), False
        return super().expr(e)

    def node(self, node: ir.Node) -> str:
        if isinstance(node, ir.Prim) and node.name == "within":
            return self._within(node)
        return super().node(node)

    def _clamp(self, code: str, nonneg: bool, top: int) -> str:
        if code.lstrip("(-").rstrip(")").isdigit():
            return str(min(max(int(code.strip("()")), 0), top))
        return f"tl.minimum({code}, {top})" if nonneg else f"tl.minimum(tl.maximum({code}, 0), {top})"

    def _input(self, e: ir.InputRef) -> str:
        if e.kind != "int":
            raise BackendError(f"float input '{e.name}' cannot be part of a mask", e.span)
        ext, offset = self.input_layout.value(e.name)
        terms, inner = [], _product(ext)
        for index, extent in zip(e.indices, ext, strict=True):
            inner //= extent
            code, nonneg = self.expr(index)
            clamped = self._clamp(code, nonneg, extent - 1)
            terms.append(clamped if inner == 1 else f"({clamped}) * {inner}")
        address = " + ".join(["inp", str(offset), *terms])
        return _leaf(self, f"{e.name}_", self.bind(f"{e.name}_", f"tl.load({address})"))

    def _within(self, prim: ir.Prim) -> str:
        start, length = self.input_layout.segment(prim.arg("seg"))
        top = self.kv_len - 1
        qc = self.bind("qc_", self._clamp("q", self.q_nonneg, top))
        kc = self.bind("kc_", self._clamp("k", True, top))
        sq = self.bind("sq_", f"tl.load(inp + {start} + {qc})")
        sk = self.bind("sk_", f"tl.load(inp + {start} + {kc})")
        same = f"{sq} == {sk}"
        sub = _SegmentRenderer(None, self.q_len, self.kv_len, self.aux, self.heads)
        body = sub.node(prim.arg("body"))
        if body == FALSE:
            return FALSE
        if body == TRUE:
            return same
        # A pattern that never reads Lq or Lk does not need the segment's length.
        nq = self.bind("nq_", f"tl.load(inp + {length} + {qc})") if sub.uses_length else "0"
        fn = f"{self.name}_w{len(self.functions)}"
        lines = [
            "@triton.jit",
            f"def {fn}(q, k, h, n):",
            f'    """{prim.arg("body")} in a segment\'s coordinates (q, k from its first position, Lq = Lk = n)."""',
            *(f"    {line}" for line in sub.lines),
            f"    return {body}",
        ]
        self.functions.append("\n".join(lines) + "\n")
        return f"({same}) & {fn}(q - {sq}, k - {sq}, h, {nq})"


def render_group(
    name: str, node: ir.Node, lay: InputLayout, pattern_layout, q_len: int, kv_len: int, aux: AuxTables, heads: int
) -> str:  # fmt: skip
    """``name(i, j, h, AUX, RT, lst)``: the element rule of a group that reads inputs, and the functions it calls.

    Args:
        name: the function name (``_allowed_gN``).
        node: the group's pattern node.
        lay: the spec's :class:`InputLayout`.
        pattern_layout, q_len, kv_len, heads: the baked-in sizes.
        aux: receives the ``random`` tables the rule reads.

    Returns:
        Source text of the ``within`` functions followed by the element rule.
    """
    r = InputRenderer(name, lay, pattern_layout, q_len, kv_len, aux, heads)
    body = r.node(node)
    lines = [
        "@triton.jit",
        f"def {name}(i, j, h, AUX, RT, lst):",
        f'    """Allowed (query index i [BM, 1], key index j [1, BN], head h) for: {node}',
        f"    Run-time inputs: batch element lst // NHK reads RT[(lst // NHK) * {lay.stride} + offset]",
        '    (offsets and extents baked in; indices clamped, LANGUAGE.md section 7)."""',
        "    inb = (i < LQ) & (j < LK)",
        "    q = i + (LK - LQ)",
        "    k = j",
        f"    inp = RT + (lst // NHK) * {lay.stride}",
    ]
    lines += [f"    {line}" for line in r.lines]
    if body == TRUE:
        lines.append("    return inb")
    elif body == FALSE:
        lines.append("    return inb & (i < 0)")
    else:
        lines.append(f"    return inb & ({body})")
    return "\n\n".join([*r.functions, "\n".join(lines) + "\n"])


__all__ = ["InputLayout", "extents", "layout", "pack", "render_group", "segment_tables", "volume"]
