"""Eager cost of one cached DiT step, with and without the EOC correction, against a full step.

Runs on any device with the eager reference ops (no fused kernels): a DiT (default DiT-S/2 at
32x32 latents, N = 256 tokens, C = 384, 12 blocks) with random weights, batch B with CFG (the model
sees 2B rows), FORA interval 2. Timed: the unpatched forward (full step), and the patched forward
at step 3 (a reuse step whose source is step 2 and whose previous compute is step 0) with plain
reuse and with each preset. Prints a Markdown table and writes it under benchmarks/results/.

    python benchmarks/eager_step_cost.py [--model DiT-S/2] [--batch 4] [--repeats 20] [--device cpu]

The pytest-benchmark suite benchmarks/test_step.py measures the same step (plus the fused backend)
with regression tracking; this script stays as the producer of the README's eager table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks._common

from benchmarks import _common as common  # noqa: E402
from eoc_dit import DDIMSampler, EOCConfig, FORASchedule, apply_eoc, calibrate  # noqa: E402
from eoc_dit.models import DIT_CONFIGS  # noqa: E402
from eoc_dit.step_protocol import announce_step  # noqa: E402

NUM_STEPS = 4  # steps 0 and 2 compute, 1 and 3 reuse


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
    # Every weight random (the DiT init zeroes adaLN: blocks would be identities), seed 0.
    model = common.random_dit(dict(DIT_CONFIGS[args.model], input_size=args.input_size, num_classes=1000), device)
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
        results["full step (uncached)"] = common.time_call(lambda: model(x, timesteps[0], y), device,
                                                           repeats=args.repeats, warmup=0) * 1e3
        variants = [("cached step, plain reuse", None, None),
                    ("cached step + EOC extrapolate", EOCConfig(mode="extrapolate"), None),
                    ("cached step + EOC delta", EOCConfig(mode="delta", min_gain=None), prior),
                    ("cached step + EOC trend", EOCConfig(mode="trend", min_gain=None), prior)]
        for name, config, variant_prior in variants:
            with apply_eoc(model, FORASchedule(2), prior=variant_prior, config=config):
                def cached_step():
                    for i in range(NUM_STEPS - 1):  # steps 0-2 fill the caches (Cc at 2, Cp at 0)
                        step(i)
                    common.synchronize(device)
                    start = time.perf_counter()
                    step(NUM_STEPS - 1)
                    common.synchronize(device)
                    return (time.perf_counter() - start) * 1e3

                cached_step()  # warm-up: builds the entry plans and moves prior terms to the device
                results[name] = statistics.median(cached_step() for _ in range(args.repeats))

    full = results["full step (uncached)"]
    env = common.environment(device)
    header = (f"# Eager step cost — {args.model} ({model.num_tokens} tokens, width {model.hidden_size}, "
              f"{model.depth} blocks), "
              f"batch {args.batch} with CFG ({rows} rows), fp32\n\n"
              f"device: {env['device']} · torch {env['torch']} · "
              f"commit {env['commit']} · {datetime.date.today().isoformat()} · median of {args.repeats}\n\n"
              "| variant | ms | ratio to full step |\n|---|---|---|\n")
    table = "".join(f"| {name} | {ms:.2f} | {ms / full:.3f} |\n" for name, ms in results.items())
    print(header + table)
    os.makedirs(args.out, exist_ok=True)
    name = f"eager-step-cost-{args.model.replace('/', '')}-{device.type}-{datetime.date.today().isoformat()}.md"
    with open(os.path.join(args.out, name), "w") as f:
        f.write(header + table)


if __name__ == "__main__":
    main()
