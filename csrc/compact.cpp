// KV-cache slot compaction: bindings and the CPU path; the CUDA path lives in compact.cu.
//
// The Python side (fastalign.models.native.gather_slots*) validates the tensors and passes descriptors
// (src_ptr, dst_ptr, H, S, row_bytes, stride_b, stride_h, stride_s) with byte strides, the data pointer
// of a contiguous int64 index [B, S2] and, for CUDA, the device and current stream.  These entry points
// are private (underscored): they trust the pointers they are given.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <thread>
#include <vector>

#include "compact.h"

namespace py = pybind11;

namespace fastalign {
namespace {

std::vector<GatherDesc> to_descs(const std::vector<std::vector<int64_t>>& raw) {
  std::vector<GatherDesc> descs;
  descs.reserve(raw.size());
  for (size_t k = 0; k < raw.size(); ++k) {
    const auto& r = raw[k];
    if (r.size() != 8) throw py::value_error("gather descriptor must have 8 fields");
    GatherDesc d{reinterpret_cast<const char*>(static_cast<std::uintptr_t>(r[0])),
                 reinterpret_cast<char*>(static_cast<std::uintptr_t>(r[1])),
                 r[2], r[3], r[4], r[5], r[6], r[7]};
    if (d.H < 0 || d.S < 0 || d.row_bytes < 0) throw py::value_error("gather descriptor has a negative size");
    descs.push_back(d);
  }
  return descs;
}

void check_index(const int64_t* index, int64_t n, const std::vector<GatherDesc>& descs) {
  if (n == 0 || descs.empty()) return;
  int64_t lo = index[0], hi = index[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, index[i]);
    hi = std::max(hi, index[i]);
  }
  for (const GatherDesc& d : descs) {
    if (d.H == 0 || d.row_bytes == 0) continue;
    if (lo < 0 || hi >= d.S) {
      std::ostringstream os;
      os << "gather_slots: index out of range: values span [" << lo << ", " << hi << "] but the cache has "
         << d.S << " slots";
      throw py::index_error(os.str());
    }
  }
}

void gather_slots_cpu(const std::vector<std::vector<int64_t>>& raw, std::uintptr_t index_ptr, int64_t B, int64_t S2,
                      int num_threads) {
  if (B < 0 || S2 < 0) throw py::value_error("gather_slots: negative B or S2");
  const std::vector<GatherDesc> descs = to_descs(raw);
  const int64_t* index = reinterpret_cast<const int64_t*>(index_ptr);
  if (B * S2 > 0 && index == nullptr) throw py::value_error("gather_slots: null index");
  check_index(index, B * S2, descs);

  // Work items: one (tensor, b, h) block of S2 rows each.
  struct Item {
    const GatherDesc* d;
    int64_t b, h;
  };
  std::vector<Item> items;
  int64_t bytes = 0;
  for (const GatherDesc& d : descs) {
    if (d.row_bytes == 0) continue;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < d.H; ++h) items.push_back({&d, b, h});
    bytes += B * d.H * S2 * d.row_bytes;
  }
  auto run = [&](size_t begin, size_t end) {
    for (size_t k = begin; k < end; ++k) {
      const GatherDesc& d = *items[k].d;
      const int64_t b = items[k].b, h = items[k].h;
      const char* src = d.src + b * d.stride_b + h * d.stride_h;
      char* dst = d.dst + ((b * d.H + h) * S2) * d.row_bytes;
      const int64_t* idx = index + b * S2;
      for (int64_t j = 0; j < S2; ++j) std::memcpy(dst + j * d.row_bytes, src + idx[j] * d.stride_s, d.row_bytes);
    }
  };
  py::gil_scoped_release nogil;
  int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), static_cast<int64_t>(items.size())));
  if (bytes < (int64_t{1} << 20)) threads = 1;  // not worth spawning threads
  if (threads <= 1) {
    run(0, items.size());
    return;
  }
  std::vector<std::thread> pool;
  const size_t chunk = (items.size() + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const size_t begin = t * chunk, end = std::min(items.size(), begin + chunk);
    if (begin < end) pool.emplace_back(run, begin, end);
  }
  for (auto& th : pool) th.join();
}

#ifdef FASTALIGN_WITH_CUDA
void gather_slots_cuda(const std::vector<std::vector<int64_t>>& raw, std::uintptr_t index_ptr, int64_t B, int64_t S2,
                       int device, std::uintptr_t stream) {
  if (B < 0 || S2 < 0) throw py::value_error("gather_slots: negative B or S2");
  const std::vector<GatherDesc> descs = to_descs(raw);
  const char* err;
  {
    py::gil_scoped_release nogil;
    err = gather_slots_cuda_launch(descs.data(), static_cast<int>(descs.size()),
                                   reinterpret_cast<const int64_t*>(index_ptr), B, S2, device, stream);
  }
  if (err != nullptr) throw std::runtime_error(std::string("fastalign._C gather_slots (CUDA): ") + err);
}
#endif

}  // namespace

void register_compact(py::module_& m) {
  m.def("_gather_slots_cpu", &gather_slots_cpu, py::arg("descs"), py::arg("index_ptr"), py::arg("B"), py::arg("S2"),
        py::arg("num_threads") = 1, "CPU KV-slot gather over raw descriptors (private; see fastalign.models.native).");
#ifdef FASTALIGN_WITH_CUDA
  m.def("_gather_slots_cuda", &gather_slots_cuda, py::arg("descs"), py::arg("index_ptr"), py::arg("B"),
        py::arg("S2"), py::arg("device"), py::arg("stream"),
        "CUDA KV-slot gather over raw descriptors, on the given stream (private; see fastalign.models.native).");
  m.attr("has_cuda") = true;
  m.attr("cuda_version") = cuda_runtime_version_compiled();
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_version") = 0;
#endif
}

}  // namespace fastalign
