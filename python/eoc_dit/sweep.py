"""The quality-vs-speed sweep of ``eoc evaluate``: method specs, schedule keys, the resumable results
CSV, its Markdown table and its figure (docs/DESIGN.md §4.7 for the metrics).

Nothing here samples: ``eoc_dit.testbed.demo.run_sweep`` runs the rows on the shipped testbed and
hands each finished one to :class:`SweepCSV`; :func:`format_markdown` and
:func:`plot_quality_vs_speed` read the rows back (``eoc evaluate --replot`` or a call on a finished
CSV), so the table and the figure can be regenerated without sampling again.

A method spec names one correction applied under every schedule of the sweep:

- ``plain``: plain reuse (FORA), no correction;
- ``calibrated``: the coefficients fitted for the schedule and stored in the prior;
- ``taylorseer:O`` / ``hicache:O[:SIGMA]``: the K-history forecasters of order O (HiCache σ 0.5 by
  default), ``EOCConfig(mode=..., order=O[, sigma=SIGMA])``;
- ``MODE[:THETA]`` for every other mode of ``eoc_dit.config.MODES`` (``trend``, ``delta``,
  ``extrapolate:1.2``): the preset with coefficient θ (the preset's default without one).

The headline metric is pooled PSNR (one MSE over every pixel of every image, images clamped to
[-1, 1]: ``eoc_dit.testbed.psnr``), per evaluation seed set and over both.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import time
from dataclasses import dataclass

from . import config as eoc_config
from .errors import InputValueError
from .schedules import FORASchedule, TaylorSeerSchedule

# Modes whose parameter is an integer order (K-history forecasters), and HiCache's default σ.
ORDER_MODES = ("taylorseer", "hicache")
HICACHE_SIGMA = 0.5
METHOD_HELP = ("plain | calibrated | taylorseer:ORDER | hicache:ORDER[:SIGMA] | trend[:THETA] | delta[:THETA] | "
               "extrapolate[:THETA]")
#: The sweep's methods when none are named (those whose mode this build's EOCConfig lacks are left out).
DEFAULT_METHODS = ("plain", "taylorseer:1", "taylorseer:2", "taylorseer:3", "hicache:1", "hicache:2", "hicache:3",
                   "extrapolate:0.8", "extrapolate:1", "extrapolate:1.2", "trend", "delta", "calibrated")
UNCACHED = "uncached"  # the reference row's schedule is "none" and its method "uncached"


def available_modes() -> tuple[str, ...]:
    """The EOC modes of the installed ``EOCConfig`` (read at call time: modes added later are seen)."""
    return tuple(eoc_config.MODES)


@dataclass(frozen=True)
class MethodSpec:
    """One method of the sweep: ``spec`` is its canonical text (the CSV key), ``config`` its correction
    (None = plain reuse)."""

    spec: str
    config: object | None

    @property
    def mode(self) -> str:
        return "plain" if self.config is None else self.config.mode

    @property
    def is_preset(self) -> bool:
        """A fixed preset: a correction whose coefficients are not fitted (not plain, not calibrated)."""
        return self.config is not None and self.mode != "calibrated"

    @property
    def label(self) -> str:
        return method_label(self.spec)


def _number(text: str, spec: str, what: str, kind=float):
    try:
        value = kind(text)
    except ValueError:
        raise InputValueError(f"method {spec!r}: {what} must be {'an integer' if kind is int else 'a number'}, "
                              f"got {text!r} (methods: {METHOD_HELP})") from None
    if kind is float and not math.isfinite(value):
        raise InputValueError(f"method {spec!r}: {what} must be finite, got {text!r}")
    return value


def parse_method(text: str) -> MethodSpec:
    """``MethodSpec`` of one method spec (module docstring); an unknown mode, a missing or malformed
    parameter, or a config ``EOCConfig`` refuses raises ``InputValueError`` naming the spec."""
    if not isinstance(text, str) or not text.strip():
        raise InputValueError(f"a method spec must be a non-empty string ({METHOD_HELP}), got {text!r}")
    spec = text.strip()
    mode, *params = spec.split(":")
    modes = available_modes()
    if mode == "plain":
        if params:
            raise InputValueError(f"method {spec!r}: 'plain' takes no parameter")
        return MethodSpec("plain", None)
    if mode not in modes:
        known = ", ".join(("plain",) + modes)
        later = f" ('{mode}' is not a mode of this build's EOCConfig yet)" if mode in ORDER_MODES else ""
        raise InputValueError(f"method {spec!r}: unknown mode {mode!r}{later}; known: {known}")
    if mode == "calibrated":
        if params:
            raise InputValueError(f"method {spec!r}: 'calibrated' takes no parameter (its coefficients are fitted)")
        kwargs, canonical = {}, "calibrated"
    elif mode in ORDER_MODES:
        most = 2 if mode == "hicache" else 1
        if not params or len(params) > most:
            form = f"{mode}:ORDER" + ("[:SIGMA]" if mode == "hicache" else "")
            raise InputValueError(f"method {spec!r}: write {form}, e.g. {mode}:2")
        order = _number(params[0], spec, "the order", int)
        kwargs = {"order": order}
        canonical = f"{mode}:{order}"
        if mode == "hicache":
            sigma = _number(params[1], spec, "sigma") if len(params) == 2 else HICACHE_SIGMA
            kwargs["sigma"] = sigma
            canonical += "" if sigma == HICACHE_SIGMA else f":{sigma:g}"  # one key per method
    else:
        if len(params) > 1:
            raise InputValueError(f"method {spec!r}: write {mode} or {mode}:THETA")
        kwargs = {"theta": _number(params[0], spec, "theta")} if params else {}
        canonical = f"{mode}:{kwargs['theta']:g}" if params else mode
    try:
        config = eoc_config.EOCConfig(mode=mode, **kwargs)
    except (TypeError, ValueError) as exc:  # e.g. an order the mode refuses, or a field this EOCConfig lacks
        raise InputValueError(f"method {spec!r}: {exc}") from None
    return MethodSpec(canonical, config)


def parse_methods(texts) -> list[MethodSpec]:
    """Each spec parsed, in order; two specs that name the same method are refused."""
    methods, seen = [], {}
    for text in texts:
        method = parse_method(text)
        if method.spec in seen:
            raise InputValueError(f"methods {seen[method.spec]!r} and {text!r} are the same method ({method.spec})")
        seen[method.spec] = text
        methods.append(method)
    if not methods:
        raise InputValueError("no methods given")
    return methods


def default_methods() -> tuple[list[MethodSpec], list[str]]:
    """(``DEFAULT_METHODS`` this build can run, the specs left out because their mode is missing)."""
    modes = set(available_modes()) | {"plain"}
    kept = [text for text in DEFAULT_METHODS if text.split(":")[0] in modes]
    return parse_methods(kept), [text for text in DEFAULT_METHODS if text not in kept]


def method_label(spec: str) -> str:
    """Readable name of a method spec: 'TaylorSeer order 2', 'extrapolate θ=1.2', 'plain reuse'."""
    mode, *params = spec.split(":")
    if mode == "plain":
        return "plain reuse"
    if mode == "taylorseer":
        return f"TaylorSeer order {params[0]}"
    if mode == "hicache":
        return f"HiCache order {params[0]}" + (f" σ={params[1]}" if len(params) > 1 else "")
    return mode + (f" θ={params[0]}" if params else "")


# ------------------------------------------------------------------------------------------------ schedules
def schedule_key(schedule: FORASchedule) -> str:
    """'fora:N', or 'fora:N:W' with a warm-up (the syntax of ``eoc sample --schedule``)."""
    return f"fora:{schedule.interval}" + (f":{schedule.warmup}" if schedule.warmup else "")


def schedule_label(key: str) -> str:
    """'FORA N=3'; a warm-up schedule 'fora:N:W' is TaylorSeer's (``schedules.TaylorSeerSchedule``) with W + 1
    warm-up steps: 'TaylorSeer N=4, W=2'."""
    if key == "none":
        return "uncached"
    _, interval, *warmup = key.split(":")
    return f"FORA N={interval}" if not warmup else f"TaylorSeer N={interval}, W={int(warmup[0]) + 1}"


def sweep_schedules(intervals, warmup_intervals=(), warmup_steps: int = 2) -> list[FORASchedule]:
    """FORA N for each of ``intervals``, then TaylorSeer's schedule (``TaylorSeerSchedule(N, warmup_steps)``:
    full steps t < W and t = W − 1 + j·N, i.e. ``FORASchedule(N, warmup=W − 1)``) for each of
    ``warmup_intervals``; N must be >= 2 (1 computes every step)."""
    bad = [n for n in list(intervals) + list(warmup_intervals) if n < 2]
    if bad:
        raise InputValueError(f"--intervals / --warmup-intervals must be >= 2 (1 computes every step), got {bad}")
    if warmup_intervals and warmup_steps < 2:
        raise InputValueError(f"--warmup-steps must be >= 2 (TaylorSeer's first_enhance; 1 is plain FORA), "
                              f"got {warmup_steps}")
    schedules = [FORASchedule(n) for n in dict.fromkeys(intervals)]
    return schedules + [TaylorSeerSchedule(n, warmup_steps) for n in dict.fromkeys(warmup_intervals)]


def full_fraction(schedule: FORASchedule, num_steps: int, num_blocks: int) -> float:
    """Fraction of full steps: computed (step, block, branch) entries / all of them."""
    return float(schedule.mask(num_steps, num_blocks).float().mean())


def _schedule_order(key: str) -> tuple:
    if key == "none":
        return (-1, -1)
    _, interval, *warmup = key.split(":")
    return (int(interval), int(warmup[0]) if warmup else 0)


# ------------------------------------------------------------------------------------------------ the CSV
FIELDS = ("schedule", "method", "label", "full_fraction", "samples", "seconds", "speedup", "psnr", "psnr_a",
          "psnr_b", "mean_image_psnr", "p10_image_psnr", "fd_to_uncached", "fd_a", "fd_b", "fd_to_data", "accuracy",
          "model", "sampler", "seed_sets", "session", "commit", "device", "torch", "finished")
FLOAT_FIELDS = ("full_fraction", "seconds", "speedup", "psnr", "psnr_a", "psnr_b", "mean_image_psnr",
                "p10_image_psnr", "fd_to_uncached", "fd_a", "fd_b", "fd_to_data", "accuracy")
INT_FIELDS = ("samples", "session")


def _decode(record: dict) -> dict | None:
    """A CSV record as typed values, or None for an incomplete one (a run killed mid-write)."""
    if None in record or any(record.get(name) is None for name in FIELDS):  # too many / too few cells
        return None
    row = dict(record)
    try:
        for name in FLOAT_FIELDS:
            row[name] = float(row[name]) if row[name] != "" else float("nan")
        for name in INT_FIELDS:
            row[name] = int(row[name])
    except ValueError:
        return None
    if not row["schedule"] or not row["method"] or not row["finished"]:
        return None
    return row


def _encode(row: dict) -> dict:
    out = {}
    for name in FIELDS:
        value = row.get(name, "")
        if name in FLOAT_FIELDS:
            value = "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"
        out[name] = value
    return out


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The complete rows of a sweep CSV (typed), in file order; a partly written last record is skipped."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or tuple(reader.fieldnames) != FIELDS:
                raise InputValueError(f"{path} is not a results CSV of this eoc evaluate (columns "
                                      f"{reader.fieldnames}; expected {', '.join(FIELDS)})")
            rows = [_decode(record) for record in reader]
    except FileNotFoundError:
        raise InputValueError(f"{path}: no such file (run eoc evaluate first)") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputValueError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    return [row for row in rows if row is not None]


class SweepCSV:
    """The results CSV of a sweep, one record per finished (schedule, method) row, flushed to disk as
    each row finishes, so that a killed sweep loses at most the row it was running.

    ``resume=False`` starts a new file; ``resume=True`` keeps the complete rows of an existing one
    (rewriting it without a partly written last record) and :meth:`done` tells which to skip.
    ``write=False`` (ranks other than 0 under torchrun) reads but never writes.
    """

    def __init__(self, path: str | os.PathLike, resume: bool, write: bool = True):
        self.path, self.write = os.fspath(path), write
        self.rows: list[dict] = []
        if resume and os.path.exists(self.path):
            self.rows = _unique(read_rows(self.path))
        if write:
            tmp = self.path + ".tmp"
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS)
                writer.writeheader()
                writer.writerows(_encode(row) for row in self.rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def done(self, schedule: str, method: str) -> dict | None:
        return next((r for r in self.rows if r["schedule"] == schedule and r["method"] == method), None)

    def append(self, row: dict) -> dict:
        row = _decode(_encode(row) | {"finished": row.get("finished") or time.strftime("%Y-%m-%dT%H:%M:%S")})
        if row is None:
            raise ValueError("SweepCSV.append: a row without schedule, method or numbers")
        self.rows.append(row)
        if self.write:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=FIELDS).writerow(_encode(row))
                f.flush()
                os.fsync(f.fileno())
        return row


def _unique(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for row in rows:
        key = (row["schedule"], row["method"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def git_commit() -> str:
    """Short commit of the source tree this module runs from ('+dirty' with uncommitted tracked changes),
    or 'unknown' outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=here, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(commit) and bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


