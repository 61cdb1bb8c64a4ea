"""Ahead-of-time compiles the Triton kernels' variants for sm_80 and sm_90 and tabulates their resources; no GPU.

    python benchmarks/gpu/aot_compile.py                 # the table: about 700 variants
    python benchmarks/gpu/aot_compile.py --subset ci     # what CI compiles (tests/eoc_kernels/test_aot_compile.py)
    python benchmarks/gpu/aot_compile.py --subset all    # every distinct kernel (thousands: hours on 2 cores)

Which variants: the launchers' own code decides. Each op's ``_launch`` runs on meta tensors (no data, no device)
with its ``@triton.jit`` kernel replaced by a recorder, over every input form the public op accepts (each optional
term given or not, the history prev / prev2 / prev3 without gaps; coefficients as 5 Python floats, each zero or not,
or as a tensor of length P = 3, 4 or 5; the token threshold as a float <= 0, a float > 0 or a tensor; for
cached_segment a ring of G in {1, 2, 3, 4}, coef None or a tensor [S, 2, P], S in {1, 3}), at every dtype
(fp32 / fp16 / bf16) and DiT width C in {256, 384, 768, 1024, 1152, 4096} (B = 2, N = 256, H = 1). BLOCK_M,
BLOCK_C, WHOLE_ROWS, num_warps, the register budget and every constexpr flag therefore come from ``pick_blocks``
and the launchers' flag logic (``branch_launch_args``, ``needs_whole_rows``): the table cannot drift from the code.
Each recorded launch then goes through Triton's own JIT binder for the target (``create_function_from_signature``
and ``JITFunction._pack_args``, as ``JITFunction.run`` does), so the specialization is the JIT's: 16-byte
divisibility of pointers and integers, integers equal to 1 (unit strides, S = 1) as constexprs. Launches that give
the same kernel (signature, constexprs, attributes, options) are compiled once.

Subsets (the counts of each are printed and recorded):
- ci: the widest variant (every term with the full K = 3 history, tensor coefficients of length 5; cached_segment:
  G = 4, P = 5, delta and trend, S = 3) of each kernel in both row modes (chunked: threshold 0; whole rows: a tensor
  threshold) at every dtype, width and arch: where register pressure, and so a spill, would show first. Plus, at
  C = 1152, the widest three-coefficient variant (P = 3; cached_segment G = 2), the kernel as it was before the K
  history.
- table (default): the widest variants (K = 3 and P = 3) with every threshold form, at every dtype, width and arch;
  plus, at C = 1152 in bf16, every flag state of every kernel (cached_block: the pairs of branch states reduced to
  those with both branches alike or one branch off).
- all: every distinct kernel the launchers produce at these shapes (cached_block: all pairs).

Per variant: registers, spill stores / loads and stack frame (from ``ptxas -v``, which Triton runs), local and
shared memory (``cuobjdump --dump-resource-usage``), the global load / store widths in the SASS (``--dump-sass``;
LDG.E.128 = 128 bits per thread) and the compile time (front end + ptxas; Triton's cache is a fresh directory).
Writes Markdown + JSON (``--out STEM``, default benchmarks/results/aot-compile-<date>); ``--compare OLD.json``
adds C = 1152 before / after figures; ``--render NEW.json`` rewrites the Markdown of a run without compiling.
Exit status 1 with ``--fail-on-spill`` if a variant spills, 2 if one fails to compile.

Needs only the triton wheel: its bundled ptxas (sm_80), ptxas-blackwell (which Triton uses for sm_90a) and
cuobjdump under triton/backends/nvidia/bin; a missing one raises, naming it. TRITON_INTERPRET is turned off for
this process (the interpreter compiles nothing).
"""

from __future__ import annotations

import argparse
import atexit
import collections
import concurrent.futures
import contextlib
import datetime
import io
import itertools
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: real JITFunctions, not the interpreter's
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton runs ptxas -v; this prints its log (spill bytes)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="eoc-aot-cache-")  # nothing cached: real compile times
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)  # the forked workers skip it
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from eoc_kernels import _library  # noqa: E402
from eoc_kernels.triton import _block, _branch, _common, _segment  # noqa: E402

