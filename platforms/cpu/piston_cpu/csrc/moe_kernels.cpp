// Mixture-of-experts for the CPU (piston.models.layers.fused_moe): float32, AVX2 + FMA.
//
//   moe_grouped_linear   y[i] = x[i] @ w[e]^T for the rows i of each expert e's group (x's
//                        rows sorted by expert, ends[e] the cumulative group ends): both
//                        expert GEMMs of a MoE layer, every expert in one call.
//
// At a decode step each expert sees a few rows, and the weights dominate: this streams each
// weight row once for all the rows of its group (the small-batch linear's dot_rows), where
// torch's grouped GEMM runs a blocked GEMM per group (about 2-4x slower up to 8 rows per
// expert, 2 threads). Work is split over ATen's threads by (expert, block of weight rows)
// for the experts that have rows; experts without rows cost nothing.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace piston_cpu {
namespace {

torch::Tensor moe_grouped_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& ends) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32,
              "moe_grouped_linear: x and w must be float32 CPU tensors");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && x.size(1) == w.size(2), "moe_grouped_linear: shapes ", x.sizes(),
              " and ", w.sizes(), " do not match (x [M, K], w [E, N, K])");
  TORCH_CHECK(x.stride(1) == 1 && w.is_contiguous(), "moe_grouped_linear: x rows and w must be contiguous");
  TORCH_CHECK(ends.dim() == 1 && ends.size(0) == w.size(0) && ends.scalar_type() == torch::kInt32,
              "moe_grouped_linear: ends must be int32 [E]");
  const int64_t M = x.size(0), K = x.size(1), E = w.size(0), N = w.size(1);
  auto y = torch::empty({M, N}, x.options());
  const auto ends_c = ends.contiguous();
  const int32_t* end = ends_c.data_ptr<int32_t>();
  std::vector<int64_t> experts, starts, counts;  // the experts with rows, in order
  int64_t start = 0, longest = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t stop = end[e];
    TORCH_CHECK(stop >= start && stop <= M, "moe_grouped_linear: ends must be non-decreasing and at most ", M);
    if (stop > start) {
      experts.push_back(e);
      starts.push_back(start);
      counts.push_back(stop - start);
      longest = std::max(longest, stop - start);
    }
    start = stop;
  }
  TORCH_CHECK(start == M, "moe_grouped_linear: ends[-1] = ", start, " but x has ", M, " rows");
  if (experts.empty() || N == 0) return y;
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t xs = x.stride(0);
  // As linear(): blocks of 4 weight rows against pairs of x rows, 8 rows one x row at a time
  // once a group has 16 rows.
  const int64_t R = longest >= 16 ? 8 : 4;
  const int64_t blocks = (N + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, R * K));
  at::parallel_for(0, static_cast<int64_t>(experts.size()) * blocks, grain, [&](int64_t begin, int64_t stop) {
    for (int64_t task = begin; task < stop; ++task) {
      const int64_t g = task / blocks, r = (task % blocks) * R;
      const float* wr = W + (experts[g] * N + r) * K;
      const float* xg = X + starts[g] * xs;
      float* yg = Y + starts[g] * N + r;
      const int64_t m = counts[g];
      switch (std::min<int64_t>(R, N - r)) {
        case 8: dot_rows<8>(wr, K, xg, xs, m, yg, N, nullptr); break;
        case 7: dot_rows<7>(wr, K, xg, xs, m, yg, N, nullptr); break;
        case 6: dot_rows<6>(wr, K, xg, xs, m, yg, N, nullptr); break;
        case 5: dot_rows<5>(wr, K, xg, xs, m, yg, N, nullptr); break;
        case 4: dot_rows<4>(wr, K, xg, xs, m, yg, N, nullptr); break;
        case 3: dot_rows<3>(wr, K, xg, xs, m, yg, N, nullptr); break;
        case 2: dot_rows<2>(wr, K, xg, xs, m, yg, N, nullptr); break;
        default: dot_rows<1>(wr, K, xg, xs, m, yg, N, nullptr); break;
      }
    }
  });
  return y;
}

}  // namespace
}  // namespace piston_cpu

void bind_moe_kernels(pybind11::module_& m) {
  m.def("moe_grouped_linear", &piston_cpu::moe_grouped_linear,
        "y[i] = x[i] @ w[e]^T for the rows of each expert e's group (rows sorted by expert, ends cumulative)",
        py::arg("x"), py::arg("w"), py::arg("ends"));
}
