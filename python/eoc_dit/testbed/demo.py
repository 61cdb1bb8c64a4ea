"""``eoc demo`` and ``eoc evaluate``: caching methods on the shipped testbed, judged against the
uncached samples from the same noise.

Evaluation noise uses seeds from ``EVAL_SEED_BASE`` up (the second evaluation seed set from
``EVAL_SEED_BASE_2`` up), disjoint from every seed the shipped prior and fits were made on.
Fidelity (the targets): pooled PSNR against the uncached samples from the same noise (one MSE over
every pixel of every image; the mean and 10th percentile of per-image PSNR beside it) and FD-to-uncached;
FD-to-data and classifier accuracy are reported too (docs/DESIGN.md §4.7 says why FD-to-data is not a
fidelity target). Wall times and speedups are measured in the same run.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import asdict, dataclass

import torch

from .. import distributed, testbed  # testbed: the package of this module (shipped model, prior, metrics)
from ..config import EOCConfig
from ..diffusion import DDIMSampler, noise_for_seed
from ..errors import InputValueError
from ..patching import apply_eoc
from ..schedules import FORASchedule

EVAL_SEED_BASE = 100_000
EVAL_SEED_BASE_2 = 200_000  # the second evaluation seed set of `eoc evaluate`
PRESET_MODES = ("trend", "delta", "extrapolate", "calibrated")


@dataclass
class Method:
    name: str
    interval: int | None  # FORA interval; None = uncached
    mode: str | None  # EOC mode; None = plain reuse


@dataclass
class ResultRow:
    method: str
    interval: int | None
    mode: str | None
    caching_level: float
    seconds: float
    speedup: float
    psnr: float  # pooled PSNR vs uncached, dB (identical sets count 100 dB): the headline
    fd_to_uncached: float
    fd_to_data: float
    accuracy: float
    mean_image_psnr: float = float("nan")  # mean of per-image PSNRs (reads high: near-blank images)
    p10_image_psnr: float = float("nan")  # 10th percentile of per-image PSNRs (the hard images)
    psnr_sets: tuple = ()  # pooled PSNR of each evaluation seed set (when there are several)
    fd_sets: tuple = ()  # FD to uncached of each evaluation seed set


def demo_batch(model, num_samples: int, seed_base: int = EVAL_SEED_BASE):
    """(noise [S, 1, 28, 28], labels [S]): labels cycle through the classes, one seed per sample."""
    labels = torch.arange(num_samples) % model.num_classes
    noise = torch.cat([noise_for_seed(model, seed_base + i) for i in range(num_samples)])
    return noise, labels


def methods_for(intervals, modes) -> list[Method]:
    """Uncached, then per interval: plain FORA and FORA + each EOC mode."""
    methods = [Method("uncached", None, None)]
    for n in intervals:
        methods.append(Method(f"FORA N={n}", n, None))
        methods.extend(Method(f"FORA N={n} + EOC {mode}", n, mode) for mode in modes)
    return methods


def evaluate(methods: list[Method], num_samples: int, num_steps: int = 20, batch_size: int = 500,
             progress: bool = True, seed_sets: int = 1, group=None) -> tuple[list[ResultRow], dict[str, torch.Tensor]]:
    """Sample the same evaluation noise with every method (the first must be uncached); metrics vs it.

    group (docs/DESIGN.md §4.11; default: the initialised default process group, if any): the batches
    are shared among the ranks, whole and in order, the samples gathered in order, so every rank
    computes the metrics of a single process; a method's time is the slowest rank's.

    seed_sets: 1 or 2 — with 2 the samples are split evenly between the seed sets starting at
    ``EVAL_SEED_BASE`` and ``EVAL_SEED_BASE_2``, and PSNR / FD to uncached are also given per set.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if num_samples < 2:
        raise InputValueError(f"--samples must be >= 2 (a Fréchet distance needs a covariance), got {num_samples}")
    if not methods or methods[0].interval is not None:
        raise InputValueError("the first method must be the uncached reference")
    if seed_sets not in (1, 2) or num_samples < 2 * seed_sets:
        raise InputValueError(f"--seed-sets must be 1 or 2 with >= 2 samples per set, "
                              f"got {seed_sets} sets of {num_samples} samples")
    model = testbed.load_model()
    prior = testbed.load_prior(num_steps)
    sampler = DDIMSampler(num_steps)
    sizes = [num_samples - num_samples // 2, num_samples // 2] if seed_sets == 2 else [num_samples]
    batches = [demo_batch(model, n, base) for n, base in zip(sizes, (EVAL_SEED_BASE, EVAL_SEED_BASE_2))]
    noise, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    sets = [slice(0, sizes[0]), slice(sizes[0], num_samples)] if seed_sets == 2 else []
    samples, seconds = {}, {}
    group = distributed.resolve_group(group)
    starts = distributed.shard(list(range(0, num_samples, batch_size)), group, what=f"batches of {batch_size} samples")
    for method in methods:
        schedule = FORASchedule(method.interval) if method.interval else None
        config = EOCConfig(mode=method.mode) if method.mode else None
        outputs, start = [], time.perf_counter()
        for begin in starts:
            batch = slice(begin, begin + batch_size)
            if schedule is None:
                outputs.append(sampler.sample(model, noise[batch], labels[batch], cfg_scale=prior.cfg_scale,
                                              progress=progress))
            else:
                with apply_eoc(model, schedule, prior if config is not None else None, config):
                    outputs.append(sampler.sample(model, noise[batch], labels[batch], cfg_scale=prior.cfg_scale,
                                                  progress=progress))
        seconds[method.name] = distributed.gather_max(time.perf_counter() - start, group)
        samples[method.name] = distributed.gather_rows(torch.cat(outputs), group, what="evaluate: the samples")
    reference = samples[methods[0].name]
    rows = []
    for method in methods:
        level = FORASchedule(method.interval).caching_level_for(num_steps, model.depth) if method.interval else 0.0
        images = samples[method.name]
        per_image = testbed.image_psnrs(images, reference)
        rows.append(ResultRow(method.name, method.interval, method.mode, level, seconds[method.name],
                              seconds[methods[0].name] / seconds[method.name], testbed.psnr(images, reference),
                              testbed.fd(images, reference), testbed.fd_to_data(images),
                              testbed.classifier_accuracy(images, labels), float(per_image.mean()),
                              float(torch.quantile(per_image, 0.1)),
                              tuple(testbed.psnr(images[s], reference[s]) for s in sets),
                              tuple(testbed.fd(images[s], reference[s]) for s in sets)))
    return rows, samples


def run_demo(num_samples: int = 100, interval: int = 3, mode: str = "calibrated", num_steps: int = 20,
             progress: bool = True) -> tuple[list[ResultRow], torch.Tensor]:
    """The demo's rows (uncached / FORA / FORA + EOC) and a grid [3·k, 1, 28, 28] of their first k ≤ 10 samples."""
    methods = methods_for([interval], [mode])
    rows, samples = evaluate(methods, num_samples, num_steps, progress=progress)
    shown = min(10, num_samples)
    return rows, torch.cat([samples[m.name][:shown] for m in methods])


def format_table(rows: list[ResultRow]) -> str:
    """Markdown table: pooled PSNR (the headline), then the mean and 10th percentile of per-image PSNR;
    with several evaluation seed sets, pooled PSNR and FD to uncached also per set (A / B)."""
    per_set = bool(rows and rows[0].psnr_sets)
    extra = " pooled PSNR per seed set | FD to uncached per seed set |" if per_set else ""
    lines = ["| method | caching level | time s | speedup | pooled PSNR vs uncached dB | "
             "mean / p10 per-image PSNR dB | FD to uncached | FD to data | accuracy |"
             + extra, "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if per_set else "")]
    for r in rows:
        cached = r.interval is not None
        psnr = f"{r.psnr:.2f}" if cached else "—"
        per_image = f"{r.mean_image_psnr:.2f} / {r.p10_image_psnr:.2f}" if cached else "—"
        line = (f"| {r.method} | {r.caching_level:.2f} | {r.seconds:.1f} | {r.speedup:.2f}× | {psnr} | {per_image} | "
                f"{r.fd_to_uncached:.3f} | {r.fd_to_data:.2f} | {r.accuracy:.3f} |")
        if per_set:
            sets_psnr = " / ".join(f"{v:.2f}" for v in r.psnr_sets) if cached else "—"
            line += f" {sets_psnr} | {' / '.join(f'{v:.3f}' for v in r.fd_sets)} |"
        lines.append(line)
    return "\n".join(lines)


def write_results(rows: list[ResultRow], out_dir: str, header: str) -> tuple[str, str]:
    """results.csv and results.md in ``out_dir``; returns their paths."""
    csv_path, md_path = os.path.join(out_dir, "results.csv"), os.path.join(out_dir, "results.md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        for r in rows:  # per-set values as "a;b" so that every row stays one CSV record
            writer.writerow(asdict(r) | {key: ";".join(f"{v:.6g}" for v in getattr(r, key))
                                         for key in ("psnr_sets", "fd_sets")})
    with open(md_path, "w") as f:
        f.write(header + "\n\n" + format_table(rows) + "\n")
    return csv_path, md_path