ARCHS = (80, 90)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WIDTHS = (256, 384, 768, 1024, 1152, 4096)  # DiT-S (384), -B (768), -L (1024), -XL (1152); 256 and 4096 bound them
SWEEP_WIDTH, SWEEP_DTYPE = 1152, "bf16"  # the table's every-flag sweep
BATCH, TOKENS, HEADS = 2, 256, 1
SEGMENT_BLOCKS = (1, 3)  # the JIT specializes S = 1 (no loop over blocks) apart from S > 1
THRESHOLDS = {"0": 0.0, "0.5": 0.5, "tensor": "tensor"}  # no judgment, judgment by a float, by a tensor
TERMS = ("delta", "prev", "trend", "prev2", "prev3")  # coefficient order: alpha, beta1, gamma, beta2, beta3
COEF_LENGTHS = (3, 4, 5)
GENERATIONS = (1, 2, 3, 4)
KERNELS = {"cached_branch": (_branch, "_cached_branch_kernel"),
           "cached_block": (_block, "_cached_block_kernel"),
           "cached_segment": (_segment, "_cached_segment_kernel")}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TOOLS = ("ptxas", "ptxas-blackwell", "cuobjdump")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", choices=("ci", "table", "all"), default="table")
    parser.add_argument("--op", action="append", choices=tuple(KERNELS), help="only these ops (repeatable)")
    parser.add_argument("--width", action="append", type=int, choices=WIDTHS, help="only these C (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPUs)")
    parser.add_argument("--out", help="output stem (default benchmarks/results/aot-compile-<date>)")
    parser.add_argument("--json-only", action="store_true", help="write only <out>.json")
    parser.add_argument("--compare", help="a JSON written by this script for older kernels: C = 1152 before / after")
    parser.add_argument("--fail-on-spill", action="store_true", help="exit status 1 if any variant spills")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the Markdown of a JSON this script wrote")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Variants: the launchers' launches, recorded
# --------------------------------------------------------------------------------------------------

class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


@contextlib.contextmanager
def recorded(module, name):
    """Replaces module.<name> (the kernel its _launch calls) by a recorder for the duration."""
    kernel, recorder = getattr(module, name), _Recorder()
    setattr(module, name, recorder)
    try:
        yield recorder
    finally:
        setattr(module, name, kernel)


def meta(dtype, *shape):
    return torch.empty(shape, dtype=dtype, device="meta")


def coef_forms():
    """(label, public coef): a tensor of each length P, or 5 Python floats with each coefficient zero or not."""
    for length in COEF_LENGTHS:
        yield f"tensor[{length}]", meta(torch.float32, length)
    for nonzero in itertools.product((False, True), repeat=len(TERMS)):
        yield "floats " + "".join("1" if on else "0" for on in nonzero), tuple(0.5 if on else 0.0 for on in nonzero)


def threshold_arg(form):
    return meta(torch.float32, 1) if form == "tensor" else THRESHOLDS[form]


WIDEST_STATE = ((True,) * 5, True)  # every term with the K = 3 history, tensor coefficients (P = 5)
WIDEST3_STATE = ((True,) * 3 + (False,) * 2, True)  # every term of P = 3 (tensor coefficients): the kernel before K
OFF_STATE = ((False,) * 5, False)  # no term


