"""The ``eoc`` command line (docs/DESIGN.md §4).

``demo`` and ``evaluate`` run caching methods on the shipped testbed; ``calibrate`` extracts a
prior, ``fit`` fits the calibrated mode's coefficients into it, ``sample`` samples with caching and
EOC; ``train-testbed`` / ``train-classifier`` rebuild the shipped testbed files. A model is a
checkpoint of the original DiT release (``--checkpoint``), the shipped testbed (``--model testbed``)
or, for smoke tests, a named random-init config (``--model DiT-S/8 --input-size 32``).

Input errors (``eoc_dit.errors.InputError``: a bad argument, a missing or unreadable file, an output
that cannot be written) print one line and exit 2, as argparse's usage errors do; anything else is a
bug and keeps its traceback. Nothing is written into the installed package unless a path says so.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import numpy as np
import torch

from .errors import InputError, InputValueError
from .fitting import DEFAULT_GAINS, DEFAULT_TERMS, REFINE_ITERATIONS, REFINE_SPLITS
from .sweep import METHOD_HELP

SCHEDULE_HELP = ("'none' (compute every step), 'fora:N' or 'fora:N:W' (FORA interval N, warm-up W steps), "
                 "'taylorseer:N' or 'taylorseer:N:W' (TaylorSeer's schedule: W full warm-up steps, default 2, "
                 "then one every N)")


_RANGE = re.compile(r"^(-?\d+)-(-?\d+)$")


def _int_list(values: list[str], option: str = "value") -> list[int]:
    """'0 1 2', '0,1,2' and '0-9' (inclusive) all work; '-3--1' is the range -3..-1.

    Raises ValueError, naming ``option``, for a part that is neither an int nor a range LO-HI, for a range
    with HI < LO (it would silently be empty) and for a list that holds no number at all.
    """
    out = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            match = _RANGE.match(part)
            if match:
                lo, hi = int(match[1]), int(match[2])
                if hi < lo:
                    raise InputValueError(f"{option}: the range {part!r} is empty (write LO-HI with LO <= HI)")
                out.extend(range(lo, hi + 1))
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise InputValueError(f"{option}: {part!r} is neither an integer nor a range LO-HI") from None
    if not out:
        raise InputValueError(f"{option}: no numbers given in {' '.join(values)!r}")
    return out


# What torch.manual_seed / torch.Generator.manual_seed accept.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def _check_seeds(seeds: list[int], option: str) -> list[int]:
    bad = [s for s in seeds if not SEED_MIN <= s <= SEED_MAX]
    if bad:
        raise InputValueError(f"{option} must lie in [-2**63, 2**64 - 1] (a torch seed), got {bad}")
    return seeds


def _seed_list(values: list[str], option: str) -> list[int]:
    return _check_seeds(_int_list(values, option), option)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", help="path of a DiT checkpoint (state dict of the original DiT release)")
    g.add_argument("--model", default=None, help="DiT config name, e.g. DiT-XL/2 (inferred from --checkpoint when "
                                                 "omitted), or 'testbed' for the shipped Fashion-MNIST DiT")
    g.add_argument("--input-size", type=int, default=32, help="latent/pixel size of a random-init model (default 32)")
    g.add_argument("--in-channels", type=int, default=4, help="input channels of a random-init model (default 4)")
    g.add_argument("--num-classes", type=int, default=1000, help="classes of a random-init model (default 1000)")
    g.add_argument("--init-seed", type=int, default=0, help="seed of a random-init model's weights (default 0)")
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampler")
    g.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    g.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale; 1 = off (default 1)")
    g.add_argument("--labels", nargs="+", default=["0"], help="class labels: '0 1 2', '0,1' or '0-9'")
    g.add_argument("--seeds", nargs="+", default=["0"], help="noise seeds; one sample per (label, seed) pair")
    g.add_argument("--batch-size", type=int, default=16)


def _check_device(text: str) -> None:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputValueError(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:0)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputValueError(f"--device {text!r}: CUDA is not available in this PyTorch build or on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputValueError(f"--device {text!r}: there are only {torch.cuda.device_count()} CUDA device(s)")


def _load_model(args):
    from .models import DiT_models, load_dit

    _check_device(args.device)
    if args.model == "testbed" and not args.checkpoint:
        from .testbed import load_model

        return load_model(args.device)
    if args.checkpoint:
        return load_dit(args.checkpoint, args.model, map_location=args.device)
    if args.model is None:
        raise InputValueError("give --checkpoint PATH or --model NAME (a random-init config, for smoke tests)")
    if args.model not in DiT_models:
        raise InputValueError(f"--model must be one of {', '.join(DiT_models)}, got {args.model!r}")
    for option in ("input_size", "in_channels", "num_classes"):
        if getattr(args, option) < 1:
            raise InputValueError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    _check_seeds([args.init_seed], "--init-seed")
    torch.manual_seed(args.init_seed)
    model = DiT_models[args.model](input_size=args.input_size, in_channels=args.in_channels,
                                   num_classes=args.num_classes)
    return model.to(args.device).eval()


def _make_sampler(args):
    from .diffusion import DDIMSampler, DDPMSampler

    channels = getattr(args, "cfg_channels", None)  # eoc sample's DiT-compatibility options
    if getattr(args, "dit_noise_order", False):
        if args.sampler != "ddpm":
            raise InputValueError("--dit-noise-order is a DDPM option (DDIM draws no step noise)")
        return DDPMSampler(args.steps, cfg_channels=channels, dit_noise_order=True)
    return (DDIMSampler if args.sampler == "ddim" else DDPMSampler)(args.steps, cfg_channels=channels)


def _parse_schedule(text: str):
    from .schedules import FORASchedule, TaylorSeerSchedule

    if text == "none":
        return FORASchedule(1)
    parts = text.split(":")
    if parts[0] not in ("fora", "taylorseer") or len(parts) not in (2, 3):
        raise InputValueError(f"--schedule must be {SCHEDULE_HELP}; got {text!r}")
    try:
        numbers = [int(v) for v in parts[1:]]
    except ValueError:
        raise InputValueError(f"--schedule must be {SCHEDULE_HELP}; got {text!r}") from None
    return (FORASchedule if parts[0] == "fora" else TaylorSeerSchedule)(*numbers)


def _check_writable(path: str) -> None:
    """An output file the user named can be written: checked before any work, so that a wrong path is
    an input error (one line, exit 2) and not an OSError after a long run."""
    if os.path.isdir(path):
        raise InputValueError(f"cannot write {path}: it is a folder (give a file name)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise InputValueError(f"cannot write {path}: folder {folder} does not exist or is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise InputValueError(f"cannot write {path}: the file exists and is not writable")


def _check_writable_folder(folder: str, names, option: str = "--out") -> None:
    """``folder`` is a writable folder and each of ``names`` in it can be written."""
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise InputValueError(f"{option}: cannot write to {folder}: not a writable folder")
    for name in names:
        _check_writable(os.path.join(folder, name))


def _pairs(args):
    labels, seeds = _int_list(args.labels, "--labels"), _seed_list(args.seeds, "--seeds")
    return [(label, seed) for label in labels for seed in seeds]


def cmd_calibrate(args) -> None:
    from .calibration import calibrate
    from .prior import STORAGE_DTYPES

    _check_writable(args.out)
    if args.storage is not None:
        from .prior_storage import parse_storage

        args.storage = parse_storage(args.storage, args.steps)  # a typo fails before the long run
    labels, seeds = _int_list(args.labels, "--labels"), _seed_list(args.seeds, "--seeds")  # before the model loads
    model = _load_model(args)
    sampler = _make_sampler(args)
    start = time.perf_counter()
    schedules = [_parse_schedule(text) for text in args.fit]  # before the long run, so a typo fails first
    prior = calibrate(model, sampler, labels, seeds, cfg_scale=args.cfg_scale,
                      max_gap=args.max_gap, holdout=args.holdout, progress=True, batch_size=args.batch_size)
    for schedule in schedules:
        from .fitting import fit_coefficients

        fit = fit_coefficients(model, sampler, schedule, prior, labels, seeds, progress=True)
        prior.add_fit(fit)
        print(f"fitted {schedule}: {fit.info['corrected_entries']} of {fit.info['reuse_entries']} "
              "reuse entries corrected")
    if _is_main():  # under torchrun every rank holds the same prior; one writes it
        prior.save(args.out, dtype=STORAGE_DTYPES[args.dtype], storage=args.storage)
    print(f"{prior} written to {args.out} in {time.perf_counter() - start:.1f} s")


def cmd_fit(args) -> None:
    from .fitting import TERMS, fit_coefficients
    from .prior import Prior
    from .sweep import parse_method

    _check_writable(args.out)
    unknown = [t for t in args.terms if t not in TERMS]
    if unknown:
        raise InputValueError(f"--terms must be among {', '.join(TERMS)}, got {unknown}")
    if any(g < 0 for g in args.gains):
        raise InputValueError(f"--gains must be >= 0, got {args.gains}")
    anchors = None if args.anchors is None else tuple(parse_method(text).config for text in args.anchors)
    refine = None if args.refine == "none" else args.refine
    schedules = [_parse_schedule(text) for text in args.schedules]
    labels, seeds = _int_list(args.labels, "--labels"), _seed_list(args.seeds, "--seeds")
    tune_seeds = _seed_list(args.tune_seeds, "--tune-seeds") if args.tune_seeds else None
    prior = Prior.load(args.prior)
    if prior.num_steps != args.steps:
        raise InputValueError(f"num_steps mismatch: the prior {args.prior} has {prior.num_steps} steps, "
                              f"--steps is {args.steps}")
    model = _load_model(args)
    sampler = _make_sampler(args)
    for schedule in schedules:
        fit = fit_coefficients(model, sampler, schedule, prior, labels, seeds, terms=tuple(args.terms),
                               ridge=args.ridge, gains=args.gains, tune_seeds=tune_seeds,
                               tune_clamp=tuple(args.tune_clamp) if args.tune_clamp else None, progress=True,
                               anchors=anchors, max_order=args.max_order, refine=refine,
                               refine_split=args.refine_split, refine_iterations=args.refine_iterations)
        prior.add_fit(fit)
        info = fit.info
        print(f"fitted {schedule} ({', '.join(args.terms)}, anchor {info['anchor']}, refine {args.refine}, "
              f"gain {info['gain']:.3g}): {info['corrected_entries']} of {info['reuse_entries']} reuse entries "
              f"corrected, models {info['models']}, {info['wall_time_s']:.0f} s")
    if _is_main():
        prior.save(args.out, storage=prior.storage)  # kept in the storage it was loaded in
    print(f"{prior} with {len(prior.fits)} fits written to {args.out}")


def cmd_prior_convert(args) -> None:
    from .prior import Prior
    from .prior_storage import parse_storage

    storage = parse_storage(args.storage)  # a typo fails before the file is read
    _check_writable(args.out)
    prior = Prior.load(args.input)
    converted = prior.with_storage(storage)
    converted.save(args.out, storage=converted.storage)
    print(f"{args.input} ({prior.storage}, {os.path.getsize(args.input):,} bytes) -> {args.out} "
          f"({converted.storage}, {os.path.getsize(args.out):,} bytes)")


def cmd_sample(args) -> None:
    from .config import EOCConfig
    from .diffusion import sample_pairs
    from .distributed import gather_max
    from .patching import apply_eoc
    from .prior import Prior

    _check_writable(args.out)
    if not args.out.endswith((".npy", ".png", ".npz")):
        raise InputValueError(f"--out must end with .npy or .png, or .npz (ADM evaluator layout), got {args.out!r}")
    if args.batch_size < 1:
        raise InputValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    # Everything that can be checked without running the model fails here, before any progress bar.
    schedule = _parse_schedule(args.schedule)
    mode = args.mode or ("calibrated" if args.prior else "none")  # as apply_eoc: calibrated by default with a prior
    if (args.order is not None or args.sigma is not None) and mode not in ("taylorseer", "hicache"):
        raise InputValueError(f"--order and --sigma are for --mode taylorseer / hicache, got --mode {mode}")
    if args.sigma is not None and mode != "hicache":
        raise InputValueError("--sigma is for --mode hicache")
    forecaster = {k: v for k, v in (("order", args.order), ("sigma", args.sigma)) if v is not None}
    config = None if mode == "none" else EOCConfig(mode=mode, theta=args.theta, **forecaster)
    if config is not None and config.needs_prior and not args.prior:
        raise InputValueError(f"--mode {mode} needs --prior (a file from 'eoc calibrate'); "
                              "--mode extrapolate, taylorseer and hicache need none")
    pairs = _pairs(args)
    prior = Prior.load(args.prior, device="cpu") if args.prior else None
    if prior is not None:
        if prior.num_steps != args.steps:
            raise InputValueError(f"num_steps mismatch: the prior {args.prior} has {prior.num_steps} steps, "
                                  f"--steps is {args.steps}")
        if prior.uses_cfg != (args.cfg_scale > 1.0):
            raise InputValueError(f"cfg mismatch: the prior {args.prior} was calibrated with "
                                  f"cfg_scale={prior.cfg_scale}, "
                                  f"--cfg-scale is {args.cfg_scale} (CFG must be on, > 1, or off, 1, in both)")
    model = _load_model(args)
    sampler = _make_sampler(args)
    num_classes = getattr(model, "num_classes", None)
    bad = sorted({label for label, _ in pairs if num_classes is not None and not 0 <= label < num_classes})
    if bad:
        raise InputValueError(f"--labels must lie in [0, {num_classes}), got {bad}")
    if args.out.endswith(".png") and getattr(model, "in_channels", 1) not in (1, 3):
        raise InputValueError(f"--out {args.out}: a PNG grid needs a 1- or 3-channel model, this one has "
                         f"{model.in_channels} channels (write .npy instead)")
    if args.out.endswith(".npz"):
        return _sample_npz(args, model, sampler, pairs, schedule, mode, prior, config)
    start = time.perf_counter()
    with apply_eoc(model, schedule, prior=prior if config is not None else None, config=config):
        # under torchrun: whole batches per rank, gathered in pair order (docs/DESIGN.md §4.11)
        samples = sample_pairs(model, sampler, pairs, cfg_scale=args.cfg_scale, batch_size=args.batch_size,
                               device=args.device, progress=_is_main())
    elapsed = gather_max(time.perf_counter() - start)
    if not _is_main():
        return
    if args.out.endswith(".npy"):
        np.save(args.out, samples.float().numpy())
    else:
        from .images import image_grid, write_png

        write_png(args.out, image_grid(samples))
    level = schedule.caching_level_for(args.steps, len(list(model.blocks)))
    print(f"{len(pairs)} samples ({schedule}, caching level {level:.2f}, EOC {mode}) in {elapsed:.2f} s -> {args.out}")


def _sample_npz(args, model, sampler, pairs, schedule, mode, prior, config) -> None:
    """--out X.npz: parts per batch in X.npz.parts (resumable), merged into the ADM layout (sample_files.py)."""
    from .distributed import gather_max
    from .patching import apply_eoc
    from .sample_files import parts_folder, sample_npz

    if getattr(model, "in_channels", 3) not in (1, 3):
        raise InputValueError(f"--out {args.out}: the ADM .npz holds images, this model has {model.in_channels} "
                              "channels (latents: decode them first, or write .npy)")
    manifest = {name: getattr(args, name, None) for name in (
        "checkpoint", "model", "input_size", "in_channels", "num_classes", "init_seed", "sampler", "steps",
        "cfg_scale", "schedule", "mode", "theta", "cfg_channels", "dit_noise_order")}
    manifest["mode"] = mode
    if args.prior:
        manifest["prior"] = [os.path.abspath(args.prior), os.path.getsize(args.prior)]
    start = time.perf_counter()
    with apply_eoc(model, schedule, prior=prior if config is not None else None, config=config):
        sampled, kept = sample_npz(model, sampler, pairs, args.out, manifest, cfg_scale=args.cfg_scale,
                                   batch_size=args.batch_size, device=args.device, progress=_is_main())
    elapsed = gather_max(time.perf_counter() - start)
    print(f"{len(pairs)} samples ({schedule}, EOC {mode}): {kept} batches kept from an earlier run, the others "
          f"sampled in {elapsed:.2f} s -> {args.out} (arr_0 uint8 [N, H, W, C]; parts in {parts_folder(args.out)})")


def cmd_train_testbed(args) -> None:
    from dataclasses import fields

    from .testbed.train import CARD_NAME, CHECKPOINT_NAME, TrainConfig, train_testbed

    _check_writable_folder(args.out, (CHECKPOINT_NAME, CARD_NAME))
    for option, low in (("iterations", 1), ("batch_size", 1), ("max_minutes", 0)):
        value = getattr(args, option)
        if value is not None and not value >= low:  # `not >=`: NaN fails too
            raise InputValueError(f"--{option.replace('_', '-')} must be >= {low}, got {value}")
    if args.checkpoint_every < 0:
        raise InputValueError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    card = train_testbed(TrainConfig(**overrides), args.out, progress=True, device=_training_device(args.device),
                         resume=args.resume, checkpoint_every=args.checkpoint_every)
    print(f"trained {card['iterations_run']} iterations in {card['wall_time_s']:.0f} s, "
          f"final loss {card['final_loss_mean_last_100']:.4f} -> {args.out}")


def cmd_testbed_accuracy(args) -> None:
    import json

    from . import testbed
    from .testbed.train import CARD_NAME

    folder = args.folder if args.folder is not None else testbed.ASSETS
    if args.samples < 10:
        raise InputValueError(f"--samples must be >= 10 (one per class), got {args.samples}")
    if args.write_card:
        _check_writable_folder(folder, (CARD_NAME,), "--folder")
    model = testbed.load_model_from(folder)
    result = testbed.sample_accuracy(model, args.samples, cfg_scale=args.cfg_scale)
    print(f"sample accuracy {result['overall']:.3f} ({args.samples} samples, CFG {args.cfg_scale:g}, DDIM-20)")
    for name, accuracy in result["per_class"].items():
        print(f"  {name:<12} {accuracy:.3f}  mean pixel {result['mean_pixel_per_class'][name]:+.2f}")
    if args.write_card:
        path = os.path.join(folder, CARD_NAME)
        with open(path) as f:
            card = json.load(f)
        card["sample_accuracy"] = result
        with open(path, "w") as f:
            json.dump(card, f, indent=2)
            f.write("\n")
        print(f"recorded in {path}")


def _training_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputValueError(f"--device must be a torch device such as cpu or cuda, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputValueError("--device cuda: no CUDA device is available")
    return device


def cmd_train_classifier(args) -> None:
    from .testbed.classifier import (
        CLASSIFIER_CARD_NAME,
        CLASSIFIER_NAME,
        FEATURE_STATS_NAME,
        train_classifier,
    )

    _check_writable_folder(args.out, (CLASSIFIER_NAME, FEATURE_STATS_NAME, CLASSIFIER_CARD_NAME))
    if args.epochs < 1:
        raise InputValueError(f"--epochs must be >= 1, got {args.epochs}")
    card = train_classifier(args.out, epochs=args.epochs, seed=args.seed, progress=True)
    print(f"classifier test accuracy {card['test_accuracy']:.4f} in {card['wall_time_s']:.0f} s -> {args.out}")


def cmd_demo(args) -> None:
    from .images import write_labelled_grid
    from .testbed.demo import demo_grid, format_table, run_demo

    _check_writable(args.out)
    if args.interval < 2:
        raise InputValueError(f"--interval must be >= 2 (1 computes every step), got {args.interval}")
    rows, grid = run_demo(args.samples, args.interval, args.mode, args.steps, progress=True)
    print(f"\nTestbed DiT (Fashion-MNIST), DDIM-{args.steps} with CFG, {args.samples} samples, {_device_name()}:\n")
    print(format_table(rows))
    grid_rows, names, classes = demo_grid(rows, grid)
    labelled = write_labelled_grid(args.out, grid_rows, names, classes)
    print(f"\ngrid (rows: {' / '.join(names)}; same noise) -> {args.out}"
          + ("" if labelled else " (unlabelled: matplotlib is not installed)"))


def _device_name() -> str:
    import platform

    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"


EVALUATE_OUTPUTS = ("results.csv", "results.md", "quality_vs_speed.png", "grid.png", "sweep.json", "uncached.npy")


def cmd_evaluate(args) -> None:
    from . import sweep
    from .images import write_labelled_grid
    from .testbed.demo import run_sweep, sweep_grid

    out = args.out_dir
    _check_writable_folder(out, EVALUATE_OUTPUTS, "--out-dir")
    csv_path, md_path, png_path = (os.path.join(out, name) for name in EVALUATE_OUTPUTS[:3])
    if args.replot:  # the table and the figure again, from a finished (or partial) CSV; nothing is sampled
        rows = sweep.read_rows(csv_path)
        methods = [m.spec for m in sweep.parse_methods(args.methods)] if args.methods else ()
        _write_sweep_outputs(rows, methods, (), md_path, png_path)
        return
    if args.batch_size < 1:
        raise InputValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    schedules = sweep.sweep_schedules(args.intervals, args.warmup_intervals, args.warmup_steps)
    notes = []
    if args.methods:
        methods = sweep.parse_methods(args.methods)
    else:
        methods, missing = sweep.default_methods()
        if missing:
            notes.append(f"Not run: {', '.join(missing)} (their modes are not in this build's EOCConfig).")
            print(notes[-1])
    try:
        rows, _, kept = run_sweep(schedules, methods, args.samples, out, num_steps=args.steps,
                                  batch_size=args.batch_size, seed_sets=args.seed_sets, resume=args.resume,
                                  progress=_is_main(), log=print)
    except KeyboardInterrupt:  # every finished row is on disk already
        print(f"\neoc evaluate: interrupted; the finished rows are in {csv_path} ('--resume' goes on from them)",
              file=sys.stderr)
        raise SystemExit(130) from None
    if not _is_main():  # under torchrun: batches shared, samples gathered; rank 0 writes
        return
    _write_sweep_outputs(rows, [m.spec for m in methods], notes, md_path, png_path)
    grid_interval = args.grid_interval if args.grid_interval in args.intervals else args.intervals[0]
    grid_methods = [m for m in methods if m.spec in ("plain", "calibrated")] or methods[:1]
    first_set = args.samples - args.samples // 2 if args.seed_sets == 2 else args.samples  # seeds 100000..
    grid_rows, names, classes = sweep_grid(grid_interval, grid_methods, args.steps, shown=min(10, first_set),
                                           kept=kept)
    grid_path = os.path.join(out, "grid.png")
    labelled = write_labelled_grid(grid_path, grid_rows, names, classes)
    print(f"-> {grid_path} (rows: {' / '.join(names)}; the first {grid_rows[0].shape[0]} evaluation samples"
          + ("" if labelled else "; unlabelled: matplotlib is not installed") + ")")


def _write_sweep_outputs(rows, method_order, notes, md_path, png_path) -> None:
    from . import sweep

    table = sweep.format_markdown(rows, method_order, notes)
    with open(md_path, "w") as f:
        f.write(table)
    print("\n" + table)
    if not sweep.matplotlib_available():
        print(f"-> {md_path} (no {png_path}: matplotlib is not installed; pip install -r requirements.txt)")
        return
    if any(r["method"] != sweep.UNCACHED for r in rows):
        sweep.plot_quality_vs_speed(rows, png_path, method_order)
        print(f"-> {md_path}, {png_path}")
    else:
        print(f"-> {md_path} (no cached rows yet: no figure)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eoc", description="Error-Optimized Cache for Diffusion Transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("calibrate", help="extract an EOC prior from uncached runs and save it (safetensors)",
                       description="Run the uncached sampler over every (label, seed) pair and save the prior.")
    _add_model_args(p)
    _add_sampler_args(p)
    p.add_argument("--max-gap", type=int, default=4, help="largest reuse gap the judgment statistics cover (default 4)")
    p.add_argument("--holdout", type=float, default=0.25, help="fraction of pairs kept for the judgment statistics")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="storage dtype of the mean")
    p.add_argument("--storage", default=None,
                   help="store the prior as fp8, lowrank:R, statistics or coefficients instead (docs/DESIGN.md "
                        "§4.10; replaces --dtype; 'eoc prior convert' does it later)")
    p.add_argument("--fit", nargs="*", default=[], metavar="SCHEDULE",
                   help="also fit the calibrated mode's coefficients, in closed loop on the same pairs, for "
                        "each schedule (e.g. fora:3 fora:4); they are stored in the prior")
    p.add_argument("--out", required=True, help="output prior file (.safetensors)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("fit", help="fit the calibrated mode's coefficients for schedules, into a prior file",
                       description="Fit the coefficients (alpha, beta1..beta3, gamma) of every reuse entry for each "
                                   "schedule: the best fixed preset on the tune pairs as anchor, per-entry models "
                                   "(order 0-3, prior terms) chosen in closed loop on held-out pairs of (label, seed) "
                                   "sampled as one batch, then a trajectory refinement from the anchor on the tune "
                                   "pairs (--tune-seeds); use seeds disjoint from the ones the prior's mean was "
                                   "computed on (the delta term overfits them) and from evaluation.")
    _add_model_args(p)
    _add_sampler_args(p)
    p.add_argument("--prior", required=True, help="prior file from 'eoc calibrate'")
    p.add_argument("--schedules", nargs="+", required=True, metavar="SCHEDULE", help="e.g. fora:2 fora:3")
    p.add_argument("--terms", nargs="+", default=list(DEFAULT_TERMS),
                   help=f"candidate terms among delta extrapolate trend (default: {' '.join(DEFAULT_TERMS)})")
    p.add_argument("--max-order", type=int, default=3, help="highest order of the history terms (0-3, default 3)")
    p.add_argument("--anchors", nargs="+", default=None, metavar="PRESET",
                   help="presets the anchor is chosen among, as eoc evaluate names them (plain, extrapolate:1.2, "
                        "taylorseer:2, hicache:2, trend, delta; default: plain, extrapolate 0.8/1/1.2, TaylorSeer "
                        "and HiCache 1-3, and trend / delta when --terms has them)")
    p.add_argument("--refine", choices=("gauss-newton", "blend", "none"), default="gauss-newton",
                   help="trajectory refinement from the anchor on the tune pairs: gauss-newton (default), blend "
                        "(anchor + g * (fit - anchor), g among --gains) or none (the fit as it is)")
    p.add_argument("--refine-split", choices=REFINE_SPLITS, default="phase",
                   help="gauss-newton's directions: the anchor scaled per phase of the run (phase, default), per "
                        "phase and block (phase-block) or per phase, block and branch (phase-block-branch)")
    p.add_argument("--refine-iterations", type=int, default=REFINE_ITERATIONS,
                   help=f"gauss-newton's steps at most (default {REFINE_ITERATIONS}; one tune trajectory each)")
    p.add_argument("--ridge", type=float, default=1e-3,
                   help="relative ridge of the least-squares fit toward the anchor (default 1e-3)")
    p.add_argument("--gains", type=float, nargs="+", default=list(DEFAULT_GAINS),
                   help=f"--refine blend: candidate blends g, 0 = the anchor "
                        f"(default: {' '.join(map(str, DEFAULT_GAINS))}; one value = that blend)")
    p.add_argument("--tune-seeds", nargs="+", default=None,
                   help="seeds of the pairs the anchor and the refinement are chosen on (default: --seeds)")
    p.add_argument("--tune-clamp", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="judge the tune samples clipped to [LOW, HIGH], e.g. -1 1 for a pixel-space model "
                        "(default: no clipping)")
    p.add_argument("--out", required=True, help="output prior file (may be the input)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("prior", help="prior files: convert to another storage (fp8, low rank, coefficients only)",
                       description="Operations on prior files.")
    prior_sub = p.add_subparsers(dest="prior_command", metavar="PRIOR_COMMAND", required=True)
    q = prior_sub.add_parser("convert", help="write a prior in another storage",
                             description="Write INPUT's prior to OUT in another storage: float32, float16, "
                                         "bfloat16 (dense means), fp8 (e4m3, one fp32 scale per step, block and "
                                         "branch), lowrank:R (rank-R temporal PCA of each block's, branch's and "
                                         "CFG half's means), statistics (no means: calibrated mode, extrapolate) "
                                         "or coefficients (fits only, kilobytes: calibrated mode). docs/DESIGN.md "
                                         "§4.10.")
    q.add_argument("input", help="prior file (.safetensors)")
    q.add_argument("out", help="output prior file (may be the input)")
    q.add_argument("--storage", required=True,
                   help="float32 | float16 | bfloat16 | fp8 | lowrank:R | statistics | coefficients")
    q.set_defaults(func=cmd_prior_convert)

    p = sub.add_parser("sample", help="sample with a caching schedule and an optional EOC correction",
                       description="Sample every (label, seed) pair, optionally with caching and EOC.")
    _add_model_args(p)
    _add_sampler_args(p)
    p.add_argument("--schedule", default="none", help=SCHEDULE_HELP)
    p.add_argument("--mode", choices=("none", "trend", "delta", "extrapolate", "taylorseer", "hicache", "calibrated"),
                   default=None,
                   help="EOC correction; 'none' = plain caching; 'calibrated' needs a prior fitted for the schedule "
                        "(default: calibrated with --prior, none without)")
    p.add_argument("--order", type=int, default=None, help="order of --mode taylorseer / hicache (1-3, default 1)")
    p.add_argument("--sigma", type=float, default=None, help="HiCache's Hermite scale (default 0.5)")
    p.add_argument("--theta", type=float, default=None, help="the preset's coefficient (default: the preset's)")
    p.add_argument("--prior", default=None, help="prior file from 'eoc calibrate' (trend and delta need one)")
    p.add_argument("--cfg-channels", type=int, default=None, metavar="K",
                   help="guide only the first K eps channels, the others from the conditional half: 3 reproduces "
                        "the original DiT release's forward_with_cfg on 4-channel latents (default: all channels)")
    p.add_argument("--dit-noise-order", action="store_true",
                   help="DDPM with CFG: draw each step's noise for the doubled batch and keep the first half, as "
                        "the original DiT's p_sample")
    p.add_argument("--out", required=True,
                   help="output: .npy (all samples), .png (grid) or .npz (the ADM FID evaluator's layout, arr_0 "
                        "uint8 [N, H, W, C], written from per-batch parts in OUT.parts: a rerun resumes); "
                        ".png and .npz need a 1- or 3-channel model")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="the main job: uncached vs FORA vs FORA + EOC on the shipped testbed DiT",
                       description="Sample the same noise uncached, with FORA and with FORA + EOC on the shipped "
                                   "Fashion-MNIST DiT and prior; print time, speedup, PSNR and FD against the "
                                   "uncached samples, FD to the data, accuracy; write a PNG grid.")
    p.add_argument("--samples", type=int, default=100, help="samples per run (default 100; more = steadier FD)")
    p.add_argument("--interval", type=int, default=3, help="FORA interval N: every N-th step computes (default 3)")
    p.add_argument("--mode", choices=("calibrated", "trend", "delta", "extrapolate"), default="calibrated",
                   help="EOC correction (default calibrated: coefficients fitted for FORA N=2..5, shipped)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps; the shipped prior is for 20 (default)")
    p.add_argument("--out", default="eoc_demo.png", help="PNG grid of the first 10 samples of each run")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="quality-vs-speed sweep on the shipped testbed (CSV, Markdown, figure, grid)",
                       description="Uncached, then every (schedule, method) row on the same evaluation noise (two "
                                   "seed sets, disjoint from the calibration seeds): pooled PSNR per seed set and "
                                   "overall, mean and p10 of per-image PSNR, FD to uncached, fraction of full steps, "
                                   "wall time and speedup measured in the same run. Each finished row is written "
                                   "to OUT_DIR/results.csv at once; --resume skips the rows already there. Writes "
                                   "results.md (best fixed preset per schedule marked, calibrated's margin over "
                                   "it), quality_vs_speed.png and grid.png.")
    p.add_argument("--samples", type=int, default=1000,
                   help="samples per method, split evenly between the seed sets (default 1000: 500 per set)")
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4, 5, 6],
                   help="FORA intervals N (default 2 3 4 5 6)")
    p.add_argument("--warmup-intervals", type=int, nargs="*", default=[4], metavar="N",
                   help="intervals also run under TaylorSeer's warm-up schedule (--warmup-steps W full steps, then one "
                        "every N from step W - 1: FORASchedule(N, warmup=W - 1); default 4; none with an empty list)")
    p.add_argument("--warmup-steps", type=int, default=2,
                   help="W, TaylorSeer's first_enhance (default 2: full steps 0, 1, 5, 9, ... for N = 4)")
    p.add_argument("--methods", nargs="+", default=None, metavar="SPEC",
                   help=f"methods ({METHOD_HELP}); default: plain, taylorseer:1-3, hicache:1-3, extrapolate:0.8 / 1 "
                        "/ 1.2, trend, delta, calibrated (a mode this build lacks is left out with a note)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps; the shipped prior is for 20 (default)")
    p.add_argument("--batch-size", type=int, default=500, help="samples per sampling call (default 500)")
    p.add_argument("--seed-sets", type=int, choices=(1, 2), default=2,
                   help="evaluation seed sets (100000+, 200000+) the samples are split between (default 2)")
    p.add_argument("--grid-interval", type=int, default=3, help="FORA interval shown in grid.png (default 3)")
    p.add_argument("--out-dir", default=".", help="folder for the outputs (default: the current folder)")
    p.add_argument("--resume", action="store_true",
                   help="go on with OUT_DIR/results.csv: rows already there are not run again (same settings, "
                        "model and prior required)")
    p.add_argument("--replot", action="store_true",
                   help="only rewrite results.md and quality_vs_speed.png from OUT_DIR/results.csv (no sampling)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train-testbed", help="train the testbed DiT on Fashion-MNIST (CPU, under an hour)",
                       description="Train the small DiT that the testbed ships, seeded and reproducible.")
    p.add_argument("--out", default=".",
                   help="folder for testbed_dit.pt and MODEL_CARD.json (default: the current folder; the shipped "
                        "files in the package's testbed/assets are replaced only when that folder is given)")
    p.add_argument("--iterations", type=int, default=None, help="training iterations (default 3500)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="batch size (default 64)")
    p.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    p.add_argument("--max-minutes", dest="max_minutes", type=float, default=None,
                   help="stop early after this much wall time (default: no limit)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up iterations (default 200)")
    p.add_argument("--ema-decay", dest="ema_decay", type=float, default=None, help="EMA decay (default 0.999)")
    p.add_argument("--hidden-size", dest="hidden_size", type=int, default=None, help="model width (default 256)")
    p.add_argument("--depth", type=int, default=None, help="blocks (default 6)")
    p.add_argument("--num-heads", dest="num_heads", type=int, default=None, help="attention heads (default 4)")
    p.add_argument("--ema-start", dest="ema_start", type=int, default=None,
                   help="iteration from which the EMA averages (before it, it copies the weights; default: --warmup)")
    p.add_argument("--init-from", dest="init_from", default=None,
                   help="warm start from this testbed_dit.pt (same architecture): weights and EMA start from it, "
                        "and the card records the card beside it")
    p.add_argument("--class-weights", dest="class_weights", default=None,
                   help="class-weighted sampling, 'label:weight,...' (e.g. '5:3': sandals three times as often; "
                        "default: a plain shuffle)")
    p.add_argument("--device", default="cpu", help="where to train: cpu (default) or cuda")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=0,
                   help="write train_state.pt every this many iterations and when the run stops (default 0: never)")
    p.add_argument("--resume", action="store_true",
                   help="go on from --out's train_state.pt (only --iterations and --max-minutes may change)")
    p.set_defaults(func=cmd_train_testbed)

    p = sub.add_parser("testbed-accuracy", help="per-class sample accuracy of a trained testbed (into its card)",
                       description="Sample the testbed DiT uncached (labels cycling through the classes, seeds "
                                   "300000+), classify with the shipped classifier, print the accuracy per class and, "
                                   "with --write-card, record it in the folder's MODEL_CARD.json.")
    p.add_argument("--folder", default=None,
                   help="a folder written by 'eoc train-testbed --out' (default: the shipped testbed)")
    p.add_argument("--samples", type=int, default=1000, help="samples (default 1000)")
    p.add_argument("--cfg-scale", dest="cfg_scale", type=float, default=3.0, help="CFG scale (default 3)")
    p.add_argument("--write-card", dest="write_card", action="store_true",
                   help="record the result as 'sample_accuracy' in the folder's MODEL_CARD.json")
    p.set_defaults(func=cmd_testbed_accuracy)

    p = sub.add_parser("train-classifier", help="train the testbed's Fashion-MNIST feature classifier (minutes)",
                       description="Train the CNN whose features the testbed's Fréchet distance uses.")
    p.add_argument("--out", default=".",
                   help="folder for classifier.pt, test_feature_stats.pt and CLASSIFIER_CARD.json (default: the "
                        "current folder; the shipped files in the package's testbed/assets are replaced only when "
                        "that folder is given)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_classifier)
    return parser


def _is_main() -> bool:
    from .distributed import is_main

    return is_main()


DISTRIBUTED_COMMANDS = ("calibrate", "fit", "sample", "evaluate")  # run under torchrun (docs/DESIGN.md §4.11)


def _start_ranks(args) -> bool:
    """Under torchrun (WORLD_SIZE > 1): start the process group (NCCL for --device cuda, each rank on
    cuda:LOCAL_RANK; gloo otherwise); ranks other than 0 print nothing to stdout."""
    from . import distributed

    if args.command not in DISTRIBUTED_COMMANDS or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    device = getattr(args, "device", "cpu")
    if device == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return distributed.init_from_env(args.device if hasattr(args, "device") else "cpu")


def main(argv: list[str] | None = None) -> int:
    from .distributed import RankFailure, shutdown

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    name = " ".join(filter(None, (args.command, getattr(args, "prior_command", None))))
    stdout, ranks, done = sys.stdout, False, False
    try:
        ranks = _start_ranks(args)
        if ranks and not _is_main():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (closed below)
        args.func(args)
        done = True
    except InputError as exc:  # the caller's mistake: one line; anything else is a bug and keeps its traceback
        print(f"eoc {name}: error: {exc}", file=sys.stderr)
        return 2
    except RankFailure as exc:  # another rank failed: say so on one line, not as a bug
        print(f"eoc {name}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
        if ranks and done:  # after a failure the process exits: no collective teardown with a dead peer
            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
