// CUDA kernels of the EOC ops (docs/DESIGN.md §3), built into eoc_kernels._C by a build against a CUDA torch.
//
// Eager equivalent: eoc_kernels/reference.py (cached_branch, cached_block, cached_segment), the ground truth
// of every test. Per reused entry (a branch of a block), with the history C_0 (cache), C_1 .. C_3:
//
//     corr = ((((0 + α·D) + β₁·(C₀ − C₁)) + γ·(C₀ ⊙ E)) + β₂·(C₁ − C₂)) + β₃·(C₂ − C₃)
//                          (a term only when its tensors are given and its coefficient is nonzero: otherwise
//                           its tensors are never read; coef (α, β₁, γ[, β₂[, β₃]]) has length P in 3..5)
//     keep = ||corr|| / (||C₀|| + 1e-6) > threshold, or threshold <= 0   (per token; NaN -> false)
//     F̂ = C₀ + (keep ? corr : 0)
//     out = x + Σ_entries gate ⊙ F̂                    (entries in order, fp32, one rounding at the end)
//
// cached_segment's cache is a ring of G in 1..4 generations: C_j of entry (s, k) is generation
// (generation[s, k] − j) mod G, and β_i applies only for i <= K = min(G − 1, P − 2).
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
// element of the entry can be added, so per entry a thread computes C₀ and corr of its 8 elements into
// registers, the row's two partial sums are reduced (warp butterfly shuffles, then, when a row spans
// several warps, one float2 per warp in shared memory and one __syncthreads), every thread of the row
// sums the same values in the same order (so the decision is uniform), and then adds gate ⊙ F̂ from the
// registers. Every input is read once and the output written once; nothing is re-read. The alternative,
// re-reading the entry's rows after the reduction, would need no Cc / corr registers but doubles the
// load instructions and, at 1152 · 2 B · 4 operands per row and dozens of resident rows per SM, would
// not stay in L1. Without judgment (no term, or a float threshold <= 0: JUDGE = false) there is no
// reduction and no C₀ / corr arrays: acc += gate ⊙ (C₀ + corr) directly.
//
// History terms (β₂, β₃). α, β₁ and γ read one operand row each into 8 fp32 registers. β₂ and β₃ need two
// history rows at once, which as whole fp32 rows beside acc, C₀ and corr did not fit the vector path's 64
// registers (ptxas spilled in every vector variant), so they go slot by slot, each loaded slot kept packed as its
// 16 bytes and unpacked element by element where used (load_slot / slot_element: 4 registers per slot
// whatever the dtype); C_1 is loaded there a second time when β₁ read it already (the same thread's 16 bytes a
// few instructions later, an L1 hit unless evicted: not measured). Even so the segment kernel had no registers
// to spare, so the vector path has HISTORY variants: HISTORY = false (K <= 1: every P = 3 call, and any call
// whose β₂ / β₃ are zero floats or absent) is the kernel without those terms, at 64 registers; HISTORY = true
// compiles them in, under __launch_bounds__(768) and 80 registers, hence C <= 6144 for calls that apply β₂ or
// β₃ (wider rows raise, naming backend='triton' or 'torch'). The scalar path (128 registers) always has them.
//
// The registers do not depend on C (the kernels are templated over dtype, vector path, JUDGE and HISTORY
// only): acc, C₀ and corr are 3 × 8 fp32 per thread whatever the width; C only changes threads_per_row.
//
// Loads: the vector path (VECTORIZED: every operand row is contiguous, its start 16-byte aligned, C a
// multiple of kVec) reads each slot with one 128-bit load (LDG.E.128) and writes with one 128-bit store;
// otherwise (any stride over C, odd C, misaligned views such as the DiT's gate matrix) the scalar path
// reads element by element with the operand's column stride. Offsets are int64.
//
// Occupancy. Register budgets are explicit: the vector path is compiled with __launch_bounds__(1024) and
// __maxnreg__(64), so every block the launcher picks (up to 1024 threads at C = 8192) can launch; the
// scalar path needs more (8 strided loads per operand, each with its own 64-bit address: ptxas spilled at
// 64) and gets __launch_bounds__(512) and 128 registers, hence C <= 4096 there; the vector path's HISTORY
// variants get __launch_bounds__(768) and 80 registers (C <= 6144). Measured
// (benchmarks/results/nvcc-compile-2026-12-01-k-history.md, `python benchmarks/gpu/nvcc_compile.py`, nvcc 13.0):
// vector path 56-64 registers, its HISTORY variants 62-79, scalar path 76-123, no spill, 512 B of static shared
// memory (the per-warp partial sums). An SM of sm_80 / sm_90 has 65536 registers, 64 warps and 32 blocks: at 64
// registers it holds 32 warps (50%), at 56 36 warps, at 80 (the HISTORY segment variants, 72-79) 25; C = 1152
// (5-warp blocks) gives 6 or 7 resident blocks (5 at 80), C = 4096 (16 warps) 2 (1 at 80), C = 256 (8 rows of
// one warp per block) 4. Why 256 threads per block as the target: rows of at most 256
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
#include <type_traits>
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
constexpr int kVectorHistoryMaxThreads = 768;
constexpr int kScalarMaxThreads = 512;
constexpr int kMaxChannels = kElems * kVectorMaxThreads;  // 8192
constexpr int kHistoryMaxChannels = kElems * kVectorHistoryMaxThreads;
constexpr int kScalarMaxChannels = kElems * kScalarMaxThreads;  // 4096

