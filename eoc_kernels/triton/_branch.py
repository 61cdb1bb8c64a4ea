"""Triton kernel of ``cached_branch`` (DESIGN §3): one reused branch, x + gate ⊙ F̂, in one pass.

Eager equivalent: ``eoc_kernels.reference.cached_branch`` (history C_0 = cache, C_1 = prev, C_2 = prev2,
C_3 = prev3 and coef (α, β₁, γ[, β₂[, β₃]])). Blocking (row chunks, or whole token
rows in registers when the judgment needs them), zero-coefficient skipping, int64 offsets and
explicit strides: see ``_common``.
"""

import triton
import triton.language as tl

from . import _common
from ._common import (
    _corrected_feature,
    _row_offsets,
    branch_launch_args,
    check_runnable,
    needs_whole_rows,
    pick_blocks,
)


@triton.jit
def _cached_branch_kernel(
        X_ptr, Gate_ptr, Cache_ptr, Prev_ptr, Prev2_ptr, Prev3_ptr, Delta_ptr, Trend_ptr, Coef_ptr,
        Threshold_ptr, Out_ptr,
        rows, tokens, channels, delta_rows_per_head, trend_rows_per_head,
        stride_xb, stride_xn, stride_xc,
        stride_gb, stride_gc,
        stride_cb, stride_cn, stride_cc,
        stride_pb, stride_pn, stride_pc,
        stride_p2b, stride_p2n, stride_p2c,
        stride_p3b, stride_p3n, stride_p3c,
        stride_dh, stride_dn, stride_dc,
        stride_th, stride_tn, stride_tc,
        stride_ob, stride_on, stride_oc,
        stride_coef,
        alpha, beta, gamma, beta2, beta3, threshold,
        HAS_DELTA: tl.constexpr, HAS_PREV: tl.constexpr, HAS_TREND: tl.constexpr,
        HAS_PREV2: tl.constexpr, HAS_PREV3: tl.constexpr,
        COEF_IS_TENSOR: tl.constexpr, THRESHOLD_IS_TENSOR: tl.constexpr,
        WHOLE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # flat b·N + n
    row_mask = (row < rows)[:, None]
    if COEF_IS_TENSOR:
        alpha = tl.load(Coef_ptr)
        beta = tl.load(Coef_ptr + stride_coef)
        gamma = tl.load(Coef_ptr + 2 * stride_coef)
        if HAS_PREV2:  # P >= 4
            beta2 = tl.load(Coef_ptr + 3 * stride_coef)
        if HAS_PREV3:  # P == 5
            beta3 = tl.load(Coef_ptr + 4 * stride_coef)
    if THRESHOLD_IS_TENSOR:
        threshold = tl.load(Threshold_ptr)
    # Row offsets [BLOCK_M, 1] of each tensor; a chunk adds its columns times the column stride.
    x_rows = _row_offsets(row, 1, stride_xb, stride_xn, tokens)[:, None]
    gate_rows = _row_offsets(row, 1, stride_gb, 0, tokens)[:, None]
    cache_rows = _row_offsets(row, 1, stride_cb, stride_cn, tokens)[:, None]
    prev_rows = _row_offsets(row, 1, stride_pb, stride_pn, tokens)[:, None]
    prev2_rows = _row_offsets(row, 1, stride_p2b, stride_p2n, tokens)[:, None]
    prev3_rows = _row_offsets(row, 1, stride_p3b, stride_p3n, tokens)[:, None]
    delta_rows = _row_offsets(row, delta_rows_per_head, stride_dh, stride_dn, tokens)[:, None]
    trend_rows = _row_offsets(row, trend_rows_per_head, stride_th, stride_tn, tokens)[:, None]
    out_rows = _row_offsets(row, 1, stride_ob, stride_on, tokens)[:, None]

    end = channels
    if WHOLE_ROWS:
        end = 1  # one chunk of BLOCK_C >= C columns: the whole rows
    for start in range(0, end, BLOCK_C):
        col = (start + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :]
        mask = row_mask & (col < channels)
        fhat = _corrected_feature(
            Cache_ptr, cache_rows + col * stride_cc, Prev_ptr, prev_rows + col * stride_pc,
            Prev2_ptr, prev2_rows + col * stride_p2c, Prev3_ptr, prev3_rows + col * stride_p3c,
            Delta_ptr, delta_rows + col * stride_dc, Trend_ptr, trend_rows + col * stride_tc,
            mask, alpha, beta, gamma, beta2, beta3, threshold, HAS_DELTA, HAS_PREV, HAS_TREND,
            HAS_PREV2, HAS_PREV3, WHOLE_ROWS)  # [BLOCK_M, BLOCK_C]
        gate = tl.load(Gate_ptr + gate_rows + col * stride_gc, mask=mask, other=0.0).to(tl.float32)
        out = tl.load(X_ptr + x_rows + col * stride_xc, mask=mask,
                      other=0.0).to(tl.float32) + gate * fhat
        tl.store(Out_ptr + out_rows + col * stride_oc, out.to(Out_ptr.dtype.element_ty), mask=mask)


def _launch(out, x, gate, cache, prev, prev2, prev3, delta, trend, coef_values, coef_tensor,
            threshold_value, threshold_tensor):
    """Runs the kernel writing out; a float coefficient of 0.0 leaves its tensor unread."""
    batch, tokens, channels = x.shape
    rows = batch * tokens
    if rows == 0 or channels == 0:
        return out
    br = branch_launch_args(x, prev, prev2, prev3, delta, trend, coef_values, coef_tensor)
    has_delta, has_prev, has_trend, has_prev2, has_prev3 = br["flags"]
    tiling = pick_blocks(channels, rows, x.device,
                         needs_whole_rows(any(br["flags"]), threshold_value, threshold_tensor))
    _cached_branch_kernel[(triton.cdiv(rows, tiling.block_m),)](
        x, gate, cache, br["prev"], br["prev2"], br["prev3"], br["delta"], br["trend"], br["coef"],
        threshold_tensor if threshold_tensor is not None else x, out,
        rows, tokens, channels, br["delta_rows_per_head"], br["trend_rows_per_head"],
        *x.stride(), *gate.stride(), *cache.stride(), *br["prev_strides"], *br["prev2_strides"],
        *br["prev3_strides"], *br["delta_strides"], *br["trend_strides"], *out.stride(), br["coef_stride"],
        *br["coef_values"], threshold_value,
        HAS_DELTA=has_delta, HAS_PREV=has_prev, HAS_TREND=has_trend, HAS_PREV2=has_prev2,
        HAS_PREV3=has_prev3, COEF_IS_TENSOR=br["coef_is_tensor"], THRESHOLD_IS_TENSOR=threshold_tensor is not None,
        WHOLE_ROWS=tiling.whole_rows, BLOCK_M=tiling.block_m, BLOCK_C=tiling.block_c,
        **tiling.launch_options())
    return out


def cached_branch_kernel(x, *args):
    """The "triton" kernel of eoc::cached_branch (split arguments, as checked by eoc_kernels.cached_branch)."""
    check_runnable("eoc::cached_branch", x)
    return _launch(_common.new_output(x), x, *args)
