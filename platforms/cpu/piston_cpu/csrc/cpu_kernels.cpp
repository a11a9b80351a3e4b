// Piston's CPU kernels: float32, AVX2 + FMA, threaded with ATen's intra-op pool.
//
// Built on first use by piston_cpu/kernels.py (torch.utils.cpp_extension). Every kernel
// has a torch fallback there, used when this file cannot be built or the CPU lacks AVX2.
//
//   linear                 y[M,N] = x[M,K] @ w[N,K]^T (+ b), for small M: streams each
//                          weight row once for all M rows of x (torch's GEMV path streams
//                          small matrices at about half the machine's bandwidth).
//   rms_norm               out = w * x / sqrt(mean(x^2) + eps), optionally after x += residual.
//   silu_and_mul           silu(x[:, :I]) * x[:, I:].
//   rotary_neox            rotate-half RoPE of q and k in place, from a cos|sin cache.
//   paged_attention        every query row of a step (decode or prompt) over its sequence's
//                          paged K/V, read in place; prompt rows in tiles (online softmax).
//                          The cache may hold float32, float16 or bfloat16 (--kv-cache-dtype).
//   argmax_rows            the index of each row's largest value, as torch.argmax(x, -1)
//                          (the first of equal maxima; a NaN counts as the largest), at
//                          memory speed (torch's CPU argmax reads about 5 GB/s here).
//   qlinear, qembedding,   the same linear (and the embedding lookup) for packed, quantized
//   qdequantize            weights: quant_kernels.cpp, bound into this module.
//   lora_sgmv              batched multi-LoRA shrink and expand: lora_kernels.cpp.
//   moe_grouped_linear     the expert GEMMs of a mixture-of-experts layer: moe_kernels.cpp.
//   pack_linear_weight,    a float32 GEMM over weights packed once (the engine's float32
//   packed_linear          linear wherever the copies fit): packed_gemm.cpp.
//
// Compiled with -ffp-contract=off: a multiply followed by an add rounds twice, as torch's
// element-wise ops do; fused multiply-adds appear only where written (_mm256_fmadd_ps).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernel_ops.h"
#include "simd.h"

// The quantized-weight kernels (quant_kernels.cpp), the batched LoRA kernel
// (lora_kernels.cpp) and the MoE kernel (moe_kernels.cpp) add their functions to the module.
void bind_quant_kernels(pybind11::module_& m);
void bind_lora_kernels(pybind11::module_& m);
void bind_moe_kernels(pybind11::module_& m);
void bind_decoder_stack(pybind11::module_& m);
void bind_packed_gemm(pybind11::module_& m);
void bind_greedy_head(pybind11::module_& m);

// The entry points are declared in kernel_ops.h (decoder_stack.cpp calls them too).
namespace piston_cpu {

// exp(x) for 8 floats: Cephes' range reduction and degree-5 polynomial (relative error
// about 2e-7 over the float range; inputs below -87.3 give 0, above 88.3 give inf).
inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 lo = _mm256_set1_ps(-87.3365478515625f);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 c1 = _mm256_set1_ps(0.693359375f);
  const __m256 c2 = _mm256_set1_ps(-2.12194440e-4f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  x = _mm256_min_ps(x, hi);
  x = _mm256_max_ps(x, lo);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, c1));
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, c2));
  __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, z, x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i n = _mm256_cvtps_epi32(fx);
  n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(n));
  y = _mm256_andnot_ps(under, y);
  return _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), over);
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32,
              name, " must be a float32 CPU tensor");
}

// ---------------------------------------------------------------------------------------
// linear

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  check_f32(x, "x");
  check_f32(w, "weight");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear: shapes ", x.sizes(), " and ",
              w.sizes(), " do not match");
  TORCH_CHECK(x.stride(1) == 1 && w.is_contiguous(), "linear: x rows and the weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_f32(*bias, "bias");
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N, "linear: bias must have ", N, " elements");
    b = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t xs = x.stride(0);
  // Blocks of 4 weight rows against pairs of x rows up to 16 rows of x; from there,
  // blocks of 8 weight rows against one x row at a time, which halves the reads of x per
  // multiply-add (measured: 5% faster at 64 rows, slower at 8).
  const int64_t R = M >= 16 ? 8 : 4;
  const int64_t blocks = (N + R - 1) / R;
  // About 64 KiB of weights per task at least, so a small matrix is not split too finely.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, R * K));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r = blk * R;
      const float* wr = W + r * K;
      const float* br = b ? b + r : nullptr;
      switch (std::min<int64_t>(R, N - r)) {
        case 8: dot_rows<8>(wr, K, X, xs, M, Y + r, N, br); break;
        case 7: dot_rows<7>(wr, K, X, xs, M, Y + r, N, br); break;
        case 6: dot_rows<6>(wr, K, X, xs, M, Y + r, N, br); break;
        case 5: dot_rows<5>(wr, K, X, xs, M, Y + r, N, br); break;
        case 4: dot_rows<4>(wr, K, X, xs, M, Y + r, N, br); break;
        case 3: dot_rows<3>(wr, K, X, xs, M, Y + r, N, br); break;
        case 2: dot_rows<2>(wr, K, X, xs, M, Y + r, N, br); break;
        default: dot_rows<1>(wr, K, X, xs, M, Y + r, N, br); break;
      }
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------
// rms_norm: returns (out, x + residual) when a residual is given, else (out, undefined).

