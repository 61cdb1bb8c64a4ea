"""calibrate / Prior against a brute-force recomputation from recorded features (docs/DESIGN.md §2 "Prior",
"Judgment"), the prior file format and its validation, and calibrate's argument checks."""

import json
import math
import os
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

import eoc_dit.calibration as calibration_module
import eoc_dit.prior as prior_module
from eoc_dit import (
    DDIMSampler,
    DiT,
    EOCConfig,
    FORASchedule,
    Prior,
    apply_eoc,
    calibrate,
    model_fingerprint,
    noise_for_seed,
)
from eoc_dit.prior import STAT_NAMES
from tests.eoc_dit.tiny import make_tiny_dit

STEPS = 6
LABELS = [0, 1, 3]
SEEDS = [5, 6]
PAIRS = [(label, seed) for label in LABELS for seed in SEEDS]  # label-major, as calibrate orders them
TREND_EPS = 1e-3


@dataclass(frozen=True)
class Case:
    name: str
    cfg_scale: float
    holdout: float
    max_gap: int
    batch_size: int

    @property
    def num_halves(self):
        return 2 if self.cfg_scale > 1 else 1


CASES = [
    Case("cfg2-holdout", 2.0, 0.5, 3, 2),  # 3 fit, 3 held out; batches of 2 and 1
    Case("cfg1-holdout", 1.0, 0.34, 2, 4),  # round(2.04) = 2 held out
    Case("cfg2-noholdout", 2.0, 0.0, 2, 8),  # statistics on the fit pairs themselves
]
CFG2 = CASES[0]


def split(holdout):
    """(fit, held) pairs, reproduced from calibrate's documented split."""
    order = torch.randperm(len(PAIRS), generator=torch.Generator().manual_seed(0)).tolist()
    num_held = round(holdout * len(PAIRS))
    held = [PAIRS[i] for i in order[:num_held]]
    fit = [PAIRS[i] for i in order[num_held:]]
    return fit, (held or fit)


@pytest.fixture(scope="module")
def model():
    return make_tiny_dit()


@pytest.fixture(scope="module")
def features(model):
    """{cfg_scale: {(label, seed): F [T, L, 2, H, N, C] fp64}}: every uncached branch output, one
    sample per run (row 0 of the batch is the conditional half, row 1 the unconditional one)."""
    sampler = DDIMSampler(STEPS)
    L, N, C = len(model.blocks), model.num_tokens, model.hidden_size
    result = {}
    for cfg_scale in (1.0, 2.0):
        H = 2 if cfg_scale > 1 else 1
        per_pair = {}
        for label, seed in PAIRS:
            record = torch.full((STEPS, L, 2, H, N, C), math.nan, dtype=torch.float64)
            calls = []

            def observer(t, l, k, feature, record=record, calls=calls, H=H):
                assert feature.shape == (H, N, C)
                record[t, l, k] = feature.double()
                calls.append((t, l, k))

            noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
            with apply_eoc(model, FORASchedule(1), observer=observer):
                sampler.sample(model, noise, torch.tensor([label]), cfg_scale=cfg_scale)
            assert len(calls) == STEPS * L * 2 and not record.isnan().any()
            per_pair[(label, seed)] = record
        result[cfg_scale] = per_pair
    return result


@pytest.fixture(scope="module")
def calibrated(model):
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = calibrate(model, DDIMSampler(STEPS), LABELS, SEEDS, cfg_scale=case.cfg_scale,
                                    max_gap=case.max_gap, holdout=case.holdout, progress=False,
                                    batch_size=case.batch_size, trend_eps=TREND_EPS)
        return cache[case]

    return get


@pytest.fixture(scope="module")
def prior(calibrated):
    return calibrated(CFG2)


