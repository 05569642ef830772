// One-thread fp32 linear layer for a batch of rows on the CPU: y[m, o] = dot(W[o, :], x[m, :]) (+ b[o]).
//
// A decode step of a small batch multiplies a handful of rows by every weight matrix of the model, so its
// speed is how fast one core streams the weights (a few rows) or how close it comes to the core's peak
// multiply-add rate (more rows). BLAS reaches about half of either on the machines we measured, for lack of
// one or the other: its matrix-vector path streams slowly, and its matrix product packs W on every call.
// Two loops, both walking W once in memory order:
//
// * dot loop (M <= kDotMaxRows): each W row against every row of x while it sits in L1, as dot products over
//   I (two interleaved partial sums, then added); it prefetches a few KiB ahead when x has several rows (for one
//   row the hardware prefetcher alone is faster);
// * column loop (more rows): the rows of x in the lanes of one vector (x copied transposed, zero-padded), and
//   each output a chain of fused multiply-adds over i in order, W[o, i] broadcast from memory: one FMA per
//   weight and 8 or 16 rows, no horizontal sums, W read a few rows at a time with a software prefetch
//   kAheadBlocks blocks ahead. The lanes do not mix, so 8- and 16-lane vectors give the same bits.
//
// Within each loop an output's value is summed in the same order whatever the other rows are, so a row's result
// depends on the number of rows only through which loop runs (at most kDotMaxRows rows, or more).
//
// The Python side (fastalign.models.native.linear_rows) checks dtypes, contiguity and shapes and passes raw
// pointers: W [O, I] and x [M, I] contiguous fp32, y [M, O] contiguous fp32, b [O] or 0.
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // Linux 6.1+: back a range with transparent huge pages now, contents unchanged
#endif
#endif

#include "kernels.h"  // LinearRowsFn, count_linear_run
#include "x86.h"  // FASTALIGN_X86 where the loops exist (elsewhere fastalign uses F.linear); hsum256
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reads the deliberately undefined pass-through operand inside the AVX-512 intrinsics as uninitialised
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace py = pybind11;

namespace fastalign {
namespace {

constexpr int64_t kPrefetchFloats = 512;  // dot loop: 2 KiB ahead of the current W position (1-8 KiB alike)
constexpr int64_t kDotMaxRows = 4;        // more rows: the column loop

#ifdef FASTALIGN_X86
// NW rows of W against R rows of x: out[k * R + r] = dot(w + k * I, x + r * I). Two accumulators per output
// (even and odd 16-column chunks), summed the same way for every NW and R, so an output's value does not
// depend on which rows share the call; each W chunk is loaded once for all R rows, each x chunk once for all
// NW rows (2 x 4 outputs: 16 accumulators, 22 of the 32 vector registers).
template <int NW, int R>
__attribute__((target("avx512f"))) inline void dots_avx512(const float* w, const float* x, int64_t I, float* out) {
  __m512 acc0[NW][R], acc1[NW][R];
  for (int k = 0; k < NW; ++k)
    for (int r = 0; r < R; ++r) acc0[k][r] = acc1[k][r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= I; i += 32) {
    __m512 w0[NW], w1[NW];
    for (int k = 0; k < NW; ++k) {
      w0[k] = _mm512_loadu_ps(w + k * I + i);
      w1[k] = _mm512_loadu_ps(w + k * I + i + 16);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 x0 = _mm512_loadu_ps(x + r * I + i), x1 = _mm512_loadu_ps(x + r * I + i + 16);
      for (int k = 0; k < NW; ++k) {
        acc0[k][r] = _mm512_fmadd_ps(w0[k], x0, acc0[k][r]);
        acc1[k][r] = _mm512_fmadd_ps(w1[k], x1, acc1[k][r]);
      }
    }
  }
  for (; i < I; i += 16) {  // the last 1..31 columns, masked
    const __mmask16 mask = I - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (I - i)) - 1);
    for (int r = 0; r < R; ++r) {
      const __m512 x0 = _mm512_maskz_loadu_ps(mask, x + r * I + i);
      for (int k = 0; k < NW; ++k)
        acc0[k][r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, w + k * I + i), x0, acc0[k][r]);
    }
  }
  for (int k = 0; k < NW; ++k)
    for (int r = 0; r < R; ++r) out[k * R + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[k][r], acc1[k][r]));
}

