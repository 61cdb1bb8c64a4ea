"""Markdown performance tables from saved pytest-benchmark JSON, so that no number is typed by hand.

    python benchmarks/tables.py RUN.json [MORE.json ...] [--out FILE] [--note TEXT]

RUN.json: what ``pytest benchmarks --benchmark-only --benchmark-json=RUN.json`` wrote, or a run saved
with ``--benchmark-autosave`` (``.benchmarks/<machine>/NNNN_*.json``). Each file gives one section: its
conditions (device, torch / triton versions, commit, date), then one table per suite (kernels per op,
the cached step, sampling) with the median of each benchmark and the ratios the suites recorded in
``extra_info`` against baselines measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys

KERNEL_ORDER = {"torch": 0, "triton": 1, "cpp": 2, "compile": 3, "copy": 4}
SEGMENT_CPU_ORDER = {"torch": 0, "compile": 1, "cpp": 2, "copy": 3}
CORRECTION_ORDER = {"plain": 0, "extrapolate": 1, "all": 2}
DTYPE_ORDER = {"fp32": 0, "fp16": 1, "bf16": 2}


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _median(bench):
    return bench["stats"]["median"]


def conditions(run: dict) -> str:
    """One line of conditions, from the first benchmark's environment record and pytest-benchmark's."""
    benches = run["benchmarks"]
    info = benches[0]["extra_info"] if benches else {}
    commit = info.get("commit") or run.get("commit_info", {}).get("id", "?")[:7]
    date = info.get("date") or run.get("datetime", "?")
    rounds = sorted(b["stats"]["rounds"] for b in benches)
    spread = f"{rounds[0]}–{rounds[-1]}" if rounds else "?"
    return (f"device: {info.get('device', '?')} · torch {info.get('torch', '?')} · triton {info.get('triton', '?')} · "
            f"commit {commit} · {date} · median of {spread} rounds (pytest-benchmark)")


def kernel_tables(benches) -> str:
    out = []
    for op in sorted({b["extra_info"]["op"] for b in benches}):
        rows = sorted((b for b in benches if b["extra_info"]["op"] == op), key=lambda b: (
            b["extra_info"]["correction"], DTYPE_ORDER.get(b["extra_info"]["dtype"], 9), b["extra_info"]["shapes"]["B"],
            KERNEL_ORDER.get(b["extra_info"]["backend"], 9)))
        shapes = rows[0]["extra_info"]["shapes"]
        extent = f"N={shapes['N']}, C={shapes['C']}" + (f", S={shapes['S']}" if "S" in shapes else "")
        copy = rows[0]["extra_info"].get("copy_gbps")
        out.append(f"#### {op} ({extent}; copy bandwidth measured in the run: {_fmt(copy, '.1f')} GB/s)\n")
        out.append(_table(
            ["correction", "dtype", "B", "backend", "median µs", "GB/s", "% of copy BW", "speedup vs eager"],
            [[e["correction"], e["dtype"], e["shapes"]["B"], e["backend"], _fmt(_median(b) * 1e6, ".1f"),
              _fmt(e.get("gbps"), ".2f"), _fmt(e.get("pct_copy_bw"), ".1f"), _fmt(e.get("speedup_vs_eager"), ".2f")]
             for b in rows for e in [b["extra_info"]]]))
    return "\n".join(out)


def segment_cpu_table(benches) -> str:
    """cached_segment on CPU: cpp vs eager vs torch.compile vs a copy of the same bytes (test_segment_cpu)."""
    rows = sorted(benches, key=lambda b: (
        b["extra_info"]["shapes"]["N"], DTYPE_ORDER.get(b["extra_info"]["dtype"], 9),
        CORRECTION_ORDER.get(b["extra_info"]["correction"], 9), SEGMENT_CPU_ORDER.get(b["extra_info"]["backend"], 9)))
    head = ("#### cached_segment on CPU — cpp vs eager reference vs torch.compile(reference) vs a copy of the same "
            f"bytes, {rows[0]['extra_info']['shapes']['B']} rows\n")
    table = _table(
        ["shape", "dtype", "correction", "backend", "median µs", "GB/s", "× eager", "× compile", "% of copy floor"],
        [[f"{e['shape_name']} (N={e['shapes']['N']}, C={e['shapes']['C']}, S={e['shapes']['S']})", e["dtype"],
          e["correction"], e["backend"], _fmt(_median(b) * 1e6, ".1f"), _fmt(e.get("gbps"), ".2f"),
          _fmt(e.get("speedup_vs_eager"), ".2f"), _fmt(e.get("speedup_vs_compile"), ".2f"),
          _fmt(e.get("pct_copy_floor"), ".0f")]
         for b in rows for e in [b["extra_info"]]])
    return head + "\n" + table + "\n" + segment_cpu_targets(rows)


def segment_cpu_targets(rows) -> str:
    """Issue 12's CPU targets per case: cpp ≥ 3× eager, ≥ 1.2× torch.compile, ≥ 60% of the copy floor."""
    lines = []
    for b in rows:
        e = b["extra_info"]
        if e["backend"] != "cpp":
            continue
        checks = [(e.get("speedup_vs_eager"), 3.0, "≥ 3× eager"), (e.get("speedup_vs_compile"), 1.2, "≥ 1.2× compile"),
                  (None if e.get("pct_copy_floor") is None else e["pct_copy_floor"] / 100, 0.6, "≥ 60% of copy")]
        verdicts = [f"{label}: {'met' if value >= target else 'MISSED'}" for value, target, label in checks
                    if value is not None]
        lines.append(f"- {e['shape_name']} {e['dtype']} {e['correction']}: " + ", ".join(verdicts))
    return ("Targets (issue 12), cpp rows:\n\n" + "\n".join(lines) + "\n") if lines else ""


