// Activation quantization for the int8 matmuls (W8A8): float32 -> uint8 in one pass, and the
// per-row epilogue that turns the int32 dot products back into float32.
//
// Rounding is round-half-to-even (vcvtps2dq under the default MXCSR mode), the same as torch.round,
// so Python references reproduce these codes exactly:  q = clamp(round(x * inv_scale) + zero, 0, 255).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace lowbit {

// Smallest step we allow: a row of zeros (or denormals) gets this scale instead of 0 or inf.
constexpr float kMinStep = 1e-12f;

// Row minimum and maximum, both including 0; returns false when the row holds a NaN or an infinity
// (min/max instructions drop NaNs, so they are looked for separately).
inline bool row_min_max(const float* x, int64_t k, float& lo, float& hi) {
  __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();  // 0 is always in range
  __m256 vnan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  bool finite = _mm256_movemask_ps(vnan) == 0;
  alignas(32) float a[8], b[8];
  _mm256_store_ps(a, vlo);
  _mm256_store_ps(b, vhi);
  lo = 0.f;
  hi = 0.f;
  for (int j = 0; j < 8; ++j) {
    lo = std::min(lo, a[j]);
    hi = std::max(hi, b[j]);
  }
  for (; i < k; ++i) {
    finite = finite && !std::isnan(x[i]);
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  return finite && std::isfinite(lo) && std::isfinite(hi);
}

// q[i] = clamp(round(x[i] * inv) + zero, 0, 255) for i < n.
inline void quantize_span_u8(const float* x, int64_t n, float inv, int32_t zero, uint8_t* q) {
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i vz = _mm256_set1_epi32(zero);
  const __m256i v0 = _mm256_setzero_si256(), v255 = _mm256_set1_epi32(255);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i r[4];
    for (int j = 0; j < 4; ++j) {
      __m256i c = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), vinv)), vz);
      r[j] = _mm256_min_epi32(_mm256_max_epi32(c, v0), v255);
    }
    // Saturating packs keep the values (already in 0..255) and interleave 128-bit lanes; the
    // permute restores element order.
    const __m256i p16a = _mm256_packs_epi32(r[0], r[1]);
    const __m256i p16b = _mm256_packs_epi32(r[2], r[3]);
    const __m256i p8 = _mm256_packus_epi16(p16a, p16b);
    const __m256i ordered = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), ordered);
  }
  for (; i < n; ++i) {
    const int32_t c = static_cast<int32_t>(std::nearbyint(x[i] * inv)) + zero;
    q[i] = static_cast<uint8_t>(std::min(255, std::max(0, c)));
  }
}

// Asymmetric per-row parameters covering [min(row, 0), max(row, 0)] with 256 levels.
inline void row_params_u8(float lo, float hi, float& scale, float& inv, int32_t& zero) {
  scale = std::max((hi - lo) / 255.f, kMinStep);
  inv = 1.f / scale;
  const float z = std::nearbyint(-lo * inv);
  zero = static_cast<int32_t>(std::min(255.f, std::max(0.f, z)));
}

// y[m, n] = y[m, n] * sx[m] - sxz[m] * csw[n] + bias[n]  (bias may be null), rows [r0, r1).
inline void row_epilogue(float* y, int64_t ldy, int64_t ncol, const float* sx, const float* sxz,
                         const float* csw, const float* bias, int64_t r0, int64_t r1) {
  for (int64_t m = r0; m < r1; ++m) {
    float* row = y + m * ldy;
    const __m256 a = _mm256_set1_ps(sx[m]), b = _mm256_set1_ps(-sxz[m]);
    int64_t n = 0;
    for (; n + 8 <= ncol; n += 8) {
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(row + n), a);
      v = _mm256_fmadd_ps(b, _mm256_loadu_ps(csw + n), v);
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
      _mm256_storeu_ps(row + n, v);
    }
    for (; n < ncol; ++n) {
      float v = std::fma(-sxz[m], csw[n], row[n] * sx[m]);
      if (bias) v += bias[n];
      row[n] = v;
    }
  }
}

