"""Turn results records (`runs/results.jsonl`) into a paper-style table.

    python experiments/aggregate.py [runs/results.jsonl] [--metrics fid,acc_logreg,acc_mlp,acc_cnn]

One row per (method, data, epsilon, other overrides) with the steps taken, the wall time and the
mean and spread over seeds of each metric; each column header names the backbone the metric was
computed on, so numbers from different backbones never share a column. Runs without evaluation
(`eval=none`) are listed too, with "-" for their metrics.

A thin wrapper: the table is `dp_diffusion.report.tables.flat_table`; `dp-diffusion report` writes the
full report (per-data-set tables, plots, sample mosaic, published numbers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dp_diffusion.config import ConfigError
from dp_diffusion.report.records import load_records as _load
from dp_diffusion.report.tables import DEFAULT_METRICS, flat_table as table  # noqa: F401 (the old name)


def load_records(path: Path) -> list[dict]:
    """The training records of one results file."""
    if not Path(path).is_file():
        raise SystemExit(f"error: no results file at {path} (train or evaluate writes it)")
    try:
        return _load([path])
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="runs/results.jsonl", type=Path)
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    args = parser.parse_args(argv)
    print(table(load_records(args.results), tuple(m for m in args.metrics.split(",") if m)))


if __name__ == "__main__":
    sys.exit(main())
