# ----------------------------------------------------------------------------
# patterndsl generated Triton kernels (backward pass). Do not edit: regenerated
# from the pattern below whenever anything in the cache key changes.
#
# pattern:    swin(win=7)
# shapes:     LQ=3136 queries, LK=3136 keys, NH=4 query heads, NHK=4 key/value heads
#             (GQA=1 query heads share one key/value head), head dim D=32 padded to DP=32
# dtype:      float16 (accumulation in float32; DOT_PRECISION=tf32)
# tiles:      BM=64 query rows x BN=32 keys; num_warps=8, num_stages=2, target=sm_90
# order:      identity
# head groups (heads that share one pattern, one kernel each):
#   g0: heads [0, 1, 2, 3], run-time CSR tile lists: where(q.y // 7 == k.y // 7 and q.x // 7 == k.x // 7)
#
# Symbols:
#   i, j          original query / key indices; positions are end-aligned:
#                 q = i + (LK - LQ), k = j  (LANGUAGE.md section 2)
#   m, n          query tile index (program_id 0) and key tile index
#   rows, cols    original indices held by a tile; with a reordering plan they are
#                 gathered from QORD / KORD (new position -> original index), so
#                 Q/K/V are never copied into the new order
#   full tile     every in-range pair allowed: no mask arithmetic at all
#   partial tile  the element rule _allowed_gN is evaluated per element;
#                 the last key tile is always treated as partial when LK % BN != 0
#   NKB_EVEN      number of key tiles that need no bounds check (LK // BN)
#   LSE           natural-log sum of exp over allowed keys; -inf for a row with none
#   SCORE, SLOPE  a score modifier: _score(s, i, j, h) replaces the logit of every visited pair
#                 (full tiles too) before the mask selects; SLOPE: the backward multiplies dS by
#                 _dscore (d score / d s, derived with sympy), absent for a score additive in s
#   TABLES, DTAB  the score reads float inputs: the dQ kernel adds dL/d score * d score / d entry
#                 into the float32 gradient table DTAB (laid out as RT) with atomic adds
#   AUX           int8 lookup tables of random(...) primitives (a single 0 if none)
#   RT            int32 run-time table: for route(...), each route's query groups and key
#                 blocks, then this call's chosen blocks per list (a single 0 if none)
#   lst           b * NHK + key/value head: which per-call tile list and chosen table a program
#                 reads (run-time lists are laid end to end, NQT or NKT entries per list)
# ----------------------------------------------------------------------------
import triton
import triton.language as tl

LQ = tl.constexpr(3136)
LK = tl.constexpr(3136)
NH = tl.constexpr(4)
NHK = tl.constexpr(4)
GQA = tl.constexpr(1)
D = tl.constexpr(32)
DP = tl.constexpr(32)
EVEN_D = tl.constexpr(True)
BM = tl.constexpr(64)
BN = tl.constexpr(32)
NQT = tl.constexpr(49)
NKT = tl.constexpr(98)
NKB_EVEN = tl.constexpr(98)
CH_STRIDE = tl.constexpr(0)
Q_REORDERED = tl.constexpr(False)
K_REORDERED = tl.constexpr(False)
DOT_PRECISION = tl.constexpr("tf32")
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


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


SCORE = tl.constexpr(True)
SLOPE = tl.constexpr(False)
TABLES = tl.constexpr(True)


@triton.jit
def _tanh(x):
    # tanh without libdevice (absent under the interpreter), in one exp and one division (few registers:
    # it runs on every tile); exp overflowing to inf gives 1, to 0 gives -1; absolute error ~1e-7.
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _pow(a, b):
    # a ** b for a > 0 (and 0 ** b = 0 for b > 0); NaN for a < 0, as torch.pow with a non-integer b.
    return tl.exp2(b * tl.log2(a))


