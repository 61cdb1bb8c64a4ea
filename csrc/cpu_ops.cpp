// C++ CPU kernels of the EOC ops (docs/DESIGN.md §3), built into the Python module eoc_kernels._C.
//
// Eager equivalent: eoc_kernels/reference.py (cached_branch, cached_block, cached_segment), which is
// the ground truth of every test. The kernel body is cpu_kernels.h; this file holds the operand
// descriptors, the per-op argument handling, the run-time choice of instruction set and the
// registration:
//
//   TORCH_LIBRARY_IMPL(eoc, CPU): the CPU kernels of the out-variant ops whose schemas csrc/schema.cpp
//   defines (eoc::cached_branch_out, cached_block_out, cached_segment_out: the eoc:: functional ops'
//   split arguments, then a caller-allocated output; eoc_kernels/cpp.py allocates it, so tests can
//   poison it, and registers the result as the "cpp" kernel of eoc::cached_* on CPU tensors);
//   plus eoc::cpu_isa() / cpu_supported_isas() / cpu_set_isa(name) (which vectorised variant runs).
//
// Argument conventions are the eoc:: schema's (eoc_kernels/_library.py): a branch's coefficients
// (alpha, beta_1, gamma, beta_2, beta_3) are 5 floats of coef_values (zero-padded) or a float32 [P] tensor,
// P in {3, 4, 5} (used instead when given), the threshold a float or a one-element float32 tensor. Tensor
// values live on the CPU, so reading them here costs no device sync. The public ops validate everything
// first (eoc_kernels/_validation.py); the checks here only keep a direct call of torch.ops.eoc.*_out from
// reading outside its tensors.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "op_checks.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace eoc_cpu {

// Operand flags of an entry: which correction terms are applied (their tensors given, their coefficient
// nonzero), in the order they are accumulated: alpha·D, beta_1·(C_0 − C_1), gamma·(C_0 ⊙ E),
// beta_2·(C_1 − C_2), beta_3·(C_2 − C_3).
constexpr int kHasDelta = 1;
constexpr int kHasBeta1 = 2;
constexpr int kHasTrend = 4;
constexpr int kHasBeta2 = 8;
constexpr int kHasBeta3 = 16;
constexpr int kFlagCombinations = 32;
// Coefficient slots of an entry (the schema's order): alpha, beta_1, gamma, beta_2, beta_3.
constexpr int kCoefs = 5;
constexpr int kAlpha = 0, kGamma = 2;
constexpr int kBetaSlot[3] = {1, 3, 4};  // beta_i's slot, i = 1..3
constexpr int kBetaFlag[3] = {kHasBeta1, kHasBeta2, kHasBeta3};

// Whether terms `flags` read the history row C_j (j = 1..3): beta_i reads C_{i-1} and C_i.
constexpr bool reads_history(int flags, int j) {
  return j == 1   ? (flags & (kHasBeta1 | kHasBeta2)) != 0
         : j == 2 ? (flags & (kHasBeta2 | kHasBeta3)) != 0
                  : (flags & kHasBeta3) != 0;
}

// A [B or H, N, C] operand read one token row (b, n) at a time; row b reads entry b / rows_per_head.
template <typename T>
struct Rows {
  const T* data = nullptr;
  int64_t stride_b = 0, stride_n = 0, stride_c = 1;
  int64_t rows_per_head = 1;
  const T* row(int64_t b, int64_t n) const { return data + (b / rows_per_head) * stride_b + n * stride_n; }
};

template <typename T>
struct OutRows {
  T* data = nullptr;
  int64_t stride_b = 0, stride_n = 0, stride_c = 1;
  T* row(int64_t b, int64_t n) const { return data + b * stride_b + n * stride_n; }
};

// One reused entry (a branch of a block): what it reads and its coefficients. cache is C_0, history[j - 1]
// is C_j (j = 1..3, read only where reads_history(flags, j)); flags: the terms applied (kHas*), i.e. their
// tensors given and their coefficient nonzero.
template <typename T>
struct Entry {
  Rows<T> gate, cache, delta, trend;
  Rows<T> history[3];
  float coef[kCoefs] = {};  // alpha, beta_1, gamma, beta_2, beta_3
  int flags = 0;
  bool contiguous = true;  // every operand read but the gate has stride 1 over C
};

// The kernel body, once per instruction set (see cpu_kernels.h).
namespace base {
#include "cpu_kernels.h"
}  // namespace base

