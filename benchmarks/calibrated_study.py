"""The calibrated mode's design study on the testbed, on calibration seeds only.

Fits on pairs (labels 0-9) x (seeds 20-29), chooses gains on seeds 30-39, and judges every variant
on validation seeds 1000+ (all disjoint from the prior's seeds 0-19 and from the evaluation seeds
100000+ of `eoc evaluate`): PSNR and FD of the final samples against the uncached ones, DDIM-20,
CFG as the shipped prior. Prints a Markdown table; `--out FILE` writes it too.

    python benchmarks/calibrated_study.py --intervals 3 4 --out benchmarks/results/calibrated-study-cpu.md
"""

from __future__ import annotations

import argparse
import time

import torch

from eoc_dit import DDIMSampler, EOCConfig, FORASchedule, Prior, apply_eoc, fit_coefficients, testbed
from eoc_dit.fitting import DEFAULT_GAINS, TERMS
from eoc_dit.testbed.demo import demo_batch

FIT_SEEDS, TUNE_SEEDS, VALIDATION_SEED_BASE = range(20, 30), range(30, 40), 1000

# name -> fit_coefficients keyword arguments
VARIANTS = {
    "β, both CFG halves alike, gain 1": dict(terms=("extrapolate",), guided=False, gains=(1.0,)),
    "β, guided, gain 1": dict(terms=("extrapolate",), gains=(1.0,)),
    "β + γ, guided, gain 1": dict(terms=("extrapolate", "trend"), gains=(1.0,)),
    "α + β + γ, guided, gain 1": dict(terms=TERMS, gains=(1.0,)),
    "β, guided, gain tuned (default)": dict(terms=("extrapolate",), gains=DEFAULT_GAINS),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--samples", type=int, default=200, help="validation samples (default 200)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    model, prior, sampler = testbed.load_model(), testbed.load_prior(20), DDIMSampler(20)
    base = Prior(prior.mean, prior.stats, prior.metadata)  # without the shipped fits
    noise, labels = demo_batch(model, args.samples, VALIDATION_SEED_BASE)
    uncached = sampler.sample(model, noise, labels, cfg_scale=prior.cfg_scale, progress=False)

    def judged(schedule, fitted=None, config=None):
        with apply_eoc(model, schedule, fitted, config):
            images = sampler.sample(model, noise, labels, cfg_scale=prior.cfg_scale, progress=False)
        return f"{testbed.psnr(images, uncached):.2f} | {testbed.fd(images, uncached):.3f}"

    lines = [f"Calibrated-mode study, testbed DiT, DDIM-20, CFG {prior.cfg_scale}; fit on labels 0-9 x seeds 20-29, "
             f"gain chosen on seeds 30-39, judged on {args.samples} validation samples (seeds 1000+); "
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", "",
             "| FORA N | method | PSNR vs uncached dB | FD to uncached | fitted gain |", "|---|---|---|---|---|"]
    for n in args.intervals:
        schedule = FORASchedule(n)
        lines.append(f"| {n} | plain reuse | {judged(schedule)} | — |")
        for theta in (0.5, 1.0):
            lines.append(f"| {n} | extrapolate θ={theta} | "
                         f"{judged(schedule, base, EOCConfig(mode='extrapolate', theta=theta))} | — |")
        for name, options in VARIANTS.items():
            fit = fit_coefficients(model, sampler, schedule, base, range(10), FIT_SEEDS, tune_seeds=TUNE_SEEDS,
                                   progress=False, **options)
            fitted = Prior(prior.mean, prior.stats, prior.metadata, fits=[fit])
            lines.append(f"| {n} | calibrated: {name} | {judged(schedule, fitted, EOCConfig(mode='calibrated'))} | "
                         f"{fit.info['gain']} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