def branch_states(x, channels, dtype):
    """One branch's distinct launch states: {(flags, coef_is_tensor): (label, tensors, coef)}.

    Every combination of given terms and coefficient forms, reduced by the launchers' own flag logic
    (``branch_launch_args``) to the states that give different kernels.
    """
    full = dict(prev=meta(dtype, BATCH, TOKENS, channels), delta=meta(dtype, HEADS, TOKENS, channels),
                trend=meta(dtype, HEADS, TOKENS, channels), prev2=meta(dtype, BATCH, TOKENS, channels),
                prev3=meta(dtype, BATCH, TOKENS, channels))
    states = {}
    for given in itertools.product((False, True), repeat=len(TERMS)):
        tensors = {term: full[term] if on else None for term, on in zip(TERMS, given)}
        if (tensors["prev2"] is not None and tensors["prev"] is None) or (
                tensors["prev3"] is not None and tensors["prev2"] is None):
            continue  # the public op refuses a gap in the history
        for coef_label, coef in coef_forms():
            values, tensor = _library.split_coef(coef)
            launch = _common.branch_launch_args(x, tensors["prev"], tensors["prev2"], tensors["prev3"],
                                                tensors["delta"], tensors["trend"], values, tensor)
            label = "+".join(term for term, on in zip(TERMS, given) if on) or "none"
            states.setdefault((launch["flags"], launch["coef_is_tensor"]), (f"{label} / coef {coef_label}",
                                                                             tensors, coef))
    return states


def branch_launches(channels, dtype, every_pair):
    x = meta(dtype, BATCH, TOKENS, channels)
    for key, (label, tensors, coef) in branch_states(x, channels, dtype).items():
        values, tensor = _library.split_coef(coef)
        for form in THRESHOLDS:
            threshold_value, threshold_tensor = _library.split_threshold(threshold_arg(form))
            with recorded(_branch, "_cached_branch_kernel") as recorder:
                _branch._launch(meta(dtype, BATCH, TOKENS, channels), x, meta(dtype, BATCH, channels),
                                meta(dtype, BATCH, TOKENS, channels), tensors["prev"], tensors["prev2"],
                                tensors["prev3"], tensors["delta"], tensors["trend"], values, tensor, threshold_value,
                                threshold_tensor)
            yield dict(case=f"{label} / threshold {form}", widest=key == WIDEST_STATE,
                       widest3=key == WIDEST3_STATE, threshold=form), recorder.launches


def block_launches(channels, dtype, every_pair):
    x = meta(dtype, BATCH, TOKENS, channels)
    states = branch_states(x, channels, dtype)
    for (key_a, state_a), (key_m, state_m) in itertools.product(states.items(), repeat=2):
        if not (every_pair or key_a == key_m or OFF_STATE in (key_a, key_m)):
            continue
        (label_a, tensors_a, coef_a), (label_m, tensors_m, coef_m) = state_a, state_m
        values_a, tensor_a = _library.split_coef(coef_a)
        values_m, tensor_m = _library.split_coef(coef_m)
        for form in THRESHOLDS:
            threshold_value, threshold_tensor = _library.split_threshold(threshold_arg(form))
            cache = meta(dtype, BATCH, TOKENS, channels)
            gate = meta(dtype, BATCH, channels)
            with recorded(_block, "_cached_block_kernel") as recorder:
                _block._launch(meta(dtype, BATCH, TOKENS, channels), x, gate, gate, cache, cache,
                               tensors_a["prev"], tensors_m["prev"], tensors_a["prev2"], tensors_m["prev2"],
                               tensors_a["prev3"], tensors_m["prev3"], tensors_a["delta"], tensors_m["delta"],
                               tensors_a["trend"], tensors_m["trend"], values_a + values_m, tensor_a, tensor_m,
                               threshold_value, threshold_tensor)
            yield dict(case=f"attn {label_a} | mlp {label_m} / threshold {form}",
                       widest=key_a == key_m == WIDEST_STATE, widest3=key_a == key_m == WIDEST3_STATE,
                       threshold=form), recorder.launches


