"""The CUDA C++ kernels (csrc/cuda_ops.cu) against the eager reference, called as the out ops (skips without them).

Runs where torch has CUDA, a GPU is visible and eoc_kernels._C was built with its CUDA kernels (a build against
a CUDA torch: ``torch.ops.eoc.cached_*_out`` then has a CUDA kernel). The ops are called directly,
``torch.ops.eoc.cached_segment_out(..., out)``, with ``out`` filled with NaN first, so an element a kernel
fails to write fails the comparison. Inputs come from tests/eoc_kernels/naive.py (random branches and
segments with spread-out judgment scores, strided gate and cache views as the DiT builds them), built on the
CPU and moved to the GPU; the reference is ``eoc_kernels.reference`` on the same CUDA tensors; tolerances are
tests/conftest.py's.

Covered: odd and DiT shapes (C = 1, 37, 123, 1152, 4096, 8192; N = 1, 7, 49), fp32 / fp16 / bf16, every term
alone and together, float and tensor coefficients (zeros never read), thresholds 0 / a float / a tensor that
splits the tokens, H broadcast (H = 1, 2, B), G = 1 and 2 with int32 / int64 generations (out-of-range values
clamped), both load paths (128-bit: aligned contiguous rows; scalar: strided or misaligned views, odd C), a
strided output, the argument checks of a direct call, bit-exactness with the reference without judgment
(--fmad=false), CUDA-graph capture and replay with changed coefficient, threshold and generation values, and
offsets past 2**31 elements (slow).

With EOC_CUDA_EMULATION set to a library built by benchmarks/gpu/cuda_emulation.py the same tests run the
kernels' source emulated on the CPU (``torch.ops.eoc_emu``, CPU tensors), without a GPU; the tests that need a
real one (CUDA graphs, kernel names, device checks, the 4.3 GB buffer) skip there.
"""

import os

import pytest
import torch

import eoc_kernels
from eoc_kernels import reference

from .naive import DTYPES, random_branch, random_segment, segment_threshold, splitting_threshold
from .test_cpp_ops import (
    COEF_5,
    ZERO_PATTERNS,
    history_coef,
    history_threshold,
    random_history_branch,
    random_ring_segment,
    unread_operands,
)


def _has_cuda_kernels() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("eoc::cached_segment_out", "CUDA")
    except RuntimeError:  # eoc_kernels._C not loaded: the op does not exist
        return False


EMULATION = os.environ.get("EOC_CUDA_EMULATION")  # benchmarks/gpu/cuda_emulation.py
if EMULATION:
    torch.ops.load_library(EMULATION)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not EMULATION and not _has_cuda_kernels(),
                       reason="needs a CUDA device and eoc_kernels._C built with its CUDA kernels "
                              f"(csrc/cuda_ops.cu; eoc_kernels {eoc_kernels.__version__}, torch CUDA "
                              f"{torch.version.cuda})"),
]
CUDA = torch.device("cpu" if EMULATION else "cuda")  # the device the kernels run on
OPS = torch.ops.eoc_emu if EMULATION else torch.ops.eoc
NEEDS_REAL_GPU = pytest.mark.skipif(bool(EMULATION), reason="needs a real GPU (the CPU emulation has none)")
# (B, N, C): odd widths (scalar path: C % 8 != 0), DiT-XL/2's 1152 and the widest DiT row (vector path), one channel.
SHAPES = [(1, 49, 123), (3, 7, 1152), (2, 33, 4096), (3, 1, 37), (1, 1, 1)]
TERM_SETS = [(), ("delta",), ("prev", "trend"), ("delta", "prev", "trend")]


