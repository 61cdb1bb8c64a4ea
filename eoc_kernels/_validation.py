"""Input checks shared by the public ops in ``ops.py`` (DESIGN §3 shapes, dtypes and devices).

Each check raises TypeError for a wrong type or dtype and ValueError for a wrong shape, device or
length, with a message "<op>: <argument> must ..., got ..." naming the argument, what was expected
and what was given. Backends (the reference included) assume checked inputs.

Values are checked only where that costs no host sync (DESIGN §3: a cached step never syncs):
Python numbers always, tensors when they are on the CPU and not being traced by torch.compile
(which cannot branch on a tensor's value without a graph break). A bad ``generation`` elsewhere
(CUDA, traced) trips a device-side assert (``torch._assert_async``); non-finite tensor
coefficients and thresholds there are not checked.
"""

import math
import numbers

import torch

from .errors import InputTypeError, InputValueError

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)  # cached_segment's generation


def _fmt_shape(shape):
    return "[" + ", ".join(str(size) for size in shape) + "]"


def _is_number(value):
    # bool is a numbers.Real, but True as a coefficient is almost surely a mistake.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _values_readable(tensor):
    """Whether tensor's values can be read on the host for free: a CPU tensor, not under tracing."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def _require_finite(op, name, value):
    """A Python number, or a float tensor whose values are readable, must be finite."""
    if isinstance(value, torch.Tensor):
        if _values_readable(value) and not bool(torch.isfinite(value).all()):
            raise InputValueError(f"{op}: {name} must be finite (no NaN or inf), got "
                             f"{value.tolist()}")
    elif not math.isfinite(value):
        raise InputValueError(f"{op}: {name} must be finite (no NaN or inf), got {value}")


def _require_tensor(op, name, value):
    if not isinstance(value, torch.Tensor):
        raise InputTypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def _require_device(op, name, tensor, device):
    if tensor.device != device:
        raise InputValueError(f"{op}: {name} must be on device {device} (the device of x), "
                         f"got {tensor.device}")


def _shape_error(op, name, expected, tensor):
    return InputValueError(f"{op}: {name} must have shape {expected}, got {_fmt_shape(tensor.shape)}")


def _check_dtype_device(op, name, tensor, x):
    """tensor must be a tensor with x's dtype and device."""
    _require_tensor(op, name, tensor)
    if tensor.dtype != x.dtype:
        raise InputTypeError(f"{op}: {name} must have dtype {x.dtype} (the dtype of x), "
                        f"got {tensor.dtype}")
    _require_device(op, name, tensor, x.device)


def _check_like_x(op, name, tensor, x, layout, shape):
    """tensor must have x's dtype and device and the given shape, described by layout."""
    _check_dtype_device(op, name, tensor, x)
    if tuple(tensor.shape) != shape:
        raise _shape_error(op, name, f"{layout} = {_fmt_shape(shape)}", tensor)


def _check_per_head(op, name, tensor, x, lead=(), lead_layout=()):
    """tensor must be lead + [H, N, C] like x, with H dividing B (row b uses entry b // (B // H)).

    lead: the sizes of leading entry dimensions, named by lead_layout (e.g. (S, 2), ("S", "2")).
    """
    _check_dtype_device(op, name, tensor, x)
    batch, tokens, channels = x.shape
    rank = len(lead) + 3
    heads = tensor.shape[len(lead)] if tensor.dim() == rank else 0
    if (tensor.dim() != rank or tuple(tensor.shape[:len(lead)]) != tuple(lead)
            or tensor.shape[len(lead) + 1:] != x.shape[1:] or heads == 0 or batch % heads != 0):
        layout = ", ".join([*lead_layout, "H", "N", "C"])
        sizes = ", ".join(str(size) for size in [*lead, "H", tokens, channels])
        raise _shape_error(op, name, f"[{layout}] = [{sizes}] with H dividing B = {batch}",
                           tensor)


def _check_parameter_tensor(op, name, tensor, device, shapes, layout):
    """A float32 tensor on x's device whose shape is one of shapes (coefficients, threshold)."""
    if tensor.dtype != torch.float32:
        raise InputTypeError(f"{op}: {name} must be a float32 tensor, got {tensor.dtype}")
    _require_device(op, name, tensor, device)
    if tuple(tensor.shape) not in shapes:
        raise _shape_error(op, name, layout, tensor)


COEF_LENGTHS = (3, 4, 5)  # (alpha, beta1, gamma[, beta2[, beta3]]), issue 10, DESIGN §2.2
_COEF_NAMES = "(alpha, beta1, gamma[, beta2[, beta3]])"
MAX_GENERATIONS = 4  # cached_segment's cache ring: G in 1..4


def _check_coef(op, name, coef, device):
    """coef = (alpha, beta1, gamma[, beta2[, beta3]]): a tuple or list of 3 to 5 numbers, or a
    float32 tensor [P] with P in {3, 4, 5}."""
    if isinstance(coef, torch.Tensor):
        _check_parameter_tensor(op, name, coef, device, shapes=[(p,) for p in COEF_LENGTHS],
                                layout="[P] with P in {3, 4, 5}")
        _require_finite(op, name, coef)
        return
    if not isinstance(coef, (tuple, list)):
        raise InputTypeError(f"{op}: {name} must be a tuple of 3 to 5 numbers {_COEF_NAMES} or a "
                             f"float32 tensor of shape [P] with P in {{3, 4, 5}}, got {type(coef).__name__}")
    if len(coef) not in COEF_LENGTHS:
        raise InputValueError(f"{op}: {name} must have 3, 4 or 5 entries {_COEF_NAMES}, got {len(coef)}")
    for value in coef:
        if not _is_number(value):
            raise InputTypeError(f"{op}: {name} entries must be Python numbers (not bool), "
                                 f"got {type(value).__name__}")
        if not math.isfinite(value):
            raise InputValueError(f"{op}: {name} entries must be finite (no NaN or inf), "
                                  f"got {tuple(coef)}")