// GCC only: clang ignores `#pragma GCC target`, so there (and off x86-64) only the baseline variant is built.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EOC_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace avx512 {
#include "cpu_kernels.h"
}  // namespace avx512
#pragma GCC pop_options
#else
#define EOC_MULTI_ISA 0
#endif

// --- instruction set ----------------------------------------------------------------------------

enum Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kIsaNames[] = {"base", "avx2", "avx512"};

bool isa_supported(int isa) {
  if (isa == kBase) return true;
#if EOC_MULTI_ISA
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kAvx2) return avx2;
  if (isa == kAvx512) {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
#endif
  return false;
}

int best_isa() {
  for (int isa = kAvx512; isa > kBase; --isa) {
    if (isa_supported(isa)) return isa;
  }
  return kBase;
}

int isa_from_name(const std::string& name) {
  for (int isa = kBase; isa <= kAvx512; ++isa) {
    if (name == kIsaNames[isa]) return isa;
  }
  TORCH_CHECK(false, "eoc_kernels.cpp: unknown instruction set '", name, "'; known: base, avx2, avx512");
  return kBase;
}

// The variant that runs: the widest one this CPU supports, or $EOC_CPU_ISA when set (read once).
std::atomic<int>& selected_isa() {
  static std::atomic<int> isa{[] {
    const char* env = std::getenv("EOC_CPU_ISA");
    if (env == nullptr || *env == '\0') return best_isa();
    const int wanted = isa_from_name(env);
    TORCH_CHECK(isa_supported(wanted), "eoc_kernels.cpp: EOC_CPU_ISA=", env, " is not supported by this CPU");
    return wanted;
  }()};
  return isa;
}

std::string isa() { return kIsaNames[selected_isa().load()]; }

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (int isa = kBase; isa <= kAvx512; ++isa) {
    if (isa_supported(isa)) names.emplace_back(kIsaNames[isa]);
  }
  return names;
}

void set_isa(const std::string& name) {
  const int wanted = isa_from_name(name);
  TORCH_CHECK(isa_supported(wanted), "eoc_kernels.cpp: instruction set '", name, "' is not supported by this CPU");
  selected_isa().store(wanted);
}

template <typename T>
void run(const Rows<T>& x, const OutRows<T>& out, const std::vector<Entry<T>>& entries, float threshold,
         int64_t batch, int64_t tokens, int64_t channels) {
  switch (selected_isa().load()) {
#if EOC_MULTI_ISA
    case kAvx512:
      return avx512::run_entries<T>(x, out, entries, threshold, batch, tokens, channels);
    case kAvx2:
      return avx2::run_entries<T>(x, out, entries, threshold, batch, tokens, channels);
#endif
    default:
      return base::run_entries<T>(x, out, entries, threshold, batch, tokens, channels);
  }
}

// --- arguments ----------------------------------------------------------------------------------

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using eoc_checks::check_branch;
using eoc_checks::check_feature;
using eoc_checks::check_rows;
using eoc_checks::check_segment;
using eoc_checks::sizes_of;

void check_x_out(const char* op, const Tensor& x, const Tensor& out) {
  eoc_checks::check_x_out(op, x, out, c10::DeviceType::CPU);
}

// A float32 CPU tensor of `numel` elements (coefficients, threshold).
const float* float_values(const char* op, const char* name, const Tensor& t, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == numel, op, ": ", name,
              " must be a float32 CPU tensor of ", numel, " element(s), got ", t.scalar_type(), " ", sizes_of(t),
              " on ", t.device());
  return t.data_ptr<float>();
}

float threshold_of(const char* op, double value, const OptTensor& tensor) {
  if (!tensor.has_value()) return static_cast<float>(value);
  return *float_values(op, "threshold_tensor", *tensor, 1);
}

// A branch's coefficients (alpha, beta_1, gamma, beta_2, beta_3); slots past a tensor's length P are 0.
struct Coef {
  float values[kCoefs] = {};
  bool nonzero[kCoefs] = {};
};

