// lowbit._C: torch binding of the low-bit matmul in kernels.h (AVX2/FMA) and kernels_avx512.h.
//
//   prepack(codes, scale, zero, bits, group_size) -> qweight (uint8, one buffer); float16 scale and
//     zero give the packed form with 16-bit scales (half the scale bytes), anything else float32
//   linear(x, qweight, bits, group_size, n, k, bias=None, path=0) -> y = x @ W^T (+ bias)
//     x [..., K] of any float dtype (computed in float32), y [..., N] in x's dtype
//   dequant(qweight, bits, group_size, n, k) -> W (float32 [n, k])
//   quantize_rows_u8(x [M, K] f32) -> (q uint8 [M, K], scale f32 [M], zero int32 [M])  (per row, asym)
//   quantize_u8(x f32, inv_scale, zero) -> q uint8, same shape and memory layout (per tensor)
//   row_epilogue_(y [M, N] f32, sx [M], sxz [M], csw [N], bias [N]?) in place:
//       y = y * sx[m] - sxz[m] * csw[n] + bias[n]
//
//   cb_pack(codes, bits) -> packed codebook indices (kernels_decode.h)
//   cb_linear(x, packed, book, bits, group_size, n, k, bias=None) -> y = x @ W^T (+ bias), W[n, j] =
//     book[n, j / group_size, code[n, j]]: a GEMV, meant for few rows
//   cb_decode(packed, book, bits, group_size, n, k, bf16) -> W [n, k] (float32, or bfloat16)
//   cb_gemm(x, packed, book, bits, group_size, n, k, bias, bf16) -> the same product for many rows
//   fp8_linear(x, w, scale, group_size, e5m2, bias=None) -> x @ W^T (+ bias) for fp8 W [n, k]: a GEMV
//   fp8_gemm(x, w, scale, group_size, e5m2, bias, bf16) -> the same, W decoded a slab at a time, then a GEMM
//   half_linear(x, w, bias=None) -> x @ W^T (+ bias) for float16 / bf16 W [n, k]: a GEMV
//
//   isa() -> "avx512" | "avx2": the kernel path that runs; isas() -> the paths this CPU can run;
//   set_isa(name) picks one (an error for a path this CPU cannot run)
//
// linear: M <= gemv_max_m rows (256) take the streaming GEMV (weights read once per 128 rows of x,
// all threads split the output rows); more rows dequantize W in slabs to float32 and use torch's GEMM.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <array>
#include <atomic>
#include <type_traits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "act_quant.h"
#include "attention.h"
#include "kernels.h"
#include "kernels_avx512.h"
#include "kernels_decode.h"
#include "kernels_q8.h"

namespace {

using lowbit::Layout;

Layout checked_layout(int64_t n, int64_t k, int64_t bits, int64_t group_size) {
  TORCH_CHECK(lowbit::shape_ok(n, k, bits, group_size), "lowbit: unsupported layer n=", n, " k=", k,
              " bits=", bits, " group_size=", group_size,
              " (bits in 1,2,3,4,8; k % group_size == 0; group_size == k or a multiple of 32)");
  return lowbit::make_layout(n, k, bits, group_size);
}

// The layout of a packed buffer: shape from the arguments, scale width from the buffer's header.
Layout checked_qweight(const at::Tensor& qw, int64_t n, int64_t k, int64_t bits, int64_t group_size) {
  Layout L = checked_layout(n, k, bits, group_size);
  TORCH_CHECK(qw.device().is_cpu() && qw.scalar_type() == at::kByte && qw.is_contiguous() &&
                  qw.numel() >= Layout::kPad,
              "lowbit: packed weight must be a contiguous CPU uint8 buffer (got ", qw.numel(), " of ",
              qw.scalar_type(), ")");
  const int sb = lowbit::read_header(qw.data_ptr<uint8_t>());
  TORCH_CHECK(sb != 0, "lowbit: packed weight has an unknown header (not made by lowbit's prepack?)");
  L = lowbit::make_layout(n, k, bits, group_size, sb);
  TORCH_CHECK(qw.numel() == L.total_bytes(), "lowbit: packed weight does not match n/k/bits/group_size (expected ",
              L.total_bytes(), " uint8 bytes with ", 8 * sb, "-bit scales, got ", qw.numel(), ")");
  return L;
}

// Kernel paths. kAvx512 needs AVX-512 F, BW, VL and VBMI (checked with the OS's support for the zmm state).
enum Isa : int { kAvx2 = 0, kAvx512 = 1 };
const char* const kIsaNames[] = {"avx2", "avx512"};

bool cpu_can_run(int isa) {
  if (isa == kAvx2) return true;  // the module's baseline (lowbit_cpu.py checks it before importing)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi");
}

int best_isa() { return cpu_can_run(kAvx512) ? kAvx512 : kAvx2; }

// AVX-512 VNNI, for the int8-activation GEMV (kernels_q8.h) on the avx512 path.
bool cpu_has_vnni() {
  __builtin_cpu_init();
  return cpu_can_run(kAvx512) && __builtin_cpu_supports("avx512vnni");
}
const bool g_vnni = cpu_has_vnni();

std::atomic<int> g_isa{best_isa()};

// Scratch memory of a few-row call (the activations rounded to int8, their steps and sums), kept per
// thread between calls: a decode step makes one call per layer, and three fresh tensors each time cost
// about a microsecond of a small layer's few-microsecond GEMV. Calls of more rows allocate as before, so
// a large batch leaves nothing behind. Returns 64-byte aligned pieces of the given byte sizes.
constexpr int64_t kScratchRows = 16;
struct Scratch {
  std::vector<uint8_t> buf;
  template <size_t N>
  std::array<uint8_t*, N> take(const std::array<int64_t, N>& bytes) {
    int64_t total = 64;
    for (int64_t b : bytes) total += (b + 63) / 64 * 64;
    if ((int64_t)buf.size() < total) buf.resize(total);
    uint8_t* p = buf.data() + (64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) % 64;
    std::array<uint8_t*, N> out;
    for (size_t i = 0; i < N; ++i) {
      out[i] = p;
      p += (bytes[i] + 63) / 64 * 64;
    }
    return out;
  }
};
thread_local Scratch t_scratch;

// Work split for the memory-bound GEMVs. Each thread owns a contiguous share of the items (tiles, or blocks
// of rows) and walks it from its front, so that its reads form one sequential stream the hardware
// prefetcher can run ahead on; a thread done with its share takes chunks from the back of the others'
// shares, so that a thread slowed down (by a neighbour on a shared host) does not hold the whole call up.
// Each item is still computed by one thread in a fixed order, so results do not depend on the split.
// Measured on a 2-core Zen 4, one decode token of a Llama-3.2-1B-shaped layer (int4-g128, int8
// activations), in one interleaved run: fixed halves 80% of the read bandwidth, chunks handed out from one
// shared counter 93%. Against that counter (whose chunks are one 33 KB tile for the 512-row k and v
// layers: every chunk a new stream to start), owned shares with stealing ran the token 11-14% faster in
// a C++ loop over its seven layers (no Python between the calls).
template <typename F>
void parallel_chunks(int64_t n, const F& fn) {
  const int nth = at::get_num_threads();
  if (n <= 0) return;
  if (nth <= 1 || at::in_parallel_region()) {
    fn(0, n);
    return;
  }
  if (n > 0xffffffffLL) {  // the shares pack item indices in 32 bits
    at::parallel_for(0, n, 1, fn);
    return;
  }
  if (n < 4 * nth) {  // too few items to share out: fixed shares
    at::parallel_for(0, nth, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        if (n * t / nth < n * (t + 1) / nth) fn(n * t / nth, n * (t + 1) / nth);
    });
    return;
  }
  // Share t's remaining items [front, back), packed in one word so that owner and thief agree by one CAS.
  struct alignas(64) Share {
    std::atomic<uint64_t> fb;
  };
  std::vector<Share> shares(nth);
  for (int t = 0; t < nth; ++t)
    shares[t].fb.store((uint64_t)(n * t / nth) << 32 | (uint64_t)(n * (t + 1) / nth), std::memory_order_relaxed);
  const uint64_t step = (uint64_t)std::max<int64_t>(1, n / (16 * nth));
  auto take = [&](int t, bool front) {
    for (;;) {
      uint64_t v = shares[t].fb.load();
      const uint64_t f = v >> 32, b = v & 0xffffffffu;
      if (f >= b) return;
      // Chunks shrink to a quarter of what is left of the share (one tile at least), so that at the call's
      // end neither thread waits long for the other's last chunk: +1.5-2.7% per decode token against fixed
      // chunks (int4-g128, fast memory mood, 3 runs of 50 paired rounds; /2 and /8 were no better).
      const uint64_t c = std::min(step, std::max<uint64_t>(1, (b - f) / 4));
      const uint64_t rest = front ? (f + c) << 32 | b : f << 32 | (b - c);
      if (shares[t].fb.compare_exchange_weak(v, rest)) {
        if (front)
          fn((int64_t)f, (int64_t)(f + c));
        else
          fn((int64_t)(b - c), (int64_t)b);
      }
    }
  };
  at::parallel_for(0, nth, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) take((int)t, true);
    for (int d = 1; d < nth; ++d) take((int)((t0 + d) % nth), false);
  });
}

