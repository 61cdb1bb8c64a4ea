"""The K-history correction (issue 10) on the eager reference ("torch" backend): conversion helpers, the
input checks of the new arguments, the reference against the naive fp64 loop, and P = 3 bit for bit.

corr = α·D + β₁·(C_0 − C_1) + γ·(C_0 ⊙ E) + β₂·(C_1 − C_2) + β₃·(C_2 − C_3) with coef of length
P ∈ {3, 4, 5}; cached_segment reads C_j of entry (s, k) from generation (generation[s, k] − j) mod G.
The Triton kernels are tested against the same cases in test_triton_history.py.
"""

import math

import pytest
import torch

from eoc_kernels import cached_block, cached_branch, cached_segment, history_coefficients, history_weights, reference

from .naive import (
    COEFS,
    DTYPES,
    assert_matches_naive,
    random_branch,
    random_segment,
    run_op,
    run_segment,
    segment_threshold,
    splitting_threshold,
)

TORCH = dict(backend="torch")
NAN = float("nan")
BRANCH_TERMS = ("delta", "prev", "trend", "prev2", "prev3")
#: (label, coef): every length, and zeros in the middle (a history tensor read for one term only, or
#: for none). Each coef is used with prev, prev2 and prev3 all given.
COEF_CASES = [
    ("P3", COEFS[3]),  # prev2 and prev3 given but unused: P = 3 reads C_0 and C_1 only
    ("P4", COEFS[4]),
    ("P4-beta1-zero", (0.3, 0.0, 0.5, 0.7)),  # C_1 read for beta2 only
    ("P5", COEFS[5]),
    ("P5-beta2-zero", (0.0, 0.6, 0.0, 0.0, 0.9)),  # beta2 = 0, beta3 != 0: C_2 read for beta3 only
    ("P5-beta1-beta2-zero", (0.5, 0.0, 0.0, 0.0, -0.7)),  # C_1 never read
    ("P5-history-zero", (0.5, 0.0, 0.4, 0.0, 0.0)),  # no history term at all
]
COEF_IDS = [label for label, _ in COEF_CASES]
SHAPES = [(2, 7, 123), (1, 3, 1152), (4, 5, 8)]


# --- shared helpers (test_triton_history.py uses them too) -----------------------------------------

def unread(coef, branch):
    """The tensors of branch that a kernel must not read for coef: each whose terms all have zero
    coefficients (or lie past coef's length). C_1 serves beta1 and beta2, C_2 beta2 and beta3."""
    alpha, beta1, gamma, beta2, beta3 = ([float(value) for value in coef] + [0.0, 0.0])[:5]
    has = {name: branch.get(name) is not None for name in BRANCH_TERMS}
    uses = {"delta": [alpha], "trend": [gamma],
            "prev": [beta1, beta2 if has["prev2"] else 0.0],
            "prev2": [beta2, beta3 if has["prev3"] else 0.0],
            "prev3": [beta3]}
    return [name for name in BRANCH_TERMS if has[name] and not any(uses[name])]


def poisoned(branch, names):
    """branch with the named tensors replaced by all-NaN tensors of the same shape."""
    return dict(branch, **{name: torch.full_like(branch[name], NAN) for name in names})


def as_form(coef, form):
    return tuple(coef) if form == "float" else torch.tensor(coef, dtype=torch.float32)


