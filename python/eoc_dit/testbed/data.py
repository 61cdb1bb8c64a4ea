"""Fashion-MNIST from its original idx files (Debian package ``dataset-fashion-mnist``).

The files are looked up in ``$EOC_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist``; nothing
is downloaded. Images come back as float32 [N, 1, 28, 28] in [-1, 1], labels as int64 [N].
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import torch

from ..errors import InputFileNotFoundError, InputValueError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def data_dir() -> str:
    return os.environ.get("EOC_FASHION_MNIST", DEFAULT_DIR)


def read_idx(path: str) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array: magic 0x0000 08 D, then D big-endian sizes."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputFileNotFoundError(f"Fashion-MNIST file not found: {path} (install Debian's dataset-fashion-mnist "
                                f"or set EOC_FASHION_MNIST to the folder holding the idx files)") from None
    except (OSError, EOFError) as exc:
        raise InputValueError(f"{path}: not a readable idx file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise InputValueError(f"{path}: not an idx file of unsigned bytes")
    dims = data[3]
    header = 4 + 4 * dims
    shape = struct.unpack(f">{dims}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise InputValueError(f"{path}: idx payload of {len(data) - header} bytes does not match shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(split: str = "train", folder: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, 1, 28, 28] in [-1, 1], labels int64 [N]) of the ``"train"`` or ``"test"`` split."""
    if split not in _FILES:
        raise InputValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = folder or data_dir()
    image_file, label_file = (os.path.join(folder, name) for name in _FILES[split])
    images = read_idx(image_file)
    labels = read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise InputValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    images = torch.from_numpy(images.copy()).float().div_(127.5).sub_(1.0).unsqueeze(1)
    return images, torch.from_numpy(labels.astype(np.int64))