std::vector<torch::Tensor> rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                    const torch::Tensor& weight, double eps) {
  check_f32(x, "x");
  check_f32(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be 2-D with contiguous rows");
  const int64_t M = x.size(0), H = x.size(1);
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == H, "rms_norm: weight must have ", H, " elements");
  const bool has_res = residual.has_value() && residual->defined();
  torch::Tensor sum;
  const float* R = nullptr;
  int64_t rs = 0;
  if (has_res) {
    check_f32(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1, "rms_norm: residual must match x");
    R = residual->data_ptr<float>();
    rs = residual->stride(0);
    sum = torch::empty({M, H}, x.options());
  }
  auto out = torch::empty({M, H}, x.options());
  const float* X = x.data_ptr<float>();
  const float* Wt = weight.data_ptr<float>();
  float* O = out.data_ptr<float>();
  float* S = has_res ? sum.data_ptr<float>() : nullptr;
  const int64_t xs = x.stride(0);
  const int64_t H8 = H & ~int64_t(7);
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, H)), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* xr = X + m * xs;
      if (has_res) {
        const float* rr = R + m * rs;
        float* sr = S + m * H;
        int64_t k = 0;
        for (; k < H8; k += 8) _mm256_storeu_ps(sr + k, _mm256_add_ps(_mm256_loadu_ps(xr + k), _mm256_loadu_ps(rr + k)));
        for (; k < H; ++k) sr[k] = xr[k] + rr[k];
        xr = sr;
      }
      __m256 acc = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k < H8; k += 8) {
        __m256 v = _mm256_loadu_ps(xr + k);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      float ss = hsum(acc);
      for (; k < H; ++k) ss += xr[k] * xr[k];
      const float scale = 1.0f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
      const __m256 sv = _mm256_set1_ps(scale);
      float* orow = O + m * H;
      for (k = 0; k < H8; k += 8) {
        __m256 h = _mm256_mul_ps(_mm256_loadu_ps(xr + k), sv);
        _mm256_storeu_ps(orow + k, _mm256_mul_ps(_mm256_loadu_ps(Wt + k), h));
      }
      for (; k < H; ++k) orow[k] = Wt[k] * (xr[k] * scale);
    }
  });
  return {out, sum};
}

// ---------------------------------------------------------------------------------------
// silu_and_mul

torch::Tensor silu_and_mul(const torch::Tensor& x) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "silu_and_mul: x must be [M, 2I]");
  const int64_t M = x.size(0), I = x.size(1) / 2;
  auto out = torch::empty({M, I}, x.options());
  const float* X = x.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t xs = x.stride(0);
  const int64_t I8 = I & ~int64_t(7);
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, I)), [&](int64_t begin, int64_t end) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t m = begin; m < end; ++m) {
      const float* g = X + m * xs;
      const float* u = g + I;
      float* o = O + m * I;
      int64_t k = 0;
      for (; k < I8; k += 8) {
        __m256 gv = _mm256_loadu_ps(g + k);
        __m256 e = exp256(_mm256_xor_ps(gv, sign));
        __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
        _mm256_storeu_ps(o + k, _mm256_mul_ps(s, _mm256_loadu_ps(u + k)));
      }
      for (; k < I; ++k) o[k] = g[k] / (1.0f + std::exp(-g[k])) * u[k];
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// rotary_neox: x[t, h, :rot] rotated in place; cache[pos] = cos[rot/2] | sin[rot/2].

void rotate(float* x, const float* cs, int64_t half) {
  const float* cosv = cs;
  const float* sinv = cs + half;
  float* x1 = x;
  float* x2 = x + half;
  int64_t k = 0;
  for (; k + 8 <= half; k += 8) {
    __m256 a = _mm256_loadu_ps(x1 + k), b = _mm256_loadu_ps(x2 + k);
    __m256 c = _mm256_loadu_ps(cosv + k), s = _mm256_loadu_ps(sinv + k);
    _mm256_storeu_ps(x1 + k, _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s)));
    _mm256_storeu_ps(x2 + k, _mm256_add_ps(_mm256_mul_ps(b, c), _mm256_mul_ps(a, s)));
  }
  for (; k < half; ++k) {
    float a = x1[k], b = x2[k];
    x1[k] = a * cosv[k] - b * sinv[k];
    x2[k] = b * cosv[k] + a * sinv[k];
  }
}

void rotary_neox(const torch::Tensor& positions, torch::Tensor q, torch::Tensor k, const torch::Tensor& cache,
                 int64_t head_dim, int64_t rotary_dim) {
  check_f32(q, "q");
  check_f32(k, "k");
  check_f32(cache, "cos_sin_cache");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.is_contiguous(), "positions must be int64");
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.stride(1) == 1 && k.stride(1) == 1, "q and k must be [T, heads*D]");
  TORCH_CHECK(cache.is_contiguous() && cache.size(1) == rotary_dim && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
              "rotary_neox: bad cos/sin cache");
  const int64_t T = q.size(0), hq = q.size(1) / head_dim, hk = k.size(1) / head_dim;
  const int64_t* P = positions.data_ptr<int64_t>();
  const float* C = cache.data_ptr<float>();
  const int64_t max_pos = cache.size(0);
  float* Q = q.data_ptr<float>();
  float* Kp = k.data_ptr<float>();
  const int64_t qs = q.stride(0), ks = k.stride(0), half = rotary_dim / 2;
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(P[t] >= 0 && P[t] < max_pos, "position ", P[t], " is out of range");
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* cs = C + P[t] * rotary_dim;
      for (int64_t h = 0; h < hq; ++h) rotate(Q + t * qs + h * head_dim, cs, half);
      for (int64_t h = 0; h < hk; ++h) rotate(Kp + t * ks + h * head_dim, cs, half);
    }
  });
}

