"""Codegen for the sorted part of ``cluster``/``lsh`` patterns: two Triton kernels over tokens sorted by label.

Comes in: a :class:`ClusterSpec` (the part's per-pair predicate, sizes, head size, dtype, tiles,
target). Goes out: deterministic Triton source with ``_cluster_fwd`` and ``_cluster_bwd``. One
program per (group, query tile of ``BM`` sorted entries): it gathers its query rows by index,
walks its one contiguous range of sorted keys in steps of ``BN`` (gathered by index), keeps the
pairs whose labels are equal and whose original positions the predicate allows (rendered by
:func:`patterndsl.codegen.predicate.render_predicate`), and writes each row back to its token.
With ``balanced = 0`` and ``lsh`` every token is one entry, so the forward writes each row once
and the backward writes ``dQ`` per row; with ``balanced = w`` (``WORDS > 0``) a token is one
entry per cluster holding it, a pair counts only in the lowest cluster holding both (membership
bit sets), and the kernels write per *entry* (``O``, ``LSE``, ``DQ`` indexed by the entry; the
launcher merges a token's entries by log-sum-exp and adds their ``dQ``). ``dK``/``dV`` are added
with float32 atomics (a key is in the range of several query tiles). Symbols:

    Q, K, V      inputs [G, L, D] (group = batch element x head of the part), contiguous
    O, LSE       forward outputs [G, Lq, D] and float32 [G, Lq] ([G, EQ, D] / [G, EQ] per entry when WORDS)
    QBITS, KBITS int64 [G, L, WORDS]: the clusters holding each token (bit c % 62 of word c // 62)
    QIDX, QLAB   int32 [G, EQ]: the token and the label of each sorted query entry
    KIDX, KLAB   int32 [G, EK]: the same for keys
    START, STOP  int32 [G * n_tiles]: the range of sorted key entries of each query tile
    DO, DELTA    backward inputs: dO [G, Lq, D] and rowsum(dO * O) - dlse (float32 [G, Lq])
    DQ           [G, Lq, D] (the input dtype; [G, EQ, D] float32 when WORDS); DK, DV float32 [G, Lk, D], atomic
    AUX          int8 tables of random(...) primitives the predicate reads
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from patterndsl import ir
from patterndsl.codegen.predicate import FLOOR_HELPERS, AuxTables, render_predicate


@dataclass(frozen=True)
class ClusterSpec:
    """Everything that shapes the source of one sorted part's kernels (its ``key`` hashes it)."""

    pred: ir.Node | None
    layout: ir.Layout | None
    q_len: int
    kv_len: int
    heads: int
    head_dim: int
    dtype: str
    block: tuple[int, int]
    target: str
    #: Int64 words of the membership bit sets of ``balanced`` clusters (0: every token is one entry).
    words: int = 0

    @property
    def dot_precision(self) -> str:
        # The interpreter and the CPU reference compare float32 exactly; GPUs use TF32 as the other kernels do.
        return "ieee" if self.target == "interpret" or self.dtype != "float32" else "tf32"

    @property
    def key(self) -> str:
        """Hash of the kernels' text below the header: changes whenever anything that shapes it does."""
        return _key(self)


#: Query tile (sorted entries) of the kernels on a GPU; the call-time plan is made with it.
BLOCK_M = 64
#: Widest (padded) head size the kernels take; wider parts run on the torch path.
MAX_WIDTH = 128
#: Tiles of the sorted order under the Triton interpreter (small: it is slow; tails still occur).
INTERPRET_BLOCK = (16, 16)


def width(*dims: int) -> int:
    """The kernels' head size: the widest of ``dims`` padded with zeros to a power of two, at least 16."""
    out = 16
    while out < max(dims):
        out *= 2
    return out


def kernel_source(pattern, q_len: int, kv_len: int | None = None, heads: int = 1, **options) -> str:
    """The source a content pattern runs: its static part's kernels, then each sorted part's two kernels.

    Args:
        pattern: a :class:`patterndsl.Pattern` with ``cluster``/``lsh``.
        q_len, kv_len, heads: sizes.
        **options: as :func:`patterndsl.codegen.kernel_source` (the static part takes them all; the
            sorted kernels read ``head_dim``, ``dtype``, ``kind`` and ``target``).

    Returns:
        Deterministic text: sections headed ``# === ...``. A part that runs in torch (a general part,
        a predicate reading the call's inputs, a score) says so instead of a kernel.
    """
    import torch

    from patterndsl import codegen
    from patterndsl.analysis import clusterplan
    from patterndsl.codegen import generator

    kv_len = q_len if kv_len is None else kv_len
    split = clusterplan.split(pattern.ir, heads)
    sections = []
    if split.static is not None:
        # The static part's source as the launcher runs it: one spec, or one per part of its split.
        text = codegen.kernel_source(type(pattern)(split.static), q_len, kv_len, heads, **options)
        sections.append("# === static part (its own plan and token order)\n" + text)
    target = options.get("target", "sm_90")
    dtype = generator.DTYPES.get(options.get("dtype", torch.float16), "float16")
    wide = width(options.get("head_dim", 64))
    for part in split.parts:
        title = f"# === heads {part.lo}..{part.hi}: "
        if part.prim is None or ir.reads_inputs(part.pred or ir.FULL) or pattern.ir.score is not None:
            sections.append(title + f"pairs {part.pred} run in torch in token order (evaluated per call)\n")
            continue
        if target == "interpret":
            block = INTERPRET_BLOCK
        else:
            block = (BLOCK_M, launch(options.get("kind", "forward"), wide)[0])
        words = _words(pattern.ir, part.prim)
        spec = ClusterSpec(part.pred, pattern.ir.layout, q_len, kv_len, heads, wide, dtype, block, target, words)
        sections.append(title + f"{part.prim} in sorted order\n" + render(spec))
    return "\n\n".join(sections)


