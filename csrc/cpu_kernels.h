// The CPU kernel of the EOC ops, included by cpu_ops.cpp once per instruction set.
//
// This file deliberately has no include guard and no #include: cpu_ops.cpp includes every header
// first and then this body inside `namespace eoc_cpu::<isa>`, under `#pragma GCC target(...)` for the
// wider instruction sets, so the same plain loops are auto-vectorised (-O3) for SSE2 (the x86-64
// baseline), AVX2 + FMA and AVX-512, and the widest variant the CPU supports is picked at run time
// (cpu_ops.cpp, `run`).
//
// Semantics: eoc_kernels/reference.py (the ground truth), per reused entry (a branch of a block):
//
//     corr = α·D + β₁·(C₀ − C₁) + γ·(C₀ ⊙ E) + β₂·(C₁ − C₂) + β₃·(C₂ − C₃)
//                          (accumulated in that order; a term only when its tensors are given and its
//                           coefficient is nonzero: otherwise its tensors are never read)
//     keep = ||corr|| / (||C₀|| + 1e-6) > threshold, or threshold <= 0   (per token, NaN -> false)
//     F̂ = C₀ + (keep ? corr : 0)
//     out = x + Σ_entries gate ⊙ F̂               (in the entries' order, fp32, one rounding at the end)
//
// Blocking: a thread owns a run of token rows (b, n) and walks it in tiles of at most TILE rows of one
// batch row b, whose fp32 accumulators (TILE · C floats, about 64 KiB) stay in L2. For a tile it
// loads x once; then, entry by entry, it reads that entry's rows of every operand once (a few long
// sequential streams at a time, which the hardware prefetchers follow), taking runs of up to four
// consecutive plain-reuse entries in one pass over each row (add_plain_group: the running sum stays in
// a register instead of going to the L2-resident tile and back per entry);
// finally it rounds and writes the output once. The gate rows of b are converted to fp32 once per thread and b. The per-token
// norms need the whole row before the judgment: with threshold > 0 the first pass over a row keeps C₀
// and F̂ in two per-thread fp32 row buffers and the second adds gate ⊙ (C₀ or F̂) from them; with
// threshold <= 0 every token keeps its correction and one pass suffices.
//
// Measured on the project's CPU (AMD EPYC, AVX-512): this entry-by-entry order with plain loops beat
// both a register-accumulator version (all entries per 16-channel chunk: dozens of interleaved
// streams, and per-chunk bookkeeping) and GCC's generic vector types.

// Independent partial sums of the squared norms: lanes the compiler maps to SIMD registers (no
// reassociation of one serial sum is needed, so no -ffast-math).
constexpr int64_t kNormLanes = 16;
// Most consecutive plain-reuse entries one pass over a row takes (add_plain_group).
constexpr int kEntryGroup = 4;
// Target fp32 accumulator values per tile (TILE = max(1, kTileFloats / C) rows): 64 KiB, in L2. Longer
// runs per operand than a 16 KiB tile: measured up to 1.3x faster at N = 256, C = 384, S = 12 (24 entries);
// software prefetching of the next tile's rows measured no gain.
constexpr int64_t kTileFloats = 16384;

inline float to_float(float value) { return value; }
inline float to_float(c10::Half value) { return static_cast<float>(value); }
inline float to_float(c10::BFloat16 value) { return static_cast<float>(value); }

// The terms' coefficients in the order they are accumulated (Entry::coef's slots).
struct TermCoefs {
  float alpha, beta1, gamma, beta2, beta3;
};

// The correction of one element, in the reference's order
// ((((0 + α·D) + β₁·(C₀ − C₁)) + γ·(C₀·E)) + β₂·(C₁ − C₂)) + β₃·(C₂ − C₃), each term only where FLAGS has it.
template <int FLAGS, typename S>
inline float correction(float cached, const S* __restrict h1, const S* __restrict h2, const S* __restrict h3,
                        const S* __restrict delta, const S* __restrict trend, int64_t c, const TermCoefs& k) {
  float corr = 0.0f;
  if constexpr ((FLAGS & kHasDelta) != 0) corr += k.alpha * to_float(delta[c]);
  if constexpr ((FLAGS & kHasBeta1) != 0) corr += k.beta1 * (cached - to_float(h1[c]));
  if constexpr ((FLAGS & kHasTrend) != 0) corr += k.gamma * (cached * to_float(trend[c]));
  if constexpr ((FLAGS & kHasBeta2) != 0) corr += k.beta2 * (to_float(h1[c]) - to_float(h2[c]));
  if constexpr ((FLAGS & kHasBeta3) != 0) corr += k.beta3 * (to_float(h2[c]) - to_float(h3[c]));
  return corr;
}

