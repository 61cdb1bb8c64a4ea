"""Training the testbed DiT on Fashion-MNIST (``eoc train-testbed``).

The DiT recipe (arXiv 2212.09748 §3-4) at toy scale, in pixel space: adaLN-Zero blocks, the linear
beta schedule over 1000 steps, epsilon prediction with a plain MSE loss (no learned sigma), label
dropout 0.1 for classifier-free guidance, AdamW and an EMA of the weights. Seeded and reproducible
on one machine; sized to train on a 2-core CPU within an hour.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion import NUM_TRAIN_TIMESTEPS, linear_beta_schedule
from ..errors import InputValueError
from ..models import DiT
from .data import load_fashion_mnist

CHECKPOINT_NAME = "testbed_dit.pt"
CARD_NAME = "MODEL_CARD.json"


@dataclass
class TrainConfig:
    # model: 6 blocks of width 256 over 7x7 patches of 4x4 pixels (49 tokens), 7.4M parameters
    input_size: int = 28
    patch_size: int = 4
    hidden_size: int = 256
    depth: int = 6
    num_heads: int = 4
    num_classes: int = 10
    class_dropout_prob: float = 0.1
    # optimisation
    iterations: int = 3500
    batch_size: int = 64
    lr: float = 3e-4
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    max_minutes: float = 0.0  # > 0: stop early after this much wall time (the card records it)

    def __post_init__(self):
        positive = ("input_size", "patch_size", "hidden_size", "depth", "num_heads", "num_classes", "iterations",
                    "batch_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("warmup", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputValueError(f"TrainConfig.{name} must be an int >= 0, got {value!r}")
        bounded = {"class_dropout_prob": (0.0, 1.0), "ema_decay": (0.0, 1.0)}
        for name in ("class_dropout_prob", "lr", "weight_decay", "grad_clip", "ema_decay", "max_minutes"):
            value = getattr(self, name)
            low, high = bounded.get(name, (0.0, math.inf))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:
                raise InputValueError(f"TrainConfig.{name} must be a finite number in [{low}, {high}], got {value!r}")

    def build_model(self) -> DiT:
        return DiT(input_size=self.input_size, patch_size=self.patch_size, in_channels=1,
                   hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                   class_dropout_prob=self.class_dropout_prob, num_classes=self.num_classes, learn_sigma=False)


def diffusion_loss(model: DiT, images: torch.Tensor, labels: torch.Tensor, sqrt_acp: torch.Tensor,
                   sqrt_one_minus_acp: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MSE between the model's eps and the true noise at uniformly drawn timesteps."""
    batch = images.shape[0]
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    x_t = sqrt_acp[t, None, None, None] * images + sqrt_one_minus_acp[t, None, None, None] * noise
    return F.mse_loss(model(x_t, t, labels), noise)


@torch.no_grad()
def _update_ema(ema: DiT, model: DiT, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)


def train_testbed(config: TrainConfig, out_dir: str, *, images=None, labels=None, progress: bool = True) -> dict:
    """Train, write ``out_dir/testbed_dit.pt`` (EMA weights, fp16, DiT state-dict layout) and
    ``out_dir/MODEL_CARD.json``; return the card. ``images``/``labels`` default to Fashion-MNIST train."""
    from tqdm.auto import tqdm

    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise InputValueError(f"cannot write to {out_dir}: not a writable folder")
    if images is None:
        images, labels = load_fashion_mnist("train")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = config.build_model().train()
    ema = config.build_model().eval()
    ema.load_state_dict(model.state_dict())
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    acp = torch.from_numpy(np.cumprod(1.0 - linear_beta_schedule(NUM_TRAIN_TIMESTEPS))).float()
    sqrt_acp, sqrt_one_minus_acp = acp.sqrt(), (1.0 - acp).sqrt()

    n = images.shape[0]
    order = torch.randperm(n, generator=generator)
    cursor, losses, history = 0, [], []
    start = time.perf_counter()
    bar = tqdm(range(config.iterations), desc="train-testbed", unit="it", disable=not progress)
    step = 0
    for step in bar:
        if cursor + config.batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        index = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        for group in optimizer.param_groups:  # linear warm-up, then constant (as DiT, which uses no decay)
            group["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup))
        loss = diffusion_loss(model, images[index], labels[index], sqrt_acp, sqrt_one_minus_acp, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        _update_ema(ema, model, config.ema_decay if step >= config.warmup else 0.0)
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == config.iterations:
            recent = float(np.mean(losses[-100:]))
            history.append({"iteration": step + 1, "loss": round(recent, 5)})
            bar.set_postfix(loss=f"{recent:.4f}")
        if config.max_minutes > 0 and time.perf_counter() - start > 60 * config.max_minutes:
            break
    wall = time.perf_counter() - start

    state = {k: v.half() for k, v in ema.state_dict().items()}
    torch.save(state, os.path.join(out_dir, CHECKPOINT_NAME))
    card = {
        "model": "DiT (adaLN-Zero), pixel space, epsilon prediction, learn_sigma=False",
        "data": "Fashion-MNIST train split (60,000 images, 10 classes), scaled to [-1, 1]",
        "config": asdict(config),
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "iterations_run": step + 1,
        "final_loss_mean_last_100": round(float(np.mean(losses[-100:])), 5) if losses else math.nan,
        "loss_history": history,
        "wall_time_s": round(wall, 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "weights": f"{CHECKPOINT_NAME}: EMA (decay {config.ema_decay}) weights stored in fp16",
        "date": time.strftime("%Y-%m-%d"),
    }
    with open(os.path.join(out_dir, CARD_NAME), "w") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    return card