// isa: read once per call, since the activations are prepared for the path that runs.
void run_gemv_tiles(int isa, const Layout& L, const uint8_t* qw, const float* xp, const float* xs, int64_t M,
                    const float* bias, float* y, int64_t t0, int64_t t1) {
  if (isa == kAvx512)
    lowbit::avx512::gemv_tiles(L, qw, xp, xs, M, bias, y, t0, t1);
  else
    lowbit::gemv_tiles(L, qw, xp, xs, M, bias, y, t0, t1);
}

void run_dequant_t_tiles(const Layout& L, const uint8_t* qw, int64_t t0, int64_t t1, float* wt, int64_t ldw) {
  if (g_isa.load(std::memory_order_relaxed) == kAvx512)
    lowbit::avx512::dequant_t_tiles(L, qw, t0, t1, wt, ldw);
  else
    lowbit::dequant_t_tiles(L, qw, t0, t1, wt, ldw);
}

// A zeroed byte buffer for a packed weight. From 2 MB up it is a fresh anonymous mapping starting on a 2 MB
// boundary, advised for transparent huge pages before any page is touched (madvise; in "madvise" mode, the
// common default, nothing else gets them): a decode GEMV streams the whole weight on every call, and with
// 4 KB pages the page walks cost it about a tenth of the memory's speed (an int4-g128 decode token of a
// Llama-3.2-1B-shaped layer on a 2-core Zen 4, one interleaved run: 87% of the read bandwidth on 4 KB
// pages, 94-98% on 2 MB pages; a plain sum over 4 x 18 MB: 27.5 against 37 GB/s). Why mmap, not malloc:
// glibc serves requests below its mmap threshold, which rises to 32 MB once large blocks are freed (as
// quantizing frees float weights), from its heap, whose pages were often touched before; there the advice
// comes too late, and in a quantized 4-layer Llama-1B-shaped model all but 4 MB of the layers' 130 MB of
// packed weights sat on 4 KB pages. Only whole 2 MB pages inside the buffer are advised, so no memory is
// added; elsewhere, or if the OS refuses, plain pages.
at::Tensor alloc_weight_bytes(int64_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = (size_t)2 << 20;
  if (n >= (int64_t)kHuge) {
    const size_t len = ((size_t)n + 4095) / 4096 * 4096;
    // Map one huge page more than needed, then unmap the unaligned head and the tail.
    void* raw = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw != MAP_FAILED) {
      const uintptr_t r = reinterpret_cast<uintptr_t>(raw);
      const uintptr_t start = (r + kHuge - 1) / kHuge * kHuge;
      if (start > r) munmap(raw, start - r);
      munmap(reinterpret_cast<void*>(start + len), r + kHuge - start);  // start < r + kHuge: never empty
      void* p = reinterpret_cast<void*>(start);
      madvise(p, (size_t)n / kHuge * kHuge, MADV_HUGEPAGE);  // a hint: the memory is valid either way
      // Fresh anonymous pages read as zeros; touching them now faults them in (as huge pages where granted).
      std::memset(p, 0, (size_t)n);
      return at::from_blob(p, {n}, [len](void* q) { munmap(q, len); }, at::TensorOptions().dtype(at::kByte));
    }
  }
#endif
  return at::zeros({n}, at::TensorOptions().dtype(at::kByte));
}

at::Tensor prepack(at::Tensor codes, at::Tensor scale, at::Tensor zero, int64_t bits, int64_t group_size) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.device().is_cpu(),
              "lowbit: codes must be a CPU uint8 [N, K] tensor");
  const int64_t n = codes.size(0), k = codes.size(1);
  const Layout L = checked_layout(n, k, bits, group_size);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == n && scale.size(1) == L.ng,
              "lowbit: scale must be [N, K/G]");
  TORCH_CHECK(zero.dim() == 2 && zero.size(0) == n && zero.size(1) == L.ng, "lowbit: zero must be [N, K/G]");
  // Both float16: the 16-bit form (the values are kept exactly); otherwise float32.
  const bool half = scale.scalar_type() == at::kHalf && zero.scalar_type() == at::kHalf;
  const Layout LP = lowbit::make_layout(n, k, bits, group_size, half ? 2 : 4);
  codes = codes.contiguous();
  scale = scale.to(half ? at::kHalf : at::kFloat).contiguous();
  zero = zero.to(half ? at::kHalf : at::kFloat).contiguous();
  auto qw = alloc_weight_bytes(LP.total_bytes());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const void* sp = scale.data_ptr();
  const void* zp = zero.data_ptr();
  uint8_t* out = qw.data_ptr<uint8_t>();
  lowbit::write_header(LP, out);
  std::atomic<bool> ok{true};
  at::parallel_for(0, L.ntile, 1, [&](int64_t t0, int64_t t1) {
    if (!lowbit::pack_tiles(LP, cp, sp, zp, t0, t1, out)) ok = false;
  });
  TORCH_CHECK(ok.load(), "lowbit: a code does not fit in ", bits, " bits");
  return qw;
}

// Dequantize-and-GEMM for many rows. W^T is built a slab of output columns at a time (a few MB,
// stays in L3) and multiplied by torch's GEMM.
void dequant_mm(const Layout& L, at::Tensor x, const uint8_t* qw, const at::Tensor& bias, at::Tensor& y) {
  // MKL's results can depend on the operands' alignment; a fresh copy makes them depend on the
  // values only.
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 64 != 0) x = x.clone();
  // Columns per slab: about 4 MB of float32, at least 128 columns, whole tiles.
  int64_t cols = ((int64_t)1 << 20) / L.kp;
  cols = std::max<int64_t>(128, std::min<int64_t>(cols, 1024));
  const int64_t tiles = std::min(L.ntile, std::max<int64_t>(1, cols / lowbit::TR));
  const int64_t ldw = tiles * lowbit::TR;
  auto wt = at::empty({L.kp, ldw}, x.options());
  float* wp = wt.data_ptr<float>();
  for (int64_t t0 = 0; t0 < L.ntile; t0 += tiles) {
    const int64_t t1 = std::min(L.ntile, t0 + tiles);
    at::parallel_for(t0, t1, 1, [&](int64_t a, int64_t b) {
      run_dequant_t_tiles(L, qw, a, b, wp + (a - t0) * lowbit::TR, ldw);
    });
    const int64_t c0 = t0 * lowbit::TR, c1 = std::min(L.n, t1 * lowbit::TR);
    const auto w = wt.narrow(0, 0, L.k).narrow(1, 0, c1 - c0);
    auto yv = y.narrow(1, c0, c1 - c0);
    if (bias.defined())
      yv.copy_(at::addmm(bias.narrow(0, c0, c1 - c0), x, w));
    else
      yv.copy_(at::mm(x, w));
  }
}

