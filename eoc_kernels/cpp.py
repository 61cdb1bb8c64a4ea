"""The "cpp" backend of the EOC ops (docs/DESIGN.md §3): C++ CPU kernels from ``eoc_kernels._C``.

Eager equivalent: ``eoc_kernels.reference`` (cached_branch, cached_block, cached_segment). The kernels
(``csrc/cpu_ops.cpp``, ``csrc/cpu_kernels.h``) run over token rows in parallel (``at::parallel_for``),
vectorised for the widest instruction set the CPU has (AVX-512, AVX2 or SSE2, picked at run time;
``isa()`` says which), in fp32, reading every input once and writing the output once. ``_C`` is built
by ``setup.py`` where a C++ compiler and torch exist at build time (``pip install -r requirements.txt``:
pip's build environment gets the pinned torch); without it this module still imports, ``AVAILABLE`` is
False and an explicit ``backend="cpp"`` raises a ``ValueError`` saying why.

Layers (``eoc_kernels/_library.py``): the kernels are the CPU kernels of the out-variant ops
``eoc::cached_*_out`` (``csrc/schema.cpp``); this module registers them, wrapped to allocate the output
with ``new_output`` (tests replace it to poison the buffer), as the "cpp" kernel of the ``eoc::``
functional ops on CPU tensors, and the backend's functions with ``dispatch``.

Importing ``eoc_kernels`` imports this module, so ``auto`` picks "cpp" on the CPU whenever ``_C`` loads.
"""

from __future__ import annotations

import torch

from . import _extension, _library
from .errors import InputTypeError, InputValueError

#: Whether the C++ kernels are loaded.
AVAILABLE = _extension.AVAILABLE and _extension.has_kernel("cached_segment_out", "CPU")
UNAVAILABLE_REASON = _extension.UNAVAILABLE_REASON or (
    None if AVAILABLE else "eoc_kernels._C registered no CPU kernels (a build without csrc/cpu_ops.cpp)")


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
    return torch.ops.eoc.cpu_isa()


def supported_isas() -> list[str]:
    """The instruction sets this CPU supports, narrowest first."""
    _require_kernels("eoc_kernels.cpp.supported_isas")
    return list(torch.ops.eoc.cpu_supported_isas())


def set_isa(name: str) -> None:
    """Makes the kernels use instruction set name (one of supported_isas()), e.g. to test each variant."""
    _require_kernels("eoc_kernels.cpp.set_isa")
    if not isinstance(name, str):
        raise InputTypeError(f"set_isa: name must be a str, got {type(name).__name__}")
    if name not in supported_isas():
        raise InputValueError(f"set_isa: name must be one of {', '.join(supported_isas())}, got {name!r}")
    torch.ops.eoc.cpu_set_isa(name)


def new_output(x: torch.Tensor) -> torch.Tensor:
    """The op's output buffer (tests replace this to poison it)."""
    return torch.empty_like(x)


def _new_output(x):
    return new_output(x)  # looked up per call, so that a test's replacement takes effect


_functions = _library.register_backend(
    "cpp",
    {(op, "cpu"): _extension.out_kernel(op, _new_output) for op in _library.OP_NAMES} if AVAILABLE else {},
    is_available, unavailable_reason=unavailable_reason)
cached_branch = _functions["cached_branch"]
cached_block = _functions["cached_block"]
cached_segment = _functions["cached_segment"]
