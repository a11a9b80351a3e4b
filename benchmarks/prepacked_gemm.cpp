// An experiment for benchmarks/prepacked_gemm.py: a float32 GEMM y = x @ W.T over W packed
// once ([N / 32][K][32]: 32 output columns side by side for every input), AVX-512, MR rows
// of x by 32 columns held in registers while K runs. Not used by the engine.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

constexpr int NB = 32;

torch::Tensor pack(const torch::Tensor& w) {  // [N, K] -> [ceil(N/32), K, 32]
  const int64_t N = w.size(0), K = w.size(1), B = (N + NB - 1) / NB;
  auto out = torch::zeros({B, K, NB}, w.options());
  auto W = w.accessor<float, 2>();
  float* O = out.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) O[(n / NB) * K * NB + k * NB + n % NB] = W[n][k];
  return out;
}

// pf: the next block's packed W, asked for into L2 as this pass runs (its 128 bytes a k step
// match this block's), or null.
template <int MR>
inline void micro(const float* X, int64_t xs, const float* Wp, int64_t K, float* Y, int64_t ys, int64_t ncols,
                  const float* pf) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (pf) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + k * NB), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(pf + k * NB + 16), _MM_HINT_T1);
    }
    const __m512 w0 = _mm512_loadu_ps(Wp + k * NB), w1 = _mm512_loadu_ps(Wp + k * NB + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 b = _mm512_set1_ps(X[r * xs + k]);
      acc[r][0] = _mm512_fmadd_ps(b, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(b, w1, acc[r][1]);
    }
  }
  const __mmask16 m0 = ncols >= 16 ? 0xFFFF : (1u << ncols) - 1;
  const __mmask16 m1 = ncols >= 32 ? 0xFFFF : (ncols <= 16 ? 0 : (1u << (ncols - 16)) - 1);
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(Y + r * ys, m0, acc[r][0]);
    _mm512_mask_storeu_ps(Y + r * ys + 16, m1, acc[r][1]);
  }
}

template <int MR>
void rows_block(const float* X, int64_t xs, int64_t M, const float* Wp, int64_t K, float* Y, int64_t ys, int64_t ncols,
                const float* next) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) micro<MR>(X + m * xs, xs, Wp, K, Y + m * ys, ys, ncols, m == 0 ? next : nullptr);
  const int64_t rest = M - m;
  switch (rest) {
    case 0: break;
#define R(n) case n: micro<n>(X + m * xs, xs, Wp, K, Y + m * ys, ys, ncols, m == 0 ? next : nullptr); break;
    R(1) R(2) R(3) R(4) R(5) R(6) R(7) R(8) R(9) R(10) R(11) R(12) R(13)
#undef R
  }
}

torch::Tensor gemm(const torch::Tensor& x, const torch::Tensor& wp, int64_t N, int64_t mr, bool prefetch) {
  const int64_t M = x.size(0), K = x.size(1), B = wp.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W = wp.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t ncols = std::min<int64_t>(NB, N - b * NB);
      const float* next = prefetch && b + 1 < b1 ? W + (b + 1) * K * NB : nullptr;
      if (mr == 8) rows_block<8>(X, K, M, W + b * K * NB, K, Y + b * NB, N, ncols, next);
      else if (mr == 12) rows_block<12>(X, K, M, W + b * K * NB, K, Y + b * NB, N, ncols, next);
      else rows_block<14>(X, K, M, W + b * K * NB, K, Y + b * NB, N, ncols, next);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack);
  m.def("gemm", &gemm);
}