// ---------------------------------------------------------------------------------------
// paged_attention
//
// Query row r of q ([T, H*D]) belongs to sequence seq_idx[r] and attends to the first
// ctx_lens[r] tokens of it (its own position + 1: causal), or with a sliding window W > 0
// to the last W of them only (the blocks before those are never read), whose K/V live in blocks
// block_table[seq_idx[r], :] of the caches ([num_blocks, block_size, KVH, D]). The
// step's own K and V rows (k, v: [T, KVH*D]) are first written to the caches at
// slot_mapping. Returns out ([T, H*D]). So one call serves decodes, fresh prompts
// and prompt chunks that continue a sequence alike. A row with ctx_lens 0 only has its K/V
// written; its output is left to the caller (long prompts that torch's flash attention takes).
// One task per (row, KV head), handed out dynamically (a prompt's later rows have
// longer contexts); the G = H / KVH query heads that share a KV head take its K and V
// rows together, a tile at a time, and consecutive rows of a prompt share them too. A
// small batch's decode rows also cut their contexts into parts, so that both threads work.

// The caches' element types: float32, or float16 / bfloat16 (--kv-cache-dtype), widened to
// float32 exactly as they are read; the step's K/V are rounded to nearest even when written,
// as torch's .to() rounds. Everything after the read is float32, whatever the cache holds.
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const half_t* p) { return widen_f16x8(p); }
inline __m256 load8(const bf16_t* p) { return widen_bf16x8(p); }

// dst[0:n] = src[0:n] in the cache's type; n is a multiple of 8.
inline void store_row(const float* src, float* dst, int64_t n) { std::copy_n(src, n, dst); }
inline void store_row(const float* src, half_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store_row(const float* src, bf16_t* dst, int64_t n) {
  const __m256i one = _mm256_set1_epi32(1), half_ulp = _mm256_set1_epi32(0x7fff), quiet = _mm256_set1_epi32(0x40);
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    const __m256i u = _mm256_castps_si256(x);
    // Round to nearest even: add 0x7fff plus the lowest kept bit, keep the top 16 bits.
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(half_ulp, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
    r = _mm256_srli_epi32(r, 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN stays a (quiet) NaN
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), quiet), nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_castsi256_si128(packed));
  }
}

// The largest of s[0:L] (-inf when L is 0).
inline float row_max(const float* s, int64_t L) {
  __m256 mxv = _mm256_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 8 <= L; t += 8) mxv = _mm256_max_ps(mxv, _mm256_loadu_ps(s + t));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mxv), _mm256_extractf128_ps(mxv, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  float mx = _mm_cvtss_f32(m4);
  for (; t < L; ++t) mx = std::max(mx, s[t]);
  return mx;
}

// s[0:L] = exp(s - mx) in place; returns their sum.
inline float exp_sum(float* s, int64_t L, float mx) {
  const __m256 mv = _mm256_set1_ps(mx);
  __m256 sumv = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= L; t += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
    _mm256_storeu_ps(s + t, e);
    sumv = _mm256_add_ps(sumv, e);
  }
  float sum = hsum(sumv);
  for (; t < L; ++t) {
    s[t] = std::exp(s[t] - mx);
    sum += s[t];
  }
  return sum;
}

// Softmax of scores s[0:L] in place, unnormalized; returns 1 / their sum.
inline float softmax_unnormalized(float* s, int64_t L) { return 1.0f / exp_sum(s, L, row_max(s, L)); }

// Scores of one query head (D = 8 * D8 floats, held in registers) against L context tokens
// at off[t] in the key cache, times scale, into s: 4 tokens at a time, two accumulators
// each, so the FMA chains overlap.
// With VC (the first head of a decode tile), it also asks for the rows it will need soon,
// into L2: the K rows kPrefetchKeys tokens ahead (up to `ahead` tokens past off[0]) and the
// V rows of these tokens, which the P V pass reads next; attend_group asks for a task's
// first keys all at once. Without the hints the reads and the arithmetic took turns: 64
// decode rows of SmolLM2 took 1.28 ms a layer with the K/V in memory and 0.53 ms with it
// in L3 (AMD EPYC, AVX-512); with them 0.99 ms. In the 64-request workload the attention
// calls took 3.95-3.99 s instead of 4.74-5.32 s (distance 16: no gain; 128: no better).
constexpr int64_t kPrefetchKeys = 64;

template <int D8, class T>
inline void prefetch_rows(const T* base, const int64_t* off, int64_t from, int64_t to) {
  constexpr int64_t bytes = static_cast<int64_t>(sizeof(T)) * 8 * D8;
  for (int64_t t = from; t < to; ++t)
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(base + off[t]) + b, _MM_HINT_T1);
}

template <int D8, class T>
inline void key_scores(const float* q, const T* KC, const int64_t* off, int64_t L, float scale, float* s,
                       const T* VC = nullptr, int64_t ahead = 0) {
  __m256 qv[D8];
  for (int i = 0; i < D8; ++i) qv[i] = _mm256_loadu_ps(q + 8 * i);
  const __m128 scv = _mm_set1_ps(scale);
  int64_t t = 0;
  for (; t + 4 <= L; t += 4) {
    if (VC) {
      prefetch_rows<D8>(KC, off, std::min(t + kPrefetchKeys, ahead), std::min(t + 4 + kPrefetchKeys, ahead));
      prefetch_rows<D8>(VC, off, t, t + 4);
    }
    const T* k0 = KC + off[t];
    const T* k1 = KC + off[t + 1];
    const T* k2 = KC + off[t + 2];
    const T* k3 = KC + off[t + 3];
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int i = 0; i < D8; i += 2) {
      a0 = _mm256_fmadd_ps(qv[i], load8(k0 + 8 * i), a0);
      a1 = _mm256_fmadd_ps(qv[i], load8(k1 + 8 * i), a1);
      a2 = _mm256_fmadd_ps(qv[i], load8(k2 + 8 * i), a2);
      a3 = _mm256_fmadd_ps(qv[i], load8(k3 + 8 * i), a3);
      b0 = _mm256_fmadd_ps(qv[i + 1], load8(k0 + 8 * i + 8), b0);
      b1 = _mm256_fmadd_ps(qv[i + 1], load8(k1 + 8 * i + 8), b1);
      b2 = _mm256_fmadd_ps(qv[i + 1], load8(k2 + 8 * i + 8), b2);
      b3 = _mm256_fmadd_ps(qv[i + 1], load8(k3 + 8 * i + 8), b3);
    }
    __m128 dots = hsum4(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2), _mm256_add_ps(a3, b3));
    _mm_storeu_ps(s + t, _mm_mul_ps(dots, scv));
  }
  for (; t < L; ++t) {
    const T* k0 = KC + off[t];
    __m256 a0 = _mm256_setzero_ps();
    for (int i = 0; i < D8; ++i) a0 = _mm256_fmadd_ps(qv[i], load8(k0 + 8 * i), a0);
    s[t] = hsum(a0) * scale;
  }
}

