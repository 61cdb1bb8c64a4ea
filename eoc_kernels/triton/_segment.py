"""Triton kernel of ``cached_segment`` (DESIGN §3): S consecutive reused blocks in one pass.

Eager equivalent: ``eoc_kernels.reference.cached_segment``,
out = x + Σ_{s,k} gates[:, s, k] ⊙ F̂_{s,k}, with the cache a ring of G in {1, 2, 3, 4} generations:
C_j of entry (s, k) is cache[(generation[s, k] − j) mod G, s, k] (generation clamped into 0..G−1 in
the kernel, so a bad value never reads outside the cache), and history term i (β_i, reading C_{i−1}
and C_i) applies iff i <= G − 1 and i <= P − 2 for coef [S, 2, P]. A program loads its x rows once, loops over the
S·2 entries inside the kernel (reading each entry's cache rows, gate and prior rows once, with the
generation and the coefficients loaded on the device), accumulates in fp32 registers and writes
its rows once; chunked (no judgment), it does so for each chunk of its rows in turn. The entries
are one run-time loop (not S × an unrolled pair): each iteration holds one entry's tiles, about
half the registers of two (tests/eoc_kernels/test_aot_compile.py). Blocking, zero-coefficient
skipping, int64 offsets and explicit strides: see ``_common``.
"""

import triton
import triton.language as tl

from ..reference import segment_history
from . import _common
from ._common import (
    _corrected_feature,
    _row_offsets,
    check_runnable,
    needs_whole_rows,
    pick_blocks,
)


@triton.jit
def _ring(generation, back, NUM_GENERATIONS: tl.constexpr):
    """The generation `back` computes before `generation` (in 0..G−1) in a ring of G."""
    if NUM_GENERATIONS == 2:
        earlier = 1 - generation  # back == 1
    else:
        earlier = (generation + (NUM_GENERATIONS - back)) % NUM_GENERATIONS
    return earlier


@triton.jit
def _segment_entry(Coef_ptr, Generation_ptr, s64, k, stride_qs, stride_qk, stride_qj,
                   stride_es, stride_ek, stride_cs, stride_ck, stride_cg,
                   HAS_COEF: tl.constexpr, NUM_GENERATIONS: tl.constexpr,
                   HAS_PREV2: tl.constexpr, HAS_PREV3: tl.constexpr):
    """(alpha, beta1, gamma, beta2, beta3, C_0, C_1, C_2, C_3 offsets) of entry (s, k), loaded on the
    device; a coefficient or offset whose term does not apply is 0 / C_0's."""
    alpha = 0.0
    beta = 0.0
    gamma = 0.0
    beta2 = 0.0
    beta3 = 0.0
    if HAS_COEF:
        coef_ptr = Coef_ptr + s64 * stride_qs + k * stride_qk
        alpha = tl.load(coef_ptr)
        beta = tl.load(coef_ptr + stride_qj)
        gamma = tl.load(coef_ptr + 2 * stride_qj)
        if HAS_PREV2:  # G >= 3 and P >= 4
            beta2 = tl.load(coef_ptr + 3 * stride_qj)
        if HAS_PREV3:  # G == 4 and P == 5
            beta3 = tl.load(coef_ptr + 4 * stride_qj)
    entry = s64 * stride_cs + k * stride_ck
    current = entry
    previous = entry
    previous2 = entry
    previous3 = entry
    if NUM_GENERATIONS > 1:  # generation[s, k] holds C_0, the ring the earlier ones
        generation = tl.load(Generation_ptr + s64 * stride_es + k * stride_ek)
        # Clamped into 0..G-1 so that a bad value (a device-side assert on CUDA, checked before
        # the launch) can never make this kernel read outside the cache.
        generation = tl.minimum(tl.maximum(generation.to(tl.int64), 0), NUM_GENERATIONS - 1)
        current = entry + generation * stride_cg
        previous = entry + _ring(generation, 1, NUM_GENERATIONS) * stride_cg
        if HAS_PREV2 or HAS_PREV3:
            previous2 = entry + _ring(generation, 2, NUM_GENERATIONS) * stride_cg
        if HAS_PREV3:
            previous3 = entry + _ring(generation, 3, NUM_GENERATIONS) * stride_cg
    return alpha, beta, gamma, beta2, beta3, current, previous, previous2, previous3