// acc[0:C] += gate ⊙ F̂ for one token row of one entry. The gate row is fp32; every other operand row
// (cache = C₀, h1..h3 = C₁..C₃, delta, trend) is contiguous (stride 1 over C) and of type S: the input
// dtype, or float for rows gathered from strided operands. Rows of unused operands are never touched
// (their pointers may be null). coef: α, β₁, γ, β₂, β₃. JUDGE: threshold > 0.
template <int FLAGS, bool JUDGE, typename S>
void add_entry_row(float* __restrict acc, const float* __restrict gate, const S* __restrict cache,
                   const S* __restrict h1, const S* __restrict h2, const S* __restrict h3, const S* __restrict delta,
                   const S* __restrict trend, const float* coef, float threshold, int64_t channels,
                   float* __restrict cached_row, float* __restrict fhat_row) {
  const TermCoefs k{coef[0], coef[1], coef[2], coef[3], coef[4]};  // locals: no aliasing with acc
  if constexpr (FLAGS == 0) {  // plain reuse: F̂ = C₀
    for (int64_t c = 0; c < channels; ++c) acc[c] += gate[c] * to_float(cache[c]);
  } else if constexpr (!JUDGE) {  // threshold <= 0: every token keeps its correction
    for (int64_t c = 0; c < channels; ++c) {
      const float cached = to_float(cache[c]);
      const float corr = correction<FLAGS>(cached, h1, h2, h3, delta, trend, c, k);
      acc[c] += gate[c] * (cached + corr);
    }
  } else {
    float corr_sq[kNormLanes] = {};
    float cached_sq[kNormLanes] = {};
    int64_t c = 0;
    for (; c + kNormLanes <= channels; c += kNormLanes) {
      for (int64_t lane = 0; lane < kNormLanes; ++lane) {
        const float cached = to_float(cache[c + lane]);
        const float corr = correction<FLAGS>(cached, h1, h2, h3, delta, trend, c + lane, k);
        corr_sq[lane] += corr * corr;
        cached_sq[lane] += cached * cached;
        cached_row[c + lane] = cached;
        fhat_row[c + lane] = cached + corr;
      }
    }
    for (; c < channels; ++c) {
      const float cached = to_float(cache[c]);
      const float corr = correction<FLAGS>(cached, h1, h2, h3, delta, trend, c, k);
      corr_sq[0] += corr * corr;
      cached_sq[0] += cached * cached;
      cached_row[c] = cached;
      fhat_row[c] = cached + corr;
    }
    float corr_norm = 0.0f;
    float cached_norm = 0.0f;
    for (int64_t lane = 0; lane < kNormLanes; ++lane) {
      corr_norm += corr_sq[lane];
      cached_norm += cached_sq[lane];
    }
    // 1e-6: reference._NORM_EPS. A NaN score fails the comparison: the token is not corrected.
    const float score = std::sqrt(corr_norm) / (std::sqrt(cached_norm) + 1e-6f);
    const float* __restrict chosen = score > threshold ? fhat_row : cached_row;
    for (c = 0; c < channels; ++c) acc[c] += gate[c] * chosen[c];
  }
}