// The coefficients of branch `branch` from coef_values (kCoefs floats per branch, already size-checked), or
// from a float32 [P] tensor (P in 3..5) when given.
Coef coef_of(const char* op, const char* name, c10::ArrayRef<double> values, size_t branch, const OptTensor& tensor) {
  Coef coef;
  if (tensor.has_value()) {
    const int64_t length = eoc_checks::coef_length(op, name, *tensor);
    const float* data = float_values(op, name, *tensor, length);
    for (int64_t j = 0; j < length; ++j) {
      coef.values[j] = data[j * tensor->stride(0)];
      coef.nonzero[j] = coef.values[j] != 0.0f;
    }
    return coef;
  }
  for (int j = 0; j < kCoefs; ++j) {
    const double value = values[branch * kCoefs + j];
    coef.values[j] = static_cast<float>(value);
    coef.nonzero[j] = value != 0.0;  // as the reference's `c != 0` on the Python number
  }
  return coef;
}

template <typename T>
Rows<T> rows_of(const T* data, int64_t stride_b, int64_t stride_n, int64_t stride_c, int64_t heads, int64_t batch) {
  Rows<T> rows;
  rows.data = data;
  rows.stride_b = stride_b;
  rows.stride_n = stride_n;
  rows.stride_c = stride_c;
  rows.rows_per_head = batch / heads;
  return rows;
}

// Rows of a [..., rows, N, C] tensor at leading index `offset` (elements), its last three strides.
template <typename T>
Rows<T> rows_of(const Tensor& t, int64_t offset, int64_t batch) {
  const int64_t d = t.dim();
  return rows_of<T>(t.data_ptr<T>() + offset, t.stride(d - 3), t.stride(d - 2), t.stride(d - 1), t.size(d - 3),
                    batch);
}

template <typename T>
void finish_entry(Entry<T>& e) {
  bool contiguous = e.cache.stride_c == 1 && ((e.flags & kHasDelta) == 0 || e.delta.stride_c == 1) &&
                    ((e.flags & kHasTrend) == 0 || e.trend.stride_c == 1);
  for (int j = 1; j <= 3; ++j) {
    contiguous = contiguous && (!reads_history(e.flags, j) || e.history[j - 1].stride_c == 1);
  }
  e.contiguous = contiguous;
}

// A reused branch of cached_branch / cached_block: gate [B, C], cache (C_0) and history (prev, prev2, prev3:
// C_1, C_2, C_3) [B, N, C], delta / trend [H, N, C]. beta_i applies when C_{i-1} and C_i are given (C_0 always
// is) and its coefficient is nonzero; a history tensor no applied term needs is not read.
template <typename T>
Entry<T> branch_entry(const eoc_checks::BranchTensors& t, const Coef& coef, int64_t batch) {
  Entry<T> e;
  e.gate = rows_of<T>(t.gate.data_ptr<T>(), t.gate.stride(0), 0, t.gate.stride(1), batch, batch);
  e.cache = rows_of<T>(t.cache, 0, batch);
  std::copy(coef.values, coef.values + kCoefs, e.coef);
  if (t.delta.has_value() && coef.nonzero[kAlpha]) e.flags |= kHasDelta;
  if (t.trend.has_value() && coef.nonzero[kGamma]) e.flags |= kHasTrend;
  const OptTensor* history[3] = {&t.prev, &t.prev2, &t.prev3};
  for (int i = 1; i <= 3; ++i) {
    const bool given = history[i - 1]->has_value() && (i == 1 || history[i - 2]->has_value());
    if (given && coef.nonzero[kBetaSlot[i - 1]]) e.flags |= kBetaFlag[i - 1];
  }
  if ((e.flags & kHasDelta) != 0) e.delta = rows_of<T>(*t.delta, 0, batch);
  if ((e.flags & kHasTrend) != 0) e.trend = rows_of<T>(*t.trend, 0, batch);
  for (int j = 1; j <= 3; ++j) {
    if (reads_history(e.flags, j)) e.history[j - 1] = rows_of<T>(**history[j - 1], 0, batch);
  }
  finish_entry(e);
  return e;
}

template <typename T>
void run_op(const Tensor& x, const Tensor& out, const std::vector<Entry<T>>& entries, float threshold) {
  Rows<T> x_rows = rows_of<T>(x, 0, x.size(0));
  OutRows<T> out_rows;
  out_rows.data = out.data_ptr<T>();
  out_rows.stride_b = out.stride(0);
  out_rows.stride_n = out.stride(1);
  out_rows.stride_c = out.stride(2);
  run<T>(x_rows, out_rows, entries, threshold, x.size(0), x.size(1), x.size(2));
}

