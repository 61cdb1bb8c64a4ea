"""The EOC prior: its contents, its file format and the error statistics of the judgment (DESIGN §2 "Prior").

A :class:`Prior` holds what uncached calibration runs (``calibration.calibrate``) measured:

- ``mean`` A[t, l, k], the mean branch output, [T, L, 2, H, N, C] (H = 2 with CFG: the conditional
  and unconditional halves are averaged apart);
- ``stats``, per (t, l, k) and every gap g = 1..max_gap, the scalars of the offline judgment, measured
  on held-out calibration samples (sums over elements, means over samples):
       energy       E||F[t]||²                                        [T, L, 2]
       err_plain    E||F[t] − F[t−g]||²                               [T, L, 2, G]
       cross_delta  E<F[t] − F[s], D>,        sq_delta   ||D||²       [T, L, 2, G]   (s = t − g)
       cross_trend  E<F[t] − F[s], F[s]⊙E>,   sq_trend   E||F[s]⊙E||² [T, L, 2, G]
       cross_extrap E<F[t] − F[s], F[s] − F[s−g2]>                    [T, L, 2, G, G]
   with D = A[t] − A[s] and E = clamp(D / (|A[s]| + trend_eps), −1, 1). Entries whose steps fall
   before 0 are NaN;
- ``fits``: coefficients fitted in closed loop for given schedules (``fitting.fit_coefficients``).

A prior is stored as one safetensors file (no pickle): ``mean`` in fp16/bf16/fp32 and the fp32
statistics, plus JSON metadata that ``Prior.load`` and ``apply_eoc`` validate.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputFileNotFoundError, InputValueError

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
            raise InputValueError(f"{source}: prior metadata must be a JSON object, got {type(data).__name__}")
        missing = [f for f in cls.__dataclass_fields__ if f not in data]
        if missing:
            raise InputValueError(f"{source}: prior metadata lacks {', '.join(missing)}")
        if data["format_version"] != FORMAT_VERSION:
            raise InputValueError(f"{source}: prior format_version {data['format_version']} is not supported (expected {FORMAT_VERSION})")
        for name in cls._INT_FIELDS:
            if not isinstance(data[name], int) or isinstance(data[name], bool):
                raise InputValueError(f"{source}: prior metadata field {name} must be an int, got {data[name]!r}")
        for name in cls._FLOAT_FIELDS:
            if not isinstance(data[name], (int, float)) or isinstance(data[name], bool):
                raise InputValueError(f"{source}: prior metadata field {name} must be a number, got {data[name]!r}")
        for name in cls._STR_FIELDS:
            if not isinstance(data[name], str):
                raise InputValueError(f"{source}: prior metadata field {name} must be a string, got {data[name]!r}")
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
            raise InputValueError(f"fit shapes mask {list(fit.mask.shape)} / coef {list(fit.coef.shape)} do not match "
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
                raise InputValueError(f"{source}: prior lacks the tensor {name!r}")
            shape = expected.get(name, (T, L, 2, G))
            if tuple(tensors[name].shape) != shape:
                raise InputValueError(f"{source}: prior tensor {name!r} has shape {list(tensors[name].shape)}, "
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
                raise InputValueError(f"prior/model mismatch in {field}: the prior has {ours}, the model has {theirs}")

    # ------------------------------------------------------------------ correction terms and judgment
    def delta_and_trend(self, step: int, source: int, block: int, branch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """D = A[t] − A[s] and E = clamp(D / (|A[s]| + trend_eps), −1, 1), fp32 [H, N, C]."""
        a_t = self.mean[step, block, branch].float()
        a_s = self.mean[source, block, branch].float()
        return delta_and_trend(a_t, a_s, self.trend_eps)

    def _stat(self, name: str, step: int, block: int, branch: int, *gaps: int) -> float:
        for gap in gaps:
            if not 1 <= gap <= self.max_gap:
                raise InputValueError(f"max_gap mismatch: the schedule needs a gap of {gap} steps, "
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
            raise InputValueError(f"corrected_error takes exactly one non-zero coefficient, got {coef}")
        gap = step - source
        plain = self.plain_error(step, source, block, branch)
        if alpha:
            cross, square, c = self._stat("cross_delta", step, block, branch, gap), self._stat("sq_delta", step, block, branch, gap), alpha
        elif gamma:
            cross, square, c = self._stat("cross_trend", step, block, branch, gap), self._stat("sq_trend", step, block, branch, gap), gamma
        else:
            if previous is None:
                raise InputValueError("an extrapolating correction needs a previous compute step")
            cross = self._stat("cross_extrap", step, block, branch, gap, source - previous)
            square, c = self._stat("err_plain", source, block, branch, source - previous), beta
        return plain - 2.0 * c * cross + c * c * square

    # ------------------------------------------------------------------ file format
    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
        """Write one safetensors file: ``mean`` in ``dtype`` (fp16, bf16 or fp32), fp32 statistics, JSON metadata."""
        from safetensors.torch import save_file

        names = {v: k for k, v in STORAGE_DTYPES.items()}
        if dtype not in names:
            raise InputValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype}")
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
            raise InputFileNotFoundError(f"prior file not found: {path}")
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                raw_meta = (f.metadata() or {}).get(_META_KEY)
                raw_fits = (f.metadata() or {}).get(_FITS_KEY, "[]")
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
            raise InputValueError(f"{path}: not a readable prior file ({type(exc).__name__}: {exc})") from None
        if raw_meta is None:
            raise InputValueError(f"{path}: safetensors file has no EOC prior metadata")
        try:
            meta = PriorMetadata.from_dict(json.loads(raw_meta), path)
        except json.JSONDecodeError as exc:
            raise InputValueError(f"{path}: prior metadata is not valid JSON ({exc})") from None
        mean = tensors.pop("mean", None)
        if mean is None:
            raise InputValueError(f"{path}: prior lacks the tensor 'mean'")
        fits = _load_fits(tensors, raw_fits, path)
        prior = cls.__new__(cls)
        prior.mean, prior.stats, prior.metadata, prior.fits = mean, tensors, meta, []
        prior._check_shapes(path)
        for fit in fits:
            try:
                prior.add_fit(fit)
            except ValueError as exc:
                raise InputValueError(f"{path}: {exc}") from None
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
        raise InputValueError(f"{path}: fitted-coefficient metadata is not valid JSON ({exc})") from None
    if not isinstance(infos, list):
        raise InputValueError(f"{path}: fitted-coefficient metadata must be a JSON list")
    fits = []
    for i, info in enumerate(infos):
        mask, coef = tensors.pop(f"{_FIT_PREFIX}{i}.mask", None), tensors.pop(f"{_FIT_PREFIX}{i}.coef", None)
        if mask is None or coef is None:
            raise InputValueError(f"{path}: fitted coefficients {i} lack their mask or coef tensor")
        fits.append(CoefficientFit(mask.bool().cpu(), coef.float().cpu(), info))
    stray = [name for name in tensors if name.startswith(_FIT_PREFIX)]
    if stray:
        raise InputValueError(f"{path}: tensors {stray} belong to no fitted coefficients")
    return fits


def delta_and_trend(a_t: torch.Tensor, a_s: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """D = a_t − a_s and E = clamp(D / (|a_s| + eps), −1, 1) from two mean branch outputs (fp32)."""
    delta = a_t - a_s
    return delta, (delta / (a_s.abs() + eps)).clamp(-1.0, 1.0)
