"""Naive fp64 implementations of the EOC ops and random inputs for them, shared by the op tests.

The naive versions walk the tokens one by one with plain indexing (and the segment entries one by
one with Python integers), so they share no broadcasting, masking or indexing code with the
reference or the kernels. They cover the K-history correction (issue 10): a branch may carry
prev2 / prev3 (C_2, C_3) and a coef of 3 to 5 entries (alpha, beta1, gamma, beta2, beta3).
The ``run_*`` helpers call the public ops and pass ``**kwargs`` (e.g. ``backend=``) through.
"""

import torch

from eoc_kernels import cached_block, cached_branch, cached_segment

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_TERMS = ("delta", "prev", "trend")
HISTORY_TERMS = ("prev", "prev2", "prev3")  # C_1, C_2, C_3
COEF = (0.8, 0.6, -0.5)  # (alpha, beta, gamma)
#: Full coefficient vectors per length P: (alpha, beta1, gamma[, beta2[, beta3]]).
COEFS = {3: COEF, 4: (0.8, 0.6, -0.5, 0.4), 5: (0.8, 0.6, -0.5, 0.4, -0.3)}


# --- naive fp64 implementation ---------------------------------------------------------------

def naive_corrected(cache, prev, delta, trend, coef, threshold, prev2=None, prev3=None):
    """F̂ in fp64, one token (b, n) at a time; coef has 3 to 5 entries (the missing ones are 0)."""
    alpha, beta, gamma, beta2, beta3 = ([float(c) for c in coef] + [0.0, 0.0])[:5]
    threshold = float(threshold)
    batch, tokens, _ = cache.shape
    out = torch.empty(cache.shape, dtype=torch.float64)
    for b in range(batch):
        for n in range(tokens):
            cc = cache[b, n].double()
            fhat = cc.clone()
            if delta is not None:
                fhat += alpha * delta[b // (batch // delta.shape[0]), n].double()
            if prev is not None:
                fhat += beta * (cc - prev[b, n].double())
            if trend is not None:
                fhat += gamma * cc * trend[b // (batch // trend.shape[0]), n].double()
            if prev2 is not None and beta2 != 0.0:
                fhat += beta2 * (prev[b, n].double() - prev2[b, n].double())
            if prev3 is not None and beta3 != 0.0:
                fhat += beta3 * (prev2[b, n].double() - prev3[b, n].double())
            score = (fhat - cc).norm() / (cc.norm() + 1e-6)
            out[b, n] = fhat if threshold <= 0 or score > threshold else cc
    return out


def _naive_branch(branch, threshold):
    return naive_corrected(branch["cache"], branch["prev"], branch["delta"], branch["trend"],
                           branch["coef"], threshold, branch.get("prev2"), branch.get("prev3"))


def naive_output(x, branches, threshold):
    """x + Σ gate ⊙ F̂ over the given branches, in fp64."""
    out = x.double()
    for branch in branches:
        fhat = _naive_branch(branch, threshold)
        out = out + branch["gate"].double()[:, None, :] * fhat
    return out


def naive_scores(branch):
    """Per-token judgment scores s = ||corr|| / (||Cc|| + 1e-6) in fp64, [B, N]."""
    corr = _naive_branch(branch, 0.0) - branch["cache"].double()
    return corr.norm(dim=-1) / (branch["cache"].double().norm(dim=-1) + 1e-6)


# --- inputs ----------------------------------------------------------------------------------

def random_branch(gen, batch, tokens, channels, dtype, *, heads=1, terms=ALL_TERMS, coef=COEF):
    """One reused branch's inputs; per-token scales spread the judgment scores apart.

    terms: any of "delta", "prev", "trend", "prev2", "prev3" (prev2 needs prev, prev3 needs prev2);
    the history C_1, C_2, C_3 drifts away from C_0 one step at a time. prev2 and prev3 are drawn
    last, so the other inputs are the same with and without them."""
    def randn(rows):
        return torch.randn(rows, tokens, channels, generator=gen)

    def token_scale(rows):
        return 0.1 + 2 * torch.rand(rows, tokens, 1, generator=gen)

    cache = randn(batch)
    branch = dict(gate=torch.randn(batch, channels, generator=gen), cache=cache, prev=None,
                  delta=None, trend=None, prev2=None, prev3=None)
    if "prev" in terms:
        branch["prev"] = cache - 0.3 * token_scale(batch) * randn(batch)
    if "delta" in terms:
        branch["delta"] = 0.3 * token_scale(heads) * randn(heads)
    if "trend" in terms:  # a trend embedding lies in [-1, 1] (DESIGN §2)
        branch["trend"] = (2 * torch.rand(heads, tokens, channels, generator=gen) - 1
                           ) * token_scale(heads).clamp(max=1)
    for before, name in (("prev", "prev2"), ("prev2", "prev3")):
        if name in terms:
            assert branch[before] is not None, f"{name} needs {before}"
            branch[name] = branch[before] - 0.3 * token_scale(batch) * randn(batch)
    branch = {key: None if value is None else value.to(dtype) for key, value in branch.items()}
    return branch | {"coef": coef}


def _history_kwargs(branch, suffix=""):
    """prev2 / prev3 keyword arguments, only when the branch has them (so that calls without them
    stay the three-term calls they always were)."""
    return {f"{key}{suffix}": branch[key] for key in ("prev2", "prev3") if branch.get(key) is not None}


def run_branch(x, branch, **kwargs):
    return cached_branch(x, branch["gate"], branch["cache"], prev=branch["prev"],
                         delta=branch["delta"], trend=branch["trend"], coef=branch["coef"],
                         **_history_kwargs(branch), **kwargs)


def run_block(x, attn, mlp, **kwargs):
    optional = {f"{key}_{name}": branch[key] for name, branch in (("attn", attn), ("mlp", mlp))
                for key in ("prev", "delta", "trend", "coef")}
    optional |= _history_kwargs(attn, "_attn") | _history_kwargs(mlp, "_mlp")
    return cached_block(x, attn["gate"], mlp["gate"], attn["cache"], mlp["cache"], **optional,
                        **kwargs)


def run_op(x, branches, **kwargs):
    """cached_branch for one branch, cached_block for two (attention, MLP)."""
    return run_branch(x, *branches, **kwargs) if len(branches) == 1 else run_block(
        x, *branches, **kwargs)


def splitting_threshold(branches):
    """A threshold in a clear gap between the middle per-token scores of the branches."""
    scores = torch.cat([naive_scores(branch).flatten() for branch in branches]).sort().values
    return splitting_threshold_of(scores)


def splitting_threshold_of(scores):
    """A threshold in a clear gap between the middle values of sorted scores."""
    middle = scores[len(scores) // 4: 3 * len(scores) // 4 + 1]
    gap_at = (middle[1:] - middle[:-1]).argmax()
    low, high = middle[gap_at].item(), middle[gap_at + 1].item()
    assert high - low > 1e-4 * high, "scores too close to split robustly"
    threshold = (low + high) / 2
    # The test could fail: some tokens are corrected and some are not.
    assert 0 < int((scores > threshold).sum()) < len(scores)
    return threshold


def assert_matches_naive(out, x, branches, threshold, tol, **kwargs):
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    torch.testing.assert_close(out.double(), naive_output(x, branches, threshold), **tol,
                               **kwargs)


def check_random_case(seed, shape, dtype, tol, *branch_options, **kwargs):
    """Fresh random inputs, one branch per options dict; all tokens corrected."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    branches = [random_branch(gen, *shape, dtype, **options) for options in branch_options]
    out = run_op(x, branches, **kwargs)
    assert torch.isfinite(out).all()  # finite inputs, every element written
    assert_matches_naive(out, x, branches, 0.0, tol)


# --- segments ----------------------------------------------------------------------------------

def segment_history(generations, num_coefs):
    """K, the history differences cached_segment applies: i <= G − 1 and i <= P − 2."""
    return min(generations - 1, num_coefs - 2)


def random_segment(gen, batch, tokens, channels, dtype, *, blocks=3, generations=2, heads=1,
                   terms=("delta", "trend"), coef="random", index_dtype=torch.int32,
                   total_blocks=None, offset=1, num_coefs=3):
    """cached_segment inputs as a dict, plus "entries": the branch dicts of the S·2 entries.

    The cache is the view buffer[:, offset:offset + S] of a stacked [G, L, 2, B, N, C] buffer and
    the gates a strided view of a [B, L·2·C + 5] matrix, as the DiT integration builds them.
    G in 1..4 is a ring: entry (s, k) puts C_0 in generation g = generation[s, k] (random, mixed) and
    C_j in (g − j) mod G for j = 1..K, K = min(G − 1, P − 2) (P = num_coefs, 3 when coef is None);
    generations it does not fill stay NaN (the op must not read them). coef: "random" (some entries
    with zero coefficients), None, or a fixed tuple of num_coefs values for every entry.
    """
    total_blocks = blocks + 2 if total_blocks is None else total_blocks
    if coef not in ("random", None):
        num_coefs = len(coef)
    history = segment_history(generations, num_coefs)
    buffer = torch.full((generations, total_blocks, 2, batch, tokens, channels), float("nan"))
    generation = torch.randint(0, generations, (blocks, 2), generator=gen, dtype=index_dtype)
    if coef == "random":
        values = torch.randn(blocks, 2, num_coefs, generator=gen)
        values[torch.rand(blocks, 2, num_coefs, generator=gen) < 0.25] = 0.0  # some zero coefficients
        values[0, 0] = torch.tensor(COEFS[num_coefs])  # at least one entry with every term
    elif coef is not None:
        values = torch.tensor(coef, dtype=torch.float32).expand(blocks, 2, num_coefs).clone()
    entry_terms = tuple(terms) + HISTORY_TERMS[:history]
    entries = []
    for s in range(blocks):
        for k in range(2):
            entry = random_branch(gen, batch, tokens, channels, torch.float32, heads=heads,
                                  terms=entry_terms, coef=None if coef is None else values[s, k])
            g = int(generation[s, k]) if generations > 1 else 0
            buffer[g, offset + s, k] = entry["cache"]
            for j, name in enumerate(HISTORY_TERMS[:history], start=1):
                buffer[(g - j) % generations, offset + s, k] = entry[name]
            entries.append(entry)
    gate_matrix = torch.randn(batch, total_blocks * 2 * channels + 5, generator=gen).to(dtype)
    gates = gate_matrix[:, 5:].view(batch, total_blocks, 2, channels)[:, offset:offset + blocks]
    for s in range(blocks):
        for k in range(2):
            entries[2 * s + k]["gate"] = gates[:, s, k]

    def stacked(name):
        if name not in terms:
            return None
        return torch.stack([entry[name] for entry in entries]).view(
            blocks, 2, heads, tokens, channels).to(dtype)

    args = dict(gates=gates, cache=buffer.to(dtype)[:, offset:offset + blocks],
                generation=generation, delta=stacked("delta"), trend=stacked("trend"),
                coef=None if coef is None else values)
    # The naive version sees the same rounded values, per entry.
    for entry in entries:
        for key in ("gate", "cache", "delta", "trend", *HISTORY_TERMS):
            if entry[key] is not None:
                entry[key] = entry[key].to(dtype)
        if coef is None:
            entry["prev"] = entry["prev2"] = entry["prev3"] = entry["delta"] = entry["trend"] = None
            entry["coef"] = (0.0, 0.0, 0.0)
    return args | {"entries": entries}


def run_segment(x, segment, **kwargs):
    args = {key: value for key, value in segment.items() if key != "entries"}
    return cached_segment(x, args.pop("gates"), args.pop("cache"), args.pop("generation"),
                          **args, **kwargs)


def segment_threshold(segment):
    """A threshold that corrects some tokens of the segment's entries and not others."""
    scores = torch.cat([naive_scores(entry).flatten() for entry in segment["entries"]])
    return splitting_threshold_of(scores.sort().values)
