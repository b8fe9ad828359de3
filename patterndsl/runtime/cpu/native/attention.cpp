// patterndsl native CPU attention: flash-style forward and backward over a block plan's tile lists.
//
// Symbols (every buffer is float32, row-major, contiguous):
//   BH            batch x heads of the call (keys/values already repeated per query head)
//   Lq, Lk        padded lengths (whole tiles); D head size (a multiple of 16)
//   BM, BN        tile rows / columns; RB rows of one register block (16 * NI, dividing BM)
//   row_ptr[m]    CSR over query tiles: entries row_ptr[m] .. row_ptr[m+1] are tile m's key tiles
//   ent_k[e]      key tile of entry e; ent_mask[e] its mask (-1: every pair allowed)
//   masks         [M][BN][BM/16] uint16: bit r of word (mk, j, g) = row g*16+r may attend key j
//   scale         softmax scale; the kernels work in base 2 (scores times scale * log2 e)
// Layout of the math: per register block of RB query rows everything is held transposed
// (key-major): S^T[j][i], P^T[j][i], O^T[d][i], so the softmax statistics of RB rows are
// NI vectors and every row-wise operation is vertical. Products are register-blocked
// FMA microkernels (broadcast one operand, vectors of 16 rows or 16 dims of the other).
// An entry's keys run per 16-row group: pieces of the entry on which the same groups of a register
// block are active (cut_pieces), over the span each group sees (forward) or the stretches it sees
// (backward: runs of keys, so a 2-D neighborhood's group skips the keys between its grid rows);
// partial tiles select blocked pairs out (left out of the max, exact zeros after exp2).
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "simd.h"

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
#ifndef PDSL_KEY_CHUNK
#define PDSL_KEY_CHUNK 64
#endif
constexpr int64_t kKeyChunk = PDSL_KEY_CHUNK;

using pdsl_simd::exp2_ps;  // (simd.h)

// S[j][i] (+)= sum_d A[j][d] * Bt[d][i] for MJ rows j of A (row stride D) and 16*NI columns i (row
// stride RS of Bt and S: RS > 16*NI runs some of the 16-row groups of a wider register block).
// pf: rows that the caller reads next (the same MJ rows of V), prefetched one line per d step.
template <int NI, int MJ, int RS = 16 * NI>
inline void rows_times_t(const float* a, int64_t D, const float* bt, float* s, const float* pf) {
  __m512 acc[MJ][NI];
#pragma GCC unroll 32
  for (int j = 0; j < MJ; ++j)
#pragma GCC unroll 8
    for (int n = 0; n < NI; ++n) acc[j][n] = _mm512_setzero_ps();
  const int64_t lines = pf ? MJ * D / 16 : 0;
  for (int64_t d = 0; d < D; ++d) {
    if (d < lines) _mm_prefetch((const char*)(pf + d * 16), _MM_HINT_T0);
    __m512 b[NI];
#pragma GCC unroll 8
    for (int n = 0; n < NI; ++n) b[n] = _mm512_loadu_ps(bt + d * RS + 16 * n);
#pragma GCC unroll 32
    for (int j = 0; j < MJ; ++j) {
      const __m512 x = _mm512_set1_ps(a[j * D + d]);
#pragma GCC unroll 8
      for (int n = 0; n < NI; ++n) acc[j][n] = _mm512_fmadd_ps(x, b[n], acc[j][n]);
    }
  }
#pragma GCC unroll 32
  for (int j = 0; j < MJ; ++j)
#pragma GCC unroll 8
    for (int n = 0; n < NI; ++n) _mm512_storeu_ps(s + j * RS + 16 * n, acc[j][n]);
}

template <int NI, int MJ, int RS = 16 * NI>
void scores_t(const float* a, int64_t nj, int64_t D, const float* bt, float* s, const float* pf = nullptr) {
  int64_t j = 0;
  for (; j + MJ <= nj; j += MJ) rows_times_t<NI, MJ, RS>(a + j * D, D, bt, s + j * RS, pf ? pf + j * D : nullptr);
  const int64_t r = nj - j;
  a += j * D;
  s += j * RS;
  if (pf) pf += j * D;
  switch (r) {
#define PDSL_CASE(R) \
  case R:            \
    if constexpr (R < MJ) rows_times_t<NI, R, RS>(a, D, bt, s, pf); \
    break;
    PDSL_CASE(1) PDSL_CASE(2) PDSL_CASE(3) PDSL_CASE(4) PDSL_CASE(5) PDSL_CASE(6) PDSL_CASE(7) PDSL_CASE(8)
    PDSL_CASE(9) PDSL_CASE(10) PDSL_CASE(11) PDSL_CASE(12) PDSL_CASE(13) PDSL_CASE(14) PDSL_CASE(15)
    PDSL_CASE(16) PDSL_CASE(17) PDSL_CASE(18) PDSL_CASE(19) PDSL_CASE(20) PDSL_CASE(21) PDSL_CASE(22)
    PDSL_CASE(23)
#undef PDSL_CASE
    default:
      break;
  }
}

// Ot[d][i] = alpha[i] * Ot[d][i] + sum_j W[j][d] * Pt[j][i] for MD dims d (from d0), 16*NI columns i
// (row stride RS of Ot and Pt).
template <int NI, int MD, int RS = 16 * NI>
inline void accumulate_t(const float* w, int64_t nj, int64_t D, const float* pt, float* ot, const __m512* alpha) {
  __m512 acc[MD][NI];
#pragma GCC unroll 32
  for (int d = 0; d < MD; ++d)
#pragma GCC unroll 8
    for (int n = 0; n < NI; ++n) {
      acc[d][n] = _mm512_loadu_ps(ot + d * RS + 16 * n);
      if (alpha) acc[d][n] = _mm512_mul_ps(acc[d][n], alpha[n]);
    }
  for (int64_t j = 0; j < nj; ++j) {
    __m512 p[NI];
#pragma GCC unroll 8
    for (int n = 0; n < NI; ++n) p[n] = _mm512_loadu_ps(pt + j * RS + 16 * n);
#pragma GCC unroll 32
    for (int d = 0; d < MD; ++d) {
      const __m512 x = _mm512_set1_ps(w[j * D + d]);
#pragma GCC unroll 8
      for (int n = 0; n < NI; ++n) acc[d][n] = _mm512_fmadd_ps(x, p[n], acc[d][n]);
    }
  }
#pragma GCC unroll 32
  for (int d = 0; d < MD; ++d)
#pragma GCC unroll 8
    for (int n = 0; n < NI; ++n) _mm512_storeu_ps(ot + d * RS + 16 * n, acc[d][n]);
}

template <int NI, int RS = 16 * NI>
void product_t(const float* w, int64_t nj, int64_t D, const float* pt, float* ot, const __m512* alpha) {
  constexpr int MD = NI == 1 ? 16 : (NI == 2 ? 8 : 4);
  int64_t d = 0;
  for (; d + MD <= D; d += MD) accumulate_t<NI, MD, RS>(w + d, nj, D, pt, ot + d * RS, alpha);
  for (; d < D; ++d) accumulate_t<NI, 1, RS>(w + d, nj, D, pt, ot + d * RS, alpha);
}

