"""eoc_dit.sweep and the sweep of ``eoc evaluate``: method specs, the resumable results CSV (a killed
run resumes without sampling its finished rows again), the Markdown table and the quality-vs-speed
figure. Sampling is replaced by a stand-in wherever the rows' numbers do not matter, so these run in
seconds; tests/eoc_dit/test_testbed_shipped.py runs the real sweep on a few samples."""

import math
import struct
from dataclasses import dataclass

import pytest
import torch

from eoc_dit import config as eoc_config
from eoc_dit import sweep, testbed
from eoc_dit.cli import main
from eoc_dit.config import EOCConfig
from eoc_dit.diffusion import DDIMSampler
from eoc_dit.errors import InputValueError
from eoc_dit.schedules import FORASchedule
from eoc_dit.testbed import demo


# ---------------------------------------------------------------------------------------------- method specs
@pytest.mark.parametrize("text,spec,mode,theta", [
    ("plain", "plain", "plain", None),
    ("calibrated", "calibrated", "calibrated", None),
    ("trend", "trend", "trend", None),
    ("delta:0.5", "delta:0.5", "delta", 0.5),
    ("extrapolate:1.2", "extrapolate:1.2", "extrapolate", 1.2),
    ("extrapolate:1.0", "extrapolate:1", "extrapolate", 1.0),  # one canonical key per method
    (" extrapolate:0.8 ", "extrapolate:0.8", "extrapolate", 0.8),
])
def test_parse_method(text, spec, mode, theta):
    method = sweep.parse_method(text)
    assert (method.spec, method.mode) == (spec, mode)
    if mode == "plain":
        assert method.config is None and not method.is_preset
    else:
        assert method.config == EOCConfig(mode=mode, theta=theta)
        assert method.is_preset == (mode != "calibrated")


@dataclass(frozen=True)
class _StubConfig:
    """Stands in for EOCConfig with the K-history modes, so the parser is tested whatever config.py holds."""

    mode: str
    theta: float | None = None
    order: int | None = None
    sigma: float | None = None

    def __post_init__(self):
        if self.order is not None and not 1 <= self.order <= 3:
            raise InputValueError(f"EOCConfig.order must be in 1..3, got {self.order}")


@pytest.fixture
def stub_config(monkeypatch):
    monkeypatch.setattr(eoc_config, "MODES", ("trend", "delta", "extrapolate", "taylorseer", "hicache", "calibrated"))
    monkeypatch.setattr(eoc_config, "EOCConfig", _StubConfig)


@pytest.mark.parametrize("text,spec,kwargs", [
    ("taylorseer:2", "taylorseer:2", dict(order=2)),
    ("hicache:3", "hicache:3", dict(order=3, sigma=0.5)),  # HiCache's σ = 0.5 unless given
    ("hicache:1:0.5", "hicache:1", dict(order=1, sigma=0.5)),
    ("hicache:2:0.7", "hicache:2:0.7", dict(order=2, sigma=0.7)),
])
def test_parse_order_methods(stub_config, text, spec, kwargs):
    method = sweep.parse_method(text)
    assert method.spec == spec and method.config == _StubConfig(mode=text.split(":")[0], **kwargs)
    assert method.is_preset


@pytest.mark.skipif("taylorseer" not in eoc_config.MODES, reason="EOCConfig has no K-history modes in this build")
def test_parse_order_methods_with_the_real_config():
    assert sweep.parse_method("taylorseer:2").config == EOCConfig(mode="taylorseer", order=2)
    assert sweep.parse_method("hicache:3").config == EOCConfig(mode="hicache", order=3, sigma=0.5)


@pytest.mark.parametrize("text,match", [
    ("", "non-empty"),
    ("bogus", "unknown mode 'bogus'.*known: plain"),
    ("momentum:2", "unknown mode 'momentum'"),
    ("plain:1", "'plain' takes no parameter"),
    ("calibrated:2", "'calibrated' takes no parameter"),
    ("extrapolate:x", "theta must be a number"),
    ("extrapolate:nan", "theta must be finite"),
    ("extrapolate:1:2", "write extrapolate or extrapolate:THETA"),
    ("taylorseer", "write taylorseer:ORDER"),
    ("taylorseer:1.5", "the order must be an integer"),
    ("taylorseer:1:2", "write taylorseer:ORDER"),
    ("hicache:1:x", "sigma must be a number"),
    ("hicache:1:0.5:2", "write hicache:ORDER"),
    ("taylorseer:7", "'taylorseer:7': EOCConfig.order must be in 1..3"),  # refused by the config, named by spec
])
def test_parse_method_errors(stub_config, text, match):
    with pytest.raises(InputValueError, match=match):
        sweep.parse_method(text)