// One pass over a token row for GROUP (2..4) consecutive plain-reuse entries (F̂ = Cc):
// acc[0:C] += gate_0 ⊙ Cc_0, then += gate_1 ⊙ Cc_1, ... — the same products and sums in the same order as
// GROUP calls of add_entry_row<0> (bit for bit), with the running sum kept in a register between
// entries instead of a store and a reload of acc per entry. acc (a tile of rows, about 64 KiB) lives in
// L2, and for plain reuse its round trip per entry bounded the loop (benchmark runs at 92744a4 and
// 8f19f2c: DiT-S/2 plain reuse 25% faster in fp32, 39% in bf16). Corrected entries are not grouped: a
// generic group measured 2-15% faster with one term (extrapolate) but 3.6-4x slower in fp32 with every
// term (probably not vectorised; the disassembly was not checked), so only plain entries are grouped.
template <int GROUP, typename S>
void add_plain_group(float* __restrict acc, const float* const* gates, const S* const* caches, int64_t channels) {
  static_assert(GROUP >= 2 && GROUP <= kEntryGroup);
  const float* __restrict g0 = gates[0];
  const float* __restrict g1 = gates[1];
  const float* __restrict g2 = gates[GROUP > 2 ? 2 : 0];
  const float* __restrict g3 = gates[GROUP > 3 ? 3 : 0];
  const S* __restrict c0 = caches[0];
  const S* __restrict c1 = caches[1];
  const S* __restrict c2 = caches[GROUP > 2 ? 2 : 0];
  const S* __restrict c3 = caches[GROUP > 3 ? 3 : 0];
  for (int64_t c = 0; c < channels; ++c) {
    float sum = acc[c] + g0[c] * to_float(c0[c]);
    sum = sum + g1[c] * to_float(c1[c]);
    if constexpr (GROUP > 2) sum = sum + g2[c] * to_float(c2[c]);
    if constexpr (GROUP > 3) sum = sum + g3[c] * to_float(c3[c]);
    acc[c] = sum;
  }
}

template <typename S>
using RowFn = void (*)(float*, const float*, const S*, const S*, const S*, const S*, const S*, const S*, const float*,
                       float, int64_t, float*, float*);

template <typename S, bool JUDGE, int... FLAGS>
constexpr std::array<RowFn<S>, sizeof...(FLAGS)> row_fns(std::integer_sequence<int, FLAGS...>) {
  return {&add_entry_row<FLAGS, JUDGE, S>...};
}

// The row function of an entry with these flags (kHasDelta | kHasBeta1 | kHasTrend | kHasBeta2 | kHasBeta3).
template <typename S>
RowFn<S> pick_row_fn(int flags, bool judge) {
  static constexpr auto judged = row_fns<S, true>(std::make_integer_sequence<int, kFlagCombinations>{});
  static constexpr auto kept = row_fns<S, false>(std::make_integer_sequence<int, kFlagCombinations>{});
  return judge ? judged[flags] : kept[flags];
}

// Copies a strided row of `channels` values into a contiguous fp32 buffer.
template <typename T>
inline void gather_row(const T* row, int64_t stride, int64_t channels, float* __restrict dst) {
  if (stride == 1) {
    for (int64_t c = 0; c < channels; ++c) dst[c] = to_float(row[c]);
  } else {
    for (int64_t c = 0; c < channels; ++c) dst[c] = to_float(row[c * stride]);
  }
}

