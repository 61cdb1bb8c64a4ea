"""Eager PyTorch reference of the EOC cache-reuse ops: the ground truth of every test.

Implements the correction and the online per-token judgment of DESIGN §2 ("Correction",
"Judgment" level 2) with the op semantics of DESIGN §3 (``cached_branch``, ``cached_block``,
``cached_segment``):

    F̂ = Cc + α·D + β·(Cc − Cp) + γ·(Cc ⊙ E)

All arithmetic is fp32 on upcast inputs, with one rounding to ``x.dtype`` at the end. This is the
plain math: inputs are assumed checked (see ``_validation.py``), it runs on any device, and tensor
coefficients and thresholds stay tensors (no ``.item()``, no host sync).
"""

import torch

_NORM_EPS = 1e-6  # keeps the judgment score finite for an all-zero cached token


def _per_row(per_head, batch):
    """[H, N, C] -> fp32 [B, N, C]: batch row b uses entry b // (B // H)."""
    return per_head.float().repeat_interleave(batch // per_head.shape[0], dim=0)


def _scaled(c, term):
    """c · term(), where a zero coefficient contributes exactly 0 (the kernels never read its
    tensor, so whatever it holds — even NaN in a never-written cache slot — must not leak in)."""
    if isinstance(c, torch.Tensor):
        return torch.where(c != 0, c * term(), 0.0)
    return c * term() if c != 0 else 0.0


def corrected_feature(cache, *, prev=None, delta=None, trend=None, coef=(0.0, 0.0, 0.0),
                      token_threshold=0.0):
    """The reused branch feature F̂ after the per-token judgment, as a new fp32 [B, N, C] tensor.

    cache and prev are [B, N, C]; delta and trend are [H, N, C] with H dividing B; a term is
    applied only when its tensor is given. coef = (α, β, γ): Python numbers or a [3] tensor.
    Token (b, n) keeps its correction corr = F̂ − Cc only if
    ||corr|| / (||Cc|| + 1e-6) > token_threshold (norms over channels), or token_threshold <= 0;
    otherwise F̂ = Cc there. token_threshold: a Python number or a one-element tensor.
    """
    cached = cache.float()  # [B, N, C]
    batch = cached.shape[0]
    alpha, beta, gamma = coef
    corr = torch.zeros_like(cached)
    if delta is not None:
        corr = corr + _scaled(alpha, lambda: _per_row(delta, batch))
    if prev is not None:
        corr = corr + _scaled(beta, lambda: cached - prev.float())
    if trend is not None:
        corr = corr + _scaled(gamma, lambda: cached * _per_row(trend, batch))

    # Online judgment: size of the correction relative to the cached feature, per token.
    score = torch.linalg.vector_norm(corr, dim=-1) / (
        torch.linalg.vector_norm(cached, dim=-1) + _NORM_EPS)  # [B, N]
    if isinstance(token_threshold, torch.Tensor):
        token_threshold = token_threshold.reshape(())
    # A NaN score fails `score > threshold`: such a token is corrected only when threshold <= 0.
    corrected = (score > token_threshold) | (token_threshold <= 0)  # [B, N]
    return cached + torch.where(corrected[..., None], corr, 0.0)


def cached_branch(x, gate, cache, *, prev=None, delta=None, trend=None, coef=(0.0, 0.0, 0.0),
                  token_threshold=0.0):
    """x + gate[:, None, :] ⊙ F̂ for one reused branch, in x.dtype.

    x, cache, prev: [B, N, C]; gate: [B, C]; delta, trend: [H, N, C]. F̂ as in corrected_feature.
    """
    fhat = corrected_feature(cache, prev=prev, delta=delta, trend=trend, coef=coef,
                             token_threshold=token_threshold)
    return (x.float() + gate.float()[:, None, :] * fhat).to(x.dtype)


def cached_block(x, gate_attn, gate_mlp, cache_attn, cache_mlp, *, prev_attn=None, prev_mlp=None,
                 delta_attn=None, delta_mlp=None, trend_attn=None, trend_mlp=None,
                 coef_attn=(0.0, 0.0, 0.0), coef_mlp=(0.0, 0.0, 0.0), token_threshold=0.0):
    """x + gate_attn[:, None, :] ⊙ F̂_attn + gate_mlp[:, None, :] ⊙ F̂_mlp, in x.dtype.

    One block whose attention and MLP branches are both reused; each branch is judged on its own
    correction against the shared token_threshold. Shapes as in cached_branch, per branch.
    """
    fhat_attn = corrected_feature(cache_attn, prev=prev_attn, delta=delta_attn, trend=trend_attn,
                                  coef=coef_attn, token_threshold=token_threshold)
    fhat_mlp = corrected_feature(cache_mlp, prev=prev_mlp, delta=delta_mlp, trend=trend_mlp,
                                 coef=coef_mlp, token_threshold=token_threshold)
    out = (x.float() + gate_attn.float()[:, None, :] * fhat_attn
           + gate_mlp.float()[:, None, :] * fhat_mlp)
    return out.to(x.dtype)


def cached_segment(x, gates, cache, generation, *, delta=None, trend=None, coef=None,
                   token_threshold=0.0):
    """x + Σ_{s,k} gates[:, s, k, None, :] ⊙ F̂_{s,k} over S consecutive reused blocks, in x.dtype.

    The sum of the cached_block increments of the S blocks, accumulated in fp32 in the order
    (s = 0, attention), (s = 0, MLP), (s = 1, attention), ... and rounded once.
    x: [B, N, C]; gates: [B, S, 2, C] (branch 0 = attention, 1 = MLP); cache: [G, S, 2, B, N, C]
    with G in {1, 2}; generation: integer [S, 2], the generation holding Cc of entry (s, k) (when
    G == 2 the other one holds Cp; when G == 1 it is not read); delta, trend: [S, 2, H, N, C];
    coef: float32 [S, 2, 3] of (α, β, γ) per entry, or None for plain reuse (then delta, trend and
    the previous generation are not read). F̂_{s,k} as in corrected_feature, with the one
    token_threshold. Generations are picked with index_select on the device: no host sync (an
    out-of-range generation is an index error there; the public op rejects it first, see
    eoc_kernels.cached_segment).
    """
    num_generations, blocks = cache.shape[:2]
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
                if coef is not None:
                    terms["prev"] = entry.index_select(0, 1 - gen)[0]
            if coef is not None:
                terms |= dict(coef=coef[s, k],
                              delta=None if delta is None else delta[s, k],
                              trend=None if trend is None else trend[s, k])
            fhat = corrected_feature(current, **terms, token_threshold=token_threshold)
            out = out + gates[:, s, k].float()[:, None, :] * fhat
    return out.to(x.dtype)
