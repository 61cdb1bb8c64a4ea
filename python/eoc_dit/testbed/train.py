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
from dataclasses import asdict, dataclass, fields

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
    # the EMA copies the weights before this iteration and averages from it on (None: from `warmup`)
    ema_start: int | None = None
    # warm start: a testbed checkpoint (fp16 EMA weights, same architecture) that initialises both the
    # weights and the EMA; "" trains from the random init
    init_from: str = ""
    # class-weighted sampling, "label:weight,...": each epoch's order is drawn with replacement, an
    # image of a listed label `weight` times as likely as one of an unlisted label (weight 1); "" keeps
    # the plain shuffle. For a class the model draws weakly (thin structures need more of its gradient).
    class_weights: str = ""

    def __post_init__(self):
        positive = ("input_size", "patch_size", "hidden_size", "depth", "num_heads", "num_classes", "iterations",
                    "batch_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("warmup", "seed") + (("ema_start",) if self.ema_start is not None else ()):
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
        if not isinstance(self.init_from, str):
            raise InputValueError(f"TrainConfig.init_from must be a path string, got {self.init_from!r}")
        self.label_weights()  # validates class_weights

    def label_weights(self) -> dict[int, float]:
        """``class_weights`` parsed: {label: weight} for the listed labels (empty: plain shuffle)."""
        text = self.class_weights
        if not isinstance(text, str):
            raise InputValueError(f"TrainConfig.class_weights must be a string like '5:3,6:1.5', got {text!r}")
        weights = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            label, sep, weight = item.partition(":")
            try:
                label, weight = int(label), float(weight)
            except ValueError:
                label = weight = None
            if not sep or label is None or not 0 <= label < self.num_classes or label in weights \
                    or not (math.isfinite(weight) and weight > 0):
                raise InputValueError(f"TrainConfig.class_weights must list distinct 'label:weight' pairs with a "
                                      f"label in [0, {self.num_classes}) and a finite weight > 0, got {item!r} "
                                      f"in {text!r}")
            weights[label] = weight
        return weights

    @property
    def ema_start_iteration(self) -> int:
        return self.warmup if self.ema_start is None else self.ema_start

    def build_model(self) -> DiT:
        return DiT(input_size=self.input_size, patch_size=self.patch_size, in_channels=1,
                   hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                   class_dropout_prob=self.class_dropout_prob, num_classes=self.num_classes, learn_sigma=False)


def diffusion_loss(model: DiT, images: torch.Tensor, labels: torch.Tensor, sqrt_acp: torch.Tensor,
                   sqrt_one_minus_acp: torch.Tensor, generator: torch.Generator, device=None) -> torch.Tensor:
    """MSE between the model's eps and the true noise at uniformly drawn timesteps (drawn on the CPU
    generator, then moved to ``device``, default the images' device)."""
    batch = images.shape[0]
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    x_t = sqrt_acp[t, None, None, None] * images + sqrt_one_minus_acp[t, None, None, None] * noise
    device = images.device if device is None else device
    return F.mse_loss(model(x_t.to(device), t.to(device), labels.to(device)), noise.to(device))


@torch.no_grad()
def _update_ema(ema: DiT, model: DiT, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)


STATE_NAME = "train_state.pt"
# TrainConfig fields a resumed run may change: how long it runs. Anything else would be another run.
RESUMABLE_CHANGES = ("iterations", "max_minutes")


def _save_state(path, config, step, model, ema, optimizer, generator, order, cursor, losses, history, wall,
                init_card=None):
    """Everything the loop needs to go on exactly as if it had not stopped (written atomically)."""
    state = {"config": asdict(config), "next_step": step, "model": model.state_dict(), "ema": ema.state_dict(),
             "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
             "torch_rng": torch.get_rng_state(),  # the label dropout draws from the global generator
             "order": order, "cursor": cursor, "losses": losses[-100:], "history": history, "wall_time_s": wall,
             "init_card": init_card}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def _load_state(path, config):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        raise InputValueError(f"cannot resume from {path}: {type(error).__name__}: {error}") from None
    saved = state.get("config", {}) if isinstance(state, dict) else {}
    # a field newer than the saved run (class_weights) counts as its default there
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    differing = sorted(name for name, value in asdict(config).items()
                       if name not in RESUMABLE_CHANGES and saved.get(name, defaults[name]) != value)
    if differing:
        raise InputValueError(f"cannot resume from {path}: its run had other settings "
                              + ", ".join(f"{name}={saved.get(name, defaults[name])!r} (now {getattr(config, name)!r})"
                                          for name in differing))
    if state["next_step"] > config.iterations:
        raise InputValueError(f"cannot resume from {path}: it already ran {state['next_step']} iterations, "
                              f"more than iterations={config.iterations}")
    return state


def _load_init_weights(path, model):
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        raise InputValueError(f"TrainConfig.init_from: cannot read {path}: {type(error).__name__}: {error}") from None
    expected = model.state_dict()
    if not isinstance(weights, dict) or set(weights) != set(expected) or any(
            tuple(weights[k].shape) != tuple(v.shape) for k, v in expected.items()):
        raise InputValueError(f"TrainConfig.init_from: {path} is not a checkpoint of this architecture "
                              "(its parameter names or shapes differ)")
    return {k: v.float() for k, v in weights.items()}


def _card_beside(path):
    card_path = os.path.join(os.path.dirname(os.path.abspath(path)), CARD_NAME)
    if not os.path.isfile(card_path):
        return None
    with open(card_path) as f:
        return json.load(f)


def train_testbed(config: TrainConfig, out_dir: str, *, images=None, labels=None, progress: bool = True,
                  device="cpu", resume: bool = False, checkpoint_every: int = 0) -> dict:
    """Train, write ``out_dir/testbed_dit.pt`` (EMA weights, fp16, DiT state-dict layout) and
    ``out_dir/MODEL_CARD.json``; return the card. ``images``/``labels`` default to Fashion-MNIST train.

    device: where the model trains (the random draws stay on the CPU generator, so a run's batches,
    timesteps and noise do not depend on the device). checkpoint_every > 0: every that many iterations
    (and when the run stops) ``out_dir/train_state.pt`` keeps model, EMA, optimizer, random states and
    data order; ``resume=True`` goes on from it, exactly as an uninterrupted run would (only
    ``iterations`` and ``max_minutes`` may differ from the saved run's config)."""
    from tqdm.auto import tqdm

    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise InputValueError(f"cannot write to {out_dir}: not a writable folder")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise InputValueError(f"checkpoint_every must be an int >= 0, got {checkpoint_every!r}")
    device = torch.device(device)
    state_path = os.path.join(out_dir, STATE_NAME)
    state = None
    if resume:
        if not os.path.isfile(state_path):
            raise InputValueError(f"cannot resume: {state_path} does not exist (train with checkpoint_every > 0)")
        state = _load_state(state_path, config)
    if images is None:
        images, labels = load_fashion_mnist("train")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = config.build_model().to(device).train()
    ema = config.build_model().to(device).eval()
    init_card = None
    if config.init_from and state is None:
        if not os.path.isfile(config.init_from):  # checked here, not in TrainConfig: a card's path may be elsewhere
            raise InputValueError(f"TrainConfig.init_from: {config.init_from} is not a file")
        model.load_state_dict(_load_init_weights(config.init_from, model))
        init_card = _card_beside(config.init_from)
    ema.load_state_dict(model.state_dict())
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    acp = torch.from_numpy(np.cumprod(1.0 - linear_beta_schedule(NUM_TRAIN_TIMESTEPS))).float()
    sqrt_acp, sqrt_one_minus_acp = acp.sqrt(), (1.0 - acp).sqrt()

    n = images.shape[0]
    label_weights = config.label_weights()
    if label_weights:
        sample_weights = torch.ones(n, dtype=torch.float64)
        for label, weight in label_weights.items():
            sample_weights[labels == label] = weight

        def epoch_order():
            return torch.multinomial(sample_weights, n, replacement=True, generator=generator)
    else:
        def epoch_order():
            return torch.randperm(n, generator=generator)
    order = epoch_order()
    cursor, losses, history, first, wall_before = 0, [], [], 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        order, cursor, losses, history = state["order"], state["cursor"], list(state["losses"]), state["history"]
        first, wall_before = state["next_step"], state["wall_time_s"]
    start = time.perf_counter()
    bar = tqdm(range(first, config.iterations), desc="train-testbed", unit="it", disable=not progress,
               initial=first, total=config.iterations)
    step = first - 1
    for step in bar:
        if cursor + config.batch_size > n:
            order, cursor = epoch_order(), 0
        index = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        for group in optimizer.param_groups:  # linear warm-up, then constant (as DiT, which uses no decay)
            group["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup))
        loss = diffusion_loss(model, images[index], labels[index], sqrt_acp, sqrt_one_minus_acp, generator, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        _update_ema(ema, model, config.ema_decay if step >= config.ema_start_iteration else 0.0)
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == config.iterations:
            recent = float(np.mean(losses[-100:]))
            history.append({"iteration": step + 1, "loss": round(recent, 5)})
            bar.set_postfix(loss=f"{recent:.4f}")
        stop = config.max_minutes > 0 and time.perf_counter() - start > 60 * config.max_minutes
        if checkpoint_every and ((step + 1) % checkpoint_every == 0 or stop or step + 1 == config.iterations):
            _save_state(state_path, config, step + 1, model, ema, optimizer, generator, order, cursor, losses,
                        history, wall_before + time.perf_counter() - start,
                        init_card if state is None else state.get("init_card"))
        if stop:
            break
    wall = wall_before + time.perf_counter() - start
    weights = {k: v.half().cpu() for k, v in ema.state_dict().items()}
    torch.save(weights, os.path.join(out_dir, CHECKPOINT_NAME))
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
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)},
        "resumed_from_iteration": first if state is not None else None,
        # a warm-started run's card carries the card of the run it started from: the whole recipe
        "init_from_card": init_card if state is None else state.get("init_card"),
        "weights": f"{CHECKPOINT_NAME}: EMA (decay {config.ema_decay}) weights stored in fp16",
        "date": time.strftime("%Y-%m-%d"),
    }
    with open(os.path.join(out_dir, CARD_NAME), "w") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    return card