def segment_launches(channels, dtype, every_pair):
    x = meta(dtype, BATCH, TOKENS, channels)
    for blocks, generations, length, has_delta, has_trend, form in itertools.product(
            SEGMENT_BLOCKS, GENERATIONS, (None, *COEF_LENGTHS), (False, True), (False, True), THRESHOLDS):
        has_coef = length is not None
        prior = (blocks, 2, HEADS, TOKENS, channels)
        threshold_value, threshold_tensor = _library.split_threshold(threshold_arg(form))
        with recorded(_segment, "_cached_segment_kernel") as recorder:
            _segment._launch(meta(dtype, BATCH, TOKENS, channels), x, meta(dtype, BATCH, blocks, 2, channels),
                             meta(dtype, generations, blocks, 2, BATCH, TOKENS, channels),
                             meta(torch.int32, blocks, 2), meta(dtype, *prior) if has_delta else None,
                             meta(dtype, *prior) if has_trend else None,
                             meta(torch.float32, blocks, 2, length) if has_coef else None, threshold_value,
                             threshold_tensor)
        terms = "+".join(name for name, on in (("delta", has_delta), ("trend", has_trend)) if on) or "none"
        full = has_coef and has_delta and has_trend and blocks > 1
        yield dict(case=f"S={blocks} G={generations} coef {f'tensor[S, 2, {length}]' if has_coef else 'None'} / "
                        f"{terms} / threshold {form}", widest=full and generations == 4 and length == 5,
                   widest3=full and generations == 2 and length == 3, threshold=form), recorder.launches


LAUNCHES = {"cached_branch": branch_launches, "cached_block": block_launches, "cached_segment": segment_launches}


def selected(subset, case, channels, dtype_name):
    if subset == "ci":
        chosen = case["widest"] or (case["widest3"] and channels == SWEEP_WIDTH)
        return chosen and case["threshold"] in ("0", "tensor")
    if subset == "table":
        return case["widest"] or case["widest3"] or (channels == SWEEP_WIDTH and dtype_name == SWEEP_DTYPE)
    return True


_BINDERS = {}


def specialize(kernel, args, kwargs, capability):
    """(options, signature, constexprs, attrs) as Triton's JIT derives them for this launch on the target."""
    if (kernel, capability) not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", capability, 32))
        _BINDERS[kernel, capability] = backend, create_function_from_signature(kernel.signature, kernel.params,
                                                                               backend)
    backend, binder = _BINDERS[kernel, capability]
    bound_args, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound_args, specialization, options)


def variants(subset, ops, widths):
    """({key: variant} of the distinct kernels selected, launches recorded per op, distinct kernels per op)."""
    found, counts, distinct = {}, collections.Counter(), collections.defaultdict(set)
    for op in ops:
        module, name = KERNELS[op]
        kernel = getattr(module, name)
        names = [param.name for param in kernel.params]
        flag_names = [param.name for param in kernel.params if param.is_constexpr]
        for channels, (dtype_name, dtype) in itertools.product(widths, DTYPES.items()):
            for case, recorded_launches in LAUNCHES[op](channels, dtype, subset == "all"):
                if not selected(subset, case, channels, dtype_name):
                    continue
                for (args, kwargs), capability in itertools.product(recorded_launches, ARCHS):
                    counts[op] += 1
                    options, signature, constexprs, attrs = specialize(kernel, args, kwargs, capability)
                    key = json.dumps([op, capability, signature, sorted((k, repr(v)) for k, v in constexprs.items()),
                                      sorted(attrs.items()), repr(options)])
                    distinct[op].add(key)
                    variant = found.get(key)
                    if variant is None:
                        variant = found[key] = dict(
                            op=op, kernel=name, arch=f"sm_{capability}", dtype=dtype_name, widths=[],
                            flags={flag: constexprs[(names.index(flag),)] for flag in flag_names},
                            num_warps=options.num_warps, maxnreg=options.maxnreg, num_stages=options.num_stages,
                            enable_fp_fusion=options.enable_fp_fusion, case=case["case"], widest=case["widest"],
                            cases=0, _compile=(op, signature, constexprs, attrs, options.__dict__, capability))
                    variant["cases"] += 1
                    if channels not in variant["widths"]:
                        variant["widths"].append(channels)
    return found, counts, {op: len(keys) for op, keys in distinct.items()}