def step_table(benches) -> str:
    first = benches[0]["extra_info"]
    shapes = first["shapes"]
    rows = sorted(benches, key=lambda b: (b["extra_info"]["rows"], b["extra_info"]["variant"] != "full step (uncached)",
                                          b["extra_info"]["variant"], KERNEL_ORDER.get(b["extra_info"]["backend"], 9)))
    head = (f"#### One step — {first['model']} (N={shapes['N']}, C={shapes['C']}, {shapes['L']} blocks), "
            f"{first['dtype']}; "
            "cached = a step reusing every block (one gate matmul + one cached_segment)\n")
    return head + "\n" + _table(
        ["rows", "variant", "backend", "median ms", "ratio to full step", "speedup vs eager"],
        [[e["rows"], e["variant"], e["backend"] or "—", _fmt(_median(b) * 1e3, ".2f"),
          _fmt(e.get("ratio_to_full_step"), ".3f"), _fmt(e.get("speedup_vs_eager"), ".2f")]
         for b in rows for e in [b["extra_info"]]])


def sampling_tables(benches) -> str:
    """One sampling table per model (the suite's own model, and the trained testbed's comparison)."""
    models = sorted({b["extra_info"]["model"] for b in benches})
    return "\n".join(sampling_table([b for b in benches if b["extra_info"]["model"] == model]) for model in models)


def sampling_table(benches) -> str:
    first = benches[0]["extra_info"]
    shapes = first["shapes"]
    rows = sorted(benches, key=lambda b: (b["extra_info"]["variant"] != "uncached", b["extra_info"]["variant"],
                                          KERNEL_ORDER.get(b["extra_info"]["backend"], 9)))
    head = (f"#### Sampling — {first['model']} (N={shapes['N']}, C={shapes['C']}, {shapes['L']} blocks), "
            f"{first['dtype']}, "
            f"{first['sampler'].upper()}-{first['steps']}, {first['images']} images with CFG {first['cfg_scale']:g} "
            f"({first['rows']} rows)\n")
    return head + "\n" + _table(
        ["variant", "backend", "steps computing", "median ms", "speedup vs uncached", "ideal", "% of ideal",
         "time ÷ plain FORA"],
        [[e["variant"], e["backend"] or "—", e["full_steps"], _fmt(_median(b) * 1e3, ".1f"),
          _fmt(e.get("speedup_vs_uncached"), ".2f"), _fmt(e.get("ideal_speedup"), ".2f"),
          _fmt(e.get("pct_of_ideal"), ".0f"), _fmt(e.get("ratio_to_plain"), ".3f")]
         for b in rows for e in [b["extra_info"]]])


def render(run: dict, source: str, note: str | None = None) -> str:
    benches = [b for b in run["benchmarks"] if "suite" in b.get("extra_info", {})]
    parts = [f"### {source}\n", conditions(run) + "\n"] + ([note + "\n"] if note else [])
    for suite, render_suite in (("kernels", kernel_tables), ("segment-cpu", segment_cpu_table), ("step", step_table),
                                ("sampling", sampling_tables)):
        selected = [b for b in benches if b["extra_info"]["suite"] == suite]
        if selected:
            parts.append(render_suite(selected))
    if not any(part.startswith("####") for part in parts):
        parts.append("(no eoc benchmarks with extra_info in this file)\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="pytest-benchmark JSON files")
    parser.add_argument("--out", help="write the Markdown here instead of stdout")
    parser.add_argument("--note", help="a line to print under each file's conditions (e.g. the machine's load)")
    args = parser.parse_args(argv)
    text = "\n".join(render(json.load(open(path)), path, args.note) for path in args.runs)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
