"""Patching a DiT for cached sampling with the EOC correction: the hook installer and step clock
(docs/DESIGN.md §4 and §7).

``apply_eoc(model, schedule, prior, config)`` replaces the forward of the model and of each block.
Three parts, each with one job:

- the plan (``planner.make_plan``, pure): what every (step, block, branch) entry does — compute, or
  reuse with which source step, cache generation and coefficients (after the offline judgment);
- the feature cache (``feature_cache.FeatureCache``): the stacked buffer [G, L, 2, B, N, C] that
  computing branches write into and reused ones read;
- this module: the hooks and the step clock. It counts the model's forward calls as steps (a
  timestep that goes up starts a new run, so third-party samplers need no changes; this package's
  samplers also announce each step, ``step_protocol``), and in each block executes the plan:
  a computing branch writes its output straight into its cache slot; a run of consecutive fully
  reused blocks is ONE ``eoc_kernels.cached_segment`` call (gates of every reused block of the
  step from ONE matmul against the stacked gate rows); a block reusing one branch uses
  ``eoc_kernels.cached_branch``.

A :class:`StepStrategy` (closed-loop fitting, ``fitting.py``) may replace the plan's coefficients
step by step; the handle knows nothing else about it. ``remove_eoc`` puts back the exact original
forwards. The stacked gate rows are a copy taken at patch time: re-apply the patch after changing
weights.
"""

from __future__ import annotations

import torch
from torch import nn

import eoc_kernels

from .adapters import DiTAdapter, ModelAdapter
from .config import EOCConfig
from .errors import InputTypeError, InputValueError
from .feature_cache import FeatureCache
from .planner import Plan, make_plan
from .prior import Prior
from .prior_terms import DELTA, TREND, PriorTerms
from .schedules import Schedule
from .step_protocol import LISTENER_ATTR

HANDLE_ATTR = "_eoc_handle"
# Length of the plan made for a schedule that fits any run length while the run length is unknown.
_OPEN_PLAN_STEPS = 64


class StepStrategy:
    """Replaces the plan's coefficients of each step that has a reuse entry (closed-loop fitting).

    ``step_coefficients(context)`` is called before the step's forward with a :class:`StepContext`
    and returns {(block, branch): (α, β, γ)} for every reuse entry of the step; the step then runs
    branch by branch with ``eoc_kernels.reference.corrected_feature`` of those coefficients.
    ``two_generations``: the cache keeps Cp even where the plan reads none.
    """

    two_generations = True

    def step_coefficients(self, context: StepContext) -> dict[tuple[int, int], tuple[float, float, float]]:
        raise NotImplementedError