// Calls body.template operator()<T>() with T the C++ type of x's dtype.
template <typename Body>
void dispatch_dtype(const Tensor& x, Body&& body) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return body.template operator()<float>();
    case at::kHalf:
      return body.template operator()<c10::Half>();
    case at::kBFloat16:
      return body.template operator()<c10::BFloat16>();
    default:
      TORCH_CHECK(false, "eoc_kernels.cpp: unsupported dtype ", x.scalar_type());
  }
}

bool empty(const Tensor& x) { return x.numel() == 0; }

// --- ops ----------------------------------------------------------------------------------------

void cached_branch_out(const Tensor& x, const Tensor& gate, const Tensor& cache, const OptTensor& prev,
                       const OptTensor& prev2, const OptTensor& prev3, const OptTensor& delta,
                       const OptTensor& trend, c10::ArrayRef<double> coef_values, const OptTensor& coef_tensor,
                       double threshold_value, const OptTensor& threshold_tensor, Tensor& out) {
  constexpr const char* op = "eoc::cached_branch_out";
  check_x_out(op, x, out);
  const eoc_checks::BranchTensors branch{gate, cache, prev, prev2, prev3, delta, trend};
  check_branch(op, x, "", branch);
  eoc_checks::check_coef_values(op, coef_values, 1);
  const Coef coef = coef_of(op, "coef_tensor", coef_values, 0, coef_tensor);
  const float threshold = threshold_of(op, threshold_value, threshold_tensor);
  if (empty(x)) return;
  dispatch_dtype(x, [&]<typename T>() {
    std::vector<Entry<T>> entries{branch_entry<T>(branch, coef, x.size(0))};
    run_op<T>(x, out, entries, threshold);
  });
}

void cached_block_out(const Tensor& x, const Tensor& gate_attn, const Tensor& gate_mlp, const Tensor& cache_attn,
                      const Tensor& cache_mlp, const OptTensor& prev_attn, const OptTensor& prev_mlp,
                      const OptTensor& prev2_attn, const OptTensor& prev2_mlp, const OptTensor& prev3_attn,
                      const OptTensor& prev3_mlp, const OptTensor& delta_attn, const OptTensor& delta_mlp,
                      const OptTensor& trend_attn, const OptTensor& trend_mlp, c10::ArrayRef<double> coef_values,
                      const OptTensor& coef_tensor_attn, const OptTensor& coef_tensor_mlp, double threshold_value,
                      const OptTensor& threshold_tensor, Tensor& out) {
  constexpr const char* op = "eoc::cached_block_out";
  check_x_out(op, x, out);
  const eoc_checks::BranchTensors attn_branch{gate_attn, cache_attn, prev_attn, prev2_attn,
                                              prev3_attn, delta_attn, trend_attn};
  const eoc_checks::BranchTensors mlp_branch{gate_mlp,  cache_mlp, prev_mlp, prev2_mlp,
                                             prev3_mlp, delta_mlp, trend_mlp};
  check_branch(op, x, "_attn", attn_branch);
  check_branch(op, x, "_mlp", mlp_branch);
  eoc_checks::check_coef_values(op, coef_values, 2);
  const Coef attn = coef_of(op, "coef_tensor_attn", coef_values, 0, coef_tensor_attn);
  const Coef mlp = coef_of(op, "coef_tensor_mlp", coef_values, 1, coef_tensor_mlp);
  const float threshold = threshold_of(op, threshold_value, threshold_tensor);
  if (empty(x)) return;
  dispatch_dtype(x, [&]<typename T>() {
    const int64_t batch = x.size(0);
    std::vector<Entry<T>> entries{branch_entry<T>(attn_branch, attn, batch),
                                  branch_entry<T>(mlp_branch, mlp, batch)};
    run_op<T>(x, out, entries, threshold);
  });
}

