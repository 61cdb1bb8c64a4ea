"""Prior storage choices (docs/DESIGN.md §4.10): round trips, format errors, coefficient-only priors
applying exactly like full ones, the prior terms read per step, ``eoc prior convert``."""

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eoc_dit import DDIMSampler, EOCConfig, FORASchedule, apply_eoc, calibrate
from eoc_dit.cli import main
from eoc_dit.errors import InputValueError
from eoc_dit.fitting import fit_coefficients
from eoc_dit.prior import STAT_NAMES, Prior
from eoc_dit.prior_storage import FP8_MAX, DenseMeans, LowRankMeans, empty_means, encode_means, parse_storage
from eoc_dit.prior_terms import DELTA, TREND, PriorTerms
from tests.eoc_dit.tiny import make_tiny_dit

STEPS = 6
SHIPPED = os.path.join(os.path.dirname(__file__), "..", "..", "python", "eoc_dit", "testbed", "assets",
                       "testbed_prior_ddim20.safetensors")


@pytest.fixture(scope="module")
def model():
    return make_tiny_dit()


@pytest.fixture(scope="module")
def fitted(model):
    """A CFG prior of the tiny DiT with a calibrated fit for FORA N=2 (reads no means)."""
    sampler = DDIMSampler(STEPS)
    prior = calibrate(model, sampler, [0, 1], [1, 2, 3], cfg_scale=2.0, max_gap=2, holdout=0.34,
                      batch_size=3, progress=False)
    prior.add_fit(fit_coefficients(model, sampler, FORASchedule(2), prior, [0, 1], [4], gains=(1.0,),
                                   terms=("extrapolate",), progress=False))
    return prior


def run(model, prior, config, interval=2):
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), apply_eoc(model, FORASchedule(interval), prior, config):
        return DDIMSampler(STEPS).sample(model, noise, torch.tensor([0, 1, 2]), cfg_scale=2.0, progress=False)


# half an ulp relative, and half the subnormal step (fp16: 2^-24) absolute
@pytest.mark.parametrize("storage,bound,tiny", [("float32", 0.0, 0.0), ("float16", 2.0**-11, 2.0**-25),
                                                ("bfloat16", 2.0**-8, 0.0)])
def test_dense_round_trip_within_the_format(fitted, tmp_path, storage, bound, tiny):
    path = tmp_path / "p.safetensors"
    fitted.save(path, storage=storage)
    loaded = Prior.load(path)
    assert loaded.storage == storage
    err = (loaded.mean.float() - fitted.mean).abs()
    assert bool((err <= bound * fitted.mean.abs() + tiny).all())
    assert storage == "float32" or not torch.equal(loaded.mean.float(), fitted.mean)
    with safe_open(os.fspath(path), framework="pt") as f:
        assert "eoc_storage" not in f.metadata()  # the original layout: older readers read it


def test_fp8_round_trip_within_e4m3(fitted, tmp_path):
    path = tmp_path / "p.safetensors"
    fitted.save(path, storage="fp8")
    loaded = Prior.load(path)
    assert loaded.storage == "fp8" and loaded.means.values.dtype == torch.float8_e4m3fn
    scale = loaded.means.scale  # [T, L, 2]
    amax = fitted.mean.abs().flatten(3).amax(-1)
    torch.testing.assert_close(scale, amax / FP8_MAX)
    # e4m3 has 3 mantissa bits: half an ulp is 2^-4 relative for normals; below 2^-6 (subnormals) the
    # step is 2^-9 of the scale.
    err = (loaded.mean - fitted.mean).abs()
    bound = torch.maximum(fitted.mean.abs() * 2.0**-4, scale[..., None, None, None] * 2.0**-10)
    assert bool((err <= bound * (1 + 1e-6)).all())
    assert not torch.equal(loaded.mean, fitted.mean)  # really rounded
    again = tmp_path / "q.safetensors"
    loaded.save(again, storage="fp8")  # kept as stored
    assert torch.equal(Prior.load(again).means.values.view(torch.uint8), loaded.means.values.view(torch.uint8))


def test_lowrank_full_rank_is_exact_and_low_rank_truncates(fitted, tmp_path):
    full = LowRankMeans.encode(fitted.mean, STEPS)
    torch.testing.assert_close(full.dense(), fitted.mean, rtol=2e-3, atol=2e-3 * float(fitted.mean.abs().max()))
    path = tmp_path / "p.safetensors"
    fitted.save(path, storage="lowrank:2")
    loaded = Prior.load(path)
    assert loaded.storage == "lowrank:2"
    dense, entry = loaded.mean, loaded.mean_entry(3, 1, 0)
    torch.testing.assert_close(entry, dense[3, 1, 0])
    # the rank-2 error is the tail of the singular values, more than rank T's
    err_low = float((dense - fitted.mean).norm())
    err_full = float((full.dense() - fitted.mean).norm())
    assert err_full < err_low < float(fitted.mean.norm())


