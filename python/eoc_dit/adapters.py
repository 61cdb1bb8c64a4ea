"""Block adapters: how the EOC engine reaches into one DiT-style model (docs/DESIGN.md §4).

The engine never hard-codes a model. It needs, per model, where the transformer blocks are and which
forward argument is the timestep; per block, the gates and the two branches of the adaLN-Zero block:

    shift_a, scale_a, g_a, shift_m, scale_m, g_m = adaLN(c)
    x = x + g_a[:, None] * attn(modulate(LN(x), shift_a, scale_a))     # attention branch output A
    x = x + g_m[:, None] * mlp(modulate(LN(x), shift_m, scale_m))      # MLP branch output M

Another DiT codebase plugs in by subclassing :class:`ModelAdapter` (and :class:`BlockAdapter` when its
blocks differ) and passing an instance to ``apply_eoc(..., adapter=...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import InputTypeError, InputValueError
from .models import dit_attn_branch, dit_gates, dit_mlp_branch, dit_modulation


class BlockAdapter:
    """One adaLN-Zero block: its conditioning, gates and branches. The branch outputs are pre-gate.

    ``out``, when given, is a contiguous [B, N, C] slot of the engine's cache buffer: a branch
    writes its output there (straight from its last matmul where it can) and returns it.
    """

    def modulation(self, block: nn.Module, c: torch.Tensor):
        """Whatever conditioning the branches need (computed once per block call that computes)."""
        raise NotImplementedError

    def gates_from_modulation(self, modulation) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_attn, g_mlp), each [B, C], taken from :meth:`modulation`'s result."""
        raise NotImplementedError

    def gate_rows(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight [2C, C_cond], bias [2C]) mapping :meth:`gate_input` to (g_attn, g_mlp), or None
        when the gates are not one linear map. The engine stacks these rows of every block once,
        so the gates of all reused blocks of a step come from one matmul."""
        return None

    def gate_input(self, block: nn.Module, c: torch.Tensor) -> torch.Tensor:
        """The input of the gate rows (e.g. SiLU(c)); must be the same for every block."""
        raise NotImplementedError

    def attn_branch(self, block: nn.Module, x: torch.Tensor, modulation, out=None) -> torch.Tensor:
        """Attention-branch output before the gate, [B, N, C]."""
        raise NotImplementedError

    def mlp_branch(self, block: nn.Module, x: torch.Tensor, modulation, out=None) -> torch.Tensor:
        """MLP-branch output before the gate, [B, N, C]."""
        raise NotImplementedError


class DiTBlockAdapter(BlockAdapter):
    """The block of the original DiT release (``eoc_dit.models.DiTBlock``, or any block with its attribute
    names ``norm1``, ``attn``, ``norm2``, ``mlp``, ``adaLN_modulation``): it calls the very functions
    ``DiTBlock.forward`` is made of, so an all-compute patched run is bit-identical by construction."""

    def modulation(self, block, c):
        return dit_modulation(block, c)

    def gates_from_modulation(self, modulation):
        return dit_gates(modulation)

    def gate_rows(self, block):
        # Rows [2C, 3C) and [5C, 6C) of the adaLN linear are g_attn and g_mlp.
        linear = block.adaLN_modulation[-1]
        width = linear.out_features // 6
        w, b = linear.weight.detach(), linear.bias.detach()
        return (torch.cat([w[2 * width : 3 * width], w[5 * width : 6 * width]]),
                torch.cat([b[2 * width : 3 * width], b[5 * width : 6 * width]]))

    def gate_input(self, block, c):
        return block.adaLN_modulation[0](c)

    def attn_branch(self, block, x, modulation, out=None):
        return dit_attn_branch(block, x, modulation, out=out)

    def mlp_branch(self, block, x, modulation, out=None):
        return dit_mlp_branch(block, x, modulation, out=out)


class ModelAdapter:
    """Where a model keeps its blocks and how its forward receives the timestep and the block inputs.

    ``sequential_blocks``: the model runs its blocks one after the other, each feeding the next
    (``x = block(x, c)``). Then a run of consecutive reused blocks is served by ONE fused op in the
    first block of the run, and the others pass their input through.
    """

    block_adapter: BlockAdapter = BlockAdapter()
    sequential_blocks: bool = False

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def timestep(self, args: tuple, kwargs: dict):
        """The timestep argument of the model's forward (a tensor [B] or a number)."""
        raise NotImplementedError

    def block_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [B, N, C], c [B, C]) from a block's forward arguments."""
        raise NotImplementedError

    def install_forward(self, module, make_forward) -> Callable[[], None]:
        """Make ``make_forward(original_forward)`` the forward of ``module`` (the model or one of
        :meth:`blocks`); return the function that undoes it exactly. The default sets the instance
        attribute ``forward`` and restores the module's ``__dict__`` entry; an adapter whose framework
        keeps its own hooks (diffusers' HookRegistry) installs there instead."""
        saved = module.__dict__.get("forward")
        module.forward = make_forward(module.forward)

        def undo():
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = saved

        return undo


class DiTAdapter(ModelAdapter):
    """``eoc_dit.DiT`` and any model with ``model.blocks`` of DiT blocks, ``forward(x, t, y)`` and
    ``block(x, c)`` — the layout of the original DiT release."""

    block_adapter = DiTBlockAdapter()
    sequential_blocks = True

    def blocks(self, model):
        if not hasattr(model, "blocks"):
            raise InputTypeError(f"DiTAdapter expects a model with a .blocks list, got {type(model).__name__} "
                                 "(supported without an adapter: eoc_dit.DiT and diffusers' DiTTransformer2DModel "
                                 "and PixArtTransformer2DModel)")
        return list(model.blocks)

    def timestep(self, args, kwargs):
        if "t" in kwargs:
            return kwargs["t"]
        if len(args) >= 2:
            return args[1]
        raise InputValueError("DiT forward called without a timestep: expected forward(x, t, y)")

    def block_inputs(self, args, kwargs):
        x = kwargs["x"] if "x" in kwargs else args[0]
        c = kwargs["c"] if "c" in kwargs else args[1]
        return x, c
