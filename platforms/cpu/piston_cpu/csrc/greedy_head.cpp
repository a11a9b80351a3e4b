// The greedy LM head: for each row x of the hidden states, argmax_v (x . w_v) over the
// vocabulary, without computing every logit in float32.
//
// When every row of a step is greedy and no row asks for logprobs, the logits are only read
// by an argmax, yet they are the largest GEMM of a small model's step (a 49k vocabulary is two
// thirds of a 19M-parameter model's weights). Here the whole vocabulary is screened with
// integer dot products (one vpdpbusd multiplies 64 pairs of bytes, four times the float32
// FMA's work per instruction), with an error bound that holds for every logit, and only the
// tokens the bound cannot rule out are scored again in float32:
//
//   x = sx * qx + ex, |ex_i| <= sx / 2   (x quantized per row, sx = max|x| / 127 or / 32767)
//   w = sw * qw + ew, |ew_i| <= sw / 2   (each vocabulary row quantized once, at load)
//   x . w - sx * sw * (qx . qw) = sum(x_i ew_i + ex_i w_i - ex_i ew_i)
//   |that| <= sw / 2 * |x|_1 + sx / 2 * |w|_1 + K * sx * sw / 4 = B
//
// qx . qw is exact in int32. With a = sx * sw * (qx . qw), every logit lies in [a - B, a + B]
// (B also covers the float rounding of a, of B itself and of the float32 rescoring, with a
// margin). A token whose upper bound a + B is below some token's lower bound cannot be the
// argmax; the others (a handful on real and random weights alike) get their exact float32
// dot product, and the largest wins, the lowest index among equals, as torch.argmax. So
// the answer is the argmax of float32 logits, not an approximation of it: the screen only
// decides which dot products to compute. A row whose candidates do not fit (a near-constant
// row of logits) or whose x is not finite is computed in full (here, one row at a time, or
// by the caller, whose GEMM reads W once for all such rows).
//
// x goes in with one byte an input (`planes` 1: qx + 128, as vpdpbusd multiplies unsigned
// by signed bytes, and 128 * sum(qw) is taken off again) or two (`planes` 2: int16 qx as its
// low byte and its high byte + 128, two products an input, the high one times 256). One
// byte is enough where x has no outliers (random weights); real models' hidden states have
// a few channels 20x the others, which set one byte's scale for all (on SmolLM2, int8 x
// leaves hundreds of candidates a row, int16 x two or three). The caller chooses.
//
// Layout of the int8 copy: blocks of kBlock vocabulary rows, [blocks, Kp / 4, kBlock, 4]
// (Kp = K rounded up to 4, zero-padded): one 64-byte load holds 4 inputs of 16 rows, what
// vpdpbusd multiplies against 4 bytes of x broadcast.
//
// The rescoring reads the head's float32 rows, or decodes the candidates' rows of a packed
// (GGUF) head, whose int8 copy was made from its decoded values: the answer is then the
// argmax of the logits of the decoded weight, as the packed GEMM computes them.
//
// The AVX-512 VNNI build screens with vpdpbusd (greedy_head_fast() is true); other builds
// run the same arithmetic in scalar code, which the tests use and the engine does not
// (piston_cpu/greedy_head.py installs the head only where it is fast).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <vector>

#include "kernel_ops.h"

namespace piston_cpu {
namespace {

constexpr int64_t kBlock = 64;  // vocabulary rows per block of the int8 copy (four 16-lane registers)
constexpr int64_t kGroup = 4;   // inputs per 32-bit lane
constexpr int64_t kCap = 512;   // candidates a row keeps per thread before it compacts them
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
constexpr bool kFast = true;
#else
constexpr bool kFast = false;
#endif

// Per row of x: its bytes' scale and the bound's two coefficients, B = sw * c1 + |w|_1 * c2.
struct RowScale {
  float sx, c1, c2;
  bool finite;
};

// One thread's screening state over its range of blocks: per row, the best lower bound seen
// (thr) and the candidates whose upper bound reached the threshold of the moment.
struct Screen {
  std::vector<float> thr;
  std::vector<int32_t> count;
  std::vector<uint8_t> overflow;
  std::unique_ptr<int32_t[]> cand;
  std::unique_ptr<float[]> upper;

