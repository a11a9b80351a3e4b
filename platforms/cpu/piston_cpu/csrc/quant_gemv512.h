// The register path's AVX-512 variant for the 32-value formats (Q4_0, Q4_1, Q5_0, Q5_1,
// Q8_0): compiled when the build targets AVX-512 (kernels.py adds the flags on CPUs that
// have AVX512F/BW/VL/DQ), used for up to kGemvRows rows of x with float32 activations.
//
// A chunk's 32 codes become two 16-float vectors (values 0-15 and 16-31) from one 16-byte
// load: zero-extended to 16 lanes, whose low nibbles (then, shifted, high nibbles) index a
// 16-float table in a register (vpermps ignores the index's other bits; Q5's fifth bits
// pick a second table by mask). The chunk's float16 scale and offset are read through a
// table too (f16_table), so the conversion takes no shuffle-port work. For 2-8 rows of x
// the chunk is then decoded to its float32 values (d * q + m, as gguf's dequantization gives
// them) once for all rows, and multiplied into float32 sums: no per-row scale or offset work.
// One row of x (gemv512_row1) skips the decoding: d * (q . x) + m * sum(x).
//
// On a 2-core AVX-512 Xeon, Q4_1 rows of 576 values, one row of x, 2 threads, decoding
// first: 30 G weights/s from L2 (the 8-wide path: 23), 26 from past the cache (11.5; the
// prefetch below), Q8_0 33 (22-24). On a 2-core AVX-512 EPYC, one hot 960 x 576 Q4_1 matrix:
// 28 us decoding first, 19-23 us with gemv512_row1 (`benchmarks/packed_gemv.py --rows 1`).

#pragma once

#ifdef __AVX512F__

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "quant_formats.h"

namespace piston_cpu {

// Each chunk asks for the bytes this far ahead in the row's stream. Left to the hardware
// prefetchers, a stream of packed rows past the cache ran at 7 GB/s on 2 threads of an
// AVX-512 Xeon (the kernel's hot rate: 19); asked 2 KiB ahead, at 16.5.
constexpr int64_t kPrefetchBytes = 2048;

template <class F>
constexpr bool kGemv512 = F::kCode == FmtQ4_0::kCode || F::kCode == FmtQ4_1::kCode ||
                          F::kCode == FmtQ5_0::kCode || F::kCode == FmtQ5_1::kCode ||
                          F::kCode == FmtQ8_0::kCode;

// Chunk c's codes, unscaled: lo = values 0-15, hi = values 16-31 (Q4_*/Q5_* unsigned, Q8_0 signed).
template <class F>
inline void codes16(const uint8_t* row, int64_t c, __m512& lo, __m512& hi) {
  using L = typename F::L;
  const uint8_t* qs = L::qs(row, c);
  if constexpr (F::kCode == FmtQ8_0::kCode) {
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs))));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16))));
  } else {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    if constexpr (F::kCode == FmtQ5_0::kCode || F::kCode == FmtQ5_1::kCode) {  // bit j of qh -> value j
      uint32_t qh;
      std::memcpy(&qh, L::qh(row, c), 4);
      const __m512 lut_hi = _mm512_add_ps(lut, _mm512_set1_ps(16.0f));
      lo = _mm512_mask_blend_ps(static_cast<__mmask16>(qh), _mm512_permutexvar_ps(v, lut), _mm512_permutexvar_ps(v, lut_hi));
      const __m512i s = _mm512_srli_epi32(v, 4);
      hi = _mm512_mask_blend_ps(static_cast<__mmask16>(qh >> 16), _mm512_permutexvar_ps(s, lut), _mm512_permutexvar_ps(s, lut_hi));
    } else {
      lo = _mm512_permutexvar_ps(v, lut);  // the index's low four bits: the low nibble
      hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
    }
  }
}

// Every float16 value as a float32, indexed by its bits (256 KiB; a model's scales touch a
// few KiB of it). A scale converted through it is a scalar load that a broadcast or a
// scalar multiply takes straight from memory, where the conversion instruction would
// take shuffle-port work that the codes need.
inline const float* f16_table() {
  static const float* table = [] {
    static float t[65536];
    for (uint32_t h = 0; h < 65536; ++h) t[h] = _cvtsh_ss(static_cast<uint16_t>(h));
    return t;
  }();
  return table;
}

// The chunk's scale d and offset m (Q4_0: -8 d, Q5_0: -16 d, Q8_0: none).
template <class F>
inline void scales32(const uint8_t* row, int64_t c, const float* f16, float& d, float& m) {
  using L = typename F::L;
  d = f16[load_u16(L::d(row, c))];
  if constexpr (F::kCode == FmtQ4_0::kCode) m = -8.0f * d;
  else if constexpr (F::kCode == FmtQ5_0::kCode) m = -16.0f * d;
  else if constexpr (F::kCode == FmtQ4_1::kCode || F::kCode == FmtQ5_1::kCode) m = f16[load_u16(L::m(row, c))];
  else m = 0.0f;
}