// Decode rows: the G query heads of one KV head over L context tokens at off[t], kDecodeKeys
// tokens at a time, so that each tile's K and V rows come from memory once and serve every
// head from L1. (Head by head, a long context's K/V was read G times over, from L3 or
// memory: SmolLM2 at 4,096 tokens, batch 1, ran at 6.3 GB/s of K/V.) An online softmax
// runs across the tiles; the result is each head's running maximum m[g], sum l[g] and
// unnormalized output o[g * D ..] (the attention is o / l), so that parts of one context
// taken by different tasks merge by log-sum-exp. s: G * kDecodeKeys floats of scratch.
constexpr int64_t kDecodeKeys = 128;

template <int D8, class T>
void attend_group(const float* q, int64_t G, const T* KC, const T* VC, const int64_t* off, int64_t L,
                  float scale, float* m, float* l, float* o, float* s) {
  constexpr int D = 8 * D8;
  prefetch_rows<D8>(KC, off, 0, std::min(kPrefetchKeys, L));  // the first keys, all asked for at once
  for (int64_t g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
    std::fill(o + g * D, o + (g + 1) * D, 0.0f);
  }
  for (int64_t t0 = 0; t0 < L; t0 += kDecodeKeys) {
    const int64_t n = std::min(kDecodeKeys, L - t0);
    for (int64_t g = 0; g < G; ++g) {
      float* sg = s + g * kDecodeKeys;
      if (g == 0)
        key_scores<D8>(q, KC, off + t0, n, scale, sg, VC, L - t0);
      else
        key_scores<D8>(q + g * D, KC, off + t0, n, scale, sg);
      const float mx = std::max(m[g], row_max(sg, n));
      const __m256 alpha = _mm256_set1_ps(std::exp(m[g] - mx));  // 0 on the first tile (m = -inf)
      m[g] = mx;
      l[g] = l[g] * _mm256_cvtss_f32(alpha) + exp_sum(sg, n, mx);
      __m256 acc[D8];
      for (int i = 0; i < D8; ++i) acc[i] = _mm256_mul_ps(_mm256_loadu_ps(o + g * D + 8 * i), alpha);
      for (int64_t t = 0; t < n; ++t) {
        const T* v = VC + off[t0 + t];
        const __m256 p = _mm256_set1_ps(sg[t]);
        for (int i = 0; i < D8; ++i) acc[i] = _mm256_fmadd_ps(p, load8(v + 8 * i), acc[i]);
      }
      for (int i = 0; i < D8; ++i) _mm256_storeu_ps(o + g * D + 8 * i, acc[i]);
    }
  }
}

// The same for any D = 8 * D8 <= 256, with the query and accumulators in memory.
template <class T>
void attend_any(const float* q, int64_t D8, const T* KC, const T* VC, const int64_t* off, int64_t L,
                float scale, float* s, float* out) {
  for (int64_t t = 0; t < L; ++t) {
    const T* k0 = KC + off[t];
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t i = 0; i < D8; ++i) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i), load8(k0 + 8 * i), a0);
    s[t] = hsum(a0) * scale;
  }
  const float inv = softmax_unnormalized(s, L);
  float acc[256] = {0.0f};
  for (int64_t t = 0; t < L; ++t) {
    const T* v = VC + off[t];
    const __m256 p = _mm256_set1_ps(s[t]);
    for (int64_t i = 0; i < D8; ++i)
      _mm256_storeu_ps(acc + 8 * i, _mm256_fmadd_ps(p, load8(v + 8 * i), _mm256_loadu_ps(acc + 8 * i)));
  }
  const __m256 iv = _mm256_set1_ps(inv);
  for (int64_t i = 0; i < D8; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(_mm256_loadu_ps(acc + 8 * i), iv));
}

// Prompt rows in tiles: up to kQRows consecutive rows of one sequence (positions p, p+1, ...)
// and the G query heads of one KV head meet each K and V row once, kKeyTile keys at a time,
// with the running maximum and sum of an online softmax (FlashAttention's loop). Row by row,
// a 7,000-token prompt read its whole K/V again for every row and head, from L3 or memory;
// a tile reads it once for up to kQRows * G queries (SmolLM2, 7,000 tokens on a 2-core Xeon:
// attention 21 s against about 90 s). Scores come from the tile's K rows transposed into kt
// ([D, kKeyTile], in L1): a broadcast query value times 8 keys at once, no horizontal sums.
// Causal: row i of the tile sees the first ctx[i] keys.
constexpr int kQRows = 32;
constexpr int kKeyTile = 64;

