"""The planner: what every (step, block, branch) entry of a cached run does (docs/DESIGN.md §2 and §7).

A pure function of (schedule mask, correction settings, prior): no model, no device, no state.
:func:`make_plan` turns them into a :class:`Plan` that says, for every entry,

- whether it computes (and which generation of the cache ring its output goes to), or
- for a reuse entry: its history (the compute steps s_0 > s_1 > ... before it, latest first, up to
  four: s_0 is the source step whose output C_0 is reused), the generation holding C_0 and its
  coefficients (α, β₁, γ[, β₂[, β₃]]) after the offline judgment;

and, per step, the runs of consecutive fully reused blocks that one ``cached_segment`` call serves.

Generations (issue 10, K-history correction): entry (l, k) writes its c-th computed output (c = 0, 1,
...) into generation c % G, so at a reuse step with n computes before it C_j is in generation
(n − 1 − j) % G. G = 1 + the largest history index any entry reads (β_i ≠ 0 reads C_i), or more when
the caller asks for it (a strategy's ``num_generations``); generations no entry reads are never
allocated, and they turn by index, never by copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import EOCConfig
from .errors import InputValueError
from .feature_cache import MAX_GENERATIONS
from .prior import CoefficientFit, Prior

ZERO_COEF = (0.0, 0.0, 0.0)
# The coefficient index of β_i in (α, β₁, γ, β₂, β₃), i = 1..3.
BETA_INDEX = {1: 1, 2: 3, 3: 4}


def history_reads(coef) -> int:
    """The largest history index i whose β_i is non-zero in ``coef`` (so the entry reads C_0..C_i); 0 if none."""
    return max((i for i, index in BETA_INDEX.items() if index < len(coef) and coef[index] != 0.0), default=0)


def trimmed(coef) -> tuple[float, ...]:
    """``coef`` as a tuple of floats with the trailing zeros trimmed to length >= 3."""
    coef = [float(c) for c in coef]
    while len(coef) > 3 and coef[-1] == 0.0:
        coef.pop()
    return tuple(coef)


@dataclass(frozen=True)
class EntryPlan:
    """How one reuse entry (step t, block l, branch k) is served.

    history: the entry's compute steps before t, latest first (up to four): history[0] = s_0 is the
        source step whose output C_0 is reused, history[j] the step of C_j;
    generation: the cache generation holding C_0 (C_j is in (generation − j) % G, ``Plan.generation_of``);
    coef: (α, β₁, γ[, β₂[, β₃]]) after the judgment, length 3..5 (trailing zeros trimmed); all zero =
        plain reuse.
    """

    history: tuple[int, ...]
    generation: int
    coef: tuple[float, ...]

    @property
    def source(self) -> int:
        """s_0, the compute step whose output is reused."""
        return self.history[0]

    @property
    def previous(self) -> int | None:
        """s_1, the compute step before the source, or None."""
        return self.history[1] if len(self.history) > 1 else None

    @property
    def reads(self) -> int:
        """The largest history index i the coefficients read (C_0..C_i); 0 for none beyond C_0."""
        return history_reads(self.coef)

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

    @property
    def num_coefs(self) -> int:
        """P of the segment's coefficient tensor [S, 2, P]: the longest entry coef (>= 3)."""
        return max(len(entry.coef) for entry in self.entries)

    def uses(self, term: int) -> bool:
        """Whether any entry has a non-zero coefficient ``term`` (0 = α/delta, 1 = β₁, 2 = γ/trend, 3 = β₂,
        4 = β₃)."""
        return any(term < len(entry.coef) and entry.coef[term] != 0.0 for entry in self.entries)


