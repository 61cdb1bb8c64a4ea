"""The "triton" backend (Triton kernels behind eoc:: custom ops) against naive fp64 and the reference.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA; with
CUDA this file skips and test_triton_gpu.py runs the compiled kernels), where the launcher picks
large tiles (several token rows per program) to keep the interpreter fast; the ``blocking``
cases rerun kernels with the GPU block sizes and with one row per program, so the masking of both
layouts is exercised, and ``narrow_chunks`` walks rows in several chunks, the last one partial.
Outputs are poisoned with NaN before every kernel call (``poisoned_outputs``) so that an element
the kernel fails to write fails the comparison. Kept small for the interpreter:
the whole file runs in well under a minute on two cores.
"""

import pytest
import torch

import eoc_kernels
from eoc_kernels import cached_block, cached_branch, cached_segment, reference

from .naive import (
    ALL_TERMS,
    DTYPES,
    assert_matches_naive,
    check_random_case,
    naive_output,
    random_branch,
    random_segment,
    run_op,
    run_segment,
    segment_threshold,
    splitting_threshold,
)
from .op_inputs import requiring_grad, small_op_inputs
from .test_segment import TERM_CASES, check_segment_case
from .triton_setup import NEEDS_INTERPRETER, triton_backend
from .triton_setup import poisoned_outputs as poisoned_output_buffers

pytestmark = NEEDS_INTERPRETER

TRITON = dict(backend="triton")
SHAPES = [(1, 49, 123), (3, 49, 123), (2, 256, 123), (4, 7, 1152)]
HEAD_CASES = [(shape, heads) for shape in SHAPES for heads in sorted({1, 2, shape[0]})
              if shape[0] % heads == 0]
