// The opt-in int8 activations (PISTON_CPU_QUANT_ACTIVATIONS=int8, quant_int8x.h) on AVX-512
// with VNNI: compiled when the build targets AVX-512 and the CPU has AVX512_VNNI (kernels.py
// adds -mavx512vnni). The same arithmetic as quant_int8x.h's 8-wide path: x quantized per
// 32 values to int8 (one float scale each), each chunk's integer dot product with the
// weight's codes scaled by the two scales in float32, offsets (Q4_1's m, Q4_0's -8 d, ...)
// times the exact float sum of x over the chunk.
//
// Two chunks meet in one 64-byte register: bytes [c: values 0-15 | c+1: 0-15 | c: 16-31 |
// c+1: 16-31], the order in which a 4-bit format's two 16-byte code blocks split into low
// and high nibbles. x is laid out the same way once per call (Q8Pair), so one vpdpbusd
// gives 16 partial sums: lanes 0-3 and 8-11 belong to chunk c, lanes 4-7 and 12-15 to c+1.
// vpdpbusd multiplies unsigned bytes by signed ones: Q8_0's signed codes are shifted by 128
// and the sum starts from -128 times the x bytes' sums (Q8Pair::corr), so it stays exact.
//
// On a 2-core AVX-512 Xeon, one row of x, 2 threads (benchmarks/packed_gemv.py): SmolLM2's
// 120 Q4_1 linears (66 MB) take 3.1 ms against 3.5-4.0 with float32 activations (the 8-wide
// int8 path: 6.6-7.2), its Q8_0 LM head 0.55 ms against 0.82-0.90; one hot 960 x 576 Q4_1
// matrix streams 25 GB/s against 17-19.

#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "quant_formats.h"
#include "quant_gemv512.h"
#include "quant_int8x.h"

namespace piston_cpu {

// Chunks 2p and 2p + 1 of one row of x (a missing second chunk is zeros).
struct alignas(64) Q8Pair {
  int8_t q[64];     // [2p: 0-15 | 2p+1: 0-15 | 2p: 16-31 | 2p+1: 16-31]
  float d[16];      // each lane's chunk scale: 2p in lanes 0-3 and 8-11, 2p+1 in 4-7 and 12-15
  int32_t corr[16]; // -128 times the sum of the lane's four bytes (Q8_0's shifted codes)
  float xs[4];      // the exact float sums of x over 2p, 2p, 2p+1, 2p+1 (for the offsets)
};

// Row m of x (C chunks, already quantized per chunk; xsum: the chunks' float sums) -> (C + 1) / 2 pairs.
inline void pair_q8(const Q8Block* blocks, const float* xsum, int64_t C, Q8Pair* out) {
  for (int64_t p = 0; 2 * p < C; ++p) {
    Q8Pair& o = out[p];
    const Q8Block& a = blocks[2 * p];
    const bool two = 2 * p + 1 < C;
    const Q8Block zero{0.0f, {}};
    const Q8Block& b = two ? blocks[2 * p + 1] : zero;
    std::memcpy(o.q, a.q, 16);
    std::memcpy(o.q + 16, b.q, 16);
    std::memcpy(o.q + 32, a.q + 16, 16);
    std::memcpy(o.q + 48, b.q + 16, 16);
    for (int l = 0; l < 16; ++l) {
      o.d[l] = (l / 4) % 2 == 0 ? a.d : b.d;
      int32_t s = 0;
      for (int k = 0; k < 4; ++k) s += o.q[4 * l + k];
      o.corr[l] = -128 * s;
    }
    o.xs[0] = o.xs[1] = xsum[2 * p];
    o.xs[2] = o.xs[3] = two ? xsum[2 * p + 1] : 0.0f;
  }
}

// The codes of chunks c and (when two) c + 1 in the pair order, as unsigned bytes (Q8_0:
// shifted by 128).
template <class F>
inline __m512i codes64(const uint8_t* row, int64_t c, bool two) {
  using L = typename F::L;
  if constexpr (F::kCode == FmtQ8_0::kCode) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(L::qs(row, c)));
    const __m256i b = two ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(L::qs(row, c + 1)))
                          : _mm256_setzero_si256();  // meets x's zeros
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);  // [a lo | a hi | b lo | b hi]
    return _mm512_xor_si512(_mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(3, 1, 2, 0)), _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(L::qs(row, c)));
    const __m128i b = two ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(L::qs(row, c + 1))) : _mm_setzero_si128();
    const __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
    __m512i v = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1),
                                 _mm512_set1_epi8(0x0F));
    if constexpr (F::kCode == FmtQ5_0::kCode || F::kCode == FmtQ5_1::kCode) {  // bit j of qh -> value j
      uint32_t ha, hb = 0;
      std::memcpy(&ha, L::qh(row, c), 4);
      if (two) std::memcpy(&hb, L::qh(row, c + 1), 4);
      const uint64_t bits = (ha & 0xFFFFull) | (static_cast<uint64_t>(hb & 0xFFFF) << 16) |
                            (static_cast<uint64_t>(ha >> 16) << 32) | (static_cast<uint64_t>(hb >> 16) << 48);
      v = _mm512_or_si512(v, _mm512_maskz_set1_epi8(bits, 0x10));
    }
    return v;
  }
}

