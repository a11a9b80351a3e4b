// Packed weight formats, decoded in registers: 32 consecutive values of a row (a chunk) at a time.
//
// A packed row is its run of blocks (piston/checkpoint/packed.py): llama.cpp's block
// layouts for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32 values a block), Q4_K, Q5_K, Q6_K (256
// values a super-block), rows of F16, BF16 or F32 values, and Piston's I8 (a float32
// scale, then int8 values). Each format is a struct with
//
//   kCode                  the format's id (ggml's type id; I8 is Piston's own)
//   row_bytes(K)           bytes of a row of K values
//   raw(row, c, C, q, s)   chunk c of a row of C chunks, unscaled, as four float vectors q,
//                          and its scales s: the values are d0 * q + m for q[0], q[1] and
//                          d1 * q + m for q[2], q[3]
//   kScaled, kTwoScales, kOffset: whether d0 (d1 != d0, m != 0) apply at all
//   kGroup                 chunks per group for the one-row path (0: none), with
//   group_dots(row, c0, C, x, t)    t[0..7]: dot products of the group's unscaled codes
//                                   with x (a chunk each, or half a chunk for Q6_K)
//   group_scales(row, c0, C, d, m)  their eight scales d and (per chunk) offsets m
//
// ``decode`` gives the values themselves. They equal gguf.quants.dequantize's (the
// reference the tests compare against) exactly: every product of a code and a scale is
// exact in float32, so a fused multiply-add rounds the same as its multiply and add.

#pragma once

#include <immintrin.h>

#include "simd.h"

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

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}

// Eight float16 values at p, p + stride, ... (eight blocks' scales) as floats. (A layout
// with each row's scales together, one 16-byte load, measured slower on SmolLM2's
// matrices than gathering them from the blocks.)
template <int64_t kStride>
inline __m256 load8_f16(const uint8_t* p) {
  __m128i v = _mm_cvtsi32_si128(load_u16(p));
  v = _mm_insert_epi16(v, load_u16(p + kStride), 1);
  v = _mm_insert_epi16(v, load_u16(p + 2 * kStride), 2);
  v = _mm_insert_epi16(v, load_u16(p + 3 * kStride), 3);
  v = _mm_insert_epi16(v, load_u16(p + 4 * kStride), 4);
  v = _mm_insert_epi16(v, load_u16(p + 5 * kStride), 5);
  v = _mm_insert_epi16(v, load_u16(p + 6 * kStride), 6);
  v = _mm_insert_epi16(v, load_u16(p + 7 * kStride), 7);
  return _mm256_cvtph_ps(v);
}

inline __m128i load8(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline __m256i u8x8(const uint8_t* p) { return _mm256_cvtepu8_epi32(load8(p)); }

// sum over i of q[i] * x[8i .. 8i+7], per lane.
inline __m256 dot4(const __m256 q[4], const float* x) {
  __m256 t = _mm256_mul_ps(q[0], _mm256_loadu_ps(x));
  t = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(x + 8), t);
  t = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(x + 16), t);
  return _mm256_fmadd_ps(q[3], _mm256_loadu_ps(x + 24), t);
}

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

// Where the fields of chunk c live in a row of a 32-value format with kQs code bytes, kQh
// high-bit bytes and an offset m or not: blocks of d, m, qh, qs.
template <int64_t kQs, int64_t kQh, bool kHasM>
struct Layout32 {
  static constexpr int64_t kBlock = 2 + (kHasM ? 2 : 0) + kQh + kQs;
  static const uint8_t* qs(const uint8_t* row, int64_t c) { return row + kBlock * c + kBlock - kQs; }
  static const uint8_t* qh(const uint8_t* row, int64_t c) { return row + kBlock * c + (kHasM ? 4 : 2); }
  static const uint8_t* d(const uint8_t* row, int64_t c) { return row + kBlock * c; }
  static const uint8_t* m(const uint8_t* row, int64_t c) { return row + kBlock * c + 2; }
};

