"""Device memory of the prior terms D and E a patched DiT-XL/2 holds, before and after they were
built once per needed term — computed from shapes (a prior on the meta device), nothing allocated.

    python benchmarks/prior_term_memory.py [--steps 50] [--out benchmarks/results/prior-term-memory.md]

After (this engine, ``prior_terms.PriorTerms``): one [H, N, C] slab per reuse entry and term whose
coefficient is non-zero, built straight into the stacked [S, 2, H, N, C] tensor of its segment.
Before (the engine up to commit 5480831): every corrected entry got BOTH D and E on the device
([H, N, C] each, kept in a dict), and every segment stacked them again into [S, 2, H, N, C] per term
in use (zeros for entries whose coefficient was 0). The figures count those tensors from the plan.
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[50])
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
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
