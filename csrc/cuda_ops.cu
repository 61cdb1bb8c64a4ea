// CUDA kernels of the EOC ops (docs/DESIGN.md §3), built into eoc_kernels._C by a build against a CUDA torch.
//
// Eager equivalent: eoc_kernels/reference.py (cached_branch, cached_block, cached_segment), the ground truth
// of every test. Per reused entry (a branch of a block):
//
//     corr = ((0 + α·D) + β·(Cc − Cp)) + γ·(Cc ⊙ E)   (a term only when its tensor is given and its
//                                                    coefficient is nonzero: its tensor is never read)
//     keep = ||corr|| / (||Cc|| + 1e-6) > threshold, or threshold <= 0   (per token; NaN -> false)
//     F̂ = Cc + (keep ? corr : 0)
//     out = x + Σ_entries gate ⊙ F̂                    (entries in order, fp32, one rounding at the end)
//
// This file registers the CUDA kernels of the out-variant ops defined once in schema.cpp:
//   TORCH_LIBRARY_IMPL(eoc, CUDA): eoc::cached_branch_out, eoc::cached_block_out, eoc::cached_segment_out.
//
// Launch geometry. A token row (b, n) is owned by one group of `threads_per_row` threads (blockDim.x, a
// multiple of 32): thread t holds the row's elements in kElems = 8 fp32 registers per operand, as
// kElems / kVec slots of kVec = 16 bytes / sizeof(T) elements (fp32: 2 slots of 4, fp16/bf16: 1 slot of
// 8); slot j of thread t starts at column (j · threads_per_row + t) · kVec, so a warp's slot-j loads are
// 512 contiguous bytes. threads_per_row = round_up(ceil(C / 8), 32) ≤ 1024, so C ≤ kMaxChannels = 8192
// (the scalar path: ≤ 512 threads, C ≤ 4096; DiT widths are ≤ 4096; wider rows raise before any launch,
// naming backend='triton' or 'torch'). A block holds blockDim.y =
// max(1, 256 / threads_per_row) rows (C = 256: 8 rows of one warp; C = 1152: one row of 160 threads,
// 90% of the lanes hold a column; C = 4096: one row of 512 threads).
//
// Judgment strategy: the row stays in registers. The per-token norms need the whole row before any
// element of the entry can be added, so per entry a thread computes Cc and corr of its 8 elements into
// registers, the row's two partial sums are reduced (warp butterfly shuffles, then, when a row spans
// several warps, one float2 per warp in shared memory and one __syncthreads), every thread of the row
// sums the same values in the same order (so the decision is uniform), and then adds gate ⊙ F̂ from the
// registers. Every input is read once and the output written once; nothing is re-read. The alternative,
// re-reading the entry's rows after the reduction, would need no Cc / corr registers but doubles the
// load instructions and, at 1152 · 2 B · 4 operands per row and dozens of resident rows per SM, would
// not stay in L1. Without judgment (no term, or a float threshold <= 0: JUDGE = false) there is no
// reduction and no Cc / corr arrays: acc += gate ⊙ (Cc + corr) directly.
//
// The registers do not depend on C (the kernels are templated over dtype, vector path and JUDGE only):
// acc, Cc and corr are 3 × 8 fp32 per thread whatever the width; C only changes threads_per_row.
//
// Loads: the vector path (VECTORIZED: every operand row is contiguous, its start 16-byte aligned, C a
// multiple of kVec) reads each slot with one 128-bit load (LDG.E.128) and writes with one 128-bit store;
// otherwise (any stride over C, odd C, misaligned views such as the DiT's gate matrix) the scalar path
// reads element by element with the operand's column stride. Offsets are int64.
//
// Occupancy. Register budgets are explicit: the vector path is compiled with __launch_bounds__(1024) and
// __maxnreg__(64), so every block the launcher picks (up to 1024 threads at C = 8192) can launch; the
// scalar path needs more (8 strided loads per operand, each with its own 64-bit address: ptxas spilled at
// 64) and gets __launch_bounds__(512) and 128 registers, hence C <= 4096 there. Measured
// (benchmarks/results/nvcc-compile-*.md, `python benchmarks/gpu/nvcc_compile.py`): vector path 54-64
// registers, scalar path 70-128, no spill, 512 B of static shared memory (the per-warp partial sums). An SM
// of sm_80 / sm_90 has 65536 registers, 64 warps and 32 blocks: at 64 registers it holds 32 warps (50%), at
// 54 (allocated as 56) 36 warps; C = 1152 (5-warp blocks) gives 6 or 7 resident blocks, C = 4096 (16 warps)
// 2, C = 256 (8 rows of one warp per block) 4. Why 256 threads per block as the target: rows of at most 256
// columns' worth of threads are stacked so that the 32-blocks-per-SM limit never binds before the
// register limit does, while a wide row keeps one block of its own (no cross-row barrier traffic). The
// kernels are bandwidth bound and issue one independent 16-byte load per operand and slot; whether 50%
// occupancy keeps enough bytes in flight for HBM is for a GPU run (benchmarks/gpu/run_gpu_checks.py) to say.
//
// CUDA graphs: no allocation, no host sync (tensor coefficients, thresholds and generations are read by the
// kernel, never by the host), launched on c10::cuda::getCurrentCUDAStream() under a CUDAGuard on x's
// device. The argument checks (TORCH_CHECK, naming the argument) read only sizes, strides, dtypes and
// devices, so a direct call of torch.ops.eoc.* cannot make a kernel read outside its tensors; the
// generation is clamped into 0..G-1 in the kernel (the Python side asserts it asynchronously).
//
// Aliasing: ptxas reads the inputs through the read-only path (LDG.E.128.CONSTANT: const __restrict__
// pointers of a __grid_constant__ parameter), so `out` must not overlap any input, except x itself element
// for element (each element is read by the thread that then writes it). The Python side allocates out.
//
// Exactness: build with --fmad=false (setup.py, CMakeLists.txt): every product and sum is rounded as in
// the eager reference and in its order, so outputs match the reference except where the norms' summation
// order puts a token's score on the other side of the threshold. sqrtf and '/' are IEEE (no fast math).

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "op_checks.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace eoc_cuda {

