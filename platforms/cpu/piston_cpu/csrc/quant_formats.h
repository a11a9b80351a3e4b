// Packed weight formats, decoded in registers: 32 consecutive values of a row at a time.
//
// A packed row is its run of blocks (piston/checkpoint/packed.py): llama.cpp's block
// layouts for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32 values a block), Q4_K, Q5_K, Q6_K (256
// values a super-block), rows of F16, BF16 or F32 values, and Piston's I8 (a float32
// scale, then int8 values). Each format is a struct with
//
//   kCode                  the format's id (ggml's type id; I8 is Piston's own)
//   row_bytes(K)           bytes of a row of K values
//   raw(row, c, q, s)      values 32c .. 32c+31 of the row, unscaled, as four float
//                          vectors q, and their scales s: the values are d0 * q + m for
//                          q[0], q[1] and d1 * q + m for q[2], q[3]
//   kScaled, kTwoScales, kOffset: whether d0 (d1 != d0, m != 0) apply at all
//
// and ``decode`` gives the values themselves. They equal gguf.quants.dequantize's (the
// reference the tests compare against) exactly: every product of a code and a scale is
// exact in float32, so a fused multiply-add rounds the same as its multiply and add.

#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace piston_cpu {

struct Scales {
  float d0 = 1.0f, d1 = 1.0f, m = 0.0f;
};

inline float load_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m128i load8(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline __m256i u8x8(const uint8_t* p) { return _mm256_cvtepu8_epi32(load8(p)); }

// 16 bytes whose low nibbles are values 0-15 and high nibbles values 16-31.
inline void nibbles_split(const uint8_t* p, __m256 q[4]) {
  const __m256i m4 = _mm256_set1_epi32(0x0F);
  const __m256i a = u8x8(p), b = u8x8(p + 8);
  q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, m4));
  q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, m4));
  q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
  q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}

// The same with a fifth bit per value from a 32-bit mask (bit j -> value j).
inline void nibbles_split_5(const uint8_t* p, uint32_t qh, __m256 q[4]) {
  const __m256i m4 = _mm256_set1_epi32(0x0F), lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i a = u8x8(p), b = u8x8(p + 8);
  const __m256i v[4] = {_mm256_and_si256(a, m4), _mm256_and_si256(b, m4), _mm256_srli_epi32(a, 4),
                        _mm256_srli_epi32(b, 4)};
  for (int i = 0; i < 4; ++i) {
    const __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(qh >> (8 * i)), lanes),
                                         _mm256_set1_epi32(1));
    q[i] = _mm256_cvtepi32_ps(_mm256_or_si256(v[i], _mm256_slli_epi32(bit, 4)));
  }
}

struct FmtQ4_0 {
  static constexpr int64_t kCode = 2;
  static constexpr bool kScaled = true, kTwoScales = false, kOffset = true;
  static int64_t row_bytes(int64_t K) { return K / 32 * 18; }
  static inline void raw(const uint8_t* row, int64_t c, __m256 q[4], Scales& s) {
    const uint8_t* b = row + c * 18;
    s.d0 = s.d1 = load_f16(b);
    s.m = -8.0f * s.d0;
    nibbles_split(b + 2, q);
  }
};

struct FmtQ4_1 {
  static constexpr int64_t kCode = 3;
  static constexpr bool kScaled = true, kTwoScales = false, kOffset = true;
  static int64_t row_bytes(int64_t K) { return K / 32 * 20; }
  static inline void raw(const uint8_t* row, int64_t c, __m256 q[4], Scales& s) {
    const uint8_t* b = row + c * 20;
    s.d0 = s.d1 = load_f16(b);
    s.m = load_f16(b + 2);
    nibbles_split(b + 4, q);
  }
};

struct FmtQ5_0 {
  static constexpr int64_t kCode = 6;
  static constexpr bool kScaled = true, kTwoScales = false, kOffset = true;
  static int64_t row_bytes(int64_t K) { return K / 32 * 22; }
  static inline void raw(const uint8_t* row, int64_t c, __m256 q[4], Scales& s) {
    const uint8_t* b = row + c * 22;
    s.d0 = s.d1 = load_f16(b);
    s.m = -16.0f * s.d0;
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    nibbles_split_5(b + 6, qh, q);
  }
};

struct FmtQ5_1 {
  static constexpr int64_t kCode = 7;
  static constexpr bool kScaled = true, kTwoScales = false, kOffset = true;
  static int64_t row_bytes(int64_t K) { return K / 32 * 24; }
  static inline void raw(const uint8_t* row, int64_t c, __m256 q[4], Scales& s) {
    const uint8_t* b = row + c * 24;
    s.d0 = s.d1 = load_f16(b);
    s.m = load_f16(b + 2);
    uint32_t qh;
    std::memcpy(&qh, b + 4, 4);
    nibbles_split_5(b + 8, qh, q);
  }
};

