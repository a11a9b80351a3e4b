// A float32 GEMM over weights packed once at load: y[M,N] = x[M,K] @ w[N,K]^T (+ b), for the
// batches of a step (one row to a few thousand), decode-sized ones above all, where
// torch's GEMM is slowest.
//
// torch's CPU GEMM packs W into its own panel layout on every call (about 25 ms a step over
// SmolLM2's 424 MB of linear weights) and reaches 0.5-0.7 of the matmul peak at 64 rows.
// Here W is packed once, kPackedWidth output columns side by side for every input
// ([ceil(N/w), K, w], zero-padded), so a block streams contiguously: a tile of rows of x by
// the block's columns stays in registers while K runs, one broadcast of x and two loads of W
// per two multiply-adds per row. The next block of W is asked for into L2 while the first
// rows meet this one.
//   AVX-512: blocks of 32 columns (two zmm), tiles of up to 12 rows (24 accumulators);
//   AVX2:    blocks of 16 columns (two ymm), tiles of up to 6 rows (12 accumulators).
// Measured in benchmarks/RESULTS.md (2026-12-06 (later)): at or above torch's 2048 x 2048
// matmul rate on SmolLM2's shapes from 32 rows on, with AVX-512.
//
// piston_cpu/packed_weights.py keeps the packed copies (and packs them again after the
// weights change); layer_kernels.py and decoder_stack.cpp call packed_linear.
// packed_gemm_decoded runs the same tiles over blocks made on the fly, one at a time into
// a buffer in L2: quant_kernels.cpp decodes GGUF blocks into it for batches past its
// register path.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "kernel_ops.h"

namespace piston_cpu {

int64_t packed_gemm_width() { return kPackedWidth; }

namespace {

void check_packed(const torch::Tensor& wp, int64_t n, int64_t k) {
  TORCH_CHECK(wp.scalar_type() == torch::kFloat32 && wp.device().is_cpu() && wp.is_contiguous(),
              "packed_linear: the packed weight must be a contiguous float32 CPU tensor");
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == kPackedWidth && wp.size(1) == k &&
                  wp.size(0) == (n + kPackedWidth - 1) / kPackedWidth,
              "packed_linear: a packed weight of ", n, " outputs and ", k, " inputs has shape [",
              (n + kPackedWidth - 1) / kPackedWidth, ", ", k, ", ", kPackedWidth, "], not ", wp.sizes());
}

#ifdef __AVX512F__
constexpr int kMaxTileRows = 12;  // 24 accumulators, 2 weight registers, 1 broadcast: 27 of 32 zmm
constexpr int64_t kRowChunk = 256;

// MR rows of x against one packed block (K x 32) into Y's 32 (or `ncols`) columns, plus the
// bias; `next`, when set, is the following block, asked for into L2 as this one runs.
template <int MR>
inline void tile(const float* X, int64_t xs, const float* Wp, int64_t K, float* Y, int64_t ys, int64_t ncols,
                 const float* bias, const float* next) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (next) {
      _mm_prefetch(reinterpret_cast<const char*>(next + k * kPackedWidth), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next + k * kPackedWidth + 16), _MM_HINT_T1);
    }
    const __m512 w0 = _mm512_loadu_ps(Wp + k * kPackedWidth), w1 = _mm512_loadu_ps(Wp + k * kPackedWidth + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 b = _mm512_set1_ps(X[r * xs + k]);
      acc[r][0] = _mm512_fmadd_ps(b, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(b, w1, acc[r][1]);
    }
  }
  const __mmask16 m0 = ncols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << ncols) - 1);
  const __mmask16 m1 = ncols >= 32 ? 0xFFFF : (ncols <= 16 ? 0 : static_cast<__mmask16>((1u << (ncols - 16)) - 1));
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  if (bias) {
    b0 = _mm512_maskz_loadu_ps(m0, bias);
    b1 = _mm512_maskz_loadu_ps(m1, bias + 16);
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(Y + r * ys, m0, bias ? _mm512_add_ps(acc[r][0], b0) : acc[r][0]);
    _mm512_mask_storeu_ps(Y + r * ys + 16, m1, bias ? _mm512_add_ps(acc[r][1], b1) : acc[r][1]);
  }
}
#else
constexpr int kMaxTileRows = 6;  // 12 accumulators, 2 weight registers, 1 broadcast: 15 of 16 ymm
constexpr int64_t kRowChunk = 256;

// The same with 8-wide registers over blocks of 16 columns.
template <int MR>
inline void tile(const float* X, int64_t xs, const float* Wp, int64_t K, float* Y, int64_t ys, int64_t ncols,
                 const float* bias, const float* next) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (next) _mm_prefetch(reinterpret_cast<const char*>(next + k * kPackedWidth), _MM_HINT_T1);
    const __m256 w0 = _mm256_loadu_ps(Wp + k * kPackedWidth), w1 = _mm256_loadu_ps(Wp + k * kPackedWidth + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 b = _mm256_broadcast_ss(X + r * xs + k);
      acc[r][0] = _mm256_fmadd_ps(b, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(b, w1, acc[r][1]);
    }
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(ncols)), lane);
  const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(ncols) - 8), lane);
  __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  if (bias) {
    b0 = _mm256_maskload_ps(bias, m0);
    b1 = _mm256_maskload_ps(bias + 8, m1);
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_maskstore_ps(Y + r * ys, m0, bias ? _mm256_add_ps(acc[r][0], b0) : acc[r][0]);
    _mm256_maskstore_ps(Y + r * ys + 8, m1, bias ? _mm256_add_ps(acc[r][1], b1) : acc[r][1]);
  }
}
#endif