constexpr int kElems = 8;  // fp32 registers per thread and operand
constexpr int kWarp = 32;
constexpr int kMaxBlockThreads = 1024;
constexpr int kMaxWarps = kMaxBlockThreads / kWarp;
constexpr int kTargetBlockThreads = 256;
// __launch_bounds__ per path: the vector path fits 64 registers, so blocks of up to 1024 threads (a row of
// C <= 8192); the scalar path (8 independent strided loads per operand, each with its own 64-bit address)
// needs more than 64 (ptxas spilled 8-72 bytes at 64), so its blocks are at most 512 threads (128 registers
// allowed): a row of C <= 4096.
constexpr int kVectorMaxThreads = 1024;
constexpr int kScalarMaxThreads = 512;
constexpr int kMaxChannels = kElems * kVectorMaxThreads;  // 8192
constexpr int kScalarMaxChannels = kElems * kScalarMaxThreads;  // 4096

constexpr int kRegistersPerSm = 65536;  // 32-bit registers per SM, sm_80 and sm_90

template <bool VECTORIZED>
constexpr int max_threads() {
  return VECTORIZED ? kVectorMaxThreads : kScalarMaxThreads;
}

// The register budget: the most a thread of the largest block may use (64 / 128). Given explicitly
// (__maxnreg__), since with __launch_bounds__(512) alone ptxas still kept the scalar cached_branch fp32
// variants at 64 registers and spilled 16-20 bytes.
template <bool VECTORIZED>
constexpr int max_registers() {
  return kRegistersPerSm / max_threads<VECTORIZED>();
}

// --- element types: raw storage and the fp32 conversions ---------------------------------------------

struct F32 {
  using Raw = uint32_t;
  static constexpr int kVec = 4;  // elements per 16 bytes
  __device__ static float to_float(Raw r) { return __uint_as_float(r); }
  __device__ static Raw from_float(float f) { return __float_as_uint(f); }
};

