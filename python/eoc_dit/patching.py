"""Patching a DiT for cached sampling with the EOC correction (DESIGN §2 and §4).

``apply_eoc(model, schedule, prior, config)`` replaces the forward of the model and of each block
with versions that follow the schedule: a computing branch runs and its output (pre-gate) is kept
as the cache; a reusing branch is replaced by the op ``eoc_kernels.cached_branch`` (or
``cached_block`` when both branches of a block reuse), which adds the corrected cache

    F̂ = Cc + α·D + β·(Cc − Cp) + γ·(Cc ⊙ E)

with per-entry coefficients from the config's preset and the offline judgment. ``remove_eoc`` puts
back the exact original forwards. The patched model counts its forward calls as steps and starts
over when a new run begins (the timestep goes up), so third-party samplers need no changes; this
package's samplers also announce each step (``step_protocol``) so no timestep is read back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import eoc_kernels

from .adapters import DiTAdapter, ModelAdapter
from .config import EOCConfig
from .schedules import BRANCHES, Schedule, source_steps
from .step_protocol import LISTENER_ATTR

HANDLE_ATTR = "_eoc_handle"
# Length of the mask made for a schedule that fits any run length while the run length is unknown.
_OPEN_MASK_STEPS = 64


@dataclass(frozen=True)
class EntryPlan:
    """How one reuse entry (step t, block l, branch k) is served: source step s, the compute step p
    before it (None if none) and the coefficients (α, β, γ) after the judgment."""

    source: int
    previous: int | None
    coef: tuple[float, float, float]

    @property
    def corrected(self) -> bool:
        return any(c != 0.0 for c in self.coef)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


class EOCHandle:
    """A patched model. ``remove()`` (or leaving the ``with`` block) restores the original forwards.

    Attributes: ``model``, ``schedule``, ``prior``, ``config`` (None = plain caching), ``num_blocks``,
    ``step`` (index of the step being run or last run; -1 before the first).
    """

    def __init__(self, model: nn.Module, schedule: Schedule, prior=None, config: EOCConfig | None = None,
                 *, adapter: ModelAdapter | None = None, observer=None):
        _check_model(model)
        if getattr(model, HANDLE_ATTR, None) is not None:
            raise ValueError("model is already patched: call remove_eoc(model) first")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be an eoc_dit schedule (FORASchedule, MaskSchedule), got {type(schedule).__name__}")
        if config is not None and not isinstance(config, EOCConfig):
            raise TypeError(f"config must be an EOCConfig or None, got {type(config).__name__}")
        if prior is not None:
            from .prior import Prior

            if not isinstance(prior, Prior):
                raise TypeError(f"prior must be an eoc_dit.Prior or None, got {type(prior).__name__}")
        if config is not None and config.needs_prior and prior is None:
            raise ValueError(f"EOCConfig(mode={config.mode!r}) needs a prior: pass prior=Prior.load(...) or use mode='extrapolate'")
        if config is not None and prior is None and config.judge_threshold > 0:
            raise ValueError("EOCConfig.judge_threshold > 0 needs a prior (the judgment is measured on calibration data)")

        self.model = model
        self.schedule = schedule
        self.prior = prior
        self.config = config
        self.adapter = adapter if adapter is not None else DiTAdapter()
        self.observer = observer
        self.blocks = self.adapter.blocks(model)
        self.num_blocks = len(self.blocks)
        if self.num_blocks == 0:
            raise ValueError("model has no blocks to cache")

        if config is not None and config.backend != "auto":  # an unavailable backend fails now, not mid-run
            parameter = next(model.parameters(), None)
            eoc_kernels.resolve_backend(config.backend, parameter.device if parameter is not None else "cpu")
        self._fixed_num_steps = schedule.fixed_num_steps
        if prior is not None:
            prior.check_model(model, num_blocks=self.num_blocks)
            if self._fixed_num_steps is not None and self._fixed_num_steps != prior.num_steps:
                raise ValueError(f"num_steps mismatch: the schedule has {self._fixed_num_steps} steps, the prior {prior.num_steps}")
            self._fixed_num_steps = prior.num_steps
        self._mask = None
        if self._fixed_num_steps is not None:
            self._mask = schedule.mask(self._fixed_num_steps, self.num_blocks)
        # Only the extrapolating correction reads Cp: keep the previous generation only then.
        self._keep_previous = config is not None and config.mode == "extrapolate"
        self._judged = prior is not None and config is not None and (config.judge_threshold > 0 or config.min_gain is not None)
        self._plans: dict[tuple[int, int, int], EntryPlan] = {}
        self._prior_tensors: dict[tuple, torch.Tensor] = {}
        if prior is not None:  # build every plan now so a schedule/prior mismatch fails at patch time
            for t in range(self._fixed_num_steps):
                for l in range(self.num_blocks):
                    for k in range(2):
                        if not self._mask[t, l, k]:
                            self._plan(t, l, k)

        self.step = -1
        self._announced = None
        self._last_timestep = None
        self._in_forward = False
        self._reset_caches()
        self._install()

    # ----------------------------------------------------------------------------- install / remove
    def _install(self):
        model = self.model
        self._saved_model_forward = model.__dict__.get("forward")
        original_forward = model.forward

        def forward(*args, **kwargs):
            self._begin_step(args, kwargs)
            self._in_forward = True
            try:
                return original_forward(*args, **kwargs)
            finally:
                self._in_forward = False

        self._saved_block_forwards = []
        for index, block in enumerate(self.blocks):
            self._saved_block_forwards.append(block.__dict__.get("forward"))
            block.forward = self._make_block_forward(index, block, block.forward)
        model.forward = forward
        setattr(model, LISTENER_ATTR, self._on_announce)
        setattr(model, HANDLE_ATTR, self)

    def remove(self) -> None:
        """Restore the model's and the blocks' original forwards (idempotent)."""
        model = self.model
        if getattr(model, HANDLE_ATTR, None) is not self:
            return
        _restore_attr(model, "forward", self._saved_model_forward)
        for block, saved in zip(self.blocks, self._saved_block_forwards):
            _restore_attr(block, "forward", saved)
        delattr(model, LISTENER_ATTR)
        delattr(model, HANDLE_ATTR)
        self._reset_caches()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    # ----------------------------------------------------------------------------- step counting
    def _on_announce(self, step: int, num_steps: int, cfg: bool) -> None:
        self._announced = (step, num_steps, cfg)

    def _begin_step(self, args, kwargs) -> None:
        if self._announced is not None:
            step, num_steps, cfg = self._announced
            self._announced = None
            if step == 0:
                self._check_run(num_steps, cfg)
        else:
            # A sampler that does not announce: a timestep that goes up starts a new run.
            # Reading it back is one small host sync per step.
            t = self.adapter.timestep(args, kwargs)
            value = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
            step = 0 if self._last_timestep is None or value > self._last_timestep else self.step + 1
            self._last_timestep = value
        if step == 0:
            self._reset_caches()
        elif step != self.step + 1:
            raise RuntimeError(f"step {step} announced after step {self.step}: steps must run in order")
        if self._fixed_num_steps is not None and step >= self._fixed_num_steps:
            raise ValueError(f"num_steps mismatch: the {'prior' if self.prior is not None else 'schedule'} has "
                             f"{self._fixed_num_steps} steps, the run is at step {step + 1}")
        self.step = step

    def _check_run(self, num_steps: int, cfg: bool) -> None:
        if self._fixed_num_steps is not None and num_steps != self._fixed_num_steps:
            owner = "prior" if self.prior is not None else "schedule"
            raise ValueError(f"num_steps mismatch: the {owner} has {self._fixed_num_steps}, the sampler runs {num_steps}")
        if self.prior is not None and cfg != self.prior.uses_cfg:
            raise ValueError(f"cfg mismatch: the prior was calibrated with cfg_scale={self.prior.cfg_scale} "
                             f"(CFG {'on' if self.prior.uses_cfg else 'off'}), the sampler runs with CFG {'on' if cfg else 'off'}")
        if self._fixed_num_steps is None:
            self._mask = self.schedule.mask(num_steps, self.num_blocks)

    def _reset_caches(self) -> None:
        self._current = [[None, None] for _ in range(self.num_blocks)]  # Cc: latest computed output
        self._previous = [[None, None] for _ in range(self.num_blocks)]  # Cp: the one before it

    def _mask_row(self, step: int) -> torch.Tensor:
        if self._mask is None or step >= self._mask.shape[0]:
            self._mask = self.schedule.mask(max(_OPEN_MASK_STEPS, 2 * (step + 1)), self.num_blocks)
        return self._mask[step]

    # ----------------------------------------------------------------------------- plans
    def _plan(self, step: int, block: int, branch: int) -> EntryPlan:
        key = (step, block, branch)
        plan = self._plans.get(key)
        if plan is None:
            source, previous = source_steps(self._mask, step, block, branch)
            coef = (0.0, 0.0, 0.0)
            if self.config is not None:
                coef = self.config.coefficients(step, source, previous)
                if self._judged and any(coef):
                    coef = self._judge(step, source, previous, block, branch, coef)
            plan = self._plans[key] = EntryPlan(source, previous, coef)
        return plan

    def _judge(self, step, source, previous, block, branch, coef):
        """Offline judgment (DESIGN §2, level 1) on the prior's held-out calibration statistics."""
        config, prior = self.config, self.prior
        plain = prior.plain_error(step, source, block, branch)
        if plain / max(prior.feature_energy(step, block, branch), 1e-30) <= config.judge_threshold:
            return (0.0, 0.0, 0.0)
        if config.min_gain is not None:
            corrected = prior.corrected_error(step, source, previous, block, branch, coef)
            gain = (plain - corrected) / max(plain, 1e-30)
            if gain < config.min_gain:
                return (0.0, 0.0, 0.0)
        return coef

    def _prior_term(self, kind: str, step: int, source: int, block: int, branch: int, like: torch.Tensor):
        key = (kind, step, source, block, branch, like.device, like.dtype)
        tensor = self._prior_tensors.get(key)
        if tensor is None:
            delta, trend = self.prior.delta_and_trend(step, source, block, branch)
            for name, value in (("delta", delta), ("trend", trend)):
                self._prior_tensors[(name,) + key[1:]] = value.to(device=like.device, dtype=like.dtype)
            tensor = self._prior_tensors[key]
        return tensor

    def _reuse_arguments(self, step: int, block: int, branch: int) -> dict:
        """Keyword arguments of the cached ops for one reuse entry; a zero coefficient passes None."""
        plan = self._plan(step, block, branch)
        cache = self._current[block][branch]
        if cache is None:
            raise RuntimeError(f"no cached {BRANCHES[branch]} output for block {block} at step {step}")
        alpha, beta, gamma = plan.coef
        args = {"cache": cache, "prev": None, "delta": None, "trend": None, "coef": plan.coef}
        if beta != 0.0:
            args["prev"] = self._previous[block][branch]
        if alpha != 0.0:
            args["delta"] = self._prior_term("delta", step, plan.source, block, branch, cache)
        if gamma != 0.0:
            args["trend"] = self._prior_term("trend", step, plan.source, block, branch, cache)
        return args

    # ----------------------------------------------------------------------------- the block
    def _store(self, step: int, block: int, branch: int, feature: torch.Tensor) -> None:
        if self._keep_previous:
            self._previous[block][branch] = self._current[block][branch]
        self._current[block][branch] = feature
        if self.observer is not None:
            self.observer(step, block, branch, feature)

    def _make_block_forward(self, index: int, block: nn.Module, original_forward):
        block_adapter = self.adapter.block_adapter

        def forward(*args, **kwargs):
            if not self._in_forward:  # called outside a model forward: behave as the plain block
                return original_forward(*args, **kwargs)
            x, c = self.adapter.block_inputs(args, kwargs)
            step = self.step
            compute_attn, compute_mlp = (bool(v) for v in self._mask_row(step)[index])
            backend = self._backend()
            token_threshold = self.config.token_threshold if self.config is not None else 0.0
            if not compute_attn and not compute_mlp:
                g_attn, g_mlp = block_adapter.gates(block, c)
                attn = self._reuse_arguments(step, index, 0)
                mlp = self._reuse_arguments(step, index, 1)
                return eoc_kernels.cached_block(
                    x, g_attn, g_mlp, attn["cache"], mlp["cache"],
                    prev_attn=attn["prev"], prev_mlp=mlp["prev"], delta_attn=attn["delta"], delta_mlp=mlp["delta"],
                    trend_attn=attn["trend"], trend_mlp=mlp["trend"], coef_attn=attn["coef"], coef_mlp=mlp["coef"],
                    token_threshold=token_threshold, backend=backend)
            modulation = block_adapter.modulation(block, c)
            gates = block_adapter.gates_from_modulation(modulation)
            branches = (block_adapter.attn_branch, block_adapter.mlp_branch)
            for branch, computes in enumerate((compute_attn, compute_mlp)):
                if computes:
                    feature = branches[branch](block, x, modulation)  # [B, N, C]
                    self._store(step, index, branch, feature)
                    x = x + gates[branch].unsqueeze(1) * feature
                else:
                    x = eoc_kernels.cached_branch(x, gates[branch], **self._reuse_arguments(step, index, branch),
                                                  token_threshold=token_threshold, backend=backend)
            return x

        return forward

    def _backend(self):
        if self.config is None or self.config.backend == "auto":
            return None  # EOC_BACKEND or auto
        return self.config.backend


