"""Property-based tests (hypothesis): every op of the "triton" and "cpp" backends against the eager reference.

Each example draws a shape (B in 1..4, N in 1..7, C in 1..70: sizes 1 and odd ones), a dtype, a
memory layout per input (contiguous, transposed, every other element of a NaN-padded buffer, or
stride-0 expanded), the optional terms (the history C_1..C_3 too: prev, prev2, prev3), head counts H in
{1, 2, B} dividing B, coefficients of length P in {3, 4, 5} (zeros likely; a tensor whose terms all have
zero coefficients is then NaN, which must not be read), Python or tensor coefficients, a token threshold
(<= 0, in a clear gap between the per-token scores, or above all of them; a Python number or a tensor)
and, for cached_segment, a ring of G in {1, 2, 3, 4} generations with random generations and
coef [S, 2, P] (the generations it must not read hold NaN).
The reference runs on the clean inputs; the kernel's output buffer is NaN-poisoned.

Each test runs once per backend (``backend`` parameter): "triton" on CPU under the interpreter, where
it is slow (the shapes stay tiny and the example counts, ``EXAMPLES``, 1200 in all, keep it at about
a minute of CPU time), or on CUDA, compiled; "cpp" on CPU tensors with eoc_kernels._C (its kernel variant
drawn too: AVX-512, AVX2 or SSE2, whichever this CPU supports). A backend that cannot run here skips
(see triton_setup.py and cpp_setup.py). Examples are drawn afresh on every run (no example database
is written); a failure prints the blob that reproduces it (``@reproduce_failure``).
"""

import pytest
import torch

import eoc_kernels
from eoc_kernels import cpp, reference

from ..conftest import TOLERANCES
from . import cpp_setup, triton_setup
from .naive import DTYPES, naive_scores
from .test_history import unread

