// fastalign._C: the optional native layer (Python fallbacks: fastalign/models/native.py, kernels/rng.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <vector>

#include "kernels.h"

namespace py = pybind11;

namespace fastalign {
void register_tree(py::module_& m);
void register_compact(py::module_& m);
void register_linear(py::module_& m);
void register_philox(py::module_& m);
void register_attention(py::module_& m);
void linear_rows_widest(const float* w, const float* x, float* y, const float* b, int64_t M, int64_t O, int64_t I);
bool has_linear_loop();
void cache_attention_f32(const Strided4& q, const Strided4& k, const Strided4& v, const Strided4& mask, int mask_kind,
                         const Strided4& out, int64_t B, int64_t H, int64_t H_kv, int64_t T, int64_t S, int64_t D,
                         float scale);
bool has_cache_attention();

namespace {
std::atomic<int64_t> linear_runs[kCountedSizes + 1], attention_runs[kCountedSizes + 1];

void count(std::atomic<int64_t>* runs, int64_t size) {
  runs[size < 0 ? 0 : size < kCountedSizes ? size : kCountedSizes].fetch_add(1, std::memory_order_relaxed);
}

std::vector<int64_t> snapshot(const std::atomic<int64_t>* runs) {
  std::vector<int64_t> out(kCountedSizes + 1);
  for (int64_t i = 0; i <= kCountedSizes; ++i) out[i] = runs[i].load(std::memory_order_relaxed);
  return out;
}
}  // namespace

void count_linear_run(int64_t rows) { count(linear_runs, rows); }
void count_attention_run(int64_t queries) { count(attention_runs, queries); }
}  // namespace fastalign

// Bumped whenever a signature below changes; fastalign.kernels.extension refuses a stale build.
#define FASTALIGN_C_ABI_VERSION 5

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "fastalign native extension: tree topology, KV-cache slot compaction, one-thread fp32 linear rows and "
      "cache attention, Philox streams";
  m.attr("ABI_VERSION") = FASTALIGN_C_ABI_VERSION;
  fastalign::register_tree(m);
  fastalign::register_compact(m);
  fastalign::register_linear(m);
  fastalign::register_philox(m);
  fastalign::register_attention(m);
  static const fastalign::KernelTable table{fastalign::kKernelTableVersion,
                                            fastalign::has_linear_loop() ? fastalign::linear_rows_widest : nullptr,
                                            fastalign::has_cache_attention() ? fastalign::cache_attention_f32 : nullptr};
  m.attr("kernel_table") = reinterpret_cast<std::uintptr_t>(&table);
  m.attr("kernel_table_version") = fastalign::kKernelTableVersion;
  m.def(
      "_loop_runs", [] { return py::make_tuple(fastalign::snapshot(fastalign::linear_runs),
                                               fastalign::snapshot(fastalign::attention_runs)); },
      "(linear, attention): how many runs of each loop so far, by rows / queries per row and head (index "
      "min(size, 256)).");
}
