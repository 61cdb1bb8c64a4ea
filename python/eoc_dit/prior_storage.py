"""How a prior stores its mean tensors A [T, L, 2, H, N, C] (docs/DESIGN.md §4.10 "Priors that fit").

A DiT-XL/2 prior with CFG holds 50·28·2·2·256·1152 means at 50 steps (3.3 GB in fp16), although the
calibrated default and the extrapolate preset never read them (only the delta / trend terms do,
``prior_terms.PriorTerms``). A storage choice says what a prior file carries:

==================  ==========================================================================
``float32``,        dense ``mean`` [T, L, 2, H, N, C] in that dtype (the format of every file
``float16``,        written before storage choices existed; ``float16`` is the default)
``bfloat16``
``fp8``             ``mean.fp8`` float8_e4m3fn [T, L, 2, H, N, C] and ``mean.scale`` fp32
                    [T, L, 2]: A[t, l, k] = fp8[t, l, k] · scale[t, l, k], scale = max|A[t, l, k]| / 448
                    (e4m3's largest finite value), 1 where A[t, l, k] is all zero
``lowrank:R``       per (block, branch, half) the T means, a [T, N·C] matrix M, as a rank-R
                    temporal PCA: M ≈ center + coef @ basis with center = the mean over steps
                    (``mean.center`` fp16 [L, 2, H, N, C]), coef = the first R left singular
                    vectors of M − center (``mean.coef`` fp32 [T, L, 2, H, R]) and basis = the
                    first R singular values times right singular vectors (``mean.basis`` fp16
                    [L, 2, H, R, N, C]); 1 <= R <= T. Temporal, not per (N, C) matrix: the terms
                    read differences A[t] − A[s] between steps, which a smooth low-rank
                    trajectory keeps and independent per-step truncations would not
``statistics``      no means; the judgment statistics and the fits (calibrated mode, extrapolate
                    with the offline judgment)
``coefficients``    no means, no statistics: the fits only (calibrated mode whose fits read no
                    prior term); kilobytes
==================  ==========================================================================

A :class:`MeanStore` serves one (step, block, branch) slice at a time in fp32 on a given device
(:meth:`MeanStore.entry`), so the prior terms never need the whole mean on the device.
"""

from __future__ import annotations

import math

import torch

from .errors import InputTypeError, InputValueError

DENSE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ALIASES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp8_e4m3": "fp8"}
STORAGE_CHOICES = ("float32", "float16", "bfloat16", "fp8", "lowrank:R", "statistics", "coefficients")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
LOWRANK_DTYPE = torch.float16  # center and basis; the coefficients stay fp32


def parse_storage(text, num_steps: int | None = None) -> str:
    """The canonical storage name of ``text`` (aliases fp16 / bf16 / fp32 / fp8_e4m3 accepted), e.g.
    ``"lowrank:8"``. ``num_steps``: check a low rank against T. InputValueError for anything else."""
    if not isinstance(text, str):
        raise InputTypeError(f"storage must be a string, one of {', '.join(STORAGE_CHOICES)}; got {text!r:.80}")
    name = _ALIASES.get(text.strip().lower(), text.strip().lower())
    if name in DENSE_DTYPES or name in ("fp8", "statistics", "coefficients"):
        return name
    if name.startswith("lowrank:"):
        digits = name.split(":", 1)[1]
        rank = int(digits) if digits.isdigit() else 0
        if rank < 1:
            raise InputValueError(f"storage {text!r}: the rank of lowrank:R must be an int >= 1")
        if num_steps is not None and rank > num_steps:
            raise InputValueError(f"storage {text!r}: the rank must lie in [1, T] = [1, {num_steps}] "
                                  "(rank T is exact)")
        return f"lowrank:{rank}"
    raise InputValueError(f"storage must be one of {', '.join(STORAGE_CHOICES)}; got {text!r:.80}")


def storage_reads_means(storage: str) -> bool:
    return storage not in ("statistics", "coefficients")


def storage_keeps_statistics(storage: str) -> bool:
    return storage != "coefficients"