// e^x for x <= 0 (8 lanes): 2^round(x log2 e) times a degree-6 polynomial of the remainder (relative error
// about 1e-7); below -87 the result is 0.
inline __m256 exp_neg_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.6931471805599453f));
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// GELU with the exact erf form, x * (1 + erf(x / sqrt 2)) / 2, in place. erf by Abramowitz and Stegun 7.1.26
// (absolute error below 1.5e-7), so the result is within about 1e-7 |x| of torch's gelu.
inline void gelu_inplace(float* x, int64_t n) {
  const __m256 rs2 = _mm256_set1_ps(0.7071067811865476f), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f);
  const __m256 p = _mm256_set1_ps(0.3275911f), sign = _mm256_set1_ps(-0.f);
  const __m256 a1 = _mm256_set1_ps(0.254829592f), a2 = _mm256_set1_ps(-0.284496736f),
               a3 = _mm256_set1_ps(1.421413741f), a4 = _mm256_set1_ps(-1.453152027f),
               a5 = _mm256_set1_ps(1.061405429f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 z = _mm256_mul_ps(v, rs2);
    const __m256 az = _mm256_andnot_ps(sign, z);
    // t = 1 / (1 + p|z|) by the approximate reciprocal and one Newton step (relative error ~1e-7, well
    // inside the formula's own): a division costs several times more here.
    const __m256 den = _mm256_fmadd_ps(p, az, one);
    __m256 t = _mm256_rcp_ps(den);
    t = _mm256_mul_ps(t, _mm256_fnmadd_ps(den, t, _mm256_set1_ps(2.f)));
    __m256 poly = _mm256_fmadd_ps(a5, t, a4);
    poly = _mm256_fmadd_ps(poly, t, a3);
    poly = _mm256_fmadd_ps(poly, t, a2);
    poly = _mm256_fmadd_ps(poly, t, a1);
    poly = _mm256_mul_ps(poly, t);
    const __m256 e = exp_neg_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), az), az));
    const __m256 erf_abs = _mm256_fnmadd_ps(poly, e, one);               // 1 - poly * e^(-z^2)
    const __m256 erf = _mm256_or_ps(erf_abs, _mm256_and_ps(sign, z));    // sign of z
    _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, erf)));
  }
  for (; i < n; ++i) x[i] = 0.5f * x[i] * (1.f + std::erf(x[i] * 0.7071067811865476f));
}

}  // namespace lowbit

namespace lowbit {

// The codes of quantize_span_u8 shifted to int8 (q - 128), for int8 x int8 matmuls: the same rounding,
// so q_s8 = q_u8 - 128 exactly, and sum_k q_u8 * w = sum_k q_s8 * w + 128 * sum_k w.
inline void quantize_span_s8(const float* x, int64_t n, float inv, int32_t zero, int8_t* q) {
  uint8_t* u = reinterpret_cast<uint8_t*>(q);
  quantize_span_u8(x, n, inv, zero, u);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));  // u ^ 0x80 == u - 128 as int8
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i* p = reinterpret_cast<__m256i*>(u + i);
    _mm256_storeu_si256(p, _mm256_xor_si256(_mm256_loadu_si256(p), flip));
  }
  for (; i < n; ++i) u[i] ^= 0x80;
}

// y[m, n] = acc[m, n] * (sx[m] * sw[n]) + sxc[m] * csw[n] + bias[n], relu optional, rows [r0, r1):
// the float output of an int8 x int8 matmul whose activations were quantized per row (sxc[m] =
// sx[m] * (128 - zero[m]), csw[n] = sw[n] * sum_k w[n, k]). Every product and sum is rounded on its own,
// in this order (no fused multiply-add): the same bits as those steps in float32 torch ops, which is
// what a traced or exported graph of the layer computes (ops.int_row_epilogue_traceable).
__attribute__((optimize("fp-contract=off")))
inline void int_row_epilogue(const int32_t* acc, int64_t lda, float* y, int64_t ldy, int64_t ncol,
                             const float* sx, const float* sxc, const float* sw, const float* csw,
                             const float* bias, bool relu, int64_t r0, int64_t r1) {
  for (int64_t m = r0; m < r1; ++m) {
    const int32_t* a = acc + m * lda;
    float* row = y + m * ldy;
    const __m256 vs = _mm256_set1_ps(sx[m]), vc = _mm256_set1_ps(sxc[m]), zero = _mm256_setzero_ps();
    int64_t n = 0;
    for (; n + 8 <= ncol; n += 8) {
      const __m256 s = _mm256_mul_ps(vs, _mm256_loadu_ps(sw + n));
      const __m256 v0 = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + n)));
      __m256 v = _mm256_add_ps(_mm256_mul_ps(v0, s), _mm256_mul_ps(vc, _mm256_loadu_ps(csw + n)));
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
      if (relu) v = _mm256_max_ps(v, zero);
      _mm256_storeu_ps(row + n, v);
    }
    for (; n < ncol; ++n) {
      const float s = sx[m] * sw[n];
      const float p = static_cast<float>(a[n]) * s;
      const float c = sxc[m] * csw[n];
      float v = p + c;
      if (bias) v += bias[n];
      row[n] = relu ? std::max(v, 0.f) : v;
    }
  }
}

}  // namespace lowbit
