"""Adapters for Hugging Face diffusers' DiT-class transformers (docs/DESIGN.md §4.9).

``apply_eoc`` picks these automatically for a ``DiTTransformer2DModel`` or a
``PixArtTransformer2DModel``; this module is the only one of ``eoc_dit`` that imports diffusers (and
only when such a model is passed: ``patching.default_adapter`` looks for it in ``sys.modules`` first).

Both models are built of diffusers' ``BasicTransformerBlock``:

- DiT (``norm_type="ada_norm_zero"``): per block the adaLN-Zero chunks come from
  ``norm1.linear(SiLU(norm1.emb(t, y)))``; every block carries its own copy of the timestep + class
  embedding ``norm1.emb``. Two gated branches, ``attn1`` and ``ff``, as in the original DiT.
- PixArt (``norm_type="ada_norm_single"``): every block gets the same [B, 6C] modulation vector and
  adds its own ``scale_shift_table``; between the gated ``attn1`` and ``ff`` sits an UNGATED
  cross-attention ``attn2`` (x += attn2(x, text)).

The engine sees every block as units of two branches ([T, L, 2] schedules, [G, L, 2, B, N, C]
cache). A block without ``attn2`` is one unit (attn1, ff). A block with ``attn2`` is two units:
(attn1, attn2) and (ff, —), the last branch an empty one whose output and gate are zero (it costs a
zeroed slot per computed step and its read in a fused pass; it keeps a three-branch block inside the
two-branch engine). So a PixArt model with L blocks has 2L units, and a MaskSchedule for it is
[T, 2L, 2]. attn2 has no gate: the unit gives it a gate of ones, so x + 1 ⊙ F̂ is exactly the
ungated residual and the fused ops (``cached_segment`` / ``cached_branch``) serve it like the others.

The fused gate matmul (stacked gate rows, one ``F.linear`` for all gates of a step) needs one gate
input shared by all blocks. DiT: yes when every block's ``norm1.emb`` holds the same weights (a
converted checkpoint); the gate input is then SiLU(emb), emb computed once per forward. Otherwise,
and for PixArt (whose gates are a slice of the shared [B, 6C] vector plus the block's table: an add,
cheaper than a matmul), the gates of a reused block come from that block's own modulation.

Installation goes through diffusers' own ``HookRegistry`` (a ``ModelHook`` named ``"eoc"`` on the
transformer and on each block), so removing our hook leaves the user's diffusers hooks in place and
the other way round.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from .adapters import BlockAdapter, ModelAdapter
from .errors import InputTypeError, InputValueError
from .models import _linear

HOOK_NAME = "eoc"
SUPPORTED_MODELS = (DiTTransformer2DModel, PixArtTransformer2DModel)
SUPPORTED_NORM_TYPES = ("ada_norm_zero", "ada_norm_single")

# Branch kinds of a unit.
_SELF, _CROSS, _FF, _EMPTY = "attn1", "attn2", "ff", "empty"


class Unit:
    """Two branches of one diffusers block, as the engine sees them (a block of the [T, L, 2] schedule).

    ``block``: the ``BasicTransformerBlock``; ``branches``: two of "attn1", "attn2", "ff", "empty";
    ``forward(x, c)``: set by the engine while patched, else :meth:`plain_forward`.
    """

    def __init__(self, adapter: DiffusersAdapter, block: nn.Module, block_index: int, branches: tuple[str, str]):
        self.adapter, self.block, self.block_index, self.branches = adapter, block, block_index, branches
        self.forward = self.plain_forward

    def plain_forward(self, x: torch.Tensor, c) -> torch.Tensor:
        """The two branches as the block computes them, unpatched."""
        block_adapter = self.adapter.block_adapter
        modulation = block_adapter.modulation(self, c)
        gates = block_adapter.gates_from_modulation(modulation)
        for k, run in enumerate((block_adapter.attn_branch, block_adapter.mlp_branch)):
            x = x + gates[k].unsqueeze(1) * run(self, x, modulation)
        return x

    def __repr__(self) -> str:
        return f"Unit(block {self.block_index}: {self.branches[0]}, {self.branches[1]})"


class _Modulation:
    """What the branches of one unit call need: the block's chunks and the unit's two gates [B, C]."""

    __slots__ = ("chunks", "gates")

    def __init__(self, chunks, gates):
        self.chunks, self.gates = chunks, gates


class _BlockCall:
    """The arguments of the block call being served (shared by all blocks of one model forward)."""

    __slots__ = ("timestep", "class_labels", "dtype", "attention_mask", "encoder_hidden_states",
                 "encoder_attention_mask", "attention_kwargs")

    def __init__(self, timestep, class_labels, dtype, attention_mask, encoder_hidden_states, encoder_attention_mask,
                 attention_kwargs):
        self.timestep, self.class_labels, self.dtype = timestep, class_labels, dtype
        self.attention_mask, self.encoder_hidden_states = attention_mask, encoder_hidden_states
        self.encoder_attention_mask, self.attention_kwargs = encoder_attention_mask, attention_kwargs


class BasicBlockAdapter(BlockAdapter):
    """The branches of a diffusers ``BasicTransformerBlock`` (norm types ada_norm_zero and ada_norm_single),
    unit by unit. Each function repeats the block's own operations in its order, so an all-compute
    patched run is bit-identical to the unpatched model (tests/eoc_dit/test_diffusers_adapters.py)."""

    def __init__(self, adapter: DiffusersAdapter, shared_embedding: bool):
        self.adapter, self.shared_embedding = adapter, shared_embedding

    # ------------------------------------------------------------------ conditioning and gates
    def _chunks(self, block: nn.Module, c: torch.Tensor):
        """The six chunks (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) of the block,
        computed once per block call (a block of two units asks twice)."""
        memo, call = self.adapter._chunk_memo, self.adapter.call
        hit = memo.get(id(block))
        if hit is not None and hit[0] is call:  # the same block call: the same conditioning
            return hit[1]
        if block.norm_type == "ada_norm_zero":
            if self.shared_embedding:
                emb = c  # [B, C]: norm1.emb(t, y) of block 0, the same weights as this block's
            else:
                emb = block.norm1.emb(call.timestep, call.class_labels, hidden_dtype=call.dtype)
            chunks = block.norm1.linear(block.norm1.silu(emb)).chunk(6, dim=1)  # each [B, C]
        else:  # ada_norm_single: c is the shared [B, 6C] vector
            chunks = (block.scale_shift_table[None] + c.reshape(c.shape[0], 6, -1)).chunk(6, dim=1)  # [B, 1, C]
        memo[id(block)] = (call, chunks)
        return chunks

    def modulation(self, unit: Unit, c) -> _Modulation:
        chunks = self._chunks(unit.block, c)
        gate_attn, gate_mlp = chunks[2], chunks[5]
        if unit.block.norm_type == "ada_norm_single":
            gate_attn, gate_mlp = gate_attn[:, 0], gate_mlp[:, 0]  # [B, 1, C] -> [B, C] (a view, same values)
        gates = []
        for kind in unit.branches:
            if kind == _SELF:
                gates.append(gate_attn)
            elif kind == _FF:
                gates.append(gate_mlp)
            elif kind == _CROSS:  # attn2 is ungated: x + 1 * F is exactly x + F
                gates.append(torch.ones_like(gate_attn))
            else:  # the empty branch adds 0 * 0
                gates.append(torch.zeros_like(gate_attn))
        return _Modulation(chunks, tuple(gates))

    def gates_from_modulation(self, modulation: _Modulation):
        return modulation.gates

    def gate_rows(self, unit: Unit):
        # One gate matmul for all blocks needs a gate input shared by every block: DiT blocks whose
        # norm1.emb weights are equal. PixArt's gates are a slice of the shared vector plus the block's
        # table, an add per block (cheaper than a matmul against a selection matrix): None.
        if not (unit.block.norm_type == "ada_norm_zero" and self.shared_embedding and unit.branches == (_SELF, _FF)):
            return None
        linear = unit.block.norm1.linear
        width = linear.out_features // 6
        w, b = linear.weight.detach(), linear.bias.detach()
        return (torch.cat([w[2 * width : 3 * width], w[5 * width : 6 * width]]),
                torch.cat([b[2 * width : 3 * width], b[5 * width : 6 * width]]))

    def gate_input(self, unit: Unit, c):
        return unit.block.norm1.silu(c)

    # ------------------------------------------------------------------ branches (pre-gate outputs)
    def attn_branch(self, unit: Unit, x, modulation, out=None):
        return self._branch(unit.branches[0], unit.block, x, modulation.chunks, out)

    def mlp_branch(self, unit: Unit, x, modulation, out=None):
        return self._branch(unit.branches[1], unit.block, x, modulation.chunks, out)

    def _branch(self, kind: str, block: nn.Module, x: torch.Tensor, chunks, out):
        call = self.adapter.call
        single = block.norm_type == "ada_norm_single"
        if kind == _SELF:
            shift, scale = chunks[0], chunks[1]
            if single:
                h = block.norm1(x) * (1 + scale) + shift
            else:
                h = block.norm1.norm(x) * (1 + scale[:, None]) + shift[:, None]
            value = block.attn1(h, encoder_hidden_states=None, attention_mask=call.attention_mask,
                                **call.attention_kwargs)
        elif kind == _CROSS:
            h = x if single else block.norm2(x)  # PixArt applies no norm before attn2
            value = block.attn2(h, encoder_hidden_states=call.encoder_hidden_states,
                                attention_mask=call.encoder_attention_mask, **call.attention_kwargs)
        elif kind == _FF:
            shift, scale = chunks[3], chunks[4]
            if single:
                h = block.norm2(x) * (1 + scale) + shift
            else:
                h = block.norm3(x) * (1 + scale[:, None]) + shift[:, None]
            return _feed_forward(block.ff, h, out)
        else:
            return torch.zeros_like(x) if out is None else out.zero_()
        if value.ndim == 4:
            value = value.squeeze(1)
        # The attention processor ends in its own to_out linear: its result is copied into the slot.
        return value if out is None else out.copy_(value)


def _feed_forward(ff: nn.Module, h: torch.Tensor, out):
    """``ff(h)`` (FeedForward runs its ``net`` in order); with ``out``, the last linear writes into the slot."""
    modules = list(ff.net)
    if out is None or not isinstance(modules[-1], nn.Linear) or not h.is_contiguous():
        value = ff(h)
        return value if out is None else out.copy_(value)
    for module in modules[:-1]:
        h = module(h)
    return _linear(modules[-1], h.contiguous(), out)


# --------------------------------------------------------------------------------------------------
# Hooks in diffusers' HookRegistry
# --------------------------------------------------------------------------------------------------


class _EOCHook(ModelHook):
    """Our forward as a named diffusers hook. ``forward`` is called instead of the module's
    forward chain; ``call_next`` calls what the chain would have called (another hook or the original)."""

    def __init__(self, make_forward):
        super().__init__()
        self.forward = make_forward(self.call_next)
        self._own = None  # the registry's reference to new_forward, restored if the registry drops it

    def call_next(self, *args, **kwargs):
        return self.fn_ref.original_forward(*args, **kwargs)

    def pre_forward(self, module, *args, **kwargs):
        # HookRegistry.remove_hook of a hook registered BEFORE this one writes the removed hook's
        # forward into this hook's fn_ref.forward, which would skip new_forward (diffusers 0.42): heal it.
        if self._own is not None and self.fn_ref.forward is not self._own:
            self.fn_ref.original_forward = self.fn_ref.forward
            self.fn_ref.forward = self._own
        return args, kwargs

    def new_forward(self, module, *args, **kwargs):
        return self.forward(*args, **kwargs)


def _register(module: nn.Module, hook: _EOCHook):
    """Register ``hook`` as "eoc" on ``module``; return the undo."""
    created = not hasattr(module, "_diffusers_hook")
    saved_forward = module.__dict__.get("forward")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if HOOK_NAME in registry.hooks:
        raise InputValueError(f"{type(module).__name__} already has a diffusers hook named {HOOK_NAME!r}")
    registry.register_hook(hook, HOOK_NAME)
    hook._own = hook.fn_ref.forward

    def undo():
        registry.remove_hook(HOOK_NAME, recurse=False)
        if registry.hooks:
            return
        if created:  # the registry was ours and nothing else is hooked: the module as we found it
            _restore_attr(module, "forward", saved_forward)
            if getattr(module, "_diffusers_hook", None) is registry:
                del module._diffusers_hook
        else:  # the registry left the class's own forward as an instance attribute: drop that
            current = module.__dict__.get("forward")
            if getattr(current, "__self__", None) is module and \
                    getattr(current, "__func__", None) is type(module).forward:
                del module.__dict__["forward"]

    return undo


def _restore_attr(obj, name: str, saved) -> None:
    if saved is None:
        obj.__dict__.pop(name, None)
    else:
        obj.__dict__[name] = saved


# --------------------------------------------------------------------------------------------------
# The model adapter
# --------------------------------------------------------------------------------------------------

_BLOCK_ARGS = tuple(inspect.signature(BasicTransformerBlock.forward).parameters)[1:]  # after self


class DiffusersAdapter(ModelAdapter):
    """A ``DiTTransformer2DModel`` or ``PixArtTransformer2DModel``: its ``transformer_blocks`` as units of
    two branches (see the module docstring), its forward's ``timestep`` for the step clock."""

    sequential_blocks = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.real_blocks = check_blocks(model)
        self.shared_embedding = _shared_embedding(self.real_blocks)
        self.block_adapter = BasicBlockAdapter(self, self.shared_embedding)
        self.units: list[Unit] = []
        self.units_of: list[list[Unit]] = []
        for index, block in enumerate(self.real_blocks):
            pairs = [(_SELF, _FF)] if block.attn2 is None else [(_SELF, _CROSS), (_FF, _EMPTY)]
            units = [Unit(self, block, index, pair) for pair in pairs]
            self.units.extend(units)
            self.units_of.append(units)
        parameters = list(inspect.signature(type(model).forward).parameters)[1:]
        self._timestep_position = parameters.index("timestep")
        self.call: _BlockCall | None = None
        self._chunk_memo: dict[int, tuple] = {}
        self._embedding_memo = None  # (timestep, version, labels, version, dtype, emb)
        self._installed: dict[int, int] = {}  # real block index -> installed units
        self._block_undo: dict[int, object] = {}  # real block index -> undo of its hook

    # ------------------------------------------------------------------ ModelAdapter
    def blocks(self, model):
        if model is not self.model:
            raise InputValueError("this DiffusersAdapter was made for another model")
        return list(self.units)

    def timestep(self, args, kwargs):
        if "timestep" in kwargs:
            t = kwargs["timestep"]
        elif len(args) > self._timestep_position:
            t = args[self._timestep_position]
        else:
            t = None
        if t is None:
            raise InputValueError(f"{type(self.model).__name__} forward called without a timestep")
        return t

    def block_inputs(self, args, kwargs):
        return args[0], args[1]  # units are called as unit.forward(x, c) by the block hook

    def install_forward(self, module, make_forward):
        if module is self.model:
            return _register(module, _EOCHook(make_forward))
        if not isinstance(module, Unit):
            raise InputTypeError(f"DiffusersAdapter installs on its model and units, got {type(module).__name__}")
        module.forward = make_forward(module.plain_forward)
        index = module.block_index
        if self._installed.get(index, 0) == 0:
            self._block_undo[index] = _register(self.real_blocks[index], _EOCHook(
                lambda call_next, index=index: lambda *args, **kwargs: self._block_forward(index, args, kwargs)))
        self._installed[index] = self._installed.get(index, 0) + 1

        def undo():
            module.forward = module.plain_forward
            self._installed[index] -= 1
            if self._installed[index] == 0:
                self._block_undo.pop(index)()
                self._chunk_memo.clear()
                self._embedding_memo = None

        return undo

    # ------------------------------------------------------------------ one block call
    def _block_forward(self, index: int, args, kwargs) -> torch.Tensor:
        """A hooked block: read its diffusers arguments, then run its units in order."""
        bound = dict(zip(_BLOCK_ARGS, args))
        bound.update(kwargs)
        x = bound["hidden_states"]
        attention_kwargs = dict(bound.get("cross_attention_kwargs") or {})
        if "gligen" in attention_kwargs:
            raise InputValueError("apply_eoc does not support GLIGEN (cross_attention_kwargs['gligen'])")
        self.call = _BlockCall(bound.get("timestep"), bound.get("class_labels"), x.dtype, bound.get("attention_mask"),
                               bound.get("encoder_hidden_states"), bound.get("encoder_attention_mask"),
                               attention_kwargs)
        block = self.real_blocks[index]
        if block.norm_type == "ada_norm_single":
            c = self.call.timestep  # [B, 6C], the same tensor for every block
        elif self.shared_embedding:
            c = self._embedding(block)
        else:
            c = self.call.timestep
        for unit in self.units_of[index]:
            x = unit.forward(x, c)
        return x

    def _embedding(self, block) -> torch.Tensor:
        """norm1.emb(t, y) [B, C], once per forward: every block gets the same tensors (checked by identity
        and version, so a tensor changed in place is embedded again)."""
        call = self.call
        t, y = call.timestep, call.class_labels
        key = (t, getattr(t, "_version", None), y, getattr(y, "_version", None), call.dtype)
        memo = self._embedding_memo
        if memo is not None and all(a is b if i in (0, 2, 4) else a == b for i, (a, b) in enumerate(zip(memo, key))):
            return memo[5]
        emb = self.real_blocks[0].norm1.emb(t, y, hidden_dtype=call.dtype)
        self._embedding_memo = key + (emb,)
        return emb


