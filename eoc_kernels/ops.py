"""Public EOC ops (DESIGN §3): check the inputs, pick a backend (``dispatch.py``), run it.

Every backend computes exactly what ``reference.py`` computes, up to fp32 rounding order, and is
differentiable with the reference's gradients (the triton backend's backward recomputes it).

The correction uses up to K = 3 history differences (issue 10, DESIGN §2.2): coef is
(alpha, beta1, gamma[, beta2[, beta3]]) of length P in {3, 4, 5}; a length-3 coef is the three-term
correction of DESIGN §2.2, bit for bit.
"""

from . import _validation
from .dispatch import get_impl

_ZERO_COEF = (0.0, 0.0, 0.0)


def cached_branch(x, gate, cache, *, prev=None, prev2=None, prev3=None, delta=None, trend=None,
                  coef=_ZERO_COEF, token_threshold=0.0, backend=None):
    """One reused branch of a DiT block with the EOC correction: x + gate[:, None, :] ⊙ F̂.

    Eager equivalent (all in fp32 on upcast inputs, one rounding to x.dtype at the end)::

        alpha, beta1, gamma, beta2, beta3 = (*coef, 0.0, 0.0)[:5]      # missing ones are 0
        C0, C1, C2, C3 = cache.float(), prev.float(), prev2.float(), prev3.float()
        corr = (alpha * D + beta1 * (C0 - C1) + gamma * (C0 * E)        # summed in this order;
                + beta2 * (C1 - C2) + beta3 * (C2 - C3))                # absent tensor: no term
        s = corr.norm(dim=-1) / (C0.norm(dim=-1) + 1e-6)                # [B, N]
        keep = (s > token_threshold) | (token_threshold <= 0)
        fhat = C0 + torch.where(keep[..., None], corr, 0)
        out = (x.float() + gate.float()[:, None, :] * fhat).to(x.dtype)

    where D, E are delta, trend broadcast over batch halves: row b uses entry b // (B // H). A zero
    coefficient contributes exactly 0 and its tensors are not read (they may hold NaN). In weights
    form the history part is Σ_j w_j·C_j with Σ w_j = 1 (``eoc_kernels.reference.history_weights``
    and ``history_coefficients`` convert).

    Args:
        x, cache: [B, N, C]; the residual stream and the latest cached branch output C_0 (before the
            gate).
        prev, prev2, prev3: optional [B, N, C], the cached outputs C_1, C_2, C_3 before it (latest
            first); prev2 needs prev and prev3 needs prev2 (else ValueError). History tensors beyond
            what coef's length uses are not read.
        gate: [B, C], the branch's adaLN gate.
        delta, trend: optional [H, N, C] prior delta and prior trend embedding, H dividing B.
        coef: (alpha, beta1, gamma[, beta2[, beta3]]) as 3, 4 or 5 Python numbers, or a float32
            tensor [P] with P in {3, 4, 5} on x's device.
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
    _validation.check_branch(op, x, "", gate=gate, cache=cache, prev=prev, prev2=prev2, prev3=prev3,
                             delta=delta, trend=trend, coef=coef)
    _validation.check_token_threshold(op, token_threshold, x.device)
    impl = get_impl(op, backend, x.device)
    return impl(x, gate, cache, prev=prev, prev2=prev2, prev3=prev3, delta=delta, trend=trend, coef=coef,
                token_threshold=token_threshold)


def cached_block(x, gate_attn, gate_mlp, cache_attn, cache_mlp, *, prev_attn=None, prev_mlp=None,
                 prev2_attn=None, prev2_mlp=None, prev3_attn=None, prev3_mlp=None,
                 delta_attn=None, delta_mlp=None, trend_attn=None, trend_mlp=None,
                 coef_attn=_ZERO_COEF, coef_mlp=_ZERO_COEF, token_threshold=0.0, backend=None):
    """One DiT block whose attention and MLP branches are both reused, with the EOC correction.

    Eager equivalent (fhat per branch as in cached_branch, each judged on its own correction
    against the one shared token_threshold; fp32 throughout, one rounding at the end)::

        out = (x.float() + gate_attn.float()[:, None, :] * fhat_attn
               + gate_mlp.float()[:, None, :] * fhat_mlp).to(x.dtype)

    This is cached_branch applied twice (attention, then MLP) up to rounding order, since a reused
    branch does not read x.

    Args:
        x, cache_attn, cache_mlp: [B, N, C].
        prev_*, prev2_*, prev3_*: optional [B, N, C], each branch's history C_1, C_2, C_3 as in
            cached_branch.
        gate_attn, gate_mlp: [B, C].
        delta_attn, delta_mlp, trend_attn, trend_mlp: optional [H, N, C], H dividing B (H may
            differ between them).
        coef_attn, coef_mlp: as cached_branch's coef, each of its own length 3, 4 or 5.
        token_threshold, backend: as in cached_branch.
    All tensors share x's dtype (float32, float16 or bfloat16) and device. Returns a new
    [B, N, C] tensor of x's dtype.
    """
    op = "cached_block"
    _validation.check_features(op, x)
    _validation.check_branch(op, x, "_attn", gate=gate_attn, cache=cache_attn, prev=prev_attn,
                             prev2=prev2_attn, prev3=prev3_attn, delta=delta_attn, trend=trend_attn,
                             coef=coef_attn)
    _validation.check_branch(op, x, "_mlp", gate=gate_mlp, cache=cache_mlp, prev=prev_mlp,
                             prev2=prev2_mlp, prev3=prev3_mlp, delta=delta_mlp, trend=trend_mlp,
                             coef=coef_mlp)
    _validation.check_token_threshold(op, token_threshold, x.device)
    impl = get_impl(op, backend, x.device)
    return impl(x, gate_attn, gate_mlp, cache_attn, cache_mlp, prev_attn=prev_attn,
                prev_mlp=prev_mlp, prev2_attn=prev2_attn, prev2_mlp=prev2_mlp, prev3_attn=prev3_attn,
                prev3_mlp=prev3_mlp, delta_attn=delta_attn, delta_mlp=delta_mlp,
                trend_attn=trend_attn, trend_mlp=trend_mlp, coef_attn=coef_attn,
                coef_mlp=coef_mlp, token_threshold=token_threshold)


def cached_segment(x, gates, cache, generation, *, delta=None, trend=None, coef=None,
                   token_threshold=0.0, backend=None):
    """S consecutive DiT blocks whose branches are all reused, with the EOC correction, in one op.

    The semantics are the sum of the cached_block increments of the S blocks (DESIGN §3
    "cached_segment"): a cached FORA step is one call reading every cache entry once and writing x
    once. Eager equivalent (fp32 throughout, one rounding at the end)::

        G, P = cache.shape[0], coef.shape[-1]
        K = min(G - 1, P - 2)                                  # history differences applied
        out = x.float()
        for s in range(S):
            for k in (0, 1):                                   # 0 = attention, 1 = MLP
                g = generation[s, k]                           # on the device, never .item()
                C = [cache[(g - j) % G, s, k] for j in range(K + 1)]   # C_0 .. C_K, a ring
                fhat = corrected_feature(C[0], prev=C[1], prev2=C[2], prev3=C[3],  # those that exist
                                         delta=delta[s, k], trend=trend[s, k],
                                         coef=coef[s, k], token_threshold=token_threshold)
                out = out + gates[:, s, k].float()[:, None, :] * fhat
        out = out.to(x.dtype)

    with corrected_feature from eoc_kernels.reference (corr = α·D + β₁·(C_0 − C_1) + γ·(C_0 ⊙ E)
    + β₂·(C_1 − C_2) + β₃·(C_2 − C_3), then the per-token judgment of cached_branch). coef=None is
    plain reuse: F̂ = C_0, and delta, trend and the other generations are not read.

    Args:
        x: [B, N, C], the residual stream entering the first block of the segment.
        gates: [B, S, 2, C], the adaLN gate rows of the S blocks (branch 0 = attention, 1 = MLP);
            may be a strided view.
        cache: [G, S, 2, B, N, C] with G in {1, 2, 3, 4}, a ring of generations, typically a view
            ``buffer[:, l0:l1]`` of the stacked cache buffer [G, L, 2, B, N, C]; may be a strided
            view.
        generation: int32 or int64 [S, 2] on x's device: the generation holding C_0 of entry (s, k);
            C_j is generation (generation − j) mod G. Values must be in 0..G-1: on the CPU a bad
            value raises ValueError; on CUDA it is checked without a host sync by a device-side
            assert (``torch._assert_async``), which aborts the CUDA context like any out-of-range
            index (the Triton kernel clamps the value, so it never reads outside the cache).
        delta, trend: optional [S, 2, H, N, C] prior delta and prior trend embedding per entry, H
            dividing B (row b uses entry b // (B // H)); H may differ between them.
        coef: optional float32 [S, 2, P], P in {3, 4, 5}, on x's device: (alpha, beta1, gamma[,
            beta2[, beta3]]) per entry; None means all zeros (plain reuse). History term i is
            applied iff i <= G − 1 and i <= P − 2 (with G == 1 no beta is: no C_1 exists). A term
            whose coefficient is zero contributes nothing and its tensors are not read. Must be
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