// Shared by the 32-value formats: eight chunks' dot products, one chunk each.
template <class F>
inline void dots8(const uint8_t* row, int64_t c0, int64_t C, const float* x, __m256 t[8]) {
  for (int j = 0; j < 8; ++j) {
    __m256 q[4];
    F::codes(row, c0 + j, C, q);
    t[j] = dot4(q, x + 32 * (c0 + j));
  }
}

struct FmtQ4_0 {
  using L = Layout32<16, 0, false>;
  static constexpr int64_t kCode = 2;
  static constexpr bool kScaled = true, kTwoScales = false, kOffset = true;
  static constexpr int kGroup = 8;
  static int64_t row_bytes(int64_t K) { return K / 32 * 18; }
  static void codes(const uint8_t* row, int64_t c, int64_t C, __m256 q[4]) { nibbles_split(L::qs(row, c), q); }
  static void raw(const uint8_t* row, int64_t c, int64_t C, __m256 q[4], Scales& s) {
    s.d0 = s.d1 = load_f16(L::d(row, c));
    s.m = -8.0f * s.d0;
    codes(row, c, C, q);
  }
  static void group_dots(const uint8_t* row, int64_t c0, int64_t C, const float* x, __m256 t[8]) {
    dots8<FmtQ4_0>(row, c0, C, x, t);
  }
  static void group_scales(const uint8_t* row, int64_t c0, int64_t C, __m256& d, __m256& m) {
    d = load8_f16<L::kBlock>(L::d(row, c0));
    m = _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
  }
};

struct FmtQ4_1 {
  using L = Layout32<16, 0, true>;
  static constexpr int64_t kCode = 3;
  static constexpr bool kScaled = true, kTwoScales = false, kOffset = true;
  static constexpr int kGroup = 8;
  static int64_t row_bytes(int64_t K) { return K / 32 * 20; }
  static void codes(const uint8_t* row, int64_t c, int64_t C, __m256 q[4]) { nibbles_split(L::qs(row, c), q); }
  static void raw(const uint8_t* row, int64_t c, int64_t C, __m256 q[4], Scales& s) {
    s.d0 = s.d1 = load_f16(L::d(row, c));
    s.m = load_f16(L::m(row, c));
    codes(row, c, C, q);
  }
  static void group_dots(const uint8_t* row, int64_t c0, int64_t C, const float* x, __m256 t[8]) {
    dots8<FmtQ4_1>(row, c0, C, x, t);
  }
  static void group_scales(const uint8_t* row, int64_t c0, int64_t C, __m256& d, __m256& m) {
    d = load8_f16<L::kBlock>(L::d(row, c0));
    m = load8_f16<L::kBlock>(L::m(row, c0));
  }
};

struct FmtQ5_0 {
  using L = Layout32<16, 4, false>;
  static constexpr int64_t kCode = 6;
  static constexpr bool kScaled = true, kTwoScales = false, kOffset = true;
  static constexpr int kGroup = 8;
  static int64_t row_bytes(int64_t K) { return K / 32 * 22; }
  static void codes(const uint8_t* row, int64_t c, int64_t C, __m256 q[4]) {
    uint32_t qh;
    std::memcpy(&qh, L::qh(row, c), 4);
    nibbles_split_5(L::qs(row, c), qh, q);
  }
  static void raw(const uint8_t* row, int64_t c, int64_t C, __m256 q[4], Scales& s) {
    s.d0 = s.d1 = load_f16(L::d(row, c));
    s.m = -16.0f * s.d0;
    codes(row, c, C, q);
  }
  static void group_dots(const uint8_t* row, int64_t c0, int64_t C, const float* x, __m256 t[8]) {
    dots8<FmtQ5_0>(row, c0, C, x, t);
  }
  static void group_scales(const uint8_t* row, int64_t c0, int64_t C, __m256& d, __m256& m) {
    d = load8_f16<L::kBlock>(L::d(row, c0));
    m = _mm256_mul_ps(d, _mm256_set1_ps(-16.0f));
  }
};