@triton.jit
def _score(s, i, j, h, RT, lst):
    # score: s + rel[h, q.y - k.y + 7 - 1, q.x - k.x + 7 - 1]
    q = i + (LK - LQ)
    k = j
    inp = RT + (lst // NHK) * 676
    t0 = (q // 56) % 56
    t1 = (k // 56) % 56
    t2 = t0 - t1
    t3 = t2 + 7
    t4 = t3 - 1
    t5 = (q // 1) % 56
    t6 = (k // 1) % 56
    t7 = t5 - t6
    t8 = t7 + 7
    t9 = t8 - 1
    t10 = tl.load(inp + 0 + tl.minimum(tl.maximum(h, 0), 3) * 169 + tl.minimum(tl.maximum(t4, 0), 12) * 13 + tl.minimum(tl.maximum(t9, 0), 12)).to(tl.float32, bitcast=True)
    t11 = s + t10
    return t11


@triton.jit
def _dtables(g, s, i, j, h, RT, lst, DTAB, valid):
    # gradients of the float inputs: d score / d rel[h, q.y - k.y + 7 - 1, q.x - k.x + 7 - 1]
    q = i + (LK - LQ)
    k = j
    inp = RT + (lst // NHK) * 676
    out = DTAB + (lst // NHK) * 676
    t0 = (q // 56) % 56
    t1 = (k // 56) % 56
    t2 = t0 - t1
    t3 = t2 + 7
    t4 = t3 - 1
    t5 = (q // 1) % 56
    t6 = (k // 1) % 56
    t7 = t5 - t6
    t8 = t7 + 7
    t9 = t8 - 1
    tl.atomic_add(out + 0 + tl.minimum(tl.maximum(h, 0), 3) * 169 + tl.minimum(tl.maximum(t4, 0), 12) * 13 + tl.minimum(tl.maximum(t9, 0), 12) + 0 * i + 0 * j, g * 1.0, mask=valid, sem="relaxed")


@triton.jit
def _tile_index(ORDER, t, B: tl.constexpr, L: tl.constexpr, REORDERED: tl.constexpr):
    # Original indices of tile t; padding past L maps to L (out of bounds everywhere).
    offs = t * B + tl.arange(0, B)
    if REORDERED:
        idx = tl.load(ORDER + offs, mask=offs < L, other=L)
    else:
        idx = offs
    return idx


@triton.jit
def _load_rows(base, idx, stride, L: tl.constexpr, CHECK: tl.constexpr):
    # A [len(idx), DP] block of rows idx; CHECK guards rows past L, EVEN_D skips the head-dim mask.
    # Row offsets are int64: B * H * L * D (or a large stride) can pass 2**31 elements.
    offs_d = tl.arange(0, DP)
    ptrs = base + idx[:, None].to(tl.int64) * stride + offs_d[None, :]
    if CHECK:
        if EVEN_D:
            x = tl.load(ptrs, mask=idx[:, None] < L, other=0.0)
        else:
            x = tl.load(ptrs, mask=(idx[:, None] < L) & (offs_d[None, :] < D), other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return x


@triton.jit
def _store_rows(base, idx, stride, x, L: tl.constexpr):
    offs_d = tl.arange(0, DP)
    tl.store(base + idx[:, None].to(tl.int64) * stride + offs_d[None, :], x, mask=(idx[:, None] < L) & (offs_d[None, :] < D))


@triton.jit
def _allowed_g0(i, j, h, AUX, RT, lst):
    """Allowed (query index i [BM, 1], key index j [1, BN], head h) for: where(q.y // 7 == k.y // 7 and q.x // 7 == k.x // 7)
    Run-time inputs: batch element lst // NHK reads RT[(lst // NHK) * 676 + offset]
    (offsets and extents baked in; indices clamped, LANGUAGE.md section 7)."""
    inb = (i < LQ) & (j < LK)
    q = i + (LK - LQ)
    k = j
    inp = RT + (lst // NHK) * 676
    q_y_0 = (q // 56) % 56
    k_y_1 = (k // 56) % 56
    q_x_2 = (q) % 56
    k_x_3 = (k) % 56
    return inb & (((q_y_0) // (7) == (k_y_1) // (7)) & ((q_x_2) // (7) == (k_x_3) // (7)))


@triton.jit
def bwd_preprocess(O, DO, DELTA, stride_dz, stride_dh, stride_dm):
    # delta = rowsum(dO * O) in float32, in the original row order. Grid: (query tiles, batch * NH).
    m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = m * BM + tl.arange(0, BM)
    o = _load_rows(O + bh * LQ * D, rows, D, LQ, True).to(tl.float32)
    do = _load_rows(DO + (bh // NH) * stride_dz + (bh % NH) * stride_dh, rows, stride_dm, LQ, True)
    delta = tl.sum(o * do.to(tl.float32), 1)
    tl.store(DELTA + bh * LQ + rows, delta, mask=rows < LQ)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, KORD, AUX, RT, DTAB, lst, n, rows, h,
             qk_scale, ALLOWED: tl.constexpr, MASKED: tl.constexpr):
    # dQ contribution of one key tile: dq += (P * (dP - delta)) @ K  (scale applied at the end).
    cols = _tile_index(KORD, n, BN, LK, K_REORDERED)
    k = _load_rows(k_base, cols, stride_kn, LK, MASKED)
    v = _load_rows(v_base, cols, stride_vn, LK, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if SCORE:
        raw = s * LN2
        s = _score(raw, rows[:, None], cols[None, :], h, RT, lst) * LOG2E
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        allowed = ALLOWED(rows[:, None], cols[None, :], h, AUX, RT, lst)
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if TABLES:
        # ds is dL / d score here: every float input the score reads gets its share (each pair once,
        # in this kernel only), on the pairs in range and allowed.
        valid = (rows < LQ)[:, None] & (cols < LK)[None, :]
        if MASKED:
            valid = valid & allowed
        _dtables(ds, raw, rows[:, None], cols[None, :], h, RT, lst, DTAB, valid)
    if SLOPE:
        # 0 * NaN is NaN: a blocked pair's slope is selected out, not multiplied away.
        ds = ds * _dscore(raw, rows[:, None], cols[None, :], h, RT, lst)
        if MASKED:
            ds = tl.where(allowed, ds, 0.0)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, stride_qm, stride_dm, lse_base, delta_base, QORD, AUX, RT, lst, m,
               cols, h, qk_scale, ALLOWED: tl.constexpr, MASKED: tl.constexpr):
    # dK/dV contribution of one query tile: dv += P^T @ dO, dk += (P * (dP - delta))^T @ Q.
    rows = _tile_index(QORD, m, BM, LQ, Q_REORDERED)
    q = _load_rows(q_base, rows, stride_qm, LQ, True)
    do = _load_rows(do_base, rows, stride_dm, LQ, True)
    # Padded rows and rows with no allowed key get lse = +inf, so their P is exactly 0.
    lse = tl.load(lse_base + rows, mask=rows < LQ, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(delta_base + rows, mask=rows < LQ, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if SCORE:
        raw = s * LN2
        s = _score(raw, rows[:, None], cols[None, :], h, RT, lst) * LOG2E
    p = tl.exp2(s - (lse * LOG2E)[:, None])
    if MASKED:
        allowed = ALLOWED(rows[:, None], cols[None, :], h, AUX, RT, lst)
        p = tl.where(allowed, p, 0.0)
    dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if SLOPE:
        ds = ds * _dscore(raw, rows[:, None], cols[None, :], h, RT, lst)
        if MASKED:
            ds = tl.where(allowed, ds, 0.0)
    dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def bwd_dq_g0(Q, K, V, DO, LSE, DELTA, DQ, QORD, KORD, ROW_PTR, ROW_SPLIT, ROW_COLS, HEADS, AUX, RT, DTAB, scale,
               stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn, stride_vz, stride_vh, stride_vn,
               stride_dz, stride_dh, stride_dm):
    # dQ of head group 0 over its key tiles (run-time CSR tile lists). Grid: (query tiles, batch * heads in group).
    m = tl.program_id(0)
    slot = tl.program_id(1)
    b = (slot // 4).to(tl.int64)
    h = tl.load(HEADS + slot % 4)
    hk = h // GQA
    lst = b * NHK + hk
    rows = _tile_index(QORD, m, BM, LQ, Q_REORDERED)
    row_base = (b * NH + h) * LQ
    q = _load_rows(Q + b * stride_qz + h.to(tl.int64) * stride_qh, rows, stride_qm, LQ, True)
    do = _load_rows(DO + b * stride_dz + h.to(tl.int64) * stride_dh, rows, stride_dm, LQ, True)
    lse = tl.load(LSE + row_base + rows, mask=rows < LQ, other=float("inf"))
    # A row with no allowed key (lse = -inf) must get P = 0, hence +inf.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + row_base + rows, mask=rows < LQ, other=0.0)
    k_base = K + b * stride_kz + hk.to(tl.int64) * stride_kh
    v_base = V + b * stride_vz + hk.to(tl.int64) * stride_vh
    qk_scale = scale * LOG2E
    dq = tl.zeros([BM, DP], dtype=tl.float32)
    # Key tiles of query tile m from the CSR lists (this call's list lst): partial ones first, then full ones.
    start = tl.load(ROW_PTR + lst * NQT + m)
    split = tl.load(ROW_SPLIT + lst * NQT + m)
    end = tl.load(ROW_PTR + lst * NQT + m + 1)
    for idx in range(start, split):
        n = tl.load(ROW_COLS + idx)
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, KORD, AUX, RT, DTAB, lst, n,
                      rows, h, qk_scale, _allowed_g0, True)
    for idx in range(split, end):
        n = tl.load(ROW_COLS + idx)
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, KORD, AUX, RT, DTAB, lst, n,
                      rows, h, qk_scale, _allowed_g0, False)
    _store_rows(DQ + row_base * D, rows, D, (dq * scale).to(DQ.dtype.element_ty), LQ)


@triton.jit
def bwd_dkdv_g0(Q, K, V, DO, LSE, DELTA, DK, DV, QORD, KORD, COL_PTR, COL_SPLIT, COL_ROWS, HEADS, AUX, RT,
                 scale, stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn, stride_vz, stride_vh,
                 stride_vn, stride_dz, stride_dh, stride_dm):
    # dK/dV of head group 0 per query head, over the transposed plan (query tiles of key tile n).
    # DK/DV are float32 [B, NH, LK, D]; the launcher sums the GQA heads that share a key/value head.
    n = tl.program_id(0)
    slot = tl.program_id(1)
    b = (slot // 4).to(tl.int64)
    h = tl.load(HEADS + slot % 4)
    hk = h // GQA
    lst = b * NHK + hk
    cols = _tile_index(KORD, n, BN, LK, K_REORDERED)
    k = _load_rows(K + b * stride_kz + hk.to(tl.int64) * stride_kh, cols, stride_kn, LK, True)
    v = _load_rows(V + b * stride_vz + hk.to(tl.int64) * stride_vh, cols, stride_vn, LK, True)
    q_base = Q + b * stride_qz + h.to(tl.int64) * stride_qh
    do_base = DO + b * stride_dz + h.to(tl.int64) * stride_dh
    row_base = (b * NH + h) * LQ
    qk_scale = scale * LOG2E
    dk = tl.zeros([BN, DP], dtype=tl.float32)
    dv = tl.zeros([BN, DP], dtype=tl.float32)
    start = tl.load(COL_PTR + lst * NKT + n)
    split = tl.load(COL_SPLIT + lst * NKT + n)
    end = tl.load(COL_PTR + lst * NKT + n + 1)
    for idx in range(start, split):
        m = tl.load(COL_ROWS + idx)
        dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, stride_qm, stride_dm, LSE + row_base, DELTA + row_base,
                            QORD, AUX, RT, lst, m, cols, h, qk_scale, _allowed_g0, True)
    for idx in range(split, end):
        m = tl.load(COL_ROWS + idx)
        dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, stride_qm, stride_dm, LSE + row_base, DELTA + row_base,
                            QORD, AUX, RT, lst, m, cols, h, qk_scale, _allowed_g0, False)
    col_base = (b * NH + h) * LK
    _store_rows(DK + col_base * D, cols, D, dk * scale, LK)
    _store_rows(DV + col_base * D, cols, D, dv, LK)