  void init(int64_t rows) {
    thr.assign(rows, kNegInf);
    count.assign(rows, 0);
    overflow.assign(rows, 0);
    cand.reset(new int32_t[rows * kCap]);  // uninitialized: only count[r] entries are read
    upper.reset(new float[rows * kCap]);
  }

  // Room for `more` candidates of row r: drops those under the row's threshold; false (and
  // the row marked to be computed in full) when that is not enough.
  bool room(int64_t r, int more) {
    if (overflow[r]) return false;
    if (count[r] + more <= kCap) return true;
    int32_t* c = cand.get() + r * kCap;
    float* u = upper.get() + r * kCap;
    int32_t kept = 0;
    for (int32_t i = 0; i < count[r]; ++i) {
      if (u[i] >= thr[r]) {
        c[kept] = c[i];
        u[kept] = u[i];
        ++kept;
      }
    }
    count[r] = kept;
    if (kept + more <= kCap) return true;
    overflow[r] = 1;
    return false;
  }

  void add(int64_t r, int32_t v, float ub) {
    cand[r * kCap + count[r]] = v;
    upper[r * kCap + count[r]] = ub;
    ++count[r];
  }
};

float dot(const float* x, const float* w, int64_t K) {
  int64_t k = 0;
  float s = 0.0f;
#ifdef __AVX512F__
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; k + 64 <= K; k += 64)
    for (int j = 0; j < 4; ++j)
      acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16 * j), _mm512_loadu_ps(w + k + 16 * j), acc[j]);
  for (; k + 16 <= K; k += 16) acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), acc[0]);
  s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
#endif
  for (; k < K; ++k) s += x[k] * w[k];
  return s;
}

// The head's rows for the rescoring: a float32 weight's, or a packed one's decoded into buf.
struct HeadRows {
  const float* W = nullptr;
  std::function<void(int64_t, float*)> decode;
  int64_t K = 0;

  float score(const float* x, int64_t v, float* buf) const {
    if (W != nullptr) return dot(x, W + v * K, K);
    decode(v, buf);
    return dot(x, buf, K);
  }
};

// torch.argmax over every logit of the row: the first NaN, else the first largest.
int64_t full_argmax(const float* x, const HeadRows& head, int64_t V, float* buf) {
  int64_t best_i = 0;
  float best = kNegInf;
  for (int64_t v = 0; v < V; ++v) {
    const float d = head.score(x, v, buf);
    if (std::isnan(d)) return v;
    if (d > best || v == 0) {
      best = d;
      best_i = v;
    }
  }
  return best_i;
}

