"""Sample grids: tiled uint8 images, written as PNG without an imaging library (zlib + the PNG chunk
layout), and a labelled grid for people (nearest-neighbour upscaling, row and column labels drawn
with matplotlib's Agg canvas; without matplotlib the same pixels are written unlabelled)."""

from __future__ import annotations

import os
import struct
import zlib

import torch

from .errors import InputValueError


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2, fill: int = 0) -> torch.Tensor:
    """Tile images [B, C, H, W] with values in [-1, 1] into one uint8 image [rows·(H+p)+p, cols·(W+p)+p, C].

    Values map by round((clamp(x, -1, 1) + 1) · 127.5) (NaN as -1); ``columns`` defaults to min(B, 10);
    images fill rows left to right; the padding and any unused cells are ``fill`` (0..255, default 0).
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
    if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill <= 255:
        raise InputValueError(f"fill must be an int in [0, 255], got {fill!r}")
    columns = min(B, 10) if columns is None else columns
    rows = -(-B // columns)
    # NaN → -1 (black): casting NaN to uint8 is undefined and differs between platforms.
    pixels = ((images.detach().float().cpu().nan_to_num(nan=-1.0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.full((rows * (H + padding) + padding, columns * (W + padding) + padding, C), fill, dtype=torch.uint8)
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


def upscale(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour upscaling of an image [H, W, C] by an integer ``factor`` (each pixel a block)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise InputValueError(f"factor must be an int >= 1, got {factor!r}")
    if image.dim() != 3:
        raise InputValueError(f"image must be [H, W, C], got {list(image.shape)}")
    return image.repeat_interleave(factor, 0).repeat_interleave(factor, 1)


def difference_images(images: torch.Tensor, reference: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """``gain``·|images − reference| (both clamped to [-1, 1] first, as the metrics do) on the image scale
    [-1, 1] of :func:`image_grid`: no difference is black (-1) and a difference of 2/gain or more is white.
    Shapes [B, C, H, W], equal."""
    if images.shape != reference.shape:
        raise InputValueError(f"images {list(images.shape)} and reference {list(reference.shape)} differ in shape")
    if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not gain > 0:
        raise InputValueError(f"gain must be a number > 0, got {gain!r}")
    diff = (images.detach().float().cpu().clamp(-1, 1) - reference.detach().float().cpu().clamp(-1, 1)).abs()
    return (gain * diff).clamp(0, 2) - 1


#: Label font size in points and the figure's dots per inch: 10 pt at 100 dpi is about 14 pixels.
LABEL_POINTS, LABEL_DPI, LABEL_GAP = 10, 100, 6


def labelled_grid_figure(rows: list[torch.Tensor], row_labels: list[str], column_labels: list[str] | None = None,
                         *, scale: int = 4, padding: int = 2):
    """A ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state) of the grid whose row i holds the
    images ``rows[i]`` [k, C, H, W] (values in [-1, 1], every row k images), each pixel a ``scale``×``scale``
    block, ``row_labels[i]`` left of row i and ``column_labels[j]`` above column j.

    The grid's pixels are placed unresampled (``figimage``): saved at the figure's dpi, the PNG holds
    ``upscale(image_grid(..., fill=255), scale)`` exactly (white gaps), with white margins for the
    labels. Returns the figure; its size in pixels is ``figure.get_size_inches() * figure.dpi``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    if not rows or len(row_labels) != len(rows):
        raise InputValueError(f"one label per row: {len(rows)} rows, {len(row_labels)} labels")
    columns = rows[0].shape[0]
    if any(r.dim() != 4 or r.shape[0] != columns or r.shape[1:] != rows[0].shape[1:] for r in rows):
        raise InputValueError(f"every row must be [k, C, H, W] of one shape, got {[list(r.shape) for r in rows]}")
    if column_labels is not None and len(column_labels) != columns:
        raise InputValueError(f"one label per column: {columns} columns, {len(column_labels)} labels")
    _, channels, height, width = rows[0].shape
    # White gaps: Fashion-MNIST's black backgrounds would run together over black ones.
    pixels = upscale(image_grid(torch.cat(rows), columns=columns, padding=padding, fill=255), scale)  # [Hg, Wg, C]

    font = FontProperties(size=LABEL_POINTS)
    renderer = FigureCanvasAgg(Figure(dpi=LABEL_DPI)).get_renderer()

    def extent(text: str) -> tuple[float, float]:  # (width, height) in pixels of a possibly multi-line label
        sizes = [renderer.get_text_width_height_descent(line or " ", font, ismath=False)[:2]
                 for line in text.split("\n")]
        return max(w for w, _ in sizes), sum(h for _, h in sizes) * 1.25

    left = int(max(extent(label)[0] for label in row_labels)) + 2 * LABEL_GAP
    top = int(max(extent(label)[1] for label in column_labels)) + 2 * LABEL_GAP if column_labels else LABEL_GAP
    right = bottom = LABEL_GAP
    total_w, total_h = left + pixels.shape[1] + right, top + pixels.shape[0] + bottom
    fig = Figure(figsize=(total_w / LABEL_DPI, total_h / LABEL_DPI), dpi=LABEL_DPI)
    FigureCanvasAgg(fig)
    # RGB uint8, not a grey colormap (whose 256-entry lookup moves some values by one); figimage counts yo
    # from the bottom, and origin="upper" draws the array's first row at the top.
    shown = pixels.expand(-1, -1, 3).numpy() if channels == 1 else pixels.numpy()
    fig.figimage(shown, xo=left, yo=bottom, origin="upper", resample=False)
    cell_h, cell_w = (height + padding) * scale, (width + padding) * scale
    for i, label in enumerate(row_labels):
        centre = top + padding * scale + i * cell_h + height * scale / 2  # pixels from the top
        fig.text((left - LABEL_GAP) / total_w, 1 - centre / total_h, label, ha="right", va="center",
                 fontproperties=font)
    for j, label in enumerate(column_labels or []):
        centre = left + padding * scale + j * cell_w + width * scale / 2
        fig.text(centre / total_w, 1 - (top - LABEL_GAP) / total_h, label, ha="center", va="bottom",
                 fontproperties=font)
    return fig


def write_labelled_grid(path: str | os.PathLike, rows: list[torch.Tensor], row_labels: list[str],
                        column_labels: list[str] | None = None, *, scale: int = 4, padding: int = 2) -> bool:
    """Write :func:`labelled_grid_figure` as a PNG; returns True. Without matplotlib, writes the same
    upscaled grid without labels (``write_png``) and returns False."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        columns = rows[0].shape[0] if rows else 1
        write_png(path, upscale(image_grid(torch.cat(rows), columns=columns, padding=padding, fill=255), scale))
        return False
    fig = labelled_grid_figure(rows, row_labels, column_labels, scale=scale, padding=padding)
    fig.savefig(path, format="png", dpi=LABEL_DPI)
    return True
