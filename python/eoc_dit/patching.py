"""Patching a DiT for cached sampling with the EOC correction (DESIGN §2, §3 and §4).

``apply_eoc(model, schedule, prior, config)`` replaces the forward of the model and of each block
with versions that follow the schedule:

- a computing branch runs and writes its output (pre-gate) straight into its slot of the stacked
  cache buffer [G, L, 2, B, N, C] (G = 2 generations when the correction reads the feature before
  the latest, else 1; generations flip by index, never by copy);
- a run of consecutive fully reused blocks is ONE ``eoc_kernels.cached_segment`` call, made by the
  first block of the run (the others pass their input through), with the gates of every reused
  block of the step from ONE matmul against the gate rows of all adaLN weights, stacked at patch
  time — under FORA a whole cached step is one segment pass;
- a block that reuses one branch and computes the other uses ``eoc_kernels.cached_branch``.

Every reused feature is corrected as F̂ = Cc + α·D + β·(Cc − Cp) + γ·(Cc ⊙ E), with per-entry
coefficients from the config's preset and the offline judgment. ``remove_eoc`` puts back the exact
original forwards. The patched model counts its forward calls as steps and starts over when a new
run begins (the timestep goes up), so third-party samplers need no changes; this package's samplers
also announce each step (``step_protocol``) so no timestep is read back.

The stacked gate rows are a copy taken at patch time: re-apply the patch after changing weights.
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


@dataclass(frozen=True)
class _Segment:
    """Blocks [start, stop) fully reused at one step, and the device tensors of ``cached_segment``."""

    start: int
    stop: int
    generation: torch.Tensor  # int32 [S, 2]
    coef: torch.Tensor | None  # float32 [S, 2, 3]; None = plain reuse
    delta: torch.Tensor | None  # [S, 2, H, N, C]
    trend: torch.Tensor | None


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


class EOCHandle:
    """A patched model. ``remove()`` (or leaving the ``with`` block) restores the original forwards.

    Attributes: ``model``, ``schedule``, ``prior``, ``config`` (None = plain caching), ``num_blocks``,
    ``step`` (index of the step being run or last run; -1 before the first).
    """

    def __init__(self, model: nn.Module, schedule: Schedule, prior=None, config: EOCConfig | None = None,
                 *, adapter: ModelAdapter | None = None, observer=None, fitter=None):
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
        self.fitter = fitter  # closed-loop fitting (fitting.py): solves each step with a reuse entry
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
            self._set_mask(schedule.mask(self._fixed_num_steps, self.num_blocks))
        self._fit = None
        if config is not None and config.mode == "calibrated":
            self._fit = prior.fit_for(self._mask)
            if self._fit is None:
                raise ValueError(f"the prior has no coefficients fitted for {schedule!r} (mode 'calibrated', the "
                                 "default with a prior): fit them with eoc_dit.fit_coefficients(...) and "
                                 "prior.add_fit(fit) ('eoc fit'), or pass another config, e.g. EOCConfig(mode='extrapolate')")
        # Only a correction that reads Cp needs a second generation of the cache.
        reads_previous = (fitter is not None or (config is not None and config.mode == "extrapolate")
                          or (self._fit is not None and bool((self._fit.coef[..., 1] != 0).any())))
        self._generations = 2 if reads_previous else 1
        self._segments: dict[tuple, _Segment] = {}
        # The gate rows of every block stacked once ([L·2C, C]), so one matmul gives all gates of a step.
        rows = [self.adapter.block_adapter.gate_rows(block) for block in self.blocks]
        self._gate_weight = self._gate_bias = None
        if all(r is not None for r in rows):
            self._gate_weight = torch.cat([w for w, _ in rows])
            self._gate_bias = torch.cat([b for _, b in rows])
        self._judged = (prior is not None and config is not None and config.mode != "calibrated"
                        and (config.judge_threshold > 0 or config.min_gain is not None))
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
        self._recording = None  # fitting: {(block, branch): feature} of the uncached pass being recorded
        self._step_entries = None  # fitting: {(block, branch): entry} of this step's reuse entries
        self._step_coef = None  # fitting: {(block, branch): (α, β, γ)} the fitter chose for them
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
                if self.fitter is not None and not bool(self._mask_row(self.step).all()):
                    # The fit's targets: every branch output of an UNCACHED forward on this same input.
                    self._recording = {}
                    original_forward(*args, **kwargs)
                    self._step_entries = self._fitting_entries(self.step)
                    self._step_coef = self.fitter(self.step, list(self._step_entries.values()))
                    self._recording = None
                return original_forward(*args, **kwargs)
            finally:
                self._in_forward = False
                self._recording = self._step_entries = self._step_coef = None

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
        self._step_gates = None  # computed again by the first reused block of this forward
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
            self._set_mask(self.schedule.mask(num_steps, self.num_blocks))

    def _reset_caches(self) -> None:
        self._buffer = None  # [G, L, 2, B, N, C], allocated at the first computed branch of a run
        self._step_gates = None  # gates [B, L, 2, C] of the forward being run

    def _set_mask(self, mask: torch.Tensor) -> None:
        self._mask = mask
        # computes[t, l, k] = how many times (l, k) computed before step t: picks buffer generations.
        self._computes = torch.cat([torch.zeros(1, *mask.shape[1:], dtype=torch.long), mask.long().cumsum(0)])

    def _mask_row(self, step: int) -> torch.Tensor:
        if self._mask is None or step >= self._mask.shape[0]:
            self._set_mask(self.schedule.mask(max(_OPEN_MASK_STEPS, 2 * (step + 1)), self.num_blocks))
        return self._mask[step]

    # ----------------------------------------------------------------------------- the cache buffer
    # Entry (l, k) writes its c-th computed output into generation c % G, so at a reuse step Cc is
    # in generation (n - 1) % G and Cp in (n - 2) % G, n = computes before the step. G = 2 only when
    # the correction reads Cp; the generations flip by index, never by copying.
    def _current_generation(self, step: int, block: int, branch: int) -> int:
        return (int(self._computes[step, block, branch]) - 1) % self._generations

    def _write_slot(self, step: int, block: int, branch: int, x: torch.Tensor) -> torch.Tensor:
        shape = (self._generations, self.num_blocks, 2) + tuple(x.shape)
        buffer = self._buffer
        if buffer is None or buffer.shape != shape or buffer.dtype != x.dtype or buffer.device != x.device:
            buffer = self._buffer = torch.empty(shape, dtype=x.dtype, device=x.device)
        return buffer[int(self._computes[step, block, branch]) % self._generations, block, branch]

    # ----------------------------------------------------------------------------- plans
    def _plan(self, step: int, block: int, branch: int) -> EntryPlan:
        key = (step, block, branch)
        plan = self._plans.get(key)
        if plan is None:
            self._mask_row(step)
            source, previous = source_steps(self._mask, step, block, branch)
            coef = (0.0, 0.0, 0.0)
            if self._fit is not None:
                coef = tuple(self._fit.coef[step, block, branch].tolist())
            elif self.config is not None:
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
        """The prior delta D or trend E of one entry, [H, N, C] in ``like``'s dtype and device (cached)."""
        key = (kind, step, source, block, branch, like.device, like.dtype)
        tensor = self._prior_tensors.get(key)
        if tensor is None:
            delta, trend = self.prior.delta_and_trend(step, source, block, branch)
            for name, value in (("delta", delta), ("trend", trend)):
                self._prior_tensors[(name,) + key[1:]] = value.to(device=like.device, dtype=like.dtype)
            tensor = self._prior_tensors[key]
        return tensor

    def _branch_arguments(self, step: int, block: int, branch: int, like: torch.Tensor) -> dict:
        """Keyword arguments of ``cached_branch`` for one reuse entry; a zero coefficient passes None."""
        plan = self._plan(step, block, branch)
        current = self._current_generation(step, block, branch)
        alpha, beta, gamma = plan.coef
        args = {"cache": self._buffer[current, block, branch], "prev": None, "delta": None, "trend": None,
                "coef": plan.coef}
        if beta != 0.0:
            args["prev"] = self._buffer[1 - current, block, branch]
        if alpha != 0.0:
            args["delta"] = self._prior_term("delta", step, plan.source, block, branch, like)
        if gamma != 0.0:
            args["trend"] = self._prior_term("trend", step, plan.source, block, branch, like)
        return args

    def _segment(self, step: int, block: int, like: torch.Tensor) -> _Segment:
        """The run of consecutive fully reused blocks that holds ``block`` at ``step``, with its
        device-side arguments (built once per step, device and dtype; no host sync afterwards)."""
        key = (step, block, like.device, like.dtype)
        segment = self._segments.get(key)
        if segment is not None:
            return segment
        row = self._mask_row(step)
        reused = [not bool(row[l].any()) for l in range(self.num_blocks)]
        start, stop = block, block + 1
        if self.adapter.sequential_blocks:
            while start > 0 and reused[start - 1]:
                start -= 1
            while stop < self.num_blocks and reused[stop]:
                stop += 1
        entries = [(l, k) for l in range(start, stop) for k in range(2)]
        plans = [self._plan(step, l, k) for l, k in entries]
        S = stop - start
        generation = torch.tensor([self._current_generation(step, l, k) for l, k in entries], dtype=torch.int32)
        coef = delta = trend = None
        if any(plan.corrected for plan in plans):
            coef = torch.tensor([plan.coef for plan in plans], dtype=torch.float32).view(S, 2, 3)
            coef = coef.to(like.device)

            def stack(kind, index):  # [S, 2, H, N, C]; zeros where the term is off (the kernel skips them)
                terms = [self._prior_term(kind, step, plan.source, l, k, like) if plan.coef[index] != 0.0 else None
                         for plan, (l, k) in zip(plans, entries)]
                shape = next((t.shape for t in terms if t is not None), None)
                if shape is None:
                    return None
                return torch.stack([t if t is not None else like.new_zeros(shape) for t in terms]).view(S, 2, *shape)

            delta, trend = stack("delta", 0), stack("trend", 2)
        segment = _Segment(start, stop, generation.view(S, 2).to(like.device), coef, delta, trend)
        for l in range(start, stop):
            self._segments[(step, l, like.device, like.dtype)] = segment
        return segment

    def _segment_gates(self, segment: _Segment, c: torch.Tensor) -> torch.Tensor:
        """Gates [B, S, 2, C] of a segment; with stacked gate rows, ONE matmul per step serves every block."""
        block_adapter = self.adapter.block_adapter
        if self._gate_weight is None:
            gates = [torch.stack(block_adapter.gates_from_modulation(block_adapter.modulation(self.blocks[l], c)), dim=1)
                     for l in range(segment.start, segment.stop)]
            return torch.stack(gates, dim=1)
        if self._step_gates is None:
            weight, bias = self._gate_weight, self._gate_bias
            if weight.device != c.device or weight.dtype != c.dtype:  # the model moved after patching
                weight, bias = self._gate_weight, self._gate_bias = weight.to(c), bias.to(c)
            hidden = block_adapter.gate_input(self.blocks[0], c)  # [B, C_cond]
            self._step_gates = torch.nn.functional.linear(hidden, weight, bias).view(c.shape[0], self.num_blocks, 2, -1)
        return self._step_gates[:, segment.start : segment.stop]

    # ----------------------------------------------------------------------------- the block
    def _make_block_forward(self, index: int, block: nn.Module, original_forward):
        block_adapter = self.adapter.block_adapter
        branches = (block_adapter.attn_branch, block_adapter.mlp_branch)

        def forward(*args, **kwargs):
            if not self._in_forward:  # called outside a model forward: behave as the plain block
                return original_forward(*args, **kwargs)
            x, c = self.adapter.block_inputs(args, kwargs)
            step = self.step
            if self._recording is not None:
                return self._recording_forward(index, block, x, c)
            computes = [bool(v) for v in self._mask_row(step)[index]]
            backend = self._backend()
            token_threshold = self.config.token_threshold if self.config is not None else 0.0
            if self.fitter is not None and not all(computes):
                return self._fitting_forward(step, index, block, x, c, computes)
            if not any(computes):
                segment = self._segment(step, index, x)
                if index != segment.start:  # the first block of the run already added this one
                    return x
                return eoc_kernels.cached_segment(
                    x, self._segment_gates(segment, c), self._buffer[:, segment.start : segment.stop],
                    segment.generation, delta=segment.delta, trend=segment.trend, coef=segment.coef,
                    token_threshold=token_threshold, backend=backend)
            modulation = block_adapter.modulation(block, c)
            gates = block_adapter.gates_from_modulation(modulation)
            for branch in range(2):
                if computes[branch]:
                    slot = self._write_slot(step, index, branch, x)
                    feature = branches[branch](block, x, modulation, out=slot)  # [B, N, C], in the buffer
                    if self.observer is not None:
                        self.observer(step, index, branch, feature)
                    x = x + gates[branch].unsqueeze(1) * feature
                else:
                    x = eoc_kernels.cached_branch(x, gates[branch], **self._branch_arguments(step, index, branch, x),
                                                  token_threshold=token_threshold, backend=backend)
            return x

        return forward

    def _recording_forward(self, index, block, x, c):
        """A block computing both branches, as the original, and recording their outputs."""
        block_adapter = self.adapter.block_adapter
        modulation = block_adapter.modulation(block, c)
        gates = block_adapter.gates_from_modulation(modulation)
        for branch, run in enumerate((block_adapter.attn_branch, block_adapter.mlp_branch)):
            feature = self._recording[(index, branch)] = run(block, x, modulation)
            x = x + gates[branch].unsqueeze(1) * feature
        return x

    def _fitting_entries(self, step) -> dict:
        """{(block, branch): entry} for each reuse entry of ``step``, with what the fitter needs: the
        target F* (recorded), Cc and Cp (the cache buffer), D and E (the prior)."""
        entries = {}
        for (block, branch), truth in self._recording.items():
            if self._mask[step, block, branch]:
                continue
            plan = self._plan(step, block, branch)
            current = self._current_generation(step, block, branch)
            entry = dict(block=block, branch=branch, truth=truth, cache=self._buffer[current, block, branch],
                         prev=self._buffer[1 - current, block, branch] if plan.previous is not None else None,
                         delta=None, trend=None)
            if self.prior is not None:
                entry["delta"] = self._prior_term("delta", step, plan.source, block, branch, truth)
                entry["trend"] = self._prior_term("trend", step, plan.source, block, branch, truth)
            entries[(block, branch)] = entry
        return entries

    def _fitting_forward(self, step, index, block, x, c, computes):
        """A block during closed-loop fitting: each reused branch goes on with the corrected feature of
        the (α, β, γ) the fitter chose for this step (from the uncached pass recorded just before)."""
        block_adapter = self.adapter.block_adapter
        branches = (block_adapter.attn_branch, block_adapter.mlp_branch)
        modulation = block_adapter.modulation(block, c)
        gates = block_adapter.gates_from_modulation(modulation)
        for branch in range(2):
            if computes[branch]:
                feature = branches[branch](block, x, modulation, out=self._write_slot(step, index, branch, x))
            else:
                e, coef = self._step_entries[(index, branch)], self._step_coef[(index, branch)]
                feature = eoc_kernels.reference.corrected_feature(
                    e["cache"], prev=e["prev"] if coef[1] else None, delta=e["delta"] if coef[0] else None,
                    trend=e["trend"] if coef[2] else None, coef=coef).to(x.dtype)
            x = x + gates[branch].unsqueeze(1) * feature
        return x

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

    prior: an ``eoc_dit.Prior`` (needed by the "trend", "delta" and "calibrated" modes and by the judgment).
    config: None = the default: with a prior, ``EOCConfig(mode="calibrated")`` (coefficients fitted for
        this schedule, stored in the prior: the best correction on the testbed, README); without
        one, plain caching under the schedule.
    adapter: how to reach the blocks of a model that is not laid out like ``eoc_dit.DiT``.
    observer: called as ``observer(step, block, branch, feature)`` for every computed branch output
        (``branch`` 0 = attention, 1 = MLP; ``feature`` [B, N, C], pre-gate) — calibration uses it.
        ``feature`` is a slot of the cache buffer, overwritten later: copy what you keep.
    Returns a handle; ``handle.remove()``, ``remove_eoc(model)`` or ``with apply_eoc(...):`` undo it.
    """
    if config is None and prior is not None:
        config = EOCConfig(mode="calibrated")
    return EOCHandle(model, schedule, prior, config, adapter=adapter, observer=observer)


def remove_eoc(model: nn.Module) -> None:
    """Undo :func:`apply_eoc`: the model's forward is the original again. A no-op on an unpatched model."""
    _check_model(model)
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()
