// fastalign's torch ops with C++ kernels: fastalign/_torch_ops.so, a library that links libtorch (_C does not).
//
// A compiled decode step calls torch.ops.fastalign.linear_rows once per linear layer and cache_attention once per
// layer. With the kernels in Python each call crosses into the interpreter (the dispatcher's Python kernel: the
// GIL, the tensors wrapped, the checks in Python), about 10 us, which on the 82M model at batch 1 is a fifth of
// the step. Here the same decisions and the same loops cost about a microsecond. The loops stay in _C: this
// library receives _C's kernel table (csrc/kernels.h) when Python registers it, after checking the torch it was
// built for (fastalign.models.native). Each kernel decides at each call exactly as its Python twin
// (native.linear_rows, native.cache_attention) and falls back to the same ATen op.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>

#include "kernels.h"

namespace {

const fastalign::KernelTable* table = nullptr;
// Python's LINEAR_MAX_ROWS and CACHE_ATTENTION_MAX_QUERIES, set with them (native.set_loop_limits)
std::atomic<int64_t> linear_max_rows{0}, attention_max_queries{0};

// FASTALIGN_NATIVE=0 (false, off, no; ASCII blanks around ignored) switches the loops off, read at each call as
// kernels/extension.py reads it. (getenv under the GIL, which a call from Python holds, as os.environ's writes do.)
bool native_on() {
  const char* value = std::getenv("FASTALIGN_NATIVE");
  if (value == nullptr) return true;
  std::string v(value);
  const auto first = v.find_first_not_of(" \t\n\r\f\v"), last = v.find_last_not_of(" \t\n\r\f\v");
  v = first == std::string::npos ? "" : v.substr(first, last - first + 1);
  for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return !(v == "0" || v == "false" || v == "off" || v == "no");
}

bool plain_cpu_f32(const at::Tensor& t) {
  return t.is_cpu() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided;
}

bool asks_gradient(std::initializer_list<const at::Tensor*> tensors) {
  if (!c10::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors)
    if (t != nullptr && t->requires_grad()) return true;
  return false;
}

// native.native_linear_ok
bool linear_loop_takes(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  if (at::get_num_threads() != 1 || table->linear_rows == nullptr || !native_on()) return false;
  if (!(plain_cpu_f32(x) && plain_cpu_f32(w) && w.dim() == 2 && w.is_contiguous())) return false;
  if (x.dim() < 1 || x.size(-1) != w.size(1) || w.size(1) == 0) return false;
  if (b && !(plain_cpu_f32(*b) && b->dim() == 1 && b->size(0) == w.size(0) && b->is_contiguous())) return false;
  if (asks_gradient({&x, &w, b ? &*b : nullptr})) return false;
  return x.numel() / x.size(-1) <= linear_max_rows.load(std::memory_order_relaxed);
}

// native.linear_rows
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (!linear_loop_takes(x, weight, bias)) return at::linear(x, weight, bias);
  const at::Tensor rows = x.contiguous();
  std::vector<int64_t> sizes = rows.sizes().vec();
  sizes.back() = weight.size(0);
  at::Tensor out = at::empty(sizes, rows.options());
  table->linear_rows(weight.const_data_ptr<float>(), rows.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                     bias ? bias->const_data_ptr<float>() : nullptr, rows.numel() / rows.size(-1), weight.size(0),
                     weight.size(1));
  return out;
}

// native.cache_attention_ok (with cache_attention_fits)
bool attention_loop_takes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask) {
  if (at::get_num_threads() != 1 || table->cache_attention == nullptr || !native_on()) return false;
  for (const at::Tensor* t : {&q, &k, &v})
    if (!(plain_cpu_f32(*t) && t->dim() == 4 && t->stride(3) == 1)) return false;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  if (k.sizes() != v.sizes() || k.size(0) != B || k.size(3) != D || k.size(1) == 0) return false;
  if (H % k.size(1) != 0 || !(0 < T && T <= attention_max_queries.load(std::memory_order_relaxed))) return false;
  if (mask) {
    const at::Tensor& m = *mask;
    if (!(m.is_cpu() && (m.scalar_type() == at::kFloat || m.scalar_type() == at::kBool) &&
          m.layout() == at::kStrided && m.dim() == 4 && (m.size(0) == 1 || m.size(0) == B) && m.size(1) == 1 &&
          (m.size(2) == 1 || m.size(2) == T) && m.size(3) == k.size(2)))
      return false;
  }
  return !asks_gradient({&q, &k, &v, mask ? &*mask : nullptr});
}

fastalign::Strided4 strided(const at::Tensor& t) {
  return {reinterpret_cast<std::uintptr_t>(t.const_data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// native.cache_attention
at::Tensor cache_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           const std::optional<at::Tensor>& mask, double scale) {
  if (!attention_loop_takes(query, key, value, mask))
    return at::scaled_dot_product_attention(query, key, value, mask, 0.0, false, scale,
                                            key.size(1) != query.size(1))
        .transpose(1, 2)
        .contiguous();
  const int64_t B = query.size(0), H = query.size(1), T = query.size(2), D = query.size(3);
  at::Tensor out = at::empty({B, T, H, D}, query.options());
  fastalign::Strided4 masked{0, 0, 0, 0, 0};
  int kind = 0;
  if (mask) {
    const at::Tensor& m = *mask;
    masked = {reinterpret_cast<std::uintptr_t>(m.const_data_ptr()), m.size(0) > 1 ? m.stride(0) : 0, 0,
              m.size(2) > 1 ? m.stride(2) : 0, m.stride(3)};
    kind = m.scalar_type() == at::kFloat ? 1 : 2;
  }
  table->cache_attention(strided(query), strided(key), strided(value), masked, kind, strided(out), B, H,
                         key.size(1), T, key.size(2), D, static_cast<float>(scale));
  return out;
}

std::unique_ptr<torch::Library> kernels;  // the registration (kept for the life of the process)

}  // namespace

extern "C" {

// The torch this library was built against (setup.py: its version and git commit): Python registers it only
// under that torch.
__attribute__((visibility("default"))) const char* fastalign_torch_ops_built_for() {
  return FASTALIGN_TORCH_BUILT_FOR;  // (CMakeLists.txt defines it, "" when not given: then no torch matches)
}

// Register the CPU kernels of fastalign::linear_rows and fastalign::cache_attention (their schemas and fake
// kernels are Python's) on _C's kernel table at `table_address`. 0: registered; 1: no table, or one of another
// version; 2: registered already.
__attribute__((visibility("default"))) int fastalign_register_torch_ops(std::uintptr_t table_address) {
  const auto* given = reinterpret_cast<const fastalign::KernelTable*>(table_address);
  if (given == nullptr || given->version != fastalign::kKernelTableVersion) return 1;
  if (kernels) return 2;
  table = given;
  kernels = std::make_unique<torch::Library>(torch::Library::IMPL, "fastalign", c10::DispatchKey::CPU, __FILE__,
                                             __LINE__);
  kernels->impl("linear_rows", TORCH_FN(linear_rows));
  kernels->impl("cache_attention", TORCH_FN(cache_attention));
  return 0;
}

// The loops run up to `max_rows` rows (linear_rows) and `max_queries` queries per row and head
// (cache_attention).
__attribute__((visibility("default"))) void fastalign_set_torch_ops_limits(int64_t max_rows, int64_t max_queries) {
  linear_max_rows.store(max_rows, std::memory_order_relaxed);
  attention_max_queries.store(max_queries, std::memory_order_relaxed);
}

}  // extern "C"
