"""Calibration and fitting through a diffusers pipeline's own ``__call__`` (docs/DESIGN.md §4.9).

:class:`PipelineSampler` makes a ``DiTPipeline`` or a ``PixArtAlphaPipeline`` look like an eoc_dit
sampler (``num_steps``, ``name``, ``noise_for_seed``, ``sample(model, noise, labels, cfg_scale)``), so
``calibrate`` and ``fit_coefficients`` run the pipeline the user will serve — its scheduler, step count
and CFG — on the transformer patched by ``apply_eoc``:

    sampler = PipelineSampler(pipe, num_inference_steps=20)               # DiTPipeline: labels are classes
    prior = calibrate(pipe.transformer, sampler, labels=[1, 2], seeds=range(8), cfg_scale=4.0)
    prior.add_fit(fit_coefficients(pipe.transformer, sampler, FORASchedule(3), prior, labels=[1, 2], seeds=[9]))

For PixArt the "labels" index a list of prompt embeddings given to the sampler (``prompt_embeds``
[P, S, D] with ``prompt_attention_mask`` [P, S], and the negative embedding for CFG), so nothing needs
a text encoder. The noise of a seed is ``torch.randn((1, C, H, W), generator=torch.Generator().manual_seed(seed))``,
what the pipeline itself draws for ``generator=[torch.Generator().manual_seed(seed)]`` on the CPU.

DiTPipeline takes no ``latents`` argument: the sampler hands it the noise by replacing the name
``randn_tensor`` in ``diffusers.pipelines.dit.pipeline_dit`` for the length of the call (a non-public
name; checked on import of this module). DiTPipeline's null class is 1000, so CFG needs a transformer
with ``num_embeds_ada_norm >= 1000`` (``dit_to_diffusers(..., num_embeds_ada_norm=1000)``).
PixArt puts the unconditional half first in its CFG batch; ``uncond_first`` tells ``fit_coefficients``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from diffusers import DiTPipeline, PixArtAlphaPipeline
from diffusers.pipelines.dit import pipeline_dit

from .errors import InputTypeError, InputValueError

if not callable(getattr(pipeline_dit, "randn_tensor", None)):  # the one non-public name this module relies on
    raise ImportError("diffusers.pipelines.dit.pipeline_dit.randn_tensor is missing: this diffusers version is "
                      "not supported by eoc_dit.diffusers_pipeline")


_RESERVED = {"class_labels", "prompt", "negative_prompt", "prompt_embeds", "prompt_attention_mask",
             "negative_prompt_embeds", "negative_prompt_attention_mask", "latents", "generator", "guidance_scale",
             "num_inference_steps", "output_type", "height", "width"}


class PipelineSampler:
    """A diffusers pipeline as an eoc_dit sampler (see the module docstring).

    pipe: a ``DiTPipeline`` or ``PixArtAlphaPipeline``. num_inference_steps: the step count to serve.
    prompt_embeds / prompt_attention_mask: PixArt only, [P, S, D] / [P, S]; label i is prompt i.
    negative_prompt_embeds / negative_prompt_attention_mask: PixArt only, [1, S, D] / [1, S], needed for CFG.
    call_kwargs: further keyword arguments of the pipeline call (e.g. ``use_resolution_binning=False``).
    """

    def __init__(self, pipe, num_inference_steps: int, *, prompt_embeds: torch.Tensor | None = None,
                 prompt_attention_mask: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_attention_mask: torch.Tensor | None = None, **call_kwargs):
        if not isinstance(pipe, (DiTPipeline, PixArtAlphaPipeline)):
            raise InputTypeError(f"pipe must be a diffusers DiTPipeline or PixArtAlphaPipeline, "
                                 f"got {type(pipe).__name__}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise InputValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        reserved = sorted(set(call_kwargs) & _RESERVED)
        if reserved:
            raise InputValueError(f"call_kwargs must not set {', '.join(reserved)}: the sampler sets them")
        self.pipe, self.num_steps, self.call_kwargs = pipe, num_inference_steps, call_kwargs
        self.is_pixart = isinstance(pipe, PixArtAlphaPipeline)
        self.uncond_first = self.is_pixart  # PixArt's CFG batch is [uncond; cond]
        self.name = f"{type(pipe).__name__}/{type(pipe.scheduler).__name__}"
        config = pipe.transformer.config
        self.num_classes = None
        if self.is_pixart:
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
                raise InputValueError("prompt_embeds must be a [P, S, D] tensor (label i selects prompt i) for a "
                                      f"PixArtAlphaPipeline, got {_describe(prompt_embeds)}")
            for name, value, rows in (("prompt_attention_mask", prompt_attention_mask, prompt_embeds.shape[0]),
                                      ("negative_prompt_attention_mask", negative_prompt_attention_mask, 1)):
                if value is not None and (not isinstance(value, torch.Tensor)
                                          or tuple(value.shape) != (rows, prompt_embeds.shape[1])):
                    raise InputValueError(f"{name} must be a [{rows}, {prompt_embeds.shape[1]}] tensor, "
                                          f"got {_describe(value)}")
            if negative_prompt_embeds is not None and (
                    not isinstance(negative_prompt_embeds, torch.Tensor)
                    or tuple(negative_prompt_embeds.shape) != (1,) + tuple(prompt_embeds.shape[1:])):
                raise InputValueError(f"negative_prompt_embeds must be a [1, {prompt_embeds.shape[1]}, "
                                      f"{prompt_embeds.shape[2]}] tensor, got {_describe(negative_prompt_embeds)}")
            self.num_classes = prompt_embeds.shape[0]
            vae_scale = pipe.vae_scale_factor
            self.noise_shape = (config.in_channels, config.sample_size, config.sample_size)
            self.image_size = config.sample_size * vae_scale
        else:
            if prompt_embeds is not None or negative_prompt_embeds is not None:
                raise InputValueError("prompt_embeds are for a PixArtAlphaPipeline; a DiTPipeline takes class labels")
            self.noise_shape = (config.in_channels, config.sample_size, config.sample_size)
            self.num_classes = config.num_embeds_ada_norm
        self.prompt_embeds, self.prompt_attention_mask = prompt_embeds, prompt_attention_mask
        self.negative_prompt_embeds = negative_prompt_embeds
        self.negative_prompt_attention_mask = negative_prompt_attention_mask

    def __repr__(self) -> str:
        return f"PipelineSampler({self.name}, num_inference_steps={self.num_steps})"

    def noise_for_seed(self, seed: int) -> torch.Tensor:
        """[1, C, H, W] fp32 CPU noise of ``seed``: what the pipeline draws for ``generator=[manual_seed(seed)]``."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputTypeError(f"seed must be an int, got {type(seed).__name__}")
        return torch.randn((1,) + self.noise_shape, generator=torch.Generator().manual_seed(seed))

    def sample(self, model, noise: torch.Tensor, labels: torch.Tensor, cfg_scale: float = 1.0,
               progress: bool = True) -> torch.Tensor:
        """Run the pipeline from ``noise`` [B, C, H, W] for ``labels`` [B] (classes, or PixArt prompt indices);
        the images as a [B, 3 or C, H, W] tensor (``output_type="pt"``). ``model`` must be the pipeline's
        transformer (the one ``apply_eoc`` patched)."""
        pipe = self.pipe
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
            raise InputValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
        if model is not pipe.transformer:
            raise InputValueError("model must be the pipeline's transformer (pipe.transformer)")
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape[1:]) != self.noise_shape or noise.dim() != 4:
            raise InputValueError(f"noise must be [B, {', '.join(map(str, self.noise_shape))}], got {_describe(noise)}")
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.shape[0] != noise.shape[0]:
            raise InputValueError(f"labels must have one entry per noise row ({noise.shape[0]}), got {labels.shape[0]}")
        pipe.set_progress_bar_config(disable=not progress)
        device = pipe.transformer.device
        noise = noise.to(device=device, dtype=pipe.transformer.dtype)
        kwargs = dict(guidance_scale=float(cfg_scale), num_inference_steps=self.num_steps, output_type="pt")
        kwargs.update(self.call_kwargs)
        if self.is_pixart:
            if cfg_scale > 1 and self.negative_prompt_embeds is None:
                raise InputValueError("cfg_scale > 1 needs negative_prompt_embeds (the unconditional prompt)")
            index = labels.to(self.prompt_embeds.device).long()
            if (index < 0).any() or (index >= self.num_classes).any():
                raise InputValueError(f"labels index prompts: they must lie in [0, {self.num_classes})")
            batch = noise.shape[0]
            mask = self.prompt_attention_mask
            kwargs.update(prompt=None, negative_prompt=None, prompt_embeds=self.prompt_embeds[index],
                          prompt_attention_mask=None if mask is None else mask[index], latents=noise,
                          height=self.image_size, width=self.image_size)
            kwargs.setdefault("use_resolution_binning", False)
            if self.negative_prompt_embeds is not None:
                kwargs["negative_prompt_embeds"] = self.negative_prompt_embeds.expand(batch, -1, -1)
                neg_mask = self.negative_prompt_attention_mask
                kwargs["negative_prompt_attention_mask"] = None if neg_mask is None else neg_mask.expand(batch, -1)
            return pipe(**kwargs).images
        if cfg_scale > 1 and self.num_classes < 1000:
            raise InputValueError(f"DiTPipeline uses class 1000 as its CFG null class, but the transformer has "
                                  f"num_embeds_ada_norm={self.num_classes}: convert with num_embeds_ada_norm=1000")
        with _dit_noise(noise):
            return pipe(class_labels=labels.tolist(), **kwargs).images


@contextlib.contextmanager
def _dit_noise(noise: torch.Tensor):
    """DiTPipeline draws its latents with ``randn_tensor(shape, generator=..., device=..., dtype=...)``;
    for one call, that draw returns ``noise`` instead."""
    original = pipeline_dit.randn_tensor

    def given(shape, *args, **kwargs):
        if tuple(shape) != tuple(noise.shape):
            raise InputValueError(f"DiTPipeline asked for noise of shape {list(shape)}, the sampler holds "
                                  f"{list(noise.shape)}")
        return noise.clone()

    pipeline_dit.randn_tensor = given
    try:
        yield
    finally:
        pipeline_dit.randn_tensor = original


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return type(value).__name__
