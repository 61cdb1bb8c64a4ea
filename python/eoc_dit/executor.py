"""Running a patched model's blocks by the plan (docs/DESIGN.md §7).

:class:`PlanExecutor` owns the device side of a cached run: the feature cache, the prior terms on
the device, the op arguments built once per plan, and the gate rows of every block stacked once
([L·2C, C_cond]) so that ONE matmul gives all gates of a step. For each block call it does what
the plan (``planner.Plan``) says:

- a computing branch runs and writes its output (pre-gate) straight into its cache slot;
- the first block of a run of fully reused blocks makes ONE ``eoc_kernels.cached_segment`` call
  for the whole run (the other blocks of the run pass their input through);
- a block that reuses one branch and computes the other uses ``eoc_kernels.cached_branch``.

A :class:`StepStrategy` may hand in the coefficients of a step instead (closed-loop fitting); the
step then runs branch by branch with ``eoc_kernels.reference.corrected_feature``.

Coefficients are (α, β₁, γ[, β₂[, β₃]]) (issue 10, K-history correction): β_i reads C_i, the i-th
computed feature before the latest, kept in generation (g − i) % G of the cache ring.
"""

from __future__ import annotations

import torch
from torch import nn

import eoc_kernels

from .adapters import ModelAdapter
from .config import EOCConfig
from .feature_cache import FeatureCache
from .planner import EntryPlan, Plan, SegmentPlan, history_reads
from .prior import Prior
from .prior_terms import DELTA, TREND, PriorTerms

_HISTORY_ARGS = ("prev", "prev2", "prev3")  # C_1, C_2, C_3 of cached_branch / corrected_feature


class StepStrategy:
    """Replaces the plan's coefficients of each step that has a reuse entry (closed-loop fitting).

    ``step_coefficients(context)`` is called before the step's forward with a :class:`StepContext`
    and returns {(block, branch): (α, β₁, γ[, β₂[, β₃]])} (3 to 5 numbers) for every reuse entry of the
    step; the step then runs branch by branch with ``eoc_kernels.reference.corrected_feature`` of those
    coefficients. β_i needs C_i: i < ``num_generations`` and i computed features before the latest.
    ``num_generations`` (1..4): how many computed features per entry the cache keeps (C_0..C_{G−1}) even
    where the plan reads fewer; the default 2 keeps C_0 and C_1.
    """

    num_generations = 2

    def step_coefficients(self, context: StepContext) -> dict[tuple[int, int], tuple[float, ...]]:
        raise NotImplementedError


class StepContext:
    """What a :class:`StepStrategy` may look at in the step about to run."""

    def __init__(self, executor: PlanExecutor, step: int, run_uncached):
        self._executor, self._run_uncached, self._uncached = executor, run_uncached, None
        self.step = step
        self.reuse_entries = executor.plan.reuse_entries(step)  # [(block, branch)]

    def uncached_features(self) -> dict[tuple[int, int], torch.Tensor]:
        """{(block, branch): pre-gate output [B, N, C]} of an UNCACHED forward on this step's input."""
        if self._uncached is None:
            self._uncached = self._run_uncached()
        return self._uncached

    def entry(self, block: int, branch: int) -> EntryPlan:
        return self._executor.plan.entry(self.step, block, branch)

    def history(self, block: int, branch: int) -> list[torch.Tensor]:
        """[C_0, C_1, ...]: this run's features of the entry at its compute steps ``entry(block,
        branch).history``, latest first, each [B, N, C], as many as the entry has computed and the cache
        keeps (at most the strategy's ``num_generations``). They are cache slots: copy what you keep."""
        entry, plan, cache = self.entry(block, branch), self._executor.plan, self._executor.cache
        kept = min(len(entry.history), plan.num_generations)
        return [cache.feature(plan.generation_of(entry, j), block, branch) for j in range(kept)]

    def cached(self, block: int, branch: int) -> torch.Tensor:
        """C_0, this run's feature at the entry's source step, [B, N, C]."""
        return self._executor.cache.feature(self.entry(block, branch).generation, block, branch)

    def previous(self, block: int, branch: int) -> torch.Tensor | None:
        """C_1, this run's feature at the compute step before the source; None when there is none, or when
        the cache keeps one generation (a strategy with ``num_generations = 1``)."""
        history = self.history(block, branch)
        return history[1] if len(history) > 1 else None

    def prior_term(self, term: int, block: int, branch: int, like: torch.Tensor) -> torch.Tensor | None:
        """The prior's D (``term`` = 0) or E (2) of the entry, [H, N, C]; None without a prior."""
        terms = self._executor.prior_terms
        if terms is None:
            return None
        return terms.entry(term, self.step, self.entry(block, branch), block, branch, like)