def to_cuda(value):
    if isinstance(value, torch.Tensor):
        return value.to(CUDA)
    if isinstance(value, dict):
        return {key: to_cuda(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_cuda(item) for item in value]
    return value


def poisoned(x):
    return torch.full_like(x, float("nan"))


def split_coef(coef):
    """(coef_values, coef_tensor) of the schema: a tensor goes as is, numbers as 5 floats (zero-padded)."""
    if isinstance(coef, torch.Tensor):
        return [0.0] * 5, coef
    values = [float(value) for value in coef]
    return values + [0.0] * (5 - len(values)), None


def split_threshold(threshold):
    if isinstance(threshold, torch.Tensor):
        return 0.0, threshold
    return float(threshold), None


def branch_out(x, b, threshold, out=None):
    out = poisoned(x) if out is None else out
    values, tensor = split_coef(b["coef"])
    OPS.cached_branch_out(x, b["gate"], b["cache"], b["prev"], b.get("prev2"), b.get("prev3"), b["delta"], b["trend"],
                          values, tensor, *split_threshold(threshold), out)
    return out


def block_out(x, attn, mlp, threshold, out=None):
    out = poisoned(x) if out is None else out
    values_a, tensor_a = split_coef(attn["coef"])
    values_m, tensor_m = split_coef(mlp["coef"])
    OPS.cached_block_out(x, attn["gate"], mlp["gate"], attn["cache"], mlp["cache"], attn["prev"], mlp["prev"],
                         attn.get("prev2"), mlp.get("prev2"), attn.get("prev3"), mlp.get("prev3"), attn["delta"],
                         mlp["delta"], attn["trend"], mlp["trend"], values_a + values_m, tensor_a, tensor_m,
                         *split_threshold(threshold), out)
    return out


def segment_out(x, seg, threshold, out=None):
    out = poisoned(x) if out is None else out
    OPS.cached_segment_out(x, seg["gates"], seg["cache"], seg["generation"], seg["delta"], seg["trend"], seg["coef"],
                           *split_threshold(threshold), out)
    return out


def branch_reference(x, b, threshold):
    return reference.cached_branch(x, b["gate"], b["cache"], prev=b["prev"], prev2=b.get("prev2"), prev3=b.get("prev3"),
                                   delta=b["delta"], trend=b["trend"], coef=b["coef"], token_threshold=threshold)


def block_reference(x, attn, mlp, threshold):
    return reference.cached_block(x, attn["gate"], mlp["gate"], attn["cache"], mlp["cache"], prev_attn=attn["prev"],
                                  prev_mlp=mlp["prev"], prev2_attn=attn.get("prev2"), prev2_mlp=mlp.get("prev2"),
                                  prev3_attn=attn.get("prev3"), prev3_mlp=mlp.get("prev3"), delta_attn=attn["delta"],
                                  delta_mlp=mlp["delta"], trend_attn=attn["trend"], trend_mlp=mlp["trend"],
                                  coef_attn=attn["coef"], coef_mlp=mlp["coef"], token_threshold=threshold)


def segment_reference(x, seg, threshold):
    return reference.cached_segment(x, seg["gates"], seg["cache"], seg["generation"], delta=seg["delta"],
                                    trend=seg["trend"], coef=seg["coef"], token_threshold=threshold)


def assert_close(out, expected, tol):
    assert out.dtype == expected.dtype and out.shape == expected.shape and out.device.type == CUDA.type
    assert not torch.isnan(out).any() or torch.isnan(expected).any(), "an element was left unwritten (NaN)"
    torch.testing.assert_close(out, expected, **tol)


def as_coef(form, values):
    return tuple(values) if form == "float" else torch.tensor(values, dtype=torch.float32)


def threshold_of(form, value):
    """The threshold in the form of the case: 0 (no judgment), a float, a one-element CUDA tensor."""
    if form == "zero":
        return 0.0
    return float(value) if form == "float" else torch.tensor([value], device=CUDA)


def branch_pair(seed, shape, dtype, terms, coef_form, heads=1):
    gen = torch.Generator().manual_seed(seed)
    attn = random_branch(gen, *shape, dtype, heads=heads, terms=terms, coef=as_coef(coef_form, (0.8, 0.6, -0.5)))
    mlp = random_branch(gen, *shape, dtype, heads=shape[0] // heads, terms=terms,
                        coef=as_coef(coef_form, (0.4, 1.0, 0.9)))
    x = torch.randn(shape, generator=gen).to(dtype)
    return x, attn, mlp


def split_value(branches, terms):
    """A threshold between the tokens' scores; without terms every score is 0 (any threshold keeps Cc)."""
    return splitting_threshold(branches) if terms else 0.5


# --- against the reference ----------------------------------------------------------------------------

@pytest.mark.parametrize("threshold_form", ["zero", "float", "tensor"])
@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("terms", TERM_SETS, ids=lambda terms: "+".join(terms) or "plain")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_branch_and_block_match_reference(shape, dtype, terms, coef_form, threshold_form, tolerance):
    x, attn, mlp = branch_pair(60, shape, dtype, terms, coef_form)
    value = split_value([attn], terms) if shape[0] * shape[1] > 1 else 0.5
    x, attn, mlp = to_cuda(x), to_cuda(attn), to_cuda(mlp)
    threshold = threshold_of(threshold_form, value)
    assert_close(branch_out(x, attn, threshold), branch_reference(x, attn, threshold), tolerance(dtype))
    value = split_value([attn, mlp], terms) if shape[0] * shape[1] > 1 else 0.5
    threshold = threshold_of(threshold_form, value)
    assert_close(block_out(x, attn, mlp, threshold), block_reference(x, attn, mlp, threshold), tolerance(dtype))


@pytest.mark.parametrize("layout", ["views", "aligned"])  # scalar path (gates at an odd offset) / 128-bit path
@pytest.mark.parametrize("threshold_form", ["zero", "float", "tensor"])
@pytest.mark.parametrize("terms", [(), ("delta",), ("trend",), ("delta", "trend")],
                         ids=lambda terms: "+".join(terms) or "no-prior")
@pytest.mark.parametrize("generations", [1, 2], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 49, 123), (2, 7, 1152), (3, 5, 8), (2, 3, 4096)], ids=str)
def test_segment_matches_reference(shape, dtype, generations, terms, threshold_form, layout, tolerance):
    gen = torch.Generator().manual_seed(61)
    seg = random_segment(gen, *shape, dtype, blocks=3, generations=generations, terms=terms, heads=shape[0])
    value = segment_threshold(seg) if generations == 2 or terms else 0.5
    x = to_cuda(torch.randn(shape, generator=gen).to(dtype))
    seg = to_cuda({key: item for key, item in seg.items() if key != "entries"})
    if layout == "aligned":
        seg["gates"] = seg["gates"].contiguous()
    threshold = threshold_of(threshold_form, value)
    tol = dict(tolerance(dtype))
    for coef in (seg["coef"], None):  # tensor coefficients (some zero), plain reuse
        case = seg | {"coef": coef}
        assert_close(segment_out(x, case, threshold), segment_reference(x, case, threshold), tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", ["1", "2", "B"])
def test_head_broadcast(heads, dtype, tolerance):
    shape = (4, 7, 1152)
    h = {"1": 1, "2": 2, "B": shape[0]}[heads]
    x, attn, mlp = branch_pair(62, shape, dtype, ("delta", "prev", "trend"), "tensor", heads=h)
    value = splitting_threshold([attn, mlp])
    x, attn, mlp = to_cuda(x), to_cuda(attn), to_cuda(mlp)
    threshold = torch.tensor(value, device=CUDA)
    assert_close(branch_out(x, attn, threshold), branch_reference(x, attn, threshold), tolerance(dtype))
    assert_close(block_out(x, attn, mlp, threshold), block_reference(x, attn, mlp, threshold), tolerance(dtype))
    gen = torch.Generator().manual_seed(63)
    seg = random_segment(gen, *shape, dtype, blocks=2, heads=h)
    value = segment_threshold(seg)
    seg = to_cuda({key: item for key, item in seg.items() if key != "entries"})
    assert_close(segment_out(x, seg, value), segment_reference(x, seg, value), tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_exact_without_judgment(dtype):
    """--fmad=false: every product and sum rounded as the eager reference's separate CUDA kernels round them,
    in the same order, and one rounding to the dtype; without judgment nothing else differs, so the outputs are
    equal bit for bit (both load paths: C = 1152 contiguous, C = 123)."""
    for shape in [(2, 7, 1152), (2, 7, 123)]:
        x, attn, mlp = branch_pair(64, shape, dtype, ("delta", "prev", "trend"), "tensor", heads=2)
        x, attn, mlp = to_cuda(x), to_cuda(attn), to_cuda(mlp)
        assert torch.equal(branch_out(x, attn, 0.0), branch_reference(x, attn, 0.0))
        assert torch.equal(block_out(x, attn, mlp, 0.0), block_reference(x, attn, mlp, 0.0))
        gen = torch.Generator().manual_seed(65)
        seg = to_cuda({key: item for key, item in random_segment(gen, *shape, dtype, blocks=3).items()
                       if key != "entries"})
        assert torch.equal(segment_out(x, seg, 0.0), segment_reference(x, seg, 0.0))


# --- layouts, paths and sizes -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs(dtype, tolerance):
    """Transposed x, a cache read every other channel, a sliced prev, gates from a wider matrix, a stride-0
    delta, a trend transposed over (N, C), strided coefficients, a strided output: the scalar path."""
    gen = torch.Generator().manual_seed(66)
    batch, tokens, channels = 2, 7, 123

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(CUDA)

    x = randn(tokens, batch, channels).transpose(0, 1)
    cache = randn(batch, tokens, 2 * channels)[..., ::2]
    prev = randn(batch, tokens + 3, channels)[:, 3:]
    gates = randn(batch, 4 * channels)[:, channels:].view(batch, 3, channels)
    delta = randn(1, tokens, channels).expand(2, tokens, channels)
    trend = torch.rand(channels, tokens, generator=gen).to(dtype).to(CUDA).t()[None]
    coef = torch.tensor([0.3, 9.0, 0.5, 9.0, -0.4, 9.0], device=CUDA)[::2]
    branch = dict(gate=gates[:, 0], cache=cache, prev=prev, delta=delta, trend=trend, coef=coef)
    other = dict(gate=gates[:, 1], cache=prev, prev=None, delta=delta, trend=None, coef=(1.0, 0.0, 0.0))
    out = torch.full((batch, tokens, 2 * channels), float("nan"), dtype=dtype, device=CUDA)[..., 1::2]
    for threshold in (0.0, 0.1, torch.tensor(0.1, device=CUDA)):
        assert_close(branch_out(x, branch, threshold, out.fill_(float("nan"))), branch_reference(x, branch, threshold),
                     tolerance(dtype))
        assert_close(block_out(x, branch, other, threshold, out.fill_(float("nan"))),
                     block_reference(x, branch, other, threshold), tolerance(dtype))
    seg = random_segment(gen, batch, tokens, channels, dtype, blocks=2, heads=1)
    seg = to_cuda({key: item for key, item in seg.items() if key != "entries"})
    seg["cache"] = seg["cache"].permute(0, 1, 2, 3, 5, 4).contiguous().permute(0, 1, 2, 3, 5, 4)
    seg["trend"] = seg["trend"].expand(2, 2, batch, tokens, channels)
    seg["generation"] = seg["generation"].t().contiguous().t()
    for threshold in (0.0, 0.1):
        assert_close(segment_out(x, seg, threshold, out.fill_(float("nan"))), segment_reference(x, seg, threshold),
                     tolerance(dtype))


@pytest.mark.parametrize("channels", [4096, 8192])
def test_widest_rows(channels, tolerance):
    """Rows of 4096 (512 threads) and 8192 channels (1024 threads, the vector path's limit), judged."""
    shape, dtype = (2, 5, channels), torch.bfloat16
    x, attn, mlp = branch_pair(67, shape, dtype, ("delta", "prev", "trend"), "float")
    value = splitting_threshold([attn, mlp])
    # The scalar path's limit is C = 4096: a cache read every other channel.
    strided = dict(attn, cache=torch.cat([attn["cache"], attn["prev"]], dim=-1)[..., ::2])
    strided_value = splitting_threshold([strided])
    x, attn, mlp, strided = to_cuda(x), to_cuda(attn), to_cuda(mlp), to_cuda(strided)
    assert_close(block_out(x, attn, mlp, value), block_reference(x, attn, mlp, value), tolerance(dtype))
    if channels <= 4096:
        assert_close(branch_out(x, strided, strided_value), branch_reference(x, strided, strided_value),
                     tolerance(dtype))


def kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [event.key for event in prof.key_averages() if "_kernel<" in event.key]


@NEEDS_REAL_GPU
def test_load_path_follows_the_layout():
    """Aligned contiguous rows with C % 8 == 0 take the 128-bit path (VECTORIZED = true), others the scalar one."""
    x, attn, _ = branch_pair(68, (2, 7, 1152), torch.bfloat16, ("delta",), "float")
    x, attn = to_cuda(x), to_cuda(attn)
    names = kernel_names(lambda: branch_out(x, attn, 0.0))
    assert len(names) == 1 and "BF16, true, false" in names[0], names
    misaligned = dict(attn, gate=torch.cat([attn["gate"][:, :1], attn["gate"]], dim=1)[:, 1:])  # offset 2 bytes
    names = kernel_names(lambda: branch_out(x, misaligned, torch.tensor(0.1, device=CUDA)))
    assert len(names) == 1 and "BF16, false, true" in names[0], names


def test_empty_inputs():
    for shape in [(2, 0, 5), (0, 3, 5), (2, 3, 0)]:
        x = torch.randn(shape, device=CUDA)
        batch, tokens, channels = shape
        out = torch.empty_like(x)
        OPS.cached_segment_out(x, torch.randn(batch, 1, 2, channels, device=CUDA), torch.randn(2, 1, 2, *shape,
                               device=CUDA), torch.zeros(1, 2, dtype=torch.int64, device=CUDA), None, None,
                               torch.ones(1, 2, 3, device=CUDA), 0.0, None, out)
    x = torch.randn(2, 3, 5, device=CUDA)  # S = 0: out = x
    out = poisoned(x)
    OPS.cached_segment_out(x, torch.randn(2, 0, 2, 5, device=CUDA), torch.randn(1, 0, 2, 2, 3, 5, device=CUDA),
                           torch.zeros(0, 2, dtype=torch.int32, device=CUDA), None, None, None, 0.0, None, out)
    assert torch.equal(out, x)


# --- coefficients and generations -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_zero_coefficients_leave_tensors_unread(dtype):
    """A zero coefficient's tensor is never read (float zeros and tensor zeros alike): NaN there stays out."""
    gen = torch.Generator().manual_seed(69)
    shape = (2, 7, 1152)
    x = to_cuda(torch.randn(shape, generator=gen).to(dtype))
    branch = to_cuda(random_branch(gen, *shape, dtype, heads=2))
    for coef in [(0.0, 0.0, 0.0), torch.zeros(3), (0.0, 0.5, 0.0), torch.tensor([0.7, 0.0, 0.0]),
                 torch.tensor([0.0, 0.0, -0.4])]:
        coef = to_cuda(coef)
        clean = dict(branch, coef=coef)
        dirty = dict(clean)
        for key, value in zip(("delta", "prev", "trend"), coef):
            if float(value) == 0.0:
                dirty[key] = torch.full_like(branch[key], float("nan"))
        for threshold in (0.0, 0.2):
            out = branch_out(x, dirty, threshold)
            assert torch.isfinite(out).all(), coef
            torch.testing.assert_close(out, branch_reference(x, clean, threshold))
            out = block_out(x, dirty, dirty, threshold)
            assert torch.isfinite(out).all(), coef
            torch.testing.assert_close(out, block_reference(x, clean, clean, threshold))


@pytest.mark.parametrize("generations", [1, 2], ids=lambda g: f"G{g}")
def test_segment_zero_coefficients_leave_entries_unread(generations):
    gen = torch.Generator().manual_seed(70)
    shape = (2, 7, 1152)
    x = to_cuda(torch.randn(shape, generator=gen))
    seg = to_cuda({key: item for key, item in random_segment(gen, *shape, torch.float32, blocks=3,
                                                             generations=generations).items() if key != "entries"})
    coef = seg["coef"]
    coef[1] = 0.0  # block 1: plain reuse of both branches
    coef[2, 0, 0] = coef[2, 1, 2] = coef[2, 1, 1] = 0.0
    expected = segment_reference(x, seg, 0.1)
    generation = seg["generation"].cpu()
    for s, k in [(1, 0), (1, 1), (2, 0), (2, 1)]:
        alpha, beta, gamma = coef[s, k].tolist()
        if alpha == 0:
            seg["delta"][s, k] = float("nan")
        if gamma == 0:
            seg["trend"][s, k] = float("nan")
        if beta == 0 and generations == 2:
            seg["cache"][1 - int(generation[s, k]), s, k] = float("nan")
    torch.testing.assert_close(segment_out(x, seg, 0.1), expected)
    # coef None: plain reuse reads neither the prior nor the previous generation.
    seg["delta"].fill_(float("nan"))
    seg["trend"].fill_(float("nan"))
    if generations == 2:
        for s in range(3):
            for k in range(2):
                seg["cache"][1 - int(generation[s, k]), s, k] = float("nan")
    plain = reference.cached_segment(x, seg["gates"], seg["cache"].nan_to_num(), seg["generation"])
    for threshold in (0.0, 0.1):
        torch.testing.assert_close(segment_out(x, seg | {"coef": None}, threshold), plain)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_generations_are_read_on_the_device_and_clamped(index_dtype, tolerance):
    """generation[s, k] picks Cc (the other generation is Cp); a direct call with values outside 0..1 reads
    generation 0 or 1 (clamped in the kernel), never outside the cache."""
    gen = torch.Generator().manual_seed(71)
    shape = (2, 7, 1152)
    seg = random_segment(gen, *shape, torch.float32, blocks=3, index_dtype=index_dtype)
    x = to_cuda(torch.randn(shape, generator=gen))
    seg = to_cuda({key: item for key, item in seg.items() if key != "entries"})
    tol = tolerance(torch.float32)
    assert_close(segment_out(x, seg, 0.0), segment_reference(x, seg, 0.0), tol)
    wild = torch.tensor([[-3, 0], [1, 7], [2**30, -1]], dtype=index_dtype, device=CUDA)
    clamped = wild.clamp(0, 1)
    assert_close(segment_out(x, seg | {"generation": wild}, 0.0),
                 segment_reference(x, seg | {"generation": clamped}, 0.0), tol)


# --- K history: prev2 / prev3, coef of length 4 and 5, the cache ring ------------------------------------

HISTORY_SHAPES = [(1, 49, 123), (3, 7, 1152), (2, 5, 4096), (3, 1, 37), (2, 3, 6144)]


@pytest.mark.parametrize("threshold_form", ["zero", "float", "tensor"])
@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("coefs", [3, 4, 5], ids=lambda p: f"P{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HISTORY_SHAPES, ids=str)
def test_history_matches_reference(shape, dtype, coefs, coef_form, threshold_form, tolerance):
    """Every K (P = 3, 4, 5) with C_1..C_3 given, both load paths (C = 123 and 37: scalar; the others: 128-bit,
    the HISTORY variants up to C = 6144): without judgment bit-identical to the reference (fp32 in the order
    α, β1, γ, β2, β3, --fmad=false), with a splitting threshold close to it; cached_block's MLP branch has its
    own coef length (8 − P)."""
    gen = torch.Generator().manual_seed(90 + coefs)
    x = torch.randn(shape, generator=gen).to(dtype)
    attn = random_history_branch(gen, *shape, dtype, coef=history_coef(COEF_5[:coefs], coef_form))
    mlp = random_history_branch(gen, *shape, dtype, heads=shape[0],
                                coef=history_coef((0.4, -0.7, 0.9, 1.1, -0.6)[: 8 - coefs], coef_form))
    value = history_threshold([attn]) if shape[0] * shape[1] > 4 else 0.5
    block_value = history_threshold([attn, mlp]) if shape[0] * shape[1] > 4 else 0.5
    x, attn, mlp = to_cuda(x), to_cuda(attn), to_cuda(mlp)
    out = branch_out(x, attn, threshold_of(threshold_form, value))
    expected = branch_reference(x, attn, threshold_of(threshold_form, value))
    block = block_out(x, attn, mlp, threshold_of(threshold_form, block_value))
    block_expected = block_reference(x, attn, mlp, threshold_of(threshold_form, block_value))
    if threshold_form == "zero":
        assert torch.equal(out, expected) and torch.equal(block, block_expected)
    assert_close(out, expected, tolerance(dtype))
    assert_close(block, block_expected, tolerance(dtype))


@pytest.mark.parametrize("coef_form", ["float", "tensor"])
def test_history_zero_coefficients_leave_tensors_unread(coef_form):
    """The 32 patterns of zero coefficients (β2 = 0 with β3 != 0 among them): operands no applied term needs hold
    NaN; a tensor coef of length 3 or 4 leaves prev3 (and prev2) unread."""
    gen = torch.Generator().manual_seed(91)
    shape = (2, 7, 1152)
    x = to_cuda(torch.randn(shape, generator=gen))
    branch = to_cuda(random_history_branch(gen, *shape, torch.float32, coef=None, heads=2))
    cases = [tuple(0.0 if zero else value for zero, value in zip(pattern, COEF_5)) for pattern in ZERO_PATTERNS]
    cases += [COEF_5[:4], COEF_5[:3]]
    for values in cases:
        coef = to_cuda(history_coef(values, coef_form))
        clean = dict(branch, coef=coef)
        dirty = dict(clean)
        for name in unread_operands(tuple(values) + (0.0,) * (5 - len(values))):
            dirty[name] = torch.full_like(branch[name], float("nan"))
        for threshold in (0.0, 0.2):
            out = branch_out(x, dirty, threshold)
            assert torch.isfinite(out).all(), values
            torch.testing.assert_close(out, branch_reference(x, clean, threshold))
            out = block_out(x, dirty, dirty, threshold)
            assert torch.isfinite(out).all(), values
            torch.testing.assert_close(out, block_reference(x, clean, clean, threshold))


@pytest.mark.parametrize("layout", ["views", "aligned"])  # scalar path (gates at an odd offset) / 128-bit path
@pytest.mark.parametrize("coefs", [3, 4, 5], ids=lambda p: f"P{p}")
@pytest.mark.parametrize("generations", [1, 2, 3, 4], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 1152), (1, 5, 40)], ids=str)
def test_segment_ring_matches_reference(shape, dtype, generations, coefs, layout, tolerance):
    """The ring (C_j of entry (s, k) in generation (generation[s, k] − j) mod G; term i iff i <= G − 1,
    i <= P − 2 and its coefficient nonzero), every generation value, NaN in every generation an entry does not
    read; without judgment bit-identical to the reference on the clean ring."""
    gen = torch.Generator().manual_seed(92 + 3 * generations + coefs)
    x = torch.randn(shape, generator=gen).to(dtype)
    seg, clean, entries = random_ring_segment(gen, *shape, dtype, generations=generations, coefs=coefs)
    value = history_threshold(entries)
    x, seg, clean = to_cuda(x), to_cuda(seg), to_cuda(clean)
    if layout == "aligned":
        seg["gates"] = seg["gates"].contiguous()
    for threshold in (0.0, value, torch.tensor([value], device=CUDA)):
        out = segment_out(x, seg, threshold)
        expected = segment_reference(x, seg | {"cache": clean}, threshold)
        assert torch.isfinite(out).all()
        if isinstance(threshold, float) and threshold == 0.0:
            assert torch.equal(out, expected)
        assert_close(out, expected, tolerance(dtype))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_segment_ring_generations_roll_and_clamp(index_dtype):
    """Rolling the ring (C_0 one slot on, its history with it) leaves the result unchanged; a direct call with
    generation values outside 0..G-1 reads the clamped generation, never outside the cache."""
    gen = torch.Generator().manual_seed(93)
    shape = (2, 5, 1152)
    x = to_cuda(torch.randn(shape, generator=gen))
    for generations in (2, 3, 4):
        seg, clean, _ = random_ring_segment(gen, *shape, torch.float32, generations=generations, coefs=5, blocks=2,
                                            index_dtype=index_dtype)
        seg, clean = to_cuda(seg), to_cuda(clean)
        first = segment_out(x, seg | {"cache": clean}, 0.1)
        for shift in range(1, generations):
            rolled = seg | {"cache": clean.roll(shift, dims=0), "generation": (seg["generation"] + shift) % generations}
            assert torch.equal(segment_out(x, rolled, 0.1), first), (generations, shift)
        wild = torch.tensor([[-3, 0], [generations + 5, 2**30]], dtype=index_dtype, device=CUDA)
        clamped = wild.clamp(0, generations - 1)
        torch.testing.assert_close(segment_out(x, seg | {"cache": clean, "generation": wild}, 0.0),
                                   segment_out(x, seg | {"cache": clean, "generation": clamped}, 0.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_history_strided_inputs(dtype, tolerance):
    """History tensors strided over C and a sliced prev (the scalar path) with β2 and β3 on."""
    gen = torch.Generator().manual_seed(94)
    shape = (2, 7, 123)
    tokens = shape[1]
    branch = random_history_branch(gen, *shape, dtype, coef=COEF_5, heads=1)
    x = to_cuda(torch.randn(shape, generator=gen).to(dtype))
    branch = to_cuda(branch)
    strided = dict(branch)
    strided["prev"] = torch.cat([branch["prev"], branch["cache"]], dim=1)[:, :tokens]
    strided["prev2"] = torch.stack([branch["prev2"], branch["cache"]], dim=-1)[..., 0]
    strided["prev3"] = branch["prev3"].transpose(1, 2).contiguous().transpose(1, 2)
    for coef in (COEF_5, torch.tensor([0.8, 0.0, -0.5, 0.0, 0.3], device=CUDA)):
        for threshold in (0.0, 0.1):
            assert_close(branch_out(x, dict(strided, coef=coef), threshold),
                         branch_reference(x, dict(branch, coef=coef), threshold), tolerance(dtype))


@NEEDS_REAL_GPU
def test_history_variant_follows_the_coefficients():
    """beta_2 / beta_3 given (float nonzero, or a tensor of length 4 / 5 with their history) select the HISTORY
    variant (the 4th template argument); P = 3 and zero floats keep the K <= 1 variant."""
    x, attn, _ = branch_pair(95, (2, 7, 1152), torch.bfloat16, ("delta", "prev"), "float")
    x, attn = to_cuda(x), to_cuda(attn)
    history = dict(attn, prev2=attn["prev"] * 0.5, prev3=None)
    for coef, history_variant in [((0.5, 0.3, 0.0, 0.0), "false"), ((0.5, 0.3, 0.0, 0.2), "true"),
                                  (torch.tensor([0.5, 0.3, 0.0], device=CUDA), "false"),
                                  (torch.tensor([0.5, 0.3, 0.0, 0.0], device=CUDA), "true")]:
        names = kernel_names(lambda coef=coef: branch_out(x, dict(history, coef=coef), 0.0))
        assert len(names) == 1 and f"BF16, true, false, {history_variant}>" in names[0], (coef, names)


# --- argument checks of a direct call -------------------------------------------------------------------

@NEEDS_REAL_GPU
def test_kernels_check_what_they_read():
    x = torch.randn(2, 3, 8, device=CUDA)
    out = torch.empty_like(x)
    gate = x[:, 0]
    none3 = (None, None, None)  # prev, prev2, prev3
    with pytest.raises(RuntimeError, match="cache has shape"):
        OPS.cached_branch_out(x, gate, torch.randn(2, 2, 8, device=CUDA), *none3, None, None, [0.0] * 5, None, 0.0,
                              None, out)
    with pytest.raises(RuntimeError, match="delta has shape"):
        OPS.cached_branch_out(x, gate, x, *none3, torch.randn(3, 3, 8, device=CUDA), None, [1.0, 0, 0, 0, 0], None,
                              0.0, None, out)
    with pytest.raises(RuntimeError, match="gate must have dtype"):
        OPS.cached_branch_out(x, gate.double(), x, *none3, None, None, [0.0] * 5, None, 0.0, None, out)
    with pytest.raises(RuntimeError, match="cache must be on cuda"):
        OPS.cached_branch_out(x, gate, x.cpu(), *none3, None, None, [0.0] * 5, None, 0.0, None, out)
    with pytest.raises(RuntimeError, match="prev2 is given without prev"):
        OPS.cached_branch_out(x, gate, x, None, x, None, None, None, [0.0] * 5, None, 0.0, None, out)
    with pytest.raises(RuntimeError, match="prev3 must be on cuda"):
        OPS.cached_branch_out(x, gate, x, x, x, x.cpu(), None, None, [0.0] * 5, None, 0.0, None, out)
    with pytest.raises(RuntimeError, match="coef_values must hold 10"):
        OPS.cached_block_out(x, gate, gate, x, x, *(None,) * 10, [0.0] * 6, None, None, 0.0, None, out)
    with pytest.raises(RuntimeError, match="coef_tensor must be a float32 tensor of 3"):
        OPS.cached_branch_out(x, gate, x, *none3, None, None, [0.0] * 5, torch.zeros(3), 0.0, None, out)
    with pytest.raises(RuntimeError, match=r"coef_tensor must have shape \[P\] with P in \{3, 4, 5\}"):
        OPS.cached_branch_out(x, gate, x, *none3, None, None, [0.0] * 5, torch.zeros(6, device=CUDA), 0.0, None, out)
    with pytest.raises(RuntimeError, match="out must have the shape of x"):
        OPS.cached_branch_out(x, gate, x, *none3, None, None, [0.0] * 5, None, 0.0, None, out[:1])
    with pytest.raises(RuntimeError, match="threshold_tensor must be a float32 tensor of 1"):
        OPS.cached_branch_out(x, gate, x, *none3, None, None, [0.0] * 5, None, 0.0, torch.zeros(2, device=CUDA), out)
    cache = torch.randn(2, 1, 2, 2, 3, 8, device=CUDA)
    with pytest.raises(RuntimeError, match="generation must be an int32 or int64 tensor of shape"):
        OPS.cached_segment_out(x, torch.randn(2, 1, 2, 8, device=CUDA), cache,
                               torch.zeros(1, 2, device=CUDA), None, None, None, 0.0, None, out)
    for bad in (torch.zeros(2, 2, 3, device=CUDA), torch.zeros(1, 2, 6, device=CUDA)):
        with pytest.raises(RuntimeError, match="coef must have shape"):
            OPS.cached_segment_out(x, torch.randn(2, 1, 2, 8, device=CUDA), cache,
                                   torch.zeros(1, 2, dtype=torch.int32, device=CUDA), None, None, bad, 0.0, None, out)
    with pytest.raises(RuntimeError, match=r"with G in \{1, 2, 3, 4\}"):
        OPS.cached_segment_out(x, torch.randn(2, 1, 2, 8, device=CUDA), torch.randn(5, 1, 2, 2, 3, 8, device=CUDA),
                               torch.zeros(1, 2, dtype=torch.int32, device=CUDA), None, None, None, 0.0, None, out)
    wide = torch.randn(1, 1, 8200, device=CUDA)
    with pytest.raises(RuntimeError, match="supports C <= 8192"):
        OPS.cached_branch_out(wide, wide[:, 0], wide, *none3, None, None, [0.0] * 5, None, 0.0, None,
                              torch.empty_like(wide))
    strided = torch.randn(1, 1, 2 * 5000, device=CUDA)[..., ::2]
    with pytest.raises(RuntimeError, match="only with 128-bit loads"):
        OPS.cached_branch_out(strided, strided[:, 0], strided, *none3, None, None, [0.0] * 5, None, 0.0, None,
                              torch.empty(1, 1, 5000, device=CUDA))
    # beta_2 / beta_3 run in the HISTORY variants, whose blocks hold at most 768 threads: C <= 6144.
    history_row = torch.randn(1, 1, 6400, device=CUDA)
    with pytest.raises(RuntimeError, match="applies beta_2 / beta_3 .* to rows of C <= 6144"):
        OPS.cached_branch_out(history_row, history_row[:, 0], history_row, history_row, history_row, None, None,
                              None, [0.0, 0.5, 0.0, 0.5, 0.0], None, 0.0, None, torch.empty_like(history_row))


# --- CUDA graphs ----------------------------------------------------------------------------------------

@NEEDS_REAL_GPU
def test_cuda_graph_replays_follow_tensor_values(tolerance):
    """The three ops captured in one CUDA graph (no host sync, no allocation in the ops); coefficient,
    threshold and generation tensors change between replays and the replayed outputs follow them."""
    shape, dtype = (2, 256, 1152), torch.bfloat16
    x, attn, mlp = branch_pair(72, shape, dtype, ("delta", "prev", "trend"), "tensor", heads=2)
    x, attn, mlp = to_cuda(x), to_cuda(attn), to_cuda(mlp)
    gen = torch.Generator().manual_seed(73)
    seg = to_cuda({key: item for key, item in random_segment(gen, *shape, dtype, blocks=3).items()
                   if key != "entries"})
    threshold = torch.tensor([0.0], device=CUDA)
    outs = [torch.empty_like(x) for _ in range(3)]

    def step():
        branch_out(x, attn, threshold, outs[0])
        block_out(x, attn, mlp, threshold, outs[1])
        segment_out(x, seg, threshold, outs[2])

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    coefs = (attn["coef"], mlp["coef"], seg["coef"])
    originals = [coef.clone() for coef in coefs]
    for scale, value in [(1.0, 1e9), (0.0, 0.0), (-0.5, -1.0), (2.0, 0.0)]:
        # Thresholds far from every score (or <= 0): no token's decision hangs on rounding.
        for coef, original in zip(coefs, originals):
            coef.copy_(original * scale)
        seg["generation"].copy_(1 - seg["generation"])
        threshold.fill_(value)
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        tol = tolerance(dtype)
        assert_close(outs[0], branch_reference(x, attn, threshold), tol)
        assert_close(outs[1], block_reference(x, attn, mlp, threshold), tol)
        assert_close(outs[2], segment_reference(x, seg, threshold), tol)


# --- int64 offsets ---------------------------------------------------------------------------------------

@NEEDS_REAL_GPU
@pytest.mark.slow  # allocates and zeroes a 4.3 GB cache buffer
def test_segment_indexes_past_2_31_elements(tolerance):
    """A stacked cache [2, S, 2, B, N, C] of more than 2**31 bf16 elements: the last block's entries in
    generation 1 start past element 2**31. Only the first and last blocks hold data (the others are zeros with
    zero coefficients), so the reference runs on those two blocks alone."""
    batch, tokens, channels, dtype = 2, 256, 1152, torch.bfloat16
    entry = batch * tokens * channels
    blocks = 2**31 // (2 * 2 * entry) + 2
    cache = torch.zeros(2, blocks, 2, batch, tokens, channels, dtype=dtype, device=CUDA)
    last = blocks - 1
    assert (cache[1, last, 0].data_ptr() - cache.data_ptr()) // cache.element_size() > 2**31
    gen = torch.Generator().manual_seed(74)
    small = to_cuda({key: item for key, item in random_segment(gen, batch, tokens, channels, dtype, blocks=2,
                                                               total_blocks=2, offset=0).items() if key != "entries"})
    cache[:, 0] = small["cache"][:, 0]
    cache[:, last] = small["cache"][:, 1]
    gates = torch.zeros(batch, blocks, 2, channels, dtype=dtype, device=CUDA)
    gates[:, 0], gates[:, last] = small["gates"][:, 0], small["gates"][:, 1]
    generation = torch.zeros(blocks, 2, dtype=torch.int32, device=CUDA)
    generation[0], generation[last] = small["generation"][0], small["generation"][1]
    coef = torch.zeros(blocks, 2, 3, device=CUDA)
    coef[0], coef[last] = small["coef"][0], small["coef"][1]
    x = to_cuda(torch.randn(batch, tokens, channels, generator=gen).to(dtype))
    out = segment_out(x, dict(gates=gates, cache=cache, generation=generation, delta=None, trend=None, coef=coef),
                      0.0)
    expected = reference.cached_segment(x, small["gates"], small["cache"], small["generation"], coef=small["coef"])
    del cache
    assert_close(out, expected, {key: 2 * value for key, value in tolerance(dtype).items()})
