// Shared by Piston's CPU kernels: horizontal sums and the float32 small-batch dot products.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace piston_cpu {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// Sums of four vectors' lanes, as one 4-lane vector (a, b, c, d).
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// 8 consecutive 16-bit floats at p (unaligned), widened exactly to float32: IEEE float16
// (F16C), or bfloat16 (its bits are a float32's top half).
inline __m256 widen_f16x8(const void* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}
inline __m256 widen_bf16x8(const void* p) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}


// Dot products of R consecutive weight rows with M rows of x; K elements each. Up to 4
// rows go two x rows at a time (2R accumulators); more rows go one x row at a time.
template <int R>
inline void dot_rows(const float* w, int64_t K, const float* x, int64_t x_stride, int64_t M,
                     float* y, int64_t y_stride, const float* bias) {
  const int64_t K8 = K & ~int64_t(7);
  // The next R rows (the thread's next block) are fetched into cache during the first
  // pass over this block: R/2 cache lines per 8 columns covers them exactly. (Spreading
  // the fetches over all passes measured slower: they arrive later.)
  const float* next = w + R * K;
  int64_t m = 0;
  for (; R <= 4 && m + 2 <= M; m += 2) {
    const float* x0 = x + m * x_stride;
    const float* x1 = x0 + x_stride;
    __m256 a[R], b[R];
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      if (m == 0)
        for (int i = 0; i < (R + 1) / 2; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + R * k + 16 * i), _MM_HINT_T0);
      __m256 xv0 = _mm256_loadu_ps(x0 + k), xv1 = _mm256_loadu_ps(x1 + k);
      for (int r = 0; r < R; ++r) {
        __m256 wv = _mm256_loadu_ps(w + r * K + k);
        a[r] = _mm256_fmadd_ps(wv, xv0, a[r]);
        b[r] = _mm256_fmadd_ps(wv, xv1, b[r]);
      }
    }
    if constexpr (R == 4) {
      if (K8 == K) {  // the four outputs of a row of x are adjacent in y: one store each
        __m128 y0 = hsum4(a[0], a[1], a[2], a[3]), y1 = hsum4(b[0], b[1], b[2], b[3]);
        if (bias) {
          const __m128 bv = _mm_loadu_ps(bias);
          y0 = _mm_add_ps(y0, bv);
          y1 = _mm_add_ps(y1, bv);
        }
        _mm_storeu_ps(y + m * y_stride, y0);
        _mm_storeu_ps(y + (m + 1) * y_stride, y1);
        continue;
      }
    }
    for (int r = 0; r < R; ++r) {
      float s0 = hsum(a[r]), s1 = hsum(b[r]);
      for (int64_t k = K8; k < K; ++k) {
        s0 += w[r * K + k] * x0[k];
        s1 += w[r * K + k] * x1[k];
      }
      float bb = bias ? bias[r] : 0.f;
      y[m * y_stride + r] = s0 + bb;
      y[(m + 1) * y_stride + r] = s1 + bb;
    }
  }
  for (; m < M; ++m) {
    const float* x0 = x + m * x_stride;
    __m256 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      if (m == 0)
        for (int i = 0; i < (R + 1) / 2; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + R * k + 16 * i), _MM_HINT_T0);
      __m256 xv0 = _mm256_loadu_ps(x0 + k);
      for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + k), xv0, a[r]);
    }
    if constexpr (R == 8) {
      if (K8 == K) {
        __m128 y0 = hsum4(a[0], a[1], a[2], a[3]), y1 = hsum4(a[4], a[5], a[6], a[7]);
        if (bias) {
          y0 = _mm_add_ps(y0, _mm_loadu_ps(bias));
          y1 = _mm_add_ps(y1, _mm_loadu_ps(bias + 4));
        }
        _mm_storeu_ps(y + m * y_stride, y0);
        _mm_storeu_ps(y + m * y_stride + 4, y1);
        continue;
      }
    }
    if constexpr (R == 4) {
      if (K8 == K) {
        __m128 y0 = hsum4(a[0], a[1], a[2], a[3]);
        if (bias) y0 = _mm_add_ps(y0, _mm_loadu_ps(bias));
        _mm_storeu_ps(y + m * y_stride, y0);
        continue;
      }
    }
    for (int r = 0; r < R; ++r) {
      float s0 = hsum(a[r]);
      for (int64_t k = K8; k < K; ++k) s0 += w[r * K + k] * x0[k];
      y[m * y_stride + r] = s0 + (bias ? bias[r] : 0.f);
    }
  }
}


}  // namespace piston_cpu