# cached_segment takes tensor coefficients only.
OP_COEF_FORMS = [("branch", "float"), ("branch", "tensor"), ("block", "float"),
                 ("block", "tensor"), ("segment", "tensor")]


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every output buffer the custom ops allocate starts as NaN; yields the list of them."""
    with poisoned_output_buffers() as buffers:
        yield buffers


@pytest.fixture(params=["interpreter-tile", "gpu-tile", "one-row"])
def blocking(request, monkeypatch):
    """The interpreter's large tiles, the GPU's (about 2048 values), or one row per program."""
    tile = {"interpreter-tile": None, "gpu-tile": triton_backend._common.GPU_TILE,
            "one-row": 1}[request.param]
    if tile is not None:
        monkeypatch.setattr(triton_backend._common, "INTERPRETER_TILE", tile)
    return request.param


# --- against the naive fp64 implementation ------------------------------------------------------

@pytest.mark.parametrize("terms", [(), ("delta",), ("prev",), ("trend",), ALL_TERMS],
                         ids=lambda terms: "+".join(terms) or "plain")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_branch_matches_naive(shape, dtype, terms, tolerance, poisoned_outputs):
    check_random_case(20, shape, dtype, tolerance(dtype), dict(terms=terms), **TRITON)
    assert len(poisoned_outputs) == 1  # the kernel ran and wrote every element


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, heads", HEAD_CASES, ids=str)
def test_block_matches_naive(shape, heads, dtype, tolerance, poisoned_outputs):
    # The branches use different head counts and coefficients; the MLP one has no prev.
    check_random_case(21, shape, dtype, tolerance(dtype), dict(heads=heads),
                      dict(heads=shape[0] // heads, coef=(-0.3, 1.0, 0.7),
                           terms=("delta", "trend")), **TRITON)
    assert len(poisoned_outputs) == 1


@pytest.mark.parametrize("terms", TERM_CASES, ids=lambda terms: "+".join(terms) or "no-prior")
@pytest.mark.parametrize("generations", [1, 2], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 49, 123), (3, 7, 123), (4, 7, 1152)], ids=str)
def test_segment_matches_naive(shape, dtype, generations, terms, tolerance, poisoned_outputs):
    # Mixed generations, random coefficients (some zero), strided cache and gate views.
    check_segment_case(22, shape, dtype, tolerance(dtype),
                       dict(generations=generations, terms=terms, blocks=2), **TRITON)
    assert len(poisoned_outputs) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_segment_head_broadcast(heads, dtype, tolerance):
    check_segment_case(23, (4, 7, 123), dtype, tolerance(dtype), dict(heads=heads), **TRITON)


@pytest.mark.parametrize("threshold_form", ["float", "tensor[]", "tensor[1]"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op, coef_form", OP_COEF_FORMS, ids=[f"{op}-{form}-coef"
                                                                for op, form in OP_COEF_FORMS])
def test_token_threshold_selects_tokens(op, coef_form, dtype, threshold_form, tolerance,
                                        blocking):
    gen = torch.Generator().manual_seed(24)
    shape = (3, 7, 123) if blocking == "one-row" else (2, 49, 123)
    x = torch.randn(shape, generator=gen).to(dtype)
    as_threshold = {"float": float, "tensor[]": torch.tensor,
                    "tensor[1]": lambda value: torch.tensor([value])}[threshold_form]
    if op == "segment":  # tensor coefficients only
        segment = random_segment(gen, *shape, dtype, blocks=2, heads=shape[0])
        threshold = segment_threshold(segment)
        out = run_segment(x, segment, token_threshold=as_threshold(threshold), **TRITON)
        assert_matches_naive(out, x, segment["entries"], threshold, tolerance(dtype))
        return
    as_coef = {"float": tuple,
               "tensor": lambda coef: torch.tensor(coef, dtype=torch.float32)}[coef_form]
    branches = [random_branch(gen, *shape, dtype, heads=1, coef=as_coef(coef))
                for coef in [(0.8, 0.6, -0.5), (0.4, 1, 0.9)][: 1 if op == "branch" else 2]]
    threshold = splitting_threshold(branches)
    out = run_op(x, branches, token_threshold=as_threshold(threshold), **TRITON)
    assert_matches_naive(out, x, branches, threshold, tolerance(dtype))


@pytest.mark.parametrize("threshold", [0.0, -1.0, 1e-3], ids=str)
def test_nan_correction_applies_only_when_threshold_nonpositive(threshold, tolerance):
    gen = torch.Generator().manual_seed(25)
    shape = (2, 7, 8)
    x = torch.randn(shape, generator=gen)
    branch = random_branch(gen, *shape, torch.float32)
    branch["prev"][1, 3, 5] = float("nan")  # corr and score of token (1, 3) become NaN
    out = cached_branch(x, branch["gate"], branch["cache"], prev=branch["prev"],
                        delta=branch["delta"], trend=branch["trend"], coef=branch["coef"],
                        token_threshold=threshold, **TRITON)
    assert_matches_naive(out, x, [branch], threshold, tolerance(torch.float32), equal_nan=True)
    assert torch.isnan(out[1, 3]).any() == (threshold <= 0)
    out[1, 3] = 0.0
    assert torch.isfinite(out).all()


# --- blocking: chunked rows and whole rows ------------------------------------------------------

CUDA_DEVICE = torch.device("cuda")  # a device object only: pick_blocks reads its type


@pytest.mark.parametrize("channels, chunked, whole", [
    (256, (8, 256, 8), (8, 256, 8)), (384, (16, 128, 8), (4, 512, 8)), (768, (8, 256, 8), (2, 1024, 8)),
    (1024, (2, 1024, 8), (2, 1024, 8)), (1152, (16, 128, 8), (1, 2048, 8)), (4096, (1, 2048, 8), (1, 4096, 16)),
    (123, (16, 128, 8), (16, 128, 8))])
def test_gpu_blocking_at_dit_widths(channels, chunked, whole):
    """(BLOCK_M, BLOCK_C, num_warps): chunks that divide C where a power of two can (1152 = 9 × 128,
    768 = 3 × 256: every lane holds a column), whole rows padded to a power of two."""
    common = triton_backend._common
    for whole_rows, expected in ((False, chunked), (True, whole)):
        tiling = common.pick_blocks(channels, 512, CUDA_DEVICE, whole_rows)
        assert (tiling.block_m, tiling.block_c, tiling.num_warps) == expected
        assert tiling.whole_rows == whole_rows
        assert tiling.launch_options()["maxnreg"] == min(255, 65536 // (32 * tiling.num_warps))


def test_whole_rows_only_when_the_judgment_needs_them():
    needs = triton_backend._common.needs_whole_rows
    threshold = torch.tensor(0.0)
    assert not needs(True, 0.0, None) and not needs(True, -1.0, None)  # threshold <= 0 keeps every token
    assert needs(True, 0.1, None) and needs(True, 0.0, threshold)  # a tensor's value is unknown at launch
    assert not needs(False, 0.5, threshold)  # no term, no correction to judge


@pytest.fixture
def narrow_chunks(monkeypatch):
    """Chunks of at most 32 columns, one row per program: C = 123 takes four chunks (the last one 27
    wide, masked), C = 1152 36 of them; whole rows keep one chunk per row. Records every launch's
    Blocking."""
    common = triton_backend._common
    monkeypatch.setattr(common, "MIN_CHUNK", 16)
    monkeypatch.setattr(common, "INTERPRETER_TILE", 32)
    tilings = []
    pick_blocks = common.pick_blocks

    def recording(*args, **kwargs):
        tilings.append(pick_blocks(*args, **kwargs))
        return tilings[-1]

    for module in (triton_backend._branch, triton_backend._block, triton_backend._segment):
        monkeypatch.setattr(module, "pick_blocks", recording)
    return tilings


@pytest.mark.parametrize("threshold", ["zero", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 123), (1, 3, 1152)], ids=str)
@pytest.mark.parametrize("op", ["branch", "block", "segment"])
def test_chunked_rows_match_naive(op, shape, dtype, threshold, tolerance, narrow_chunks, poisoned_outputs):
    """Rows walked in several chunks (threshold 0: no judgment) and whole rows (a splitting
    threshold) against the naive fp64 loop; every output element written."""
    gen = torch.Generator().manual_seed(34)
    x = torch.randn(shape, generator=gen).to(dtype)
    if op == "segment":
        segment = random_segment(gen, *shape, dtype, blocks=2, heads=shape[0])
        value = segment_threshold(segment) if threshold == "split" else 0.0
        out = run_segment(x, segment, token_threshold=value, **TRITON)
        assert_matches_naive(out, x, segment["entries"], value, tolerance(dtype))
    else:
        branches = [random_branch(gen, *shape, dtype, coef=coef)
                    for coef in [(0.8, 0.6, -0.5), (0.4, 1.0, 0.9)][: 1 if op == "branch" else 2]]
        value = splitting_threshold(branches) if threshold == "split" else 0.0
        out = run_op(x, branches, token_threshold=value, **TRITON)
        assert_matches_naive(out, x, branches, value, tolerance(dtype))
    assert len(poisoned_outputs) == 1 and torch.isfinite(out).all()
    (tiling,) = narrow_chunks
    assert tiling.whole_rows == (threshold == "split")
    assert tiling.block_c == ({123: 128, 1152: 2048}[shape[2]] if tiling.whole_rows else 32)


# --- against the reference: coefficients, layouts, blocking -------------------------------------

def branch_kwargs(branch, suffix=""):
    return {f"{key}{suffix}": branch[key] for key in ("prev", "delta", "trend", "coef")}


def assert_same_as_reference(op, *args, tol, **kwargs):
    expected = getattr(reference, op)(*args, **kwargs)
    out = getattr(eoc_kernels, op)(*args, **kwargs, **TRITON)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, **tol)
    return out


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op", ["branch", "block"])
def test_zero_coefficients_leave_tensors_unread(op, dtype, backend, blocking):
    """A zero coefficient's tensor is never read: NaN there must not reach the output.

    Float zeros turn the term off at compile time, tensor zeros skip it at run time (Triton); the
    reference (torch backend) masks them out the same way.
    """
    gen = torch.Generator().manual_seed(26)
    shape = (2, 7, 123)
    x = torch.randn(shape, generator=gen).to(dtype)
    branch = random_branch(gen, *shape, dtype, heads=2)
    for coef in [(0.0, 0.0, 0.0), torch.zeros(3), (0.0, 0.5, 0.0), torch.tensor([0.7, 0.0, 0.0])]:
        poisoned = dict(branch, coef=coef)
        is_zero = [float(value) == 0.0 for value in coef]
        for key, zero in zip(("delta", "prev", "trend"), is_zero):
            if zero:
                poisoned[key] = torch.full_like(branch[key], float("nan"))
        if op == "branch":
            out = cached_branch(x, branch["gate"], branch["cache"], **branch_kwargs(poisoned),
                                token_threshold=0.2, backend=backend)
        else:
            out = cached_block(x, branch["gate"], branch["gate"], branch["cache"],
                               branch["cache"], **branch_kwargs(poisoned, "_attn"),
                               **branch_kwargs(poisoned, "_mlp"), token_threshold=0.2,
                               backend=backend)
        assert torch.isfinite(out).all(), coef
        # Same as the reference given the unpoisoned tensors (0 · finite = 0 there).
        clean = dict(branch, coef=coef)
        expected = (reference.cached_branch(x, branch["gate"], branch["cache"],
                                            **branch_kwargs(clean), token_threshold=0.2)
                    if op == "branch" else
                    reference.cached_block(x, branch["gate"], branch["gate"], branch["cache"],
                                           branch["cache"], **branch_kwargs(clean, "_attn"),
                                           **branch_kwargs(clean, "_mlp"), token_threshold=0.2))
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("generations", [1, 2], ids=lambda g: f"G{g}")
def test_segment_zero_coefficients_leave_entries_unread(generations, backend, blocking):
    """Per entry: prior rows and the previous generation are not read where their coefficient is
    0, and nothing but Cc and the gates is read when coef is None. The reference (torch backend)
    too: the DiT integration's never-written cache slots hold whatever memory had."""
    gen = torch.Generator().manual_seed(27)
    shape = (2, 7, 123)
    x = torch.randn(shape, generator=gen)
    segment = random_segment(gen, *shape, torch.float32, blocks=3, generations=generations)
    coef = segment["coef"]
    coef[1] = 0.0  # block 1: plain reuse of both branches
    coef[2, 0, 0] = coef[2, 1, 2] = coef[2, 1, 1] = 0.0
    # The reference on clean tensors: there a zero coefficient times a finite value adds 0.
    expected = reference.cached_segment(x, segment["gates"], segment["cache"],
                                        segment["generation"], delta=segment["delta"],
                                        trend=segment["trend"], coef=coef, token_threshold=0.1)
    for s, k in [(1, 0), (1, 1), (2, 0), (2, 1)]:
        alpha, beta, gamma = coef[s, k].tolist()
        if alpha == 0:
            segment["delta"][s, k] = float("nan")
        if gamma == 0:
            segment["trend"][s, k] = float("nan")
        if beta == 0 and generations == 2:
            segment["cache"][1 - int(segment["generation"][s, k]), s, k] = float("nan")
    out = run_segment(x, segment, token_threshold=0.1, backend=backend)
    torch.testing.assert_close(out, expected)
    # coef=None: plain reuse reads neither the prior nor the previous generation.
    segment["delta"].fill_(float("nan"))
    segment["trend"].fill_(float("nan"))
    if generations == 2:
        for s in range(3):
            for k in range(2):
                segment["cache"][1 - int(segment["generation"][s, k]), s, k] = float("nan")
    out = run_segment(x, segment | {"coef": None}, token_threshold=0.1, backend=backend)
    plain = reference.cached_segment(x, segment["gates"], segment["cache"].nan_to_num(),
                                      segment["generation"])
    torch.testing.assert_close(out, plain)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs(dtype, tolerance):
    """Non-contiguous x, cache, prev, gates and broadcast (stride-0) prior tensors."""
    gen = torch.Generator().manual_seed(28)
    batch, tokens, channels = 2, 7, 123

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    x = randn(tokens, batch, channels).transpose(0, 1)  # [B, N, C], stride_n != C
    cache = randn(batch, tokens, 2 * channels)[..., ::2]  # stride_c == 2
    prev = randn(batch, tokens + 3, channels)[:, 3:]
    gates = randn(batch, 4 * channels)[:, channels:].view(batch, 3, channels)
    delta = randn(1, tokens, channels).expand(2, tokens, channels)  # stride_h == 0
    trend = torch.rand(channels, tokens, generator=gen).to(dtype).t()[None]
    tol = tolerance(dtype)
    out = assert_same_as_reference("cached_branch", x, gates[:, 0], cache, prev=prev,
                                   delta=delta, trend=trend, coef=(0.3, 0.5, -0.4),
                                   token_threshold=0.1, tol=tol)
    assert out.shape == x.shape
    assert_same_as_reference("cached_block", x, gates[:, 1], gates[:, 2], cache, prev,
                             prev_attn=prev, delta_mlp=delta, trend_attn=trend,
                             coef_attn=torch.tensor([0.3, 0.5, -0.4]), coef_mlp=(1.0, 0, 0),
                             token_threshold=torch.tensor(0.1), tol=tol)


