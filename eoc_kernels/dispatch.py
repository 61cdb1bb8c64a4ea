"""Backend selection for the public ops (DESIGN §3, "Backends behind one dispatcher").

A backend is a name plus, per op, an implementation with the op's signature minus ``backend`` and
a predicate telling whether it runs on a given device. ``ops.py`` only asks ``get_impl``; a new
backend slots in by calling ``register_backend`` from its own module, without editing ``ops.py``.
The eager reference is registered here as the "torch" backend and runs on any device.

Selection: the op's ``backend=`` argument, else the ``EOC_BACKEND`` environment variable, else
"auto", which picks the first available backend in ``BACKENDS`` (fastest first) that is also
eligible for "auto" on the device: "triton" on CUDA (the Triton interpreter runs on CPU for tests, but
is never the fastest CPU path), then "cuda" (CUDA C++; after "triton" until a GPU run measures it
faster), "cpp" on the CPU when ``eoc_kernels._C`` is built, else "torch". A
backend named explicitly that cannot run raises, with its reason when it registered one.
"""

import os
from typing import Callable, NamedTuple

import torch

from . import reference
from .errors import InputTypeError, InputValueError

AUTO = "auto"
ENV_VAR = "EOC_BACKEND"
#: Every concrete backend name, fastest first: only backends that exist ("triton" is registered by
#: eoc_kernels.triton when triton is installed; "cuda" and "cpp" by eoc_kernels.cuda / eoc_kernels.cpp,
#: available when eoc_kernels._C holds their kernels). A new backend adds its name here with its code.
BACKENDS = ("triton", "cuda", "cpp", "torch")


class _Impl(NamedTuple):
    fn: Callable
    is_available: Callable[[torch.device], bool]
    auto_eligible: Callable[[torch.device], bool]
    unavailable_reason: Callable[[torch.device], str | None] | None


_REGISTRY: dict[str, dict[str, _Impl]] = {}  # op name -> backend name -> implementation


def register_backend(op_name: str, backend_name: str, fn: Callable,
                     is_available: Callable[[torch.device], bool],
                     auto_eligible: Callable[[torch.device], bool] | None = None,
                     unavailable_reason: Callable[[torch.device], str | None] | None = None) -> None:
    """Registers fn as op_name's implementation for backend_name (replacing any earlier one).

    is_available(device) says whether fn can run on tensors of that device (it must be cheap);
    auto_eligible(device), default is_available, whether "auto" may pick it there;
    unavailable_reason(device), optional, why it cannot run there (added to the error of a backend
    named explicitly, e.g. "eoc_kernels._C is not importable ...").
    """
    if backend_name not in BACKENDS:
        raise InputValueError(f"cannot register backend {backend_name!r}: valid names are "
                         f"{', '.join(BACKENDS)}")
    for name, value in (("fn", fn), ("is_available", is_available), ("auto_eligible", auto_eligible),
                        ("unavailable_reason", unavailable_reason)):
        if value is not None and not callable(value):
            raise InputTypeError(f"register_backend: {name} must be callable, got {type(value).__name__}")
    _REGISTRY.setdefault(op_name, {})[backend_name] = _Impl(
        fn, is_available, is_available if auto_eligible is None else auto_eligible, unavailable_reason)


def _runs(op_name, backend_name, device, *, auto=False):
    impl = _REGISTRY.get(op_name, {}).get(backend_name)
    return (impl is not None and impl.is_available(device)
            and (not auto or impl.auto_eligible(device)))


def available_backends(device, op_name: str | None = None) -> list[str]:
    """Backends that run on device, fastest first: for op_name, or for every op when None."""
    device = torch.device(device)
    op_names = [op_name] if op_name is not None else list(_REGISTRY)
    return [name for name in BACKENDS
            if op_names and all(_runs(op, name, device) for op in op_names)]


def resolve_backend(backend: str | None, device, op_name: str | None = None) -> str:
    """The concrete backend to run on device: backend, or $EOC_BACKEND when None, or "auto".

    Raises ValueError for an unknown name and for a known one not available on device.
    """
    source = "backend"
    if backend is None:
        backend, source = os.environ.get(ENV_VAR) or AUTO, ENV_VAR
    if not isinstance(backend, str):
        raise InputTypeError(f"backend must be a str or None, got {type(backend).__name__}")
    name = backend.strip().lower()
    if name != AUTO and name not in BACKENDS:
        raise InputValueError(f"unknown backend {backend!r} (from {source}); valid names: "
                         f"{', '.join((AUTO,) + BACKENDS)}")
    device = torch.device(device)
    available = available_backends(device, op_name)
    if not available:
        raise InputValueError(f"no backend is available for device {device}")
    if name == AUTO:
        op_names = [op_name] if op_name is not None else list(_REGISTRY)
        eligible = [backend_name for backend_name in available
                    if all(_runs(op, backend_name, device, auto=True) for op in op_names)]
        return (eligible or available)[0]
    if name not in available:
        reason = _unavailable_reason(name, device, op_name)
        raise InputValueError(f"backend {name!r} (from {source}) is not available for device "
                         f"{device}; available: {', '.join(available)} (or {AUTO!r})"
                         + (f": {reason}" if reason else ""))
    return name


def _unavailable_reason(backend_name, device, op_name):
    """The first reason a registered implementation gives for not running on device, or None."""
    op_names = [op_name] if op_name is not None else list(_REGISTRY)
    for op in op_names:
        impl = _REGISTRY.get(op, {}).get(backend_name)
        if impl is not None and impl.unavailable_reason is not None and not impl.is_available(device):
            reason = impl.unavailable_reason(device)
            if reason:
                return reason
    return None


def get_impl(op_name: str, backend: str | None, device) -> Callable:
    """op_name's implementation for resolve_backend(backend, device, op_name)."""
    if op_name not in _REGISTRY:
        raise InputValueError(f"unknown op {op_name!r}; ops: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[op_name][resolve_backend(backend, device, op_name)].fn


for _op_name in ("cached_branch", "cached_block", "cached_segment"):
    register_backend(_op_name, "torch", getattr(reference, _op_name), lambda device: True)
