"""``eoc sample --out samples.npz``: samples at evaluation scale in the layout of the ADM FID evaluator
(docs/DESIGN.md §4.11), written in parts so that a rerun resumes.

The (label, seed) pairs are sampled in batches of ``batch_size`` in list order (as ``sample_pairs``).
Each batch becomes one part, ``<out>.parts/batch-<index>.npy`` (uint8 [b, H, W, C], written to a
temporary name and renamed, so a killed run never leaves half a part), by whichever rank samples it:
under torchrun the batches still missing are shared among the ranks, whole and in order. A
``manifest.json`` in the folder records what determines the samples (model, sampler, schedule, mode,
prior, pairs, batch size, ...); a rerun with the same settings keeps every part already written and
samples only the others, a rerun with other settings is refused. When every part exists, rank 0
writes ``<out>`` with ``arr_0`` = all parts in pair order, [N, H, W, C] uint8: identical whether the
run was interrupted, resumed or split among any number of ranks. The parts folder must be one all
ranks see (as DiT's ``sample_ddp.py`` assumes); delete it once the ``.npz`` is written.

Images are converted as DiT's ``sample_ddp.py`` does: ``clamp(127.5 · x + 128, 0, 255)`` cast to uint8
(truncation), channels last.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from . import distributed
from .diffusion import noise_for_seed
from .errors import InputValueError

MANIFEST = "manifest.json"


def to_uint8_images(samples: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C], as DiT's sample_ddp.py."""
    return torch.clamp(127.5 * samples + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def parts_folder(out: str) -> str:
    return out + ".parts"


def _part(folder: str, index: int) -> str:
    return os.path.join(folder, f"batch-{index:06d}.npy")


def _barrier(group, what: str) -> None:
    # a gather of one number per rank: every rank waits for all (and fails on a dead one like any collective)
    distributed.gather_rows(torch.zeros(1), group, what=what)


def _prepare(folder: str, manifest: dict, group) -> None:
    if distributed.is_main(group):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, MANIFEST)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    stored = json.load(f)
            except (OSError, ValueError) as exc:
                raise InputValueError(f"{path}: unreadable manifest ({exc}); delete {folder} to start over") from None
            if stored != manifest:
                changed = sorted(k for k in set(stored) | set(manifest) if stored.get(k) != manifest.get(k))
                raise InputValueError(f"{folder} holds parts sampled with other settings ({', '.join(changed)}): "
                                      "delete it to start over, or give another --out")
        else:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
    _barrier(group, "sample: the parts folder")


def sample_npz(model, sampler, pairs, out: str, manifest: dict, *, cfg_scale: float, batch_size: int, device,
               progress: bool = False, group=None) -> tuple[int, int]:
    """Sample ``pairs`` into ``out`` (module docstring); returns (batches sampled by this call on this rank,
    batches kept from an earlier run). The caller patches the model (``apply_eoc``) around the call."""
    group = distributed.resolve_group(group)
    folder = parts_folder(out)
    batches = [pairs[start : start + batch_size] for start in range(0, len(pairs), batch_size)]
    manifest = dict(manifest, num_pairs=len(pairs), batch_size=batch_size,
                    pairs=[[int(label), int(seed)] for label, seed in pairs])
    _prepare(folder, manifest, group)
    missing = [i for i in range(len(batches)) if not os.path.exists(_part(folder, i))]
    rank, size = distributed.rank_and_size(group)
    start, stop = distributed.shard_bounds(len(missing), rank, size)
    for index in missing[start:stop]:
        batch = batches[index]
        noise = torch.cat([noise_for_seed(model, seed) for _, seed in batch]).to(device)
        labels = torch.tensor([label for label, _ in batch], device=device)
        images = to_uint8_images(sampler.sample(model, noise, labels, cfg_scale=cfg_scale, progress=progress))
        tmp = _part(folder, index) + f".rank{rank}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, images)
        os.replace(tmp, _part(folder, index))
    _barrier(group, "sample: the parts")
    if distributed.is_main(group):
        arrays = []
        for index, batch in enumerate(batches):
            path = _part(folder, index)
            try:
                array = np.load(path)
            except (OSError, ValueError) as exc:
                raise InputValueError(f"{path}: unreadable part ({exc}); delete it and rerun") from None
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[0] != len(batch):
                raise InputValueError(f"{path}: a part of {len(batch)} images must be uint8 [b, H, W, C], "
                                      f"got {array.dtype} {list(array.shape)}; delete it and rerun")
            arrays.append(array)
        tmp = out + ".tmp.npz"
        np.savez(tmp, arr_0=np.concatenate(arrays))
        os.replace(tmp, out)
    _barrier(group, "sample: the merged file")
    return stop - start, len(batches) - len(missing)
