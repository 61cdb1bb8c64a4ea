"""The EOC prior: its contents, its file format and the error statistics of the judgment (docs/DESIGN.md §2 "Prior").

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

A prior is stored as one safetensors file (no pickle): ``mean`` in fp16/bf16/fp32, the fp32
statistics and the fitted coefficients (``fit.<i>.mask`` uint8 0/1, ``fit.<i>.coef`` fp32 [T, L, 2, P] with
P in {3, 4, 5}: (α, β₁, γ[, β₂[, β₃]]), P = 3 in every file written before the K-history correction), plus three
safetensors metadata strings: ``eoc_prior`` (JSON object of :class:`PriorMetadata`), ``eoc_fits`` (JSON
list of the fits' info dicts) and ``eoc_checksum`` (``"sha256:<hex>"`` of both strings and every
tensor's name, dtype, shape and bytes, see :func:`_checksum`).

``Prior.load`` trusts nothing in the file; anything wrong is one :class:`InputValueError` naming the
file and the fault:

- the file must be readable safetensors whose metadata holds ``eoc_prior``, optionally ``eoc_fits``
  and ``eoc_checksum``, and no other key; the tensors must be exactly ``mean``, ``STAT_NAMES`` and
  the two tensors of each fit listed in ``eoc_fits``. Unknown keys, fields or tensors are rejected,
  not ignored: the format is versioned, so they mean a foreign writer or a corrupted file;
- metadata: every field of :class:`PriorMetadata`, each of its type (ints are not bools nor floats)
  and in range (see ``PriorMetadata.from_dict``); fits: a JSON list of objects;
- tensors: dtype and shape as the metadata says; ``mean`` and the coefficients finite; the statistics
  NaN exactly where a gap reaches before step 0 and finite elsewhere, the squared norms
  (energy, err_plain, sq_delta, sq_trend) non-negative; fit masks 0/1, all-compute at step 0, one
  fit per mask, fit coefficients [T, L, 2, P] with P in {3, 4, 5};
- the checksum, when present, must match. ``save`` always writes it; files without it (written
  before it existed, such as the shipped testbed prior, or by hand) still load, with the checks
  above only: there, a flipped bit that leaves valid values cannot be told from a real prior.

``FORMAT_VERSION`` stays 1: the checksum is an optional key that older readers ignore. A fit with P = 4 or 5
coefficients is refused by a reader older than the K-history correction (its coef shape check), and
every earlier file (P = 3) loads unchanged.

**Storage choices** (``prior_storage``, docs/DESIGN.md §4.10): a fourth optional metadata string,
``eoc_storage``, JSON ``{"means": <storage>, "statistics": true|false}``, says how the file stores its
means (dense ``float16`` / ``bfloat16`` / ``float32``, ``fp8``, ``lowrank:R``, or ``none``) and whether
it holds the statistics. A file without it is the original layout (a dense ``mean`` and every
statistic), so every earlier file loads as before; ``save`` writes the key only for the other
layouts, which a reader older than the key refuses by its strictness ("unknown safetensors metadata
keys"). The checksum covers the key. The tensors must then be exactly those of the storage
(``prior_storage.file_tensor_specs``), the statistics when kept, and the fits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputFileNotFoundError, InputTypeError, InputValueError
from .prior_storage import (
    DENSE_DTYPES,
    DenseMeans,
    MeanStore,
    decode_means,
    encode_means,
    file_tensor_specs,
    parse_storage,
    storage_keeps_statistics,
    storage_reads_means,
)

FORMAT_VERSION = 1
STAT_NAMES = ("energy", "err_plain", "cross_delta", "sq_delta", "cross_trend", "sq_trend", "cross_extrap")
STORAGE_DTYPES = DENSE_DTYPES  # the dense storages of ``mean``
# P of a fit's coef [T, L, 2, P]: (alpha, beta1, gamma[, beta2[, beta3]]); P = 3 is the original layout.
FIT_COEF_LENGTHS = (3, 4, 5)
_META_KEY = "eoc_prior"
_FITS_KEY = "eoc_fits"
_CHECKSUM_KEY = "eoc_checksum"
_STORAGE_KEY = "eoc_storage"
_FIT_PREFIX = "fit."
_SQUARED_STATS = ("energy", "err_plain", "sq_delta", "sq_trend")  # squared norms: never negative
_MAX_META_CHARS = 1 << 16  # the metadata object is ~300 characters
_MAX_FITS_CHARS = 1 << 24  # a fit's info is ~1000 characters
_MAX_COUNT = 2**31 - 1  # no count of a prior comes close
_MAX_DEPTH = 32  # of a fit's info (a few levels in practice)


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the model's parameter names and shapes (not values): the architecture a prior fits."""
    text = ";".join(f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _short(value, limit: int = 60) -> str:
    """repr(value) on one line, cut to ``limit`` characters (file contents go into messages)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int beyond the str conversion limit, a too deep list
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        """Validate the metadata object of a prior file; every fault is an InputValueError naming ``source``.

        Exactly the dataclass fields (a missing or unknown field is an error). Ints are JSON integers
        (not bools, not 6.0) in [1, 2**31 - 1], num_holdout from 0, num_halves 1 or 2 (2 exactly when
        cfg_scale > 1, as ``calibrate`` sets it); cfg_scale >= 1 and trend_eps > 0 finite numbers
        (returned as float); sampler a non-empty printable string of at most 256 characters,
        model_fingerprint a hex string (``model_fingerprint``'s); format_version == FORMAT_VERSION.
        """
        if not isinstance(data, dict):
            raise InputValueError(f"{source}: prior metadata must be a JSON object, got {type(data).__name__}")
        fields = cls.__dataclass_fields__
        missing = [f for f in fields if f not in data]
        if missing:
            raise InputValueError(f"{source}: prior metadata lacks {', '.join(missing)}")
        unknown = [k for k in data if k not in fields]
        if unknown:
            raise InputValueError(f"{source}: prior metadata has unknown fields {_short(sorted(unknown))}")
        version = data["format_version"]
        if not _is_int(version) or version != FORMAT_VERSION:
            raise InputValueError(f"{source}: prior format_version {_short(version)} is not supported "
                                  f"(expected {FORMAT_VERSION})")
        for name in cls._INT_FIELDS:
            value, low = data[name], 0 if name == "num_holdout" else 1
            if not _is_int(value):
                raise InputValueError(f"{source}: prior metadata field {name} must be an int, got {_short(value)}")
            if not low <= value <= _MAX_COUNT:
                raise InputValueError(f"{source}: prior metadata field {name} must lie in [{low}, {_MAX_COUNT}], "
                                      f"got {_short(value)}")
        values = {}
        for name in cls._FLOAT_FIELDS:
            value = data[name]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise InputValueError(f"{source}: prior metadata field {name} must be a number, got {_short(value)}")
            try:
                values[name] = float(value)
            except OverflowError:
                values[name] = math.inf
            if not math.isfinite(values[name]):
                raise InputValueError(f"{source}: prior metadata field {name} must be finite, got {_short(value)}")
        if not values["cfg_scale"] >= 1.0:
            raise InputValueError(f"{source}: prior metadata field cfg_scale must be >= 1, got {data['cfg_scale']!r}")
        if not values["trend_eps"] > 0.0:
            raise InputValueError(f"{source}: prior metadata field trend_eps must be > 0, got {data['trend_eps']!r}")
        halves = 2 if values["cfg_scale"] > 1.0 else 1
        if data["num_halves"] != halves:
            raise InputValueError(f"{source}: prior metadata field num_halves is {data['num_halves']}, but cfg_scale "
                                  f"{values['cfg_scale']} means {halves}")
        for name in cls._STR_FIELDS:
            value = data[name]
            if not isinstance(value, str) or not value or len(value) > 256 or not value.isprintable():
                raise InputValueError(f"{source}: prior metadata field {name} must be a non-empty printable string "
                                      f"of at most 256 characters, got {_short(value)}")
        if any(c not in "0123456789abcdef" for c in data["model_fingerprint"]):
            raise InputValueError(f"{source}: prior metadata field model_fingerprint must be a lowercase hex string, "
                                  f"got {_short(data['model_fingerprint'])}")
        return cls(**{f: values.get(f, data[f]) for f in fields})


class Prior:
    """Mean branch outputs and judgment statistics of uncached runs (see the module docstring).

    ``mean``: [T, L, 2, H, N, C] (a tensor, a ``prior_storage.MeanStore``, or None for a prior without
    means); ``stats``: dict of fp32 tensors named in ``STAT_NAMES``, or None for a coefficient-only prior.
    Metadata is exposed as attributes: ``num_steps``, ``sampler``, ``cfg_scale``, ``num_samples``,
    ``num_holdout``, ``max_gap``, ``num_tokens``, ``width``, ``num_blocks``, ``num_halves``,
    ``trend_eps``, ``model_fingerprint``, ``format_version``.

    ``term_residency`` (not stored): how ``prior_terms.PriorTerms`` keeps the D / E terms it builds on
    the device: ``"plan"`` (for the plan's life), ``"step"`` (only the current step's; the means
    are read slice by slice from wherever the prior lives, e.g. the CPU) or ``"auto"`` (the default:
    as "plan" until an allocation runs out of device memory, then as "step").
    """

    TERM_RESIDENCIES = ("auto", "plan", "step")

    def __init__(self, mean: torch.Tensor | MeanStore | None, stats: dict[str, torch.Tensor] | None,
                 metadata: PriorMetadata, fits: list[CoefficientFit] | None = None):
        if isinstance(mean, torch.Tensor):
            mean = DenseMeans(mean)
        if mean is not None and not isinstance(mean, MeanStore):
            raise InputTypeError(f"mean must be a tensor, a prior_storage.MeanStore or None, got {type(mean).__name__}")
        self.means = mean
        self.stats = stats
        self.metadata = metadata
        self.fits = list(fits or [])  # coefficients fitted in closed loop, one per schedule
        self.term_residency = "auto"
        self._check_shapes("Prior")

    # ------------------------------------------------------------------ storage
    @property
    def mean(self) -> torch.Tensor:
        """The means [T, L, 2, H, N, C]: the stored tensor when dense, else dequantised in fp32 (a full
        copy: prefer :meth:`mean_entry`). InputValueError when the prior stores none."""
        if self.means is None:
            raise InputValueError(f"this prior stores no means (storage {self.storage!r}): the delta and trend "
                                  "terms need a prior with means (see 'eoc prior convert')")
        return self.means.dense()

    @property
    def storage(self) -> str:
        """The storage name (``prior_storage``): float16, bfloat16, float32, fp8, lowrank:R, statistics or
        coefficients."""
        if self.means is not None:
            return self.means.storage
        return "statistics" if self.stats is not None else "coefficients"

    @property
    def has_means(self) -> bool:
        return self.means is not None

    @property
    def has_statistics(self) -> bool:
        return self.stats is not None

    def mean_entry(self, step: int, block: int, branch: int, device=None) -> torch.Tensor:
        """A[step, block, branch] as fp32 [H, N, C] on ``device`` (default: where the prior is)."""
        if self.means is None:
            self.mean  # noqa: B018  (raises the error above)
        if device is None:
            device = next(iter(self.means.tensors().values())).device
        return self.means.entry(step, block, branch, device)

    def with_storage(self, storage: str) -> Prior:
        """This prior in another storage (``prior_storage.parse_storage``), sharing what is unchanged.

        InputValueError for an unknown storage, for means or statistics the prior does not have, and
        for dropping the means while a fit reads them (alpha or gamma != 0)."""
        storage = parse_storage(storage, self.num_steps)
        if storage_reads_means(storage) and self.means is None:
            raise InputValueError(f"cannot convert to {storage!r}: this prior stores no means "
                                  f"(storage {self.storage!r})")
        if storage_keeps_statistics(storage) and self.stats is None:
            raise InputValueError(f"cannot convert to {storage!r}: this prior stores no statistics "
                                  f"(storage {self.storage!r})")
        if not storage_reads_means(storage):
            for i, fit in enumerate(self.fits):
                if bool((fit.coef[..., [0, 2]] != 0).any()):
                    raise InputValueError(f"cannot convert to {storage!r}: fit {i} ({fit.info.get('schedule', '?')}) "
                                          "has prior terms (alpha or gamma != 0) and reads the means")
        if storage == self.storage:
            means = self.means
        elif storage_reads_means(storage):
            source = self.means
            dense = source.tensor if isinstance(source, DenseMeans) else source.dense()
            means = encode_means(dense.detach().cpu().float(), storage)
        else:
            means = None
        stats = self.stats if storage_keeps_statistics(storage) else None
        converted = Prior(means, stats, self.metadata, fits=self.fits)
        converted.term_residency = self.term_residency
        return converted

    # ------------------------------------------------------------------ fitted coefficients
    def fit_for(self, mask: torch.Tensor) -> CoefficientFit | None:
        """The coefficients fitted for exactly this schedule mask [T, L, 2], or None."""
        return next((fit for fit in self.fits if torch.equal(fit.mask, mask.cpu())), None)

    def add_fit(self, fit: CoefficientFit) -> None:
        """Keep ``fit``, replacing an earlier fit for the same schedule mask."""
        T, L = self.num_steps, self.num_blocks
        if tuple(fit.mask.shape) != (T, L, 2) or tuple(fit.coef.shape[:3]) != (T, L, 2):
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
        tensors = dict(self.stats or {})
        expected = _expected_shapes(self.metadata)
        if self.means is not None:
            tensors["mean"] = self.means
            expected["mean"] = tuple(expected["mean"])
        else:
            del expected["mean"]
        if self.stats is None:
            expected = {k: v for k, v in expected.items() if k == "mean"}
        for name, shape in expected.items():
            if name not in tensors:
                raise InputValueError(f"{source}: prior lacks the tensor {name!r}")
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
        a_t = self.mean_entry(step, block, branch)
        a_s = self.mean_entry(source, block, branch)
        return delta_and_trend(a_t, a_s, self.trend_eps)

    def _stat(self, name: str, step: int, block: int, branch: int, *gaps: int) -> float:
        if self.stats is None:
            raise InputValueError("this prior stores no judgment statistics (storage 'coefficients'): the offline "
                                  "judgment of a preset mode reads them; use EOCConfig(min_gain=None) with "
                                  "judge_threshold=0, the calibrated mode, or a prior with statistics")
        for gap in gaps:
            if not 1 <= gap <= self.max_gap:
                raise InputValueError(f"max_gap mismatch: the schedule needs a gap of {gap} steps, "
                                 f"the prior was calibrated with max_gap={self.max_gap}")
        index = (step, block, branch) + tuple(g - 1 for g in gaps)
        return float(self.stats[name][index])

    def feature_energy(self, step: int, block: int, branch: int) -> float:
        if self.stats is None:
            self._stat("energy", step, block, branch)  # raises: no statistics
        return float(self.stats["energy"][step, block, branch])

    def plain_error(self, step: int, source: int, block: int, branch: int) -> float:
        """E||F[t] − F[s]||² of plain reuse on the held-out calibration samples."""
        return self._stat("err_plain", step, block, branch, step - source)

    def corrected_error(self, step: int, source: int, previous: int | None, block: int, branch: int,
                        coef: tuple[float, ...]) -> float:
        """E||F[t] − F̂||² for a correction with one non-zero coefficient among α, β₁, γ (the statistics do
        not cover β₂ or β₃, which read C_2 and C_3). coef: (α, β₁, γ[, β₂[, β₃]])."""
        if not 3 <= len(coef) <= 5:
            raise InputValueError(f"corrected_error takes a coef of length 3..5, got {coef}")
        if any(c != 0.0 for c in coef[3:]):
            raise InputValueError(f"corrected_error: the judgment statistics cover α, β₁ and γ only, got {coef} "
                                  "(β₂ or β₃ non-zero)")
        alpha, beta, gamma = coef[:3]
        if sum(c != 0.0 for c in coef) != 1:
            raise InputValueError(f"corrected_error takes exactly one non-zero coefficient, got {coef}")
        gap = step - source
        plain = self.plain_error(step, source, block, branch)
        if alpha:
            cross, square, c = (self._stat("cross_delta", step, block, branch, gap),
                                self._stat("sq_delta", step, block, branch, gap), alpha)
        elif gamma:
            cross, square, c = (self._stat("cross_trend", step, block, branch, gap),
                                self._stat("sq_trend", step, block, branch, gap), gamma)
        else:
            if previous is None:
                raise InputValueError("an extrapolating correction needs a previous compute step")
            cross = self._stat("cross_extrap", step, block, branch, gap, source - previous)
            square, c = self._stat("err_plain", source, block, branch, source - previous), beta
        return plain - 2.0 * c * cross + c * c * square

    # ------------------------------------------------------------------ file format
    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float16, *, storage: str | None = None) -> None:
        """Write one safetensors file: ``mean`` in ``dtype`` (fp16, bf16 or fp32), fp32 statistics, the fits,
        JSON metadata and the checksum (module docstring). ``storage`` (``prior_storage``: float16,
        bfloat16, float32, fp8, lowrank:R, statistics, coefficients) replaces ``dtype`` when given; a
        prior already in that storage is written as it is. A prior that ``load`` would refuse is not
        written (InputValueError), e.g. a NaN in the mean, or a mean that overflows ``dtype``."""
        from safetensors.torch import save_file

        names = {v: k for k, v in STORAGE_DTYPES.items()}
        if storage is None:
            if not isinstance(dtype, torch.dtype) or dtype not in names:
                raise InputValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype}")
            storage = names[dtype]
        path = os.fspath(path)
        source = f"prior not saved to {path}"
        prior = self.with_storage(storage)
        storage = prior.storage
        tensors = {}
        if prior.means is not None:
            tensors.update({k: v.detach().to("cpu").contiguous() for k, v in prior.means.tensors().items()})
        if prior.stats is not None:
            tensors.update({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in prior.stats.items()})
        for i, fit in enumerate(self.fits):
            tensors[f"{_FIT_PREFIX}{i}.mask"] = fit.mask.detach().to("cpu", torch.uint8).contiguous()
            tensors[f"{_FIT_PREFIX}{i}.coef"] = fit.coef.detach().to("cpu", torch.float32).contiguous()
        if storage in STORAGE_DTYPES and self.means is not None:
            original = self.means.dense()
            if original.isfinite().all() and not tensors["mean"].isfinite().all():
                raise InputValueError(f"{source}: the mean overflows {storage} (largest |value| "
                                      f"{float(original.abs().max()):.6g}); "
                                      "save it with dtype=torch.float32 or torch.bfloat16")
        raw_meta = json.dumps(self.metadata.__dict__)
        raw_fits = json.dumps([fit.info for fit in self.fits])
        raw_storage = None
        if storage not in STORAGE_DTYPES or prior.stats is None:  # the original layout needs no key
            raw_storage = json.dumps({"means": storage if prior.means is not None else "none",
                                      "statistics": prior.stats is not None})
        _validate(tensors, raw_meta, _parse_fit_infos(raw_fits, source), source,
                  _parse_storage_info(raw_storage, source))
        metadata = {_META_KEY: raw_meta, _FITS_KEY: raw_fits,
                    _CHECKSUM_KEY: _checksum(tensors, raw_meta, raw_fits, raw_storage)}
        if raw_storage is not None:
            metadata[_STORAGE_KEY] = raw_storage
        # a temporary file renamed over the target: a process that has the old file open keeps reading the old
        # file, and an interrupted save leaves the old file (or none), never a half-written one
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Prior:
        """Read and validate a prior file (module docstring). Missing → FileNotFoundError; anything else
        wrong with it → one InputValueError (a ValueError) naming the file and the fault."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.exists(path):
            raise InputFileNotFoundError(f"prior file not found: {path}")
        if not os.path.isfile(path):  # a directory, a FIFO (opening it would block), a device
            raise InputValueError(f"{path}: not a prior file (not a regular file)")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise InputValueError(f"device must name a torch device, got {device!r}") from None

        def unreadable(exc: BaseException) -> InputValueError:
            return InputValueError(f"{path}: not a readable prior file ({type(exc).__name__}: {_one_line(exc)})")

        # Only safetensors' own calls sit in these try blocks: it raises SafetensorError, OSError, and
        # for some corrupt headers other types; each is the file's fault.
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise unreadable(exc) from None
        with handle:
            try:
                metadata, names = handle.metadata() or {}, list(handle.keys())
            except Exception as exc:  # noqa: BLE001
                raise unreadable(exc) from None
            if _META_KEY not in metadata:
                raise InputValueError(f"{path}: safetensors file has no EOC prior metadata ({_META_KEY!r})")
            unknown = sorted(set(metadata) - {_META_KEY, _FITS_KEY, _CHECKSUM_KEY, _STORAGE_KEY})
            if unknown:
                raise InputValueError(f"{path}: unknown safetensors metadata keys {_short(unknown)} (a prior file has "
                                      f"{_META_KEY!r}, {_FITS_KEY!r}, {_CHECKSUM_KEY!r} and {_STORAGE_KEY!r})")
            raw_meta, raw_fits = metadata[_META_KEY], metadata.get(_FITS_KEY, "[]")
            raw_storage = metadata.get(_STORAGE_KEY)
            infos = _parse_fit_infos(raw_fits, path)
            storage_info = _parse_storage_info(raw_storage, path)
            _check_names(names, len(infos), path, storage_info)  # before reading: no tensor outside the format is read
            try:
                # get_tensor's CPU tensors are views of safetensors' mapping of the file: copy them, so that
                # rewriting the file in place later (cp, another save_file) cannot change a loaded prior
                tensors = {name: handle.get_tensor(name).clone() for name in names}
            except Exception as exc:  # noqa: BLE001
                raise unreadable(exc) from None
        if _CHECKSUM_KEY in metadata:
            stored = metadata[_CHECKSUM_KEY]
            if not (stored.startswith("sha256:") and len(stored) == 71
                    and all(c in "0123456789abcdef" for c in stored[7:])):
                raise InputValueError(f"{path}: malformed {_CHECKSUM_KEY} {_short(stored)} "
                                      "(expected 'sha256:' and 64 hex digits)")
            if _checksum(tensors, raw_meta, raw_fits, raw_storage) != stored:
                raise InputValueError(f"{path}: checksum mismatch: the file is corrupted (its metadata or tensors "
                                      f"changed after it was saved)")
        meta, means, stats, fits = _validate(tensors, raw_meta, infos, path, storage_info)
        prior = cls.__new__(cls)
        try:
            prior.means = None if means is None else means.to(device)
            prior.stats = None if stats is None else {name: stats[name].to(device) for name in STAT_NAMES}
        except (RuntimeError, AssertionError) as exc:  # e.g. "Torch not compiled with CUDA enabled"
            raise InputValueError(f"{path}: cannot put the prior on device {device} ({_one_line(exc)})") from None
        prior.metadata, prior.fits, prior.term_residency = meta, fits, "auto"
        return prior


@dataclass
class CoefficientFit:
    """Coefficients (α, β₁, γ[, β₂[, β₃]]) per (step, block, branch), fitted for one schedule (``fitting.py``).

    mask: bool [T, L, 2] of the schedule; coef: float [T, L, 2, P] with P in {3, 4, 5} (P = 3 is the
    three-term layout of every file written before the K-history correction; zeros where the judgment
    disabled the entry, and at compute entries); info: how it was fitted (JSON-able dict).
    Construction checks the shapes (InputValueError / InputTypeError).
    """

    mask: torch.Tensor
    coef: torch.Tensor
    info: dict

    def __post_init__(self):
        if not isinstance(self.mask, torch.Tensor) or not isinstance(self.coef, torch.Tensor):
            raise InputTypeError(f"CoefficientFit: mask and coef must be tensors, got {type(self.mask).__name__} / "
                                 f"{type(self.coef).__name__}")
        if self.mask.dim() != 3 or self.mask.shape[2] != 2:
            raise InputValueError(f"CoefficientFit: mask must be [T, L, 2], got {list(self.mask.shape)}")
        if (self.coef.dim() != 4 or tuple(self.coef.shape[:3]) != tuple(self.mask.shape)
                or self.coef.shape[3] not in FIT_COEF_LENGTHS):
            raise InputValueError(f"CoefficientFit: coef must be [T, L, 2, P] = {list(self.mask.shape)} + [P] with "
                                  f"P in {FIT_COEF_LENGTHS} (alpha, beta1, gamma[, beta2[, beta3]]), "
                                  f"got {list(self.coef.shape)}")
        if not self.coef.is_floating_point():
            raise InputTypeError(f"CoefficientFit: coef must be a floating-point tensor, got {self.coef.dtype}")


# ---------------------------------------------------------------------- file validation
def _checksum(tensors: dict[str, torch.Tensor], raw_meta: str, raw_fits: str, raw_storage: str | None = None) -> str:
    """``"sha256:<hex>"`` of the two metadata strings, the storage string when there is one, and, in name
    order, each tensor's name, dtype, shape and bytes (each piece length-prefixed, so no two contents
    hash alike by shifting a boundary). Without a storage string the digest is the one of files written
    before storage choices existed."""
    digest = hashlib.sha256()

    def add(piece) -> None:
        digest.update(len(piece).to_bytes(8, "little"))
        digest.update(piece)

    add(raw_meta.encode("utf-8", "surrogatepass"))
    add(raw_fits.encode("utf-8", "surrogatepass"))
    if raw_storage is not None:
        add(raw_storage.encode("utf-8", "surrogatepass"))
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        add(json.dumps([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]).encode())
        add(tensor.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()



def _unique_keys(pairs: list) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {_short(duplicate)}")
    return result


def _parse_json(text: str, what: str, limit: int, source: str):
    if len(text) > limit:
        raise InputValueError(f"{source}: {what} is {len(text)} characters long, "
                              f"more than the {limit} a prior file allows")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise InputValueError(f"{source}: {what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, a duplicate key, an int beyond Python's str conversion limit
        raise InputValueError(f"{source}: {what} is not valid JSON ({_one_line(exc)})") from None


def _depth_exceeds(value, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _parse_fit_infos(raw_fits: str, source: str) -> list[dict]:
    infos = _parse_json(raw_fits, "fitted-coefficient metadata", _MAX_FITS_CHARS, source)
    if not isinstance(infos, list):
        raise InputValueError(f"{source}: fitted-coefficient metadata must be a JSON list, got {type(infos).__name__}")
    for i, info in enumerate(infos):
        if not isinstance(info, dict):
            raise InputValueError(f"{source}: fitted coefficients {i}: info must be a JSON object, got {_short(info)}")
        if _depth_exceeds(info, _MAX_DEPTH):
            raise InputValueError(f"{source}: fitted coefficients {i}: info is nested more than {_MAX_DEPTH} "
                                  "levels deep")
    return infos


def _parse_storage_info(raw_storage: str | None, source: str) -> tuple[str | None, bool]:
    """(means storage or None for none, statistics kept) of the ``eoc_storage`` string; no string: the
    original layout, (None = dense of the file's dtype, True)."""
    if raw_storage is None:
        return ("dense", True)
    info = _parse_json(raw_storage, "storage metadata", _MAX_META_CHARS, source)
    if not isinstance(info, dict) or set(info) != {"means", "statistics"}:
        raise InputValueError(f"{source}: storage metadata must be a JSON object with exactly 'means' and "
                              f"'statistics', got {_short(info)}")
    means, keep = info["means"], info["statistics"]
    if not isinstance(keep, bool):
        raise InputValueError(f"{source}: storage metadata field statistics must be true or false, got {_short(keep)}")
    if means == "none":
        return (None, keep)
    try:
        means = parse_storage(means) if isinstance(means, str) else parse_storage(means)
    except (InputValueError, InputTypeError) as exc:
        raise InputValueError(f"{source}: storage metadata field means: {exc}") from None
    if not storage_reads_means(means) or means != info["means"]:
        raise InputValueError(f"{source}: storage metadata field means must be a mean storage or 'none', "
                              f"got {_short(info['means'])}")
    return (means, keep)


def _mean_names(means: str | None) -> tuple[str, ...]:
    if means is None:
        return ()
    if means == "dense":
        return ("mean",)
    return tuple(file_tensor_specs(means, (1, 1, 2, 1, 1, 1)))


def _check_names(names, num_fits: int, source: str, storage_info: tuple[str | None, bool] = ("dense", True)) -> None:
    """The tensors must be exactly the storage's mean tensors (``mean`` in the original layout), STAT_NAMES
    (when kept) and fit.<i>.mask/coef for i < num_fits."""
    names = set(names)
    means, keep_stats = storage_info
    expected = _mean_names(means) + (STAT_NAMES if keep_stats else ())
    for name in expected:
        if name not in names:
            raise InputValueError(f"{source}: prior lacks the tensor {name!r}")
    fit_names = set()
    for i in range(num_fits):
        pair = {f"{_FIT_PREFIX}{i}.mask", f"{_FIT_PREFIX}{i}.coef"}
        if not pair <= names:
            raise InputValueError(f"{source}: fitted coefficients {i} lack their mask or coef tensor")
        fit_names |= pair
    unknown = sorted(names - set(expected) - fit_names)
    stray = [name for name in unknown if name.startswith(_FIT_PREFIX)]
    if stray:
        raise InputValueError(f"{source}: tensors {_short(stray)} belong to no fitted coefficients "
                              f"(the metadata lists {num_fits})")
    if unknown:
        what = ", ".join(expected) or "no mean and no statistic"
        raise InputValueError(f"{source}: unknown tensors {_short(unknown)} (this prior holds {what} "
                              "and fit.<i>.mask/coef)")


def _expected_shapes(meta: PriorMetadata) -> dict[str, tuple[int, ...]]:
    T, L, H, N, C, G = meta.num_steps, meta.num_blocks, meta.num_halves, meta.num_tokens, meta.width, meta.max_gap
    shapes = {"mean": (T, L, 2, H, N, C), "energy": (T, L, 2), "cross_extrap": (T, L, 2, G, G)}
    return {name: shapes.get(name, (T, L, 2, G)) for name in ("mean",) + STAT_NAMES}


def _first(bad: torch.Tensor) -> list[int]:
    """The index of the first True of ``bad``."""
    flat = int(bad.reshape(-1).to(torch.uint8).argmax())
    return [int(i) for i in torch.unravel_index(torch.tensor(flat), bad.shape)]


def _check_finite(tensor: torch.Tensor, name: str, source: str) -> None:
    bad = ~tensor.isfinite()
    if bad.any():
        raise InputValueError(f"{source}: prior tensor {name!r} holds {int(bad.sum())} non-finite values "
                              f"(NaN or inf), the first at {_first(bad)}")


def _undefined_stats(name: str, T: int, G: int) -> torch.Tensor | None:
    """Where statistic ``name`` has no data (a gap reaching before step 0: NaN), broadcastable to its
    shape; None for energy, defined everywhere (``calibration.StatAccumulator.finish``)."""
    steps, gaps = torch.arange(T)[:, None], torch.arange(1, G + 1)[None, :]
    if name == "energy":
        return None
    if name == "cross_extrap":
        return ((steps[:, :, None] - gaps[:, :, None] - gaps[:, None, :]) < 0)[:, None, None]
    return ((steps - gaps) < 0)[:, None, None]


def _validate(tensors: dict, raw_meta: str, infos: list[dict], source: str,
              storage_info: tuple[str | None, bool] = ("dense", True)):
    """(metadata, means (a MeanStore or None), stats (or None), fits) of a prior file's contents, or
    InputValueError naming ``source``."""
    meta = PriorMetadata.from_dict(_parse_json(raw_meta, "prior metadata", _MAX_META_CHARS, source), source)
    _check_names(tensors, len(infos), source, storage_info)
    means_storage, keep_stats = storage_info
    shapes = _expected_shapes(meta)
    if means_storage == "dense":
        mean = tensors["mean"]
        if mean.dtype not in STORAGE_DTYPES.values():
            raise InputValueError(f"{source}: prior tensor 'mean' has dtype {mean.dtype}, a prior stores it as one "
                                  f"of {list(STORAGE_DTYPES)}")
        means_storage = {v: k for k, v in STORAGE_DTYPES.items()}[mean.dtype]
    if not keep_stats:
        shapes = {"mean": shapes["mean"]}
    for name in STAT_NAMES if keep_stats else ():
        if tensors[name].dtype != torch.float32:
            raise InputValueError(f"{source}: prior tensor {name!r} has dtype {tensors[name].dtype}, "
                                  "the statistics are float32")
    for name, shape in shapes.items():
        if name != "mean" and tuple(tensors[name].shape) != shape:
            raise InputValueError(f"{source}: prior tensor {name!r} has shape {list(tensors[name].shape)}, "
                                  f"the metadata says {list(shape)}")
    means = None if means_storage is None else decode_means(tensors, means_storage, shapes["mean"], source)
    stats = {} if keep_stats else None
    for name in STAT_NAMES if keep_stats else ():
        value = tensors[name]
        undefined = _undefined_stats(name, meta.num_steps, meta.max_gap)
        undefined = torch.zeros_like(value, dtype=torch.bool) if undefined is None else undefined.expand(value.shape)
        isnan = value.isnan()
        if (isnan & ~undefined).any():
            raise InputValueError(f"{source}: prior statistic {name!r} is NaN at {_first(isnan & ~undefined)}, "
                                  "where it is defined")
        if (undefined & ~isnan).any():
            raise InputValueError(f"{source}: prior statistic {name!r} holds a number at {_first(undefined & ~isnan)}, "
                                  f"where its gap reaches before step 0 (NaN by definition)")
        if value.isinf().any():
            raise InputValueError(f"{source}: prior statistic {name!r} is infinite at {_first(value.isinf())}")
        if name in _SQUARED_STATS and (value < 0).any():
            raise InputValueError(f"{source}: prior statistic {name!r} is negative at {_first(value < 0)}, "
                                  f"but it is a squared norm")
        stats[name] = value
    fits = []
    T, L = meta.num_steps, meta.num_blocks
    for i, info in enumerate(infos):
        mask, coef = tensors[f"{_FIT_PREFIX}{i}.mask"], tensors[f"{_FIT_PREFIX}{i}.coef"]
        what = f"{source}: fitted coefficients {i}:"
        if mask.dtype not in (torch.uint8, torch.bool) or coef.dtype != torch.float32:
            raise InputValueError(f"{what} mask/coef dtypes {mask.dtype}/{coef.dtype}, "
                                  "the format has uint8 (or bool)/float32")
        if (tuple(mask.shape) != (T, L, 2) or coef.dim() != 4 or tuple(coef.shape[:3]) != (T, L, 2)
                or coef.shape[3] not in FIT_COEF_LENGTHS):
            raise InputValueError(f"{what} shapes mask {list(mask.shape)} / coef {list(coef.shape)} do not match "
                                  f"the prior's T = {T}, L = {L} (coef [T, L, 2, P], P in {FIT_COEF_LENGTHS})")
        if mask.dtype == torch.uint8 and (mask > 1).any():
            raise InputValueError(f"{what} the mask holds {int(mask.max())}: "
                                  "a schedule mask is 0 (reuse) or 1 (compute)")
        mask = mask.bool()
        if not mask[0].all():
            raise InputValueError(f"{what} the mask reuses at step 0 (at {[0] + _first(~mask[0])}): "
                                  "step 0 has nothing to reuse")
        _check_finite(coef, f"{_FIT_PREFIX}{i}.coef", source)
        earlier = next((j for j, fit in enumerate(fits) if torch.equal(fit.mask, mask)), None)
        if earlier is not None:
            raise InputValueError(f"{what} the same schedule mask as fitted coefficients {earlier}")
        fits.append(CoefficientFit(mask, coef, info))
    return meta, means, stats, fits


def delta_and_trend(a_t: torch.Tensor, a_s: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """D = a_t − a_s and E = clamp(D / (|a_s| + eps), −1, 1) from two mean branch outputs (fp32)."""
    delta = a_t - a_s
    return delta, (delta / (a_s.abs() + eps)).clamp(-1.0, 1.0)