// The bound's terms for one row of x, and its bytes (`planes` of Kp bytes, plane_stride
// apart; zero-padded).
RowScale quantize_row(const float* x, int64_t K, int64_t Kp, int planes, uint8_t* out, int64_t plane_stride) {
  float amax = 0.0f;
  double l1 = 0.0;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    const float a = std::fabs(x[k]);
    finite &= std::isfinite(a);
    amax = std::max(amax, a);
    l1 += a;
  }
  RowScale s{0.0f, 0.0f, 0.0f, finite};
  uint8_t* lo = out;  // planes 1: qx + 128; planes 2: qx's low byte
  uint8_t* hi = out + plane_stride;  // planes 2: qx's high byte + 128
  const int64_t from = (!finite || amax == 0.0f) ? 0 : K;
  for (int64_t k = from; k < Kp; ++k) {
    lo[k] = planes == 1 ? 128 : 0;
    if (planes == 2) hi[k] = 128;
  }
  if (from == 0) return s;
  const float levels = planes == 1 ? 127.0f : 32767.0f;
  const float inv = levels / amax;
  for (int64_t k = 0; k < K; ++k) {
    const int q = static_cast<int>(std::min(levels, std::max(-levels, std::nearbyint(x[k] * inv))));
    if (planes == 1) {
      lo[k] = static_cast<uint8_t>(q + 128);
    } else {
      lo[k] = static_cast<uint8_t>(q & 255);
      hi[k] = static_cast<uint8_t>(((q - (q & 255)) / 256) + 128);
    }
  }
  s.sx = amax / levels;
  // sw/2 * |x|_1 (+ slack for the rounding of x * inv, of the int32 sums to float, and the
  // float32 rescoring's error, at most K * 2^-24 * |x|_1 * max|w| with max|w| = 127 sw), plus
  // K * sx * sw / 4; then sx/2 * |w|_1. The 2^-10 margin covers the rounding in a, B and a + B.
  const double margin = 1.0 + 1.0 / 1024;
  const double kd = static_cast<double>(K);
  const double c1 = l1 * (0.5 + 1.0 / 16384 + 127.0 * (kd + 8) / 8388608.0 + kd / 1048576.0) +
                    kd * s.sx * (0.25 + 1.0 / 16384);
  s.c1 = static_cast<float>(c1 * margin);
  s.c2 = static_cast<float>(s.sx * (0.5 + 1.0 / 16384) * margin);
  return s;
}

