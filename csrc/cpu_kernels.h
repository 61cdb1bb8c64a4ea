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
//     corr = α·D + β·(Cc − Cp) + γ·(Cc ⊙ E)      (a term only when its tensor is given and its
//                                                  coefficient is nonzero: its tensor is never read)
//     keep = ||corr|| / (||Cc|| + 1e-6) > threshold, or threshold <= 0   (per token, NaN -> false)
//     F̂ = Cc + (keep ? corr : 0)
//     out = x + Σ_entries gate ⊙ F̂               (in the entries' order, fp32, one rounding at the end)
//
// Blocking: a thread owns a run of token rows (b, n) and walks it in tiles of at most TILE rows of one
// batch row b, whose fp32 accumulators (TILE · C floats, about 64 KiB) stay in L2. For a tile it
// loads x once; then, entry by entry, it reads that entry's rows of every operand once (a few long
// sequential streams at a time, which the hardware prefetchers follow), taking runs of up to four
// consecutive entries with the same terms and no judgment in one pass over each row (add_entry_group:
// the running sum stays in a register instead of going to the L2-resident tile and back per entry);
// finally it rounds and writes the output once. The gate rows of b are converted to fp32 once per thread and b. The per-token
// norms need the whole row before the judgment: with threshold > 0 the first pass over a row keeps Cc
// and F̂ in two per-thread fp32 row buffers and the second adds gate ⊙ (Cc or F̂) from them; with
// threshold <= 0 every token keeps its correction and one pass suffices.
//
// Measured on the project's CPU (AMD EPYC, AVX-512): this entry-by-entry order with plain loops beat
// both a register-accumulator version (all entries per 16-channel chunk: dozens of interleaved
// streams, and per-chunk bookkeeping) and GCC's generic vector types.

// Independent partial sums of the squared norms: lanes the compiler maps to SIMD registers (no
// reassociation of one serial sum is needed, so no -ffast-math).
constexpr int64_t kNormLanes = 16;
// Most consecutive entries one pass over a row takes (add_entry_group).
constexpr int kEntryGroup = 4;
// Target fp32 accumulator values per tile (TILE = max(1, kTileFloats / C) rows): 64 KiB, in L2. Longer
// runs per operand than a 16 KiB tile: measured up to 1.3x faster at N = 256, C = 384, S = 12 (24 entries);
// software prefetching of the next tile's rows measured no gain.
constexpr int64_t kTileFloats = 16384;

inline float to_float(float value) { return value; }
inline float to_float(c10::Half value) { return static_cast<float>(value); }
inline float to_float(c10::BFloat16 value) { return static_cast<float>(value); }

// The correction of one element, in the reference's order ((0 + α·D) + β·(Cc − Cp)) + γ·(Cc·E).
template <int FLAGS, typename S>
inline float correction(float cached, const S* __restrict prev, const S* __restrict delta,
                        const S* __restrict trend, int64_t c, float alpha, float beta, float gamma) {
  float corr = 0.0f;
  if constexpr ((FLAGS & kHasDelta) != 0) corr += alpha * to_float(delta[c]);
  if constexpr ((FLAGS & kHasPrev) != 0) corr += beta * (cached - to_float(prev[c]));
  if constexpr ((FLAGS & kHasTrend) != 0) corr += gamma * (cached * to_float(trend[c]));
  return corr;
}

