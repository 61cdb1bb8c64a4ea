"""The EOC prior: calibration, statistics for the judgment, and its file format (DESIGN §2 "Prior").

``calibrate`` runs the uncached sampler over (label, seed) pairs and streams two passes:

1. on the fit split, the mean branch output A[t, l, k] (shape [H, N, C], H = 2 with CFG: the
   conditional and unconditional halves are averaged apart), accumulated in fp32;
2. on the held-out split, per (t, l, k) and every gap g = 1..max_gap, the scalars the offline
   judgment needs (sums over elements, means over samples):
       energy       E||F[t]||²                                        [T, L, 2]
       err_plain    E||F[t] − F[t−g]||²                               [T, L, 2, G]
       cross_delta  E<F[t] − F[s], D>,        sq_delta   ||D||²       [T, L, 2, G]   (s = t − g)
       cross_trend  E<F[t] − F[s], F[s]⊙E>,   sq_trend   E||F[s]⊙E||² [T, L, 2, G]
       cross_extrap E<F[t] − F[s], F[s] − F[s−g2]>                    [T, L, 2, G, G]
   with D = A[t] − A[s] and E = clamp(D / (|A[s]| + trend_eps), −1, 1). Entries whose steps fall
   before 0 are NaN. Only the recent 2·max_gap + 1 steps of the batch are held (never a whole run).

A prior is stored as one safetensors file (no pickle): ``mean`` in fp16/bf16/fp32 and the fp32
statistics, plus JSON metadata that ``Prior.load`` and ``apply_eoc`` validate.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

FORMAT_VERSION = 1
STAT_NAMES = ("energy", "err_plain", "cross_delta", "sq_delta", "cross_trend", "sq_trend", "cross_extrap")
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_META_KEY = "eoc_prior"
_FITS_KEY = "eoc_fits"
_FIT_PREFIX = "fit."


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the model's parameter names and shapes (not values): the architecture a prior fits."""
    text = ";".join(f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class PriorMetadata:
    model_fingerprint: str
    num_steps: int
    sampler: str
    cfg_scale: float
    num_samples: int
    num_holdout: int
    max_gap: int
    num_tokens: int
    width: int
    num_blocks: int
    num_halves: int
    trend_eps: float
    format_version: int = FORMAT_VERSION

    _INT_FIELDS = ("num_steps", "num_samples", "num_holdout", "max_gap", "num_tokens", "width", "num_blocks",
                   "num_halves", "format_version")
    _FLOAT_FIELDS = ("cfg_scale", "trend_eps")
    _STR_FIELDS = ("model_fingerprint", "sampler")

    @classmethod
    def from_dict(cls, data: dict, source: str) -> PriorMetadata:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: prior metadata must be a JSON object, got {type(data).__name__}")
        missing = [f for f in cls.__dataclass_fields__ if f not in data]
        if missing:
            raise ValueError(f"{source}: prior metadata lacks {', '.join(missing)}")
        if data["format_version"] != FORMAT_VERSION:
            raise ValueError(f"{source}: prior format_version {data['format_version']} is not supported (expected {FORMAT_VERSION})")
        for name in cls._INT_FIELDS:
            if not isinstance(data[name], int) or isinstance(data[name], bool):
                raise ValueError(f"{source}: prior metadata field {name} must be an int, got {data[name]!r}")
        for name in cls._FLOAT_FIELDS:
            if not isinstance(data[name], (int, float)) or isinstance(data[name], bool):
                raise ValueError(f"{source}: prior metadata field {name} must be a number, got {data[name]!r}")
        for name in cls._STR_FIELDS:
            if not isinstance(data[name], str):
                raise ValueError(f"{source}: prior metadata field {name} must be a string, got {data[name]!r}")
        return cls(**{f: data[f] for f in cls.__dataclass_fields__})


class Prior:
    """Mean branch outputs and judgment statistics of uncached runs (see the module docstring).

    ``mean``: [T, L, 2, H, N, C]; ``stats``: dict of fp32 tensors named in ``STAT_NAMES``.
    Metadata is exposed as attributes: ``num_steps``, ``sampler``, ``cfg_scale``, ``num_samples``,
    ``num_holdout``, ``max_gap``, ``num_tokens``, ``width``, ``num_blocks``, ``num_halves``,
    ``trend_eps``, ``model_fingerprint``, ``format_version``.
    """

    def __init__(self, mean: torch.Tensor, stats: dict[str, torch.Tensor], metadata: PriorMetadata,
                 fits: list[CoefficientFit] | None = None):
        self.mean = mean
        self.stats = stats
        self.metadata = metadata
        self.fits = list(fits or [])  # coefficients fitted in closed loop, one per schedule
        self._check_shapes("Prior")

    # ------------------------------------------------------------------ fitted coefficients
    def fit_for(self, mask: torch.Tensor) -> CoefficientFit | None:
        """The coefficients fitted for exactly this schedule mask [T, L, 2], or None."""
        return next((fit for fit in self.fits if torch.equal(fit.mask, mask.cpu())), None)

    def add_fit(self, fit: CoefficientFit) -> None:
        """Keep ``fit``, replacing an earlier fit for the same schedule mask."""
        T, L = self.num_steps, self.num_blocks
        if tuple(fit.mask.shape) != (T, L, 2) or tuple(fit.coef.shape) != (T, L, 2, 3):
            raise ValueError(f"fit shapes mask {list(fit.mask.shape)} / coef {list(fit.coef.shape)} do not match "
                             f"the prior's T = {T}, L = {L}")
        self.fits = [f for f in self.fits if not torch.equal(f.mask, fit.mask)] + [fit]

    def __getattr__(self, name):
        metadata = self.__dict__.get("metadata")
        if metadata is not None and name in PriorMetadata.__dataclass_fields__:
            return getattr(metadata, name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    @property
    def uses_cfg(self) -> bool:
        return self.num_halves == 2

    def __repr__(self) -> str:
        m = self.metadata
        return (f"Prior(T={m.num_steps}, L={m.num_blocks}, H={m.num_halves}, N={m.num_tokens}, C={m.width}, "
                f"sampler={m.sampler!r}, cfg_scale={m.cfg_scale}, samples={m.num_samples}, max_gap={m.max_gap})")

    def _check_shapes(self, source: str) -> None:
        m = self.metadata
        T, L, H, N, C, G = m.num_steps, m.num_blocks, m.num_halves, m.num_tokens, m.width, m.max_gap
        expected = {"mean": (T, L, 2, H, N, C), "energy": (T, L, 2), "cross_extrap": (T, L, 2, G, G)}
        tensors = {"mean": self.mean, **self.stats}
        for name in ("mean",) + STAT_NAMES:
            if name not in tensors:
                raise ValueError(f"{source}: prior lacks the tensor {name!r}")
            shape = expected.get(name, (T, L, 2, G))
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"{source}: prior tensor {name!r} has shape {list(tensors[name].shape)}, "
                                 f"the metadata says {list(shape)}")

    # ------------------------------------------------------------------ compatibility
    def check_model(self, model: nn.Module, *, num_blocks: int | None = None) -> None:
        """Raise ValueError, naming the field and both values, if this prior was not made for ``model``."""
        if num_blocks is None:
            num_blocks = getattr(model, "depth", None)
        checks = [("num_blocks", self.num_blocks, num_blocks),
                  ("num_tokens", self.num_tokens, getattr(model, "num_tokens", None)),
                  ("width", self.width, getattr(model, "hidden_size", None)),
                  ("model_fingerprint", self.model_fingerprint, model_fingerprint(model))]
        for field, ours, theirs in checks:
            if theirs is not None and ours != theirs:
                raise ValueError(f"prior/model mismatch in {field}: the prior has {ours}, the model has {theirs}")

    # ------------------------------------------------------------------ correction terms and judgment
    def delta_and_trend(self, step: int, source: int, block: int, branch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """D = A[t] − A[s] and E = clamp(D / (|A[s]| + trend_eps), −1, 1), fp32 [H, N, C]."""
        a_t = self.mean[step, block, branch].float()
        a_s = self.mean[source, block, branch].float()
        return _delta_and_trend(a_t, a_s, self.trend_eps)

    def _stat(self, name: str, step: int, block: int, branch: int, *gaps: int) -> float:
        for gap in gaps:
            if not 1 <= gap <= self.max_gap:
                raise ValueError(f"max_gap mismatch: the schedule needs a gap of {gap} steps, "
                                 f"the prior was calibrated with max_gap={self.max_gap}")
        index = (step, block, branch) + tuple(g - 1 for g in gaps)
        return float(self.stats[name][index])

    def feature_energy(self, step: int, block: int, branch: int) -> float:
        return float(self.stats["energy"][step, block, branch])

    def plain_error(self, step: int, source: int, block: int, branch: int) -> float:
        """E||F[t] − F[s]||² of plain reuse on the held-out calibration samples."""
        return self._stat("err_plain", step, block, branch, step - source)

    def corrected_error(self, step: int, source: int, previous: int | None, block: int, branch: int,
                        coef: tuple[float, float, float]) -> float:
        """E||F[t] − F̂||² for a correction with one non-zero coefficient (every preset has one)."""
        alpha, beta, gamma = coef
        if sum(c != 0.0 for c in coef) != 1:
            raise ValueError(f"corrected_error takes exactly one non-zero coefficient, got {coef}")
        gap = step - source
        plain = self.plain_error(step, source, block, branch)
        if alpha:
            cross, square, c = self._stat("cross_delta", step, block, branch, gap), self._stat("sq_delta", step, block, branch, gap), alpha
        elif gamma:
            cross, square, c = self._stat("cross_trend", step, block, branch, gap), self._stat("sq_trend", step, block, branch, gap), gamma
        else:
            if previous is None:
                raise ValueError("an extrapolating correction needs a previous compute step")
            cross = self._stat("cross_extrap", step, block, branch, gap, source - previous)
            square, c = self._stat("err_plain", source, block, branch, source - previous), beta
        return plain - 2.0 * c * cross + c * c * square

    # ------------------------------------------------------------------ file format
    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
        """Write one safetensors file: ``mean`` in ``dtype`` (fp16, bf16 or fp32), fp32 statistics, JSON metadata."""
        from safetensors.torch import save_file

        names = {v: k for k, v in STORAGE_DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype}")
        tensors = {"mean": self.mean.to(dtype).contiguous()}
        tensors.update({k: v.float().contiguous() for k, v in self.stats.items()})
        for i, fit in enumerate(self.fits):
            tensors[f"{_FIT_PREFIX}{i}.mask"] = fit.mask.to(torch.uint8).contiguous()
            tensors[f"{_FIT_PREFIX}{i}.coef"] = fit.coef.float().contiguous()
        metadata = {_META_KEY: json.dumps(self.metadata.__dict__),
                    _FITS_KEY: json.dumps([fit.info for fit in self.fits])}
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Prior:
        """Read and validate a prior file. Missing → FileNotFoundError; unreadable or inconsistent → ValueError."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prior file not found: {path}")
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                raw_meta = (f.metadata() or {}).get(_META_KEY)
                raw_fits = (f.metadata() or {}).get(_FITS_KEY, "[]")
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"{path}: not a readable prior file ({type(exc).__name__}: {exc})") from None
        if raw_meta is None:
            raise ValueError(f"{path}: safetensors file has no EOC prior metadata")
        try:
            meta = PriorMetadata.from_dict(json.loads(raw_meta), path)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: prior metadata is not valid JSON ({exc})") from None
        mean = tensors.pop("mean", None)
        if mean is None:
            raise ValueError(f"{path}: prior lacks the tensor 'mean'")
        fits = _load_fits(tensors, raw_fits, path)
        prior = cls.__new__(cls)
        prior.mean, prior.stats, prior.metadata, prior.fits = mean, tensors, meta, []
        prior._check_shapes(path)
        for fit in fits:
            try:
                prior.add_fit(fit)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
        return prior


@dataclass
class CoefficientFit:
    """Coefficients (α, β, γ) per (step, block, branch), fitted for one schedule (``fitting.py``).

    mask: bool [T, L, 2] of the schedule; coef: float32 [T, L, 2, 3] (zeros where the judgment
    disabled the entry, and at compute entries); info: how it was fitted (JSON-able dict).
    """

    mask: torch.Tensor
    coef: torch.Tensor
    info: dict


def _load_fits(tensors: dict, raw_fits: str, path: str) -> list[CoefficientFit]:
    """Pop the ``fit.<i>.mask`` / ``fit.<i>.coef`` tensors out of ``tensors``; pair them with their info."""
    try:
        infos = json.loads(raw_fits)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: fitted-coefficient metadata is not valid JSON ({exc})") from None
    if not isinstance(infos, list):
        raise ValueError(f"{path}: fitted-coefficient metadata must be a JSON list")
    fits = []
    for i, info in enumerate(infos):
        mask, coef = tensors.pop(f"{_FIT_PREFIX}{i}.mask", None), tensors.pop(f"{_FIT_PREFIX}{i}.coef", None)
        if mask is None or coef is None:
            raise ValueError(f"{path}: fitted coefficients {i} lack their mask or coef tensor")
        fits.append(CoefficientFit(mask.bool().cpu(), coef.float().cpu(), info))
    stray = [name for name in tensors if name.startswith(_FIT_PREFIX)]
    if stray:
        raise ValueError(f"{path}: tensors {stray} belong to no fitted coefficients")
    return fits


def _delta_and_trend(a_t: torch.Tensor, a_s: torch.Tensor, eps: float):
    delta = a_t - a_s
    return delta, (delta / (a_s.abs() + eps)).clamp(-1.0, 1.0)


def noise_for_seed(model, seed: int) -> torch.Tensor:
    """The documented, reproducible noise of one calibration pair."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, model.in_channels, model.input_size, model.input_size, generator=generator)


def _batches(pairs, batch_size):
    for start in range(0, len(pairs), batch_size):
        yield pairs[start : start + batch_size]


def _check_calibrate_args(model, sampler, labels, seeds, cfg_scale, max_gap, holdout, batch_size):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for attr in ("in_channels", "input_size"):
        if not hasattr(model, attr):
            raise TypeError(f"model must expose .{attr} (the noise shape of a sample)")
    if not hasattr(sampler, "sample") or not hasattr(sampler, "num_steps"):
        raise TypeError(f"sampler must be an eoc_dit sampler (DDIMSampler, DDPMSampler), got {type(sampler).__name__}")
    for name, values in (("labels", labels), ("seeds", seeds)):
        values = list(values)
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TypeError(f"{name} must be a non-empty sequence of ints")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and not all(0 <= v < num_classes for v in labels):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {sorted(set(labels))}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not cfg_scale >= 1.0:
        raise ValueError(f"cfg_scale must be a number >= 1.0, got {cfg_scale!r}")
    if isinstance(max_gap, bool) or not isinstance(max_gap, int) or max_gap < 1:
        raise ValueError(f"max_gap must be an int >= 1, got {max_gap!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


class _MeanAccumulator:
    """Observer of pass 1: sums F[t, l, k] per batch half into an fp32 [T, L, 2, H, N, C] buffer."""

    def __init__(self, num_halves: int, num_steps: int, num_blocks: int, device):
        self.num_halves, self.num_steps, self.num_blocks, self.device = num_halves, num_steps, num_blocks, device
        self.sums = None  # allocated at the first feature, whose [N, C] it takes

    def __call__(self, step, block, branch, feature):
        halves = feature.detach().float().view(self.num_halves, -1, *feature.shape[1:])  # [H, B, N, C]
        if self.sums is None:
            self.sums = torch.zeros(self.num_steps, self.num_blocks, 2, self.num_halves, *feature.shape[1:],
                                    device=self.device)
        self.sums[step, block, branch] += halves.sum(dim=1)


class _StatAccumulator:
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
        f_t = feature.detach().to(torch.float32, copy=True).view(H, -1, *feature.shape[1:])  # [H, B, N, C]; the slot is reused
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
            delta, trend = _delta_and_trend(self.mean[step, block, branch], self.mean[source, block, branch], self.trend_eps)
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
              device: str | torch.device | None = None, adapter=None) -> Prior:
    """Extract an EOC prior from uncached runs of ``sampler`` over every (label, seed) pair.

    The noise of pair (label, seed) is ``torch.randn(1, model.in_channels, model.input_size,
    model.input_size, generator=torch.Generator().manual_seed(seed))``. A fraction ``holdout`` of the
    pairs (a fixed random subset) is kept out of the mean and used for the judgment statistics;
    ``holdout=0`` computes both on all pairs (two passes over the same samples). ``adapter``: as in
    ``apply_eoc``, for models not laid out like ``eoc_dit.DiT``.
    Use the same sampler, step count and ``cfg_scale`` as at inference. Returns a fp32 in-memory Prior.
    """
    from tqdm.auto import tqdm

    from .patching import apply_eoc
    from .schedules import FORASchedule

    labels, seeds = list(labels), list(seeds)
    _check_calibrate_args(model, sampler, labels, seeds, cfg_scale, max_gap, holdout, batch_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pairs = [(label, seed) for label in labels for seed in seeds]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    num_holdout = round(holdout * len(pairs))
    if holdout > 0 and not 1 <= num_holdout < len(pairs):
        raise ValueError(f"holdout={holdout} of {len(pairs)} pairs leaves an empty split: use more labels/seeds or holdout=0")
    held = [pairs[i] for i in sorted(order[:num_holdout])]
    fit = [pairs[i] for i in sorted(order[num_holdout:])]
    held = held or fit
    H = 2 if cfg_scale > 1 else 1
    T = sampler.num_steps

    handle = apply_eoc(model, FORASchedule(1), adapter=adapter)  # computes everything; observers record
    means = _MeanAccumulator(H, T, handle.num_blocks, device)
    bar = tqdm(total=len(fit) + len(held), desc="calibrate", unit="sample", disable=not progress)

    def run(pair_list, observer):
        handle.observer = observer
        for batch in _batches(pair_list, batch_size):
            noise = torch.cat([noise_for_seed(model, seed) for _, seed in batch]).to(device)
            y = torch.tensor([label for label, _ in batch], device=device)
            sampler.sample(model, noise, y, cfg_scale=cfg_scale, progress=False)
            bar.update(len(batch))

    try:
        with torch.no_grad():
            run(fit, means)
            mean = means.sums / len(fit)  # [T, L, 2, H, N, C] fp32
            stats_acc = _StatAccumulator(mean, max_gap, trend_eps, H)
            run(held, stats_acc)
    finally:
        handle.remove()
        bar.close()
    stats = stats_acc.finish(len(held))
    L, N, C = mean.shape[1], mean.shape[4], mean.shape[5]
    meta = PriorMetadata(model_fingerprint=model_fingerprint(model), num_steps=T, sampler=getattr(sampler, "name", type(sampler).__name__),
                         cfg_scale=float(cfg_scale), num_samples=len(fit), num_holdout=len(held) if num_holdout else 0,
                         max_gap=max_gap, num_tokens=N, width=C, num_blocks=L, num_halves=H, trend_eps=float(trend_eps))
    return Prior(mean.cpu(), {k: v.cpu() for k, v in stats.items()}, meta)
