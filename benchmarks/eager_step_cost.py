"""Eager cost of one cached DiT step, with and without the EOC correction, against a full step.

Runs on any device with the eager reference ops (no fused kernels): a DiT (default DiT-S/2 at
32x32 latents, N = 256 tokens, C = 384, 12 blocks) with random weights, batch B with CFG (the model
sees 2B rows), FORA interval 2. Timed: the unpatched forward (full step), and the patched forward
at step 3 (a reuse step whose source is step 2 and whose previous compute is step 0) with plain
reuse and with each preset. Prints a Markdown table and writes it under benchmarks/results/.

    python benchmarks/eager_step_cost.py [--model DiT-S/2] [--batch 4] [--repeats 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time

import torch

from eoc_dit import DDIMSampler, DiT_models, EOCConfig, FORASchedule, apply_eoc, calibrate
from eoc_dit.step_protocol import announce_step

NUM_STEPS = 4  # steps 0 and 2 compute, 1 and 3 reuse


def _randomize(model):
    # The DiT init zeroes adaLN (blocks are identities); caching is only meaningful on real blocks.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02)
    return model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, repeats, device):
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="samples per step; the model sees 2x with CFG")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = _randomize(DiT_models[args.model](input_size=args.input_size, num_classes=1000)).to(device).eval()
    sampler = DDIMSampler(NUM_STEPS)
    prior = calibrate(model, sampler, [1], [0], cfg_scale=4.0, holdout=0.0, max_gap=2, progress=False, device=device)

    rows = 2 * args.batch
    x = torch.randn(rows, model.in_channels, args.input_size, args.input_size, device=device)
    y = torch.cat([torch.randint(0, 1000, (args.batch,)), torch.full((args.batch,), 1000)]).to(device)
    timesteps = [torch.full((rows,), t, device=device) for t in sampler.timesteps]

    def step(i):
        announce_step(model, i, NUM_STEPS, True)
        return model(x, timesteps[i], y)

    results = {}
    with torch.no_grad():
        results["full step (uncached)"] = _median_ms(lambda: model(x, timesteps[0], y), args.repeats, device)
        variants = [("cached step, plain reuse", None, None), ("cached step + EOC extrapolate", EOCConfig(mode="extrapolate"), None),
                    ("cached step + EOC delta", EOCConfig(mode="delta", min_gain=None), prior),
                    ("cached step + EOC trend", EOCConfig(mode="trend", min_gain=None), prior)]
        for name, config, variant_prior in variants:
            with apply_eoc(model, FORASchedule(2), prior=variant_prior, config=config):
                def cached_step():
                    for i in range(NUM_STEPS - 1):  # steps 0-2 fill the caches (Cc at 2, Cp at 0)
                        step(i)
                    _sync(device)
                    start = time.perf_counter()
                    step(NUM_STEPS - 1)
                    _sync(device)
                    return (time.perf_counter() - start) * 1e3

                cached_step()  # warm-up: builds the entry plans and moves prior terms to the device
                results[name] = statistics.median(cached_step() for _ in range(args.repeats))

    full = results["full step (uncached)"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    header = (f"# Eager step cost — {args.model} ({model.num_tokens} tokens, width {model.hidden_size}, {model.depth} blocks), "
              f"batch {args.batch} with CFG ({rows} rows), fp32\n\n"
              f"device: {device.type} ({device_name}, {torch.get_num_threads()} threads) · torch {torch.__version__} · "
              f"commit {commit} · {datetime.date.today().isoformat()} · median of {args.repeats}\n\n"
              "| variant | ms | ratio to full step |\n|---|---|---|\n")
    table = "".join(f"| {name} | {ms:.2f} | {ms / full:.3f} |\n" for name, ms in results.items())
    print(header + table)
    os.makedirs(args.out, exist_ok=True)
    name = f"eager-step-cost-{args.model.replace('/', '')}-{device.type}-{datetime.date.today().isoformat()}.md"
    with open(os.path.join(args.out, name), "w") as f:
        f.write(header + table)


if __name__ == "__main__":
    main()