// Largest M that takes the GEMV (see benchmarks/kernel_gemv.py for the crossover), and the rows
// of x the GEMV takes per pass over the weights.
std::atomic<int64_t> g_gemv_max_m{256};
constexpr int64_t kGemvRowBlock = 128;

void run_linear(const Layout& L, const at::Tensor& x, const at::Tensor& qw, const at::Tensor& b, int64_t path,
                at::Tensor& y);

// The plumbing both linears share: x [..., K] of any float dtype as float32 rows [M, K], bias as float32
// [N]; compute(x, bias, y) fills y [M, N] (M > 0); the result comes back in x's leading shape and dtype.
template <typename F>
at::Tensor linear_rows(at::Tensor x, int64_t n, int64_t k, const c10::optional<at::Tensor>& bias,
                       const F& compute) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k && x.device().is_cpu(),
              "lowbit: x must be a CPU [..., K] tensor");
  const auto in_dtype = x.scalar_type();
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = n;
  x = x.reshape({-1, k}).to(at::kFloat).contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == n, "lowbit: bias must be [N]");
  }
  auto y = at::empty({x.size(0), n}, x.options());
  if (x.size(0) > 0) compute(x, b, y);
  y = y.view(out_sizes);
  return in_dtype == at::kFloat ? y : y.to(in_dtype);
}

at::Tensor linear(at::Tensor x, at::Tensor qw, int64_t bits, int64_t group_size, int64_t n, int64_t k,
                  c10::optional<at::Tensor> bias, int64_t path) {
  const Layout L = checked_qweight(qw, n, k, bits, group_size);
  TORCH_CHECK(path >= 0 && path <= 2, "lowbit: path is 0 (auto), 1 (gemv) or 2 (dequant + mm)");
  return linear_rows(x, n, k, bias, [&](const at::Tensor& xr, const at::Tensor& b, at::Tensor& y) {
    run_linear(L, xr, qw, b, path, y);
  });
}

void run_linear(const Layout& L, const at::Tensor& x, const at::Tensor& qw, const at::Tensor& b, int64_t path,
                at::Tensor& y) {
  const int64_t M = x.size(0);
  const uint8_t* q = qw.data_ptr<uint8_t>();
  if (path == 1 || (path == 0 && M <= g_gemv_max_m.load())) {
    // Blocks of rows: every tile re-reads its block's activations, which then stay in L2/L3.
    const int64_t mb = std::min<int64_t>(M, kGemvRowBlock);
    at::Tensor xp, xs;  // more rows than the scratch takes
    float *xpp, *xsp;
    if (mb <= kScratchRows) {
      const auto mem = t_scratch.take<2>({mb * L.kp * 4, mb * L.ngp * 4});
      xpp = reinterpret_cast<float*>(mem[0]);
      xsp = reinterpret_cast<float*>(mem[1]);
    } else {
      xp = at::empty({mb, L.kp}, x.options());
      xs = at::empty({mb, L.ngp}, x.options());
      xpp = xp.data_ptr<float>();
      xsp = xs.data_ptr<float>();
    }
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    const int isa = g_isa.load();
    const bool raw = isa == kAvx512 && lowbit::avx512::by_table(L.bits);
    if (isa == kAvx512 && lowbit::avx512::by_lut(L.bits) && M <= lowbit::MT_MAX) {
      // A few rows of 1/2/3-bit weights: partial-sum tables (kernels_avx512.h).
      const float* xptr = x.data_ptr<float>();
      lowbit::prep_x_rows(L, xptr, M, 0, M, xpp, xsp, true);
      auto lut = at::empty({lowbit::avx512::lut_floats(L, M)}, x.options());
      float* lp = lut.data_ptr<float>();
      lowbit::avx512::prep_lut(L, xpp, M, lp);
      float* yp = y.data_ptr<float>();
      parallel_chunks(L.ntile, [&](int64_t t0, int64_t t1) {
        lowbit::avx512::gemv_tiles_lut(L, q, lp, xsp, M, bp, yp, t0, t1);
      });
      return;
    }
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
      const int64_t rows = std::min(mb, M - m0);
      const float* xptr = x.data_ptr<float>() + m0 * L.k;
      float* yp = y.data_ptr<float>() + m0 * L.n;
      at::parallel_for(0, rows, 32, [&](int64_t r0, int64_t r1) {
        lowbit::prep_x_rows(L, xptr, rows, r0, r1, xpp, xsp, raw);
      });
      // Each output comes from one thread in a fixed order: results do not depend on the thread count.
      parallel_chunks(L.ntile, [&](int64_t t0, int64_t t1) {
        run_gemv_tiles(isa, L, q, xpp, xsp, rows, bp, yp, t0, t1);
      });
    }
  } else {
    dequant_mm(L, x, q, b, y);
  }
}

// The int8-activation GEMV's instructions for the path that runs: "vnni" (AVX-512 VNNI, bits 8/4/3/2),
// "avx2" (vpmaddubsw for bits 8/4/2, vpmaddwd on in-place codes for int3).
bool q8_vnni(int isa) { return isa == kAvx512 && g_vnni; }
std::string q8_path(int isa) { return q8_vnni(isa) ? "vnni" : "avx2"; }

at::Tensor linear_q8(at::Tensor x, at::Tensor qw, int64_t bits, int64_t group_size, int64_t n, int64_t k,
                     c10::optional<at::Tensor> bias) {
  const Layout L = checked_qweight(qw, n, k, bits, group_size);
  TORCH_CHECK(lowbit::q8::bits_ok((int)bits), "lowbit: the int8-activation GEMV takes 8/4/3/2-bit weights, not ",
              bits);
  const bool vnni = q8_vnni(g_isa.load());
  return linear_rows(x, n, k, bias, [&](const at::Tensor& xr, const at::Tensor& b, at::Tensor& y) {
    const int64_t M = xr.size(0);
    const int64_t nb = lowbit::q8::nblocks(L);
    at::Tensor xq, sx, xs;  // more rows than the scratch takes
    int8_t* qp;
    float *sp, *gp;
    if (M <= kScratchRows) {
      const auto mem = t_scratch.take<3>({M * L.kp, M * nb * 4, M * L.ngp * 4});
      qp = reinterpret_cast<int8_t*>(mem[0]);
      sp = reinterpret_cast<float*>(mem[1]);
      gp = reinterpret_cast<float*>(mem[2]);
    } else {
      xq = at::empty({M, L.kp}, xr.options().dtype(at::kChar));
      sx = at::empty({M, nb}, xr.options());
      xs = at::empty({M, L.ngp}, xr.options());
      qp = xq.data_ptr<int8_t>();
      sp = sx.data_ptr<float>();
      gp = xs.data_ptr<float>();
    }
    const float* xp = xr.data_ptr<float>();
    at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) lowbit::q8::prep_row(L, xp + r * k, qp + r * L.kp, sp + r * nb, gp + r * L.ngp);
    });
    // int3 on AVX2 multiplies 16-bit words (vpmaddwd): the codes widened and reordered once per row
    // (int3_row). xa is what the tile loop reads, at xstride bytes per row.
    const bool wide = !vnni && bits == 3;
    at::Tensor x16;
    const int8_t* xa = qp;
    int64_t xstride = L.kp;
    if (wide) {
      x16 = at::empty({M, L.kp}, xr.options().dtype(at::kShort));
      int16_t* wp = x16.data_ptr<int16_t>();
      for (int64_t r = 0; r < M; ++r) lowbit::q8::int3_row(L, qp + r * L.kp, wp + r * L.kp);
      xa = reinterpret_cast<const int8_t*>(wp);
      xstride = 2 * L.kp;
    }
    const uint8_t* q = qw.data_ptr<uint8_t>();
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    // Tiles split across threads; every row of x against a tile while it is in cache.
    auto run_tiles = [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t r = 0; r < M; ++r) {
          if (vnni)
            lowbit::avx512::q8::gemv_tiles_vnni(L, q, qp + r * L.kp, sp + r * nb, gp + r * L.ngp, bp, yp + r * n, t, t + 1);
          else
            lowbit::q8::gemv_tiles_avx2(L, q, xa + r * xstride, sp + r * nb, gp + r * L.ngp, bp, yp + r * n, t, t + 1);
        }
    };
    parallel_chunks(L.ntile, run_tiles);
  });
}

