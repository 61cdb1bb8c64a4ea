// Argument checks shared by the CPU (cpu_ops.cpp) and CUDA (cuda_ops.cu) kernels of the eoc:: out-variant
// ops (schema.cpp). The public ops validate everything first (eoc_kernels/_validation.py); these checks
// keep a direct call of torch.ops.eoc.*_out from reading outside its tensors, and name the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace eoc_checks {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline std::string sizes_of(const Tensor& t) {
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + "]";
}

inline void check_device(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), " (the device of x), got ",
              t.device());
}

// On x's device, with x's dtype.
inline void check_feature(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  check_device(op, name, t, x);
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ", x.scalar_type(),
              " (the dtype of x), got ", t.scalar_type());
}

// t must have sizes lead + [rows, N, C] where rows == B, or (per_head) divides B.
inline void check_rows(const char* op, const char* name, const Tensor& t, const Tensor& x, std::vector<int64_t> lead,
                       bool per_head) {
  check_feature(op, name, t, x);
  const int64_t rank = static_cast<int64_t>(lead.size()) + 3;
  bool ok = t.dim() == rank;
  for (size_t d = 0; ok && d < lead.size(); ++d) ok = t.size(static_cast<int64_t>(d)) == lead[d];
  if (ok) {
    const int64_t rows = t.size(rank - 3), batch = x.size(0);
    ok = t.size(rank - 2) == x.size(1) && t.size(rank - 1) == x.size(2) &&
         (per_head ? rows > 0 && batch % rows == 0 : rows == batch);
  }
  TORCH_CHECK(ok, op, ": ", name, " has shape ", sizes_of(t), ", which does not fit x of shape ", sizes_of(x));
}

// x: a [B, N, C] float32 / float16 / bfloat16 tensor of device_type; out: the same shape, device and dtype.
inline void check_x_out(const char* op, const Tensor& x, const Tensor& out, c10::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, op, ": x must be a ", c10::DeviceTypeName(device_type),
              " tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, ": x must have dtype float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape [B, N, C], got ", sizes_of(x));
  check_feature(op, "out", out, x);
  TORCH_CHECK(out.sizes() == x.sizes(), op, ": out must have the shape of x ", sizes_of(x), ", got ", sizes_of(out));
}

}  // namespace eoc_checks