# --------------------------------------------------------------------------------------------------
# Compiling and reading the cubin
# --------------------------------------------------------------------------------------------------

def tool(name):
    path = os.path.join(BIN, name)
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} is missing: this triton wheel ({triton.__version__}) ships no {name}, "
                                f"which compiling for sm_80 / sm_90 without a CUDA toolkit needs")
    return path


def tool_versions():
    versions = {}
    for name in TOOLS:
        out = subprocess.run([tool(name), "--version"], capture_output=True, text=True, check=True).stdout
        match = re.search(r"V(\d+\.\d+\.\d+)", out)
        versions[name] = match.group(1) if match else out.strip().splitlines()[-1]
    return versions


_LOG = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_MEMORY_OP = re.compile(r"\b(LDG|STG|LDL|STL)((?:\.[A-Z0-9_]+)*)")


def access_bits(modifiers):
    """Width in bits of a global access from its SASS modifiers (.128, .64, .U16, .U8 ...; none = 32)."""
    for modifier in modifiers.split("."):
        if modifier in ("128", "64"):
            return int(modifier)
        if modifier in ("U16", "S16"):
            return 16
        if modifier in ("U8", "S8"):
            return 8
    return 32


def compile_variant(spec):
    """Compiles one variant and measures it (in a worker process)."""
    op, signature, constexprs, attrs, options, capability = spec
    module, name = KERNELS[op]
    log = io.StringIO()
    start = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(log):
        warnings.simplefilter("ignore")  # Triton 3.9's notice that FP fusion's default changes in 3.10
        compiled = triton.compile(ASTSource(getattr(module, name), signature, constexprs, attrs),
                                  target=GPUTarget("cuda", capability, 32), options=options)
    seconds = time.perf_counter() - start
    stack, spill_stores, spill_loads = (int(value) for value in _LOG.search(log.getvalue()).groups())
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tool("cuobjdump"), "--dump-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    registers, stack_usage, shared, local = (int(value) for value in _RESOURCES.search(usage).groups())
    accesses = collections.Counter(f"{kind}.{access_bits(modifiers)}" for kind, modifiers in _MEMORY_OP.findall(sass))
    loads = {key: count for key, count in sorted(accesses.items()) if key.startswith("LDG")}
    stores = {key: count for key, count in sorted(accesses.items()) if key.startswith("STG")}
    return dict(registers=registers, spill_stores=spill_stores, spill_loads=spill_loads,
                stack=max(stack, stack_usage), local=local, shared=shared, triton_shared=compiled.metadata.shared,
                local_accesses=sum(count for key, count in accesses.items() if key.startswith(("LDL", "STL"))),
                widest_load=max((int(key.split(".")[1]) for key in loads), default=0),
                widest_store=max((int(key.split(".")[1]) for key in stores), default=0),
                loads=loads, stores=stores, compile_s=round(seconds, 3))


def compile_all(found, jobs):
    specs = {key: variant.pop("_compile") for key, variant in found.items()}
    failures = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs,
                                                mp_context=multiprocessing.get_context("fork")) as pool:
        futures = {pool.submit(compile_variant, spec): key for key, spec in specs.items()}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            key = futures[future]
            try:
                found[key].update(future.result())
            except Exception as error:  # reported per variant; the others still compile
                failures[key] = found[key]["error"] = f"{type(error).__name__}: {error}"[:4000]
            if done % 100 == 0 or done == len(futures):
                print(f"  compiled {done}/{len(futures)}", flush=True)
    return failures


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def spills(row):
    return bool(row.get("spill_stores") or row.get("spill_loads") or row.get("local"))


def blocking_of(row):
    flags = row["flags"]
    mode = "whole rows" if flags.get("WHOLE_ROWS", True) else "chunked"
    return f"{mode} M{flags['BLOCK_M']}×C{flags['BLOCK_C']} w{row['num_warps']}"


