"""Shared pieces of the Triton kernels: the corrected-feature device function and launcher helpers.

``_corrected_feature`` is DESIGN §2 "Correction" and "Judgment" level 2 for one tile of token rows,
i.e. ``eoc_kernels.reference.corrected_feature``:

    corr = α·D + β₁·(C_0 − C_1) + γ·(C_0 ⊙ E) + β₂·(C_1 − C_2) + β₃·(C_2 − C_3)   (in this order)
    F̂ = C_0 + corr, kept per token only if ||corr|| / (||C_0|| + 1e-6) > token_threshold, or
    token_threshold <= 0

(C_0 = cache, C_1 = prev, C_2 = prev2, C_3 = prev3; the K-history terms β₂, β₃ of issue 10 come after
γ, so a three-coefficient call compiles to exactly the three-term kernel).

Blocking (all three kernels, ``pick_blocks``; docs/DESIGN.md §3.5): a program owns BLOCK_M token
rows (b, n) and walks them in [BLOCK_M, BLOCK_C] chunks; every input is read once and the output
written once.

- Chunked: no judgment needs the per-token norms (the threshold is a Python float <= 0, or no
  correction term is on), so BLOCK_C is the power of two that pads C least (C = 1152 = 9 × 128:
  no idle lane, where one 2048-wide tile left 44% of its lanes masked).
- Whole rows (WHOLE_ROWS): the judgment needs ||corr|| and ||Cc|| of each token before any
  output, so a row is one chunk of BLOCK_C = next_power_of_2(C) held in registers (columns >= C
  masked) and the norms are known before the judgment without a second pass over memory.

That caps C at MAX_CHANNELS (DiT widths are <= 4096); wider rows raise before any launch.
Everything inside is fp32; the store rounds once to the output dtype. Each launch gives ptxas a
register budget (``Blocking.launch_options``), so that no variant spills at DiT widths
(tests/eoc_kernels/test_aot_compile.py compiles them for sm_80 and sm_90 without a GPU).

Zero coefficients: a Python-float coefficient of 0.0 turns its term's constexpr flag off (the
tensor is never read, the kernel is compiled without it); a tensor coefficient is loaded in the
kernel and a scalar ``if`` skips the loads of its term when it is 0, so changing values neither
recompiles nor syncs with the host. A history tensor shared by two terms (C_1 by β₁ and β₂, C_2 by
β₂ and β₃) is loaded once, when either coefficient is non-zero, and held until its second term.
Coefficients and the threshold given as Python numbers are fp32 scalar kernel arguments (not
specialized: no recompile when they change; a threshold crossing 0 selects the other blocking mode,
another compiled variant).

Offsets are int64 (a stacked cache buffer can exceed 2**31 elements); every stride is passed
explicitly (Triton specializes a stride of 1), so no input needs to be contiguous.

Autograd: the kernels are forward-only; they are the "triton" kernels of the ``eoc::`` ops
(``eoc_kernels/_library.py``), whose backward recomputes the eager reference on the saved inputs and
differentiates it, so gradients are exactly the "torch" backend's (first order; the token judgment's
keep mask is piecewise constant there).
"""

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..errors import InputValueError

MAX_CHANNELS = 16384  # one row of C fp32 values per tile must fit in registers
GPU_TILE = 2048  # target fp32 values per program (BLOCK_M · BLOCK_C) on a GPU
INTERPRETER_TILE = 16384  # the interpreter runs a program as one Python call: fewer, larger ones
REGISTERS_PER_SM = 65536  # 32-bit registers per SM on sm_80 and sm_90
MIN_CHUNK = 128  # narrowest chunk of a chunked row: 16 threads × 8 bf16 (128-bit loads)