at::Tensor dequant(at::Tensor qw, int64_t bits, int64_t group_size, int64_t n, int64_t k) {
  const Layout L = checked_qweight(qw, n, k, bits, group_size);
  auto wt = at::empty({L.kp, L.np}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* q = qw.data_ptr<uint8_t>();
  float* wp = wt.data_ptr<float>();
  at::parallel_for(0, L.ntile, 1, [&](int64_t a, int64_t b) {
    run_dequant_t_tiles(L, q, a, b, wp + a * lowbit::TR, L.np);
  });
  return wt.narrow(0, 0, k).narrow(1, 0, n).t().contiguous();
}

bool supports(int64_t n, int64_t k, int64_t bits, int64_t group_size) {
  return lowbit::shape_ok(n, k, bits, group_size);
}

int64_t packed_bytes(int64_t n, int64_t k, int64_t bits, int64_t group_size, int64_t scale_bits) {
  TORCH_CHECK(scale_bits == 16 || scale_bits == 32, "lowbit: scale_bits is 16 or 32");
  checked_layout(n, k, bits, group_size);
  return lowbit::make_layout(n, k, bits, group_size, (int)scale_bits / 8).total_bytes();
}

int64_t packed_scale_bits(at::Tensor qw) {
  TORCH_CHECK(qw.device().is_cpu() && qw.scalar_type() == at::kByte && qw.is_contiguous() &&
                  qw.numel() >= Layout::kPad,
              "lowbit: packed weight must be a contiguous CPU uint8 buffer");
  const int sb = lowbit::read_header(qw.data_ptr<uint8_t>());
  TORCH_CHECK(sb != 0, "lowbit: packed weight has an unknown header (not made by lowbit's prepack?)");
  return 8 * sb;
}

std::string get_isa() { return kIsaNames[g_isa.load()]; }

std::vector<std::string> get_isas() {
  std::vector<std::string> out;
  for (int i = kAvx512; i >= kAvx2; --i)
    if (cpu_can_run(i)) out.push_back(kIsaNames[i]);
  return out;
}

void set_isa(const std::string& name) {
  for (int i = kAvx2; i <= kAvx512; ++i) {
    if (name != kIsaNames[i]) continue;
    TORCH_CHECK(cpu_can_run(i), "lowbit: kernel path '", name,
                "' cannot run on this CPU (it lacks AVX-512 F/BW/VL/VBMI); paths it can run: ", c10::Join(", ", get_isas()));
    g_isa = i;
    return;
  }
  TORCH_CHECK(false, "lowbit: unknown kernel path '", name, "' (avx2 or avx512)");
}

void set_gemv_max_m(int64_t m) { g_gemv_max_m = m; }
int64_t get_gemv_max_m() { return g_gemv_max_m.load(); }

// Per-row asymmetric codes of float32 x [M, K]: uint8 codes, or (Signed) the same codes minus 128 as int8.
template <bool Signed>
std::vector<at::Tensor> quantize_rows(at::Tensor x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "lowbit: ", name, " takes a CPU float32 [M, K] tensor");
  x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  auto q = at::empty({m, k}, x.options().dtype(Signed ? at::kChar : at::kByte));
  auto scale = at::empty({m}, x.options());
  auto zero = at::empty({m}, x.options().dtype(at::kInt));
  const float* xp = x.data_ptr<float>();
  float* sp = scale.data_ptr<float>();
  int32_t* zp = zero.data_ptr<int32_t>();
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      float lo, hi, inv;
      TORCH_CHECK(lowbit::row_min_max(xp + r * k, k, lo, hi), "lowbit: activation row ", r,
                  " is not finite (NaN or inf)");
      lowbit::row_params_u8(lo, hi, sp[r], inv, zp[r]);
      if constexpr (Signed)
        lowbit::quantize_span_s8(xp + r * k, k, inv, zp[r], q.data_ptr<int8_t>() + r * k);
      else
        lowbit::quantize_span_u8(xp + r * k, k, inv, zp[r], q.data_ptr<uint8_t>() + r * k);
    }
  });
  return {q, scale, zero};
}

std::vector<at::Tensor> quantize_rows_u8(at::Tensor x) { return quantize_rows<false>(x, "quantize_rows_u8"); }

at::Tensor quantize_u8(at::Tensor x, double inv_scale, int64_t zero) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "lowbit: quantize_u8 takes CPU float32");
  TORCH_CHECK(zero >= 0 && zero <= 255, "lowbit: zero point must be in 0..255");
  // Keep the caller's memory format (channels_last stays channels_last): work on the dense storage.
  if (!x.is_non_overlapping_and_dense()) x = x.contiguous();
  auto q = at::empty_like(x, x.options().dtype(at::kByte));
  TORCH_CHECK(q.strides() == x.strides(), "lowbit: quantize_u8 could not match the input layout");
  const float* xp = x.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  const float inv = static_cast<float>(inv_scale);
  const int32_t z = static_cast<int32_t>(zero);
  at::parallel_for(0, x.numel(), 65536, [&](int64_t a, int64_t b) {
    lowbit::quantize_span_u8(xp + a, b - a, inv, z, qp + a);
  });
  return q;
}

void row_epilogue_(at::Tensor y, at::Tensor sx, at::Tensor sxz, at::Tensor csw, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.dim() == 2 && y.stride(1) == 1, "lowbit: y must be f32 [M, N]");
  const int64_t m = y.size(0), n = y.size(1);
  TORCH_CHECK(sx.numel() == m && sxz.numel() == m && csw.numel() == n && sx.is_contiguous() &&
                  sxz.is_contiguous() && csw.is_contiguous() && sx.scalar_type() == at::kFloat &&
                  sxz.scalar_type() == at::kFloat && csw.scalar_type() == at::kFloat,
              "lowbit: row_epilogue_ vectors do not match y");
  const float* bp = nullptr;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->numel() == n && bias->is_contiguous() && bias->scalar_type() == at::kFloat,
                "lowbit: bias must be f32 [N]");
    bp = bias->data_ptr<float>();
  }
  float* yp = y.data_ptr<float>();
  const int64_t ld = y.stride(0);
  const float *a = sx.data_ptr<float>(), *b = sxz.data_ptr<float>(), *c = csw.data_ptr<float>();
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    lowbit::row_epilogue(yp, ld, n, a, b, c, bp, r0, r1);
  });
}

}  // namespace