// One chunk of a row against M rows of x: the chunk is decoded to its 32 float32 values
// once (d * q + m, exact as gguf's dequantization: every product of a code and a scale is
// exact in float32), then multiplied into every row's accumulators acc[m][2u], acc[m][2u+1].
template <class F, int M, int A>
inline void chunk512(const uint8_t* row, int64_t c, const float* X, int64_t xs, const float* f16,
                     __m512 (&acc)[M][A], int u) {
  _mm_prefetch(reinterpret_cast<const char*>(row) + F::L::kBlock * c + kPrefetchBytes, _MM_HINT_T0);
  __m512 lo, hi;
  codes16<F>(row, c, lo, hi);
  float d, moff;
  scales32<F>(row, c, f16, d, moff);
  const __m512 dv = _mm512_set1_ps(d);
  if constexpr (F::kOffset) {
    const __m512 mv = _mm512_set1_ps(moff);
    lo = _mm512_fmadd_ps(lo, dv, mv);
    hi = _mm512_fmadd_ps(hi, dv, mv);
  } else {
    lo = _mm512_mul_ps(lo, dv);
    hi = _mm512_mul_ps(hi, dv);
  }
  for (int m = 0; m < M; ++m) {
    const float* xp = X + m * xs + 32 * c;
    acc[m][2 * u] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp), acc[m][2 * u]);
    acc[m][2 * u + 1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp + 16), acc[m][2 * u + 1]);
  }
}

// One row of x (batch-1 decode): the chunk's unscaled codes meet x first and its scale
// multiplies their dot product, its offset m the sum of x over the chunk (xsum[c]):
// d * (q . x) + m * sum(x), three vector operations a chunk where decoding first takes four.
template <class F>
inline void gemv512_row1(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t n0, int64_t C,
                         const float* x, const float* xsum, float* Y, const float* bias) {
  constexpr int U = 4;
  const float* f16 = f16_table();
  for (int64_t n = 0; n < rows; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m512 acc[U];
    for (int u = 0; u < U; ++u) acc[u] = _mm512_setzero_ps();
    float off = 0.0f;
    auto chunk = [&](int64_t c, int u) {
      _mm_prefetch(reinterpret_cast<const char*>(row) + F::L::kBlock * c + kPrefetchBytes, _MM_HINT_T0);
      __m512 lo, hi;
      codes16<F>(row, c, lo, hi);
      float d, m;
      scales32<F>(row, c, f16, d, m);
      const __m512 t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 32 * c + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(x + 32 * c)));
      acc[u] = _mm512_fmadd_ps(t, _mm512_set1_ps(d), acc[u]);
      if constexpr (F::kOffset) off += m * xsum[c];
    };
    int64_t c = 0;
    for (; c + U <= C; c += U)
      for (int u = 0; u < U; ++u) chunk(c + u, u);
    for (int u = 0; c < C; ++c, ++u) chunk(c, u);
    const int64_t col = n0 + n;
    const __m512 a = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    Y[col] = _mm512_reduce_add_ps(a) + off + (bias ? bias[col] : 0.f);
  }
}

// Rows [0, rows) of a unit (consecutive rows, row_bytes apart) against M rows of x:
// Y[m * ys + n0 + n] = the row's decoded values . x[m] (+ bias). U chunks in flight per row,
// each with two accumulators per row of x (16 vector registers at most), unrolled so that
// they stay in registers.
template <class F, int M>
inline void gemv512_rows(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t n0, int64_t C,
                         const float* X, int64_t xs, float* Y, int64_t ys, const float* bias) {
  constexpr int U = M == 1 ? 4 : (M == 2 ? 4 : (M <= 4 ? 2 : 1));
  constexpr int A = 2 * U;
  const float* f16 = f16_table();
  for (int64_t n = 0; n < rows; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m512 acc[M][A];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + U <= C; c += U)
      for (int u = 0; u < U; ++u) chunk512<F, M, A>(row, c + u, X, xs, f16, acc, u);
    for (int u = 0; c < C; ++c, ++u) chunk512<F, M, A>(row, c, X, xs, f16, acc, u);
    const int64_t col = n0 + n;
    for (int m = 0; m < M; ++m) {
      __m512 a = acc[m][0];
      for (int k = 1; k < A; ++k) a = _mm512_add_ps(a, acc[m][k]);
      Y[m * ys + col] = _mm512_reduce_add_ps(a) + (bias ? bias[col] : 0.f);
    }
  }
}

}  // namespace piston_cpu

#endif  // __AVX512F__
