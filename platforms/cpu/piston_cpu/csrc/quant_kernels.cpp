// Piston's CPU kernels for packed (quantized) weights: float32 activations and sums.
//
//   qlinear        y[M,N] = x[M,K] @ W^T (+ b), W packed (quant_formats.h), given as
//                  segments of rows (a fused layer whose shards differ in format has
//                  several). No activation is quantized on any path unless asked
//                  (int8_activations, quant_int8x.h: the register path's 32-value formats):
//                  - up to kGemvRows rows of x: each weight row is decoded once, in
//                    registers, and multiplied with every row of x (the packed bytes are
//                    the only weight traffic: batch-1 decode reads 4-8x fewer bytes than
//                    float32 weights);
//                  - below kPackedTileRows: blocks of 8 weight rows are decoded into a
//                    float32 tile in L1 and reused across all rows of x (tile_block: 3 rows
//                    of x by 4 of the tile at a time), which stays compute-bound;
//                  - more rows: blocks of kPackedWidth weight rows are decoded into the
//                    packed GEMM's layout (decode_block) and run through its register tiles
//                    (packed_gemm.cpp), a block in L2 at a time: no float32 copy of W.
//   qembedding     rows ids of a packed weight, decoded (the token embedding).
//   qdequantize    a packed weight as float32 [N, K] (an embedding of several segments).
//
// Compiled with the other kernels into one extension (cpu_kernels.cpp binds these).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "kernel_ops.h"
#include "quant_formats.h"
#include "quant_gemv512.h"
#include "quant_int8x.h"
#include "quant_int8x512.h"
#include "simd.h"

namespace piston_cpu {
namespace {

constexpr int kGemvRows = 8;  // rows of x the register path takes; more go to the tile path
// From this many rows of x on, the packed GEMM's tiles over decoded blocks (block decoding and
// transposing cost more than the tile path's decoding below it: SmolLM2's Q4_1 linears on an
// AVX-512 EPYC, 2 threads, 142 / 141 ms at 128 rows, 207 / 214 at 192, 275 / 290 at 256,
// 1090 / 1285 at 1024; about the same in the AVX2 build).
constexpr int64_t kPackedTileRows = 192;
constexpr int64_t kUnitRows = 8;  // weight rows per unit of work (and per decoded tile)

struct Unit {
  const uint8_t* w;  // first row
  int64_t row_bytes, rows, code, n0;  // n0: its first output column
};

template <class F>
void decode_rows(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, float* out) {
  const int64_t C = K / 32;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = w + r * row_bytes;
    float* o = out + r * K;
    for (int64_t c = 0; c < C; ++c) {
      __m256 v[4];
      decode<F>(row, c, C, v);
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + 32 * c + 8 * i, v[i]);
    }
  }
}

// The segments' rows in units of kUnitRows, made on the fly (a list of every unit of the LM
// head's 49152 rows would be a fresh quarter-megabyte every step).
class Units {
 public:
  int64_t size() const { return segs_.empty() ? 0 : segs_.back().first_unit + segs_.back().units; }
  Unit operator[](int64_t i) const {
    size_t s = 0;
    while (i >= segs_[s].first_unit + segs_[s].units) ++s;
    const Seg& g = segs_[s];
    const int64_t r = (i - g.first_unit) * kUnitRows;
    return {g.data + r * g.row_bytes, g.row_bytes, std::min(kUnitRows, g.rows - r), g.code, g.n0 + r};
  }
  void add(const uint8_t* data, int64_t row_bytes, int64_t rows, int64_t code, int64_t n0) {
    segs_.push_back({data, row_bytes, rows, code, n0, size(), (rows + kUnitRows - 1) / kUnitRows});
  }
  // Rows n0 .. n0 + count (across segments) decoded to float32 into out [count, K].
  void decode(int64_t n0, int64_t count, int64_t K, float* out) const {
    for (const Seg& g : segs_) {
      const int64_t lo = std::max(n0, g.n0), hi = std::min(n0 + count, g.n0 + g.rows);
      if (lo >= hi) continue;
      with_format(g.code, [&](auto fmt) {
        decode_rows<decltype(fmt)>(g.data + (lo - g.n0) * g.row_bytes, g.row_bytes, hi - lo, K, out + (lo - n0) * K);
      });
    }
  }