struct F16 {
  using Raw = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float to_float(Raw r) { return __half2float(__ushort_as_half(r)); }
  __device__ static Raw from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

struct BF16 {
  using Raw = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float to_float(Raw r) { return __uint_as_float(static_cast<uint32_t>(r) << 16); }  // exact
  __device__ static Raw from_float(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

// The 16 bytes of a slot as kVec fp32 values (little endian: element 0 in the low bits).
template <class Ty>
__device__ __forceinline__ void unpack(const uint4& w, float* v) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (Ty::kVec == 4) {
      v[i] = Ty::to_float(words[i]);
    } else {
      v[2 * i] = Ty::to_float(static_cast<uint16_t>(words[i] & 0xffffu));
      v[2 * i + 1] = Ty::to_float(static_cast<uint16_t>(words[i] >> 16));
    }
  }
}

template <class Ty>
__device__ __forceinline__ uint4 pack(const float* v) {
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (Ty::kVec == 4) {
      words[i] = Ty::from_float(v[i]);
    } else {
      words[i] = static_cast<uint32_t>(Ty::from_float(v[2 * i])) |
                 (static_cast<uint32_t>(Ty::from_float(v[2 * i + 1])) << 16);
    }
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// --- a thread's columns -------------------------------------------------------------------------------

// The columns a thread holds of its row: slot j covers [col[j], col[j] + count[j]).
template <class Ty>
struct Slots {
  static constexpr int kSlots = kElems / Ty::kVec;
  int col[kSlots];    // first column (C <= kMaxChannels: int32 suffices)
  int count[kSlots];  // valid elements of the slot: 0..kVec (the vector path: 0 or kVec)
};

template <class Ty>
__device__ __forceinline__ Slots<Ty> thread_slots(int64_t channels, bool row_valid) {
  Slots<Ty> s;
#pragma unroll
  for (int j = 0; j < Slots<Ty>::kSlots; ++j) {
    s.col[j] = static_cast<int>((j * blockDim.x + threadIdx.x) * Ty::kVec);
    const int64_t left = row_valid ? channels - s.col[j] : 0;
    s.count[j] = left <= 0 ? 0 : (left >= Ty::kVec ? Ty::kVec : static_cast<int>(left));
  }
  return s;
}

// v[0:8] = the thread's elements of a row (0 where out of range). VECTORIZED: one 128-bit load per slot.
template <class Ty, bool VECTORIZED>
__device__ __forceinline__ void load_row(const typename Ty::Raw* __restrict__ row, int64_t stride_c,
                                         const Slots<Ty>& s, float (&v)[kElems]) {
#pragma unroll
  for (int j = 0; j < Slots<Ty>::kSlots; ++j) {
    float* slot = v + j * Ty::kVec;
    if constexpr (VECTORIZED) {
      if (s.count[j] > 0) {
        unpack<Ty>(*reinterpret_cast<const uint4*>(row + s.col[j]), slot);
      } else {
#pragma unroll
        for (int i = 0; i < Ty::kVec; ++i) slot[i] = 0.0f;
      }
    } else {
#pragma unroll
      for (int i = 0; i < Ty::kVec; ++i) {
        slot[i] = i < s.count[j] ? Ty::to_float(row[static_cast<int64_t>(s.col[j] + i) * stride_c]) : 0.0f;
      }
    }
  }
}

template <class Ty, bool VECTORIZED>
__device__ __forceinline__ void store_row(typename Ty::Raw* __restrict__ row, int64_t stride_c, const Slots<Ty>& s,
                                          const float (&v)[kElems]) {
#pragma unroll
  for (int j = 0; j < Slots<Ty>::kSlots; ++j) {
    const float* slot = v + j * Ty::kVec;
    if constexpr (VECTORIZED) {
      if (s.count[j] > 0) *reinterpret_cast<uint4*>(row + s.col[j]) = pack<Ty>(slot);
    } else {
#pragma unroll
      for (int i = 0; i < Ty::kVec; ++i) {
        if (i < s.count[j]) row[static_cast<int64_t>(s.col[j] + i) * stride_c] = Ty::from_float(slot[i]);
      }
    }
  }
}

// --- one entry of a row -----------------------------------------------------------------------------

// What one entry reads for the current row: row pointers (already offset to (b, n) and the entry), column
// strides, coefficients and which terms are read. use_*: tensor given and coefficient nonzero (uniform
// over the block, so skipping a term's loads is a uniform branch).
template <class Ty>
struct EntryRows {
  using Raw = typename Ty::Raw;
  const Raw* gate;
  const Raw* cache;
  const Raw* prev;
  const Raw* delta;
  const Raw* trend;
  int64_t gate_c, cache_c, prev_c, delta_c, trend_c;
  float alpha, beta, gamma;
  bool use_delta, use_prev, use_trend;
};

// (Σ a, Σ b) over the threads of this row (blockDim.x of them), identical in every one of them: butterfly
// shuffles leave every lane of a warp with the same bits (each step adds the same two values, commutatively);
// across warps every thread sums the same per-warp values in the same order. `red` is double-buffered by
// `parity` (one barrier per reduction: a slot is rewritten only two reductions later, after every thread has
// passed the barrier of the reduction in between, i.e. has finished reading it). Every thread of the block
// must call this, rows past the end included (their sums are unused).
__device__ __forceinline__ float2 row_sums(float a, float b, float2 (*red)[kMaxWarps], int parity) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, offset);
    b += __shfl_xor_sync(0xffffffffu, b, offset);
  }
  const int warps_per_row = blockDim.x / kWarp;
  if (warps_per_row == 1) return make_float2(a, b);  // uniform over the block
  float2* slots = red[parity] + threadIdx.y * warps_per_row;
  if ((threadIdx.x % kWarp) == 0) slots[threadIdx.x / kWarp] = make_float2(a, b);
  __syncthreads();
  float2 total = slots[0];
  for (int w = 1; w < warps_per_row; ++w) {
    total.x += slots[w].x;
    total.y += slots[w].y;
  }
  return total;
}

// acc += gate ⊙ F̂ of one entry for this thread's elements of the row.
template <class Ty, bool VECTORIZED, bool JUDGE>
__device__ __forceinline__ void add_entry(float (&acc)[kElems], const EntryRows<Ty>& e, const Slots<Ty>& s,
                                          float threshold, bool threshold_is_tensor, float2 (*red)[kMaxWarps],
                                          int parity) {
  float cached[kElems];
  float corr[kElems];
  load_row<Ty, VECTORIZED>(e.cache, e.cache_c, s, cached);
#pragma unroll
  for (int i = 0; i < kElems; ++i) corr[i] = 0.0f;
  float term[kElems];
  if (e.use_delta) {
    load_row<Ty, VECTORIZED>(e.delta, e.delta_c, s, term);
#pragma unroll
    for (int i = 0; i < kElems; ++i) corr[i] = corr[i] + e.alpha * term[i];
  }
  if (e.use_prev) {
    load_row<Ty, VECTORIZED>(e.prev, e.prev_c, s, term);
#pragma unroll
    for (int i = 0; i < kElems; ++i) corr[i] = corr[i] + e.beta * (cached[i] - term[i]);
  }
  if (e.use_trend) {
    load_row<Ty, VECTORIZED>(e.trend, e.trend_c, s, term);
#pragma unroll
    for (int i = 0; i < kElems; ++i) corr[i] = corr[i] + e.gamma * (cached[i] * term[i]);
  }
  bool keep = true;
  if constexpr (JUDGE) {
    float corr_sq = 0.0f, cached_sq = 0.0f;
#pragma unroll
    for (int i = 0; i < kElems; ++i) {
      corr_sq += corr[i] * corr[i];
      cached_sq += cached[i] * cached[i];
    }
    const float2 sums = row_sums(corr_sq, cached_sq, red, parity);
    // 1e-6: reference._NORM_EPS. A NaN score fails the comparison: the token keeps Cc.
    const float score = sqrtf(sums.x) / (sqrtf(sums.y) + 1e-6f);
    keep = score > threshold || (threshold_is_tensor && threshold <= 0.0f);
  }
  float gate[kElems];
  load_row<Ty, VECTORIZED>(e.gate, e.gate_c, s, gate);
#pragma unroll
  for (int i = 0; i < kElems; ++i) acc[i] = acc[i] + gate[i] * (cached[i] + (keep ? corr[i] : 0.0f));
}