def test_integer_coefficients_and_threshold_are_floats(tolerance):
    """Python ints (allowed by the public API) reach the kernel as fp32 scalars."""
    gen = torch.Generator().manual_seed(29)
    shape = (2, 7, 123)
    x = torch.randn(shape, generator=gen)
    branch = random_branch(gen, *shape, torch.float32)
    assert_same_as_reference("cached_branch", x, branch["gate"], branch["cache"],
                             **branch_kwargs(dict(branch, coef=(1, 1, 0))), token_threshold=0,
                             tol=tolerance(torch.float32))


# --- errors before any launch ----------------------------------------------------------------------

@pytest.fixture
def no_launch(monkeypatch):
    """Makes any kernel launch fail the test."""
    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    for module in (triton_backend._branch, triton_backend._block, triton_backend._segment):
        monkeypatch.setattr(module, "_launch", launched)


def test_bad_inputs_raise_before_launch(no_launch):
    x = torch.randn(4, 3, 8)
    gate, cache = torch.randn(4, 8), torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="^cached_branch: delta must have shape"):
        cached_branch(x, gate, cache, delta=torch.zeros(3, 3, 8), **TRITON)  # H=3 ∤ B=4
    with pytest.raises(TypeError, match="^cached_block: coef_mlp must be"):
        cached_block(x, gate, gate, cache, cache, coef_mlp=torch.zeros(3, dtype=torch.float64),
                     **TRITON)
    with pytest.raises(ValueError, match="^cached_segment: trend must have shape"):
        cached_segment(x, torch.randn(4, 2, 2, 8), torch.randn(2, 2, 2, 4, 3, 8),
                       torch.zeros(2, 2, dtype=torch.int32), trend=torch.zeros(2, 2, 3, 3, 8),
                       coef=torch.zeros(2, 2, 3), **TRITON)
    with pytest.raises(TypeError, match="^cached_segment: generation must have dtype"):
        cached_segment(x, torch.randn(4, 2, 2, 8), torch.randn(1, 2, 2, 4, 3, 8),
                       torch.zeros(2, 2), **TRITON)


