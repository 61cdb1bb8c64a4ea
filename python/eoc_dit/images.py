"""Writing sample grids as PNG without an imaging library (zlib + the PNG chunk layout)."""

from __future__ import annotations

import os
import struct
import zlib

import torch

from .errors import InputValueError


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> torch.Tensor:
    """Tile images [B, C, H, W] with values in [-1, 1] into one uint8 image [rows·(H+p)+p, cols·(W+p)+p, C].

    Values map by round((clamp(x, -1, 1) + 1) · 127.5) (NaN as -1); ``columns`` defaults to min(B, 10);
    images fill rows left to right; the padding and any unused cells are 0.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise InputValueError(f"images must have shape [B, 1 or 3, H, W], got {list(images.shape)}")
    B, C, H, W = images.shape
    if B < 1 or H < 1 or W < 1:
        raise InputValueError(f"images must hold at least one non-empty image, got shape {list(images.shape)}")
    if columns is not None and (isinstance(columns, bool) or not isinstance(columns, int) or columns < 1):
        raise InputValueError(f"columns must be an int >= 1 or None, got {columns!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise InputValueError(f"padding must be an int >= 0, got {padding!r}")
    columns = min(B, 10) if columns is None else columns
    rows = -(-B // columns)
    # NaN → -1 (black): casting NaN to uint8 is undefined and differs between platforms.
    pixels = ((images.detach().float().cpu().nan_to_num(nan=-1.0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.zeros(rows * (H + padding) + padding, columns * (W + padding) + padding, C, dtype=torch.uint8)
    for i in range(B):
        top, left = padding + (i // columns) * (H + padding), padding + (i % columns) * (W + padding)
        grid[top : top + H, left : left + W] = pixels[i].permute(1, 2, 0)
    return grid


def write_png(path: str | os.PathLike, image: torch.Tensor) -> None:
    """Write a uint8 image [H, W, 1 or 3] as an 8-bit grayscale or RGB PNG."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] not in (1, 3):
        raise InputValueError(f"image must be uint8 [H, W, 1 or 3], got {image.dtype} {list(image.shape)}")
    height, width, channels = image.shape
    if height < 1 or width < 1:
        raise InputValueError(f"a PNG needs height and width >= 1, got {list(image.shape)}")
    raw = b"".join(b"\x00" + bytes(row) for row in image.cpu().contiguous().view(height, width * channels).numpy())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    color_type = 0 if channels == 1 else 2
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))