// --- operands ----------------------------------------------------------------------------------------

// A [B or H, N, C] operand: row (b, n) starts at data + (b / rows_per_head) · stride_b + n · stride_n.
template <class Ty>
struct Rows {
  const typename Ty::Raw* data = nullptr;
  int64_t stride_b = 0, stride_n = 0, stride_c = 1, rows_per_head = 1;
  __device__ const typename Ty::Raw* row(int64_t b, int64_t n) const {
    return data + (b / rows_per_head) * stride_b + n * stride_n;
  }
};

template <class Ty>
struct OutRows {
  typename Ty::Raw* data = nullptr;
  int64_t stride_b = 0, stride_n = 0, stride_c = 1;
};

// A branch of cached_branch / cached_block. coef: a float32 [3] device tensor (values read by the kernel) or
// null (alpha, beta, gamma hold the values). has_*: the tensor is given and, for float coefficients, its
// coefficient is nonzero.
template <class Ty>
struct Branch {
  Rows<Ty> gate, cache, prev, delta, trend;
  float alpha = 0.0f, beta = 0.0f, gamma = 0.0f;
  const float* coef = nullptr;
  int64_t coef_stride = 0;
  bool has_delta = false, has_prev = false, has_trend = false;
};

template <class Ty>
struct BranchParams {
  Rows<Ty> x;
  OutRows<Ty> out;
  Branch<Ty> branch[2];
  int num_branches = 1;
  int64_t rows = 0, tokens = 1, channels = 0;
  float threshold = 0.0f;
  const float* threshold_tensor = nullptr;
};

template <class Ty>
struct SegmentParams {
  using Raw = typename Ty::Raw;
  Rows<Ty> x;
  OutRows<Ty> out;
  const Raw* gates = nullptr;  // [B, S, 2, C]
  int64_t gate_b = 0, gate_s = 0, gate_k = 0, gate_c = 1;
  const Raw* cache = nullptr;  // [G, S, 2, B, N, C]
  int64_t cache_g = 0, cache_s = 0, cache_k = 0, cache_b = 0, cache_n = 0, cache_c = 1;
  int generations = 1;
  const void* generation = nullptr;  // int32 or int64 [S, 2], read only when generations == 2
  bool generation_is_64 = false;
  int64_t generation_s = 0, generation_k = 0;
  const Raw* delta = nullptr;  // [S, 2, H, N, C] or null
  int64_t delta_s = 0, delta_k = 0, delta_h = 0, delta_n = 0, delta_c = 1, delta_rows_per_head = 1;
  const Raw* trend = nullptr;
  int64_t trend_s = 0, trend_k = 0, trend_h = 0, trend_n = 0, trend_c = 1, trend_rows_per_head = 1;
  const float* coef = nullptr;  // float32 [S, 2, 3] or null: plain reuse
  int64_t coef_s = 0, coef_k = 0, coef_j = 0;
  int64_t blocks = 0;  // S
  int64_t rows = 0, tokens = 1, channels = 0;
  float threshold = 0.0f;
  const float* threshold_tensor = nullptr;
};

// --- kernels -----------------------------------------------------------------------------------------

// cached_branch (one branch) and cached_block (two): out = x + Σ_branches gate ⊙ F̂.
template <class Ty, bool VECTORIZED, bool JUDGE>
__global__ void __launch_bounds__(max_threads<VECTORIZED>()) __maxnreg__(max_registers<VECTORIZED>())
cached_branches_kernel(const __grid_constant__ BranchParams<Ty> p) {
  __shared__ float2 red[2][kMaxWarps];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool row_valid = row < p.rows;
  const int64_t b = row_valid ? row / p.tokens : 0;
  const int64_t n = row_valid ? row - b * p.tokens : 0;
  const Slots<Ty> s = thread_slots<Ty>(p.channels, row_valid);
  float threshold = p.threshold;
  if constexpr (JUDGE) {
    if (p.threshold_tensor != nullptr) threshold = *p.threshold_tensor;
  }
  float acc[kElems];
  load_row<Ty, VECTORIZED>(p.x.row(b, n), p.x.stride_c, s, acc);
#pragma unroll
  for (int k = 0; k < 2; ++k) {  // unrolled: the parameter struct is indexed with constants
    if (k >= p.num_branches) break;
    const Branch<Ty>& br = p.branch[k];
    EntryRows<Ty> e;
    e.alpha = br.alpha;
    e.beta = br.beta;
    e.gamma = br.gamma;
    if (br.coef != nullptr) {  // tensor coefficients: read here, a zero skips its term's loads
      e.alpha = br.coef[0];
      e.beta = br.coef[br.coef_stride];
      e.gamma = br.coef[2 * br.coef_stride];
    }
    e.use_delta = br.has_delta && (br.coef == nullptr || e.alpha != 0.0f);
    e.use_prev = br.has_prev && (br.coef == nullptr || e.beta != 0.0f);
    e.use_trend = br.has_trend && (br.coef == nullptr || e.gamma != 0.0f);
    e.gate = br.gate.row(b, 0);
    e.cache = br.cache.row(b, n);
    e.prev = br.prev.row(b, n);
    e.delta = br.delta.row(b, n);
    e.trend = br.trend.row(b, n);
    e.gate_c = br.gate.stride_c;
    e.cache_c = br.cache.stride_c;
    e.prev_c = br.prev.stride_c;
    e.delta_c = br.delta.stride_c;
    e.trend_c = br.trend.stride_c;
    add_entry<Ty, VECTORIZED, JUDGE>(acc, e, s, threshold, p.threshold_tensor != nullptr, red, k);
  }
  if (row_valid) {
    store_row<Ty, VECTORIZED>(p.out.data + b * p.out.stride_b + n * p.out.stride_n, p.out.stride_c, s, acc);
  }
}