// The forward's Ot update (as product_t): blocks of MD dims whose MD * NI accumulators fill the register
// file, so P^T is read once per block, fewer times per FMA (16 KB of P^T per 64-key chunk, read
// D / MD times: one thread, 16K sliding window 256: ~3% less CPU time than product_t's blocks);
// the rest in blocks of 4 dims (D is a multiple of 16).
template <int NI, int RS = 16 * NI>
void forward_product_t(const float* w, int64_t nj, int64_t D, const float* pt, float* ot, const __m512* alpha) {
  constexpr int MD = NI == 1 ? 24 : (NI == 2 ? 12 : (NI == 3 ? 8 : 6));
  int64_t blocks = D / MD;
  while ((D - blocks * MD) % 4) --blocks;
  int64_t d = 0;
  for (; d < blocks * MD; d += MD) accumulate_t<NI, MD, RS>(w + d, nj, D, pt, ot + d * RS, alpha);
  for (; d < D; d += 4) accumulate_t<NI, 4, RS>(w + d, nj, D, pt, ot + d * RS, alpha);
}

// dst[j][d] += sum_i Pt[j][i] * X[i][d] for MJ rows j, 16*ND dims (from d0), 16*NI rows i of X (row
// stride RS of Pt: RS > 16*NI runs some of the 16-row groups of a wider register block).
template <int NI, int MJ, int ND, int RS = 16 * NI>
inline void rows_accumulate(const float* pt, const float* x, int64_t D, float* dst) {
  __m512 acc[MJ][ND];
#pragma GCC unroll 32
  for (int j = 0; j < MJ; ++j)
#pragma GCC unroll 8
    for (int v = 0; v < ND; ++v) acc[j][v] = _mm512_loadu_ps(dst + j * D + 16 * v);
  for (int i = 0; i < 16 * NI; ++i) {
    __m512 xv[ND];
#pragma GCC unroll 8
    for (int v = 0; v < ND; ++v) xv[v] = _mm512_loadu_ps(x + i * D + 16 * v);
#pragma GCC unroll 32
    for (int j = 0; j < MJ; ++j) {
      const __m512 p = _mm512_set1_ps(pt[j * RS + i]);
#pragma GCC unroll 8
      for (int v = 0; v < ND; ++v) acc[j][v] = _mm512_fmadd_ps(p, xv[v], acc[j][v]);
    }
  }
#pragma GCC unroll 32
  for (int j = 0; j < MJ; ++j)
#pragma GCC unroll 8
    for (int v = 0; v < ND; ++v) _mm512_storeu_ps(dst + j * D + 16 * v, acc[j][v]);
}

template <int NI, int ND, int RS = 16 * NI>
void rows_accumulate_all(const float* pt, int64_t nj, const float* x, int64_t D, float* dst) {
  constexpr int MJ = 6;
  int64_t j = 0;
  for (; j + MJ <= nj; j += MJ) rows_accumulate<NI, MJ, ND, RS>(pt + j * RS, x, D, dst + j * D);
  // The last rows in one block too (a row at a time leaves the FMA units waiting on latency).
  switch (nj - j) {
    case 1: rows_accumulate<NI, 1, ND, RS>(pt + j * RS, x, D, dst + j * D); break;
    case 2: rows_accumulate<NI, 2, ND, RS>(pt + j * RS, x, D, dst + j * D); break;
    case 3: rows_accumulate<NI, 3, ND, RS>(pt + j * RS, x, D, dst + j * D); break;
    case 4: rows_accumulate<NI, 4, ND, RS>(pt + j * RS, x, D, dst + j * D); break;
    case 5: rows_accumulate<NI, 5, ND, RS>(pt + j * RS, x, D, dst + j * D); break;
    default: break;
  }
}

template <int NI, int RS = 16 * NI>
void key_gradient(const float* pt, int64_t nj, const float* x, int64_t D, float* dst) {
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) rows_accumulate_all<NI, 4, RS>(pt, nj, x + d, D, dst + d);
  switch ((D - d) / 16) {
    case 3: rows_accumulate_all<NI, 3, RS>(pt, nj, x + d, D, dst + d); break;
    case 2: rows_accumulate_all<NI, 2, RS>(pt, nj, x + d, D, dst + d); break;
    case 1: rows_accumulate_all<NI, 1, RS>(pt, nj, x + d, D, dst + d); break;
    default: break;
  }
}

// dst[c * dstride + r] = src[r * sstride + c] * mul[c] for r, c < 16: three shuffle stages in registers.
template <bool kStream = false>
inline void transpose16(const float* src, int64_t sstride, __m512 mul, float* dst, int64_t dstride) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_mul_ps(_mm512_loadu_ps(src + i * sstride), mul);
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4i + j], 128-bit lane L: rows 4i .. 4i+3 of column 4L + j.
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // Column 4L + j gathers lane L of r[j], r[4 + j], r[8 + j], r[12 + j].
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512 s0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44), s1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
    const __m512 s2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44);
    const __m512 s3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
    const __m512 out[4] = {_mm512_shuffle_f32x4(s0, s2, 0x88), _mm512_shuffle_f32x4(s0, s2, 0xDD),
                           _mm512_shuffle_f32x4(s1, s3, 0x88), _mm512_shuffle_f32x4(s1, s3, 0xDD)};
    for (int x = 0; x < 4; ++x) {
      // Results written once and read by the caller later: streamed past the caches (no read for ownership).
      if constexpr (kStream)
        _mm512_stream_ps(dst + (4 * x + j) * dstride, out[x]);
      else
        _mm512_storeu_ps(dst + (4 * x + j) * dstride, out[x]);
    }
  }
}

// RB = 16*NI rows of x (row stride D), transposed: out[d][i] = mul * x[i][d].
template <int NI>
void transpose_rows(const float* x, int64_t D, float mul, float* out) {
  constexpr int RB = 16 * NI;
  for (int n = 0; n < NI; ++n)
    for (int64_t d = 0; d < D; d += 16) transpose16(x + 16 * n * D + d, D, _mm512_set1_ps(mul), out + d * RB + 16 * n, RB);
}

// The inverse: rows[i][d] = xt[d][i] * mul[i] for RB rows (row stride D) from xt [D][RB].
template <int NI>
void untranspose_rows(const float* xt, int64_t D, const float* mul, float* rows) {
  constexpr int RB = 16 * NI;
  const bool aligned = ((uintptr_t)rows & 63) == 0;  // every row then is (D is a multiple of 16)
  for (int n = 0; n < NI; ++n) {
    const __m512 mv = mul ? _mm512_loadu_ps(mul + 16 * n) : _mm512_set1_ps(1.0f);
    for (int64_t d = 0; d < D; d += 16) {
      if (aligned)
        transpose16<true>(xt + d * RB + 16 * n, RB, mv, rows + 16 * n * D + d, D);
      else
        transpose16(xt + d * RB + 16 * n, RB, mv, rows + 16 * n * D + d, D);
    }
  }
}

// Fetches the rows of the next query tile a line at a time, spread over the current tile's chunks.
struct Ahead {
  const char* next;
  int64_t left;
  void step(int64_t lines) {
    for (; lines > 0 && left > 0; --lines, --left, next += 64) _mm_prefetch(next, _MM_HINT_T1);
  }
};

