"""The "cpp" backend (C++ CPU kernels of eoc_kernels._C) against naive fp64 and the eager reference.

Every kernel variant this CPU supports (AVX-512, AVX2, SSE2 "base") runs the core cases (fixture
``isa``); outputs are poisoned with NaN before every kernel call (``poisoned_outputs``) so that an
element the kernel fails to write fails the comparison. Shapes are odd on purpose: C = 1, 37, 123,
1152 (C % 16 tails, one channel), N = 1 and 49, B = 1 and 3; H in {1, 2, B}. Without eoc_kernels._C
everything here skips except ``test_extension_is_built``, which fails unless no C++ compiler exists
or EOC_ALLOW_NO_EXT=1 (cpp_setup.py): CI builds the extension, so its absence there is a failure.
"""

import pytest
import torch

import eoc_kernels
from eoc_kernels import _library, cached_block, cached_branch, cached_segment, cpp, dispatch, reference

from .cpp_setup import AVAILABLE, NEEDS_CPP, missing_extension_is_allowed
from .cpp_setup import poisoned_outputs as poisoned_output_buffers
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
    splitting_threshold_of,
)
from .op_inputs import history_op_inputs, requiring_grad, small_op_inputs
from .test_segment import TERM_CASES, check_segment_case

CPP = dict(backend="cpp")
SHAPES = [(1, 1, 1), (3, 49, 1), (1, 49, 37), (3, 1, 123), (3, 49, 123), (1, 49, 1152), (3, 1, 1152)]
HEAD_CASES = [((4, 7, 123), 1), ((4, 7, 123), 2), ((4, 7, 123), 4), ((2, 49, 37), 2), ((3, 5, 1152), 3)]
OP_COEF_FORMS = [("branch", "float"), ("branch", "tensor"), ("block", "float"), ("block", "tensor"),
                 ("segment", "tensor")]


def test_extension_is_built():
    """CI builds eoc_kernels._C (.ci/run): a missing extension fails here instead of skipping silently."""
    if AVAILABLE:
        assert "cpp" in eoc_kernels.available_backends("cpu")
        return
    allowed = missing_extension_is_allowed()
    if allowed:
        pytest.skip(f"eoc_kernels._C is not built ({allowed})")
    pytest.fail(f"{cpp.UNAVAILABLE_REASON}; set EOC_ALLOW_NO_EXT=1 to run the suite without it")


@pytest.fixture
def poisoned_outputs():
    with poisoned_output_buffers() as buffers:
        yield buffers


@pytest.fixture(params=["avx512", "avx2", "base"])
def isa(request):
    """Runs a test once per kernel variant this CPU supports, then restores the default one."""
    if not AVAILABLE:
        pytest.skip("needs eoc_kernels._C")
    if request.param not in cpp.supported_isas():
        pytest.skip(f"this CPU does not support {request.param}")
    default = cpp.isa()
    cpp.set_isa(request.param)
    yield request.param
    cpp.set_isa(default)


# --- dispatch and availability ---------------------------------------------------------------------

@NEEDS_CPP
def test_auto_picks_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("EOC_BACKEND", raising=False)
    assert eoc_kernels.cpp_available()
    assert eoc_kernels.available_backends("cpu")[-2:] == ["cpp", "torch"]
    for op in ("cached_branch", "cached_block", "cached_segment"):
        assert eoc_kernels.resolve_backend(None, "cpu", op) == "cpp"
        assert dispatch.get_impl(op, "auto", "cpu") is getattr(cpp, op)
    assert "cpp" not in eoc_kernels.available_backends("meta")
    monkeypatch.setenv("EOC_BACKEND", "cpp")
    assert eoc_kernels.resolve_backend(None, "cpu") == "cpp"


def test_missing_extension_fails_loudly_when_named(monkeypatch):
    monkeypatch.delenv("EOC_BACKEND", raising=False)
    monkeypatch.setattr(cpp, "AVAILABLE", False)
    monkeypatch.setattr(cpp, "UNAVAILABLE_REASON", "eoc_kernels._C is not importable (test)")
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"backend 'cpp' \(from backend\) is not available for device cpu; "
                                         r"available: .*torch.*: eoc_kernels._C is not importable \(test\)"):
        cached_branch(x, x[:, 0], x, backend="cpp")
    assert "cpp" not in eoc_kernels.available_backends("cpu")
    assert eoc_kernels.resolve_backend(None, "cpu") != "cpp"  # auto falls back quietly
    with pytest.raises(RuntimeError, match="not importable"):
        cpp.isa()


@NEEDS_CPP
def test_cpp_is_not_available_off_the_cpu():
    assert not cpp.is_available(torch.device("meta"))
    assert "CPU tensors only" in cpp.unavailable_reason(torch.device("meta"))
    with pytest.raises(ValueError, match="backend 'cpp' .*not available for device meta.*CPU tensors only"):
        eoc_kernels.resolve_backend("cpp", "meta")


@NEEDS_CPP
def test_isa_selection():
    supported = cpp.supported_isas()
    assert supported[0] == "base" and cpp.isa() in supported
    with pytest.raises(ValueError, match="set_isa: name must be one of"):
        cpp.set_isa("sse9")
    with pytest.raises(TypeError, match="set_isa: name must be a str"):
        cpp.set_isa(2)


# --- against the naive fp64 implementation --------------------------------------------------------

@pytest.mark.parametrize("terms", [(), ("delta",), ("prev",), ("trend",), ALL_TERMS],
                         ids=lambda terms: "+".join(terms) or "plain")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_branch_matches_naive(shape, dtype, terms, isa, tolerance, poisoned_outputs):
    check_random_case(20, shape, dtype, tolerance(dtype), dict(terms=terms), **CPP)
    assert len(poisoned_outputs) == 1  # the kernel ran and wrote every element


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, heads", HEAD_CASES, ids=str)
def test_block_matches_naive(shape, heads, dtype, isa, tolerance, poisoned_outputs):
    # The branches use different head counts and coefficients; the MLP one has no prev.
    check_random_case(21, shape, dtype, tolerance(dtype), dict(heads=heads),
                      dict(heads=shape[0] // heads, coef=(-0.3, 1.0, 0.7), terms=("delta", "trend")), **CPP)
    assert len(poisoned_outputs) == 1


@pytest.mark.parametrize("terms", TERM_CASES, ids=lambda terms: "+".join(terms) or "no-prior")
@pytest.mark.parametrize("generations", [1, 2], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 49, 123), (3, 1, 37), (3, 7, 1152), (2, 5, 1)], ids=str)
def test_segment_matches_naive(shape, dtype, generations, terms, isa, tolerance, poisoned_outputs):
    # Random generations (mixed), random coefficients (some zero), strided cache and gate views.
    check_segment_case(22, shape, dtype, tolerance(dtype), dict(generations=generations, terms=terms, blocks=2),
                       **CPP)
    assert len(poisoned_outputs) == 1


