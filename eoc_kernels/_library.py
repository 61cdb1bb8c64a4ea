"""The ``eoc::`` op library (docs/DESIGN.md §3.3-3.4): each op's schema defined once, a kernel per device.

One schema per op, for every compiled backend::

    eoc::cached_branch (x, gate, cache, prev?, prev2?, prev3?, delta?, trend?, coef_values[5],
                        coef_tensor?, threshold_value, threshold_tensor?, kernel) -> Tensor
    eoc::cached_block  (x, gate_attn, gate_mlp, cache_attn, cache_mlp, prev_attn?, prev_mlp?,
                        prev2_attn?, prev2_mlp?, prev3_attn?, prev3_mlp?, delta_attn?, delta_mlp?,
                        trend_attn?, trend_mlp?, coef_values[10], coef_tensor_attn?, coef_tensor_mlp?,
                        threshold_value, threshold_tensor?, kernel) -> Tensor
    eoc::cached_segment(x, gates, cache, generation, delta?, trend?, coef?, threshold_value,
                        threshold_tensor?, kernel) -> Tensor

i.e. the public op's arguments in "split" form (a custom op's schema cannot take "a float or a tensor",
so ``coef`` and ``token_threshold`` travel as a (values, tensor-or-None) pair: ``split_coef`` /
``split_threshold`` make it, ``coef_of`` / ``threshold_of`` undo it) plus the kernel's name.
``coef_values`` always holds 5 floats per branch, (alpha, beta1, gamma, beta2, beta3) padded with zeros
(cached_block: attention's 5 then MLP's 5); a ``coef_tensor`` is float32 [P], P in {3, 4, 5}, and its
length is P. cached_segment's coef is float32 [S, 2, P]. Each op has
one fake (``torch.empty_like(x)``, so ``torch.compile(fullgraph=True)`` traces through it) and one
backward that recomputes the eager reference (``register_reference_autograd``): every backend
differentiates exactly as the "torch" backend does.

Kernels are registered per device type with torch.library (``op.register_kernel("cpu" | "cuda")``):
the dispatcher routes a call by its tensors' device, and that device's implementation runs the kernel
the call names — CPU: "cpp" (C++, ``eoc_kernels._C``) or "triton" (the interpreter, in tests); CUDA:
"triton" or "cuda" (CUDA C++, ``eoc_kernels._C``). A backend module registers its kernels and its
public-signature functions with one ``register_backend`` call. The C++ kernels themselves sit behind a
second schema, the out-variant ops ``eoc::cached_*_out`` of ``csrc/schema.cpp``, whose CPU and CUDA
kernels are registered per dispatch key in C++.

Outside ``torch.compile`` and with no input requiring grad, ``run`` calls the kernel directly, skipping
the custom op's Python dispatch (a few µs per call, which a cached DiT step makes dozens of).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import dispatch, reference

OP_NAMES = ("cached_branch", "cached_block", "cached_segment")
_ZERO_COEF = (0.0, 0.0, 0.0)
#: Floats per branch in coef_values: (alpha, beta1, gamma, beta2, beta3).
COEF_SLOTS = reference.MAX_COEFS

#: (op name, device type) -> kernel name -> fn(*split arguments) -> output tensor.
_KERNELS: dict[tuple[str, str], dict[str, Callable]] = {}


# --- the split argument forms --------------------------------------------------------------------------

def split_coef(coef):
    """(coef_values: list of 5 floats, coef_tensor or None) for the custom op schema.

    Python numbers (3 to 5 of them) are padded with zeros to (alpha, beta1, gamma, beta2, beta3); a
    tensor coef travels as is (float32 [P]) with coef_values all zero."""
    if isinstance(coef, torch.Tensor):
        return [0.0] * COEF_SLOTS, coef
    values = [float(value) for value in coef]
    return values + [0.0] * (COEF_SLOTS - len(values)), None


def split_threshold(token_threshold):
    """(threshold_value: float, threshold_tensor or None) for the custom op schema."""
    if isinstance(token_threshold, torch.Tensor):
        return 0.0, token_threshold
    return float(token_threshold), None


def coef_of(coef_values, coef_tensor):
    """The public op's coef from the custom op's split form (inverse of split_coef)."""
    return coef_tensor if coef_tensor is not None else tuple(coef_values)


def threshold_of(threshold_value, threshold_tensor):
    """The public op's token_threshold from its split form (inverse of split_threshold)."""
    return threshold_tensor if threshold_tensor is not None else threshold_value


