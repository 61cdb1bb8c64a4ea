"""The testbed's feature extractor: a small Fashion-MNIST CNN (``eoc train-classifier``).

Its 128-d penultimate activations are the feature space of the testbed's Fréchet distance (the
role Inception plays in FID), and its predictions give the class accuracy of generated samples.
Trained with this script, seeded; the weights ship in the package.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputValueError
from .data import load_fashion_mnist

CLASSIFIER_NAME = "classifier.pt"
FEATURE_STATS_NAME = "test_feature_stats.pt"
CLASSIFIER_CARD_NAME = "CLASSIFIER_CARD.json"
FEATURE_DIM = 128


class FashionCNN(nn.Module):
    """[B, 1, 28, 28] in [-1, 1] → logits [B, 10]; ``features`` gives the 128-d penultimate layer."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128 * 3 * 3, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [B, 32, 14, 14]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # [B, 64, 7, 7]
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # [B, 128, 3, 3]
        return F.relu(self.fc(x.flatten(1)))  # [B, 128]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def batched(fn, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([fn(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)])


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], covariance [D, D]) in float64 of features [N, D]."""
    f = features.double()
    mean = f.mean(0)
    centered = f - mean
    return mean, centered.T @ centered / max(f.shape[0] - 1, 1)


def train_classifier(out_dir: str, *, epochs: int = 3, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                     progress: bool = True, data=None) -> dict:
    """Train the CNN on the train split, write its weights, the test split's feature statistics and a card."""
    from tqdm.auto import tqdm

    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise InputValueError(f"cannot write to {out_dir}: not a writable folder")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise InputValueError(f"lr must be a finite number > 0, got {lr!r}")
    (train_x, train_y), (test_x, test_y) = data if data is not None else (load_fashion_mnist("train"),
                                                                          load_fashion_mnist("test"))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = FashionCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    steps = epochs * (train_x.shape[0] // batch_size)
    bar = tqdm(total=steps, desc="train-classifier", unit="it", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(train_x.shape[0], generator=generator)
        for i in range(train_x.shape[0] // batch_size):
            index = order[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
    bar.close()
    model.eval()
    accuracy = float((batched(model, test_x).argmax(1) == test_y).float().mean())
    mean, cov = feature_statistics(batched(model.features, test_x))
    torch.save(model.state_dict(), os.path.join(out_dir, CLASSIFIER_NAME))
    torch.save({"mean": mean, "cov": cov, "num_images": int(test_x.shape[0])},
               os.path.join(out_dir, FEATURE_STATS_NAME))
    card = {"model": "FashionCNN (3 conv + 2 linear), 128-d features", "epochs": epochs, "batch_size": batch_size,
            "lr": lr, "seed": seed, "test_accuracy": round(accuracy, 4),
            "wall_time_s": round(time.perf_counter() - start, 1),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "feature_stats": f"{FEATURE_STATS_NAME}: mean and covariance (fp64) of the {test_x.shape[0]} test images"}
    with open(os.path.join(out_dir, CLASSIFIER_CARD_NAME), "w") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    return card


def _psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """||μa − μb||² + Tr(Σa + Σb − 2 (Σa Σb)^½) in float64. Tr (Σa Σb)^½ = Tr (Σa^½ Σb Σa^½)^½ is the
    nuclear norm of Σa^½ Σb^½ (sum of its singular values): no eigen-solve of an ill-conditioned product."""
    mean_a, mean_b, cov_a, cov_b = (t.double() for t in (mean_a, mean_b, cov_a, cov_b))
    trace_sqrt = torch.linalg.svdvals(_psd_sqrt(cov_a) @ _psd_sqrt(cov_b)).sum()
    value = (mean_a - mean_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * trace_sqrt
    return float(np.maximum(value.item(), 0.0))
