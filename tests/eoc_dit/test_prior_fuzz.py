"""Fuzzing of prior files: every corrupted file must give a one-line InputValueError naming the file.

Never a crash, a hang, an exception of another type, nor a silently wrong prior. What "silently
wrong" means depends on the file:

- a file written by ``Prior.save`` carries a checksum of its metadata and tensors, so a corrupted
  file either is rejected or loads into a prior identical to the original (a flip that turns header
  padding into other JSON whitespace changes nothing);
- a file without a checksum (older files, hand-written ones) is checked for structure and values
  only: a flip that leaves finite values is indistinguishable from a real prior, so it must at least
  load into a *valid* prior (``assert_valid``: metadata types and ranges, shapes, dtypes, finite
  mean and coefficients, judgment statistics NaN exactly where a gap reaches before step 0).

The base prior is tiny and synthetic (built once per module, no model). Cases are randomised with
fixed seeds or drawn by hypothesis (derandomised); ``COUNTS`` counts them per category and
``test_zz_case_counts`` prints the counts (``pytest -rP`` shows them). safetensors orders the
metadata keys of a header as a hash map does, differently per process, so the header byte offsets,
and the counts of the header tests by a few cases, vary from run to run.
"""

from __future__ import annotations

import collections
import faulthandler
import io
import json
import math
import os
import pickle
import random
import shutil
import struct
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

import eoc_dit.prior as prior_module
from eoc_dit.errors import InputValueError
from eoc_dit.prior import STAT_NAMES, CoefficientFit, Prior, PriorMetadata

COUNTS: collections.Counter = collections.Counter()
T, L, H, N, C, G = 4, 2, 2, 3, 4, 2
SHIPPED = Path(prior_module.__file__).parent / "testbed" / "assets" / "testbed_prior_ddim20.safetensors"
HANG_SECONDS = 30  # one load taking this long kills the run with a traceback (faulthandler)
HYPOTHESIS = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------ the base prior
def expected_nan(name: str, T: int = T, G: int = G) -> torch.Tensor | None:
    """Where statistic ``name`` is NaN by definition (a gap reaching before step 0), as a bool
    tensor broadcastable to [T, L, 2, G(, G)]; None for energy (never NaN)."""
    steps = torch.arange(T)[:, None]
    gaps = torch.arange(1, G + 1)[None, :]
    if name == "energy":
        return None
    if name == "cross_extrap":
        return ((steps[:, :, None] - gaps[:, :, None] - gaps[:, None, :]) < 0)[:, None, None]
    return ((steps - gaps) < 0)[:, None, None]


def make_prior() -> Prior:
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(T, L, 2, H, N, C, generator=g)
    stats = {"energy": torch.rand(T, L, 2, generator=g) + 0.5}
    for name in STAT_NAMES[1:]:
        shape = (T, L, 2, G, G) if name == "cross_extrap" else (T, L, 2, G)
        value = torch.rand(*shape, generator=g) if name.startswith(("sq", "err")) else torch.randn(*shape, generator=g)
        stats[name] = value.masked_fill(expected_nan(name).expand(shape), math.nan)
    meta = PriorMetadata(model_fingerprint="0123456789abcdef", num_steps=T, sampler="ddim", cfg_scale=2.0,
                         num_samples=3, num_holdout=2, max_gap=G, num_tokens=N, width=C, num_blocks=L,
                         num_halves=H, trend_eps=1e-3)
    fits = []
    for interval in (2, 3):
        mask = (torch.arange(T) % interval == 0)[:, None, None].expand(T, L, 2).clone()
        coef = torch.randn(T, L, 2, 3, generator=g) * (~mask)[..., None]
        fits.append(CoefficientFit(mask, coef, {"schedule": f"FORA({interval})", "gain": 1.0, "terms": ["delta"]}))
    return Prior(mean, stats, meta, fits)