// a[u] += p0[i] * row(i)[8u..8u+8), b[u] += p1[i] * row(i)[...] for i < n: two rows of
// weights against 32 columns, each row(i) load serving both (the tile's scores and P V).
template <class Row>
inline void fma_two_by_32(const float* p0, const float* p1, int64_t n, Row row, __m256 a[4], __m256 b[4]) {
  for (int64_t i = 0; i < n; ++i) {
    const auto* r = row(i);  // float (the transposed keys) or the cache's type (V rows)
    const __m256 x0 = _mm256_broadcast_ss(p0 + i), x1 = _mm256_broadcast_ss(p1 + i);
    for (int u = 0; u < 4; ++u) {
      const __m256 v = load8(r + 8 * u);
      a[u] = _mm256_fmadd_ps(x0, v, a[u]);
      b[u] = _mm256_fmadd_ps(x1, v, b[u]);
    }
  }
}

struct TileScratch {
  std::vector<float> q, o, s, m, l, kt;
  void reserve(int64_t nq, int64_t D) {
    q.resize(nq * D);
    o.resize(nq * D);
    s.resize(nq * kKeyTile);
    m.resize(nq);
    l.resize(nq);
    kt.resize(D * kKeyTile);
  }
};

// Rows r0 .. r0+n of q/out (stride qs/os floats), KV head kh's G query heads at q + g * D;
// ctx[i]: row i's context length (nondecreasing); off[t]: token t's K/V row in the caches.
template <int D8, class T>
void attend_tile(const float* q, int64_t qs, float* out, int64_t os, int n, int G, const int32_t* ctx,
                 const T* KC, const T* VC, const int64_t* off, float scale, TileScratch& w) {
  constexpr int D = 8 * D8;
  const int nq = n * G;  // query qi = i * G + g
  w.reserve(nq, D);
  float* Q = w.q.data();
  float* O = w.o.data();
  float* S = w.s.data();
  float* M = w.m.data();
  float* Lsum = w.l.data();
  float* KT = w.kt.data();
  const __m256 sc = _mm256_set1_ps(scale);
  for (int i = 0; i < n; ++i)
    for (int g = 0; g < G; ++g)
      for (int v = 0; v < D8; ++v)
        _mm256_storeu_ps(Q + (i * G + g) * D + 8 * v, _mm256_mul_ps(_mm256_loadu_ps(q + i * qs + g * D + 8 * v), sc));
  std::fill(O, O + nq * D, 0.0f);
  std::fill(M, M + nq, -INFINITY);
  std::fill(Lsum, Lsum + nq, 0.0f);
  const int64_t keys = ctx[n - 1];
  for (int64_t t0 = 0; t0 < keys; t0 += kKeyTile) {
    const int kt = static_cast<int>(std::min<int64_t>(kKeyTile, keys - t0));
    // K rows t0 .. t0+kt as columns: KT[d * kKeyTile + j] (columns past kt: zeros).
    for (int j = 0; j < kKeyTile; ++j) {
      if (j < kt) {
        const T* kr = KC + off[t0 + j];
        for (int d0 = 0; d0 < D; d0 += 8) {
          alignas(32) float row[8];
          _mm256_store_ps(row, load8(kr + d0));
          for (int d = 0; d < 8; ++d) KT[(d0 + d) * kKeyTile + j] = row[d];
        }
      } else {
        for (int d = 0; d < D; ++d) KT[d * kKeyTile + j] = 0.0f;
      }
    }
    // Scores: two queries by 32 keys at a time (8 accumulators).
    for (int qi = 0; qi < nq; qi += 2) {
      const bool two = qi + 1 < nq;
      const float* q0 = Q + qi * D;
      const float* q1 = two ? q0 + D : q0;
      for (int j0 = 0; j0 < kKeyTile; j0 += 32) {
        __m256 a[4], b[4];
        for (int u = 0; u < 4; ++u) a[u] = b[u] = _mm256_setzero_ps();
        fma_two_by_32(q0, q1, D, [&](int64_t d) { return KT + d * kKeyTile + j0; }, a, b);
        for (int u = 0; u < 4; ++u) {
          _mm256_storeu_ps(S + qi * kKeyTile + j0 + 8 * u, a[u]);
          if (two) _mm256_storeu_ps(S + (qi + 1) * kKeyTile + j0 + 8 * u, b[u]);
        }
      }
    }
    // Online softmax, query by query: P = exp(S - max) over the keys the row sees, zeros past
    // them; the running sum and the output so far rescaled by exp(old max - new max).
    for (int qi = 0; qi < nq; ++qi) {
      const int64_t valid = std::min<int64_t>(kt, ctx[qi / G] - t0);  // keys this row sees in the tile
      float* srow = S + qi * kKeyTile;
      if (valid <= 0) {
        std::fill(srow, srow + kKeyTile, 0.0f);
        continue;
      }
      const float mx = std::max(M[qi], row_max(srow, valid));
      const float alpha = std::exp(M[qi] - mx);  // 0 on the first tile (M = -inf)
      M[qi] = mx;
      const float sum = exp_sum(srow, valid, mx);
      std::fill(srow + valid, srow + kKeyTile, 0.0f);
      Lsum[qi] = Lsum[qi] * alpha + sum;
      if (alpha != 1.0f) {
        const __m256 av = _mm256_set1_ps(alpha);
        float* orow = O + qi * D;
        for (int v = 0; v < D8; ++v) _mm256_storeu_ps(orow + 8 * v, _mm256_mul_ps(_mm256_loadu_ps(orow + 8 * v), av));
      }
    }
    // O += P V: two queries by 32 of the D values at a time (8 accumulators), so each V load
    // serves two queries; P is zero past a row's keys, so both run to the longer of the two.
    for (int qi = 0; qi < nq; qi += 2) {
      const bool two = qi + 1 < nq;
      const int qj = two ? qi + 1 : qi;
      const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(kt, ctx[qj / G] - t0));
      if (valid == 0) continue;
      const float* p0 = S + qi * kKeyTile;
      const float* p1 = S + qj * kKeyTile;
      for (int v0 = 0; v0 < D8; v0 += 4) {
        float* o0 = O + qi * D + 8 * v0;
        float* o1 = O + qj * D + 8 * v0;
        __m256 a[4], b[4];
        for (int u = 0; u < 4; ++u) {
          a[u] = _mm256_loadu_ps(o0 + 8 * u);
          b[u] = _mm256_loadu_ps(o1 + 8 * u);
        }
        fma_two_by_32(p0, p1, valid, [&](int64_t j) { return VC + off[t0 + j] + 8 * v0; }, a, b);
        for (int u = 0; u < 4; ++u) {
          _mm256_storeu_ps(o0 + 8 * u, a[u]);
          if (two) _mm256_storeu_ps(o1 + 8 * u, b[u]);
        }
      }
    }
  }
  for (int i = 0; i < n; ++i)
    for (int g = 0; g < G; ++g) {
      const int qi = i * G + g;
      const __m256 inv = _mm256_set1_ps(1.0f / Lsum[qi]);
      for (int v = 0; v < D8; ++v)
        _mm256_storeu_ps(out + i * os + g * D + 8 * v, _mm256_mul_ps(_mm256_loadu_ps(O + qi * D + 8 * v), inv));
    }
}

