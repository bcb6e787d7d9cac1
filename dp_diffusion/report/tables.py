"""Markdown tables of results records: mean ± std over seeds, each fidelity column named by its backbone.

Two shapes: `flat_table` (every method, data set and setting in one table; what
`experiments/aggregate.py` prints) and `frontier_table` (one data set, method x epsilon).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dp_diffusion.report.records import not_a_guarantee, settings, steps_taken, swept_epsilon

DEFAULT_METRICS = ("fid", "precision", "recall", "acc_logreg", "acc_mlp", "acc_cnn")
NOT_A_GUARANTEE_MARK = "†"


def column(metric: str, entry: Mapping[str, Any]) -> str:
    """The column a metric value goes to: fidelity metrics carry their backbone in the name, so numbers
    from different backbones never share a column."""
    return f"{metric} [{entry['backbone']}]" if "backbone" in entry else metric


def cell(values: Sequence[float]) -> str:
    """Mean ± sample standard deviation over seeds ("-" for none)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def steps_cell(values: Sequence[int]) -> str:
    """One number when the pooled runs agree, else their range."""
    if not values:
        return "-"
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def epsilon_text(eps: float | None) -> str:
    return "none" if eps is None else f"{eps:g}"


@dataclass
class Group:
    """The runs of one setting that differ only in their seed."""

    method: str
    data: str
    epsilon: float | None
    setting: str
    caveat: str | None  # why the epsilon is not a guarantee (None: it is, or the run is non-private)
    runs: list[dict[str, Any]] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    @property
    def label(self) -> str:
        """The method, with the setting where it is not the default (a line in the plots)."""
        name = self.method if self.setting == "default" else f"{self.method} ({self.setting})"
        return f"{name} {NOT_A_GUARANTEE_MARK}" if self.caveat else name

    @property
    def series_key(self) -> tuple[str, str, bool]:
        return self.method, self.setting, self.caveat is not None

    def stats(self, name: str) -> tuple[float, float] | None:
        """(mean, std over seeds; 0 for one seed) of a column, or None without values."""
        values = self.values.get(name) or []
        if not values:
            return None
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _eps(group: Group) -> float:
    return math.inf if group.epsilon is None else group.epsilon


def flat_order(group: Group) -> tuple:
    return group.method, group.data, _eps(group), group.setting, group.caveat is not None


def frontier_order(group: Group) -> tuple:
    """A method's settings together, each a run of rising epsilon (the line it makes in the plots)."""
    return group.method, group.setting, group.caveat is not None, _eps(group)


def group_runs(records: Sequence[Mapping[str, Any]], metrics: Sequence[str] = DEFAULT_METRICS
               ) -> tuple[list[Group], list[str]]:
    """Records pooled over seeds (same method, data, epsilon, setting (`settings`) and guarantee status),
    sorted, and the metric columns in the order of `metrics` (a metric's backbones in first-seen order)."""
    groups: dict[tuple, Group] = {}
    columns: list[str] = []
    for record, label in zip(records, settings(records)):
        eps, caveat = swept_epsilon(record), not_a_guarantee(record)
        key = (record["method"], record["data"], eps, label, caveat is not None)
        group = groups.setdefault(key, Group(record["method"], record["data"], eps, label, caveat))
        group.runs.append(dict(record))
        for metric in metrics:
            entry = (record.get("metrics") or {}).get(metric)
            if entry is None:
                continue
            name = column(metric, entry)
            if name not in columns:
                columns.append(name)
            group.values[name].append(float(entry["value"]))
    columns.sort(key=lambda name: list(metrics).index(name.split(" [")[0]))  # stable: backbones as first seen
    return sorted(groups.values(), key=flat_order), columns


def markdown(rows: Sequence[Sequence[str]]) -> str:
    header, *body = rows
    lines = [header, ["---"] * len(header), *body]
    return "\n".join("| " + " | ".join(row) + " |" for row in lines)


def run_cells(group: Group) -> list[str]:
    """Runs, steps and wall time of a group."""
    steps = steps_cell([s for s in map(steps_taken, group.runs) if s is not None])
    wall = cell([float(r["wall_time_s"]) for r in group.runs if r.get("wall_time_s") is not None])
    return [str(len(group.runs)), steps, wall]


def flat_table(records: Sequence[Mapping[str, Any]], metrics: Sequence[str] = DEFAULT_METRICS) -> str:
    """One row per (method, data, epsilon, setting): runs, steps, wall time and each metric column."""
    groups, columns = group_runs(records, metrics)
    rows = [["method", "data", "epsilon", "setting", "runs", "steps", "wall time (s)", *columns]]
    for g in groups:
        eps = epsilon_text(g.epsilon) + (f" {NOT_A_GUARANTEE_MARK}" if g.caveat else "")
        rows.append([g.method, g.data, eps, g.setting, *run_cells(g), *(cell(g.values.get(c, [])) for c in columns)])
    return markdown(rows)


def frontier_table(groups: Sequence[Group], columns: Sequence[str]) -> str:
    """One data set's groups as method x epsilon rows: seeds, steps, wall time, then the metric columns
    (mean ± std over seeds). A non-guarantee epsilon carries the † mark."""
    used = [c for c in columns if any(g.values.get(c) for g in groups)]
    rows = [["method", "setting", "epsilon", "seeds", "steps", "wall time (s)", *used]]
    for g in sorted(groups, key=frontier_order):
        eps = "none (no DP)" if g.epsilon is None else epsilon_text(g.epsilon)
        if g.caveat:
            eps += f" {NOT_A_GUARANTEE_MARK}"
        rows.append([g.method, g.setting, eps, *run_cells(g), *(cell(g.values.get(c, [])) for c in used)])
    return markdown(rows)