// All M rows of x against one block, in tiles of near-equal height (64 rows: 6 tiles of 10
// or 11, not 5 of 12 and one of 4, whose short tile would load W for few multiply-adds).
void block_rows(const float* X, int64_t xs, int64_t M, const float* Wp, int64_t K, float* Y, int64_t ys,
                int64_t ncols, const float* bias, const float* next) {
  const int64_t tiles = (M + kMaxTileRows - 1) / kMaxTileRows;
  int64_t m = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t rows = (M - m) / (tiles - t) + ((M - m) % (tiles - t) != 0);
    const float* pf = t == 0 ? next : nullptr;
    const float* x = X + m * xs;
    float* y = Y + m * ys;
    switch (rows) {
#define PISTON_TILE(n) \
  case n: tile<n>(x, xs, Wp, K, y, ys, ncols, bias, pf); break;
      PISTON_TILE(1) PISTON_TILE(2) PISTON_TILE(3) PISTON_TILE(4) PISTON_TILE(5) PISTON_TILE(6)
#ifdef __AVX512F__
      PISTON_TILE(7) PISTON_TILE(8) PISTON_TILE(9) PISTON_TILE(10) PISTON_TILE(11) PISTON_TILE(12)
#endif
#undef PISTON_TILE
      default: TORCH_CHECK(false, "packed_linear: a tile of ", rows, " rows");
    }
    m += rows;
  }
}

}  // namespace

void packed_gemm_decoded(const float* X, int64_t xs, int64_t M, int64_t K, int64_t n, const float* bias, float* Y,
                         const std::function<void(int64_t, float*)>& decode) {
  const int64_t blocks = (n + kPackedWidth - 1) / kPackedWidth;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    // A block decoded here stays in L2 for the row tiles that meet it (48-192 KiB at K of
    // 384-1536); 64-byte aligned, so no load of it splits a cache line.
    std::vector<float> storage(K * kPackedWidth + 16);
    float* buf = storage.data() + (16 - reinterpret_cast<uintptr_t>(storage.data()) / 4 % 16) % 16;
    for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
      const int64_t rows = std::min<int64_t>(kRowChunk, M - m0);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t col = blk * kPackedWidth, ncols = std::min<int64_t>(kPackedWidth, n - col);
        decode(blk, buf);
        block_rows(X + m0 * xs, xs, rows, buf, K, Y + m0 * n + col, n, ncols, bias ? bias + col : nullptr, nullptr);
      }
    }
  });
}

torch::Tensor pack_linear_weight(const torch::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(),
              "pack_linear_weight: the weight must be a contiguous float32 [N, K] CPU tensor");
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + kPackedWidth - 1) / kPackedWidth;
  auto out = torch::empty({blocks, K, kPackedWidth}, w.options());
  const float* W = w.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* o = O + b * K * kPackedWidth;
      const int64_t cols = std::min<int64_t>(kPackedWidth, N - b * kPackedWidth);
      for (int64_t c = 0; c < kPackedWidth; ++c) {
        const float* row = c < cols ? W + (b * kPackedWidth + c) * K : nullptr;
        for (int64_t k = 0; k < K; ++k) o[k * kPackedWidth + c] = row ? row[k] : 0.0f;
      }
    }
  });
  return out;
}

torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& wp, int64_t n,
                            const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& out) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1,
              "packed_linear: x must be float32 [M, K] with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1);
  check_packed(wp, n, K);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == n,
                "packed_linear: the bias must be float32 with ", n, " elements");
    b = bias->data_ptr<float>();
  }
  torch::Tensor y;
  if (out.has_value() && out->defined()) {
    TORCH_CHECK(out->scalar_type() == torch::kFloat32 && out->dim() == 2 && out->size(0) == M && out->size(1) == n &&
                    out->is_contiguous(),
                "packed_linear: out must be a contiguous float32 [", M, ", ", n, "]");
    y = *out;
  } else {
    y = torch::empty({M, n}, x.options());
  }
  const float* X = x.data_ptr<float>();
  const float* W = wp.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t xs = x.stride(0), blocks = wp.size(0);
  // Past kRowChunk rows, x goes in chunks (outer) so that a chunk's rows stay in L2 while
  // the thread's blocks of W pass by, instead of all of x streaming from L3 for every block.
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
      const int64_t rows = std::min<int64_t>(kRowChunk, M - m0);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t col = blk * kPackedWidth, ncols = std::min<int64_t>(kPackedWidth, n - col);
        const float* next = blk + 1 < b1 ? W + (blk + 1) * K * kPackedWidth : nullptr;
        block_rows(X + m0 * xs, xs, rows, W + blk * K * kPackedWidth, K, Y + m0 * n + col, n, ncols,
                   b ? b + col : nullptr, next);
      }
    }
  });
  return y;
}

}  // namespace piston_cpu

void bind_packed_gemm(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("packed_gemm_width", &piston_cpu::packed_gemm_width, "the packed blocks' width in columns (32 or 16)");
  m.def("pack_linear_weight", &piston_cpu::pack_linear_weight,
        "a float32 [N, K] weight packed for packed_linear: [ceil(N / w), K, w], zero-padded (w: packed_gemm_width())", py::arg("weight"));
  m.def("packed_linear", &piston_cpu::packed_linear, "y = x @ W.T + b over a weight from pack_linear_weight",
        py::arg("x"), py::arg("packed"), py::arg("out_features"), py::arg("bias") = py::none(),
        py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
}