// T: the caches' element type (float, half_t or bf16_t); paged_attention below picks it.
template <class T>
torch::Tensor paged_attention_t(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                torch::Tensor key_cache, torch::Tensor value_cache, const torch::Tensor& slot_mapping,
                                const torch::Tensor& block_table, const torch::Tensor& seq_idx,
                                const torch::Tensor& ctx_lens, int64_t num_heads, double scale, int64_t window) {
  check_f32(q, "q");
  check_f32(k, "k");
  check_f32(v, "v");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  value_cache.sizes() == key_cache.sizes(), "caches must be contiguous [blocks, block_size, kv_heads, D]");
  TORCH_CHECK(block_table.scalar_type() == torch::kInt32 && block_table.dim() == 2 && block_table.is_contiguous(),
              "block_table must be contiguous int32 [sequences, max_blocks]");
  TORCH_CHECK(seq_idx.scalar_type() == torch::kInt32 && ctx_lens.scalar_type() == torch::kInt32 &&
                  seq_idx.is_contiguous() && ctx_lens.is_contiguous(), "seq_idx and ctx_lens must be contiguous int32");
  const int64_t R = q.size(0), S = block_table.size(0), max_blocks = block_table.size(1);
  TORCH_CHECK(seq_idx.numel() == R && ctx_lens.numel() == R, "one seq_idx and ctx_len per row");
  const int64_t nblk = key_cache.size(0), bs = key_cache.size(1), KVH = key_cache.size(2), D = key_cache.size(3);
  TORCH_CHECK(num_heads % KVH == 0 && q.size(1) == num_heads * D, "head counts");
  TORCH_CHECK(D % 8 == 0 && D <= 256, "head_dim must be a multiple of 8, at most 256");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: the whole context)");
  TORCH_CHECK(q.stride(1) == 1 && k.stride(1) == 1 && v.stride(1) == 1, "q, k and v rows must be contiguous");
  TORCH_CHECK(k.dim() == 2 && v.dim() == 2 && k.size(0) >= R && v.size(0) >= R && k.size(1) == KVH * D &&
                  v.size(1) == KVH * D, "k and v must be [tokens, kv_heads * head_dim]");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.is_contiguous() && slot_mapping.numel() >= R,
              "slot_mapping must be contiguous int64 with a slot per row");
  const int64_t G = num_heads / KVH;
  const int32_t* BT = block_table.data_ptr<int32_t>();
  const int32_t* SI = seq_idx.data_ptr<int32_t>();
  const int32_t* CL = ctx_lens.data_ptr<int32_t>();
  // Everything is checked here: the parallel region below must not throw.
  // The blocks each sequence's rows read: [first, end) in tokens.
  std::vector<int64_t> longest(S, 0), first_read(S, INT64_MAX);
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(SI[r] >= 0 && SI[r] < S, "row ", r, ": sequence ", SI[r], " is not in the block table");
    TORCH_CHECK(CL[r] >= 0 && CL[r] <= max_blocks * bs, "row ", r, ": context ", CL[r], " does not fit the block table");
    if (CL[r] == 0) continue;  // skipped
    longest[SI[r]] = std::max<int64_t>(longest[SI[r]], CL[r]);
    first_read[SI[r]] = std::min<int64_t>(first_read[SI[r]], window > 0 ? std::max<int64_t>(0, CL[r] - window) : 0);
  }
  for (int64_t i = 0; i < S; ++i)
    for (int64_t j = longest[i] ? first_read[i] / bs : 0; j * bs < longest[i]; ++j)
      TORCH_CHECK(BT[i * max_blocks + j] >= 0 && BT[i * max_blocks + j] < nblk, "block id ", BT[i * max_blocks + j],
                  " out of range");
  // The step's own K/V go to their slots first (rows may attend to earlier rows).
  const int64_t tok_stride = KVH * D;  // between consecutive tokens of a block
  const int64_t* SM = slot_mapping.data_ptr<int64_t>();
  T* KCw = reinterpret_cast<T*>(key_cache.data_ptr());
  T* VCw = reinterpret_cast<T*>(value_cache.data_ptr());
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(SM[r] >= 0 && SM[r] < nblk * bs, "row ", r, ": slot ", SM[r], " is outside the cache");
    store_row(k.data_ptr<float>() + r * k.stride(0), KCw + SM[r] * tok_stride, tok_stride);
    store_row(v.data_ptr<float>() + r * v.stride(0), VCw + SM[r] * tok_stride, tok_stride);
  }
  auto out = torch::empty({R, num_heads * D}, q.options());
  const float* Q = q.data_ptr<float>();
  const T* KC = KCw;
  const T* VC = VCw;
  float* O = out.data_ptr<float>();
  const int64_t qs = q.stride(0), os = out.stride(0);
  const float sc = static_cast<float>(scale);
  const int64_t D8 = D / 8;
  // Few tasks (decode at small batch: SmolLM2's 3 KV heads at batch 1) are handed out one at
  // a time: in chunks of four, three tasks went to one thread and the other sat idle.
  // Prompt rows (runs of at least kQRows / 2 consecutive positions of one sequence) go in
  // tiles of up to kQRows rows (attend_tile), without a sliding window and for head_dim 64 or
  // 128; the other rows (decodes, short chunks, windows) one at a time.
  std::vector<int64_t> single, tile_start, tile_rows;
  for (int64_t r = 0; r < R;) {
    if (CL[r] == 0) {  // skipped
      ++r;
      continue;
    }
    int64_t e = r + 1;
    while (e < R && SI[e] == SI[r] && CL[e] == CL[e - 1] + 1) ++e;
    if (window == 0 && (D8 == 8 || D8 == 16) && e - r >= kQRows / 2) {
      for (int64_t t = r; t < e; t += kQRows) {
        tile_start.push_back(t);
        tile_rows.push_back(std::min<int64_t>(kQRows, e - t));
      }
    } else {
      for (int64_t t = r; t < e; ++t) single.push_back(t);
    }
    r = e;
  }
  const int64_t max_threads = at::get_num_threads();
  const int64_t nsingle = static_cast<int64_t>(single.size());
  // Rows one at a time: head_dim 64 or 128 take a KV head's G query heads together
  // (attend_group); if that makes too few tasks to go round (decode at a small batch), each
  // context is cut into up to `split` parts of at least kMinPartKeys tokens, merged by
  // log-sum-exp at the end. Other head sizes split the query heads over tasks instead.
  constexpr int64_t kMinPartKeys = 2 * kDecodeKeys;
  const bool grouped = D8 == 8 || D8 == 16;
  int64_t split = 1;
  if (nsingle > 0 && nsingle * KVH < 4 * max_threads) {
    if (grouped) {
      int64_t longest_ctx = 0;
      for (int64_t r : single)
        longest_ctx = std::max<int64_t>(longest_ctx, window > 0 ? std::min<int64_t>(CL[r], window) : CL[r]);
      split = std::max<int64_t>(1, std::min<int64_t>((16 * max_threads + nsingle * KVH - 1) / (nsingle * KVH),
                                                     longest_ctx / kMinPartKeys));
    } else {
      split = G;
    }
  }
  const int64_t tasks = nsingle * KVH * split, chunk = tasks < 16 * max_threads ? 1 : 4;
  const int64_t part_floats = G * (D + 2);  // a part's m, l and o for the G heads
  std::vector<float> parts(grouped && split > 1 ? tasks * part_floats : 0);
  const int64_t tile_tasks = static_cast<int64_t>(tile_start.size()) * KVH;
  const int threads = static_cast<int>(std::min<int64_t>(max_threads, std::max<int64_t>(1, tasks + tile_tasks)));

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores;
    std::vector<int64_t> offsets;  // element offset of each context token's row in a cache
    TileScratch scratch;
    // Tiles first, longest contexts (the last tiles) first.
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t task = 0; task < tile_tasks; ++task) {
      const int64_t tile = static_cast<int64_t>(tile_start.size()) - 1 - task / KVH, kh = task % KVH;
      const int64_t r0 = tile_start[tile], n = tile_rows[tile];
      const int64_t L = CL[r0 + n - 1];
      const int32_t* table = BT + SI[r0] * max_blocks;
      offsets.resize(L);
      for (int64_t t = 0; t < L; ++t) offsets[t] = (table[t / bs] * bs + t % bs) * tok_stride + kh * D;
      const float* qb = Q + r0 * qs + kh * G * D;
      float* ob = O + r0 * os + kh * G * D;
      if (D8 == 8)
        attend_tile<8>(qb, qs, ob, os, static_cast<int>(n), static_cast<int>(G), CL + r0, KC, VC, offsets.data(), sc, scratch);
      else
        attend_tile<16>(qb, qs, ob, os, static_cast<int>(n), static_cast<int>(G), CL + r0, KC, VC, offsets.data(), sc, scratch);
    }
    std::vector<float> own(grouped ? part_floats : 0);  // m, l, o of an unsplit task