 private:
  struct Seg {
    const uint8_t* data;
    int64_t row_bytes, rows, code, n0, first_unit, units;
  };
  std::vector<Seg> segs_;
};

// The checked segments as units; N gets the total rows.
Units make_units(const std::vector<torch::Tensor>& weights, const std::vector<int64_t>& codes, int64_t K,
                 int64_t& N) {
  TORCH_CHECK(!weights.empty() && weights.size() == codes.size(), "one format code per weight segment");
  TORCH_CHECK(K > 0 && K % 32 == 0, "packed kernels take rows of a multiple of 32 values, got ", K);
  Units units;
  N = 0;
  for (size_t s = 0; s < weights.size(); ++s) {
    const torch::Tensor& w = weights[s];
    const int64_t row_bytes = format_row_bytes(codes[s], K);
    TORCH_CHECK(row_bytes > 0, "unknown packed format ", codes[s], " (or ", K, " values are not whole blocks)");
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous() &&
                    w.size(1) == row_bytes, "segment ", s, " must be contiguous uint8 [rows, ", row_bytes, "], got ",
                w.sizes());
    units.add(w.data_ptr<uint8_t>(), row_bytes, w.size(0), codes[s], N);
    N += w.size(0);
  }
  return units;
}

// Eight vectors' lane sums as one vector: lane j = the sum of t[j].
inline __m256 hsum8(const __m256 t[8]) {
  const __m256 a = _mm256_hadd_ps(t[0], t[1]), b = _mm256_hadd_ps(t[2], t[3]);
  const __m256 c = _mm256_hadd_ps(t[4], t[5]), d = _mm256_hadd_ps(t[6], t[7]);
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

// The register path asks for the packed bytes kStreamAhead ahead of those it decodes, as it
// goes (chunks c .. c + n of a row of C chunks: their share of the row's bytes, moved
// forward). Left to the hardware prefetchers, rows streaming from past the cache ran at 7
// GB/s on 2 threads of an AVX-512 Xeon against 14 from L2; asked 2 KiB ahead, at 11-12.
// (Asking for whole units a few units ahead, as before, came in bursts that measured slower.)
constexpr int64_t kStreamAhead = 2048;

inline void stream_ahead(const uint8_t* row, int64_t row_bytes, int64_t C, int64_t c, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row) + c * row_bytes / C + kStreamAhead;
  const int64_t bytes = n * row_bytes / C;
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

// One row of x (batch-1 decode): a group's eight dot products of unscaled codes are summed
// across lanes together, then scaled by the group's eight scales in one multiply-add, so
// the scales cost a load per eight chunks instead of a conversion and broadcast per chunk.
template <class F>
inline float dot_row1(const uint8_t* row, int64_t row_bytes, int64_t C, const float* x, const float* xsum) {
  __m256 acc = _mm256_setzero_ps(), acc_m = _mm256_setzero_ps();
  float tail = 0.0f;
  int64_t c = 0;
  if constexpr (F::kGroup > 0) {
    for (; c + F::kGroup <= C; c += F::kGroup) {
      __m256 t[8], d, m;
      stream_ahead(row, row_bytes, C, c, F::kGroup);
      F::group_dots(row, c, C, x, t);
      F::group_scales(row, c, C, d, m);
      acc = _mm256_fmadd_ps(hsum8(t), d, acc);
      if constexpr (F::kOffset) acc_m = _mm256_fmadd_ps(m, _mm256_loadu_ps(xsum + c), acc_m);
    }
  }
  if constexpr (F::kGroup == 8) {
    if (c < C) {  // the last chunks (2 of SmolLM2's 18 a row): a group padded with zeros
      __m256 t[8];
      alignas(32) float d[8] = {0}, m[8] = {0}, xs[8] = {0};
      for (int j = 0; j < 8; ++j) {
        t[j] = _mm256_setzero_ps();
        if (c + j < C) {
          __m256 q[4];
          Scales s;
          F::raw(row, c + j, C, q, s);
          t[j] = dot4(q, x + 32 * (c + j));
          d[j] = s.d0;
          m[j] = s.m;
          xs[j] = F::kOffset ? xsum[c + j] : 0.0f;
        }
      }
      acc = _mm256_fmadd_ps(hsum8(t), _mm256_load_ps(d), acc);
      if constexpr (F::kOffset) acc_m = _mm256_fmadd_ps(_mm256_load_ps(m), _mm256_load_ps(xs), acc_m);
      c = C;
    }
  }
  __m256 acc2 = _mm256_setzero_ps();
  for (; c < C; ++c) {  // the chunks after the last whole group, and formats without groups
    __m256 q[4];
    Scales s;
    F::raw(row, c, C, q, s);
    const float* xp = x + 32 * c;
    if constexpr (!F::kScaled) {
      for (int i = 0; i < 4; ++i) acc2 = _mm256_fmadd_ps(q[i], _mm256_loadu_ps(xp + 8 * i), acc2);
    } else if constexpr (F::kTwoScales) {
      acc2 = _mm256_fmadd_ps(_mm256_fmadd_ps(q[1], _mm256_loadu_ps(xp + 8), _mm256_mul_ps(q[0], _mm256_loadu_ps(xp))),
                             _mm256_set1_ps(s.d0), acc2);
      acc2 = _mm256_fmadd_ps(_mm256_fmadd_ps(q[3], _mm256_loadu_ps(xp + 24),
                                             _mm256_mul_ps(q[2], _mm256_loadu_ps(xp + 16))),
                             _mm256_set1_ps(s.d1), acc2);
    } else {
      acc2 = _mm256_fmadd_ps(dot4(q, xp), _mm256_set1_ps(s.d0), acc2);
    }
    if constexpr (F::kOffset) tail += s.m * xsum[c];
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(acc, acc_m), acc2)) + tail;
}