class StepContext:
    """What a :class:`StepStrategy` may look at in the step about to run."""

    def __init__(self, handle: EOCHandle, run_uncached):
        self._handle, self._run_uncached, self._uncached = handle, run_uncached, None
        self.step = handle.step
        self.reuse_entries = handle.plan.reuse_entries(self.step)  # [(block, branch)]

    def uncached_features(self) -> dict[tuple[int, int], torch.Tensor]:
        """{(block, branch): pre-gate output [B, N, C]} of an UNCACHED forward on this step's input."""
        if self._uncached is None:
            self._uncached = self._run_uncached()
        return self._uncached

    def entry(self, block: int, branch: int):
        return self._handle.plan.entry(self.step, block, branch)

    def cached(self, block: int, branch: int) -> torch.Tensor:
        """Cc, this run's feature at the entry's source step, [B, N, C]."""
        return self._handle.cache.feature(self.entry(block, branch).generation, block, branch)

    def previous(self, block: int, branch: int) -> torch.Tensor | None:
        """Cp, this run's feature at the compute step before the source; None when there is none, or when
        the cache keeps one generation (a strategy with ``two_generations = False``)."""
        entry = self.entry(block, branch)
        if entry.previous is None or self._handle.plan.num_generations == 1:  # one generation keeps no Cp
            return None
        return self._handle.cache.feature(1 - entry.generation, block, branch)

    def prior_term(self, term: int, block: int, branch: int, like: torch.Tensor) -> torch.Tensor | None:
        """The prior's D (``term`` = 0) or E (2) of the entry, [H, N, C]; None without a prior."""
        terms = self._handle.prior_terms
        if terms is None:
            return None
        return terms.entry(term, self.step, self.entry(block, branch), block, branch, like)


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
        if config is not None and config.needs_prior and prior is None:
            raise InputValueError(f"EOCConfig(mode={config.mode!r}) needs a prior: pass prior=Prior.load(...) "
                                  "or use mode='extrapolate'")
        if config is not None and prior is None and config.judge_threshold > 0:
            raise InputValueError("EOCConfig.judge_threshold > 0 needs a prior "
                                  "(the judgment is measured on calibration data)")

        self.model, self.schedule, self.prior, self.config = model, schedule, prior, config
        self.adapter = adapter if adapter is not None else DiTAdapter()
        self.observer = observer
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
        self.plan: Plan | None = None
        self.cache: FeatureCache | None = None
        self.prior_terms = PriorTerms(prior) if prior is not None else None
        self._segment_args: dict[tuple, tuple] = {}
        if self._fixed_num_steps is not None:  # plan now, so a schedule/prior mismatch fails at patch time
            self._replan(schedule.mask(self._fixed_num_steps, self.num_blocks))

        # The gate rows of every block stacked once ([L·2C, C]), so one matmul gives all gates of a step.
        rows = [self.adapter.block_adapter.gate_rows(block) for block in self.blocks]
        self._gate_weight = self._gate_bias = None
        if all(r is not None for r in rows):
            self._gate_weight = torch.cat([w for w, _ in rows])
            self._gate_bias = torch.cat([b for _, b in rows])

        self._clock = _StepClock(self.adapter)
        self._in_forward = False
        self._step_gates = None  # gates [B, L, 2, C] of the forward being run
        self._recording = None  # {(block, branch): feature} of an uncached pass being recorded
        self._step_coef = None  # {(block, branch): (α, β, γ)} of the strategy, for this step
        self._install()

    @property
    def step(self) -> int:
        return self._clock.step

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
        two_generations = self.strategy is not None and self.strategy.two_generations
        self.plan = make_plan(mask, self.config, self.prior, fit, sequential_blocks=self.adapter.sequential_blocks,
                              two_generations=two_generations)
        if self.cache is None or self.cache.num_generations != self.plan.num_generations:
            if extends_run:
                raise RuntimeError(f"the run went past the {_OPEN_PLAN_STEPS}-step plan made for an unannounced "
                                   "sampler, and the longer plan needs another cache layout: use an eoc_dit sampler")
            self.cache = FeatureCache(self.plan.num_generations, self.num_blocks)
        if not extends_run:
            self.cache.reset()
        self._segment_args.clear()
        if self.prior_terms is not None:
            self.prior_terms.clear()

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
        self._saved_model_forward = model.__dict__.get("forward")
        original_forward = model.forward

        def forward(*args, **kwargs):
            self._begin_step(args, kwargs)
            self._in_forward = True
            try:
                if self.strategy is not None and self.plan.step_has_reuse(self.step):
                    context = StepContext(self, lambda: self._record_uncached(original_forward, args, kwargs))
                    self._step_coef = self.strategy.step_coefficients(context)
                return original_forward(*args, **kwargs)
            finally:
                self._in_forward = False
                self._recording = self._step_coef = None

        self._saved_block_forwards = []
        for index, block in enumerate(self.blocks):
            self._saved_block_forwards.append(block.__dict__.get("forward"))
            block.forward = self._make_block_forward(index, block, block.forward)
        model.forward = forward
        setattr(model, LISTENER_ATTR, self._clock.announce)
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
            self.cache.reset()
        if self._fixed_num_steps is not None and step >= self._fixed_num_steps:
            raise InputValueError(f"num_steps mismatch: the {'prior' if self.prior is not None else 'schedule'} has "
                             f"{self._fixed_num_steps} steps, the run is at step {step + 1}")
        if step >= self.plan.num_steps:
            self._extend_open_plan(step)
        self._step_gates = None  # computed again by the first reused block of this forward

    def _check_run(self, num_steps: int, cfg: bool) -> None:
        if self._fixed_num_steps is not None and num_steps != self._fixed_num_steps:
            owner = "prior" if self.prior is not None else "schedule"
            raise InputValueError(f"num_steps mismatch: the {owner} has {self._fixed_num_steps}, "
                                  f"the sampler runs {num_steps}")
        if self.prior is not None and cfg != self.prior.uses_cfg:
            raise InputValueError(f"cfg mismatch: the prior was calibrated with cfg_scale={self.prior.cfg_scale} "
                                  f"(CFG {'on' if self.prior.uses_cfg else 'off'}), "
                                  f"the sampler runs with CFG {'on' if cfg else 'off'}")

    # ----------------------------------------------------------------------------- op arguments
    def _branch_arguments(self, step: int, block: int, branch: int, like: torch.Tensor) -> dict:
        """Keyword arguments of ``cached_branch`` for one reuse entry; a zero coefficient passes None."""
        entry = self.plan.entry(step, block, branch)
        alpha, beta, gamma = entry.coef
        args = {"cache": self.cache.feature(entry.generation, block, branch), "prev": None, "delta": None,
                "trend": None, "coef": entry.coef}
        if beta != 0.0:
            args["prev"] = self.cache.feature(1 - entry.generation, block, branch)
        if alpha != 0.0:
            args["delta"] = self.prior_terms.entry(DELTA, step, entry, block, branch, like)
        if gamma != 0.0:
            args["trend"] = self.prior_terms.entry(TREND, step, entry, block, branch, like)
        return args

    def _segment_arguments(self, segment, like: torch.Tensor) -> tuple:
        """(generation [S, 2], coef [S, 2, 3] or None, delta, trend) of a segment on ``like``'s device,
        built once per plan, device and dtype: no host sync afterwards."""
        key = (segment.step, segment.start, like.device, like.dtype)
        args = self._segment_args.get(key)
        if args is None:
            S = segment.stop - segment.start
            generation = torch.tensor([e.generation for e in segment.entries], dtype=torch.int32).view(S, 2)
            coef = delta = trend = None
            if segment.corrected:
                coef = torch.tensor([e.coef for e in segment.entries],
                                    dtype=torch.float32).view(S, 2, 3).to(like.device)
                delta = self.prior_terms.segment(DELTA, segment, like) if segment.uses(DELTA) else None
                trend = self.prior_terms.segment(TREND, segment, like) if segment.uses(TREND) else None
            args = self._segment_args[key] = (generation.to(like.device), coef, delta, trend)
        return args

    def _segment_gates(self, segment, c: torch.Tensor) -> torch.Tensor:
        """Gates [B, S, 2, C] of a segment; with stacked gate rows, ONE matmul per step serves every block."""
        block_adapter = self.adapter.block_adapter
        if self._gate_weight is None:
            gates = [torch.stack(block_adapter.gates_from_modulation(block_adapter.modulation(self.blocks[l], c)),
                                 dim=1)
                     for l in range(segment.start, segment.stop)]
            return torch.stack(gates, dim=1)
        if self._step_gates is None:
            weight, bias = self._gate_weight, self._gate_bias
            if weight.device != c.device or weight.dtype != c.dtype:  # the model moved after patching
                weight, bias = self._gate_weight, self._gate_bias = weight.to(c), bias.to(c)
            hidden = block_adapter.gate_input(self.blocks[0], c)  # [B, C_cond]
            self._step_gates = torch.nn.functional.linear(hidden, weight, bias).view(c.shape[0], self.num_blocks, 2, -1)
        return self._step_gates[:, segment.start : segment.stop]

    def _backend(self):
        if self.config is None or self.config.backend == "auto":
            return None  # EOC_BACKEND or auto
        return self.config.backend

    # ----------------------------------------------------------------------------- the block
    def _make_block_forward(self, index: int, block: nn.Module, original_forward):
        block_adapter = self.adapter.block_adapter
        branches = (block_adapter.attn_branch, block_adapter.mlp_branch)

        def forward(*args, **kwargs):
            if not self._in_forward:  # called outside a model forward: behave as the plain block
                return original_forward(*args, **kwargs)
            x, c = self.adapter.block_inputs(args, kwargs)
            if self._recording is not None:
                return self._recording_forward(index, block, x, c)
            step, plan = self.step, self.plan
            computes = [plan.computes(step, index, k) for k in range(2)]
            if self._step_coef is not None and not all(computes):
                return self._strategy_forward(step, index, block, x, c, computes)
            backend = self._backend()
            token_threshold = self.config.token_threshold if self.config is not None else 0.0
            if not any(computes):
                segment = plan.segment(step, index)
                if index != segment.start:  # the first block of the run already added this one
                    return x
                generation, coef, delta, trend = self._segment_arguments(segment, x)
                return eoc_kernels.cached_segment(
                    x, self._segment_gates(segment, c), self.cache.blocks(segment.start, segment.stop), generation,
                    delta=delta, trend=trend, coef=coef, token_threshold=token_threshold, backend=backend)
            modulation = block_adapter.modulation(block, c)
            gates = block_adapter.gates_from_modulation(modulation)
            for branch in range(2):
                if computes[branch]:
                    slot = self.cache.slot(plan.write_generation(step, index, branch), index, branch, x)
                    feature = branches[branch](block, x, modulation, out=slot)  # [B, N, C], in the buffer
                    if self.observer is not None:
                        self.observer(step, index, branch, feature)
                    x = x + gates[branch].unsqueeze(1) * feature
                else:
                    x = eoc_kernels.cached_branch(x, gates[branch], **self._branch_arguments(step, index, branch, x),
                                                  token_threshold=token_threshold, backend=backend)
            return x

        return forward

    def _record_uncached(self, original_forward, args, kwargs) -> dict:
        """Run the original forward with every block computing both branches; their outputs by (block, branch)."""
        self._recording = {}
        try:
            original_forward(*args, **kwargs)
            return self._recording
        finally:
            self._recording = None

    def _recording_forward(self, index, block, x, c):
        """A block computing both branches, as the original, and recording their outputs."""
        block_adapter = self.adapter.block_adapter
        modulation = block_adapter.modulation(block, c)
        gates = block_adapter.gates_from_modulation(modulation)
        for branch, run in enumerate((block_adapter.attn_branch, block_adapter.mlp_branch)):
            feature = self._recording[(index, branch)] = run(block, x, modulation)
            x = x + gates[branch].unsqueeze(1) * feature
        return x

    def _strategy_forward(self, step, index, block, x, c, computes):
        """A block at a step whose coefficients the strategy chose: each reused branch goes on with
        ``corrected_feature`` of those coefficients, branch by branch (no fused op)."""
        block_adapter = self.adapter.block_adapter
        branches = (block_adapter.attn_branch, block_adapter.mlp_branch)
        modulation = block_adapter.modulation(block, c)
        gates = block_adapter.gates_from_modulation(modulation)
        for branch in range(2):
            if computes[branch]:
                slot = self.cache.slot(self.plan.write_generation(step, index, branch), index, branch, x)
                feature = branches[branch](block, x, modulation, out=slot)
            else:
                entry = self.plan.entry(step, index, branch)
                alpha, beta, gamma = coef = self._step_coef[(index, branch)]
                prev = self.cache.feature(1 - entry.generation, index, branch) if beta else None
                delta = self.prior_terms.entry(DELTA, step, entry, index, branch, x) if alpha else None
                trend = self.prior_terms.entry(TREND, step, entry, index, branch, x) if gamma else None
                feature = eoc_kernels.reference.corrected_feature(
                    self.cache.feature(entry.generation, index, branch), prev=prev, delta=delta, trend=trend,
                    coef=coef).to(x.dtype)
            x = x + gates[branch].unsqueeze(1) * feature
        return x


def _restore_attr(obj, name: str, saved) -> None:
    if saved is None:
        obj.__dict__.pop(name, None)
    else:
        obj.__dict__[name] = saved


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
