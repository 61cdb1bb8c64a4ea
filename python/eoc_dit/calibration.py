"""Calibration: the EOC prior extracted from uncached sampling runs (docs/DESIGN.md §2 "Prior").

``calibrate`` runs the uncached sampler over (label, seed) pairs with observers on every computed
branch output, in two streamed passes:

1. on the fit split, the mean branch output A[t, l, k] (shape [H, N, C], H = 2 with CFG: the
   conditional and unconditional halves are averaged apart), accumulated in fp32
   (:class:`MeanAccumulator`);
2. on the held-out split, the judgment statistics of ``prior.STAT_NAMES`` for every gap
   g = 1..max_gap (:class:`StatAccumulator`), from a window of only the recent 2·max_gap + 1 steps
   of the batch (never a whole run).

The result is an in-memory fp32 :class:`~eoc_dit.prior.Prior`.

Under torchrun (``group``, or an initialised default group; ``distributed``), each split's batches
are shared among the ranks, whole and in order; every rank accumulates its slice's sums in fp64 (the mean's
sum adds each sample's fp32 feature in fp64, exact for features within 2^29 of each other in
magnitude), the ranks' sums are added in rank order (``distributed.ordered_sum``), and every rank
ends with the same prior, the one a single process computes from the same batches.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .diffusion import noise_for_seed
from .errors import InputTypeError, InputValueError
from .patching import apply_eoc
from .prior import Prior, PriorMetadata, delta_and_trend, model_fingerprint
from .schedules import FORASchedule


def seed_noise(model, sampler, seed: int) -> torch.Tensor:
    """[1, C, H, W] noise of ``seed``: the sampler's ``noise_for_seed`` (a diffusers ``PipelineSampler``) or
    ``diffusion.noise_for_seed(model, seed)``."""
    own = getattr(sampler, "noise_for_seed", None)
    return own(seed) if own is not None else noise_for_seed(model, seed)


def _batches(pairs, batch_size):
    for start in range(0, len(pairs), batch_size):
        yield pairs[start : start + batch_size]


def _check_calibrate_args(model, sampler, labels, seeds, cfg_scale, max_gap, holdout, batch_size, trend_eps):
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not hasattr(sampler, "noise_for_seed"):  # a pipeline sampler knows its noise shape; else the model says
        for attr in ("in_channels", "input_size"):
            if not hasattr(model, attr):
                raise InputTypeError(f"model must expose .{attr} (the noise shape of a sample)")
    if not hasattr(sampler, "sample") or not hasattr(sampler, "num_steps"):
        raise InputTypeError(f"sampler must be an eoc_dit sampler (DDIMSampler, DDPMSampler), "
                             f"got {type(sampler).__name__}")
    for name, values in (("labels", labels), ("seeds", seeds)):
        values = list(values)
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise InputTypeError(f"{name} must be a non-empty sequence of ints")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and not all(0 <= v < num_classes for v in labels):
        raise InputValueError(f"labels must lie in [0, {num_classes}), got {sorted(set(labels))}")
    if (isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float))
            or not (math.isfinite(cfg_scale) and cfg_scale >= 1.0)):
        raise InputValueError(f"cfg_scale must be a finite number >= 1.0, got {cfg_scale!r}")
    if isinstance(max_gap, bool) or not isinstance(max_gap, int) or max_gap < 1:
        raise InputValueError(f"max_gap must be an int >= 1, got {max_gap!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0.0 <= holdout < 1.0:
        raise InputValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    if (isinstance(trend_eps, bool) or not isinstance(trend_eps, (int, float))
            or not (math.isfinite(trend_eps) and trend_eps > 0)):
        raise InputValueError(f"trend_eps must be a finite number > 0, got {trend_eps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


class MeanAccumulator:
    """Observer of pass 1: sums F[t, l, k] per batch half into an fp64 [T, L, 2, H, N, C] buffer (each
    sample's fp32 feature added in fp64: the sum does not depend on how the samples are batched or
    shared among ranks, up to fp64 rounding)."""

    def __init__(self, num_halves: int, num_steps: int, num_blocks: int, device):
        self.num_halves, self.num_steps, self.num_blocks, self.device = num_halves, num_steps, num_blocks, device
        self.sums = None  # allocated at the first feature, whose [N, C] it takes

    def __call__(self, step, block, branch, feature):
        halves = feature.detach().float().view(self.num_halves, -1, *feature.shape[1:])  # [H, B, N, C]
        if self.sums is None:
            self.sums = torch.zeros(self.num_steps, self.num_blocks, 2, self.num_halves, *feature.shape[1:],
                                    device=self.device, dtype=torch.float64)
        self.sums[step, block, branch] += halves.double().sum(dim=1)


class StatAccumulator:
    """Observer of pass 2: the judgment statistics on held-out samples, from a window of recent steps."""

    def __init__(self, mean: torch.Tensor, max_gap: int, trend_eps: float, num_halves: int):
        T, L = mean.shape[:2]
        G = max_gap
        self.mean, self.max_gap, self.trend_eps, self.num_halves = mean, max_gap, trend_eps, num_halves
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.sums = {"energy": zeros(T, L, 2), "err_plain": zeros(T, L, 2, G), "cross_delta": zeros(T, L, 2, G),
                     "cross_trend": zeros(T, L, 2, G), "sq_trend": zeros(T, L, 2, G),
                     "cross_extrap": zeros(T, L, 2, G, G)}
        self.window: dict[tuple[int, int], dict[int, torch.Tensor]] = {}

    def __call__(self, step, block, branch, feature):
        H = self.num_halves
        # [H, B, N, C]; the slot is reused
        f_t = feature.detach().to(torch.float32, copy=True).view(H, -1, *feature.shape[1:])
        window = self.window.setdefault((block, branch), {})
        if step == 0:
            window.clear()
        per_sample = lambda a, b: float((a * b).sum())  # summed over samples too; divided at the end  # noqa: E731
        sums = self.sums
        sums["energy"][step, block, branch] += per_sample(f_t, f_t)
        for gap in range(1, min(self.max_gap, step) + 1):
            source = step - gap
            f_s = window[source]
            diff = f_t - f_s
            delta, trend = delta_and_trend(self.mean[step, block, branch], self.mean[source, block, branch],
                                           self.trend_eps)
            f_s_trend = f_s * trend[:, None]
            index = (step, block, branch, gap - 1)
            sums["err_plain"][index] += per_sample(diff, diff)
            sums["cross_delta"][index] += per_sample(diff, delta[:, None])
            sums["cross_trend"][index] += per_sample(diff, f_s_trend)
            sums["sq_trend"][index] += per_sample(f_s_trend, f_s_trend)
            for gap2 in range(1, min(self.max_gap, source) + 1):
                sums["cross_extrap"][index + (gap2 - 1,)] += per_sample(diff, f_s - window[source - gap2])
        window[step] = f_t
        for old in [s for s in window if s < step - 2 * self.max_gap]:
            del window[old]

    def finish(self, num_samples: int) -> dict[str, torch.Tensor]:
        T, L = self.mean.shape[:2]
        G = self.max_gap
        stats = {name: (value / num_samples).float() for name, value in self.sums.items()}
        sq_delta = torch.zeros(T, L, 2, G)
        for step in range(T):
            for gap in range(1, min(G, step) + 1):
                delta = self.mean[step] - self.mean[step - gap]  # [L, 2, H, N, C]
                sq_delta[step, :, :, gap - 1] = delta.flatten(2).pow(2).sum(-1).cpu()
        stats["sq_delta"] = sq_delta
        # Gaps that reach before step 0 have no data: NaN, so that using them cannot go unnoticed.
        steps = torch.arange(T)[:, None]
        gaps = torch.arange(1, G + 1)[None, :]
        invalid = (steps - gaps) < 0  # [T, G]
        for name in ("err_plain", "cross_delta", "sq_delta", "cross_trend", "sq_trend"):
            stats[name][invalid[:, None, None, :].expand_as(stats[name])] = math.nan
        invalid2 = (steps[:, :, None] - gaps[:, :, None] - gaps[:, None, :]) < 0  # [T, G, G]
        stats["cross_extrap"][invalid2[:, None, None].expand_as(stats["cross_extrap"])] = math.nan
        return stats


def calibrate(model: nn.Module, sampler, labels, seeds, cfg_scale: float = 1.0, max_gap: int = 4,
              holdout: float = 0.25, progress: bool = True, *, batch_size: int = 16, trend_eps: float = 1e-3,
              device: str | torch.device | None = None, adapter=None, group=None) -> Prior:
    """Extract an EOC prior from uncached runs of ``sampler`` over every (label, seed) pair.

    The noise of pair (label, seed) is ``torch.randn(1, model.in_channels, model.input_size,
    model.input_size, generator=torch.Generator().manual_seed(seed))``. A fraction ``holdout`` of the
    pairs (a fixed random subset) is kept out of the mean and used for the judgment statistics;
    ``holdout=0`` computes both on all pairs (two passes over the same samples). ``adapter``: as in
    ``apply_eoc``, for models not laid out like ``eoc_dit.DiT``.
    Use the same sampler, step count and ``cfg_scale`` as at inference. Returns a fp32 in-memory Prior.
    ``group``: a torch.distributed process group (default: the initialised default group, if any):
    the pairs are shared among its ranks and every rank returns the same prior (module docstring).
    """
    labels, seeds = list(labels), list(seeds)
    _check_calibrate_args(model, sampler, labels, seeds, cfg_scale, max_gap, holdout, batch_size, trend_eps)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pairs = [(label, seed) for label in labels for seed in seeds]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    num_holdout = round(holdout * len(pairs))
    if holdout > 0 and not 1 <= num_holdout < len(pairs):
        raise InputValueError(f"holdout={holdout} of {len(pairs)} pairs leaves an empty split: "
                              "use more labels/seeds or holdout=0")
    held = [pairs[i] for i in sorted(order[:num_holdout])]
    fit = [pairs[i] for i in sorted(order[num_holdout:])]
    held = held or fit
    group = distributed.resolve_group(group)
    what = f"batches of {batch_size} pairs"  # whole batches: each is the batch a single process samples
    local_fit = distributed.shard(list(_batches(fit, batch_size)), group, what=what)
    local_held = distributed.shard(list(_batches(held, batch_size)), group, what=what)
    progress = progress and distributed.is_main(group)
    H = 2 if cfg_scale > 1 else 1
    T = sampler.num_steps

    handle = apply_eoc(model, FORASchedule(1), adapter=adapter)  # computes everything; observers record
    means = MeanAccumulator(H, T, handle.num_blocks, device)
    bar = tqdm(total=sum(map(len, local_fit + local_held)), desc="calibrate", unit="sample", disable=not progress)

    def run(batches, observer):
        handle.observer = observer
        for batch in batches:
            noise = torch.cat([seed_noise(model, sampler, seed) for _, seed in batch]).to(device)
            y = torch.tensor([label for label, _ in batch], device=device)
            sampler.sample(model, noise, y, cfg_scale=cfg_scale, progress=False)
            bar.update(len(batch))

    try:
        with torch.no_grad():
            run(local_fit, means)
            sums = distributed.ordered_sum(means.sums, group, what="calibrate: the sum of the means")
            mean = (sums / len(fit)).float()  # [T, L, 2, H, N, C] fp32
            stats_acc = StatAccumulator(mean, max_gap, trend_eps, H)
            run(local_held, stats_acc)
            stats_acc.sums = {name: distributed.ordered_sum(value, group, what=f"calibrate: the sum of {name}")
                              for name, value in stats_acc.sums.items()}
    finally:
        handle.remove()
        bar.close()
    stats = stats_acc.finish(len(held))
    L, N, C = mean.shape[1], mean.shape[4], mean.shape[5]
    meta = PriorMetadata(model_fingerprint=model_fingerprint(model), num_steps=T,
                         sampler=getattr(sampler, "name", type(sampler).__name__),
                         cfg_scale=float(cfg_scale), num_samples=len(fit), num_holdout=len(held) if num_holdout else 0,
                         max_gap=max_gap, num_tokens=N, width=C, num_blocks=L, num_halves=H, trend_eps=float(trend_eps))
    return Prior(mean.cpu(), {k: v.cpu() for k, v in stats.items()}, meta)
