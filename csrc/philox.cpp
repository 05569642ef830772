// Philox-4x32-10 streams on the CPU, bit for bit the generator of fastalign.kernels.rng (its NumPy and torch
// twins, and the Triton kernels' uniform_triton).
//
// Element c of the stream of a row with key (k0, k1) and counter (c1, c2) is word c % 4 of
// philox((c / 4, c1, c2, 0), (k0, k1)). A decoding step draws one such stream of vocabulary length per row;
// NumPy spends ~0.1-0.3 ms on it (a hundred array calls), this loop a few microseconds.
//
// The Python side (fastalign.kernels.rng) passes raw pointers: streams [R, 2] contiguous int64 (key, counter),
// out [R, n] contiguous, int64 (the 32-bit words) or fp32 (uniforms strictly inside (0, 1)).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define FASTALIGN_X86 1
#endif
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reads the deliberately undefined pass-through operand inside the AVX-512 intrinsics as uninitialised
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#if defined(__GNUC__) || defined(__clang__)
#define FASTALIGN_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define FASTALIGN_ALWAYS_INLINE inline
#endif

namespace py = pybind11;

namespace fastalign {
namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
constexpr int kRounds = 10;
constexpr int kLanes = 64;  // Philox evaluations per block (4 * kLanes elements): four AVX-512 registers

// 32 random bits -> fp32 uniform: (bits >> 9) + 0.5 times 2**-23 (kernels.rng.bits_to_uniform_torch).
inline float to_uniform(uint32_t bits) { return (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f); }

// Elements [4 * g0, 4 * g0 + 4 * kLanes) of one row's stream, in element order, into words[4 * kLanes]: kLanes
// Philox evaluations with counters (g0 + l, c1, c2, 0) and key (k0, k1). The portable version.
FASTALIGN_ALWAYS_INLINE void philox_block_generic(uint32_t g0, uint32_t c1, uint32_t c2, uint32_t k0, uint32_t k1,
                                                  uint32_t* words) {
  for (int l = 0; l < kLanes; ++l) {
    uint32_t x0 = g0 + l, x1 = c1, x2 = c2, x3 = 0, a = k0, b = k1;
    for (int r = 0; r < kRounds; ++r) {
      const uint64_t p0 = static_cast<uint64_t>(x0) * kM0;
      const uint64_t p1 = static_cast<uint64_t>(x2) * kM1;
      x0 = static_cast<uint32_t>(p1 >> 32) ^ x1 ^ a;
      x2 = static_cast<uint32_t>(p0 >> 32) ^ x3 ^ b;
      x1 = static_cast<uint32_t>(p1);
      x3 = static_cast<uint32_t>(p0);
      a += kW0;
      b += kW1;
    }
    words[4 * l] = x0;
    words[4 * l + 1] = x1;
    words[4 * l + 2] = x2;
    words[4 * l + 3] = x3;
  }
}

// The four words of each lane, interleaved into element order (lane l's words at 4 l .. 4 l + 3).
FASTALIGN_ALWAYS_INLINE void interleave(const uint32_t* x0, const uint32_t* x1, const uint32_t* x2,
                                        const uint32_t* x3, uint32_t* words) {
  for (int l = 0; l < kLanes; ++l) {
    words[4 * l] = x0[l];
    words[4 * l + 1] = x1[l];
    words[4 * l + 2] = x2[l];
    words[4 * l + 3] = x3[l];
  }
}

#ifdef FASTALIGN_X86
// hi and lo 32-bit words of x * m, lane by lane (m: one 32-bit constant in every lane). vpmuludq multiplies the
// even lanes (the low half of each 64-bit element); the odd lanes are shifted down and multiplied in turn.
__attribute__((target("avx512f"))) inline void mulhilo16(__m512i x, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// kLanes evaluations as four independent registers of 16 lanes: a round is a chain of dependent multiplies,
// shifts and blends, and four chains in flight keep the vector units busy while each waits on the last.
__attribute__((target("avx512f"))) inline void philox_block_avx512(uint32_t g0, uint32_t c1, uint32_t c2,
                                                                   uint32_t k0, uint32_t k1, uint32_t* words) {
  constexpr int V = kLanes / 16;
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kM0)), m1 = _mm512_set1_epi32(static_cast<int>(kM1));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i x0[V], x1[V], x2[V], x3[V];
  for (int v = 0; v < V; ++v) {
    x0[v] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(g0 + 16 * v)), lane);
    x1[v] = _mm512_set1_epi32(static_cast<int>(c1));
    x2[v] = _mm512_set1_epi32(static_cast<int>(c2));
    x3[v] = _mm512_setzero_si512();
  }
  uint32_t a = k0, b = k1;
  for (int r = 0; r < kRounds; ++r) {
    const __m512i ka = _mm512_set1_epi32(static_cast<int>(a)), kb = _mm512_set1_epi32(static_cast<int>(b));
    for (int v = 0; v < V; ++v) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(x0[v], m0, hi0, lo0);
      mulhilo16(x2[v], m1, hi1, lo1);
      x0[v] = _mm512_xor_si512(_mm512_xor_si512(hi1, x1[v]), ka);
      x2[v] = _mm512_xor_si512(_mm512_xor_si512(hi0, x3[v]), kb);
      x1[v] = lo1;
      x3[v] = lo0;
    }
    a += kW0;
    b += kW1;
  }
  alignas(64) uint32_t w0[kLanes], w1[kLanes], w2[kLanes], w3[kLanes];
  for (int v = 0; v < V; ++v) {
    _mm512_store_si512(w0 + 16 * v, x0[v]);
    _mm512_store_si512(w1 + 16 * v, x1[v]);
    _mm512_store_si512(w2 + 16 * v, x2[v]);
    _mm512_store_si512(w3 + 16 * v, x3[v]);
  }
  interleave(w0, w1, w2, w3, words);
}