def test_too_wide_rows_raise_before_launch():
    channels = triton_backend.MAX_CHANNELS + 1
    x = torch.randn(1, 1, channels)
    with pytest.raises(ValueError, match=r"supports C <= 16384, got C = 16385; use "
                                         r"backend='torch'"):
        cached_branch(x, torch.randn(1, channels), x, **TRITON)


def test_custom_op_refuses_devices_it_cannot_run_on(monkeypatch):
    monkeypatch.setattr(triton_backend._common, "INTERPRETED", False)
    x = torch.randn(1, 2, 3)
    with pytest.raises(RuntimeError, match="eoc::cached_branch runs a Triton kernel"):
        torch.ops.eoc.cached_branch(x, x[:, 0], x, None, None, None, None, None, [0.0] * 5, None, 0.0, None,
                                    "triton")


def test_segment_kernel_never_reads_past_the_generations():
    """A bad generation value on CUDA triggers a device-side assert (not a host check), and the
    kernel clamps the value into 0..1 so it never reads outside the cache: here the cache is the
    middle two generations of a buffer whose outer ones hold NaN, which -1 and 2 would reach."""
    gen = torch.Generator().manual_seed(33)
    shape = (2, 5, 6)
    x = torch.randn(shape, generator=gen)
    segment = random_segment(gen, *shape, torch.float32, blocks=2)
    cache = segment["cache"]
    buffer = torch.full((4, *cache.shape[1:]), float("nan"))
    buffer[1:3] = cache.nan_to_num()
    bad = torch.tensor([[-1, 2], [5, -7]], dtype=torch.int32)
    clamped = bad.clamp(0, 1)
    for coef in (segment["coef"], None):
        out = torch.ops.eoc.cached_segment(x, segment["gates"], buffer[1:3], bad, None, None,
                                           coef, 0.0, None, "triton")
        expected = reference.cached_segment(x, segment["gates"], buffer[1:3], clamped, coef=coef)
        torch.testing.assert_close(out, expected)


