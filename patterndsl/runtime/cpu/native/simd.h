// patterndsl native CPU kernels: AVX-512 helpers shared by attention.cpp and decode.cpp.
#pragma once

#include <immintrin.h>

namespace pdsl_simd {

// 2^x, x <= 0 (any finite value; -inf gives NaN, selected out by the callers): 2^frac * 2^floor.
// Degree-5 polynomial on [0, 1): relative error 3.1e-7 (checked against float64 in the tests).
inline __m512 exp2_ps(__m512 x) {
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // x - floor(x)
  __m512 p = _mm512_set1_ps(0.0018265516264364123f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.009106988087296486f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.055732376873493195f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24018388986587524f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931496858596802f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, x);  // p * 2^floor(x)
}

}  // namespace pdsl_simd
