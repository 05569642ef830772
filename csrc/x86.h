// What csrc's x86 loops share: the switch FASTALIGN_X86 (GCC/Clang on x86-64: per-function target attributes and
// CPU detection; elsewhere, MSVC or other CPUs, the module has no loops and fastalign uses PyTorch) and small
// vector helpers.
#pragma once

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define FASTALIGN_X86 1

namespace fastalign {

// The sum of a vector's eight lanes, in one fixed order.
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace fastalign
#endif