struct Lists {
  const int64_t* row_ptr;
  const int32_t* ent_k;
  const int32_t* ent_mask;
  const uint16_t* masks;
  int64_t BM, BN;
  const int32_t* spans = nullptr;  // the forward's mask_spans of the call; null: group_span scans the bits
};

inline __mmask16 allowed_bits(const Lists& L, int64_t e, int64_t j, int64_t g) {
  return (__mmask16)L.masks[((int64_t)L.ent_mask[e] * L.BN + j) * (L.BM / 16) + g];
}

// Keys [lo, hi) of a tile with mask mk (-1: every pair) that 16-row group g may attend (lo >= hi: none).
inline void group_span(const Lists& L, int64_t mk, int64_t g, int64_t* lo, int64_t* hi) {
  const int64_t groups = L.BM / 16;
  if (mk < 0) {
    *lo = 0;
    *hi = L.BN;
  } else if (L.spans) {
    *lo = L.spans[(mk * groups + g) * 2];
    *hi = L.spans[(mk * groups + g) * 2 + 1];
  } else {
    const uint16_t* w = L.masks + mk * L.BN * groups + g;
    int64_t a = 0, b = L.BN;
    while (a < b && !w[a * groups]) ++a;
    while (b > a && !w[(b - 1) * groups]) --b;
    *lo = a;
    *hi = b;
  }
}

// group_span of every group of every mask: spans[(mask * groups + g) * 2 + {0, 1}]. Masks are shared
// by many tiles (a band has two), so their edges are found once per call rather than per tile and head.
std::vector<int32_t> mask_spans(const Lists& L, int64_t entries) {
  int64_t count = 0;
  for (int64_t e = 0; e < entries; ++e) count = std::max<int64_t>(count, (int64_t)L.ent_mask[e] + 1);
  const int64_t groups = L.BM / 16;
  std::vector<int32_t> spans(count * groups * 2);
  const Lists scan{L.row_ptr, L.ent_k, L.ent_mask, L.masks, L.BM, L.BN, nullptr};
  for (int64_t mk = 0; mk < count; ++mk)
    for (int64_t g = 0; g < groups; ++g) {
      int64_t a, b;
      group_span(scan, mk, g, &a, &b);
      spans[(mk * groups + g) * 2] = (int32_t)a;
      spans[(mk * groups + g) * 2 + 1] = (int32_t)b;
    }
  return spans;
}

// The keys each 16-row group of each mask sees, as up to kStretches stretches (runs of keys some row of
// the group attends; runs closer than kStretchGap keys are one stretch, and past kStretches the closest
// are joined). Record (mask * groups + g) is its count, then [lo, hi) pairs. A 2-D neighborhood's edge
// tile has a group see a stretch per grid row it covers, far apart: the keys between are skipped.
constexpr int kStretches = 4;
constexpr int kStretchRecord = 1 + 2 * kStretches;
#ifndef PDSL_STRETCH_GAP
#define PDSL_STRETCH_GAP 4
#endif
constexpr int64_t kStretchGap = PDSL_STRETCH_GAP;

std::vector<int32_t> mask_stretches(const Lists& L, int64_t entries) {
  int64_t count = 0;
  for (int64_t e = 0; e < entries; ++e) count = std::max<int64_t>(count, (int64_t)L.ent_mask[e] + 1);
  const int64_t groups = L.BM / 16;
  std::vector<int32_t> out(count * groups * kStretchRecord, 0);
  std::vector<int32_t> runs;
  for (int64_t mk = 0; mk < count; ++mk)
    for (int64_t g = 0; g < groups; ++g) {
      const uint16_t* w = L.masks + mk * L.BN * groups + g;
      runs.clear();
      for (int64_t j = 0; j < L.BN; ++j) {
        if (!w[j * groups]) continue;
        if (!runs.empty() && j - runs.back() < kStretchGap)
          runs.back() = (int32_t)j + 1;
        else
          runs.insert(runs.end(), {(int32_t)j, (int32_t)j + 1});
      }
      while ((int64_t)runs.size() > 2 * kStretches) {  // join the two runs with the smallest gap
        size_t at = 1;
        for (size_t i = 3; i + 1 < runs.size(); i += 2)
          if (runs[i + 1] - runs[i] < runs[at + 1] - runs[at]) at = i;
        runs.erase(runs.begin() + at, runs.begin() + at + 2);
      }
      int32_t* rec = out.data() + (mk * groups + g) * kStretchRecord;
      rec[0] = (int32_t)(runs.size() / 2);
      std::copy(runs.begin(), runs.end(), rec + 1);
    }
  return out;
}

// Cuts the keys that NI groups see (group n: the count[n] stretches [iv[n][2s], iv[n][2s+1])) into
// pieces on which the same groups are active and calls piece(x, y, n0, na) for keys [x, y) and groups
// n0 .. n0+na-1, in key order. Groups inside a piece's range that see none of its keys (holes) are
// computed and selected out.
template <int NI, class Piece>
void cut_pieces(const int32_t* const* iv, const int* count, Piece&& piece) {
  int64_t cuts[2 * NI * kStretches];
  int c = 0;
  for (int n = 0; n < NI; ++n)
    for (int s = 0; s < 2 * count[n]; ++s) {
      int i = c++;  // insertion into the sorted cuts (a handful)
      for (; i > 0 && cuts[i - 1] > iv[n][s]; --i) cuts[i] = cuts[i - 1];
      cuts[i] = iv[n][s];
    }
  c = (int)(std::unique(cuts, cuts + c) - cuts);
  int64_t px = 0, py = 0;  // pending piece [px, py) over groups pn0 .. pn0+pna-1
  int pn0 = 0, pna = 0;
  for (int i = 0; i + 1 < c; ++i) {
    const int64_t x = cuts[i], y = cuts[i + 1];
    int n0 = NI, n1 = -1;
    for (int n = 0; n < NI; ++n)
      for (int s = 0; s < count[n]; ++s)
        if (iv[n][2 * s] <= x && y <= iv[n][2 * s + 1]) {
          n0 = std::min(n0, n);
          n1 = n;
        }
    const int na = n1 - n0 + 1;
    if (pna && (na <= 0 || n0 != pn0 || na != pna || py != x)) {
      piece(px, py, pn0, pna);
      pna = 0;
    }
    if (na <= 0) continue;
    if (!pna) {
      px = x;
      pn0 = n0;
      pna = na;
    }
    py = y;
  }
  if (pna) piece(px, py, pn0, pna);
}

