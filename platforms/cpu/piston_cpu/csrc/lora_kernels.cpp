// Batched multi-LoRA for the CPU (piston.models.layers.lora): float32, AVX2 + FMA.
//
//   lora_sgmv   y[t] += (x[t] @ A[s]) @ B[s] for the step's tokens t that use an adapter,
//               grouped by slot s (Punica/S-LoRA's SGMV: one call per layer for every
//               adapter of the step).
//
// Layouts (LoRAStack): A [slots, K, W] and B [slots, W, N], contiguous, W = slices * R with
// R a multiple of 8. A fused layer's slice j (q, k, v; gate, up) owns A's columns and B's
// rows j*R..j*R+R and the output columns slice_bounds[j]..slice_bounds[j+1]: the expand
// skips B's zero blocks between slices.
//
// The shrink runs tiles of 4 rows of x (one slot's tokens) by 16 columns of A, A's row
// loaded once for the 4 rows; the expand tiles 4 rows by 16 output columns the same way,
// over the slice's R rows of B, adding into y. Work is split over ATen's threads by
// groups of 4 tokens (and by 256-column blocks in the expand); no two threads write the
// same output element.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace piston_cpu {
namespace {

struct Quad {
  int64_t first;  // index of its first token in token_ids
  int rows;       // 1..4 tokens of one slot
  int slot;
};

constexpr int kMaxRows = 4;
constexpr int64_t kColumnBlock = 256;

template <int NR, int V>
inline void shrink_tile(const float* const* xr, const float* A, int64_t K, int64_t W, int64_t c0, float* const* sr) {
  __m256 acc[NR][V];
  for (int i = 0; i < NR; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 av[V];
    for (int v = 0; v < V; ++v) av[v] = _mm256_loadu_ps(A + k * W + c0 + 8 * v);
    for (int i = 0; i < NR; ++i) {
      const __m256 xv = _mm256_broadcast_ss(xr[i] + k);
      for (int v = 0; v < V; ++v) acc[i][v] = _mm256_fmadd_ps(av[v], xv, acc[i][v]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(sr[i] + c0 + 8 * v, acc[i][v]);
}

template <int NR>
void shrink_rows(const float* const* xr, const float* A, int64_t K, int64_t W, float* const* sr) {
  int64_t c0 = 0;
  for (; c0 + 16 <= W; c0 += 16) shrink_tile<NR, 2>(xr, A, K, W, c0, sr);
  if (c0 < W) shrink_tile<NR, 1>(xr, A, K, W, c0, sr);  // W is a multiple of 8
}

template <int NR, int V>
inline void expand_tile(const float* const* sr, int64_t r0, int64_t R, const float* B, int64_t N, int64_t c0,
                        float* const* yr) {
  __m256 acc[NR][V];
  for (int i = 0; i < NR; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t r = r0; r < r0 + R; ++r) {
    __m256 bv[V];
    for (int v = 0; v < V; ++v) bv[v] = _mm256_loadu_ps(B + r * N + c0 + 8 * v);
    for (int i = 0; i < NR; ++i) {
      const __m256 s = _mm256_broadcast_ss(sr[i] + r);
      for (int v = 0; v < V; ++v) acc[i][v] = _mm256_fmadd_ps(bv[v], s, acc[i][v]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int v = 0; v < V; ++v) {
      float* out = yr[i] + c0 + 8 * v;
      _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), acc[i][v]));
    }
}

template <int NR>
void expand_cols(const float* const* sr, int64_t r0, int64_t R, const float* B, int64_t N, int64_t lo, int64_t hi,
                 float* const* yr) {
  int64_t c0 = lo;
  for (; c0 + 16 <= hi; c0 += 16) expand_tile<NR, 2>(sr, r0, R, B, N, c0, yr);
  for (; c0 + 8 <= hi; c0 += 8) expand_tile<NR, 1>(sr, r0, R, B, N, c0, yr);
  for (; c0 < hi; ++c0)  // a slice whose width is no multiple of 8
    for (int i = 0; i < NR; ++i) {
      float acc = 0.0f;
      for (int64_t r = r0; r < r0 + R; ++r) acc += sr[i][r] * B[r * N + c0];
      yr[i][c0] += acc;
    }
}

template <typename F>
inline void with_rows(int rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

void lora_sgmv(torch::Tensor x, torch::Tensor y, torch::Tensor a, torch::Tensor b, torch::Tensor token_ids,
               torch::Tensor slot_ends, torch::Tensor slice_bounds) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && y.scalar_type() == torch::kFloat32 &&
                  a.scalar_type() == torch::kFloat32 && b.scalar_type() == torch::kFloat32,
              "lora_sgmv takes float32 tensors");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.stride(1) == 1 && y.stride(1) == 1, "x and y must be row-major 2-D");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.dim() == 3 && b.dim() == 3, "A and B must be contiguous 3-D");
  TORCH_CHECK(token_ids.scalar_type() == torch::kInt64 && slot_ends.scalar_type() == torch::kInt32 &&
                  slice_bounds.scalar_type() == torch::kInt64, "token_ids int64, slot_ends int32, slice_bounds int64");
  const int64_t K = x.size(1), N = y.size(1), W = a.size(2), slots = slot_ends.size(0);
  const int64_t S = slice_bounds.size(0) - 1;
  TORCH_CHECK(a.size(1) == K && b.size(1) == W && b.size(2) == N && slots <= a.size(0), "shapes do not match");
  TORCH_CHECK(S >= 1 && W % S == 0 && (W / S) % 8 == 0, "W must be slices x a multiple of 8");
  const int64_t R = W / S, xs = x.stride(0), ys = y.stride(0);
  const int64_t* ids = token_ids.data_ptr<int64_t>();
  const int32_t* ends = slot_ends.data_ptr<int32_t>();
  const int64_t* bounds = slice_bounds.data_ptr<int64_t>();
  const int64_t n = token_ids.size(0);
  if (n == 0) return;