class MeanStore:
    """The means of a prior in one storage. ``shape`` = (T, L, 2, H, N, C)."""

    storage: str

    def entry(self, step: int, block: int, branch: int, device) -> torch.Tensor:
        """A[step, block, branch] as fp32 [H, N, C] on ``device``."""
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """All means [T, L, 2, H, N, C] (fp32 unless stored dense)."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file tensors of this storage, by name."""
        raise NotImplementedError

    def to(self, device) -> MeanStore:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class DenseMeans(MeanStore):
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.storage = {v: k for k, v in DENSE_DTYPES.items()}.get(tensor.dtype, "float32")

    def entry(self, step, block, branch, device):
        return self.tensor[step, block, branch].to(device=device, dtype=torch.float32)

    def dense(self):
        return self.tensor

    def tensors(self):
        return {"mean": self.tensor}

    def to(self, device):
        return DenseMeans(self.tensor.to(device))


class Fp8Means(MeanStore):
    storage = "fp8"

    def __init__(self, values: torch.Tensor, scale: torch.Tensor):
        self.values, self.scale = values, scale  # float8_e4m3fn [T, L, 2, H, N, C], fp32 [T, L, 2]
        self.shape = tuple(values.shape)

    @classmethod
    def encode(cls, mean: torch.Tensor) -> Fp8Means:
        mean = mean.detach().float()
        amax = mean.abs().flatten(3).amax(-1)  # [T, L, 2]
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        values = (mean / scale[..., None, None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return cls(values, scale)

    def entry(self, step, block, branch, device):
        q = self.values[step, block, branch].to(device=device).float()
        return q * self.scale[step, block, branch].to(device=device)

    def dense(self):
        return self.values.float() * self.scale[..., None, None, None].float()

    def tensors(self):
        return {"mean.fp8": self.values, "mean.scale": self.scale}

    def to(self, device):
        return Fp8Means(self.values.to(device), self.scale.to(device))


class LowRankMeans(MeanStore):
    def __init__(self, center: torch.Tensor, coef: torch.Tensor, basis: torch.Tensor):
        # center [L, 2, H, N, C], coef fp32 [T, L, 2, H, R], basis [L, 2, H, R, N, C]
        self.center, self.coef, self.basis = center, coef, basis
        self.rank = coef.shape[-1]
        self.shape = (coef.shape[0], *center.shape)
        self.storage = f"lowrank:{self.rank}"

    @classmethod
    def encode(cls, mean: torch.Tensor, rank: int) -> LowRankMeans:
        T, L, _, H, N, C = mean.shape
        if not 1 <= rank <= T:
            raise InputValueError(f"lowrank: the rank must lie in [1, T] = [1, {T}], got {rank}")
        m = mean.detach().double().permute(1, 2, 3, 0, 4, 5).reshape(L, 2, H, T, N * C)  # [L, 2, H, T, NC]
        center = m.mean(dim=3, keepdim=True)
        u, s, vh = torch.linalg.svd(m - center, full_matrices=False)  # u [.., T, K], s [.., K], vh [.., K, NC]
        k = min(rank, s.shape[-1])
        coef = torch.zeros(L, 2, H, T, rank, dtype=torch.float64)
        coef[..., :k] = u[..., :k]
        basis = torch.zeros(L, 2, H, rank, N * C, dtype=torch.float64)
        basis[..., :k, :] = s[..., :k, None] * vh[..., :k, :]
        return cls(center.reshape(L, 2, H, N, C).to(LOWRANK_DTYPE),
                   coef.permute(3, 0, 1, 2, 4).float().contiguous(),
                   basis.reshape(L, 2, H, rank, N, C).to(LOWRANK_DTYPE))

    def entry(self, step, block, branch, device):
        coef = self.coef[step, block, branch].to(device=device)  # [H, R]
        basis = self.basis[block, branch].to(device=device, dtype=torch.float32)  # [H, R, N, C]
        center = self.center[block, branch].to(device=device, dtype=torch.float32)  # [H, N, C]
        return center + torch.einsum("hr,hrnc->hnc", coef, basis)

    def dense(self):
        basis = self.basis.float()
        return self.center.float()[None] + torch.einsum("tlkhr,lkhrnc->tlkhnc", self.coef, basis)

    def tensors(self):
        return {"mean.center": self.center, "mean.coef": self.coef, "mean.basis": self.basis}

    def to(self, device):
        return LowRankMeans(self.center.to(device), self.coef.to(device), self.basis.to(device))


def encode_means(mean: torch.Tensor, storage: str) -> MeanStore | None:
    """``mean`` [T, L, 2, H, N, C] in ``storage`` (a canonical name, :func:`parse_storage`); None for
    the storages without means."""
    if storage in DENSE_DTYPES:
        return DenseMeans(mean.detach().to(DENSE_DTYPES[storage]))
    if storage == "fp8":
        return Fp8Means.encode(mean)
    if storage.startswith("lowrank:"):
        return LowRankMeans.encode(mean, int(storage.split(":")[1]))
    return None


def file_tensor_specs(storage: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of the mean tensors a file of ``storage`` holds for means of ``shape``
    (T, L, 2, H, N, C); dense storages: the dtype is the storage's."""
    T, L, two, H, N, C = shape
    if storage in DENSE_DTYPES:
        return {"mean": (shape, DENSE_DTYPES[storage])}
    if storage == "fp8":
        return {"mean.fp8": (shape, FP8_DTYPE), "mean.scale": ((T, L, two), torch.float32)}
    if storage.startswith("lowrank:"):
        R = int(storage.split(":")[1])
        return {"mean.center": ((L, two, H, N, C), LOWRANK_DTYPE), "mean.coef": ((T, L, two, H, R), torch.float32),
                "mean.basis": ((L, two, H, R, N, C), LOWRANK_DTYPE)}
    return {}


def empty_means(storage: str, shape: tuple[int, ...], device="meta") -> MeanStore | None:
    """A store of ``storage`` with uninitialised tensors (on the meta device: sizes without memory)."""
    specs = file_tensor_specs(storage, shape)
    made = {name: torch.empty(s, dtype=d, device=device) for name, (s, d) in specs.items()}
    if storage in DENSE_DTYPES:
        return DenseMeans(made["mean"])
    if storage == "fp8":
        return Fp8Means(made["mean.fp8"], made["mean.scale"])
    if storage.startswith("lowrank:"):
        return LowRankMeans(made["mean.center"], made["mean.coef"], made["mean.basis"])
    return None


def decode_means(tensors: dict[str, torch.Tensor], storage: str, shape: tuple[int, ...],
                 source: str) -> MeanStore | None:
    """The store of a file's mean tensors, checked against ``storage`` and the metadata's ``shape``;
    InputValueError naming ``source`` for a wrong dtype, shape or a non-finite value."""
    specs = file_tensor_specs(storage, shape)
    for name, (want_shape, want_dtype) in specs.items():
        tensor = tensors[name]
        if tensor.dtype != want_dtype:
            raise InputValueError(f"{source}: prior tensor {name!r} has dtype {tensor.dtype}, storage {storage!r} "
                                  f"stores it as {want_dtype}")
        if tuple(tensor.shape) != want_shape:
            raise InputValueError(f"{source}: prior tensor {name!r} has shape {list(tensor.shape)}, "
                                  f"the metadata says {list(want_shape)}")
        values = tensor.float() if tensor.dtype == FP8_DTYPE else tensor
        bad = ~values.isfinite()
        if bad.any():
            first = [int(i) for i in torch.unravel_index(torch.tensor(int(bad.reshape(-1).to(torch.uint8).argmax())),
                                                        bad.shape)]
            raise InputValueError(f"{source}: prior tensor {name!r} holds {int(bad.sum())} non-finite values "
                                  f"(NaN or inf), the first at {first}")
    if storage == "fp8" and not (tensors["mean.scale"] > 0).all():
        raise InputValueError(f"{source}: prior tensor 'mean.scale' must be > 0 everywhere")
    if storage in DENSE_DTYPES:
        return DenseMeans(tensors["mean"])
    if storage == "fp8":
        return Fp8Means(tensors["mean.fp8"], tensors["mean.scale"])
    if storage.startswith("lowrank:"):
        return LowRankMeans(tensors["mean.center"], tensors["mean.coef"], tensors["mean.basis"])
    return None


def format_error_bound(storage: str) -> float:
    """The relative rounding error of one stored value (half an ulp): bf16 2^-8, fp16 2^-11,
    fp8 e4m3 2^-4 of its scale's bucket; 0 for fp32; math.inf for low rank (a truncation, not a rounding)."""
    return {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8, "fp8": 2.0**-4}.get(storage, math.inf)
