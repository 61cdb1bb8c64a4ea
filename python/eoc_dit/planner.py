"""The planner: what every (step, block, branch) entry of a cached run does (docs/DESIGN.md §2 and §7).

A pure function of (schedule mask, correction settings, prior): no model, no device, no state.
:func:`make_plan` turns them into a :class:`Plan` that says, for every entry,

- whether it computes (and which generation of the cache buffer its output goes to), or
- for a reuse entry: its source step s (the latest compute step before it), the compute step p
  before s (None if none), the generation holding Cc (and, with two generations, Cp in the other
  one) and its coefficients (α, β, γ) after the offline judgment;

and, per step, the runs of consecutive fully reused blocks that one ``cached_segment`` call serves.

Generations: entry (l, k) writes its c-th computed output (c = 0, 1, ...) into generation c % G, so
at a reuse step Cc is in generation (n − 1) % G and Cp in (n − 2) % G, n = computes before the step.
G = 2 only when some entry reads Cp (β ≠ 0) or the caller asks for it; generations flip by index,
never by copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import EOCConfig
from .errors import InputValueError
from .prior import CoefficientFit, Prior

ZERO_COEF = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class EntryPlan:
    """How one reuse entry (step t, block l, branch k) is served.

    source: the compute step s whose output is reused; previous: the compute step p before s, or None;
    generation: the cache generation holding Cc (Cp, when read, is in the other one);
    coef: (α, β, γ) after the judgment; all zero = plain reuse.
    """

    source: int
    previous: int | None
    generation: int
    coef: tuple[float, float, float]

    @property
    def corrected(self) -> bool:
        return any(c != 0.0 for c in self.coef)


@dataclass(frozen=True)
class SegmentPlan:
    """Blocks [start, stop) fully reused at ``step``: one ``cached_segment`` call.

    entries: the 2·(stop − start) entry plans in (block, branch) order (attention first).
    """

    step: int
    start: int
    stop: int
    entries: tuple[EntryPlan, ...]

    @property
    def corrected(self) -> bool:
        return any(entry.corrected for entry in self.entries)

    def uses(self, term: int) -> bool:
        """Whether any entry has a non-zero coefficient ``term`` (0 = α/delta, 1 = β, 2 = γ/trend)."""
        return any(entry.coef[term] != 0.0 for entry in self.entries)


class Plan:
    """The plan of one run: ``mask`` bool [T, L, 2] (True = compute) and what each entry does.

    Attributes: ``mask``, ``num_steps``, ``num_blocks``, ``num_generations`` (1 or 2), ``entries``
    ({(t, l, k): EntryPlan} for every reuse entry).
    """

    def __init__(self, mask: torch.Tensor, entries: dict[tuple[int, int, int], EntryPlan], num_generations: int,
                 sequential_blocks: bool):
        self.mask = mask
        self.num_steps, self.num_blocks = mask.shape[0], mask.shape[1]
        self.entries = entries
        self.num_generations = num_generations
        self.sequential_blocks = sequential_blocks
        self._mask_rows = mask.tolist()  # [T][L][2] bools: read per block call, so no tensor indexing there
        # _compute_counts[t][l][k] = how many times (l, k) computed before step t.
        self._compute_counts = torch.cat([torch.zeros(1, *mask.shape[1:], dtype=torch.long),
                                          mask.long().cumsum(0)]).tolist()
        self._segments: dict[tuple[int, int], SegmentPlan] = {}

    def computes(self, step: int, block: int, branch: int) -> bool:
        return self._mask_rows[step][block][branch]

    def step_has_reuse(self, step: int) -> bool:
        return not all(all(row) for row in self._mask_rows[step])

    def write_generation(self, step: int, block: int, branch: int) -> int:
        """The generation a computing entry writes its output into."""
        return self._compute_counts[step][block][branch] % self.num_generations

    def entry(self, step: int, block: int, branch: int) -> EntryPlan:
        return self.entries[(step, block, branch)]

    def reuse_entries(self, step: int) -> list[tuple[int, int]]:
        """(block, branch) of every reuse entry of ``step``."""
        return [(l, k) for l in range(self.num_blocks) for k in range(2) if not self._mask_rows[step][l][k]]

    def segment(self, step: int, block: int) -> SegmentPlan | None:
        """The run of fully reused blocks holding ``block`` at ``step``, or None if ``block`` computes a
        branch there. With non-sequential blocks every fully reused block is a run of its own."""
        key = (step, block)
        if key in self._segments:
            return self._segments[key]
        reused = [not any(row) for row in self._mask_rows[step]]
        if not reused[block]:
            return None
        start, stop = block, block + 1
        if self.sequential_blocks:
            while start > 0 and reused[start - 1]:
                start -= 1
            while stop < self.num_blocks and reused[stop]:
                stop += 1
        segment = SegmentPlan(step, start, stop, tuple(self.entries[(step, l, k)] for l in range(start, stop)
                                                       for k in range(2)))
        for l in range(start, stop):
            self._segments[(step, l)] = segment
        return segment

    def __repr__(self) -> str:
        corrected = sum(entry.corrected for entry in self.entries.values())
        return (f"Plan(T={self.num_steps}, L={self.num_blocks}, G={self.num_generations}, "
                f"reuse entries={len(self.entries)}, corrected={corrected})")


def judge(prior: Prior, config: EOCConfig, step: int, source: int, previous: int | None, block: int, branch: int,
          coef: tuple[float, float, float]) -> tuple[float, float, float]:
    """Offline judgment (docs/DESIGN.md §2, level 1) on the prior's held-out calibration statistics: ``coef``
    where plain reuse's relative error exceeds ``judge_threshold`` and the correction lowers the error
    by at least ``min_gain`` (None: no gain test), else zeros."""
    plain = prior.plain_error(step, source, block, branch)
    if plain / max(prior.feature_energy(step, block, branch), 1e-30) <= config.judge_threshold:
        return ZERO_COEF
    if config.min_gain is not None:
        corrected = prior.corrected_error(step, source, previous, block, branch, coef)
        if (plain - corrected) / max(plain, 1e-30) < config.min_gain:
            return ZERO_COEF
    return coef


def make_plan(mask: torch.Tensor, config: EOCConfig | None = None, prior: Prior | None = None,
              fit: CoefficientFit | None = None, *, sequential_blocks: bool = True,
              two_generations: bool = False) -> Plan:
    """The plan of a run under ``mask`` (bool [T, L, 2], True = compute, step 0 all True).

    config: None = plain reuse; a preset mode takes its coefficients from ``EOCConfig.coefficients`` and,
        with a prior and ``judge_threshold > 0`` or ``min_gain`` not None, the offline judgment; mode
        "calibrated" takes them from ``fit`` (fitted for exactly this mask; the judgment is in it).
    sequential_blocks: consecutive fully reused blocks form one segment.
    two_generations: keep two generations even when no entry reads Cp (closed-loop fitting does).
    Raises ValueError for a mask a run cannot follow, a missing fit or prior, or a schedule gap the
    prior's statistics do not cover.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[2] != 2:
        raise InputValueError(f"mask must be a bool tensor [T, L, 2], got {mask!r:.80}")
    if not bool(mask[0].all()):
        raise InputValueError("mask[0] must be all True: step 0 has no earlier output to reuse")
    mask = mask.cpu()
    calibrated = config is not None and config.mode == "calibrated"
    if calibrated:
        if fit is None:
            raise InputValueError("mode 'calibrated' needs coefficients fitted for this schedule (a CoefficientFit)")
        if not torch.equal(fit.mask, mask):
            raise InputValueError("the fit was made for another schedule mask")
    if config is not None and config.needs_prior and prior is None and not calibrated:
        raise InputValueError(f"EOCConfig(mode={config.mode!r}) needs a prior")
    if calibrated and prior is None and bool((fit.coef[..., [0, 2]] != 0).any()):
        raise InputValueError("the fit has prior terms (alpha or gamma != 0): it needs the prior it was fitted with")
    judged = (prior is not None and config is not None and not calibrated
              and (config.judge_threshold > 0 or config.min_gain is not None))
    fit_coef = fit.coef.tolist() if calibrated else None
    entries = {}
    column_computes: dict[tuple[int, int], list[int]] = {}
    for t in range(mask.shape[0]):
        for l in range(mask.shape[1]):
            for k in range(2):
                done = column_computes.setdefault((l, k), [])
                if mask[t, l, k]:
                    done.append(t)
                    continue
                source, previous = done[-1], (done[-2] if len(done) > 1 else None)
                coef = ZERO_COEF
                if calibrated:
                    coef = tuple(float(c) for c in fit_coef[t][l][k])
                elif config is not None:
                    coef = config.coefficients(t, source, previous)
                    if judged and any(coef):
                        coef = judge(prior, config, t, source, previous, l, k, coef)
                if any(not math.isfinite(c) for c in coef):
                    raise InputValueError(f"entry (step {t}, block {l}, branch {k}) has non-finite coefficients {coef}")
                if previous is None and coef[1] != 0.0:  # Cp would be read from a slot never written
                    raise InputValueError(f"entry (step {t}, block {l}, branch {k}) has beta = {coef[1]} "
                                          "but no compute step before its source: there is no Cp to extrapolate from")
                entries[(t, l, k)] = (source, previous, len(done), coef)
    reads_previous = two_generations or any(coef[1] != 0.0 for *_, coef in entries.values())
    generations = 2 if reads_previous else 1
    plans = {key: EntryPlan(source, previous, (done - 1) % generations, coef)
             for key, (source, previous, done, coef) in entries.items()}
    return Plan(mask, plans, generations, sequential_blocks)


__all__ = ["EntryPlan", "SegmentPlan", "Plan", "make_plan", "judge"]