def brute_force(features, case):
    """(A [T, L, 2, H, N, C], {stat: tensor}) in fp64, straight from the module docstring."""
    fit, held = split(case.holdout)
    feats = features[case.cfg_scale]
    A = torch.stack([feats[p] for p in fit]).mean(0)
    F = torch.stack([feats[p] for p in held])  # [S, T, L, 2, H, N, C]
    T, L, G = STEPS, A.shape[1], case.max_gap
    nan = lambda *shape: torch.full(shape, math.nan, dtype=torch.float64)  # noqa: E731
    stats = {"energy": nan(T, L, 2), "cross_extrap": nan(T, L, 2, G, G)}
    stats.update({name: nan(T, L, 2, G) for name in STAT_NAMES if name not in stats})

    def mean_dot(a, b):  # per-sample sum over (H, N, C), averaged over held-out samples
        return float((a * b).flatten(1).sum(1).mean())

    for t in range(T):
        for l in range(L):
            for k in range(2):
                f_t = F[:, t, l, k]  # [S, H, N, C]
                stats["energy"][t, l, k] = mean_dot(f_t, f_t)
                for g in range(1, G + 1):
                    s = t - g
                    if s < 0:
                        continue
                    f_s = F[:, s, l, k]
                    D = A[t, l, k] - A[s, l, k]
                    E = (D / (A[s, l, k].abs() + TREND_EPS)).clamp(-1, 1)
                    diff = f_t - f_s
                    stats["err_plain"][t, l, k, g - 1] = mean_dot(diff, diff)
                    stats["cross_delta"][t, l, k, g - 1] = mean_dot(diff, D.expand_as(diff))
                    stats["sq_delta"][t, l, k, g - 1] = float((D * D).sum())
                    stats["cross_trend"][t, l, k, g - 1] = mean_dot(diff, f_s * E)
                    stats["sq_trend"][t, l, k, g - 1] = mean_dot(f_s * E, f_s * E)
                    for g2 in range(1, G + 1):
                        p = s - g2
                        if p >= 0:
                            stats["cross_extrap"][t, l, k, g - 1, g2 - 1] = mean_dot(diff, f_s - F[:, p, l, k])
    return A, stats


def assert_close_nan(got, expected, rtol=1e-4):
    got = got.double()
    assert torch.equal(got.isnan(), expected.isnan())
    finite = expected[~expected.isnan()]
    assert finite.numel() > 0
    scale = float(finite.abs().max())
    torch.testing.assert_close(got, expected, rtol=rtol, atol=1e-6 * scale, equal_nan=True)


# ------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_mean_and_statistics_match_brute_force(features, calibrated, case):
    prior = calibrated(case)
    A, stats = brute_force(features, case)
    assert prior.mean.dtype == torch.float32 and prior.mean.shape == A.shape
    assert_close_nan(prior.mean, A)
    assert set(prior.stats) == set(STAT_NAMES)
    for name in STAT_NAMES:
        assert prior.stats[name].dtype == torch.float32, name
        assert_close_nan(prior.stats[name], stats[name])
    # NaN exactly where a gap reaches before step 0: gap g at step t, and g + g2 for cross_extrap.
    G = case.max_gap
    assert prior.stats["energy"].isfinite().all()
    for t in range(STEPS):
        for g in range(1, G + 1):
            assert prior.stats["err_plain"][t, :, :, g - 1].isnan().all() == (t - g < 0)
            for g2 in range(1, G + 1):
                assert prior.stats["cross_extrap"][t, :, :, g - 1, g2 - 1].isnan().all() == (t - g - g2 < 0)


def test_halves_are_averaged_apart(prior):
    # The conditional and unconditional halves differ, so a mean over the whole batch would not fit.
    assert prior.mean.shape[3] == 2
    assert not torch.allclose(prior.mean[:, :, :, 0], prior.mean[:, :, :, 1], atol=1e-3)


def test_holdout_changes_the_statistics(calibrated):
    # Statistics on the fit pairs themselves (holdout=0) are not those on the held-out pairs.
    with_holdout, without = calibrated(CFG2), calibrated(CASES[2])
    a = with_holdout.stats["err_plain"][:, :, :, :2]
    b = without.stats["err_plain"]
    finite = ~a.isnan()
    assert not torch.allclose(a[finite], b[finite], rtol=1e-3)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_metadata(model, calibrated, case):
    prior = calibrated(case)
    fit, held = split(case.holdout)
    assert prior.num_steps == STEPS
    assert prior.cfg_scale == case.cfg_scale and isinstance(prior.cfg_scale, float)
    assert prior.num_samples == len(fit)
    assert prior.num_holdout == (len(held) if case.holdout > 0 else 0)
    assert prior.max_gap == case.max_gap
    assert (prior.num_tokens, prior.width, prior.num_blocks) == (16, 32, 3)
    assert prior.num_halves == case.num_halves
    assert prior.uses_cfg == (case.cfg_scale > 1)
    assert prior.sampler == "ddim"
    assert prior.trend_eps == TREND_EPS
    assert prior.format_version == prior_module.FORMAT_VERSION
    assert prior.model_fingerprint == model_fingerprint(model)
    assert prior.mean.shape == (STEPS, 3, 2, case.num_halves, 16, 32)
    with pytest.raises(AttributeError, match="no_such_field"):
        _ = prior.no_such_field


