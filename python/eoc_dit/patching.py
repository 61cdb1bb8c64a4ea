"""Patching a DiT for cached sampling with the EOC correction: the hook installer and step clock
(docs/DESIGN.md §4 and §7).

``apply_eoc(model, schedule, prior, config)`` replaces the forward of the model and of each block.
The work is split by job:

- the plan (``planner.make_plan``, pure): what every (step, block, branch) entry does — compute, or
  reuse with which source step, cache generation and coefficients (after the offline judgment);
- the feature cache (``feature_cache.FeatureCache``): the stacked buffer [G, L, 2, B, N, C], a ring of
  G in 1..4 generations, that computing branches write into and reused ones read;
- the executor (``executor.PlanExecutor``): runs each block call by the plan (a computing branch
  into its cache slot, ONE ``cached_segment`` per run of fully reused blocks with the gates of the
  step from ONE matmul, ``cached_branch`` for a half-reused block);
- this module: the hooks and the step clock. It counts the model's forward calls as steps (a
  timestep that goes up starts a new run, so third-party samplers need no changes; this package's
  samplers also announce each step, ``step_protocol``), makes the plan of each run (again when the
  schedule's mask changes with the run length) and hands every block call to the executor.

A :class:`~eoc_dit.executor.StepStrategy` (closed-loop fitting, ``fitting.py``) may replace the
plan's coefficients step by step; the handle knows nothing else about it. ``remove_eoc`` puts back
the exact original forwards. The stacked gate rows are a copy taken at patch time: re-apply the
patch after changing weights.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import eoc_kernels

from .adapters import DiTAdapter, ModelAdapter
from .config import EOCConfig
from .errors import InputTypeError, InputValueError
from .executor import PlanExecutor, StepContext, StepStrategy
from .feature_cache import MAX_GENERATIONS, FeatureCache
from .planner import Plan, make_plan
from .prior import Prior
from .prior_terms import PriorTerms
from .schedules import Schedule
from .step_protocol import LISTENER_ATTR

HANDLE_ATTR = "_eoc_handle"
# Length of the plan made for a schedule that fits any run length while the run length is unknown.
_OPEN_PLAN_STEPS = 64


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


class _StepClock:
    """Which step of which run the next forward is: announced by the sampler, or read off the timestep."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self.step = -1
        self.announced = None  # (step, num_steps, cfg) of the next forward
        self.last_timestep = None

    def announce(self, step: int, num_steps: int, cfg: bool) -> None:
        self.announced = (step, num_steps, cfg)

    def next(self, args, kwargs) -> tuple[int, tuple[int, bool] | None]:
        """(step, (num_steps, cfg) when announced else None) of the forward being entered."""
        if self.announced is not None:
            step, num_steps, cfg = self.announced
            self.announced = None
            run = (num_steps, cfg)
        else:
            # A timestep that goes up starts a new run; reading it back is one small host sync per step.
            t = self.adapter.timestep(args, kwargs)
            value = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
            step = 0 if self.last_timestep is None or value > self.last_timestep else self.step + 1
            self.last_timestep = value
            run = None
        if step != 0 and step != self.step + 1:
            raise RuntimeError(f"step {step} announced after step {self.step}: steps must run in order")
        self.step = step
        return step, run


