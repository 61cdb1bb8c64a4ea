"""Eager PyTorch reference of the EOC cache-reuse ops: the ground truth of every test.

Implements the correction and the online per-token judgment of DESIGN §2 ("Correction",
"Judgment" level 2) with the op semantics of DESIGN §3 (``cached_branch``, ``cached_block``,
``cached_segment``), generalised to K history differences (issue 10, DESIGN §2.2): with the
coefficient vector c = (α, β₁, γ[, β₂[, β₃]]) of length P ∈ {3, 4, 5} and the history C_0 (the latest
computed feature, ``cache``), C_1 (``prev``), C_2 (``prev2``), C_3 (``prev3``),

    corr = α·D + β₁·(C_0 − C_1) + γ·(C_0 ⊙ E) + β₂·(C_1 − C_2) + β₃·(C_2 − C_3)
    F̂    = C_0 + [per-token judgment](corr)

accumulated in fp32 in exactly that order, so P = 3 is bit-identical to the three-term formula
F̂ = Cc + α·D + β·(Cc − Cp) + γ·(Cc ⊙ E). The same forecast in weights form is
F̂ = Σ_{j=0..K} w_j·C_j + α·D + γ·(C_0 ⊙ E) with Σ w_j = 1 (``history_weights`` /
``history_coefficients`` convert between the two).

All arithmetic is fp32 on upcast inputs, with one rounding to ``x.dtype`` at the end. This is the
plain math: inputs are assumed checked (see ``_validation.py``), it runs on any device, and tensor
coefficients and thresholds stay tensors (no ``.item()``, no host sync).
"""

import math
import numbers

import torch

from .errors import InputTypeError, InputValueError

_NORM_EPS = 1e-6  # keeps the judgment score finite for an all-zero cached token
#: Coefficients per branch: (alpha, beta1, gamma, beta2, beta3); a shorter coef means trailing zeros.
MAX_COEFS = 5
MAX_HISTORY = MAX_COEFS - 2  # K: history differences C_{i-1} - C_i, i = 1..K
_SUM_TOLERANCE = 1e-9  # history_coefficients: |Σ w − 1| allowed


def _history_values(name, values, *, at_least):
    """values as a tuple of finite Python floats (not bool), at least at_least of them."""
    if isinstance(values, torch.Tensor) or not isinstance(values, (tuple, list)):
        raise InputTypeError(f"{name} must be a tuple or list of Python numbers, got {type(values).__name__}")
    if len(values) < at_least:
        raise InputValueError(f"{name} must have at least {at_least} entries, got {len(values)}")
    for value in values:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise InputTypeError(f"{name} entries must be Python numbers (not bool), got {type(value).__name__}")
        if not math.isfinite(value):
            raise InputValueError(f"{name} entries must be finite (no NaN or inf), got {tuple(values)}")
    return tuple(float(value) for value in values)


def history_weights(betas):
    """The weights (w_0, ..., w_K) of the history C_0..C_K for the differences' coefficients (β₁..β_K).

    β₁·(C_0 − C_1) + ... + β_K·(C_{K−1} − C_K) + C_0 = Σ_j w_j·C_j with w_0 = 1 + β₁,
    w_j = β_{j+1} − β_j (0 < j < K) and w_K = −β_K; Σ w_j = 1. betas: K >= 0 Python numbers (K = 0
    gives (1.0,)). Float64 math (Python floats).
    """
    betas = _history_values("history_weights: betas", betas, at_least=0)
    if not betas:
        return (1.0,)
    padded = (0.0, *betas, 0.0)  # β_0 = 0 stands for the implicit 1·C_0, β_{K+1} = 0
    weights = [padded[j + 1] - padded[j] for j in range(len(betas) + 1)]
    weights[0] += 1.0
    return tuple(weights)


def history_coefficients(weights):
    """The differences' coefficients (β₁..β_K) of history weights (w_0, ..., w_K): history_weights' inverse.

    β_i = w_0 + ... + w_{i−1} − 1. The weights must sum to 1 (an affine combination: a constant
    history forecasts itself), within 1e-9, else ValueError. weights: K + 1 >= 1 Python numbers.
    Float64 math (Python floats); a single weight (1.0,) gives ().
    """
    weights = _history_values("history_coefficients: weights", weights, at_least=1)
    total = math.fsum(weights)
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise InputValueError(f"history_coefficients: weights must sum to 1 (within {_SUM_TOLERANCE:g}), got "
                         f"sum {total!r} for {weights}")
    return tuple(math.fsum([*weights[:i], -1.0]) for i in range(1, len(weights)))  # correctly rounded


