// One-thread fp32 attention of a few queries per row over a KV cache on the CPU: a decode step's (one query per
// row and head) or a short block's.
//
// At these shapes a library kernel is all overhead: torch's CPU flash attention runs two small matrix products
// per row and head, ~2 us each, so a batch of 16 over 128 cached columns costs ~380 us a layer where reading its
// keys and values takes ~80 us. Here each key-value head of a row is one pass over its keys and one over its
// values, for all the queries of its group at once (grouped-query attention reads a shared head in place):
//
//   score[q, s] = scale * dot(query[q], key[s]) + mask[q, s]     (a bool mask: -inf where False)
//   p[q, s]     = exp(score[q, s] - max_s score[q, s])            (0 below exp's normal range: exactly 0 for masked)
//   out[q]      = sum_s p[q, s] * value[s] / sum_s p[q, s]        (zeros where every p is 0: a bool mask hiding all)
//
// Sums over s run in fixed lanes (column s in lane s % 8, the tail padded with zeros) and then a fixed tree, and
// the value sum in column order, so masked columns (p = 0, finite keys and values) change no bit: a row's result
// is the same over any view of the cache that holds its live columns, and does not depend on the other rows. (An
// added mask of finfo.min that hides every column leaves all scores equal: the mean of the values, as SDPA.)
//
// The Python side (fastalign.models.native.cache_attention) checks dtypes and shapes and passes raw pointers and
// strides in elements: query [B, H, T, D], key and value [B, Hkv, S, D] (unit stride over D), mask [B, 1, T, S]
// (stride 0 over B where it is shared), out [B, T, H, D] contiguous.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels.h"  // Strided4, count_attention_run
#include "x86.h"  // FASTALIGN_X86 where the loop exists (elsewhere SDPA runs); hsum256

namespace py = pybind11;

namespace fastalign {
namespace {

#ifdef FASTALIGN_X86
__attribute__((target("avx2,fma"))) inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for x <= 0 (a softmax's shifted scores): Cephes' polynomial after x = n ln2 + r, |r| <= ln2 / 2, about
// 1 ulp; 0 where exp(x) is below the normal range (x < -87.3: a masked column's finfo.min or -inf, or a weight
// that underflows in any case).
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_NLT_UQ);  // (a NaN is kept: it spreads)
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);                                  // (max_ps passes a NaN in x on)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep);
}

// dots[j] = dot(query, key[j]) for four keys: each a chain of multiply-adds in the lanes of a vector, then the
// same fixed tree (the last D % 8 columns added after), so a score does not depend on its neighbours.
__attribute__((target("avx2,fma"))) inline void dot4(const float* query, const float* const* key, int64_t D,
                                                     float* dots) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const int64_t D8 = D / 8 * 8;
  for (int64_t d = 0; d < D8; d += 8) {
    const __m256 q = _mm256_loadu_ps(query + d);
    a0 = _mm256_fmadd_ps(q, _mm256_loadu_ps(key[0] + d), a0);
    a1 = _mm256_fmadd_ps(q, _mm256_loadu_ps(key[1] + d), a1);
    a2 = _mm256_fmadd_ps(q, _mm256_loadu_ps(key[2] + d), a2);
    a3 = _mm256_fmadd_ps(q, _mm256_loadu_ps(key[3] + d), a3);
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // [0 1 2 3 | 0 1 2 3]
  _mm_storeu_ps(dots, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  for (int64_t d = D8; d < D; ++d)
    for (int j = 0; j < 4; ++j) dots[j] += query[d] * key[j][d];
}

// out[q] (+)= sum over s of p[q * P + s] * v[s * vs + d0 .. d0 + 8 NV) for NQ queries, NV vectors of the head.
template <int NQ, int NV>
__attribute__((target("avx2,fma"))) inline void weigh_values(const float* p, int64_t P, const float* v, int64_t vs,
                                                            int64_t S, float* const* out) {
  __m256 acc[NQ][NV];
  for (int q = 0; q < NQ; ++q)
    for (int j = 0; j < NV; ++j) acc[q][j] = _mm256_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    __m256 row[NV];
    for (int j = 0; j < NV; ++j) row[j] = _mm256_loadu_ps(v + s * vs + 8 * j);
    for (int q = 0; q < NQ; ++q) {
      const __m256 w = _mm256_broadcast_ss(p + q * P + s);
      for (int j = 0; j < NV; ++j) acc[q][j] = _mm256_fmadd_ps(w, row[j], acc[q][j]);
    }
  }
  for (int q = 0; q < NQ; ++q)
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(out[q] + 8 * j, acc[q][j]);
}

