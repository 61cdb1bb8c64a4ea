"""Block adapters: how the EOC engine reaches into one DiT-style model (DESIGN §4).

The engine never hard-codes a model. It needs, per model, where the transformer blocks are and which
forward argument is the timestep; per block, the gates and the two branches of the adaLN-Zero block:

    shift_a, scale_a, g_a, shift_m, scale_m, g_m = adaLN(c)
    x = x + g_a[:, None] * attn(modulate(LN(x), shift_a, scale_a))     # attention branch output A
    x = x + g_m[:, None] * mlp(modulate(LN(x), shift_m, scale_m))      # MLP branch output M

Another DiT codebase plugs in by subclassing :class:`ModelAdapter` (and :class:`BlockAdapter` when its
blocks differ) and passing an instance to ``apply_eoc(..., adapter=...)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BlockAdapter:
    """One adaLN-Zero block: its conditioning, gates and branches. The branch outputs are pre-gate."""

    def modulation(self, block: nn.Module, c: torch.Tensor):
        """Whatever conditioning the branches need (computed once per block call that computes)."""
        raise NotImplementedError

    def gates_from_modulation(self, modulation) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_attn, g_mlp), each [B, C], taken from :meth:`modulation`'s result."""
        raise NotImplementedError

    def gates(self, block: nn.Module, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_attn, g_mlp) without the rest of the modulation: a reused block needs nothing else."""
        return self.gates_from_modulation(self.modulation(block, c))

    def attn_branch(self, block: nn.Module, x: torch.Tensor, modulation) -> torch.Tensor:
        """Attention-branch output before the gate, [B, N, C]."""
        raise NotImplementedError

    def mlp_branch(self, block: nn.Module, x: torch.Tensor, modulation) -> torch.Tensor:
        """MLP-branch output before the gate, [B, N, C]."""
        raise NotImplementedError


class DiTBlockAdapter(BlockAdapter):
    """The block of the original DiT release (``eoc_dit.models.DiTBlock``): the branch computations
    are the exact ops of ``DiTBlock.forward``, so an all-compute patched run is bit-identical."""

    def modulation(self, block, c):
        return block.adaLN_modulation(c).chunk(6, dim=1)

    def gates_from_modulation(self, modulation):
        return modulation[2], modulation[5]

    def gates(self, block, c):
        # Only the gate rows of the adaLN linear: rows [2C, 3C) and [5C, 6C). Row slices of a
        # row-major weight are contiguous views, so this reads a third of the weight and copies nothing.
        linear = block.adaLN_modulation[-1]
        width = linear.out_features // 6
        hidden = block.adaLN_modulation[0](c)
        w, b = linear.weight, linear.bias
        g_attn = F.linear(hidden, w[2 * width : 3 * width], b[2 * width : 3 * width])
        g_mlp = F.linear(hidden, w[5 * width : 6 * width], b[5 * width : 6 * width])
        return g_attn, g_mlp

    def attn_branch(self, block, x, modulation):
        from .models import modulate

        shift, scale = modulation[0], modulation[1]
        return block.attn(modulate(block.norm1(x), shift, scale))

    def mlp_branch(self, block, x, modulation):
        from .models import modulate

        shift, scale = modulation[3], modulation[4]
        return block.mlp(modulate(block.norm2(x), shift, scale))


class ModelAdapter:
    """Where a model keeps its blocks and how its forward receives the timestep and the block inputs."""

    block_adapter: BlockAdapter = BlockAdapter()

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def timestep(self, args: tuple, kwargs: dict):
        """The timestep argument of the model's forward (a tensor [B] or a number)."""
        raise NotImplementedError

    def block_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [B, N, C], c [B, C]) from a block's forward arguments."""
        raise NotImplementedError


class DiTAdapter(ModelAdapter):
    """``eoc_dit.DiT`` and any model with ``model.blocks`` of DiT blocks, ``forward(x, t, y)`` and
    ``block(x, c)`` — the layout of the original DiT release."""

    block_adapter = DiTBlockAdapter()

    def blocks(self, model):
        if not hasattr(model, "blocks"):
            raise TypeError(f"DiTAdapter expects a model with a .blocks list, got {type(model).__name__}")
        return list(model.blocks)

    def timestep(self, args, kwargs):
        if "t" in kwargs:
            return kwargs["t"]
        if len(args) >= 2:
            return args[1]
        raise ValueError("DiT forward called without a timestep: expected forward(x, t, y)")

    def block_inputs(self, args, kwargs):
        x = kwargs["x"] if "x" in kwargs else args[0]
        c = kwargs["c"] if "c" in kwargs else args[1]
        return x, c