// One chunk of keys [lo, hi) of entry e for NA 16-row groups of a register block, the first being
// group g0 of the query tile: scores, online softmax update of the groups' statistics (mxs, sums:
// 16 * NA floats each) and O^T += V^T P^T. The block's transposed buffers (qt, st, ot) have row
// stride RS (16 rows per group of the block); every pointer points at the first of the NA groups.
template <int NA, int RS = 16 * NA>
void forward_chunk(const Lists& L, int64_t e, int64_t lo, int64_t hi, int64_t g0, const float* kb, const float* vb,
                   int64_t D, const float* qt, float* st, float* ot, float* mxs, float* sums) {
  const int64_t nj = hi - lo;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 floor = _mm512_set1_ps(-std::numeric_limits<float>::max());
  // V's rows are read only after the scores: fetched while the scores are computed.
  scores_t<NA, NA == 1 ? 24 : (NA == 2 ? 12 : (NA == 3 ? 8 : 6)), RS>(kb, nj, D, qt, st, vb);
  const bool partial = L.ent_mask[e] >= 0;
  __m512 mx[NA], cm[NA];
  for (int n = 0; n < NA; ++n) cm[n] = mx[n] = _mm512_loadu_ps(mxs + 16 * n);
  // Blocked pairs are left out of the max here and selected out after exp2 (whatever they hold).
  if (partial) {
    for (int64_t j = 0; j < nj; ++j)
      for (int n = 0; n < NA; ++n)
        cm[n] = _mm512_mask_max_ps(cm[n], allowed_bits(L, e, lo + j, g0 + n), cm[n], _mm512_loadu_ps(st + j * RS + 16 * n));
  } else {
    for (int64_t j = 0; j < nj; ++j)
      for (int n = 0; n < NA; ++n) cm[n] = _mm512_max_ps(cm[n], _mm512_loadu_ps(st + j * RS + 16 * n));
  }
  __m512 alpha[NA], use[NA];
  bool rescale = false;
  for (int n = 0; n < NA; ++n) {
    const __mmask16 none = _mm512_cmp_ps_mask(cm[n], ninf, _CMP_EQ_OQ);
    use[n] = _mm512_mask_blend_ps(none, cm[n], _mm512_setzero_ps());
    // exp2(old max - new max); rows with no key so far (old max -inf) hold nothing: 0.
    const __mmask16 was = _mm512_cmp_ps_mask(mx[n], ninf, _CMP_EQ_OQ);
    alpha[n] = _mm512_maskz_mov_ps(~was, exp2_ps(_mm512_max_ps(floor, _mm512_sub_ps(mx[n], use[n]))));
    rescale |= _mm512_cmp_ps_mask(mx[n], cm[n], _CMP_NEQ_UQ) != 0;
    _mm512_storeu_ps(mxs + 16 * n, cm[n]);
  }
  __m512 add[NA];
  for (int n = 0; n < NA; ++n) add[n] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nj; ++j)
    for (int n = 0; n < NA; ++n) {
      float* s = st + j * RS + 16 * n;
      __m512 p = exp2_ps(_mm512_max_ps(floor, _mm512_sub_ps(_mm512_loadu_ps(s), use[n])));
      if (partial) p = _mm512_maskz_mov_ps(allowed_bits(L, e, lo + j, g0 + n), p);
      _mm512_storeu_ps(s, p);
      add[n] = _mm512_add_ps(add[n], p);
    }
  for (int n = 0; n < NA; ++n)
    _mm512_storeu_ps(sums + 16 * n, _mm512_fmadd_ps(_mm512_loadu_ps(sums + 16 * n), alpha[n], add[n]));
  forward_product_t<NA, RS>(vb, nj, D, st, ot, rescale ? alpha : nullptr);
}

// Keys [x, y) of entry e (whose first key row is kb, vb) for groups n0 .. n0+na-1 of register block b,
// in chunks whose K/V rows and score block stay in L1 with the block's rows. mats, stats: the
// block's Q^T, O^T and statistics as forward_tile lays them out.
template <int NI>
void forward_piece(const Lists& L, int64_t e, int64_t x, int64_t y, int64_t b, int n0, int na, const float* kb,
                   const float* vb, int64_t D, float* mats, float* st, float* stats, Ahead& ahead) {
  constexpr int RB = 16 * NI;
  const float* qt = mats + b * 2 * D * RB + 16 * n0;
  float* ot = mats + (b * 2 + 1) * D * RB + 16 * n0;
  float* mxs = stats + b * 2 * RB + 16 * n0;
  float* sums = mxs + RB;
  const int64_t g0 = b * NI + n0;
  for (int64_t lo = x; lo < y; lo += kKeyChunk) {
    const int64_t hi = std::min(lo + kKeyChunk, y);
    const float *kc = kb + lo * D, *vc = vb + lo * D;
    float* sc = st + 16 * n0;
    if (na == NI) {
      forward_chunk<NI, RB>(L, e, lo, hi, g0, kc, vc, D, qt, sc, ot, mxs, sums);
    } else if (na == 1) {
      forward_chunk<1, RB>(L, e, lo, hi, g0, kc, vc, D, qt, sc, ot, mxs, sums);
    } else if constexpr (NI == 4) {
      if (na == 2)
        forward_chunk<2, RB>(L, e, lo, hi, g0, kc, vc, D, qt, sc, ot, mxs, sums);
      else
        forward_chunk<3, RB>(L, e, lo, hi, g0, kc, vc, D, qt, sc, ot, mxs, sums);
    }
    ahead.step(16);
  }
}

// The keys of entry e that block b's groups see ([lo[n], hi[n]) for group n), as pieces on which the
// same groups are active (cut_pieces): a band's edge tiles run 16-row groups over only the keys they
// see, not the whole block over the union.
template <int NI>
void forward_entry(const Lists& L, int64_t e, const int64_t* lo, const int64_t* hi, int64_t b, const float* kb,
                   const float* vb, int64_t D, float* mats, float* st, float* stats, Ahead& ahead) {
  int32_t span[NI][2];
  const int32_t* iv[NI];
  int count[NI];
  for (int n = 0; n < NI; ++n) {
    span[n][0] = (int32_t)lo[n];
    span[n][1] = (int32_t)hi[n];
    iv[n] = span[n];
    count[n] = lo[n] < hi[n];
  }
  cut_pieces<NI>(iv, count, [&](int64_t x, int64_t y, int n0, int na) {
    forward_piece<NI>(L, e, x, y, b, n0, na, kb, vb, D, mats, st, stats, ahead);
  });
}

// Denormal results and operands read as zero while the kernel runs on this thread (a weight below
// 2^-126 of its row's largest is far below float32's resolution of the row's sum, and denormal
// operands make FMAs ~100x slower); the thread's previous mode is restored on exit.
struct Flush {
  unsigned int saved;
  Flush() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }  // FTZ | DAZ
  ~Flush() {
    _mm_sfence();  // streamed results are visible before the thread leaves the region
    _mm_setcsr(saved);
  }
};

// Per-thread buffers: for each register block of a query tile its scaled Q^T and O^T (or Q^T,
// dO^T, dQ^T), two statistics rows, and score blocks of one key chunk.
struct Work {
  std::vector<float> buf;
  float* base;
  Work(size_t floats) : buf(floats + 16) { base = (float*)(((uintptr_t)buf.data() + 63) & ~(uintptr_t)63); }
};