def test_split_sizes_follow_round():
    # The reproduction above relies on these sizes: 6 pairs, holdout 0.5 → 3, 0.34 → 2.
    assert [len(s) for s in split(0.5)] == [3, 3]
    assert [len(s) for s in split(0.34)] == [4, 2]


# ------------------------------------------------------------------------------------ judgment
def corrected_by_hand(F, A_delta, A_trend, t, s, p, l, k, coef):
    alpha, beta, gamma = coef
    f_t, f_s = F[:, t, l, k], F[:, s, l, k]
    estimate = f_s + alpha * A_delta + gamma * f_s * A_trend
    if beta:
        estimate = estimate + beta * (f_s - F[:, p, l, k])
    return float((f_t - estimate).pow(2).flatten(1).sum(1).mean())


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: c.name)
def test_judgment_formulas_match_direct_measurement(features, calibrated, case):
    prior = calibrated(case)
    _, held = split(case.holdout)
    F = torch.stack([features[case.cfg_scale][pair] for pair in held])  # [S, T, L, 2, H, N, C]
    G, checked = case.max_gap, 0
    for t in range(1, STEPS):
        for s in range(max(0, t - G), t):
            for l in range(3):
                for k in range(2):
                    D, E = (x.double() for x in prior.delta_and_trend(t, s, l, k))
                    assert D.shape == E.shape == (case.num_halves, 16, 32)
                    assert E.abs().max() <= 1.0
                    plain = corrected_by_hand(F, D, E, t, s, None, l, k, (0.0, 0.0, 0.0))
                    assert prior.plain_error(t, s, l, k) == pytest.approx(plain, rel=1e-4)
                    coefs = [(0.7, 0.0, 0.0), (-1.3, 0.0, 0.0), (0.0, 0.0, 0.4), (0.0, 0.0, -2.0)]
                    previous = [None] + list(range(max(0, s - G), s))
                    for p in previous:
                        for coef in coefs + ([(0.0, 0.6, 0.0), (0.0, -1.5, 0.0)] if p is not None else []):
                            expected = corrected_by_hand(F, D, E, t, s, p, l, k, coef)
                            got = prior.corrected_error(t, s, p, l, k, coef)
                            assert got == pytest.approx(expected, rel=1e-4, abs=1e-5 * plain), (t, s, p, coef)
                            checked += 1
    assert checked > 100


def test_delta_and_trend_definition(prior):
    D, E = prior.delta_and_trend(4, 2, 1, 0)
    a_t, a_s = prior.mean[4, 1, 0].double(), prior.mean[2, 1, 0].double()
    torch.testing.assert_close(D.double(), a_t - a_s)
    torch.testing.assert_close(E.double(), ((a_t - a_s) / (a_s.abs() + prior.trend_eps)).clamp(-1, 1))
    assert ((E == 1) | (E == -1)).any() and (E.abs() < 1).any()  # both the clamp and the ratio happen