struct FmtQ5_1 {
  using L = Layout32<16, 4, true>;
  static constexpr int64_t kCode = 7;
  static constexpr bool kScaled = true, kTwoScales = false, kOffset = true;
  static constexpr int kGroup = 8;
  static int64_t row_bytes(int64_t K) { return K / 32 * 24; }
  static void codes(const uint8_t* row, int64_t c, int64_t C, __m256 q[4]) {
    uint32_t qh;
    std::memcpy(&qh, L::qh(row, c), 4);
    nibbles_split_5(L::qs(row, c), qh, q);
  }
  static void raw(const uint8_t* row, int64_t c, int64_t C, __m256 q[4], Scales& s) {
    s.d0 = s.d1 = load_f16(L::d(row, c));
    s.m = load_f16(L::m(row, c));
    codes(row, c, C, q);
  }
  static void group_dots(const uint8_t* row, int64_t c0, int64_t C, const float* x, __m256 t[8]) {
    dots8<FmtQ5_1>(row, c0, C, x, t);
  }
  static void group_scales(const uint8_t* row, int64_t c0, int64_t C, __m256& d, __m256& m) {
    d = load8_f16<L::kBlock>(L::d(row, c0));
    m = load8_f16<L::kBlock>(L::m(row, c0));
  }
};

struct FmtQ8_0 {
  using L = Layout32<32, 0, false>;
  static constexpr int64_t kCode = 8;
  static constexpr bool kScaled = true, kTwoScales = false, kOffset = false;
  static constexpr int kGroup = 8;
  static int64_t row_bytes(int64_t K) { return K / 32 * 34; }
  static void codes(const uint8_t* row, int64_t c, int64_t C, __m256 q[4]) {
    const uint8_t* p = L::qs(row, c);
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load8(p + 8 * i)));
  }
  static void raw(const uint8_t* row, int64_t c, int64_t C, __m256 q[4], Scales& s) {
    s.d0 = s.d1 = load_f16(L::d(row, c));
    codes(row, c, C, q);
  }
  static void group_dots(const uint8_t* row, int64_t c0, int64_t C, const float* x, __m256 t[8]) {
    dots8<FmtQ8_0>(row, c0, C, x, t);
  }
  static void group_scales(const uint8_t* row, int64_t c0, int64_t C, __m256& d, __m256& m) {
    d = load8_f16<L::kBlock>(L::d(row, c0));
    m = _mm256_setzero_ps();
  }
};

// Q4_K/Q5_K: the eight 6-bit scales and mins of a super-block from its 12 scale bytes, as
// floats (llama.cpp's unpacking of get_scale_min_k4 for all eight at once).
inline void k_scales8(const uint8_t* s, __m256& sc, __m256& mn) {
  uint32_t u[4];
  std::memcpy(u, s, 12);
  const uint32_t kmask1 = 0x3f3f3f3f, kmask2 = 0x0f0f0f0f, kmask3 = 0x03030303;
  u[3] = ((u[2] >> 4) & kmask2) | (((u[1] >> 6) & kmask3) << 4);
  const uint32_t mins_lo = u[1] & kmask1;
  u[1] = (u[2] & kmask2) | (((u[0] >> 6) & kmask3) << 4);
  u[2] = mins_lo;
  u[0] &= kmask1;  // u[0], u[1]: the scales; u[2], u[3]: the mins
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u));
  sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
  mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
}

