"""EOC against diffusers' own caches on the shipped testbed, run through diffusers' DiTPipeline.

The testbed DiT (eoc_dit.testbed, pixel space: 1×28×28 Fashion-MNIST, 10 classes) is converted into a
``DiTTransformer2DModel`` (``dit_to_diffusers(..., num_embeds_ada_norm=1000)``: DiTPipeline's null class is
1000) and sampled by ``DiTPipeline`` with diffusers' ``DDIMScheduler`` (linear betas 1e-4..0.02 as the
testbed was trained, ``clip_sample=False``, its other defaults), 20 steps, CFG 3. Pixel space: the
pipeline's VAE is an identity stub (``decode(x).sample = x``, ``scaling_factor = 1``), so its images are
(x / 2 + 0.5).clamp(0, 1); they are mapped back to [−1, 1] for the metrics.

Every method samples the same (label, seed) pairs from the same noise (``PipelineSampler.noise_for_seed``),
in the same batches:

- uncached: the reference;
- diffusers TaylorSeer (``apply_taylorseer_cache``, orders 1 and 2, ``cache_identifiers`` =
  ``transformer_blocks.N.attn1`` / ``.ff``, fp32 factors) at a few (disable_cache_before_step, cache_interval)
  settings: each fixes the set of full steps;
- diffusers FirstBlockCache and MagCache (adaptive: the full-step count is measured, threshold swept;
  MagCache's ``mag_ratios`` come from its own calibration run on calibration seeds);
- EOC at exactly TaylorSeer's full steps (a ``MaskSchedule``): plain reuse, extrapolate (θ = 1) and
  calibrated (``calibrate`` + ``fit_coefficients`` through the same pipeline, calibration seeds 0..,
  fitting seeds and gain-tuning seeds disjoint from the evaluation seeds 100000..).

DiTPipeline never enters a diffusers cache context, which TaylorSeer and FirstBlockCache need ("No cache
context is set"): each pipeline call of every method runs inside
``diffusers.hooks.hooks._set_cache_context(transformer, CacheContext("inference"))`` (non-public), and the
hooks' state is reset between calls (``HookRegistry.reset_stateful_hooks``). A "full step" is a step whose
last block computes its MLP (counted by a forward pre-hook on ``transformer_blocks[-1].ff.net[0]``, which
only a real computation calls), averaged over the batches.

Metrics against the uncached images (clamped to [−1, 1]): pooled PSNR = 10·log10(4 / MSE pooled over all
pixels of all images), the mean of per-image PSNR beside it, FD to uncached in the testbed classifier's
feature space (``eoc_dit.testbed.fd``) and the wall time of sampling all evaluation images.

    nice python benchmarks/diffusers_head_to_head.py --samples 160      # writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import RESULTS_DIR, environment, environment_line  # noqa: E402

NUM_STEPS, CFG = 20, 3.0
EVAL_SEED0 = 100000


class IdentityVAE(nn.Module):
    """DiTPipeline's VAE for a pixel-space model: ``decode(x).sample`` is x."""

    class _Config:
        scaling_factor = 1.0

    class _Decoded:
        def __init__(self, sample):
            self.sample = sample

    def __init__(self):
        super().__init__()
        self.config = self._Config()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a device and dtype

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def decode(self, x):
        return self._Decoded(x)


def taylorseer_full_steps(before: int, interval: int, num_steps: int = NUM_STEPS) -> list[int]:
    """The steps diffusers' TaylorSeerCacheHook computes (its _measure_should_compute, diffusers 0.42)."""
    return [s for s in range(num_steps) if s < before or (s - before - 1) % interval == 0]


def mask_for(steps: list[int], num_blocks: int, num_steps: int = NUM_STEPS) -> torch.Tensor:
    mask = torch.zeros(num_steps, num_blocks, 2, dtype=torch.bool)
    mask[steps] = True
    return mask