def lanes_used(row):
    """Share of the lanes of a program's chunks that hold a column < C (the rest are masked)."""
    block_c, channels = row["flags"]["BLOCK_C"], min(row["widths"])
    whole = row["flags"].get("WHOLE_ROWS", True)
    return channels / (block_c if whole else triton.cdiv(channels, block_c) * block_c)


def flag_text(row):
    return " ".join(name for name, value in row["flags"].items()
                    if value is True and not name.startswith("BLOCK") and name != "WHOLE_ROWS") or "-"


def widths_text(counter):
    return " ".join(f"{key.split('.')[1]}×{count}" for key, count in
                    sorted(counter.items(), key=lambda item: -int(item[0].split(".")[1])))


def git_commit():
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        # What the table depends on: the kernels and this script (others may be edited alongside).
        dirty = git("status", "--porcelain", "--", "eoc_kernels/triton", "benchmarks/gpu/aot_compile.py")
        return commit + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def groups_of(rows):
    groups = collections.defaultdict(list)
    for row in rows:
        groups[(row["op"], row["arch"], row["dtype"], tuple(row["widths"]), blocking_of(row))].append(row)
    return sorted(groups.items())


def group_line(key, group):
    op, arch, dtype, widths, blocking = key
    regs = sorted(row["registers"] for row in group)
    loads, stores = collections.Counter(), collections.Counter()
    for row in group:
        loads.update(row["loads"])
        stores.update(row["stores"])
    return (f"| {op} | {arch} | {dtype} | {', '.join(map(str, widths))} | {blocking} | {lanes_used(group[0]):.0%} | "
            f"{len(group)} | {regs[0]}–{regs[-1]} | {max(row['spill_stores'] + row['spill_loads'] for row in group)}"
            f" | {max(row['shared'] for row in group)} | {widths_text(loads)} | {widths_text(stores)} | "
            f"{sum(row['compile_s'] for row in group):.1f} |")


GROUP_HEADER = ["| kernel | arch | dtype | C | blocking | lanes used | variants | registers | spill B | shared B | "
                "LDG bits × count | STG bits × count | compile s |", "|---" * 13 + "|"]


def comparison_lines(report, baseline):
    """C = 1152: the widest variants of the baseline JSON against this run's, matched by case."""
    old = {(row["op"], row["arch"], row["dtype"], row["case"]): row for row in baseline["variants"]
           if 1152 in row["widths"] and row.get("widest") and "error" not in row}
    lines = [f"## C = 1152 (DiT-XL/2): commit {baseline['commit']} → {report['commit']}", "",
             "The widest variant of each kernel (every term with the K = 3 history, tensor coefficients; "
             "segment S = 3, G = 4, P = 5) per threshold form. Threshold 0: no judgment, chunked rows now; "
             "tensor: whole rows (judgment). Counts "
             "are instructions in the SASS, i.e. per chunk: chunked, a program of 256 threads covers its 16 rows "
             "in 9 chunks of 16 × 128 (bf16: 144 loads of 128 bits per input and row, all of them moving data), "
             "where one 2048-wide tile per row issued 256 (112 of them masked off).",
             "", "| kernel | arch | dtype | threshold | blocking before → after | lanes used | registers | "
             "spill st/ld B | LDG bits × count | STG bits × count |", "|---" * 10 + "|"]
    for row in sorted(report["variants"], key=lambda r: (r["op"], r["arch"], r["dtype"], r["case"])):
        before = old.get((row["op"], row["arch"], row["dtype"], row["case"]))
        if before is None or 1152 not in row["widths"] or "error" in row:
            continue
        lines.append(
            f"| {row['op']} | {row['arch']} | {row['dtype']} | {row['case'].rsplit('threshold ', 1)[1]} | "
            f"{blocking_of(before)} → {blocking_of(row)} | {lanes_used(before):.0%} → {lanes_used(row):.0%} | "
            f"{before['registers']} → {row['registers']} | {before['spill_stores']}/{before['spill_loads']} → "
            f"{row['spill_stores']}/{row['spill_loads']} | {widths_text(before['loads'])} → "
            f"{widths_text(row['loads'])} | {widths_text(before['stores'])} → {widths_text(row['stores'])} |")
    return lines