constexpr int kRegistersPerSm = 65536;  // 32-bit registers per SM, sm_80 and sm_90

// HISTORY: the variant applies beta_2 / beta_3 (the scalar path always can: it has the registers).
template <bool VECTORIZED, bool HISTORY>
constexpr int max_threads() {
  return VECTORIZED ? (HISTORY ? kVectorHistoryMaxThreads : kVectorMaxThreads) : kScalarMaxThreads;
}

// The register budget: the most a thread of the largest block may use (64 / 128), rounded down to the
// allocation unit of 8. Given explicitly (__maxnreg__), since with __launch_bounds__(512) alone ptxas still kept
// the scalar cached_branch fp32 variants at 64 registers and spilled 16-20 bytes.
template <bool VECTORIZED, bool HISTORY>
constexpr int max_registers() {
  return kRegistersPerSm / max_threads<VECTORIZED, HISTORY>() / 8 * 8;
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

// One slot (16 bytes: kVec elements) of an operand row as loaded: the vector path's 128-bit word, or the scalar
// path's kVec elements packed the same way (0 where out of range). It is unpacked element by element where it
// is used (slot_element), so a slot held while other slots load costs 4 registers whatever the dtype: how the
// correction terms fit the vector path's 64 registers with two history rows live at once (beta_2, beta_3).
template <class Ty, bool VECTORIZED>
__device__ __forceinline__ uint4 load_slot(const typename Ty::Raw* __restrict__ row, int64_t stride_c,
                                           const Slots<Ty>& s, int j) {
  if constexpr (VECTORIZED) {
    return s.count[j] > 0 ? *reinterpret_cast<const uint4*>(row + s.col[j]) : make_uint4(0u, 0u, 0u, 0u);
  } else {
    uint32_t words[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      if constexpr (Ty::kVec == 4) {
        words[w] = w < s.count[j] ? static_cast<uint32_t>(row[static_cast<int64_t>(s.col[j] + w) * stride_c]) : 0u;
      } else {
        const int lo = 2 * w, hi = 2 * w + 1;
        const uint32_t low = lo < s.count[j] ? row[static_cast<int64_t>(s.col[j] + lo) * stride_c] : 0u;
        const uint32_t high = hi < s.count[j] ? row[static_cast<int64_t>(s.col[j] + hi) * stride_c] : 0u;
        words[w] = low | (high << 16);
      }
    }
    return make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// Element i (0..kVec-1, a compile-time index after unrolling) of a loaded slot, as fp32 (exact).
template <class Ty>
__device__ __forceinline__ float slot_element(const uint4& w, int i) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  if constexpr (Ty::kVec == 4) {
    return Ty::to_float(words[i]);
  } else {
    const uint32_t word = words[i / 2];
    return Ty::to_float(static_cast<uint16_t>(i % 2 == 0 ? word & 0xffffu : word >> 16));
  }
}

// --- one entry of a row -----------------------------------------------------------------------------

// What one entry reads for the current row: row pointers (already offset to (b, n) and the entry), column
// strides, coefficients and which terms are applied. cache is C_0, hist[j - 1] is C_j (j = 1..3); beta[i - 1]
// is beta_i. use_*: tensors given and coefficient nonzero (uniform over the block, so skipping a term's loads
// is a uniform branch); beta_i reads C_{i-1} and C_i.
template <class Ty, class History>
struct EntryRows {
  using Raw = typename Ty::Raw;
  const Raw* gate;
  const Raw* cache;
  History hist;  // C_1..C_3: hist.row(j - 1), hist.stride(j - 1)
  const Raw* delta;
  const Raw* trend;
  int64_t gate_c, cache_c, delta_c, trend_c;
  float alpha, gamma, beta[3];
  bool use_delta, use_trend, use_beta[3];
};

// The history rows of a branch of cached_branch / cached_block: three tensors' rows.
template <class Ty>
struct HistoryRows {
  const typename Ty::Raw* rows[3];
  int64_t stride_c[3];
  __device__ __forceinline__ const typename Ty::Raw* row(int i) const { return rows[i]; }
  __device__ __forceinline__ int64_t stride(int i) const { return stride_c[i]; }
};

// The history rows of a cached_segment entry: the same row of the entry in other generations of the ring,
// base + generation · step, the generation of C_{i+1} in bits 2i..2i+1 of `generations`. One pointer instead of
// three live through the entry (the judged fp16 / bf16 vector variants spilled 8 bytes with three).
template <class Ty>
struct RingRows {
  const typename Ty::Raw* base;  // the entry's row in generation 0
  int64_t step, stride_c;
  uint32_t generations;
  __device__ __forceinline__ const typename Ty::Raw* row(int i) const {
    return base + static_cast<int64_t>((generations >> (2 * i)) & 3u) * step;
  }
  __device__ __forceinline__ int64_t stride(int) const { return stride_c; }
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
template <class Ty, bool VECTORIZED, bool JUDGE, bool HISTORY, class History>
__device__ __forceinline__ void add_entry(float (&acc)[kElems], const EntryRows<Ty, History>& e, const Slots<Ty>& s,
                                          float threshold, bool threshold_is_tensor, float2 (*red)[kMaxWarps],
                                          int parity) {
  float cached[kElems];
  float corr[kElems];
  load_row<Ty, VECTORIZED>(e.cache, e.cache_c, s, cached);
#pragma unroll
  for (int i = 0; i < kElems; ++i) corr[i] = 0.0f;
  // Terms in the reference's order: alpha·D, beta_1·(C_0 − C_1), gamma·(C_0 ⊙ E), beta_2·(C_1 − C_2),
  // beta_3·(C_2 − C_3). The first three read one operand row each, into `term`.
  float term[kElems];
  if (e.use_delta) {
    load_row<Ty, VECTORIZED>(e.delta, e.delta_c, s, term);
#pragma unroll
    for (int i = 0; i < kElems; ++i) corr[i] = corr[i] + e.alpha * term[i];
  }
  if (e.use_beta[0]) {
    load_row<Ty, VECTORIZED>(e.hist.row(0), e.hist.stride(0), s, term);  // C_1
#pragma unroll
    for (int i = 0; i < kElems; ++i) corr[i] = corr[i] + e.beta[0] * (cached[i] - term[i]);
  }
  if (e.use_trend) {
    load_row<Ty, VECTORIZED>(e.trend, e.trend_c, s, term);
#pragma unroll
    for (int i = 0; i < kElems; ++i) corr[i] = corr[i] + e.gamma * (cached[i] * term[i]);
  }
  // beta_2 and beta_3 need two history rows at once: held as whole fp32 rows with acc, C_0 and corr they would
  // not fit the vector path's 64 registers (ptxas spilled), so they go slot by slot, each slot kept packed
  // (load_slot: 4 registers). C_1 is loaded here again when beta_1 read it above, rather than kept across the
  // trend term: the same thread's 16 bytes a few instructions later (an L1 hit unless evicted; not measured).
  if (HISTORY && (e.use_beta[1] || e.use_beta[2])) {
#pragma unroll
    for (int j = 0; j < Slots<Ty>::kSlots; ++j) {
      float* cr = corr + j * Ty::kVec;
      uint4 older = make_uint4(0u, 0u, 0u, 0u);
      if (e.use_beta[1]) older = load_slot<Ty, VECTORIZED>(e.hist.row(0), e.hist.stride(0), s, j);  // C_1
      const uint4 newer = load_slot<Ty, VECTORIZED>(e.hist.row(1), e.hist.stride(1), s, j);          // C_2
      if (e.use_beta[1]) {
#pragma unroll
        for (int i = 0; i < Ty::kVec; ++i) {
          cr[i] = cr[i] + e.beta[1] * (slot_element<Ty>(older, i) - slot_element<Ty>(newer, i));
        }
      }
      if (e.use_beta[2]) {
        older = load_slot<Ty, VECTORIZED>(e.hist.row(2), e.hist.stride(2), s, j);  // C_3
#pragma unroll
        for (int i = 0; i < Ty::kVec; ++i) {
          cr[i] = cr[i] + e.beta[2] * (slot_element<Ty>(newer, i) - slot_element<Ty>(older, i));
        }
      }
    }
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

// A [B or H, N, C] operand: row (b, n) starts at data + (b / rows_per_head) · stride_b + n · stride_n. row():
// an operand of B rows (x, gate, cache, the history: rows_per_head is 1, the checks enforce it), without the
// 64-bit division; head_row(): delta and trend, H rows.
template <class Ty>
struct Rows {
  const typename Ty::Raw* data = nullptr;
  int64_t stride_b = 0, stride_n = 0, stride_c = 1, rows_per_head = 1;
  __device__ const typename Ty::Raw* row(int64_t b, int64_t n) const { return data + b * stride_b + n * stride_n; }
  __device__ const typename Ty::Raw* head_row(int64_t b, int64_t n) const {
    return data + (b / rows_per_head) * stride_b + n * stride_n;
  }
};

template <class Ty>
struct OutRows {
  typename Ty::Raw* data = nullptr;
  int64_t stride_b = 0, stride_n = 0, stride_c = 1;
};

// A branch of cached_branch / cached_block. coef: a float32 [P] device tensor (values read by the kernel) or
// null (alpha, gamma, beta hold the values). cache is C_0, hist[j - 1] is C_j. has_*: the term's tensors are
// given and, for float coefficients, its coefficient is nonzero (for a tensor: P holds it); the kernel reads a
// tensor coefficient only where has_* is set.
template <class Ty>
struct Branch {
  Rows<Ty> gate, cache, delta, trend;
  Rows<Ty> hist[3];
  float alpha = 0.0f, gamma = 0.0f, beta[3] = {0.0f, 0.0f, 0.0f};
  const float* coef = nullptr;
  int64_t coef_stride = 0;
  bool has_delta = false, has_trend = false, has_beta[3] = {false, false, false};
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
  int generations = 1;               // G, the ring's generations: C_j of an entry is (generation - j) mod G
  int history = 0;                   // K = min(G - 1, P - 2): the history terms beta_1..beta_K an entry may apply
  const void* generation = nullptr;  // int32 or int64 [S, 2], read only when generations > 1
  bool generation_is_64 = false;
  int64_t generation_s = 0, generation_k = 0;
  const Raw* delta = nullptr;  // [S, 2, H, N, C] or null
  int64_t delta_s = 0, delta_k = 0, delta_h = 0, delta_n = 0, delta_c = 1, delta_rows_per_head = 1;
  const Raw* trend = nullptr;
  int64_t trend_s = 0, trend_k = 0, trend_h = 0, trend_n = 0, trend_c = 1, trend_rows_per_head = 1;
  const float* coef = nullptr;  // float32 [S, 2, P] or null: plain reuse
  int64_t coef_s = 0, coef_k = 0, coef_j = 0;
  int blocks = 0;  // S (2 S < 2^31: checked by the launcher)
  int64_t rows = 0, tokens = 1, channels = 0;
  float threshold = 0.0f;
  const float* threshold_tensor = nullptr;
};

// --- kernels -----------------------------------------------------------------------------------------

// cached_branch (one branch) and cached_block (two): out = x + Σ_branches gate ⊙ F̂.
template <class Ty, bool VECTORIZED, bool JUDGE, bool HISTORY>
__global__ void __launch_bounds__((max_threads<VECTORIZED, HISTORY>()))
__maxnreg__((max_registers<VECTORIZED, HISTORY>()))
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
    EntryRows<Ty, HistoryRows<Ty>> e;
    e.alpha = br.alpha;
    e.gamma = br.gamma;
#pragma unroll
    for (int i = 0; i < 3; ++i) e.beta[i] = br.beta[i];
    if (br.coef != nullptr) {  // tensor coefficients (alpha, beta_1, gamma, beta_2, beta_3): a zero skips its loads
      if (br.has_delta) e.alpha = br.coef[0];
      if (br.has_beta[0]) e.beta[0] = br.coef[br.coef_stride];
      if (br.has_trend) e.gamma = br.coef[2 * br.coef_stride];
      if (br.has_beta[1]) e.beta[1] = br.coef[3 * br.coef_stride];
      if (br.has_beta[2]) e.beta[2] = br.coef[4 * br.coef_stride];
    }
    e.use_delta = br.has_delta && (br.coef == nullptr || e.alpha != 0.0f);
    e.use_trend = br.has_trend && (br.coef == nullptr || e.gamma != 0.0f);
#pragma unroll
    for (int i = 0; i < 3; ++i) e.use_beta[i] = br.has_beta[i] && (br.coef == nullptr || e.beta[i] != 0.0f);
    e.gate = br.gate.row(b, 0);
    e.cache = br.cache.row(b, n);
    e.delta = br.delta.head_row(b, n);
    e.trend = br.trend.head_row(b, n);
    e.gate_c = br.gate.stride_c;
    e.cache_c = br.cache.stride_c;
    e.delta_c = br.delta.stride_c;
    e.trend_c = br.trend.stride_c;
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      e.hist.rows[j] = br.hist[j].row(b, n);
      e.hist.stride_c[j] = br.hist[j].stride_c;
    }
    add_entry<Ty, VECTORIZED, JUDGE, HISTORY>(acc, e, s, threshold, p.threshold_tensor != nullptr, red, k);
  }
  if (row_valid) {
    store_row<Ty, VECTORIZED>(p.out.data + b * p.out.stride_b + n * p.out.stride_n, p.out.stride_c, s, acc);
  }
}

// cached_segment: out = x + Σ_{s,k} gates[:, s, k] ⊙ F̂_{s,k}, entries in the order (0, attn), (0, mlp), ...
template <class Ty, bool VECTORIZED, bool JUDGE, bool HISTORY>
__global__ void __launch_bounds__((max_threads<VECTORIZED, HISTORY>()))
__maxnreg__((max_registers<VECTORIZED, HISTORY>()))
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
  for (int entry = 0; entry < 2 * p.blocks; ++entry) {  // 32-bit: fewer registers than int64 (2 S < 2^31)
    const int blk = entry >> 1, k = entry & 1;
    int g = 0;
    if (p.generations > 1) {  // generation[s, k] holds C_0; clamped into 0..G-1
      const int64_t offset = blk * p.generation_s + k * p.generation_k;
      const int64_t value = p.generation_is_64 ? static_cast<const int64_t*>(p.generation)[offset]
                                               : static_cast<int64_t>(static_cast<const int32_t*>(p.generation)[offset]);
      g = value < 0 ? 0 : (value >= p.generations ? p.generations - 1 : static_cast<int>(value));
    }
    const int64_t cache_entry = blk * p.cache_s + k * p.cache_k + cache_row;
    // The history rows: the packed ring where beta_2 / beta_3 may apply, else one pointer to C_1 (as the
    // two-generation kernel had: the HISTORY = false variants' registers, 4 bytes spilled with the ring on sm_80).
    EntryRows<Ty, std::conditional_t<HISTORY, RingRows<Ty>, HistoryRows<Ty>>> e;
    e.alpha = e.gamma = 0.0f;
    e.beta[0] = e.beta[1] = e.beta[2] = 0.0f;
    if (p.coef != nullptr) {  // (alpha, beta_1, gamma[, beta_2[, beta_3]]): only the betas the ring and P allow
      const float* c = p.coef + blk * p.coef_s + k * p.coef_k;
      e.alpha = c[0];
      e.gamma = c[2 * p.coef_j];
      if (p.history >= 1) e.beta[0] = c[p.coef_j];
      if (p.history >= 2) e.beta[1] = c[3 * p.coef_j];
      if (p.history >= 3) e.beta[2] = c[4 * p.coef_j];
    }
    // coef null: plain reuse, only C_0 and the gate are read (every beta is 0 then).
    e.use_delta = p.coef != nullptr && p.delta != nullptr && e.alpha != 0.0f;
    e.use_trend = p.coef != nullptr && p.trend != nullptr && e.gamma != 0.0f;
#pragma unroll
    for (int i = 0; i < 3; ++i) e.use_beta[i] = e.beta[i] != 0.0f;
    e.gate = p.gates + gate_row + blk * p.gate_s + k * p.gate_k;
    e.cache = p.cache + g * p.cache_g + cache_entry;
    // C_j (j = 1..3) is generation (g - j) mod G (read only where a beta_i with i in {j, j + 1} applies, so
    // j <= K <= G - 1); operands not read point at C_0: no arithmetic on a null pointer (which would let the
    // compiler assume the pointer non-null).
    if constexpr (HISTORY) {
      e.hist.base = p.cache + cache_entry;
      e.hist.step = p.cache_g;
      e.hist.stride_c = p.cache_c;
      e.hist.generations = 0;
#pragma unroll
      for (int j = 1; j <= 3; ++j) {
        const int gj = g - j;
        e.hist.generations |= (static_cast<uint32_t>(gj < 0 ? gj + p.generations : gj) & 3u) << (2 * (j - 1));
      }
    } else {  // K <= 1: C_1 only
      const int g1 = g == 0 ? p.generations - 1 : g - 1;
      e.hist.rows[0] = e.use_beta[0] ? p.cache + g1 * p.cache_g + cache_entry : e.cache;
      e.hist.rows[1] = e.hist.rows[2] = e.cache;
#pragma unroll
      for (int j = 0; j < 3; ++j) e.hist.stride_c[j] = p.cache_c;
    }
    e.delta = e.use_delta ? p.delta + blk * p.delta_s + k * p.delta_k + delta_row : e.cache;
    e.trend = e.use_trend ? p.trend + blk * p.trend_s + k * p.trend_k + trend_row : e.cache;
    e.gate_c = p.gate_c;
    e.cache_c = p.cache_c;
    e.delta_c = p.delta_c;
    e.trend_c = p.trend_c;
    add_entry<Ty, VECTORIZED, JUDGE, HISTORY>(acc, e, s, threshold, p.threshold_tensor != nullptr, red,
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

template <class Ty, bool VECTORIZED, bool JUDGE, bool HISTORY>
void launch_branches(const BranchParams<Ty>& p, const Geometry& g, cudaStream_t stream) {
  cached_branches_kernel<Ty, VECTORIZED, JUDGE, HISTORY><<<g.grid, g.block, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class Ty, bool VECTORIZED, bool JUDGE, bool HISTORY>
void launch_segment(const SegmentParams<Ty>& p, const Geometry& g, cudaStream_t stream) {
  cached_segment_kernel<Ty, VECTORIZED, JUDGE, HISTORY><<<g.grid, g.block, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls fn.template operator()<VECTORIZED, JUDGE, HISTORY>() with the run-time flags as template arguments.
// HISTORY (some beta_2 / beta_3 may apply) selects a variant of the vector path only: the scalar path always
// compiles the history terms in (its 128-register budget holds them).
template <class Fn>
void with_variant(bool vectorized, bool judge, bool history, Fn&& fn) {
  if (vectorized) {
    if (history) {
      judge ? fn.template operator()<true, true, true>() : fn.template operator()<true, false, true>();
    } else {
      judge ? fn.template operator()<true, true, false>() : fn.template operator()<true, false, false>();
    }
  } else {
    judge ? fn.template operator()<false, true, true>() : fn.template operator()<false, false, true>();
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

// Coefficient slots of a branch (the schema's order): alpha, beta_1, gamma, beta_2, beta_3.
constexpr int kCoefs = static_cast<int>(eoc_checks::kMaxCoefs);
constexpr int kBetaSlot[3] = {1, 3, 4};  // beta_i's slot, i = 1..3

// (alpha, beta_1, gamma, beta_2, beta_3) as floats with "nonzero" flags, or a float32 [P] device tensor read by
// the kernel (then a slot is flagged when P holds it: the kernel skips a term whose value is zero).
struct Coef {
  float values[kCoefs] = {};
  bool nonzero[kCoefs] = {};
  const float* tensor = nullptr;
  int64_t stride = 0;
};

// Branch `branch`'s coefficients from coef_values (kCoefs floats per branch, already size-checked), or its tensor.
Coef coef_of(const char* op, const char* name, c10::ArrayRef<double> values, size_t branch, const OptTensor& tensor,
             const Tensor& x) {
  Coef coef;
  if (tensor.has_value()) {
    const int64_t length = eoc_checks::coef_length(op, name, *tensor);
    coef.tensor = device_floats(op, name, *tensor, x, length);
    coef.stride = tensor->stride(0);
    for (int64_t j = 0; j < length; ++j) coef.nonzero[j] = true;
    return coef;
  }
  for (int j = 0; j < kCoefs; ++j) {
    const double value = values[branch * kCoefs + j];
    coef.values[j] = static_cast<float>(value);
    coef.nonzero[j] = value != 0.0;  // as the reference's `c != 0` on the Python number
  }
  return coef;
}

// The branch's descriptor; the tensors it reads are appended to `read` (for the vector-path test). beta_i applies
// when C_{i-1} and C_i are given (C_0, the cache, always is); a history tensor no applied term needs is not read.
template <class Ty>
Branch<Ty> branch_of(const eoc_checks::BranchTensors& t, const Coef& coef, int64_t batch,
                     std::vector<const Tensor*>& read) {
  Branch<Ty> br;
  br.gate = gate_rows_of<Ty>(t.gate);
  br.cache = rows_of<Ty>(t.cache, batch);
  br.delta = br.trend = br.hist[0] = br.hist[1] = br.hist[2] = br.cache;  // stand-ins: never read unless has_*
  read.push_back(&t.gate);
  read.push_back(&t.cache);
  br.alpha = coef.values[0];
  br.gamma = coef.values[2];
  for (int i = 0; i < 3; ++i) br.beta[i] = coef.values[kBetaSlot[i]];
  br.coef = coef.tensor;
  br.coef_stride = coef.stride;
  if (t.delta.has_value() && coef.nonzero[0]) {
    br.delta = rows_of<Ty>(*t.delta, batch);
    br.has_delta = true;
    read.push_back(&*t.delta);
  }
  if (t.trend.has_value() && coef.nonzero[2]) {
    br.trend = rows_of<Ty>(*t.trend, batch);
    br.has_trend = true;
    read.push_back(&*t.trend);
  }
  const OptTensor* history[3] = {&t.prev, &t.prev2, &t.prev3};
  for (int i = 1; i <= 3; ++i) {
    const bool given = history[i - 1]->has_value() && (i == 1 || history[i - 2]->has_value());
    br.has_beta[i - 1] = given && coef.nonzero[kBetaSlot[i - 1]];
  }
  for (int j = 1; j <= 3; ++j) {  // C_j is read by beta_j and beta_{j+1}
    if (br.has_beta[j - 1] || (j < 3 && br.has_beta[j])) {
      br.hist[j - 1] = rows_of<Ty>(**history[j - 1], batch);
      read.push_back(&**history[j - 1]);
    }
  }
  return br;
}

// Whether the 128-bit path serves every tensor read or written (else the scalar path, C <= 4096). history: the
// launch may apply beta_2 / beta_3 (the vector path's HISTORY variants, C <= kHistoryMaxChannels).
template <class Ty>
bool vectorized(const char* op, int64_t channels, const std::vector<const Tensor*>& tensors, bool history) {
  bool ok = channels % Ty::kVec == 0;
  for (const Tensor* t : tensors) ok = ok && (t->numel() == 0 || vector_ready(*t, Ty::kVec));
  TORCH_CHECK(ok || channels <= kScalarMaxChannels, op, ": the cuda backend reads rows of C > ",
              kScalarMaxChannels, " only with 128-bit loads (every operand contiguous over C, 16-byte aligned rows, C "
              "a multiple of ", Ty::kVec, "), got C = ", channels, " with strided or misaligned operands; use "
              "backend='triton' or 'torch'");
  TORCH_CHECK(!history || channels <= kHistoryMaxChannels, op, ": the cuda backend applies beta_2 / beta_3 (coef "
              "of length 4 or 5 with their history) to rows of C <= ", kHistoryMaxChannels, ", got C = ", channels,
              "; use backend='triton' or 'torch'");
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
  eoc_checks::BranchTensors tensors;
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
    bool history = false;  // some beta_2 / beta_3 may apply: the HISTORY variants
    for (size_t k = 0; k < branches.size(); ++k) {
      const BranchArgs& a = branches[k];
      p.branch[k] = branch_of<Ty>(a.tensors, a.coef, batch, read);
      const Branch<Ty>& br = p.branch[k];
      has_terms = has_terms || br.has_delta || br.has_trend || br.has_beta[0] || br.has_beta[1] || br.has_beta[2];
      history = history || br.has_beta[1] || br.has_beta[2];
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
    with_variant(vectorized<Ty>(op, channels, read, history), judge, history,
                 [&]<bool VECTORIZED, bool JUDGE, bool HISTORY>() {
                   launch_branches<Ty, VECTORIZED, JUDGE, HISTORY>(p, g, stream);
                 });
  });
}

void cached_branch_out(const Tensor& x, const Tensor& gate, const Tensor& cache, const OptTensor& prev,
                       const OptTensor& prev2, const OptTensor& prev3, const OptTensor& delta,
                       const OptTensor& trend, c10::ArrayRef<double> coef_values, const OptTensor& coef_tensor,
                       double threshold_value, const OptTensor& threshold_tensor, Tensor& out) {
  constexpr const char* op = "eoc::cached_branch_out";
  check_x_out(op, x, out);
  const eoc_checks::BranchTensors branch{gate, cache, prev, prev2, prev3, delta, trend};
  check_branch(op, x, "", branch);
  eoc_checks::check_coef_values(op, coef_values, 1);
  const Coef coef = coef_of(op, "coef_tensor", coef_values, 0, coef_tensor, x);
  run_branches(op, x, {BranchArgs{branch, coef}}, threshold_value, threshold_tensor, out);
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
  const Coef attn = coef_of(op, "coef_tensor_attn", coef_values, 0, coef_tensor_attn, x);
  const Coef mlp = coef_of(op, "coef_tensor_mlp", coef_values, 1, coef_tensor_mlp, x);
  run_branches(op, x, {BranchArgs{attn_branch, attn}, BranchArgs{mlp_branch, mlp}}, threshold_value,
               threshold_tensor, out);
}

void cached_segment_out(const Tensor& x, const Tensor& gates, const Tensor& cache, const Tensor& generation,
                        const OptTensor& delta, const OptTensor& trend, const OptTensor& coef,
                        double threshold_value, const OptTensor& threshold_tensor, Tensor& out) {
  constexpr const char* op = "eoc::cached_segment_out";
  check_x_out(op, x, out);
  check_segment(op, x, gates, cache, generation, delta, trend, coef);
  const int64_t generations = cache.size(0), blocks = cache.size(1);
  const int64_t batch = x.size(0), tokens = x.size(1), channels = x.size(2);
  const int64_t coef_length = coef.has_value() ? coef->size(2) : 0;  // P
  if (coef.has_value()) device_floats(op, "coef", *coef, x, blocks * 2 * coef_length);
  const float* device_threshold = nullptr;
  const float threshold = threshold_float(op, threshold_value, threshold_tensor, x, &device_threshold);
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_dtype(x, [&]<class Ty>() {
    using Raw = typename Ty::Raw;
    const bool has_coef = coef.has_value();
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
    // K: history terms beta_1..beta_K the ring (C_0..C_{G-1}) and P - 2 betas allow.
    p.history = has_coef ? static_cast<int>(std::min(generations - 1, coef_length - 2)) : 0;
    p.generation = generation.const_data_ptr();
    p.generation_is_64 = generation.scalar_type() == at::kLong;
    p.generation_s = generation.stride(0);
    p.generation_k = generation.stride(1);
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
    TORCH_CHECK(blocks <= 0x3fffffff, op, ": too many blocks for one launch: S = ", blocks);
    p.blocks = static_cast<int>(blocks);
    p.rows = batch * tokens;
    p.tokens = tokens;
    p.channels = channels;
    p.threshold = threshold;
    p.threshold_tensor = device_threshold;
    const bool has_terms = has_coef && (delta.has_value() || trend.has_value() || p.history > 0);
    const bool judge = has_terms && (device_threshold != nullptr || threshold_value > 0.0);
    const Geometry g = geometry(op, p.rows, channels);
    const bool history = p.history >= 2;
    with_variant(vectorized<Ty>(op, channels, read, history), judge, history,
                 [&]<bool VECTORIZED, bool JUDGE, bool HISTORY>() {
                   launch_segment<Ty, VECTORIZED, JUDGE, HISTORY>(p, g, stream);
                 });
  });
}

}  // namespace eoc_cuda

TORCH_LIBRARY_IMPL(eoc, CUDA, m) {
  m.impl("cached_branch_out", &eoc_cuda::cached_branch_out);
  m.impl("cached_block_out", &eoc_cuda::cached_block_out);
  m.impl("cached_segment_out", &eoc_cuda::cached_segment_out);
}