// One query tile m of one (batch, head): every register block walks the tile's key tiles, a key
// tile at a time for all blocks, so a key tile's K/V rows are read from memory once per query tile.
// Returns whether every lse it wrote is below +inf and not NaN (so is every output row then).
template <int NI>
bool forward_tile(const float* q, const float* k, const float* v, float* o, float* lse, int64_t D, const Lists& L,
                  int64_t m, float scale2, float* w, Ahead ahead) {
  constexpr int RB = 16 * NI;
  const int64_t blocks = L.BM / RB;
  float* stats = w;                      // [blocks][2][RB]: running max, running sum
  float* st = stats + 2 * L.BM;          // [kKeyChunk][RB]
  float* mats = st + kKeyChunk * RB;     // [blocks][2][D][RB]: Q^T, O^T
  for (int64_t b = 0; b < blocks; ++b) {
    transpose_rows<NI>(q + b * RB * D, D, scale2, mats + b * 2 * D * RB);
    std::fill(mats + (b * 2 + 1) * D * RB, mats + (b * 2 + 2) * D * RB, 0.0f);
    std::fill(stats + b * 2 * RB, stats + b * 2 * RB + RB, -std::numeric_limits<float>::infinity());
    std::fill(stats + b * 2 * RB + RB, stats + (b + 1) * 2 * RB, 0.0f);
  }
  for (int64_t e = L.row_ptr[m]; e < L.row_ptr[m + 1]; ++e) {
    const int64_t key0 = (int64_t)L.ent_k[e] * L.BN, mk = L.ent_mask[e];
    for (int64_t b = 0; b < blocks; ++b) {
      int64_t lo[NI], hi[NI];
      for (int n = 0; n < NI; ++n) group_span(L, mk, b * NI + n, lo + n, hi + n);
      forward_entry<NI>(L, e, lo, hi, b, k + key0 * D, v + key0 * D, D, mats, st, stats, ahead);
    }
  }
  bool ok = true;
  for (int64_t b = 0; b < blocks; ++b) {
    const float* mv = stats + b * 2 * RB;
    const float* sv = mv + RB;
    const float* ot = mats + (b * 2 + 1) * D * RB;
    // Rows whose O^T holds a NaN or Inf (a non-finite key or value reached them, blocked pairs too:
    // 0 * NaN) get a NaN lse, so one check of lse stands for the output as well (O^T finite: the
    // output, O^T times 1/sum <= 1, is finite). Class bits: QNaN 0x01, +Inf 0x08, -Inf 0x10, SNaN 0x80.
    uint32_t bad[NI] = {};
    for (int64_t d = 0; d < D; ++d)
      for (int n = 0; n < NI; ++n) bad[n] |= _mm512_fpclass_ps_mask(_mm512_loadu_ps(ot + d * RB + 16 * n), 0x99);
    alignas(64) float inv[RB];
    for (int i = 0; i < RB; ++i) {
      // No allowed key (the sum is at least 1 otherwise: the row max contributes exp2(0)): zeros, -inf.
      inv[i] = sv[i] == 0.0f ? 0.0f : 1.0f / sv[i];
      lse[b * RB + i] = sv[i] == 0.0f ? -std::numeric_limits<float>::infinity() : (mv[i] + std::log2(sv[i])) * kLn2;
      if ((bad[i / 16] >> (i % 16)) & 1) lse[b * RB + i] = std::numeric_limits<float>::quiet_NaN();
      ok &= lse[b * RB + i] < std::numeric_limits<float>::infinity();
    }
    untranspose_rows<NI>(ot, D, inv, o + b * RB * D);
  }
  return ok;
}

// A fresh output of many MiB (torch.empty: new pages from mmap) costs a page fault per 4 KiB page
// on its first write: 8192 faults (~25 ms on this machine's VM, a third of the kernel's time) for
// the 32 MiB output of a 16K sliding window. Transparent huge pages take 2 MiB per fault. A hint
// only (THP "madvise" mode); pages already there, or a kernel that ignores it, change nothing.
void prefer_huge_pages(void* p, size_t bytes) {
  if (bytes < ((size_t)4 << 20)) return;
  const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
  const uintptr_t a = ((uintptr_t)p + page - 1) & ~(page - 1), b = ((uintptr_t)p + bytes) & ~(page - 1);
  if (b > a) madvise((void*)a, b - a, MADV_HUGEPAGE);
}

// The forward's items, (batch-head bh, query tile m) numbered bh * n_q_tiles + m, cut into runs of
// consecutive items of about equal work (a query tile's key tiles, plus one for its own rows), 32
// per thread, the last two per thread cut 8 times finer: returns the first item of each run, then
// the item count. A thread walks a run's query tiles in order, so the key tiles neighbouring query
// tiles share (2 of a band's 3) are still in its L2 and the next query tile it prefetches is its
// own; threads take runs dynamically (a core that is busy elsewhere takes fewer), and the call ends
// at most ~1/256 of a thread's share after its first thread runs out of work (with whole runs of
// ~1/32 a thread waited half a run on average: ~0.6 ms of a 16K sliding window's ~37 ms on 2 threads).
std::vector<int64_t> item_runs(const int64_t* row_ptr, int64_t n_q_tiles, int64_t BH, int threads) {
  const int64_t items = BH * n_q_tiles;
  const int64_t work = BH * (row_ptr[n_q_tiles] - row_ptr[0] + n_q_tiles);
  const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(items, 32 * (int64_t)threads));
  // Boundary n of the runs lies at `at(n)` eighths of a run's work: every 8 up to the tail, then every 1.
  const int64_t bulk = std::max<int64_t>(0, runs - 2 * (int64_t)threads);
  auto at = [&](int64_t n) { return n <= bulk ? 8 * n : 8 * bulk + (n - bulk); };
  std::vector<int64_t> starts{0};
  int64_t done = 0;
  for (int64_t it = 0; it + 1 < items; ++it) {
    const int64_t m = it % n_q_tiles;
    done += row_ptr[m + 1] - row_ptr[m] + 1;
    if (8 * done * runs >= work * at((int64_t)starts.size())) starts.push_back(it + 1);
  }
  starts.push_back(items);
  return starts;
}

template <int NI>
void forward_impl(const float* q, const float* k, const float* v, float* o, float* lse, int64_t BH, int64_t Lq,
                  int64_t Lk, int64_t D, const Lists& L, int64_t n_q_tiles, float scale, int threads, int* bad) {
  constexpr int RB = 16 * NI;
  const std::vector<int64_t> runs = item_runs(L.row_ptr, n_q_tiles, BH, threads);
  const int64_t n_runs = (int64_t)runs.size() - 1;
  const float scale2 = scale * kLog2e;
  const std::vector<int32_t> spans = mask_spans(L, L.row_ptr[n_q_tiles]);
  Lists LS = L;
  LS.spans = spans.data();
  prefer_huge_pages(o, (size_t)(BH * Lq * D) * sizeof(float));
  int any_bad = 0;
#pragma omp parallel num_threads(threads) reduction(| : any_bad)
  {
    const Flush flush;
    Work work(2 * L.BM + kKeyChunk * RB + 2 * L.BM * D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < n_runs; ++r)
      for (int64_t it = runs[r]; it < runs[r + 1]; ++it) {
        const int64_t bh = it / n_q_tiles, m = it % n_q_tiles;
        const int64_t row = bh * Lq + m * L.BM;
        // This thread's next query tile: its rows are brought to L2 while this one runs.
        Ahead ahead{nullptr, 0};
        if (it + 1 < runs[r + 1]) {
          const int64_t next = (it + 1) / n_q_tiles * Lq + (it + 1) % n_q_tiles * L.BM;
          ahead = Ahead{(const char*)(q + next * D), L.BM * D / 16};
        }
        if (!forward_tile<NI>(q + row * D, k + bh * Lk * D, v + bh * Lk * D, o + row * D, lse + row, D, LS, m,
                              scale2, work.base, ahead))
          any_bad = 1;
      }
  }
  *bad = any_bad;
}