try:  # kernels decorated under the interpreter run on CPU tensors (tests without a GPU)
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # older Triton without knobs
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _load_fp32(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_fp32_if(needed, ptr, offs, mask, like):
    """The tile at ptr + offs in fp32 if the scalar needed holds, else zeros (nothing read)."""
    if needed:
        values = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        values = tl.zeros_like(like)
    return values


@triton.jit
def _corrected_feature(Cache_ptr, cache_offs, Prev_ptr, prev_offs, Prev2_ptr, prev2_offs, Prev3_ptr,
                       prev3_offs, Delta_ptr, delta_offs, Trend_ptr, trend_offs, mask,
                       alpha, beta, gamma, beta2, beta3, threshold,
                       HAS_DELTA: tl.constexpr, HAS_PREV: tl.constexpr, HAS_TREND: tl.constexpr,
                       HAS_PREV2: tl.constexpr, HAS_PREV3: tl.constexpr, WHOLE_ROWS: tl.constexpr):
    """F̂ of one [BLOCK_M, BLOCK_C] tile in fp32; masked (padding) elements are 0.

    *_offs are element offsets of the tile in each tensor; alpha, beta (β₁), gamma, beta2, beta3,
    threshold are fp32 scalars. HAS_<term>: the term may apply (its tensors exist; for a Python-float
    coefficient, it is non-zero): HAS_PREV is β₁ (C_0, C_1), HAS_PREV2 β₂ (C_1, C_2), HAS_PREV3 β₃
    (C_2, C_3); a coefficient whose flag is off must be 0.0. A tensor is read only when a term that
    uses it is on and its coefficient is non-zero. WHOLE_ROWS: the tile holds whole rows and the
    judgment applies; otherwise no judgment filters (a chunk of the rows, threshold <= 0: every
    token is corrected).
    """
    cached = tl.load(Cache_ptr + cache_offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA or HAS_PREV or HAS_TREND or HAS_PREV2 or HAS_PREV3:
        corr = tl.zeros_like(cached)
        if HAS_DELTA:
            if alpha != 0.0:
                delta = tl.load(Delta_ptr + delta_offs, mask=mask, other=0.0).to(tl.float32)
                corr += alpha * delta
        if HAS_PREV2:  # C_1 serves β₁ now and β₂ after γ: loaded once, held
            prev = _load_fp32_if((beta != 0.0) | (beta2 != 0.0), Prev_ptr, prev_offs, mask, cached)
            if HAS_PREV:
                if beta != 0.0:
                    corr += beta * (cached - prev)
        elif HAS_PREV:
            if beta != 0.0:
                prev = tl.load(Prev_ptr + prev_offs, mask=mask, other=0.0).to(tl.float32)
                corr += beta * (cached - prev)
        if HAS_TREND:
            if gamma != 0.0:
                trend = tl.load(Trend_ptr + trend_offs, mask=mask, other=0.0).to(tl.float32)
                corr += gamma * (cached * trend)
        if HAS_PREV3:  # C_2 serves β₂ and β₃
            prev2 = _load_fp32_if((beta2 != 0.0) | (beta3 != 0.0), Prev2_ptr, prev2_offs, mask, cached)
            if HAS_PREV2:
                if beta2 != 0.0:
                    corr += beta2 * (prev - prev2)
            if beta3 != 0.0:
                corr += beta3 * (prev2 - _load_fp32(Prev3_ptr, prev3_offs, mask))
        elif HAS_PREV2:
            if beta2 != 0.0:
                corr += beta2 * (prev - _load_fp32(Prev2_ptr, prev2_offs, mask))
        if WHOLE_ROWS:
            # Online judgment, per token (row): the correction's size relative to the cached feature.
            corr_norm = tl.sqrt(tl.sum(corr * corr, axis=1))  # [BLOCK_M]
            cached_norm = tl.sqrt(tl.sum(cached * cached, axis=1))
            score = corr_norm / (cached_norm + 1e-6)  # the 1e-6 of reference._NORM_EPS
            # A NaN score fails `score > threshold`: corrected only when threshold <= 0. The
            # threshold is broadcast to [BLOCK_M] first: Triton's interpreter cannot `|` a bool
            # derived from a loaded scalar with a vector.
            threshold_rows = tl.zeros_like(score) + threshold
            keep = (score > threshold_rows) | (threshold_rows <= 0.0)
            cached += tl.where(keep[:, None], corr, 0.0)
        else:
            cached += corr  # what the judgment gives for threshold <= 0, bit for bit
    return cached


@triton.jit
def _row_offsets(rows, rows_per_head, stride_b, stride_n, tokens):
    """Per-row offsets [BLOCK_M] (int64) of a [B, N, C] tensor, or of an [H, N, C] one when
    rows_per_head = B // H (row b uses entry b // rows_per_head)."""
    batch_index = rows // tokens
    token_index = rows - batch_index * tokens
    return (batch_index // rows_per_head) * stride_b + token_index * stride_n


class Blocking(NamedTuple):
    """How a launch tiles its rows (docs/DESIGN.md §3.5)."""

    block_m: int  # token rows per program
    block_c: int  # columns per chunk; whole rows: next_power_of_2(C), one chunk per row
    whole_rows: bool  # the judgment needs each row in registers (WHOLE_ROWS)
    num_warps: int

    def launch_options(self):
        """num_warps, and on CUDA a register budget (ptxas ``.maxnreg``): the most registers a
        thread of this block size can have (65536 per SM, at most 255). Without one, ptxas spills
        a register or two to reach the next occupancy step (seen at 40, 64 and 80 registers);
        with one it allocates what the kernel needs, and spills only past the budget."""
        options = dict(num_warps=self.num_warps)
        if torch.version.hip is None:  # ROCm's Triton has no maxnreg option
            options["maxnreg"] = min(255, REGISTERS_PER_SM // (32 * self.num_warps))
        return options


def needs_whole_rows(has_terms, threshold_value, threshold_tensor):
    """The token judgment needs each row's norms before any output: some correction term is on
    and the threshold is a tensor (value unknown at launch) or a float > 0."""
    return has_terms and (threshold_tensor is not None or threshold_value > 0)


def chunk_width(channels, tile):
    """The power-of-two chunk, between MIN_CHUNK and the tile, that pads C least (the widest
    of those that tie): 1152 → 128 (9 chunks), 768 → 256, 4096 → 2048, 123 → 128."""
    widest = min(triton.next_power_of_2(channels), max(tile, MIN_CHUNK))
    width = best = min(MIN_CHUNK, widest)
    while width <= widest:
        if triton.cdiv(channels, width) * width <= triton.cdiv(channels, best) * best:
            best = width
        width *= 2
    return best


def pick_blocks(channels, rows, device, whole_rows=True):
    """The Blocking of a launch over rows of `channels` values; raises for too wide rows.

    whole_rows (``needs_whole_rows``): one chunk of BLOCK_C = next_power_of_2(C) per row, so the
    judgment sees whole rows; else chunks of ``chunk_width`` columns. GPU: about 2048 fp32 values
    per tile, 8 values per thread. Interpreter (CPU): larger tiles, since every program is a
    Python call.
    """
    if channels > MAX_CHANNELS:
        raise InputValueError(f"the triton backend holds a token row in registers and supports "
                         f"C <= {MAX_CHANNELS}, got C = {channels}; use backend='torch'")
    tile = INTERPRETER_TILE if device.type == "cpu" else GPU_TILE
    block_c = triton.next_power_of_2(channels) if whole_rows else chunk_width(channels, tile)
    block_m = max(1, min(triton.next_power_of_2(max(rows, 1)), tile // block_c))
    num_warps = max(4, min(16, block_m * block_c // 256))
    return Blocking(block_m, block_c, whole_rows, num_warps)


def new_output(x):
    """The op's output buffer (tests replace this to poison it)."""
    return torch.empty_like(x)


def per_head_strides(tensor, batch):
    """(rows_per_head, stride_h, stride_n, stride_c) of an optional [H, N, C] tensor."""
    if tensor is None:
        return 1, 0, 0, 0
    return (batch // tensor.shape[0], *tensor.stride())


def branch_launch_args(x, prev, prev2, prev3, delta, trend, coef_values, coef_tensor):
    """Per-branch launch arguments: tensors or x as a stand-in, strides, floats and flags.

    coef_values: the 5 floats (alpha, beta1, gamma, beta2, beta3) of the split form; coef_tensor:
    float32 [P], P in {3, 4, 5}, or None. The flags of the five terms (HAS_DELTA, HAS_PREV,
    HAS_TREND, HAS_PREV2, HAS_PREV3) are on when the term's tensors exist and, for a float
    coefficient, it is non-zero (for a tensor, when P covers it). The floats of the terms that are
    off are passed as 0.0."""
    batch = x.shape[0]
    coef_is_tensor = coef_tensor is not None
    num_coefs = coef_tensor.shape[0] if coef_is_tensor else len(coef_values)
    values = (0.0,) * 5 if coef_is_tensor else tuple(coef_values) + (0.0,) * (5 - len(coef_values))
    present = (delta is not None, prev is not None, trend is not None,
               prev is not None and prev2 is not None, prev2 is not None and prev3 is not None)
    flags = tuple(given and slot < num_coefs and (coef_is_tensor or values[slot] != 0.0)
                  for slot, given in enumerate(present))
    has_delta, has_prev, has_trend, has_prev2, has_prev3 = flags
    reads_prev = has_prev or has_prev2  # C_1: β₁ and β₂
    reads_prev2 = has_prev2 or has_prev3  # C_2: β₂ and β₃
    delta_rows_per_head, *delta_strides = per_head_strides(delta if has_delta else None, batch)
    trend_rows_per_head, *trend_strides = per_head_strides(trend if has_trend else None, batch)
    return dict(
        prev=prev if reads_prev else x, prev2=prev2 if reads_prev2 else x, prev3=prev3 if has_prev3 else x,
        delta=delta if has_delta else x, trend=trend if has_trend else x,
        coef=coef_tensor if coef_is_tensor else x,
        delta_rows_per_head=delta_rows_per_head, trend_rows_per_head=trend_rows_per_head,
        prev_strides=prev.stride() if reads_prev else (0, 0, 0),
        prev2_strides=prev2.stride() if reads_prev2 else (0, 0, 0),
        prev3_strides=prev3.stride() if has_prev3 else (0, 0, 0),
        delta_strides=delta_strides, trend_strides=trend_strides,
        coef_stride=coef_tensor.stride(0) if coef_is_tensor else 0,
        coef_values=tuple(value if on else 0.0 for value, on in zip(values, flags)), flags=flags,
        coef_is_tensor=coef_is_tensor)


def check_runnable(op, x):
    """Raises unless the Triton kernels can run on x's device."""
    if not is_available(x.device):
        raise RuntimeError(f"{op} runs a Triton kernel: it needs CUDA tensors, or CPU tensors with "
                           f"TRITON_INTERPRET=1 set before triton is imported; got {x.device}")


def is_available(device):
    """The triton backend runs on CUDA, and on CPU under the interpreter (tests)."""
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETED)