// acc[0:C] += gate ⊙ F̂ for one token row of one entry. The gate row is fp32; every other operand row
// is contiguous (stride 1 over C) and of type S: the input dtype, or float for rows gathered from
// strided operands. Rows of unused operands are never touched (their pointers may be null).
// JUDGE: threshold > 0.
template <int FLAGS, bool JUDGE, typename S>
void add_entry_row(float* __restrict acc, const float* __restrict gate, const S* __restrict cache,
                   const S* __restrict prev, const S* __restrict delta, const S* __restrict trend, float alpha,
                   float beta, float gamma, float threshold, int64_t channels, float* __restrict cached_row,
                   float* __restrict fhat_row) {
  if constexpr (FLAGS == 0) {  // plain reuse: F̂ = Cc
    for (int64_t c = 0; c < channels; ++c) acc[c] += gate[c] * to_float(cache[c]);
  } else if constexpr (!JUDGE) {  // threshold <= 0: every token keeps its correction
    for (int64_t c = 0; c < channels; ++c) {
      const float cached = to_float(cache[c]);
      const float corr = correction<FLAGS>(cached, prev, delta, trend, c, alpha, beta, gamma);
      acc[c] += gate[c] * (cached + corr);
    }
  } else {
    float corr_sq[kNormLanes] = {};
    float cached_sq[kNormLanes] = {};
    int64_t c = 0;
    for (; c + kNormLanes <= channels; c += kNormLanes) {
      for (int64_t lane = 0; lane < kNormLanes; ++lane) {
        const float cached = to_float(cache[c + lane]);
        const float corr = correction<FLAGS>(cached, prev, delta, trend, c + lane, alpha, beta, gamma);
        corr_sq[lane] += corr * corr;
        cached_sq[lane] += cached * cached;
        cached_row[c + lane] = cached;
        fhat_row[c + lane] = cached + corr;
      }
    }
    for (; c < channels; ++c) {
      const float cached = to_float(cache[c]);
      const float corr = correction<FLAGS>(cached, prev, delta, trend, c, alpha, beta, gamma);
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

// One pass over a token row for GROUP consecutive entries with the same flags, none judged (plain reuse,
// or threshold <= 0): acc[0:C] += gate_0 ⊙ F̂_0, then += gate_1 ⊙ F̂_1, ... — the same products and sums
// in the same order as GROUP calls of add_entry_row (bit for bit), with the running sum kept in a
// register between entries instead of a store and a reload of acc per entry. acc (a tile of rows,
// about 64 KiB) lives in L2: one round trip per entry bounded the loop (measured 2x on plain reuse).
struct GroupRows {
  const void* cache[kEntryGroup];
  const void* prev[kEntryGroup];
  const void* delta[kEntryGroup];
  const void* trend[kEntryGroup];
  const float* gate[kEntryGroup];
  float alpha[kEntryGroup], beta[kEntryGroup], gamma[kEntryGroup];
};

template <int GROUP, int FLAGS, typename S>
void add_entry_group(float* __restrict acc, const GroupRows& g, int64_t channels) {
  static_assert(GROUP >= 1 && GROUP <= kEntryGroup);
  const S* cache[GROUP];
  const S* prev[GROUP];
  const S* delta[GROUP];
  const S* trend[GROUP];
  const float* gate[GROUP];
  float alpha[GROUP], beta[GROUP], gamma[GROUP];
  for (int j = 0; j < GROUP; ++j) {
    cache[j] = static_cast<const S*>(g.cache[j]);
    prev[j] = static_cast<const S*>(g.prev[j]);
    delta[j] = static_cast<const S*>(g.delta[j]);
    trend[j] = static_cast<const S*>(g.trend[j]);
    gate[j] = g.gate[j];
    alpha[j] = g.alpha[j];
    beta[j] = g.beta[j];
    gamma[j] = g.gamma[j];
  }
  for (int64_t c = 0; c < channels; ++c) {
    float sum = acc[c];
#pragma GCC unroll 4
    for (int j = 0; j < GROUP; ++j) {
      const float cached = to_float(cache[j][c]);
      if constexpr (FLAGS == 0) {
        sum = sum + gate[j][c] * cached;
      } else {
        const float corr = correction<FLAGS>(cached, prev[j], delta[j], trend[j], c, alpha[j], beta[j], gamma[j]);
        sum = sum + gate[j][c] * (cached + corr);
      }
    }
    acc[c] = sum;
  }
}

template <typename S>
using GroupFn = void (*)(float*, const GroupRows&, int64_t);

template <typename S, int GROUP, int... FLAGS>
constexpr std::array<GroupFn<S>, sizeof...(FLAGS)> group_fns(std::integer_sequence<int, FLAGS...>) {
  return {&add_entry_group<GROUP, FLAGS, S>...};
}

// The pass of `group` (2..kEntryGroup) entries with these flags.
template <typename S>
GroupFn<S> pick_group_fn(int flags, int64_t group) {
  using Flags = std::make_integer_sequence<int, kFlagCombinations>;
  static constexpr auto two = group_fns<S, 2>(Flags{});
  static constexpr auto three = group_fns<S, 3>(Flags{});
  static constexpr auto four = group_fns<S, 4>(Flags{});
  return group == 4 ? four[flags] : group == 3 ? three[flags] : two[flags];
}

template <typename S>
using RowFn = void (*)(float*, const float*, const S*, const S*, const S*, const S*, float, float, float, float,
                       int64_t, float*, float*);

template <typename S, bool JUDGE, int... FLAGS>
constexpr std::array<RowFn<S>, sizeof...(FLAGS)> row_fns(std::integer_sequence<int, FLAGS...>) {
  return {&add_entry_row<FLAGS, JUDGE, S>...};
}

// The row function of an entry with these flags (kHasDelta | kHasPrev | kHasTrend).
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
    // Per thread: the tile's accumulators, the fp32 gate rows of the current b, Cc and F̂ of the
    // current row, and four gathered rows (cache, prev, delta, trend of a strided entry).
    std::vector<float> scratch(static_cast<size_t>((tile + num_entries + 6) * channels));
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
        const bool has_prev = (e.flags & kHasPrev) != 0;
        const bool has_trend = (e.flags & kHasTrend) != 0;
        // A run of contiguous entries with the same flags and no judgment: up to kEntryGroup per pass.
        int64_t group = 0;
        while (group < kEntryGroup && k + group < num_entries && entries[k + group].flags == e.flags &&
               entries[k + group].contiguous && (e.flags == 0 || !judge)) {
          ++group;
        }
        if (group > 1) {
          const GroupFn<T> fn = pick_group_fn<T>(e.flags, group);
          GroupRows rows{};
          for (int64_t j = 0; j < group; ++j) {
            const Entry<T>& ej = entries[k + j];
            rows.gate[j] = gates + (k + j) * channels;
            rows.alpha[j] = ej.alpha;
            rows.beta[j] = ej.beta;
            rows.gamma[j] = ej.gamma;
          }
          for (int64_t i = 0; i < count; ++i) {
            const int64_t n = n0 + i;
            for (int64_t j = 0; j < group; ++j) {
              const Entry<T>& ej = entries[k + j];
              rows.cache[j] = ej.cache.row(b, n);
              rows.prev[j] = has_prev ? ej.prev.row(b, n) : nullptr;
              rows.delta[j] = has_delta ? ej.delta.row(b, n) : nullptr;
              rows.trend[j] = has_trend ? ej.trend.row(b, n) : nullptr;
            }
            fn(acc + i * channels, rows, channels);
          }
          k += group - 1;
          continue;
        }
        if (e.contiguous) {
          const RowFn<T> fn = pick_row_fn<T>(e.flags, judge);
          for (int64_t i = 0; i < count; ++i) {
            const int64_t n = n0 + i;
            fn(acc + i * channels, gate, e.cache.row(b, n), has_prev ? e.prev.row(b, n) : nullptr,
               has_delta ? e.delta.row(b, n) : nullptr, has_trend ? e.trend.row(b, n) : nullptr, e.alpha, e.beta,
               e.gamma, threshold, channels, cached_row, fhat_row);
          }
        } else {  // some operand is strided over C: gather the entry's rows into fp32 first
          const RowFn<float> fn = pick_row_fn<float>(e.flags, judge);
          float* c_row = gathered;
          float* p_row = c_row + channels;
          float* d_row = p_row + channels;
          float* t_row = d_row + channels;
          for (int64_t i = 0; i < count; ++i) {
            const int64_t n = n0 + i;
            gather_row(e.cache.row(b, n), e.cache.stride_c, channels, c_row);
            if (has_prev) gather_row(e.prev.row(b, n), e.prev.stride_c, channels, p_row);
            if (has_delta) gather_row(e.delta.row(b, n), e.delta.stride_c, channels, d_row);
            if (has_trend) gather_row(e.trend.row(b, n), e.trend.stride_c, channels, t_row);
            fn(acc + i * channels, gate, c_row, p_row, d_row, t_row, e.alpha, e.beta, e.gamma, threshold, channels,
               cached_row, fhat_row);
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