// The screen's scalar form (any build): every row of x against block `blk`.
void screen_block_scalar(const uint8_t* X8, int64_t Kp, int64_t M, int planes, const int8_t* Q, const float* SW,
                         const int32_t* CORR, const float* L1, int64_t blk, int64_t V, const RowScale* scale,
                         Screen& st) {
  const int8_t* qb = Q + blk * Kp * kBlock;
  const int64_t v0 = blk * kBlock, nvalid = std::min<int64_t>(kBlock, V - v0);
  float a[kBlock], b[kBlock];
  for (int64_t r = 0; r < M; ++r) {
    const RowScale& s = scale[r];
    float best_lb = kNegInf;
    for (int64_t j = 0; j < nvalid; ++j) {
      int32_t sums[2] = {0, 0};
      for (int p = 0; p < planes; ++p) {
        const uint8_t* xr = X8 + (p * M + r) * Kp;
        for (int64_t g = 0; g < Kp / kGroup; ++g)
          for (int64_t t = 0; t < kGroup; ++t)
            sums[p] += static_cast<int32_t>(xr[g * kGroup + t]) * qb[(g * kBlock + j) * kGroup + t];
      }
      const int64_t v = v0 + j;
      const float dots = planes == 1 ? static_cast<float>(sums[0] - CORR[v])
                                     : static_cast<float>(sums[1] - CORR[v]) * 256.0f + static_cast<float>(sums[0]);
      a[j] = dots * (SW[v] * s.sx);
      b[j] = SW[v] * s.c1 + L1[v] * s.c2;
      best_lb = std::max(best_lb, a[j] - b[j]);
    }
    st.thr[r] = std::max(st.thr[r], best_lb);
    for (int64_t j = 0; j < nvalid; ++j) {
      const float ub = a[j] + b[j];
      if (ub >= st.thr[r] && st.room(r, 1)) st.add(r, static_cast<int32_t>(v0 + j), ub);
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
// MR rows of x's bytes (P planes) against one block: 64 vocabulary rows in four registers of
// int32 sums a plane while the inputs run, 4 at a time; then the bounds, 16 tokens at a time.
template <int MR, int P>
void screen_tile_vnni(const uint8_t* X8, int64_t Kp, int64_t M, int64_t r0, const int8_t* Q, const float* SW,
                      const int32_t* CORR, const float* L1, int64_t blk, int64_t V, const RowScale* scale,
                      Screen& st) {
  const int8_t* qb = Q + blk * Kp * kBlock;
  __m512i acc[P][MR][4];
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[p][r][j] = _mm512_setzero_si512();
  for (int64_t g = 0; g < Kp / kGroup; ++g) {
    const int8_t* q = qb + g * kBlock * kGroup;
    const __m512i w0 = _mm512_loadu_si512(q), w1 = _mm512_loadu_si512(q + 64), w2 = _mm512_loadu_si512(q + 128),
                  w3 = _mm512_loadu_si512(q + 192);
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        int32_t bytes;
        std::memcpy(&bytes, X8 + (p * M + r0 + r) * Kp + g * kGroup, 4);
        const __m512i xb = _mm512_set1_epi32(bytes);
        acc[p][r][0] = _mm512_dpbusd_epi32(acc[p][r][0], xb, w0);
        acc[p][r][1] = _mm512_dpbusd_epi32(acc[p][r][1], xb, w1);
        acc[p][r][2] = _mm512_dpbusd_epi32(acc[p][r][2], xb, w2);
        acc[p][r][3] = _mm512_dpbusd_epi32(acc[p][r][3], xb, w3);
      }
    }
  }
  // The sums leave the registers here, once: the bounds below read them from memory, so the
  // accumulators above stay in registers (the compiler spilled them every step otherwise).
  alignas(64) int32_t sums[P][MR][kBlock];
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) _mm512_store_si512(sums[p][r] + 16 * j, acc[p][r][j]);
  const int64_t v0 = blk * kBlock, nvalid = std::min<int64_t>(kBlock, V - v0);
  __mmask16 valid[4];
  __m512i corr[4];
  __m512 sw[4], l1[4];
  for (int j = 0; j < 4; ++j) {
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, nvalid - 16 * j));
    valid[j] = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
    corr[j] = _mm512_loadu_si512(CORR + v0 + 16 * j);
    sw[j] = _mm512_loadu_ps(SW + v0 + 16 * j);
    l1[j] = _mm512_loadu_ps(L1 + v0 + 16 * j);
  }
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int r = 0; r < MR; ++r) {
    const RowScale& s = scale[r0 + r];
    const __m512 sx = _mm512_set1_ps(s.sx), c1 = _mm512_set1_ps(s.c1), c2 = _mm512_set1_ps(s.c2);
    __m512 ub[4];
    __m512 lb_max = _mm512_set1_ps(kNegInf);
    for (int j = 0; j < 4; ++j) {
      // planes 1: sum((qx + 128) qw) - 128 sum(qw); planes 2: 256 (sum((hi + 128) qw) - 128 sum(qw)) + sum(lo qw)
      __m512 dots = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(sums[P - 1][r] + 16 * j), corr[j]));
      if (P == 2)
        dots = _mm512_add_ps(_mm512_mul_ps(dots, _mm512_set1_ps(256.0f)),
                             _mm512_cvtepi32_ps(_mm512_load_si512(sums[0][r] + 16 * j)));
      const __m512 a = _mm512_mul_ps(dots, _mm512_mul_ps(sw[j], sx));
      const __m512 b = _mm512_fmadd_ps(sw[j], c1, _mm512_mul_ps(l1[j], c2));
      ub[j] = _mm512_add_ps(a, b);
      lb_max = _mm512_mask_max_ps(lb_max, valid[j], lb_max, _mm512_sub_ps(a, b));
    }
    float& thr = st.thr[r0 + r];
    thr = std::max(thr, _mm512_reduce_max_ps(lb_max));
    const __m512 t = _mm512_set1_ps(thr);
    for (int j = 0; j < 4; ++j) {
      const __mmask16 m = _mm512_mask_cmp_ps_mask(valid[j], ub[j], t, _CMP_GE_OQ);
      if (!m) continue;
      const int n = __builtin_popcount(m);
      const int64_t row = r0 + r;
      if (!st.room(row, n)) continue;
      const int64_t at = row * kCap + st.count[row];
      _mm512_mask_compressstoreu_epi32(st.cand.get() + at, m,
                                       _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(v0 + 16 * j))));
      _mm512_mask_compressstoreu_ps(st.upper.get() + at, m, ub[j]);
      st.count[row] += n;
    }
  }
}

