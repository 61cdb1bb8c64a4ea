"""Compiles the CUDA C++ kernels (csrc/*.cu) with nvcc for sm_80 and sm_90 and tabulates their resources; no GPU.

    python benchmarks/gpu/nvcc_compile.py                 # the table: benchmarks/results/nvcc-compile-<date>.{md,json}
    python benchmarks/gpu/nvcc_compile.py --json-only --out /tmp/x --fail-on-spill   # what CI runs

The CUDA equivalent of aot_compile.py (the Triton kernels). Every csrc/*.cu is compiled once with ``nvcc -c`` and
both gencodes (``-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90``), with the flags a real
build gives nvcc: torch's ``COMMON_NVCC_FLAGS`` (``torch.utils.cpp_extension``), ``-std=c++20`` (what torch's
BuildExtension passes), ``-Xcompiler -fPIC``, and setup.py's own ``NVCC_FLAGS`` (read from setup.py, so they cannot
drift: ``-O3 --fmad=false``). Headers: the venv torch's ``include_paths()`` plus a temporary include directory
with the one header a CPU torch wheel lacks, the build-generated ``c10/cuda/impl/cuda_cmake_macros.h`` (content
``#define C10_CUDA_BUILD_SHARED_LIBS``). An object compiled against a CPU torch cannot be linked or run; it is
read, not used.

Every template instantiation in the object is a kernel variant: cached_branches_kernel (cached_branch and
cached_block) and cached_segment_kernel, each over dtype (fp32 / fp16 / bf16), load path (vector: 128-bit
loads and stores; scalar: element by element), JUDGE (whole-row token judgment or not) and HISTORY (the K-history
terms beta_2 / beta_3 compiled in: both on the vector path, always on the scalar path). The kernels are not
specialized on C: a variant's registers hold 8 elements per operand and thread at any width, so one compile
covers every C (C only sets the block shape, threads_per_row = round_up(ceil(C / 8), 32), within the variant's
launch bounds: C <= 8192 vector, C <= 6144 vector with HISTORY, C <= 4096 scalar).

Per variant and arch: registers, stack frame and spill stores / loads (``-Xptxas -v``), shared and local memory
(``cuobjdump --dump-resource-usage``), and the global load / store widths in the SASS (``cuobjdump -sass``:
LDG.E.128 = a 128-bit load per thread; the count is SASS instructions, i.e. per thread and row slot, not per
byte). cuobjdump: the toolkit's, else the one bundled with the triton wheel (triton/backends/nvidia/bin). nvcc:
$NVCC, else ``nvcc`` on PATH, else $CUDA_HOME/bin/nvcc.

Exit status: 2 if a source fails to compile (ptxas errors included), 1 with ``--fail-on-spill`` if a variant
spills (spill stores / loads, a stack frame or local memory), else 0.
"""

from __future__ import annotations

import argparse
import ast
import collections
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHS = (80, 90)
GENERATED_HEADER = ("c10/cuda/impl/cuda_cmake_macros.h", "#define C10_CUDA_BUILD_SHARED_LIBS\n")
STD = "-std=c++20"  # torch.utils.cpp_extension gives nvcc -std=c++20 unless a -std is passed
KERNEL_NAME = re.compile(r"_ZN8eoc_cuda\d+(?P<op>\w+?)_kernelINS_\d+(?P<dtype>F32|F16|BF16)ELb(?P<vector>[01])"
                         r"ELb(?P<judge>[01])ELb(?P<history>[01])E")
DTYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
# csrc/cuda_ops.cu, max_registers(): 65536 / __launch_bounds__ (1024, 768, 512), rounded down to 8; per (path, history).
REGISTER_BUDGET = {("vector", False): 64, ("vector", True): 80, ("scalar", True): 128}


def register_budget(row):
    """The register budget of a variant row (its path and HISTORY flag)."""
    return REGISTER_BUDGET[(row["path"], row["history"])]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output stem (default benchmarks/results/nvcc-compile-<date>)")
    parser.add_argument("--json-only", action="store_true", help="write only <out>.json")
    parser.add_argument("--fail-on-spill", action="store_true", help="exit status 1 if any variant spills")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the Markdown of a JSON this script wrote")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Tools and flags
# --------------------------------------------------------------------------------------------------

def find_nvcc():
    """nvcc's path, or None."""
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


