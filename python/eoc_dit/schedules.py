"""Caching schedules (docs/DESIGN.md §2 "Schedule"): which (step, block, branch) entries compute and which reuse.

A schedule turns into a boolean mask S[T, L, 2] (True = compute; branch 0 = attention, 1 = MLP).
Step 0 always computes. For a reuse entry the source step is the latest earlier step that computed
the same (block, branch); the planner (``planner.make_plan``) finds it.
"""

from __future__ import annotations

import torch

from .errors import InputTypeError, InputValueError

BRANCHES = ("attn", "mlp")  # branch 0, branch 1 of a (step, block, branch) entry


def _check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise InputValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class Schedule:
    """Base class: subclasses implement :meth:`mask`."""

    def mask(self, num_steps: int, num_blocks: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def fixed_num_steps(self) -> int | None:
        """The step count this schedule is bound to, or None when it fits any run length."""
        return None

    @property
    def prefix_stable(self) -> bool:
        """True when ``mask(T, L)`` is the first T steps of ``mask(T', L)`` for every T' > T, so a run of
        unknown length can follow it step by step. Subclasses that hold this say so; the default is False."""
        return False

    def caching_level_for(self, num_steps: int, num_blocks: int) -> float:
        """Fraction of reused (step, block, branch) entries over a run of ``num_steps`` steps."""
        return float((~self.mask(num_steps, num_blocks)).float().mean())


class FORASchedule(Schedule):
    """FORA (arXiv 2407.01425): every block recomputes at steps ``t < warmup`` and at
    ``(t - warmup) % interval == 0``; all other steps reuse every block.

    ``caching_level`` is the long-run fraction of reused entries, ``1 - 1/interval``; the exact level
    over a finite run (warm-up and a partial last period included) is ``caching_level_for(T, L)``.
    """

    def __init__(self, interval: int, warmup: int = 0):
        self.interval = _check_positive_int(interval, "interval")
        self.warmup = _check_positive_int(warmup, "warmup", minimum=0)

    @property
    def prefix_stable(self) -> bool:
        return True

    def computes(self, step: int) -> bool:
        return step < self.warmup or (step - self.warmup) % self.interval == 0

    def mask(self, num_steps: int, num_blocks: int) -> torch.Tensor:
        _check_positive_int(num_steps, "num_steps")
        _check_positive_int(num_blocks, "num_blocks")
        steps = torch.tensor([self.computes(t) for t in range(num_steps)])
        return steps[:, None, None].expand(num_steps, num_blocks, 2).clone()

    @property
    def caching_level(self) -> float:
        return 1.0 - 1.0 / self.interval

    def __repr__(self) -> str:
        return f"FORASchedule(interval={self.interval}, warmup={self.warmup})"


class TaylorSeerSchedule(FORASchedule):
    """TaylorSeer's default schedule: ``warmup_steps`` full steps (their ``first_enhance``, default 2), then one
    full step every ``interval`` (their ``interval``, default 4 in TaylorSeer-DiT's ``sample.py``).

    As their code runs it (ywlq/TaylorSeer at 19c6783, a copy of Shenyi-Z/TaylorSeer:
    ``TaylorSeer-DiT/cache_functions/cal_type.py`` lines 5-17, ``cache_init.py`` lines 21-22): a step is
    full when it is one of the first ``first_enhance`` steps or when ``cache_counter == interval − 1``;
    every full step resets the counter, every other step adds one. The last warm-up step therefore starts
    the first period: full steps are t < W and t = W − 1 + j·N (steps counted up from 0), e.g. 0, 1, 5,
    9, ... for W = 2, N = 4. That is ``FORASchedule(N, warmup=W − 1)``, NOT ``FORASchedule(N, warmup=W)``
    (which computes 0, 1, 2, 6, ...). Attributes: ``interval``, ``warmup_steps`` and FORA's ``warmup``
    (= W − 1).

    diffusers' ``TaylorSeerCacheConfig`` (``hooks/taylorseer_cache.py``, ``_measure_should_compute``) runs
    another phase: full when ``t < disable_cache_before_step`` or ``(t − disable_cache_before_step − 1) %
    cache_interval == 0``, so its step ``disable_cache_before_step`` is predicted and the next one full
    (0, 1, 2, 4, 9, ... for 3 and 5); a ``MaskSchedule`` expresses it.
    """

    def __init__(self, interval: int, warmup_steps: int = 2):
        self.warmup_steps = _check_positive_int(warmup_steps, "warmup_steps", minimum=1)
        super().__init__(interval, warmup=warmup_steps - 1)

    def __repr__(self) -> str:
        return f"TaylorSeerSchedule(interval={self.interval}, warmup_steps={self.warmup_steps})"


class MaskSchedule(Schedule):
    """Any user mask, bool [T, L, 2] (True = compute), e.g. a Learning-to-Cache router turned into a mask."""

    def __init__(self, mask: torch.Tensor):
        if not isinstance(mask, torch.Tensor):
            raise InputTypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise InputTypeError(f"mask must be a bool tensor (True = compute), got dtype {mask.dtype}")
        if mask.dim() != 3 or mask.shape[2] != 2 or mask.shape[0] < 1 or mask.shape[1] < 1:
            raise InputValueError(f"mask must have shape [T, L, 2] with T, L >= 1, got {list(mask.shape)}")
        if not bool(mask[0].all()):
            raise InputValueError("mask[0] must be all True: step 0 has no earlier output to reuse")
        self._mask = mask.detach().to("cpu").clone()

    @property
    def fixed_num_steps(self) -> int:
        return self._mask.shape[0]

    def mask(self, num_steps: int, num_blocks: int) -> torch.Tensor:
        T, L, _ = self._mask.shape
        if num_steps != T:
            raise InputValueError(f"step count mismatch: the mask schedule has T = {T} steps, the run has {num_steps}")
        if num_blocks != L:
            raise InputValueError(f"block count mismatch: the mask schedule has L = {L} blocks, "
                                  f"the model has {num_blocks}")
        return self._mask.clone()

    @property
    def caching_level(self) -> float:
        return float((~self._mask).float().mean())

    def __repr__(self) -> str:
        T, L, _ = self._mask.shape
        return f"MaskSchedule(T={T}, L={L}, caching_level={self.caching_level:.3f})"