def test_judgment_errors(prior):
    with pytest.raises(ValueError, match="one non-zero"):
        prior.corrected_error(3, 2, 1, 0, 0, (1.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="one non-zero"):
        prior.corrected_error(3, 2, 1, 0, 0, (0.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="one non-zero"):
        prior.corrected_error(3, 2, 1, 0, 0, (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="previous"):
        prior.corrected_error(3, 2, None, 0, 0, (0.0, 1.0, 0.0))
    G = prior.max_gap
    with pytest.raises(ValueError, match=f"max_gap.*{G + 1}|{G + 1}.*max_gap"):
        prior.plain_error(G + 1, 0, 0, 0)
    with pytest.raises(ValueError, match="max_gap"):
        prior.corrected_error(G + 1, 0, None, 0, 0, (1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="max_gap"):  # the extrapolation's second gap s − p too
        prior.corrected_error(STEPS - 1, STEPS - 2, STEPS - 3 - G, 0, 0, (0.0, 1.0, 0.0))


# ------------------------------------------------------------------------------------ file format
def assert_one_line_naming(excinfo, path):
    message = str(excinfo.value)
    assert "\n" not in message and os.fspath(path) in message, message


def test_save_load_float32_is_exact(prior, tmp_path):
    path = tmp_path / "prior.safetensors"
    prior.save(path, dtype=torch.float32)
    loaded = Prior.load(path)
    assert loaded.mean.dtype == torch.float32 and torch.equal(loaded.mean, prior.mean)
    assert set(loaded.stats) == set(STAT_NAMES)
    for name in STAT_NAMES:
        a, b = loaded.stats[name], prior.stats[name]
        assert a.dtype == torch.float32 and torch.equal(a.isnan(), b.isnan()), name
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), name
    assert loaded.metadata == prior.metadata
    coef = (0.0, 1.0, 0.0)
    assert loaded.corrected_error(4, 3, 2, 1, 1, coef) == prior.corrected_error(4, 3, 2, 1, 1, coef)
    assert repr(loaded) == repr(prior)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_save_load_half_precision(prior, tmp_path, dtype, rtol):
    path = tmp_path / "prior.safetensors"
    prior.save(path, dtype=dtype)
    loaded = Prior.load(path)
    assert loaded.mean.dtype == dtype
    torch.testing.assert_close(loaded.mean.float(), prior.mean, rtol=rtol, atol=1e-4)
    assert not torch.equal(loaded.mean.float(), prior.mean)  # really stored rounded
    for name in STAT_NAMES:  # statistics stay fp32
        assert loaded.stats[name].dtype == torch.float32
        assert torch.equal(loaded.stats[name].nan_to_num(), prior.stats[name].nan_to_num())
    assert loaded.metadata == prior.metadata
    D, _ = loaded.delta_and_trend(3, 1, 0, 1)
    assert D.dtype == torch.float32


def test_save_default_is_float16(prior, tmp_path):
    prior.save(tmp_path / "p.safetensors")
    assert Prior.load(tmp_path / "p.safetensors").mean.dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, "float16"])
def test_save_bad_dtype(prior, tmp_path, dtype):
    with pytest.raises(ValueError, match="dtype"):
        prior.save(tmp_path / "p.safetensors", dtype=dtype)
    assert not (tmp_path / "p.safetensors").exists()


def test_a_loaded_prior_does_not_change_when_its_file_is_rewritten_in_place(prior, tmp_path):
    """safetensors maps the file; a loaded prior holds copies, so another process rewriting the file in place
    (cp, an older save) cannot change it under a running sampler (it did: NaN samples mid-sweep)."""
    path, other = tmp_path / "prior.safetensors", tmp_path / "other.safetensors"
    prior.save(path, dtype=torch.float32)
    loaded = Prior.load(path)
    expected = loaded.mean.clone()
    save_file({k: v + 1 for k, v in tensors_of(loaded).items()}, os.fspath(other))
    with open(other, "rb") as src, open(path, "r+b") as dst:  # same inode, new bytes: what cp does
        data = src.read()
        dst.seek(0)
        dst.write(data)
        dst.truncate()
    assert torch.equal(loaded.mean, expected)


def test_save_replaces_the_file_instead_of_rewriting_it(prior, tmp_path):
    """A process that opened the old file keeps reading the old bytes; no temporary file is left behind.
    (safetensors 0.8's save_file replaces the file too; save does so itself, whatever the version.)"""
    path = tmp_path / "prior.safetensors"
    prior.save(path, dtype=torch.float32)
    with open(path, "rb") as old:
        before = os.fstat(old.fileno()).st_ino
        prior.save(path, dtype=torch.float16)
        assert os.stat(path).st_ino != before and old.read(8) != b""
    assert Prior.load(path).mean.dtype == torch.float16 and sorted(os.listdir(tmp_path)) == ["prior.safetensors"]


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        Prior.load(tmp_path / "nothere.safetensors")


def test_load_random_bytes(tmp_path):
    path = tmp_path / "random.safetensors"
    data = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path.write_bytes(data.numpy().tobytes())
    with pytest.raises(ValueError) as excinfo:
        Prior.load(path)
    assert_one_line_naming(excinfo, path)


def test_load_truncated_file(prior, tmp_path):
    path = tmp_path / "prior.safetensors"
    prior.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as excinfo:
        Prior.load(path)
    assert_one_line_naming(excinfo, path)


def test_load_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError) as excinfo:
        Prior.load(path)
    assert_one_line_naming(excinfo, path)


def tensors_of(prior):
    return {"mean": prior.mean.contiguous(), **{k: v.contiguous() for k, v in prior.stats.items()}}


