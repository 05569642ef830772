// KV-cache slot compaction shared between the CPU path (compact.cpp) and the CUDA path (compact.cu).
// Plain C++ (no torch, no pybind11) so that nvcc compiles compact.cu on any machine with a CUDA toolkit.
#pragma once

#include <cstdint>

namespace fastalign {

// One tensor to gather: src is [B, H, S, row_bytes] with arbitrary byte strides on the first three
// dimensions and a contiguous last one; dst is a contiguous [B, H, S2, row_bytes] buffer.
struct GatherDesc {
  const char* src;
  char* dst;
  int64_t H;
  int64_t S;          // source slots
  int64_t row_bytes;  // D * element size
  int64_t stride_b;   // source strides, in bytes
  int64_t stride_h;
  int64_t stride_s;
};

// Descriptors passed by value in one CUDA launch (kernel parameters stay far below the 4 KiB limit).
constexpr int kMaxDescsPerLaunch = 32;

// Gathers every descriptor with the shared index [B, S2] (int64, device memory), in
// ceil(n / kMaxDescsPerLaunch) launches on `stream` (a cudaStream_t, passed as an integer) of device
// `device`.  Out-of-range indices write zeros (callers validate beforehand).  Returns nullptr on
// success, else a static error string from the CUDA runtime.
const char* gather_slots_cuda_launch(const GatherDesc* descs, int n, const int64_t* index, int64_t B,
                                     int64_t S2, int device, std::uintptr_t stream);

// The CUDA runtime version the extension was compiled against (e.g. 13000), 0 without CUDA.
int cuda_runtime_version_compiled();

}  // namespace fastalign
