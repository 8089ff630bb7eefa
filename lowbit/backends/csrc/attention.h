// Attention with bf16 matmuls: softmax(Q K^T * scale + mask) V for float32 Q, K, V, on AVX-512 BF16
// (`vdpbf16ps`: pairs of bf16 products summed into float32 lanes, twice the multiply-adds of an fp32 FMA).
//
// What is rounded: Q (times scale), K, V and the softmax's unnormalized probabilities P are rounded to
// bf16 (round to nearest even); scores, the running max and sum, and the output accumulate in float32.
// The softmax is the streaming one (flash attention's): keys are taken KB at a time, each block's
// exponentials rescaled when a later block raises the row's max, so any key length runs in fixed memory.
//
// Layouts (per batch and key/value head, built once per call and shared by the query heads of a group):
//   K: blocks of 16 keys, each [D/2 pairs][16 keys][2]: one zmm holds one pair of columns of 16 keys, the
//      operand `vdpbf16ps` multiplies by a broadcast pair of query values;
//   V: [key pairs][D][2]: one zmm holds 16 columns of two consecutive keys, multiplied by a broadcast pair
//      of probabilities.
// Keys are padded with zeros to a multiple of 32 (their scores are set to -inf).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

namespace lowbit {
namespace attn {

constexpr int64_t QB = 64;    // query rows per task
constexpr int64_t KB = 256;   // keys per softmax block
constexpr int64_t RT = 8;     // query rows per register tile
constexpr int64_t KPAD = 32;  // keys are padded to a multiple of this
constexpr float kLog2e = 1.4426950408889634f;

struct Shape {
  int64_t B, H, Hkv, Sq, Sk, D, SkP;
};

inline bool cpu_has_bf16_path() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

}  // namespace attn
}  // namespace lowbit

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lowbit {
namespace avx512 {
namespace attn {

using namespace lowbit::attn;

// 2^x for x <= 0 (and -inf): 2^round(x) times a degree-6 polynomial for 2^f, |f| <= 0.5 (relative error
// about 1e-7); below -150 the result is exactly 0.
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.6931471805599453f));  // f ln 2
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 16 float32 -> 16 bf16 (round to nearest even), stored at dst.
inline void store_bf16(uint16_t* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

// Software prefetch of `n` rows of `d` floats, `stride` apart (strided rows of a [B, S, H, D] tensor: the
// hardware prefetcher follows them one miss at a time).
inline void prefetch_rows(const float* p, int64_t stride, int64_t n, int64_t d) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < d; c += 16) _mm_prefetch(reinterpret_cast<const char*>(p + r * stride + c), _MM_HINT_T0);
}

// K and V of one (batch, kv head) into the layouts above. tmp: SkP * D bf16 of scratch.
inline void pack_kv(const Shape& S, const float* k, int64_t ks, const float* v, int64_t vs, uint16_t* kp,
                    uint16_t* vp, uint16_t* tmp) {
  const int64_t D = S.D, Sk = S.Sk, SkP = S.SkP;
  // Rows of another head lie between consecutive rows: ask for all of them at once.
  prefetch_rows(k, ks, Sk, D);
  prefetch_rows(v, vs, Sk, D);
  // K rows in bf16, then each 16-key block's pairs gathered column by column.
  for (int64_t j = 0; j < SkP; ++j) {
    uint16_t* t = tmp + j * D;
    if (j < Sk)
      for (int64_t d = 0; d < D; d += 16) store_bf16(t + d, _mm512_loadu_ps(k + j * ks + d));
    else
      std::memset(t, 0, D * sizeof(uint16_t));
  }
  const uint32_t* t32 = reinterpret_cast<const uint32_t*>(tmp);
  uint32_t* k32 = reinterpret_cast<uint32_t*>(kp);
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32((int)(D / 2)));
  for (int64_t j0 = 0; j0 < SkP; j0 += 16)
    for (int64_t p = 0; p < D / 2; ++p) {
      const __m512i g = _mm512_i32gather_epi32(rows, t32 + j0 * (D / 2) + p, 4);
      _mm512_storeu_si512(k32 + (j0 / 16) * 16 * (D / 2) + p * 16, g);
    }
  // V: rows 2i and 2i+1 interleaved element by element.
  const __m512i inter = _mm512_setr_epi32(0x00100000, 0x00110001, 0x00120002, 0x00130003, 0x00140004, 0x00150005,
                                          0x00160006, 0x00170007, 0x00180008, 0x00190009, 0x001a000a, 0x001b000b,
                                          0x001c000c, 0x001d000d, 0x001e000e, 0x001f000f);
  for (int64_t j = 0; j < SkP; j += 2) {
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 a = j < Sk ? _mm512_loadu_ps(v + j * vs + d) : _mm512_setzero_ps();
      const __m512 b = j + 1 < Sk ? _mm512_loadu_ps(v + (j + 1) * vs + d) : _mm512_setzero_ps();
      // cvtne2ps: the second operand's values land in the low half.
      const __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(b, a);
      _mm512_storeu_si512(vp + (j / 2) * D * 2 + d * 2, _mm512_permutexvar_epi16(inter, ab));
    }
  }
}

