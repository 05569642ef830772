// Tree topology from a parent array, the native counterpart of fastalign.models.native.*_torch.
//
// parents[b, t] in [-1, t - 1]: -1 hangs the node off the accepted prefix and a parent always precedes
// its children, so every quantity below is one left-to-right sweep.  Inputs and outputs are NumPy
// arrays (int64 / bool); fastalign.models.native converts torch tensors without copying on the CPU.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace py = pybind11;

namespace fastalign {
namespace {

using Parents = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

std::string shape_str(const py::array& a) {
  std::ostringstream os;
  os << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
  os << (a.ndim() == 1 ? ",)" : ")");
  return os.str();
}

// Checks dtype (integer), rank and the topological-order invariant; returns a C-contiguous int64 view.
Parents checked_parents(const py::array& raw) {
  if (raw.dtype().kind() != 'i' && raw.dtype().kind() != 'u') {
    throw py::type_error("parents must be an integer array, got dtype " +
                         py::str(static_cast<py::object>(raw.dtype())).cast<std::string>());
  }
  if (raw.ndim() != 2) throw py::value_error("parents must be [B, T], got shape " + shape_str(raw));
  Parents p = Parents::ensure(raw);
  if (!p) throw py::error_already_set();
  const int64_t B = p.shape(0), T = p.shape(1);
  const int64_t* d = p.data();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t v = d[b * T + t];
      if (v < -1 || v >= t) {
        std::ostringstream os;
        os << "parents[b, t] must lie in [-1, t - 1] (parents precede their children); got parents[" << b
           << ", " << t << "] = " << v;
        throw py::value_error(os.str());
      }
    }
  }
  return p;
}

// mask[b, i, j]: j is i or an ancestor of i.  Row i = row parent(i) plus the diagonal.
py::array_t<bool> tree_attention_mask(const py::array& raw) {
  Parents p = checked_parents(raw);
  const int64_t B = p.shape(0), T = p.shape(1);
  py::array_t<bool> out({B, T, T});
  const int64_t* par = p.data();
  bool* m = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    std::memset(m, 0, static_cast<size_t>(B * T * T) * sizeof(bool));
    for (int64_t b = 0; b < B; ++b) {
      bool* mb = m + b * T * T;
      for (int64_t i = 0; i < T; ++i) {
        const int64_t q = par[b * T + i];
        if (q >= 0) std::memcpy(mb + i * T, mb + q * T, static_cast<size_t>(q + 1) * sizeof(bool));
        mb[i * T + i] = true;
      }
    }
  }
  return out;
}

void depths_into(const int64_t* par, int64_t B, int64_t T, int64_t* depth) {
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t q = par[b * T + t];
      depth[b * T + t] = q < 0 ? 0 : depth[b * T + q] + 1;
    }
  }
}

// Depth of each node, 0 for nodes hanging off the prefix.
py::array_t<int64_t> tree_depths(const py::array& raw) {
  Parents p = checked_parents(raw);
  const int64_t B = p.shape(0), T = p.shape(1);
  py::array_t<int64_t> out({B, T});
  const int64_t* par = p.data();
  int64_t* depth = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    depths_into(par, B, T, depth);
  }
  return out;
}

// Root-to-leaf node paths, one per leaf in node order: [B, max_leaves, max_depth + 1], padded with -1.
py::array_t<int64_t> retrieve_paths(const py::array& raw) {
  Parents p = checked_parents(raw);
  const int64_t B = p.shape(0), T = p.shape(1);
  const int64_t* par = p.data();
  std::vector<int64_t> depth(static_cast<size_t>(B * T));
  std::vector<char> is_parent(static_cast<size_t>(B * T), 0);
  int64_t max_leaves = 0, L = 0;
  {
    py::gil_scoped_release nogil;
    depths_into(par, B, T, depth.data());
    for (int64_t i = 0; i < B * T; ++i) {
      if (par[i] >= 0) is_parent[(i / T) * T + par[i]] = 1;
      L = std::max(L, depth[i] + 1);
    }
    for (int64_t b = 0; b < B; ++b) {
      int64_t n = 0;
      for (int64_t t = 0; t < T; ++t) n += !is_parent[b * T + t];
      max_leaves = std::max(max_leaves, n);
    }
  }
  py::array_t<int64_t> out({B, max_leaves, L});
  int64_t* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    std::fill(o, o + B * max_leaves * L, int64_t{-1});
    for (int64_t b = 0; b < B; ++b) {
      int64_t k = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (is_parent[b * T + t]) continue;
        int64_t* path = o + (b * max_leaves + k++) * L;
        for (int64_t node = t, pos = depth[b * T + t]; node >= 0; node = par[b * T + node]) path[pos--] = node;
      }
    }
  }
  return out;
}

}  // namespace

void register_tree(py::module_& m) {
  m.def("tree_attention_mask", &tree_attention_mask, py::arg("parents"),
        "mask[b, i, j] is True when node j is node i or one of its ancestors: [B, T, T] bool.");
  m.def("tree_depths", &tree_depths, py::arg("parents"),
        "Depth of each node (0 for nodes hanging off the prefix): [B, T] int64.");
  m.def("retrieve_paths", &retrieve_paths, py::arg("parents"),
        "Root-to-leaf paths, one per leaf in node order: [B, max_leaves, max_depth + 1] int64, -1 padded.");
}

}  // namespace fastalign