def test_empty_inputs():
    x = torch.randn(2, 0, 5)
    out = cached_segment(x, torch.randn(2, 1, 2, 5), torch.randn(2, 1, 2, 2, 0, 5),
                         torch.zeros(1, 2, dtype=torch.int64), coef=torch.ones(1, 2, 3),
                         **TRITON)
    assert out.shape == x.shape


# --- torch.library: opcheck and torch.compile --------------------------------------------------

@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("op_name", ["cached_branch", "cached_block", "cached_segment"])
def test_opcheck(op_name, grad):
    # All of opcheck's default tests run on CPU under the interpreter: test_schema,
    # test_autograd_registration, test_faketensor and test_aot_dispatch_dynamic (which, with
    # inputs requiring grad, also checks the backward against eager).
    gen = torch.Generator().manual_seed(30)
    op = getattr(torch.ops.eoc, op_name).default
    for args in small_op_inputs(gen, "triton")[op_name]:
        torch.library.opcheck(op, requiring_grad(args) if grad else args)


@pytest.mark.slow  # two inductor compilations, about 5-10 s
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiles_with_fullgraph(tolerance):
    """One small function calling all three ops traces as a single graph (the custom ops are
    opaque there) and matches eager; the eager reference traces the same way."""
    gen = torch.Generator().manual_seed(31)
    shape = (2, 5, 6)
    x = torch.randn(shape, generator=gen)
    branch = random_branch(gen, *shape, torch.float32, heads=2)
    segment = random_segment(gen, *shape, torch.float32, blocks=2)
    threshold = torch.tensor(0.1)

    def step(x, backend):
        x = cached_branch(x, branch["gate"], branch["cache"], prev=branch["prev"],
                          delta=branch["delta"], coef=(0.5, 0.5, 0.0),
                          token_threshold=threshold, backend=backend)
        x = cached_block(x, branch["gate"], branch["gate"], branch["cache"], branch["cache"],
                         trend_mlp=branch["trend"], coef_mlp=torch.tensor([0.0, 0.0, 0.5]),
                         token_threshold=0.1, backend=backend)
        return cached_segment(x, segment["gates"], segment["cache"], segment["generation"],
                              delta=segment["delta"], trend=segment["trend"],
                              coef=segment["coef"], token_threshold=threshold, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    expected = step(x, "torch")
    tol = tolerance(torch.float32)
    torch.testing.assert_close(compiled(x, "triton"), expected, **tol)
    torch.testing.assert_close(compiled(x, "torch"), expected, **tol)
    torch._dynamo.reset()


def test_eager_and_naive_agree_on_a_segment_of_blocks(tolerance):
    """The backend's cached_segment equals the sum of its cached_block increments."""
    gen = torch.Generator().manual_seed(32)
    shape = (2, 7, 123)
    x = torch.randn(shape, generator=gen)
    segment = random_segment(gen, *shape, torch.float32, blocks=2, heads=2)
    threshold = segment_threshold(segment)
    out = run_segment(x, segment, token_threshold=threshold, **TRITON)
    expected = x
    entries = segment["entries"]
    for attn, mlp in zip(entries[0::2], entries[1::2]):
        expected = cached_block(expected, attn["gate"], mlp["gate"], attn["cache"], mlp["cache"],
                                **branch_kwargs(attn, "_attn"), **branch_kwargs(mlp, "_mlp"),
                                token_threshold=threshold, **TRITON)
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))
    torch.testing.assert_close(out.double(), naive_output(x, entries, threshold),
                               **tolerance(torch.float32))