def test_load_safetensors_without_our_metadata(prior, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(tensors_of(prior), os.fspath(path))
    with pytest.raises(ValueError, match="metadata") as excinfo:
        Prior.load(path)
    assert_one_line_naming(excinfo, path)
    save_file(tensors_of(prior), os.fspath(path), metadata={"other": "x"})
    with pytest.raises(ValueError, match="metadata") as excinfo:
        Prior.load(path)
    assert_one_line_naming(excinfo, path)


def write_with_meta(prior, path, meta, tensors=None):
    text = meta if isinstance(meta, str) else json.dumps(meta)
    save_file(tensors if tensors is not None else tensors_of(prior), os.fspath(path), metadata={"eoc_prior": text})


def test_load_bad_metadata(prior, tmp_path):
    path = tmp_path / "bad.safetensors"
    good = dict(prior.metadata.__dict__)
    write_with_meta(prior, path, good)
    assert Prior.load(path).metadata == prior.metadata  # the helper itself writes a valid file

    cases = [({**good, "format_version": 99}, "format_version"),
             ({k: v for k, v in good.items() if k != "num_tokens"}, "num_tokens"),
             ({k: v for k, v in good.items() if k != "format_version"}, "format_version"),
             ({**good, "num_steps": "6"}, "num_steps"),
             ({**good, "max_gap": 2.0}, "max_gap"),
             ({**good, "width": True}, "width"),
             ("{not json", "JSON"),
             ("3", "metadata"),
             ("null", "metadata"),
             ("[]", "metadata")]
    for meta, needle in cases:
        write_with_meta(prior, path, meta)
        with pytest.raises(ValueError, match=needle) as excinfo:
            Prior.load(path)
        assert_one_line_naming(excinfo, path)


@pytest.mark.parametrize("name", ["mean", "energy", "err_plain", "cross_extrap", "sq_delta"])
def test_load_tensor_shape_contradicting_metadata(prior, tmp_path, name):
    path = tmp_path / "bad.safetensors"
    tensors = tensors_of(prior)
    tensors[name] = tensors[name][:-1].contiguous()  # one step short
    write_with_meta(prior, path, prior.metadata.__dict__, tensors)
    with pytest.raises(ValueError, match=f"'{name}'") as excinfo:
        Prior.load(path)
    assert_one_line_naming(excinfo, path)


def test_load_metadata_contradicting_tensors(prior, tmp_path):
    path = tmp_path / "bad.safetensors"
    write_with_meta(prior, path, {**prior.metadata.__dict__, "width": 48})
    with pytest.raises(ValueError, match="'mean'") as excinfo:
        Prior.load(path)
    assert_one_line_naming(excinfo, path)


@pytest.mark.parametrize("name", ["mean", "cross_trend"])
def test_load_missing_tensor(prior, tmp_path, name):
    path = tmp_path / "bad.safetensors"
    tensors = tensors_of(prior)
    del tensors[name]
    write_with_meta(prior, path, prior.metadata.__dict__, tensors)
    with pytest.raises(ValueError, match=f"'{name}'") as excinfo:
        Prior.load(path)
    assert_one_line_naming(excinfo, path)


# ------------------------------------------------------------------------------------ compatibility
def test_check_model_refuses_other_architectures(prior, model):
    prior.check_model(model, num_blocks=3)
    prior.check_model(model)
    with pytest.raises(ValueError, match="width: the prior has 32, the model has 48"):
        prior.check_model(make_tiny_dit(hidden_size=48))
    deeper = make_tiny_dit(depth=4)
    with pytest.raises(ValueError, match="num_blocks: the prior has 3, the model has 4"):
        prior.check_model(deeper, num_blocks=len(deeper.blocks))  # as apply_eoc calls it
    with pytest.raises(ValueError, match="the prior has 3, the model has 4|model_fingerprint"):
        prior.check_model(deeper)  # without the block count the fingerprint still tells them apart
    more_tokens = DiT(input_size=16, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2, num_classes=4)
    with pytest.raises(ValueError, match="num_tokens: the prior has 16, the model has 64"):
        prior.check_model(more_tokens, num_blocks=3)
    other_heads = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=3, num_heads=2, num_classes=4)
    with pytest.raises(ValueError, match=f"model_fingerprint: the prior has {prior.model_fingerprint}, the model has"):
        prior.check_model(other_heads, num_blocks=3)


