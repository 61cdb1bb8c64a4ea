"""The ``eoc`` command line: ``eoc_dit.cli.main`` in-process, and the installed console script once.

The model is a random-init DiT-S/8 on 16×16×1 inputs (4 tokens, 4 classes, 3 DDIM steps): small enough
that calibration takes about a second. Its init zeroes adaLN (every block is the identity), so the
tests that compare outputs use a checkpoint of the same config with every weight re-drawn.
"""

import os
import re
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from eoc_dit import DDIMSampler, DiT_models, Prior, cli, load_dit, noise_for_seed
from eoc_dit.cli import _int_list, build_parser, main
from eoc_dit.errors import InputFileNotFoundError, InputTypeError, InputValueError
from eoc_dit.images import image_grid
from eoc_dit.testbed import ASSETS
from tests.eoc_dit.test_images import decode_png
from tests.eoc_dit.test_testbed import write_idx

MODEL = ["--model", "DiT-S/8", "--input-size", "16", "--in-channels", "1", "--num-classes", "4"]
RUN = ["--steps", "3", "--labels", "0-1", "--seeds", "0", "1"]
NUM_PAIRS = 4


def _ok(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err
    return out, err


def _fails(capsys, argv, match=None):
    """main(argv) returns 2 and prints exactly one line, 'eoc <cmd>: error: ...', to stderr."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    lines = err.splitlines()  # splits on the '\r' of a progress bar too
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith(f"eoc {argv[0]}: error: "), lines[0]
    assert "Traceback" not in err
    if match is not None:
        assert re.search(match, lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def prior_path(tmp_path_factory):
    """A 3-step CFG prior made by `eoc calibrate` (the calibrate test checks its contents)."""
    path = tmp_path_factory.mktemp("prior") / "p.safetensors"
    argv = ["calibrate", *MODEL, *RUN, "--holdout", "0.5", "--max-gap", "2", "--cfg-scale", "2", "--out", str(path)]
    assert main(argv) == 0
    return path


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    """A DiT-S/8 state dict (16×16×1, 4 classes) whose weights are all random, so blocks do something."""
    torch.manual_seed(0)
    model = DiT_models["DiT-S/8"](input_size=16, in_channels=1, num_classes=4)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if not p.requires_grad:
                continue  # the frozen position embedding
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
            else:
                p.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "dit.pt"
    torch.save(model.state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------------- help
def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: eoc")
    assert "calibrate" in out and "sample" in out


@pytest.mark.parametrize("command", ["calibrate", "sample"])
def test_subcommand_help(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: eoc {command}")
    for option in ("--model", "--checkpoint", "--steps", "--cfg-scale", "--labels", "--seeds", "--out"):
        assert option in out
    if command == "sample":
        assert "--schedule" in out and "--mode" in out and "--prior" in out
    else:
        assert "--max-gap" in out and "--holdout" in out


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", *MODEL])  # --out is required
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["sample", *MODEL, "--mode", "momentum", "--out", "x.npy"])
    assert exc.value.code == 2


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "eoc")
    if not os.path.exists(script):
        script = shutil.which("eoc")
    assert script is not None, "the 'eoc' console script is not installed"
    result = subprocess.run([script, "--help"], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: eoc")
    assert "calibrate" in result.stdout and "sample" in result.stdout


# ---------------------------------------------------------------------------------------------- calibrate
def test_calibrate_writes_a_loadable_prior(prior_path, capsys):
    prior = Prior.load(prior_path)
    assert prior.num_steps == 3
    assert prior.cfg_scale == 2.0
    assert prior.num_halves == 2 and prior.uses_cfg
    assert prior.max_gap == 2
    assert prior.num_samples + prior.num_holdout == NUM_PAIRS
    assert prior.num_samples == 2 and prior.num_holdout == 2
    assert prior.num_blocks == 12 and prior.num_tokens == 4 and prior.width == 384
    assert prior.sampler == "ddim"
    assert prior.mean.dtype == torch.float16  # the default --dtype


def test_calibrate_float32_and_message(tmp_path, capsys):
    path = tmp_path / "p32.safetensors"
    out, _ = _ok(capsys, ["calibrate", *MODEL, "--steps", "2", "--labels", "0", "--seeds", "0",
                          "--holdout", "0", "--max-gap", "1", "--dtype", "float32", "--out", str(path)])
    assert f"written to {path}" in out
    prior = Prior.load(path)
    assert prior.mean.dtype == torch.float32
    assert (prior.num_steps, prior.num_halves, prior.num_samples, prior.num_holdout) == (2, 1, 1, 0)


# ---------------------------------------------------------------------------------------------- sample
def test_sample_extrapolate_npy_and_png(tmp_path, capsys):
    npy, png = tmp_path / "s.npy", tmp_path / "s.png"
    args = ["sample", *MODEL, *RUN, "--schedule", "fora:2", "--mode", "extrapolate"]
    out, _ = _ok(capsys, [*args, "--out", str(npy)])
    samples = np.load(npy)
    assert samples.shape == (NUM_PAIRS, 1, 16, 16) and samples.dtype == np.float32
    assert np.isfinite(samples).all()
    assert f"{NUM_PAIRS} samples" in out and "extrapolate" in out and str(npy) in out

    _ok(capsys, [*args, "--out", str(png)])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (NUM_PAIRS * (16 + 2) + 2, 16 + 2 + 2)  # one row of 4, padding 2
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29]) & 0xFFFFFFFF
    pixels, header = decode_png(data)  # every chunk CRC, the inflated rows
    assert header["color"] == 0
    assert torch.equal(pixels, image_grid(torch.from_numpy(samples)))


def test_sample_delta_with_prior(prior_path, tmp_path, capsys):
    path = tmp_path / "d.npy"
    out, _ = _ok(capsys, ["sample", *MODEL, *RUN, "--schedule", "fora:2", "--mode", "delta", "--prior", str(prior_path),
                          "--cfg-scale", "2", "--out", str(path)])
    assert np.load(path).shape == (NUM_PAIRS, 1, 16, 16)
    assert "delta" in out


def test_sample_trend_with_prior_and_theta(prior_path, tmp_path, capsys):
    path = tmp_path / "t.npy"
    _ok(capsys, ["sample", *MODEL, *RUN, "--schedule", "fora:2:1", "--mode", "trend", "--theta", "0.5",
                 "--prior", str(prior_path), "--cfg-scale", "2", "--batch-size", "3", "--out", str(path)])
    assert np.load(path).shape == (NUM_PAIRS, 1, 16, 16)


def test_sample_taylorseer_order_2_needs_no_prior_and_differs_from_order_1(checkpoint_path, tmp_path, capsys):
    # 7 steps of FORA N=2 compute 0, 2, 4, 6: step 5 has three computed features, so order 2 has its term there
    paths = [tmp_path / f"ts{order}.npy" for order in (1, 2)]
    for order, path in zip((1, 2), paths):
        _ok(capsys, ["sample", "--checkpoint", str(checkpoint_path), "--steps", "7", "--labels", "0-1", "--seeds", "0",
                     "1", "--schedule", "fora:2", "--mode", "taylorseer", "--order", str(order), "--out", str(path)])
    first, second = (np.load(path) for path in paths)
    assert first.shape == second.shape == (NUM_PAIRS, 1, 16, 16) and not np.array_equal(first, second)


def test_sample_schedule_none_runs(tmp_path, capsys):
    path = tmp_path / "n.npy"
    out, _ = _ok(capsys, ["sample", *MODEL, *RUN, "--schedule", "none", "--out", str(path)])
    assert np.load(path).shape == (NUM_PAIRS, 1, 16, 16)
    assert "caching level 0.00" in out


def test_checkpoint_schedule_none_equals_uncached_sampling(checkpoint_path, tmp_path, capsys):
    """With a real (non-identity) model: --schedule none is the plain sampler; fora:2 changes the result;
    --batch-size does not."""
    none, fora, small = tmp_path / "none.npy", tmp_path / "fora.npy", tmp_path / "small.npy"
    base = ["sample", "--checkpoint", str(checkpoint_path), *RUN, "--cfg-scale", "1.5"]
    _ok(capsys, [*base, "--schedule", "none", "--out", str(none)])
    _ok(capsys, [*base, "--schedule", "fora:2", "--out", str(fora)])
    _ok(capsys, [*base, "--schedule", "none", "--batch-size", "1", "--out", str(small)])

    model = load_dit(checkpoint_path)
    pairs = [(label, seed) for label in (0, 1) for seed in (0, 1)]
    noise = torch.cat([noise_for_seed(model, seed) for _, seed in pairs])
    labels = torch.tensor([label for label, _ in pairs])
    reference = DDIMSampler(3).sample(model, noise, labels, cfg_scale=1.5).numpy()
    assert np.isfinite(reference).all()
    # Three DDIM steps of a random model: x0 = (x - sqrt(1 - a)·eps) / sqrt(a) reaches hundreds.
    np.testing.assert_allclose(np.load(none), reference, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(np.load(small), reference, rtol=1e-5, atol=1e-3)  # other matmul shapes
    assert np.abs(np.load(fora) - reference).max() > 2e-2  # caching really happened (~0.05; batching noise ~3e-4)


def test_checkpoint_and_a_prior_made_from_it(checkpoint_path, tmp_path, capsys):
    prior = tmp_path / "ck.safetensors"
    _ok(capsys, ["calibrate", "--checkpoint", str(checkpoint_path), "--steps", "3", "--labels", "0",
                 "--seeds", "0", "1", "--holdout", "0.5", "--max-gap", "2", "--out", str(prior)])
    out = tmp_path / "ck.npy"
    _ok(capsys, ["sample", "--checkpoint", str(checkpoint_path), "--model", "DiT-S/8", "--steps", "3", "--labels", "0",
                 "--seeds", "5", "--schedule", "fora:2", "--mode", "delta", "--prior", str(prior), "--out", str(out)])
    assert np.load(out).shape == (1, 1, 16, 16)


# ---------------------------------------------------------------------------------------------- errors
SAMPLE = ["sample", *MODEL, *RUN]


@pytest.mark.parametrize("schedule", ["fora:x", "foo", "fora", "fora:2:1:1", "fora:0", "fora:2:-1", ""])
def test_bad_schedule(capsys, tmp_path, schedule):
    _fails(capsys, [*SAMPLE, "--schedule", schedule, "--out", str(tmp_path / "s.npy")])
    assert not (tmp_path / "s.npy").exists()


def test_bad_schedule_names_the_option(capsys, tmp_path):
    _fails(capsys, [*SAMPLE, "--schedule", "fora:x", "--out", str(tmp_path / "s.npy")], match="--schedule.*'fora:x'")


@pytest.mark.parametrize("mode", ["trend", "delta"])
def test_prior_mode_without_prior(capsys, tmp_path, mode):
    _fails(capsys, [*SAMPLE, "--schedule", "fora:2", "--mode", mode, "--out", str(tmp_path / "s.npy")], match="prior")


def test_missing_prior_file(capsys, tmp_path):
    missing = tmp_path / "missing.safetensors"
    _fails(capsys, [*SAMPLE, "--mode", "delta", "--prior", str(missing), "--out", str(tmp_path / "s.npy")],
           match="not found")


def test_corrupt_prior_file(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(256))
    _fails(capsys, [*SAMPLE, "--mode", "delta", "--prior", str(bad), "--out", str(tmp_path / "s.npy")])


@pytest.mark.parametrize("command", ["sample", "calibrate"])
def test_output_folder_missing(capsys, tmp_path, command):
    out = tmp_path / "no" / "such" / ("s.npy" if command == "sample" else "p.safetensors")
    _fails(capsys, [command, *MODEL, *RUN, "--out", str(out)], match="cannot write")


def test_output_folder_is_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    _fails(capsys, [*SAMPLE, "--out", str(tmp_path / "file" / "s.npy")], match="cannot write")


def test_output_folder_not_writable(capsys, tmp_path, monkeypatch):
    # Root (as on CI) can write into a read-only folder, so the permission answer is simulated.
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access",
                        lambda path, mode: False if os.fspath(path) == str(folder) else real_access(path, mode))
    _fails(capsys, [*SAMPLE, "--out", str(folder / "s.npy")], match="not writable")


@pytest.mark.parametrize("name", ["s.jpg", "s", "s.NPY.txt"])
def test_bad_output_extension(capsys, tmp_path, name):
    _fails(capsys, [*SAMPLE, "--out", str(tmp_path / name)], match=r"\.npy or \.png")


@pytest.mark.parametrize("command", ["sample", "calibrate"])
def test_no_model_and_no_checkpoint(capsys, tmp_path, command):
    _fails(capsys, [command, *RUN, "--out", str(tmp_path / "s.npy")], match="--checkpoint")


def test_unknown_model_name(capsys, tmp_path):
    _fails(capsys, ["sample", "--model", "DiT-Q/3", *RUN, "--out", str(tmp_path / "s.npy")], match="DiT-Q/3")


def test_prior_steps_mismatch(prior_path, capsys, tmp_path):
    argv = ["sample", *MODEL, "--steps", "4", "--labels", "0", "--seeds", "0", "--schedule", "fora:2",
            "--mode", "delta", "--prior", str(prior_path), "--cfg-scale", "2", "--out", str(tmp_path / "s.npy")]
    _fails(capsys, argv, match="num_steps mismatch.*3.*4")


def test_prior_cfg_mismatch(prior_path, capsys, tmp_path):
    argv = ["sample", *MODEL, "--steps", "3", "--labels", "0", "--seeds", "0", "--schedule", "fora:2",
            "--mode", "delta", "--prior", str(prior_path), "--out", str(tmp_path / "s.npy")]  # --cfg-scale 1
    _fails(capsys, argv, match="cfg mismatch")


def test_prior_model_mismatch(prior_path, capsys, tmp_path):
    argv = ["sample", "--model", "DiT-S/4", "--input-size", "16", "--in-channels", "1", "--num-classes", "4",
            "--steps", "3", "--labels", "0", "--seeds", "0", "--mode", "delta", "--prior", str(prior_path),
            "--cfg-scale", "2", "--out", str(tmp_path / "s.npy")]
    _fails(capsys, argv, match="mismatch")


@pytest.mark.parametrize("command", ["sample", "calibrate"])
def test_corrupt_checkpoint(capsys, tmp_path, command):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _fails(capsys, [command, "--checkpoint", str(bad), *RUN, "--out", str(tmp_path / "s.npy")], match="bad.pt")


def test_missing_checkpoint(capsys, tmp_path):
    _fails(capsys, [*SAMPLE[:1], "--checkpoint", str(tmp_path / "none.pt"), *RUN, "--out", str(tmp_path / "s.npy")],
           match="not found")


@pytest.mark.parametrize("extra, match", [
    (["--labels", "7"], r"--labels must lie in \[0, 4\)"),
    (["--labels", "3-1"], "--labels.*empty"),
    (["--labels", "a"], "--labels.*'a'"),
    (["--seeds", ","], "--seeds.*no numbers"),
    (["--batch-size", "0"], "--batch-size"),
    (["--device", "nonsense"], "--device 'nonsense'"),
    (["--steps", "0"], "num_steps"),
    (["--input-size", "15"], "divisible"),
    (["--mode", "extrapolate", "--theta", "nan"], "theta"),
    (["--mode", "extrapolate", "--order", "2"], "--order and --sigma are for --mode taylorseer / hicache"),
    (["--mode", "taylorseer", "--sigma", "0.5"], "--sigma is for --mode hicache"),
    (["--mode", "taylorseer", "--order", "4"], "order"),
])
def test_other_sample_errors(capsys, tmp_path, extra, match):
    _fails(capsys, [*SAMPLE, *extra, "--out", str(tmp_path / "s.npy")], match=match)
    assert not (tmp_path / "s.npy").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capsys, tmp_path):
    _fails(capsys, [*SAMPLE, "--device", "cuda", "--out", str(tmp_path / "s.npy")], match="CUDA is not available")


def test_png_of_a_4_channel_model_fails_before_sampling(capsys, tmp_path):
    argv = ["sample", "--model", "DiT-S/8", "--input-size", "16", "--in-channels", "4", "--num-classes", "4",
            *RUN, "--out", str(tmp_path / "s.png")]
    _fails(capsys, argv, match="1- or 3-channel")
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("extra, match", [
    (["--labels", "9"], r"labels must lie in \[0, 4\)"),
    (["--holdout", "0.1", "--labels", "0", "--seeds", "0"], "holdout"),
    (["--max-gap", "0"], "max_gap"),
    (["--cfg-scale", "0.5"], "cfg_scale"),
])
def test_calibrate_errors(capsys, tmp_path, extra, match):
    _fails(capsys, ["calibrate", *MODEL, *RUN, *extra, "--out", str(tmp_path / "p.safetensors")], match=match)
    assert not (tmp_path / "p.safetensors").exists()


# ---------------------------------------------------------------------------------------------- _int_list
@pytest.mark.parametrize("values, expected", [
    (["0-3"], [0, 1, 2, 3]),
    (["1,2"], [1, 2]),
    (["0", "5-6"], [0, 5, 6]),
    (["0 "], [0]),
    (["3-3"], [3]),
    (["1,", ",2"], [1, 2]),
    (["-2"], [-2]),
    (["-3--1"], [-3, -2, -1]),
    (["-1-1"], [-1, 0, 1]),
    (["2,0-1", "2"], [2, 0, 1, 2]),  # order and repeats are kept
])
def test_int_list(values, expected):
    assert _int_list(values) == expected


@pytest.mark.parametrize("values", [["3-1"], ["a"], ["1-a"], ["1.5"], ["1--"], [","], [""], ["0-1-2"]])
def test_int_list_rejects(values):
    with pytest.raises(ValueError):
        _int_list(values, "--labels")


def test_calibrate_with_fit_then_sample_calibrated(capsys, tmp_path, checkpoint_path):
    model_args = ["--checkpoint", str(checkpoint_path)]
    prior = tmp_path / "fitted.safetensors"
    out, _ = _ok(capsys, ["calibrate", *model_args, *RUN, "--holdout", "0.5", "--cfg-scale", "2", "--fit", "fora:2",
                          "--out", str(prior)])
    assert "fitted FORASchedule(interval=2" in out
    assert len(Prior.load(prior).fits) == 1
    _ok(capsys, ["sample", *model_args, *RUN, "--cfg-scale", "2", "--schedule", "fora:2", "--mode", "calibrated",
                 "--prior", str(prior), "--out", str(tmp_path / "s.npy")])
    _fails(capsys, ["sample", *model_args, *RUN, "--cfg-scale", "2", "--schedule", "fora:3", "--mode", "calibrated",
                    "--prior", str(prior), "--out", str(tmp_path / "s.npy")], match="no coefficients fitted")
    _fails(capsys, ["calibrate", *model_args, *RUN, "--fit", "fora:x", "--out", str(prior)], match="--schedule|fora")


def test_fit_adds_fits_to_a_prior(capsys, tmp_path, checkpoint_path, prior_path):
    model_args = ["--checkpoint", str(checkpoint_path)]
    out = tmp_path / "fitted.safetensors"
    printed, _ = _ok(capsys, ["fit", *model_args, *RUN, "--cfg-scale", "2", "--prior", str(prior_path),
                              "--schedules", "fora:2", "--terms", "extrapolate", "--out", str(out)])
    assert "fitted FORASchedule(interval=2" in printed
    fit = Prior.load(out).fits[0]
    assert fit.info["terms"] == ["extrapolate"] and (fit.coef[..., 0] == 0).all() and (fit.coef[..., 2] == 0).all()
    _fails(capsys, ["fit", *model_args, *RUN, "--prior", str(prior_path), "--schedules", "fora:2",
                    "--terms", "momentum", "--out", str(out)], match="--terms")
    _fails(capsys, ["fit", *model_args, "--steps", "4", "--labels", "0", "--prior", str(prior_path),
                    "--schedules", "fora:2", "--out", str(out)], match="num_steps mismatch")
    _fails(capsys, ["fit", *model_args, *RUN, "--prior", str(prior_path), "--schedules", "fora:2", "--gains", "1", "-1",
                    "--out", str(out)], match="--gains must be >= 0")
    _fails(capsys, ["fit", *model_args, *RUN, "--prior", str(prior_path), "--schedules", "fora:2", "--anchors",
                    "taylorseer:x", "--out", str(out)], match="taylorseer:x")


def test_fit_tunes_the_gain_on_tune_seeds(capsys, tmp_path, checkpoint_path, prior_path):
    out = tmp_path / "fitted.safetensors"
    printed, _ = _ok(capsys, ["fit", "--checkpoint", str(checkpoint_path), *RUN, "--cfg-scale", "2", "--prior",
                              str(prior_path), "--schedules", "fora:3", "--refine", "blend", "--gains", "0.5", "1",
                              "--anchors", "plain", "extrapolate", "--tune-seeds", "7", "--tune-clamp", "-1", "1",
                              "--out", str(out)])
    info = Prior.load(out).fits[0].info
    assert info["tune_clamp"] == [-1.0, 1.0] and info["anchor"] in ("plain", "extrapolate")
    assert {"0", "1"} <= set(info["tune_score_db"]) <= {"0", "0.5", "1"} and info["tune_samples"] == 2  # labels 0-1 x 7
    assert info["gain"] == max((float(g) for g in info["tune_score_db"]), key=lambda g: info["tune_score_db"][f"{g:g}"])
    assert f"anchor {info['anchor']}, refine blend, gain {info['gain']:.3g}" in printed


def test_sample_with_a_prior_defaults_to_calibrated(capsys, tmp_path, prior_path):
    # The CLI's prior has no fit for fora:5: the default (calibrated) says so; --mode none samples plainly.
    args = ["sample", *MODEL, *RUN, "--cfg-scale", "2", "--prior", str(prior_path), "--schedule", "fora:5",
            "--out", str(tmp_path / "x.npy")]
    _fails(capsys, args, match="no coefficients fitted for FORASchedule\\(interval=5")
    printed, _ = _ok(capsys, args + ["--mode", "none"])
    assert "EOC none" in printed


# ---------------------------------------------------------------------------------------------- input errors vs bugs
@pytest.mark.parametrize("error", [InputValueError, InputTypeError, InputFileNotFoundError])
def test_every_input_error_type_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch, error):
    def bad(text):
        raise error(f"bad schedule {text!r}")

    monkeypatch.setattr(cli, "_parse_schedule", bad)
    _fails(capsys, [*SAMPLE, "--schedule", "fora:2", "--out", str(tmp_path / "s.npy")], match="bad schedule 'fora:2'")


@pytest.mark.parametrize("error", [ValueError, TypeError, FileNotFoundError, PermissionError, OSError, RuntimeError,
                                   KeyError])
def test_a_bug_is_not_turned_into_an_input_error(capsys, tmp_path, monkeypatch, error):
    """Only eoc_dit.errors.InputError is the caller's mistake; anything else (a plain ValueError from deep
    inside, an OSError) is a bug or an environment failure and propagates with its traceback."""
    def broken(text):
        raise error("internal failure")

    monkeypatch.setattr(cli, "_parse_schedule", broken)
    with pytest.raises(error, match="internal failure"):
        main([*SAMPLE, "--schedule", "fora:2", "--out", str(tmp_path / "s.npy")])
    assert "error:" not in capsys.readouterr().err


def _python(code, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env)


def test_a_bug_in_a_subprocess_shows_a_traceback_and_exits_1(tmp_path):
    code = ("import sys, eoc_dit.cli as cli\n"
            "def broken(args):\n    raise RuntimeError('a bug in the planner')\n"
            "cli._make_sampler = broken\n"
            f"sys.exit(cli.main({[*SAMPLE, '--out', str(tmp_path / 's.npy')]!r}))\n")
    result = _python(code, tmp_path)
    assert result.returncode == 1, result
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == "RuntimeError: a bug in the planner"
    assert not (tmp_path / "s.npy").exists()


def test_an_input_error_in_a_subprocess_is_one_line_and_exits_2(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "eoc")
    argv = [script] if os.path.exists(script) else [sys.executable, "-m", "eoc_dit.cli"]
    result = subprocess.run([*argv, *SAMPLE, "--schedule", "fora:x", "--out", str(tmp_path / "s.npy")], check=False,
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()] \
        and result.stderr.startswith("eoc sample: error: --schedule")


# --------------------------------------------------------------------------------------------- outputs checked up front
def test_output_is_an_existing_folder(capsys, tmp_path):
    (tmp_path / "s.npy").mkdir()
    _fails(capsys, [*SAMPLE, "--out", str(tmp_path / "s.npy")], match="is a folder")
    _fails(capsys, ["calibrate", *MODEL, *RUN, "--out", str(tmp_path)], match="is a folder")
    _fails(capsys, ["demo", "--samples", "2", "--out", str(tmp_path)], match="is a folder")


def _deny_writes_to(monkeypatch, *paths):
    # Root (as on CI) can write anything, so the permission answer is simulated.
    denied = {str(p) for p in paths}
    real_access = os.access
    monkeypatch.setattr(os, "access",
                        lambda path, mode: False if os.fspath(path) in denied else real_access(path, mode))


def test_output_file_exists_and_is_not_writable(capsys, tmp_path, monkeypatch):
    out = tmp_path / "s.npy"
    out.write_bytes(b"old")
    _deny_writes_to(monkeypatch, out)
    _fails(capsys, [*SAMPLE, "--out", str(out)], match="exists and is not writable")
    assert out.read_bytes() == b"old"


def test_demo_output_not_writable(capsys, tmp_path, monkeypatch):
    _deny_writes_to(monkeypatch, tmp_path)
    _fails(capsys, ["demo", "--samples", "2", "--out", str(tmp_path / "grid.png")], match="not writable")


def test_evaluate_output_checks(capsys, tmp_path, monkeypatch):
    _fails(capsys, ["evaluate", "--out-dir", str(tmp_path / "missing")], match="--out-dir.*not a writable folder")
    (tmp_path / "grid.png").mkdir()
    _fails(capsys, ["evaluate", "--out-dir", str(tmp_path)], match="grid.png: it is a folder")
    (tmp_path / "grid.png").rmdir()
    (tmp_path / "results.csv").write_text("old")
    _deny_writes_to(monkeypatch, tmp_path / "results.csv")
    _fails(capsys, ["evaluate", "--out-dir", str(tmp_path)], match="results.csv: the file exists and is not writable")
    monkeypatch.undo()
    _fails(capsys, ["evaluate", "--out-dir", str(tmp_path), "--batch-size", "0"], match="--batch-size must be >= 1")


def test_evaluate_sweep_outputs_and_resume_are_checked_before_sampling(capsys, tmp_path, monkeypatch):
    from eoc_dit.testbed import demo

    def never(*args, **kwargs):
        raise AssertionError("sampled before the checks")

    monkeypatch.setattr(demo, "sample_method", never)
    (tmp_path / "quality_vs_speed.png").mkdir()
    _fails(capsys, ["evaluate", "--out-dir", str(tmp_path)], match="quality_vs_speed.png: it is a folder")
    (tmp_path / "quality_vs_speed.png").rmdir()
    (tmp_path / "results.csv").write_text("old")  # not written by a resumable sweep
    _fails(capsys, ["evaluate", "--out-dir", str(tmp_path), "--resume"], match="--resume: .*sweep.json is missing")
    _fails(capsys, ["evaluate", "--out-dir", str(tmp_path), "--replot"], match="not a results CSV")
    _fails(capsys, ["evaluate", "--out-dir", str(tmp_path), "--methods", "extrapolate:x"],
           match="method 'extrapolate:x': theta must be a number")


def test_evaluate_help_names_the_sweep_options(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    for option in ("--methods", "--intervals", "--warmup-intervals", "--samples", "--resume", "--replot",
                   "taylorseer:ORDER", "hicache:ORDER[:SIGMA]"):
        assert option in out


@pytest.mark.parametrize("argv, match", [
    (["--seeds", str(2**64)], r"--seeds must lie in"),
    (["--seeds", str(-(2**63) - 1)], r"--seeds must lie in"),
    (["--init-seed", str(2**64)], r"--init-seed must lie in"),
    (["--input-size", "0"], "--input-size must be >= 1"),
    (["--in-channels", "0"], "--in-channels must be >= 1"),
    (["--num-classes", "0"], "--num-classes must be >= 1"),
])
def test_random_init_and_seed_checks(capsys, tmp_path, argv, match):
    _fails(capsys, [*SAMPLE, *argv, "--out", str(tmp_path / "s.npy")], match=match)
    _fails(capsys, ["calibrate", *MODEL, *RUN, *argv, "--out", str(tmp_path / "p.safetensors")], match=match)


def test_extreme_seeds_that_torch_accepts_work(capsys, tmp_path):
    out = tmp_path / "s.npy"
    _ok(capsys, ["sample", *MODEL, "--steps", "1", "--labels", "0", "--seeds", str(2**64 - 1), str(-(2**63)),
                 "--out", str(out)])
    assert np.load(out).shape == (2, 1, 16, 16)


# -------------------------------------------------------------------------------------- train-*: never into the package
def test_train_commands_write_into_the_current_folder_by_default(capsys):
    parser = build_parser()
    for command in ("train-testbed", "train-classifier"):
        assert parser.parse_args([command]).out == "."
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert "default: the current folder" in help_text, help_text


@pytest.fixture
def fake_fashion_mnist(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 128), ("t10k", 16)):
        write_idx(data / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    monkeypatch.setenv("EOC_FASHION_MNIST", str(data))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _assets_snapshot():
    return {name: os.stat(os.path.join(ASSETS, name)).st_mtime_ns for name in os.listdir(ASSETS)}


@pytest.mark.slow  # two real (tiny) training runs, about 3 s
def test_train_commands_leave_the_shipped_assets_alone(capsys, fake_fashion_mnist):
    before = _assets_snapshot()
    out, _ = _ok(capsys, ["train-testbed", "--iterations", "2", "--batch-size", "4"])
    assert "trained 2 iterations" in out and "-> ." in out
    assert sorted(os.listdir(fake_fashion_mnist)) == ["MODEL_CARD.json", "testbed_dit.pt"]
    out, _ = _ok(capsys, ["train-classifier", "--epochs", "1"])
    assert "classifier test accuracy" in out
    assert sorted(os.listdir(fake_fashion_mnist)) == ["CLASSIFIER_CARD.json", "MODEL_CARD.json", "classifier.pt",
                                                      "test_feature_stats.pt", "testbed_dit.pt"]
    assert _assets_snapshot() == before


@pytest.mark.parametrize("argv, match", [
    (["train-testbed", "--iterations", "0"], "--iterations must be >= 1"),
    (["train-testbed", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["train-testbed", "--max-minutes", "nan"], "--max-minutes must be >= 0"),
    (["train-classifier", "--epochs", "0"], "--epochs must be >= 1"),
    (["train-testbed", "--out", "missing"], "--out: cannot write to missing: not a writable folder"),
    (["train-classifier", "--out", "missing"], "--out: cannot write to missing: not a writable folder"),
])
def test_train_option_checks(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    _fails(capsys, argv, match=match)
    assert os.listdir(tmp_path) == []


def test_train_outputs_not_writable(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "testbed_dit.pt").mkdir()
    _fails(capsys, ["train-testbed"], match="testbed_dit.pt: it is a folder")
    (tmp_path / "classifier.pt").write_bytes(b"old")
    _deny_writes_to(monkeypatch, os.path.join(".", "classifier.pt"))
    _fails(capsys, ["train-classifier"], match="classifier.pt: the file exists and is not writable")


def test_a_bad_eoc_backend_is_an_input_error(capsys, monkeypatch, tmp_path):
    # $EOC_BACKEND is read by eoc_kernels; its error is the project's own input error: one line, exit 2,
    # before any sampling starts.
    monkeypatch.setenv("EOC_BACKEND", "bogus")
    _fails(capsys, ["sample", *MODEL, *RUN, "--schedule", "fora:2", "--mode", "extrapolate",
                    "--out", str(tmp_path / "s.npy")], match="unknown backend 'bogus'")
    assert not (tmp_path / "s.npy").exists()


def test_schedule_specs_include_taylorseers_own():
    from eoc_dit.cli import _parse_schedule
    from eoc_dit.schedules import FORASchedule, TaylorSeerSchedule

    schedule = _parse_schedule("taylorseer:4")
    assert isinstance(schedule, TaylorSeerSchedule) and schedule.interval == 4 and schedule.warmup_steps == 2
    assert torch.equal(schedule.mask(12, 2), FORASchedule(4, warmup=1).mask(12, 2))  # full steps 0, 1, 5, 9
    assert _parse_schedule("taylorseer:3:3").warmup_steps == 3
    with pytest.raises(ValueError, match="--schedule must be"):
        _parse_schedule("taylor:4")