// Tiles of up to 6 rows (one plane: 24 accumulators) or 3 (two planes: 24).
template <int P>
void screen_block_vnni(const uint8_t* X8, int64_t Kp, int64_t M, const int8_t* Q, const float* SW,
                       const int32_t* CORR, const float* L1, int64_t blk, int64_t V, const RowScale* scale,
                       Screen& st) {
  constexpr int kRows = P == 1 ? 6 : 3;
  int64_t r0 = 0;
  for (; r0 + kRows <= M; r0 += kRows)
    screen_tile_vnni<kRows, P>(X8, Kp, M, r0, Q, SW, CORR, L1, blk, V, scale, st);
  switch (M - r0) {
    case 1: screen_tile_vnni<1, P>(X8, Kp, M, r0, Q, SW, CORR, L1, blk, V, scale, st); break;
    case 2: screen_tile_vnni<2, P>(X8, Kp, M, r0, Q, SW, CORR, L1, blk, V, scale, st); break;
    case 3: screen_tile_vnni<3, P>(X8, Kp, M, r0, Q, SW, CORR, L1, blk, V, scale, st); break;
    case 4: screen_tile_vnni<4, P>(X8, Kp, M, r0, Q, SW, CORR, L1, blk, V, scale, st); break;
    case 5: screen_tile_vnni<5, P>(X8, Kp, M, r0, Q, SW, CORR, L1, blk, V, scale, st); break;
    default: break;
  }
}
#endif

void check_prepared(const std::vector<torch::Tensor>& prepared, int64_t K) {
  TORCH_CHECK(prepared.size() == 4, "greedy_head_argmax: `prepared` is greedy_head_prepare's four tensors");
  const auto& q = prepared[0];
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.is_contiguous() && q.dim() == 4 && q.size(2) == kBlock &&
                  q.size(3) == kGroup && q.size(1) * kGroup == (K + kGroup - 1) / kGroup * kGroup,
              "greedy_head_argmax: the int8 copy does not match x's ", K, " inputs");
  const int64_t padded = q.size(0) * kBlock;
  TORCH_CHECK(prepared[1].scalar_type() == torch::kFloat32 && prepared[1].numel() == padded &&
                  prepared[2].scalar_type() == torch::kInt32 && prepared[2].numel() == padded &&
                  prepared[3].scalar_type() == torch::kFloat32 && prepared[3].numel() == padded &&
                  prepared[1].is_contiguous() && prepared[2].is_contiguous() && prepared[3].is_contiguous(),
              "greedy_head_argmax: `prepared` is not greedy_head_prepare's output");
}

}  // namespace

bool greedy_head_fast() { return kFast; }

