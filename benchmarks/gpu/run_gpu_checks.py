"""GPU checks in one command: Triton / CUDA C++ vs reference parity, then timings at DiT-XL/2 shapes (DESIGN §6).

    python benchmarks/gpu/run_gpu_checks.py             # a CUDA GPU (H100 / H200): a few minutes
    python benchmarks/gpu/run_gpu_checks.py --dry-run   # CPU, Triton interpreter, tiny shapes

(a) Parity: every op's "triton" backend, and the "cuda" backend (the CUDA C++ kernels of
    csrc/cuda_ops.cu) where eoc_kernels._C was built with them, against the "torch" reference on fresh
    random inputs (odd and DiT shapes, B 1..4 and 64, fp32 / fp16 / bf16, every correction term, float
    and tensor coefficients, token thresholds), the K-history correction (issue 10: K = 2 and 3 history
    differences, prev2 / prev3, coef of length 4 / 5 with zeros in the middle, cached_segment over rings
    of G = 3 and 4 generations), and the patched DiT sampler (triton vs torch backend).
    Prints PASS / FAIL per group; any FAIL makes the exit status 1.
(b) Timings at DiT-XL/2 shapes (N = 256, C = 1152, 28 blocks, bf16, random weights), batches
    2 / 16 / 64: cached_block (fused triton and cuda vs eager vs torch.compile vs the copy-bandwidth
    floor); the K-history ops at K = 2 and 3 (cached_block, and cached_segment over every block with a
    ring of K + 1 generations; fused vs eager vs the copy-bandwidth floor); the whole cached step, i.e.
    one cached_segment over every block (eager, triton and cuda,
    plain and in a CUDA graph) against the full step; DDIM-20 sampling of 16 images with FORA N = 2 / 3,
    with and without EOC, against uncached. Without the CUDA kernels the report says "cuda backend: not
    built" and those rows are absent.
(c) Writes Markdown + JSON (GPU name, torch / triton versions, commit, date) to benchmarks/results/
    and to $OUT when set.

--dry-run runs every path above on CPU under TRITON_INTERPRET=1 with tiny shapes and one repeat; it
reports no numbers and writes no files. A timing section that crashes is reported (exit status 2)
without stopping the others.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import os
import sys
import time
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTIONS = ("parity", "block", "history", "step", "sampling")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, TRITON_INTERPRET=1, tiny shapes, one repeat: checks the paths, reports no numbers")
    parser.add_argument("--skip", action="append", default=[], choices=SECTIONS, help="skip a section (repeatable)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="also write the results here (default: $OUT)")
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.dry_run:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
sys.path.insert(0, REPO_ROOT)  # benchmarks._common, and eoc_kernels when not installed
sys.path.append(os.path.join(REPO_ROOT, "python"))  # eoc_dit when not installed

import torch  # noqa: E402

from benchmarks import _common as common  # noqa: E402

# Parity tolerances of a same-dtype Triton output against the reference (both round once from
# fp32): fp32 accumulation order; fp16 / bf16 about two output ulps (as tests/conftest.py).
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
              torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TERM_SETS = ((), ("delta",), ("prev",), ("trend",), ("delta", "prev"), ("prev", "trend"), ("delta", "prev", "trend"))
HISTORIES = (2, 3)  # K of the K-history cases: P = K + 2 coefficients, a segment ring of G = K + 1
#: (alpha, beta1, gamma, beta2, beta3) of the K-history cases: every term, or zeros in the middle (beta2 = 0
#: with beta3 != 0 at K = 3: C_2 read for beta3 only; beta1 = 0 with beta2 != 0 at K = 2: C_1 for beta2 only).
HISTORY_COEFS = {"full": (0.8, 0.6, -0.5, 0.4, -0.3), "zeros-between": (0.5, 0.0, 0.4, 0.7, 0.0),
                 "zeros-between-3": (0.5, 0.6, 0.4, 0.0, -0.7)}
SAMPLER_VARIANTS = ("plain", "extrapolate", "trend", "delta+threshold")


class Plan:
    """Shapes and repeats of a GPU run, or of a dry run (tiny shapes, one repeat)."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.fused_backends, self.cuda_note = fused_backends(self.device)
        if dry_run:
            self.parity_shapes = [(1, 5, 7), (2, 8, 16), (3, 5, 12), (4, 3, 9)]
            self.parity_blocks = 2
            self.odd_shape, self.heads_shape, self.dit_shape = (3, 5, 7), (4, 5, 7), (2, 8, 16)
            self.sampler_models = [("tiny", common.TINY_SHAPES, (torch.float32, torch.bfloat16), 6, 2)]
            self.model_shapes, self.batches, self.block_batches = common.TINY_SHAPES, (2,), (2,)
            self.sampling_steps, self.sampling_images = 4, 1
            self.repeats, self.inner, self.sampling_repeats = 1, 1, 1
        else:
            self.parity_shapes = [(1, 49, 123), (2, 256, 1152), (3, 49, 1152), (4, 256, 123), (64, 256, 1152)]
            self.parity_blocks = 4
            self.odd_shape, self.heads_shape, self.dit_shape = (3, 49, 123), (4, 49, 123), (2, 256, 1152)
            small = dict(input_size=14, patch_size=2, in_channels=4, hidden_size=132, depth=4, num_heads=4,
                         num_classes=10, learn_sigma=True)  # N = 49, C = 132
            self.sampler_models = [("small (N=49, C=132, 4 blocks)", small, DTYPES, 10, 3),
                                   ("DiT-XL/2 shapes", common.XL_SHAPES, (torch.bfloat16,), 10, 2)]
            self.model_shapes, self.batches, self.block_batches = common.XL_SHAPES, (2, 16, 64), (2, 16, 64)
            self.sampling_steps, self.sampling_images = 20, 16
            self.repeats, self.inner, self.sampling_repeats = 20, 20, 3


