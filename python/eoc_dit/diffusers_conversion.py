"""Weights both ways between ``eoc_dit.DiT`` (the original DiT release's layout) and diffusers'
``DiTTransformer2DModel`` (docs/DESIGN.md §4.9).

The parameter map is diffusers' own conversion script's (``scripts/convert_dit_to_diffusers.py``):

    x_embedder.proj                  -> pos_embed.proj            (pos_embed -> pos_embed.pos_embed)
    t_embedder.mlp.0 / .2            -> transformer_blocks.i.norm1.emb.timestep_embedder.linear_1 / _2  (every i)
    y_embedder.embedding_table       -> transformer_blocks.i.norm1.emb.class_embedder.embedding_table  (every i)
    blocks.i.adaLN_modulation.1      -> transformer_blocks.i.norm1.linear
    blocks.i.attn.qkv                -> transformer_blocks.i.attn1.to_q / to_k / to_v  (thirds of the rows)
    blocks.i.attn.proj               -> transformer_blocks.i.attn1.to_out.0
    blocks.i.mlp.fc1 / fc2           -> transformer_blocks.i.ff.net.0.proj / ff.net.2
    final_layer.adaLN_modulation.1   -> proj_out_1;  final_layer.linear -> proj_out_2

Two settings differ, and outputs match only when both are carried over:

- the timestep projection's frequency shift: diffusers' ``CombinedTimestepLabelEmbeddings`` builds
  ``Timesteps(downscale_freq_shift=1)`` (frequencies exp(−ln(10⁴)·i/(half − 1))), the original uses 0
  (…/half). It is not a config field: :func:`dit_to_diffusers` sets ``downscale_freq_shift = 0`` on every
  block's ``norm1.emb.time_proj``; :func:`diffusers_to_dit` gives the DiT a :class:`ShiftedTimestepEmbedder`
  when the diffusers model's shift is not 0. Saving either model keeps the weights, not this attribute.
- the pre-MLP LayerNorm eps: diffusers' ``norm_eps`` (default 1e-5, on ``norm3``), the original 1e-6
  (on ``norm2``). :func:`dit_to_diffusers` builds the model with ``norm_eps=1e-6``;
  :func:`diffusers_to_dit` sets the DiT blocks' ``norm2.eps`` to the model's ``norm_eps``.

DiTPipeline hard-codes the null class 1000 (ImageNet's); ``dit_to_diffusers(..., num_embeds_ada_norm=1000)``
pads a smaller label table so that row 1000 holds the DiT's null row (rows num_classes..999 are zero
and never used).
"""

from __future__ import annotations

import math

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from .errors import InputTypeError, InputValueError
from .models import DiT, TimestepEmbedder