// cached_segment: out = x + Σ_{s,k} gates[:, s, k] ⊙ F̂_{s,k}, entries in the order (0, attn), (0, mlp), ...
template <class Ty, bool VECTORIZED, bool JUDGE>
__global__ void __launch_bounds__(max_threads<VECTORIZED>()) __maxnreg__(max_registers<VECTORIZED>())
cached_segment_kernel(const __grid_constant__ SegmentParams<Ty> p) {
  __shared__ float2 red[2][kMaxWarps];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool row_valid = row < p.rows;
  const int64_t b = row_valid ? row / p.tokens : 0;
  const int64_t n = row_valid ? row - b * p.tokens : 0;
  const Slots<Ty> s = thread_slots<Ty>(p.channels, row_valid);
  float threshold = p.threshold;
  if constexpr (JUDGE) {
    if (p.threshold_tensor != nullptr) threshold = *p.threshold_tensor;
  }
  float acc[kElems];
  load_row<Ty, VECTORIZED>(p.x.row(b, n), p.x.stride_c, s, acc);
  // Row offsets without the entry part.
  const int64_t gate_row = b * p.gate_b;
  const int64_t cache_row = b * p.cache_b + n * p.cache_n;
  const int64_t delta_row = (b / p.delta_rows_per_head) * p.delta_h + n * p.delta_n;
  const int64_t trend_row = (b / p.trend_rows_per_head) * p.trend_h + n * p.trend_n;
  for (int64_t entry = 0; entry < 2 * p.blocks; ++entry) {
    const int64_t blk = entry >> 1, k = entry & 1;
    int64_t g = 0;
    if (p.generations == 2) {  // generation[s, k] holds Cc, the other one Cp; clamped into 0..1
      const int64_t offset = blk * p.generation_s + k * p.generation_k;
      g = p.generation_is_64 ? static_cast<const int64_t*>(p.generation)[offset]
                             : static_cast<int64_t>(static_cast<const int32_t*>(p.generation)[offset]);
      g = g < 0 ? 0 : (g > 1 ? 1 : g);
    }
    const int64_t cache_entry = blk * p.cache_s + k * p.cache_k + cache_row;
    EntryRows<Ty> e;
    e.alpha = e.beta = e.gamma = 0.0f;
    if (p.coef != nullptr) {
      const float* c = p.coef + blk * p.coef_s + k * p.coef_k;
      e.alpha = c[0];
      e.beta = c[p.coef_j];
      e.gamma = c[2 * p.coef_j];
    }
    // coef null: plain reuse, only Cc and the gate are read.
    e.use_delta = p.coef != nullptr && p.delta != nullptr && e.alpha != 0.0f;
    e.use_prev = p.coef != nullptr && p.generations == 2 && e.beta != 0.0f;
    e.use_trend = p.coef != nullptr && p.trend != nullptr && e.gamma != 0.0f;
    e.gate = p.gates + gate_row + blk * p.gate_s + k * p.gate_k;
    e.cache = p.cache + g * p.cache_g + cache_entry;
    // Operands not read point at Cc: no arithmetic on a null pointer (which would let the compiler assume
    // the pointer non-null).
    e.prev = e.use_prev ? p.cache + (1 - g) * p.cache_g + cache_entry : e.cache;
    e.delta = e.use_delta ? p.delta + blk * p.delta_s + k * p.delta_k + delta_row : e.cache;
    e.trend = e.use_trend ? p.trend + blk * p.trend_s + k * p.trend_k + trend_row : e.cache;
    e.gate_c = p.gate_c;
    e.cache_c = e.prev_c = p.cache_c;
    e.delta_c = p.delta_c;
    e.trend_c = p.trend_c;
    add_entry<Ty, VECTORIZED, JUDGE>(acc, e, s, threshold, p.threshold_tensor != nullptr, red,
                                     static_cast<int>(entry & 1));
  }
  if (row_valid) {
    store_row<Ty, VECTORIZED>(p.out.data + b * p.out.stride_b + n * p.out.stride_n, p.out.stride_c, s, acc);
  }
}

// --- launch ------------------------------------------------------------------------------------------

struct Geometry {
  dim3 grid, block;
};

// threads_per_row = round_up(ceil(C / 8), 32); rows stacked in blockDim.y up to about 256 threads.
Geometry geometry(const char* op, int64_t rows, int64_t channels) {
  const int64_t threads_per_row = ((channels + kElems - 1) / kElems + kWarp - 1) / kWarp * kWarp;
  const int64_t rows_per_block = std::max<int64_t>(1, kTargetBlockThreads / threads_per_row);
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= 0x7fffffff, op, ": too many token rows for one launch: ", rows);
  return {dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads_per_row),
                                                    static_cast<unsigned>(rows_per_block))};
}