def log(message=""):
    print(message, flush=True)


def fused_backends(device):
    """(the fused backends checked and timed on device, a note on the "cuda" backend)."""
    import eoc_kernels

    if "cuda" not in eoc_kernels.available_backends("cuda"):
        return ["triton"], "cuda backend: not built"
    if device.type != "cuda":
        return ["triton"], "cuda backend: built, not run (dry run on CPU; its kernels need CUDA tensors)"
    return ["triton", "cuda"], "cuda backend: built, checked and timed"


def cell(text) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def fmt(value, spec=".3f", dry=False):
    if dry:
        return "(dry)"
    return "—" if value is None else format(value, spec)


# ----------------------------------------------------------------------------------------------
# (a) parity
# ----------------------------------------------------------------------------------------------


def first_branch(case):
    """(cache, corrected_feature keyword arguments) of the first reused branch of a case."""
    from eoc_kernels import reference

    kw = case.kwargs
    if case.op == "cached_branch":
        return case.args[2], dict(prev=kw["prev"], prev2=kw.get("prev2"), prev3=kw.get("prev3"), delta=kw["delta"],
                                  trend=kw["trend"], coef=kw["coef"])
    if case.op == "cached_block":
        return case.args[3], dict(prev=kw["prev_attn"], prev2=kw.get("prev2_attn"), prev3=kw.get("prev3_attn"),
                                  delta=kw["delta_attn"], trend=kw["trend_attn"], coef=kw["coef_attn"])
    cache, generation = case.args[2], case.args[3]
    generations, g = cache.shape[0], int(generation[0, 0])
    history = reference.segment_history(generations, None if kw["coef"] is None else kw["coef"].shape[-1])
    previous = {name: cache[(g - j) % generations, 0, 0] if j <= history else None
                for j, name in enumerate(("prev", "prev2", "prev3"), start=1)}
    delta = None if kw["delta"] is None else kw["delta"][0, 0]
    trend = None if kw["trend"] is None else kw["trend"][0, 0]
    coef = kw["coef"][0, 0] if kw["coef"] is not None else (0.0, 0.0, 0.0)
    return cache[g, 0, 0], dict(previous, delta=delta, trend=trend, coef=coef)