def file_tensors(prior: Prior, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """The tensors as ``Prior.save`` writes them."""
    tensors = {"mean": prior.mean.to(dtype).contiguous(), **{k: v.contiguous() for k, v in prior.stats.items()}}
    for i, fit in enumerate(prior.fits):
        tensors[f"fit.{i}.mask"] = fit.mask.to(torch.uint8).contiguous()
        tensors[f"fit.{i}.coef"] = fit.coef.contiguous()
    return tensors


def metadata_of(prior: Prior) -> dict:
    return dict(prior.metadata.__dict__)


def fits_info_of(prior: Prior) -> list:
    return [fit.info for fit in prior.fits]


def build(tensors: dict, meta=None, fits=None, *, checksum: bool = False, extra: dict | None = None,
          drop: tuple = ()) -> bytes:
    """A safetensors file of ``tensors`` and metadata; ``meta``/``fits`` are JSON values or raw strings."""
    raw = {"eoc_prior": meta if isinstance(meta, str) else json.dumps(meta),
           "eoc_fits": fits if isinstance(fits, str) else json.dumps(fits)}
    if checksum:
        raw["eoc_checksum"] = prior_module._checksum(tensors, raw["eoc_prior"], raw["eoc_fits"])
    raw.update(extra or {})
    for key in drop:
        raw.pop(key, None)
    return safetensors_bytes(tensors, metadata=raw)


def raw_file(header, body: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors-like file with an arbitrary JSON header (or raw header bytes)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def header_size(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The base prior, its file as ``Prior.save`` writes it (with a checksum), and the same without."""
    prior = make_prior()
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    prior.save(path)
    saved = path.read_bytes()
    legacy = build(file_tensors(prior), metadata_of(prior), fits_info_of(prior))
    reference = Prior.load(path)
    return prior, saved, legacy, reference


@pytest.fixture(scope="module")
def case_path(tmp_path_factory):
    """Where each case is written: in RAM where there is a tmpfs (thousands of small writes)."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        directory = tempfile.mkdtemp(prefix="prior_fuzz_", dir="/dev/shm")
        yield Path(directory) / "case.safetensors"
        shutil.rmtree(directory, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("cases") / "case.safetensors"


# ------------------------------------------------------------------------------------ outcomes
def load(path) -> tuple[str, object]:
    """("rejected", message) or ("loaded", prior); anything else fails the test."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    try:
        return "loaded", Prior.load(path)
    except InputValueError as exc:
        message = str(exc)
        assert "\n" not in message and os.fspath(path) in message and len(message) < 1000, message
        return "rejected", message
    finally:
        faulthandler.cancel_dump_traceback_later()


def outcome(path, data: bytes, label: str) -> tuple[str, object]:
    path.write_bytes(data)
    try:
        return load(path)
    except AssertionError:
        raise
    except BaseException as exc:  # noqa: BLE001 -- the whole point: name the case that escaped
        pytest.fail(f"{label}: {type(exc).__name__} escaped Prior.load: {exc}"[:2000])


def rejected(path, data: bytes, label: str, needle: str | None = None) -> str:
    kind, result = outcome(path, data, label)
    assert kind == "rejected", f"{label}: loaded {result!r}"
    if needle is not None:
        assert needle.lower() in result.lower(), f"{label}: {result}"
    return result


def check(condition, *label) -> None:
    """assert without pytest's rendering of the tensors involved (they make pages)."""
    if not bool(condition):
        pytest.fail(" / ".join(str(x) for x in label)[:2000], pytrace=False)


def assert_same(got: Prior, want: Prior, label: str) -> None:
    check(got.metadata == want.metadata, label, "metadata", got.metadata)
    check(got.mean.dtype == want.mean.dtype and torch.equal(got.mean, want.mean), label, "mean")
    check(set(got.stats) == set(want.stats), label, "stat names")
    for name in want.stats:
        a, b = got.stats[name], want.stats[name]
        check(a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()),
              label, name)
    check(len(got.fits) == len(want.fits), label, "number of fits")
    for i, (f, w) in enumerate(zip(got.fits, want.fits)):
        check(torch.equal(f.mask, w.mask) and torch.equal(f.coef, w.coef) and f.info == w.info, label, f"fit {i}")


def assert_valid(prior: Prior, label: str) -> None:
    """A prior that the rest of the package can trust (independent of how Prior.load checks it)."""
    m = prior.metadata
    for name in PriorMetadata._INT_FIELDS:
        value = getattr(m, name)
        check(type(value) is int and (0 if name == "num_holdout" else 1) <= value < 2**31, label, name, value)
    check(m.format_version == prior_module.FORMAT_VERSION and m.num_halves in (1, 2), label, m)
    for name in PriorMetadata._FLOAT_FIELDS:
        check(type(getattr(m, name)) is float and math.isfinite(getattr(m, name)), label, name, getattr(m, name))
    check(m.cfg_scale >= 1.0 and m.trend_eps > 0 and m.num_halves == (2 if m.cfg_scale > 1 else 1), label, m)
    check(isinstance(m.sampler, str) and m.sampler and isinstance(m.model_fingerprint, str) and m.model_fingerprint,
          label, m)
    T_, L_, G_ = m.num_steps, m.num_blocks, m.max_gap
    check(prior.mean.shape == (T_, L_, 2, m.num_halves, m.num_tokens, m.width), label, "mean shape")
    check(prior.mean.dtype in prior_module.STORAGE_DTYPES.values() and prior.mean.isfinite().all(),
          label, "mean values")
    check(set(prior.stats) == set(STAT_NAMES), label, sorted(prior.stats))
    for name, value in prior.stats.items():
        shape = (T_, L_, 2) if name == "energy" else (T_, L_, 2, G_, G_) if name == "cross_extrap" else (T_, L_, 2, G_)
        check(value.shape == shape and value.dtype == torch.float32, label, name, "shape/dtype")
        nan = expected_nan(name, T_, G_)
        nan = torch.zeros(shape, dtype=torch.bool) if nan is None else nan.expand(shape)
        check(torch.equal(value.isnan(), nan) and value[~nan].isfinite().all(),
              label, name, "NaN exactly where undefined")
        if name in ("energy", "err_plain", "sq_delta", "sq_trend"):
            check((value[~nan] >= 0).all(), label, name, "negative squared norm")
    masks = []
    for i, fit in enumerate(prior.fits):
        check(fit.mask.dtype == torch.bool and fit.mask.shape == (T_, L_, 2) and fit.mask[0].all(),
              label, f"fit {i} mask")
        check(fit.coef.dtype == torch.float32 and fit.coef.shape[:3] == (T_, L_, 2)
              and fit.coef.shape[3] in (3, 4, 5) and fit.coef.isfinite().all(),
              label, f"fit {i} coef")
        check(isinstance(fit.info, dict), label, f"fit {i} info")
        check(not any(torch.equal(fit.mask, other) for other in masks), label, f"fit {i} duplicate mask")
        masks.append(fit.mask)


def same_or_rejected(path, data, label, reference) -> str:
    kind, result = outcome(path, data, label)
    if kind == "loaded":
        assert_same(result, reference, label)
    return kind


def valid_or_rejected(path, data, label) -> tuple[str, object]:
    kind, result = outcome(path, data, label)
    if kind == "loaded":
        assert_valid(result, label)
    return kind, result


def test_base_files_load(base, case_path):
    prior, _, legacy, reference = base
    assert_valid(reference, "saved")
    case_path.write_bytes(legacy)
    assert_same(reference, Prior.load(case_path), "legacy")
    assert json.loads(json.dumps(reference.metadata.__dict__)) == metadata_of(prior)


def test_shipped_prior_passes_the_checks():
    # The shipped testbed prior predates the checksum: it must load, and pass every value check.
    prior = Prior.load(SHIPPED)
    assert_valid(prior, "shipped")
    assert len(prior.fits) == 6
    COUNTS["shipped prior"] += 1


# ------------------------------------------------------------------------------------ truncation
@pytest.mark.parametrize("which", ["saved", "legacy"])
def test_truncation_everywhere(base, case_path, which):
    _, saved, legacy, _ = base
    data = saved if which == "saved" else legacy
    end = header_size(data)
    cuts = list(range(end + 16)) + list(range(end + 16, len(data), 3)) + [len(data) - 1]
    for cut in cuts:
        rejected(case_path, data[:cut], f"{which} truncated at {cut} of {len(data)}")
        COUNTS["truncation"] += 1
    # Bytes appended after the body are garbage too.
    for extra in (b"\0", b" " * 7, random.Random(0).randbytes(64)):
        rejected(case_path, data + extra, f"{which} with {len(extra)} bytes appended")
        COUNTS["truncation"] += 1


# ------------------------------------------------------------------------------------ flipped bytes
def overwrite(data: bytes, position: int, value: int) -> bytes:
    return data[:position] + bytes([value]) + data[position + 1:]


@pytest.mark.parametrize("which", ["saved", "legacy"])
def test_header_length_corruption(base, case_path, which):
    _, saved, legacy, _ = base
    data = saved if which == "saved" else legacy
    rng = random.Random(1)
    labels = []
    for position in range(8):
        for bit in range(8):
            labels.append((f"bit {bit} of length byte {position}",
                           overwrite(data, position, data[position] ^ (1 << bit))))
        for value in rng.sample(range(256), 24):
            if value != data[position]:
                labels.append((f"length byte {position} = {value}", overwrite(data, position, value)))
    for _ in range(64):
        labels.append(("random length", rng.randbytes(8) + data[8:]))
    labels += [("length 0", struct.pack("<Q", 0) + data[8:]), ("length 2**64-1", b"\xff" * 8 + data[8:]),
               ("length = file size", struct.pack("<Q", len(data)) + data[8:]),
               ("length = file size - 8", struct.pack("<Q", len(data) - 8) + data[8:])]
    for label, corrupted in labels:
        assert corrupted != data
        # A different header length never names a parsable header of the same file.
        rejected(case_path, corrupted, f"{which}: {label}")
        COUNTS["header length"] += 1


@pytest.mark.parametrize("which", ["saved", "legacy"])
def test_json_header_corruption(base, case_path, which):
    _, saved, legacy, reference = base
    data = saved if which == "saved" else legacy
    rng = random.Random(2)
    end = header_size(data)
    kinds = collections.Counter()
    cases = [(p, data[p] ^ (1 << rng.randrange(8))) for p in range(8, end)]
    cases += [(rng.randrange(8, end), rng.randrange(256)) for _ in range(700)]
    # Characters that keep JSON valid more often: digits, quotes, braces, spaces.
    cases += [(rng.randrange(8, end), ord(rng.choice('0123456789"{}[],: .-eE\\tnul'))) for _ in range(700)]
    for position, value in cases:
        if value == data[position]:
            continue
        corrupted = overwrite(data, position, value)
        label = f"{which}: header byte {position} {data[position]:#x} -> {value:#x}"
        if which == "saved":
            kinds[same_or_rejected(case_path, corrupted, label, reference)] += 1
        else:
            kinds[valid_or_rejected(case_path, corrupted, label)[0]] += 1
        COUNTS["json header bytes"] += 1
    assert kinds["rejected"] > 0.9 * sum(kinds.values()), kinds
    COUNTS[f"json header bytes -> {which}: loaded (valid or identical)"] += kinds["loaded"]


def test_body_corruption_with_checksum(base, case_path):
    """Every byte of the tensor data is covered by the checksum: any change is rejected."""
    _, saved, _, _ = base
    rng = random.Random(3)
    start = header_size(saved)
    for position in range(start, len(saved)):
        value = (saved[position] ^ (1 << rng.randrange(8)) if position % 2
                 else rng.choice(sorted(set(range(256)) - {saved[position]})))
        rejected(case_path, overwrite(saved, position, value), f"body byte {position} -> {value:#x}", "checksum")
        COUNTS["body bytes (checksum)"] += 1


def tensor_spans(data: bytes) -> dict[str, tuple[int, int, str]]:
    header = json.loads(data[8:header_size(data)])
    start = header_size(data)
    return {name: (start + v["data_offsets"][0], start + v["data_offsets"][1], v["dtype"])
            for name, v in header.items() if name != "__metadata__"}


def test_body_corruption_without_checksum(base, case_path):
    """Without a checksum a body flip is caught only when it makes a value invalid: NaN/inf in the
    mean or coefficients, a NaN where a statistic is defined or a number where it is not, a negative
    squared norm, a fit mask entry that is not 0/1 or a reuse at step 0. Otherwise it must load into
    a valid prior with the original metadata."""
    _, _, legacy, reference = base
    rng = random.Random(4)
    spans = tensor_spans(legacy)
    kinds = collections.Counter()
    for name, (lo, hi, dtype) in sorted(spans.items()):
        size = {"F16": 2, "F32": 4, "U8": 1}[dtype]
        for position in range(lo, hi):
            values = {legacy[position] ^ (1 << rng.randrange(8))}
            if (position - lo) % size == size - 1 and size > 1:  # the exponent's high bits: NaN/inf, huge
                values.add(legacy[position] | rng.choice((0x7F, 0x7C, 0x78)))
            for value in values - {legacy[position]}:
                label = f"legacy: {name} byte {position - lo} -> {value:#x}"
                kind, result = valid_or_rejected(case_path, overwrite(legacy, position, value), label)
                if kind == "loaded":
                    assert result.metadata == reference.metadata, label
                else:
                    reason = next(r for r in ("non-finite", "NaN at", "holds a number", "infinite", "negative", "mask",
                                              "") if r in result)
                    COUNTS[f"body bytes (no checksum) -> rejected: {reason or 'other'}"] += 1
                kinds[(name, kind)] += 1
                COUNTS["body bytes (no checksum)"] += 1
    for name in spans:  # every tensor had both undetectable and rejected flips (the mask: 0 -> 1 only)
        assert kinds[(name, "rejected")] > 0, (name, kinds)
    COUNTS["body bytes (no checksum) -> rejected"] += sum(v for (n, k), v in kinds.items() if k == "rejected")
    COUNTS["body bytes (no checksum) -> loaded valid"] += sum(v for (n, k), v in kinds.items() if k == "loaded")


@pytest.mark.parametrize("which", ["saved", "legacy"])
def test_random_multi_byte_corruption(base, case_path, which):
    _, saved, legacy, reference = base
    data = saved if which == "saved" else legacy
    rng = random.Random(5)
    for i in range(400):
        corrupted = bytearray(data)
        for _ in range(rng.randint(2, 16)):
            corrupted[rng.randrange(len(data))] = rng.randrange(256)
        if bytes(corrupted) == data:
            continue
        label = f"{which}: multi-byte corruption {i}"
        if which == "saved":
            same_or_rejected(case_path, bytes(corrupted), label, reference)
        else:
            valid_or_rejected(case_path, bytes(corrupted), label)
        COUNTS["multi-byte corruption"] += 1


# ------------------------------------------------------------------------------------ metadata
BAD_INT_VALUES = ["6", 6.0, 2.5, -1, 0, True, False, None, {"a": 1}, [1], [], 10**30, -(10**30), float("nan"),
                  float("inf"), ""]
BAD_FLOAT_VALUES = ["2.0", True, None, {"a": 1}, [2.0], float("nan"), float("inf"), float("-inf"), 10**400, -1.0]
BAD_STR_VALUES = [1, 1.5, True, None, {"a": "b"}, ["ddim"], ""]


@pytest.mark.parametrize("checksum", [False, True], ids=["no-checksum", "checksum"])
def test_wrong_metadata_values(base, case_path, checksum):
    prior = base[0]
    tensors, good, fits = file_tensors(prior), metadata_of(prior), fits_info_of(prior)
    cases = []
    for name in PriorMetadata._INT_FIELDS:
        cases += [(name, v) for v in BAD_INT_VALUES]
    cases += [("num_halves", 3), ("num_holdout", -1), ("num_samples", 0), ("format_version", 2),
              ("format_version", 0), ("cfg_scale", 0.5), ("cfg_scale", 1.0), ("trend_eps", 0.0), ("trend_eps", -1e-3)]
    for name in PriorMetadata._FLOAT_FIELDS:
        cases += [(name, v) for v in BAD_FLOAT_VALUES]
    for name in PriorMetadata._STR_FIELDS:
        cases += [(name, v) for v in BAD_STR_VALUES]
    for name, value in cases:
        if name == "num_holdout" and value == 0:  # no holdout: valid
            continue
        meta = {**good, name: value}
        rejected(case_path, build(tensors, meta, fits, checksum=checksum), f"{name} = {value!r}"[:200], name)
        COUNTS["metadata: wrong field values"] += 1
    for name in good:  # missing fields
        meta = {k: v for k, v in good.items() if k != name}
        rejected(case_path, build(tensors, meta, fits, checksum=checksum), f"without {name}", name)
        COUNTS["metadata: missing field"] += 1
    # Unknown fields are rejected (the format is versioned: a new field comes with a new version).
    for extra in ({"extra": 1}, {"Num_steps": 4}, {"": None}, {"x" * 5000: 1}, {"note": {"nested": [1, 2]}}):
        rejected(case_path, build(tensors, {**good, **extra}, fits, checksum=checksum),
                 f"extra {next(iter(extra))[:20]}", "unknown")
        COUNTS["metadata: unknown field"] += 1
    # Raw texts: a huge int literal, duplicate keys, not an object, not JSON.
    text = json.dumps(good)
    raws = [text.replace('"num_steps": 4', '"num_steps": ' + "9" * 5000), text[:-1] + ', "num_steps": 4}',
            text.replace('"num_steps": 4', '"num_steps": 4e0'), text.replace('"num_steps": 4', '"num_steps": 4.0'),
            "[]", "null", "3", '"text"', "{not json", "", "{", text + "x", "\ufeff" + text, text.replace("{", "{{", 1)]
    for raw in raws:
        rejected(case_path, build(tensors, raw, fits, checksum=checksum), f"raw metadata {raw[:40]!r}")
        COUNTS["metadata: raw text"] += 1


@pytest.mark.parametrize("checksum", [False, True], ids=["no-checksum", "checksum"])
def test_wrong_fit_metadata(base, case_path, checksum):
    prior = base[0]
    tensors, good = file_tensors(prior), metadata_of(prior)
    infos = fits_info_of(prior)
    for fits in ({}, "x", 3, None, True, {"0": infos[0]}, [1, infos[1]], [infos[0], "s"], [None, None],
                 [[], infos[1]], [infos[0]], [infos[0], infos[1], {}], []):
        rejected(case_path, build(tensors, good, fits, checksum=checksum), f"fits {json.dumps(fits)[:60]}")
        COUNTS["metadata: fit info"] += 1
    for raw in ("[", "[1,]", "{not json", "", "[" * 100 + "]" * 99, '[{"a": 1, "a": 2}, {}]'):
        rejected(case_path, build(tensors, good, raw, checksum=checksum), f"raw fits {raw[:40]!r}")
        COUNTS["metadata: fit info"] += 1
    # The fit tensors without any eoc_fits entry are stray.
    rejected(case_path, build(tensors, good, None, drop=("eoc_fits",), checksum=False), "no eoc_fits", "fit")
    COUNTS["metadata: fit info"] += 1


def test_safetensors_metadata_keys(base, case_path):
    prior = base[0]
    tensors, good, fits = file_tensors(prior), metadata_of(prior), fits_info_of(prior)
    rejected(case_path, build(tensors, good, fits, drop=("eoc_prior",)), "no eoc_prior", "metadata")
    for extra in ({"other": "x"}, {"eoc_prior2": "{}"}, {"format": "pt"}, {"eoc_checksum": "sha256:" + "0" * 64},
                  {"eoc_checksum": "md5:1234"}, {"eoc_checksum": ""}, {"eoc_checksum": "x" * 10**6}):
        rejected(case_path, build(tensors, good, fits, extra=extra), f"metadata key {next(iter(extra))}")
        COUNTS["metadata: safetensors keys"] += 1
    # A valid checksum of other content, and a valid one with the content changed after.
    other = {**good, "num_samples": 4}
    checked = build(tensors, other, fits, checksum=True)
    ok_kind, _ = outcome(case_path, checked, "checksummed variant")
    assert ok_kind == "loaded"
    raw = {"eoc_prior": json.dumps(good), "eoc_fits": json.dumps(fits),
           "eoc_checksum": prior_module._checksum(tensors, json.dumps(other), json.dumps(fits))}
    rejected(case_path, safetensors_bytes(tensors, metadata=raw), "checksum of other metadata", "checksum")
    COUNTS["metadata: safetensors keys"] += 2


JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)


def test_hypothesis_metadata_fields(base, case_path):
    prior = base[0]
    tensors, good, fits = file_tensors(prior), metadata_of(prior), fits_info_of(prior)
    outcomes = collections.Counter()

    @HYPOTHESIS
    @given(replace=st.dictionaries(st.sampled_from(sorted(good)), JSON_VALUES, min_size=1, max_size=3),
           remove=st.sets(st.sampled_from(sorted(good)), max_size=2),
           add=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=2), checksum=st.booleans())
    def case(replace, remove, add, checksum):
        meta = {k: v for k, v in {**good, **replace}.items() if k not in remove}
        meta.update({k: v for k, v in add.items() if k not in good})
        kind, _ = valid_or_rejected(case_path, build(tensors, meta, fits, checksum=checksum),
                                         f"metadata {meta!r}"[:300])
        if kind == "loaded":  # only values a real prior could hold
            assert not remove and not (set(add) - set(good)), meta
        outcomes[kind] += 1
        COUNTS["metadata: hypothesis fields"] += 1

    case()
    assert outcomes["rejected"] > 0 and sum(outcomes.values()) >= 100, outcomes


def test_hypothesis_fit_metadata(base, case_path):
    prior = base[0]
    tensors, good = file_tensors(prior), metadata_of(prior)
    outcomes = collections.Counter()

    @HYPOTHESIS
    @given(fits=JSON_VALUES | st.lists(JSON_VALUES, min_size=2, max_size=2)
           | st.lists(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4), min_size=2, max_size=2))
    def case(fits):
        kind, _ = valid_or_rejected(case_path, build(tensors, good, fits), f"fits {fits!r}"[:300])
        if kind == "loaded":
            assert isinstance(fits, list) and len(fits) == 2 and all(isinstance(i, dict) for i in fits)
        outcomes[kind] += 1
        COUNTS["metadata: hypothesis fit info"] += 1

    case()
    assert outcomes["rejected"] > 0 and outcomes["loaded"] > 0, outcomes