// One chunk of keys [lo, hi) of entry e for NA 16-row groups of a register block, the first being group
// g0 of the query tile: P and dS recomputed from lse2 and delta, dV and dK rows of the chunk added in
// place, dQ^T accumulated. The block's transposed buffers (qt, dot, dqt, pt, dst) have row stride RS;
// every row pointer (q, dout, lse2, delta and the transposed ones) points at the first of the NA groups.
template <int NA, int RS = 16 * NA>
void backward_chunk(const Lists& L, int64_t e, int64_t lo, int64_t hi, int64_t g0, const float* kb, const float* vb,
                    float* dkb, float* dvb, const float* q, const float* dout, const float* lse2, const float* delta,
                    int64_t D, float scale, const float* qt, const float* dot, float* dqt, float* pt, float* dst) {
  constexpr int MJ = NA == 1 ? 24 : (NA == 2 ? 12 : (NA == 3 ? 8 : 6));
  const int64_t nj = hi - lo;
  const __m512 floor = _mm512_set1_ps(-std::numeric_limits<float>::max());
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 l2[NA], dl[NA];
  for (int n = 0; n < NA; ++n) {
    l2[n] = _mm512_loadu_ps(lse2 + 16 * n);
    dl[n] = _mm512_loadu_ps(delta + 16 * n);
  }
  scores_t<NA, MJ, RS>(kb, nj, D, qt, pt, vb);
  scores_t<NA, MJ, RS>(vb, nj, D, dot, dst, dvb);
  const bool partial = L.ent_mask[e] >= 0;
  for (int64_t j = 0; j < nj; ++j)
    for (int n = 0; n < NA; ++n) {
      float* s = pt + j * RS + 16 * n;
      float* g = dst + j * RS + 16 * n;
      __m512 p = exp2_ps(_mm512_max_ps(floor, _mm512_sub_ps(_mm512_loadu_ps(s), l2[n])));
      if (partial) p = _mm512_maskz_mov_ps(allowed_bits(L, e, lo + j, g0 + n), p);
      _mm512_storeu_ps(s, p);
      // dS = P * (dP - delta), times the scale both dQ and dK need.
      _mm512_storeu_ps(g, _mm512_mul_ps(_mm512_mul_ps(p, sc), _mm512_sub_ps(_mm512_loadu_ps(g), dl[n])));
    }
  key_gradient<NA, RS>(pt, nj, dout, D, dvb);
  key_gradient<NA, RS>(dst, nj, q, D, dkb);
  product_t<NA, RS>(kb, nj, D, dst, dqt, nullptr);
}

// Whether none of the n floats at x (n a multiple of 16) is NaN or infinite.
inline bool all_finite(const float* x, int64_t n) {
  __mmask16 bad = 0;
  for (int64_t i = 0; i < n; i += 16) bad |= _mm512_fpclass_ps_mask(_mm512_loadu_ps(x + i), 0x99);  // NaN, +-inf
  return bad == 0;
}

// The rows one query tile's backward reads and writes: BM rows each, contiguous.
struct TileRows {
  const float* q;      // [BM][D]
  const float* dout;   // [BM][D]
  const float* lse2;   // [BM]: lse * log2 e, +inf on rows with no allowed key
  const float* delta;  // [BM]: rowsum(dO * O) - dlse
  float* dq;           // [BM][D], written
  bool stream;         // dq goes straight to memory (nobody reads it back soon)
};

// Pairs the backward computed (keys times rows of its chunks) since the library was loaded: tests check
// that edge tiles run as pieces (pdsl_backward_pairs).
std::atomic<int64_t> backward_pairs_total{0};

// Keys [x, y) of entry e (whose first key row is at offset `at` of k, v, dk, dv) for groups n0 ..
// n0+na-1 of register block b, in chunks of kKeyChunk keys. mats: the blocks' Q^T, dO^T, dQ^T as
// backward_tile lays them out; pt, dst: score blocks of one chunk. Returns the pairs computed.
template <int NI>
int64_t backward_piece(const Lists& L, int64_t e, int64_t x, int64_t y, int64_t b, int n0, int na, const float* kb,
                       const float* vb, float* dkb, float* dvb, const TileRows& rows, int64_t D, float scale,
                       float* mats, float* pt, float* dst, Ahead& ahead_q, Ahead& ahead_do) {
  constexpr int RB = 16 * NI;
  const int64_t r0 = b * RB + 16 * n0, g0 = b * NI + n0;
  const float *q = rows.q + r0 * D, *dout = rows.dout + r0 * D, *lse2 = rows.lse2 + r0, *delta = rows.delta + r0;
  const float* qt = mats + b * 3 * D * RB + 16 * n0;
  const float* dot = qt + D * RB;
  float* dqt = mats + (b * 3 + 2) * D * RB + 16 * n0;
  pt += 16 * n0;
  dst += 16 * n0;
  for (int64_t lo = x; lo < y; lo += kKeyChunk) {
    const int64_t hi = std::min(lo + kKeyChunk, y), at = lo * D;
#define PDSL_CHUNK(NA) \
  backward_chunk<NA, RB>(L, e, lo, hi, g0, kb + at, vb + at, dkb + at, dvb + at, q, dout, lse2, delta, D, scale, qt, \
                         dot, dqt, pt, dst)
    if (na == NI) {
      PDSL_CHUNK(NI);
    } else if (na == 1) {
      PDSL_CHUNK(1);
    } else if constexpr (NI == 4) {
      if (na == 2)
        PDSL_CHUNK(2);
      else
        PDSL_CHUNK(3);
    }
#undef PDSL_CHUNK
    ahead_q.step(8);
    ahead_do.step(8);
  }
  return (y - x) * 16 * na;
}