def test_check_model_accepts_same_shapes_other_weights(prior, model):
    other = make_tiny_dit(seed=7)
    assert not torch.equal(other.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert model_fingerprint(other) == model_fingerprint(model) == prior.model_fingerprint
    prior.check_model(other, num_blocks=3)
    apply_eoc(other, FORASchedule(2), prior, EOCConfig(mode="trend")).remove()


def test_fingerprint_is_names_and_shapes(model):
    assert model_fingerprint(make_tiny_dit(depth=4)) != model_fingerprint(model)
    assert model_fingerprint(make_tiny_dit(hidden_size=48)) != model_fingerprint(model)
    assert model_fingerprint(make_tiny_dit(learn_sigma=True)) != model_fingerprint(model)


# ------------------------------------------------------------------------------------ calibrate arguments
@pytest.mark.parametrize("kwargs,error,needle", [
    (dict(labels=[0, 4]), ValueError, "labels"),
    (dict(labels=[-1]), ValueError, "labels"),
    (dict(labels=[0, 1.5]), TypeError, "labels"),
    (dict(labels=[True]), TypeError, "labels"),
    (dict(labels=[]), TypeError, "labels"),
    (dict(seeds=[]), TypeError, "seeds"),
    (dict(seeds=["1"]), TypeError, "seeds"),
    (dict(cfg_scale=0.5), ValueError, "cfg_scale"),
    (dict(cfg_scale=float("nan")), ValueError, "cfg_scale"),
    (dict(cfg_scale="2"), ValueError, "cfg_scale"),
    (dict(max_gap=0), ValueError, "max_gap"),
    (dict(max_gap=2.0), ValueError, "max_gap"),
    (dict(holdout=1.0), ValueError, "holdout"),
    (dict(holdout=-0.1), ValueError, "holdout"),
    (dict(labels=[0], seeds=[1], holdout=0.25), ValueError, "holdout"),  # round(0.25) = 0 held out
    (dict(labels=[0], seeds=[1, 2], holdout=0.75), ValueError, "holdout"),  # round(1.5) = 2: nothing to fit
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=1.0), ValueError, "batch_size"),
    (dict(model="not a model"), TypeError, "model"),
    (dict(model=torch.nn.Linear(2, 2)), TypeError, "model"),
    (dict(sampler="ddim"), TypeError, "sampler"),
])
def test_calibrate_bad_arguments(model, kwargs, error, needle):
    calls = []

    class Spy(DDIMSampler):
        def sample(self, *args, **kw):
            calls.append(1)
            return super().sample(*args, **kw)

    args = dict(model=model, sampler=Spy(STEPS), labels=[0, 1], seeds=[1, 2], cfg_scale=2.0, max_gap=2,
                holdout=0.5, batch_size=2)
    args.update(kwargs)
    with pytest.raises(error, match=needle):
        calibrate(args.pop("model"), args.pop("sampler"), args.pop("labels"), args.pop("seeds"), progress=False, **args)
    assert calls == []  # refused before sampling anything
    assert not hasattr(model, "_eoc_handle")


def test_calibrate_small_valid_holdouts(model):
    # One pair with holdout=0 (both passes on it), and two pairs with holdout 0.5: 1 fit, 1 held out.
    p = calibrate(model, DDIMSampler(2), [2], [3], cfg_scale=1.0, max_gap=1, holdout=0.0, progress=False)
    assert (p.num_samples, p.num_holdout) == (1, 0)
    assert p.stats["err_plain"][1].isfinite().all() and p.stats["err_plain"][0].isnan().all()
    p = calibrate(model, DDIMSampler(2), [2], [3, 4], cfg_scale=1.0, max_gap=1, holdout=0.5, progress=False)
    assert (p.num_samples, p.num_holdout) == (1, 1)


class FailingSampler(DDIMSampler):
    """Raises on its ``fail_at``-th call to sample()."""

    def __init__(self, num_steps, fail_at):
        super().__init__(num_steps)
        self.fail_at, self.calls = fail_at, 0

    def sample(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("sampler broke")
        return super().sample(*args, **kwargs)


@pytest.mark.parametrize("fail_at", [2, 4])  # in the mean pass, in the statistics pass
def test_calibrate_unpatches_even_when_sampling_fails(fail_at):
    model = make_tiny_dit(seed=3)
    noise, labels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 2])
    before = DDIMSampler(STEPS).sample(model, noise, labels, cfg_scale=2.0)
    sampler = FailingSampler(STEPS, fail_at)
    with pytest.raises(RuntimeError, match="sampler broke"):
        # 4 pairs, 2 fit and 2 held out, one per batch: four sample() calls in all.
        calibrate(model, sampler, [0], [1, 2, 3, 4], cfg_scale=2.0, max_gap=2, holdout=0.5, batch_size=1,
                  progress=False)
    assert sampler.calls == fail_at
    assert not hasattr(model, "_eoc_handle") and not hasattr(model, "_eoc_step_listener")
    assert "forward" not in model.__dict__ and all("forward" not in b.__dict__ for b in model.blocks)
    assert torch.equal(DDIMSampler(STEPS).sample(model, noise, labels, cfg_scale=2.0), before)
    apply_eoc(model, FORASchedule(2)).remove()  # can be patched again


