"""The prior's correction terms on the device (docs/DESIGN.md §2 "Correction"): D = A[t] − A[s] and
E = clamp(D / (|A[s]| + eps), −1, 1), built from the prior's means where the run happens.

Each term is built once, only for the entries whose coefficient of that term is non-zero, and
kept for the life of the plan: a per-branch entry gets its own [H, N, C] tensor, a segment one
stacked [S, 2, H, N, C] tensor built in place (no per-entry copy stacked again). The slabs of a
segment's entries whose coefficient is zero are left unwritten: the ops never read them.
``bytes`` counts what is held, for the memory figures of the README.
"""

from __future__ import annotations

import torch

from .planner import EntryPlan, SegmentPlan
from .prior import Prior, delta_and_trend

DELTA, TREND = 0, 2  # the index of each term's coefficient in (α, β, γ)


class PriorTerms:
    """Device copies of the prior terms that a plan's coefficients read."""

    def __init__(self, prior: Prior):
        self.prior = prior
        self._entries: dict[tuple, torch.Tensor] = {}
        self._segments: dict[tuple, torch.Tensor] = {}

    def clear(self) -> None:
        self._entries.clear()
        self._segments.clear()

    @property
    def bytes(self) -> int:
        tensors = list(self._entries.values()) + list(self._segments.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def _compute(self, term: int, step: int, source: int, block: int, branch: int, out: torch.Tensor) -> None:
        mean = self.prior.mean
        a_t = mean[step, block, branch].to(device=out.device, dtype=torch.float32)
        a_s = mean[source, block, branch].to(device=out.device, dtype=torch.float32)
        if term == DELTA:  # E is not needed: do not compute it
            out.copy_(a_t - a_s)
        else:
            out.copy_(delta_and_trend(a_t, a_s, self.prior.trend_eps)[1])

    def entry(self, term: int, step: int, plan: EntryPlan, block: int, branch: int,
              like: torch.Tensor) -> torch.Tensor:
        """The term (DELTA or TREND) of one reuse entry, [H, N, C] in ``like``'s dtype and device."""
        key = (term, step, block, branch, like.device, like.dtype)
        tensor = self._entries.get(key)
        if tensor is None:
            H, N, C = self.prior.mean.shape[3:]
            tensor = torch.empty(H, N, C, dtype=like.dtype, device=like.device)
            self._compute(term, step, plan.source, block, branch, tensor)
            self._entries[key] = tensor
        return tensor

    def segment(self, term: int, segment: SegmentPlan, like: torch.Tensor) -> torch.Tensor | None:
        """The term of every entry of a segment, [S, 2, H, N, C], or None when no entry uses it."""
        if not segment.uses(term):
            return None
        key = (term, segment.step, segment.start, like.device, like.dtype)
        tensor = self._segments.get(key)
        if tensor is None:
            H, N, C = self.prior.mean.shape[3:]
            S = segment.stop - segment.start
            tensor = torch.empty(S, 2, H, N, C, dtype=like.dtype, device=like.device)
            for index, plan in enumerate(segment.entries):
                if plan.coef[term] != 0.0:
                    s, k = divmod(index, 2)
                    self._compute(term, segment.step, plan.source, segment.start + s, k, tensor[s, k])
            self._segments[key] = tensor
        return tensor