# ------------------------------------------------------------------------------------ tensors
def tensor_cases(prior: Prior):
    """(label, tensors, needle) of files whose tensors contradict the format or the metadata."""
    good = file_tensors(prior)
    rng = torch.Generator().manual_seed(6)
    cases = []

    def with_(label, needle=None, **changes):
        tensors = dict(good)
        for name, value in changes.items():
            name = name.replace("__", ".")
            if value is None:
                tensors.pop(name)
            else:
                tensors[name] = value.contiguous().clone()  # safetensors refuses tensors sharing memory
        cases.append((label, tensors, needle))

    for name in list(good):
        with_(f"missing {name}", None, **{name.replace(".", "__"): None})
    for extra in ("extra", "mean2", "fit.2.mask", "fit.0.other", "fit.x.coef", "Energy", "fit.", "fit.2.coef"):
        tensors = {**good, extra: torch.zeros(2)}
        cases.append((f"extra tensor {extra}", tensors, None))
    for name, value in good.items():
        key = name.replace(".", "__")
        with_(f"{name} one step short", repr(name) if "fit" not in name else None, **{key: value[:-1]})
        with_(f"{name} extra dim", None, **{key: value[None]})
        with_(f"{name} flattened", None, **{key: value.flatten()})
        with_(f"{name} scalar", None, **{key: value.flatten()[0]})
        with_(f"{name} empty", None, **{key: value[:0]})
        if value.dim() >= 2 and value.shape[0] != value.shape[1]:
            with_(f"{name} transposed", None, **{key: value.transpose(0, 1)})
    # Wrong dtypes.
    for dtype in (torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.int64):
        with_(f"mean as {dtype}", "mean", mean=good["mean"].to(dtype))
        for name in STAT_NAMES:
            with_(f"{name} as {dtype}", name, **{name: good[name].nan_to_num().to(dtype)})
        with_(f"coef as {dtype}", "coef", fit__0__coef=good["fit.0.coef"].to(dtype))
    for dtype in (torch.float16, torch.bfloat16):
        for name in ("energy", "err_plain"):
            with_(f"{name} as {dtype}", name, **{name: good[name].to(dtype)})
        with_(f"coef as {dtype}", "coef", fit__1__coef=good["fit.1.coef"].to(dtype))
    for dtype in (torch.float32, torch.float16, torch.int32, torch.int8):
        with_(f"mask as {dtype}", "mask", fit__0__mask=good["fit.0.mask"].to(dtype))
    with_("mask as bool", None, fit__0__mask=good["fit.0.mask"].bool())  # bool is fine: checked below
    cases[-1] = cases[-1][:2] + ("OK",)
    # Fit masks: not 0/1, step 0 not all compute, duplicate masks.
    for value in (2, 3, 128, 255):
        mask = good["fit.0.mask"].clone()
        mask.view(-1)[int(torch.randint(mask.numel(), (1,), generator=rng))] = value
        with_(f"mask holding {value}", "mask", fit__0__mask=mask)
    for i in range(8):
        mask = good["fit.1.mask"].clone()
        mask[0].view(-1)[i % mask[0].numel()] = 0
        with_(f"mask reusing at step 0 ({i})", "step 0", fit__1__mask=mask)
    with_("two fits of one mask", "mask", fit__1__mask=good["fit.0.mask"])
    # Non-finite values.
    for value in (math.nan, math.inf, -math.inf):
        for name in ["mean", "fit.0.coef", "fit.1.coef", "energy"] + list(STAT_NAMES[1:]):
            for _ in range(3):
                tensor = good[name].clone()
                defined = ~tensor.isnan()
                index = int(defined.flatten().nonzero()[int(torch.randint(int(defined.sum()), (1,), generator=rng))])
                tensor.view(-1)[index] = value
                with_(f"{value} in {name}[{index}]", None, **{name.replace(".", "__"): tensor})
    # A number where a statistic is undefined (a gap before step 0), and negative squared norms.
    for name in STAT_NAMES[1:]:
        tensor = good[name].clone()
        nan_at = tensor.isnan().flatten().nonzero()
        for k in range(3):
            t = tensor.clone()
            t.view(-1)[int(nan_at[int(torch.randint(len(nan_at), (1,), generator=rng))])] = float(k)
            with_(f"finite value in {name} where undefined", name, **{name: t})
    for name in ("energy", "err_plain", "sq_delta", "sq_trend"):
        tensor = good[name].clone()
        finite = tensor.isfinite().flatten().nonzero()
        tensor.view(-1)[int(finite[int(torch.randint(len(finite), (1,), generator=rng))])] *= -1
        with_(f"negative {name}", name, **{name: tensor})
    return cases


