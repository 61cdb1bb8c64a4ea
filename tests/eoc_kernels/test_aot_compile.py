"""Every Triton kernel compiles for sm_80 and sm_90 without spilling, ahead of time, no GPU needed (DESIGN §3.5).

Runs ``benchmarks/gpu/aot_compile.py --subset ci`` in a child process (it turns TRITON_INTERPRET off:
tests/conftest.py turns the interpreter on without CUDA, and the interpreter compiles nothing). That
compiles the widest variant of each kernel (every correction term with the full K = 3 history, tensor
coefficients of length 5; cached_segment over a ring of four generations, P = 5, S = 3) in both row modes
(chunked: threshold 0; whole rows: a tensor threshold) at fp32 / fp16 / bf16, each DiT width C in
{256, 384, 768, 1024, 1152, 4096} and each of sm_80 and sm_90, plus at C = 1152 the widest three-coefficient
variant (the kernel as it was before the K history: P = 3, cached_segment G = 2): the launchers' own
blocking and flags, 198 distinct kernels. Fails on a compile error, any spill (spill stores / loads or
local memory), a kernel without 128-bit global loads and stores, or a combination the subset misses.
Needs only the triton wheel (its bundled ptxas, ptxas-blackwell and cuobjdump): the test fails, naming
the tool, when the wheel lacks one, and skips only where triton itself is not installed.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: no Triton kernels to compile")

pytestmark = pytest.mark.slow  # minutes on two cores

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "aot_compile.py"
WIDTHS = (256, 384, 768, 1024, 1152, 4096)  # DiT widths, C <= 4096
TOOLS = ("ptxas", "ptxas-blackwell", "cuobjdump")


def test_triton_wheel_ships_the_nvidia_tools():
    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    missing = [name for name in TOOLS if not os.access(bin_dir / name, os.X_OK)]
    assert not missing, (f"triton {triton.__version__} ships no {', '.join(missing)} under {bin_dir}: "
                         f"the AOT compile check needs them (no CUDA toolkit is installed in CI)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot"
    env = os.environ | {"TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--subset", "ci", "--json-only", "--out", str(out)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    with open(f"{out}.json") as f:
        return json.load(f)


def describe(row):
    return f"{row['op']} {row['arch']} {row['dtype']} C={row['widths']} {row['case']}"


def test_every_variant_compiles_without_spilling(report):
    assert not report["failures"]
    spilling = [f"{describe(row)}: {row['spill_stores']} B spill stores, {row['spill_loads']} B spill loads, "
                f"{row['local']} B local, {row['registers']} registers" for row in report["variants"]
                if row["spill_stores"] or row["spill_loads"] or row["local"]]
    assert not spilling, "\n".join(spilling)


def test_loads_and_stores_are_128_bits_wide(report):
    narrow = [f"{describe(row)}: loads {row['loads']}, stores {row['stores']}" for row in report["variants"]
              if row["widest_load"] != 128 or row["widest_store"] != 128]
    assert not narrow, "\n".join(narrow)


#: The K = 3 history flags of the widest variants, and their absence in the three-coefficient ones.
HISTORY_FLAGS = {"cached_branch": ("HAS_PREV2", "HAS_PREV3"),
                 "cached_block": ("HAS_PREV2_A", "HAS_PREV3_A", "HAS_PREV2_M", "HAS_PREV3_M"),
                 "cached_segment": ("HAS_PREV2", "HAS_PREV3")}


def test_subset_holds_the_full_history_and_the_three_coefficient_kernels(report):
    full, three = set(), set()
    for row in report["variants"]:
        flags = row["flags"]
        history = [flags[name] for name in HISTORY_FLAGS[row["op"]]]
        keys = {(row["op"], row["arch"], row["dtype"], width, flags["WHOLE_ROWS"]) for width in row["widths"]}
        if all(history) and flags.get("NUM_GENERATIONS", 4) == 4:
            full |= keys
        elif not any(history) and flags.get("NUM_GENERATIONS", 2) == 2:
            three |= {key for key in keys if key[3] == 1152}
    expected = {(op, f"sm_{arch}", dtype, width, whole)
                for op in HISTORY_FLAGS for arch in (80, 90) for dtype in ("fp32", "fp16", "bf16")
                for width in WIDTHS for whole in (False, True)}
    assert expected <= full, sorted(expected - full)[:10]
    expected_three = {key for key in expected if key[3] == 1152}
    assert expected_three <= three, sorted(expected_three - three)[:10]


def test_subset_covers_every_kernel_mode_dtype_width_and_arch(report):
    covered = {(row["op"], row["arch"], row["dtype"], width, row["flags"]["WHOLE_ROWS"])
               for row in report["variants"] for width in row["widths"]}
    expected = {(op, f"sm_{arch}", dtype, width, whole)
                for op in ("cached_branch", "cached_block", "cached_segment") for arch in (80, 90)
                for dtype in ("fp32", "fp16", "bf16") for width in WIDTHS for whole in (False, True)}
    assert expected <= covered, sorted(expected - covered)[:10]