def markdown(report, baseline=None):
    rows = [row for row in report["variants"] if "error" not in row]
    tools = report["tools"]
    compile_times = sorted(row["compile_s"] for row in rows)
    lines = [f"# AOT compilation of the Triton kernels: subset `{report['subset']}`", "",
             f"{report['machine']} · torch {report['torch']} · triton {report['triton']} · ptxas {tools['ptxas']} "
             f"(sm_80), ptxas-blackwell {tools['ptxas-blackwell']} (sm_90a) · commit {report['commit']} · "
             f"{report['date']} · {report['jobs']} compile processes, {report['wall_s']:.0f} s wall", "",
             f"Regenerate: `{report['command']}` (benchmarks/gpu/README.md). Shapes B = {BATCH}, N = {TOKENS}, "
             f"H = {HEADS}, segments of S in {SEGMENT_BLOCKS} blocks; C in {tuple(report['widths'])}; fp32 / fp16 / "
             "bf16; sm_80 and sm_90 (Triton builds sm_90a). Registers, stack, local and shared memory from `cuobjdump "
             "--dump-resource-usage` (shared includes the 1 KiB sm_90 reserves per block), spill bytes from "
             "`ptxas -v`, access widths from the SASS. `lanes used`: the share of a program's chunk columns that "
             "hold a column < C.", "",
             "## Counts", "",
             "| kernel | launches recorded | distinct kernels compiled | failed | spilling |", "|---|---|---|---|---|"]
    for op in report["ops"]:
        compiled = [row for row in report["variants"] if row["op"] == op]
        lines.append(f"| {op} | {report['launches'][op]} | {len(compiled)} | {sum('error' in r for r in compiled)} | "
                     f"{sum(spills(r) for r in compiled)} |")
    lines += [f"| all | {sum(report['launches'].values())} | {len(report['variants'])} | {len(report['failures'])} "
              f"| {sum(spills(r) for r in rows)} |", ""]
    if report.get("all_distinct"):
        lines += [f"Every distinct kernel the launchers produce at these shapes (`--subset all`): "
                  f"{sum(report['all_distinct'].values())} (" + ", ".join(
                      f"{op} {count}" for op, count in report["all_distinct"].items()) + ").", ""]
    widest_loads = collections.Counter(row["widest_load"] for row in rows)
    widest_stores = collections.Counter(row["widest_store"] for row in rows)
    lines += ["## Summary", "",
              f"- registers: max {max(row['registers'] for row in rows)} (" + ", ".join(
                  f"{op} {max(row['registers'] for row in rows if row['op'] == op)}" for op in report["ops"]) + ")",
              f"- spills (spill stores / loads or local memory): {sum(spills(row) for row in rows)} of {len(rows)}",
              "- widest global load per variant: " + ", ".join(
                  f"{bits}-bit {count}" for bits, count in sorted(widest_loads.items(), reverse=True)),
              "- widest global store per variant: " + ", ".join(
                  f"{bits}-bit {count}" for bits, count in sorted(widest_stores.items(), reverse=True)),
              f"- compile time per variant: median {compile_times[len(compile_times) // 2]:.2f} s, max "
              f"{compile_times[-1]:.2f} s, {sum(compile_times):.0f} s in all", ""]
    if baseline is not None:
        lines += comparison_lines(report, baseline) + [""]
    lines += ["## Per kernel, arch, dtype and blocking", "",
              "Each line aggregates the variants (terms, coefficient and threshold forms) that share a blocking.", ""]
    lines += GROUP_HEADER + [group_line(key, group) for key, group in groups_of(rows)]
    lines += ["", "## Every variant", "",
              "| kernel | arch | dtype | C | blocking | case (a launch giving it) | flags | registers | "
              "spill st/ld B | stack B | shared B | LDG | STG | compile s |", "|---" * 14 + "|"]
    for row in sorted(report["variants"], key=lambda r: (r["op"], r["arch"], r["dtype"], r["widths"], r["case"])):
        head = (f"| {row['op']} | {row['arch']} | {row['dtype']} | {', '.join(map(str, row['widths']))} | "
                f"{blocking_of(row)} | {row['case']} | {flag_text(row)} |")
        if "error" in row:
            lines.append(f"{head} FAILED: {row['error'][:200]} ||||||")
            continue
        lines.append(f"{head} {row['registers']} | {row['spill_stores']}/{row['spill_loads']} | {row['stack']} | "
                     f"{row['shared']} | {widths_text(row['loads'])} | {widths_text(row['stores'])} | "
                     f"{row['compile_s']:.2f} |")
    return "\n".join(lines) + "\n"