def old_formula(x, branches, threshold):
    """The three-term op as it was written before the K history (DESIGN §2.2), as an independent hand
    loop over tokens in fp32: F̂ = Cc + α·D + β·(Cc − Cp) + γ·(Cc ⊙ E), per-token judgment, x + Σ g ⊙ F̂,
    each product and sum one fp32 rounding, in the order the ops have always used."""
    batch, tokens, _ = x.shape
    threshold = float(threshold)
    out = torch.empty(x.shape, dtype=torch.float32)
    for b in range(batch):
        for n in range(tokens):
            row = x[b, n].float()
            for branch in branches:
                alpha, beta, gamma = (float(value) for value in tuple(branch["coef"])[:3])
                cc = branch["cache"][b, n].float()
                corr = torch.zeros_like(cc)
                if branch["delta"] is not None and alpha != 0:
                    delta = branch["delta"]
                    corr = corr + alpha * delta[b // (batch // delta.shape[0]), n].float()
                if branch["prev"] is not None and beta != 0:
                    corr = corr + beta * (cc - branch["prev"][b, n].float())
                if branch["trend"] is not None and gamma != 0:
                    trend = branch["trend"]
                    corr = corr + gamma * (cc * trend[b // (batch // trend.shape[0]), n].float())
                score = torch.linalg.vector_norm(corr) / (torch.linalg.vector_norm(cc) + 1e-6)
                keep = threshold <= 0 or bool(score > threshold)
                fhat = cc + (corr if keep else torch.zeros_like(corr))
                row = row + branch["gate"][b].float() * fhat
            out[b, n] = row
    return out.to(x.dtype)


def history_branch(gen, shape, dtype, coef, heads=1):
    """A branch with every term, C_1..C_3 included, and coef."""
    return random_branch(gen, *shape, dtype, heads=heads, terms=BRANCH_TERMS, coef=coef)


def segment_unread(segment):
    """(cache generation, s, k) and (prior name, s, k) slots a kernel must not read, per entry:
    generations past K = min(G − 1, P − 2), and those, and prior rows, whose terms all have zero
    coefficients; everything but C_0 when coef is None."""
    cache, coef, generation = segment["cache"], segment["coef"], segment["generation"]
    generations, blocks = cache.shape[:2]
    slots, priors = [], []
    for s in range(blocks):
        for k in range(2):
            g = int(generation[s, k])
            values = [0.0] * 5 if coef is None else (coef[s, k].tolist() + [0.0, 0.0])[:5]
            history = 0 if coef is None else reference.segment_history(generations, coef.shape[-1])
            alpha, beta1, gamma, beta2, beta3 = values
            used = {1: [beta1, beta2 if history >= 2 else 0.0], 2: [beta2, beta3 if history >= 3 else 0.0],
                    3: [beta3]}
            for j in range(1, generations):
                if j > history or not any(used[j]):
                    slots.append(((g - j) % generations, s, k))
            for name, value in (("delta", alpha), ("trend", gamma)):
                if segment[name] is not None and value == 0.0:
                    priors.append((name, s, k))
    return slots, priors


def poison_segment(segment):
    """Sets every slot of the segment's inputs it must not read to NaN, in place (the views keep their
    strides; the naive loop's per-entry tensors are separate copies); returns the segment."""
    slots, priors = segment_unread(segment)
    for slot in slots:
        segment["cache"][slot] = NAN
    for name, s, k in priors:
        segment[name][s, k] = NAN
    return segment


# --- conversion helpers ---------------------------------------------------------------------------

@pytest.mark.parametrize("betas, weights", [
    ((), (1.0,)),
    ((0.5,), (1.5, -0.5)),  # extrapolate: C_0 + 0.5·(C_0 − C_1)
    ((1.0, 0.0), (2.0, -1.0, 0.0)),
    ((0.0, 0.0, 0.25), (1.0, 0.0, 0.25, -0.25)),
    ((-1.0,), (0.0, 1.0)),  # F̂ = C_1
])
def test_history_weights_and_coefficients_known_values(betas, weights):
    assert history_weights(betas) == weights
    assert history_coefficients(weights) == betas
    assert math.fsum(history_weights(betas)) == 1.0


def test_history_conversion_round_trips_and_sums_to_one():
    gen = torch.Generator().manual_seed(70)
    for order in range(4):
        for _ in range(20):
            betas = tuple((torch.rand(order, generator=gen, dtype=torch.float64) * 6 - 3).tolist())
            weights = history_weights(betas)
            assert len(weights) == order + 1
            assert abs(math.fsum(weights) - 1.0) < 1e-12
            assert all(abs(a - b) < 1e-12 for a, b in zip(history_coefficients(weights), betas))


def test_history_forecast_is_the_difference_form():
    """Σ w_j·C_j equals C_0 + Σ β_i·(C_{i−1} − C_i) (float64) for a random history."""
    gen = torch.Generator().manual_seed(71)
    history = torch.randn(4, 9, generator=gen, dtype=torch.float64)  # C_0..C_3
    betas = (0.7, -0.4, 0.2)
    forecast = sum(w * c for w, c in zip(history_weights(betas), history))
    difference = history[0] + sum(b * (history[i] - history[i + 1]) for i, b in enumerate(betas))
    torch.testing.assert_close(forecast, difference, rtol=0, atol=1e-14)


@pytest.mark.parametrize("fn, bad, error, match", [
    (history_coefficients, (1.0, 0.5), ValueError, r"weights must sum to 1 \(within 1e-09\), got sum 1\.5"),
    (history_coefficients, (0.5, 0.5 + 2e-9), ValueError, "must sum to 1"),
    (history_coefficients, (), ValueError, "must have at least 1 entries"),
    (history_coefficients, (1.0, NAN), ValueError, "must be finite"),
    (history_coefficients, (True,), TypeError, "must be Python numbers"),
    (history_coefficients, torch.ones(1), TypeError, "must be a tuple or list"),
    (history_weights, (0.5, float("inf")), ValueError, "must be finite"),
    (history_weights, ("0.5",), TypeError, "must be Python numbers"),
    (history_weights, 0.5, TypeError, "must be a tuple or list"),
])
def test_history_conversion_rejects_bad_input(fn, bad, error, match):
    with pytest.raises(error, match=match):
        fn(bad)


def test_history_coefficients_accepts_rounding_within_tolerance():
    assert history_coefficients((0.1, 0.2, 0.7)) == pytest.approx((-0.9, -0.7))


# --- input checks of the new arguments -------------------------------------------------------------

B, N, C = 4, 3, 8


def branch_args(suffix=""):
    gen = torch.Generator().manual_seed(72)
    return {f"{name}{suffix}": torch.randn(B, N, C, generator=gen) for name in ("prev", "prev2", "prev3")}


def call_branch(**kwargs):
    x = torch.randn(B, N, C)
    return cached_branch(x, torch.randn(B, C), torch.randn(B, N, C), **kwargs, **TORCH)


def call_block(**kwargs):
    x = torch.randn(B, N, C)
    return cached_block(x, torch.randn(B, C), torch.randn(B, C), torch.randn(B, N, C), torch.randn(B, N, C),
                        **kwargs, **TORCH)


@pytest.mark.parametrize("op, suffix", [("cached_branch", ""), ("cached_block", "_attn"), ("cached_block", "_mlp")])
@pytest.mark.parametrize("case, breaks, error, match", [
    ("prev2-without-prev", lambda a, s: a | {f"prev{s}": None}, ValueError,
     r"prev2{s} must be None when prev{s} is None"),
    ("prev3-without-prev2", lambda a, s: a | {f"prev2{s}": None}, ValueError,
     r"prev3{s} must be None when prev2{s} is None"),
    ("prev2-shape", lambda a, s: a | {f"prev2{s}": a[f"prev2{s}"][:, :-1]}, ValueError,
     r"prev2{s} must have shape \[B, N, C\] = \[4, 3, 8\], got \[4, 2, 8\]"),
    ("prev3-dtype", lambda a, s: a | {f"prev3{s}": a[f"prev3{s}"].half()}, TypeError,
     r"prev3{s} must have dtype torch\.float32"),
    ("prev2-device", lambda a, s: a | {f"prev2{s}": a[f"prev2{s}"].to("meta")}, ValueError,
     r"prev2{s} must be on device cpu"),
    ("prev3-numpy", lambda a, s: a | {f"prev3{s}": a[f"prev3{s}"].numpy()}, TypeError,
     r"prev3{s} must be a torch\.Tensor"),
    ("coef-length-6", lambda a, s: a | {f"coef{s}": (0.1,) * 6}, ValueError,
     r"coef{s} must have 3, 4 or 5 entries \(alpha, beta1, gamma\[, beta2\[, beta3\]\]\), got 6"),
    ("coef-length-2", lambda a, s: a | {f"coef{s}": (0.1, 0.2)}, ValueError, r"coef{s} must have 3, 4 or 5 entries"),
    ("coef-tensor-6", lambda a, s: a | {f"coef{s}": torch.zeros(6)}, ValueError,
     r"coef{s} must have shape \[P\] with P in \{{3, 4, 5\}}, got \[6\]"),
    ("coef-tensor-2x4", lambda a, s: a | {f"coef{s}": torch.zeros(2, 4)}, ValueError,
     r"coef{s} must have shape \[P\]"),
    ("coef-nan-beta3", lambda a, s: a | {f"coef{s}": (0.1, 0.2, 0.3, 0.0, NAN)}, ValueError,
     r"coef{s} entries must be finite"),
    ("coef-tensor-inf-beta2", lambda a, s: a | {f"coef{s}": torch.tensor([0.0, 0.0, 0.0, -math.inf])}, ValueError,
     r"coef{s} must be finite"),
    ("coef-bool-beta2", lambda a, s: a | {f"coef{s}": (0.1, 0.2, 0.3, True)}, TypeError,
     r"coef{s} entries must be Python numbers"),
])
def test_bad_history_arguments_name_the_argument(op, suffix, case, breaks, error, match):
    args = branch_args(suffix) | {f"coef{suffix}": COEFS[5]}
    call = call_branch if op == "cached_branch" else call_block
    assert call(**args).shape == (B, N, C)  # the unbroken arguments are valid
    with pytest.raises(error, match=rf"^{op}: " + match.format(s=suffix)):
        call(**breaks(args, suffix))


def test_valid_history_forms_pass():
    for coef in (COEFS[4], list(COEFS[5]), torch.zeros(4), torch.ones(5), (1, 0, 0, 2)):
        assert call_branch(**branch_args(), coef=coef).shape == (B, N, C)
    assert call_branch(prev=torch.randn(B, N, C), prev2=torch.randn(B, N, C), coef=COEFS[5]).shape == (B, N, C)
    assert call_block(prev_attn=torch.randn(B, N, C), prev2_attn=torch.randn(B, N, C), coef_attn=COEFS[4],
                      coef_mlp=torch.zeros(5)).shape == (B, N, C)


def segment_args(generations=3, num_coefs=4):
    gen = torch.Generator().manual_seed(73)
    return {"x": torch.randn(B, N, C, generator=gen), "gates": torch.randn(B, 2, 2, C, generator=gen),
            "cache": torch.randn(generations, 2, 2, B, N, C, generator=gen),
            "generation": torch.tensor([[0, 1], [generations - 1, 0]]) % generations,
            "coef": torch.randn(2, 2, num_coefs, generator=gen)}


def call_segment_args(args):
    args = dict(args)
    return cached_segment(args.pop("x"), args.pop("gates"), args.pop("cache"), args.pop("generation"), **args,
                          **TORCH)


@pytest.mark.parametrize("generations", [1, 2, 3, 4])
@pytest.mark.parametrize("num_coefs", [3, 4, 5])
def test_segment_accepts_every_ring_and_length(generations, num_coefs):
    assert call_segment_args(segment_args(generations, num_coefs)).shape == (B, N, C)


@pytest.mark.parametrize("case, name, bad, error, match", [
    ("cache-5-generations", "cache", torch.zeros(5, 2, 2, B, N, C), ValueError,
     r"cache must have shape \[G, S, 2, B, N, C\] = \[G, S, 2, 4, 3, 8\] with G in \{1, 2, 3, 4\}, "
     r"got \[5, 2, 2, 4, 3, 8\]"),
    ("coef-P6", "coef", torch.zeros(2, 2, 6), ValueError,
     r"coef must have shape \[S, 2, P\] = \[2, 2, P\] with P in \{3, 4, 5\}, got \[2, 2, 6\]"),
    ("coef-P2", "coef", torch.zeros(2, 2, 2), ValueError, r"coef must have shape \[S, 2, P\]"),
    ("coef-tuple", "coef", (0.5, 0.0, 0.0, 0.1), TypeError, r"coef must be None or a float32 tensor of shape "
                                                            r"\[S, 2, P\] with P in \{3, 4, 5\}"),
    ("coef-nan-beta3", "coef", torch.tensor([0.0, 0.0, 0.0, 0.0, NAN]).expand(2, 2, 5), ValueError,
     "coef must be finite"),
    ("generation-3-of-3", "generation", torch.tensor([[0, 3], [1, 2]]), ValueError,
     r"generation values must be in 0\.\.2 \(G = 3\), got 3"),
])
def test_segment_bad_history_arguments(case, name, bad, error, match):
    args = segment_args() | {name: bad}
    with pytest.raises(error, match=rf"^cached_segment: {match}"):
        call_segment_args(args)


# --- the reference against the naive fp64 loop -----------------------------------------------------

@pytest.mark.parametrize("threshold", ["zero", "split"])
@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("label, coef", COEF_CASES, ids=COEF_IDS)
def test_branch_history_matches_naive(label, coef, shape, dtype, coef_form, threshold, tolerance):
    gen = torch.Generator().manual_seed(74)
    x = torch.randn(shape, generator=gen).to(dtype)
    branch = history_branch(gen, shape, dtype, as_form(coef, coef_form), heads=shape[0])
    value = splitting_threshold([branch]) if threshold == "split" else 0.0
    # What the op must not read holds NaN; the naive loop sees the clean tensors.
    out = run_op(x, [poisoned(branch, unread(coef, branch))], token_threshold=value, **TORCH)
    assert_matches_naive(out, x, [branch], value, tolerance(dtype))


@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("attn_case, mlp_case", [(COEF_CASES[3], COEF_CASES[2]), (COEF_CASES[4], COEF_CASES[0]),
                                                 (COEF_CASES[1], COEF_CASES[5])],
                         ids=lambda case: case[0])
def test_block_history_matches_naive(attn_case, mlp_case, dtype, coef_form, tolerance):
    """Each branch its own length and its own zeros; the MLP branch has only C_1 and C_2."""
    gen = torch.Generator().manual_seed(75)
    shape = (2, 7, 123)
    x = torch.randn(shape, generator=gen).to(dtype)
    attn = history_branch(gen, shape, dtype, as_form(attn_case[1], coef_form), heads=2)
    mlp = random_branch(gen, *shape, dtype, terms=("delta", "prev", "prev2", "trend"),
                        coef=as_form(mlp_case[1], coef_form))
    value = splitting_threshold([attn, mlp])
    branches = [poisoned(attn, unread(attn_case[1], attn)), poisoned(mlp, unread(mlp_case[1], mlp))]
    out = run_op(x, branches, token_threshold=value, **TORCH)
    assert_matches_naive(out, x, [attn, mlp], value, tolerance(dtype))


@pytest.mark.parametrize("threshold", ["zero", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_coefs", [3, 4, 5], ids=lambda p: f"P{p}")
@pytest.mark.parametrize("generations", [1, 2, 3, 4], ids=lambda g: f"G{g}")
def test_segment_ring_matches_naive(generations, num_coefs, dtype, threshold, tolerance):
    """Mixed generations in a ring of G, random coefficients (some zero); every slot the op must not
    read (past K = min(G − 1, P − 2), or with zero coefficients) holds NaN."""
    gen = torch.Generator().manual_seed(76)
    shape = (2, 7, 123)
    x = torch.randn(shape, generator=gen).to(dtype)
    segment = random_segment(gen, *shape, dtype, blocks=2, heads=2, generations=generations, num_coefs=num_coefs)
    value = segment_threshold(segment) if threshold == "split" else 0.0
    out = run_segment(x, poison_segment(segment), token_threshold=value, **TORCH)
    assert_matches_naive(out, x, segment["entries"], value, tolerance(dtype))


def test_segment_ring_reads_the_generations_before_the_current_one():
    """generation = 0 in a ring of 4 reads C_1, C_2, C_3 from generations 3, 2, 1: the segment equals
    cached_branch given those slices as prev, prev2, prev3."""
    gen = torch.Generator().manual_seed(77)
    x = torch.randn(2, 3, 8, generator=gen)
    cache = torch.randn(4, 1, 2, 2, 3, 8, generator=gen)
    gates = torch.randn(2, 1, 2, 8, generator=gen)
    coef = torch.tensor(COEFS[5]).expand(1, 2, 5).contiguous()
    generation = torch.tensor([[0, 2]])
    out = cached_segment(x, gates, cache, generation, coef=coef, **TORCH)
    expected = x
    for k, g in enumerate((0, 2)):
        expected = cached_branch(expected, gates[:, 0, k], cache[g, 0, k], prev=cache[(g - 1) % 4, 0, k],
                                 prev2=cache[(g - 2) % 4, 0, k], prev3=cache[(g - 3) % 4, 0, k], coef=COEFS[5],
                                 **TORCH)
    torch.testing.assert_close(out, expected)


# --- P = 3 is the old formula, bit for bit ---------------------------------------------------------

@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["branch", "block"])
def test_three_coefficients_are_the_old_formula_bit_for_bit(op, dtype, coef_form):
    """P = 3, and P = 5 with beta2 = beta3 = 0 and NaN history tensors given, equal the hand-written
    three-term loop exactly (torch.equal)."""
    gen = torch.Generator().manual_seed(78)
    shape = (2, 7, 123)
    x = torch.randn(shape, generator=gen).to(dtype)
    coefs = [(0.8, 0.6, -0.5), (0.4, 1.0, 0.9)][: 1 if op == "branch" else 2]
    branches = [random_branch(gen, *shape, dtype, heads=2, coef=as_form(coef, coef_form)) for coef in coefs]
    threshold = splitting_threshold(branches)
    expected = old_formula(x, branches, threshold)
    assert torch.equal(run_op(x, branches, token_threshold=threshold, **TORCH), expected)
    padded = [dict(branch, coef=as_form((*coef, 0.0, 0.0), coef_form), prev2=torch.full_like(branch["prev"], NAN),
                   prev3=torch.full_like(branch["prev"], NAN)) for branch, coef in zip(branches, coefs)]
    assert torch.equal(run_op(x, padded, token_threshold=threshold, **TORCH), expected)


@pytest.mark.parametrize("generations", [2, 3, 4], ids=lambda g: f"G{g}")
def test_segment_three_coefficients_are_the_old_formula_bit_for_bit(generations):
    """coef [S, 2, 3] in a ring of G reads C_0 and C_1 only: the old two-generation result exactly."""
    gen = torch.Generator().manual_seed(79)
    shape = (2, 5, 37)
    x = torch.randn(shape, generator=gen)
    segment = random_segment(gen, *shape, torch.float32, blocks=2, heads=2, generations=generations)
    entries = segment["entries"]
    threshold = segment_threshold(segment)
    expected = x
    for s in range(2):  # the old segment: the sum of block increments, one rounding (fp32 here)
        expected = old_formula(expected, entries[2 * s: 2 * s + 2], threshold)
    out = run_segment(x, poison_segment(segment), token_threshold=threshold, **TORCH)
    assert torch.equal(out, expected)
