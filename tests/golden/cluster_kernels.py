# patterndsl sorted-cluster kernels: predicate causal & ~window(7); Lq=1024 Lk=1024 D=64 float16 tiles 64x64 target sm_90
import triton
import triton.language as tl

LQ = tl.constexpr(1024)
LK = tl.constexpr(1024)
DOT_PRECISION = tl.constexpr('ieee')
BM = tl.constexpr(64)
BN = tl.constexpr(64)
D = tl.constexpr(64)
PRED = tl.constexpr(True)
WORDS = tl.constexpr(0)


@triton.jit
def _fdiv(a, b):
    # Floor division: Triton's // truncates towards zero.
    t = a // b
    return t - (((a % b) != 0) & ((a < 0) != (b < 0))).to(t.dtype)


@triton.jit
def _fmod(a, b):
    # Floor remainder (sign of the divisor), as in Python.
    r = a % b
    return r + b * (((r != 0) & ((r < 0) != (b < 0))).to(r.dtype))


@triton.jit
def _pred(i, j, h, AUX):
    """Allowed (query index i [BM, 1], key index j [1, BN], head h) for: causal & ~window(7)"""
    inb = (i < LQ) & (j < LK)
    q = i + (LK - LQ)
    k = j
    return inb & ((k <= q) & (~((k >= q - 7) & (k <= q + 0))))


@triton.jit
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
    pid = tl.program_id(0)
    g, e, row_ok, rows, qlab = _tile_rows(QIDX, QLAB, pid, n_tiles, EQ)
    d = tl.arange(0, D)
    gq = g.to(tl.int64) * LQ
    gk = g.to(tl.int64) * LK
    q = tl.load(Q + (gq + rows[:, None]) * D + d[None, :], mask=row_ok[:, None], other=0.0)
    stop = tl.load(STOP + pid)
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
    pid = tl.program_id(0)
    g, e, row_ok, rows, qlab = _tile_rows(QIDX, QLAB, pid, n_tiles, EQ)
    d = tl.arange(0, D)
    gq = g.to(tl.int64) * LQ
    gk = g.to(tl.int64) * LK
    q = tl.load(Q + (gq + rows[:, None]) * D + d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + (gq + rows[:, None]) * D + d[None, :], mask=row_ok[:, None], other=0.0)
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
