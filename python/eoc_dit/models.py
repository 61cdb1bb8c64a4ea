"""DiT: the class-conditional latent Diffusion Transformer, re-implemented without timm.

Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023, arXiv 2212.09748), as released in
facebookresearch/DiT (``models.py``): patchify (Sec. 3.2), DiT blocks with adaLN-Zero conditioning
(Sec. 3.2, Fig. 3), the final adaLN layer and unpatchify, and the twelve model configs of Table 1.

Parameter names and shapes are identical to the original, so its checkpoints (e.g. the released
``DiT-XL-2-256x256.pt``, or the ``"ema"``/``"model"`` entries of a DiT training checkpoint) load with
``load_state_dict`` unchanged; :func:`load_dit` infers the config from the state dict. The
differences from the original are deliberate and small:

* attention always runs through ``torch.nn.functional.scaled_dot_product_attention`` (as timm's
  fused path does), so outputs match the original up to attention-kernel rounding;
* :meth:`DiT.forward_with_cfg` guides all ``in_channels`` eps channels, where the original guided only
  the first 3 of 4;
* :meth:`DiT.forward` checks the shapes and dtypes of its inputs (never their values: that would need
  a host sync).

The block maths lives in :func:`dit_modulation`, :func:`dit_attn_branch` and :func:`dit_mlp_branch`:
:meth:`DiTBlock.forward` is made of them and the caching engine calls the same functions, so an
all-compute patched run is bit-identical to the unpatched model by construction.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputFileNotFoundError, InputTypeError, InputValueError

__all__ = [
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "TimestepEmbedder",
    "LabelEmbedder",
    "modulate",
    "dit_modulation",
    "dit_gates",
    "dit_attn_branch",
    "dit_mlp_branch",
    "get_2d_sincos_pos_embed",
    "DIT_CONFIGS",
    "DiT_models",
    "load_dit",
]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x * (1 + scale) + shift`` with ``x`` [B, N, C] and ``shift``/``scale`` [B, C]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------------------------------
# Embedding layers for patches, timesteps and class labels
# --------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Image to patch tokens: a Conv2d with kernel = stride = patch, flattened to [B, N, C].

    Named like timm's ``PatchEmbed`` (``proj``) so the original checkpoints load.
    """

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = (patch_size, patch_size)  # a tuple, as in timm: DiT code reads patch_size[0]
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size * self.grid_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, C, H/p, W/p]
        return x.flatten(2).transpose(1, 2)  # [B, N, C]


class TimestepEmbedder(nn.Module):
    """Embeds scalar (possibly fractional) timesteps: sinusoidal features, then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        """Sinusoidal embedding [B, dim] of ``t`` [B], as in GLIDE and DiT: ``cat([cos, sin])``."""
        half = dim // 2
        # Built on t's device (DiT builds it on the CPU and copies it over, which a CUDA graph cannot capture).
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]  # [B, half]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # fp32 [B, 256]
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # [B, C], in the model's dtype


class LabelEmbedder(nn.Module):
    """Embeds class labels; with ``dropout_prob > 0`` row ``num_classes`` is the CFG null class.

    During training labels are replaced by the null class with probability ``dropout_prob``;
    ``force_drop_ids`` (1 = drop) overrides the random choice, in training and in eval.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            # Drawn on the labels' device (the original drew on the CPU): no host-device mixing in torch.where.
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # [B, C]


# --------------------------------------------------------------------------------------------------
# Transformer layers
# --------------------------------------------------------------------------------------------------