@pytest.mark.parametrize("checksum", [False, True], ids=["no-checksum", "checksum"])
def test_wrong_tensors(base, case_path, checksum):
    prior = base[0]
    meta, fits = metadata_of(prior), fits_info_of(prior)
    for label, tensors, needle in tensor_cases(prior):
        data = build(tensors, meta, fits, checksum=checksum)
        if needle == "OK":
            kind, result = valid_or_rejected(case_path, data, label)
            assert kind == "loaded", (label, result)
            continue
        rejected(case_path, data, label, needle)
        COUNTS["tensors: extra/missing/shape/dtype/values"] += 1


def test_save_refuses_what_load_would_refuse(base, case_path):
    prior = base[0]
    bad_mean = prior.mean.clone()
    bad_mean[1, 0, 0, 0, 0, 0] = math.nan
    with pytest.raises(InputValueError, match="mean"):
        Prior(bad_mean, prior.stats, prior.metadata, prior.fits).save(case_path)
    big = prior.mean * 1e5  # overflows float16
    with pytest.raises(InputValueError, match="float16"):
        Prior(big, prior.stats, prior.metadata, prior.fits).save(case_path)
    Prior(big, prior.stats, prior.metadata, prior.fits).save(case_path, dtype=torch.float32)
    assert torch.equal(Prior.load(case_path).mean, big)
    COUNTS["save checks"] += 3