class ShiftedTimestepEmbedder(TimestepEmbedder):
    """``TimestepEmbedder`` with diffusers' frequency shift: freqs = exp(−ln(max_period)·i / (half − shift)).
    Same parameters (``mlp.0``, ``mlp.2``), so state dicts stay interchangeable."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, downscale_freq_shift: float = 1.0):
        super().__init__(hidden_size, frequency_embedding_size)
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(exponent / (half - self.downscale_freq_shift))
        args = t[:, None].float() * freqs[None]
        t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_embedding_size % 2:
            t_freq = torch.cat([t_freq, torch.zeros_like(t_freq[:, :1])], dim=-1)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


def _check_num_embeds(value, num_classes: int):
    if value is None:
        return num_classes
    if isinstance(value, bool) or not isinstance(value, int) or value < num_classes:
        raise InputValueError(f"num_embeds_ada_norm must be an int >= the DiT's num_classes ({num_classes}), "
                              f"got {value!r}")
    return value


def dit_to_diffusers(model: DiT, *, num_embeds_ada_norm: int | None = None) -> DiTTransformer2DModel:
    """A ``DiTTransformer2DModel`` (eval mode, the DiT's device and dtype) computing what ``model`` computes.

    num_embeds_ada_norm: the label table's class count (default: the DiT's ``num_classes``); 1000 makes the
    model usable by ``DiTPipeline``, whose null class is 1000 (rows are padded, see the module docstring).
    """
    if not isinstance(model, DiT):
        raise InputTypeError(f"model must be an eoc_dit.DiT, got {type(model).__name__}")
    if model.mlp_ratio != 4.0:
        raise InputValueError(f"model.mlp_ratio must be 4.0 (diffusers' FeedForward), got {model.mlp_ratio}")
    if model.class_dropout_prob <= 0:
        raise InputValueError("model has no CFG null class (class_dropout_prob = 0); diffusers' label "
                              "embedding always has one")
    classes = _check_num_embeds(num_embeds_ada_norm, model.num_classes)
    width = model.hidden_size
    parameter = next(model.parameters())
    target = DiTTransformer2DModel(
        num_attention_heads=model.num_heads, attention_head_dim=width // model.num_heads,
        in_channels=model.in_channels, out_channels=model.out_channels, num_layers=model.depth,
        sample_size=model.input_size, patch_size=model.patch_size, num_embeds_ada_norm=classes,
        norm_eps=1e-6, norm_num_groups=1)
    src = {k: v.detach() for k, v in model.state_dict().items()}
    table = src["y_embedder.embedding_table.weight"]  # [num_classes + 1, C], the last row is the null class
    if classes != model.num_classes:
        padded = torch.zeros(classes + 1, width, dtype=table.dtype, device=table.device)
        padded[: model.num_classes] = table[: model.num_classes]
        padded[classes] = table[model.num_classes]
        table = padded
    dst = {"pos_embed.proj.weight": src["x_embedder.proj.weight"], "pos_embed.proj.bias": src["x_embedder.proj.bias"],
           "proj_out_1.weight": src["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": src["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": src["final_layer.linear.weight"], "proj_out_2.bias": src["final_layer.linear.bias"]}
    for i in range(model.depth):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        for wb in ("weight", "bias"):
            dst[b + f"norm1.emb.timestep_embedder.linear_1.{wb}"] = src[f"t_embedder.mlp.0.{wb}"]
            dst[b + f"norm1.emb.timestep_embedder.linear_2.{wb}"] = src[f"t_embedder.mlp.2.{wb}"]
            dst[b + f"norm1.linear.{wb}"] = src[o + f"adaLN_modulation.1.{wb}"]
            q, k, v = src[o + f"attn.qkv.{wb}"].chunk(3, dim=0)
            dst[b + f"attn1.to_q.{wb}"], dst[b + f"attn1.to_k.{wb}"], dst[b + f"attn1.to_v.{wb}"] = q, k, v
            dst[b + f"attn1.to_out.0.{wb}"] = src[o + f"attn.proj.{wb}"]
            dst[b + f"ff.net.0.proj.{wb}"] = src[o + f"mlp.fc1.{wb}"]
            dst[b + f"ff.net.2.{wb}"] = src[o + f"mlp.fc2.{wb}"]
        dst[b + "norm1.emb.class_embedder.embedding_table.weight"] = table
    _load_exact(target, dst, "DiTTransformer2DModel")
    with torch.no_grad():  # a non-persistent buffer: not in the state dict
        target.pos_embed.pos_embed.copy_(src["pos_embed"].to(target.pos_embed.pos_embed.dtype))
    for block in target.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # the original DiT's frequencies
    return _to_like(target, parameter)


def diffusers_to_dit(transformer: DiTTransformer2DModel) -> DiT:
    """An ``eoc_dit.DiT`` (eval mode, same device and dtype) computing what ``transformer`` computes.

    Every block of a DiTTransformer2DModel has its own timestep + class embedding; the DiT has one, so they
    must be equal (as in every converted checkpoint) or InputValueError names the first that differs.
    """
    if not isinstance(transformer, DiTTransformer2DModel):
        raise InputTypeError(f"transformer must be a diffusers DiTTransformer2DModel, got {type(transformer).__name__}")
    config = transformer.config
    blocks = transformer.transformer_blocks
    src = {k: v.detach() for k, v in transformer.state_dict().items()}
    first = blocks[0].norm1.emb
    for i, block in enumerate(blocks):
        emb = block.norm1.emb
        for key, value in first.state_dict().items():
            if not torch.equal(emb.state_dict()[key], value):
                raise InputValueError(f"transformer_blocks.{i}.norm1.emb.{key} differs from block 0's: "
                                      "eoc_dit.DiT has one timestep/class embedding for all blocks")
        if emb.time_proj.downscale_freq_shift != first.time_proj.downscale_freq_shift:
            raise InputValueError(f"transformer_blocks.{i}: the timestep frequency shift differs from block 0's")
    if config.activation_fn != "gelu-approximate" or not config.attention_bias or config.norm_elementwise_affine:
        raise InputValueError("transformer must use activation_fn='gelu-approximate', attention_bias=True and "
                              "norm_elementwise_affine=False (the DiT layout)")
    width = config.num_attention_heads * config.attention_head_dim
    table = src["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"]
    in_channels, out_channels = config.in_channels, transformer.out_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise InputValueError(f"out_channels must be in_channels or 2·in_channels, got {out_channels}")
    parameter = next(transformer.parameters())
    model = DiT(input_size=config.sample_size, patch_size=config.patch_size, in_channels=in_channels,
                hidden_size=width, depth=config.num_layers, num_heads=config.num_attention_heads,
                num_classes=table.shape[0] - 1, learn_sigma=out_channels == 2 * in_channels)
    shift = first.time_proj.downscale_freq_shift
    if shift != 0:
        model.t_embedder = ShiftedTimestepEmbedder(width, 256, shift)
    dst = {"x_embedder.proj.weight": src["pos_embed.proj.weight"], "x_embedder.proj.bias": src["pos_embed.proj.bias"],
           "pos_embed": transformer.pos_embed.pos_embed.detach(),
           "final_layer.adaLN_modulation.1.weight": src["proj_out_1.weight"],
           "final_layer.adaLN_modulation.1.bias": src["proj_out_1.bias"],
           "final_layer.linear.weight": src["proj_out_2.weight"], "final_layer.linear.bias": src["proj_out_2.bias"],
           "y_embedder.embedding_table.weight": table}
    for wb in ("weight", "bias"):
        dst[f"t_embedder.mlp.0.{wb}"] = src[f"transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.{wb}"]
        dst[f"t_embedder.mlp.2.{wb}"] = src[f"transformer_blocks.0.norm1.emb.timestep_embedder.linear_2.{wb}"]
    for i in range(config.num_layers):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        for wb in ("weight", "bias"):
            dst[o + f"adaLN_modulation.1.{wb}"] = src[b + f"norm1.linear.{wb}"]
            dst[o + f"attn.qkv.{wb}"] = torch.cat([src[b + f"attn1.to_{n}.{wb}"] for n in "qkv"])
            dst[o + f"attn.proj.{wb}"] = src[b + f"attn1.to_out.0.{wb}"]
            dst[o + f"mlp.fc1.{wb}"] = src[b + f"ff.net.0.proj.{wb}"]
            dst[o + f"mlp.fc2.{wb}"] = src[b + f"ff.net.2.{wb}"]
    _load_exact(model, dst, "DiT")
    for block in model.blocks:
        block.norm2.eps = config.norm_eps  # diffusers' norm3 (pre-MLP)
    return _to_like(model, parameter)


def _to_like(module: nn.Module, parameter: torch.Tensor) -> nn.Module:
    module = module.to(device=parameter.device)
    if parameter.dtype != torch.float32:
        module = module.to(dtype=parameter.dtype)
    return module.eval()


def _load_exact(module: nn.Module, tensors: dict, name: str) -> None:
    """Copy ``tensors`` into ``module``'s parameters and buffers; every entry of its state dict must be given."""
    state = module.state_dict()
    missing = [k for k in state if k not in tensors]
    unexpected = [k for k in tensors if k not in state]
    wrong = [f"{k}: {list(tensors[k].shape)} vs {list(v.shape)}" for k, v in state.items()
             if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise InputValueError(f"cannot convert into {name}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                              f"shape mismatch {wrong[:3]}")
    with torch.no_grad():
        for key, value in state.items():
            value.copy_(tensors[key].to(value.dtype))