# ------------------------------------------------------------------------------------------------ table
def sort_rows(rows: list[dict], method_order=()) -> list[dict]:
    """The uncached row first, then by schedule (interval, then warm-up), then by method: the order of
    ``method_order`` (specs), then ``DEFAULT_METHODS``, then the others by spec."""
    order = {spec: i for i, spec in enumerate(dict.fromkeys(list(method_order) + list(DEFAULT_METHODS)))}
    return sorted(rows, key=lambda r: (_schedule_order(r["schedule"]), order.get(r["method"], len(order)),
                                       r["method"]))


def best_presets(rows: list[dict]) -> dict[str, dict]:
    """Per schedule, the fixed preset (not plain, not calibrated) with the highest pooled PSNR over all
    seed sets."""
    best = {}
    for row in rows:
        if row["method"] in (UNCACHED, "plain", "calibrated") or math.isnan(row["psnr"]):
            continue
        if row["schedule"] not in best or row["psnr"] > best[row["schedule"]]["psnr"]:
            best[row["schedule"]] = row
    return best


def _has_sets(rows) -> bool:
    return any(not math.isnan(r["psnr_b"]) for r in rows)


def calibrated_margins(rows: list[dict]) -> dict[str, tuple]:
    """Per schedule with both a calibrated row and a preset: (best preset's spec, margin over it per seed
    set, margin over all sets), margins = calibrated − preset pooled PSNR, dB."""
    best, out = best_presets(rows), {}
    for row in rows:
        if row["method"] == "calibrated" and row["schedule"] in best:
            other = best[row["schedule"]]
            sets = tuple(row[k] - other[k] for k in ("psnr_a", "psnr_b") if not math.isnan(row[k]))
            out[row["schedule"]] = (other["method"], sets, row["psnr"] - other["psnr"])
    return out