// Chunks c and (when two) c + 1's scales as [d, m, d', m'] (Q4_0, Q5_0 and Q8_0 have no m:
// zeros there), converted together from their float16 bits.
template <class F>
inline __m128 scales_pair(const uint8_t* row, int64_t c, bool two) {
  using L = typename F::L;
  constexpr bool kHasM = F::kCode == FmtQ4_1::kCode || F::kCode == FmtQ5_1::kCode;
  uint32_t a, b = 0;
  std::memcpy(&a, L::d(row, c), 4);  // d, then m (or the next bytes, masked off)
  if (two) std::memcpy(&b, L::d(row, c + 1), 4);
  __m128i v = _mm_insert_epi32(_mm_cvtsi32_si128(static_cast<int>(a)), static_cast<int>(b), 1);
  if constexpr (!kHasM) v = _mm_and_si128(v, _mm_set1_epi32(0xFFFF));
  return _mm_cvtph_ps(v);
}

// What [d, m, d', m'] times [xs, xs, xs', xs'] adds to the offset: m (Q4_1, Q5_1), -8 d
// (Q4_0), -16 d (Q5_0).
template <class F>
inline __m128 offset_weights() {
  if constexpr (F::kCode == FmtQ4_0::kCode) return _mm_setr_ps(-8.0f, 0.0f, -8.0f, 0.0f);
  else if constexpr (F::kCode == FmtQ5_0::kCode) return _mm_setr_ps(-16.0f, 0.0f, -16.0f, 0.0f);
  else return _mm_setr_ps(0.0f, 1.0f, 0.0f, 1.0f);
}

// Rows [0, rows) of a unit against M rows of x given as pairs (xp[m * P + p]).
template <class F, int M>
void gemv512_rows_q8(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t n0, int64_t C, const Q8Pair* xp,
                     float* Y, int64_t ys, const float* bias) {
  constexpr int A = M <= 2 ? 2 : 1;  // independent accumulator chains per row of x
  const int64_t P = (C + 1) / 2;
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2);  // d, d' to the lanes
  for (int64_t n = 0; n < rows; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m512 acc[M][A];
    __m128 off[M];
    for (int m = 0; m < M; ++m) {
      for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
      off[m] = _mm_setzero_ps();
    }
    // Pair p into accumulator chain u (a constant once the loops below are unrolled).
    const auto pair = [&](int64_t p, int u) {
      const int64_t c = 2 * p;
      const bool two = c + 1 < C;
      _mm_prefetch(reinterpret_cast<const char*>(row) + F::L::kBlock * c + kPrefetchBytes, _MM_HINT_T0);
      const __m512i codes = codes64<F>(row, c, two);
      const __m128 dm = scales_pair<F>(row, c, two);
      const __m512 dw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(dm));
      const __m128 dmo = _mm_mul_ps(dm, offset_weights<F>());
      for (int m = 0; m < M; ++m) {
        const Q8Pair& x = xp[m * P + p];
        const __m512i init = F::kCode == FmtQ8_0::kCode ? _mm512_loadu_si512(x.corr) : _mm512_setzero_si512();
        const __m512i dot = _mm512_dpbusd_epi32(init, codes, _mm512_loadu_si512(x.q));
        const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(x.d));
        acc[m][u] = _mm512_fmadd_ps(scaled, dw, acc[m][u]);
        if constexpr (F::kOffset) off[m] = _mm_fmadd_ps(dmo, _mm_loadu_ps(x.xs), off[m]);
      }
    };
    int64_t p = 0;
    for (; p + A <= P; p += A)
      for (int u = 0; u < A; ++u) pair(p + u, u);
    for (; p < P; ++p) pair(p, 0);
    const int64_t col = n0 + n;
    for (int m = 0; m < M; ++m) {
      __m512 a = acc[m][0];
      for (int k = 1; k < A; ++k) a = _mm512_add_ps(a, acc[m][k]);
      __m128 o = _mm_add_ps(off[m], _mm_movehl_ps(off[m], off[m]));
      o = _mm_add_ss(o, _mm_movehdup_ps(o));
      Y[m * ys + col] = _mm512_reduce_add_ps(a) + _mm_cvtss_f32(o) + (bias ? bias[col] : 0.0f);
    }
  }
}

}  // namespace piston_cpu

#endif  // AVX-512 with VNNI
