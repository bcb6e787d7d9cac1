"""Turn results records (`runs/results.jsonl`) into a paper-style table.

    python experiments/aggregate.py [runs/results.jsonl] [--metrics fid,acc_logreg,acc_mlp,acc_cnn]

One row per (method, data, epsilon, other overrides) with the steps taken, the wall time and the
mean and spread over seeds of each metric; each column header names the backbone the metric was
computed on, so numbers from different backbones never share a column. Runs without evaluation
(`eval=none`) are listed too, with "-" for their metrics.
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
    return [r for r in records if r.get("kind") == "train"]


IGNORED_OVERRIDES = ("seed=", "hydra.", "results_file=", "privacy.epsilon=", "privacy=", "method=", "data=")


def setting(record: dict) -> str:
    """The run's other overrides: runs differing in these are not pooled as seeds."""
    kept = [o for o in record.get("overrides", []) if not o.startswith(IGNORED_OVERRIDES)]
    return " ".join(sorted(kept)) or "default"


def column(metric: str, entry: dict) -> str:
    where = entry.get("backbone") or entry.get("selected_on", "")
    return f"{metric} [{where}]" if "backbone" in entry else metric


def steps_taken(record: dict) -> int | None:
    """Training steps of the run: the ledger's count, or the planned steps for `privacy=none` (no ledger;
    a run is recorded only when it finished)."""
    privacy = record.get("privacy") or {}
    steps = privacy.get("steps")
    return steps if steps is not None else privacy.get("planned_steps")


def cell(values: list[float]) -> str:
    """Mean ± standard deviation over seeds ("-" for none)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def steps_cell(values: list[int]) -> str:
    """One number when the pooled runs agree, else their range."""
    if not values:
        return "-"
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def table(records: list[dict], metrics: tuple[str, ...]) -> str:
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    runs: dict[tuple, list[dict]] = defaultdict(list)
    columns: list[str] = []
    for record in records:
        # The swept value (records before the spent epsilon was recorded held only the target, as `epsilon`).
        eps = record.get("target_epsilon", record.get("epsilon"))
        key = (record["method"], record["data"], "none" if eps is None else f"{eps:g}", setting(record))
        runs[key].append(record)
        for metric in metrics:
            entry = (record.get("metrics") or {}).get(metric)
            if entry is None:
                continue
            name = column(metric, entry)
            if name not in columns:
                columns.append(name)
            groups[key][name].append(float(entry["value"]))
    header = ["method", "data", "epsilon", "setting", "runs", "steps", "wall time (s)", *columns]
    rows = [header, ["---"] * len(header)]
    for key in sorted(runs):
        pooled = runs[key]
        steps = steps_cell([s for s in map(steps_taken, pooled) if s is not None])
        wall = cell([float(r["wall_time_s"]) for r in pooled if r.get("wall_time_s") is not None])
        rows.append([*key, str(len(pooled)), steps, wall, *(cell(groups[key].get(name, [])) for name in columns)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="runs/results.jsonl", type=Path)
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    args = parser.parse_args(argv)
    print(table(load_records(args.results), tuple(m for m in args.metrics.split(",") if m)))


if __name__ == "__main__":
    sys.exit(main())
