"""Public EOC ops (DESIGN §3): check the inputs, pick a backend (``dispatch.py``), run it.

Every backend computes exactly what ``reference.py`` computes, up to fp32 rounding order, and is
differentiable with the reference's gradients (the triton backend's backward recomputes it).
"""

from . import _validation
from .dispatch import get_impl

_ZERO_COEF = (0.0, 0.0, 0.0)


def cached_branch(x, gate, cache, *, prev=None, delta=None, trend=None, coef=_ZERO_COEF,
                  token_threshold=0.0, backend=None):
    """One reused branch of a DiT block with the EOC correction: x + gate[:, None, :] ⊙ F̂.

    Eager equivalent (all in fp32 on upcast inputs, one rounding to x.dtype at the end)::

        alpha, beta, gamma = coef
        Cc = cache.float()
        corr = alpha * D + beta * (Cc - prev.float()) + gamma * (Cc * E)   # absent tensor: no term
        s = corr.norm(dim=-1) / (Cc.norm(dim=-1) + 1e-6)                    # [B, N]
        keep = (s > token_threshold) | (token_threshold <= 0)
        fhat = Cc + torch.where(keep[..., None], corr, 0)
        out = (x.float() + gate.float()[:, None, :] * fhat).to(x.dtype)

    where D, E are delta, trend broadcast over batch halves: row b uses entry b // (B // H).

    Args:
        x, cache, prev: [B, N, C]; the residual stream, the cached branch output (before the gate)
            and, optionally, the one cached before it.
        gate: [B, C], the branch's adaLN gate.
        delta, trend: optional [H, N, C] prior delta and prior trend embedding, H dividing B.
        coef: (alpha, beta, gamma) as 3 Python numbers or a float32 [3] tensor on x's device.
        token_threshold: a Python number or a float32 tensor with one element on x's device.
            coef and token_threshold must be finite: NaN or ±inf raises ValueError for Python
            numbers and CPU tensors; a CUDA tensor's values are not checked (that would sync
            with the host), nor a CPU tensor's while torch.compile traces.
        backend: "auto", "torch", "cpp", "triton" or "cuda" (see dispatch.py); None reads $EOC_BACKEND,
            default "auto".
    All tensors share x's dtype (float32, float16 or bfloat16) and device. Returns a new
    [B, N, C] tensor of x's dtype.
    """
    op = "cached_branch"
    _validation.check_features(op, x)
    _validation.check_branch(op, x, "", gate=gate, cache=cache, prev=prev, delta=delta,
                             trend=trend, coef=coef)
    _validation.check_token_threshold(op, token_threshold, x.device)
    impl = get_impl(op, backend, x.device)
    return impl(x, gate, cache, prev=prev, delta=delta, trend=trend, coef=coef,
                token_threshold=token_threshold)


def cached_block(x, gate_attn, gate_mlp, cache_attn, cache_mlp, *, prev_attn=None,
                 prev_mlp=None, delta_attn=None, delta_mlp=None, trend_attn=None, trend_mlp=None,
                 coef_attn=_ZERO_COEF, coef_mlp=_ZERO_COEF, token_threshold=0.0, backend=None):
    """One DiT block whose attention and MLP branches are both reused, with the EOC correction.

    Eager equivalent (fhat per branch as in cached_branch, each judged on its own correction
    against the one shared token_threshold; fp32 throughout, one rounding at the end)::

        out = (x.float() + gate_attn.float()[:, None, :] * fhat_attn
               + gate_mlp.float()[:, None, :] * fhat_mlp).to(x.dtype)

    This is cached_branch applied twice (attention, then MLP) up to rounding order, since a reused
    branch does not read x.

    Args:
        x, cache_attn, cache_mlp, prev_attn, prev_mlp: [B, N, C].
        gate_attn, gate_mlp: [B, C].
        delta_attn, delta_mlp, trend_attn, trend_mlp: optional [H, N, C], H dividing B (H may
            differ between them).
        coef_attn, coef_mlp, token_threshold, backend: as in cached_branch.
    All tensors share x's dtype (float32, float16 or bfloat16) and device. Returns a new
    [B, N, C] tensor of x's dtype.
    """
    op = "cached_block"
    _validation.check_features(op, x)
    _validation.check_branch(op, x, "_attn", gate=gate_attn, cache=cache_attn, prev=prev_attn,
                             delta=delta_attn, trend=trend_attn, coef=coef_attn)
    _validation.check_branch(op, x, "_mlp", gate=gate_mlp, cache=cache_mlp, prev=prev_mlp,
                             delta=delta_mlp, trend=trend_mlp, coef=coef_mlp)
    _validation.check_token_threshold(op, token_threshold, x.device)
    impl = get_impl(op, backend, x.device)
    return impl(x, gate_attn, gate_mlp, cache_attn, cache_mlp, prev_attn=prev_attn,
                prev_mlp=prev_mlp, delta_attn=delta_attn, delta_mlp=delta_mlp,
                trend_attn=trend_attn, trend_mlp=trend_mlp, coef_attn=coef_attn,
                coef_mlp=coef_mlp, token_threshold=token_threshold)