template <int NQ>
__attribute__((target("avx2,fma"))) void weigh_values_nv(int nv, const float* p, int64_t P, const float* v,
                                                         int64_t vs, int64_t S, float* const* out) {
  if (nv == 4) weigh_values<NQ, 4>(p, P, v, vs, S, out);
  else if (nv == 3) weigh_values<NQ, 3>(p, P, v, vs, S, out);
  else if (nv == 2) weigh_values<NQ, 2>(p, P, v, vs, S, out);
  else weigh_values<NQ, 1>(p, P, v, vs, S, out);
}

// One key-value head of one row: the NQ = G * T queries of its group (query index qi = t * G + g).
__attribute__((target("avx2,fma"))) void attend_head(const Strided4& q, const Strided4& k, const Strided4& v,
                                                     const Strided4& mask, int mask_kind, const Strided4& out,
                                                     int64_t b, int64_t h_kv, int64_t G, int64_t T, int64_t S,
                                                     int64_t D, float scale, std::vector<float>& work) {
  const int64_t NQ = G * T, P = (S + 7) / 8 * 8;  // scores per query, padded to whole vectors
  work.resize(static_cast<std::size_t>(NQ * P));
  float* scores = work.data();
  const float* qp = reinterpret_cast<const float*>(q.ptr);
  const float* keys = reinterpret_cast<const float*>(k.ptr) + b * k.s0 + h_kv * k.s1;
  const float* values = reinterpret_cast<const float*>(v.ptr) + b * v.s0 + h_kv * v.s1;
  const int64_t D8 = D / 8 * 8;
  std::vector<const float*> qrow(static_cast<std::size_t>(NQ));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g) qrow[t * G + g] = qp + b * q.s0 + (h_kv * G + g) * q.s1 + t * q.s2;

  // scores, four keys at a time (a key past S repeats the last one; its score is dropped), masked below
  for (int64_t qi = 0; qi < NQ; ++qi) {
    const float* query = qrow[qi];
    float* row = scores + qi * P;
    for (int64_t s = 0; s < S; s += 4) {
      const float* key[4];
      for (int j = 0; j < 4; ++j) key[j] = keys + (s + j < S ? s + j : S - 1) * k.s2;
      float dots[4];
      dot4(query, key, D, dots);
      for (int j = 0; j < 4 && s + j < S; ++j) row[s + j] = dots[j] * scale;
    }
  }
  for (int64_t qi = 0; qi < NQ; ++qi) {
    float* row = scores + qi * P;
    const int64_t t = qi / G;
    if (mask_kind == 1) {
      const float* m = reinterpret_cast<const float*>(mask.ptr) + b * mask.s0 + t * mask.s2;
      for (int64_t s = 0; s < S; ++s) row[s] += m[s * mask.s3];
    } else if (mask_kind == 2) {
      const bool* m = reinterpret_cast<const bool*>(mask.ptr) + b * mask.s0 + t * mask.s2;
      for (int64_t s = 0; s < S; ++s)
        if (!m[s * mask.s3]) row[s] = -std::numeric_limits<float>::infinity();
    }
    for (int64_t s = S; s < P; ++s) row[s] = -std::numeric_limits<float>::infinity();
    // softmax weights, unnormalised: exp(score - max), summed in fixed lanes
    __m256 top = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t s = 0; s < P; s += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(row + s));
    const float peak = hmax8(top);
    const __m256 shift = _mm256_set1_ps(peak == -std::numeric_limits<float>::infinity() ? 0.f : peak);
    __m256 total = _mm256_setzero_ps();
    for (int64_t s = 0; s < P; s += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + s), shift));
      _mm256_storeu_ps(row + s, e);
      total = _mm256_add_ps(total, e);
    }
    const float sum = hsum256(total);
    const float inv = sum == 0.f ? 0.f : 1.f / sum;  // (a bool mask hiding every column: zeros)
    for (int64_t s = 0; s < P; s += 8)
      _mm256_storeu_ps(row + s, _mm256_mul_ps(_mm256_loadu_ps(row + s), _mm256_set1_ps(inv)));
  }

  // the weighted values: queries three at a time, the head 32 columns at a time
  float* dst[3];
  for (int64_t q0 = 0; q0 < NQ; q0 += 3) {
    const int nq = static_cast<int>(NQ - q0 < 3 ? NQ - q0 : 3);
    for (int64_t d0 = 0; d0 < D8; d0 += 32) {
      const int nv = static_cast<int>((D8 - d0) / 8 < 4 ? (D8 - d0) / 8 : 4);
      for (int j = 0; j < nq; ++j) {
        const int64_t qi = q0 + j, t = qi / G, g = qi % G;
        dst[j] = reinterpret_cast<float*>(out.ptr) + b * out.s0 + t * out.s1 + (h_kv * G + g) * out.s2 + d0;
      }
      const float* p = scores + q0 * P;
      if (nq == 3) weigh_values_nv<3>(nv, p, P, values + d0, v.s2, S, dst);
      else if (nq == 2) weigh_values_nv<2>(nv, p, P, values + d0, v.s2, S, dst);
      else weigh_values_nv<1>(nv, p, P, values + d0, v.s2, S, dst);
    }
    for (int j = 0; j < nq; ++j) {  // the last D % 8 columns
      const int64_t qi = q0 + j, t = qi / G, g = qi % G;
      float* o = reinterpret_cast<float*>(out.ptr) + b * out.s0 + t * out.s1 + (h_kv * G + g) * out.s2;
      for (int64_t d = D8; d < D; ++d) {
        float acc = 0.f;
        for (int64_t s = 0; s < S; ++s) acc += scores[qi * P + s] * values[s * v.s2 + d];
        o[d] = acc;
      }
    }
  }
}
#endif