def find_cuobjdump(nvcc):
    """The toolkit's cuobjdump (next to nvcc's real binary), else the triton wheel's; raises naming both."""
    candidates = [os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump"), shutil.which("cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    found = next((path for path in candidates if path and os.access(path, os.X_OK)), None)
    if found is None:
        raise FileNotFoundError("no cuobjdump: neither the CUDA toolkit of nvcc nor a triton wheel provides one "
                                "(looked at " + ", ".join(path for path in candidates if path) + ")")
    return found


def tool_version(path):
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"V(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else out.strip().splitlines()[-1]


def setup_nvcc_flags():
    """setup.py's NVCC_FLAGS (the project's nvcc options), read without running setup.py."""
    with open(os.path.join(REPO_ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError("setup.py defines no NVCC_FLAGS list")


def nvcc_command(nvcc, source, obj, include_dirs):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    gencodes = [flag for arch in ARCHS for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    return ([nvcc, "-c", source, "-o", obj, STD, "-Xcompiler", "-fPIC", *COMMON_NVCC_FLAGS, *setup_nvcc_flags(),
             *gencodes, "-Xptxas", "-v", "-DTORCH_EXTENSION_NAME=_C"]
            + [f"-I{path}" for path in include_dirs])


# --------------------------------------------------------------------------------------------------
# Reading ptxas -v, cuobjdump's resource usage and the SASS
# --------------------------------------------------------------------------------------------------

_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?.*?(?:(\d+) bytes smem)?, \d+ bytes cmem")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_MEMORY_OP = re.compile(r"\b(LDG|STG|LDL|STL)((?:\.[A-Z0-9_]+)*)")


def parse_ptxas(log):
    """{(mangled name, arch): {registers, stack, spill_stores, spill_loads, barriers, smem}} from ptxas -v."""
    found, key = {}, None
    for line in log.splitlines():
        match = _PTXAS_ENTRY.search(line)
        if match:
            key = (match.group(1), match.group(2))
            found[key] = {}
            continue
        if key is None:
            continue
        match = _PTXAS_FRAME.search(line)
        if match:
            found[key].update(stack=int(match.group(1)), spill_stores=int(match.group(2)),
                              spill_loads=int(match.group(3)))
        match = _PTXAS_USED.search(line)
        if match:
            found[key].update(registers=int(match.group(1)), barriers=int(match.group(2) or 0),
                              smem=int(match.group(3) or 0))
    return found


def sections(text, header):
    """{(function, arch): body} of cuobjdump output: per arch ("arch = sm_80"), per "Function <name>" header."""
    out, arch, name = collections.defaultdict(list), None, None
    for line in text.splitlines():
        match = re.search(r"arch = (sm_\d+)", line)
        if match:
            arch, name = match.group(1), None
            continue
        match = re.search(header, line)
        if match:
            name = match.group(1).rstrip(":")
            continue
        if name is not None:
            out[(name, arch)].append(line)
    return {key: "\n".join(lines) for key, lines in out.items()}


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


def sass_accesses(body):
    accesses = collections.Counter(f"{kind}.{access_bits(modifiers)}" for kind, modifiers in _MEMORY_OP.findall(body)
                                   if kind in ("LDG", "STG"))
    local = sum(1 for kind, _ in _MEMORY_OP.findall(body) if kind in ("LDL", "STL"))
    return accesses, local


def variant_of(mangled):
    match = KERNEL_NAME.search(mangled)
    if match is None:
        return dict(op=mangled, dtype="?", path="?", judge=None, history=None)
    return dict(op=match.group("op").replace("cached_branches", "cached_branch / cached_block"),
                dtype=DTYPES[match.group("dtype")], path="vector" if match.group("vector") == "1" else "scalar",
                judge=match.group("judge") == "1", history=match.group("history") == "1")


def compile_source(source, nvcc, cuobjdump, include_dirs, work):
    """Compiles one .cu for both archs; its variants' rows (or an error)."""
    obj = os.path.join(work, os.path.basename(source) + ".o")
    command = nvcc_command(nvcc, source, obj, include_dirs)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    seconds = time.perf_counter() - start
    log = result.stdout + result.stderr
    record = dict(source=os.path.relpath(source, REPO_ROOT), compile_s=round(seconds, 1),
                  command=" ".join(command).replace(work, "$TMP").replace(REPO_ROOT + os.sep, ""),
                  returncode=result.returncode, ptxas_errors=[line for line in log.splitlines()
                                                              if "ptxas" in line and "error" in line.lower()])
    if result.returncode != 0 or record["ptxas_errors"]:
        record["error"] = log[-6000:]
        return record, []
    ptxas = parse_ptxas(log)
    usage = sections(subprocess.run([cuobjdump, "--dump-resource-usage", obj], capture_output=True, text=True,
                                    check=True).stdout, r"^\s*Function (\S+)")
    sass = sections(subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, check=True).stdout,
                    r"^\s*Function : (\S+)")
    rows = []
    for (name, arch), info in sorted(ptxas.items()):
        registers, stack, shared, local = (int(v) for v in _RESOURCES.search(usage[(name, arch)]).groups())
        accesses, local_accesses = sass_accesses(sass.get((name, arch), ""))
        loads = {key: count for key, count in sorted(accesses.items()) if key.startswith("LDG")}
        stores = {key: count for key, count in sorted(accesses.items()) if key.startswith("STG")}
        rows.append(dict(
            variant_of(name), arch=arch, source=record["source"], kernel=name, registers=registers,
            ptxas_registers=info.get("registers"), stack=max(stack, info.get("stack", 0)),
            spill_stores=info.get("spill_stores", 0), spill_loads=info.get("spill_loads", 0), local=local,
            local_accesses=local_accesses, shared=shared, barriers=info.get("barriers", 0),
            ldg128=loads.get("LDG.128", 0), stg128=stores.get("STG.128", 0), loads=loads, stores=stores))
    return record, rows


def spills(row):
    return bool(row["spill_stores"] or row["spill_loads"] or row["local"] or row["stack"] or row["local_accesses"])


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def git_commit():
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        # What the table depends on: the CUDA sources, the build flags and this script.
        dirty = git("status", "--porcelain", "--", "csrc/*.cu", "csrc/*.cuh", "setup.py",
                    "benchmarks/gpu/nvcc_compile.py")
        return commit + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def widths_text(counter):
    return " ".join(f"{key.split('.')[1]}×{count}" for key, count in
                    sorted(counter.items(), key=lambda item: -int(item[0].split(".")[1])))


def markdown(report):
    rows = report["variants"]
    lines = ["# nvcc compilation of the CUDA kernels (csrc/*.cu)", "",
             f"{report['machine']} · nvcc {report['nvcc']} · cuobjdump {report['cuobjdump']} "
             f"({report['cuobjdump_from']}) · torch {report['torch']} · commit {report['commit']} · {report['date']}",
             "",
             f"Regenerate: `{report['command']}` (benchmarks/gpu/README.md). One nvcc call per source for sm_80 and "
             f"sm_90: `{report['flags']}`. Registers, stack, shared and local memory from `cuobjdump "
             "--dump-resource-usage`, spill bytes from `ptxas -v`, global access widths from `cuobjdump -sass` "
             "(counts are SASS instructions: per thread and row slot; `LDG.128` = 128-bit loads). The kernels are "
             "not specialized on C: each variant below serves every width (C <= 8192 on the vector path, "
             "<= 6144 in its HISTORY variants, <= 4096 on the scalar path), so these figures hold at every DiT "
             "width. history: the K-history terms beta_2 / beta_3 compiled in (the vector path has variants "
             "without them, for every launch with K <= 1; the scalar path always has them).", ""]
    for record in report["sources"]:
        status = "FAILED" if "error" in record else f"{record['compile_s']:.0f} s"
        lines.append(f"- `{record['source']}`: {status}")
    spilling = sum(spills(row) for row in rows)
    lines += ["", "## Summary", "",
              f"- variants × archs: {len(rows)}; spilling: {spilling}",
              f"- registers: max {max((r['registers'] for r in rows), default=0)}; "
              + "; ".join(f"{path} path{' with history' if history else ''} "
                          f"{min((r['registers'] for r in rows if (r['path'], r['history']) == key), default=0)}-"
                          f"{max((r['registers'] for r in rows if (r['path'], r['history']) == key), default=0)} "
                          f"(budget {budget})" for key, budget in REGISTER_BUDGET.items() for path, history in [key]),
              f"- vector-path variants with 128-bit loads and stores: "
              f"{sum(1 for r in rows if r['path'] == 'vector' and r['ldg128'] and r['stg128'])} of "
              f"{sum(1 for r in rows if r['path'] == 'vector')}", "",
              "## Per variant", "",
              "| kernel | arch | dtype | path | judge | history | registers | spill st/ld B | stack B | local B | "
              "shared B | LDG.128 | LDG bits × count | STG bits × count |", "|---" * 14 + "|"]
    for row in sorted(rows, key=lambda r: (r["op"], r["arch"], r["dtype"], r["path"], r["judge"], r["history"])):
        lines.append(f"| {row['op']} | {row['arch']} | {row['dtype']} | {row['path']} | "
                     f"{'yes' if row['judge'] else 'no'} | {'yes' if row['history'] else 'no'} | "
                     f"{row['registers']} | {row['spill_stores']}/"
                     f"{row['spill_loads']} | {row['stack']} | {row['local']} | {row['shared']} | {row['ldg128']} | "
                     f"{widths_text(row['loads'])} | {widths_text(row['stores'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        with open(args.render) as f:
            report = json.load(f)
        with open(args.render[: -len(".json")] + ".md", "w") as f:
            f.write(markdown(report))
        return 0
    start = time.perf_counter()
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found ($NVCC, PATH, $CUDA_HOME/bin): nothing to compile", file=sys.stderr)
        return 2
    cuobjdump = find_cuobjdump(nvcc)
    import torch
    from torch.utils.cpp_extension import include_paths

    sources = sorted(os.path.join(REPO_ROOT, "csrc", name) for name in os.listdir(os.path.join(REPO_ROOT, "csrc"))
                     if name.endswith(".cu"))
    records, rows = [], []
    with tempfile.TemporaryDirectory(prefix="eoc-nvcc-") as work:
        generated = os.path.join(work, "include")
        os.makedirs(os.path.join(generated, os.path.dirname(GENERATED_HEADER[0])))
        with open(os.path.join(generated, GENERATED_HEADER[0]), "w") as f:
            f.write(GENERATED_HEADER[1])
        include_dirs = [generated, *include_paths()]
        for source in sources:
            print(f"compiling {os.path.relpath(source, REPO_ROOT)} for "
                  + ", ".join(f"sm_{arch}" for arch in ARCHS), flush=True)
            record, found = compile_source(source, nvcc, cuobjdump, include_dirs, work)
            records.append(record)
            rows += found
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    date = datetime.datetime.now(datetime.timezone.utc)
    report = dict(machine=f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU needed", nvcc=tool_version(nvcc),
                  cuobjdump=tool_version(cuobjdump), cuobjdump_from=("triton wheel" if "triton" in cuobjdump
                                                                     else "CUDA toolkit"),
                  torch=torch.__version__, commit=git_commit(), date=date.strftime("%Y-%m-%d %H:%M UTC"),
                  wall_s=round(time.perf_counter() - start, 1), command="python benchmarks/gpu/nvcc_compile.py",
                  flags=" ".join([STD, *COMMON_NVCC_FLAGS, *setup_nvcc_flags(), "-Xptxas -v"]
                                 + [f"-gencode arch=compute_{a},code=sm_{a}" for a in ARCHS]),
                  archs=[f"sm_{arch}" for arch in ARCHS], sources=records, variants=rows)
    stem = args.out or os.path.join(REPO_ROOT, "benchmarks", "results", f"nvcc-compile-{date:%Y-%m-%d}")
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w") as f:  # one variant per line
        head = json.dumps({key: value for key, value in report.items() if key != "variants"}, indent=1)
        f.write(head[:-2] + ',\n "variants": [\n' + ",\n".join(json.dumps(row) for row in rows) + "\n ]\n}\n")
    if not args.json_only:
        with open(stem + ".md", "w") as f:
            f.write(markdown(report))
    failed = [record for record in records if "error" in record]
    spilling = [row for row in rows if spills(row)]
    print(f"wrote {stem}.json{'' if args.json_only else ' and .md'} in {report['wall_s']:.0f} s: {len(rows)} "
          f"variants × archs, {len(failed)} sources failed, {len(spilling)} spilling, max "
          f"{max((row['registers'] for row in rows), default=0)} registers", flush=True)
    for record in failed:
        print(f"FAILED {record['source']}:\n{record['error']}", file=sys.stderr)
    if failed:
        return 2
    if args.fail_on_spill and spilling:
        for row in spilling:
            print(f"SPILL {row['op']} {row['arch']} {row['dtype']} {row['path']} judge={row['judge']} "
                  f"history={row['history']}: "
                  f"{row['spill_stores']}/{row['spill_loads']} B spilled, stack {row['stack']} B, "
                  f"local {row['local']} B",
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
