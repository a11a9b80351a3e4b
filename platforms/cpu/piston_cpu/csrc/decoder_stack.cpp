// DecoderStack: the decoder layers of a Llama-family model (pre-norm attention with RoPE
// and grouped KV heads, optionally Qwen3's per-head q/k norms, then a gated-SiLU MLP) run
// as one call, the layers' kernels back to back with no Python between them.
//
// A decode step of SmolLM2 makes about 300 kernel calls, 10 per layer. Through the torch
// modules each cost about 10 us of Python (module calls, attribute lookups, the kernel
// slots' dispatch), about 3 ms a step against 10 ms of kernels; and the kernels ran slower
// between those gaps than back to back (SmolLM2's 120 packed linears: 6.9 ms back to back,
// 8.7 ms with 50 us of other work before each). This is the same sequence of the same
// functions (kernel_ops.h), so its results are those of the module path bit for bit.
//
// piston_cpu/decoder_stack.py builds the stack from a loaded model's layers (it holds the
// weights' tensors, not copies; the CPU worker builds it again when the weights are
// reloaded or woken up) and calls it on the steps it takes.

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "kernel_ops.h"

namespace piston_cpu {
namespace {

// One linear layer: a float32 weight [N, K] (the packed GEMM over its packed copy up to
// packed_rows rows of x when it has one, else the row-streaming kernel up to kernel_rows;
// torch's GEMM past them), or packed segments with their GGUF type codes.
struct StackLinear {
  torch::Tensor weight;
  std::vector<torch::Tensor> segments;
  std::vector<int64_t> codes;
  c10::optional<torch::Tensor> bias;
  int64_t kernel_rows = 0;
  torch::Tensor packed;  // packed_gemm.cpp's copy of weight, or undefined
  int64_t packed_rows = 0;

  torch::Tensor operator()(const torch::Tensor& x, bool int8_activations) const {
    if (!segments.empty()) return qlinear(x, segments, codes, bias, int8_activations);
    if (packed.defined() && packed.numel() > 0 && x.size(0) <= packed_rows)
      return packed_linear(x, packed, weight.size(0), bias, c10::nullopt);
    if (x.size(0) <= kernel_rows) return piston_cpu::linear(x, weight, bias);
    return at::linear(x, weight, bias);
  }
};

using LinearArgs = std::tuple<c10::optional<torch::Tensor>, std::vector<torch::Tensor>, std::vector<int64_t>,
                              c10::optional<torch::Tensor>, int64_t, c10::optional<torch::Tensor>, int64_t>;

StackLinear make_linear(const LinearArgs& a) {
  StackLinear l;
  const auto& [weight, segments, codes, bias, kernel_rows, packed, packed_rows] = a;
  TORCH_CHECK(segments.size() == codes.size(), "DecoderStack: one GGUF type code per packed segment");
  TORCH_CHECK(weight.has_value() != !segments.empty(), "DecoderStack: a linear is float32 or packed, not both");
  TORCH_CHECK(!packed.has_value() || weight.has_value(), "DecoderStack: a packed copy needs its float32 weight");
  if (weight.has_value()) l.weight = *weight;
  l.segments = segments;
  l.codes = codes;
  l.bias = bias;
  l.kernel_rows = kernel_rows;
  if (packed.has_value()) l.packed = *packed;
  l.packed_rows = packed_rows;
  return l;
}

struct StackLayer {
  torch::Tensor input_norm, post_norm, cos_sin_cache;
  double input_eps, post_eps, scale;
  c10::optional<torch::Tensor> q_norm, k_norm;  // Qwen3: RMSNorm of each head of q and k
  double qk_eps;
  StackLinear qkv, o, gate_up, down;
  int64_t layer_idx, num_heads, num_kv_heads, head_dim, rotary_dim, window;
};

class DecoderStack {
 public:
  explicit DecoderStack(bool int8_activations) : int8_activations_(int8_activations) {}

  void add_layer(int64_t layer_idx, const torch::Tensor& input_norm, double input_eps, const torch::Tensor& post_norm,
                 double post_eps, const LinearArgs& qkv, const LinearArgs& o, const LinearArgs& gate_up,
                 const LinearArgs& down, const torch::Tensor& cos_sin_cache, int64_t rotary_dim, int64_t num_heads,
                 int64_t num_kv_heads, int64_t head_dim, double scale, int64_t window,
                 const c10::optional<torch::Tensor>& q_norm, const c10::optional<torch::Tensor>& k_norm,
                 double qk_eps) {
    TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0 && head_dim > 0,
                "DecoderStack: head counts");
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "DecoderStack: q and k norms come together");
    layers_.push_back(StackLayer{input_norm, post_norm, cos_sin_cache, input_eps, post_eps, scale, q_norm, k_norm,
                                 qk_eps, make_linear(qkv), make_linear(o), make_linear(gate_up), make_linear(down),
                                 layer_idx, num_heads, num_kv_heads, head_dim, rotary_dim, window});
  }

  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

