// AVX-512 pieces shared by the fused CPU ops' AVX-512 paths (message_passing_cpu_avx512.cpp,
// lattice_message_cpu_avx512.cpp): one vector type per dtype (16 floats or 8 doubles) with masked
// loads/stores for the last, partial block of channels, and exp. Every function carries
// E3CPU_AVX512 (fused_cpu.h); include this header only in files whose callers check
// e3rg::cpu_simd_avx512().
#pragma once

#include "fused_cpu.h"

#ifdef E3CPU_AVX512_PATH
#include <immintrin.h>

namespace e3cpu {

template <class T>
struct Vec;

template <>
struct Vec<float> {
  using V = __m512;
  using M = __mmask16;
  static constexpr int kLanes = 16;
  E3CPU_AVX512 static M mask(int64_t n) { return n >= 16 ? (M)0xFFFF : (M)((1u << n) - 1); }
  E3CPU_AVX512 static V zero() { return _mm512_setzero_ps(); }
  E3CPU_AVX512 static V set1(float a) { return _mm512_set1_ps(a); }
  E3CPU_AVX512 static V load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  E3CPU_AVX512 static void store(float* p, V v, M m) { _mm512_mask_storeu_ps(p, m, v); }
  E3CPU_AVX512 static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  E3CPU_AVX512 static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  E3CPU_AVX512 static V add(V a, V b) { return _mm512_add_ps(a, b); }
  E3CPU_AVX512 static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  // exp of x <= 0 (NaN propagates): x = n ln2 + r, |r| <= ln2/2, e^r by its Taylor polynomial to
  // r^7 (truncation 5e-9 relative, below float rounding), scaled by 2^n (vscalefps). x is clamped
  // at kExpFloor: a subnormal or underflowing result costs a microcode assist of ~100 cycles per
  // instruction (without flush-to-zero, which would change the caller's floating-point state), and
  // a Gaussian that small (the centres 14 spacings from x at the ends of the range, or far ones in
  // exact mode) weighs nothing: e^-80 = 2e-35 instead of less.
  static constexpr float kExpFloor = -80.0f;
  E3CPU_AVX512 static V exp(V x) {
    x = _mm512_max_ps(_mm512_set1_ps(kExpFloor), x);  // NaN is the second operand: it propagates
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    V p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
  }
};

template <>
struct Vec<double> {
  using V = __m512d;
  using M = __mmask8;
  static constexpr int kLanes = 8;
  E3CPU_AVX512 static M mask(int64_t n) { return n >= 8 ? (M)0xFF : (M)((1u << n) - 1); }
  E3CPU_AVX512 static V zero() { return _mm512_setzero_pd(); }
  E3CPU_AVX512 static V set1(double a) { return _mm512_set1_pd(a); }
  E3CPU_AVX512 static V load(const double* p, M m) { return _mm512_maskz_loadu_pd(m, p); }
  E3CPU_AVX512 static void store(double* p, V v, M m) { _mm512_mask_storeu_pd(p, m, v); }
  E3CPU_AVX512 static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  E3CPU_AVX512 static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  E3CPU_AVX512 static V add(V a, V b) { return _mm512_add_pd(a, b); }
  E3CPU_AVX512 static V sub(V a, V b) { return _mm512_sub_pd(a, b); }
  // As the float exp, with ln2 split in two doubles and the Taylor polynomial to r^13 (truncation
  // 2e-17 relative); e^-700 = 1e-304 is still a normal double.
  static constexpr double kExpFloor = -700.0;
  E3CPU_AVX512 static V exp(V x) {
    x = _mm512_max_pd(_mm512_set1_pd(kExpFloor), x);
    const V n = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(1.4426950408889634074)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_pd(n, _mm512_set1_pd(6.93147180369123816490e-01), x);
    r = _mm512_fnmadd_pd(n, _mm512_set1_pd(1.90821492927058770002e-10), r);
    double c = 1.0;
    for (int k = 2; k <= 13; ++k) c /= k;  // 1/13!
    V p = _mm512_set1_pd(c);
    for (int k = 13; k >= 1; --k) {  // Horner: p = 1/(k-1)! + r p
      c *= k;
      p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(c));
    }
    return _mm512_scalef_pd(p, n);
  }
};

}  // namespace e3cpu

#endif  // E3CPU_AVX512_PATH
