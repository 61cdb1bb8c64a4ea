"""eoc_dit.images: the sample grid layout and the PNG writer, read back by a minimal PNG decoder."""

import struct
import sys
import zlib

import pytest
import torch

from eoc_dit.images import (
    LABEL_DPI,
    difference_images,
    image_grid,
    labelled_grid_figure,
    upscale,
    write_labelled_grid,
    write_png,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_png(data: bytes) -> tuple[torch.Tensor, dict]:
    """Decode an 8-bit, non-interlaced grayscale or RGB PNG whose rows all use filter 0 (None).

    Checks the signature, every chunk's CRC, the chunk order (IHDR first, IEND last, nothing after it)
    and the size of the inflated data. Returns (uint8 [H, W, C], IHDR fields).
    """
    assert data[:8] == PNG_SIGNATURE, "bad PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert len(body) == length, f"truncated {kind} chunk"
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind} chunk"
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data), "trailing bytes after the last chunk"
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and kinds.count(b"IEND") == 1
    assert chunks[-1][1] == b""
    width, height, depth, color, compression, filter_method, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    header = dict(width=width, height=height, depth=depth, color=color, compression=compression,
                  filter=filter_method, interlace=interlace)
    assert (depth, compression, filter_method, interlace) == (8, 0, 0, 0), header
    channels = {0: 1, 2: 3}[color]
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + width * channels
    assert len(raw) == height * stride, "inflated data has the wrong size"
    rows = []
    for r in range(height):
        line = raw[r * stride : (r + 1) * stride]
        assert line[0] == 0, f"row {r} uses filter type {line[0]}, the decoder only knows 0"
        rows.append(list(line[1:]))
    return torch.tensor(rows, dtype=torch.uint8).view(height, width, channels), header


# ---------------------------------------------------------------------------------------------- image_grid
def test_grid_value_mapping():
    values = torch.tensor([-1.0, 1.0, 0.0, -5.0, 5.0, 0.5, -0.5, float("nan")]).view(1, 1, 2, 4)
    grid = image_grid(values, padding=0)
    assert grid.dtype == torch.uint8 and grid.shape == (2, 4, 1)
    # -1 → 0, 1 → 255, clamped outside [-1, 1], round-half-to-even at 127.5, NaN → 0.
    assert grid[..., 0].flatten().tolist() == [0, 255, 128, 0, 255, 191, 64, 0]


