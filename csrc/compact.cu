// CUDA path of KV-cache slot compaction: out[b, h, j, :] = src[b, h, index[b, j], :] for up to
// kMaxDescsPerLaunch layer tensors in one launch.  Deliberately free of torch headers: the Python side
// passes raw device pointers, byte strides and the current stream, so this file compiles with any CUDA
// toolkit and the extension never links against a particular libtorch.
#include "compact.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace fastalign {
namespace {

struct DescBatch {
  GatherDesc d[kMaxDescsPerLaunch];
};

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocksX = 1 << 16;

// One thread per copy unit U (1..16 bytes); blockIdx.y picks the tensor, a grid-stride loop covers it.
template <typename U>
__global__ void gather_slots_kernel(const DescBatch batch, const int64_t* __restrict__ index, int64_t B,
                                    int64_t S2) {
  const GatherDesc& d = batch.d[blockIdx.y];
  const int64_t units = d.row_bytes / static_cast<int64_t>(sizeof(U));
  const int64_t total = B * d.H * S2 * units;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t u = i % units;
    const int64_t row = i / units;  // flat (b, h, j) of the output
    const int64_t j = row % S2;
    const int64_t bh = row / S2;
    const int64_t h = bh % d.H;
    const int64_t b = bh / d.H;
    const int64_t slot = index[b * S2 + j];
    U* out = reinterpret_cast<U*>(d.dst + row * d.row_bytes) + u;
    if (slot < 0 || slot >= d.S) {  // never read out of bounds; the caller reports bad indices
      *out = U{};
      continue;
    }
    const U* in = reinterpret_cast<const U*>(d.src + b * d.stride_b + h * d.stride_h + slot * d.stride_s) + u;
    *out = *in;
  }
}

template <typename U>
cudaError_t launch(const DescBatch& batch, int n, int64_t max_units_total, const int64_t* index, int64_t B,
                   int64_t S2, cudaStream_t stream) {
  int64_t blocks = (max_units_total + kThreads - 1) / kThreads;
  blocks = std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxBlocksX));
  dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(n));
  gather_slots_kernel<U><<<grid, kThreads, 0, stream>>>(batch, index, B, S2);
  return cudaGetLastError();
}

}  // namespace

const char* gather_slots_cuda_launch(const GatherDesc* descs, int n, const int64_t* index, int64_t B,
                                     int64_t S2, int device, std::uintptr_t stream_handle) {
  if (n <= 0 || B <= 0 || S2 <= 0) return nullptr;
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  for (int start = 0; start < n; start += kMaxDescsPerLaunch) {
    const int m = std::min(kMaxDescsPerLaunch, n - start);
    DescBatch batch{};
    std::uintptr_t align = 0;  // OR of everything a copy unit must divide
    int64_t max_bytes = 0;
    for (int k = 0; k < m; ++k) {
      const GatherDesc& d = descs[start + k];
      batch.d[k] = d;
      align |= reinterpret_cast<std::uintptr_t>(d.src) | reinterpret_cast<std::uintptr_t>(d.dst) |
               static_cast<std::uintptr_t>(d.row_bytes) | static_cast<std::uintptr_t>(d.stride_b) |
               static_cast<std::uintptr_t>(d.stride_h) | static_cast<std::uintptr_t>(d.stride_s);
      max_bytes = std::max<int64_t>(max_bytes, B * d.H * S2 * d.row_bytes);
    }
    if (max_bytes == 0) continue;
    if (align % 16 == 0) {
      err = launch<uint4>(batch, m, max_bytes / 16, index, B, S2, stream);
    } else if (align % 8 == 0) {
      err = launch<uint2>(batch, m, max_bytes / 8, index, B, S2, stream);
    } else if (align % 4 == 0) {
      err = launch<uint32_t>(batch, m, max_bytes / 4, index, B, S2, stream);
    } else if (align % 2 == 0) {
      err = launch<uint16_t>(batch, m, max_bytes / 2, index, B, S2, stream);
    } else {
      err = launch<uint8_t>(batch, m, max_bytes, index, B, S2, stream);
    }
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  return nullptr;
}

int cuda_runtime_version_compiled() { return CUDART_VERSION; }

}  // namespace fastalign
