"""Device memory of the prior terms D and E a patched DiT-XL/2 holds, before and after they were
built once per needed term — computed from shapes (a prior on the meta device), nothing allocated.

    python benchmarks/prior_term_memory.py [--steps 50] [--out benchmarks/results/prior-term-memory.md]
    python benchmarks/prior_term_memory.py --storage-table [--steps 20 50 250] [--out ...]

After (this engine, ``prior_terms.PriorTerms``): one [H, N, C] slab per reuse entry and term whose
coefficient is non-zero, built straight into the stacked [S, 2, H, N, C] tensor of its segment.
Before (the engine up to commit 5480831): every corrected entry got BOTH D and E on the device
([H, N, C] each, kept in a dict), and every segment stacked them again into [S, 2, H, N, C] per term
in use (zeros for entries whose coefficient was 0). The figures count those tensors from the plan.

``--storage-table``: per storage choice (``eoc_dit.prior_storage``) and step count, the size of the
prior file (its tensors: the means in that storage, the fp32 judgment statistics at max_gap 4 (the
``calibrate`` default) when kept, and one fit) and the device memory of a DiT-XL/2 run with trend
under FORA N=3: the prior loaded onto the device (``Prior.load(device=)``, i.e. every tensor of the
file) plus the D / E terms the plan holds (``term_residency="plan"``), against the prior left on
the CPU with ``term_residency="step"`` (only the largest step's terms on the device; the slices are
read and dequantised per step). Built on the meta device: no memory is allocated.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from eoc_dit import EOCConfig, FORASchedule  # noqa: E402
from eoc_dit.planner import make_plan  # noqa: E402
from eoc_dit.prior import STAT_NAMES, Prior, PriorMetadata  # noqa: E402
from eoc_dit.prior_storage import STORAGE_CHOICES, empty_means  # noqa: E402
from eoc_dit.prior_terms import DELTA, TREND  # noqa: E402

# DiT-XL/2 at 256x256: 28 blocks, 256 tokens, width 1152; CFG (H = 2); bf16 features.
L, N, C, H, BYTES = 28, 256, 1152, 2, 2


def meta_prior(num_steps: int, max_gap: int = 5) -> Prior:
    T, G = num_steps, max_gap
    shapes = {"energy": (T, L, 2), "cross_extrap": (T, L, 2, G, G)}
    stats = {name: torch.empty(shapes.get(name, (T, L, 2, G)), device="meta") for name in STAT_NAMES}
    metadata = PriorMetadata(model_fingerprint="meta", num_steps=T, sampler="ddim", cfg_scale=4.0, num_samples=1,
                             num_holdout=1, max_gap=G, num_tokens=N, width=C, num_blocks=L, num_halves=H,
                             trend_eps=1e-3)
    return Prior(torch.empty(T, L, 2, H, N, C, device="meta", dtype=torch.float16), stats, metadata)


def slabs(plan) -> tuple[int, int]:
    """(before, after): [H, N, C] slabs of prior terms held on the device for ``plan``."""
    before = after = 0
    seen = set()
    for (t, l, _k), entry in plan.entries.items():
        segment = plan.segment(t, l)
        if segment is None:  # a half-reused block: per-entry tensors
            used = [term for term in (DELTA, TREND) if entry.coef[term] != 0.0]
            after += len(used)
            before += 2 if used else 0
            continue
        if (t, segment.start) in seen:
            continue
        seen.add((t, segment.start))
        S2 = 2 * (segment.stop - segment.start)
        used = [term for term in (DELTA, TREND) if segment.uses(term)]
        after += S2 * len(used)
        before += S2 * len(used) + 2 * sum(e.coef[DELTA] != 0.0 or e.coef[TREND] != 0.0 for e in segment.entries)
    return before, after


def slabs_per_step(plan) -> int:
    """The most [H, N, C] slabs of prior terms one step holds (``term_residency="step"``)."""
    per_step: dict[int, int] = {}
    seen = set()
    for (t, l, _k), entry in plan.entries.items():
        segment = plan.segment(t, l)
        if segment is None:
            per_step[t] = per_step.get(t, 0) + sum(entry.coef[term] != 0.0 for term in (DELTA, TREND))
        elif (t, segment.start) not in seen:
            seen.add((t, segment.start))
            used = sum(segment.uses(term) for term in (DELTA, TREND))
            per_step[t] = per_step.get(t, 0) + 2 * (segment.stop - segment.start) * used
    return max(per_step.values(), default=0)


def storage_table(steps_list, max_gap: int = 4) -> str:
    """Markdown: file size and device memory per storage choice and step count (module docstring)."""
    slab = H * N * C * BYTES
    lines = ["| storage | T | file | device: prior + terms per plan | device: prior + terms per step | "
             "device: terms per step (prior on CPU) |", "|---|---|---|---|---|---|"]
    for steps in steps_list:
        T, G = steps, max_gap
        stats = 4 * (T * L * 2 * (1 + 4 * G + G * G))  # energy; 4 statistics [.., G]; cross_extrap [.., G, G]
        fit = T * L * 2 * (1 + 3 * 4)  # mask uint8 + coef fp32 [T, L, 2, 3]
        mask = FORASchedule(3).mask(steps, L)
        plan = make_plan(mask, EOCConfig(mode="trend", min_gain=None), meta_prior(steps, G))
        plan_terms = slabs(plan)[1] * slab
        step_terms = slabs_per_step(plan) * slab
        for choice in STORAGE_CHOICES:
            storage = "lowrank:8" if choice == "lowrank:R" else choice
            means = empty_means(storage, (T, L, 2, H, N, C))
            size = (means.nbytes if means is not None else 0) + (stats if storage != "coefficients" else 0) + fit
            reads = means is not None
            plan_col = human(size + plan_terms) if reads else f"{human(size)} (no terms)"
            step_col = human(size + step_terms) if reads else f"{human(size)} (no terms)"
            cpu_col = human(step_terms) if reads else "0 (no terms)"
            lines.append(f"| {storage} | {T} | {human(size)} | {plan_col} | {step_col} | {cpu_col} |")
    return "\n".join(lines)


def human(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="default 50 (20 50 250 for the storage "
                                                                             "table)")
    parser.add_argument("--storage-table", action="store_true", help="the storage table instead (module docstring)")
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    if args.storage_table:
        table = storage_table(args.steps or [20, 50, 250])
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
        header = (f"Commit {commit}, {datetime.date.today().isoformat()}. A DiT-XL/2 prior (L={L}, N={N}, C={C}, "
                  f"CFG so H={H}) per storage choice, from shapes on the meta device "
                  "(`benchmarks/prior_term_memory.py --storage-table`): file = the means in that storage + the "
                  "fp32 statistics at max_gap 4 (not in 'coefficients') + one fit; device memory of a run with "
                  "trend under FORA N=3 in bf16, every entry corrected: the prior loaded onto the device plus "
                  "the terms the plan holds (term_residency='plan'); with only the largest step's terms "
                  "(term_residency='step'); or the prior on the CPU and only that step's terms on the device. "
                  "lowrank is shown at R = 8.")
        print(header + "\n\n" + table)
        if args.out:
            with open(args.out, "w") as f:
                f.write(header + "\n\n" + table + "\n")
        return 0
    args.steps = args.steps or [50]
    slab = H * N * C * BYTES
    lines = ["| steps | schedule | mode | reuse entries | before GiB | after GiB | ratio |",
             "|---|---|---|---|---|---|---|"]
    for steps in args.steps:
        prior = meta_prior(steps)
        for interval in (2, 3, 4):
            schedule = FORASchedule(interval)
            mask = schedule.mask(steps, L)
            for mode in ("trend", "delta", "extrapolate"):
                plan = make_plan(mask, EOCConfig(mode=mode, min_gain=None), prior)
                before, after = slabs(plan)
                ratio = f"{before / after:.1f}×" if after else "—"
                lines.append(f"| {steps} | FORA N={interval} | {mode} | {len(plan.entries)} | "
                             f"{before * slab / 2**30:.2f} | {after * slab / 2**30:.2f} | {ratio} |")
    table = "\n".join(lines)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    header = (f"Commit {commit}, {datetime.date.today().isoformat()}. Device memory of the prior terms of a patched "
              f"DiT-XL/2 (L={L}, N={N}, C={C}, CFG so H={H}, bf16: "
              f"{slab / 2**20:.2f} MiB per [H, N, C] slab), from shapes (`benchmarks/prior_term_memory.py`); "
              "no judgment (every reuse entry corrected).")
    print(header + "\n\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