@NEEDS_CPP
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_segment_head_broadcast(heads, dtype, index_dtype, tolerance):
    check_segment_case(23, (4, 7, 123), dtype, tolerance(dtype), dict(heads=heads, index_dtype=index_dtype),
                       threshold="split", **CPP)


@NEEDS_CPP
@pytest.mark.parametrize("threshold_form", ["float", "tensor[]", "tensor[1]"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op, coef_form", OP_COEF_FORMS, ids=[f"{op}-{form}-coef" for op, form in OP_COEF_FORMS])
def test_token_threshold_selects_tokens(op, coef_form, dtype, threshold_form, tolerance, poisoned_outputs):
    gen = torch.Generator().manual_seed(24)
    shape = (2, 49, 123)
    x = torch.randn(shape, generator=gen).to(dtype)
    as_threshold = {"float": float, "tensor[]": torch.tensor,
                    "tensor[1]": lambda value: torch.tensor([value])}[threshold_form]
    if op == "segment":  # tensor coefficients only
        segment = random_segment(gen, *shape, dtype, blocks=2, heads=shape[0])
        threshold = segment_threshold(segment)
        out = run_segment(x, segment, token_threshold=as_threshold(threshold), **CPP)
        assert_matches_naive(out, x, segment["entries"], threshold, tolerance(dtype))
        assert len(poisoned_outputs) == 1
        return
    as_coef = {"float": tuple, "tensor": lambda coef: torch.tensor(coef, dtype=torch.float32)}[coef_form]
    branches = [random_branch(gen, *shape, dtype, heads=1, coef=as_coef(coef))
                for coef in [(0.8, 0.6, -0.5), (0.4, 1, 0.9)][: 1 if op == "branch" else 2]]
    threshold = splitting_threshold(branches)
    out = run_op(x, branches, token_threshold=as_threshold(threshold), **CPP)
    assert_matches_naive(out, x, branches, threshold, tolerance(dtype))
    assert len(poisoned_outputs) == 1


@NEEDS_CPP
@pytest.mark.parametrize("threshold", [0.0, -1.0, 1e-3], ids=str)
def test_nan_correction_applies_only_when_threshold_nonpositive(threshold, tolerance):
    gen = torch.Generator().manual_seed(25)
    shape = (2, 7, 8)
    x = torch.randn(shape, generator=gen)
    branch = random_branch(gen, *shape, torch.float32)
    branch["prev"][1, 3, 5] = float("nan")  # corr and score of token (1, 3) become NaN
    out = cached_branch(x, branch["gate"], branch["cache"], prev=branch["prev"], delta=branch["delta"],
                        trend=branch["trend"], coef=branch["coef"], token_threshold=threshold, **CPP)
    assert_matches_naive(out, x, [branch], threshold, tolerance(torch.float32), equal_nan=True)
    assert torch.isnan(out[1, 3]).any() == (threshold <= 0)
    out[1, 3] = 0.0
    assert torch.isfinite(out).all()


# --- against the reference: coefficients, layouts ------------------------------------------------

def branch_kwargs(branch, suffix=""):
    return {f"{key}{suffix}": branch[key] for key in ("prev", "delta", "trend", "coef")}


def assert_same_as_reference(op, *args, tol, **kwargs):
    expected = getattr(reference, op)(*args, **kwargs)
    with poisoned_output_buffers() as buffers:
        out = getattr(eoc_kernels, op)(*args, **kwargs, **CPP)
    assert len(buffers) == 1
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, **tol)
    return out


@NEEDS_CPP
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op", ["branch", "block"])
def test_zero_coefficients_leave_tensors_unread(op, dtype):
    """A zero coefficient's tensor is never read: NaN there must not reach the output (float zeros and
    tensor zeros alike)."""
    gen = torch.Generator().manual_seed(26)
    shape = (2, 7, 123)
    x = torch.randn(shape, generator=gen).to(dtype)
    branch = random_branch(gen, *shape, dtype, heads=2)
    for coef in [(0.0, 0.0, 0.0), torch.zeros(3), (0.0, 0.5, 0.0), torch.tensor([0.7, 0.0, 0.0]),
                 torch.tensor([0.0, 0.0, -0.4])]:
        poisoned = dict(branch, coef=coef)
        for key, value in zip(("delta", "prev", "trend"), coef):
            if float(value) == 0.0:
                poisoned[key] = torch.full_like(branch[key], float("nan"))
        clean = dict(branch, coef=coef)
        for threshold in (0.0, 0.2):
            if op == "branch":
                args = (x, branch["gate"], branch["cache"])
                out = cached_branch(*args, **branch_kwargs(poisoned), token_threshold=threshold, **CPP)
                expected = reference.cached_branch(*args, **branch_kwargs(clean), token_threshold=threshold)
            else:
                args = (x, branch["gate"], branch["gate"], branch["cache"], branch["cache"])
                out = cached_block(*args, **branch_kwargs(poisoned, "_attn"), **branch_kwargs(poisoned, "_mlp"),
                                   token_threshold=threshold, **CPP)
                expected = reference.cached_block(*args, **branch_kwargs(clean, "_attn"),
                                                  **branch_kwargs(clean, "_mlp"), token_threshold=threshold)
            assert torch.isfinite(out).all(), coef
            torch.testing.assert_close(out, expected)


@NEEDS_CPP
@pytest.mark.parametrize("generations", [1, 2], ids=lambda g: f"G{g}")
def test_segment_zero_coefficients_leave_entries_unread(generations):
    """Per entry: prior rows and the previous generation are not read where their coefficient is 0, and
    nothing but Cc and the gates is read when coef is None."""
    gen = torch.Generator().manual_seed(27)
    shape = (2, 7, 123)
    x = torch.randn(shape, generator=gen)
    segment = random_segment(gen, *shape, torch.float32, blocks=3, generations=generations)
    coef = segment["coef"]
    coef[1] = 0.0  # block 1: plain reuse of both branches
    coef[2, 0, 0] = coef[2, 1, 2] = coef[2, 1, 1] = 0.0
    expected = reference.cached_segment(x, segment["gates"], segment["cache"], segment["generation"],
                                        delta=segment["delta"], trend=segment["trend"], coef=coef,
                                        token_threshold=0.1)
    for s, k in [(1, 0), (1, 1), (2, 0), (2, 1)]:
        alpha, beta, gamma = coef[s, k].tolist()
        if alpha == 0:
            segment["delta"][s, k] = float("nan")
        if gamma == 0:
            segment["trend"][s, k] = float("nan")
        if beta == 0 and generations == 2:
            segment["cache"][1 - int(segment["generation"][s, k]), s, k] = float("nan")
    out = run_segment(x, segment, token_threshold=0.1, **CPP)
    torch.testing.assert_close(out, expected)
    # coef=None: plain reuse reads neither the prior nor the previous generation.
    segment["delta"].fill_(float("nan"))
    segment["trend"].fill_(float("nan"))
    if generations == 2:
        for s in range(3):
            for k in range(2):
                segment["cache"][1 - int(segment["generation"][s, k]), s, k] = float("nan")
    for threshold in (0.0, 0.1):
        out = run_segment(x, segment | {"coef": None}, token_threshold=threshold, **CPP)
        plain = reference.cached_segment(x, segment["gates"], segment["cache"].nan_to_num(), segment["generation"])
        torch.testing.assert_close(out, plain)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs(dtype, isa, tolerance):
    """Transposed x (so a transposed output), a cache read every other channel, a sliced prev, gates from
    a wider matrix, broadcast (stride-0) delta, a trend transposed over (N, C), strided coefficients."""
    gen = torch.Generator().manual_seed(28)
    batch, tokens, channels = 2, 7, 123

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    x = randn(tokens, batch, channels).transpose(0, 1)  # [B, N, C], stride_n != C
    cache = randn(batch, tokens, 2 * channels)[..., ::2]  # stride_c == 2
    prev = randn(batch, tokens + 3, channels)[:, 3:]
    gates = randn(batch, 4 * channels)[:, channels:].view(batch, 3, channels)
    delta = randn(1, tokens, channels).expand(2, tokens, channels)  # stride_h == 0
    trend = torch.rand(channels, tokens, generator=gen).to(dtype).t()[None]  # stride_c == N
    coef = torch.tensor([0.3, 9.0, 0.5, 9.0, -0.4, 9.0])[::2]  # stride 2
    tol = tolerance(dtype)
    for threshold in (0.0, 0.1):
        out = assert_same_as_reference("cached_branch", x, gates[:, 0], cache, prev=prev, delta=delta, trend=trend,
                                       coef=(0.3, 0.5, -0.4), token_threshold=threshold, tol=tol)
        assert out.stride() == x.stride()  # new_output = empty_like(x) keeps the layout of x
        assert_same_as_reference("cached_block", x, gates[:, 1], gates[:, 2], cache, prev, prev_attn=prev,
                                 delta_mlp=delta, trend_attn=trend, coef_attn=coef, coef_mlp=(1.0, 0, 0),
                                 token_threshold=torch.tensor(threshold), tol=tol)
    # A segment whose cache is a permuted buffer (stride_c != 1), with expanded (stride-0) trend heads.
    segment = random_segment(gen, batch, tokens, channels, dtype, blocks=2, heads=1)
    cache = segment["cache"].permute(0, 1, 2, 3, 5, 4).contiguous().permute(0, 1, 2, 3, 5, 4)
    trend = segment["trend"].expand(2, 2, batch, tokens, channels)
    for threshold in (0.0, segment_threshold(segment)):
        assert_same_as_reference("cached_segment", x, segment["gates"], cache, segment["generation"].t().contiguous()
                                 .t(), delta=segment["delta"], trend=trend, coef=segment["coef"],
                                 token_threshold=threshold, tol=tol)


@NEEDS_CPP
def test_strided_output_buffer():
    """The out-variant kernels write any output layout (the custom ops pass empty_like(x))."""
    gen = torch.Generator().manual_seed(34)
    x = torch.randn(2, 5, 37, generator=gen)
    branch = random_branch(gen, 2, 5, 37, torch.float32, heads=2)
    out = torch.full((2, 5, 74), float("nan"))[..., ::2]
    torch.ops.eoc.cached_branch_out(x, branch["gate"], branch["cache"], branch["prev"], None, None, branch["delta"],
                                    branch["trend"], list(branch["coef"]) + [0.0, 0.0], None, 0.1, None, out)
    torch.testing.assert_close(out, reference.cached_branch(x, branch["gate"], branch["cache"],
                                                            **branch_kwargs(branch), token_threshold=0.1))


@NEEDS_CPP
def test_integer_coefficients_and_threshold_are_floats(tolerance):
    gen = torch.Generator().manual_seed(29)
    shape = (2, 7, 123)
    x = torch.randn(shape, generator=gen)
    branch = random_branch(gen, *shape, torch.float32)
    assert_same_as_reference("cached_branch", x, branch["gate"], branch["cache"],
                             **branch_kwargs(dict(branch, coef=(1, 1, 0))), token_threshold=0,
                             tol=tolerance(torch.float32))


@pytest.mark.parametrize("threshold", ["zero", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["cached_branch", "cached_block", "cached_segment"])
def test_bit_identical_to_the_reference(op, dtype, threshold, isa):
    """Built without FMA contraction (setup.py), the kernels round every product and sum as the eager
    reference does, in its order: the outputs are equal, not just close, unless a token's score sits
    within rounding of the threshold (the norms are summed in another order); the split threshold here
    lies in a clear gap."""
    gen = torch.Generator().manual_seed(38)
    shape = (3, 49, 123)
    x = torch.randn(shape, generator=gen).to(dtype)
    if op == "cached_segment":
        segment = random_segment(gen, *shape, dtype, blocks=2, heads=3, terms=("delta", "trend"))
        value = segment_threshold(segment) if threshold == "split" else 0.0
        args = {key: item for key, item in segment.items() if key != "entries"}
        expected = reference.cached_segment(x, args.pop("gates"), args.pop("cache"), args.pop("generation"), **args,
                                            token_threshold=value)
        out = run_segment(x, segment, token_threshold=value, **CPP)
    else:
        branches = [random_branch(gen, *shape, dtype, heads=heads, coef=coef)
                    for heads, coef in [(1, (0.8, 0.6, -0.5)), (3, torch.tensor([0.4, 0.0, 0.9]))]]
        branches = branches[:1] if op == "cached_branch" else branches
        value = splitting_threshold(branches) if threshold == "split" else 0.0
        expected = run_op(x, branches, token_threshold=value, backend="torch")
        out = run_op(x, branches, token_threshold=value, **CPP)
    assert torch.equal(out, expected)


@NEEDS_CPP
@pytest.mark.parametrize("coef", [None, (0.0, 0.7, 0.0), (0.5, -0.3, 0.2), "random"],
                         ids=["plain", "extrapolate", "all", "mixed"])
@pytest.mark.parametrize("blocks", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_entries_are_bit_identical(dtype, blocks, coef):
    """Consecutive plain-reuse entries run as one pass of up to four (csrc/cpu_kernels.h, add_plain_group):
    2, 4, 6 and 10 entries give passes of 2, 4, 4 + 2 and 4 + 4 + 2 (mixed coefficients break the runs;
    corrected entries run one per pass), bit-identical to the reference, with and without a threshold."""
    gen = torch.Generator().manual_seed(39 + blocks)
    shape = (2, 9, 37)
    x = torch.randn(shape, generator=gen).to(dtype)
    segment = random_segment(gen, *shape, dtype, blocks=blocks, heads=2, coef=coef)
    args = {key: item for key, item in segment.items() if key != "entries"}
    expected = reference.cached_segment(x, args.pop("gates"), args.pop("cache"), args.pop("generation"), **args)
    with poisoned_output_buffers():
        out = run_segment(x, segment, **CPP)
    assert torch.equal(out, expected)
    # A tiny threshold (no token's score is near it): corrected entries are judged, plain ones still grouped.
    tiny = 1e-30
    expected = run_segment(x, segment, token_threshold=tiny, backend="torch")
    assert torch.equal(run_segment(x, segment, token_threshold=tiny, **CPP), expected)


@NEEDS_CPP
def test_every_kernel_variant_agrees():
    """AVX-512, AVX2 and SSE2 give equal results (no FMA contraction, the same 16 norm lanes)."""
    gen = torch.Generator().manual_seed(35)
    shape = (3, 49, 123)
    x = torch.randn(shape, generator=gen)
    segment = random_segment(gen, *shape, torch.float32, blocks=2, heads=3)
    threshold = segment_threshold(segment)
    default = cpp.isa()
    outputs = {}
    try:
        for name in cpp.supported_isas():
            cpp.set_isa(name)
            outputs[name] = run_segment(x, segment, token_threshold=threshold, **CPP)
    finally:
        cpp.set_isa(default)
    for out in outputs.values():
        assert torch.equal(out, outputs["base"])


@NEEDS_CPP
def test_threads_split_rows_without_changing_results():
    """Rows are independent: the result is bit-identical for any number of intra-op threads."""
    gen = torch.Generator().manual_seed(36)
    shape = (4, 256, 384)
    x = torch.randn(shape, generator=gen)
    segment = random_segment(gen, *shape, torch.float32, blocks=2, heads=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_segment(x, segment, token_threshold=0.05, **CPP)
        torch.set_num_threads(2)
        assert torch.equal(run_segment(x, segment, token_threshold=0.05, **CPP), single)
    finally:
        torch.set_num_threads(threads)


@NEEDS_CPP
def test_empty_inputs():
    for shape in [(2, 0, 5), (0, 3, 5), (2, 3, 0)]:
        x = torch.randn(shape)
        batch, tokens, channels = shape
        out = cached_segment(x, torch.randn(batch, 1, 2, channels), torch.randn(2, 1, 2, *shape),
                             torch.zeros(1, 2, dtype=torch.int64), coef=torch.ones(1, 2, 3), **CPP)
        assert out.shape == x.shape
        out = cached_branch(x, torch.randn(batch, channels), torch.randn(shape), token_threshold=0.5, **CPP)
        assert out.shape == x.shape
    x = torch.randn(2, 3, 5)  # S = 0: out = x
    out = cached_segment(x, torch.randn(2, 0, 2, 5), torch.randn(1, 0, 2, 2, 3, 5),
                         torch.zeros(0, 2, dtype=torch.int32), **CPP)
    assert torch.equal(out, x)


# --- K history: prev2 / prev3, coef of length 4 and 5, the cache ring ----------------------------

HISTORY = ("prev", "prev2", "prev3")  # C_1, C_2, C_3
COEF_5 = (0.8, 0.6, -0.5, -0.45, 0.3)  # (alpha, beta1, gamma, beta2, beta3)


def history_coef(values, form):
    return tuple(values) if form == "float" else torch.tensor(values, dtype=torch.float32)


def random_history_branch(gen, batch, tokens, channels, dtype, *, coef, heads=1, depth=3):
    """One reused branch with the history C_1..C_depth (prev, prev2, prev3; the others None) of a feature
    drifting step by step, delta and trend [heads, N, C]; per-token scales spread the judgment scores."""
    def randn(rows):
        return torch.randn(rows, tokens, channels, generator=gen)

    def token_scale(rows):
        return 0.1 + 2 * torch.rand(rows, tokens, 1, generator=gen)

    cache = randn(batch)
    branch = dict(gate=torch.randn(batch, channels, generator=gen), cache=cache,
                  delta=0.3 * token_scale(heads) * randn(heads),
                  trend=(2 * torch.rand(heads, tokens, channels, generator=gen) - 1) * token_scale(heads).clamp(max=1))
    older = cache
    for j, name in enumerate(HISTORY):
        older = older - 0.3 * token_scale(batch) * randn(batch)
        branch[name] = older if j < depth else None
    branch = {key: None if value is None else value.to(dtype) for key, value in branch.items()}
    return branch | {"coef": coef}


def history_kwargs(branch, suffix=""):
    return {f"{key}{suffix}": branch[key] for key in (*HISTORY, "delta", "trend", "coef")}


def naive_history_corrections(branch):
    """(C_0, corr) in fp64: corr = α·D + β1·(C_0 − C_1) + γ·(C_0 ⊙ E) + β2·(C_1 − C_2) + β3·(C_2 − C_3), each term
    where its tensors are given (β_i: C_{i-1} and C_i)."""
    values = [float(c) for c in branch["coef"]]
    alpha, beta1, gamma, beta2, beta3 = values + [0.0] * (5 - len(values))
    c0 = branch["cache"].double()
    batch = c0.shape[0]

    def per_row(t):
        return t.double().repeat_interleave(batch // t.shape[0], dim=0)

    history = [c0] + [None if branch[name] is None else branch[name].double() for name in HISTORY]
    corr = torch.zeros_like(c0)
    if branch["delta"] is not None and alpha != 0:
        corr += alpha * per_row(branch["delta"])
    if history[1] is not None and beta1 != 0:
        corr += beta1 * (c0 - history[1])
    if branch["trend"] is not None and gamma != 0:
        corr += gamma * c0 * per_row(branch["trend"])
    for i, beta in ((2, beta2), (3, beta3)):
        if history[i - 1] is not None and history[i] is not None and beta != 0:
            corr += beta * (history[i - 1] - history[i])
    return c0, corr


def naive_history_output(x, branches, threshold):
    """x + Σ gate ⊙ F̂ in fp64, with the per-token judgment."""
    out = x.double()
    for branch in branches:
        c0, corr = naive_history_corrections(branch)
        score = corr.norm(dim=-1) / (c0.norm(dim=-1) + 1e-6)
        keep = (score > threshold) | (threshold <= 0)
        out = out + branch["gate"].double()[:, None, :] * (c0 + torch.where(keep[..., None], corr, 0.0))
    return out


def history_threshold(branches):
    """A threshold in a clear gap of the branches' fp64 judgment scores."""
    scores = []
    for branch in branches:
        c0, corr = naive_history_corrections(branch)
        scores.append((corr.norm(dim=-1) / (c0.norm(dim=-1) + 1e-6)).flatten())
    return splitting_threshold_of(torch.cat(scores).sort().values)


HISTORY_SHAPES = [(1, 1, 1), (3, 49, 123), (2, 7, 1152), (3, 1, 37)]


@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("coefs", [3, 4, 5], ids=lambda p: f"P{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HISTORY_SHAPES, ids=str)
def test_history_branch_and_block_match_reference(shape, dtype, coefs, coef_form, isa, tolerance):
    """Every K (P = 3, 4, 5) with C_1..C_3 given: bit-identical to the reference (fp32 accumulation in the
    order α, β1, γ, β2, β3) without judgment and with a threshold in a clear gap of the scores, and close
    to naive fp64. cached_block's MLP branch has its own length (8 − P) and head count."""
    gen = torch.Generator().manual_seed(80 + coefs)
    x = torch.randn(shape, generator=gen).to(dtype)
    attn = random_history_branch(gen, *shape, dtype, coef=history_coef(COEF_5[:coefs], coef_form))
    mlp = random_history_branch(gen, *shape, dtype, heads=shape[0],
                                coef=history_coef((0.4, -0.7, 0.9, 1.1, -0.6)[: 8 - coefs], coef_form))
    splits = shape[0] * shape[1] > 4
    for branches in ([attn], [attn, mlp]):
        for threshold in (0.0, history_threshold(branches) if splits else 0.5):
            if len(branches) == 1:
                args = (x, attn["gate"], attn["cache"])
                kwargs = history_kwargs(attn)
                op = "cached_branch"
            else:
                args = (x, attn["gate"], mlp["gate"], attn["cache"], mlp["cache"])
                kwargs = history_kwargs(attn, "_attn") | history_kwargs(mlp, "_mlp")
                op = "cached_block"
            expected = getattr(reference, op)(*args, **kwargs, token_threshold=threshold)
            with poisoned_output_buffers() as buffers:
                out = getattr(eoc_kernels, op)(*args, **kwargs, token_threshold=threshold, **CPP)
            assert len(buffers) == 1
            assert torch.equal(out, expected), (op, threshold)
            torch.testing.assert_close(out.double(), naive_history_output(x, branches, threshold), **tolerance(dtype))


ZERO_PATTERNS = [tuple(bool(mask >> i & 1) for i in range(5)) for mask in range(32)]  # zero slots of (α, β1, γ, β2, β3)


def unread_operands(coef_values, depth=3):
    """The operands a branch with these 5 coefficient values never reads: delta (α = 0), trend (γ = 0),
    C_j when neither β_j nor β_{j+1} applies."""
    alpha, beta1, gamma, beta2, beta3 = coef_values
    read = {"delta": alpha != 0, "trend": gamma != 0, "prev": beta1 != 0 or beta2 != 0,
            "prev2": beta2 != 0 or beta3 != 0, "prev3": beta3 != 0}
    return [name for name, used in read.items() if not used]


@NEEDS_CPP
@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("op", ["branch", "block"])
def test_history_zero_coefficients_leave_tensors_unread(op, coef_form):
    """For each of the 32 patterns of zero coefficients (β2 = 0 with β3 != 0 among them), the operands no
    applied term needs hold NaN and the result equals the reference on clean operands; a tensor coef of
    length 3 or 4 leaves prev3 (and prev2) unread too."""
    gen = torch.Generator().manual_seed(85)
    shape = (2, 7, 37)
    x = torch.randn(shape, generator=gen)
    branch = random_history_branch(gen, *shape, torch.float32, coef=None, heads=2)
    cases = [tuple(0.0 if zero else value for zero, value in zip(pattern, COEF_5)) for pattern in ZERO_PATTERNS]
    cases += [COEF_5[:4], COEF_5[:3], (0.0, 0.0, 0.0, 0.0), (0.0, 0.5, 0.0)]
    for values in cases:
        padded = tuple(values) + (0.0,) * (5 - len(values))
        coef = history_coef(values, coef_form)
        clean = dict(branch, coef=coef)
        dirty = dict(clean)
        for name in unread_operands(padded):
            dirty[name] = torch.full_like(branch[name], float("nan"))
        for threshold in (0.0, 0.2):
            if op == "branch":
                args = (x, branch["gate"], branch["cache"])
                out = cached_branch(*args, **history_kwargs(dirty), token_threshold=threshold, **CPP)
                expected = reference.cached_branch(*args, **history_kwargs(clean), token_threshold=threshold)
            else:
                args = (x, branch["gate"], branch["gate"], branch["cache"], branch["cache"])
                out = cached_block(*args, **history_kwargs(dirty, "_attn"), **history_kwargs(dirty, "_mlp"),
                                   token_threshold=threshold, **CPP)
                expected = reference.cached_block(*args, **history_kwargs(clean, "_attn"),
                                                  **history_kwargs(clean, "_mlp"), token_threshold=threshold)
            assert torch.isfinite(out).all(), values
            assert torch.equal(out, expected), values


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_history_strided_inputs(dtype, isa, tolerance):
    """History tensors strided over C (read every other channel, transposed over (N, C)) and a sliced prev:
    the gathered path, with β2 and β3 on, against the reference."""
    gen = torch.Generator().manual_seed(86)
    shape = (2, 7, 123)
    branch = random_history_branch(gen, *shape, dtype, coef=COEF_5, heads=1)
    x = torch.randn(shape, generator=gen).to(dtype)
    batch, tokens, channels = shape
    strided = dict(branch)
    strided["prev"] = torch.cat([branch["prev"], branch["cache"]], dim=1)[:, :tokens]  # stride_b != N·C
    strided["prev2"] = torch.stack([branch["prev2"], branch["cache"]], dim=-1)[..., 0]  # stride_c == 2
    strided["prev3"] = branch["prev3"].transpose(1, 2).contiguous().transpose(1, 2)  # stride_c == N
    assert strided["prev2"].stride(-1) == 2 and strided["prev3"].stride(-1) == tokens
    for coef in (COEF_5, torch.tensor([0.8, 0.0, -0.5, 0.0, 0.3]), (0.0, 0.0, 0.0, -0.45, 0.0)):
        for threshold in (0.0, history_threshold([dict(branch, coef=coef)])):
            kwargs = history_kwargs(dict(strided, coef=coef))
            assert_same_as_reference("cached_branch", x, branch["gate"], branch["cache"], **kwargs,
                                     token_threshold=threshold, tol=tolerance(dtype))


def random_ring_segment(gen, batch, tokens, channels, dtype, *, generations, coefs, blocks=3, heads=None,
                        index_dtype=torch.int32):
    """cached_segment inputs over a ring of G generations, plus the entries as history branch dicts.

    Entry e = (s, k) holds C_0 in generation (e + e // G) mod G (every value 0..G-1 occurs, S >= 2) and C_j
    in (generation − j) mod G; the generations it never reads (K = min(G − 1, P − 2) and its zero
    coefficients decide) hold NaN. The cache is the view buffer[:, 1:1 + S] of a wider buffer. Coefficients:
    random, entry 0 with every term, entry 1 with β2 = 0 and β3 != 0, entries 2..4 plain (all zero: a run of
    grouped plain-reuse entries), the rest random with some zeros."""
    heads = (2 if batch % 2 == 0 else 1) if heads is None else heads
    history = min(generations - 1, coefs - 2)
    coef = torch.randn(blocks, 2, coefs, generator=gen)
    coef[torch.rand(blocks, 2, coefs, generator=gen) < 0.25] = 0.0
    flat = coef.view(-1, coefs)
    flat[0] = torch.tensor(COEF_5[:coefs])
    if coefs == 5:
        flat[1] = torch.tensor([0.0, 0.0, 0.4, 0.0, -0.7])
    flat[2:5] = 0.0
    generation = torch.tensor([(e + e // generations) % generations for e in range(2 * blocks)], dtype=index_dtype)
    generation = generation.view(blocks, 2)
    buffer = torch.full((generations, blocks + 2, 2, batch, tokens, channels), float("nan"))
    clean = torch.zeros_like(buffer)
    entries = []
    for s in range(blocks):
        for k in range(2):
            e = 2 * s + k
            entry = random_history_branch(gen, batch, tokens, channels, torch.float32, heads=heads, depth=3,
                                          coef=flat[e])
            values = flat[e].tolist() + [0.0] * (5 - coefs)
            for i, slot in enumerate((1, 3, 4), start=1):  # β_i with i > K is not applied
                values[slot] = values[slot] if i <= history else 0.0
            unread = set(unread_operands(values))
            g = int(generation[s, k])
            chain = [entry["cache"]] + [entry[name] for name in HISTORY]
            for j in range(generations):
                slot = (g - j) % generations
                clean[slot, 1 + s, k] = chain[j]
                if j == 0 or (j <= history and HISTORY[j - 1] not in unread):
                    buffer[slot, 1 + s, k] = chain[j]
            for j, name in enumerate(HISTORY, start=1):
                if j > history:
                    entry[name] = None  # the ring does not hold it, or coef has no β reaching it
            entries.append(entry)
    gate_matrix = torch.randn(batch, (blocks + 2) * 2 * channels + 3, generator=gen).to(dtype)
    gates = gate_matrix[:, 3:].view(batch, blocks + 2, 2, channels)[:, 1:1 + blocks]

    def stacked(name):
        return torch.stack([entry[name] for entry in entries]).view(blocks, 2, heads, tokens, channels).to(dtype)

    segment = dict(gates=gates, cache=buffer.to(dtype)[:, 1:1 + blocks], generation=generation,
                   delta=stacked("delta"), trend=stacked("trend"), coef=coef)
    for e, entry in enumerate(entries):
        entry["gate"] = gates[:, e // 2, e % 2]
        for key in ("cache", *HISTORY, "delta", "trend"):
            if entry[key] is not None:
                entry[key] = entry[key].to(dtype)
    return segment, clean.to(dtype)[:, 1:1 + blocks], entries


@pytest.mark.parametrize("coefs", [3, 4, 5], ids=lambda p: f"P{p}")
@pytest.mark.parametrize("generations", [1, 2, 3, 4], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 37), (1, 5, 1152)], ids=str)
def test_segment_ring_matches_reference(shape, dtype, generations, coefs, isa, tolerance):
    """The ring: C_j of entry (s, k) in generation (generation[s, k] − j) mod G, history term i applied iff
    i <= G − 1, i <= P − 2 and its coefficient is nonzero; every generation value occurs, and every generation
    an entry does not read holds NaN. Bit-identical to the reference on the clean ring, close to naive fp64."""
    gen = torch.Generator().manual_seed(87 + 3 * generations + coefs)
    x = torch.randn(shape, generator=gen).to(dtype)
    segment, clean, entries = random_ring_segment(gen, *shape, dtype, generations=generations, coefs=coefs)
    assert sorted(set(segment["generation"].flatten().tolist())) == list(range(generations))
    for threshold in (0.0, history_threshold(entries)):
        expected = reference.cached_segment(x, segment["gates"], clean, segment["generation"], delta=segment["delta"],
                                            trend=segment["trend"], coef=segment["coef"], token_threshold=threshold)
        with poisoned_output_buffers() as buffers:
            out = run_segment(x, segment, token_threshold=threshold, **CPP)
        assert len(buffers) == 1 and torch.isfinite(out).all()
        assert torch.equal(out, expected), threshold
        torch.testing.assert_close(out.double(), naive_history_output(x, entries, threshold), **tolerance(dtype))
    # coef None: plain reuse reads C_0 only (every other generation may hold NaN).
    plain = reference.cached_segment(x, segment["gates"], clean, segment["generation"])
    only_current = torch.full_like(segment["cache"], float("nan"))
    for s in range(segment["cache"].shape[1]):
        for k in range(2):
            g = int(segment["generation"][s, k])
            only_current[g, s, k] = clean[g, s, k]
    out = run_segment(x, segment | {"cache": only_current, "coef": None}, **CPP)
    assert torch.equal(out, plain)


@NEEDS_CPP
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_segment_ring_generation_values(index_dtype):
    """Every generation value of every entry, for each G: rolling the generations (C_0 moves to the next slot of
    the ring, the history with it) gives the same result."""
    gen = torch.Generator().manual_seed(88)
    shape = (2, 5, 16)
    x = torch.randn(shape, generator=gen)
    for generations in (2, 3, 4):
        segment, clean, _ = random_ring_segment(gen, *shape, torch.float32, generations=generations, coefs=5,
                                                blocks=2, index_dtype=index_dtype)
        first = run_segment(x, segment | {"cache": clean}, token_threshold=0.1, **CPP)
        for shift in range(1, generations):
            rolled = clean.roll(shift, dims=0)
            generation = (segment["generation"] + shift) % generations
            out = run_segment(x, segment | {"cache": rolled, "generation": generation}, token_threshold=0.1, **CPP)
            assert torch.equal(out, first), (generations, shift)


# --- errors --------------------------------------------------------------------------------------

@NEEDS_CPP
def test_bad_inputs_raise_through_the_public_ops(monkeypatch):
    """The public ops check before dispatching (shared validation): no kernel runs on bad input."""
    def launched(*args, **kwargs):
        raise AssertionError("a kernel ran")

    for op in _library.OP_NAMES:
        monkeypatch.setitem(_library._KERNELS[(op, "cpu")], "cpp", launched)
    x = torch.randn(4, 3, 8)
    gate, cache = torch.randn(4, 8), torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="^cached_branch: delta must have shape"):
        cached_branch(x, gate, cache, delta=torch.zeros(3, 3, 8), **CPP)  # H=3 does not divide B=4
    with pytest.raises(TypeError, match="^cached_branch: cache must have dtype"):
        cached_branch(x, gate, cache.double(), **CPP)
    with pytest.raises(ValueError, match="^cached_branch: coef entries must be finite"):
        cached_branch(x, gate, cache, coef=(float("nan"), 0, 0), **CPP)
    with pytest.raises(TypeError, match="^cached_block: coef_mlp must be"):
        cached_block(x, gate, gate, cache, cache, coef_mlp=torch.zeros(3, dtype=torch.float64), **CPP)
    with pytest.raises(ValueError, match="^cached_segment: trend must have shape"):
        cached_segment(x, torch.randn(4, 2, 2, 8), torch.randn(2, 2, 2, 4, 3, 8),
                       torch.zeros(2, 2, dtype=torch.int32), trend=torch.zeros(2, 2, 3, 3, 8),
                       coef=torch.zeros(2, 2, 3), **CPP)
    with pytest.raises(ValueError, match=r"^cached_segment: generation values must be in 0\.\.1"):
        cached_segment(x, torch.randn(4, 2, 2, 8), torch.randn(2, 2, 2, 4, 3, 8),
                       torch.tensor([[0, 2], [1, 0]]), **CPP)
    with pytest.raises(ValueError, match="^cached_segment: token_threshold must be finite"):
        cached_segment(x, torch.randn(4, 2, 2, 8), torch.randn(1, 2, 2, 4, 3, 8),
                       torch.zeros(2, 2, dtype=torch.int32), token_threshold=torch.tensor(float("inf")), **CPP)


@NEEDS_CPP
def test_kernels_check_what_they_read():
    """A direct torch.ops.eoc call bypasses the public checks: the kernels still refuse inputs that
    would make them read outside a tensor."""
    x = torch.randn(2, 3, 8)
    out = torch.empty_like(x)
    ops = torch.ops.eoc
    none3 = (None, None, None)  # prev, prev2, prev3
    with pytest.raises(RuntimeError, match="cache has shape"):
        ops.cached_branch_out(x, x[:, 0], torch.randn(2, 2, 8), *none3, None, None, [0.0] * 5, None, 0.0, None, out)
    with pytest.raises(RuntimeError, match="delta has shape"):
        ops.cached_branch_out(x, x[:, 0], x, *none3, torch.randn(3, 3, 8), None, [1.0, 0, 0, 0, 0], None, 0.0, None,
                              out)
    with pytest.raises(RuntimeError, match="gate must have dtype"):
        ops.cached_branch_out(x, x[:, 0].double(), x, *none3, None, None, [0.0] * 5, None, 0.0, None, out)
    with pytest.raises(RuntimeError, match="prev2 has shape"):
        ops.cached_branch_out(x, x[:, 0], x, x, torch.randn(2, 3, 7), None, None, None, [0.0] * 5, None, 0.0, None,
                              out)
    with pytest.raises(RuntimeError, match="prev2 is given without prev"):
        ops.cached_branch_out(x, x[:, 0], x, None, x, None, None, None, [0.0] * 5, None, 0.0, None, out)
    with pytest.raises(RuntimeError, match="prev3_mlp is given without prev2_mlp"):
        ops.cached_block_out(x, x[:, 0], x[:, 0], x, x, x, x, None, None, None, x, None, None, None, None,
                             [0.0] * 10, None, None, 0.0, None, out)
    with pytest.raises(RuntimeError, match=r"coef_values must hold 5 numbers \(5 per branch, zero-padded\), got 3"):
        ops.cached_branch_out(x, x[:, 0], x, *none3, None, None, [0.0] * 3, None, 0.0, None, out)
    with pytest.raises(RuntimeError, match="coef_values must hold 10"):
        ops.cached_block_out(x, x[:, 0], x[:, 0], x, x, *(None,) * 10, [0.0] * 6, None, None, 0.0, None, out)
    for bad in (torch.zeros(2), torch.zeros(6), torch.zeros(1, 5)):
        with pytest.raises(RuntimeError, match=r"coef_tensor must have shape \[P\] with P in \{3, 4, 5\}"):
            ops.cached_branch_out(x, x[:, 0], x, *none3, None, None, [0.0] * 5, bad, 0.0, None, out)
    with pytest.raises(RuntimeError, match="out must have the shape of x"):
        ops.cached_branch_out(x, x[:, 0], x, *none3, None, None, [0.0] * 5, None, 0.0, None, out[:1])
    gates = torch.randn(2, 1, 2, 8)
    cache = torch.randn(2, 1, 2, 2, 3, 8)
    for bad in (-1, 2):
        with pytest.raises(RuntimeError, match=r"generation values must be in 0\.\.1"):
            ops.cached_segment_out(x, gates, cache, torch.tensor([[0, bad]]), None, None, None, 0.0, None, out)
    ring = torch.randn(3, 1, 2, 2, 3, 8)
    with pytest.raises(RuntimeError, match=r"generation values must be in 0\.\.2, got 3"):
        ops.cached_segment_out(x, gates, ring, torch.tensor([[0, 3]]), None, None, torch.zeros(1, 2, 5), 0.0, None,
                               out)
    with pytest.raises(RuntimeError, match=r"cache must have shape \[G, S, 2, B, N, C\] with G in \{1, 2, 3, 4\}"):
        ops.cached_segment_out(x, gates, torch.randn(5, 1, 2, 2, 3, 8), torch.zeros(1, 2, dtype=torch.int32), None,
                               None, None, 0.0, None, out)
    for bad in (torch.zeros(1, 2, 2), torch.zeros(1, 2, 6), torch.zeros(2, 2, 3)):
        with pytest.raises(RuntimeError, match=r"coef must have shape \[S, 2, P\] with P in \{3, 4, 5\}"):
            ops.cached_segment_out(x, gates, ring, torch.zeros(1, 2, dtype=torch.int32), None, None, bad, 0.0, None,
                                   out)
    with pytest.raises(RuntimeError, match="threshold_tensor must be a float32 CPU tensor of 1"):
        ops.cached_segment_out(x, gates, cache, torch.zeros(1, 2, dtype=torch.int32), None, None,
                               None, 0.0, torch.zeros(2), out)


# --- torch.library: opcheck, torch.compile, autograd ---------------------------------------------

@NEEDS_CPP
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("op_name", ["cached_branch", "cached_block", "cached_segment"])
def test_opcheck(op_name, grad):
    # test_schema, test_autograd_registration, test_faketensor and test_aot_dispatch_dynamic (which, with
    # inputs requiring grad, also checks the backward against eager).
    gen = torch.Generator().manual_seed(30)
    op = getattr(torch.ops.eoc, op_name).default
    # The three-coefficient cases and the K-history ones (prev2 / prev3, P = 4 and 5, rings of G = 3 and 4).
    for args in small_op_inputs(gen, "cpp")[op_name] + history_op_inputs(gen, "cpp")[op_name]:
        torch.library.opcheck(op, requiring_grad(args) if grad else args)


@NEEDS_CPP
@pytest.mark.slow  # one inductor compilation, a few seconds
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiles_with_fullgraph(tolerance):
    """The three ops trace as one graph (the custom ops are opaque there) and match eager."""
    gen = torch.Generator().manual_seed(31)
    shape = (2, 5, 6)
    x = torch.randn(shape, generator=gen)
    branch = random_branch(gen, *shape, torch.float32, heads=2)
    segment = random_segment(gen, *shape, torch.float32, blocks=2)
    threshold = torch.tensor(0.1)

    def step(x, backend):
        x = cached_branch(x, branch["gate"], branch["cache"], prev=branch["prev"], delta=branch["delta"],
                          coef=(0.5, 0.5, 0.0), token_threshold=threshold, backend=backend)
        x = cached_block(x, branch["gate"], branch["gate"], branch["cache"], branch["cache"],
                         trend_mlp=branch["trend"], coef_mlp=torch.tensor([0.0, 0.0, 0.5]), token_threshold=0.1,
                         backend=backend)
        return cached_segment(x, segment["gates"], segment["cache"], segment["generation"], delta=segment["delta"],
                              trend=segment["trend"], coef=segment["coef"], token_threshold=threshold,
                              backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    expected = step(x, "torch")
    torch.testing.assert_close(compiled(x, "cpp"), expected, **tolerance(torch.float32))
    torch._dynamo.reset()


def _gradients(op, args, kwargs, weight, backend):
    out = getattr(eoc_kernels, op)(*args.values(), **kwargs, backend=backend)
    inputs = {name: value for name, value in (args | kwargs).items()
              if isinstance(value, torch.Tensor) and value.requires_grad}
    return out, dict(zip(inputs, torch.autograd.grad(out, list(inputs.values()), weight, allow_unused=True)))


def _leaves(tensors):
    return {name: value.detach().requires_grad_() if isinstance(value, torch.Tensor) and value.is_floating_point()
            else value for name, value in tensors.items()}


def _assert_same_gradients(op, args, kwargs, tol):
    weight = torch.randn(args["x"].shape, generator=torch.Generator().manual_seed(50)).to(args["x"].dtype)
    expected_out, expected = _gradients(op, args, kwargs, weight, "torch")
    with poisoned_output_buffers() as buffers:
        out, grads = _gradients(op, args, kwargs, weight, "cpp")
    assert len(buffers) == 1 and out.requires_grad  # the forward ran the kernel, under autograd
    torch.testing.assert_close(out, expected_out, **tol)
    assert expected.keys() == grads.keys()
    for name, grad in grads.items():
        if expected[name] is None:  # the threshold: only the piecewise-constant mask depends on it
            assert grad is None, name
            continue
        assert grad is not None and grad.shape == expected[name].shape, name
        torch.testing.assert_close(grad, expected[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


@NEEDS_CPP
@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_match_reference(dtype, coef_form, tolerance):
    """Inputs requiring grad go through the custom op, whose backward recomputes the reference."""
    gen = torch.Generator().manual_seed(51)
    shape = (2, 5, 37)

    def as_coef(values):
        return tuple(values) if coef_form == "float" else torch.tensor(values, dtype=torch.float32)

    attn = random_branch(gen, *shape, dtype, heads=1, coef=as_coef((0.8, 0.6, -0.5)))
    mlp = random_branch(gen, *shape, dtype, heads=2, coef=as_coef((0.4, 0.0, 0.9)))
    x = torch.randn(shape, generator=gen).to(dtype)
    threshold = splitting_threshold([attn])
    keys = ("prev", "delta", "trend", "coef")
    _assert_same_gradients("cached_branch", _leaves({"x": x, "gate": attn["gate"], "cache": attn["cache"]}),
                           _leaves({key: attn[key] for key in keys} | {"token_threshold": torch.tensor(threshold)}),
                           tolerance(dtype))
    threshold = splitting_threshold([attn, mlp])
    _assert_same_gradients(
        "cached_block", _leaves({"x": x, "gate_attn": attn["gate"], "gate_mlp": mlp["gate"],
                                 "cache_attn": attn["cache"], "cache_mlp": mlp["cache"]}),
        _leaves({f"{key}_{name}": branch[key] for name, branch in (("attn", attn), ("mlp", mlp)) for key in keys}
                | {"token_threshold": threshold}), tolerance(dtype))
    for generations in (1, 2):
        segment = random_segment(gen, *shape, dtype, blocks=2, generations=generations, heads=2)
        _assert_same_gradients(
            "cached_segment", _leaves({"x": x, "gates": segment["gates"], "cache": segment["cache"],
                                       "generation": segment["generation"]}),
            _leaves({key: segment[key] for key in ("delta", "trend", "coef")}
                    | {"token_threshold": segment_threshold(segment)}), tolerance(dtype))


@NEEDS_CPP
def test_no_grad_calls_skip_the_custom_op(monkeypatch):
    """Without gradients to record (and outside torch.compile) the backend calls the kernel directly."""
    calls = []
    original = _library.OPS["cached_segment"]

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setitem(_library.OPS, "cached_segment", counting)
    gen = torch.Generator().manual_seed(37)
    x = torch.randn(2, 5, 6, generator=gen)
    segment = random_segment(gen, 2, 5, 6, torch.float32, blocks=1)
    run_segment(x, segment, **CPP)
    assert calls == []
    leaf = x.clone().requires_grad_()
    out = run_segment(leaf, segment, **CPP)
    assert calls == [1] and out.requires_grad
    with torch.no_grad():
        run_segment(leaf, segment, **CPP)
    assert calls == [1]


@NEEDS_CPP
def test_eager_segment_equals_its_blocks(tolerance):
    """cached_segment equals the sum of its cached_block increments (cpp throughout), and naive fp64."""
    gen = torch.Generator().manual_seed(32)
    shape = (2, 7, 123)
    x = torch.randn(shape, generator=gen)
    segment = random_segment(gen, *shape, torch.float32, blocks=2, heads=2)
    threshold = segment_threshold(segment)
    out = run_segment(x, segment, token_threshold=threshold, **CPP)
    expected = x
    entries = segment["entries"]
    for attn, mlp in zip(entries[0::2], entries[1::2]):
        expected = cached_block(expected, attn["gate"], mlp["gate"], attn["cache"], mlp["cache"],
                                **branch_kwargs(attn, "_attn"), **branch_kwargs(mlp, "_mlp"),
                                token_threshold=threshold, **CPP)
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))
    torch.testing.assert_close(out.double(), naive_output(x, entries, threshold), **tolerance(torch.float32))
