// Argument checks shared by the CPU (cpu_ops.cpp) and CUDA (cuda_ops.cu) kernels of the eoc:: out-variant
// ops (schema.cpp). The public ops validate everything first (eoc_kernels/_validation.py); these checks
// keep a direct call of torch.ops.eoc.*_out from reading outside its tensors, and name the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
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

// The tensors of one reused branch; their schema names are the field names plus the op's suffix ("",
// "_attn", "_mlp"): gate, cache, prev (C_1), prev2 (C_2), prev3 (C_3), delta, trend.
struct BranchTensors {
  const Tensor& gate;
  const Tensor& cache;
  const OptTensor& prev;
  const OptTensor& prev2;
  const OptTensor& prev3;
  const OptTensor& delta;
  const OptTensor& trend;
};

// One reused branch: gate [B, C], cache and the history prev / prev2 / prev3 [B, N, C], delta and trend
// [H, N, C] with H dividing B. prev2 needs prev and prev3 needs prev2 (the history is C_1, C_2, C_3 in order).
inline void check_branch(const char* op, const Tensor& x, const std::string& suffix, const BranchTensors& t) {
  const auto name = [&suffix](const char* base) { return base + suffix; };
  check_feature(op, name("gate").c_str(), t.gate, x);
  TORCH_CHECK(t.gate.dim() == 2 && t.gate.size(0) == x.size(0) && t.gate.size(1) == x.size(2), op, ": ",
              name("gate"), " has shape ", sizes_of(t.gate), ", which does not fit x of shape ", sizes_of(x));
  check_rows(op, name("cache").c_str(), t.cache, x, {}, false);
  const OptTensor* history[3] = {&t.prev, &t.prev2, &t.prev3};
  const char* history_names[3] = {"prev", "prev2", "prev3"};
  for (int j = 0; j < 3; ++j) {
    if (!history[j]->has_value()) continue;
    TORCH_CHECK(j == 0 || history[j - 1]->has_value(), op, ": ", name(history_names[j]), " is given without ",
                name(history_names[j - 1]), " (the history is C_1, C_2, C_3 in order)");
    check_rows(op, name(history_names[j]).c_str(), **history[j], x, {}, false);
  }
  if (t.delta.has_value()) check_rows(op, name("delta").c_str(), *t.delta, x, {}, true);
  if (t.trend.has_value()) check_rows(op, name("trend").c_str(), *t.trend, x, {}, true);
}

// A coefficient tensor's length P: (alpha, beta_1, gamma[, beta_2[, beta_3]]).
constexpr int64_t kMinCoefs = 3;
constexpr int64_t kMaxCoefs = 5;
// The most history generations a segment's cache ring holds (C_0 .. C_3).
constexpr int64_t kMaxGenerations = 4;

// The length P of a coefficient tensor of one branch: float32 [P] with P in 3..5 (its dtype and device are the
// caller's check).
inline int64_t coef_length(const char* op, const char* name, const Tensor& coef) {
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) >= kMinCoefs && coef.size(0) <= kMaxCoefs, op, ": ", name,
              " must have shape [P] with P in {3, 4, 5}, got ", sizes_of(coef));
  return coef.size(0);
}

// coef_values: kMaxCoefs floats per branch (the schema pads them with zeros).
inline void check_coef_values(const char* op, c10::ArrayRef<double> values, size_t branches) {
  TORCH_CHECK(values.size() == branches * kMaxCoefs, op, ": coef_values must hold ", branches * kMaxCoefs,
              " numbers (", kMaxCoefs, " per branch", branches > 1 ? ": attention's, then MLP's" : "",
              ", zero-padded), got ", values.size());
}

// cached_segment's operands: cache [G, S, 2, B, N, C] (G in 1..4, a ring), gates [B, S, 2, C], generation int32 /
// int64 [S, 2] on x's device, delta and trend [S, 2, H, N, C], coef [S, 2, P] with P in 3..5 (its dtype and device
// are the caller's check: the CPU kernel reads it on the host, the CUDA kernel on the device).
inline void check_segment(const char* op, const Tensor& x, const Tensor& gates, const Tensor& cache,
                          const Tensor& generation, const OptTensor& delta, const OptTensor& trend,
                          const OptTensor& coef) {
  check_feature(op, "cache", cache, x);
  TORCH_CHECK(cache.dim() == 6 && cache.size(0) >= 1 && cache.size(0) <= kMaxGenerations && cache.size(2) == 2 &&
                  cache.size(3) == x.size(0) && cache.size(4) == x.size(1) && cache.size(5) == x.size(2),
              op, ": cache must have shape [G, S, 2, B, N, C] with G in {1, 2, 3, 4}, got ", sizes_of(cache));
  const int64_t blocks = cache.size(1);
  check_feature(op, "gates", gates, x);
  TORCH_CHECK(gates.dim() == 4 && gates.size(0) == x.size(0) && gates.size(1) == blocks && gates.size(2) == 2 &&
                  gates.size(3) == x.size(2),
              op, ": gates must have shape [B, S, 2, C], got ", sizes_of(gates));
  check_device(op, "generation", generation, x);
  TORCH_CHECK((generation.scalar_type() == at::kInt || generation.scalar_type() == at::kLong) &&
                  generation.dim() == 2 && generation.size(0) == blocks && generation.size(1) == 2,
              op, ": generation must be an int32 or int64 tensor of shape [S, 2], got ", generation.scalar_type(), " ",
              sizes_of(generation));
  if (delta.has_value()) check_rows(op, "delta", *delta, x, {blocks, 2}, true);
  if (trend.has_value()) check_rows(op, "trend", *trend, x, {blocks, 2}, true);
  if (coef.has_value()) {
    TORCH_CHECK(coef->dim() == 3 && coef->size(0) == blocks && coef->size(1) == 2 && coef->size(2) >= kMinCoefs &&
                    coef->size(2) <= kMaxCoefs,
                op, ": coef must have shape [S, 2, P] with P in {3, 4, 5}, got ", sizes_of(*coef));
  }
}

}  // namespace eoc_checks