// The backward of one query tile m of one (batch, head), a key tile at a time for all its blocks; each
// block's groups run over the stretches of keys they see, as pieces (cut_pieces). k, v, dk, dv: the
// (batch, head)'s keys and key gradients in plan order; stretches: mask_stretches of the call.
// Returns whether dQ is finite; adds the pairs computed to *pairs.
template <int NI>
bool backward_tile(const float* k, const float* v, float* dk, float* dv, int64_t D, const Lists& L,
                   const int32_t* stretches, int64_t m, float scale, float* w, Ahead ahead_q, Ahead ahead_do,
                   char* touched, const TileRows& rows, int64_t* pairs) {
  constexpr int RB = 16 * NI;
  const int64_t blocks = L.BM / RB, groups = L.BM / 16;
  float* pt = w;                          // [kKeyChunk][RB]
  float* dst = pt + kKeyChunk * RB;       // [kKeyChunk][RB]
  float* mats = dst + kKeyChunk * RB;     // [blocks][3][D][RB]: scaled Q^T, dO^T, dQ^T
  for (int64_t b = 0; b < blocks; ++b) {
    transpose_rows<NI>(rows.q + b * RB * D, D, scale * kLog2e, mats + b * 3 * D * RB);
    transpose_rows<NI>(rows.dout + b * RB * D, D, 1.0f, mats + (b * 3 + 1) * D * RB);
    std::fill(mats + (b * 3 + 2) * D * RB, mats + (b * 3 + 3) * D * RB, 0.0f);
  }
  const int32_t whole[2] = {0, (int32_t)L.BN};
  for (int64_t e = L.row_ptr[m]; e < L.row_ptr[m + 1]; ++e) {
    const int64_t key0 = (int64_t)L.ent_k[e] * L.BN, mk = L.ent_mask[e], at = key0 * D;
    if (!touched[L.ent_k[e]]) {
      // dK/dV come uninitialised: a key tile is zeroed when first reached (in cache, just before use).
      std::fill(dk + at, dk + at + L.BN * D, 0.0f);
      std::fill(dv + at, dv + at + L.BN * D, 0.0f);
      touched[L.ent_k[e]] = 1;
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const int32_t* iv[NI];
      int count[NI];
      for (int n = 0; n < NI; ++n) {
        const int32_t* rec = mk < 0 ? nullptr : stretches + (mk * groups + b * NI + n) * kStretchRecord;
        iv[n] = rec ? rec + 1 : whole;
        count[n] = rec ? rec[0] : 1;
      }
      cut_pieces<NI>(iv, count, [&](int64_t x, int64_t y, int n0, int na) {
        *pairs += backward_piece<NI>(L, e, x, y, b, n0, na, k + at, v + at, dk + at, dv + at, rows, D, scale, mats,
                                     pt, dst, ahead_q, ahead_do);
      });
    }
  }
  bool ok = true;
  for (int64_t b = 0; b < blocks; ++b) {
    const float* dqt = mats + (b * 3 + 2) * D * RB;
    ok &= all_finite(dqt, D * RB);
    if (rows.stream) {
      untranspose_rows<NI>(dqt, D, nullptr, rows.dq + b * RB * D);
    } else {
      for (int n = 0; n < NI; ++n)
        for (int64_t d = 0; d < D; d += 16)
          transpose16(dqt + d * RB + 16 * n, RB, _mm512_set1_ps(1.0f), rows.dq + (b * RB + 16 * n) * D + d, D);
    }
  }
  return ok;
}

// Where the backward reads its inputs and writes its gradients. Plan position p of a (batch, head)
// is source row q_rows[p] (k_rows[p] for keys; -1: a padding row of zeros); a null map is the identity
// (then the source has exactly the plan's padded length). The row statistics come either as lse2 and
// delta in plan order, or (out non-null) are computed here from out, lse and dlse (dlse may be null).
struct BackwardIO {
  const float *q, *k, *v, *dout;  // q, dout: [BH][Sq][D]; k, v: [BH][Sk][D]
  const float *lse2, *delta;      // [BH][Lq] (plan order), when out is null
  const float *out, *lse, *dlse;  // [BH][Sq][D], [BH][Sq], [BH][Sq] or null
  const int32_t *q_rows, *k_rows; // [Lq], [Lk] or null
  float *dq, *dk, *dv;            // dq [BH][Sq][D]; dk, dv [parts][BH][Sk][D]
  int64_t Sq, Sk;
};

// lse2 and delta of one source row (its dO and O rows, lse, dlse).
inline void row_stats(const float* dout, const float* out, float lse, float dlse, int64_t D, float* l2, float* dl) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(dout + d), _mm512_loadu_ps(out + d), acc);
  *dl = _mm512_reduce_add_ps(acc) - dlse;
  *l2 = lse == -std::numeric_limits<float>::infinity() ? std::numeric_limits<float>::infinity() : lse * kLog2e;
}

// One query tile's rows (gathered through q_rows when there is a map) and statistics; `own` holds
// [BM][D] Q, [BM][D] dO, [BM][D] dQ rows and [BM] lse2, [BM] delta for the tile.
inline TileRows tile_rows(const BackwardIO& io, int64_t bh, int64_t Lq, int64_t D, int64_t BM, int64_t m, float* own) {
  float *qo = own, *doo = own + BM * D, *dqo = own + 2 * BM * D, *l2 = own + 3 * BM * D, *dl = l2 + BM;
  const int64_t base = bh * io.Sq;
  if (!io.q_rows) {
    const int64_t row = base + m * BM;
    TileRows r{io.q + row * D, io.dout + row * D, nullptr, nullptr, io.dq + row * D, true};
    if (!io.out) {
      r.lse2 = io.lse2 + bh * Lq + m * BM;
      r.delta = io.delta + bh * Lq + m * BM;
      return r;
    }
    for (int64_t i = 0; i < BM; ++i)
      row_stats(io.dout + (row + i) * D, io.out + (row + i) * D, io.lse[row + i], io.dlse ? io.dlse[row + i] : 0.0f,
                D, l2 + i, dl + i);
    r.lse2 = l2;
    r.delta = dl;
    return r;
  }
  for (int64_t i = 0; i < BM; ++i) {
    const int32_t src = io.q_rows[m * BM + i];
    if (src < 0) {
      std::fill(qo + i * D, qo + (i + 1) * D, 0.0f);
      std::fill(doo + i * D, doo + (i + 1) * D, 0.0f);
      l2[i] = std::numeric_limits<float>::infinity();
      dl[i] = 0.0f;
      continue;
    }
    const int64_t row = base + src;
    std::memcpy(qo + i * D, io.q + row * D, D * sizeof(float));
    std::memcpy(doo + i * D, io.dout + row * D, D * sizeof(float));
    if (io.out)
      row_stats(io.dout + row * D, io.out + row * D, io.lse[row], io.dlse ? io.dlse[row] : 0.0f, D, l2 + i, dl + i);
    else {
      l2[i] = io.lse2[bh * Lq + m * BM + i];
      dl[i] = io.delta[bh * Lq + m * BM + i];
    }
  }
  return TileRows{qo, doo, l2, dl, dqo, false};
}