def _linear(linear: nn.Linear, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``linear(x)`` for x [B, N, C_in]; with ``out`` [B, N, C_out] the result is written into it
    (``torch.addmm(..., out=)``, the op ``F.linear`` runs for a contiguous 3-D input)."""
    if out is None:
        return linear(x)
    if torch.is_grad_enabled():  # out= ops are not differentiable: compute, then copy
        return out.copy_(linear(x))
    flat = x.reshape(-1, x.shape[-1])
    torch.addmm(linear.bias, flat, linear.weight.t(), out=out.view(flat.shape[0], -1))
    return out


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm's ``Attention`` names)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise InputValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, N, C] → [B, N, C]; with ``out`` (a contiguous [B, N, C] tensor) the output
        projection writes straight into it (the caching engine passes a slot of its cache buffer)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, D]
        x = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, D]
        x = x.transpose(1, 2).reshape(B, N, C)
        return _linear(self.proj, x, out)


class Mlp(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))`` (timm's ``Mlp`` names, without the no-op dropouts)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, N, C] → [B, N, C]; ``out`` as in :meth:`Attention.forward`."""
        return _linear(self.fc2, self.act(self.fc1(x)), out)


def dit_modulation(block: nn.Module, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The six adaLN-Zero chunks of a DiT block, each [B, C]:
    (shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp) = adaLN_modulation(c).chunk(6)."""
    return block.adaLN_modulation(c).chunk(6, dim=1)


def dit_gates(modulation: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_attn, gate_mlp), each [B, C], of :func:`dit_modulation`'s chunks."""
    return modulation[2], modulation[5]


def dit_attn_branch(block: nn.Module, x: torch.Tensor, modulation, out: torch.Tensor | None = None) -> torch.Tensor:
    """The attention-branch output before its gate, ``attn(modulate(norm1(x), shift_attn, scale_attn))``, [B, N, C].

    ``out`` (a contiguous [B, N, C] tensor): the output projection writes straight into it (the caching
    engine passes a slot of its cache buffer); a foreign attention module's result is copied there.
    """
    h = modulate(block.norm1(x), modulation[0], modulation[1])
    if isinstance(block.attn, Attention):
        return block.attn(h, out=out)
    return _into(out, block.attn(h))


def dit_mlp_branch(block: nn.Module, x: torch.Tensor, modulation, out: torch.Tensor | None = None) -> torch.Tensor:
    """The MLP-branch output before its gate, ``mlp(modulate(norm2(x), shift_mlp, scale_mlp))``, [B, N, C];
    ``out`` as in :func:`dit_attn_branch`."""
    h = modulate(block.norm2(x), modulation[3], modulation[4])
    if isinstance(block.mlp, Mlp):
        return block.mlp(h, out=out)
    return _into(out, block.mlp(h))


def _into(out: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if out is None else out.copy_(value)


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning (paper Fig. 3, right).

    Its forward is made of :func:`dit_modulation`, :func:`dit_attn_branch` and :func:`dit_mlp_branch`,
    the same functions the caching engine calls (``adapters.DiTBlockAdapter``), so a patched block that
    computes both branches is bit-identical to this forward by construction.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``x`` [B, N, C] tokens, ``c`` [B, C] conditioning → [B, N, C]."""
        modulation = dit_modulation(self, c)
        gate_attn, gate_mlp = dit_gates(modulation)
        x = x + gate_attn.unsqueeze(1) * dit_attn_branch(self, x, modulation)
        x = x + gate_mlp.unsqueeze(1) * dit_mlp_branch(self, x, modulation)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from tokens to patches of ``out_channels``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x)  # [B, N, p * p * out_channels]


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone (the original DiT, parameter-name compatible).

    ``forward(x, t, y)``: ``x`` [B, in_channels, input_size, input_size] float latents, ``t`` [B]
    timesteps, ``y`` [B] int64/int32 labels in ``[0, num_classes]`` (``num_classes`` is the null
    class) → [B, out_channels, input_size, input_size]; ``out_channels = 2 * in_channels`` when
    ``learn_sigma`` (eps, then the variance interpolation values).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        for name, value in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                            ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads),
                            ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputValueError(f"{name} must be an int >= 1, got {value!r}")
        if input_size % patch_size:
            raise InputValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        if hidden_size % 4:
            raise InputValueError(f"hidden_size={hidden_size} must be divisible by 4 (2-D sin-cos position embedding)")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.class_dropout_prob = class_dropout_prob
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.num_tokens = self.x_embedder.num_patches
        # Fixed 2-D sin-cos embedding, stored as a frozen parameter so checkpoints carry it.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialization: xavier linears, sin-cos positions, adaLN-Zero and a zero output layer."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        pos_embed = get_2d_sincos_pos_embed(self.hidden_size, self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # The patch embedding is initialized like an nn.Linear rather than an nn.Conv2d.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity ...
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        # ... and the model starts by predicting zero.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p * p * out_channels] patch tokens → [B, out_channels, H, W] images."""
        c, p, h = self.out_channels, self.patch_size, self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        # Shapes and dtypes only: checking label values would need a host sync.
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputTypeError(f"x must be a floating-point tensor, got {_describe(x)}")
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise InputValueError(f"x must have shape [B, {', '.join(map(str, expected))}], got {list(x.shape)}")
        batch = x.shape[0]
        if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.is_complex():
            raise InputTypeError(f"t must be a real-valued tensor of timesteps, got {_describe(t)}")
        if tuple(t.shape) != (batch,):
            raise InputValueError(f"t must have shape [B] = [{batch}], got {list(t.shape)}")
        if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32):
            raise InputTypeError(f"y must be an int64 or int32 tensor of class labels, got {_describe(y)}")
        if tuple(y.shape) != (batch,):
            raise InputValueError(f"y must have shape [B] = [{batch}], got {list(y.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` [B, in_channels, H, W], ``t`` [B], ``y`` [B] → [B, out_channels, H, W]."""
        self._check_inputs(x, t, y)
        x = self.x_embedder(x) + self.pos_embed  # [B, N, C]
        t = self.t_embedder(t)  # [B, C]
        y = self.y_embedder(y, self.training)  # [B, C]
        c = t + y  # [B, C]
        for block in self.blocks:
            x = block(x, c)  # [B, N, C]
        x = self.final_layer(x, c)  # [B, N, p * p * out_channels]
        return self.unpatchify(x)  # [B, out_channels, H, W]

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float
    ) -> torch.Tensor:
        """Classifier-free guidance with the conditional and unconditional passes in one batch.

        ``x`` is [conditional half; unconditional half] (only the first half is read: it is used for
        both), ``t`` and ``y`` are the full-length [2B] batches with the null class ``num_classes`` in
        the second half of ``y``. Returns [2B, out_channels, H, W] whose eps channels are
        ``uncond + cfg_scale * (cond - uncond)`` in both halves, followed by the model's other channels.

        Unlike the original release, which guided only the first 3 of its 4 eps channels, guidance is
        applied to all ``in_channels`` eps channels.
        """
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] % 2:
            raise InputValueError(f"x must hold an even batch [cond; uncond], got {_describe(x)}")
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        eps, rest = model_out[:, : self.in_channels], model_out[:, self.in_channels :]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {list(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


# --------------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embedding (MAE's util/pos_embed.py, as used by DiT)
# --------------------------------------------------------------------------------------------------


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """[grid_size * grid_size, embed_dim] float64 embedding: the first half encodes the column (w)
    coordinate, the second the row (h) coordinate, each as ``cat([sin, cos])``."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w goes first
    grid = grid.reshape([2, 1, grid_size, grid_size])
    emb_h = _1d_sincos_pos_embed(embed_dim // 2, grid[0])  # [H*W, D/2]
    emb_w = _1d_sincos_pos_embed(embed_dim // 2, grid[1])  # [H*W, D/2]
    return np.concatenate([emb_h, emb_w], axis=1)  # [H*W, D]


def _1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    if embed_dim % 2:
        raise InputValueError(f"sin-cos embedding dimension {embed_dim} must be even")
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # [D/2]
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # [M, D/2], outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [M, D]


# --------------------------------------------------------------------------------------------------
# Configs (paper Table 1) and checkpoint loading
# --------------------------------------------------------------------------------------------------

_ARCHITECTURES = {  # size: (depth, hidden_size, num_heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}

#: ``"DiT-XL/2"`` → the architecture keywords of that config (depth, hidden_size, patch_size, num_heads).
DIT_CONFIGS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads)
    for size, (depth, hidden, heads) in _ARCHITECTURES.items()
    for patch in (2, 4, 8)
}


def _config_builder(name: str):
    config = DIT_CONFIGS[name]

    def build(**kwargs) -> DiT:
        return DiT(**config, **kwargs)

    build.__name__ = build.__qualname__ = name.replace("-", "_").replace("/", "_")
    build.__doc__ = (
        f"{name}: DiT({', '.join(f'{k}={v}' for k, v in config.items())}, **kwargs); kwargs are the other "
        "DiT arguments (input_size, in_channels, num_classes, learn_sigma, class_dropout_prob, ...)."
    )
    return build


#: The twelve configs of the original release, as in its ``DiT_models``: name → ``builder(**kwargs) -> DiT``.
DiT_models = {name: _config_builder(name) for name in DIT_CONFIGS}

_REQUIRED_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "y_embedder.embedding_table.weight",
    "t_embedder.mlp.0.weight",
    "blocks.0.attn.qkv.weight",
    "final_layer.linear.weight",
)


def _load_checkpoint(path: str, map_location: str | torch.device) -> object:
    # DiT training checkpoints also hold their argparse.Namespace; allow just that class.
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    context = safe_globals([argparse.Namespace]) if safe_globals is not None else contextlib.nullcontext()
    try:
        with context:
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        raise InputValueError(
            f"could not read {path} as a PyTorch checkpoint with weights_only=True ({type(err).__name__})"
        ) from None


def _extract_state_dict(checkpoint: object, path: str) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        for key in ("ema", "model"):  # DiT training checkpoints; EMA weights are the ones to sample with
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise InputValueError(f"{path} does not hold a state dict (nor a dict with an 'ema' or 'model' state dict)")
    missing = [key for key in _REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise InputValueError(f"{path} is not a DiT state dict: it lacks {', '.join(missing)}")
    return checkpoint


def _infer_config(state_dict: Mapping[str, torch.Tensor], path: str) -> dict:
    def fail(reason: str) -> InputValueError:
        return InputValueError(f"{path} is not a DiT state dict: {reason}")

    proj = state_dict["x_embedder.proj.weight"]
    if proj.dim() != 4 or proj.shape[2] != proj.shape[3]:
        raise fail(f"x_embedder.proj.weight has shape {list(proj.shape)}, expected [C, in_channels, p, p]")
    hidden_size, in_channels, patch_size = proj.shape[0], proj.shape[1], proj.shape[2]

    pos_embed = state_dict["pos_embed"]
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != hidden_size:
        raise fail(f"pos_embed has shape {list(pos_embed.shape)}, expected [1, N, {hidden_size}]")
    grid_size = math.isqrt(pos_embed.shape[1])
    if grid_size * grid_size != pos_embed.shape[1]:
        raise fail(f"pos_embed has {pos_embed.shape[1]} tokens, not a square grid")

    table = state_dict["y_embedder.embedding_table.weight"]
    if table.dim() != 2 or table.shape[0] < 2:
        raise fail(f"y_embedder.embedding_table.weight has shape {list(table.shape)}")

    final = state_dict["final_layer.linear.weight"]
    out_channels, remainder = divmod(final.shape[0], patch_size * patch_size)
    if remainder or out_channels not in (in_channels, 2 * in_channels):
        raise fail(f"final_layer.linear.weight has {final.shape[0]} rows, expected p*p*in_channels (x2 with sigma)")

    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    return dict(
        input_size=grid_size * patch_size,
        in_channels=in_channels,
        num_classes=table.shape[0] - 1,  # the last row is the CFG null class
        learn_sigma=out_channels == 2 * in_channels,
        depth=depth,
        hidden_size=hidden_size,
        patch_size=patch_size,
    )


def load_dit(
    path: str | os.PathLike,
    model_name: str | None = None,
    *,
    input_size: int | None = None,
    num_classes: int | None = None,
    learn_sigma: bool | None = None,
    in_channels: int | None = None,
    map_location: str | torch.device = "cpu",
) -> DiT:
    """Load an original DiT checkpoint into a :class:`DiT` in eval mode.

    ``path`` holds a state dict, or a DiT training checkpoint whose ``"ema"`` (preferred) or ``"model"``
    entry is one; it is read with ``weights_only=True``. The config is inferred from the state dict;
    ``model_name`` (e.g. ``"DiT-XL/2"``) and the keyword arguments are optional and, when given, must agree
    with it. The checkpoint is assumed to carry the CFG null-class row (``class_dropout_prob > 0``), as all
    DiT checkpoints do, so ``num_classes`` is the embedding table's row count minus one. The model takes
    the checkpoint's tensors as they are (their dtype, on ``map_location``).

    Raises FileNotFoundError for a missing file and ValueError for an unreadable file, a file that does not
    hold a DiT state dict, or a model name or keyword that contradicts the checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputFileNotFoundError(f"DiT checkpoint not found: {path}")
    checkpoint = _load_checkpoint(path, map_location)
    state_dict = _extract_state_dict(checkpoint, path)
    inferred = _infer_config(state_dict, path)

    architecture = {key: inferred[key] for key in ("depth", "hidden_size", "patch_size")}
    if model_name is None:
        matches = [
            name
            for name, config in DIT_CONFIGS.items()
            if all(config[key] == value for key, value in architecture.items())
        ]
        if not matches:
            found = ", ".join(f"{key}={value}" for key, value in architecture.items())
            raise InputValueError(f"{path} matches none of the DiT configs ({found})")
        model_name = matches[0]
    elif model_name not in DIT_CONFIGS:
        raise InputValueError(f"unknown DiT model {model_name!r}; known: {', '.join(DIT_CONFIGS)}")
    else:
        for key, value in architecture.items():
            if DIT_CONFIGS[model_name][key] != value:
                raise InputValueError(
                    f"{model_name} has {key}={DIT_CONFIGS[model_name][key]} but the checkpoint has {key}={value}"
                )

    given = dict(input_size=input_size, num_classes=num_classes, learn_sigma=learn_sigma, in_channels=in_channels)
    for key, value in given.items():
        if value is not None and value != inferred[key]:
            raise InputValueError(f"{key}={value!r} contradicts the checkpoint, which has {key}={inferred[key]!r}")

    # Build on the meta device (no wasted initialization), then adopt the loaded tensors.
    with torch.device("meta"):
        model = DiT_models[model_name](**{key: inferred[key] for key in given})
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} is {list(state_dict[key].shape)}, expected {list(shape)}"
        for key, shape in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != shape
    ]
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if items
        )
        raise InputValueError(f"{path} does not match {model_name}: {details}")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()