class PlanExecutor:
    """The device side of a patched model: runs each block call by the current plan.

    Attributes: ``plan`` (None until set), ``cache`` (the ``FeatureCache``), ``prior_terms`` (None
    without a prior), ``observer`` (called as ``observer(step, block, branch, feature)`` for every
    computed branch output).
    """

    def __init__(self, adapter: ModelAdapter, blocks: list[nn.Module], config: EOCConfig | None,
                 prior: Prior | None, observer=None):
        self.adapter, self.blocks, self.num_blocks = adapter, blocks, len(blocks)
        self.backend = None if config is None or config.backend == "auto" else config.backend  # None: $EOC_BACKEND
        self.token_threshold = config.token_threshold if config is not None else 0.0
        self.observer = observer
        self.plan: Plan | None = None
        self.cache: FeatureCache | None = None
        self.prior_terms = PriorTerms(prior) if prior is not None else None
        self._segment_args: dict[tuple, tuple] = {}
        # The gate rows of every block stacked once ([L·2C, C_cond]): one matmul gives all gates of a step.
        rows = [adapter.block_adapter.gate_rows(block) for block in blocks]
        self._gate_weight = self._gate_bias = None
        if all(r is not None for r in rows):
            self._gate_weight = torch.cat([w for w, _ in rows])
            self._gate_bias = torch.cat([b for _, b in rows])
        self._step_gates = None  # gates [B, L, 2, C] of the forward being run
        self._recording = None  # {(block, branch): feature} of an uncached pass being recorded
        self.step_coef = None  # {(block, branch): coef} a strategy chose for the step being run

    # ----------------------------------------------------------------------------- plan and step
    def set_plan(self, plan: Plan, *, extends_run: bool = False) -> None:
        """Serve ``plan`` from now on, dropping what was built for the previous one. ``extends_run``: the
        run goes on under a longer plan with the same prefix, so the features cached so far stay."""
        if self.cache is None or self.cache.num_generations != plan.num_generations:
            if extends_run:
                raise RuntimeError("the run went past the plan made for an unannounced sampler, and the longer "
                                   "plan needs another cache layout: use an eoc_dit sampler")
            self.cache = FeatureCache(plan.num_generations, self.num_blocks)
        if not extends_run:
            self.cache.reset()
        self.plan = plan
        self._segment_args.clear()
        if self.prior_terms is not None:
            self.prior_terms.clear()

    def begin_step(self, new_run: bool) -> None:
        if new_run:
            self.cache.reset()
        self._step_gates = None  # computed again by the first reused block of this forward
        self.step_coef = None

    def record_uncached(self, run) -> dict[tuple[int, int], torch.Tensor]:
        """Call ``run()`` (the original model forward) with every block computing both branches, as the
        original does; their outputs by (block, branch)."""
        self._recording = {}
        try:
            run()
            return self._recording
        finally:
            self._recording = None

    # ----------------------------------------------------------------------------- one block call
    def run_block(self, step: int, index: int, block: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Block ``index`` at ``step`` on ``x`` [B, N, C] with conditioning ``c`` [B, C] → [B, N, C]."""
        if self._recording is not None:
            return self._recording_forward(index, block, x, c)
        plan = self.plan
        computes = [plan.computes(step, index, k) for k in range(2)]
        if self.step_coef is not None and not all(computes):  # the strategy's coefficients, branch by branch
            return self._branchwise(step, index, block, x, c, computes, self._strategy_branch)
        if not any(computes):
            segment = plan.segment(step, index)
            if index != segment.start:  # the first block of the run already added this one
                return x
            generation, coef, delta, trend = self._segment_arguments(segment, x)
            return eoc_kernels.cached_segment(
                x, self._segment_gates(segment, c), self.cache.blocks(segment.start, segment.stop), generation,
                delta=delta, trend=trend, coef=coef, token_threshold=self.token_threshold, backend=self.backend)
        return self._branchwise(step, index, block, x, c, computes, self._fused_branch)

    def _branchwise(self, step, index, block, x, c, computes, serve_reused):
        """A block run branch by branch: a computing branch writes its cache slot, a reused one is
        ``serve_reused(step, index, branch, x, gate)`` → the new x."""
        block_adapter = self.adapter.block_adapter
        branches = (block_adapter.attn_branch, block_adapter.mlp_branch)
        modulation = block_adapter.modulation(block, c)
        gates = block_adapter.gates_from_modulation(modulation)
        for branch in range(2):
            if computes[branch]:
                slot = self.cache.slot(self.plan.write_generation(step, index, branch), index, branch, x)
                feature = branches[branch](block, x, modulation, out=slot)  # [B, N, C], in the buffer
                if self.observer is not None:
                    self.observer(step, index, branch, feature)
                x = x + gates[branch].unsqueeze(1) * feature
            else:
                x = serve_reused(step, index, branch, x, gates[branch])
        return x

    def _fused_branch(self, step, index, branch, x, gate):
        """A reused branch by the plan: one ``cached_branch`` call."""
        return eoc_kernels.cached_branch(x, gate, **self._branch_arguments(step, index, branch, x),
                                         token_threshold=self.token_threshold, backend=self.backend)

    def _strategy_branch(self, step, index, branch, x, gate):
        """A reused branch with the coefficients a strategy chose for this step: ``corrected_feature`` with
        C_1..C_i for the largest non-zero β_i."""
        entry = self.plan.entry(step, index, branch)
        coef = tuple(self.step_coef[(index, branch)])
        if not 3 <= len(coef) <= 5:
            raise ValueError(f"the strategy's coefficients of entry (step {step}, block {index}, branch {branch}) "
                             f"must be 3 to 5 numbers (alpha, beta1, gamma[, beta2[, beta3]]), got {coef}")
        reads = history_reads(coef)
        if reads >= min(len(entry.history), self.plan.num_generations):
            raise ValueError(f"the strategy's coefficients {coef} of entry (step {step}, block {index}, branch "
                             f"{branch}) read C_{reads}, but the entry has {len(entry.history)} computed features "
                             f"and the cache keeps {self.plan.num_generations} (StepStrategy.num_generations)")
        alpha, gamma = coef[0], coef[2]
        delta = self.prior_terms.entry(DELTA, step, entry, index, branch, x) if alpha else None
        trend = self.prior_terms.entry(TREND, step, entry, index, branch, x) if gamma else None
        feature = eoc_kernels.reference.corrected_feature(
            self.cache.feature(entry.generation, index, branch), **self._history_arguments(entry, index, branch, reads),
            delta=delta, trend=trend, coef=coef).to(x.dtype)
        return x + gate.unsqueeze(1) * feature

    def _history_arguments(self, entry: EntryPlan, block: int, branch: int, reads: int) -> dict:
        """{"prev": C_1, "prev2": C_2, "prev3": C_3} up to C_reads (the others absent)."""
        return {name: self.cache.feature(self.plan.generation_of(entry, j), block, branch)
                for j, name in zip(range(1, reads + 1), _HISTORY_ARGS)}

    def _recording_forward(self, index, block, x, c):
        """A block computing both branches, as the original, and recording their outputs."""
        block_adapter = self.adapter.block_adapter
        modulation = block_adapter.modulation(block, c)
        gates = block_adapter.gates_from_modulation(modulation)
        for branch, run in enumerate((block_adapter.attn_branch, block_adapter.mlp_branch)):
            feature = self._recording[(index, branch)] = run(block, x, modulation)
            x = x + gates[branch].unsqueeze(1) * feature
        return x

    # ----------------------------------------------------------------------------- op arguments
    def _branch_arguments(self, step: int, block: int, branch: int, like: torch.Tensor) -> dict:
        """Keyword arguments of ``cached_branch`` for one reuse entry: C_1..C_i up to the largest non-zero β_i;
        a zero α or γ passes None."""
        entry = self.plan.entry(step, block, branch)
        alpha, gamma = entry.coef[0], entry.coef[2]
        args = {"cache": self.cache.feature(entry.generation, block, branch), "delta": None, "trend": None,
                "coef": entry.coef, **self._history_arguments(entry, block, branch, entry.reads)}
        if alpha != 0.0:
            args["delta"] = self.prior_terms.entry(DELTA, step, entry, block, branch, like)
        if gamma != 0.0:
            args["trend"] = self.prior_terms.entry(TREND, step, entry, block, branch, like)
        return args

    def _segment_arguments(self, segment: SegmentPlan, like: torch.Tensor) -> tuple:
        """(generation [S, 2], coef [S, 2, P] or None, delta, trend) of a segment on ``like``'s device, built
        once per plan, device and dtype: no host sync afterwards. P is the longest entry coef of the
        segment, the others padded with zeros (a zero β_i does not read its generation)."""
        key = (segment.step, segment.start, like.device, like.dtype)
        args = self._segment_args.get(key)
        if args is None:
            S = segment.stop - segment.start
            generation = torch.tensor([e.generation for e in segment.entries], dtype=torch.int32).view(S, 2)
            coef = delta = trend = None
            if segment.corrected:
                P = segment.num_coefs
                coef = torch.tensor([e.coef + (0.0,) * (P - len(e.coef)) for e in segment.entries],
                                    dtype=torch.float32).view(S, 2, P).to(like.device)
                delta = self.prior_terms.segment(DELTA, segment, like) if segment.uses(DELTA) else None
                trend = self.prior_terms.segment(TREND, segment, like) if segment.uses(TREND) else None
            args = self._segment_args[key] = (generation.to(like.device), coef, delta, trend)
        return args

    def _segment_gates(self, segment: SegmentPlan, c: torch.Tensor) -> torch.Tensor:
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