#pragma omp for schedule(dynamic, chunk)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t r = single[task / (KVH * split)], kh = task / split % KVH, part = task % split;
      const int64_t end = CL[r], first = window > 0 ? std::max<int64_t>(0, end - window) : 0;
      const int32_t* table = BT + SI[r] * max_blocks;
      const float* qb = Q + r * qs + kh * G * D;
      float* ob = O + r * os + kh * G * D;
      if (grouped) {
        const int64_t b = first + part * (end - first) / split, e = first + (part + 1) * (end - first) / split;
        offsets.resize(e - b);
        for (int64_t t = b; t < e; ++t) offsets[t - b] = (table[t / bs] * bs + t % bs) * tok_stride + kh * D;
        scores.resize(G * kDecodeKeys);
        float* mlo = split > 1 ? parts.data() + task * part_floats : own.data();  // m [G], l [G], o [G, D]
        if (D8 == 8)
          attend_group<8>(qb, G, KC, VC, offsets.data(), e - b, sc, mlo, mlo + G, mlo + 2 * G, scores.data());
        else
          attend_group<16>(qb, G, KC, VC, offsets.data(), e - b, sc, mlo, mlo + G, mlo + 2 * G, scores.data());
        if (split == 1)
          for (int64_t g = 0; g < G; ++g) {
            const float inv = 1.0f / mlo[G + g];
            for (int64_t i = 0; i < D; ++i) ob[g * D + i] = mlo[2 * G + g * D + i] * inv;
          }
        continue;
      }
      const int64_t L = end - first;
      offsets.resize(L);
      for (int64_t t = first; t < end; ++t)
        offsets[t - first] = (table[t / bs] * bs + t % bs) * tok_stride + kh * D;
      scores.resize(L);
      for (int64_t g = part * G / split; g < (part + 1) * G / split; ++g)
        attend_any(qb + g * D, D8, KC, VC, offsets.data(), L, sc, scores.data(), ob + g * D);
    }
    if (!parts.empty()) {  // the parts of each (row, KV head) merged by log-sum-exp
#pragma omp for schedule(static)
      for (int64_t rk = 0; rk < nsingle * KVH; ++rk) {
        const int64_t r = single[rk / KVH], kh = rk % KVH;
        const float* first_part = parts.data() + rk * split * part_floats;
        float* ob = O + r * os + kh * G * D;
        for (int64_t g = 0; g < G; ++g) {
          float mx = -INFINITY;
          for (int64_t p = 0; p < split; ++p) mx = std::max(mx, first_part[p * part_floats + g]);
          float den = 0.0f;
          std::fill(ob + g * D, ob + (g + 1) * D, 0.0f);
          for (int64_t p = 0; p < split; ++p) {
            const float* mlo = first_part + p * part_floats;
            if (mlo[G + g] == 0.0f) continue;  // an empty part
            const float w = std::exp(mlo[g] - mx);
            den += w * mlo[G + g];
            for (int64_t i = 0; i < D; ++i) ob[g * D + i] += w * mlo[2 * G + g * D + i];
          }
          const float inv = 1.0f / den;
          for (int64_t i = 0; i < D; ++i) ob[g * D + i] *= inv;
        }
      }
    }
  }
  return out;
}

torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              torch::Tensor key_cache, torch::Tensor value_cache, const torch::Tensor& slot_mapping,
                              const torch::Tensor& block_table, const torch::Tensor& seq_idx,
                              const torch::Tensor& ctx_lens, int64_t num_heads, double scale, int64_t window) {
  const auto type = key_cache.scalar_type();
  TORCH_CHECK(key_cache.device().is_cpu() && value_cache.device().is_cpu() && value_cache.scalar_type() == type &&
                  (type == torch::kFloat32 || type == torch::kFloat16 || type == torch::kBFloat16),
              "key_cache and value_cache must be CPU tensors of one dtype: float32, float16 or bfloat16");
  if (type == torch::kFloat16)
    return paged_attention_t<half_t>(q, k, v, key_cache, value_cache, slot_mapping, block_table, seq_idx, ctx_lens,
                                     num_heads, scale, window);
  if (type == torch::kBFloat16)
    return paged_attention_t<bf16_t>(q, k, v, key_cache, value_cache, slot_mapping, block_table, seq_idx, ctx_lens,
                                     num_heads, scale, window);
  return paged_attention_t<float>(q, k, v, key_cache, value_cache, slot_mapping, block_table, seq_idx, ctx_lens,
                                  num_heads, scale, window);
}

// ---------------------------------------------------------------------------------------
// argmax_rows: two passes over each row: its maximum (and whether it holds a NaN), then the
// first index holding it. A row of a 49k vocabulary is 192 KiB, so the second pass, which
// stops at the maximum, reads from L2.

int64_t argmax_row(const float* x, int64_t n) {
  __m256 vmax = _mm256_set1_ps(-INFINITY), vnan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float m = lanes[0];
  for (int k = 1; k < 8; ++k) m = lanes[k] > m ? lanes[k] : m;
  bool nan = _mm256_movemask_ps(vnan) != 0;
  for (; i < n; ++i) {
    if (std::isnan(x[i])) nan = true;
    else if (x[i] > m) m = x[i];
  }
  if (nan) {
    for (i = 0; i < n; ++i) if (std::isnan(x[i])) return i;
  }
  const __m256 target = _mm256_set1_ps(m);
  for (i = 0; i + 8 <= n; i += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ));
    if (mask) return i + __builtin_ctz(mask);
  }
  for (; i < n; ++i) if (x[i] == m) return i;
  return 0;  // unreachable: m is one of the row's values
}

torch::Tensor argmax_rows(const torch::Tensor& x) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) > 0, "argmax_rows: x must be a non-empty 2-D "
              "float32 matrix with contiguous rows");
  const int64_t M = x.size(0), N = x.size(1), xs = x.stride(0);
  auto out = torch::empty({M}, x.options().dtype(torch::kInt64));
  const float* X = x.data_ptr<float>();
  int64_t* O = out.data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) O[r] = argmax_row(X + r * xs, N);
  });
  return out;
}

}  // namespace piston_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &piston_cpu::linear, "y = x @ w.T + b for small batches", py::arg("x"), py::arg("weight"),
        py::arg("bias") = py::none());
  m.def("rms_norm", &piston_cpu::rms_norm, "RMSNorm, optionally after adding a residual", py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("eps"));
  m.def("silu_and_mul", &piston_cpu::silu_and_mul, "silu(x[:, :I]) * x[:, I:]");
  m.def("rotary_neox", &piston_cpu::rotary_neox, "rotate-half RoPE of q and k in place");
  m.def("paged_attention", &piston_cpu::paged_attention, "causal attention of query rows over a paged KV cache");
  m.def("argmax_rows", &piston_cpu::argmax_rows, "torch.argmax(x, dim=-1) of a float32 matrix, at memory speed");
  bind_quant_kernels(m);
  bind_lora_kernels(m);
  bind_moe_kernels(m);
  bind_decoder_stack(m);
  bind_packed_gemm(m);
  bind_greedy_head(m);
}