def _restore_attr(obj, name: str, saved) -> None:
    if saved is None:
        obj.__dict__.pop(name, None)
    else:
        obj.__dict__[name] = saved


def apply_eoc(model: nn.Module, schedule: Schedule, prior=None, config: EOCConfig | None = None, *,
              adapter: ModelAdapter | None = None, observer=None) -> EOCHandle:
    """Patch ``model`` to sample under ``schedule`` with the EOC correction of ``config``.

    prior: an ``eoc_dit.Prior`` (needed by the "trend" and "delta" presets and by the judgment).
    config: None = plain caching under the schedule.
    adapter: how to reach the blocks of a model that is not laid out like ``eoc_dit.DiT``.
    observer: called as ``observer(step, block, branch, feature)`` for every computed branch output
        (``branch`` 0 = attention, 1 = MLP; ``feature`` [B, N, C], pre-gate) — calibration uses it.
    Returns a handle; ``handle.remove()``, ``remove_eoc(model)`` or ``with apply_eoc(...):`` undo it.
    """
    return EOCHandle(model, schedule, prior, config, adapter=adapter, observer=observer)


def remove_eoc(model: nn.Module) -> None:
    """Undo :func:`apply_eoc`: the model's forward is the original again. A no-op on an unpatched model."""
    _check_model(model)
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()