inline void k_scale_min(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q4_K/Q5_K: sub-block j's values: the low (j even) or high nibbles of 32 code bytes, with
// a fifth bit (bit j of each of 32 qh bytes) for Q5_K.
template <bool kFifth, int64_t kBytes, int64_t kQs>
struct FmtK45 {
  static constexpr bool kScaled = true, kTwoScales = false, kOffset = true;
  static constexpr int kGroup = 8;
  static int64_t row_bytes(int64_t K) { return K / 256 * kBytes; }
  static void codes(const uint8_t* row, int64_t c, int64_t, __m256 q[4]) {
    const uint8_t* b = row + (c >> 3) * kBytes;
    const int j = static_cast<int>(c & 7);
    const uint8_t* p = b + kQs + 32 * (j >> 1);
    const __m256i m4 = _mm256_set1_epi32(0x0F);
    const __m128i sh = _mm_cvtsi32_si128(4 * (j & 1)), shj = _mm_cvtsi32_si128(j);
    for (int i = 0; i < 4; ++i) {
      __m256i v = _mm256_and_si256(_mm256_srl_epi32(u8x8(p + 8 * i), sh), m4);
      if constexpr (kFifth) {
        const __m256i bit = _mm256_and_si256(_mm256_srl_epi32(u8x8(b + 16 + 8 * i), shj), _mm256_set1_epi32(1));
        v = _mm256_or_si256(v, _mm256_slli_epi32(bit, 4));
      }
      q[i] = _mm256_cvtepi32_ps(v);
    }
  }
  static void raw(const uint8_t* row, int64_t c, int64_t C, __m256 q[4], Scales& s) {
    const uint8_t* b = row + (c >> 3) * kBytes;
    int sc, mn;
    k_scale_min(b + 4, static_cast<int>(c & 7), sc, mn);
    s.d0 = s.d1 = load_f16(b) * static_cast<float>(sc);
    s.m = -(load_f16(b + 2) * static_cast<float>(mn));
    codes(row, c, C, q);
  }
  static void group_dots(const uint8_t* row, int64_t c0, int64_t C, const float* x, __m256 t[8]) {
    dots8<FmtK45>(row, c0, C, x, t);
  }
  static void group_scales(const uint8_t* row, int64_t c0, int64_t, __m256& d, __m256& m) {
    const uint8_t* b = row + (c0 >> 3) * kBytes;
    __m256 sc, mn;
    k_scales8(b + 4, sc, mn);
    d = _mm256_mul_ps(_mm256_set1_ps(load_f16(b)), sc);
    m = _mm256_mul_ps(_mm256_set1_ps(-load_f16(b + 2)), mn);
  }
};

struct FmtQ4_K : FmtK45<false, 144, 16> {
  static constexpr int64_t kCode = 12;
};
struct FmtQ5_K : FmtK45<true, 176, 48> {
  static constexpr int64_t kCode = 13;
};

// Q6_K: value e = 128h + 32k + l (h < 2, k < 4, l < 32) is the nibble (k >> 1) of
// ql[64h + 32(k & 1) + l] and bits 2k, 2k+1 of qh[32h + l], minus 32; values 16i .. 16i+15
// take scale i. Groups of four chunks: eight half-chunk dot products, eight scales.
struct FmtQ6_K {
  static constexpr int64_t kCode = 14;
  static constexpr bool kScaled = true, kTwoScales = true, kOffset = false;
  static constexpr int kGroup = 4;
  static int64_t row_bytes(int64_t K) { return K / 256 * 210; }
  static void codes(const uint8_t* row, int64_t c, int64_t, __m256 q[4]) {
    const uint8_t* b = row + (c >> 3) * 210;
    const int e = static_cast<int>(c & 7), h = e >> 2, k = e & 3;
    const uint8_t* ql = b + 64 * h + 32 * (k & 1);
    const uint8_t* qh = b + 128 + 32 * h;
    const __m128i s_lo = _mm_cvtsi32_si128(4 * (k >> 1)), s_hi = _mm_cvtsi32_si128(2 * k);
    const __m256i m4 = _mm256_set1_epi32(0x0F), m2 = _mm256_set1_epi32(3), off = _mm256_set1_epi32(32);
    for (int i = 0; i < 4; ++i) {
      const __m256i lo = _mm256_and_si256(_mm256_srl_epi32(u8x8(ql + 8 * i), s_lo), m4);
      const __m256i hi = _mm256_and_si256(_mm256_srl_epi32(u8x8(qh + 8 * i), s_hi), m2);
      q[i] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), off));
    }
  }
  static void raw(const uint8_t* row, int64_t c, int64_t C, __m256 q[4], Scales& s) {
    const uint8_t* b = row + (c >> 3) * 210;
    const float d = load_f16(b + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192) + 2 * (c & 7);
    s.d0 = d * static_cast<float>(scales[0]);
    s.d1 = d * static_cast<float>(scales[1]);
    codes(row, c, C, q);
  }
  static void group_dots(const uint8_t* row, int64_t c0, int64_t C, const float* x, __m256 t[8]) {
    for (int j = 0; j < 4; ++j) {
      __m256 q[4];
      codes(row, c0 + j, C, q);
      const float* xp = x + 32 * (c0 + j);
      t[2 * j] = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xp + 8), _mm256_mul_ps(q[0], _mm256_loadu_ps(xp)));
      t[2 * j + 1] = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xp + 24), _mm256_mul_ps(q[2], _mm256_loadu_ps(xp + 16)));
    }
  }
  static void group_scales(const uint8_t* row, int64_t c0, int64_t, __m256& d, __m256& m) {
    const uint8_t* b = row + (c0 >> 3) * 210;
    const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load8(b + 192 + 2 * (c0 & 7))));
    d = _mm256_mul_ps(_mm256_set1_ps(load_f16(b + 208)), sc);
    m = _mm256_setzero_ps();
  }
};

