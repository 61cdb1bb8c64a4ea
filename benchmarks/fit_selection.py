"""Choose among candidate fits of one schedule on a calibration SELECTION split, never on evaluation seeds.

Samples labels 0-9 x ``--seeds`` (default 40-49: disjoint from the testbed prior's seeds 0-19, the fits'
20-29, their tune pairs' 30-39 and the evaluation seeds 100000+ / 200000+) uncached, then under each
schedule with the calibrated fit of every candidate prior file that has one and with the given fixed
presets, and prints the pooled PSNR (images clamped to [-1, 1]) of each against the uncached samples.
The shipped testbed fits were chosen this way, schedule by schedule (benchmarks/results/
fit-selection-testbed-cpu-2026-12-01.md).

    python benchmarks/fit_selection.py --schedules fora:4 fora:5 --priors a.safetensors b.safetensors \\
        --presets taylorseer:2 taylorseer:3
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from eoc_dit import DDIMSampler, EOCConfig, Prior, apply_eoc, noise_for_seed, testbed
from eoc_dit.cli import _parse_schedule
from eoc_dit.sweep import parse_method


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", nargs="+", required=True, help="e.g. fora:4 taylorseer:4")
    parser.add_argument("--priors", nargs="+", required=True, help="candidate prior files (their fits)")
    parser.add_argument("--presets", nargs="*", default=["taylorseer:2", "taylorseer:3"],
                        help="fixed presets scored beside them (eoc evaluate's method names)")
    parser.add_argument("--seeds", nargs=2, type=int, default=[40, 49], metavar=("FIRST", "LAST"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the scores here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = testbed.load_model()
    sampler = DDIMSampler(args.steps)
    pairs = [(label, seed) for label in range(10) for seed in range(args.seeds[0], args.seeds[1] + 1)]
    noise = torch.cat([noise_for_seed(model, seed) for _, seed in pairs])
    labels = torch.tensor([label for label, _ in pairs])
    priors = {path: Prior.load(path) for path in args.priors}
    cfg_scale = next(iter(priors.values())).cfg_scale
    start = time.perf_counter()
    uncached = sampler.sample(model, noise, labels, cfg_scale=cfg_scale, progress=False)
    print(f"{len(pairs)} pairs (labels 0-9 x seeds {args.seeds[0]}-{args.seeds[1]}), uncached "
          f"{time.perf_counter() - start:.0f} s")
    scores = {}
    for text in args.schedules:
        schedule = _parse_schedule(text)
        row = {}
        for path, prior in priors.items():
            if prior.fit_for(schedule.mask(args.steps, model.depth)) is not None:
                with apply_eoc(model, schedule, prior, EOCConfig(mode="calibrated")):
                    images = sampler.sample(model, noise, labels, cfg_scale=cfg_scale, progress=False)
                row[os.path.basename(path)] = testbed.psnr(images, uncached)
        for name in args.presets:
            config = parse_method(name).config
            prior = next(iter(priors.values())) if config is not None and config.needs_prior else None
            with apply_eoc(model, schedule, prior, config):
                images = sampler.sample(model, noise, labels, cfg_scale=cfg_scale, progress=False)
            row[name] = testbed.psnr(images, uncached)
        scores[text] = row
        print(text, "  ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(scores, f, indent=1)


if __name__ == "__main__":
    main()