# --- the schemas ---------------------------------------------------------------------------------------

def _no_kernel(op_name, x, kernel):
    # The default implementation: reached for a device no backend registered a kernel for.
    raise RuntimeError(f"eoc::{op_name} has no kernel for {x.device.type} tensors; "
                       f"devices with kernels: {', '.join(sorted(d for o, d in _KERNELS if o == op_name)) or 'none'}"
                       f" (kernel {kernel!r} asked for)")


@torch.library.custom_op("eoc::cached_branch", mutates_args=())
def cached_branch_op(x: torch.Tensor, gate: torch.Tensor, cache: torch.Tensor, prev: Optional[torch.Tensor],
                     prev2: Optional[torch.Tensor], prev3: Optional[torch.Tensor],
                     delta: Optional[torch.Tensor], trend: Optional[torch.Tensor], coef_values: list[float],
                     coef_tensor: Optional[torch.Tensor], threshold_value: float,
                     threshold_tensor: Optional[torch.Tensor], kernel: str) -> torch.Tensor:
    """eoc::cached_branch: eoc_kernels.cached_branch in split form, run by the named kernel of x's device.

    coef_values (5 floats: alpha, beta1, gamma, beta2, beta3) are the coefficients unless coef_tensor
    (float32 [P], P in {3, 4, 5}) is given; threshold_value is the token threshold unless threshold_tensor
    (float32, one element) is. Inputs as checked by eoc_kernels.cached_branch."""
    return _no_kernel("cached_branch", x, kernel)


@torch.library.custom_op("eoc::cached_block", mutates_args=())
def cached_block_op(x: torch.Tensor, gate_attn: torch.Tensor, gate_mlp: torch.Tensor, cache_attn: torch.Tensor,
                    cache_mlp: torch.Tensor, prev_attn: Optional[torch.Tensor], prev_mlp: Optional[torch.Tensor],
                    prev2_attn: Optional[torch.Tensor], prev2_mlp: Optional[torch.Tensor],
                    prev3_attn: Optional[torch.Tensor], prev3_mlp: Optional[torch.Tensor],
                    delta_attn: Optional[torch.Tensor], delta_mlp: Optional[torch.Tensor],
                    trend_attn: Optional[torch.Tensor], trend_mlp: Optional[torch.Tensor], coef_values: list[float],
                    coef_tensor_attn: Optional[torch.Tensor], coef_tensor_mlp: Optional[torch.Tensor],
                    threshold_value: float, threshold_tensor: Optional[torch.Tensor], kernel: str) -> torch.Tensor:
    """eoc::cached_block: eoc_kernels.cached_block in split form, run by the named kernel of x's device.

    coef_values = (alpha, beta1, gamma, beta2, beta3) of attention then of MLP (10 floats); a branch uses
    its coef_tensor_* (float32 [P], P in {3, 4, 5}) instead when given."""
    return _no_kernel("cached_block", x, kernel)


@torch.library.custom_op("eoc::cached_segment", mutates_args=())
def cached_segment_op(x: torch.Tensor, gates: torch.Tensor, cache: torch.Tensor, generation: torch.Tensor,
                      delta: Optional[torch.Tensor], trend: Optional[torch.Tensor], coef: Optional[torch.Tensor],
                      threshold_value: float, threshold_tensor: Optional[torch.Tensor], kernel: str) -> torch.Tensor:
    """eoc::cached_segment: eoc_kernels.cached_segment in split form, run by the named kernel of x's device.

    cache: [G, S, 2, B, N, C], G in {1, 2, 3, 4}; coef: float32 [S, 2, P], P in {3, 4, 5}, or None (plain
    reuse)."""
    return _no_kernel("cached_segment", x, kernel)


OPS = {"cached_branch": cached_branch_op, "cached_block": cached_block_op, "cached_segment": cached_segment_op}


def _fake(x, *args):
    return torch.empty_like(x)


