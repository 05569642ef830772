// What fastalign's torch ops library (csrc/torch_ops.cpp, fastalign/_torch_ops.so) calls in _C: the linear and
// cache attention loops behind a table of function pointers. The library links libtorch and _C does not, so the
// loops are compiled once, here, and the library receives the table's address (fastalign._C.kernel_table) when
// Python registers it (fastalign.models.native).
#pragma once

#include <cstdint>

namespace fastalign {

// Bumped whenever the table or a signature below changes; torch_ops.cpp refuses another.
constexpr int32_t kKernelTableVersion = 1;

struct Strided4 {  // a 4-d fp32 (or bool) array: base pointer and strides in elements
  std::uintptr_t ptr;
  int64_t s0, s1, s2, s3;
};

// y[M, O] = x[M, I] @ w[O, I]^T (+ b[O]) on one thread (csrc/linear.cpp): contiguous fp32 buffers, b null for no
// bias.
using LinearRowsFn = void (*)(const float* w, const float* x, float* y, const float* b, int64_t M, int64_t O,
                              int64_t I);
// out[b, t, h] = softmax_s(scale * q[b, h, t] . k[b, h / G, s] + mask[b, 0, t, s]) @ v[b, h / G] on one thread
// (csrc/attention.cpp): mask_kind 0 none, 1 additive fp32, 2 bool (true: seen); out [B, T, H, D].
using CacheAttentionFn = void (*)(const Strided4& q, const Strided4& k, const Strided4& v, const Strided4& mask,
                                  int mask_kind, const Strided4& out, int64_t B, int64_t H, int64_t H_kv, int64_t T,
                                  int64_t S, int64_t D, float scale);

struct KernelTable {
  int32_t version;                   // kKernelTableVersion
  LinearRowsFn linear_rows;          // the widest loop this CPU has; null where it has none
  CacheAttentionFn cache_attention;  // null where this CPU has no AVX2 and FMA
};

// In _C: each run of a loop, by rows (linear) or queries per row and head (attention), for tests and diagnostics
// (which calls reached a loop); sizes from kCountedSizes up share the last count.
constexpr int64_t kCountedSizes = 256;
void count_linear_run(int64_t rows);
void count_attention_run(int64_t queries);

}  // namespace fastalign
