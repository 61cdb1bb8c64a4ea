"""The testbed: a small class-conditional DiT trained on Fashion-MNIST with this repository's own
scripts (``eoc train-testbed``, ``eoc train-classifier``), shipped in the package so that caching
quality can be judged on a real, trained model, with the metrics to judge it:

- ``psnr(images, reference)`` (pooled: one MSE over every pixel of every image, the headline) and
  ``fd(images_a, images_b)``: fidelity of a caching method, measured against the uncached samples from
  the same noise (the targets); ``image_psnrs`` gives the per-image values whose mean and 10th
  percentile are reported beside it (the mean alone rewards near-blank easy images and hides the hard
  ones: on this testbed it read 1.9–7.5 dB above the pooled figure in the 200-sample diffusers
  head-to-head, benchmarks/results/diffusers-head-to-head-cpu-2026-12-01.md);
- ``fd_to_data(images)`` (against the shipped test-split statistics) and
  ``classifier_accuracy(images, labels)``: reported, but not fidelity targets (docs/DESIGN.md §2).

Images are [B, 1, 28, 28] in [-1, 1].
"""

from __future__ import annotations

import functools
import json
import os

import torch

from ..errors import InputFileNotFoundError, InputTypeError, InputValueError
from ..prior import Prior
from .classifier import (
    CLASSIFIER_NAME,
    FEATURE_STATS_NAME,
    FashionCNN,
    batched,
    feature_statistics,
    frechet_distance,
)
from .data import CLASSES
from .train import CARD_NAME, CHECKPOINT_NAME, TrainConfig

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

__all__ = ["ASSETS", "load_model", "load_prior", "model_card", "features", "fd", "fd_to_data", "classifier_accuracy",
           "image_psnrs", "psnr", "load_model_from", "sample_accuracy", "ACCURACY_SEED_BASE"]

#: Seeds of the sample-accuracy check of a trained testbed (the model card's figure): disjoint from the
#: calibration seeds (0-39) and the evaluation seed sets (100000+, 200000+).
ACCURACY_SEED_BASE = 300_000

#: PSNR given to identical images (an MSE of 0), so that one exact match cannot make a mean infinite.
PSNR_IDENTICAL = 100.0


def prior_name(num_steps: int) -> str:
    return f"testbed_prior_ddim{num_steps}.safetensors"


def _asset(name: str) -> str:
    path = os.path.join(ASSETS, name)
    if not os.path.isfile(path):
        raise InputFileNotFoundError(f"shipped testbed file missing: {path} (reinstall the package, or recreate it "
                                     f"with 'eoc train-testbed --out {ASSETS}' / "
                                     f"'eoc train-classifier --out {ASSETS}')")
    return path