@triton.jit
def _cached_segment_kernel(
        X_ptr, Gates_ptr, Cache_ptr, Generation_ptr, Delta_ptr, Trend_ptr, Coef_ptr,
        Threshold_ptr, Out_ptr,
        rows, tokens, channels, blocks, delta_rows_per_head, trend_rows_per_head,
        stride_xb, stride_xn, stride_xc,
        stride_gb, stride_gs, stride_gk, stride_gc,
        stride_cg, stride_cs, stride_ck, stride_cb, stride_cn, stride_cc,
        stride_es, stride_ek,
        stride_ds, stride_dk, stride_dh, stride_dn, stride_dc,
        stride_ts, stride_tk, stride_th, stride_tn, stride_tc,
        stride_qs, stride_qk, stride_qj,
        stride_ob, stride_on, stride_oc,
        threshold,
        NUM_GENERATIONS: tl.constexpr, HAS_COEF: tl.constexpr, HAS_DELTA: tl.constexpr,
        HAS_PREV: tl.constexpr, HAS_TREND: tl.constexpr, HAS_PREV2: tl.constexpr,
        HAS_PREV3: tl.constexpr, THRESHOLD_IS_TENSOR: tl.constexpr,
        WHOLE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # flat b·N + n
    row_mask = (row < rows)[:, None]
    if THRESHOLD_IS_TENSOR:
        threshold = tl.load(Threshold_ptr)
    # Row offsets [BLOCK_M, 1], without the entry (s, k) and generation parts.
    gate_rows = _row_offsets(row, 1, stride_gb, 0, tokens)[:, None]
    cache_rows = _row_offsets(row, 1, stride_cb, stride_cn, tokens)[:, None]
    delta_rows = _row_offsets(row, delta_rows_per_head, stride_dh, stride_dn, tokens)[:, None]
    trend_rows = _row_offsets(row, trend_rows_per_head, stride_th, stride_tn, tokens)[:, None]
    x_rows = _row_offsets(row, 1, stride_xb, stride_xn, tokens)[:, None]
    out_rows = _row_offsets(row, 1, stride_ob, stride_on, tokens)[:, None]

    end = channels
    if WHOLE_ROWS:
        end = 1  # one chunk of BLOCK_C >= C columns: the whole rows
    for start in range(0, end, BLOCK_C):
        col = (start + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :]
        mask = row_mask & (col < channels)
        cache_offs = cache_rows + col * stride_cc
        out = tl.load(X_ptr + x_rows + col * stride_xc, mask=mask,
                      other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C]
        for entry in range(0, 2 * blocks):  # (s, k) = (0, attention), (0, MLP), (1, attention), ...
            s64 = tl.cast(entry // 2, tl.int64)
            k = tl.cast(entry % 2, tl.int64)  # 0 = attention, 1 = MLP
            alpha, beta, gamma, beta2, beta3, current, previous, previous2, previous3 = _segment_entry(
                Coef_ptr, Generation_ptr, s64, k, stride_qs, stride_qk, stride_qj, stride_es,
                stride_ek, stride_cs, stride_ck, stride_cg, HAS_COEF, NUM_GENERATIONS, HAS_PREV2,
                HAS_PREV3)
            fhat = _corrected_feature(
                Cache_ptr + current, cache_offs, Cache_ptr + previous, cache_offs,
                Cache_ptr + previous2, cache_offs, Cache_ptr + previous3, cache_offs,
                Delta_ptr + s64 * stride_ds + k * stride_dk, delta_rows + col * stride_dc,
                Trend_ptr + s64 * stride_ts + k * stride_tk, trend_rows + col * stride_tc,
                mask, alpha, beta, gamma, beta2, beta3, threshold, HAS_DELTA, HAS_PREV, HAS_TREND,
                HAS_PREV2, HAS_PREV3, WHOLE_ROWS)
            gates_ptr = Gates_ptr + s64 * stride_gs + k * stride_gk
            out += tl.load(gates_ptr + gate_rows + col * stride_gc, mask=mask,
                           other=0.0).to(tl.float32) * fhat
        tl.store(Out_ptr + out_rows + col * stride_oc, out.to(Out_ptr.dtype.element_ty), mask=mask)


def _launch(out, x, gates, cache, generation, delta, trend, coef, threshold_value,
            threshold_tensor):
    """Runs the kernel writing out. coef None: plain reuse, nothing but cache and gates read.

    History term i applies iff i <= G − 1 and i <= P − 2 (reference.segment_history)."""
    batch, tokens, channels = x.shape
    num_generations, blocks = cache.shape[:2]
    rows = batch * tokens
    if rows == 0 or channels == 0:
        return out
    has_coef = coef is not None
    has_delta = has_coef and delta is not None
    has_trend = has_coef and trend is not None
    history = segment_history(num_generations, coef.shape[-1] if has_coef else None)
    has_prev, has_prev2, has_prev3 = (history >= i for i in (1, 2, 3))
    tiling = pick_blocks(channels, rows, x.device,
                         needs_whole_rows(has_delta or has_prev or has_trend, threshold_value,
                                          threshold_tensor))
    delta_strides = delta.stride() if has_delta else (0,) * 5  # [S, 2, H, N, C]
    trend_strides = trend.stride() if has_trend else (0,) * 5
    _cached_segment_kernel[(triton.cdiv(rows, tiling.block_m),)](
        x, gates, cache, generation if num_generations > 1 else x, delta if has_delta else x,
        trend if has_trend else x, coef if has_coef else x,
        threshold_tensor if threshold_tensor is not None else x, out,
        rows, tokens, channels, blocks,
        batch // delta.shape[2] if has_delta else 1, batch // trend.shape[2] if has_trend else 1,
        *x.stride(), *gates.stride(), *cache.stride(), *generation.stride(),
        *delta_strides, *trend_strides,
        *(coef.stride() if has_coef else (0, 0, 0)), *out.stride(),
        threshold_value,
        NUM_GENERATIONS=num_generations, HAS_COEF=has_coef, HAS_DELTA=has_delta,
        HAS_PREV=has_prev, HAS_TREND=has_trend, HAS_PREV2=has_prev2, HAS_PREV3=has_prev3,
        THRESHOLD_IS_TENSOR=threshold_tensor is not None,
        WHOLE_ROWS=tiling.whole_rows, BLOCK_M=tiling.block_m, BLOCK_C=tiling.block_c,
        **tiling.launch_options())
    return out


def cached_segment_kernel(x, *args):
    """The "triton" kernel of eoc::cached_segment (split arguments, as checked by eoc_kernels.cached_segment)."""
    check_runnable("eoc::cached_segment", x)
    return _launch(_common.new_output(x), x, *args)