// Scores of RT query rows (bf16 pairs, row stride D/2 dwords) against 32 keys starting at a 16-key block.
inline void scores_tile(const uint32_t* q, int64_t D, const uint16_t* kblk, float* s, int64_t lds) {
  __m512 acc[RT][2];
  for (int r = 0; r < RT; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const uint16_t* k1 = kblk + 16 * D;
  for (int64_t p = 0; p < D / 2; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(kblk + p * 32);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(k1 + p * 32);
    for (int r = 0; r < RT; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)q[r * (D / 2) + p]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  for (int r = 0; r < RT; ++r) {
    _mm512_storeu_ps(s + r * lds, acc[r][0]);
    _mm512_storeu_ps(s + r * lds + 16, acc[r][1]);
  }
}

// o[RT rows][NV*16 columns] += P[RT rows][kn keys] V[kn keys][those columns]; P as bf16 pairs.
template <int NV>
inline void pv_tile(const uint32_t* p, int64_t ldp, const uint16_t* vcol, int64_t D, int64_t npairs, float* o,
                    int64_t ldo) {
  __m512 acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(o + r * ldo + c * 16);
  for (int64_t jp = 0; jp < npairs; ++jp) {
    __m512bh b[NV];
    for (int c = 0; c < NV; ++c) b[c] = (__m512bh)_mm512_loadu_si512(vcol + jp * D * 2 + c * 32);
    for (int r = 0; r < RT; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)p[r * ldp + jp]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * ldo + c * 16, acc[r][c]);
}

struct Args {
  Shape S;
  const float* q;
  int64_t qs[3];  // strides of batch, head, row (columns contiguous)
  const float* mask;  // additive, or nullptr
  int64_t ms[3];      // its strides of batch, head, row (0 where broadcast; columns contiguous)
  float scale;
  bool causal;
  float* out;  // [B, Sq, H, D]
};

// One task: query rows [i0, i0 + QB) of head h of batch b.
// kp, vp: the packed K and V of head h's kv head in batch b.
struct Scratch {
  std::vector<uint32_t> q, p;
  std::vector<float> s, o;
  explicit Scratch(int64_t D) : q((size_t)(QB * D / 2)), p((size_t)(QB * KB / 2)), s((size_t)(QB * KB)),
                                o((size_t)(QB * D)) {}
};

inline void attend_block(const Args& A, int64_t b, int64_t h, int64_t i0, const uint16_t* kp, const uint16_t* vp,
                         Scratch& sc) {
  const Shape& S = A.S;
  const int64_t D = S.D, SkP = S.SkP, hp = D / 2;
  const int64_t rows = std::min(QB, S.Sq - i0);
  const int64_t rowsP = (rows + RT - 1) / RT * RT;
  std::vector<uint32_t>& qbuf = sc.q;
  std::vector<float>& sbuf = sc.s;
  std::vector<uint32_t>& pbuf = sc.p;
  std::vector<float>& obuf = sc.o;

  // Q rows times scale * log2(e) (exponentials in base 2), bf16.
  const __m512 qscale = _mm512_set1_ps(A.scale * kLog2e);
  uint16_t* q16 = reinterpret_cast<uint16_t*>(qbuf.data());
  prefetch_rows(A.q + b * A.qs[0] + h * A.qs[1] + i0 * A.qs[2], A.qs[2], rows, D);
  for (int64_t r = 0; r < rowsP; ++r) {
    if (r < rows) {
      const float* qr = A.q + b * A.qs[0] + h * A.qs[1] + (i0 + r) * A.qs[2];
      for (int64_t d = 0; d < D; d += 16) store_bf16(q16 + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(qr + d), qscale));
    } else {
      std::memset(q16 + r * D, 0, D * sizeof(uint16_t));
    }
  }
  float m[QB], l[QB];
  for (int64_t r = 0; r < rowsP; ++r) m[r] = -std::numeric_limits<float>::infinity(), l[r] = 0.f;
  std::fill(obuf.begin(), obuf.begin() + rowsP * D, 0.f);

  // Causal (top-left aligned, as torch's is_causal): row i sees keys 0..i.
  const int64_t kend = A.causal ? std::min(SkP, (i0 + rows + KPAD - 1) / KPAD * KPAD) : SkP;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 l2e = _mm512_set1_ps(kLog2e);
  const __m512 floor = _mm512_set1_ps(-1e30f);
  for (int64_t k0 = 0; k0 < kend; k0 += KB) {
    const int64_t kn = std::min(KB, kend - k0);  // a multiple of 32
    for (int64_t r0 = 0; r0 < rowsP; r0 += RT)
      for (int64_t c0 = 0; c0 < kn; c0 += 32)
        scores_tile(qbuf.data() + r0 * hp, D, kp + (k0 + c0) * D, sbuf.data() + r0 * KB + c0, KB);
    // Softmax step per row: mask, new max, rescale what came before, P in bf16.
    for (int64_t r = 0; r < rowsP; ++r) {
      float* s = sbuf.data() + r * KB;
      uint16_t* p16 = reinterpret_cast<uint16_t*>(pbuf.data() + r * (KB / 2));
      if (r >= rows) {
        std::memset(p16, 0, kn * sizeof(uint16_t));
        continue;
      }
      const int64_t i = i0 + r;
      const int64_t lim = std::min(S.Sk, A.causal ? i + 1 : S.Sk);  // keys [0, lim) are seen
      const float* mk = A.mask ? A.mask + b * A.ms[0] + h * A.ms[1] + i * A.ms[2] : nullptr;
      // Vectors [0, full) are wholly seen and, without a mask, taken as they are.
      const int64_t full = mk ? 0 : std::max<int64_t>(0, std::min<int64_t>(kn, lim - k0)) / 16 * 16;
      __m512 vmax0 = ninf, vmax1 = ninf;
      int64_t c = 0;
      for (; c + 32 <= full; c += 32) {
        vmax0 = _mm512_max_ps(vmax0, _mm512_loadu_ps(s + c));
        vmax1 = _mm512_max_ps(vmax1, _mm512_loadu_ps(s + c + 16));
      }
      for (; c < kn; c += 16) {
        __m512 x = _mm512_loadu_ps(s + c);
        if (c >= full) {
          const int64_t j = k0 + c;
          const __mmask16 valid = _mm512_cmplt_epi32_mask(
              lane, _mm512_set1_epi32((int)std::max<int64_t>(0, std::min<int64_t>(16, lim - j))));
          // Finite mask values clamped at -1e30: transformers' finfo.min would overflow to -inf once
          // scaled. As in torch's SDPA, a row masked everywhere by finite values gets uniform weights and
          // one masked everywhere by -inf gives 0.
          if (mk && valid) {
            const __m512 mv = _mm512_maskz_loadu_ps(valid, mk + j);
            const __m512 mc =
                _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mv, ninf, _CMP_EQ_OQ), _mm512_max_ps(mv, floor), ninf);
            x = _mm512_fmadd_ps(mc, l2e, x);
          }
          x = _mm512_mask_blend_ps(valid, ninf, x);
          _mm512_storeu_ps(s + c, x);
        }
        vmax0 = _mm512_max_ps(vmax0, x);
      }
      const float mnew = std::max(m[r], _mm512_reduce_max_ps(_mm512_max_ps(vmax0, vmax1)));
      if (mnew == -std::numeric_limits<float>::infinity()) {  // nothing seen yet: P = 0
        std::memset(p16, 0, kn * sizeof(uint16_t));
        continue;
      }
      // The earlier blocks' weights shrink by 2^(old max - new max); none on a row's first block.
      const float corr = m[r] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp2(m[r] - mnew);
      m[r] = mnew;
      const __m512 vm = _mm512_set1_ps(mnew);
      __m512 vsum0 = _mm512_setzero_ps(), vsum1 = _mm512_setzero_ps();
      for (c = 0; c + 32 <= kn; c += 32) {
        const __m512 e0 = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s + c), vm));
        const __m512 e1 = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s + c + 16), vm));
        vsum0 = _mm512_add_ps(vsum0, e0);
        vsum1 = _mm512_add_ps(vsum1, e1);
        _mm512_storeu_si512(p16 + c, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
      }
      const __m512 vsum = _mm512_add_ps(vsum0, vsum1);
      l[r] = l[r] * corr + _mm512_reduce_add_ps(vsum);
      if (corr != 1.f) {
        float* o = obuf.data() + r * D;
        const __m512 vc = _mm512_set1_ps(corr);
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), vc));
      }
    }
    // O += P V for this block of keys.
    const uint16_t* vblk = vp + (k0 / 2) * D * 2;
    for (int64_t r0 = 0; r0 < rowsP; r0 += RT) {
      int64_t d = 0;
      for (; d + 32 <= D; d += 32)
        pv_tile<2>(pbuf.data() + r0 * (KB / 2), KB / 2, vblk + d * 2, D, kn / 2, obuf.data() + r0 * D + d, D);
      if (d < D) pv_tile<1>(pbuf.data() + r0 * (KB / 2), KB / 2, vblk + d * 2, D, kn / 2, obuf.data() + r0 * D + d, D);
    }
  }
  // Normalize; a row that saw no key (all masked) is 0.
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = A.out + ((b * S.Sq + i0 + r) * S.H + h) * D;
    const __m512 inv = _mm512_set1_ps(l[r] > 0.f ? 1.f / l[r] : 0.f);
    const float* o = obuf.data() + r * D;
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), inv));
  }
}

