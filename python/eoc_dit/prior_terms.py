"""The prior's correction terms on the device (docs/DESIGN.md §2 "Correction"): D = A[t] − A[s] and
E = clamp(D / (|A[s]| + eps), −1, 1), built from the prior's means where the run happens.

Each term is built once, only for the entries whose coefficient of that term is non-zero, and
kept for the life of the plan: a per-branch entry gets its own [H, N, C] tensor, a segment one
stacked [S, 2, H, N, C] tensor built in place (no per-entry copy stacked again). The slabs of a
segment's entries whose coefficient is zero are left unwritten: the ops never read them.
``bytes`` counts what is held, for the memory figures of the README.

The means are read one (step, block, branch) slice at a time from wherever the prior lives
(``Prior.mean_entry``, dequantised from the prior's storage, docs/DESIGN.md §4.10), so a prior kept on
the CPU never goes to the device whole. ``prior.term_residency`` says how long built terms stay:
"plan" (every step's, for the plan's life: no work on a repeated run), "step" (only the current
step's: device memory of one step's terms, rebuilt at every run) or "auto" (as "plan" until an
allocation runs out of device memory; then the other steps' terms are dropped and it goes on as
"step").
"""

from __future__ import annotations

import torch

from .errors import InputValueError
from .planner import EntryPlan, SegmentPlan
from .prior import Prior, delta_and_trend

DELTA, TREND = 0, 2  # the index of each term's coefficient in (α, β₁, γ[, β₂[, β₃]])


class PriorTerms:
    """Device copies of the prior terms that a plan's coefficients read."""

    def __init__(self, prior: Prior, residency: str | None = None):
        self.prior = prior
        residency = getattr(prior, "term_residency", "auto") if residency is None else residency
        if residency not in Prior.TERM_RESIDENCIES:
            raise InputValueError(f"term residency must be one of {', '.join(Prior.TERM_RESIDENCIES)}, "
                                  f"got {residency!r}")
        self.residency = residency
        self._step = None  # the step whose terms are held under "step"
        self._entries: dict[tuple, torch.Tensor] = {}
        self._segments: dict[tuple, torch.Tensor] = {}

    def clear(self) -> None:
        self._entries.clear()
        self._segments.clear()

    @property
    def bytes(self) -> int:
        tensors = list(self._entries.values()) + list(self._segments.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def _begin(self, step: int) -> None:
        """Under "step", drop the terms of other steps."""
        if self.residency == "step" and step != self._step:
            self.clear()
        self._step = step

    def _allocate(self, shape, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(*shape, dtype=like.dtype, device=like.device)

    def _new(self, shape, like: torch.Tensor, step: int) -> torch.Tensor:
        try:
            return self._allocate(shape, like)
        except torch.OutOfMemoryError:
            if self.residency != "auto":
                raise
            self.residency = "step"  # the plan's terms do not fit: keep one step's at a time
            self.clear()
            self._step = step
            return self._allocate(shape, like)

    def _shape(self) -> tuple[int, int, int]:
        return self.prior.num_halves, self.prior.num_tokens, self.prior.width

    def _compute(self, term: int, step: int, source: int, block: int, branch: int, out: torch.Tensor) -> None:
        a_t = self.prior.mean_entry(step, block, branch, out.device)
        a_s = self.prior.mean_entry(source, block, branch, out.device)
        if term == DELTA:  # E is not needed: do not compute it
            out.copy_(a_t - a_s)
        else:
            out.copy_(delta_and_trend(a_t, a_s, self.prior.trend_eps)[1])

    def entry(self, term: int, step: int, plan: EntryPlan, block: int, branch: int,
              like: torch.Tensor) -> torch.Tensor:
        """The term (DELTA or TREND) of one reuse entry, [H, N, C] in ``like``'s dtype and device."""
        self._begin(step)
        key = (term, step, block, branch, like.device, like.dtype)
        tensor = self._entries.get(key)
        if tensor is None:
            tensor = self._new(self._shape(), like, step)
            self._compute(term, step, plan.source, block, branch, tensor)
            self._entries[key] = tensor
        return tensor

    def segment(self, term: int, segment: SegmentPlan, like: torch.Tensor) -> torch.Tensor | None:
        """The term of every entry of a segment, [S, 2, H, N, C], or None when no entry uses it."""
        if not segment.uses(term):
            return None
        self._begin(segment.step)
        key = (term, segment.step, segment.start, like.device, like.dtype)
        tensor = self._segments.get(key)
        if tensor is None:
            S = segment.stop - segment.start
            tensor = self._new((S, 2, *self._shape()), like, segment.step)
            for index, plan in enumerate(segment.entries):
                if plan.coef[term] != 0.0:
                    s, k = divmod(index, 2)
                    self._compute(term, segment.step, plan.source, segment.start + s, k, tensor[s, k])
            self._segments[key] = tensor
        return tensor