def metrics(images: torch.Tensor, reference: torch.Tensor) -> dict:
    from eoc_dit import testbed

    a, b = images.clamp(-1, 1).double(), reference.clamp(-1, 1).double()
    mse = (a - b).pow(2).flatten(1).mean(1)
    pooled = 10 * math.log10(4.0 / max(float(mse.mean()), 1e-30))
    per_image = torch.where(mse > 0, 10 * torch.log10(4.0 / mse.clamp(min=1e-30)), torch.full_like(mse, 100.0))
    return {"psnr_pooled_db": pooled, "psnr_mean_db": float(per_image.mean()),
            "fd_to_uncached": testbed.fd(images.float(), reference.float())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=160, help="evaluation images (a multiple of 10)")
    parser.add_argument("--batch", type=int, default=40, help="images per pipeline call")
    parser.add_argument("--levels", default="3:2,3:3,3:5", help="TaylorSeer (disable_cache_before_step:interval) list")
    parser.add_argument("--fbc", default="0.05,0.1,0.2", help="FirstBlockCache thresholds")
    parser.add_argument("--mag", default="0.03,0.06,0.12", help="MagCache thresholds")
    parser.add_argument("--calib-seeds", type=int, default=8, help="calibration seeds per class")
    parser.add_argument("--terms", default="extrapolate",
                        help="EOC calibrated: candidate term sets, ';'-separated, each ','-separated "
                             "(e.g. 'extrapolate;extrapolate,delta'); chosen per level on the tuning seeds")
    parser.add_argument("--refine-split", default="phase", choices=("phase", "phase-block", "phase-block-branch"),
                        help="EOC calibrated: the fit's refinement directions (fit_coefficients' refine_split)")
    parser.add_argument("--refine-iterations", type=int, default=2, help="EOC calibrated: refinement steps at most")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers import DDIMScheduler, DiTPipeline
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        HookRegistry,
        MagCacheConfig,
        TaylorSeerCacheConfig,
        apply_first_block_cache,
        apply_mag_cache,
        apply_taylorseer_cache,
    )
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    from eoc_dit import EOCConfig, MaskSchedule, apply_eoc, calibrate, fit_coefficients, testbed
    from eoc_dit.diffusers_conversion import dit_to_diffusers
    from eoc_dit.diffusers_pipeline import PipelineSampler

    start_all = time.perf_counter()
    env = environment("cpu", threads=args.threads)  # the commit the run starts from
    transformer = dit_to_diffusers(testbed.load_model(), num_embeds_ada_norm=1000)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False)
    pipe = DiTPipeline(transformer=transformer, vae=IdentityVAE(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    sampler = PipelineSampler(pipe, NUM_STEPS)
    num_blocks = len(transformer.transformer_blocks)

    per_class = args.samples // 10
    pairs = [(label, EVAL_SEED0 + i) for label in range(10) for i in range(per_class)]
    noise = torch.cat([sampler.noise_for_seed(seed) for _, seed in pairs])
    labels = torch.tensor([label for label, _ in pairs])
    computes = [0]
    transformer.transformer_blocks[-1].ff.net[0].register_forward_pre_hook(
        lambda module, inputs: computes.__setitem__(0, computes[0] + 1))
    registry = HookRegistry.check_if_exists_or_initialize(transformer)

    def sample_all():
        """All evaluation images in [-1, 1], the wall time and the mean full-step count per call."""
        images, calls = [], 0
        computes[0] = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for lo in range(0, len(pairs), args.batch):
                registry.reset_stateful_hooks()
                _set_cache_context(transformer, CacheContext("inference"))
                try:
                    out = sampler.sample(transformer, noise[lo : lo + args.batch], labels[lo : lo + args.batch],
                                         cfg_scale=CFG, progress=False)
                finally:
                    _set_cache_context(transformer, None)
                images.append(out * 2 - 1)
                calls += 1
        return torch.cat(images), time.perf_counter() - t0, computes[0] / calls

    rows = []

    def record(method, setting, images, seconds, full_steps):
        row = {"method": method, "setting": setting, "full_steps": round(full_steps, 2), "time_s": round(seconds, 1)}
        row.update(metrics(images, reference) if images is not reference else
                   {"psnr_pooled_db": None, "psnr_mean_db": None, "fd_to_uncached": 0.0})
        rows.append(row)
        print(json.dumps(row), flush=True)

    reference, seconds, full = sample_all()
    record("uncached", "", reference, seconds, full)

    # EOC's prior and fits: through the same pipeline, on calibration seeds only.
    t0 = time.perf_counter()
    prior = calibrate(transformer, sampler, labels=list(range(10)), seeds=list(range(args.calib_seeds)),
                      cfg_scale=CFG, max_gap=6, holdout=0.25, progress=False, batch_size=40)
    calibration_s = time.perf_counter() - t0
    levels = [tuple(int(v) for v in item.split(":")) for item in args.levels.split(",")]
    term_sets = [tuple(item.split(",")) for item in args.terms.split(";")]
    fit_s = {}
    for before, interval in levels:
        steps = taylorseer_full_steps(before, interval)
        t0 = time.perf_counter()
        # One fit per candidate term set; the one whose gain-tuned samples come closest to uncached on the
        # tuning seeds (calibration data, never the evaluation seeds) is kept.
        fits = [fit_coefficients(transformer, sampler, MaskSchedule(mask_for(steps, num_blocks)), prior,
                                 labels=list(range(10)), seeds=[1000, 1001], tune_seeds=[2000, 2001],
                                 tune_clamp=(0.0, 1.0), terms=terms, progress=False, refine_split=args.refine_split,
                                 refine_iterations=args.refine_iterations) for terms in term_sets]
        fit = max(fits, key=lambda f: max(f.info["tune_score_db"].values()))
        prior.add_fit(fit)
        fit_s[f"{before}:{interval}"] = {
            "seconds": round(time.perf_counter() - t0, 1), "gain": fit.info["gain"], "terms": fit.info["terms"],
            "refine_split": args.refine_split, "refine_iterations": args.refine_iterations,
            "tune_score_db": {"+".join(f.info["terms"]): round(max(f.info["tune_score_db"].values()), 3)
                              for f in fits}}

    for before, interval in levels:
        steps = taylorseer_full_steps(before, interval)
        setting = f"before={before}, interval={interval}: steps {steps}"
        for order in (1, 2):
            apply_taylorseer_cache(transformer, TaylorSeerCacheConfig(
                cache_interval=interval, disable_cache_before_step=before, max_order=order,
                taylor_factors_dtype=torch.float32,
                cache_identifiers=[r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]))
            registry.invalidate_child_registries_cache()  # the context must reach the new hooks
            images, seconds, full = sample_all()
            registry.remove_hook("taylorseer_cache", recurse=True)
            registry.invalidate_child_registries_cache()
            record(f"diffusers TaylorSeer order {order}", setting, images, seconds, full)
        schedule = MaskSchedule(mask_for(steps, num_blocks))
        for name, config in (("EOC plain reuse", None), ("EOC extrapolate", EOCConfig(mode="extrapolate")),
                             ("EOC calibrated", EOCConfig(mode="calibrated"))):
            with apply_eoc(transformer, schedule, prior if config is not None and config.needs_prior else None,
                           config):
                images, seconds, full = sample_all()
            record(name, f"the same steps {steps}", images, seconds, full)

    for threshold in (float(v) for v in args.fbc.split(",")):
        apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=threshold))
        registry.invalidate_child_registries_cache()
        images, seconds, full = sample_all()
        for hook in ("fbc_leader_block_hook", "fbc_block_hook"):
            registry.remove_hook(hook, recurse=True)
        registry.invalidate_child_registries_cache()
        record("diffusers FirstBlockCache", f"threshold={threshold}", images, seconds, full)

    # MagCache's ratios: its own calibration mode, on one calibration batch (seeds 0..3 of each class).
    apply_mag_cache(transformer, MagCacheConfig(calibrate=True, num_inference_steps=NUM_STEPS))
    registry.invalidate_child_registries_cache()
    printed = io.StringIO()
    cal_noise = torch.cat([sampler.noise_for_seed(seed) for _ in range(10) for seed in range(4)])
    cal_labels = torch.tensor([label for label in range(10) for _ in range(4)])
    with contextlib.redirect_stdout(printed), torch.no_grad():
        registry.reset_stateful_hooks()
        sampler.sample(transformer, cal_noise, cal_labels, cfg_scale=CFG, progress=False)
    for hook in ("mag_cache_leader_block_hook", "mag_cache_block_hook"):
        registry.remove_hook(hook, recurse=True)
    registry.invalidate_child_registries_cache()
    mag_ratios = json.loads(re.findall(r"\[[^\[\]]*\]", printed.getvalue())[-1])
    for threshold in (float(v) for v in args.mag.split(",")):
        apply_mag_cache(transformer, MagCacheConfig(threshold=threshold, num_inference_steps=NUM_STEPS,
                                                    mag_ratios=mag_ratios))
        registry.invalidate_child_registries_cache()
        images, seconds, full = sample_all()
        for hook in ("mag_cache_leader_block_hook", "mag_cache_block_hook"):
            registry.remove_hook(hook, recurse=True)
        registry.invalidate_child_registries_cache()
        record("diffusers MagCache", f"threshold={threshold}", images, seconds, full)

    import diffusers

    env["diffusers"] = diffusers.__version__
    result = {"environment": env, "conditions": {
        "model": "eoc_dit.testbed converted to DiTTransformer2DModel (pixel space, identity VAE)",
        "pipeline": "DiTPipeline", "scheduler": "DDIMScheduler(linear 1e-4..0.02, clip_sample=False)",
        "num_steps": NUM_STEPS, "cfg_scale": CFG, "samples": len(pairs), "batch": args.batch,
        "eval_seeds": f"labels 0-9 x seeds {EVAL_SEED0}..{EVAL_SEED0 + per_class - 1}",
        "calibration": f"labels 0-9 x seeds 0..{args.calib_seeds - 1}, max_gap 6, holdout 0.25 "
                       f"({calibration_s:.1f} s)",
        "fits": "labels 0-9 x seeds 1000-1001, gain (and term set among "
                f"{' | '.join('+'.join(t) for t in term_sets)}) chosen on seeds 2000-2001 clamped to [0, 1]",
        "fit_s": fit_s,
        "mag_ratios": mag_ratios, "total_s": round(time.perf_counter() - start_all, 1)}, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"diffusers-head-to-head-cpu-{env['date'][:10]}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(render(result))
    print(render(result))


def render(result: dict) -> str:
    c = result["conditions"]
    lines = [f"# EOC vs diffusers' caches — testbed through DiTPipeline, DDIM-{c['num_steps']}, CFG {c['cfg_scale']}",
             "", environment_line(result["environment"]) + f" · diffusers {result['environment']['diffusers']}", "",
             f"{c['samples']} samples ({c['eval_seeds']}), batches of {c['batch']}; {c['scheduler']}; "
             f"EOC calibration {c['calibration']}; fits {c['fits']}. PSNR and FD against the uncached images "
             "from the same noise, images clamped to [-1, 1]; pooled PSNR = 10·log10(4 / MSE over all pixels of "
             "all images). Full steps: mean per pipeline call of the steps whose last block computed. Time: "
             "wall time of all samples (one CPU thread, nice, a shared 2-core machine).", "",
             "| method | setting | full steps | pooled PSNR dB | mean per-image PSNR dB | FD to uncached | time s |",
             "|---|---|---|---|---|---|---|"]
    def fmt(value):
        return "—" if value is None else f"{value:.2f}"

    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['setting']} | {r['full_steps']:.2f} | {fmt(r['psnr_pooled_db'])} | "
                     f"{fmt(r['psnr_mean_db'])} | {r['fd_to_uncached']:.3f} | {r['time_s']:.1f} |")
    lines += ["", "EOC calibrated fits (per TaylorSeer setting before:interval): "
              + "; ".join(f"{level}: terms {'+'.join(info.get('terms', ['extrapolate']))}, refinement "
                          f"{info.get('refine_split', 'phase')} × {info.get('refine_iterations', 2)}, "
                          f"gain {info['gain']:.3g}, {info['seconds']} s" for level, info in c["fit_s"].items()) + "."]
    lines += ["", "EOC calibrated against diffusers' TaylorSeer (best of orders 1 and 2) at the same full steps:", ""]
    by = {}
    for r in result["rows"]:
        by.setdefault(r["setting"].split(": steps ")[-1].replace("the same steps ", ""), {})[r["method"]] = r
    for steps, methods in by.items():
        ts = [methods[m]["psnr_pooled_db"] for m in methods if m.startswith("diffusers TaylorSeer")]
        if "EOC calibrated" in methods and ts:
            diff = methods["EOC calibrated"]["psnr_pooled_db"] - max(ts)
            verdict = "met" if diff >= 1.0 else "MISSED"
            lines.append(f"- steps {steps}: {diff:+.2f} dB (target ≥ +1 dB: {verdict})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
