"""`dp-diffusion report`: results files or run dirs -> a self-contained folder.

    dp-diffusion report [RESULTS.jsonl | RUN_DIR ...] [--out DIR] [--wandb]

The folder holds RESULTS.md (per data set: method x epsilon table, mean ± std over seeds, fidelity
columns named by backbone, † on runs whose epsilon is not a guarantee; the published numbers beside
ours where method, data family and epsilon match, with every difference in setting said), the PNG
plots it shows (FID and downstream accuracy against epsilon) and the mosaic of sample grids.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dp_diffusion.config import ConfigError
from dp_diffusion.report.published import PUBLISHED_FILE, compare, comparison_table, load_published
from dp_diffusion.report.records import EPSILON_IS_GUARANTEE, grid_path, identity, load_records
from dp_diffusion.report.tables import DEFAULT_METRICS, NOT_A_GUARANTEE_MARK, Group, frontier_table, group_runs

REPORT_NAME = "RESULTS.md"
GRIDS_DIR = "grids"  # in the report folder: a copy of each run's sample grid, for the mosaic of later reports

INTRO = f"""Each row pools the runs of one setting that differ only in their seed: mean ± standard deviation
over seeds (one value for one seed). A setting is named by the run's overrides other than method, data,
epsilon and seed; runs whose resolved configs agree are one setting, under the name of the frontier entry
where one started it; a recipe's run without privacy is on its private runs' line; other settings whose
names agree but configs do not are named with the keys that differ, in brackets. A fidelity column names
the backbone its features come from, in brackets; numbers on different backbones never share a column.
Downstream accuracy (`acc_*`) is that of DPDM's classifiers trained on the samples and scored on the real
test split. `{NOT_A_GUARANTEE_MARK}` marks a
run whose epsilon is not a differential-privacy guarantee (its reason is listed under the table; a run
says so with `privacy.{EPSILON_IS_GUARANTEE}: false` in its record)."""


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def panels(groups: Sequence[Group], columns: Sequence[str], prefix: str) -> dict[str, Any]:
    from dp_diffusion.report.plots import frontier_series

    found = {}
    for column in columns:
        if column.split(" [")[0].startswith(prefix):
            lines, baselines = frontier_series(groups, column)
            if lines or baselines:
                found[column] = (lines, baselines)
    return found


def data_section(data: str, groups: list[Group], columns: list[str], entries: list[dict], out: Path) -> list[str]:
    """RESULTS.md's section for one data set; writes its figures into `out`."""
    from dp_diffusion.report.plots import frontier_figure, mosaic_figure, save_figure

    lines = [f"## {data}", "", frontier_table(groups, columns), ""]
    caveats = [g for g in groups if g.caveat]
    lines += [f"{NOT_A_GUARANTEE_MARK} {g.label.rstrip(' ' + NOT_A_GUARANTEE_MARK)} at epsilon={g.epsilon:g}: "
              f"{g.caveat}" for g in caveats]
    if caveats:
        lines.append("")
    figures = [("fid", "FID (lower is better)", f"FID against epsilon on {data}", "fid_vs_epsilon"),
               ("acc_", "accuracy on the real test split", f"Downstream accuracy against epsilon on {data}",
                "accuracy_vs_epsilon")]
    for prefix, ylabel, title, stem in figures:
        found = panels(groups, columns, prefix)
        if found:
            name = f"{stem}_{slug(data)}.png"
            save_figure(frontier_figure(found, ylabel, title), out / name)
            lines += [f"![{title}]({name})", ""]
    mosaic = mosaic_figure(groups, f"Samples on {data}: method x epsilon (lowest seed)")
    if mosaic is None:
        lines += ["No sample grids found (a run writes samples_grid.png into its run dir).", ""]
    else:
        name = f"samples_{slug(data)}.png"
        save_figure(mosaic, out / name)
        lines += ["### Samples", "", f"![Samples on {data}, method x epsilon]({name})", ""]
    rows = compare(groups, entries)
    lines += ["### Published numbers", ""]
    if rows:
        lines += ["Where method, data family and epsilon match. Every difference in setting is listed; "
                  "a number with differences is context, not a like-for-like comparison.", "",
                  comparison_table(rows), ""]
    else:
        lines += ["No published number matches these runs' method, data set and epsilon.", ""]
    return lines


def with_kept_grid(record: dict[str, Any], grids: Path) -> dict[str, Any]:
    """`record`, its sample grid copied into `grids` (named by the run's identity) and pointed at there; where
    the run dir is gone (another machine, a cleaned `runs/`), the copy an earlier report kept. So a report
    regenerated from its own `results.jsonl` keeps every run's grid in its mosaic."""
    kept = grids / f"{hashlib.sha1(identity(record).encode()).hexdigest()[:16]}.png"
    found = grid_path(record)
    if found is not None and found.resolve() != kept.resolve():
        grids.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found, kept)
    if not kept.is_file():
        return record
    return {**record, "samples": {**(record.get("samples") or {}), "grid": str(kept.resolve())}}


def write_report(records: Sequence[dict[str, Any]], out: str | Path, sources: Sequence[str] = (),
                 metrics: Sequence[str] = DEFAULT_METRICS, published: str | Path = PUBLISHED_FILE) -> Path:
    """Write RESULTS.md and its figures into `out`; returns the RESULTS.md path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = load_published(published)
    groups, columns = group_runs([with_kept_grid(record, out / GRIDS_DIR) for record in records], metrics)
    by_data: dict[str, list[Group]] = defaultdict(list)
    for group in groups:
        by_data[group.data].append(group)
    lines = ["# Results", ""]
    if sources:
        lines += [f"From {', '.join(f'`{s}`' for s in sources)}: {len(records)} runs.", ""]
    lines += [INTRO, ""]
    for data in sorted(by_data):
        lines += data_section(data, by_data[data], columns, entries, out)
    lines += [f"Published numbers: `dp_diffusion/report/{Path(published).name}` (each with its source)."]
    path = out / REPORT_NAME
    path.write_text("\n".join(lines) + "\n")
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dp-diffusion report", description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", default=["runs/results.jsonl"],
                        help="results.jsonl files or run/sweep dirs (default: runs/results.jsonl)")
    parser.add_argument("--out", default="runs/report", help="folder to write (default: runs/report)")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="metric columns, comma-separated")
    parser.add_argument("--published", default=str(PUBLISHED_FILE), help="published-numbers file")
    parser.add_argument("--wandb", action="store_true", help="also log the report's tables and plots to W&B")
    parser.add_argument("--wandb-project", default="dp-diffusion")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """The command; bad input (no records, a missing file) is a ConfigError, which the CLI prints as one line."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    records = load_records(args.sources)
    metrics = tuple(m for m in args.metrics.split(",") if m)
    try:
        path = write_report(records, args.out, args.sources, metrics, args.published)
    except OSError as err:
        raise ConfigError(f"cannot write the report into {args.out}: {err.strerror or err}") from None
    print(f"report: {path}")
    if args.wandb:
        from dp_diffusion.wandb_logging import log_report

        print(f"W&B: {log_report(path.parent, project=args.wandb_project)}")
    return path