bool has_avx2() {
#ifdef FASTALIGN_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace

// Every row and key-value head (the loop's entry for the pybind function below and for _C's kernel table); only
// called where has_avx2().
void cache_attention_f32(const Strided4& q, const Strided4& k, const Strided4& v, const Strided4& mask, int mask_kind,
                         const Strided4& out, int64_t B, int64_t H, int64_t H_kv, int64_t T, int64_t S, int64_t D,
                         float scale) {
  count_attention_run(T);
#ifdef FASTALIGN_X86
  std::vector<float> work;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H_kv; ++h) attend_head(q, k, v, mask, mask_kind, out, b, h, H / H_kv, T, S, D, scale, work);
#endif
}

bool has_cache_attention() { return has_avx2(); }

void register_attention(py::module_& m) {
  m.attr("has_cache_attention") = has_avx2();
  m.def(
      "_cache_attention_f32",
      [](py::tuple q, py::tuple k, py::tuple v, py::tuple mask, int mask_kind, py::tuple out, int64_t B, int64_t H,
         int64_t H_kv, int64_t T, int64_t S, int64_t D, float scale) {
        auto strided = [](py::tuple t) {
          return Strided4{t[0].cast<std::uintptr_t>(), t[1].cast<int64_t>(), t[2].cast<int64_t>(),
                          t[3].cast<int64_t>(), t[4].cast<int64_t>()};
        };
        if (!has_avx2()) throw py::value_error("fastalign._C: no cache attention on this CPU (AVX2 and FMA)");
        if (B < 0 || H <= 0 || H_kv <= 0 || H % H_kv || T < 0 || S < 0 || D < 0 || mask_kind < 0 || mask_kind > 2)
          throw py::value_error("cache_attention: bad sizes");
        const Strided4 qs = strided(q), ks = strided(k), vs = strided(v), ms = strided(mask), os = strided(out);
        py::gil_scoped_release release;
        cache_attention_f32(qs, ks, vs, ms, mask_kind, os, B, H, H_kv, T, S, D, scale);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("mask_kind"), py::arg("out"), py::arg("B"),
      py::arg("H"), py::arg("H_kv"), py::arg("T"), py::arg("S"), py::arg("D"), py::arg("scale"),
      "out[b, t, h] = softmax_s(scale * q[b, h, t] . k[b, h // G, s] + mask[b, 0, t, s]) @ v[b, h // G] on one "
      "thread; each array a tuple (pointer, four strides in elements); mask_kind 0: none, 1: additive fp32, 2: "
      "bool. Trusts its pointers (fastalign.models.native.cache_attention checks the tensors).");
}

}  // namespace fastalign