def _f(value: float, spec: str = ".2f") -> str:
    return "—" if value is None or math.isnan(value) else format(value, spec)


def conditions(rows: list[dict]) -> str:
    """One paragraph of the sweep's conditions, read from its rows (model, sampler, samples, seed sets,
    and each session's commit, device, torch and dates)."""
    if not rows:
        return "(no rows)"
    first = rows[0]
    sessions = {}
    for row in rows:
        sessions.setdefault(row["session"], []).append(row)
    parts = []
    for number, members in sorted(sessions.items()):
        dates = sorted(r["finished"] for r in members)
        parts.append(f"session {number}: {len(members)} rows, commit {members[0]['commit']}, {members[0]['device']}, "
                     f"torch {members[0]['torch']}, {dates[0][:16]} to {dates[-1][:16]}")
    sets = first["seed_sets"].replace(";", " / ")
    return (f"{first['model']}, {first['sampler']}, {first['samples']} samples per method (evaluation seed sets "
            f"{sets}, disjoint from every calibration, fitting and tuning seed); " + "; ".join(parts) + ".")


def format_markdown(rows: list[dict], method_order=(), notes=()) -> str:
    """The sweep as Markdown: conditions, then one table sorted by schedule then method, the best fixed
    preset of each schedule marked ★ and calibrated's margin over it per seed set."""
    rows = sort_rows(rows, method_order)
    per_set = _has_sets(rows)
    best = {r["schedule"]: r["method"] for r in best_presets(rows).values()}
    margins = calibrated_margins(rows)
    head = ["schedule", "method", "full steps", "time s", "speedup", "pooled PSNR dB"]
    head += ["pooled PSNR A / B dB"] if per_set else []
    head += ["mean / p10 per-image PSNR dB", "FD to uncached", "calibrated − best preset dB" +
             (" (A / B)" if per_set else "")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cached = r["method"] != UNCACHED
        name = method_label(r["method"]) if cached else "uncached"
        if best.get(r["schedule"]) == r["method"]:
            name += " ★"
        cells = [schedule_label(r["schedule"]), name, _f(r["full_fraction"], ".3f"), _f(r["seconds"], ".1f"),
                 f"{_f(r['speedup'])}×", _f(r["psnr"]) if cached else "—"]
        if per_set:
            cells.append(f"{_f(r['psnr_a'])} / {_f(r['psnr_b'])}" if cached else "—")
        cells += [f"{_f(r['mean_image_psnr'])} / {_f(r['p10_image_psnr'])}" if cached else "—",
                  _f(r["fd_to_uncached"], ".3f")]
        margin = ""
        if r["method"] == "calibrated" and r["schedule"] in margins:
            preset, sets, overall = margins[r["schedule"]]
            shown = " / ".join(f"{v:+.2f}" for v in sets) if per_set else f"{overall:+.2f}"
            margin = f"{shown} (vs {method_label(preset)})"
        cells.append(margin)
        lines.append("| " + " | ".join(cells) + " |")
    schedules = sorted({r["schedule"] for r in rows if r["method"] != UNCACHED}, key=_schedule_order)
    missing = [s for s in schedules if not any(r["schedule"] == s and r["method"] == "calibrated" for r in rows)]
    text = [conditions(rows), "", "\n".join(lines), "",
            "Pooled PSNR = 10·log10(4 / MSE over every pixel of every image) against the uncached samples from the "
            "same noise, images clamped to [−1, 1]; the mean and 10th percentile of per-image PSNR beside it. Full "
            "steps = computed (step, block, branch) entries / all. Time: wall time of the row's sampling in the "
            "session that ran it; speedup = the uncached row's time / the row's time. ★ = the best fixed preset "
            "of the schedule (not plain, not calibrated) by pooled PSNR over all samples; calibrated's margin is "
            "against that preset" + (", per seed set A / B." if per_set else ".") + " The prior (and with it the "
            "offline judgment) is given to trend, delta and calibrated only; extrapolate, TaylorSeer and HiCache "
            "correct from the sample's own computed features."]
    if any(_schedule_order(s)[1] for s in schedules):
        text.append("TaylorSeer N, W: TaylorSeer's schedule (its first_enhance W, interval N): full steps t < W and "
                    "t = W − 1 + j·N, i.e. FORA N with W − 1 warm-up steps (eoc_dit.schedules.TaylorSeerSchedule).")
    if missing and (not method_order or "calibrated" in method_order):  # not when calibrated was not asked for
        why = ("the prior holds no fit for that schedule" if method_order else
               "the prior holds no fit for that schedule, or calibrated was not among the methods run")
        text.append(f"No calibrated row for {', '.join(schedule_label(s) for s in missing)}: {why}.")
    text += list(notes)
    return "\n".join(text) + "\n"


# ------------------------------------------------------------------------------------------------ figure
WARMUP_MARKER = "D"
# One colour family per mode, shades by order / θ; the method under study (calibrated) thick and red.
_FAMILIES = {"taylorseer": "Blues", "hicache": "Greens", "extrapolate": "Oranges", "trend": "Purples",
             "delta": "copper"}


def method_styles(methods: list[str]) -> dict[str, dict]:
    """Plot style (colour, line style, width) of each method spec: plain reuse black dashed, calibrated
    thick red, every other mode a colour family with one shade per parameter."""
    from matplotlib import colormaps

    styles = {}
    for method in methods:
        mode = method.split(":")[0]
        if mode == "plain":
            styles[method] = {"color": "black", "linestyle": "--", "linewidth": 1.5}
        elif mode == "calibrated":
            styles[method] = {"color": "tab:red", "linestyle": "-", "linewidth": 2.8}
        else:
            family = [m for m in methods if m.split(":")[0] == mode]
            shade = 0.45 + 0.45 * family.index(method) / max(len(family) - 1, 1)
            cmap = colormaps[_FAMILIES.get(mode, "Greys")]
            styles[method] = {"color": cmap(shade), "linestyle": "-", "linewidth": 1.5}
    return styles


def plot_quality_vs_speed(rows_or_csv, png_path: str | os.PathLike | None = None, method_order=()):
    """The quality-vs-speed figure: pooled PSNR (y) against the fraction of full steps (x), one line per
    method across the FORA N schedules without warm-up, the warm-up schedules as separate markers of
    the method's colour. ``rows_or_csv``: rows (``read_rows``) or a results CSV's path. Writes a PNG to
    ``png_path`` when given; returns the ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state):
    its one axes holds one line per method with a FORA N point and one marker series per method with a
    warm-up point. Schedules of equal compute share an x (FORA N = 5 and 6 of 20 steps): the line runs
    through them from the larger N up and the top axis names them in one tick."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = read_rows(rows_or_csv) if isinstance(rows_or_csv, (str, os.PathLike)) else list(rows_or_csv)
    rows = sort_rows([r for r in rows if r["method"] != UNCACHED and not math.isnan(r["psnr"])], method_order)
    if not rows:
        raise InputValueError("no cached rows to plot")
    fig = Figure(figsize=(11, 6.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    styles = method_styles(methods)

    def warmup(row):
        return _schedule_order(row["schedule"])[1]

    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        # Along x; schedules of equal compute (N = 5 and 6 of 20 steps both compute 4) from the larger N up.
        fora = sorted((r for r in mine if warmup(r) == 0),
                      key=lambda r: (r["full_fraction"], -_schedule_order(r["schedule"])[0]))
        style = styles[method]
        if fora:
            ax.plot([r["full_fraction"] for r in fora], [r["psnr"] for r in fora], marker="o", markersize=4,
                    label=method_label(method), **style)
        warm = [r for r in mine if warmup(r) > 0]
        if warm:
            ax.plot([r["full_fraction"] for r in warm], [r["psnr"] for r in warm], linestyle="none",
                    marker=WARMUP_MARKER, color=style["color"], markersize=7, markeredgecolor="black",
                    label="_nolegend_" if fora else method_label(method))
    handles, labels = ax.get_legend_handles_labels()
    warm_rows = [r for r in rows if warmup(r) > 0]
    if warm_rows:
        shown = sorted({(r["schedule"], r["full_fraction"]) for r in warm_rows}, key=lambda s: _schedule_order(s[0]))
        handles.append(Line2D([], [], linestyle="none", marker=WARMUP_MARKER, color="0.7", markeredgecolor="black"))
        labels.append("warm-up schedule: " + ", ".join(schedule_label(key) for key, _ in shown))
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fora_points = sorted({(_schedule_order(r["schedule"])[0], r["full_fraction"]) for r in rows if warmup(r) == 0})
    if fora_points:  # the FORA intervals of each x position, on the top axis (one tick, "N=5, 6", where they share it)
        at = {}
        for n, x in fora_points:
            at.setdefault(x, []).append(str(n))
        top = ax.secondary_xaxis("top")
        top.set_xticks(list(at), labels=[f"N={', '.join(ns)}" for ns in at.values()])
        top.tick_params(labelsize=8)
    ax.set_xlabel("fraction of full steps (computed block-steps / total; left = faster)")
    ax.set_ylabel("pooled PSNR vs uncached (dB)")
    first = rows[0]
    sets = first["seed_sets"].split(";")
    ax.set_title(f"{first['model']}, {first['sampler']}\npooled PSNR vs compute: {first['samples']} samples per "
                 f"point, evaluation seed set{'s' if len(sets) > 1 else ''} {' and '.join(sets)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    if png_path is not None:
        fig.savefig(png_path, format="png")
    return fig


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["DEFAULT_METHODS", "FIELDS", "MethodSpec", "SweepCSV", "best_presets", "calibrated_margins",
           "default_methods", "format_markdown", "full_fraction", "method_label", "parse_method", "parse_methods",
           "plot_quality_vs_speed", "read_rows", "schedule_key", "sweep_schedules"]