template <class Ty, bool VECTORIZED, bool JUDGE>
void launch_branches(const BranchParams<Ty>& p, const Geometry& g, cudaStream_t stream) {
  cached_branches_kernel<Ty, VECTORIZED, JUDGE><<<g.grid, g.block, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class Ty, bool VECTORIZED, bool JUDGE>
void launch_segment(const SegmentParams<Ty>& p, const Geometry& g, cudaStream_t stream) {
  cached_segment_kernel<Ty, VECTORIZED, JUDGE><<<g.grid, g.block, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls fn.template operator()<VECTORIZED, JUDGE>() with the run-time flags as template arguments.
template <class Fn>
void with_variant(bool vectorized, bool judge, Fn&& fn) {
  if (vectorized) {
    judge ? fn.template operator()<true, true>() : fn.template operator()<true, false>();
  } else {
    judge ? fn.template operator()<false, true>() : fn.template operator()<false, false>();
  }
}

// --- arguments ---------------------------------------------------------------------------------------

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using eoc_checks::check_device;
using eoc_checks::check_branch;
using eoc_checks::check_feature;
using eoc_checks::check_rows;
using eoc_checks::check_segment;
using eoc_checks::sizes_of;

void check_x_out(const char* op, const Tensor& x, const Tensor& out) {
  eoc_checks::check_x_out(op, x, out, c10::DeviceType::CUDA);
  TORCH_CHECK(x.size(2) <= kMaxChannels, op, ": the cuda backend holds a token row in the registers of one block "
              "and supports C <= ", kMaxChannels, ", got C = ", x.size(2), "; use backend='triton' or 'torch'");
}

// A float32 tensor of `numel` elements on x's device (coefficients, threshold): read by the kernel.
const float* device_floats(const char* op, const char* name, const Tensor& t, const Tensor& x, int64_t numel) {
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == at::kFloat && t.numel() == numel, op, ": ", name,
              " must be a float32 tensor of ", numel, " element(s) on ", x.device(), ", got ", t.scalar_type(), " ",
              sizes_of(t), " on ", t.device());
  return static_cast<const float*>(t.const_data_ptr());
}

// Whether every row of t (over its last dimension) is contiguous and starts 16-byte aligned, i.e. the
// 128-bit vector path can read it (C % kVec == 0 is checked by the caller).
bool vector_ready(const Tensor& t, int vec) {
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  const int64_t last = t.dim() - 1;
  if (t.size(last) > 1 && t.stride(last) != 1) return false;
  for (int64_t d = 0; d < last; ++d) {
    if (t.size(d) > 1 && t.stride(d) % vec != 0) return false;
  }
  return true;
}

template <class Ty>
Rows<Ty> rows_of(const Tensor& t, int64_t batch) {
  const int64_t d = t.dim();
  Rows<Ty> rows;
  rows.data = static_cast<const typename Ty::Raw*>(t.const_data_ptr());
  rows.stride_b = t.stride(d - 3);
  rows.stride_n = t.stride(d - 2);
  rows.stride_c = t.stride(d - 1);
  rows.rows_per_head = batch / t.size(d - 3);
  return rows;
}

template <class Ty>
Rows<Ty> gate_rows_of(const Tensor& gate) {  // [B, C]: one row per b, the same for every n
  Rows<Ty> rows;
  rows.data = static_cast<const typename Ty::Raw*>(gate.const_data_ptr());
  rows.stride_b = gate.stride(0);
  rows.stride_c = gate.stride(1);
  return rows;
}

template <class Ty>
OutRows<Ty> out_rows_of(Tensor& out) {
  OutRows<Ty> rows;
  rows.data = static_cast<typename Ty::Raw*>(out.data_ptr());
  rows.stride_b = out.stride(0);
  rows.stride_n = out.stride(1);
  rows.stride_c = out.stride(2);
  return rows;
}

// (alpha, beta, gamma) as floats with "given and nonzero" flags, or a device tensor read by the kernel.
struct Coef {
  float values[3] = {0.0f, 0.0f, 0.0f};
  bool nonzero[3] = {false, false, false};
  const float* tensor = nullptr;
  int64_t stride = 0;
};

Coef coef_of(const char* op, const char* name, c10::ArrayRef<double> values, size_t offset, const OptTensor& tensor,
             const Tensor& x) {
  Coef coef;
  if (tensor.has_value()) {
    TORCH_CHECK(tensor->dim() == 1, op, ": ", name, " must have shape [3], got ", sizes_of(*tensor));
    coef.tensor = device_floats(op, name, *tensor, x, 3);
    coef.stride = tensor->stride(0);
    for (bool& on : coef.nonzero) on = true;  // the kernel skips a term whose value is zero
    return coef;
  }
  TORCH_CHECK(values.size() >= offset + 3, op, ": coef_values must hold ", offset + 3, " numbers, got ",
              values.size());
  for (int j = 0; j < 3; ++j) {
    coef.values[j] = static_cast<float>(values[offset + j]);
    coef.nonzero[j] = values[offset + j] != 0.0;  // as the reference's `c != 0` on the Python number
  }
  return coef;
}

// The branch's descriptor; the tensors it reads are appended to `read` (for the vector-path test).
template <class Ty>
Branch<Ty> branch_of(const Tensor& gate, const Tensor& cache, const OptTensor& prev, const OptTensor& delta,
                     const OptTensor& trend, const Coef& coef, int64_t batch, std::vector<const Tensor*>& read) {
  Branch<Ty> br;
  br.gate = gate_rows_of<Ty>(gate);
  br.cache = rows_of<Ty>(cache, batch);
  br.prev = br.delta = br.trend = br.cache;  // stand-ins: never read unless has_*
  read.push_back(&gate);
  read.push_back(&cache);
  br.alpha = coef.values[0];
  br.beta = coef.values[1];
  br.gamma = coef.values[2];
  br.coef = coef.tensor;
  br.coef_stride = coef.stride;
  if (delta.has_value() && coef.nonzero[0]) {
    br.delta = rows_of<Ty>(*delta, batch);
    br.has_delta = true;
    read.push_back(&*delta);
  }
  if (prev.has_value() && coef.nonzero[1]) {
    br.prev = rows_of<Ty>(*prev, batch);
    br.has_prev = true;
    read.push_back(&*prev);
  }
  if (trend.has_value() && coef.nonzero[2]) {
    br.trend = rows_of<Ty>(*trend, batch);
    br.has_trend = true;
    read.push_back(&*trend);
  }
  return br;
}

// Whether the 128-bit path serves every tensor read or written (else the scalar path, C <= 4096).
template <class Ty>
bool vectorized(const char* op, int64_t channels, const std::vector<const Tensor*>& tensors) {
  bool ok = channels % Ty::kVec == 0;
  for (const Tensor* t : tensors) ok = ok && (t->numel() == 0 || vector_ready(*t, Ty::kVec));
  TORCH_CHECK(ok || channels <= kScalarMaxChannels, op, ": the cuda backend reads rows of C > ",
              kScalarMaxChannels, " only with 128-bit loads (every operand contiguous over C, 16-byte aligned rows, C "
              "a multiple of ", Ty::kVec, "), got C = ", channels, " with strided or misaligned operands; use "
              "backend='triton' or 'torch'");
  return ok;
}

// Calls fn.template operator()<Ty>() with the element type of x's dtype.
template <class Fn>
void with_dtype(const Tensor& x, Fn&& fn) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return fn.template operator()<F32>();
    case at::kHalf:
      return fn.template operator()<F16>();
    case at::kBFloat16:
      return fn.template operator()<BF16>();
    default:
      TORCH_CHECK(false, "eoc cuda: unsupported dtype ", x.scalar_type());
  }
}