void cached_segment_out(const Tensor& x, const Tensor& gates, const Tensor& cache, const Tensor& generation,
                        const OptTensor& delta, const OptTensor& trend, const OptTensor& coef,
                        double threshold_value, const OptTensor& threshold_tensor, Tensor& out) {
  constexpr const char* op = "eoc::cached_segment_out";
  check_x_out(op, x, out);
  check_segment(op, x, gates, cache, generation, delta, trend, coef);
  const int64_t generations = cache.size(0), blocks = cache.size(1);
  const int64_t batch = x.size(0);
  const float* coef_data = nullptr;
  const int64_t coef_length = coef.has_value() ? coef->size(2) : 0;  // P
  if (coef.has_value()) {
    coef_data = float_values(op, "coef", *coef, blocks * 2 * coef_length);
  }
  // History terms beta_1 .. beta_K an entry may apply: the ring holds C_0 .. C_{G-1}, coef has P - 2 betas.
  const int64_t history_terms = std::min(generations - 1, coef_length - 2);
  const float threshold = threshold_of(op, threshold_value, threshold_tensor);
  if (empty(x)) return;

  // Generations and coefficients on the host (CPU memory: no device sync). generation[s, k] holds C_0 of entry
  // (s, k); its C_j is generation (generation[s, k] - j) mod G.
  std::vector<int64_t> current(static_cast<size_t>(blocks * 2), 0);
  for (int64_t s = 0; s < blocks; ++s) {
    for (int64_t k = 0; k < 2; ++k) {
      const int64_t offset = s * generation.stride(0) + k * generation.stride(1);
      const int64_t g = generation.scalar_type() == at::kInt ? generation.data_ptr<int32_t>()[offset]
                                                             : generation.data_ptr<int64_t>()[offset];
      TORCH_CHECK(generations == 1 || (g >= 0 && g < generations), op, ": generation values must be in 0..",
                  generations - 1, ", got ", g);
      current[static_cast<size_t>(s * 2 + k)] = generations == 1 ? 0 : g;
    }
  }
  dispatch_dtype(x, [&]<typename T>() {
    std::vector<Entry<T>> entries;
    entries.reserve(static_cast<size_t>(blocks * 2));
    const T* gates_data = gates.data_ptr<T>();
    for (int64_t s = 0; s < blocks; ++s) {
      for (int64_t k = 0; k < 2; ++k) {
        Entry<T> e;
        const int64_t g = current[static_cast<size_t>(s * 2 + k)];
        const int64_t entry = s * cache.stride(1) + k * cache.stride(2);
        e.gate = rows_of<T>(gates_data + s * gates.stride(1) + k * gates.stride(2), gates.stride(0), 0,
                            gates.stride(3), batch, batch);
        e.cache = rows_of<T>(cache, entry + g * cache.stride(0), batch);
        if (coef_data != nullptr) {  // coef None: plain reuse, nothing else is read
          const float* c = coef_data + s * coef->stride(0) + k * coef->stride(1);
          for (int64_t j = 0; j < coef_length; ++j) e.coef[j] = c[j * coef->stride(2)];
          if (delta.has_value() && e.coef[kAlpha] != 0.0f) {
            e.delta = rows_of<T>(*delta, s * delta->stride(0) + k * delta->stride(1), batch);
            e.flags |= kHasDelta;
          }
          if (trend.has_value() && e.coef[kGamma] != 0.0f) {
            e.trend = rows_of<T>(*trend, s * trend->stride(0) + k * trend->stride(1), batch);
            e.flags |= kHasTrend;
          }
          for (int64_t i = 1; i <= history_terms; ++i) {
            if (e.coef[kBetaSlot[i - 1]] != 0.0f) e.flags |= kBetaFlag[i - 1];
          }
          for (int64_t j = 1; j <= history_terms; ++j) {  // C_j: generation (g - j) mod G
            if (reads_history(e.flags, static_cast<int>(j))) {
              const int64_t generation_j = (g - j + generations) % generations;
              e.history[j - 1] = rows_of<T>(cache, entry + generation_j * cache.stride(0), batch);
            }
          }
        }
        finish_entry(e);
        entries.push_back(e);
      }
    }
    run_op<T>(x, out, entries, threshold);
  });
}

}  // namespace eoc_cpu

// The isa utilities are CPU-only and have one implementation (a catch-all kernel).
TORCH_LIBRARY_FRAGMENT(eoc, m) {
  m.def("cpu_isa() -> str", &eoc_cpu::isa);
  m.def("cpu_supported_isas() -> str[]", &eoc_cpu::supported_isas);
  m.def("cpu_set_isa(str name) -> ()", &eoc_cpu::set_isa);
}

// The out-variant ops' schemas are csrc/schema.cpp's; these are their CPU kernels.
TORCH_LIBRARY_IMPL(eoc, CPU, m) {
  m.impl("cached_branch_out", &eoc_cpu::cached_branch_out);
  m.impl("cached_block_out", &eoc_cpu::cached_block_out);
  m.impl("cached_segment_out", &eoc_cpu::cached_segment_out);
}