// Register path: M rows of x against each weight row of the unit, decoded once. The
// chunk's unscaled codes meet x first; its scale multiplies their dot product, and its
// offset m the sum of x over the chunk (xsum, [M, K/32]): d * sum(q x) + m * sum(x).
template <class F, int M>
void gemv_unit(const Unit& u, int64_t K, const float* X, int64_t xs, const float* xsum, float* Y, int64_t ys,
               const float* bias) {
  const int64_t C = K / 32;
  if constexpr (M == 1) {
    for (int64_t n = 0; n < u.rows; ++n) {
      const int64_t col = u.n0 + n;
      Y[col] = dot_row1<F>(u.w + n * u.row_bytes, u.row_bytes, C, X, xsum) + (bias ? bias[col] : 0.f);
    }
    return;
  }
  // 2-8 rows: each chunk decoded to its float32 values once (decode: d * q + m, exactly as
  // gguf dequantizes), then multiplied into every row's sums, A independent chains per row
  // (with the chunk's 4 vectors, within AVX2's 16 registers).
  constexpr int A = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  for (int64_t n = 0; n < u.rows; ++n) {
    const uint8_t* row = u.w + n * u.row_bytes;
    __m256 acc[M][A];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      __m256 w[4];
      stream_ahead(row, u.row_bytes, C, c, 1);
      decode<F>(row, c, C, w);
      for (int m = 0; m < M; ++m) {
        const float* xp = X + m * xs + 32 * c;
        for (int i = 0; i < 4; ++i) acc[m][i % A] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xp + 8 * i), acc[m][i % A]);
      }
    }
    const int64_t col = u.n0 + n;
    for (int m = 0; m < M; ++m) {
      __m256 t = acc[m][0];
      for (int a = 1; a < A; ++a) t = _mm256_add_ps(t, acc[m][a]);
      Y[m * ys + col] = hsum(t) + (bias ? bias[col] : 0.f);
    }
  }
}