__attribute__((target("avx2"))) inline void mulhilo8(__m256i x, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// kLanes evaluations, four independent registers of 8 lanes at a time (as philox_block_avx512).
__attribute__((target("avx2"))) inline void philox_block_avx2(uint32_t g0, uint32_t c1, uint32_t c2, uint32_t k0,
                                                              uint32_t k1, uint32_t* words) {
  constexpr int V = 4;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kM0)), m1 = _mm256_set1_epi32(static_cast<int>(kM1));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  alignas(32) uint32_t w0[kLanes], w1[kLanes], w2[kLanes], w3[kLanes];
  for (int pass = 0; pass < kLanes; pass += 8 * V) {
    __m256i x0[V], x1[V], x2[V], x3[V];
    for (int v = 0; v < V; ++v) {
      x0[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(g0 + pass + 8 * v)), lane);
      x1[v] = _mm256_set1_epi32(static_cast<int>(c1));
      x2[v] = _mm256_set1_epi32(static_cast<int>(c2));
      x3[v] = _mm256_setzero_si256();
    }
    uint32_t a = k0, b = k1;
    for (int r = 0; r < kRounds; ++r) {
      const __m256i ka = _mm256_set1_epi32(static_cast<int>(a)), kb = _mm256_set1_epi32(static_cast<int>(b));
      for (int v = 0; v < V; ++v) {
        __m256i hi0, lo0, hi1, lo1;
        mulhilo8(x0[v], m0, hi0, lo0);
        mulhilo8(x2[v], m1, hi1, lo1);
        x0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, x1[v]), ka);
        x2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, x3[v]), kb);
        x1[v] = lo1;
        x3[v] = lo0;
      }
      a += kW0;
      b += kW1;
    }
    for (int v = 0; v < V; ++v) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(w0 + pass + 8 * v), x0[v]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(w1 + pass + 8 * v), x1[v]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(w2 + pass + 8 * v), x2[v]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(w3 + pass + 8 * v), x3[v]);
    }
  }
  interleave(w0, w1, w2, w3, words);
}
#endif