def load_json(path):
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        with open(args.render[: -len(".json")] + ".md", "w") as f:
            f.write(markdown(load_json(args.render), load_json(args.compare)))
        return 0
    start = time.perf_counter()
    versions = tool_versions()  # raises, naming the tool, when the wheel lacks one
    ops, widths = tuple(args.op or KERNELS), tuple(args.width or WIDTHS)
    found, counts, _ = variants(args.subset, ops, widths)
    all_distinct = None
    if args.subset == "table" and ops == tuple(KERNELS) and widths == WIDTHS:
        all_distinct = variants("all", ops, widths)[2]  # counted, not compiled
    print(f"{sum(counts.values())} launches recorded, {len(found)} distinct kernels to compile ("
          + ", ".join(f"{op} {sum(v['op'] == op for v in found.values())}" for op in ops)
          + f") on {args.jobs} processes", flush=True)
    failures = compile_all(found, args.jobs)
    rows = list(found.values())
    date = datetime.datetime.now(datetime.timezone.utc)
    command = " ".join(["python benchmarks/gpu/aot_compile.py"] + (["--subset", args.subset]
                                                                   if args.subset != "table" else [])
                       + [f"--op {op}" for op in args.op or ()] + [f"--width {w}" for w in args.width or ()])
    report = dict(subset=args.subset, machine=f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU needed",
                  torch=torch.__version__, triton=triton.__version__, tools=versions, commit=git_commit(),
                  date=date.strftime("%Y-%m-%d %H:%M UTC"), jobs=args.jobs, wall_s=time.perf_counter() - start,
                  command=command, ops=list(ops), widths=list(widths), launches=dict(counts),
                  all_distinct=all_distinct, failures=failures, variants=rows)
    stem = args.out or os.path.join(REPO_ROOT, "benchmarks", "results", f"aot-compile-{date:%Y-%m-%d}")
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w") as f:  # one variant per line
        head = json.dumps({key: value for key, value in report.items() if key != "variants"}, indent=1)
        f.write(head[:-2] + ',\n "variants": [\n' + ",\n".join(json.dumps(row) for row in rows) + "\n ]\n}\n")
    if not args.json_only:
        with open(stem + ".md", "w") as f:
            f.write(markdown(report, load_json(args.compare)))
    spilling = [row for row in rows if spills(row) and min(row["widths"]) <= 4096]
    print(f"wrote {stem}.json{'' if args.json_only else ' and .md'} in {report['wall_s']:.0f} s: {len(rows)} "
          f"variants, {len(failures)} failed, {len(spilling)} spilling, max "
          f"{max((row.get('registers', 0) for row in rows), default=0)} registers", flush=True)
    for key, error in list(failures.items())[:5]:
        print(f"FAILED {found[key]['op']} {found[key]['arch']} {found[key]['dtype']} {found[key]['case']}: "
              f"{error[:1000]}", file=sys.stderr)
    if failures:
        return 2
    if args.fail_on_spill and spilling:
        for row in spilling[:20]:
            print(f"SPILL {row['op']} {row['arch']} {row['dtype']} C={row['widths']} {blocking_of(row)} "
                  f"{row['case']}: {row['spill_stores']}/{row['spill_loads']} B", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