# ------------------------------------------------------------------------------------ enormous / deep
def test_enormous_or_deep_metadata(base, case_path):
    prior = base[0]
    tensors, good, fits = file_tensors(prior), metadata_of(prior), fits_info_of(prior)
    deep = 200_000
    metas = [("[" * deep + "]" * deep, "characters"), ("{\"a\":" * deep + "1" + "}" * deep, "characters"),
             ("[" * 30000 + "]" * 30000, "deep"), ("{\"a\":" * 10000 + "1" + "}" * 10000, "deep"),
             (json.dumps({**good, "sampler": "d" * 10**7}), "characters"),
             (json.dumps({**good, "extra": ["x" * 1000] * 60}), "unknown"),
             (json.dumps(good)[:-1] + "," + ",".join(f'"k{i}": {i}' for i in range(3000)) + "}", "unknown"),
             ("[" * 500 + "]" * 500, "JSON object"), (json.dumps({**good, "sampler": "d" * 1000}), "sampler")]
    for i, (meta, needle) in enumerate(metas):
        start = time.perf_counter()
        rejected(case_path, build(tensors, meta, fits), f"enormous metadata {i}", needle)
        assert time.perf_counter() - start < 10, i
        COUNTS["enormous/deep metadata"] += 1
    fit_texts = [("[" * deep + "]" * deep, "deep"), ("[" * 500 + "]" * 500, "JSON object"),
                 (json.dumps([{**fits[0], "deep": json.loads("[" * 40 + "]" * 40)}, fits[1]]), "deep"),
                 (json.dumps([{"x": "x" * 17_000_000}, {}]), "characters"),
                 (json.dumps([{}] * 10**6), "fitted coefficients 2"),
                 ('[{"a": ' * deep + "1" + "}" * deep + "]", "deep"),
                 (json.dumps([{**fits[0], "note": "[" * deep}, {**fits[1], "deep": [[[[[[1]]]]]]}]), None)]  # just data
    for i, (text, needle) in enumerate(fit_texts):
        start = time.perf_counter()
        data = build(tensors, good, text)
        if needle is None:
            kind, result = valid_or_rejected(case_path, data, f"enormous fits {i}")
            assert kind == "loaded", result
        else:
            rejected(case_path, data, f"enormous fits {i}", needle)
        assert time.perf_counter() - start < 10, i
        COUNTS["enormous/deep metadata"] += 1
    # Other enormous header contents: a huge extra metadata value, many (empty) tensors.
    for data in (build(tensors, good, fits, extra={"big": "x" * 30_000_000}),
                 raw_file({**{f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                              for i in range(300_000)}})):
        start = time.perf_counter()
        rejected(case_path, data, "enormous header")
        assert time.perf_counter() - start < 15
        COUNTS["enormous/deep metadata"] += 1