def _per_row(per_head, batch):
    """[H, N, C] -> fp32 [B, N, C]: batch row b uses entry b // (B // H)."""
    return per_head.float().repeat_interleave(batch // per_head.shape[0], dim=0)


def _scaled(c, term):
    """c · term(), where a zero coefficient contributes exactly 0 (the kernels never read its
    tensor, so whatever it holds — even NaN in a never-written cache slot — must not leak in)."""
    if isinstance(c, torch.Tensor):
        return torch.where(c != 0, c * term(), 0.0)
    return c * term() if c != 0 else 0.0


def coefficients(coef):
    """(alpha, beta1, gamma, beta2, beta3) of a coef of length 3..5 (Python numbers or a [P] tensor's
    0-d entries), the missing trailing ones 0.0."""
    values = tuple(coef)  # a tensor gives its 0-d entries: no host sync
    return values + (0.0,) * (MAX_COEFS - len(values))


def corrected_feature(cache, *, prev=None, prev2=None, prev3=None, delta=None, trend=None,
                      coef=(0.0, 0.0, 0.0), token_threshold=0.0):
    """The reused branch feature F̂ after the per-token judgment, as a new fp32 [B, N, C] tensor.

    cache = C_0, prev = C_1, prev2 = C_2, prev3 = C_3 are [B, N, C]; delta and trend are [H, N, C]
    with H dividing B. coef = (α, β₁, γ[, β₂[, β₃]]): 3 to 5 Python numbers or a [P] tensor, P in
    {3, 4, 5}. corr = α·D + β₁·(C_0 − C_1) + γ·(C_0 ⊙ E) + β₂·(C_1 − C_2) + β₃·(C_2 − C_3), summed in
    that order; a term is applied only when its tensors are given (β_i needs C_{i−1} and C_i), and a
    zero coefficient contributes exactly 0 without its tensors being used (``_scaled``).
    Token (b, n) keeps its correction corr only if ||corr|| / (||C_0|| + 1e-6) > token_threshold
    (norms over channels), or token_threshold <= 0; otherwise F̂ = C_0 there. token_threshold: a
    Python number or a one-element tensor.
    """
    cached = cache.float()  # [B, N, C]
    batch = cached.shape[0]
    alpha, beta, gamma, beta2, beta3 = coefficients(coef)
    corr = torch.zeros_like(cached)
    if delta is not None:
        corr = corr + _scaled(alpha, lambda: _per_row(delta, batch))
    if prev is not None:
        corr = corr + _scaled(beta, lambda: cached - prev.float())
    if trend is not None:
        corr = corr + _scaled(gamma, lambda: cached * _per_row(trend, batch))
    if prev is not None and prev2 is not None:
        corr = corr + _scaled(beta2, lambda: prev.float() - prev2.float())
    if prev2 is not None and prev3 is not None:
        corr = corr + _scaled(beta3, lambda: prev2.float() - prev3.float())

    # Online judgment: size of the correction relative to the cached feature, per token.
    score = torch.linalg.vector_norm(corr, dim=-1) / (
        torch.linalg.vector_norm(cached, dim=-1) + _NORM_EPS)  # [B, N]
    if isinstance(token_threshold, torch.Tensor):
        token_threshold = token_threshold.reshape(())
    # A NaN score fails `score > threshold`: such a token is corrected only when threshold <= 0.
    corrected = (score > token_threshold) | (token_threshold <= 0)  # [B, N]
    return cached + torch.where(corrected[..., None], corr, 0.0)


def cached_branch(x, gate, cache, *, prev=None, prev2=None, prev3=None, delta=None, trend=None,
                  coef=(0.0, 0.0, 0.0), token_threshold=0.0):
    """x + gate[:, None, :] ⊙ F̂ for one reused branch, in x.dtype.

    x, cache, prev, prev2, prev3: [B, N, C]; gate: [B, C]; delta, trend: [H, N, C]. F̂ as in
    corrected_feature.
    """
    fhat = corrected_feature(cache, prev=prev, prev2=prev2, prev3=prev3, delta=delta, trend=trend,
                             coef=coef, token_threshold=token_threshold)
    return (x.float() + gate.float()[:, None, :] * fhat).to(x.dtype)


def cached_block(x, gate_attn, gate_mlp, cache_attn, cache_mlp, *, prev_attn=None, prev_mlp=None,
                 prev2_attn=None, prev2_mlp=None, prev3_attn=None, prev3_mlp=None,
                 delta_attn=None, delta_mlp=None, trend_attn=None, trend_mlp=None,
                 coef_attn=(0.0, 0.0, 0.0), coef_mlp=(0.0, 0.0, 0.0), token_threshold=0.0):
    """x + gate_attn[:, None, :] ⊙ F̂_attn + gate_mlp[:, None, :] ⊙ F̂_mlp, in x.dtype.

    One block whose attention and MLP branches are both reused; each branch is judged on its own
    correction against the shared token_threshold, and each branch's coef has its own length 3..5.
    Shapes as in cached_branch, per branch.
    """
    fhat_attn = corrected_feature(cache_attn, prev=prev_attn, prev2=prev2_attn, prev3=prev3_attn,
                                  delta=delta_attn, trend=trend_attn, coef=coef_attn,
                                  token_threshold=token_threshold)
    fhat_mlp = corrected_feature(cache_mlp, prev=prev_mlp, prev2=prev2_mlp, prev3=prev3_mlp,
                                 delta=delta_mlp, trend=trend_mlp, coef=coef_mlp,
                                 token_threshold=token_threshold)
    out = (x.float() + gate_attn.float()[:, None, :] * fhat_attn
           + gate_mlp.float()[:, None, :] * fhat_mlp)
    return out.to(x.dtype)


def segment_history(num_generations, num_coefs):
    """K, the history differences a segment applies: i <= G − 1 and i <= P − 2 (0 without coef)."""
    return 0 if num_coefs is None else min(num_generations - 1, num_coefs - 2)


def cached_segment(x, gates, cache, generation, *, delta=None, trend=None, coef=None,
                   token_threshold=0.0):
    """x + Σ_{s,k} gates[:, s, k, None, :] ⊙ F̂_{s,k} over S consecutive reused blocks, in x.dtype.

    The sum of the cached_block increments of the S blocks, accumulated in fp32 in the order
    (s = 0, attention), (s = 0, MLP), (s = 1, attention), ... and rounded once.
    x: [B, N, C]; gates: [B, S, 2, C] (branch 0 = attention, 1 = MLP); cache: [G, S, 2, B, N, C]
    with G in {1, 2, 3, 4}, a ring of generations; generation: integer [S, 2], the generation
    holding C_0 of entry (s, k); C_j of that entry is generation (generation − j) mod G. delta,
    trend: [S, 2, H, N, C]; coef: float32 [S, 2, P] of (α, β₁, γ[, β₂[, β₃]]) per entry, P in
    {3, 4, 5}, or None for plain reuse (then delta, trend and the other generations are not read).
    History term i is applied iff i <= G − 1 and i <= P − 2 (``segment_history``). F̂_{s,k} as in
    corrected_feature, with the one token_threshold. Generations are picked with index_select on the
    device: no host sync (an out-of-range generation is an index error there; the public op rejects
    it first, see eoc_kernels.cached_segment).
    """
    num_generations, blocks = cache.shape[:2]
    history = segment_history(num_generations, None if coef is None else coef.shape[-1])
    out = x.float()  # [B, N, C]
    for s in range(blocks):
        for k in range(2):
            entry = cache[:, s, k]  # [G, B, N, C]
            terms = {}
            if num_generations == 1:
                current = entry[0]
            else:
                gen = generation[s, k].reshape(1).long()  # [1], stays on the device
                current = entry.index_select(0, gen)[0]
                for j, name in zip(range(1, history + 1), ("prev", "prev2", "prev3")):
                    terms[name] = entry.index_select(0, torch.remainder(gen - j, num_generations))[0]
            if coef is not None:
                terms |= dict(coef=coef[s, k],
                              delta=None if delta is None else delta[s, k],
                              trend=None if trend is None else trend[s, k])
            fhat = corrected_feature(current, **terms, token_threshold=token_threshold)
            out = out + gates[:, s, k].float()[:, None, :] * fhat
    return out.to(x.dtype)