std::vector<torch::Tensor> greedy_head_prepare(const torch::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(),
              "greedy_head_prepare: the weight must be a contiguous float32 [V, K] CPU tensor");
  const int64_t V = w.size(0), K = w.size(1), Kp = (K + kGroup - 1) / kGroup * kGroup;
  const int64_t blocks = (V + kBlock - 1) / kBlock;
  auto q = torch::zeros({blocks, Kp / kGroup, kBlock, kGroup}, w.options().dtype(torch::kInt8));
  auto sw = torch::zeros({blocks * kBlock}, w.options());
  auto corr = torch::zeros({blocks * kBlock}, w.options().dtype(torch::kInt32));
  auto l1 = torch::zeros({blocks * kBlock}, w.options());
  const float* W = w.data_ptr<float>();
  int8_t* Q = q.data_ptr<int8_t>();
  float* SW = sw.data_ptr<float>();
  int32_t* CORR = corr.data_ptr<int32_t>();
  float* L1 = l1.data_ptr<float>();
  bool finite = true;
  at::parallel_for(0, V, 256, [&](int64_t begin, int64_t end) {
    bool ok = true;
    for (int64_t v = begin; v < end; ++v) {
      const float* row = W + v * K;
      float amax = 0.0f;
      double sum = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const float a = std::fabs(row[k]);
        ok &= std::isfinite(a);
        amax = std::max(amax, a);
        sum += a;
      }
      int8_t* base = Q + (v / kBlock) * Kp * kBlock + (v % kBlock) * kGroup;
      int32_t qsum = 0;
      if (amax > 0.0f && std::isfinite(amax)) {
        const float inv = 127.0f / amax;
        for (int64_t k = 0; k < K; ++k) {
          const int qv = static_cast<int>(std::min(127.0f, std::max(-127.0f, std::nearbyint(row[k] * inv))));
          base[(k / kGroup) * kBlock * kGroup + k % kGroup] = static_cast<int8_t>(qv);
          qsum += qv;
        }
        SW[v] = amax / 127.0f;
      }
      CORR[v] = 128 * qsum;
      L1[v] = std::nextafter(static_cast<float>(sum), std::numeric_limits<float>::infinity());
    }
    if (!ok) finite = false;  // benign race: only ever set to false
  });
  TORCH_CHECK(finite, "greedy_head_prepare: the weight has values that are not finite");
  return {q, sw, corr, l1};
}

