"""Sampling for class-conditional DiT: the DDIM and DDPM samplers of DiT's ``diffusion/`` package.

This is the sampling half of facebookresearch/DiT's ``diffusion/`` (itself OpenAI's guided-diffusion /
improved-diffusion), reduced to what DiT's ``sample.py`` uses and reproduced number for number:

* the linear beta schedule of Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM),
  over 1000 training steps (``get_named_beta_schedule("linear", 1000)``);
* uniform respacing to ``num_steps`` steps (Nichol & Dhariwal 2021, "Improved DDPM", Sec. 4;
  ``space_timesteps(1000, [num_steps])`` and ``SpacedDiffusion``): the model still sees the original
  timestep index;
* DDPM ancestral sampling (Ho et al. Eq. 6-7): the posterior q(x_{t-1} | x_t, x_0) with either the
  fixed small variance or the learned-range variance of Improved DDPM Eq. 15 when the model predicts
  sigma (``learn_sigma``: output channels [eps; v]);
* DDIM with eta = 0 (Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 12), with eps
  re-derived from the (optionally clipped) x0 prediction as guided-diffusion's ``ddim_sample`` does;
* classifier-free guidance as DiT's ``forward_with_cfg``: one model call on [x; x] with labels
  [y; null], eps = uncond + scale * (cond - uncond), variance channels from the conditional half
  (DiT guides only the first 3 channels for FID reproducibility; here all eps channels are guided).

Schedule coefficients are computed once in float64 numpy, as DiT does, and converted to the sampling
dtype on the sampling device (DiT's ``_extract_into_tensor``) once per ``sample`` call, so a step
launches no host-to-device copy and never synchronizes. The few quantities DiT computes in torch
(sqrt of alpha_bar_prev in DDIM, the learned-range mix, the exp of the log variance) are computed in
torch in the sampling dtype here too, so float32 results match DiT's operation for operation.

Before each model call the samplers announce the step through :mod:`eoc_dit.step_protocol`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from eoc_dit.step_protocol import announce_step

from .errors import InputTypeError, InputValueError

NUM_TRAIN_TIMESTEPS = 1000

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------------
# Schedule (float64 numpy, built once per sampler)
# ----------------------------------------------------------------------------------------------------


def linear_beta_schedule(num_diffusion_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """DiT's ``get_named_beta_schedule("linear", n)``: Ho et al.'s 1e-4 .. 0.02, rescaled to ``n`` steps."""
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """DiT's ``space_timesteps(num_timesteps, [num_steps])``: the kept original timesteps, increasing.

    The stride is accumulated in floating point exactly as the original does; for some step counts
    this differs from ``round(i * stride)`` (for 21 steps the middle step is 499, not 500).
    """
    if not 1 <= num_steps <= num_timesteps:
        raise InputValueError(f"cannot divide {num_timesteps} timesteps into {num_steps} steps")
    frac_stride = 1 if num_steps <= 1 else (num_timesteps - 1) / (num_steps - 1)
    cur_idx = 0.0
    taken_steps = []
    for _ in range(num_steps):
        taken_steps.append(round(cur_idx))
        cur_idx += frac_stride
    return sorted(set(taken_steps))


def respace_betas(alphas_cumprod: np.ndarray, kept_timesteps: list[int]) -> np.ndarray:
    """DiT's ``SpacedDiffusion`` betas: the betas whose cumulative product hits ``alphas_cumprod`` at the kept steps."""
    kept = set(kept_timesteps)
    last_alpha_cumprod = 1.0
    new_betas = []
    for t, alpha_cumprod in enumerate(alphas_cumprod):
        if t in kept:
            new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
            last_alpha_cumprod = alpha_cumprod
    return np.array(new_betas, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class DiffusionSchedule:
    """The float64 coefficient tables of DiT's ``GaussianDiffusion`` that sampling reads, indexed by step.

    ``timestep_map[i]`` is the original (training) timestep of respaced step ``i``; it is what the
    model is called with.
    """

    timestep_map: tuple[int, ...]
    betas: np.ndarray
    log_betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    posterior_log_variance_clipped: np.ndarray

    @classmethod
    def from_betas(cls, betas: np.ndarray, timestep_map: tuple[int, ...]) -> DiffusionSchedule:
        betas = np.asarray(betas, dtype=np.float64)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        if len(betas) > 1:
            # The posterior variance is 0 at t = 0; DiT clips its log with the t = 1 value.
            posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        else:
            # DiT leaves this empty; the only step is the last one, which adds no noise, so it is never read.
            posterior_log_variance_clipped = np.log(betas)
        return cls(
            timestep_map=tuple(int(t) for t in timestep_map),
            betas=betas,
            log_betas=np.log(betas),
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
            posterior_log_variance_clipped=posterior_log_variance_clipped,
        )

    @classmethod
    def respaced(cls, num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> DiffusionSchedule:
        """DiT's ``create_diffusion(str(num_steps))`` schedule: linear betas respaced to ``num_steps``."""
        kept = space_timesteps(num_train_timesteps, num_steps)
        base_alphas_cumprod = np.cumprod(1.0 - linear_beta_schedule(num_train_timesteps), axis=0)
        return cls.from_betas(respace_betas(base_alphas_cumprod, kept), timestep_map=tuple(kept))

    def __len__(self) -> int:
        return len(self.betas)


_DEVICE_TABLES = (
    "log_betas",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_log_variance_clipped",
)


def _tables_on(schedule: DiffusionSchedule, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every table as a [num_steps] tensor in ``like``'s dtype and device: one copy each, per sample call."""
    tables = {
        name: torch.from_numpy(getattr(schedule, name)).to(device=like.device, dtype=like.dtype)
        for name in _DEVICE_TABLES
    }
    alphas_cumprod_prev = torch.from_numpy(schedule.alphas_cumprod_prev).to(device=like.device, dtype=like.dtype)
    # DiT takes these square roots in torch, in the sampling dtype (ddim_sample); so do we.
    tables["sqrt_alphas_cumprod_prev"] = torch.sqrt(alphas_cumprod_prev)
    tables["sqrt_one_minus_alphas_cumprod_prev"] = torch.sqrt(1 - alphas_cumprod_prev)
    return tables


# ----------------------------------------------------------------------------------------------------
# Diffusion math (all shapes [B, C, H, W]; coefficients are 0-d tensors of the sampling dtype)
# ----------------------------------------------------------------------------------------------------


def predict_x0_from_eps(x, eps, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, clip_denoised: bool):
    """x0 = sqrt(1 / alpha_bar) * x - sqrt(1 / alpha_bar - 1) * eps, clamped to [-1, 1] if ``clip_denoised``."""
    x0 = sqrt_recip_alphas_cumprod * x - sqrt_recipm1_alphas_cumprod * eps
    return x0.clamp(-1, 1) if clip_denoised else x0


def predict_eps_from_x0(x, x0, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod):
    """The eps consistent with x and x0 (inverse of :func:`predict_x0_from_eps`; differs once x0 is clipped)."""
    return (sqrt_recip_alphas_cumprod * x - x0) / sqrt_recipm1_alphas_cumprod


def ddim_update(x0, eps, sqrt_alphas_cumprod_prev, sqrt_one_minus_alphas_cumprod_prev):
    """DDIM, eta = 0 (Song et al. Eq. 12): x_prev = sqrt(alpha_bar_prev) * x0 + sqrt(1 - alpha_bar_prev) * eps."""
    return x0 * sqrt_alphas_cumprod_prev + sqrt_one_minus_alphas_cumprod_prev * eps


def posterior_mean(x0, x, posterior_mean_coef1, posterior_mean_coef2):
    """Mean of q(x_{t-1} | x_t, x0) (Ho et al. Eq. 7)."""
    return posterior_mean_coef1 * x0 + posterior_mean_coef2 * x


def learned_range_log_variance(var_values, min_log, max_log):
    """Improved DDPM Eq. 15: v in [-1, 1] interpolates log variance between the posterior's and log(beta)."""
    frac = (var_values + 1) / 2
    return frac * max_log + (1 - frac) * min_log


# ----------------------------------------------------------------------------------------------------
# Model call with classifier-free guidance
# ----------------------------------------------------------------------------------------------------


def _null_label(model) -> int:
    try:
        num_classes = model.num_classes
    except AttributeError:
        raise InputValueError(
            "model: classifier-free guidance (cfg_scale > 1) needs model.num_classes, the null label"
        ) from None
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise InputValueError(f"model.num_classes must be an int, got {num_classes!r}")
    return int(num_classes)


def _model_eps(model, x, timestep: int, labels, cfg_scale: float, null_label: int | None,
               cfg_channels: int | None = None):
    """Run the model once; return (eps [B, C, H, W], variance values [B, C, H, W] or None).

    ``cfg_channels`` k: guide only eps channels [0, k) and take the others from the conditional half,
    as the original DiT's ``forward_with_cfg`` does with k = 3 (None: every channel)."""
    batch, channels = x.shape[:2]
    use_cfg = null_label is not None
    if use_cfg:
        x_in = torch.cat([x, x], dim=0)  # [2B, C, H, W]
        labels_in = torch.cat([labels, torch.full_like(labels, null_label)], dim=0)  # [2B]
    else:
        x_in, labels_in = x, labels
    t_in = torch.full((x_in.shape[0],), timestep, dtype=torch.long, device=x.device)  # [B'] original index
    out = model(x_in, t_in, labels_in)
    if (
        not isinstance(out, torch.Tensor)
        or out.dim() != 4
        or out.shape[0] != x_in.shape[0]
        or out.shape[1] not in (channels, 2 * channels)
        or out.shape[2:] != x.shape[2:]
    ):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputValueError(
            f"model output must be [{x_in.shape[0]}, {channels} or {2 * channels}, {x.shape[2]}, {x.shape[3]}] "
            f"(eps, or eps and variance values), got {got}"
        )
    eps = out[:, :channels]
    var_values = out[:batch, channels:] if out.shape[1] == 2 * channels else None
    if use_cfg:
        cond_eps, uncond_eps = eps[:batch], eps[batch:]
        if cfg_channels is None or cfg_channels >= channels:
            eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        else:  # DiT's forward_with_cfg: [guided eps[:, :k]; the conditional half's eps[:, k:]]
            k = cfg_channels
            guided = uncond_eps[:, :k] + cfg_scale * (cond_eps[:, :k] - uncond_eps[:, :k])
            eps = torch.cat([guided, cond_eps[:, k:]], dim=1)
    if var_values is not None:
        var_values = var_values.to(x.dtype)
    return eps.to(x.dtype), var_values


# ----------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------


def _check_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise InputTypeError(f"num_steps must be an int, got {num_steps!r}")
    if not 1 <= num_steps <= NUM_TRAIN_TIMESTEPS:
        raise InputValueError(f"num_steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {num_steps}")
    return int(num_steps)


def _check_inputs(model, noise, labels, cfg_scale, generator) -> float:
    if not callable(model):
        raise InputTypeError(f"model must be callable as model(x, t, y), got {type(model).__name__}")
    if not isinstance(noise, torch.Tensor) or noise.dim() != 4 or not noise.is_floating_point():
        if isinstance(noise, torch.Tensor):
            got = f"{noise.dtype} tensor of shape {tuple(noise.shape)}"
        else:
            got = type(noise).__name__
        raise InputValueError(f"noise must be a 4-D floating tensor [B, C, H, W], got {got}")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in _INTEGER_DTYPES:
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InputValueError(f"labels must be an integer tensor, got {got}")
    if labels.shape != noise.shape[:1]:
        raise InputValueError(f"labels must have shape [{noise.shape[0]}] (one per noise sample), "
                              f"got {tuple(labels.shape)}")
    if labels.device != noise.device:
        raise InputValueError(f"labels must be on the device of noise ({noise.device}), got {labels.device}")
    parameter = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    if parameter is not None and parameter.device != noise.device:
        raise InputValueError(f"noise must be on the model's device ({parameter.device}), got {noise.device}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, numbers.Real) or not math.isfinite(cfg_scale):
        raise InputValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    if cfg_scale < 1.0:
        raise InputValueError(f"cfg_scale must be >= 1.0 (1.0 disables guidance), got {cfg_scale}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputTypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return float(cfg_scale)


class _Sampler:
    name = ""

    def __init__(self, num_steps: int, *, clip_denoised: bool = False, cfg_channels: int | None = None) -> None:
        """``cfg_channels``: None guides every eps channel; k guides channels [0, k) only and keeps the
        conditional eps elsewhere — k = 3 reproduces the original DiT release's ``forward_with_cfg`` on its
        4-channel latents (kept there for its published FIDs; docs/DESIGN.md §4.2)."""
        self.num_steps = _check_num_steps(num_steps)
        self.clip_denoised = bool(clip_denoised)
        if cfg_channels is not None and (isinstance(cfg_channels, bool)
                                         or not isinstance(cfg_channels, numbers.Integral) or cfg_channels < 1):
            raise InputValueError(f"cfg_channels must be None or an int >= 1, got {cfg_channels!r}")
        self.cfg_channels = None if cfg_channels is None else int(cfg_channels)
        self.schedule = DiffusionSchedule.respaced(self.num_steps)
        # Original timesteps in sampling order, high to low.
        self.timesteps: list[int] = list(reversed(self.schedule.timestep_map))

    def __repr__(self) -> str:
        extra = "" if self.cfg_channels is None else f", cfg_channels={self.cfg_channels}"
        return f"{type(self).__name__}(num_steps={self.num_steps}, clip_denoised={self.clip_denoised}{extra})"

    @torch.no_grad()
    def sample(
        self,
        model,
        noise: torch.Tensor,
        labels: torch.Tensor,
        cfg_scale: float = 1.0,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Denoise ``noise`` [B, C, H, W] into samples [B, C, H, W] for class ``labels`` [B].

        ``model(x, t, y)`` returns eps [B', C, H, W], or [B', 2C, H, W] with variance values in the
        second half when it learns sigma; ``t`` [B'] holds original timestep indices (torch.long).
        With ``cfg_scale > 1`` each step is one call on B' = 2B ([x; x], labels [y; model.num_classes]).
        ``noise`` is not modified. ``generator`` drives DDPM's per-step noise (default: seed 0 on
        ``noise.device``); DDIM with eta = 0 draws none.
        """
        cfg_scale = _check_inputs(model, noise, labels, cfg_scale, generator)
        generator = self._prepare_generator(generator, noise)
        null_label = _null_label(model) if cfg_scale > 1.0 else None
        tables = _tables_on(self.schedule, noise)
        x = noise
        for step in tqdm(range(self.num_steps), desc=self.name, unit="step", disable=not progress):
            index = self.num_steps - 1 - step  # respaced index, counts down to 0
            announce_step(model, step=step, num_steps=self.num_steps, cfg=cfg_scale > 1.0)
            eps, var_values = _model_eps(model, x, self.schedule.timestep_map[index], labels, cfg_scale, null_label,
                                         self.cfg_channels)
            x = self._step(x, eps, var_values, tables, index, generator)
        return x

    def _prepare_generator(self, generator, noise):
        return generator

    def _predict_x0(self, x, eps, tables, index):
        return predict_x0_from_eps(
            x,
            eps,
            tables["sqrt_recip_alphas_cumprod"][index],
            tables["sqrt_recipm1_alphas_cumprod"][index],
            self.clip_denoised,
        )

    def _step(self, x, eps, var_values, tables, index, generator):
        raise NotImplementedError


class DDIMSampler(_Sampler):
    """Deterministic DDIM (eta = 0), as guided-diffusion's ``ddim_sample_loop``. Variance channels are ignored."""

    name = "ddim"

    def _step(self, x, eps, var_values, tables, index, generator):
        x0 = self._predict_x0(x, eps, tables, index)
        eps = predict_eps_from_x0(
            x, x0, tables["sqrt_recip_alphas_cumprod"][index], tables["sqrt_recipm1_alphas_cumprod"][index]
        )
        return ddim_update(
            x0, eps, tables["sqrt_alphas_cumprod_prev"][index], tables["sqrt_one_minus_alphas_cumprod_prev"][index]
        )


class DDPMSampler(_Sampler):
    """Ancestral DDPM, as guided-diffusion's ``p_sample_loop``: learned-range variance when the model
    outputs variance values, else the fixed small (posterior) variance; no noise at the last step."""

    name = "ddpm"

    def __init__(self, num_steps: int, *, clip_denoised: bool = False, cfg_channels: int | None = None,
                 dit_noise_order: bool = False) -> None:
        """``dit_noise_order``: with CFG, draw each step's noise for the doubled batch [2B, C, H, W] and use its
        first B rows, as the original DiT's ``p_sample`` does on its [x; x] batch (``th.randn_like(x)``); with
        ``cfg_channels=3`` and a generator in the state of the original's global RNG after its initial noise
        this reproduces the original's DDPM samples."""
        super().__init__(num_steps, clip_denoised=clip_denoised, cfg_channels=cfg_channels)
        self.dit_noise_order = bool(dit_noise_order)
        self._doubled = False

    def sample(self, model, noise, labels, cfg_scale=1.0, progress=False, generator=None):
        self._doubled = self.dit_noise_order and isinstance(cfg_scale, (int, float)) and cfg_scale > 1.0
        return super().sample(model, noise, labels, cfg_scale=cfg_scale, progress=progress, generator=generator)

    sample.__doc__ = _Sampler.sample.__doc__

    def _prepare_generator(self, generator, noise):
        if generator is None:
            return torch.Generator(device=noise.device).manual_seed(0)
        if generator.device.type != noise.device.type:
            raise InputValueError(f"generator is on {generator.device}, noise on {noise.device}; they must match")
        return generator

    def _step(self, x, eps, var_values, tables, index, generator):
        x0 = self._predict_x0(x, eps, tables, index)
        mean = posterior_mean(x0, x, tables["posterior_mean_coef1"][index], tables["posterior_mean_coef2"][index])
        if index == 0:
            return mean
        min_log = tables["posterior_log_variance_clipped"][index]
        if var_values is None:
            log_variance = min_log
        else:
            log_variance = learned_range_log_variance(var_values, min_log, tables["log_betas"][index])
        if self._doubled:  # the original's order: noise for [2B], the conditional half's rows kept
            step_noise = torch.randn((2 * x.shape[0], *x.shape[1:]), generator=generator, device=x.device,
                                     dtype=x.dtype)[: x.shape[0]]
        else:
            step_noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return mean + torch.exp(0.5 * log_variance) * step_noise


def noise_for_seed(model, seed: int) -> torch.Tensor:
    """The documented, reproducible noise of one (label, seed) pair, [1, in_channels, input_size, input_size]:
    ``torch.randn(..., generator=torch.Generator().manual_seed(seed))`` on the CPU (move it where it is used)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InputTypeError(f"seed must be an int, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise InputValueError(f"seed must lie in [-2**63, 2**64), got {seed}")
    for attr in ("in_channels", "input_size"):
        if not isinstance(getattr(model, attr, None), numbers.Integral):
            raise InputTypeError(f"model must expose an int .{attr} (the noise shape of a sample), "
                                 f"got {type(model).__name__}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(1, model.in_channels, model.input_size, model.input_size, generator=generator)


def sample_pairs(model, sampler, pairs, *, cfg_scale: float = 1.0, batch_size: int = 16, device=None,
                 progress: bool = False, group=None) -> torch.Tensor:
    """Samples [len(pairs), C, H, W] on the CPU of (label, seed) ``pairs`` (noise ``noise_for_seed``), in
    batches of ``batch_size`` pairs in list order.

    ``group`` (docs/DESIGN.md §4.11; default: the initialised default process group, if any): the
    batches are shared among the ranks, whole and in order, so every batch is the one a single process
    samples (DDPM's step noise included: it is drawn per call), and every rank returns all samples
    in pair order."""
    from . import distributed

    pairs = list(pairs)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    group = distributed.resolve_group(group)
    device = next(model.parameters()).device if device is None else torch.device(device)
    batches = [pairs[start : start + batch_size] for start in range(0, len(pairs), batch_size)]
    local = distributed.shard(batches, group, what=f"batches of {batch_size} pairs")
    outputs = []
    for batch in local:
        noise = torch.cat([noise_for_seed(model, seed) for _, seed in batch]).to(device)
        labels = torch.tensor([label for label, _ in batch], device=device)
        outputs.append(sampler.sample(model, noise, labels, cfg_scale=cfg_scale, progress=progress).cpu())
    samples = torch.cat(outputs)
    return distributed.gather_rows(samples, group, what="sample: the samples")