class EOCHandle:
    """A patched model. ``remove()`` (or leaving the ``with`` block) restores the original forwards.

    Attributes: ``model``, ``schedule``, ``prior``, ``config`` (None = plain caching), ``num_blocks``,
    ``step`` (index of the step being run or last run; -1 before the first), ``plan`` (the current
    ``planner.Plan``; None until the run length is known), ``cache`` (the ``FeatureCache``),
    ``prior_terms`` (the device copies of the prior terms the plan reads; None without a prior).
    """

    def __init__(self, model: nn.Module, schedule: Schedule, prior: Prior | None = None,
                 config: EOCConfig | None = None, *, adapter: ModelAdapter | None = None, observer=None,
                 strategy: StepStrategy | None = None):
        _check_model(model)
        if getattr(model, HANDLE_ATTR, None) is not None:
            raise InputValueError("model is already patched: call remove_eoc(model) first")
        if not isinstance(schedule, Schedule):
            raise InputTypeError(f"schedule must be an eoc_dit schedule (FORASchedule, MaskSchedule), "
                                 f"got {type(schedule).__name__}")
        if config is not None and not isinstance(config, EOCConfig):
            raise InputTypeError(f"config must be an EOCConfig or None, got {type(config).__name__}")
        if prior is not None and not isinstance(prior, Prior):
            raise InputTypeError(f"prior must be an eoc_dit.Prior or None, got {type(prior).__name__}")
        if adapter is not None and not isinstance(adapter, ModelAdapter):
            raise InputTypeError(f"adapter must be an eoc_dit.ModelAdapter or None, got {type(adapter).__name__}")
        if observer is not None and not callable(observer):
            raise InputTypeError(f"observer must be callable as observer(step, block, branch, feature), "
                                 f"got {type(observer).__name__}")
        if strategy is not None and not isinstance(strategy, StepStrategy):
            raise InputTypeError(f"strategy must be an eoc_dit.patching.StepStrategy or None, "
                                 f"got {type(strategy).__name__}")
        if strategy is not None and (isinstance(strategy.num_generations, bool)
                                     or strategy.num_generations not in range(1, MAX_GENERATIONS + 1)):
            raise InputValueError(f"strategy.num_generations must be an int in 1..{MAX_GENERATIONS} (computed "
                                  f"features kept per entry), got {strategy.num_generations!r}")
        if config is not None and config.needs_prior and prior is None:
            raise InputValueError(f"EOCConfig(mode={config.mode!r}) needs a prior: pass prior=Prior.load(...) "
                                  "or use mode='extrapolate'")
        if config is not None and prior is None and config.judge_threshold > 0:
            raise InputValueError("EOCConfig.judge_threshold > 0 needs a prior "
                                  "(the judgment is measured on calibration data)")

        self.model, self.schedule, self.prior, self.config = model, schedule, prior, config
        self.adapter = adapter if adapter is not None else default_adapter(model)
        self.strategy = strategy
        self.blocks = self.adapter.blocks(model)
        self.num_blocks = len(self.blocks)
        if self.num_blocks == 0:
            raise InputValueError("model has no blocks to cache")
        # An unknown or unavailable backend (config.backend, else $EOC_BACKEND) fails now, not mid-run.
        parameter = next(model.parameters(), None)
        eoc_kernels.resolve_backend(self._backend(), parameter.device if parameter is not None else "cpu")

        self._fixed_num_steps = schedule.fixed_num_steps
        if prior is not None:
            prior.check_model(model, num_blocks=self.num_blocks)
            if self._fixed_num_steps is not None and self._fixed_num_steps != prior.num_steps:
                raise InputValueError(f"num_steps mismatch: the schedule has {self._fixed_num_steps} steps, "
                                      f"the prior {prior.num_steps}")
            self._fixed_num_steps = prior.num_steps
        self.executor = PlanExecutor(self.adapter, self.blocks, config, prior, observer)
        if self._fixed_num_steps is not None:  # plan now, so a schedule/prior mismatch fails at patch time
            self._replan(schedule.mask(self._fixed_num_steps, self.num_blocks))
        self._clock = _StepClock(self.adapter)
        self._in_forward = False
        self._install()

    @property
    def step(self) -> int:
        return self._clock.step

    @property
    def plan(self) -> Plan | None:
        return self.executor.plan

    @property
    def cache(self) -> FeatureCache | None:
        return self.executor.cache

    @property
    def prior_terms(self) -> PriorTerms | None:
        return self.executor.prior_terms

    @property
    def observer(self):
        return self.executor.observer

    @observer.setter
    def observer(self, observer) -> None:
        if observer is not None and not callable(observer):
            raise InputTypeError(f"observer must be callable as observer(step, block, branch, feature), "
                                 f"got {type(observer).__name__}")
        self.executor.observer = observer

    @step.setter
    def step(self, value: int) -> None:
        """Rewind the step clock, so that the next forward runs step ``value + 1`` again (benchmarks time
        one step repeatedly); the cache keeps what the run computed."""
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise InputValueError(f"step must be an int >= -1, got {value!r}")
        self._clock.step = value

    # ----------------------------------------------------------------------------- plan
    def _replan(self, mask: torch.Tensor, *, extends_run: bool = False) -> None:
        """Make the plan for ``mask`` (a new run length, or a schedule whose mask changed) and drop
        everything built for the previous plan. ``extends_run``: the run goes on under a longer plan
        with the same prefix, so the features cached so far stay valid."""
        if self.plan is not None and torch.equal(self.plan.mask, mask):
            return
        fit = None
        if self.config is not None and self.config.mode == "calibrated":
            fit = self.prior.fit_for(mask)
            if fit is None:
                raise InputValueError(f"the prior has no coefficients fitted for {self.schedule!r} (mode 'calibrated', "
                                      "the default with a prior): fit them with eoc_dit.fit_coefficients(...) and "
                                      "prior.add_fit(fit) ('eoc fit'), or pass another config, "
                                      "e.g. EOCConfig(mode='extrapolate')")
        generations = self.strategy.num_generations if self.strategy is not None else 1
        plan = make_plan(mask, self.config, self.prior, fit, sequential_blocks=self.adapter.sequential_blocks,
                         min_generations=generations)
        self.executor.set_plan(plan, extends_run=extends_run)

    def _plan_for_run(self, num_steps: int | None) -> None:
        """Make sure the plan covers the run starting now (``num_steps`` None: not announced)."""
        if self._fixed_num_steps is not None:
            return
        if num_steps is not None:
            self._replan(self.schedule.mask(num_steps, self.num_blocks))
        elif not self.schedule.prefix_stable:
            raise InputValueError(f"{self.schedule!r} has a mask that depends on the step count, "
                                  "and the sampler did not announce it: use an eoc_dit sampler, a prior "
                                  "or a MaskSchedule")
        elif self.plan is None:
            self._replan(self.schedule.mask(_OPEN_PLAN_STEPS, self.num_blocks))

    def _extend_open_plan(self, step: int) -> None:
        """An unannounced run longer than the open plan: plan further (the schedule is prefix-stable)."""
        self._replan(self.schedule.mask(max(_OPEN_PLAN_STEPS, 2 * (step + 1)), self.num_blocks), extends_run=True)

    # ----------------------------------------------------------------------------- install / remove
    def _install(self):
        model = self.model
        # The adapter installs each forward (an instance attribute, or a framework's hook registry) and
        # returns its undo; the undos run in reverse order at remove().
        self._undo = [self.adapter.install_forward(
            block, lambda original, index=index, block=block: self._make_block_forward(index, block, original))
            for index, block in enumerate(self.blocks)]
        self._undo.append(self.adapter.install_forward(model, self._make_model_forward))
        setattr(model, LISTENER_ATTR, self._clock.announce)
        setattr(model, HANDLE_ATTR, self)

    def _make_model_forward(self, original_forward):
        def forward(*args, **kwargs):
            self._begin_step(args, kwargs)
            self._in_forward = True
            try:
                if self.strategy is not None and self.plan.step_has_reuse(self.step):
                    def uncached():
                        return self.executor.record_uncached(lambda: original_forward(*args, **kwargs))

                    self.executor.step_coef = self.strategy.step_coefficients(
                        StepContext(self.executor, self.step, uncached))
                return original_forward(*args, **kwargs)
            finally:
                self._in_forward = False
                self.executor.step_coef = None

        return forward

    def remove(self) -> None:
        """Restore the model's and the blocks' original forwards (idempotent)."""
        model = self.model
        if getattr(model, HANDLE_ATTR, None) is not self:
            return
        for undo in reversed(self._undo):
            undo()
        delattr(model, LISTENER_ATTR)
        delattr(model, HANDLE_ATTR)
        if self.cache is not None:
            self.cache.reset()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    # ----------------------------------------------------------------------------- the step clock
    def _begin_step(self, args, kwargs) -> None:
        step, run = self._clock.next(args, kwargs)
        if step == 0:
            if run is not None:
                self._check_run(*run)
            self._plan_for_run(run[0] if run is not None else None)
        if self._fixed_num_steps is not None and step >= self._fixed_num_steps:
            raise InputValueError(f"num_steps mismatch: the {'prior' if self.prior is not None else 'schedule'} has "
                                  f"{self._fixed_num_steps} steps, the run is at step {step + 1}")
        if step >= self.plan.num_steps:
            self._extend_open_plan(step)
        self.executor.begin_step(new_run=step == 0)

    def _check_run(self, num_steps: int, cfg: bool) -> None:
        if self._fixed_num_steps is not None and num_steps != self._fixed_num_steps:
            owner = "prior" if self.prior is not None else "schedule"
            raise InputValueError(f"num_steps mismatch: the {owner} has {self._fixed_num_steps}, "
                                  f"the sampler runs {num_steps}")
        if self.prior is not None and cfg != self.prior.uses_cfg:
            raise InputValueError(f"cfg mismatch: the prior was calibrated with cfg_scale={self.prior.cfg_scale} "
                                  f"(CFG {'on' if self.prior.uses_cfg else 'off'}), "
                                  f"the sampler runs with CFG {'on' if cfg else 'off'}")

    def _backend(self):
        if self.config is None or self.config.backend == "auto":
            return None  # EOC_BACKEND or auto
        return self.config.backend

    # ----------------------------------------------------------------------------- the block
    def _make_block_forward(self, index: int, block: nn.Module, original_forward):
        def forward(*args, **kwargs):
            if not self._in_forward:  # called outside a model forward: behave as the plain block
                return original_forward(*args, **kwargs)
            x, c = self.adapter.block_inputs(args, kwargs)
            return self.executor.run_block(self.step, index, block, x, c)

        return forward