// ---------------------------------------------------------------- W8A8 dynamic on int8 x int8 matmuls
// quantize_rows_s8: the per-row codes of quantize_rows_u8 minus 128, as int8, for torch._int_mm.
// int_row_epilogue: int32 products of those codes with int8 weights -> float32 (see act_quant.h).
namespace {

std::vector<at::Tensor> quantize_rows_s8(at::Tensor x) { return quantize_rows<true>(x, "quantize_rows_s8"); }

// The checks both epilogue ops make of int32 products [M, N] and their per-row / per-column vectors; returns
// the bias pointer (null without one).
const float* checked_epilogue(const char* name, const at::Tensor& acc, const at::Tensor& sx, const at::Tensor& zx,
                              const at::Tensor& sw, const at::Tensor& csw, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(acc.scalar_type() == at::kInt && acc.dim() == 2 && acc.stride(1) == 1,
              "lowbit: ", name, " takes int32 [M, N] products, rows contiguous");
  const int64_t m = acc.size(0), n = acc.size(1);
  auto f32 = [](const at::Tensor& t, int64_t len) {
    return t.numel() == len && t.is_contiguous() && t.scalar_type() == at::kFloat;
  };
  TORCH_CHECK(f32(sx, m) && f32(sw, n) && f32(csw, n) && zx.numel() == m && zx.is_contiguous() &&
                  zx.scalar_type() == at::kInt,
              "lowbit: ", name, " scales do not match the products");
  if (!(bias && bias->defined())) return nullptr;
  TORCH_CHECK(f32(*bias, n), "lowbit: bias must be f32 [N]");
  return bias->data_ptr<float>();
}

at::Tensor int_row_epilogue(at::Tensor acc, at::Tensor sx, at::Tensor zx, at::Tensor sw, at::Tensor csw,
                            c10::optional<at::Tensor> bias, bool relu) {
  const float* bp = checked_epilogue("int_row_epilogue", acc, sx, zx, sw, csw, bias);
  const int64_t m = acc.size(0), n = acc.size(1);
  auto y = at::empty({m, n}, acc.options().dtype(at::kFloat));
  // sx[m] * (128 - zero[m]), computed as the traced form computes it (float32 product).
  auto sxc = at::empty({m}, sx.options());
  const float* sxp = sx.data_ptr<float>();
  const int32_t* zp = zx.data_ptr<int32_t>();
  float* cp = sxc.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r) cp[r] = sxp[r] * static_cast<float>(128 - zp[r]);
  const int32_t* ap = acc.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  const int64_t lda = acc.stride(0);
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    lowbit::int_row_epilogue(ap, lda, yp, n, n, sxp, cp, sw.data_ptr<float>(), csw.data_ptr<float>(), bp, relu,
                             r0, r1);
  });
  return y;
}

// int32 products -> int_row_epilogue -> GELU -> per-row int8 codes, as quantize_rows_s8 would quantize that
// float row, one row at a time in a buffer: the float32 [M, N] between two int8 layers is never written.
std::vector<at::Tensor> int_epilogue_gelu_rows_s8(at::Tensor acc, at::Tensor sx, at::Tensor zx, at::Tensor sw,
                                                  at::Tensor csw, c10::optional<at::Tensor> bias) {
  const float* bp = checked_epilogue("int_epilogue_gelu_rows_s8", acc, sx, zx, sw, csw, bias);
  const int64_t m = acc.size(0), n = acc.size(1);
  auto q = at::empty({m, n}, acc.options().dtype(at::kChar));
  auto scale = at::empty({m}, sx.options());
  auto zero = at::empty({m}, zx.options());
  const float* sxp = sx.data_ptr<float>();
  const int32_t* zp = zx.data_ptr<int32_t>();
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* swp = sw.data_ptr<float>();
  const float* cswp = csw.data_ptr<float>();
  float* sp = scale.data_ptr<float>();
  int32_t* op = zero.data_ptr<int32_t>();
  int8_t* qp = q.data_ptr<int8_t>();
  const int64_t lda = acc.stride(0);
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<float> row((size_t)n);
    for (int64_t r = r0; r < r1; ++r) {
      const float sxc = sxp[r] * static_cast<float>(128 - zp[r]);
      lowbit::int_row_epilogue(ap + r * lda, lda, row.data(), n, n, sxp + r, &sxc, swp, cswp, bp, false, 0, 1);
      lowbit::gelu_inplace(row.data(), n);
      float lo, hi, inv;
      TORCH_CHECK(lowbit::row_min_max(row.data(), n, lo, hi), "lowbit: activation row ", r,
                  " is not finite (NaN or inf)");
      lowbit::row_params_u8(lo, hi, sp[r], inv, op[r]);
      lowbit::quantize_span_s8(row.data(), n, inv, op[r], qp + r * n);
    }
  });
  return {q, scale, zero};
}

}  // namespace

// ---------------------------------------------------------------- codebook (k-means) weights
namespace {

void check_cb(const at::Tensor& packed, const at::Tensor& book, int64_t bits, int64_t g, int64_t n, int64_t k) {
  TORCH_CHECK(lowbit::dec::shape_ok(n, k, bits, g), "lowbit: unsupported codebook layer n=", n, " k=", k, " bits=", bits,
              " group_size=", g, " (bits 2 or 4; k and group_size multiples of 64)");
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == n * (k / lowbit::dec::CH) * lowbit::dec::chunk_bytes((int)bits),
              "lowbit: packed codebook indices do not match n/k/bits (not made by cb_pack?)");
  TORCH_CHECK(book.device().is_cpu() && book.is_contiguous() &&
                  (book.scalar_type() == at::kHalf || book.scalar_type() == at::kFloat) &&
                  book.numel() == n * (k / g) * ((int64_t)1 << bits),
              "lowbit: codebook must be a contiguous float16 or float32 [n, k / group_size, 2^bits] tensor");
}

// fn(std::integral_constant<int, bits>, tables + offset): the tables as the kernels read them (uint16_t bits
// of float16, or float), the bit width as a compile-time constant.
template <typename F>
void with_tables(const at::Tensor& book, int64_t bits, int64_t offset, F&& fn) {
  auto call = [&](const auto* bk) {
    if (bits == 4)
      fn(std::integral_constant<int, 4>{}, bk + offset);
    else
      fn(std::integral_constant<int, 2>{}, bk + offset);
  };
  if (book.scalar_type() == at::kHalf)
    call(reinterpret_cast<const uint16_t*>(book.data_ptr<at::Half>()));
  else
    call(book.data_ptr<float>());
}

at::Tensor cb_pack(at::Tensor codes, int64_t bits) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.device().is_cpu(),
              "lowbit: codebook indices must be a CPU uint8 [N, K] tensor");
  const int64_t n = codes.size(0), k = codes.size(1);
  TORCH_CHECK(lowbit::dec::shape_ok(n, k, bits, k), "lowbit: unsupported codebook indices [", n, ", ", k, "] at ", bits,
              " bits (bits 2 or 4, K a multiple of 64)");
  codes = codes.contiguous();
  auto out = alloc_weight_bytes(n * (k / lowbit::dec::CH) * lowbit::dec::chunk_bytes((int)bits));
  std::atomic<bool> ok{true};
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    if (!lowbit::dec::pack_rows(codes.data_ptr<uint8_t>(), k, (int)bits, r0, r1, out.data_ptr<uint8_t>())) ok = false;
  });
  TORCH_CHECK(ok.load(), "lowbit: a codebook index does not fit in ", bits, " bits");
  return out;
}