// y[m, n] for 3 rows of x and 4 rows of a decoded tile (in L1): 12 accumulators, and per 8
// values 3 + 4 loads for 12 multiply-adds (dot_rows, made for weights streaming from memory,
// loads 9 for 8), so the tile path is bound by the multiply-adds.
template <int MR>
inline void tile_block(const float* w, int64_t K, const float* x, int64_t xs, float* y, int64_t ys,
                       const float* bias, int64_t nr) {
  __m256 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * xs + k);
    for (int r = 0; r < 4; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + r * K + k);
      for (int m = 0; m < MR; ++m) acc[m][r] = _mm256_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    float out[4];
    _mm_storeu_ps(out, hsum4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
    for (int64_t r = 0; r < nr; ++r) y[m * ys + r] = out[r] + (bias ? bias[r] : 0.f);
  }
}

// Tile path: the unit's rows decoded to float32 (rows past the unit zeroed, so blocks of 4
// always read whole rows), then every row of x against them.
void tile_unit(const Unit& u, int64_t K, const float* X, int64_t xs, int64_t M, float* Y, int64_t ys,
               const float* bias, float* tile) {
  with_format(u.code, [&](auto fmt) { decode_rows<decltype(fmt)>(u.w, u.row_bytes, u.rows, K, tile); });
  if (u.rows % 4) std::fill(tile + u.rows * K, tile + (u.rows + 3) / 4 * 4 * K, 0.0f);
  for (int64_t r = 0; r < u.rows; r += 4) {
    const float* w = tile + r * K;
    float* y = Y + u.n0 + r;
    const float* b = bias ? bias + u.n0 + r : nullptr;
    const int64_t nr = std::min<int64_t>(4, u.rows - r);
    int64_t m = 0;
    for (; m + 3 <= M; m += 3) tile_block<3>(w, K, X + m * xs, xs, y + m * ys, ys, b, nr);
    if (M - m == 2) tile_block<2>(w, K, X + m * xs, xs, y + m * ys, ys, b, nr);
    if (M - m == 1) tile_block<1>(w, K, X + m * xs, xs, y + m * ys, ys, b, nr);
  }
}

// An 8 x 8 block of floats transposed: dst row j (stride ds) = src column j (src rows ss apart).
inline void transpose8(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ss);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);  // a0 b0 a1 b1 | a4 b4 a5 b5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int h = 0; h < 8; h += 4) {
    r[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);  // a0 b0 c0 d0 | a4 ..
    r[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);  // a1 b1 c1 d1 | a5 ..
    r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);  // a2 .. | a6 ..
    r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);  // a3 .. | a7 ..
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * ds, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
    _mm256_storeu_ps(dst + (j + 4) * ds, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
  }
}

// Block blk of W in the packed GEMM's layout (packed_gemm.cpp): its kPackedWidth rows, eight
// at a time, decoded into rows [8, K] (in L1; zero past N), then transposed 8 x 8 into their
// columns of out [K, kPackedWidth].
void decode_block(const Units& units, int64_t N, int64_t K, int64_t blk, float* rows, float* out) {
  for (int64_t g = 0; g < kPackedWidth; g += 8) {
    const int64_t n0 = blk * kPackedWidth + g, count = std::clamp<int64_t>(N - n0, 0, 8);
    units.decode(n0, count, K, rows);
    std::fill(rows + count * K, rows + 8 * K, 0.0f);
    for (int64_t k = 0; k < K; k += 8) transpose8(rows + k, K, out + k * kPackedWidth + g, kPackedWidth);
  }
}

// A unit's packed bytes, asked for ahead of their use: by the tile path one unit ahead (they
// arrive while the tile meets every row of x), and by the int8-activation register path
// kGemvAhead units ahead (it measured 23.2 -> 21.1 ms/token at batch 1 on a 2-core Xeon).
// The float32 register paths stream theirs (stream_ahead, quant_gemv512.h).
template <int kHint>
inline void prefetch_unit(const Unit& u) {
  const char* p = reinterpret_cast<const char*>(u.w);
  for (int64_t off = 0; off < u.rows * u.row_bytes; off += 64) _mm_prefetch(p + off, static_cast<_mm_hint>(kHint));
}
constexpr int64_t kGemvAhead = 4;