def default_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter ``apply_eoc`` uses when none is given: diffusers' DiTTransformer2DModel and
    PixArtTransformer2DModel get ``diffusers_adapters.DiffusersAdapter`` (diffusers is imported only when it
    already is, i.e. when such a model can exist), anything else ``DiTAdapter`` (eoc_dit.DiT's layout)."""
    diffusers = sys.modules.get("diffusers")
    if diffusers is not None and isinstance(model, diffusers.ModelMixin):
        from .diffusers_adapters import diffusers_adapter

        return diffusers_adapter(model)
    return DiTAdapter()


def apply_eoc(model: nn.Module, schedule: Schedule, prior: Prior | None = None, config: EOCConfig | None = None, *,
              adapter: ModelAdapter | None = None, observer=None) -> EOCHandle:
    """Patch ``model`` to sample under ``schedule`` with the EOC correction of ``config``.

    prior: an ``eoc_dit.Prior`` (needed by the "trend", "delta" and "calibrated" modes and by the judgment).
    config: the one rule for the default — None means ``EOCConfig()`` (mode "calibrated": coefficients
        fitted for this schedule and stored in the prior, the best correction on the testbed, README)
        when a prior is given, and plain caching under the schedule when none is.
    adapter: how to reach the blocks of a model that is not laid out like ``eoc_dit.DiT``.
    observer: called as ``observer(step, block, branch, feature)`` for every computed branch output
        (``branch`` 0 = attention, 1 = MLP; ``feature`` [B, N, C], pre-gate) — calibration uses it.
        ``feature`` is a slot of the cache buffer, overwritten later: copy what you keep.
    Returns a handle; ``handle.remove()``, ``remove_eoc(model)`` or ``with apply_eoc(...):`` undo it.
    """
    if config is None and prior is not None:
        config = EOCConfig()
    return EOCHandle(model, schedule, prior, config, adapter=adapter, observer=observer)


def remove_eoc(model: nn.Module) -> None:
    """Undo :func:`apply_eoc`: the model's forward is the original again. A no-op on an unpatched model."""
    _check_model(model)
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()