// out = x + Σ_entries gate ⊙ F̂ over every token row, in parallel over rows.
template <typename T>
void run_entries(const Rows<T>& x, const OutRows<T>& out, const std::vector<Entry<T>>& entries, float threshold,
                 int64_t batch, int64_t tokens, int64_t channels) {
  const int64_t rows = batch * tokens;
  if (rows == 0 || channels == 0) return;
  const int64_t num_entries = static_cast<int64_t>(entries.size());
  const int64_t tile = std::max<int64_t>(1, kTileFloats / channels);
  const bool judge = threshold > 0.0f;
  at::parallel_for(0, rows, tile, [&](int64_t begin, int64_t end) {
    // Per thread: the tile's accumulators, the fp32 gate rows of the current b, C₀ and F̂ of the
    // current row, and six gathered rows (C₀..C₃, delta, trend of a strided entry).
    std::vector<float> scratch(static_cast<size_t>((tile + num_entries + 8) * channels));
    float* acc = scratch.data();
    float* gates = acc + tile * channels;
    float* cached_row = gates + num_entries * channels;
    float* fhat_row = cached_row + channels;
    float* gathered = fhat_row + channels;
    int64_t gate_batch = -1;
    for (int64_t first = begin; first < end;) {
      const int64_t b = first / tokens, n0 = first % tokens;
      const int64_t count = std::min({tile, end - first, tokens - n0});  // rows (b, n0 .. n0 + count - 1)
      if (b != gate_batch) {
        for (int64_t i = 0; i < num_entries; ++i) {
          gather_row(entries[i].gate.row(b, 0), entries[i].gate.stride_c, channels, gates + i * channels);
        }
        gate_batch = b;
      }
      for (int64_t i = 0; i < count; ++i) gather_row(x.row(b, n0 + i), x.stride_c, channels, acc + i * channels);
      for (int64_t k = 0; k < num_entries; ++k) {
        const Entry<T>& e = entries[k];
        const float* gate = gates + k * channels;
        const bool has_delta = (e.flags & kHasDelta) != 0;
        const bool has_trend = (e.flags & kHasTrend) != 0;
        const bool has_history[3] = {reads_history(e.flags, 1), reads_history(e.flags, 2),
                                     reads_history(e.flags, 3)};
        // A run of contiguous plain-reuse entries: up to kEntryGroup per pass (add_plain_group).
        int64_t group = 0;
        while (group < kEntryGroup && k + group < num_entries && entries[k + group].flags == 0 &&
               entries[k + group].contiguous) {
          ++group;
        }
        if (group > 1) {
          const float* group_gates[kEntryGroup] = {};
          const T* group_caches[kEntryGroup] = {};
          for (int64_t j = 0; j < group; ++j) group_gates[j] = gates + (k + j) * channels;
          for (int64_t i = 0; i < count; ++i) {
            const int64_t n = n0 + i;
            for (int64_t j = 0; j < group; ++j) group_caches[j] = entries[k + j].cache.row(b, n);
            float* row_acc = acc + i * channels;
            if (group == 4) add_plain_group<4>(row_acc, group_gates, group_caches, channels);
            else if (group == 3) add_plain_group<3>(row_acc, group_gates, group_caches, channels);
            else add_plain_group<2>(row_acc, group_gates, group_caches, channels);
          }
          k += group - 1;
          continue;
        }
        if (e.contiguous) {
          const RowFn<T> fn = pick_row_fn<T>(e.flags, judge);
          for (int64_t i = 0; i < count; ++i) {
            const int64_t n = n0 + i;
            const T* h[3];
            for (int j = 0; j < 3; ++j) h[j] = has_history[j] ? e.history[j].row(b, n) : nullptr;
            fn(acc + i * channels, gate, e.cache.row(b, n), h[0], h[1], h[2], has_delta ? e.delta.row(b, n) : nullptr,
               has_trend ? e.trend.row(b, n) : nullptr, e.coef, threshold, channels, cached_row, fhat_row);
          }
        } else {  // some operand is strided over C: gather the entry's rows into fp32 first
          const RowFn<float> fn = pick_row_fn<float>(e.flags, judge);
          float* c_row = gathered;
          float* h_rows = c_row + channels;  // C₁, C₂, C₃
          float* d_row = h_rows + 3 * channels;
          float* t_row = d_row + channels;
          for (int64_t i = 0; i < count; ++i) {
            const int64_t n = n0 + i;
            gather_row(e.cache.row(b, n), e.cache.stride_c, channels, c_row);
            for (int j = 0; j < 3; ++j) {
              if (has_history[j]) {
                gather_row(e.history[j].row(b, n), e.history[j].stride_c, channels, h_rows + j * channels);
              }
            }
            if (has_delta) gather_row(e.delta.row(b, n), e.delta.stride_c, channels, d_row);
            if (has_trend) gather_row(e.trend.row(b, n), e.trend.stride_c, channels, t_row);
            fn(acc + i * channels, gate, c_row, h_rows, h_rows + channels, h_rows + 2 * channels, d_row, t_row, e.coef,
               threshold, channels, cached_row, fhat_row);
          }
        }
      }
      for (int64_t i = 0; i < count; ++i) {  // one rounding to the output dtype
        T* row = out.row(b, n0 + i);
        const float* src = acc + i * channels;
        if (out.stride_c == 1) {
          for (int64_t c = 0; c < channels; ++c) row[c] = static_cast<T>(src[c]);
        } else {
          for (int64_t c = 0; c < channels; ++c) row[c * out.stride_c] = static_cast<T>(src[c]);
        }
      }
      first += count;
    }
  });
}
