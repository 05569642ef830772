// fastalign._C: the optional native layer (Python fallbacks: fastalign/models/native.py, kernels/rng.py).
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace fastalign {
void register_tree(py::module_& m);
void register_compact(py::module_& m);
void register_linear(py::module_& m);
void register_philox(py::module_& m);
void register_attention(py::module_& m);
}  // namespace fastalign

// Bumped whenever a signature below changes; fastalign.kernels.extension refuses a stale build.
#define FASTALIGN_C_ABI_VERSION 4

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
}
