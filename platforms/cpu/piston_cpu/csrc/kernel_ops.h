// The entry points of Piston's CPU kernels, as C++ functions: cpu_kernels.cpp and
// quant_kernels.cpp define them (and bind them to Python); decoder_stack.cpp calls them one
// after the other. Each checks its arguments and raises (c10::Error) on a bad one.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace piston_cpu {

// y = x @ w.T + b, float32, for small batches (cpu_kernels.cpp).
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias);

// {w * x / rms(x), undefined}, or with a residual {w * s / rms(s), s} where s = x + residual.
std::vector<torch::Tensor> rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                    const torch::Tensor& weight, double eps);

// silu(x[:, :I]) * x[:, I:].
torch::Tensor silu_and_mul(const torch::Tensor& x);

// Rotate-half RoPE of q and k ([T, heads * head_dim], rows may be strided) in place.
void rotary_neox(const torch::Tensor& positions, torch::Tensor q, torch::Tensor k, const torch::Tensor& cache,
                 int64_t head_dim, int64_t rotary_dim);

// Writes k/v to their slots, then attends every query row over its sequence's paged K/V.
torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              torch::Tensor key_cache, torch::Tensor value_cache, const torch::Tensor& slot_mapping,
                              const torch::Tensor& block_table, const torch::Tensor& seq_idx,
                              const torch::Tensor& ctx_lens, int64_t num_heads, double scale, int64_t window);

// y = x @ W.T + b with W packed in segments of GGUF blocks (quant_kernels.cpp).
torch::Tensor qlinear(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                      const std::vector<int64_t>& codes, const c10::optional<torch::Tensor>& bias,
                      bool int8_activations);

// Row v of a packed weight (one segment of GGUF blocks in format `code`, K values a row),
// decoded into out[K]; `rows` is set to the weight's rows (quant_kernels.cpp). The greedy LM
// head rescores its candidates of a packed head through it.
std::function<void(int64_t, float*)> qrow_decoder(const torch::Tensor& weight, int64_t code, int64_t K,
                                                  int64_t& rows);

// The float32 GEMM over weights packed once (packed_gemm.cpp): W [N, K] as
// [ceil(N/kPackedWidth), K, kPackedWidth], two registers wide: 32 columns in an AVX-512
// build, 16 in an AVX2 one.
#ifdef __AVX512F__
constexpr int64_t kPackedWidth = 32;
#else
constexpr int64_t kPackedWidth = 16;
#endif
int64_t packed_gemm_width();
torch::Tensor pack_linear_weight(const torch::Tensor& w);
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n,
                            const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& out);
// The same GEMM over a W whose packed blocks are made as they are needed: decode(blk, buf)
// writes block blk ([K, kPackedWidth] floats, columns past n zero) into buf; once per block
// for up to 256 rows of x, once per 256 rows past that. Y is [M, n] with contiguous rows.
void packed_gemm_decoded(const float* X, int64_t xs, int64_t M, int64_t K, int64_t n, const float* bias, float* Y,
                         const std::function<void(int64_t, float*)>& decode);

}  // namespace piston_cpu