def check_features(op, x):
    """x must be a [B, N, C] tensor of a supported dtype."""
    _require_tensor(op, "x", x)
    if x.dtype not in SUPPORTED_DTYPES:
        raise InputTypeError(f"{op}: x must have dtype float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 3:
        raise _shape_error(op, "x", "[B, N, C]", x)


def check_branch(op, x, suffix, *, gate, cache, prev, delta, trend, coef, prev2=None, prev3=None):
    """Checks one reused branch's arguments; their names are the base names + suffix.

    The history C_1 = prev, C_2 = prev2, C_3 = prev3 is [B, N, C] like cache; C_i needs C_{i-1}
    (prev2 without prev, or prev3 without prev2, is a ValueError naming it)."""
    batch, tokens, channels = x.shape
    _check_like_x(op, f"gate{suffix}", gate, x, "[B, C]", (batch, channels))
    _check_like_x(op, f"cache{suffix}", cache, x, "[B, N, C]", (batch, tokens, channels))
    history = (("prev", prev), ("prev2", prev2), ("prev3", prev3))
    for (before, earlier), (name, tensor) in zip((("cache", cache),) + history[:-1], history):
        if tensor is None:
            continue
        if earlier is None:
            raise InputValueError(f"{op}: {name}{suffix} must be None when {before}{suffix} is None "
                                  f"(the history C_0, C_1, C_2, C_3 is cache, prev, prev2, prev3 without "
                                  f"gaps), got a tensor")
        _check_like_x(op, f"{name}{suffix}", tensor, x, "[B, N, C]", (batch, tokens, channels))
    if delta is not None:
        _check_per_head(op, f"delta{suffix}", delta, x)
    if trend is not None:
        _check_per_head(op, f"trend{suffix}", trend, x)
    _check_coef(op, f"coef{suffix}", coef, x.device)


def check_token_threshold(op, token_threshold, device):
    """token_threshold: a finite Python number or a one-element float32 tensor ([] or [1])."""
    if isinstance(token_threshold, torch.Tensor):
        _check_parameter_tensor(op, "token_threshold", token_threshold, device,
                                shapes=[(), (1,)], layout="[] or [1]")
    elif not _is_number(token_threshold):
        raise InputTypeError(f"{op}: token_threshold must be a Python number or a float32 tensor with "
                        f"one element, got {type(token_threshold).__name__}")
    _require_finite(op, "token_threshold", token_threshold)


def check_segment(op, x, *, gates, cache, generation, delta, trend, coef):
    """Checks the arguments of cached_segment; S and G are read from cache."""
    batch, tokens, channels = x.shape
    _check_dtype_device(op, "cache", cache, x)
    if (cache.dim() != 6 or not 1 <= cache.shape[0] <= MAX_GENERATIONS or cache.shape[2] != 2
            or cache.shape[3:] != x.shape):
        raise _shape_error(op, "cache", f"[G, S, 2, B, N, C] = [G, S, 2, {batch}, {tokens}, "
                                        f"{channels}] with G in {{1, 2, 3, 4}}", cache)
    blocks = cache.shape[1]
    _check_like_x(op, "gates", gates, x, "[B, S, 2, C]", (batch, blocks, 2, channels))
    _require_tensor(op, "generation", generation)
    if generation.dtype not in INDEX_DTYPES:
        raise InputTypeError(f"{op}: generation must have dtype int32 or int64, got {generation.dtype}")
    _require_device(op, "generation", generation, x.device)
    if tuple(generation.shape) != (blocks, 2):
        raise _shape_error(op, "generation", f"[S, 2] = [{blocks}, 2]", generation)
    _check_generation_values(op, generation, cache.shape[0])
    for name, tensor in (("delta", delta), ("trend", trend)):
        if tensor is not None:
            _check_per_head(op, name, tensor, x, lead=(blocks, 2), lead_layout=("S", "2"))
    if coef is not None:
        if not isinstance(coef, torch.Tensor):
            raise InputTypeError(f"{op}: coef must be None or a float32 tensor of shape [S, 2, P] with P "
                                 f"in {{3, 4, 5}} ({_COEF_NAMES[1:-1]} per entry), got {type(coef).__name__}")
        _check_parameter_tensor(op, "coef", coef, x.device, shapes=[(blocks, 2, p) for p in COEF_LENGTHS],
                                layout=f"[S, 2, P] = [{blocks}, 2, P] with P in {{3, 4, 5}}")
        _require_finite(op, "coef", coef)


def _check_generation_values(op, generation, num_generations):
    """generation's values must index cache's generations: 0..G-1.

    Readable values (CPU) raise ValueError; elsewhere a device-side assert checks them without a
    host sync (on CUDA a bad value aborts the process's CUDA context, as an out-of-range index
    does; the Triton kernel clamps the value so it never reads outside the cache either way).
    """
    top = num_generations - 1
    message = f"{op}: generation values must be in 0..{top} (G = {num_generations})"
    if generation.numel() == 0 or generation.device.type == "meta":
        return
    if _values_readable(generation):
        bad = generation[(generation < 0) | (generation > top)]
        if bad.numel():
            raise InputValueError(f"{message}, got {bad[0].item()}")
    else:
        torch._assert_async(((generation >= 0) & (generation <= top)).all(), message)
