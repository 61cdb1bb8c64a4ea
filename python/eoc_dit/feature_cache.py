"""The feature cache of a patched model: one stacked buffer of computed branch outputs (docs/DESIGN.md §3, §7).

The buffer is [G, L, 2, B, N, C] (generation, block, branch, then the branch output's own shape):
a computing branch writes its output (before the gate) straight into its slot, from its last
matmul, so caching costs no copy; a run of consecutive reused blocks is served by ONE op reading
the view ``buffer[:, start:stop]``. The G in 1..4 generations are a ring: the c-th computed output of
entry (l, k) goes to generation c % G, so an entry keeps its last G computed features C_0..C_{G−1}
(issue 10, K-history correction). Which generation holds what is the plan's business
(``planner.Plan``): generations turn by index, never by copy.
"""

from __future__ import annotations

import torch

MAX_GENERATIONS = 4  # C_0..C_3: the K <= 3 history differences of eoc_kernels.reference.MAX_HISTORY


class FeatureCache:
    """The buffer [G, L, 2, B, N, C] of one run, allocated at the run's first computed branch."""

    def __init__(self, num_generations: int, num_blocks: int):
        if num_generations not in range(1, MAX_GENERATIONS + 1):
            raise ValueError(f"num_generations must be in 1..{MAX_GENERATIONS}, got {num_generations}")
        self.num_generations = num_generations
        self.num_blocks = num_blocks
        self.buffer: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the run's features (a new run starts, or the patch is removed)."""
        self.buffer = None

    def slot(self, generation: int, block: int, branch: int, like: torch.Tensor) -> torch.Tensor:
        """The contiguous [B, N, C] slot a computing branch writes into; ``like`` is the block input
        [B, N, C] whose shape, dtype and device the buffer takes (re-allocated if they change)."""
        shape = (self.num_generations, self.num_blocks, 2) + tuple(like.shape)
        buffer = self.buffer
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self.buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buffer[generation, block, branch]

    def feature(self, generation: int, block: int, branch: int) -> torch.Tensor:
        """The [B, N, C] feature in a slot written earlier in this run."""
        if self.buffer is None:
            raise RuntimeError("the feature cache is empty: no branch has computed in this run")
        return self.buffer[generation, block, branch]

    def blocks(self, start: int, stop: int) -> torch.Tensor:
        """The view [G, stop − start, 2, B, N, C] that ``cached_segment`` reads."""
        if self.buffer is None:
            raise RuntimeError("the feature cache is empty: no branch has computed in this run")
        return self.buffer[:, start:stop]