def _branch_reference(x, gate, cache, prev, prev2, prev3, delta, trend, coef_values, coef_tensor,
                      threshold_value, threshold_tensor, kernel):
    return reference.cached_branch(x, gate, cache, prev=prev, prev2=prev2, prev3=prev3, delta=delta, trend=trend,
                                   coef=coef_of(coef_values, coef_tensor),
                                   token_threshold=threshold_of(threshold_value, threshold_tensor))


def _block_reference(x, gate_attn, gate_mlp, cache_attn, cache_mlp, prev_attn, prev_mlp, prev2_attn, prev2_mlp,
                     prev3_attn, prev3_mlp, delta_attn, delta_mlp, trend_attn, trend_mlp, coef_values,
                     coef_tensor_attn, coef_tensor_mlp, threshold_value, threshold_tensor, kernel):
    return reference.cached_block(
        x, gate_attn, gate_mlp, cache_attn, cache_mlp, prev_attn=prev_attn, prev_mlp=prev_mlp,
        prev2_attn=prev2_attn, prev2_mlp=prev2_mlp, prev3_attn=prev3_attn, prev3_mlp=prev3_mlp,
        delta_attn=delta_attn, delta_mlp=delta_mlp, trend_attn=trend_attn, trend_mlp=trend_mlp,
        coef_attn=coef_of(coef_values[:COEF_SLOTS], coef_tensor_attn),
        coef_mlp=coef_of(coef_values[COEF_SLOTS:], coef_tensor_mlp),
        token_threshold=threshold_of(threshold_value, threshold_tensor))


def _segment_reference(x, gates, cache, generation, delta, trend, coef, threshold_value, threshold_tensor, kernel):
    return reference.cached_segment(x, gates, cache, generation, delta=delta, trend=trend, coef=coef,
                                    token_threshold=threshold_of(threshold_value, threshold_tensor))


def register_reference_autograd(op, reference_fn):
    """Gives custom op a backward that differentiates reference_fn(*the op's inputs).

    reference_fn takes the op's positional inputs and returns the eager reference output; the
    backward recomputes it on the saved inputs under torch.enable_grad() (memory and time of one
    eager forward) and returns torch.autograd.grad of it for the inputs that need a gradient.
    """
    def setup_context(ctx, inputs, output):
        ctx.is_tensor = [isinstance(value, torch.Tensor) for value in inputs]
        ctx.others = [None if is_tensor else value
                      for value, is_tensor in zip(inputs, ctx.is_tensor)]
        ctx.save_for_backward(*[value for value, is_tensor in zip(inputs, ctx.is_tensor)
                                if is_tensor])

    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if is_tensor else other
                  for is_tensor, other in zip(ctx.is_tensor, ctx.others)]
        needs_grad = ctx.needs_input_grad
        with torch.enable_grad():
            inputs = [value.detach().requires_grad_() if needs else value
                      for value, needs in zip(inputs, needs_grad)]
            out = reference_fn(*inputs)
            if not out.requires_grad:  # only the threshold needs a gradient: it has none
                return (None,) * len(inputs)
            wanted = [value for value, needs in zip(inputs, needs_grad) if needs]
            grads = iter(torch.autograd.grad(out, wanted, grad_output, allow_unused=True))
        return tuple(next(grads) if needs else None for needs in needs_grad)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


for _op, _reference_fn in ((cached_branch_op, _branch_reference), (cached_block_op, _block_reference),
                           (cached_segment_op, _segment_reference)):
    _op.register_fake(_fake)
    register_reference_autograd(_op, _reference_fn)


# --- kernels per device --------------------------------------------------------------------------------

def _device_implementation(op_name, device_type):
    kernels = _KERNELS[(op_name, device_type)]

    def run_named_kernel(*args):
        *split_args, kernel = args
        fn = kernels.get(kernel)
        if fn is None:
            raise RuntimeError(f"eoc::{op_name} has no {kernel!r} kernel for {device_type} tensors; "
                               f"registered: {', '.join(sorted(kernels)) or 'none'}")
        return fn(*split_args)

    return run_named_kernel