def test_calibrate_leaves_model_unpatched(model, prior):
    noise, labels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 2])
    before = DDIMSampler(STEPS).sample(model, noise, labels, cfg_scale=2.0)
    calibrate(model, DDIMSampler(STEPS), [0], [1, 2], cfg_scale=2.0, max_gap=2, holdout=0.5, progress=False)
    assert not hasattr(model, "_eoc_handle") and "forward" not in model.__dict__
    assert torch.equal(DDIMSampler(STEPS).sample(model, noise, labels, cfg_scale=2.0), before)


def test_calibrate_refuses_a_patched_model(model):
    with apply_eoc(model, FORASchedule(2)):
        with pytest.raises(ValueError, match="already patched"):
            calibrate(model, DDIMSampler(STEPS), [0], [1], holdout=0.0, progress=False)
        assert hasattr(model, "_eoc_handle")  # the user's patch is left alone
    assert not hasattr(model, "_eoc_handle")


# ------------------------------------------------------------------------------------ noise, streaming
@pytest.mark.parametrize("seed", [0, 5, 123456789])
def test_noise_for_seed(model, seed):
    expected = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(noise_for_seed(model, seed), expected)
    wide = DiT(input_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    assert torch.equal(noise_for_seed(wide, seed),
                       torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(seed)))


def test_statistics_pass_holds_a_window_not_the_run(model, monkeypatch):
    steps, max_gap = 9, 2
    original = calibration_module.StatAccumulator.__call__
    largest, seen = {}, []

    def spy(self, step, block, branch, feature):
        original(self, step, block, branch, feature)
        window = self.window[(block, branch)]
        assert step in window and all(step - 2 * max_gap <= s <= step for s in window)
        largest[(block, branch)] = max(largest.get((block, branch), 0), len(window))
        seen.append(step)

    monkeypatch.setattr(calibration_module.StatAccumulator, "__call__", spy)
    p = calibrate(model, DDIMSampler(steps), [0, 1], [1, 2], cfg_scale=1.0, max_gap=max_gap, holdout=0.5,
                  batch_size=1, progress=False)
    assert p.num_holdout == 2
    assert len(seen) == 2 * steps * 3 * 2  # two held-out runs, every (step, block, branch)
    assert set(largest) == {(l, k) for l in range(3) for k in range(2)}
    assert max(largest.values()) <= 2 * max_gap + 1 < steps


