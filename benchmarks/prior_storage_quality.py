"""The quality cost of each prior storage choice on the shipped testbed (docs/DESIGN.md §4.10).

    python benchmarks/prior_storage_quality.py [--samples 100] [--out benchmarks/results/prior-storage-quality.md]

The shipped testbed prior (DDIM-20, CFG 3, means in fp16, calibrated on seeds 0-39) converted to
each storage (``Prior.with_storage``), then FORA N = 3 and 4 with the modes that read the means
(trend, delta) and the calibrated default (reads none: coefficient-only must give the same
samples). Metric: pooled PSNR against the uncached samples of the same noise,
10·log10(4 / MSE), the MSE pooled over every pixel of every image, images clamped to [-1, 1];
evaluation seeds from ``testbed.demo.EVAL_SEED_BASE`` (100000) up, disjoint from the calibration
seeds; labels cycle through the classes. Also: the largest |difference| of each run's samples to
the same run with the shipped fp16 prior, and the file size of each storage.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from eoc_dit import DDIMSampler, EOCConfig, FORASchedule, apply_eoc, testbed  # noqa: E402
from eoc_dit.prior import Prior  # noqa: E402
from eoc_dit.testbed.demo import EVAL_SEED_BASE, demo_batch  # noqa: E402

STORAGES = ("float16", "bfloat16", "fp8", "lowrank:2", "lowrank:8", "statistics", "coefficients")


def pooled_psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float((images.clamp(-1, 1).double() - reference.clamp(-1, 1).double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--intervals", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--storages", nargs="+", default=list(STORAGES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))  # the commit the run starts from (its code is loaded now)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=here).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "python", "benchmarks/prior_storage_quality.py"],
                           capture_output=True, text=True, cwd=os.path.join(here, "..")).stdout.strip()
    commit += "+dirty" if dirty else ""
    model, shipped, sampler = testbed.load_model(), testbed.load_prior(20), DDIMSampler(20)
    noise, labels = demo_batch(model, args.samples, EVAL_SEED_BASE)
    started = time.perf_counter()
    with torch.no_grad():
        uncached = sampler.sample(model, noise, labels, cfg_scale=shipped.cfg_scale, progress=False)
    sizes, priors = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for storage in args.storages:
            path = os.path.join(folder, "prior.safetensors")
            shipped.save(path, storage=storage)
            sizes[storage] = os.path.getsize(path)
            priors[storage] = Prior.load(path)  # through the file: what a user of that storage runs
    rows = []
    baseline = {}
    for interval in args.intervals:
        schedule = FORASchedule(interval)
        for mode in ("trend", "delta", "calibrated"):
            for storage in args.storages:
                prior = priors[storage]
                if mode != "calibrated" and not prior.has_means:
                    continue
                if mode == "calibrated" and storage not in ("float16", "coefficients"):
                    continue  # reads no means: every storage gives the float16 samples (tested)
                start = time.perf_counter()
                with torch.no_grad(), apply_eoc(model, schedule, prior, EOCConfig(mode=mode)):
                    images = sampler.sample(model, noise, labels, cfg_scale=shipped.cfg_scale, progress=False)
                seconds = time.perf_counter() - start
                key = (interval, mode)
                baseline.setdefault(key, images)
                diff = float((images - baseline[key]).abs().max())
                rows.append((interval, mode, storage, pooled_psnr(images, uncached), diff, seconds))
                print(rows[-1], flush=True)
        with torch.no_grad(), apply_eoc(model, schedule):
            plain = sampler.sample(model, noise, labels, cfg_scale=shipped.cfg_scale, progress=False)
        rows.append((interval, "none (plain FORA)", "—", pooled_psnr(plain, uncached), math.nan, math.nan))
    header = (f"Commit {commit}, {datetime.date.today().isoformat()}, CPU ({platform.machine()}, "
              f"{torch.get_num_threads()} threads), torch {torch.__version__}; "
              f"`benchmarks/prior_storage_quality.py --samples {args.samples}`, "
              f"{time.perf_counter() - started:.0f} s. Shipped testbed DiT and prior (DDIM-20, CFG "
              f"{shipped.cfg_scale:g}), the prior converted to each storage and loaded back from its file; "
              f"{args.samples} evaluation samples, seeds {EVAL_SEED_BASE}..{EVAL_SEED_BASE + args.samples - 1} "
              "(calibration and fits used seeds 0-39), labels cycling 0-9. Pooled PSNR vs uncached: "
              "10·log10(4 / MSE), MSE pooled over all pixels of all images, images clamped to [-1, 1]. "
              "max abs diff vs fp16: the largest difference of the samples to the same method with the shipped "
              "fp16 prior (unclamped). Times: wall seconds on a shared, loaded machine, not a speed figure.")
    lines = ["| FORA N | mode | storage | pooled PSNR dB | max abs diff vs fp16 | time s |",
             "|---|---|---|---|---|---|"]
    for interval, mode, storage, psnr, diff, seconds in rows:
        lines.append(f"| {interval} | {mode} | {storage} | {psnr:.2f} | "
                     f"{'—' if math.isnan(diff) else f'{diff:.3g}'} | "
                     f"{'—' if math.isnan(seconds) else f'{seconds:.1f}'} |")
    size_lines = ["| storage | testbed prior file bytes |", "|---|---|"]
    size_lines += [f"| {storage} | {size:,} |" for storage, size in sizes.items()]
    text = header + "\n\n" + "\n".join(lines) + "\n\n" + "\n".join(size_lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
