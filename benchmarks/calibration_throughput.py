"""Calibration throughput on the shipped testbed: time per calibrated sample against plain sampling.

    python benchmarks/calibration_throughput.py [--samples 40] [--batch-size 20] [--repeats 2] [--out FILE]

``calibrate`` samples every (label, seed) pair once, uncached, in batches of ``--batch-size`` pairs
with CFG (one model call on [x; x] per step), the fit split with the mean observer and the held-out
split with the statistics observer. Plain sampling: ``DDIMSampler.sample`` on the same noise and
batches, unpatched. Both: DDIM-20, CFG 3 (the shipped prior's settings), labels cycling 0-9, seeds
from 0, the best of ``--repeats`` runs, in the same process.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from eoc_dit import DDIMSampler, calibrate, noise_for_seed, testbed  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=here).stdout.strip() or "unknown"
    model, sampler, cfg = testbed.load_model(), DDIMSampler(20), 3.0
    labels, seeds = list(range(10)), list(range(args.samples // 10))
    pairs = [(label, seed) for label in labels for seed in seeds]
    plain, calibrated = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        with torch.no_grad():
            for begin in range(0, len(pairs), args.batch_size):
                batch = pairs[begin : begin + args.batch_size]
                noise = torch.cat([noise_for_seed(model, seed) for _, seed in batch])
                sampler.sample(model, noise, torch.tensor([label for label, _ in batch]), cfg_scale=cfg)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        calibrate(model, sampler, labels, seeds, cfg_scale=cfg, max_gap=5, holdout=0.25, progress=False,
                  batch_size=args.batch_size)
        calibrated.append(time.perf_counter() - start)
    n = len(pairs)
    header = (f"Commit {commit}, {datetime.date.today().isoformat()}, CPU ({platform.machine()}, "
              f"{torch.get_num_threads()} threads), torch {torch.__version__}; "
              f"`benchmarks/calibration_throughput.py --samples {args.samples} --batch-size {args.batch_size} "
              f"--repeats {args.repeats}`. Shipped testbed DiT, DDIM-20, CFG 3, {n} pairs (labels 0-9 x seeds "
              f"0-{len(seeds) - 1}), batches of {args.batch_size} pairs (2x{args.batch_size} rows with CFG); "
              "calibrate with max_gap 5 and holdout 0.25 samples each pair once; best of the repeats.")
    lines = ["| run | seconds | seconds per sample | ratio to plain sampling |", "|---|---|---|---|",
             f"| plain sampling (uncached) | {min(plain):.2f} | {min(plain) / n:.4f} | 1.00 |",
             f"| calibrate | {min(calibrated):.2f} | {min(calibrated) / n:.4f} | {min(calibrated) / min(plain):.2f} |"]
    text = header + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