def cached_segment(x, gates, cache, generation, *, delta=None, trend=None, coef=None,
                   token_threshold=0.0, backend=None):
    """S consecutive DiT blocks whose branches are all reused, with the EOC correction, in one op.

    The semantics are the sum of the cached_block increments of the S blocks (DESIGN §3
    "cached_segment"): a cached FORA step is one call reading every cache entry once and writing x
    once. Eager equivalent (fp32 throughout, one rounding at the end)::

        out = x.float()
        for s in range(S):
            for k in (0, 1):                                   # 0 = attention, 1 = MLP
                g = generation[s, k]                           # on the device, never .item()
                Cc = cache[g, s, k]                            # [B, N, C]
                Cp = cache[1 - g, s, k] if G == 2 else None    # the previous generation
                fhat = corrected_feature(Cc, prev=Cp, delta=delta[s, k], trend=trend[s, k],
                                         coef=coef[s, k], token_threshold=token_threshold)
                out = out + gates[:, s, k].float()[:, None, :] * fhat
        out = out.to(x.dtype)

    with corrected_feature from eoc_kernels.reference (F̂ = Cc + α·D + β·(Cc − Cp) + γ·(Cc ⊙ E),
    then the per-token judgment of cached_branch). coef=None is plain reuse: F̂ = Cc, and delta,
    trend and the previous generation are not read.

    Args:
        x: [B, N, C], the residual stream entering the first block of the segment.
        gates: [B, S, 2, C], the adaLN gate rows of the S blocks (branch 0 = attention, 1 = MLP);
            may be a strided view.
        cache: [G, S, 2, B, N, C] with G in {1, 2}, typically a view ``buffer[:, l0:l1]`` of the
            stacked two-generation cache buffer [G, L, 2, B, N, C]; may be a strided view.
        generation: int32 or int64 [S, 2] on x's device: the generation holding Cc of entry (s, k);
            when G == 2 the other generation holds Cp. Values must be in 0..G-1: on the CPU a bad
            value raises ValueError; on CUDA it is checked without a host sync by a device-side
            assert (``torch._assert_async``), which aborts the CUDA context like any out-of-range
            index (the Triton kernel clamps the value, so it never reads outside the cache).
        delta, trend: optional [S, 2, H, N, C] prior delta and prior trend embedding per entry, H
            dividing B (row b uses entry b // (B // H)); H may differ between them.
        coef: optional float32 [S, 2, 3] on x's device, (alpha, beta, gamma) per entry; None means
            all zeros (plain reuse). With G == 1, beta is ignored: no Cp exists. A term whose
            coefficient is zero contributes nothing and its tensor need not be read. Must be
            finite (checked on the CPU only, see cached_branch).
        token_threshold: a Python number or a float32 tensor with one element on x's device.
        backend: as in cached_branch.
    All feature tensors share x's dtype (float32, float16 or bfloat16) and device. Returns a new
    [B, N, C] tensor of x's dtype.
    """
    op = "cached_segment"
    _validation.check_features(op, x)
    _validation.check_segment(op, x, gates=gates, cache=cache, generation=generation,
                              delta=delta, trend=trend, coef=coef)
    _validation.check_token_threshold(op, token_threshold, x.device)
    impl = get_impl(op, backend, x.device)
    return impl(x, gates, cache, generation, delta=delta, trend=trend, coef=coef,
                token_threshold=token_threshold)