float threshold_float(const char* op, double value, const OptTensor& tensor, const Tensor& x,
                      const float** device_threshold) {
  *device_threshold = tensor.has_value() ? device_floats(op, "threshold_tensor", *tensor, x, 1) : nullptr;
  return static_cast<float>(value);
}

// --- ops ---------------------------------------------------------------------------------------------

// cached_branch (branches = 1) and cached_block (2): the shared launch.
struct BranchArgs {
  const Tensor* gate;
  const Tensor* cache;
  const OptTensor* prev;
  const OptTensor* delta;
  const OptTensor* trend;
  Coef coef;
};

void run_branches(const char* op, const Tensor& x, const std::vector<BranchArgs>& branches, double threshold_value,
                  const OptTensor& threshold_tensor, Tensor& out) {
  const float* device_threshold = nullptr;
  const float threshold = threshold_float(op, threshold_value, threshold_tensor, x, &device_threshold);
  const int64_t batch = x.size(0), tokens = x.size(1), channels = x.size(2);
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_dtype(x, [&]<class Ty>() {
    BranchParams<Ty> p;
    std::vector<const Tensor*> read{&x, &out};
    bool has_terms = false;
    for (size_t k = 0; k < branches.size(); ++k) {
      const BranchArgs& a = branches[k];
      p.branch[k] = branch_of<Ty>(*a.gate, *a.cache, *a.prev, *a.delta, *a.trend, a.coef, batch, read);
      has_terms = has_terms || p.branch[k].has_delta || p.branch[k].has_prev || p.branch[k].has_trend;
    }
    p.num_branches = static_cast<int>(branches.size());
    p.x = rows_of<Ty>(x, batch);
    p.out = out_rows_of<Ty>(out);
    p.rows = batch * tokens;
    p.tokens = tokens;
    p.channels = channels;
    p.threshold = threshold;
    p.threshold_tensor = device_threshold;
    // The judgment needs whole-row norms only when some term is read and the threshold may be > 0.
    const bool judge = has_terms && (device_threshold != nullptr || threshold_value > 0.0);
    const Geometry g = geometry(op, p.rows, channels);
    with_variant(vectorized<Ty>(op, channels, read), judge, [&]<bool VECTORIZED, bool JUDGE>() {
      launch_branches<Ty, VECTORIZED, JUDGE>(p, g, stream);
    });
  });
}

void cached_branch_out(const Tensor& x, const Tensor& gate, const Tensor& cache, const OptTensor& prev,
                       const OptTensor& delta, const OptTensor& trend, c10::ArrayRef<double> coef_values,
                       const OptTensor& coef_tensor, double threshold_value, const OptTensor& threshold_tensor,
                       Tensor& out) {
  constexpr const char* op = "eoc::cached_branch_out";
  check_x_out(op, x, out);
  check_branch(op, x, "gate", gate, "cache", cache, "prev", prev, "delta", delta, "trend", trend);
  const Coef coef = coef_of(op, "coef_tensor", coef_values, 0, coef_tensor, x);
  run_branches(op, x, {BranchArgs{&gate, &cache, &prev, &delta, &trend, coef}}, threshold_value, threshold_tensor,
               out);
}