struct FmtQ8_0 {
  static constexpr int64_t kCode = 8;
  static constexpr bool kScaled = true, kTwoScales = false, kOffset = false;
  static int64_t row_bytes(int64_t K) { return K / 32 * 34; }
  static inline void raw(const uint8_t* row, int64_t c, __m256 q[4], Scales& s) {
    const uint8_t* b = row + c * 34;
    s.d0 = s.d1 = load_f16(b);
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load8(b + 2 + 8 * i)));
  }
};

// Q4_K/Q5_K: sub-block j's 6-bit scale and min from the 12 scale bytes.
inline void k_scale_min(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q4_K/Q5_K: 32 bytes whose low (shift 0) or high (shift 4) nibbles are the values, with
// an optional fifth bit (bit j of each of 32 qh bytes).
template <bool kFifth>
inline void k_values(const uint8_t* p, int shift, const uint8_t* qh, int j, __m256 q[4]) {
  const __m256i m4 = _mm256_set1_epi32(0x0F);
  const __m128i sh = _mm_cvtsi32_si128(shift), shj = _mm_cvtsi32_si128(j);
  for (int i = 0; i < 4; ++i) {
    __m256i v = _mm256_and_si256(_mm256_srl_epi32(u8x8(p + 8 * i), sh), m4);
    if constexpr (kFifth) {
      const __m256i bit = _mm256_and_si256(_mm256_srl_epi32(u8x8(qh + 8 * i), shj), _mm256_set1_epi32(1));
      v = _mm256_or_si256(v, _mm256_slli_epi32(bit, 4));
    }
    q[i] = _mm256_cvtepi32_ps(v);
  }
}

template <bool kFifth, int64_t kBytes, int64_t kQs>
inline void k_raw(const uint8_t* row, int64_t c, __m256 q[4], Scales& s) {
  const uint8_t* b = row + (c >> 3) * kBytes;
  const int j = static_cast<int>(c & 7);
  int sc, mn;
  k_scale_min(b + 4, j, sc, mn);
  s.d0 = s.d1 = load_f16(b) * static_cast<float>(sc);
  s.m = -(load_f16(b + 2) * static_cast<float>(mn));
  k_values<kFifth>(b + kQs + 32 * (j >> 1), 4 * (j & 1), b + 16, j, q);
}

struct FmtQ4_K {
  static constexpr int64_t kCode = 12;
  static constexpr bool kScaled = true, kTwoScales = false, kOffset = true;
  static int64_t row_bytes(int64_t K) { return K / 256 * 144; }
  static inline void raw(const uint8_t* row, int64_t c, __m256 q[4], Scales& s) { k_raw<false, 144, 16>(row, c, q, s); }
};

struct FmtQ5_K {
  static constexpr int64_t kCode = 13;
  static constexpr bool kScaled = true, kTwoScales = false, kOffset = true;
  static int64_t row_bytes(int64_t K) { return K / 256 * 176; }
  static inline void raw(const uint8_t* row, int64_t c, __m256 q[4], Scales& s) { k_raw<true, 176, 48>(row, c, q, s); }
};

// Q6_K: value e = 128h + 32k + l (h < 2, k < 4, l < 32) is the nibble (k >> 1) of
// ql[64h + 32(k & 1) + l] and bits 2k, 2k+1 of qh[32h + l], minus 32; values 16i .. 16i+15
// take scale i.
struct FmtQ6_K {
  static constexpr int64_t kCode = 14;
  static constexpr bool kScaled = true, kTwoScales = true, kOffset = false;
  static int64_t row_bytes(int64_t K) { return K / 256 * 210; }
  static inline void raw(const uint8_t* row, int64_t c, __m256 q[4], Scales& s) {
    const uint8_t* b = row + (c >> 3) * 210;
    const int e = static_cast<int>(c & 7), h = e >> 2, k = e & 3;
    const uint8_t* ql = b + 64 * h + 32 * (k & 1);
    const uint8_t* qh = b + 128 + 32 * h;
    const float d = load_f16(b + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192) + 2 * e;
    s.d0 = d * static_cast<float>(scales[0]);
    s.d1 = d * static_cast<float>(scales[1]);
    const __m128i s_lo = _mm_cvtsi32_si128(4 * (k >> 1)), s_hi = _mm_cvtsi32_si128(2 * k);
    const __m256i m4 = _mm256_set1_epi32(0x0F), m2 = _mm256_set1_epi32(3), off = _mm256_set1_epi32(32);
    for (int i = 0; i < 4; ++i) {
      const __m256i lo = _mm256_and_si256(_mm256_srl_epi32(u8x8(ql + 8 * i), s_lo), m4);
      const __m256i hi = _mm256_and_si256(_mm256_srl_epi32(u8x8(qh + 8 * i), s_hi), m2);
      q[i] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), off));
    }
  }
};