def test_a_mode_this_config_lacks_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(eoc_config, "MODES", ("trend", "delta", "extrapolate", "calibrated"))
    with pytest.raises(InputValueError, match="'taylorseer' is not a mode of this build's EOCConfig yet"):
        sweep.parse_method("taylorseer:2")
    methods, missing = sweep.default_methods()  # the default list leaves such methods out, and says which
    assert "taylorseer:2" in missing and "hicache:1" in missing
    assert [m.spec for m in methods] == ["plain", "extrapolate:0.8", "extrapolate:1", "extrapolate:1.2", "trend",
                                         "delta", "calibrated"]


def test_parse_methods_refuses_the_same_method_twice():
    with pytest.raises(InputValueError, match="same method"):
        sweep.parse_methods(["extrapolate:1", "extrapolate:1.0"])
    with pytest.raises(InputValueError, match="no methods"):
        sweep.parse_methods([])


def test_method_labels():
    assert [sweep.method_label(s) for s in ("plain", "taylorseer:2", "hicache:1", "hicache:2:0.7", "extrapolate:1.2",
                                            "trend", "calibrated")] == [
        "plain reuse", "TaylorSeer order 2", "HiCache order 1", "HiCache order 2 σ=0.7", "extrapolate θ=1.2", "trend",
        "calibrated"]


def test_schedules():
    schedules = sweep.sweep_schedules([2, 3, 3], [4], warmup_steps=2)
    assert [sweep.schedule_key(s) for s in schedules] == ["fora:2", "fora:3", "fora:4:1"]
    # TaylorSeer's schedule with 2 warm-up steps computes steps 0, 1, 5, 9, 13, 17 of 20.
    assert sweep.full_fraction(schedules[2], 20, 6) == pytest.approx(6 / 20)
    assert sweep.full_fraction(FORASchedule(2), 20, 6) == 0.5
    assert sweep.schedule_label("fora:4:1") == "TaylorSeer N=4, W=2"
    with pytest.raises(InputValueError, match=">= 2"):
        sweep.sweep_schedules([1])
    with pytest.raises(InputValueError, match="--warmup-steps must be >= 2"):
        sweep.sweep_schedules([2], [4], warmup_steps=1)


