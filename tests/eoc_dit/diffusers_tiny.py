"""Tiny random-weight diffusers models and pipelines for the diffusers tests (built offline from configs).

Every weight is re-drawn non-zero (diffusers zero-initialises nothing we rely on, but random weights
make every branch matter). Width 32, 2 blocks, 8×8 inputs.
"""

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.15 if ("norm1.linear" in name or "scale_shift" in name) else (
                0.6 / p.shape[-1] ** 0.5 if p.dim() >= 2 else 0.05)
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return module.eval()


def tiny_dit(num_layers: int = 2, shared_embedding: bool = True, num_classes: int = 1000, seed: int = 0,
             out_channels: int = 1) -> DiTTransformer2DModel:
    """A DiTTransformer2DModel (diffusers' defaults: frequency shift 1, norm_eps 1e-5), 1 input channel."""
    model = randomize(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1,
                                            out_channels=out_channels, num_layers=num_layers, sample_size=8,
                                            patch_size=2, num_embeds_ada_norm=num_classes, norm_num_groups=1), seed)
    if shared_embedding:  # as in every converted checkpoint: one timestep/class embedding copied into each block
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def tiny_pixart(num_layers: int = 2, seed: int = 0) -> PixArtTransformer2DModel:
    return randomize(PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1,
                                              out_channels=2, num_layers=num_layers, cross_attention_dim=32,
                                              sample_size=8, patch_size=2, caption_channels=24, norm_num_groups=1),
                     seed)


def tiny_vae() -> AutoencoderKL:
    return randomize(AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                   up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                                   latent_channels=1, norm_num_groups=8, sample_size=8), seed=1)


def dit_pipeline(transformer=None, scheduler=None) -> DiTPipeline:
    pipe = DiTPipeline(transformer=transformer if transformer is not None else tiny_dit(), vae=tiny_vae(),
                       scheduler=scheduler if scheduler is not None else DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_pipeline(transformer=None, scheduler=None) -> PixArtAlphaPipeline:
    """A PixArt pipeline with no tokenizer nor text encoder: it is called with precomputed prompt embeddings."""
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(),
                               transformer=transformer if transformer is not None else tiny_pixart(),
                               scheduler=scheduler if scheduler is not None else DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeddings(num_prompts: int = 3, seed: int = 5):
    """(prompt_embeds [P, 5, 24], mask [P, 5], negative_prompt_embeds [1, 5, 24], negative mask [1, 5])."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(num_prompts, 5)
    mask[0, 4:] = 0  # one padded prompt
    return (torch.randn(num_prompts, 5, 24, generator=generator), mask,
            torch.randn(1, 5, 24, generator=generator), torch.ones(1, 5))


def dit_inputs(batch: int = 4, timestep: int = 500, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 1, 8, 8, generator=generator), torch.full((batch,), timestep),
            torch.arange(batch) % 4)


def pixart_inputs(batch: int = 4, timestep: int = 500, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 5)
    mask[0, 3:] = 0
    return dict(hidden_states=torch.randn(batch, 1, 8, 8, generator=generator),
                encoder_hidden_states=torch.randn(batch, 5, 24, generator=generator), encoder_attention_mask=mask,
                timestep=torch.full((batch,), timestep), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
