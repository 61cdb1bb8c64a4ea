"""``eoc sample --out X.npz`` (docs/DESIGN.md §4.11): the ADM evaluator's layout, per-batch parts, a rerun
that resumes to the same array, a rerun with other settings refused."""

import os

import numpy as np
import pytest
import torch

from eoc_dit import DDIMSampler, sample_pairs
from eoc_dit.cli import main
from eoc_dit.models import DiT_models
from eoc_dit.sample_files import parts_folder, to_uint8_images

COMMON = ["sample", "--model", "DiT-S/8", "--input-size", "16", "--in-channels", "1", "--num-classes", "4",
          "--steps", "3", "--labels", "0-2", "--seeds", "1-3", "--batch-size", "2"]


def test_to_uint8_images_is_dits_conversion():
    x = torch.tensor([-1.5, -1.0, -0.001, 0.0, 0.5, 0.999, 1.0, 2.0]).view(1, 2, 1, 4)
    images = to_uint8_images(x)
    assert images.dtype == np.uint8 and images.shape == (1, 1, 4, 2)
    expected = np.clip(127.5 * x.numpy() + 128.0, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(images, expected) and images.max() == 255 and images.min() == 0


def test_npz_layout_resume_and_refusal(tmp_path, capsys):
    out = tmp_path / "samples.npz"
    assert main([*COMMON, "--out", os.fspath(out)]) == 0
    arr = np.load(out)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (9, 16, 16, 1)
    torch.manual_seed(0)  # the CLI's random-init model: --init-seed 0
    model = DiT_models["DiT-S/8"](input_size=16, in_channels=1, num_classes=4).eval()
    pairs = [(label, seed) for label in range(3) for seed in range(1, 4)]
    assert np.array_equal(arr, to_uint8_images(sample_pairs(model, DDIMSampler(3), pairs, batch_size=2)))
    folder = parts_folder(os.fspath(out))
    parts = sorted(name for name in os.listdir(folder) if name.startswith("batch-"))
    assert len(parts) == 5  # ceil(9 / 2)
    for name in parts[1:3]:
        os.remove(os.path.join(folder, name))
    os.remove(out)
    open(os.path.join(folder, parts[1] + ".rank0.tmp"), "wb").close()  # a part a killed run left unfinished
    capsys.readouterr()
    assert main([*COMMON, "--out", os.fspath(out)]) == 0
    assert "3 batches kept" in capsys.readouterr().out
    assert np.array_equal(np.load(out)["arr_0"], arr)
    assert main([*COMMON[:-2], "--batch-size", "3", "--out", os.fspath(out)]) == 2  # other settings
    err = capsys.readouterr().err
    assert "other settings" in err and "batch_size" in err


def test_npz_needs_images(tmp_path, capsys):
    args = [*COMMON, "--out", os.fspath(tmp_path / "x.npz")]
    args[args.index("--in-channels") + 1] = "4"
    assert main(args) == 2
    assert "ADM .npz holds images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--out"])