  // h: the embedded tokens [T, hidden]; kv_caches: the forward context's caches by layer
  // index ([2, blocks, block_size, kv_heads, head_dim] each); the rest as paged_attention
  // takes it. Returns {h, residual} after the last layer (the model's final norm adds them).
  std::vector<torch::Tensor> forward(torch::Tensor h, const torch::Tensor& positions,
                                     const std::vector<torch::Tensor>& kv_caches, const torch::Tensor& slot_mapping,
                                     const torch::Tensor& block_table, const torch::Tensor& seq_idx,
                                     const torch::Tensor& ctx_lens) const {
    torch::Tensor residual;
    for (const StackLayer& L : layers_) {
      TORCH_CHECK(L.layer_idx >= 0 && L.layer_idx < static_cast<int64_t>(kv_caches.size()),
                  "DecoderStack: no KV cache for layer ", L.layer_idx);
      torch::Tensor x;
      if (!residual.defined()) {
        residual = h;
        x = rms_norm(h, c10::nullopt, L.input_norm, L.input_eps)[0];
      } else {
        auto normed = rms_norm(h, residual, L.input_norm, L.input_eps);
        x = normed[0];
        residual = normed[1];
      }
      const torch::Tensor qkv = L.qkv(x, int8_activations_);
      const int64_t q_size = L.num_heads * L.head_dim, kv_size = L.num_kv_heads * L.head_dim;
      torch::Tensor q = qkv.narrow(1, 0, q_size), k = qkv.narrow(1, q_size, kv_size);
      const torch::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size);
      if (L.q_norm.has_value()) {  // each head of q and k on its own, as LlamaAttention does
        const int64_t T = qkv.size(0);
        q = rms_norm(q.reshape({T * L.num_heads, L.head_dim}), c10::nullopt, *L.q_norm, L.qk_eps)[0].view({T, q_size});
        k = rms_norm(k.reshape({T * L.num_kv_heads, L.head_dim}), c10::nullopt, *L.k_norm, L.qk_eps)[0]
                .view({T, kv_size});
      }
      rotary_neox(positions, q, k, L.cos_sin_cache, L.head_dim, L.rotary_dim);
      const torch::Tensor& cache = kv_caches[L.layer_idx];
      const torch::Tensor attn = paged_attention(q, k, v, cache[0], cache[1], slot_mapping, block_table, seq_idx,
                                                 ctx_lens, L.num_heads, L.scale, L.window);
      auto normed = rms_norm(L.o(attn, int8_activations_), residual, L.post_norm, L.post_eps);
      residual = normed[1];
      h = L.down(silu_and_mul(L.gate_up(normed[0], int8_activations_)), int8_activations_);
    }
    return {h, residual};
  }

 private:
  bool int8_activations_;
  std::vector<StackLayer> layers_;
};

}  // namespace
}  // namespace piston_cpu

void bind_decoder_stack(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<piston_cpu::DecoderStack>(m, "DecoderStack",
                                       "A Llama-family model's decoder layers, run as one call")
      .def(py::init<bool>(), py::arg("int8_activations") = false)
      .def("add_layer", &piston_cpu::DecoderStack::add_layer, py::arg("layer_idx"), py::arg("input_norm"),
           py::arg("input_eps"), py::arg("post_norm"), py::arg("post_eps"), py::arg("qkv"), py::arg("o"),
           py::arg("gate_up"), py::arg("down"), py::arg("cos_sin_cache"), py::arg("rotary_dim"),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("window"),
           py::arg("q_norm") = py::none(), py::arg("k_norm") = py::none(), py::arg("qk_eps") = 0.0)
      .def("__len__", &piston_cpu::DecoderStack::size)
      .def("forward", &piston_cpu::DecoderStack::forward, py::arg("h"), py::arg("positions"), py::arg("kv_caches"),
           py::arg("slot_mapping"), py::arg("block_table"), py::arg("seq_idx"), py::arg("ctx_lens"),
           py::call_guard<py::gil_scoped_release>());
}