pytest.importorskip("hypothesis", reason="property tests need hypothesis (a dev dependency)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

#: Each property runs on these backends, on their device, with their output buffers poisoned.
BACKENDS = [pytest.param("triton", marks=triton_setup.NEEDS_TRITON_DEVICE),
            pytest.param("cpp", marks=cpp_setup.NEEDS_CPP)]
DEVICES = {"triton": triton_setup.DEVICE, "cpp": torch.device("cpu")}
POISONED_OUTPUTS = {"triton": triton_setup.poisoned_outputs, "cpp": cpp_setup.poisoned_outputs}

EXAMPLES = {"cached_branch": 400, "cached_block": 300, "cached_segment": 500}
NAN = float("nan")
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
TERMS = ("delta", "prev", "trend")  # in coefficient order: alpha, beta1, gamma
HISTORY = ("prev2", "prev3")  # C_2, C_3 (beta2, beta3), each only after the one before it


def property_settings(op):
    return settings(max_examples=EXAMPLES[op], deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# --- drawing inputs ------------------------------------------------------------------------------

def laid_out(data, values, label, *, entry_dims=0, pad=NAN):
    """values (contiguous, on the backend's device) in a drawn memory layout of the same shape.

    Returns (tensor, writable): writing writable[i] for an index i over the first entry_dims
    dimensions writes what tensor[i] shows (for poisoning one entry). "expanded" (stride 0 along
    one dimension) replaces values by copies of their first slice there, and expands only
    dimensions past the entry ones; "sliced" is every other element of a buffer padded with pad.
    """
    dims = values.dim()
    layout = data.draw(st.sampled_from(LAYOUTS if dims > entry_dims else LAYOUTS[:3]),
                       label=f"{label} layout")
    if layout == "transposed":
        order = data.draw(st.permutations(range(dims)), label=f"{label} order")
        inverse = sorted(range(dims), key=order.__getitem__)
        tensor = values.permute(order).contiguous().permute(inverse)
        return tensor, tensor
    if layout == "sliced":
        dim = data.draw(st.integers(0, dims - 1), label=f"{label} sliced dim")
        shape = list(values.shape)
        shape[dim] = 2 * shape[dim] + 1
        buffer = torch.full(shape, pad, dtype=values.dtype, device=values.device)
        tensor = buffer[(slice(None),) * dim + (slice(1, None, 2),)]
        tensor.copy_(values)
        return tensor, tensor
    if layout == "expanded":
        dim = data.draw(st.integers(entry_dims, dims - 1), label=f"{label} expanded dim")
        base = values.narrow(dim, 0, 1).clone()
        return base.expand(values.shape), base
    return values, values


def float_values(gen, dtype, device, *shape, kind="normal"):
    """Fresh random values on device: normal, normal with a per-row scale (spreads the judgment
    scores apart), small, or uniform in [-1, 1] (a trend embedding, DESIGN §2)."""
    if kind == "uniform":
        values = 2 * torch.rand(shape, generator=gen) - 1
    else:
        values = torch.randn(shape, generator=gen)
        if kind == "scaled":
            values = values * (0.1 + 2 * torch.rand(*shape[:-1], 1, generator=gen))
        elif kind == "small":
            values = 0.3 * values
    return values.to(dtype).to(device)


coefficient = st.one_of(st.just(0.0), st.floats(-1.5, 1.5, width=32, allow_subnormal=False))


def draw_heads(data, batch, label):
    return data.draw(st.sampled_from(sorted({h for h in (1, 2, batch) if batch % h == 0})),
                     label=f"{label} H")


def draw_coef(data, device, label):
    """(alpha, beta1, gamma[, beta2[, beta3]]) as a tuple of Python floats or a float32 [P] tensor (maybe
    strided), P in {3, 4, 5}."""
    length = data.draw(st.sampled_from([3, 4, 5]), label=f"{label} P")
    values = tuple(data.draw(st.lists(coefficient, min_size=length, max_size=length), label=label))
    if not data.draw(st.booleans(), label=f"{label} is a tensor"):
        return values
    return laid_out(data, torch.tensor(values, device=device), label)[0]


def draw_branch(data, gen, shape, dtype, device, label):
    """One reused branch: gate, cache, optional prev/delta/trend (laid out), and coef."""
    batch, tokens, channels = shape
    branch = {"gate": laid_out(data, float_values(gen, dtype, device, batch, channels), f"{label} gate")[0],
              "cache": laid_out(data, float_values(gen, dtype, device, *shape, kind="scaled"),
                                f"{label} cache")[0]}
    for term in TERMS:
        branch[term] = None
        if not data.draw(st.booleans(), label=f"{label} has {term}"):
            continue
        rows = batch if term == "prev" else draw_heads(data, batch, f"{label} {term}")
        values = float_values(gen, dtype, device, rows, tokens, channels,
                              kind={"delta": "small", "prev": "small", "trend": "uniform"}[term])
        if term == "prev":
            values = branch["cache"] - values
        branch[term] = laid_out(data, values, f"{label} {term}")[0]
    branch |= dict.fromkeys(HISTORY)
    for before, term in zip(("prev", *HISTORY), HISTORY):  # C_i only after C_{i-1}
        if branch[before] is None or not data.draw(st.booleans(), label=f"{label} has {term}"):
            break
        values = branch[before] - float_values(gen, dtype, device, *shape, kind="small")
        branch[term] = laid_out(data, values, f"{label} {term}")[0]
    branch["coef"] = draw_coef(data, device, f"{label} coef")
    return branch


def coef_floats(coef):
    return [float(value) for value in coef]


def draw_threshold(data, scores, device):
    """A token threshold as a Python float or a float32 tensor ([] or [1]) on device: <= 0 (every
    correction kept), or in a clear gap of the sorted per-token scores (some kept, some not; no
    decision hangs on rounding), or above them all."""
    kind = data.draw(st.sampled_from(["nonpositive", "gap"]), label="threshold kind")
    if kind == "nonpositive":
        value = data.draw(st.one_of(st.just(0.0), st.floats(-2.0, 0.0, width=32)),
                          label="threshold")
    else:
        points = sorted({0.0, *scores})
        points.append(2 * points[-1] + 1.0)
        gaps = [(low, high) for low, high in zip(points, points[1:])
                if high - low > 1e-3 * high + 1e-5]
        low, high = data.draw(st.sampled_from(gaps), label="threshold gap")
        value = (low + high) / 2
    form = data.draw(st.sampled_from(["float", "tensor[]", "tensor[1]"]), label="threshold form")
    if form == "float":
        return value
    return torch.tensor(value if form == "tensor[]" else [value], device=device)


def branch_scores(branch):
    """The fp64 per-token judgment scores of a branch, on the CPU."""
    cpu = {key: value.cpu() if isinstance(value, torch.Tensor) else value
           for key, value in branch.items()}
    cpu["coef"] = coef_floats(cpu["coef"])
    return naive_scores(cpu).flatten().tolist()


def poisoned_unread(branch):
    """branch with each tensor whose terms all have zero coefficients (test_history.unread) replaced by
    NaN: it must not be read."""
    out = dict(branch)
    for term in unread(coef_floats(branch["coef"]), branch):
        out[term] = torch.full(out[term].shape, NAN, dtype=out[term].dtype, device=out[term].device)
    return out


def run_backend(backend, op, *args, **kwargs):
    """The backend's output, with its output buffer NaN-poisoned before the kernel runs."""
    with POISONED_OUTPUTS[backend]() as buffers:
        out = getattr(eoc_kernels, op)(*args, **kwargs, backend=backend)
    assert len(buffers) == 1 and out.data_ptr() == buffers[0].data_ptr()
    return out


def draw_kernel_variant(data, backend):
    """For cpp: which of the CPU's kernel variants runs this example (set here, restored by the test)."""
    if backend == "cpp":
        cpp.set_isa(data.draw(st.sampled_from(cpp.supported_isas()), label="cpp isa"))


@pytest.fixture
def restore_isa(backend):
    """The cpp kernel variant in use before the test, restored after it."""
    if backend != "cpp":
        yield
        return
    default = cpp.isa()
    yield
    cpp.set_isa(default)


def assert_matches(out, expected, dtype):
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


def draw_common(data, device):
    batch = data.draw(st.integers(1, 4), label="B")
    tokens = data.draw(st.integers(1, 7), label="N")
    channels = data.draw(st.integers(1, 70), label="C")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    shape = (batch, tokens, channels)
    x = laid_out(data, float_values(gen, dtype, device, *shape), "x")[0]
    return shape, dtype, gen, x


def branch_kwargs(branch, suffix=""):
    return {f"{key}{suffix}": branch[key] for key in (*TERMS, *HISTORY, "coef")}


# --- properties --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@property_settings("cached_branch")
@given(data=st.data())
def test_branch_matches_reference(backend, restore_isa, data):
    device = DEVICES[backend]
    draw_kernel_variant(data, backend)
    shape, dtype, gen, x = draw_common(data, device)
    branch = draw_branch(data, gen, shape, dtype, device, "branch")
    threshold = draw_threshold(data, branch_scores(branch), device)
    expected = reference.cached_branch(x, branch["gate"], branch["cache"],
                                       **branch_kwargs(branch), token_threshold=threshold)
    poisoned = poisoned_unread(branch)
    out = run_backend(backend, "cached_branch", x, branch["gate"], branch["cache"],
                     **branch_kwargs(poisoned), token_threshold=threshold)
    assert_matches(out, expected, dtype)
    assert torch.equal(expected, reference.cached_branch(
        x, branch["gate"], branch["cache"], **branch_kwargs(poisoned), token_threshold=threshold))


@pytest.mark.parametrize("backend", BACKENDS)
@property_settings("cached_block")
@given(data=st.data())
def test_block_matches_reference(backend, restore_isa, data):
    device = DEVICES[backend]
    draw_kernel_variant(data, backend)
    shape, dtype, gen, x = draw_common(data, device)
    attn = draw_branch(data, gen, shape, dtype, device, "attn")
    mlp = draw_branch(data, gen, shape, dtype, device, "mlp")
    threshold = draw_threshold(data, branch_scores(attn) + branch_scores(mlp), device)
    args = (x, attn["gate"], mlp["gate"], attn["cache"], mlp["cache"])
    expected = reference.cached_block(*args, **branch_kwargs(attn, "_attn"),
                                      **branch_kwargs(mlp, "_mlp"), token_threshold=threshold)
    out = run_backend(backend, "cached_block", *args, **branch_kwargs(poisoned_unread(attn), "_attn"),
                     **branch_kwargs(poisoned_unread(mlp), "_mlp"), token_threshold=threshold)
    assert_matches(out, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@property_settings("cached_segment")
@given(data=st.data())
def test_segment_matches_reference(backend, restore_isa, data):
    device = DEVICES[backend]
    draw_kernel_variant(data, backend)
    shape, dtype, gen, x = draw_common(data, device)
    batch, tokens, channels = shape
    generations = data.draw(st.sampled_from([1, 2, 3, 4]), label="G")
    blocks = data.draw(st.integers(1, 3), label="S")
    gates = laid_out(data, float_values(gen, dtype, device, batch, blocks, 2, channels), "gates")[0]
    cache, cache_entries = laid_out(
        data, float_values(gen, dtype, device, generations, blocks, 2, *shape, kind="scaled"), "cache",
        entry_dims=3)
    values = data.draw(st.lists(st.integers(0, generations - 1), min_size=2 * blocks,
                                max_size=2 * blocks), label="generation")
    index_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]), label="index dtype")
    generation = laid_out(data, torch.tensor(values, dtype=index_dtype, device=device).view(
        blocks, 2), "generation", pad=7)[0]  # 7: a bad generation, should padding be read
    terms, writable = {}, {}
    for term in ("delta", "trend"):
        terms[term] = writable[term] = None
        if data.draw(st.booleans(), label=f"has {term}"):
            heads = draw_heads(data, batch, term)
            terms[term], writable[term] = laid_out(
                data, float_values(gen, dtype, device, blocks, 2, heads, tokens, channels,
                                   kind="small" if term == "delta" else "uniform"), term,
                entry_dims=2)
    coef, history = None, 0
    if data.draw(st.booleans(), label="has coef"):
        length = data.draw(st.sampled_from([3, 4, 5]), label="P")
        coef_values = data.draw(st.lists(coefficient, min_size=2 * length * blocks,
                                         max_size=2 * length * blocks), label="coef")
        coef = laid_out(data, torch.tensor(coef_values, device=device).view(blocks, 2, length),
                        "coef")[0]
        history = reference.segment_history(generations, length)

    # Per-entry branches for the scores: C_j = cache[(g - j) % G] for j <= K = min(G - 1, P - 2).
    entries = []
    for s in range(blocks):
        for k in range(2):
            g = int(generation[s, k])
            entry_coef = coef[s, k] if coef is not None else torch.zeros(3)
            entry = {"cache": cache[g, s, k],
                     "delta": None if terms["delta"] is None or coef is None else terms["delta"][s, k],
                     "trend": None if terms["trend"] is None or coef is None else terms["trend"][s, k],
                     "coef": entry_coef}
            for j, name in enumerate(("prev", *HISTORY), start=1):
                entry[name] = cache[(g - j) % generations, s, k] if j <= history else None
            entries.append(entry)
    threshold = draw_threshold(data, [score for entry in entries for score in branch_scores(entry)], device)
    kwargs = {"delta": terms["delta"], "trend": terms["trend"], "coef": coef,
              "token_threshold": threshold}
    expected = reference.cached_segment(x, gates, cache, generation, **kwargs)

    # Poison what is not read: the prior and history generations of zero coefficients, and the
    # generations past K; all of them without coef.
    for index, entry in enumerate(entries):
        s, k = divmod(index, 2)
        g = int(generation[s, k])
        values = coef_floats(entry["coef"])
        for term, value in (("delta", values[0]), ("trend", values[2])):
            if value == 0.0 and writable[term] is not None:
                writable[term][s, k] = NAN
        read = {0} | {j for j, name in enumerate(("prev", *HISTORY), start=1)
                      if entry[name] is not None and name not in unread(values, entry)}
        for j in set(range(generations)) - read:
            cache_entries[(g - j) % generations, s, k] = NAN
    out = run_backend(backend, "cached_segment", x, gates, cache, generation, **kwargs)
    assert_matches(out, expected, dtype)
    assert torch.equal(expected, reference.cached_segment(x, gates, cache, generation, **kwargs))