def launch(kind: str, width: int) -> tuple[int, int, int]:
    """``(BN, num_warps, num_stages)`` for ``"forward"``/``"backward"`` at a padded head size.

    Chosen so that no build spills registers on sm_80 or sm_90 for float16, bfloat16 and
    float32 (``tests/unit/test_cluster_kernels.py::test_cluster_kernels_build_without_spills``); the backward
    holds dQ, Q, dO and a K/V step, so its key step is short.
    """
    if kind == "forward":
        return (64, 4, 2) if width <= 64 else (32, 8, 2)
    return 16, 8, 2


def _words(pir: ir.PatternIR, prim: ir.Prim) -> int:
    """Words of the membership bit sets of a ``balanced`` cluster (its centroid count from the declaration)."""
    if prim.name != "cluster" or prim.arg("balanced") == 0:
        return 0
    decl = next(d for d in pir.inputs if d.name == prim.arg("centroids"))
    n = decl.dims[-2]
    return -(-n // 62) if isinstance(n, int) else 1


@functools.lru_cache(maxsize=256)
def _key(spec: ClusterSpec) -> str:
    return "c" + hashlib.sha256(_body(spec).encode()).hexdigest()[:24]


def aux_tables(spec: ClusterSpec) -> AuxTables:
    """The lookup tables the predicate reads (the same render as :func:`render`)."""
    aux = AuxTables()
    if spec.pred is not None:
        render_predicate("_pred", spec.pred, spec.layout, spec.q_len, spec.kv_len, aux, spec.heads)
    return aux


def render(spec: ClusterSpec) -> str:
    """The kernels' source for ``spec``: deterministic text (no ids, no timestamps)."""
    header = (
        f"# patterndsl sorted-cluster kernels: predicate {spec.pred}; Lq={spec.q_len} Lk={spec.kv_len} "
        f"D={spec.head_dim} {spec.dtype} tiles {spec.block[0]}x{spec.block[1]} target {spec.target}"
        f"{f' balanced ({spec.words} words)' if spec.words else ''}\n"
        f"# key: {spec.key}\n"
    )
    return header + _body(spec)


def _body(spec: ClusterSpec) -> str:
    pred = (
        render_predicate("_pred", spec.pred, spec.layout, spec.q_len, spec.kv_len, AuxTables(), spec.heads)
        if spec.pred is not None
        else "@triton.jit\ndef _pred(i, j, h, AUX):\n    return (i >= 0) & (j >= 0)\n"
    )
    consts = (
        f"LQ = tl.constexpr({spec.q_len})\nLK = tl.constexpr({spec.kv_len})\n"
        f"DOT_PRECISION = tl.constexpr({spec.dot_precision!r})\n"
        f"BM = tl.constexpr({spec.block[0]})\nBN = tl.constexpr({spec.block[1]})\n"
        f"D = tl.constexpr({spec.head_dim})\nPRED = tl.constexpr({spec.pred is not None})\n"
        f"WORDS = tl.constexpr({spec.words})\n"
    )
    return _IMPORTS + consts + "\n\n" + FLOOR_HELPERS + "\n\n\n" + pred + "\n\n" + _TEMPLATE


_IMPORTS = "import triton\nimport triton.language as tl\n\n"

# The start both kernels share: the program's group, its sorted query entries and their rows of Q.
_PROLOGUE = """    pid = tl.program_id(0)
    g, e, row_ok, rows, qlab = _tile_rows(QIDX, QLAB, pid, n_tiles, EQ)
    d = tl.arange(0, D)
    gq = g.to(tl.int64) * LQ
    gk = g.to(tl.int64) * LK
    q = tl.load(Q + (gq + rows[:, None]) * D + d[None, :], mask=row_ok[:, None], other=0.0)
"""

_TEMPLATE = (
    """@triton.jit
def _tile_rows(QIDX, QLAB, pid, n_tiles, EQ):
    # The group, and the sorted query entries of this program's tile: entry, valid, token, label.
    g = pid // n_tiles
    e = (pid % n_tiles) * BM + tl.arange(0, BM)
    row_ok = e < EQ
    rows = tl.load(QIDX + g * EQ + e, mask=row_ok, other=0)
    qlab = tl.load(QLAB + g * EQ + e, mask=row_ok, other=-1)
    return g, e, row_ok, rows, qlab


@triton.jit
def _lowest(QBITS, KBITS, g, rows, row_ok, cols, col_ok, qlab):
    # Balanced clusters: no cluster below the entry's own holds both tokens (each pair counted once).
    ok = row_ok[:, None] & col_ok[None, :]
    word = qlab // 62
    bit = (qlab % 62).to(tl.int64)
    for w in tl.static_range(WORDS):
        qb = tl.load(QBITS + (g.to(tl.int64) * LQ + rows) * WORDS + w, mask=row_ok, other=0)
        kb = tl.load(KBITS + (g.to(tl.int64) * LK + cols) * WORDS + w, mask=col_ok, other=0)
        own = tl.where(word == w, (tl.full([BM], 1, tl.int64) << bit) - 1, 0)
        below = tl.where(word > w, 0x3FFFFFFFFFFFFFFF, own)
        ok = ok & (((qb & below)[:, None] & kb[None, :]) == 0)
    return ok


@triton.jit
def _key_step(KIDX, KLAB, QBITS, KBITS, AUX, g, f0, stop, EK, rows, row_ok, qlab, h):
    # BN sorted key entries from f0: their tokens, validity, and which pairs are allowed.
    f = f0 + tl.arange(0, BN)
    col_ok = f < stop
    cols = tl.load(KIDX + g * EK + f, mask=col_ok, other=0)
    klab = tl.load(KLAB + g * EK + f, mask=col_ok, other=-2)
    ok = row_ok[:, None] & col_ok[None, :] & (qlab[:, None] == klab[None, :])
    if PRED:
        ok = ok & _pred(rows[:, None], cols[None, :], h, AUX)
    if WORDS > 0:
        ok = ok & _lowest(QBITS, KBITS, g, rows, row_ok, cols, col_ok, qlab)
    return cols, col_ok, ok


@triton.jit
def _cluster_fwd(
    Q, K, V, O, LSE, QIDX, QLAB, KIDX, KLAB, START, STOP, QBITS, KBITS, AUX, scale,
    n_tiles, EQ, EK, HP, H_LO,
):
"""
    + _PROLOGUE
    + """    stop = tl.load(STOP + pid)
    h = H_LO + g % HP
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for f0 in range(tl.load(START + pid), stop, BN):
        cols, col_ok, ok = _key_step(KIDX, KLAB, QBITS, KBITS, AUX, g, f0, stop, EK, rows, row_ok, qlab, h)
        k = tl.load(K + (gk + cols[:, None]) * D + d[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + (gk + cols[:, None]) * D + d[None, :], mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    if WORDS > 0:  # per entry: the launcher merges a token's entries
        ge = g.to(tl.int64) * EQ
        tl.store(O + (ge + e[:, None]) * D + d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + ge + e, lse, mask=row_ok)
    else:
        tl.store(O + (gq + rows[:, None]) * D + d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + gq + rows, lse, mask=row_ok)


@triton.jit
def _cluster_bwd(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, QIDX, QLAB, KIDX, KLAB, START, STOP, QBITS, KBITS, AUX, scale,
    n_tiles, EQ, EK, HP, H_LO,
):
"""
    + _PROLOGUE
    + """    do = tl.load(DO + (gq + rows[:, None]) * D + d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + gq + rows, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + gq + rows, mask=row_ok, other=0.0)
    stop = tl.load(STOP + pid)
    h = H_LO + g % HP
    dq = tl.zeros([BM, D], tl.float32)
    for f0 in range(tl.load(START + pid), stop, BN):
        cols, col_ok, ok = _key_step(KIDX, KLAB, QBITS, KBITS, AUX, g, f0, stop, EK, rows, row_ok, qlab, h)
        k = tl.load(K + (gk + cols[:, None]) * D + d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + (gk + cols[:, None]) * D + d[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        p = tl.where(ok, tl.exp(tl.where(ok, s, 0.0) - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None]) * scale
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        at = (gk + cols[:, None]) * D + d[None, :]
        tl.atomic_add(DK + at, dk, mask=col_ok[:, None])
        tl.atomic_add(DV + at, dv, mask=col_ok[:, None])
    if WORDS > 0:  # per entry: the launcher adds a token's entries
        ge = g.to(tl.int64) * EQ
        tl.store(DQ + (ge + e[:, None]) * D + d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(DQ + (gq + rows[:, None]) * D + d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
"""
)