template <class Body>
void with_rows(int64_t M, Body&& body) {
  switch (M) {
    case 1: body(std::integral_constant<int, 1>{}); break;
    case 2: body(std::integral_constant<int, 2>{}); break;
    case 3: body(std::integral_constant<int, 3>{}); break;
    case 4: body(std::integral_constant<int, 4>{}); break;
    case 5: body(std::integral_constant<int, 5>{}); break;
    case 6: body(std::integral_constant<int, 6>{}); break;
    case 7: body(std::integral_constant<int, 7>{}); break;
    default: body(std::integral_constant<int, 8>{}); break;
  }
}

}  // namespace

torch::Tensor qlinear(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                      const std::vector<int64_t>& codes, const c10::optional<torch::Tensor>& bias,
                      bool int8_activations) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1,
              "qlinear: x must be a float32 CPU matrix with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1);
  int64_t N = 0;
  const Units units = make_units(weights, codes, K, N);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N,
                "qlinear: bias must be float32 with ", N, " elements");
    b = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t xs = x.stride(0);
  const int64_t nunits = units.size();
  // Units of at least about 32 KiB of packed bytes (or of decoded floats) per task.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kUnitRows * K * (M <= kGemvRows ? 1 : 4)));
  if (M <= kGemvRows) {
    // Each 32-value chunk's sum, for the formats with an offset (Q4_0, Q4_1, Q5_*, Q4_K, Q5_K).
    const int64_t C = K / 32;
    std::vector<float> xsum(M * C);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < C; ++c) {
        const float* xp = X + m * xs + 32 * c;
        __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xp), _mm256_loadu_ps(xp + 8)),
                                 _mm256_add_ps(_mm256_loadu_ps(xp + 16), _mm256_loadu_ps(xp + 24)));
        xsum[m * C + c] = hsum(v);
      }
    const float* XS = xsum.data();
    std::vector<Q8Block> xq(int8_activations ? M * C : 0);  // quant_int8x.h: opt-in
    for (int64_t m = 0; m < static_cast<int64_t>(xq.size()) / C; ++m) quantize_q8(X + m * xs, C, xq.data() + m * C);
#ifdef __AVX512VNNI__
    const int64_t P = (C + 1) / 2;  // quant_int8x512.h: x's chunks in pairs
    std::vector<Q8Pair> xp(int8_activations ? M * P : 0);
    for (int64_t m = 0; m < static_cast<int64_t>(xp.size()) / P; ++m) pair_q8(xq.data() + m * C, XS + m * C, C, xp.data() + m * P);
#endif
    at::parallel_for(0, nunits, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const Unit u = units[i];
        with_format(u.code, [&](auto fmt) {
          using F = decltype(fmt);
#ifndef __AVX512VNNI__  // quant_int8x512.h asks for its bytes as it goes, as the float32 path does
          if (int8_activations && i + kGemvAhead < end) prefetch_unit<_MM_HINT_T1>(units[i + kGemvAhead]);
#endif
          with_rows(M, [&](auto rows) {
            constexpr int R = decltype(rows)::value;
            if constexpr (kInt8Activations<F>) {
              if (int8_activations) {
#ifdef __AVX512VNNI__
                gemv512_rows_q8<F, R>(u.w, u.row_bytes, u.rows, u.n0, C, xp.data(), Y, N, b);
#else
                gemv_rows_q8<F, R>(u.w, u.row_bytes, u.rows, u.n0, C, xq.data(), XS, Y, N, b);
#endif
                return;
              }
            }
#ifdef __AVX512F__
            if constexpr (kGemv512<F>) {
              if constexpr (R == 1)
                gemv512_row1<F>(u.w, u.row_bytes, u.rows, u.n0, C, X, XS, Y, b);
              else
                gemv512_rows<F, R>(u.w, u.row_bytes, u.rows, u.n0, C, X, xs, Y, N, b);
              return;
            }
#endif
            gemv_unit<F, R>(u, K, X, xs, XS, Y, N, b);
          });
        });
      }
    });
  } else if (M >= kPackedTileRows) {
    // Blocks of kPackedWidth weight rows decoded into the packed GEMM's layout, in L2, and
    // met by every row of x in its register tiles (12 rows x 32 columns with AVX-512, 6 x 16
    // with AVX2).
    packed_gemm_decoded(X, xs, M, K, N, b, Y, [&](int64_t blk, float* out) {
      thread_local std::vector<float> rows;
      rows.resize(8 * K);
      decode_block(units, N, K, blk, rows.data(), out);
    });
  } else {
    at::parallel_for(0, nunits, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> tile(kUnitRows * K);
      for (int64_t i = begin; i < end; ++i) {
        if (i + 1 < end) prefetch_unit<_MM_HINT_T1>(units[i + 1]);  // arrives while this tile meets every row of x
        tile_unit(units[i], K, X, xs, M, Y, N, b, tile.data());
      }
    });
  }
  return y;
}