def test_grid_layout_rows_columns_and_padding():
    B, C, H, W, p = 5, 1, 3, 4, 2
    # Image i is the constant value that maps to pixel 10·(i+1).
    images = torch.stack([torch.full((C, H, W), (10.0 * (i + 1)) / 127.5 - 1) for i in range(B)])
    grid = image_grid(images, columns=2, padding=p)
    rows, cols = 3, 2
    assert grid.shape == (rows * (H + p) + p, cols * (W + p) + p, C)
    expected = torch.zeros_like(grid)
    for i in range(B):
        top, left = p + (i // cols) * (H + p), p + (i % cols) * (W + p)
        expected[top : top + H, left : left + W] = 10 * (i + 1)
    assert torch.equal(grid, expected)
    # The empty sixth cell and every padding strip stay 0.
    assert int(grid[p + 2 * (H + p) :, p + (W + p) :].max()) == 0
    assert int(grid[:p].max()) == 0 and int(grid[:, :p].max()) == 0


def test_grid_default_columns_is_min_of_batch_and_ten():
    assert image_grid(torch.zeros(3, 1, 2, 2)).shape == (2 + 2 + 2, 3 * 4 + 2, 1)  # one row of 3
    grid = image_grid(torch.zeros(12, 3, 2, 2), padding=0)
    assert grid.shape == (2 * 2, 10 * 2, 3)  # 10 columns, 2 rows


def test_grid_rgb_channels_go_last():
    images = torch.zeros(1, 3, 2, 2)
    images[0, 0], images[0, 1], images[0, 2] = 1.0, -1.0, 0.0  # red channel full, green empty, blue mid
    grid = image_grid(images, padding=1)
    assert grid.shape == (4, 4, 3)
    assert grid[1:3, 1:3].reshape(-1, 3).tolist() == [[255, 0, 128]] * 4
    assert int(grid[0].max()) == 0


def test_grid_does_not_modify_input_and_accepts_half_precision():
    images = torch.linspace(-1, 1, 16).view(1, 1, 4, 4).half()
    before = images.clone()
    grid = image_grid(images, padding=0)
    assert torch.equal(images, before)
    assert grid[0, 0, 0] == 0 and grid[-1, -1, 0] == 255


@pytest.mark.parametrize("shape", [(1, 2, 4, 4), (1, 4, 4, 4), (3, 4, 4), (1, 1, 1, 4, 4), (0, 1, 4, 4), (1, 1, 0, 4)])
def test_grid_bad_shapes_raise(shape):
    with pytest.raises(ValueError):
        image_grid(torch.zeros(shape))


@pytest.mark.parametrize("kwargs", [dict(columns=0), dict(columns=-1), dict(columns=2.0), dict(padding=-1),
                                    dict(padding=1.5)])
def test_grid_bad_columns_or_padding_raise(kwargs):
    with pytest.raises(ValueError):
        image_grid(torch.zeros(2, 1, 4, 4), **kwargs)


# ---------------------------------------------------------------------------------------------- write_png
def test_png_grayscale_round_trip(tmp_path):
    image = torch.randint(0, 256, (7, 5, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "gray.png"
    write_png(path, image)
    decoded, header = decode_png(path.read_bytes())
    assert header["width"] == 5 and header["height"] == 7 and header["color"] == 0
    assert torch.equal(decoded, image)


def test_png_rgb_round_trip(tmp_path):
    image = torch.randint(0, 256, (4, 9, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    image[0, 0] = torch.tensor([0, 0, 0], dtype=torch.uint8)
    image[-1, -1] = torch.tensor([255, 255, 255], dtype=torch.uint8)
    path = tmp_path / "rgb.png"
    write_png(str(path), image)  # str and PathLike both work
    decoded, header = decode_png(path.read_bytes())
    assert header["width"] == 9 and header["height"] == 4 and header["color"] == 2
    assert torch.equal(decoded, image)


def test_png_of_a_grid_and_of_a_non_contiguous_image(tmp_path):
    images = torch.linspace(-1, 1, 2 * 3 * 4 * 5).view(2, 3, 4, 5)
    grid = image_grid(images, padding=1)
    write_png(tmp_path / "grid.png", grid)
    assert torch.equal(decode_png((tmp_path / "grid.png").read_bytes())[0], grid)

    transposed = torch.arange(2 * 3 * 3, dtype=torch.uint8).view(3, 2, 3).transpose(0, 1)  # [2, 3, 3], strided
    assert not transposed.is_contiguous()
    write_png(tmp_path / "t.png", transposed)
    assert torch.equal(decode_png((tmp_path / "t.png").read_bytes())[0], transposed)


def test_png_single_pixel(tmp_path):
    write_png(tmp_path / "one.png", torch.tensor([[[200]]], dtype=torch.uint8))
    decoded, header = decode_png((tmp_path / "one.png").read_bytes())
    assert (header["width"], header["height"]) == (1, 1) and decoded.flatten().tolist() == [200]


@pytest.mark.parametrize("image", [torch.zeros(4, 4, 1), torch.zeros(4, 4, 1, dtype=torch.int32),
                                   torch.zeros(4, 4, 2, dtype=torch.uint8), torch.zeros(4, 4, dtype=torch.uint8),
                                   torch.zeros(0, 4, 1, dtype=torch.uint8), torch.zeros(4, 0, 3, dtype=torch.uint8)])
def test_png_bad_images_raise(tmp_path, image):
    with pytest.raises(ValueError):
        write_png(tmp_path / "bad.png", image)
    assert not (tmp_path / "bad.png").exists()


def test_png_to_a_missing_folder_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        write_png(tmp_path / "nope" / "x.png", torch.zeros(2, 2, 1, dtype=torch.uint8))


def test_decoder_rejects_a_corrupted_png(tmp_path):
    """The decoder above really checks CRCs (so the round trips are meaningful)."""
    write_png(tmp_path / "x.png", torch.zeros(2, 2, 1, dtype=torch.uint8))
    data = bytearray((tmp_path / "x.png").read_bytes())
    data[20] ^= 0xFF  # a byte of the IHDR data
    with pytest.raises(AssertionError, match="CRC"):
        decode_png(bytes(data))


# ---------------------------------------------------------------------------------------------- labelled grids
def test_grid_fill_colours_padding_and_empty_cells():
    grid = image_grid(torch.full((3, 1, 2, 2), -1.0), columns=2, padding=1, fill=255)
    assert int(grid[0].min()) == 255 and int(grid[:, 0].min()) == 255  # padding strips
    assert int(grid[4:6, 4:6].min()) == 255  # the empty fourth cell
    assert int(grid[1:3, 1:3].max()) == 0  # an image (-1 → 0)
    for bad in (-1, 256, 1.0, True):
        with pytest.raises(ValueError):
            image_grid(torch.zeros(1, 1, 2, 2), fill=bad)


def test_upscale_is_nearest_neighbour():
    image = torch.arange(6, dtype=torch.uint8).view(2, 3, 1)
    big = upscale(image, 3)
    assert big.shape == (6, 9, 1)
    assert torch.equal(big[::3, ::3], image) and torch.equal(big[2::3, 2::3], image)
    assert torch.equal(big[3:6, 6:9, 0], torch.full((3, 3), 5, dtype=torch.uint8))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError):
            upscale(image, bad)


def test_difference_images_amplify_and_clamp():
    reference = torch.zeros(1, 1, 1, 4)
    images = torch.tensor([0.0, 0.1, -0.25, 0.9]).view(1, 1, 1, 4)
    diff = difference_images(images, reference, gain=4)
    # 4·|Δ| on the image scale: 0 → -1 (black), 0.1 → -0.6, 0.25 → 0, 0.9 → clamped to 1 (white).
    assert torch.allclose(diff.flatten(), torch.tensor([-1.0, -0.6, 0.0, 1.0]))
    one = torch.ones(1, 1, 1, 1)
    assert torch.equal(difference_images(5 * one, one), -one)  # clamped to [-1, 1] first, as the metrics do
    with pytest.raises(ValueError):
        difference_images(images, torch.zeros(1, 1, 1, 3))
    with pytest.raises(ValueError):
        difference_images(images, reference, gain=0)


def _labelled_rows():
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(3, 1, 5, 4, generator=gen) * 2 - 1 for _ in range(2)]


def test_labelled_grid_size_labels_and_pixels(tmp_path):
    import matplotlib.image

    rows, scale, padding = _labelled_rows(), 4, 2
    fig = labelled_grid_figure(rows, ["uncached", "|FORA N=3 − uncached| ×4"], ["T-shirt/top", "Trouser", "Bag"],
                               scale=scale, padding=padding)
    texts = [t.get_text() for t in fig.texts]
    assert texts == ["uncached", "|FORA N=3 − uncached| ×4", "T-shirt/top", "Trouser", "Bag"]
    width, height = (int(round(v)) for v in fig.get_size_inches() * fig.dpi)
    grid = upscale(image_grid(torch.cat(rows), columns=3, padding=padding, fill=255), scale)
    assert grid.shape[:2] == ((2 * (5 + padding) + padding) * scale, (3 * (4 + padding) + padding) * scale)
    assert width > grid.shape[1] + 40 and height > grid.shape[0]  # margins for the row and column labels
    # Row labels sit left of the grid, right-aligned; column labels above it, centred on their columns.
    assert all(t.get_horizontalalignment() == "right" for t in fig.texts[:2])
    xs = [t.get_position()[0] * width for t in fig.texts[2:]]
    assert xs[1] - xs[0] == pytest.approx((4 + padding) * scale) and xs[2] - xs[1] == pytest.approx(xs[1] - xs[0])
    path = tmp_path / "grid.png"
    assert write_labelled_grid(path, rows, ["uncached", "|FORA N=3 − uncached| ×4"], ["T-shirt/top", "Trouser",
                                                                                       "Bag"]) is True
    pixels = matplotlib.image.imread(path)  # float RGBA [H, W, 4]
    assert pixels.shape[:2] == (height, width) and fig.dpi == LABEL_DPI
    # The grid is placed unresampled, bottom-aligned above the bottom margin and right of the labels.
    left = width - 6 - grid.shape[1]
    top = height - 6 - grid.shape[0]
    shown = torch.from_numpy((pixels[top:top + grid.shape[0], left:left + grid.shape[1], 0] * 255).round())
    assert torch.equal(shown.to(torch.uint8), grid[..., 0])


def test_labelled_grid_refuses_mismatched_labels():
    rows = _labelled_rows()
    with pytest.raises(ValueError, match="one label per row"):
        labelled_grid_figure(rows, ["one"])
    with pytest.raises(ValueError, match="one label per column"):
        labelled_grid_figure(rows, ["a", "b"], ["x"])
    with pytest.raises(ValueError, match="every row"):
        labelled_grid_figure([rows[0], rows[1][:2]], ["a", "b"])


def test_labelled_grid_without_matplotlib_writes_the_same_pixels_unlabelled(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    rows = _labelled_rows()
    assert write_labelled_grid(tmp_path / "g.png", rows, ["a", "b"], ["x", "y", "z"], scale=2) is False
    decoded, _ = decode_png((tmp_path / "g.png").read_bytes())
    assert torch.equal(decoded, upscale(image_grid(torch.cat(rows), columns=3, fill=255), 2))