template <int NW>
__attribute__((target("avx512f"))) inline void rows_block_avx512(const float* w, const float* x, float* y,
                                                                  const float* b, int64_t M, int64_t O, int64_t I,
                                                                  int64_t o) {
  float out[NW * 4];
  for (int64_t m = 0; m < M; m += 4) {
    const int64_t n = M - m < 4 ? M - m : 4;
    const float* xm = x + m * I;
    if (n == 4) dots_avx512<NW, 4>(w, xm, I, out);
    else if (n == 3) dots_avx512<NW, 3>(w, xm, I, out);
    else if (n == 2) dots_avx512<NW, 2>(w, xm, I, out);
    else dots_avx512<NW, 1>(w, xm, I, out);
    for (int k = 0; k < NW; ++k)
      for (int64_t r = 0; r < n; ++r) y[(m + r) * O + o + k] = b ? out[k * n + r] + b[o + k] : out[k * n + r];
  }
}

// ---- the column loop (more than kDotMaxRows rows)

// x [M, I] as ceil(M / lanes) groups of [I][lanes]: row g * lanes + l in lane l of group g, lanes past M zero. In
// a buffer of this thread, 64-byte aligned; valid until its next call.
const float* rows_in_lanes(const float* x, int64_t M, int64_t I, int64_t lanes) {
  constexpr std::size_t kKeptFloats = std::size_t{1} << 22;  // a buffer grown past 16 MiB shrinks at the next
                                                              // call that needs no more than that
  thread_local std::vector<float> buffer;
  const int64_t groups = (M + lanes - 1) / lanes;
  const std::size_t need = static_cast<std::size_t>(groups * I * lanes + 16);
  if (buffer.size() < need || (buffer.size() > kKeptFloats && need <= kKeptFloats))
    std::vector<float>(need).swap(buffer);
  float* xt = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(buffer.data()) + 63) & ~std::uintptr_t{63});
  for (int64_t m = 0; m < groups * lanes; ++m) {
    float* dst = xt + (m / lanes) * I * lanes + m % lanes;
    const float* src = x + m * I;
    if (m < M)
      for (int64_t i = 0; i < I; ++i) dst[i * lanes] = src[i];
    else
      for (int64_t i = 0; i < I; ++i) dst[i * lanes] = 0.f;
  }
  return xt;
}

// One block of NO outputs against one group of rows in lanes: out[k * lanes + l] = sum over i, in order, of
// w[k * I + i] * xt[i * lanes + l] (one FMA chain per output). `ahead`: W rows to prefetch alongside (the
// block kAheadBlocks further on), or null.
using ColumnsBlockFn = void (*)(const float* w, const float* xt, int64_t I, float* out, const float* ahead);

constexpr int64_t kAheadBlocks = 2;  // column loop: prefetch this many blocks ahead, into L2 (1-4 measured alike;
                                     // into L1 the lines were evicted by x's before their turn, 5-10% slower)

template <int NO>
__attribute__((target("avx512f"))) void columns_avx512(const float* w, const float* xt, int64_t I, float* out,
                                                        const float* ahead) {
  __m512 acc[NO];
  for (int k = 0; k < NO; ++k) acc[k] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= I; i += 16) {  // 16 weights of each row: one cache line, one prefetch
    if (ahead)
      for (int k = 0; k < NO; ++k) _mm_prefetch(reinterpret_cast<const char*>(ahead + k * I + i), _MM_HINT_T1);
    for (int j = 0; j < 16; ++j) {
      const __m512 xv = _mm512_load_ps(xt + (i + j) * 16);
      for (int k = 0; k < NO; ++k) acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(w[k * I + i + j]), xv, acc[k]);
    }
  }
  for (; i < I; ++i) {
    const __m512 xv = _mm512_load_ps(xt + i * 16);
    for (int k = 0; k < NO; ++k) acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(w[k * I + i]), xv, acc[k]);
  }
  for (int k = 0; k < NO; ++k) _mm512_store_ps(out + k * 16, acc[k]);
}

template <int NO>
__attribute__((target("avx2,fma"))) void columns_avx2(const float* w, const float* xt, int64_t I, float* out,
                                                      const float* ahead) {
  __m256 acc[NO];
  for (int k = 0; k < NO; ++k) acc[k] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= I; i += 16) {
    if (ahead)
      for (int k = 0; k < NO; ++k) _mm_prefetch(reinterpret_cast<const char*>(ahead + k * I + i), _MM_HINT_T1);
    for (int j = 0; j < 16; ++j) {
      const __m256 xv = _mm256_load_ps(xt + (i + j) * 8);
      for (int k = 0; k < NO; ++k) acc[k] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + k * I + i + j), xv, acc[k]);
    }
  }
  for (; i < I; ++i) {
    const __m256 xv = _mm256_load_ps(xt + i * 8);
    for (int k = 0; k < NO; ++k) acc[k] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + k * I + i), xv, acc[k]);
  }
  for (int k = 0; k < NO; ++k) _mm256_store_ps(out + k * 8, acc[k]);
}