@pytest.mark.parametrize("argv,match", [
    (["--methods", "bogus"], "unknown mode 'bogus'"),
    (["--methods", "plain", "plain"], "same method"),
    (["--intervals", "1"], "--intervals"),
    (["--warmup-intervals", "4", "--warmup-steps", "1"], "--warmup-steps"),
])
def test_evaluate_refuses_bad_methods_and_schedules_before_sampling(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.setattr(demo, "run_sweep", _never_called)
    assert main(["evaluate", "--out-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and match in err and "Traceback" not in err


def _never_called(*args, **kwargs):
    raise AssertionError("nothing may be sampled here")


# ---------------------------------------------------------------------------------------------- resumable CSV
def _row(schedule, method, psnr, **extra):
    base = {"schedule": schedule, "method": method, "label": sweep.method_label(method), "full_fraction": 0.5,
            "samples": 8, "seconds": 2.0, "speedup": 2.0, "psnr": psnr, "psnr_a": psnr + 0.5, "psnr_b": psnr - 0.5,
            "mean_image_psnr": psnr + 3, "p10_image_psnr": psnr - 2, "fd_to_uncached": 0.1, "fd_a": 0.1, "fd_b": 0.2,
            "fd_to_data": 10.0, "accuracy": 0.5, "model": "testbed DiT", "sampler": "DDIM-20, CFG 3",
            "seed_sets": "A=100000+;B=200000+", "session": 1, "commit": "abc1234", "device": "CPU", "torch": "2.x",
            "finished": "2026-12-01T10:00:00"}
    return base | extra


def test_csv_appends_each_row_and_resume_drops_a_partly_written_one(tmp_path):
    path = tmp_path / "results.csv"
    table = sweep.SweepCSV(path, resume=False)
    table.append(_row("none", "uncached", float("nan"), full_fraction=1.0))
    table.append(_row("fora:2", "plain", 30.0))
    assert [r["method"] for r in sweep.read_rows(path)] == ["uncached", "plain"]  # on disk at once
    with open(path, "a") as f:
        f.write("fora:2,trend,trend,0.5,8,2.0")  # a run killed in the middle of a record
    assert len(sweep.read_rows(path)) == 2
    resumed = sweep.SweepCSV(path, resume=True)
    assert resumed.done("fora:2", "plain")["psnr"] == 30.0 and resumed.done("fora:2", "trend") is None
    assert math.isnan(resumed.done("none", "uncached")["psnr"])
    assert "fora:2,trend,trend,0.5,8,2.0" not in path.read_text()  # rewritten without the partial record
    resumed.append(_row("fora:2", "trend", 31.0))
    assert [r["method"] for r in sweep.read_rows(path)] == ["uncached", "plain", "trend"]
    assert sweep.SweepCSV(path, resume=False).rows == [] and sweep.read_rows(path) == []  # a fresh start


def test_read_rows_refuses_other_files(tmp_path):
    (tmp_path / "other.csv").write_text("method,interval\nFORA N=2,2\n")
    with pytest.raises(InputValueError, match="not a results CSV"):
        sweep.read_rows(tmp_path / "other.csv")
    with pytest.raises(InputValueError, match="no such file"):
        sweep.read_rows(tmp_path / "missing.csv")


class FakeSampling:
    """Stands in for demo.sample_method: deterministic images per (schedule, method), 1 s each; counts
    its calls and, like a killed process, stops the run at call number ``stop_at``."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def __call__(self, model, sampler, prior, schedule, config, noise, labels, batch_size, progress=True, group=None):
        key = "none" if schedule is None else sweep.schedule_key(schedule)
        self.calls.append((key, None if config is None else (config.mode, config.theta)))
        if self.stop_at is not None and len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        images = torch.tanh(noise)
        if schedule is not None:
            images = images + 0.01 * schedule.interval * (2.0 if config is None else 1.0 + (config.theta or 0.0))
        return images.clamp(-1, 1), 1.0


METHODS = ["plain", "extrapolate:1", "calibrated"]
SCHEDULES = [FORASchedule(2), FORASchedule(7)]  # the shipped prior has a fit for N=2, none for N=7


def _sweep(out, monkeypatch, fake, samples=4, **kwargs):
    monkeypatch.setattr(demo, "sample_method", fake)
    return demo.run_sweep(SCHEDULES, sweep.parse_methods(METHODS), samples, str(out), batch_size=4, progress=False,
                          log=lambda text: None, **kwargs)


def test_a_killed_sweep_resumes_without_sampling_its_finished_rows(tmp_path, monkeypatch):
    first = FakeSampling(stop_at=4)  # uncached, fora:2 plain, fora:2 extrapolate:1, then killed in calibrated
    with pytest.raises(KeyboardInterrupt):
        _sweep(tmp_path, monkeypatch, first)
    done = sweep.read_rows(tmp_path / "results.csv")
    assert [(r["schedule"], r["method"]) for r in done] == [("none", "uncached"), ("fora:2", "plain"),
                                                            ("fora:2", "extrapolate:1")]
    lines = (tmp_path / "results.csv").read_text().splitlines()

    second = FakeSampling()
    rows, notes, kept = _sweep(tmp_path, monkeypatch, second, resume=True)
    # Only what had not finished is sampled: fora:2 calibrated and fora:7 plain / extrapolate (no fit for N=7).
    assert second.calls == [("fora:2", ("calibrated", None)), ("fora:7", None), ("fora:7", ("extrapolate", 1.0))]
    assert len(notes) == 1 and "calibrated skipped under fora:7" in notes[0]
    assert (tmp_path / "results.csv").read_text().splitlines()[:len(lines)] == lines  # earlier rows untouched
    assert [r["session"] for r in rows] == [1, 1, 1, 2, 2, 2]
    # For the grid: the uncached samples (read back from uncached.npy) and those of the rows sampled now.
    assert set(kept) == {("none", "uncached"), ("fora:2", "calibrated"), ("fora:7", "plain"),
                         ("fora:7", "extrapolate:1")}
    assert torch.equal(kept["none", "uncached"], torch.tanh(demo.evaluation_set(testbed.load_model(), 4, 2)[0]))
    uncached = rows[0]["seconds"]
    assert all(r["speedup"] == pytest.approx(uncached / r["seconds"]) for r in rows)

    third = FakeSampling()  # everything done: a further resume samples nothing
    assert len(_sweep(tmp_path, monkeypatch, third, resume=True)[0]) == 6 and third.calls == []
    fresh = FakeSampling()  # without --resume the sweep starts again
    _sweep(tmp_path, monkeypatch, fresh)
    assert len(fresh.calls) == 6


def test_resume_refuses_other_settings_or_missing_state(tmp_path, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        _sweep(tmp_path, monkeypatch, FakeSampling(stop_at=3))
    with pytest.raises(InputValueError, match="--resume: the sweep in .* was run with samples = 4, this one has 6"):
        _sweep(tmp_path, monkeypatch, FakeSampling(), samples=6, resume=True)
    (tmp_path / "uncached.npy").write_bytes(b"garbage")
    with pytest.raises(InputValueError, match="uncached samples .* unreadable"):
        _sweep(tmp_path, monkeypatch, FakeSampling(), resume=True)
    (tmp_path / "sweep.json").unlink()
    with pytest.raises(InputValueError, match="sweep.json is missing"):
        _sweep(tmp_path, monkeypatch, FakeSampling(), resume=True)


# ---------------------------------------------------------------------------------------------- table
def _table_rows():
    rows = [_row("none", "uncached", float("nan"), full_fraction=1.0, seconds=4.0, speedup=1.0)]
    for n, fraction in ((2, 0.5), (3, 0.35)):
        rows += [_row(f"fora:{n}", "plain", 30.0 - n, full_fraction=fraction),
                 _row(f"fora:{n}", "extrapolate:1", 35.0 - n, full_fraction=fraction),
                 _row(f"fora:{n}", "taylorseer:2", 36.0 - n, full_fraction=fraction, psnr_a=37.0 - n),
                 _row(f"fora:{n}", "calibrated", 36.5 - n, full_fraction=fraction)]
    rows.append(_row("fora:4:1", "extrapolate:1", 31.0, full_fraction=0.35))
    rows.append(_row("fora:4:1", "taylorseer:2", 32.0, full_fraction=0.35))
    return rows


def test_markdown_marks_the_best_preset_and_calibrated_margins():
    rows = list(reversed(_table_rows()))  # any order in the file: the table sorts
    text = sweep.format_markdown(rows, ["plain", "extrapolate:1", "taylorseer:2", "calibrated"])
    table = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0:2] for line in table] == [
        ["| uncached", "uncached"], ["| FORA N=2", "plain reuse"], ["| FORA N=2", "extrapolate θ=1"],
        ["| FORA N=2", "TaylorSeer order 2 ★"], ["| FORA N=2", "calibrated"], ["| FORA N=3", "plain reuse"],
        ["| FORA N=3", "extrapolate θ=1"], ["| FORA N=3", "TaylorSeer order 2 ★"], ["| FORA N=3", "calibrated"],
        ["| TaylorSeer N=4, W=2", "extrapolate θ=1"], ["| TaylorSeer N=4, W=2", "TaylorSeer order 2 ★"]]
    calibrated = next(line for line in table if line.startswith("| FORA N=2 | calibrated"))
    # calibrated A / B = 35.0 / 34.0, the best preset's (TaylorSeer order 2, 34.0 overall) 35.0 / 33.5
    assert calibrated.endswith("| +0.00 / +0.50 (vs TaylorSeer order 2) |")
    assert "No calibrated row for TaylorSeer N=4, W=2" in text and "t = W − 1 + j·N" in text
    assert "8 samples per method (evaluation seed sets A=100000+ / B=200000+" in text
    assert sweep.calibrated_margins(rows)["fora:3"][0] == "taylorseer:2"


def test_markdown_notes_a_missing_calibrated_row_only_when_calibrated_was_asked_for():
    rows = _table_rows()
    assert "No calibrated row" not in sweep.format_markdown(rows, ["plain", "extrapolate:1", "taylorseer:2"])
    assert "the prior holds no fit for that schedule." in sweep.format_markdown(rows, ["plain", "calibrated"])
    assert "or calibrated was not among the methods run" in sweep.format_markdown(rows)  # --replot: unknown


# ---------------------------------------------------------------------------------------------- figure
def test_figure_one_line_per_method_and_warmup_markers(tmp_path):
    csv_path = tmp_path / "results.csv"
    table = sweep.SweepCSV(csv_path, resume=False)
    for row in _table_rows():
        table.append(row)
    png = tmp_path / "quality_vs_speed.png"
    fig = sweep.plot_quality_vs_speed(csv_path, png)
    ax = fig.axes[0]
    lines = ax.get_lines()
    # 4 methods with FORA N points (one line each, 2 points), 2 of them with a warm-up marker series.
    fora = [line for line in lines if line.get_linestyle() != "None"]
    warm = [line for line in lines if line.get_linestyle() == "None"]
    assert len(lines) == 6 and len(fora) == 4 and len(warm) == 2
    assert sorted(line.get_label() for line in fora) == sorted(["plain reuse", "extrapolate θ=1",
                                                                "TaylorSeer order 2", "calibrated"])
    assert all(len(line.get_xdata()) == 2 for line in fora) and all(len(line.get_xdata()) == 1 for line in warm)
    assert [float(v) for v in warm[0].get_xdata()] == [0.35]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "calibrated" in legend and any(text.startswith("warm-up schedule: TaylorSeer N=4, W=2") for text in legend)
    assert ax.get_ylabel().startswith("pooled PSNR") and "fraction of full steps" in ax.get_xlabel()
    assert "testbed DiT" in ax.get_title() and "8 samples" in ax.get_title() and "B=200000+" in ax.get_title()
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == tuple(int(round(v)) for v in fig.get_size_inches() * fig.dpi)


def test_figure_schedules_of_equal_compute_share_one_tick_and_the_line_runs_from_the_larger_n(tmp_path):
    # FORA N = 5 and N = 6 of 20 steps both compute 4 steps: same x, one top tick naming both.
    rows = [_row(f"fora:{n}", "plain", 30.0 - n, full_fraction=fraction)
            for n, fraction in ((6, 0.2), (4, 0.25), (5, 0.2))]
    fig = sweep.plot_quality_vs_speed(rows)
    ax = fig.axes[0]
    (line,) = ax.get_lines()
    assert [float(x) for x in line.get_xdata()] == [0.2, 0.2, 0.25]
    assert [float(y) for y in line.get_ydata()] == [24.0, 25.0, 26.0]  # N = 6, 5, 4
    top = next(child for child in ax.get_children() if type(child).__name__ == "SecondaryAxis")
    ticks = {float(x): t.get_text() for x, t in zip(top.get_xticks(), top.get_xticklabels())}
    assert ticks == {0.2: "N=5, 6", 0.25: "N=4"}


def test_evaluate_replot_rewrites_table_and_figure_without_sampling(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "run_sweep", _never_called)
    monkeypatch.setattr(demo, "sample_method", _never_called)
    assert main(["evaluate", "--replot", "--out-dir", str(tmp_path)]) == 2  # no CSV yet
    assert "results.csv: no such file" in capsys.readouterr().err
    table = sweep.SweepCSV(tmp_path / "results.csv", resume=False)
    for row in _table_rows():
        table.append(row)
    assert main(["evaluate", "--replot", "--out-dir", str(tmp_path)]) == 0
    assert "TaylorSeer order 2 ★" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "quality_vs_speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- grids
def test_demo_grid_rows_and_labels():
    rows = [demo.ResultRow(name, None, None, 0, 1, 1, 0, 0, 0, 0) for name in ("uncached", "FORA N=3",
                                                                            "FORA N=3 + EOC calibrated")]
    grid = torch.rand(3 * 4, 1, 28, 28) * 2 - 1
    images, names, classes = demo.demo_grid(rows, grid)
    assert names == ["uncached", "FORA N=3", "FORA N=3 + EOC calibrated", "|FORA N=3 − uncached| ×4",
                     "|FORA N=3 + EOC calibrated − uncached| ×4"]
    assert classes == ["T-shirt/top", "Trouser", "Pullover", "Dress"]
    assert [tuple(r.shape) for r in images] == [(4, 1, 28, 28)] * 5
    assert torch.equal(images[1], grid[4:8])
    expected = (4 * (grid[4:8] - grid[:4]).abs()).clamp(0, 2) - 1
    assert torch.allclose(images[3], expected)


def test_sweep_grid_uses_the_samples_the_sweep_kept(monkeypatch):
    monkeypatch.setattr(DDIMSampler, "sample", _never_called)  # every row below is kept: nothing is sampled
    images = {key: torch.rand(3, 1, 28, 28) * 2 - 1 for key in [("none", "uncached"), ("fora:2", "plain"),
                                                                  ("fora:2", "calibrated")]}
    methods = sweep.parse_methods(["plain", "calibrated"])
    rows, names, classes = demo.sweep_grid(2, methods, shown=3, kept=images)
    assert names == ["uncached", "FORA N=2", "FORA N=2 + calibrated", "|FORA N=2 − uncached| ×4",
                     "|FORA N=2 + calibrated − uncached| ×4"]
    assert classes == ["T-shirt/top", "Trouser", "Pullover"]
    assert torch.equal(rows[0], images["none", "uncached"]) and torch.equal(rows[2], images["fora:2", "calibrated"])
    # Without a shipped fit for N=7, the grid shows no calibrated row (and samples what it was not given).
    monkeypatch.setattr(DDIMSampler, "sample", lambda self, model, noise, labels, **kw: torch.tanh(noise))
    _, names, _ = demo.sweep_grid(7, methods, shown=2)
    assert names == ["uncached", "FORA N=7", "|FORA N=7 − uncached| ×4"]
