"""``eoc demo`` and ``eoc evaluate``: caching methods on the shipped testbed, judged against the
uncached samples from the same noise.

Evaluation noise uses seeds from ``EVAL_SEED_BASE`` up (the second evaluation seed set from
``EVAL_SEED_BASE_2`` up), disjoint from every seed the shipped prior and fits were made on.
Fidelity (the targets): pooled PSNR against the uncached samples from the same noise (one MSE over
every pixel of every image; the mean and 10th percentile of per-image PSNR beside it) and FD-to-uncached;
FD-to-data and classifier accuracy are reported too (docs/DESIGN.md §4.7 says why FD-to-data is not a
fidelity target). Wall times and speedups are measured in the same run (in ``run_sweep``, the
resumable sweep of ``eoc evaluate``, a row resumed in a later process is timed in that process and
its speedup is against the uncached row's time; each row records its session).

``run_sweep`` writes the rows; ``eoc_dit.sweep`` parses the method specs and renders the CSV as a
Markdown table and a quality-vs-speed figure. ``comparison_rows`` lays out the labelled grids of
``eoc demo`` and ``eoc evaluate`` (uncached, cached, ×DIFF_GAIN differences; Fashion-MNIST class names).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import distributed, testbed  # testbed: the package of this module (shipped model, prior, metrics)
from ..config import EOCConfig
from ..diffusion import DDIMSampler, noise_for_seed
from ..errors import InputValueError
from ..patching import apply_eoc
from ..schedules import FORASchedule

EVAL_SEED_BASE = 100_000
EVAL_SEED_BASE_2 = 200_000  # the second evaluation seed set of `eoc evaluate`


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


def evaluation_set(model, num_samples: int, seed_sets: int = 1):
    """(noise [S, ...], labels [S], the seed sets' slices, their seed bases): with 2 sets, the first
    S - S//2 samples use seeds from ``EVAL_SEED_BASE`` up, the others seeds from ``EVAL_SEED_BASE_2`` up."""
    if num_samples < 2:
        raise InputValueError(f"--samples must be >= 2 (a Fréchet distance needs a covariance), got {num_samples}")
    if seed_sets not in (1, 2) or num_samples < 2 * seed_sets:
        raise InputValueError(f"--seed-sets must be 1 or 2 with >= 2 samples per set, "
                              f"got {seed_sets} sets of {num_samples} samples")
    sizes = [num_samples - num_samples // 2, num_samples // 2] if seed_sets == 2 else [num_samples]
    bases = (EVAL_SEED_BASE, EVAL_SEED_BASE_2)[:seed_sets]
    batches = [demo_batch(model, n, base) for n, base in zip(sizes, bases)]
    noise, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    sets = [slice(0, sizes[0]), slice(sizes[0], num_samples)] if seed_sets == 2 else []
    return noise, labels, sets, bases


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _prior_for(prior, config):
    return prior if config is not None and config.needs_prior else None


def sample_method(model, sampler, prior, schedule, config, noise, labels, batch_size: int, progress: bool = True,
                  group=None) -> tuple[torch.Tensor, float]:
    """(samples [S, ...] of every rank in order, wall seconds of the slowest rank) of one method: uncached
    (``schedule`` None), plain reuse (``config`` None) or a correction. The prior is handed only to the
    modes that need one (``config.needs_prior``: trend, delta, calibrated; with it, the offline judgment
    of ``EOCConfig`` applies to trend and delta); extrapolate, TaylorSeer and HiCache run on the
    sample's own features alone, as they would without a calibration."""
    group = distributed.resolve_group(group)
    starts = distributed.shard(list(range(0, noise.shape[0], batch_size)), group,
                               what=f"batches of {batch_size} samples")
    outputs, start = [], time.perf_counter()
    for begin in starts:
        batch = slice(begin, begin + batch_size)
        if schedule is None:
            outputs.append(sampler.sample(model, noise[batch], labels[batch], cfg_scale=prior.cfg_scale,
                                          progress=progress))
        else:
            with apply_eoc(model, schedule, _prior_for(prior, config), config):
                outputs.append(sampler.sample(model, noise[batch], labels[batch], cfg_scale=prior.cfg_scale,
                                              progress=progress))
    seconds = distributed.gather_max(time.perf_counter() - start, group)
    return distributed.gather_rows(torch.cat(outputs), group, what="evaluate: the samples"), seconds


def image_metrics(images: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, sets) -> dict:
    """Pooled PSNR (the headline), per-image PSNR mean and 10th percentile, FD to uncached, each also per
    seed set (``sets``: slices), FD to data and classifier accuracy."""
    per_image = testbed.image_psnrs(images, reference)
    return {"psnr": testbed.psnr(images, reference), "mean_image_psnr": float(per_image.mean()),
            "p10_image_psnr": float(torch.quantile(per_image, 0.1)), "fd_to_uncached": testbed.fd(images, reference),
            "fd_to_data": testbed.fd_to_data(images), "accuracy": testbed.classifier_accuracy(images, labels),
            "psnr_sets": tuple(testbed.psnr(images[s], reference[s]) for s in sets),
            "fd_sets": tuple(testbed.fd(images[s], reference[s]) for s in sets)}


def evaluate(methods: list[Method], num_samples: int, num_steps: int = 20, batch_size: int = 500,
             progress: bool = True, seed_sets: int = 1, group=None) -> tuple[list[ResultRow], dict[str, torch.Tensor]]:
    """Sample the same evaluation noise with every method (the first must be uncached); metrics vs it.

    group (docs/DESIGN.md §4.11; default: the initialised default process group, if any): the batches
    are shared among the ranks, whole and in order, the samples gathered in order, so every rank
    computes the metrics of a single process; a method's time is the slowest rank's.

    seed_sets: 1 or 2 — with 2 the samples are split evenly between the seed sets starting at
    ``EVAL_SEED_BASE`` and ``EVAL_SEED_BASE_2``, and PSNR / FD to uncached are also given per set.
    """
    _check_batch_size(batch_size)
    if not methods or methods[0].interval is not None:
        raise InputValueError("the first method must be the uncached reference")
    model = testbed.load_model()
    noise, labels, sets, _ = evaluation_set(model, num_samples, seed_sets)
    prior = testbed.load_prior(num_steps)
    sampler = DDIMSampler(num_steps)
    samples, seconds = {}, {}
    for method in methods:
        schedule = FORASchedule(method.interval) if method.interval else None
        config = EOCConfig(mode=method.mode) if method.mode else None
        samples[method.name], seconds[method.name] = sample_method(model, sampler, prior, schedule, config, noise,
                                                                   labels, batch_size, progress, group)
    reference = samples[methods[0].name]
    rows = []
    for method in methods:
        level = FORASchedule(method.interval).caching_level_for(num_steps, model.depth) if method.interval else 0.0
        m = image_metrics(samples[method.name], reference, labels, sets)
        rows.append(ResultRow(method.name, method.interval, method.mode, level, seconds[method.name],
                              seconds[methods[0].name] / seconds[method.name], m["psnr"], m["fd_to_uncached"],
                              m["fd_to_data"], m["accuracy"], m["mean_image_psnr"], m["p10_image_psnr"],
                              m["psnr_sets"], m["fd_sets"]))
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


# ------------------------------------------------------------------------------------------------ grids
#: Gain of the |cached − uncached| rows of the grids: a difference of 2/DIFF_GAIN (a quarter of the range) is white.
DIFF_GAIN = 4


def comparison_rows(reference: torch.Tensor, cached: list[tuple[str, torch.Tensor]], labels: torch.Tensor,
                    gain: float = DIFF_GAIN) -> tuple[list[torch.Tensor], list[str], list[str]]:
    """(rows, row labels, column labels) of a labelled grid (``eoc_dit.images.write_labelled_grid``): the
    uncached images, each cached method's images from the same noise, then each method's
    gain·|cached − uncached|; columns are labelled with the Fashion-MNIST class of their label."""
    from ..images import difference_images
    from .data import CLASSES

    rows = [reference] + [images for _, images in cached]
    rows += [difference_images(images, reference, gain) for _, images in cached]
    names = ["uncached"] + [name for name, _ in cached]
    names += [f"|{name} − uncached| ×{gain:g}" for name, _ in cached]
    return rows, names, [CLASSES[int(label)] for label in labels]


def demo_grid(rows: list[ResultRow], grid: torch.Tensor):
    """``comparison_rows`` of :func:`run_demo`'s output: its grid holds the first k samples of each row
    (uncached first), whose labels are 0, 1, ... as ``demo_batch`` draws them."""
    from .data import CLASSES

    shown = grid.shape[0] // len(rows)
    reference, *cached = grid.split(shown)
    labels = torch.arange(shown) % len(CLASSES)
    return comparison_rows(reference, [(row.method, images) for row, images in zip(rows[1:], cached)], labels)


# ------------------------------------------------------------------------------------------------ the sweep
SWEEP_CSV, SWEEP_MANIFEST, SWEEP_REFERENCE = "results.csv", "sweep.json", "uncached.npy"
GRID_SAMPLES = 10  # the samples per row of eoc evaluate's grid.png


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _device_name() -> str:
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _write_atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_manifest(path: str, manifest: dict) -> None:
    try:
        with open(path) as f:
            stored = json.load(f)
    except FileNotFoundError:
        raise InputValueError(f"--resume: {path} is missing, so {os.path.dirname(path) or '.'}/{SWEEP_CSV} cannot be "
                              "checked against this sweep's settings (run without --resume to start again)") from None
    except (OSError, ValueError) as exc:
        raise InputValueError(f"--resume: {path} unreadable ({type(exc).__name__})") from None
    for key, value in manifest.items():
        if stored.get(key) != value:
            raise InputValueError(f"--resume: the sweep in {os.path.dirname(path) or '.'} was run with {key} = "
                                  f"{stored.get(key)!r}, this one has {value!r} (run without --resume to start again, "
                                  "or give the same settings)")


def run_sweep(schedules, methods, num_samples: int, out_dir: str, *, num_steps: int = 20, batch_size: int = 500,
              seed_sets: int = 2, resume: bool = False, progress: bool = True, log=print, group=None):
    """The quality-vs-speed sweep of ``eoc evaluate`` on the shipped testbed: uncached, then each
    (schedule, method) row — ``schedules``: FORASchedules, ``methods``: ``eoc_dit.sweep.MethodSpec`` —
    on the same evaluation noise (``evaluation_set``), with metrics against the uncached samples.

    Each finished row is appended to ``out_dir/results.csv`` at once (``eoc_dit.sweep.SweepCSV``), the
    uncached samples kept in ``out_dir/uncached.npy`` and the settings in ``out_dir/sweep.json``; with
    ``resume`` the rows already in the CSV are not run again (the settings, the shipped model and prior
    must be the ones of that run). "calibrated" is skipped, with a note, under a schedule the prior has
    no fit for. Under torchrun (``group``) batches are shared as in :func:`evaluate`; rank 0 writes.
    Returns (the CSV's rows, the notes, the first ``GRID_SAMPLES`` samples of every row sampled in this
    call, keyed by (schedule key, method spec), for :func:`sweep_grid`).
    """
    from .. import sweep

    _check_batch_size(batch_size)
    model = testbed.load_model()
    noise, labels, sets, bases = evaluation_set(model, num_samples, seed_sets)
    prior = testbed.load_prior(num_steps)
    sampler = DDIMSampler(num_steps)
    writer = distributed.is_main(group)
    manifest = {"format": 1, "samples": num_samples, "steps": num_steps, "seed_sets": seed_sets,
                "cfg_scale": prior.cfg_scale,
                "model_sha256": _sha256(os.path.join(testbed.ASSETS, testbed.CHECKPOINT_NAME)),
                "prior_sha256": _sha256(os.path.join(testbed.ASSETS, testbed.prior_name(num_steps)))}
    csv_path, manifest_path = os.path.join(out_dir, SWEEP_CSV), os.path.join(out_dir, SWEEP_MANIFEST)
    reference_path = os.path.join(out_dir, SWEEP_REFERENCE)
    resuming = resume and os.path.exists(csv_path)
    if resuming:
        _check_manifest(manifest_path, manifest)
    elif writer:
        _write_atomic(manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    table = sweep.SweepCSV(csv_path, resume=resuming, write=writer)
    session = max((r["session"] for r in table.rows), default=0) + 1
    card = testbed.model_card()["config"]
    common = {"samples": num_samples, "model": f"testbed DiT (Fashion-MNIST, {card['depth']} blocks, width "
                                               f"{card['hidden_size']})",
              "sampler": f"DDIM-{num_steps}, CFG {prior.cfg_scale:g}",
              "seed_sets": ";".join(f"{'AB'[i]}={b}+" if seed_sets == 2 else f"{b}+" for i, b in enumerate(bases)),
              "session": session, "commit": sweep.git_commit(), "device": _device_name(), "torch": torch.__version__}

    def metrics_row(schedule_key, method_key, label, fraction, images, reference, seconds, uncached_seconds):
        m = image_metrics(images, reference, labels, sets)
        per_set = {f"psnr_{k}": v for k, v in zip("ab", m["psnr_sets"])} | {f"fd_{k}": v for k, v in
                                                                             zip("ab", m["fd_sets"])}
        return {"schedule": schedule_key, "method": method_key, "label": label, "full_fraction": fraction,
                "seconds": seconds, "speedup": uncached_seconds / seconds, **per_set, **common,
                **{k: v for k, v in m.items() if k not in ("psnr_sets", "fd_sets")}}

    uncached = table.done("none", sweep.UNCACHED)
    if uncached is not None:
        try:
            reference = torch.from_numpy(np.load(reference_path))
        except (OSError, ValueError) as exc:
            raise InputValueError(f"--resume: the uncached samples {reference_path} are unreadable "
                                  f"({type(exc).__name__}); run without --resume to start again") from None
        if tuple(reference.shape) != tuple(noise.shape):
            raise InputValueError(f"--resume: {reference_path} holds {list(reference.shape)}, this sweep samples "
                                  f"{list(noise.shape)}; run without --resume to start again")
        log(f"resuming {csv_path}: {len(table.rows)} rows done (session {session})")
    else:
        reference, seconds = sample_method(model, sampler, prior, None, None, noise, labels, batch_size, progress,
                                           group)
        if writer:
            _write_atomic(reference_path, lambda f: np.save(f, reference.float().numpy()))
        uncached = table.append(metrics_row("none", sweep.UNCACHED, "uncached", 1.0, reference, reference, seconds,
                                            seconds))
        log(f"uncached: {seconds:.1f} s")
    kept = {("none", sweep.UNCACHED): reference[:GRID_SAMPLES]}
    notes, todo = [], [(s, m) for s in schedules for m in methods]
    for index, (schedule, method) in enumerate(todo, 1):
        key = sweep.schedule_key(schedule)
        if table.done(key, method.spec) is not None:
            continue
        if method.mode == "calibrated" and prior.fit_for(schedule.mask(num_steps, model.depth)) is None:
            note = (f"calibrated skipped under {key}: the shipped prior has no fit for {schedule} (its fits: "
                    f"{', '.join(f.info.get('schedule', '?') for f in prior.fits) or 'none'})")
            notes.append(note)
            log(note)
            continue
        images, seconds = sample_method(model, sampler, prior, schedule, method.config, noise, labels, batch_size,
                                        progress, group)
        kept[key, method.spec] = images[:GRID_SAMPLES]
        row = table.append(metrics_row(key, method.spec, method.label,
                                       sweep.full_fraction(schedule, num_steps, model.depth), images, reference,
                                       seconds, uncached["seconds"]))
        sets_text = f" (A {row['psnr_a']:.2f} / B {row['psnr_b']:.2f})" if sets else ""
        log(f"[{index}/{len(todo)}] {key} {method.spec}: pooled PSNR {row['psnr']:.2f} dB{sets_text}, "
            f"{seconds:.1f} s, {row['speedup']:.2f}x")
    return table.rows, notes, kept


def sweep_grid(interval: int, methods, num_steps: int = 20, shown: int = GRID_SAMPLES, kept=None):
    """(rows, row labels, column labels) of ``eoc evaluate``'s grid.png: the first ``shown`` evaluation
    samples (seeds ``EVAL_SEED_BASE``.., labels 0..) uncached and under FORA N=``interval`` with each of
    ``methods`` (MethodSpecs; "calibrated" only where the prior has a fit), with their ×DIFF_GAIN
    differences. Samples in ``kept`` (``run_sweep``'s third result) are used as they are; the others
    (rows resumed from an earlier process) are sampled again from the same noise, in one process."""
    from .. import sweep

    kept = kept or {}
    model = testbed.load_model()
    noise, labels = demo_batch(model, shown)
    prior = testbed.load_prior(num_steps)
    sampler, schedule = DDIMSampler(num_steps), FORASchedule(interval)

    def samples(key, schedule, config):
        if key in kept and kept[key].shape[0] >= shown:
            return kept[key][:shown]
        if schedule is None:
            return sampler.sample(model, noise, labels, cfg_scale=prior.cfg_scale, progress=False)
        with apply_eoc(model, schedule, _prior_for(prior, config), config):
            return sampler.sample(model, noise, labels, cfg_scale=prior.cfg_scale, progress=False)

    reference = samples(("none", sweep.UNCACHED), None, None)
    cached = []
    for method in methods:
        if method.mode == "calibrated" and prior.fit_for(schedule.mask(num_steps, model.depth)) is None:
            continue
        images = samples((sweep.schedule_key(schedule), method.spec), schedule, method.config)
        cached.append((f"FORA N={interval}" + ("" if method.config is None else f" + {method.label}"), images))
    return comparison_rows(reference, cached, labels)