// One row: elements [0, n) into out (int64 words when Out is int64_t, fp32 uniforms when float), a block of
// 4 * kLanes elements at a time.
template <typename Out, void (*Block)(uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t*)>
FASTALIGN_ALWAYS_INLINE void philox_row(int64_t key, int64_t ctr, int64_t n, Out* out) {
  const uint64_t k = static_cast<uint64_t>(key), c = static_cast<uint64_t>(ctr);
  const uint32_t k0 = static_cast<uint32_t>(k), k1 = static_cast<uint32_t>(k >> 32);
  const uint32_t c1 = static_cast<uint32_t>(c), c2 = static_cast<uint32_t>(c >> 32);
  uint32_t words[4 * kLanes];
  for (int64_t e0 = 0; e0 < n; e0 += 4 * kLanes) {
    // the group index e0 / 4 < 2**32: a stream has at most 2**34 elements (checked by the caller)
    Block(static_cast<uint32_t>(e0 / 4), c1, c2, k0, k1, words);
    const int64_t m = n - e0 < 4 * kLanes ? n - e0 : 4 * kLanes;
    for (int64_t j = 0; j < m; ++j) {
      if constexpr (sizeof(Out) == 8) {
        out[e0 + j] = static_cast<Out>(words[j]);
      } else {
        out[e0 + j] = to_uniform(words[j]);
      }
    }
  }
}

template <typename Out>
void philox_rows_generic(const int64_t* streams, int64_t R, int64_t n, Out* out) {
  for (int64_t r = 0; r < R; ++r)
    philox_row<Out, philox_block_generic>(streams[2 * r], streams[2 * r + 1], n, out + r * n);
}

#ifdef FASTALIGN_X86
template <typename Out>
__attribute__((target("avx512f"))) void philox_rows_avx512(const int64_t* streams, int64_t R, int64_t n, Out* out) {
  for (int64_t r = 0; r < R; ++r)
    philox_row<Out, philox_block_avx512>(streams[2 * r], streams[2 * r + 1], n, out + r * n);
}

template <typename Out>
__attribute__((target("avx2"))) void philox_rows_avx2(const int64_t* streams, int64_t R, int64_t n, Out* out) {
  for (int64_t r = 0; r < R; ++r)
    philox_row<Out, philox_block_avx2>(streams[2 * r], streams[2 * r + 1], n, out + r * n);
}
#endif

template <typename Out>
using RowsFn = void (*)(const int64_t*, int64_t, int64_t, Out*);

// The loop for an instruction set: "avx512f", "avx2", "generic", or "" for the widest this CPU has (nullptr:
// the CPU lacks it).
template <typename Out>
RowsFn<Out> rows_for(const std::string& isa) {
#ifdef FASTALIGN_X86
  __builtin_cpu_init();
  if ((isa.empty() || isa == "avx512f") && __builtin_cpu_supports("avx512f")) return philox_rows_avx512<Out>;
  if ((isa.empty() || isa == "avx2") && __builtin_cpu_supports("avx2")) return philox_rows_avx2<Out>;
#endif
  if (isa.empty() || isa == "generic") return philox_rows_generic<Out>;
  return nullptr;
}

template <typename Out>
void run(std::uintptr_t streams, std::uintptr_t out, int64_t R, int64_t n, const std::string& isa) {
  static const RowsFn<Out> widest = rows_for<Out>("");
  const RowsFn<Out> rows = isa.empty() ? widest : rows_for<Out>(isa);
  if (rows == nullptr) throw py::value_error("fastalign._C: no Philox loop '" + isa + "' on this CPU");
  if (R < 0 || n < 0 || n >= (int64_t(1) << 34)) throw py::value_error("philox: sizes out of range");
  py::gil_scoped_release release;  // a large batch of vocabulary-wide rows takes milliseconds
  rows(reinterpret_cast<const int64_t*>(streams), R, n, reinterpret_cast<Out*>(out));
}

}  // namespace

void register_philox(py::module_& m) {
  m.def("_philox_bits", &run<int64_t>, py::arg("streams"), py::arg("out"), py::arg("R"), py::arg("n"),
        py::arg("isa") = "",
        "out[R, n] int64 = the 32-bit words of elements 0..n-1 of the Philox-4x32-10 streams [R, 2] int64 "
        "(key, counter); raw pointers of contiguous buffers; isa: 'avx512f', 'avx2', 'generic' or '' (the widest "
        "here). Trusts its pointers (fastalign.kernels.rng checks the tensors).");
  m.def("_philox_uniform", &run<float>, py::arg("streams"), py::arg("out"), py::arg("R"), py::arg("n"),
        py::arg("isa") = "",
        "out[R, n] fp32 = the uniforms ((bits >> 9) + 0.5) * 2**-23 of the same words (see _philox_bits).");
}

}  // namespace fastalign