def register_kernel(op_name: str, device_type: str, kernel_name: str, fn: Callable) -> None:
    """Registers fn(*split arguments) -> output as eoc::<op_name>'s kernel kernel_name on device_type."""
    if op_name not in OPS:
        raise ValueError(f"register_kernel: unknown op {op_name!r}; ops: {', '.join(OP_NAMES)}")
    key = (op_name, device_type)
    if key not in _KERNELS:
        _KERNELS[key] = {}
        OPS[op_name].register_kernel(device_type, _device_implementation(op_name, device_type))
    _KERNELS[key][kernel_name] = fn


def kernel(op_name: str, device_type: str, kernel_name: str) -> Callable:
    """The registered kernel fn(*split arguments) (KeyError when none is)."""
    return _KERNELS[(op_name, device_type)][kernel_name]


def _direct(args) -> bool:
    """Whether a kernel may run without the custom op: not traced, and no gradient to record."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled()
                and any(isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args))


def run(op_name: str, kernel_name: str, split_args: tuple) -> torch.Tensor:
    """eoc::<op_name>(*split_args, kernel_name): through the custom op when traced or differentiated,
    else the kernel of the inputs' device directly."""
    if _direct(split_args):
        kernels = _KERNELS.get((op_name, split_args[0].device.type), {})
        if kernel_name in kernels:
            return kernels[kernel_name](*split_args)
    return OPS[op_name](*split_args, kernel_name)


# --- a backend: its kernels and the public-signature functions dispatch.py calls ------------------------

def backend_functions(kernel_name: str) -> dict[str, Callable]:
    """The public ops' signatures minus ``backend`` (inputs already checked) running kernel_name."""

    def cached_branch(x, gate, cache, *, prev=None, prev2=None, prev3=None, delta=None, trend=None,
                      coef=_ZERO_COEF, token_threshold=0.0):
        return run("cached_branch", kernel_name,
                   (x, gate, cache, prev, prev2, prev3, delta, trend, *split_coef(coef),
                    *split_threshold(token_threshold)))

    def cached_block(x, gate_attn, gate_mlp, cache_attn, cache_mlp, *, prev_attn=None, prev_mlp=None,
                     prev2_attn=None, prev2_mlp=None, prev3_attn=None, prev3_mlp=None,
                     delta_attn=None, delta_mlp=None, trend_attn=None, trend_mlp=None, coef_attn=_ZERO_COEF,
                     coef_mlp=_ZERO_COEF, token_threshold=0.0):
        values_attn, tensor_attn = split_coef(coef_attn)
        values_mlp, tensor_mlp = split_coef(coef_mlp)
        return run("cached_block", kernel_name,
                   (x, gate_attn, gate_mlp, cache_attn, cache_mlp, prev_attn, prev_mlp, prev2_attn, prev2_mlp,
                    prev3_attn, prev3_mlp, delta_attn, delta_mlp, trend_attn, trend_mlp, values_attn + values_mlp,
                    tensor_attn, tensor_mlp, *split_threshold(token_threshold)))

    def cached_segment(x, gates, cache, generation, *, delta=None, trend=None, coef=None, token_threshold=0.0):
        return run("cached_segment", kernel_name,
                   (x, gates, cache, generation, delta, trend, coef, *split_threshold(token_threshold)))

    functions = {"cached_branch": cached_branch, "cached_block": cached_block, "cached_segment": cached_segment}
    for name, fn in functions.items():
        fn.__doc__ = f'The "{kernel_name}" backend of eoc_kernels.{name} (which checks the inputs).'
    return functions


def register_backend(backend_name: str, kernels: dict[tuple[str, str], Callable],
                     is_available: Callable[[torch.device], bool],
                     auto_eligible: Callable[[torch.device], bool] | None = None,
                     unavailable_reason: Callable[[torch.device], str | None] | None = None) -> dict[str, Callable]:
    """Registers a backend's kernels ({(op name, device type): fn(*split arguments)}) with the eoc:: ops and
    its public-signature functions with dispatch; returns those functions by op name."""
    for (op_name, device_type), fn in kernels.items():
        register_kernel(op_name, device_type, backend_name, fn)
    functions = backend_functions(backend_name)
    for op_name, fn in functions.items():
        dispatch.register_backend(op_name, backend_name, fn, is_available, auto_eligible=auto_eligible,
                                  unavailable_reason=unavailable_reason)
    return functions