def test_coefficient_only_prior_applies_exactly_like_the_full_one(model, fitted, tmp_path):
    full = run(model, fitted, EOCConfig())
    for storage in ("coefficients", "statistics"):
        path = tmp_path / f"{storage}.safetensors"
        fitted.save(path, storage=storage)
        small = Prior.load(path)
        assert small.storage == storage and not small.has_means
        assert torch.equal(run(model, small, EOCConfig()), full)
    # extrapolate with the offline judgment reads the statistics only
    stats_only = Prior.load(tmp_path / "statistics.safetensors")
    assert torch.equal(run(model, stats_only, EOCConfig(mode="extrapolate")),
                       run(model, fitted, EOCConfig(mode="extrapolate")))
    assert os.path.getsize(tmp_path / "coefficients.safetensors") < 8192


def test_without_means_or_statistics_the_errors_say_so(model, fitted, tmp_path):
    fitted.save(tmp_path / "c.safetensors", storage="coefficients")
    coefficients = Prior.load(tmp_path / "c.safetensors")
    with pytest.raises(InputValueError, match="no judgment statistics"):
        run(model, coefficients, EOCConfig(mode="extrapolate"))
    with pytest.raises(InputValueError, match="stores no means"):
        run(model, coefficients, EOCConfig(mode="trend", min_gain=None))
    with pytest.raises(InputValueError, match="stores no means"):
        coefficients.with_storage("fp8")
    with_delta = Prior(fitted.means, fitted.stats, fitted.metadata, fits=[fitted.fits[0]])
    coef = with_delta.fits[0].coef.clone()
    coef[2, 0, 0, 0] = 0.5  # a fit that reads D
    with_delta.fits[0] = type(with_delta.fits[0])(with_delta.fits[0].mask, coef, {})
    with pytest.raises(InputValueError, match="reads the means"):
        with_delta.with_storage("coefficients")


@pytest.mark.parametrize("text", ["fp4", "lowrank", "lowrank:0", "lowrank:x", "lowrank:-1", ""])
def test_bad_storage_names(fitted, tmp_path, text):
    with pytest.raises(InputValueError, match="storage"):
        fitted.save(tmp_path / "p.safetensors", storage=text)
    assert not (tmp_path / "p.safetensors").exists()


def test_rank_above_the_steps_is_refused(fitted):
    with pytest.raises(InputValueError, match=r"\[1, 6\]"):
        fitted.with_storage("lowrank:7")
    assert parse_storage("BF16") == "bfloat16" and parse_storage("fp8_e4m3") == "fp8"