template <int R, typename S512, typename S2>
void gemv_pass(int isa, const S512& a, const S2& b, int64_t k, const float* x, const float* bias, float* y, int64_t n,
               int64_t n0, int64_t n1) {
  if (isa == kAvx512)
    lowbit::avx512::dec::gemv_t<S512, R>(a, k, x, k, bias, y, n, n0, n1);
  else
    lowbit::dec::gemv_avx2_t<S2, R>(b, k, x, k, bias, y, n, n0, n1);
}

// y rows = x rows [m, k] @ W^T for output rows n0..n1, W from a source of each path (kernels_decode.h). Up
// to 8 (AVX-512) or 4 (AVX2: 16 registers) activation rows per pass over the weights: each decoded weight
// vector serves them all.
template <typename S512, typename S2>
void gemv_rows(int isa, const S512& a, const S2& b, int64_t k, const float* x, int64_t m, const float* bias, float* y,
               int64_t n, int64_t n0, int64_t n1) {
  const int64_t mb = isa == kAvx512 ? 8 : 4;
  for (int64_t m0 = 0; m0 < m; m0 += mb) {
    const float* xm = x + m0 * k;
    float* ym = y + m0 * n;
    switch (std::min<int64_t>(mb, m - m0)) {
      case 1: gemv_pass<1>(isa, a, b, k, xm, bias, ym, n, n0, n1); break;
      case 2: gemv_pass<2>(isa, a, b, k, xm, bias, ym, n, n0, n1); break;
      case 3: gemv_pass<3>(isa, a, b, k, xm, bias, ym, n, n0, n1); break;
      case 4: gemv_pass<4>(isa, a, b, k, xm, bias, ym, n, n0, n1); break;
      case 5: gemv_pass<5>(isa, a, b, k, xm, bias, ym, n, n0, n1); break;
      case 6: gemv_pass<6>(isa, a, b, k, xm, bias, ym, n, n0, n1); break;
      case 7: gemv_pass<7>(isa, a, b, k, xm, bias, ym, n, n0, n1); break;
      default: gemv_pass<8>(isa, a, b, k, xm, bias, ym, n, n0, n1); break;
    }
  }
}

template <int BITS, typename Book>
void cb_gemv_rows(int isa, const uint8_t* q, const Book* b, int64_t k, int64_t g, const float* x, int64_t m,
                  const float* bias, float* y, int64_t n, int64_t n0, int64_t n1) {
  gemv_rows(isa, lowbit::avx512::dec::Codebook16<BITS, Book>{q, b, k, g}, lowbit::dec::Codebook8<BITS, Book>{q, b, k, g},
            k, x, m, bias, y, n, n0, n1);
}

// The plumbing of the GEMVs over decoded weights (codebooks, 16-bit floats, fp8): x as float32 rows, W's rows in
// blocks of 16 shared out to threads; rows(isa, x, m, bias, y, n0, n1) computes y's columns n0..n1. Each output
// is summed by one thread in a fixed order: the same bits for any thread count.
template <typename F>
at::Tensor decoded_gemv(at::Tensor x, int64_t n, int64_t k, const c10::optional<at::Tensor>& bias, const F& rows) {
  return linear_rows(x, n, k, bias, [&](const at::Tensor& xr, const at::Tensor& b, at::Tensor& y) {
    const int isa = g_isa.load();
    const float* xp = xr.data_ptr<float>();
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    const int64_t m = xr.size(0);
    parallel_chunks((n + 15) / 16, [&](int64_t b0, int64_t b1) {
      rows(isa, xp, m, bp, yp, 16 * b0, std::min(n, 16 * b1));
    });
  });
}

at::Tensor cb_linear(at::Tensor x, at::Tensor packed, at::Tensor book, int64_t bits, int64_t group_size, int64_t n,
                     int64_t k, c10::optional<at::Tensor> bias) {
  check_cb(packed, book, bits, group_size, n, k);
  const uint8_t* q = packed.data_ptr<uint8_t>();
  return decoded_gemv(x, n, k, bias, [&](int isa, const float* xp, int64_t m, const float* bp, float* yp, int64_t n0,
                                         int64_t n1) {
    with_tables(book, bits, 0, [&](auto b, const auto* bk) {
      cb_gemv_rows<decltype(b)::value>(isa, q, bk, k, group_size, xp, m, bp, yp, n, n0, n1);
    });
  });
}

template <int BITS, typename Book>
void cb_decode_rows(int isa, bool bf16, const uint8_t* q, const Book* b, int64_t k, int64_t g, int64_t n0, int64_t n1,
                    void* out) {
  if (isa == kAvx512) {
    if (bf16) lowbit::avx512::dec::decode_t<BITS, Book, true>(q, b, k, g, n0, n1, out);
    else lowbit::avx512::dec::decode_t<BITS, Book, false>(q, b, k, g, n0, n1, out);
  } else {
    if (bf16) lowbit::dec::decode_avx2_t<BITS, Book, true>(q, b, k, g, n0, n1, out);
    else lowbit::dec::decode_avx2_t<BITS, Book, false>(q, b, k, g, n0, n1, out);
  }
}

at::Tensor cb_decode(at::Tensor packed, at::Tensor book, int64_t bits, int64_t group_size, int64_t n, int64_t k,
                     bool bf16) {
  check_cb(packed, book, bits, group_size, n, k);
  auto w = at::empty({n, k}, at::TensorOptions().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const int isa = g_isa.load();
  const uint8_t* q = packed.data_ptr<uint8_t>();
  void* out = w.data_ptr();
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    with_tables(book, bits, 0, [&](auto b, const auto* bk) {
      cb_decode_rows<decltype(b)::value>(isa, bf16, q, bk, k, group_size, n0, n1, out);
    });
  });
  return w;
}

// Many rows: W decoded a slab of output rows at a time (about 2 MB, stays in cache; float32, or bf16 with
// bf16 activations) and multiplied with torch's GEMM. One fresh [N, K] buffer per call would cost more in
// page faults than the decoding itself on large layers.
// decode(r0, a, c, out) writes rows r0 + a .. r0 + c of W into rows a .. c of out (float32, or bf16 when bf16).
template <typename D>
at::Tensor slab_gemm(at::Tensor x, int64_t n, int64_t k, const c10::optional<at::Tensor>& bias, bool bf16,
                     const D& decode) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k && x.device().is_cpu(), "lowbit: x must be a CPU [..., K] tensor");
  const auto in_dtype = x.scalar_type();
  const auto dt = bf16 ? at::kBFloat16 : at::kFloat;
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = n;
  x = x.reshape({-1, k}).to(dt).contiguous();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 64 != 0) x = x.clone();  // results independent of alignment
  auto y = at::empty({x.size(0), n}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(dt).contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == n, "lowbit: bias must be [N]");
  }
  const int64_t slab = std::min<int64_t>(n, std::max<int64_t>(64, ((int64_t)1 << 20) / k / 16 * 16));
  auto w = at::empty({slab, k}, x.options());
  for (int64_t r0 = 0; r0 < n && x.size(0) > 0; r0 += slab) {
    const int64_t rows = std::min(slab, n - r0);
    void* out = w.data_ptr();
    at::parallel_for(0, rows, 16, [&](int64_t a, int64_t c) { decode(r0, a, c, out); });
    const auto wv = w.narrow(0, 0, rows);
    auto yv = y.narrow(1, r0, rows);
    if (b.defined())
      yv.copy_(at::addmm(b.narrow(0, r0, rows), x, wv.t()));
    else
      yv.copy_(at::mm(x, wv.t()));
  }
  y = y.view(out_sizes);
  return y.scalar_type() == in_dtype ? y : y.to(in_dtype);
}