void cached_block_out(const Tensor& x, const Tensor& gate_attn, const Tensor& gate_mlp, const Tensor& cache_attn,
                      const Tensor& cache_mlp, const OptTensor& prev_attn, const OptTensor& prev_mlp,
                      const OptTensor& delta_attn, const OptTensor& delta_mlp, const OptTensor& trend_attn,
                      const OptTensor& trend_mlp, c10::ArrayRef<double> coef_values,
                      const OptTensor& coef_tensor_attn, const OptTensor& coef_tensor_mlp, double threshold_value,
                      const OptTensor& threshold_tensor, Tensor& out) {
  constexpr const char* op = "eoc::cached_block_out";
  check_x_out(op, x, out);
  check_branch(op, x, "gate_attn", gate_attn, "cache_attn", cache_attn, "prev_attn", prev_attn, "delta_attn",
               delta_attn, "trend_attn", trend_attn);
  check_branch(op, x, "gate_mlp", gate_mlp, "cache_mlp", cache_mlp, "prev_mlp", prev_mlp, "delta_mlp", delta_mlp,
               "trend_mlp", trend_mlp);
  TORCH_CHECK(coef_values.size() == 6, op, ": coef_values must hold 6 numbers (attention, then MLP), got ",
              coef_values.size());
  const Coef attn = coef_of(op, "coef_tensor_attn", coef_values, 0, coef_tensor_attn, x);
  const Coef mlp = coef_of(op, "coef_tensor_mlp", coef_values, 3, coef_tensor_mlp, x);
  run_branches(op, x,
               {BranchArgs{&gate_attn, &cache_attn, &prev_attn, &delta_attn, &trend_attn, attn},
                BranchArgs{&gate_mlp, &cache_mlp, &prev_mlp, &delta_mlp, &trend_mlp, mlp}},
               threshold_value, threshold_tensor, out);
}

void cached_segment_out(const Tensor& x, const Tensor& gates, const Tensor& cache, const Tensor& generation,
                        const OptTensor& delta, const OptTensor& trend, const OptTensor& coef,
                        double threshold_value, const OptTensor& threshold_tensor, Tensor& out) {
  constexpr const char* op = "eoc::cached_segment_out";
  check_x_out(op, x, out);
  check_segment(op, x, gates, cache, generation, delta, trend, coef);
  const int64_t generations = cache.size(0), blocks = cache.size(1);
  const int64_t batch = x.size(0), tokens = x.size(1), channels = x.size(2);
  if (coef.has_value()) device_floats(op, "coef", *coef, x, blocks * 6);
  const float* device_threshold = nullptr;
  const float threshold = threshold_float(op, threshold_value, threshold_tensor, x, &device_threshold);
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_dtype(x, [&]<class Ty>() {
    using Raw = typename Ty::Raw;
    SegmentParams<Ty> p;
    std::vector<const Tensor*> read{&x, &out, &gates, &cache};
    p.x = rows_of<Ty>(x, batch);
    p.out = out_rows_of<Ty>(out);
    p.gates = static_cast<const Raw*>(gates.const_data_ptr());
    p.gate_b = gates.stride(0);
    p.gate_s = gates.stride(1);
    p.gate_k = gates.stride(2);
    p.gate_c = gates.stride(3);
    p.cache = static_cast<const Raw*>(cache.const_data_ptr());
    p.cache_g = cache.stride(0);
    p.cache_s = cache.stride(1);
    p.cache_k = cache.stride(2);
    p.cache_b = cache.stride(3);
    p.cache_n = cache.stride(4);
    p.cache_c = cache.stride(5);
    p.generations = static_cast<int>(generations);
    p.generation = generation.const_data_ptr();
    p.generation_is_64 = generation.scalar_type() == at::kLong;
    p.generation_s = generation.stride(0);
    p.generation_k = generation.stride(1);
    const bool has_coef = coef.has_value();
    if (has_coef) {
      p.coef = static_cast<const float*>(coef->const_data_ptr());
      p.coef_s = coef->stride(0);
      p.coef_k = coef->stride(1);
      p.coef_j = coef->stride(2);
    }
    if (has_coef && delta.has_value()) {  // coef None: plain reuse, the prior terms are not read
      p.delta = static_cast<const Raw*>(delta->const_data_ptr());
      p.delta_s = delta->stride(0);
      p.delta_k = delta->stride(1);
      p.delta_h = delta->stride(2);
      p.delta_n = delta->stride(3);
      p.delta_c = delta->stride(4);
      p.delta_rows_per_head = batch / delta->size(2);
      read.push_back(&*delta);
    }
    if (has_coef && trend.has_value()) {
      p.trend = static_cast<const Raw*>(trend->const_data_ptr());
      p.trend_s = trend->stride(0);
      p.trend_k = trend->stride(1);
      p.trend_h = trend->stride(2);
      p.trend_n = trend->stride(3);
      p.trend_c = trend->stride(4);
      p.trend_rows_per_head = batch / trend->size(2);
      read.push_back(&*trend);
    }
    p.blocks = blocks;
    p.rows = batch * tokens;
    p.tokens = tokens;
    p.channels = channels;
    p.threshold = threshold;
    p.threshold_tensor = device_threshold;
    const bool has_terms = has_coef && (delta.has_value() || trend.has_value() || generations == 2);
    const bool judge = has_terms && (device_threshold != nullptr || threshold_value > 0.0);
    const Geometry g = geometry(op, p.rows, channels);
    with_variant(vectorized<Ty>(op, channels, read), judge, [&]<bool VECTORIZED, bool JUDGE>() {
      launch_segment<Ty, VECTORIZED, JUDGE>(p, g, stream);
    });
  });
}

}  // namespace eoc_cuda

TORCH_LIBRARY_IMPL(eoc, CUDA, m) {
  m.impl("cached_branch_out", &eoc_cuda::cached_branch_out);
  m.impl("cached_block_out", &eoc_cuda::cached_block_out);
  m.impl("cached_segment_out", &eoc_cuda::cached_segment_out);
}