// The column loop: blocks of NO outputs (`block`, of NO outputs and `lanes` lanes; `single`, of one output, for
// the last O % NO), each against every group of `lanes` rows while its W rows sit in L1; the prefetch runs with
// the first group.
template <int NO, int lanes>
void columns_loop(ColumnsBlockFn block, ColumnsBlockFn single, const float* w, const float* x, float* y,
                  const float* b, int64_t M, int64_t O, int64_t I) {
  const float* xt = rows_in_lanes(x, M, I, lanes);
  alignas(64) float out[NO * lanes];
  for (int64_t o = 0; o < O;) {
    const int64_t n = O - o >= NO ? NO : 1;
    const float* ahead = o + (kAheadBlocks + 1) * NO <= O ? w + (o + kAheadBlocks * NO) * I : nullptr;
    for (int64_t g = 0; g * lanes < M; ++g) {
      (n == NO ? block : single)(w + o * I, xt + g * I * lanes, I, out, g == 0 ? ahead : nullptr);
      const int64_t rows = M - g * lanes < lanes ? M - g * lanes : lanes;
      for (int64_t k = 0; k < n; ++k)
        for (int64_t l = 0; l < rows; ++l)
          y[(g * lanes + l) * O + o + k] = b ? out[k * lanes + l] + b[o + k] : out[k * lanes + l];
    }
    o += n;
  }
}

__attribute__((target("avx512f"))) void linear_rows_avx512(const float* w, const float* x, float* y,
                                                             const float* b, int64_t M, int64_t O, int64_t I) {
  if (M > kDotMaxRows) return columns_loop<4, 16>(columns_avx512<4>, columns_avx512<1>, w, x, y, b, M, O, I);
  if (M == 1) {  // one W row at a time, no software prefetch: one sequential stream, which the hardware
                 // prefetcher alone keeps at the streaming rate (measured ~25% faster than two rows + prefetch)
    for (int64_t o = 0; o < O; ++o) rows_block_avx512<1>(w + o * I, x, y, b, M, O, I, o);
    return;
  }
  int64_t o = 0;
  for (; o + 2 <= O; o += 2) {
    const float* rows = w + o * I;
    for (int64_t i = 0; i < 2 * I; i += 16)
      _mm_prefetch(reinterpret_cast<const char*>(rows + i + kPrefetchFloats), _MM_HINT_T0);
    rows_block_avx512<2>(rows, x, y, b, M, O, I, o);
  }
  if (o < O) rows_block_avx512<1>(w + o * I, x, y, b, M, O, I, o);
}

template <int R>
__attribute__((target("avx2,fma"))) inline void dots_avx2(const float* row, const float* x, int64_t I, float* out) {
  __m256 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= I; i += 16) {
    const __m256 w0 = _mm256_loadu_ps(row + i), w1 = _mm256_loadu_ps(row + i + 8);
    for (int r = 0; r < R; ++r) {
      acc0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * I + i), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * I + i + 8), acc1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum256(_mm256_add_ps(acc0[r], acc1[r]));
    for (int64_t j = i; j < I; ++j) s += row[j] * x[r * I + j];  // the last 0..15 columns
    out[r] = s;
  }
}

__attribute__((target("avx2,fma"))) void linear_rows_avx2(const float* w, const float* x, float* y,
                                                          const float* b, int64_t M, int64_t O, int64_t I) {
  if (M > kDotMaxRows)  // six chains (4-8 measured alike here): two FMA units busy at a latency of four cycles
    return columns_loop<6, 8>(columns_avx2<6>, columns_avx2<1>, w, x, y, b, M, O, I);
  float out[4];
  for (int64_t o = 0; o < O; ++o) {
    const float* row = w + o * I;
    if (M > 1)  // one row of x: the hardware prefetcher alone is faster (see linear_rows_avx512)
      for (int64_t i = 0; i < I; i += 16)
        _mm_prefetch(reinterpret_cast<const char*>(row + i + kPrefetchFloats), _MM_HINT_T0);
    for (int64_t m = 0; m < M; m += 4) {
      const int64_t n = M - m < 4 ? M - m : 4;
      if (n == 4) dots_avx2<4>(row, x + m * I, I, out);
      else if (n == 3) dots_avx2<3>(row, x + m * I, I, out);
      else if (n == 2) dots_avx2<2>(row, x + m * I, I, out);
      else dots_avx2<1>(row, x + m * I, I, out);
      for (int64_t r = 0; r < n; ++r) y[(m + r) * O + o] = b ? out[r] + b[o] : out[r];
    }
  }
}
#endif