def _shared_embedding(blocks) -> bool:
    """True when every ada_norm_zero block's norm1.emb holds the same weights as block 0's."""
    if not all(block.norm_type == "ada_norm_zero" for block in blocks):
        return False
    first = blocks[0].norm1.emb.state_dict()
    for block in blocks[1:]:
        other = block.norm1.emb.state_dict()
        if other.keys() != first.keys() or not all(torch.equal(first[k], other[k]) for k in first):
            return False
    fields = ("num_channels", "flip_sin_to_cos", "downscale_freq_shift", "scale")
    proj = [tuple(getattr(block.norm1.emb.time_proj, f, None) for f in fields) for block in blocks]
    return all(p == proj[0] for p in proj)


def check_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's ``transformer_blocks`` if EOC supports them, else InputTypeError / InputValueError naming
    the model class, the block and what is unsupported."""
    name = type(model).__name__
    if not isinstance(model, SUPPORTED_MODELS):
        blocks = getattr(model, "transformer_blocks", None)
        block_types = sorted({type(b).__name__ for b in blocks}) if isinstance(blocks, nn.ModuleList) else []
        found = f" (blocks: {', '.join(block_types)})" if block_types else ""
        raise InputTypeError(f"apply_eoc does not support the diffusers model {name}{found}; supported: "
                             f"{', '.join(m.__name__ for m in SUPPORTED_MODELS)}")
    blocks = list(model.transformer_blocks)
    if not blocks:
        raise InputValueError(f"{name} has no transformer blocks to cache")
    for index, block in enumerate(blocks):
        where = f"{name}.transformer_blocks[{index}] ({type(block).__name__}"
        if not isinstance(block, BasicTransformerBlock):
            raise InputTypeError(f"{where}): apply_eoc supports BasicTransformerBlock blocks only")
        problems = []
        if block.norm_type not in SUPPORTED_NORM_TYPES:
            problems.append(f"norm_type={block.norm_type!r} (supported: {', '.join(SUPPORTED_NORM_TYPES)})")
        if block.norm_type == "ada_norm_zero" and getattr(block.norm1, "emb", None) is None:
            problems.append("ada_norm_zero without a timestep/class embedding (norm1.emb is None)")
        if block.pos_embed is not None:
            problems.append("positional_embeddings inside the block")
        if hasattr(block, "fuser"):
            problems.append("GLIGEN attention_type (fuser)")
        if block.only_cross_attention or block.double_self_attention:
            problems.append("only_cross_attention / double_self_attention")
        if block._chunk_size is not None:
            problems.append("chunked feed-forward (set_chunk_feed_forward)")
        if problems:
            raise InputValueError(f"{where}, norm_type={block.norm_type!r}): apply_eoc does not support "
                                  + "; ".join(problems))
    return blocks


def diffusers_adapter(model: nn.Module) -> DiffusersAdapter:
    """The adapter ``apply_eoc`` uses for a diffusers model (InputTypeError naming the class if unsupported)."""
    return DiffusersAdapter(model)
