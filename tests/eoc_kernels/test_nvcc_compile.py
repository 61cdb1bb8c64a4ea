"""Every CUDA C++ kernel (csrc/*.cu) compiles with nvcc for sm_80 and sm_90 without spilling; no GPU needed.

Runs ``benchmarks/gpu/nvcc_compile.py --json-only`` in a child process: one nvcc call per source with both
gencodes and ``-Xptxas -v``, against the installed torch's headers (a temporary include directory supplies
the one build-generated header a CPU wheel lacks), then cuobjdump on the object (the toolkit's or the triton
wheel's). About a minute on two cores. Fails on a compile or ptxas error, any spill (spill stores / loads, a
stack frame, local memory), a missing kernel variant, a register count over the variant's budget, or a
vector-path variant without 128-bit global loads and stores.

"At DiT widths <= 4096" for these kernels: they are templated over dtype, load path (vector / scalar), JUDGE
and HISTORY (the K-history terms beta_2 / beta_3: both ways on the vector path, always on on the scalar path),
not over the width. A thread holds 8 elements of each operand whatever C is, and C only sets the block shape
(threads_per_row = round_up(ceil(C / 8), 32), up to the variant's __launch_bounds__: 1024 threads, C <= 8192,
on the vector path; 768, C <= 6144, in its HISTORY variants; 512, C <= 4096, on the scalar path), so each
variant compiled here is the code that runs at every width up to those limits, all DiT widths included.

Without nvcc the test skips with the reason, unless EOC_REQUIRE_NVCC=1 (CI, .ci/run), which makes a missing
nvcc a failure.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "nvcc_compile.py"
_spec = importlib.util.spec_from_file_location("nvcc_compile", SCRIPT)  # a script, not a package module
nvcc_compile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nvcc_compile)

pytestmark = pytest.mark.slow  # about a minute on two cores

NVCC = nvcc_compile.find_nvcc()
REQUIRED = os.environ.get("EOC_REQUIRE_NVCC", "") == "1"
KERNELS = ("cached_branch / cached_block", "cached_segment")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if NVCC is None:
        message = "nvcc not found ($NVCC, PATH, $CUDA_HOME/bin): the CUDA sources cannot be compiled here"
        if REQUIRED:
            pytest.fail(f"{message}, and EOC_REQUIRE_NVCC=1")
        pytest.skip(message)
    out = tmp_path_factory.mktemp("nvcc") / "nvcc"
    result = subprocess.run([sys.executable, str(SCRIPT), "--json-only", "--out", str(out)], capture_output=True,
                            text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    with open(f"{out}.json") as f:
        return json.load(f)


def describe(row):
    return f"{row['op']} {row['arch']} {row['dtype']} {row['path']} judge={row['judge']} history={row['history']}"


def test_every_source_compiles(report):
    sources = sorted(path.name for path in (ROOT / "csrc").glob("*.cu"))
    assert sources, "csrc/ holds no .cu source"
    assert sorted(pathlib.Path(record["source"]).name for record in report["sources"]) == sources
    failed = [f"{record['source']}: {record.get('error', '')[-2000:]}" for record in report["sources"]
              if "error" in record or record["ptxas_errors"]]
    assert not failed, "\n".join(failed)


def test_no_variant_spills(report):
    spilling = [f"{describe(row)}: {row['spill_stores']} B spill stores, {row['spill_loads']} B spill loads, "
                f"{row['stack']} B stack, {row['local']} B local, {row['registers']} registers"
                for row in report["variants"] if nvcc_compile.spills(row)]
    assert not spilling, "\n".join(spilling)


def test_registers_fit_the_launch_bounds(report):
    over = [f"{describe(row)}: {row['registers']} registers > {nvcc_compile.register_budget(row)}"
            for row in report["variants"] if row["registers"] > nvcc_compile.register_budget(row)]
    assert not over, "\n".join(over)


def test_every_variant_is_compiled_for_both_archs(report):
    covered = {(row["op"], row["arch"], row["dtype"], row["path"], row["judge"], row["history"])
               for row in report["variants"]}
    expected = {(op, arch, dtype, path, judge, history) for op in KERNELS for arch in ("sm_80", "sm_90")
                for dtype in ("fp32", "fp16", "bf16") for path, history in nvcc_compile.REGISTER_BUDGET
                for judge in (False, True)}
    assert expected <= covered, sorted(expected - covered)


def test_vector_path_loads_and_stores_128_bits(report):
    vector = [row for row in report["variants"] if row["path"] == "vector"]
    assert vector
    narrow = [f"{describe(row)}: loads {row['loads']}, stores {row['stores']}" for row in vector
              if not (row["ldg128"] and row["stg128"])]
    assert not narrow, "\n".join(narrow)
    # Each operand row of the vector path is read with 128-bit loads only: x, and per branch (gate, C_0, C_1, D, E)
    # plus, with HISTORY, the history terms' C_1 (a second load site), C_2 and C_3; 8 elements a thread (fp32: 2
    # loads, fp16 / bf16: 1); the other loads are scalars (coefficients, threshold, generation).
    for row in vector:
        per_operand = 2 if row["dtype"] == "fp32" else 1
        operands = 1 + (5 + (3 if row["history"] else 0)) * (2 if row["op"] == KERNELS[0] else 1)
        assert row["ldg128"] == per_operand * operands, describe(row)
