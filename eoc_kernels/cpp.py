"""The "cpp" backend of the EOC ops (docs/DESIGN.md §3): C++ CPU kernels from ``eoc_kernels._C``.

Eager equivalent: ``eoc_kernels.reference`` (cached_branch, cached_block, cached_segment). The kernels
(``csrc/cpu_ops.cpp``, ``csrc/cpu_kernels.h``) run over token rows in parallel (``at::parallel_for``),
vectorised for the widest instruction set the CPU has (AVX-512, AVX2 or SSE2, picked at run time;
``isa()`` says which), in fp32, reading every input once and writing the output once. ``_C`` is built
by ``setup.py`` where a C++ compiler and torch exist at build time (``pip install -r requirements.txt``:
pip's build environment gets the pinned torch); without it this module still
imports, ``AVAILABLE`` is False and an explicit ``backend="cpp"`` raises a ``ValueError`` saying why.

Layers, as in the "triton" backend:

- ``torch.ops.eoc_cpp.<op>_out``: the C++ kernels (TORCH_LIBRARY in csrc/), writing a given output;
- ``eoc_cpp::<op>``: functional custom ops defined here, which allocate the output with
  ``new_output`` (tests replace it to poison the buffer), with a fake (``torch.empty_like(x)``) so that
  ``torch.compile(fullgraph=True)`` traces through them, and a backward that recomputes the eager
  reference (gradients are the "torch" backend's, first order; the threshold gets none);
- the backend functions ``cached_branch`` / ``cached_block`` / ``cached_segment`` (the public ops'
  signatures minus ``backend``), registered with ``dispatch`` for CPU tensors. Outside torch.compile
  and with no input requiring grad they call the kernel directly, skipping the custom op's Python
  dispatch (a few µs per call).

Importing ``eoc_kernels`` imports this module, so ``auto`` picks "cpp" on the CPU whenever ``_C`` loads.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from . import dispatch, reference
from ._custom_ops import coef_of as _coef_of
from ._custom_ops import register_reference_autograd as _register_reference_autograd
from ._custom_ops import split_coef as _split_coef
from ._custom_ops import split_threshold as _split_threshold
from ._custom_ops import threshold_of as _threshold_of

try:  # the compiled kernels: importing the module registers torch.ops.eoc_cpp.* (by name: no package cycle)
    _C = importlib.import_module(f"{__package__}._C")
except (ImportError, OSError) as error:  # not built, or built against another torch
    _C = None
    UNAVAILABLE_REASON = (f"eoc_kernels._C is not importable ({type(error).__name__}: {error}); build it with "
                          f"`pip install -r requirements.txt` (a C++ compiler on the PATH), or against a torch of "
                          f"your own with `pip install --no-build-isolation -e .`, or use backend='torch'")
else:
    UNAVAILABLE_REASON = None

#: Whether the C++ kernels are loaded.
AVAILABLE = _C is not None


def is_available(device) -> bool:
    """The cpp backend runs on CPU tensors when eoc_kernels._C is loaded."""
    return AVAILABLE and torch.device(device).type == "cpu"


def unavailable_reason(device) -> str | None:
    """Why the cpp backend cannot run on device (None when it can)."""
    if not AVAILABLE:
        return UNAVAILABLE_REASON
    if torch.device(device).type != "cpu":
        return f"the cpp backend runs on CPU tensors only, got {torch.device(device)}"
    return None


def _require_kernels(op: str) -> None:
    if not AVAILABLE:
        raise RuntimeError(f"{op}: {UNAVAILABLE_REASON}")


def isa() -> str:
    """The instruction set the kernels use: "avx512", "avx2" or "base" (SSE2 / the compiler's default).

    $EOC_CPU_ISA (read when the first kernel runs) or ``set_isa`` chooses a narrower one."""
    _require_kernels("eoc_kernels.cpp.isa")
    return torch.ops.eoc_cpp.isa()


def supported_isas() -> list[str]:
    """The instruction sets this CPU supports, narrowest first."""
    _require_kernels("eoc_kernels.cpp.supported_isas")
    return list(torch.ops.eoc_cpp.supported_isas())


def set_isa(name: str) -> None:
    """Makes the kernels use instruction set name (one of supported_isas()), e.g. to test each variant."""
    _require_kernels("eoc_kernels.cpp.set_isa")
    if not isinstance(name, str):
        raise TypeError(f"set_isa: name must be a str, got {type(name).__name__}")
    if name not in supported_isas():
        raise ValueError(f"set_isa: name must be one of {', '.join(supported_isas())}, got {name!r}")
    torch.ops.eoc_cpp.set_isa(name)


def new_output(x: torch.Tensor) -> torch.Tensor:
    """The op's output buffer (tests replace this to poison it)."""
    return torch.empty_like(x)


def _direct(args) -> bool:
    """Whether the kernel may run without the custom op: not traced, and no gradient to record."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled()
                and any(isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args))


# --- cached_branch -------------------------------------------------------------------------------------

def _branch_kernel(x, gate, cache, prev, delta, trend, coef_values, coef_tensor, threshold_value, threshold_tensor):
    _require_kernels("eoc_cpp::cached_branch")
    out = new_output(x)
    torch.ops.eoc_cpp.cached_branch_out(x, gate, cache, prev, delta, trend, coef_values, coef_tensor,
                                        threshold_value, threshold_tensor, out)
    return out


@torch.library.custom_op("eoc_cpp::cached_branch", mutates_args=(), device_types="cpu")
def cached_branch_op(x: torch.Tensor, gate: torch.Tensor, cache: torch.Tensor, prev: Optional[torch.Tensor],
                     delta: Optional[torch.Tensor], trend: Optional[torch.Tensor], coef_values: list[float],
                     coef_tensor: Optional[torch.Tensor], threshold_value: float,
                     threshold_tensor: Optional[torch.Tensor]) -> torch.Tensor:
    """eoc_cpp::cached_branch: the C++ kernel; inputs as checked by eoc_kernels.cached_branch.

    coef_values = (alpha, beta, gamma) unless coef_tensor (float32 [3]) is given; threshold_value is the
    token threshold unless threshold_tensor (float32, one element) is given."""
    return _branch_kernel(x, gate, cache, prev, delta, trend, coef_values, coef_tensor, threshold_value,
                          threshold_tensor)


@cached_branch_op.register_fake
def _cached_branch_fake(x, gate, cache, prev, delta, trend, coef_values, coef_tensor, threshold_value,
                        threshold_tensor):
    return torch.empty_like(x)


def _cached_branch_reference(x, gate, cache, prev, delta, trend, coef_values, coef_tensor, threshold_value,
                             threshold_tensor):
    return reference.cached_branch(x, gate, cache, prev=prev, delta=delta, trend=trend,
                                   coef=_coef_of(coef_values, coef_tensor),
                                   token_threshold=_threshold_of(threshold_value, threshold_tensor))


_register_reference_autograd(cached_branch_op, _cached_branch_reference)


def cached_branch(x, gate, cache, *, prev=None, delta=None, trend=None, coef=(0.0, 0.0, 0.0), token_threshold=0.0):
    """The "cpp" backend of eoc_kernels.cached_branch (which checks the inputs)."""
    args = (x, gate, cache, prev, delta, trend, *_split_coef(coef), *_split_threshold(token_threshold))
    return _branch_kernel(*args) if _direct(args) else cached_branch_op(*args)


# --- cached_block --------------------------------------------------------------------------------------

def _block_kernel(x, gate_attn, gate_mlp, cache_attn, cache_mlp, prev_attn, prev_mlp, delta_attn, delta_mlp,
                  trend_attn, trend_mlp, coef_values, coef_tensor_attn, coef_tensor_mlp, threshold_value,
                  threshold_tensor):
    _require_kernels("eoc_cpp::cached_block")
    out = new_output(x)
    torch.ops.eoc_cpp.cached_block_out(x, gate_attn, gate_mlp, cache_attn, cache_mlp, prev_attn, prev_mlp,
                                       delta_attn, delta_mlp, trend_attn, trend_mlp, coef_values, coef_tensor_attn,
                                       coef_tensor_mlp, threshold_value, threshold_tensor, out)
    return out


@torch.library.custom_op("eoc_cpp::cached_block", mutates_args=(), device_types="cpu")
def cached_block_op(x: torch.Tensor, gate_attn: torch.Tensor, gate_mlp: torch.Tensor, cache_attn: torch.Tensor,
                    cache_mlp: torch.Tensor, prev_attn: Optional[torch.Tensor], prev_mlp: Optional[torch.Tensor],
                    delta_attn: Optional[torch.Tensor], delta_mlp: Optional[torch.Tensor],
                    trend_attn: Optional[torch.Tensor], trend_mlp: Optional[torch.Tensor], coef_values: list[float],
                    coef_tensor_attn: Optional[torch.Tensor], coef_tensor_mlp: Optional[torch.Tensor],
                    threshold_value: float, threshold_tensor: Optional[torch.Tensor]) -> torch.Tensor:
    """eoc_cpp::cached_block: the C++ kernel; inputs as checked by eoc_kernels.cached_block.

    coef_values = (alpha, beta, gamma) of attention then of MLP (6 floats); a branch uses its
    coef_tensor_* (float32 [3]) instead when given."""
    return _block_kernel(x, gate_attn, gate_mlp, cache_attn, cache_mlp, prev_attn, prev_mlp, delta_attn, delta_mlp,
                         trend_attn, trend_mlp, coef_values, coef_tensor_attn, coef_tensor_mlp, threshold_value,
                         threshold_tensor)


@cached_block_op.register_fake
def _cached_block_fake(x, gate_attn, gate_mlp, cache_attn, cache_mlp, prev_attn, prev_mlp, delta_attn, delta_mlp,
                       trend_attn, trend_mlp, coef_values, coef_tensor_attn, coef_tensor_mlp, threshold_value,
                       threshold_tensor):
    return torch.empty_like(x)


def _cached_block_reference(x, gate_attn, gate_mlp, cache_attn, cache_mlp, prev_attn, prev_mlp, delta_attn,
                            delta_mlp, trend_attn, trend_mlp, coef_values, coef_tensor_attn, coef_tensor_mlp,
                            threshold_value, threshold_tensor):
    return reference.cached_block(
        x, gate_attn, gate_mlp, cache_attn, cache_mlp, prev_attn=prev_attn, prev_mlp=prev_mlp,
        delta_attn=delta_attn, delta_mlp=delta_mlp, trend_attn=trend_attn, trend_mlp=trend_mlp,
        coef_attn=_coef_of(coef_values[:3], coef_tensor_attn), coef_mlp=_coef_of(coef_values[3:], coef_tensor_mlp),
        token_threshold=_threshold_of(threshold_value, threshold_tensor))


_register_reference_autograd(cached_block_op, _cached_block_reference)


def cached_block(x, gate_attn, gate_mlp, cache_attn, cache_mlp, *, prev_attn=None, prev_mlp=None, delta_attn=None,
                 delta_mlp=None, trend_attn=None, trend_mlp=None, coef_attn=(0.0, 0.0, 0.0), coef_mlp=(0.0, 0.0, 0.0),
                 token_threshold=0.0):
    """The "cpp" backend of eoc_kernels.cached_block (which checks the inputs)."""
    values_attn, tensor_attn = _split_coef(coef_attn)
    values_mlp, tensor_mlp = _split_coef(coef_mlp)
    args = (x, gate_attn, gate_mlp, cache_attn, cache_mlp, prev_attn, prev_mlp, delta_attn, delta_mlp, trend_attn,
            trend_mlp, values_attn + values_mlp, tensor_attn, tensor_mlp, *_split_threshold(token_threshold))
    return _block_kernel(*args) if _direct(args) else cached_block_op(*args)


# --- cached_segment ------------------------------------------------------------------------------------

def _segment_kernel(x, gates, cache, generation, delta, trend, coef, threshold_value, threshold_tensor):
    _require_kernels("eoc_cpp::cached_segment")
    out = new_output(x)
    torch.ops.eoc_cpp.cached_segment_out(x, gates, cache, generation, delta, trend, coef, threshold_value,
                                         threshold_tensor, out)
    return out


@torch.library.custom_op("eoc_cpp::cached_segment", mutates_args=(), device_types="cpu")
def cached_segment_op(x: torch.Tensor, gates: torch.Tensor, cache: torch.Tensor, generation: torch.Tensor,
                      delta: Optional[torch.Tensor], trend: Optional[torch.Tensor], coef: Optional[torch.Tensor],
                      threshold_value: float, threshold_tensor: Optional[torch.Tensor]) -> torch.Tensor:
    """eoc_cpp::cached_segment: the C++ kernel; inputs as checked by eoc_kernels.cached_segment.

    coef: float32 [S, 2, 3] or None (plain reuse). A generation value outside 0..G-1 raises (the
    public op checks CPU generations first)."""
    return _segment_kernel(x, gates, cache, generation, delta, trend, coef, threshold_value, threshold_tensor)


@cached_segment_op.register_fake
def _cached_segment_fake(x, gates, cache, generation, delta, trend, coef, threshold_value, threshold_tensor):
    return torch.empty_like(x)


def _cached_segment_reference(x, gates, cache, generation, delta, trend, coef, threshold_value, threshold_tensor):
    return reference.cached_segment(x, gates, cache, generation, delta=delta, trend=trend, coef=coef,
                                    token_threshold=_threshold_of(threshold_value, threshold_tensor))


_register_reference_autograd(cached_segment_op, _cached_segment_reference)


def cached_segment(x, gates, cache, generation, *, delta=None, trend=None, coef=None, token_threshold=0.0):
    """The "cpp" backend of eoc_kernels.cached_segment (which checks the inputs)."""
    args = (x, gates, cache, generation, delta, trend, coef, *_split_threshold(token_threshold))
    return _segment_kernel(*args) if _direct(args) else cached_segment_op(*args)


for _fn in (cached_branch, cached_block, cached_segment):
    dispatch.register_backend(_fn.__name__, "cpp", _fn, is_available, unavailable_reason=unavailable_reason)
