"""Triton kernel of ``cached_block`` (DESIGN §3): a block with both branches reused, in one pass.

Eager equivalent: ``eoc_kernels.reference.cached_block``,
x + gate_attn ⊙ F̂_attn + gate_mlp ⊙ F̂_mlp, each branch judged on its own correction and with its own
history (prev*, prev2*, prev3*) and coefficients (3 to 5 each). Blocking
(row chunks, or whole token rows in registers when the judgment needs them), zero-coefficient
skipping, int64 offsets and explicit strides: see ``_common``.
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
def _cached_block_kernel(
        X_ptr, GateA_ptr, GateM_ptr, CacheA_ptr, CacheM_ptr, PrevA_ptr, PrevM_ptr,
        Prev2A_ptr, Prev2M_ptr, Prev3A_ptr, Prev3M_ptr,
        DeltaA_ptr, DeltaM_ptr, TrendA_ptr, TrendM_ptr, CoefA_ptr, CoefM_ptr, Threshold_ptr,
        Out_ptr,
        rows, tokens, channels,
        delta_a_rows_per_head, delta_m_rows_per_head, trend_a_rows_per_head,
        trend_m_rows_per_head,
        stride_xb, stride_xn, stride_xc,
        stride_gab, stride_gac, stride_gmb, stride_gmc,
        stride_cab, stride_can, stride_cac, stride_cmb, stride_cmn, stride_cmc,
        stride_pab, stride_pan, stride_pac, stride_pmb, stride_pmn, stride_pmc,
        stride_p2ab, stride_p2an, stride_p2ac, stride_p2mb, stride_p2mn, stride_p2mc,
        stride_p3ab, stride_p3an, stride_p3ac, stride_p3mb, stride_p3mn, stride_p3mc,
        stride_dah, stride_dan, stride_dac, stride_dmh, stride_dmn, stride_dmc,
        stride_tah, stride_tan, stride_tac, stride_tmh, stride_tmn, stride_tmc,
        stride_ob, stride_on, stride_oc,
        stride_coef_a, stride_coef_m,
        alpha_a, beta_a, gamma_a, beta2_a, beta3_a, alpha_m, beta_m, gamma_m, beta2_m, beta3_m,
        threshold,
        HAS_DELTA_A: tl.constexpr, HAS_PREV_A: tl.constexpr, HAS_TREND_A: tl.constexpr,
        HAS_PREV2_A: tl.constexpr, HAS_PREV3_A: tl.constexpr,
        HAS_DELTA_M: tl.constexpr, HAS_PREV_M: tl.constexpr, HAS_TREND_M: tl.constexpr,
        HAS_PREV2_M: tl.constexpr, HAS_PREV3_M: tl.constexpr,
        COEF_A_IS_TENSOR: tl.constexpr, COEF_M_IS_TENSOR: tl.constexpr,
        THRESHOLD_IS_TENSOR: tl.constexpr,
        WHOLE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # flat b·N + n
    row_mask = (row < rows)[:, None]
    if COEF_A_IS_TENSOR:
        alpha_a = tl.load(CoefA_ptr)
        beta_a = tl.load(CoefA_ptr + stride_coef_a)
        gamma_a = tl.load(CoefA_ptr + 2 * stride_coef_a)
        if HAS_PREV2_A:  # P >= 4
            beta2_a = tl.load(CoefA_ptr + 3 * stride_coef_a)
        if HAS_PREV3_A:  # P == 5
            beta3_a = tl.load(CoefA_ptr + 4 * stride_coef_a)
    if COEF_M_IS_TENSOR:
        alpha_m = tl.load(CoefM_ptr)
        beta_m = tl.load(CoefM_ptr + stride_coef_m)
        gamma_m = tl.load(CoefM_ptr + 2 * stride_coef_m)
        if HAS_PREV2_M:
            beta2_m = tl.load(CoefM_ptr + 3 * stride_coef_m)
        if HAS_PREV3_M:
            beta3_m = tl.load(CoefM_ptr + 4 * stride_coef_m)
    if THRESHOLD_IS_TENSOR:
        threshold = tl.load(Threshold_ptr)
    # Row offsets [BLOCK_M, 1] of each tensor; a chunk adds its columns times the column stride.
    x_rows = _row_offsets(row, 1, stride_xb, stride_xn, tokens)[:, None]
    out_rows = _row_offsets(row, 1, stride_ob, stride_on, tokens)[:, None]
    gate_a_rows = _row_offsets(row, 1, stride_gab, 0, tokens)[:, None]
    cache_a_rows = _row_offsets(row, 1, stride_cab, stride_can, tokens)[:, None]
    prev_a_rows = _row_offsets(row, 1, stride_pab, stride_pan, tokens)[:, None]
    prev2_a_rows = _row_offsets(row, 1, stride_p2ab, stride_p2an, tokens)[:, None]
    prev3_a_rows = _row_offsets(row, 1, stride_p3ab, stride_p3an, tokens)[:, None]
    delta_a_rows = _row_offsets(row, delta_a_rows_per_head, stride_dah, stride_dan, tokens)[:, None]
    trend_a_rows = _row_offsets(row, trend_a_rows_per_head, stride_tah, stride_tan, tokens)[:, None]
    gate_m_rows = _row_offsets(row, 1, stride_gmb, 0, tokens)[:, None]
    cache_m_rows = _row_offsets(row, 1, stride_cmb, stride_cmn, tokens)[:, None]
    prev_m_rows = _row_offsets(row, 1, stride_pmb, stride_pmn, tokens)[:, None]
    prev2_m_rows = _row_offsets(row, 1, stride_p2mb, stride_p2mn, tokens)[:, None]
    prev3_m_rows = _row_offsets(row, 1, stride_p3mb, stride_p3mn, tokens)[:, None]
    delta_m_rows = _row_offsets(row, delta_m_rows_per_head, stride_dmh, stride_dmn, tokens)[:, None]
    trend_m_rows = _row_offsets(row, trend_m_rows_per_head, stride_tmh, stride_tmn, tokens)[:, None]

    end = channels
    if WHOLE_ROWS:
        end = 1  # one chunk of BLOCK_C >= C columns: the whole rows
    for start in range(0, end, BLOCK_C):
        col = (start + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :]
        mask = row_mask & (col < channels)
        out = tl.load(X_ptr + x_rows + col * stride_xc, mask=mask,
                      other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C]

        # Attention branch.
        fhat = _corrected_feature(
            CacheA_ptr, cache_a_rows + col * stride_cac, PrevA_ptr, prev_a_rows + col * stride_pac,
            Prev2A_ptr, prev2_a_rows + col * stride_p2ac, Prev3A_ptr, prev3_a_rows + col * stride_p3ac,
            DeltaA_ptr, delta_a_rows + col * stride_dac, TrendA_ptr,
            trend_a_rows + col * stride_tac, mask, alpha_a, beta_a, gamma_a, beta2_a, beta3_a, threshold,
            HAS_DELTA_A, HAS_PREV_A, HAS_TREND_A, HAS_PREV2_A, HAS_PREV3_A, WHOLE_ROWS)
        out += tl.load(GateA_ptr + gate_a_rows + col * stride_gac, mask=mask,
                       other=0.0).to(tl.float32) * fhat

        # MLP branch.
        fhat = _corrected_feature(
            CacheM_ptr, cache_m_rows + col * stride_cmc, PrevM_ptr, prev_m_rows + col * stride_pmc,
            Prev2M_ptr, prev2_m_rows + col * stride_p2mc, Prev3M_ptr, prev3_m_rows + col * stride_p3mc,
            DeltaM_ptr, delta_m_rows + col * stride_dmc, TrendM_ptr,
            trend_m_rows + col * stride_tmc, mask, alpha_m, beta_m, gamma_m, beta2_m, beta3_m, threshold,
            HAS_DELTA_M, HAS_PREV_M, HAS_TREND_M, HAS_PREV2_M, HAS_PREV3_M, WHOLE_ROWS)
        out += tl.load(GateM_ptr + gate_m_rows + col * stride_gmc, mask=mask,
                       other=0.0).to(tl.float32) * fhat

        tl.store(Out_ptr + out_rows + col * stride_oc, out.to(Out_ptr.dtype.element_ty), mask=mask)


def _launch(out, x, gate_attn, gate_mlp, cache_attn, cache_mlp, prev_attn, prev_mlp, prev2_attn,
            prev2_mlp, prev3_attn, prev3_mlp, delta_attn, delta_mlp, trend_attn, trend_mlp, coef_values,
            coef_tensor_attn, coef_tensor_mlp, threshold_value, threshold_tensor):
    """Runs the kernel writing out; a float coefficient of 0.0 leaves its tensor unread."""
    batch, tokens, channels = x.shape
    rows = batch * tokens
    if rows == 0 or channels == 0:
        return out
    slots = len(coef_values) // 2  # 5 floats per branch
    a = branch_launch_args(x, prev_attn, prev2_attn, prev3_attn, delta_attn, trend_attn,
                           coef_values[:slots], coef_tensor_attn)
    m = branch_launch_args(x, prev_mlp, prev2_mlp, prev3_mlp, delta_mlp, trend_mlp,
                           coef_values[slots:], coef_tensor_mlp)
    tiling = pick_blocks(channels, rows, x.device,
                         needs_whole_rows(any(a["flags"] + m["flags"]), threshold_value,
                                          threshold_tensor))
    _cached_block_kernel[(triton.cdiv(rows, tiling.block_m),)](
        x, gate_attn, gate_mlp, cache_attn, cache_mlp, a["prev"], m["prev"], a["prev2"], m["prev2"],
        a["prev3"], m["prev3"], a["delta"],
        m["delta"], a["trend"], m["trend"], a["coef"], m["coef"],
        threshold_tensor if threshold_tensor is not None else x, out,
        rows, tokens, channels,
        a["delta_rows_per_head"], m["delta_rows_per_head"], a["trend_rows_per_head"],
        m["trend_rows_per_head"],
        *x.stride(), *gate_attn.stride(), *gate_mlp.stride(), *cache_attn.stride(),
        *cache_mlp.stride(), *a["prev_strides"], *m["prev_strides"], *a["prev2_strides"],
        *m["prev2_strides"], *a["prev3_strides"], *m["prev3_strides"], *a["delta_strides"],
        *m["delta_strides"], *a["trend_strides"], *m["trend_strides"], *out.stride(),
        a["coef_stride"], m["coef_stride"],
        *a["coef_values"], *m["coef_values"], threshold_value,
        HAS_DELTA_A=a["flags"][0], HAS_PREV_A=a["flags"][1], HAS_TREND_A=a["flags"][2],
        HAS_PREV2_A=a["flags"][3], HAS_PREV3_A=a["flags"][4],
        HAS_DELTA_M=m["flags"][0], HAS_PREV_M=m["flags"][1], HAS_TREND_M=m["flags"][2],
        HAS_PREV2_M=m["flags"][3], HAS_PREV3_M=m["flags"][4],
        COEF_A_IS_TENSOR=a["coef_is_tensor"], COEF_M_IS_TENSOR=m["coef_is_tensor"],
        THRESHOLD_IS_TENSOR=threshold_tensor is not None,
        WHOLE_ROWS=tiling.whole_rows, BLOCK_M=tiling.block_m, BLOCK_C=tiling.block_c,
        **tiling.launch_options())
    return out


def cached_block_kernel(x, *args):
    """The "triton" kernel of eoc::cached_block (split arguments, as checked by eoc_kernels.cached_block)."""
    check_runnable("eoc::cached_block", x)
    return _launch(_common.new_output(x), x, *args)