# ------------------------------------------------------------------------------------ checksum, strictness
# (the corruption fuzzing is in test_prior_fuzz.py)
def test_save_writes_a_checksum_that_load_verifies(prior, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "prior.safetensors"
    prior.save(path)
    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata()
    assert set(metadata) == {"eoc_prior", "eoc_fits", "eoc_checksum"} and metadata["eoc_checksum"].startswith("sha256:")
    loaded = Prior.load(path)
    tensors = tensors_of(loaded)
    tensors["mean"] = tensors["mean"].clone()
    tensors["mean"].view(-1)[7] += 1  # a finite change: only the checksum can tell
    save_file(tensors, os.fspath(path), metadata=metadata)
    with pytest.raises(ValueError, match="checksum") as excinfo:
        Prior.load(path)
    assert_one_line_naming(excinfo, path)


def test_load_rejects_unknown_fields_and_non_files(prior, tmp_path):
    path = tmp_path / "bad.safetensors"
    write_with_meta(prior, path, {**prior.metadata.__dict__, "comment": "hi"})
    with pytest.raises(ValueError, match="unknown fields") as excinfo:
        Prior.load(path)
    assert_one_line_naming(excinfo, path)
    with pytest.raises(ValueError, match="not a regular file") as excinfo:
        Prior.load(tmp_path)  # a directory is not a missing file
    assert not isinstance(excinfo.value, FileNotFoundError)


def test_load_rejects_nan_where_a_statistic_is_defined(prior, tmp_path):
    path = tmp_path / "bad.safetensors"
    tensors = tensors_of(prior)
    tensors["err_plain"] = tensors["err_plain"].clone()
    tensors["err_plain"][STEPS - 1, 0, 0, 0] = math.nan
    write_with_meta(prior, path, prior.metadata.__dict__, tensors)
    with pytest.raises(ValueError, match="'err_plain' is NaN at \\[5, 0, 0, 0\\]") as excinfo:
        Prior.load(path)
    assert_one_line_naming(excinfo, path)


# ------------------------------------------------------------------------------------ K-history fits
def _fit(prior, num_coefs, seed=0):
    from eoc_dit import CoefficientFit

    mask = FORASchedule(2).mask(prior.num_steps, prior.num_blocks)
    coef = torch.randn(*mask.shape, num_coefs, generator=torch.Generator().manual_seed(seed))
    coef[mask] = 0.0
    return CoefficientFit(mask, coef, {"schedule": f"P = {num_coefs}"})


@pytest.mark.parametrize("num_coefs", [3, 4, 5])
def test_fits_of_every_width_round_trip(prior, tmp_path, num_coefs):
    copy = Prior(prior.mean, prior.stats, prior.metadata)
    copy.add_fit(_fit(prior, num_coefs))
    path = tmp_path / "prior.safetensors"
    copy.save(path)
    (loaded,) = Prior.load(path).fits
    assert loaded.coef.shape[-1] == num_coefs and torch.equal(loaded.coef, copy.fits[0].coef)
    assert torch.equal(loaded.mask, copy.fits[0].mask) and loaded.info == copy.fits[0].info


def test_the_shipped_k_history_fits_load():
    from eoc_dit.testbed import load_prior

    shipped = load_prior(20)
    assert len(shipped.fits) == 6 and all(fit.coef.shape[-1] == 5 for fit in shipped.fits)
    assert all(bool((fit.coef[..., 4] != 0).any()) for fit in shipped.fits)  # each fit uses β₃ somewhere


def test_fit_width_is_validated_on_load_and_add(prior, tmp_path):
    path = tmp_path / "bad.safetensors"
    copy = Prior(prior.mean, prior.stats, prior.metadata)
    copy.add_fit(_fit(prior, 5))
    copy.save(path)
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "eoc_checksum"}
    tensors = load_file(os.fspath(path))
    tensors["fit.0.coef"] = torch.zeros(*tensors["fit.0.coef"].shape[:3], 6)  # P = 6: no such layout
    save_file(tensors, os.fspath(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"P in \(3, 4, 5\)") as excinfo:
        Prior.load(path)
    assert_one_line_naming(excinfo, path)
    other = _fit(prior, 4)
    with pytest.raises(ValueError, match="do not match"):
        copy.add_fit(type(other)(other.mask[:-1], other.coef[:-1], {}))


def test_judgment_statistics_cover_one_history_difference(prior):
    with pytest.raises(ValueError, match="cover α, β₁ and γ only"):
        prior.corrected_error(3, 2, 1, 0, 0, (0.0, 0.0, 0.0, 0.5))
    with pytest.raises(ValueError, match="length 3..5"):
        prior.corrected_error(3, 2, 1, 0, 0, (0.0, 0.5))
    assert prior.corrected_error(3, 2, 1, 0, 0, (0.0, 0.5, 0.0, 0.0)) == prior.corrected_error(3, 2, 1, 0, 0,
                                                                                                (0.0, 0.5, 0.0))
    # A forecaster reading C_2 with a prior: the gain test cannot measure it, so the default min_gain = 0 keeps
    # the preset's coefficients unjudged (as min_gain=None does), and a non-zero min_gain says it cannot.
    model = make_tiny_dit()
    with pytest.raises(ValueError, match="min_gain.*min_gain=None or 0"):
        apply_eoc(model, FORASchedule(2), prior, EOCConfig(mode="taylorseer", order=2, min_gain=0.1))
    plans = []
    for min_gain in (0.0, None):
        with apply_eoc(model, FORASchedule(2), prior, EOCConfig(mode="taylorseer", order=2,
                                                                min_gain=min_gain)) as handle:
            assert handle.plan.num_generations == 3
            plans.append(handle.plan.entries)
    # entries reading C_2 are kept as the preset gives them; those of order 1 (one β₁) are still gain-tested
    reads_c2 = [key for key, entry in plans[1].items() if len(entry.coef) > 3 and entry.coef[3] != 0.0]
    assert reads_c2 and all(plans[0][key] == plans[1][key] for key in reads_c2)