struct FmtF32 {
  static constexpr int64_t kCode = 0;
  static constexpr bool kScaled = false, kTwoScales = false, kOffset = false;
  static int64_t row_bytes(int64_t K) { return K * 4; }
  static inline void raw(const uint8_t* row, int64_t c, __m256 q[4], Scales&) {
    const float* p = reinterpret_cast<const float*>(row) + 32 * c;
    for (int i = 0; i < 4; ++i) q[i] = _mm256_loadu_ps(p + 8 * i);
  }
};

struct FmtF16 {
  static constexpr int64_t kCode = 1;
  static constexpr bool kScaled = false, kTwoScales = false, kOffset = false;
  static int64_t row_bytes(int64_t K) { return K * 2; }
  static inline void raw(const uint8_t* row, int64_t c, __m256 q[4], Scales&) {
    const uint8_t* p = row + 64 * c;
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * i)));
  }
};

struct FmtBF16 {
  static constexpr int64_t kCode = 30;
  static constexpr bool kScaled = false, kTwoScales = false, kOffset = false;
  static int64_t row_bytes(int64_t K) { return K * 2; }
  static inline void raw(const uint8_t* row, int64_t c, __m256 q[4], Scales&) {
    const uint8_t* p = row + 64 * c;
    for (int i = 0; i < 4; ++i) {
      const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * i)));
      q[i] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    }
  }
};

// Piston's int8: a float32 scale for the row, then K int8 values.
struct FmtI8 {
  static constexpr int64_t kCode = 1000;
  static constexpr bool kScaled = true, kTwoScales = false, kOffset = false;
  static int64_t row_bytes(int64_t K) { return K + 4; }
  static inline void raw(const uint8_t* row, int64_t c, __m256 q[4], Scales& s) {
    std::memcpy(&s.d0, row, 4);
    s.d1 = s.d0;
    const uint8_t* p = row + 4 + 32 * c;
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load8(p + 8 * i)));
  }
};

// Values 32c .. 32c+31 of a row of format F, scaled.
template <class F>
inline void decode(const uint8_t* row, int64_t c, __m256 w[4]) {
  Scales s;
  F::raw(row, c, w, s);
  if constexpr (F::kScaled) {
    const __m256 d0 = _mm256_set1_ps(s.d0), d1 = _mm256_set1_ps(s.d1), m = _mm256_set1_ps(s.m);
    for (int i = 0; i < 4; ++i) w[i] = _mm256_fmadd_ps(w[i], i < 2 ? d0 : d1, m);
  }
}

// Calls body(Fmt{}) with the format of id ``code``; returns false for an unknown id.
template <class Body>
inline bool with_format(int64_t code, Body&& body) {
  switch (code) {
    case FmtF32::kCode: body(FmtF32{}); return true;
    case FmtF16::kCode: body(FmtF16{}); return true;
    case FmtBF16::kCode: body(FmtBF16{}); return true;
    case FmtQ4_0::kCode: body(FmtQ4_0{}); return true;
    case FmtQ4_1::kCode: body(FmtQ4_1{}); return true;
    case FmtQ5_0::kCode: body(FmtQ5_0{}); return true;
    case FmtQ5_1::kCode: body(FmtQ5_1{}); return true;
    case FmtQ8_0::kCode: body(FmtQ8_0{}); return true;
    case FmtQ4_K::kCode: body(FmtQ4_K{}); return true;
    case FmtQ5_K::kCode: body(FmtQ5_K{}); return true;
    case FmtQ6_K::kCode: body(FmtQ6_K{}); return true;
    case FmtI8::kCode: body(FmtI8{}); return true;
    default: return false;
  }
}

// Bytes of a row of K values in format ``code`` (-1: unknown format or K not whole blocks).
inline int64_t format_row_bytes(int64_t code, int64_t K) {
  int64_t bytes = -1;
  const int64_t block = (code == FmtQ4_K::kCode || code == FmtQ5_K::kCode || code == FmtQ6_K::kCode) ? 256 : 32;
  if (K % block) return -1;
  with_format(code, [&](auto fmt) { bytes = decltype(fmt)::row_bytes(K); });
  return bytes;
}

}  // namespace piston_cpu