template <int NI>
void backward_impl(const BackwardIO& io, int64_t BH, int64_t Lq, int64_t Lk, int64_t D, const Lists& L,
                   int64_t n_q_tiles, int64_t parts, float scale, int threads, int* bad) {
  constexpr int RB = 16 * NI;
  const int64_t BM = L.BM, BN = L.BN, items = BH * parts;
  const std::vector<int32_t> stretches = mask_stretches(L, L.row_ptr[n_q_tiles]);
  int any_bad = 0;
  int64_t pairs = 0;
#pragma omp parallel num_threads(threads) reduction(| : any_bad) reduction(+ : pairs)
  {
    const Flush flush;
    Work work(2 * kKeyChunk * RB + 3 * BM * D + 3 * BM * D + 2 * BM);
    float* own = work.base + 2 * kKeyChunk * RB + 3 * BM * D;
    // With a key map: this (batch, head)'s K, V gathered into plan order and dK, dV accumulated
    // there, scattered to the source rows at the end.
    std::unique_ptr<float[]> keys(io.k_rows ? new float[4 * Lk * D] : nullptr);  // written before read
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      // Item (part, bh): query tiles part, part + parts, ...; its own dK/dV buffer when parts > 1.
      const int64_t part = it / BH, bh = it % BH;
      float* dk_out = io.dk + (part * BH + bh) * io.Sk * D;
      float* dv_out = io.dv + (part * BH + bh) * io.Sk * D;
      const float *kb = io.k + bh * io.Sk * D, *vb = io.v + bh * io.Sk * D;
      float *dkb = dk_out, *dvb = dv_out;
      if (io.k_rows) {
        float* kg = keys.get();
        float* vg = kg + Lk * D;
        dkb = vg + Lk * D;
        dvb = dkb + Lk * D;
        for (int64_t r = 0; r < Lk; ++r) {
          const int32_t src = io.k_rows[r];
          if (src < 0) {
            std::fill(kg + r * D, kg + (r + 1) * D, 0.0f);
            std::fill(vg + r * D, vg + (r + 1) * D, 0.0f);
          } else {
            std::memcpy(kg + r * D, kb + src * D, D * sizeof(float));
            std::memcpy(vg + r * D, vb + src * D, D * sizeof(float));
          }
        }
        kb = kg;
        vb = vg;
      }
      std::vector<char> touched(Lk / BN, 0);
      for (int64_t m = part; m < n_q_tiles; m += parts) {
        const TileRows rows = tile_rows(io, bh, Lq, D, BM, m, own);
        Ahead ahead_q{nullptr, 0}, ahead_do{nullptr, 0};
        if (!io.q_rows && m + parts < n_q_tiles) {
          const int64_t next = (bh * io.Sq + (m + parts) * BM) * D;
          ahead_q = Ahead{(const char*)(io.q + next), BM * D / 16};
          ahead_do = Ahead{(const char*)(io.dout + next), BM * D / 16};
        }
        if (!backward_tile<NI>(kb, vb, dkb, dvb, D, L, stretches.data(), m, scale, work.base, ahead_q, ahead_do,
                               touched.data(), rows, &pairs))
          any_bad = 1;
        if (io.q_rows)
          for (int64_t i = 0; i < BM; ++i) {
            const int32_t src = io.q_rows[m * BM + i];
            if (src >= 0) std::memcpy(io.dq + (bh * io.Sq + src) * D, rows.dq + i * D, D * sizeof(float));
          }
      }
      if (io.k_rows) {
        for (int64_t r = 0; r < Lk; ++r) {
          const int32_t src = io.k_rows[r];
          if (src < 0) continue;
          float *dko = dk_out + src * D, *dvo = dv_out + src * D;
          if (!touched[r / BN]) {
            std::fill(dko, dko + D, 0.0f);
            std::fill(dvo, dvo + D, 0.0f);
            continue;
          }
          std::memcpy(dko, dkb + r * D, D * sizeof(float));
          std::memcpy(dvo, dvb + r * D, D * sizeof(float));
          if (!all_finite(dko, D) || !all_finite(dvo, D)) any_bad = 1;
        }
        continue;
      }
      for (int64_t t = 0; t < Lk / BN; ++t) {
        if (touched[t]) {
          if (!all_finite(dkb + t * BN * D, BN * D) || !all_finite(dvb + t * BN * D, BN * D)) any_bad = 1;
          continue;
        }
        std::fill(dkb + t * BN * D, dkb + (t + 1) * BN * D, 0.0f);
        std::fill(dvb + t * BN * D, dvb + (t + 1) * BN * D, 0.0f);
      }
    }
  }
  *bad = any_bad;
  backward_pairs_total += pairs;
}

}  // namespace

extern "C" {

int pdsl_native_version() { return 1; }

// Query x key pairs the backward's chunks computed since the library was loaded (every (batch, head)).
int64_t pdsl_backward_pairs() { return backward_pairs_total; }

// Forward: o [BH, Lq, D] and lse [BH, Lq] (natural log) for every row of every query tile; lse is NaN
// on every row whose output is not finite. *bad is set to 1 when some lse is NaN (or +inf), else 0, so
// the caller needs no pass over either (a parallel reduction waits on a descheduled thread).
int pdsl_forward(const float* q, const float* k, const float* v, float* o, float* lse, int64_t BH, int64_t Lq,
                 int64_t Lk, int64_t D, int64_t BM, int64_t BN, const int64_t* row_ptr, const int32_t* ent_k,
                 const int32_t* ent_mask, const uint16_t* masks, int64_t n_q_tiles, float scale, int64_t rows,
                 int threads, int* bad) {
  if (D % 16 || BM % rows || rows % 16) return 1;
  const Lists L{row_ptr, ent_k, ent_mask, masks, BM, BN};
  if (rows == 16)
    forward_impl<1>(q, k, v, o, lse, BH, Lq, Lk, D, L, n_q_tiles, scale, threads, bad);
  else if (rows == 32)
    forward_impl<2>(q, k, v, o, lse, BH, Lq, Lk, D, L, n_q_tiles, scale, threads, bad);
  else if (rows == 64)
    forward_impl<4>(q, k, v, o, lse, BH, Lq, Lk, D, L, n_q_tiles, scale, threads, bad);
  else
    return 2;
  return 0;
}

// Backward: dq [BH, Sq, D] written for every row; dk, dv [parts, BH, Sk, D] written (each key tile
// zeroed when first reached, then accumulated in place; Lq, Lk whole tiles). Plan position p of a
// (batch, head) reads source row q_rows[p] / k_rows[p] (-1: padding; null maps: the identity, Sq = Lq,
// Sk = Lk). With out null the row statistics come as lse2 (lse * log2 e, +inf on rows with no allowed
// key) and delta (rowsum(dO * O) - dlse), [BH, Lq] in plan order; otherwise they are computed from
// out [BH, Sq, D], lse [BH, Sq] (natural log) and dlse [BH, Sq] (null: zero). *bad is set to 1 when
// some gradient is NaN or infinite, else 0.
int pdsl_backward(const float* q, const float* k, const float* v, const float* dout, const float* lse2,
                  const float* delta, const float* out, const float* lse, const float* dlse, const int32_t* q_rows,
                  const int32_t* k_rows, float* dq, float* dk, float* dv, int64_t BH, int64_t Lq, int64_t Lk,
                  int64_t Sq, int64_t Sk, int64_t D, int64_t BM, int64_t BN, const int64_t* row_ptr,
                  const int32_t* ent_k, const int32_t* ent_mask, const uint16_t* masks, int64_t n_q_tiles,
                  int64_t parts, float scale, int64_t rows, int threads, int* bad) {
  if (D % 16 || BM % rows || rows % 16 || parts < 1 || Lq != n_q_tiles * BM || Lk % BN) return 1;
  if ((!q_rows && Sq != Lq) || (!k_rows && Sk != Lk) || (!out && !(lse2 && delta))) return 1;
  for (float* x : {dq, dk, dv})
    prefer_huge_pages(x, (size_t)((x == dq ? BH * Sq : parts * BH * Sk) * D) * sizeof(float));
  const Lists L{row_ptr, ent_k, ent_mask, masks, BM, BN};
  const BackwardIO io{q, k, v, dout, lse2, delta, out, lse, dlse, q_rows, k_rows, dq, dk, dv, Sq, Sk};
  if (rows == 16)
    backward_impl<1>(io, BH, Lq, Lk, D, L, n_q_tiles, parts, scale, threads, bad);
  else if (rows == 32)
    backward_impl<2>(io, BH, Lq, Lk, D, L, n_q_tiles, parts, scale, threads, bad);
  else if (rows == 64)
    backward_impl<4>(io, BH, Lq, Lk, D, L, n_q_tiles, parts, scale, threads, bad);
  else
    return 2;
  return 0;
}

}  // extern "C"
