"""Turn results records (`runs/results.jsonl`) into a paper-style table.

    python experiments/aggregate.py [runs/results.jsonl] [--metrics fid,acc_logreg,acc_mlp,acc_cnn]

One row per (method, data, epsilon, other overrides) with the mean and spread over seeds of each
metric; each column header names the backbone the metric was computed on, so
numbers from different backbones never share a column.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

DEFAULT_METRICS = ("fid", "precision", "recall", "acc_logreg", "acc_mlp", "acc_cnn")


def load_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"error: no results file at {path} (train or evaluate writes it)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == "train" and r.get("metrics")]


IGNORED_OVERRIDES = ("seed=", "hydra.", "results_file=", "privacy.epsilon=", "privacy=", "method=", "data=")


def setting(record: dict) -> str:
    """The run's other overrides: runs differing in these are not pooled as seeds."""
    kept = [o for o in record.get("overrides", []) if not o.startswith(IGNORED_OVERRIDES)]
    return " ".join(sorted(kept)) or "default"


def column(metric: str, entry: dict) -> str:
    where = entry.get("backbone") or entry.get("selected_on", "")
    return f"{metric} [{where}]" if "backbone" in entry else metric


def table(records: list[dict], metrics: tuple[str, ...]) -> str:
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    columns: list[str] = []
    for record in records:
        eps = record.get("epsilon")
        key = (record["method"], record["data"], "none" if eps is None else f"{eps:g}", setting(record))
        for metric in metrics:
            entry = record["metrics"].get(metric)
            if entry is None:
                continue
            name = column(metric, entry)
            if name not in columns:
                columns.append(name)
            groups[key][name].append(float(entry["value"]))
    lines = ["| method | data | epsilon | setting | runs | " + " | ".join(columns) + " |",
             "|" + "---|" * (5 + len(columns))]
    for (method, data, eps, other), values in sorted(groups.items()):
        runs = max((len(v) for v in values.values()), default=0)
        cells = []
        for name in columns:
            vals = values.get(name, [])
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.4g}")
            else:
                cells.append(f"{statistics.mean(vals):.4g} ± {statistics.stdev(vals):.2g}")
        lines.append(f"| {method} | {data} | {eps} | {other} | {runs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="runs/results.jsonl", type=Path)
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    args = parser.parse_args(argv)
    print(table(load_records(args.results), tuple(m for m in args.metrics.split(",") if m)))


if __name__ == "__main__":
    sys.exit(main())