at::Tensor cb_gemm(at::Tensor x, at::Tensor packed, at::Tensor book, int64_t bits, int64_t group_size, int64_t n,
                   int64_t k, c10::optional<at::Tensor> bias, bool bf16) {
  check_cb(packed, book, bits, group_size, n, k);
  const int isa = g_isa.load();
  const uint8_t* q = packed.data_ptr<uint8_t>();
  const int64_t per_row = (k / lowbit::dec::CH) * lowbit::dec::chunk_bytes((int)bits), books = (k / group_size) << bits;
  return slab_gemm(x, n, k, bias, bf16, [&](int64_t r0, int64_t a, int64_t c, void* out) {
    // Shift the pointers by r0 rows: rows r0 + a .. r0 + c of W land in rows a .. c of the slab.
    const uint8_t* qs = q + r0 * per_row;
    with_tables(book, bits, r0 * books, [&](auto b, const auto* bk) {
      cb_decode_rows<decltype(b)::value>(isa, bf16, qs, bk, k, group_size, a, c, out);
    });
  });
}

// 16-bit float weights [n, k] (float16 or bf16) x float32 activations: the GEMV of kernels_decode.h.
at::Tensor half_linear(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu() && w.is_contiguous() &&
                  (w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16),
              "lowbit: half_linear takes a contiguous CPU float16 or bfloat16 [N, K] weight");
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(n >= 1 && k >= lowbit::dec::CH && k % lowbit::dec::CH == 0, "lowbit: half_linear needs K a multiple of ",
              lowbit::dec::CH, ", got [", n, ", ", k, "]");
  const bool bf = w.scalar_type() == at::kBFloat16;
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  return decoded_gemv(x, n, k, bias, [&](int isa, const float* xp, int64_t m, const float* bp, float* yp, int64_t n0,
                                         int64_t n1) {
    if (bf)
      gemv_rows(isa, lowbit::avx512::dec::Half16<true>{wp, k}, lowbit::dec::Half8<true>{wp, k}, k, xp, m, bp, yp, n, n0, n1);
    else
      gemv_rows(isa, lowbit::avx512::dec::Half16<false>{wp, k}, lowbit::dec::Half8<false>{wp, k}, k, xp, m, bp, yp, n, n0,
                n1);
  });
}

void check_fp8(const at::Tensor& w, const at::Tensor& scale, int64_t group_size) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu() && w.is_contiguous() && w.scalar_type() == at::kByte,
              "lowbit: an fp8 weight must be a contiguous CPU uint8 [N, K] tensor (the fp8 bit patterns)");
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t CH = lowbit::dec::CH;
  TORCH_CHECK(n >= 1, "lowbit: an fp8 weight needs at least one row");
  TORCH_CHECK(k >= CH && k % CH == 0 && group_size >= CH && group_size % CH == 0 && k % group_size == 0,
              "lowbit: fp8 weights need K and the group size multiples of ", CH, ", got [", n, ", ", k, "] group ",
              group_size);
  TORCH_CHECK(scale.device().is_cpu() && scale.is_contiguous() && scale.scalar_type() == at::kFloat &&
                  scale.dim() == 2 && scale.size(0) == n && scale.size(1) == k / group_size,
              "lowbit: an fp8 weight's scale must be a contiguous float32 [N, K / group_size] = [", n, ", ",
              k / group_size, "] tensor, got ", scale.sizes());
}

// fp8 weights [n, k] (uint8 bit patterns, e4m3 or e5m2) with a float32 scale [n, k / group_size] x float32
// activations: the GEMV of kernels_decode.h.
at::Tensor fp8_linear(at::Tensor x, at::Tensor w, at::Tensor scale, int64_t group_size, bool e5m2,
                      c10::optional<at::Tensor> bias) {
  check_fp8(w, scale, group_size);
  const int64_t n = w.size(0), k = w.size(1);
  const auto* wp = w.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const bool per_row = group_size == k;
  return decoded_gemv(x, n, k, bias, [&](int isa, const float* xp, int64_t m, const float* bp, float* yp, int64_t n0,
                                         int64_t n1) {
    auto run = [&](auto e5, auto row) {
      constexpr bool E5 = decltype(e5)::value, ROW = decltype(row)::value;
      gemv_rows(isa, lowbit::avx512::dec::Fp8x16<E5, ROW>{wp, sp, k, group_size},
                lowbit::dec::Fp8x8<E5, ROW>{wp, sp, k, group_size}, k, xp, m, bp, yp, n, n0, n1);
    };
    using T = std::true_type;
    using F = std::false_type;
    if (e5m2)
      per_row ? run(T{}, T{}) : run(T{}, F{});
    else
      per_row ? run(F{}, T{}) : run(F{}, F{});
  });
}

template <bool E5M2>
void fp8_decode_rows(int isa, bool bf16, const uint8_t* w, const float* scale, int64_t k, int64_t g, int64_t n0,
                     int64_t n1, int64_t r0, void* out) {
  // Every weight scaled as it is decoded (not per row): the slab holds W itself.
  const lowbit::avx512::dec::Fp8x16<E5M2, false> s16{w, scale, k, g};
  const lowbit::dec::Fp8x8<E5M2, false> s8{w, scale, k, g};
  if (isa == kAvx512) {
    if (bf16) lowbit::avx512::dec::decode_src_t<decltype(s16), true>(s16, k, n0, n1, r0, out);
    else lowbit::avx512::dec::decode_src_t<decltype(s16), false>(s16, k, n0, n1, r0, out);
  } else {
    if (bf16) lowbit::dec::decode_src_avx2_t<decltype(s8), true>(s8, k, n0, n1, r0, out);
    else lowbit::dec::decode_src_avx2_t<decltype(s8), false>(s8, k, n0, n1, r0, out);
  }
}