class Plan:
    """The plan of one run: ``mask`` bool [T, L, 2] (True = compute) and what each entry does.

    Attributes: ``mask``, ``num_steps``, ``num_blocks``, ``num_generations`` (G in 1..4, the cache ring),
    ``entries`` ({(t, l, k): EntryPlan} for every reuse entry).
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

    def generation_of(self, entry: EntryPlan, j: int) -> int:
        """The generation holding C_j of a reuse entry (j < num_generations and j < len(entry.history))."""
        if not 0 <= j < min(self.num_generations, len(entry.history)):
            raise IndexError(f"C_{j} is not kept: the entry has {len(entry.history)} computed features, "
                             f"the cache {self.num_generations} generations")
        return (entry.generation - j) % self.num_generations

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


def judge(prior: Prior, config: EOCConfig, step: int, history: tuple[int, ...], block: int, branch: int,
          coef: tuple[float, ...]) -> tuple[float, ...]:
    """Offline judgment (docs/DESIGN.md §2, level 1) on the prior's held-out calibration statistics: ``coef``
    where plain reuse's relative error exceeds ``judge_threshold`` and the correction lowers the error
    by at least ``min_gain`` (None: no gain test), else zeros. The statistics measure corrections with
    one non-zero coefficient reading at most C_1; any other correction (TaylorSeer or HiCache of order
    >= 2) is not gain-tested under the default ``min_gain == 0`` (it is kept as the preset gives it), and a
    non-zero ``min_gain`` for it raises InputValueError (a gain that cannot be measured is not claimed)."""
    source = history[0]
    plain = prior.plain_error(step, source, block, branch)
    if plain / max(prior.feature_energy(step, block, branch), 1e-30) <= config.judge_threshold:
        return ZERO_COEF
    if config.min_gain is not None:
        if sum(c != 0.0 for c in coef) != 1 or history_reads(coef) > 1:
            if config.min_gain == 0.0:
                return coef
            raise InputValueError(
                f"EOCConfig.min_gain: the offline judgment's gain test measures corrections with one non-zero "
                f"coefficient reading at most C_1 on the prior's statistics, but entry (step {step}, block {block}, "
                f"branch {branch}) of mode {config.mode!r} has {coef}: pass min_gain=None or 0 "
                "(judge_threshold still applies), or no prior")
        previous = history[1] if len(history) > 1 else None
        corrected = prior.corrected_error(step, source, previous, block, branch, coef)
        if (plain - corrected) / max(plain, 1e-30) < config.min_gain:
            return ZERO_COEF
    return coef


def make_plan(mask: torch.Tensor, config: EOCConfig | None = None, prior: Prior | None = None,
              fit: CoefficientFit | None = None, *, sequential_blocks: bool = True,
              min_generations: int = 1) -> Plan:
    """The plan of a run under ``mask`` (bool [T, L, 2], True = compute, step 0 all True).

    config: None = plain reuse; a preset mode takes its coefficients from ``EOCConfig.coefficients`` (with
        each entry's compute steps, latest first, up to four) and, with a prior and ``judge_threshold > 0``
        or ``min_gain`` not None, the offline judgment; mode "calibrated" takes them from ``fit``
        (fitted for exactly this mask, coef [T, L, 2, P]; the judgment is in it).
    sequential_blocks: consecutive fully reused blocks form one segment.
    min_generations: keep at least this many cache generations (1..4) even where no entry reads them
        (a closed-loop strategy's ``num_generations``).
    Raises ValueError for a mask a run cannot follow, a missing fit or prior, an entry whose
    coefficients read a C_i it has not computed (β_i ≠ 0 with i or fewer computes before it), or a
    schedule gap the prior's statistics do not cover.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[2] != 2:
        raise InputValueError(f"mask must be a bool tensor [T, L, 2], got {mask!r:.80}")
    if not bool(mask[0].all()):
        raise InputValueError("mask[0] must be all True: step 0 has no earlier output to reuse")
    if isinstance(min_generations, bool) or min_generations not in range(1, MAX_GENERATIONS + 1):
        raise InputValueError(f"min_generations must be an int in 1..{MAX_GENERATIONS}, got {min_generations!r}")
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
                history = tuple(reversed(done[-MAX_GENERATIONS:]))  # latest first
                coef = ZERO_COEF
                if calibrated:
                    coef = trimmed(fit_coef[t][l][k])
                elif config is not None:
                    coef = trimmed(config.coefficients(t, history))
                    if judged and any(coef):
                        coef = judge(prior, config, t, history, l, k, coef)
                if any(not math.isfinite(c) for c in coef):
                    raise InputValueError(f"entry (step {t}, block {l}, branch {k}) has non-finite coefficients {coef}")
                reads = history_reads(coef)
                if reads >= len(done):  # C_reads would be read from a slot never written
                    raise InputValueError(
                        f"entry (step {t}, block {l}, branch {k}) has beta{reads} = {coef[BETA_INDEX[reads]]}, which "
                        f"reads C_{reads}, but the entry computed only {len(done)} time(s) before step {t}: "
                        f"there is no C_{reads}" + (" (no compute step before its source)" if reads == 1 else ""))
                entries[(t, l, k)] = (history, len(done), coef)
    generations = max([min_generations] + [1 + history_reads(coef) for *_, coef in entries.values()])
    plans = {key: EntryPlan(history, (done - 1) % generations, coef)
             for key, (history, done, coef) in entries.items()}
    return Plan(mask, plans, generations, sequential_blocks)


__all__ = ["EntryPlan", "SegmentPlan", "Plan", "make_plan", "judge", "history_reads"]