struct FmtPlain {  // rows of values: no scales, no groups
  static constexpr bool kScaled = false, kTwoScales = false, kOffset = false;
  static constexpr int kGroup = 0;
  static void group_dots(const uint8_t*, int64_t, int64_t, const float*, __m256*) {}
  static void group_scales(const uint8_t*, int64_t, int64_t, __m256&, __m256&) {}
};

struct FmtF32 : FmtPlain {
  static constexpr int64_t kCode = 0;
  static int64_t row_bytes(int64_t K) { return K * 4; }
  static void raw(const uint8_t* row, int64_t c, int64_t, __m256 q[4], Scales&) {
    const float* p = reinterpret_cast<const float*>(row) + 32 * c;
    for (int i = 0; i < 4; ++i) q[i] = _mm256_loadu_ps(p + 8 * i);
  }
};

struct FmtF16 : FmtPlain {
  static constexpr int64_t kCode = 1;
  static int64_t row_bytes(int64_t K) { return K * 2; }
  static void raw(const uint8_t* row, int64_t c, int64_t, __m256 q[4], Scales&) {
    const uint8_t* p = row + 64 * c;
    for (int i = 0; i < 4; ++i) q[i] = widen_f16x8(p + 16 * i);
  }
};

struct FmtBF16 : FmtPlain {
  static constexpr int64_t kCode = 30;
  static int64_t row_bytes(int64_t K) { return K * 2; }
  static void raw(const uint8_t* row, int64_t c, int64_t, __m256 q[4], Scales&) {
    const uint8_t* p = row + 64 * c;
    for (int i = 0; i < 4; ++i) q[i] = widen_bf16x8(p + 16 * i);
  }
};

// Piston's int8: a float32 scale for the row, then K int8 values.
struct FmtI8 : FmtPlain {
  static constexpr int64_t kCode = 1000;
  static constexpr bool kScaled = true;
  static int64_t row_bytes(int64_t K) { return K + 4; }
  static void raw(const uint8_t* row, int64_t c, int64_t, __m256 q[4], Scales& s) {
    std::memcpy(&s.d0, row, 4);
    s.d1 = s.d0;
    const uint8_t* p = row + 4 + 32 * c;
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load8(p + 8 * i)));
  }
};

// Values 32c .. 32c+31 of a row of C chunks of format F, scaled.
template <class F>
inline void decode(const uint8_t* row, int64_t c, int64_t C, __m256 w[4]) {
  Scales s;
  F::raw(row, c, C, w, s);
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
