"""The calibrated mode against every fixed preset on the shipped testbed: fitted on calibration seeds,
judged on evaluation seeds it never saw.

Fits each schedule with ``fit_coefficients`` on labels 0-9 x ``--fit-seeds`` (closed loop) and chooses the
anchor and the refinement on labels 0-9 x ``--tune-seeds`` (both calibration seeds, disjoint from the
prior's seeds 0-19), then samples ``--samples`` evaluation pairs (seeds from ``--seed-base`` up, labels
cycling 0-9: ``eoc evaluate``'s first set by default) uncached, with plain reuse, with every fixed preset
(plain, extrapolate theta 0.8 / 1 / 1.2, TaylorSeer and HiCache order 1-3, trend, delta) and with the fit.
Reports pooled PSNR (``eoc_dit.testbed.psnr``: one MSE over every pixel of every image, clamped to
[-1, 1]) against the uncached samples, the best preset on these evaluation samples (a comparator chosen
after the fact, so the strongest one), and the fit's choices and wall time. Nothing is tuned on the
evaluation samples.

    python benchmarks/calibrated_study.py --intervals 3 4 5 --out benchmarks/results/calibrated-kfit-DATE.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from eoc_dit import DDIMSampler, EOCConfig, FORASchedule, Prior, apply_eoc, fit_coefficients, testbed
from eoc_dit.fitting import DEFAULT_ANCHORS, preset_name
from eoc_dit.sweep import git_commit
from eoc_dit.testbed.demo import EVAL_SEED_BASE, demo_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--warmup", type=int, default=0, help="FORA warm-up steps (default 0)")
    parser.add_argument("--samples", type=int, default=100, help="evaluation samples (default 100)")
    parser.add_argument("--seed-base", type=int, default=EVAL_SEED_BASE, help="first evaluation seed")
    parser.add_argument("--fit-seeds", type=int, nargs=2, default=[20, 24], metavar=("FIRST", "STOP"),
                        help="closed-loop seeds range(FIRST, STOP) x labels 0-9 (default 20 24: 40 pairs)")
    parser.add_argument("--tune-seeds", type=int, nargs=2, default=[30, 34], metavar=("FIRST", "STOP"),
                        help="anchor / refinement seeds range(FIRST, STOP) x labels 0-9 (default 30 34)")
    parser.add_argument("--refine", nargs="+", default=["gauss-newton"], choices=("gauss-newton", "blend", "none"))
    parser.add_argument("--assets", default=None,
                        help="a folder with MODEL_CARD.json, testbed_dit.pt and testbed_prior_ddim20.safetensors "
                             "(default: the shipped testbed)")
    parser.add_argument("--out", default=None, help="Markdown file to write (the table and the fits' choices)")
    args = parser.parse_args()
    commit = git_commit()

    if args.assets is None:
        model, shipped = testbed.load_model(), testbed.load_prior(20)
    else:
        model = testbed.load_model_from(args.assets)
        shipped = Prior.load(os.path.join(args.assets, testbed.prior_name(20)))
    sampler = DDIMSampler(20)
    prior = Prior(shipped.means, shipped.stats, shipped.metadata)  # without the shipped fits
    noise, labels = demo_batch(model, args.samples, args.seed_base)

    def run(schedule=None, fitted=None, config=None):
        if schedule is None:
            return sampler.sample(model, noise, labels, cfg_scale=prior.cfg_scale)
        with apply_eoc(model, schedule, fitted, config):
            return sampler.sample(model, noise, labels, cfg_scale=prior.cfg_scale)

    uncached = run()
    presets = DEFAULT_ANCHORS  # plain, extrapolate, TaylorSeer, HiCache, trend, delta
    rows, notes = [], []
    for n in args.intervals:
        schedule = FORASchedule(n, warmup=args.warmup)
        scores = {}
        for config in presets:
            needs = config is not None and config.needs_prior
            scores[preset_name(config)] = testbed.psnr(run(schedule, prior if needs else None, config), uncached)
            print(f"N={n} {preset_name(config)}: {scores[preset_name(config)]:.3f}", flush=True)
        best = max((k for k in scores if k != "plain"), key=scores.get)
        for refine in args.refine:
            start = time.perf_counter()
            fit = fit_coefficients(model, sampler, schedule, prior, range(10), range(*args.fit_seeds),
                                   tune_seeds=range(*args.tune_seeds), tune_clamp=(-1.0, 1.0), progress=False,
                                   refine=None if refine == "none" else refine)
            wall = time.perf_counter() - start
            fitted = Prior(shipped.means, shipped.stats, shipped.metadata, fits=[fit])
            calibrated = testbed.psnr(run(schedule, fitted, EOCConfig(mode="calibrated")), uncached)
            rows.append((n, refine, scores["plain"], scores["extrapolate:1"], best, scores[best], calibrated, wall))
            kept = ("anchor", "models", "orders", "refine_weights", "gain", "tune_score_db", "phase_s")
            info = {k: fit.info.get(k) for k in kept}
            notes.append(f"- N={n}, refine {refine}: {json.dumps(info)}")
            print(f"N={n} calibrated ({refine}): {calibrated:.3f} (fit {wall:.0f} s) {notes[-1]}", flush=True)
        notes.append(f"- N={n} every preset: {json.dumps({k: round(v, 3) for k, v in scores.items()})}")

    header = (f"Calibrated vs fixed presets, testbed DiT (Fashion-MNIST), DDIM-20, CFG {prior.cfg_scale}, "
              f"FORA warm-up {args.warmup}. Fits: closed loop on labels 0-9 x seeds {args.fit_seeds[0]}-"
              f"{args.fit_seeds[1] - 1}, anchor and refinement on labels 0-9 x seeds {args.tune_seeds[0]}-"
              f"{args.tune_seeds[1] - 1} (clamp [-1, 1]). Evaluation: {args.samples} samples, seeds "
              f"{args.seed_base}+ (labels cycling 0-9), pooled PSNR vs uncached (dB). "
              f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
              f"commit {commit}, {time.strftime('%Y-%m-%d %H:%M')}"
              + ("" if args.assets is None else f", testbed from {args.assets}")
              + ". Fit wall times on a shared, loaded machine.")
    lines = [header, "", "| FORA N | plain | extrapolate θ=1 | best preset (on these samples) | calibrated | "
             "calibrated − best preset | calibrated − plain | fit s |", "|---|---|---|---|---|---|---|---|"]
    for n, refine, plain, extrapolate, best, best_score, calibrated, wall in rows:
        label = "" if len(args.refine) == 1 else f" ({refine})"
        lines.append(f"| {n}{label} | {plain:.2f} | {extrapolate:.2f} | {best_score:.2f} ({best}) | {calibrated:.2f} | "
                     f"{calibrated - best_score:+.2f} | {calibrated - plain:+.2f} | {wall:.0f} |")
    table = "\n".join(lines + ["", "Fits' choices and every preset's score:", ""] + notes)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