torch::Tensor greedy_head_argmax(const torch::Tensor& x, const torch::Tensor& w,
                                 const std::vector<torch::Tensor>& prepared, const c10::optional<torch::Tensor>& stats,
                                 int64_t planes, bool compute_full, bool force_scalar, int64_t code) {
  TORCH_CHECK(planes == 1 || planes == 2, "greedy_head_argmax: planes is 1 (int8 x) or 2 (int16 x), not ", planes);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1,
              "greedy_head_argmax: x must be float32 [M, K] with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + kGroup - 1) / kGroup * kGroup;
  HeadRows head;
  head.K = K;
  int64_t V = 0;
  if (code < 0) {
    TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.dim() == 2 && w.is_contiguous() && w.size(1) == K,
                "greedy_head_argmax: the weight must be a contiguous float32 [V, ", K, "]");
    V = w.size(0);
    head.W = w.data_ptr<float>();
  } else {
    head.decode = qrow_decoder(w, code, K, V);  // checks the packed segment
  }
  check_prepared(prepared, K);
  const int64_t blocks = prepared[0].size(0);
  TORCH_CHECK(blocks * kBlock >= V && (blocks - 1) * kBlock < V, "greedy_head_argmax: the int8 copy has ",
              blocks * kBlock, " rows, the weight ", V);
  int64_t* S = nullptr;
  if (stats.has_value() && stats->defined()) {
    TORCH_CHECK(stats->scalar_type() == torch::kInt64 && stats->numel() == 3 && stats->is_contiguous(),
                "greedy_head_argmax: stats must be int64 [3]");
    S = stats->data_ptr<int64_t>();
  }
  auto out = torch::empty({M}, x.options().dtype(torch::kInt64));
  if (M == 0) return out;
  const float* X = x.data_ptr<float>();
  const int8_t* Q = prepared[0].data_ptr<int8_t>();
  const float* SW = prepared[1].data_ptr<float>();
  const int32_t* CORR = prepared[2].data_ptr<int32_t>();
  const float* L1 = prepared[3].data_ptr<float>();
  const int64_t xs = x.stride(0);

  std::vector<uint8_t> x8(planes * M * Kp);
  std::vector<RowScale> scale(M);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      scale[r] = quantize_row(X + r * xs, K, Kp, static_cast<int>(planes), x8.data() + r * Kp, M * Kp);
  });

  // Each thread screens one contiguous range of blocks (in vocabulary order, which the
  // merge below keeps, so that equal logits resolve to the lowest index).
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  const int64_t grain = (blocks + threads - 1) / threads;
  std::vector<Screen> screens((blocks + grain - 1) / grain);
  const bool vnni = kFast && !force_scalar;
  at::parallel_for(0, static_cast<int64_t>(screens.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Screen& st = screens[c];
      st.init(M);
      for (int64_t blk = c * grain; blk < std::min(blocks, (c + 1) * grain); ++blk) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
        if (vnni) {
          if (planes == 1) screen_block_vnni<1>(x8.data(), Kp, M, Q, SW, CORR, L1, blk, V, scale.data(), st);
          else screen_block_vnni<2>(x8.data(), Kp, M, Q, SW, CORR, L1, blk, V, scale.data(), st);
          continue;
        }
#endif
        (void)vnni;
        screen_block_scalar(x8.data(), Kp, M, static_cast<int>(planes), Q, SW, CORR, L1, blk, V, scale.data(), st);
      }
    }
  });

  // Per row: the best lower bound over all threads, then the exact dot product of every
  // candidate whose upper bound reaches it.
  int64_t* O = out.data_ptr<int64_t>();
  std::vector<int64_t> rescored(M, 0);
  std::vector<uint8_t> full(M, 0);
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(head.W == nullptr ? K : 0);
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = X + r * xs;
      bool whole = !scale[r].finite;
      float thr = kNegInf;
      for (const Screen& st : screens) {
        whole |= st.overflow[r] != 0;
        thr = std::max(thr, st.thr[r]);
      }
      int64_t best_i = -1;
      float best = kNegInf;
      for (const Screen& st : screens) {
        if (whole) break;
        for (int32_t i = 0; i < st.count[r]; ++i) {
          if (st.upper[r * kCap + i] < thr) continue;
          const int64_t v = st.cand[r * kCap + i];
          const float d = head.score(xr, v, buf.data());
          ++rescored[r];
          if (!std::isfinite(d)) {
            whole = true;
            break;
          }
          if (best_i < 0 || d > best) {
            best = d;
            best_i = v;
          }
        }
      }
      if (whole || best_i < 0) {
        full[r] = 1;
        best_i = compute_full ? full_argmax(xr, head, V, buf.data()) : -1;
      }
      O[r] = best_i;
    }
  });
  if (S != nullptr) {
    S[0] += M;
    for (int64_t r = 0; r < M; ++r) {
      S[1] += rescored[r];
      S[2] += full[r];
    }
  }
  return out;
}

}  // namespace piston_cpu

void bind_greedy_head(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("greedy_head_fast", &piston_cpu::greedy_head_fast,
        "whether greedy_head_argmax screens with AVX-512 VNNI here (else scalar code)");
  m.def("greedy_head_prepare", &piston_cpu::greedy_head_prepare,
        "an LM head's int8 copy for greedy_head_argmax: [q, scales, 128 * sum(q), |w|_1]", py::arg("weight"));
  m.def("greedy_head_argmax", &piston_cpu::greedy_head_argmax,
        "argmax_v (x . w_v) per row of x (torch.argmax of x @ w.T), screened in integers with a bound (x in "
        "`planes` bytes an input), rescored in float32; stats [3] (int64) counts rows, rescored candidates and "
        "rows computed in full (-1 for those rows without compute_full: the caller's GEMM is faster); with a "
        "format code >= 0, weight is a packed head's segment (uint8 GGUF blocks)",
        py::arg("x"), py::arg("weight"), py::arg("prepared"), py::arg("stats") = py::none(), py::arg("planes") = 2,
        py::arg("compute_full") = true, py::arg("force_scalar") = false, py::arg("code") = -1, py::call_guard<py::gil_scoped_release>());
}