# ------------------------------------------------------------------------------------ not safetensors
def test_not_a_safetensors_file(base, case_path, tmp_path):
    prior, saved, _, _ = base
    rng = random.Random(7)
    datas = [("empty", b""), ("one byte", b"\0"), ("text", b"hello world\n" * 100),
             ("json", json.dumps(metadata_of(prior)).encode()),
             ("pickle", pickle.dumps({"mean": prior.mean, "meta": metadata_of(prior)})),
             ("header only", saved[:header_size(saved)]), ("zeros", b"\0" * 4096), ("ones", b"\xff" * 4096)]
    buffer = io.BytesIO()
    torch.save(file_tensors(prior), buffer)
    datas.append(("torch.save zip", buffer.getvalue()))
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("base.safetensors", saved)
    datas.append(("zip of a prior", zipped.getvalue()))
    for i in range(300):
        datas.append((f"random {i}",
                      rng.randbytes(rng.choice([1, 7, 8, 9, 16, 100, 1000, 5000, rng.randrange(20000)]))))
    for i in range(100):  # a plausible header length, then garbage
        body = rng.randbytes(rng.randrange(16, 3000))
        datas.append((f"length + garbage {i}", struct.pack("<Q", rng.randrange(1, len(body) + 1)) + body))
    # Headers that are JSON but not a valid tensor table.
    headers = [[], None, 3, "x", {"mean": 1}, {"mean": {"dtype": "F32"}},
               {"mean": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}},
               {"mean": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}},
               {"mean": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
               {"mean": {"dtype": "X99", "shape": [2], "data_offsets": [0, 8]}},
               {"mean": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}},
               {"mean": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 0]}},
               {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
               {"__metadata__": {"eoc_prior": 3}}, {"__metadata__": "x"},
               {"__metadata__": {"eoc_prior": json.dumps(metadata_of(prior))}}]
    for i, header in enumerate(headers):
        datas.append((f"header {i}", raw_file(header, b"\0" * 8)))
    for label, data in datas:
        rejected(case_path, data, label)
        COUNTS["not safetensors"] += 1
    # Paths that are not regular files: a directory, a FIFO (opening it would block), a link to a directory.
    directory = tmp_path / "a_directory.safetensors"
    directory.mkdir()
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    link = tmp_path / "link.safetensors"
    link.symlink_to(directory)
    for path in (directory, fifo, link):
        kind, message = load(path)
        assert kind == "rejected", (path, message)
        COUNTS["not safetensors"] += 1


def test_zz_case_counts():
    """Prints the cases per category; lines starting with "  of which" break the one above down."""
    width = max(map(len, COUNTS), default=0)
    print("\nprior fuzz cases:")
    for name, count in sorted(COUNTS.items()):
        print(f"  {name:<{width}}  {count}")
    print(f"  {'total':<{width}}  {sum(v for k, v in COUNTS.items() if ' -> ' not in k)}")