def _rewrite(path, out, change_tensors=None, change_meta=None):
    with safe_open(os.fspath(path), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    metadata.pop("eoc_checksum")
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        change_meta(metadata)
    save_file(tensors, os.fspath(out), metadata=metadata)


def test_bad_files_give_clear_errors(fitted, tmp_path):
    path, bad = tmp_path / "p.safetensors", tmp_path / "bad.safetensors"
    fitted.save(path, storage="fp8")

    def nan_scale(t):
        t["mean.scale"] = t["mean.scale"].clone()
        t["mean.scale"][0, 0, 0] = math.nan

    cases = [
        (lambda t: t.pop("mean.scale"), None, "lacks the tensor 'mean.scale'"),
        (lambda t: t.update({"mean.scale": -t["mean.scale"]}), None, "'mean.scale' must be > 0"),
        (nan_scale, None, "'mean.scale' holds 1 non-finite"),
        (lambda t: t.update({"mean.fp8": t["mean.fp8"].float()}), None, "'mean.fp8' has dtype"),
        (lambda t: t.update({"mean": t["mean.fp8"].float()}), None, "unknown tensors"),
        (None, lambda m: m.update({"eoc_storage": json.dumps({"means": "fp4", "statistics": True})}), "fp4"),
        (None, lambda m: m.update({"eoc_storage": json.dumps({"means": "fp8"})}), "exactly 'means'"),
        (None, lambda m: m.update({"eoc_storage": json.dumps({"means": "fp8", "statistics": 1})}), "true or false"),
        (None, lambda m: m.pop("eoc_storage"), "lacks the tensor 'mean'"),  # read as the original layout
    ]
    for tensors, meta, needle in cases:
        _rewrite(path, bad, tensors, meta)
        with pytest.raises(InputValueError, match=needle) as excinfo:
            Prior.load(bad)
        assert os.fspath(bad) in str(excinfo.value)
    with safe_open(os.fspath(path), framework="pt") as f:  # the checksum covers the storage key
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    metadata["eoc_storage"] = json.dumps({"means": "fp8", "statistics": True}, indent=1)
    save_file(tensors, os.fspath(bad), metadata=metadata)
    with pytest.raises(InputValueError, match="checksum"):
        Prior.load(bad)


def test_shipped_prior_loads_unchanged():
    prior = Prior.load(SHIPPED)
    assert prior.storage == "float16" and prior.has_statistics and isinstance(prior.means, DenseMeans)
    assert prior.mean.dtype == torch.float16 and set(prior.stats) == set(STAT_NAMES)
    assert torch.equal(prior.mean_entry(5, 2, 1), prior.mean[5, 2, 1].float())


def test_terms_per_step_are_the_terms_per_plan(model, fitted):
    config = EOCConfig(mode="trend", min_gain=None)
    reference = run(model, fitted, config, interval=3)
    fitted.term_residency = "step"
    try:
        assert torch.equal(run(model, fitted, config, interval=3), reference)
    finally:
        fitted.term_residency = "auto"
    terms = PriorTerms(fitted, residency="step")
    like = torch.empty(6, 16, 32)
    segment_a = type("S", (), {"step": 1, "start": 0, "stop": 1, "entries": (), "uses": lambda self, t: True})()
    terms.segment(DELTA, segment_a, like)
    held = terms.bytes
    segment_b = type("S", (), {"step": 2, "start": 0, "stop": 1, "entries": (), "uses": lambda self, t: True})()
    terms.segment(TREND, segment_b, like)
    assert terms.bytes == held  # step 1's term was dropped
    with pytest.raises(InputValueError, match="residency"):
        PriorTerms(fitted, residency="never")


def test_auto_residency_falls_back_to_per_step_on_out_of_memory(fitted, monkeypatch):
    terms = PriorTerms(fitted)
    assert terms.residency == "auto"
    like = torch.empty(6, 16, 32)
    segment = type("S", (), {"step": 1, "start": 0, "stop": 1, "entries": (), "uses": lambda self, t: True})()
    terms.segment(DELTA, segment, like)
    real, calls = PriorTerms._allocate, []

    def allocate(self, shape, like):
        calls.append(shape)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("out of memory (test)")
        return real(self, shape, like)

    monkeypatch.setattr(PriorTerms, "_allocate", allocate)
    segment2 = type("S", (), {"step": 2, "start": 0, "stop": 1, "entries": (), "uses": lambda self, t: True})()
    assert terms.segment(DELTA, segment2, like) is not None
    assert terms.residency == "step" and len(terms._segments) == 1 and len(calls) == 2


def test_meta_stores_count_bytes_without_memory():
    shape = (50, 28, 2, 2, 256, 1152)
    dense = empty_means("float16", shape)
    assert dense.nbytes == math.prod(shape) * 2
    assert empty_means("fp8", shape).nbytes == math.prod(shape) + 50 * 28 * 2 * 4
    assert empty_means("coefficients", shape) is None
    assert isinstance(encode_means(torch.zeros(2, 1, 2, 1, 3, 4), "fp8").dense(), torch.Tensor)


def test_cli_prior_convert(fitted, tmp_path, capsys):
    path, out = tmp_path / "p.safetensors", tmp_path / "c.safetensors"
    fitted.save(path)
    assert main(["prior", "convert", os.fspath(path), os.fspath(out), "--storage", "coefficients"]) == 0
    assert Prior.load(out).storage == "coefficients" and "coefficients" in capsys.readouterr().out
    assert main(["prior", "convert", os.fspath(out), os.fspath(path), "--storage", "fp8"]) == 2
    assert "stores no means" in capsys.readouterr().err
    assert main(["prior", "convert", os.fspath(path), os.fspath(out), "--storage", "int4"]) == 2
    assert "storage must be one of" in capsys.readouterr().err
    assert main(["prior", "convert", os.fspath(tmp_path / "none"), os.fspath(out), "--storage", "fp8"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_calibrate_storage(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    args = ["calibrate", "--model", "DiT-S/8", "--input-size", "16", "--in-channels", "1", "--num-classes", "4",
            "--steps", "3", "--labels", "0-1", "--seeds", "1-2", "--max-gap", "1", "--out", os.fspath(out)]
    assert main([*args, "--storage", "bf16"]) == 0
    assert Prior.load(out).storage == "bfloat16"
    assert main([*args, "--storage", "lowrank:4"]) == 2  # rank above T = 3, refused before sampling
    assert "[1, 3]" in capsys.readouterr().err