torch::Tensor qembedding(const torch::Tensor& ids, const torch::Tensor& weight, int64_t code, int64_t K) {
  TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.is_contiguous(), "qembedding: ids must be contiguous int64");
  int64_t V = 0;
  const Units units = make_units({weight}, {code}, K, V);
  const int64_t T = ids.numel(), row_bytes = units[0].row_bytes;
  const int64_t* I = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(I[t] >= 0 && I[t] < V, "qembedding: id ", I[t], " is out of range");
  auto out = torch::empty({T, K}, torch::dtype(torch::kFloat32));
  const uint8_t* W = weight.data_ptr<uint8_t>();
  float* O = out.data_ptr<float>();
  with_format(code, [&](auto fmt) {
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) decode_rows<decltype(fmt)>(W + I[t] * row_bytes, row_bytes, 1, K, O + t * K);
    });
  });
  return out;
}

std::function<void(int64_t, float*)> qrow_decoder(const torch::Tensor& weight, int64_t code, int64_t K,
                                                  int64_t& rows) {
  const Units units = make_units({weight}, {code}, K, rows);
  const uint8_t* W = weight.data_ptr<uint8_t>();
  const int64_t row_bytes = units[0].row_bytes;
  return [W, row_bytes, code, K](int64_t v, float* out) {
    with_format(code, [&](auto fmt) { decode_rows<decltype(fmt)>(W + v * row_bytes, row_bytes, 1, K, out); });
  };
}

torch::Tensor qdequantize(const std::vector<torch::Tensor>& weights, const std::vector<int64_t>& codes, int64_t K,
                          const c10::optional<torch::Tensor>& into) {
  int64_t N = 0;
  const Units units = make_units(weights, codes, K, N);
  torch::Tensor out;
  if (into.has_value() && into->defined()) {  // a caller's buffer (reused: no fresh pages to fault in)
    TORCH_CHECK(into->scalar_type() == torch::kFloat32 && into->is_contiguous() && into->numel() >= N * K,
                "qdequantize: the buffer must be contiguous float32 with at least ", N * K, " elements");
    out = into->view({-1}).narrow(0, 0, N * K).view({N, K});
  } else {
    out = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  }
  float* O = out.data_ptr<float>();
  at::parallel_for(0, units.size(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Unit u = units[i];
      with_format(u.code, [&](auto fmt) { decode_rows<decltype(fmt)>(u.w, u.row_bytes, u.rows, K, O + u.n0 * K); });
    }
  });
  return out;
}

}  // namespace piston_cpu

void bind_quant_kernels(pybind11::module_& m) {
  m.def("qlinear", &piston_cpu::qlinear, "y = x @ W.T + b with W packed, given as segments of rows",
        py::arg("x"), py::arg("weights"), py::arg("codes"), py::arg("bias") = py::none(),
        py::arg("int8_activations") = false);
  m.def("qembedding", &piston_cpu::qembedding, "rows ids of a packed weight, as float32", py::arg("ids"),
        py::arg("weight"), py::arg("code"), py::arg("cols"));
  m.def("qdequantize", &piston_cpu::qdequantize, "a packed weight's segments as one float32 [N, K]",
        py::arg("weights"), py::arg("codes"), py::arg("cols"), py::arg("out") = py::none());
}