def _load_state(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupted or truncated file: one clear line, not an unpickling trace
        raise InputValueError(f"shipped testbed file unreadable: {path} ({type(exc).__name__})") from None


def model_card() -> dict:
    with open(_asset(CARD_NAME)) as f:
        return json.load(f)


def load_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The shipped testbed DiT in eval mode (EMA weights, stored in fp16, returned in ``dtype``)."""
    card = model_card()
    config = TrainConfig(**card["config"])
    model = config.build_model()
    state = _load_state(_asset(CHECKPOINT_NAME))
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except (RuntimeError, AttributeError) as exc:
        raise InputValueError(f"shipped testbed checkpoint does not match its model card: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.to(device=device, dtype=dtype).eval()


def load_model_from(folder: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A testbed DiT written by ``eoc train-testbed --out folder`` (its MODEL_CARD.json and testbed_dit.pt)."""
    card_path, weights_path = os.path.join(folder, CARD_NAME), os.path.join(folder, CHECKPOINT_NAME)
    for path in (card_path, weights_path):
        if not os.path.isfile(path):
            raise InputFileNotFoundError(f"{path} does not exist (train with 'eoc train-testbed --out {folder}')")
    with open(card_path) as f:
        config = TrainConfig(**json.load(f)["config"])
    model = config.build_model()
    try:
        model.load_state_dict({k: v.float() for k, v in _load_state(weights_path).items()})
    except (RuntimeError, AttributeError) as exc:
        raise InputValueError(f"{weights_path} does not match its model card: {str(exc).splitlines()[0]}") from None
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def sample_accuracy(model, num_samples: int = 1000, *, cfg_scale: float = 3.0, num_steps: int = 20,
                    batch_size: int = 500, seed_base: int = ACCURACY_SEED_BASE) -> dict:
    """Whether the model draws every class: ``num_samples`` uncached DDIM samples (labels cycling through
    the classes, one seed each from ``seed_base``), classified by the shipped classifier.

    Returns {"overall": accuracy, "per_class": {class name: accuracy}, "mean_pixel_per_class": {...},
    "num_samples", "cfg_scale", "num_steps", "seed_base"} (a blank class shows as mean pixel near −1)."""
    from ..diffusion import DDIMSampler, noise_for_seed

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < model.num_classes:
        raise InputValueError(f"num_samples must be an int >= the number of classes ({model.num_classes}), "
                              f"got {num_samples!r}")
    labels = torch.arange(num_samples) % model.num_classes  # as testbed.demo.demo_batch
    noise = torch.cat([noise_for_seed(model, seed_base + i) for i in range(num_samples)])
    sampler = DDIMSampler(num_steps)
    images = torch.cat([sampler.sample(model, noise[i : i + batch_size], labels[i : i + batch_size],
                                       cfg_scale=cfg_scale, progress=False)
                        for i in range(0, num_samples, batch_size)]).clamp(-1, 1)
    hits = (batched(_classifier(), _check_images(images)).argmax(1) == labels).double()
    per_class = {name: round(float(hits[labels == c].mean()), 4) for c, name in enumerate(CLASSES)}
    pixels = {name: round(float(images[labels == c].mean()), 4) for c, name in enumerate(CLASSES)}
    return {"overall": round(float(hits.mean()), 4), "per_class": per_class, "mean_pixel_per_class": pixels,
            "num_samples": num_samples, "cfg_scale": cfg_scale, "num_steps": num_steps, "seed_base": seed_base}


def load_prior(num_steps: int = 20):
    """The shipped prior of the testbed for DDIM with ``num_steps`` steps (it carries its ``cfg_scale``
    and the calibrated mode's coefficients for FORA intervals 2-5)."""
    path = os.path.join(ASSETS, prior_name(num_steps))
    if not os.path.isfile(path):
        shipped = sorted(name for name in os.listdir(ASSETS) if name.startswith("testbed_prior_ddim"))
        if not shipped:
            _asset(prior_name(num_steps))  # raises FileNotFoundError naming the missing file
        raise InputValueError(f"no shipped testbed prior for {num_steps} steps; shipped: {', '.join(shipped)}")
    return Prior.load(path)


@functools.lru_cache(maxsize=1)
def _classifier() -> FashionCNN:
    model = FashionCNN()
    try:
        model.load_state_dict(_load_state(_asset(CLASSIFIER_NAME)))
    except (RuntimeError, AttributeError) as exc:
        raise InputValueError(f"shipped classifier weights do not match FashionCNN: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.eval()


def _check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise InputTypeError(f"{name} must be a floating tensor [B, 1, 28, 28], got {type(images).__name__}")
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28) or images.shape[0] == 0:
        raise InputValueError(f"{name} must have shape [B, 1, 28, 28] with B >= 1, got {list(images.shape)}")
    if not bool(torch.isfinite(images).all()):  # a diverged sampler: say so instead of failing in a metric
        raise InputValueError(f"{name} contains NaN or inf values")
    return images.detach().float().cpu().clamp(-1.0, 1.0)


def features(images: torch.Tensor) -> torch.Tensor:
    """The classifier's 128-d penultimate features, [B, 128] (fp32, CPU)."""
    return batched(_classifier().features, _check_images(images))


def fd(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Fréchet distance between two image sets in the classifier's feature space."""
    stats_a = feature_statistics(features(_check_images(images_a, "images_a")))
    stats_b = feature_statistics(features(_check_images(images_b, "images_b")))
    return frechet_distance(*stats_a, *stats_b)


def fd_to_data(images: torch.Tensor) -> float:
    """Fréchet distance to the Fashion-MNIST test split (its feature statistics ship in the package)."""
    stats = _load_state(_asset(FEATURE_STATS_NAME))
    return frechet_distance(*feature_statistics(features(images)), stats["mean"], stats["cov"])


def classifier_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images the classifier assigns to their conditioning label."""
    images = _check_images(images)
    if not isinstance(labels, torch.Tensor) or labels.shape != images.shape[:1]:
        raise InputValueError(f"labels must be a tensor of shape [{images.shape[0]}], "
                              f"got {getattr(labels, 'shape', labels)}")
    predictions = batched(_classifier(), images).argmax(1)
    return float((predictions == labels.cpu()).float().mean())


def _squared_errors(images, reference):
    a, b = _check_images(images), _check_images(reference, "reference")
    if a.shape != b.shape:
        raise InputValueError(f"images {list(a.shape)} and reference {list(b.shape)} must have the same shape")
    return (a - b).double().pow(2)  # images clamped to [-1, 1] first: out-of-range errors are invisible


def _db(mse: torch.Tensor) -> torch.Tensor:
    """10·log10(peak² / mse), peak-to-peak 2 (values in [-1, 1]); an MSE of 0 gives PSNR_IDENTICAL."""
    values = torch.where(mse > 0, 10 * torch.log10(4.0 / mse.clamp(min=1e-30)), torch.full_like(mse, PSNR_IDENTICAL))
    return values.clamp(max=PSNR_IDENTICAL)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Pooled PSNR, the headline fidelity figure: 10·log10(4 / MSE), the MSE pooled over every pixel of
    every image (images clamped to [-1, 1]); identical sets give PSNR_IDENTICAL (100 dB)."""
    return float(_db(_squared_errors(images, reference).mean()))


def image_psnrs(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR [B] (float64), each as in ``psnr``; report their mean and 10th percentile beside the
    pooled figure, never instead of it."""
    return _db(_squared_errors(images, reference).flatten(1).mean(1))
