"""Public EOC ops (DESIGN §3): check the inputs, pick a backend (``dispatch.py``), run it.

Every backend computes exactly what ``reference.py`` computes, up to fp32 rounding order.
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
        backend: "auto", "torch", ... (see dispatch.py); None reads $EOC_BACKEND, default "auto".
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