  std::vector<Quad> quads;
  int64_t start = 0;
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t end = ends[s];
    for (int64_t q = start; q < end; q += kMaxRows)
      quads.push_back({q, static_cast<int>(std::min<int64_t>(kMaxRows, end - q)), static_cast<int>(s)});
    start = end;
  }
  TORCH_CHECK(start == n, "slot_ends must end at len(token_ids)");
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const float* A = a.data_ptr<float>();
  const float* B = b.data_ptr<float>();
  std::vector<float> sbuf(n * W);

  at::parallel_for(0, static_cast<int64_t>(quads.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const Quad q = quads[u];
      const float* xr[kMaxRows];
      float* sr[kMaxRows];
      for (int i = 0; i < q.rows; ++i) {
        xr[i] = X + ids[q.first + i] * xs;
        sr[i] = sbuf.data() + (q.first + i) * W;
      }
      with_rows(q.rows, [&](auto nr) { shrink_rows<decltype(nr)::value>(xr, A + q.slot * K * W, K, W, sr); });
    }
  });

  struct Unit {
    int64_t quad, slice, lo, hi;
  };
  std::vector<Unit> units;
  for (int64_t u = 0; u < static_cast<int64_t>(quads.size()); ++u)
    for (int64_t j = 0; j < S; ++j)
      for (int64_t c = bounds[j]; c < bounds[j + 1]; c += kColumnBlock)
        units.push_back({u, j, c, std::min(c + kColumnBlock, bounds[j + 1])});
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const Unit unit = units[w];
      const Quad q = quads[unit.quad];
      const float* sr[kMaxRows];
      float* yr[kMaxRows];
      for (int i = 0; i < q.rows; ++i) {
        sr[i] = sbuf.data() + (q.first + i) * W;
        yr[i] = Y + ids[q.first + i] * ys;
      }
      with_rows(q.rows, [&](auto nr) {
        expand_cols<decltype(nr)::value>(sr, unit.slice * R, R, B + q.slot * W * N, N, unit.lo, unit.hi, yr);
      });
    }
  });
}

}  // namespace
}  // namespace piston_cpu

void bind_lora_kernels(pybind11::module_& m) {
  m.def("lora_sgmv", &piston_cpu::lora_sgmv,
        "y[t] += (x[t] @ A[s]) @ B[s] for the tokens of each adapter slot s (grouped by slot)", py::arg("x"),
        py::arg("y"), py::arg("a"), py::arg("b"), py::arg("token_ids"), py::arg("slot_ends"),
        py::arg("slice_bounds"));
}
