// Opt-in int8 activations for the register path (up to 8 rows of x), as llama.cpp does:
// PISTON_CPU_QUANT_ACTIVATIONS=int8. This is the 8-wide path; a build with AVX-512 VNNI
// takes quant_int8x512.h instead. x is quantized per 32 values to int8 with one float
// scale (round to nearest, scale = max|x| / 127); the 32-value formats' codes meet it in
// integer multiply-adds (vpmaddubsw), and each chunk's product is scaled and summed in
// float32. About 1.6x fewer vector operations per weight than decoding to float32, at the
// cost of the activations' rounding (0.4% of a block's largest value): logprobs move by
// up to about 0.5 on SmolLM2, so the default keeps float32 activations. Offsets (Q4_1's m,
// Q4_0's -8 d, ...) multiply the exact float sum of x over the chunk.

#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "quant_formats.h"
#include "simd.h"

namespace piston_cpu {

struct Q8Block {
  float d;
  int8_t q[32];
};

// x[0 .. 32C) -> C blocks.
inline void quantize_q8(const float* x, int64_t C, Q8Block* out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t c = 0; c < C; ++c) {
    const float* p = x + 32 * c;
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(p + 8 * i);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                              _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    out[c].d = amax / 127.0f;
    const __m256 scale = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    __m256i i[4];
    for (int k = 0; k < 4; ++k)
      i[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i a = _mm256_packs_epi32(i[0], i[1]), b = _mm256_packs_epi32(i[2], i[3]);
    const __m256i packed = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[c].q), packed);
  }
}

// The 32 codes of chunk c of a 32-value format as bytes in value order: unsigned for the
// 4- and 5-bit formats (the offset goes to Scales::m), signed for Q8_0.
template <class F>
inline __m256i codes8(const uint8_t* row, int64_t c) {
  using L = typename F::L;
  if constexpr (F::kCode == FmtQ8_0::kCode) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(L::qs(row, c)));
  } else {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(L::qs(row, c)));
    __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F));
    if constexpr (F::kCode == FmtQ5_0::kCode || F::kCode == FmtQ5_1::kCode) {  // bit j of qh -> value j
      uint32_t qh;
      std::memcpy(&qh, L::qh(row, c), 4);
      const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
      __m256i bits = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(qh)), shuf);
      bits = _mm256_cmpeq_epi8(_mm256_or_si256(bits, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)), _mm256_set1_epi64x(-1));
      v = _mm256_or_si256(v, _mm256_and_si256(bits, _mm256_set1_epi8(0x10)));
    }
    return v;
  }
}

template <class F>
inline __m256 dot8(__m256i w, const int8_t* q) {
  __m256i a = w, b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  if constexpr (F::kCode == FmtQ8_0::kCode) {  // vpmaddubsw takes an unsigned first operand
    b = _mm256_sign_epi8(b, a);
    a = _mm256_sign_epi8(a, a);
  }
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
}

template <class F>
constexpr bool kInt8Activations = F::kCode == FmtQ4_0::kCode || F::kCode == FmtQ4_1::kCode ||
                                  F::kCode == FmtQ5_0::kCode || F::kCode == FmtQ5_1::kCode ||
                                  F::kCode == FmtQ8_0::kCode;

// rows [n0, n0 + rows) of a weight in a 32-value format against M rows of quantized x.
template <class F, int M>
void gemv_rows_q8(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t n0, int64_t C, const Q8Block* xq,
                  const float* xsum, float* Y, int64_t ys, const float* bias) {
  for (int64_t n = 0; n < rows; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m256 acc[M];
    float off[M];
    for (int m = 0; m < M; ++m) {
      acc[m] = _mm256_setzero_ps();
      off[m] = 0.0f;
    }
    for (int64_t c = 0; c < C; ++c) {
      const __m256i codes = codes8<F>(row, c);
      const float d = load_f16(F::L::d(row, c));
      float moff = 0.0f;
      if constexpr (F::kCode == FmtQ4_0::kCode) moff = -8.0f * d;
      if constexpr (F::kCode == FmtQ5_0::kCode) moff = -16.0f * d;
      if constexpr (F::kCode == FmtQ4_1::kCode || F::kCode == FmtQ5_1::kCode) moff = load_f16(F::L::m(row, c));
      for (int m = 0; m < M; ++m) {
        const Q8Block& b = xq[m * C + c];
        acc[m] = _mm256_fmadd_ps(dot8<F>(codes, b.q), _mm256_set1_ps(d * b.d), acc[m]);
        if constexpr (F::kOffset) off[m] += moff * xsum[m * C + c];
      }
    }
    for (int m = 0; m < M; ++m)
      Y[m * ys + n0 + n] = hsum(acc[m]) + off[m] + (bias ? bias[n0 + n] : 0.0f);
  }
}

}  // namespace piston_cpu