inline void run(const Args& A, const float* k, const int64_t* kst, const float* v, const int64_t* vst) {
  const Shape& S = A.S;
  const int64_t D = S.D, SkP = S.SkP, per = S.H / S.Hkv;
  const int64_t nq = (S.Sq + QB - 1) / QB;
  const int64_t groups = S.B * S.Hkv;
  auto pack = [&](int64_t t, uint16_t* kp, uint16_t* vp, uint16_t* tmp) {
    const int64_t b = t / S.Hkv, g = t % S.Hkv;
    pack_kv(S, k + b * kst[0] + g * kst[1], kst[2], v + b * vst[0] + g * vst[1], vst[2], kp, vp, tmp);
  };
  if (groups >= 2 * at::get_num_threads()) {
    // Enough (batch, kv head) pairs for every thread: each packs one pair's K and V and runs all its query
    // heads and rows while the packed copy is still in its cache.
    at::parallel_for(0, groups, 1, [&](int64_t t0, int64_t t1) {
      std::vector<uint16_t> kv((size_t)(3 * SkP * D));
      Scratch sc(D);
      for (int64_t t = t0; t < t1; ++t) {
        pack(t, kv.data(), kv.data() + SkP * D, kv.data() + 2 * SkP * D);
        const int64_t b = t / S.Hkv, g = t % S.Hkv;
        for (int64_t h = g * per; h < (g + 1) * per; ++h)
          for (int64_t qi = 0; qi < nq; ++qi) attend_block(A, b, h, qi * QB, kv.data(), kv.data() + SkP * D, sc);
      }
    });
    return;
  }
  // Few pairs (one sequence, few kv heads): pack them all first, then share out blocks of query rows.
  // The packed copies are kept by the calling thread for its next call: fresh pages for a few MB each call
  // cost more page faults than the packing itself.
  thread_local std::vector<uint16_t> buf;
  const size_t n = (size_t)(groups * SkP * D);
  if (buf.size() < 2 * n) buf.resize(2 * n);
  uint16_t* kp = buf.data();
  uint16_t* vp = buf.data() + n;
  at::parallel_for(0, groups, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint16_t> tmp((size_t)(SkP * D));
    for (int64_t t = t0; t < t1; ++t) pack(t, kp + t * SkP * D, vp + t * SkP * D, tmp.data());
  });
  at::parallel_for(0, S.B * S.H * nq, 1, [&](int64_t t0, int64_t t1) {
    Scratch sc(D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nq, qi = t % nq;
      const int64_t b = bh / S.H, h = bh % S.H, pair = b * S.Hkv + h / per;
      attend_block(A, b, h, qi * QB, kp + pair * SkP * D, vp + pair * SkP * D, sc);
    }
  });
}

}  // namespace attn
}  // namespace avx512
}  // namespace lowbit

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