// The loop for an instruction set this CPU has: "avx512f", "avx2", or "" for the widest one (nullptr: none).
LinearRowsFn loop_for(const std::string& isa) {
#ifdef FASTALIGN_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if ((isa.empty() || isa == "avx512f") && avx512) return linear_rows_avx512;
  if ((isa.empty() || isa == "avx2") && avx2) return linear_rows_avx2;
#endif
  return nullptr;
}

std::string widest_isa() {
  for (const char* isa : {"avx512f", "avx2"})
    if (loop_for(isa) != nullptr) return isa;
  return "";
}

// The size of a transparent huge page (the PMD size: 2 MiB on x86-64), 0 where there are none.
int64_t huge_page_bytes() {
#if defined(__linux__)
  static const int64_t bytes = [] {
    long long v = 0;
    if (FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "r")) {
      if (std::fscanf(f, "%lld", &v) != 1) v = 0;
      std::fclose(f);
    }
    return static_cast<int64_t>(v);
  }();
  return bytes;
#else
  return 0;
#endif
}

// Back the whole huge pages inside [ptr, ptr + nbytes) with transparent huge pages (MADV_COLLAPSE): the loop
// streams weights spread over 4 KiB pages ~15% slower (one TLB entry per 4 KiB). The contents do not change; the
// kernel copies each 2 MiB into one huge page. Returns the bytes advised, 0 when nothing was (no whole huge page
// inside, not Linux, a kernel without MADV_COLLAPSE, memory it declines).
int64_t collapse_huge_pages(std::uintptr_t ptr, int64_t nbytes) {
#if defined(__linux__)
  const int64_t huge = huge_page_bytes();
  if (huge <= 0 || nbytes <= 0) return 0;
  const std::uintptr_t first = (ptr + huge - 1) / huge * huge, end = (ptr + nbytes) / huge * huge;
  if (end <= first) return 0;
  return madvise(reinterpret_cast<void*>(first), end - first, MADV_COLLAPSE) == 0 ? static_cast<int64_t>(end - first)
                                                                                   : 0;
#else
  (void)ptr;
  (void)nbytes;
  return 0;
#endif
}

}  // namespace

// The widest loop, its run counted: what _C's kernel table gives the torch ops (module.cpp). Only there when this
// CPU has a loop.
void linear_rows_widest(const float* w, const float* x, float* y, const float* b, int64_t M, int64_t O, int64_t I) {
  static const LinearRowsFn loop = loop_for("");
  count_linear_run(M);
  loop(w, x, y, b, M, O, I);
}

bool has_linear_loop() { return loop_for("") != nullptr; }

void register_linear(py::module_& m) {
  m.attr("huge_page_bytes") = huge_page_bytes();
  m.def(
      "_collapse_huge_pages",
      [](std::uintptr_t ptr, int64_t nbytes) {
        py::gil_scoped_release release;
        return collapse_huge_pages(ptr, nbytes);
      },
      py::arg("ptr"), py::arg("nbytes"),
      "Back the whole transparent huge pages inside [ptr, ptr + nbytes) with huge pages now (Linux MADV_COLLAPSE; "
      "contents unchanged); returns the bytes advised (0: none).");
  m.attr("linear_isa") = widest_isa();  // "" when this CPU has no loop
  m.def(
      "_linear_rows_f32",
      [](std::uintptr_t w, std::uintptr_t x, std::uintptr_t y, std::uintptr_t b, int64_t M, int64_t O, int64_t I,
         const std::string& isa) {
        static const LinearRowsFn widest = loop_for("");
        const LinearRowsFn loop = isa.empty() ? widest : loop_for(isa);
        if (loop == nullptr) throw py::value_error("fastalign._C: no linear loop '" + isa + "' on this CPU");
        if (M < 0 || O < 0 || I < 0) throw py::value_error("linear_rows: negative size");
        count_linear_run(M);
        py::gil_scoped_release release;
        loop(reinterpret_cast<const float*>(w), reinterpret_cast<const float*>(x), reinterpret_cast<float*>(y),
             reinterpret_cast<const float*>(b), M, O, I);
      },
      py::arg("w"), py::arg("x"), py::arg("y"), py::arg("b"), py::arg("M"), py::arg("O"), py::arg("I"),
      py::arg("isa") = "",
      "y[M, O] = x[M, I] @ w[O, I]^T (+ b[O]) in fp32 on one thread; raw pointers of contiguous buffers, b = 0 for "
      "no bias; isa: 'avx512f', 'avx2' or '' (the widest this CPU has). Trusts its pointers "
      "(fastalign.models.native.linear_rows checks the tensors).");
}

}  // namespace fastalign