def splitting_threshold(case) -> float:
    """A token threshold in a clear gap between the middle judgment scores of the case's first branch."""
    from eoc_kernels import reference

    cache, terms = first_branch(case)
    fhat = reference.corrected_feature(cache, **terms)
    scores = ((fhat - cache.float()).norm(dim=-1) / (cache.float().norm(dim=-1) + 1e-6)).flatten().sort().values
    middle = scores[len(scores) // 4: 3 * len(scores) // 4 + 1]
    if len(middle) < 2:
        return float(scores[len(scores) // 2]) * 0.999
    gap = int((middle[1:] - middle[:-1]).argmax())
    return float(middle[gap] + middle[gap + 1]) / 2


def parity_cases(plan):
    """The op parity cases (make_case options). Sized to keep the Triton compilations (one per
    constexpr flag set, dtype and integer specialization) to a minute or two on a fresh machine."""
    cases = []
    for op in common.OPS:
        coef_forms = (False, True) if op != "cached_segment" else (True,)  # a segment's coef is a tensor
        # Every shape × every dtype, every term, float coefficients, no threshold.
        for shape in plan.parity_shapes:
            for dtype in DTYPES:
                cases.append(dict(op=op, shape=shape, dtype=dtype, terms=common.ALL_TERMS))
        # Every set of terms at an odd shape, the dtypes taking turns.
        for index, terms in enumerate(TERM_SETS):
            cases.append(dict(op=op, shape=plan.odd_shape, dtype=DTYPES[index % 3], terms=terms))
        # Coefficients as floats / tensors × token threshold 0 as a tensor, a splitting threshold as a
        # float and as a tensor, at an odd shape with delta / trend heads H = 1; then tensor coefficients
        # with a splitting tensor threshold at H = B (B = 4) and at a DiT row (H = 2).
        for coef_tensor in coef_forms:
            for threshold, threshold_tensor in ((0.0, True), ("split", False), ("split", True)):
                cases.append(dict(op=op, shape=plan.heads_shape, dtype=torch.float16, terms=common.ALL_TERMS, heads=1,
                                  coef_tensor=coef_tensor, threshold=threshold, threshold_tensor=threshold_tensor))
        for shape, dtype, heads in ((plan.heads_shape, torch.bfloat16, plan.heads_shape[0]),
                                    (plan.dit_shape, torch.bfloat16, 2)):
            cases.append(dict(op=op, shape=shape, dtype=dtype, terms=common.ALL_TERMS, heads=heads, coef_tensor=True,
                              threshold="split", threshold_tensor=True))
        # Terms given with zero coefficients: their tensors must not change the result.
        for coef_tensor in coef_forms:
            cases.append(dict(op=op, shape=plan.odd_shape, dtype=torch.float32, terms=common.ALL_TERMS,
                              coef_scale=0.0, coef_tensor=coef_tensor))
    return cases


def history_case(op, batch, tokens, channels, dtype, device, *, history, pattern="full", blocks=4,
                 coef_tensor=False, token_threshold=0.0, threshold_tensor=False, heads=None, seed=0):
    """A K-history case of op (common.OpCase): every term (delta, trend, C_1..C_K) with
    coef = HISTORY_COEFS[pattern][:K + 2]; cached_segment over S = blocks with a ring of G = K + 1
    generations (random generation per entry, coef [S, 2, K + 2]). bytes_moved counts what an ideal
    kernel reads (a tensor used only by terms with zero coefficients is skipped) and writes."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    heads = heads if heads is not None else (2 if batch % 2 == 0 else 1)
    coef = HISTORY_COEFS[pattern][:history + 2]
    alpha, beta1, gamma, beta2, beta3 = (*coef, 0.0, 0.0)[:5]
    # C_j read when a term using it is on: C_1 by beta1, beta2; C_2 by beta2, beta3; C_3 by beta3.
    reads = [True, beta1 != 0 or beta2 != 0, beta2 != 0 or beta3 != 0, beta3 != 0][:history + 1]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    def feature(*shape):
        return randn(*shape).to(dtype)

    def history_tensors(*lead):  # C_0 .. C_K, each drifting from the one before
        tensors = [randn(*lead, batch, tokens, channels)]
        for _ in range(history):
            tensors.append(tensors[-1] - 0.3 * randn(*lead, batch, tokens, channels))
        return [tensor.to(dtype) for tensor in tensors]

    x = feature(batch, tokens, channels)
    threshold = torch.tensor([token_threshold], dtype=torch.float32, device=device) if threshold_tensor \
        else token_threshold
    shapes = {"B": batch, "N": tokens, "C": channels, "H": heads, "K": history}
    bytes_moved = 2 * common.tensor_bytes(x)  # x read, the output written

    def coef_arg(*lead):
        values = torch.tensor(coef, dtype=torch.float32, device=device)
        return values.expand(*lead, len(coef)).contiguous() if lead or coef_tensor else coef

    if op in ("cached_branch", "cached_block"):
        suffixes = [""] if op == "cached_branch" else ["_attn", "_mlp"]
        args, kwargs = [x], dict(token_threshold=threshold)
        gates, caches = [], []
        for suffix in suffixes:
            tensors = history_tensors()
            gate, delta = feature(batch, channels), 0.3 * feature(heads, tokens, channels)
            trend = (2 * torch.rand(heads, tokens, channels, generator=gen, device=device) - 1).to(dtype)
            gates.append(gate)
            caches.append(tensors[0])
            kwargs |= {f"prev{suffix}": tensors[1], f"delta{suffix}": delta, f"trend{suffix}": trend,
                       f"coef{suffix}": coef_arg()}
            kwargs |= {f"{name}{suffix}": tensor for name, tensor in zip(("prev2", "prev3"), tensors[2:])}
            bytes_moved += common.tensor_bytes(gate, *[t for t, read in zip(tensors, reads) if read])
            bytes_moved += common.tensor_bytes(*[t for t, c in ((delta, alpha), (trend, gamma)) if c != 0])
        return common.OpCase(op, tuple(args + gates + caches), kwargs, bytes_moved, shapes)
    generations = history + 1
    gates = feature(batch, blocks, 2, channels)
    tensors = history_tensors(blocks, 2)  # C_j of every entry: [S, 2, B, N, C]
    generation = torch.randint(0, generations, (blocks, 2), generator=gen, device=device, dtype=torch.int32)
    cache = torch.empty(generations, blocks, 2, batch, tokens, channels, dtype=dtype, device=device)
    for (s, k), g in zip(itertools.product(range(blocks), range(2)), generation.flatten().tolist()):
        for j, tensor in enumerate(tensors):  # C_j of entry (s, k) in generation (generation[s, k] - j) mod G
            cache[(g - j) % generations, s, k] = tensor[s, k]
    del tensors
    delta = 0.3 * feature(blocks, 2, heads, tokens, channels)
    trend = (2 * torch.rand(blocks, 2, heads, tokens, channels, generator=gen, device=device) - 1).to(dtype)
    per_generation = common.tensor_bytes(cache[0])
    bytes_moved += common.tensor_bytes(gates, *[t for t, c in ((delta, alpha), (trend, gamma)) if c != 0])
    bytes_moved += per_generation * sum(reads)
    shapes |= {"S": blocks, "G": generations}
    return common.OpCase(op, (x, gates, cache, generation),
                         dict(delta=delta, trend=trend, coef=coef_arg(blocks, 2), token_threshold=threshold),
                         bytes_moved, shapes)


def history_parity_cases(plan):
    """The K-history parity cases: per op, K = 2 and 3 at every dtype (odd shape and DiT row), float and
    tensor coefficients (cached_segment: a tensor), threshold 0 and a splitting tensor threshold, the
    zeros-between patterns."""
    cases = []
    for op in common.OPS:
        coef_forms = (False, True) if op != "cached_segment" else (True,)
        for history, dtype, shape in itertools.product(HISTORIES, DTYPES, (plan.odd_shape, plan.dit_shape)):
            cases.append(dict(op=op, shape=shape, dtype=dtype, history=history))
        for history, coef_tensor, threshold in itertools.product(HISTORIES, coef_forms, (0.0, "split")):
            cases.append(dict(op=op, shape=plan.heads_shape, dtype=torch.bfloat16, history=history,
                              coef_tensor=coef_tensor, threshold=threshold, threshold_tensor=threshold == "split"))
        for history, pattern in ((2, "zeros-between"), (3, "zeros-between-3")):
            for coef_tensor in coef_forms:
                cases.append(dict(op=op, shape=plan.odd_shape, dtype=torch.float32, history=history,
                                  pattern=pattern, coef_tensor=coef_tensor))
    return cases


def make_parity_case(plan, spec, seed, token_threshold=0.0):
    batch, tokens, channels = spec["shape"]
    if "history" in spec:
        return history_case(spec["op"], batch, tokens, channels, spec["dtype"], plan.device, history=spec["history"],
                            pattern=spec.get("pattern", "full"), blocks=plan.parity_blocks,
                            coef_tensor=spec.get("coef_tensor", False), token_threshold=token_threshold,
                            threshold_tensor=spec.get("threshold_tensor", False), heads=spec.get("heads"), seed=seed)
    return common.make_case(spec["op"], batch, tokens, channels, spec["dtype"], plan.device, terms=spec["terms"],
                            heads=spec.get("heads"), blocks=plan.parity_blocks,
                            coef_tensor=spec.get("coef_tensor", False), coef_scale=spec.get("coef_scale", 1.0),
                            threshold_tensor=spec.get("threshold_tensor", False), token_threshold=token_threshold,
                            seed=seed)


def run_parity_case(plan, spec, seed, backend="triton"):
    threshold = spec.get("threshold", 0.0)
    case = make_parity_case(plan, spec, seed)
    if threshold == "split":
        threshold = splitting_threshold(case)
        case = make_parity_case(plan, spec, seed, token_threshold=threshold)
    expected = case.run("torch")
    got = case.run(backend)
    tol = dict(TOLERANCES[spec["dtype"]])
    if spec["op"] == "cached_segment":  # a sum of 2·S rounded-fp32 entries
        tol["atol"] *= plan.parity_blocks
    error = (got.float() - expected.float()).abs()
    allowed = tol["atol"] + tol["rtol"] * expected.float().abs()
    ok = (got.dtype == expected.dtype and got.shape == expected.shape and bool(torch.isfinite(got).all())
          and bool((error <= allowed).all()))
    return ok, float(error.max()) if error.numel() else 0.0, threshold


def describe_case(spec, threshold):
    terms = "+".join(spec.get("terms", ())) or "none"
    if "history" in spec:
        terms = f"all, K={spec['history']}" + (f" {spec['pattern']}" if spec.get("pattern") else "")
    parts = [spec["op"], "x".join(map(str, spec["shape"])), common.dtype_name(spec["dtype"]), f"terms={terms}"]
    if spec.get("coef_scale", 1.0) == 0.0:
        parts.append("coef=0")
    if spec.get("heads") is not None:
        parts.append(f"H={spec['heads']}")
    if spec.get("coef_tensor"):
        parts.append("coef=tensor")
    if threshold:
        parts.append(f"threshold={threshold:.4g}" + ("(tensor)" if spec.get("threshold_tensor") else ""))
    elif spec.get("threshold_tensor"):
        parts.append("threshold=0(tensor)")
    return " ".join(parts)


def op_parity(plan, results):
    failures = 0
    log(plan.cuda_note)
    for backend in plan.fused_backends:
        start = time.perf_counter()
        specs = parity_cases(plan) + history_parity_cases(plan)
        backend_failures = 0
        for index, spec in enumerate(specs):
            try:
                ok, max_error, threshold = run_parity_case(plan, spec, seed=index, backend=backend)
                note = f"max abs error {max_error:.3g}"
            except Exception as error:  # a crash is a failure of that case, not of the run
                ok, max_error, threshold = False, None, spec.get("threshold", 0.0)
                note = f"{type(error).__name__}: {error}"
            label = describe_case(spec, threshold if isinstance(threshold, float) else 0.0)
            results["parity"].append(dict(kind="op", backend=backend, case=label, ok=ok, max_error=max_error,
                                          note=note))
            if not ok:
                backend_failures += 1
                log(f"  FAIL {backend} {label}: {note}")
        log(f"op parity ({backend}): {len(specs) - backend_failures}/{len(specs)} PASS "
            f"({time.perf_counter() - start:.0f} s)")
        failures += backend_failures
    return failures


def relative_error(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def sampler_parity(plan, results):
    """The patched DiT sampler, each fused backend (triton, and cuda where built) vs torch: fp32 within 1e-4
    relative; fp16 / bf16 at most twice the same-dtype eager error against fp32 (plus 1e-3)."""
    from eoc_dit import DDIMSampler, EOCConfig, FORASchedule, apply_eoc

    start = time.perf_counter()
    failures = total = 0
    for name, shapes, dtypes, steps, interval in plan.sampler_models:
        model32 = common.random_dit(shapes, plan.device, torch.float32, seed=1)
        sampler = DDIMSampler(steps)
        needs_prior = any(v.startswith(("trend", "delta")) for v in SAMPLER_VARIANTS)
        prior = common.calibrate_prior(model32, sampler, interval, plan.device) if needs_prior and \
            shapes is not common.XL_SHAPES else None
        gen = torch.Generator().manual_seed(3)
        noise = torch.randn(2, model32.in_channels, model32.input_size, model32.input_size,
                            generator=gen).to(plan.device)
        labels = common.class_labels(model32, 2, plan.device, cfg=False)
        configs = {"plain": None, "extrapolate": EOCConfig(mode="extrapolate"),
                   "trend": EOCConfig(mode="trend", min_gain=None),
                   "delta+threshold": EOCConfig(mode="delta", min_gain=None, token_threshold=0.05)}

        def sample(model, variant, backend):
            # Called within this iteration only: the loop variables it reads are the current ones.
            with common.backend_env(backend), apply_eoc(model, FORASchedule(interval),  # noqa: B023
                                                        prior if variant in ("trend", "delta+threshold")  # noqa: B023
                                                        else None, configs[variant]):  # noqa: B023
                return sampler.sample(model, noise, labels, cfg_scale=4.0)  # noqa: B023

        for dtype in dtypes:
            model = model32 if dtype == torch.float32 else common.cast_model(copy.deepcopy(model32), dtype)
            for variant, backend in itertools.product(SAMPLER_VARIANTS, plan.fused_backends):
                if prior is None and variant in ("trend", "delta+threshold"):
                    continue
                total += 1
                label = (f"sampler {name} {common.dtype_name(dtype)} FORA N={interval} DDIM-{steps} {variant}"
                         f"{'' if backend == 'triton' else f' ({backend})'}")
                try:
                    fused, eager = sample(model, variant, backend), sample(model, variant, "torch")
                    if dtype == torch.float32:
                        error, allowed = relative_error(fused, eager), 1e-4
                        note = f"rel err {backend} vs torch {error:.2e} (allowed {allowed:.0e})"
                    else:
                        exact = sample(model32, variant, "torch")
                        error, eager_error = relative_error(fused, exact), relative_error(eager, exact)
                        allowed = 2 * eager_error + 1e-3
                        note = (f"rel err vs fp32: {backend} {error:.2e}, torch {eager_error:.2e} "
                                f"(allowed {allowed:.2e})")
                    ok = bool(torch.isfinite(fused).all()) and error <= allowed
                except Exception as exc:
                    ok, note = False, f"{type(exc).__name__}: {exc}"
                results["parity"].append(dict(kind="sampler", backend=backend, case=label, ok=ok, note=note))
                if not ok:
                    failures += 1
                log(f"  {'PASS' if ok else 'FAIL'} {label}: {note}")
            del model
        del model32
    log(f"sampler parity: {total - failures}/{total} PASS ({time.perf_counter() - start:.0f} s)")
    return failures


# ----------------------------------------------------------------------------------------------
# (b) timings
# ----------------------------------------------------------------------------------------------


def block_timings(plan, results, copy_bw):
    """cached_block: fused (triton) vs eager reference vs torch.compile(reference) vs bytes ÷ copy bandwidth."""
    dtype = torch.bfloat16
    shapes = common.describe_shapes(plan.model_shapes)
    compile_backend = "eager" if plan.dry_run else "inductor"  # the dry run only traces
    for batch in plan.block_batches:
        for correction in ("extrapolate", "all"):
            case = common.make_case("cached_block", batch, shapes["N"], shapes["C"], dtype, plan.device,
                                    terms=common.CORRECTIONS[correction])
            variants = {f"fused ({backend})": lambda case=case, backend=backend: case.run(backend)
                        for backend in plan.fused_backends}
            variants["eager (torch)"] = lambda case=case: case.run("torch")
            if correction == "extrapolate":
                variants["torch.compile(reference)"] = torch.compile(case.run_reference, dynamic=False,
                                                                     backend=compile_backend)
            eager = None
            for name, fn in variants.items():
                seconds = common.time_call(fn, plan.device, repeats=plan.repeats, warmup=2, inner=plan.inner)
                eager = seconds if name.startswith("eager") else eager
                results["cached_block"].append(dict(batch=batch, correction=correction, variant=name, ms=seconds * 1e3,
                                                    bytes_moved=case.bytes_moved,
                                                    gbps=common.gbps(case.bytes_moved, seconds),
                                                    pct_copy_bw=100 * case.bytes_moved / seconds / copy_bw))
            results["cached_block"].append(dict(batch=batch, correction=correction, variant="bytes ÷ copy bandwidth",
                                                ms=case.bytes_moved / copy_bw * 1e3, bytes_moved=case.bytes_moved,
                                                gbps=copy_bw / 1e9, pct_copy_bw=100.0))
            for row in results["cached_block"]:
                if row["batch"] == batch and row["correction"] == correction:
                    row["speedup_vs_eager"] = eager * 1e3 / row["ms"]
            del case


def history_timings(plan, results, copy_bw):
    """The K-history ops, bf16, K = 2 and 3 (every term): cached_block, and cached_segment over every block
    of the model with a ring of K + 1 generations; fused backends vs the eager reference vs bytes ÷ copy
    bandwidth (bytes: what an ideal kernel reads and writes)."""
    dtype = torch.bfloat16
    shapes = common.describe_shapes(plan.model_shapes)
    for op, batch, history in itertools.product(("cached_block", "cached_segment"), plan.block_batches, HISTORIES):
        case = history_case(op, batch, shapes["N"], shapes["C"], dtype, plan.device, history=history,
                            blocks=shapes["L"], coef_tensor=True)
        variants = {f"fused ({backend})": lambda case=case, backend=backend: case.run(backend)
                    for backend in plan.fused_backends}
        variants["eager (torch)"] = lambda case=case: case.run("torch")
        rows = []
        for name, fn in variants.items():
            seconds = common.time_call(fn, plan.device, repeats=plan.repeats, warmup=2,
                                       inner=plan.inner if op == "cached_block" else 1)
            rows.append(dict(op=op, batch=batch, history=history, variant=name, ms=seconds * 1e3,
                             bytes_moved=case.bytes_moved, gbps=common.gbps(case.bytes_moved, seconds),
                             pct_copy_bw=100 * case.bytes_moved / seconds / copy_bw))
        rows.append(dict(op=op, batch=batch, history=history, variant="bytes ÷ copy bandwidth",
                         ms=case.bytes_moved / copy_bw * 1e3, bytes_moved=case.bytes_moved, gbps=copy_bw / 1e9,
                         pct_copy_bw=100.0))
        eager_ms = next(row["ms"] for row in rows if row["variant"] == "eager (torch)")
        for row in rows:
            row["speedup_vs_eager"] = eager_ms / row["ms"]
        results["history"] += rows
        del case
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()


def _capture(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs recommends
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph, out


def _reason(error) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def capture_graph(fn, device, model):
    """(graph, static output, note, keep-alive): captures fn in a CUDA graph; if that fails, once more
    with the DiT's timestep table kept on the device (common.graph_safe_timestep_embedding; the
    keep-alive holds that table for the graph's lifetime). graph is None when both fail; note says
    what happened (None: the plain capture worked)."""
    if device.type != "cuda":
        return None, None, "no CUDA device (dry run)", None
    try:
        graph, out = _capture(fn)
        return graph, out, None, None
    except Exception as error:
        first = _reason(error)
    try:
        torch.cuda.synchronize()
    except Exception:
        pass
    try:
        with common.graph_safe_timestep_embedding(model) as tables:
            graph, out = _capture(fn)
        return (graph, out, f"plain capture failed ({first}); captured with the timestep table kept on the device",
                tables)
    except Exception as error:
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        return None, None, f"capture failed: {first}; with the timestep table on the device: {_reason(error)}", None


def step_timings(plan, results, model):
    """One forward: the full step and a reuse step (every block reused: one gate matmul + one
    cached_segment, as a FORA cached step; eager / fused, plain / EOC), each plain and replayed from a
    CUDA graph (whose output is checked against an eager call of the same step)."""
    from eoc_dit import EOCConfig, apply_eoc

    dtype = next(model.parameters()).dtype
    variants = [("FORA plain reuse, eager", "torch", None), ("FORA plain reuse, fused", "triton", None),
                ("FORA + EOC extrapolate, eager", "torch", EOCConfig(mode="extrapolate")),
                ("FORA + EOC extrapolate, fused", "triton", EOCConfig(mode="extrapolate"))]
    if "cuda" in plan.fused_backends:  # the CUDA C++ cached_segment
        variants += [("FORA plain reuse, fused (cuda)", "cuda", None),
                     ("FORA + EOC extrapolate, fused (cuda)", "cuda", EOCConfig(mode="extrapolate"))]
    for rows in plan.batches:
        inputs = common.StepInputs(model, rows, plan.device, dtype)
        runs = [("full step (uncached)", None, None, inputs.full_step(model))]
        runs += [(name, backend, config, None) for name, backend, config in variants]
        full = {}
        for name, backend, config, full_fn in runs:
            row = dict(rows=rows, variant=name)
            with common.backend_env(backend), \
                    (apply_eoc(model, common.step_schedule(model.depth), None, config) if full_fn is None
                     else contextlib.nullcontext()) as handle:
                fn = full_fn or common.ReuseStep(handle, inputs).fill()
                with torch.no_grad():
                    row["ms"] = common.time_call(fn, plan.device, repeats=plan.repeats, warmup=2) * 1e3
                    graph, static_out, note, keep_alive = capture_graph(fn, plan.device, model)
                    row["graph_ms"], row["graph_note"] = None, note
                    if graph is not None:
                        row["graph_ms"] = common.time_call(graph.replay, plan.device, repeats=plan.repeats,
                                                           warmup=2) * 1e3
                        eager_out = fn.again() if full_fn is None else fn()  # the step the graph holds
                        row["graph_matches_eager"] = bool(torch.allclose(static_out.float(), eager_out.float(),
                                                                         atol=1e-2, rtol=1e-2))
                        del eager_out
                    del graph, static_out, keep_alive
            if full_fn is not None:
                full = row
            row["ratio_to_full"] = row["ms"] / full["ms"]
            if row.get("graph_ms") and full.get("graph_ms"):
                row["graph_ratio_to_full_graph"] = row["graph_ms"] / full["graph_ms"]
            results["step"].append(row)
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()


def sampling_timings(plan, results, model):
    """DDIM sampling of plan.sampling_images images with CFG: uncached vs FORA N=2/3 ± EOC extrapolate."""
    from eoc_dit import DDIMSampler, EOCConfig, FORASchedule, apply_eoc

    steps, images = plan.sampling_steps, plan.sampling_images
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(images, model.in_channels, model.input_size, model.input_size, generator=gen).to(plan.device)
    labels = common.class_labels(model, images, plan.device, cfg=False)
    sampler = DDIMSampler(steps)
    run = lambda: sampler.sample(model, noise, labels, cfg_scale=4.0)  # noqa: E731
    uncached = common.time_call(run, plan.device, repeats=plan.sampling_repeats, warmup=1)
    results["sampling"].append(dict(variant="uncached", backend=None, full_steps=steps, ms=uncached * 1e3,
                                    speedup=1.0, ideal=1.0, pct_of_ideal=100.0))
    for interval in (2, 3):
        schedule = FORASchedule(interval)
        computing = common.full_steps(schedule, steps, model.depth)
        for label, config, backend in (("plain reuse", None, "triton"),
                                       ("EOC extrapolate, fused", EOCConfig(mode="extrapolate"), "triton"),
                                       ("EOC extrapolate, eager", EOCConfig(mode="extrapolate"), "torch")):
            with common.backend_env(backend), apply_eoc(model, schedule, config=config):
                seconds = common.time_call(run, plan.device, repeats=plan.sampling_repeats, warmup=1)
            speedup = uncached / seconds
            results["sampling"].append(dict(variant=f"FORA N={interval}, {label}", backend=backend,
                                            full_steps=computing, ms=seconds * 1e3, speedup=speedup,
                                            ideal=steps / computing,
                                            pct_of_ideal=100 * speedup / (steps / computing)))


# ----------------------------------------------------------------------------------------------
# (c) report
# ----------------------------------------------------------------------------------------------


def markdown(plan, results) -> str:
    dry = plan.dry_run
    env = results["environment"]
    shapes = common.describe_shapes(plan.model_shapes)
    lines = [f"# GPU checks — {env['device']}", "",
             f"{common.environment_line(env)} · CUDA {env['cuda']} · `benchmarks/gpu/run_gpu_checks.py`"
             + (" · DRY RUN (CPU, Triton interpreter; no numbers)" if dry else ""), ""]
    parity = results["parity"]
    passed = sum(r["ok"] for r in parity)
    lines += [f"## Parity: {passed}/{len(parity)} PASS", "", f"{results.get('cuda_backend', '')}.", ""]
    ops = [r for r in parity if r["kind"] == "op"]
    for backend in dict.fromkeys(r.get("backend", "triton") for r in ops):
        mine = [r for r in ops if r.get("backend", "triton") == backend]
        lines += [f"Ops ({backend} vs torch reference): {sum(r['ok'] for r in mine)}/{len(mine)} PASS; largest "
                  f"|error| {fmt(max((r['max_error'] or 0) for r in mine), '.3g', dry)}.", ""]
    failed = [r for r in ops if not r["ok"]]
    if failed:
        lines += ["| backend | failed case | note |", "|---|---|---|"]
        lines += [f"| {r.get('backend', 'triton')} | {cell(r['case'])} | {cell(r['note'])} |" for r in failed] + [""]
    samplers = [r for r in parity if r["kind"] == "sampler"]
    if samplers:
        lines += ["| sampler case | result | note |", "|---|---|---|"]
        lines += [f"| {cell(r['case'])} | {'PASS' if r['ok'] else 'FAIL'} | {cell(r['note']) if not dry else '(dry)'} |"
                  for r in samplers] + [""]
    if results["history"]:
        lines += [f"## K-history ops — N={shapes['N']}, C={shapes['C']}, bf16, every term, tensor coefficients; "
                  f"cached_segment over {shapes['L']} blocks, a ring of K + 1 generations", "",
                  "| op | batch | K | variant | µs | GB/s | % of copy BW | speedup vs eager |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['batch']} | {r['history']} | {r['variant']} | {fmt(r['ms'] * 1e3, '.1f', dry)} | "
                  f"{fmt(r['gbps'], '.0f', dry)} | {fmt(r['pct_copy_bw'], '.0f', dry)} | "
                  f"{fmt(r.get('speedup_vs_eager'), '.2f', dry)} |" for r in results["history"]] + [""]
    if results["cached_block"]:
        lines += [f"## cached_block — N={shapes['N']}, C={shapes['C']}, bf16 "
                  f"(copy bandwidth {fmt(results['copy_bandwidth_gbps'], '.0f', dry)} GB/s)", "",
                  "| batch | correction | variant | µs | GB/s | % of copy BW | speedup vs eager |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['correction']} | {r['variant']} | {fmt(r['ms'] * 1e3, '.1f', dry)} | "
                  f"{fmt(r['gbps'], '.0f', dry)} | {fmt(r['pct_copy_bw'], '.0f', dry)} | "
                  f"{fmt(r.get('speedup_vs_eager'), '.2f', dry)} |"
                  for r in results["cached_block"]] + [""]
    graph_notes = set()
    if results["step"]:
        lines += [f"## One step — {shapes['L']} blocks, N={shapes['N']}, C={shapes['C']}, bf16; "
                  "cached = a step reusing every block", "",
                  "rows = the model's batch (rows/2 images with CFG). A cached step is one gate matmul + one "
                  "cached_segment over all blocks (what FORA's cached steps are). graph = the same forward replayed "
                  "from a CUDA graph.", "",
                  "| rows | variant | ms | ratio to full step | graph ms | graph ratio to full-step graph |",
                  "|---|---|---|---|---|---|"]
        for r in results["step"]:
            graph = fmt(r.get("graph_ms"), ".3f", dry) if r.get("graph_ms") or dry else cell(r.get("graph_note"))
            if r.get("graph_matches_eager") is False:
                graph += " (replay output ≠ eager output!)"
            if r.get("graph_ms") and r.get("graph_note"):
                graph += " ¹"
                graph_notes.add(r["graph_note"])
            lines.append(f"| {r['rows']} | {r['variant']} | {fmt(r['ms'], '.3f', dry)} | "
                         f"{fmt(r['ratio_to_full'], '.3f', dry)} | {graph} | "
                         f"{fmt(r.get('graph_ratio_to_full_graph'), '.3f', dry)} |")
        lines.append("")
        lines += [f"¹ {cell(note)}" for note in sorted(graph_notes)] + ([""] if graph_notes else [])
    if results["sampling"]:
        lines += [f"## Sampling — DDIM-{plan.sampling_steps}, {plan.sampling_images} images with CFG "
                  f"({2 * plan.sampling_images} rows), bf16", "",
                  "| variant | steps computing | s | speedup vs uncached | ideal (steps ÷ computing) | % of ideal |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['full_steps']} | {fmt(r['ms'] / 1e3, '.3f', dry)} | "
                  f"{fmt(r['speedup'], '.2f', dry)} | {r['ideal']:.2f} | {fmt(r['pct_of_ideal'], '.0f', dry)} |"
                  for r in results["sampling"]] + [""]
    for section, error in results["errors"].items():
        lines += [f"## {section}: crashed", "", "```", error.strip(), "```", ""]
    lines.append(f"Run time {results['runtime_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def write_results(plan, results, text, out_dirs):
    env = results["environment"]
    stem = f"gpu-checks-{common.machine_id(plan.device)}-{env['date'][:10]}"
    for folder in out_dirs:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, stem + ".md"), "w") as f:
            f.write(text)
        with open(os.path.join(folder, stem + ".json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        log(f"wrote {os.path.join(folder, stem)}.md / .json")


def main(args) -> int:
    start = time.perf_counter()
    plan = Plan(args.dry_run)
    if not args.dry_run and not torch.cuda.is_available():
        log("no CUDA device: run on a GPU machine, or use --dry-run on CPU")
        return 2
    import eoc_kernels

    if "triton" not in eoc_kernels.available_backends(plan.device):
        log(f"the triton backend is not available on {plan.device} (dry run: set TRITON_INTERPRET=1 before python)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32
    if plan.dry_run:
        torch.set_num_threads(1)  # tiny tensors: a second intra-op thread only spins on a shared CPU
    results = dict(environment=common.environment(plan.device), dry_run=plan.dry_run, parity=[], cached_block=[],
                   history=[],
                   step=[], sampling=[], errors={}, copy_bandwidth_gbps=None, cuda_backend=plan.cuda_note)
    log(f"{common.environment_line(results['environment'])}{' · DRY RUN' if plan.dry_run else ''}")
    failures = 0
    if "parity" not in args.skip:
        failures += op_parity(plan, results)
        failures += sampler_parity(plan, results)
    copy_bw = common.copy_bandwidth(plan.device, repeats=plan.repeats, nbytes=2**20 if plan.dry_run else None)
    results["copy_bandwidth_gbps"] = copy_bw / 1e9
    model = None
    # The step and sampling sections read `model` late on purpose: it is built by the first of them to run.
    for section, run in (("block", lambda: block_timings(plan, results, copy_bw)),
                         ("history", lambda: history_timings(plan, results, copy_bw)),
                         ("step", lambda: step_timings(plan, results, model)),  # noqa: B023
                         ("sampling", lambda: sampling_timings(plan, results, model))):  # noqa: B023
        if section in args.skip:
            continue
        if model is None and section in ("step", "sampling"):
            model = common.random_dit(plan.model_shapes, plan.device, torch.bfloat16)
        section_start = time.perf_counter()
        try:
            run()
            log(f"{section} timings done ({time.perf_counter() - section_start:.0f} s)")
        except Exception:
            results["errors"][section] = traceback.format_exc()
            log(f"{section} timings CRASHED:\n{results['errors'][section]}")
    results["runtime_s"] = time.perf_counter() - start
    text = markdown(plan, results)
    log("")
    log(text)
    if not plan.dry_run:
        write_results(plan, results, text, [common.RESULTS_DIR] + ([args.out] if args.out else []))
    if failures:
        log(f"FAIL: {failures} parity check(s) failed")
        return 1
    if results["errors"]:
        log(f"ERROR: timing section(s) crashed: {', '.join(results['errors'])}")
        return 2
    log("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