// Many rows of fp8 weights: decoded a slab at a time (float32, or bf16 with bf16 activations), then torch's GEMM.
at::Tensor fp8_gemm(at::Tensor x, at::Tensor w, at::Tensor scale, int64_t group_size, bool e5m2,
                    c10::optional<at::Tensor> bias, bool bf16) {
  check_fp8(w, scale, group_size);
  const int64_t n = w.size(0), k = w.size(1);
  const int isa = g_isa.load();
  const auto* wp = w.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  return slab_gemm(x, n, k, bias, bf16, [&](int64_t r0, int64_t a, int64_t c, void* out) {
    if (e5m2)
      fp8_decode_rows<true>(isa, bf16, wp, sp, k, group_size, r0 + a, r0 + c, r0, out);
    else
      fp8_decode_rows<false>(isa, bf16, wp, sp, k, group_size, r0 + a, r0 + c, r0, out);
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Attention with bf16 matmuls (attention.h). q [B, H, Sq, D], k and v [B, Hkv, Sk, D], float32, any
// strides (columns made contiguous if they are not); mask: additive float32 [B|1, H|1, Sq|1, Sk].
// Returns [B, Sq, H, D]: heads side by side, the layout the output projection reads.
const bool g_attn_bf16 = lowbit::attn::cpu_has_bf16_path();

at::Tensor attention_bf16(at::Tensor q, at::Tensor k, at::Tensor v, c10::optional<at::Tensor> mask, double scale,
                          bool causal) {
  TORCH_CHECK(g_attn_bf16, "lowbit: bf16 attention needs AVX-512 BF16, which this CPU lacks");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "lowbit: attention takes CPU float32 [batch, heads, seq, head_dim] tensors");
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == Sk,
              "lowbit: attention: k and v must be [batch, kv_heads, seq_k, head_dim] with q's batch");
  TORCH_CHECK(k.size(3) == D && v.size(3) == D, "lowbit: attention: q, k and v must share head_dim");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "lowbit: attention: heads (", H, ") must be a multiple of kv heads (", Hkv, ")");
  TORCH_CHECK(D % 16 == 0 && D <= 512, "lowbit: attention: head_dim must be a multiple of 16 up to 512, got ", D);
  if (q.stride(3) != 1) q = q.contiguous();
  if (k.stride(3) != 1) k = k.contiguous();
  if (v.stride(3) != 1) v = v.contiguous();
  lowbit::avx512::attn::Args A{};
  A.S = {B, H, Hkv, Sq, Sk, D, (Sk + lowbit::attn::KPAD - 1) / lowbit::attn::KPAD * lowbit::attn::KPAD};
  A.q = q.data_ptr<float>();
  A.qs[0] = q.stride(0), A.qs[1] = q.stride(1), A.qs[2] = q.stride(2);
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kFloat && m.dim() == 4 && (m.size(0) == B || m.size(0) == 1) &&
                    (m.size(1) == H || m.size(1) == 1) && (m.size(2) == Sq || m.size(2) == 1) && m.size(3) == Sk,
                "lowbit: attention: the mask must be float32 and broadcast to [batch, heads, seq_q, seq_k] = [", B,
                ", ", H, ", ", Sq, ", ", Sk, "], got ", m.sizes());
    m = m.expand({B, H, Sq, Sk});  // broadcast dimensions get stride 0
    if (m.stride(3) != 1) m = m.contiguous();
    A.mask = m.data_ptr<float>();
    A.ms[0] = m.stride(0), A.ms[1] = m.stride(1), A.ms[2] = m.stride(2);
  }
  A.scale = (float)scale;
  A.causal = causal;
  auto out = at::empty({B, Sq, H, D}, q.options());
  if (out.numel() == 0) return out;
  A.out = out.data_ptr<float>();
  const int64_t kst[3] = {k.stride(0), k.stride(1), k.stride(2)}, vst[3] = {v.stride(0), v.stride(1), v.stride(2)};
  if (Sk == 0) return out.zero_();
  lowbit::avx512::attn::run(A, k.data_ptr<float>(), kst, v.data_ptr<float>(), vst);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowbit CPU kernels (AVX2/FMA, AVX-512): packed low-bit weights x float32 activations";
  m.def("supports", &supports, "whether (n, k, bits, group_size) has a packed layout");
  m.def("packed_bytes", &packed_bytes, "size of the packed weight buffer in bytes", py::arg("n"), py::arg("k"),
        py::arg("bits"), py::arg("group_size"), py::arg("scale_bits") = 32);
  m.def("packed_scale_bits", &packed_scale_bits, "16 or 32: the scale width a packed buffer holds");
  m.def("isa", &get_isa, "the kernel path that runs: avx512 or avx2");
  m.def("isas", &get_isas, "the kernel paths this CPU can run, best first");
  m.def("set_isa", &set_isa, "run the given kernel path (avx512 or avx2)");
  m.def("prepack", &prepack, "canonical codes/scale/zero -> packed uint8 buffer");
  m.def("linear", &linear, "x [..., K] @ W^T (+bias); path 0=auto 1=gemv 2=dequant+mm", py::arg("x"),
        py::arg("qweight"), py::arg("bits"), py::arg("group_size"), py::arg("n"), py::arg("k"),
        py::arg("bias") = py::none(), py::arg("path") = 0);
  m.def("dequant", &dequant, "packed -> float32 W [N, K]");
  m.def("weight_bytes", &alloc_weight_bytes, "a zeroed uint8 buffer as packed weights get it (2 MB pages from 2 MB up, Linux)");
  m.def("cb_pack", &cb_pack, "codebook indices uint8 [N, K] -> the codebook kernels' packed form");
  m.def("cb_linear", &cb_linear, "x [..., K] @ W^T (+bias), W looked up in per-row/group codebooks", py::arg("x"),
        py::arg("packed"), py::arg("book"), py::arg("bits"), py::arg("group_size"), py::arg("n"), py::arg("k"),
        py::arg("bias") = py::none());
  m.def("cb_gemm", &cb_gemm, "x @ W^T (+bias) for many rows: W decoded in slabs, then torch's GEMM (bf16 or float32)",
        py::arg("x"), py::arg("packed"), py::arg("book"), py::arg("bits"), py::arg("group_size"), py::arg("n"),
        py::arg("k"), py::arg("bias"), py::arg("bf16"));
  m.def("fp8_linear", &fp8_linear, "x [..., K] @ W^T (+bias) for fp8 W [N, K] (uint8 bit patterns, e4m3 or e5m2) "
        "with a float32 scale per row and group: a GEMV, meant for few rows",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("group_size"), py::arg("e5m2"),
        py::arg("bias") = py::none());
  m.def("fp8_gemm", &fp8_gemm, "x [..., K] @ W^T (+bias) for fp8 W [N, K]: decoded a slab at a time (float32, "
        "or bf16 with bf16 activations), then a GEMM; for many rows",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("group_size"), py::arg("e5m2"), py::arg("bias"),
        py::arg("bf16"));
  m.def("half_linear", &half_linear, "x [..., K] @ W^T (+bias) for float16/bf16 W [N, K]: a GEMV, meant for few rows",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none());
  m.def("cb_decode", &cb_decode, "packed codebook weight -> W [N, K], float32 or bf16", py::arg("packed"),
        py::arg("book"), py::arg("bits"), py::arg("group_size"), py::arg("n"), py::arg("k"), py::arg("bf16"));
  m.def("linear_q8", &linear_q8, "x [..., K] @ W^T (+bias) with x rounded to int8 per 32 columns, integer dot products",
        py::arg("x"), py::arg("qweight"), py::arg("bits"), py::arg("group_size"), py::arg("n"), py::arg("k"),
        py::arg("bias") = py::none());
  m.def("attention_bf16", &attention_bf16, "softmax(q k^T * scale + mask) v with bf16 matmuls -> [B, Sq, H, D]",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("scale"), py::arg("causal"));
  m.def("has_attention_bf16", []() { return g_attn_bf16; }, "whether this CPU runs attention_bf16 (AVX-512 BF16)");
  m.def("q8_path", []() { return q8_path(g_isa.load()); }, "the int8-activation GEMV's instructions: vnni or avx2");
  m.def("quantize_rows_u8", &quantize_rows_u8, "per-row asymmetric uint8 quantization of float32 [M, K]");
  m.def("quantize_u8", &quantize_u8, "per-tensor uint8 quantization, layout kept");
  m.def("row_epilogue_", &row_epilogue_, "y = y*sx[m] - sxz[m]*csw[n] + bias[n], in place", py::arg("y"),
        py::arg("sx"), py::arg("sxz"), py::arg("csw"), py::arg("bias") = py::none());
  m.def("set_gemv_max_m", &set_gemv_max_m);
  m.def("get_gemv_max_m", &get_gemv_max_m);
  // W8A8 dynamic on int8 x int8 matmuls
  m.def("quantize_rows_s8", &quantize_rows_s8, "per-row asymmetric quantization, codes - 128 as int8");
  m.def("int_epilogue_gelu_rows_s8", &int_epilogue_gelu_rows_s8,
        "int32 [M, N] -> int_row_epilogue -> gelu -> per-row int8 codes (q - 128), scale, zero",
        py::arg("acc"), py::arg("sx"), py::arg("zx"), py::arg("sw"), py::arg("csw"), py::arg("bias") = py::none());
  m.def("int_row_epilogue", &int_row_epilogue, "int32 [M, N] -> acc*sx[m]*sw[n] + sx[m]*(128-zx[m])*csw[n] + b",
        py::arg("acc"), py::arg("sx"), py::arg("zx"), py::arg("sw"), py::arg("csw"), py::arg("bias") = py::none(),
        py::arg("relu") = false);
}
