"""Writing sample grids as PNG without an imaging library (zlib + the PNG chunk layout)."""

from __future__ import annotations

import os
import struct
import zlib

import torch


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> torch.Tensor:
    """Tile images [B, C, H, W] with values in [-1, 1] into one uint8 image [rows·(H+p)+p, cols·(W+p)+p, C]."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [B, 1 or 3, H, W], got {list(images.shape)}")
    B, C, H, W = images.shape
    columns = columns or min(B, 10)
    rows = -(-B // columns)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.zeros(rows * (H + padding) + padding, columns * (W + padding) + padding, C, dtype=torch.uint8)
    for i in range(B):
        top, left = padding + (i // columns) * (H + padding), padding + (i % columns) * (W + padding)
        grid[top : top + H, left : left + W] = pixels[i].permute(1, 2, 0)
    return grid


def write_png(path: str | os.PathLike, image: torch.Tensor) -> None:
    """Write a uint8 image [H, W, 1 or 3] as an 8-bit grayscale or RGB PNG."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be uint8 [H, W, 1 or 3], got {image.dtype} {list(image.shape)}")
    height, width, channels = image.shape
    raw = b"".join(b"\x00" + bytes(row) for row in image.contiguous().view(height, width * channels).numpy())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    color_type = 0 if channels == 1 else 2
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
