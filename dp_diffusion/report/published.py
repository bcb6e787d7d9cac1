"""The papers' published numbers (`published.yaml`) and which of them sit beside which of our results.

A published number is shown beside ours when the method, the data set family and epsilon match.
Everything else that differs is said next to it, never left for the reader to guess: the FID backbone,
the downstream classifier, the private training set's size, delta, the public data a run pretrained on
(ours: a public stage in the run's privacy report; theirs: the entry's `public`, "none" when absent), a
third-party (unverified) source, and the entry's own caveats.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dp_diffusion.config import ConfigError
from dp_diffusion.report.tables import NOT_A_GUARANTEE_MARK, Group, cell, epsilon_text, markdown

PUBLISHED_FILE = Path(__file__).with_name("published.yaml")

# Our data sets that are a subset of a published one (compared, with the size difference marked).
DATA_FAMILY = {"mnist5k": "mnist"}

# Our downstream LogReg / MLP / CNN are DPDM's architectures (dp_diffusion/metrics/classifiers.py).
OUR_CLASSIFIER = "dpdm-classifiers"

REQUIRED = ("method", "data", "train_size", "epsilon", "metrics", "source", "label")
LABELS = {"paper": "the paper or its official code", "3rd": "third-party, unverified"}


def load_published(path: str | Path = PUBLISHED_FILE) -> list[dict[str, Any]]:
    """The entries of a published-numbers file; one without a source (or another required field) is a
    ConfigError naming it."""
    path = Path(path)
    try:
        entries = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read published numbers from {path}: {' '.join(str(err).split())}") from None
    if not isinstance(entries, list):
        raise ConfigError(f"{path} must hold a list of entries, got {type(entries).__name__}")
    for number, entry in enumerate(entries, 1):
        missing = [k for k in REQUIRED if not isinstance(entry, dict) or entry.get(k) in (None, "", {})]
        if missing:
            raise ConfigError(f"{path}: entry {number} lacks {', '.join(missing)}")
        if entry["label"] not in LABELS:
            raise ConfigError(f"{path}: entry {number} has label {entry['label']!r}; use one of {sorted(LABELS)}")
        if not all(isinstance(v, (int, float)) for v in entry["metrics"].values()):
            raise ConfigError(f"{path}: entry {number} has a non-numeric metric value")
    return entries


@dataclass
class Comparison:
    """One of our numbers (mean ± std over seeds) beside one published number."""

    group: Group
    metric: str
    ours: str
    published: float
    differences: list[str]
    entry: Mapping[str, Any]


def _our_size(group: Group) -> int | None:
    sizes = {(r.get("privacy") or {}).get("dataset_size") for r in group.runs} - {None}
    if sizes:
        return min(sizes)
    try:
        from dp_diffusion.data.registry import dataset_info

        return dataset_info(group.data).num_train
    except Exception:  # an unregistered name: the size is unknown, and said so
        return None


def _our_public(group: Group) -> str:
    """The public set our runs pretrained on (read from what their privacy report lists as never having seen
    private data), or "none"."""
    names = set()
    for record in group.runs:
        covers = ((record.get("privacy") or {}).get("covers") or {}).get("never_saw_private_data") or []
        public = ((record.get("config") or {}).get("public") or {}).get("name", "none")
        names.add(public if public != "none" and any("public" in line for line in covers) else "none")
    return ", ".join(sorted(names)) or "none"


def _our_values(group: Group, metric: str) -> dict[str, list[float]]:
    """Our values of `metric`, by what they were measured with (backbone or classifier)."""
    found: dict[str, list[float]] = defaultdict(list)
    for record in group.runs:
        entry = (record.get("metrics") or {}).get(metric)
        if entry is not None:
            found[entry.get("backbone", OUR_CLASSIFIER)].append(float(entry["value"]))
    return found


def differences(group: Group, metric: str, measured_with: str, entry: Mapping[str, Any]) -> list[str]:
    """What differs between our setting and the published one, in words."""
    found = []
    theirs = entry.get("backbone" if metric in FIDELITY else "classifier", "unknown")
    if theirs != measured_with:
        what = "backbone" if metric in FIDELITY else "classifier"
        found.append(f"{what}: ours {measured_with}, theirs {theirs}")
    size = _our_size(group)
    if group.data != entry["data"] or size != entry["train_size"]:
        found.append(f"data: ours {group.data} N={size if size is not None else '?'}, "
                     f"theirs {entry['data']} N={entry['train_size']}")
    ours_public, theirs_public = _our_public(group), str(entry.get("public", "none"))
    if ours_public != theirs_public:
        found.append(f"public pretraining: ours {ours_public}, theirs {theirs_public}")
    deltas = {(r.get("privacy") or {}).get("delta") for r in group.runs} - {None}
    if entry.get("delta") is not None and deltas and deltas != {entry["delta"]}:
        found.append(f"delta: ours {', '.join(f'{d:g}' for d in sorted(deltas))}, theirs {entry['delta']:g}")
    if entry["label"] != "paper":
        found.append(LABELS[entry["label"]])
    found.extend(entry.get("caveats") or [])
    return found


FIDELITY = ("fid", "kid", "precision", "recall", "f_score", "isc")


def matches(group: Group, entry: Mapping[str, Any]) -> bool:
    """Same method, data set family and epsilon (a non-private run matches nothing)."""
    return (group.epsilon is not None and entry["method"] == group.method
            and entry["data"] == DATA_FAMILY.get(group.data, group.data)
            and abs(float(entry["epsilon"]) - group.epsilon) < 1e-9)


def compare(groups: Sequence[Group], entries: Sequence[Mapping[str, Any]]) -> list[Comparison]:
    """Every (our number, published number) pair whose method, data family, epsilon and metric match."""
    rows = []
    for group in groups:
        for entry in entries:
            if not matches(group, entry):
                continue
            for metric, value in entry["metrics"].items():
                for measured_with, values in _our_values(group, metric).items():
                    rows.append(Comparison(group, metric, cell(values), float(value),
                                           differences(group, metric, measured_with, entry), entry))
    return rows


def comparison_table(rows: Sequence[Comparison]) -> str:
    """Markdown: ours beside published, with every difference in setting and the source."""
    body = [["method", "setting", "epsilon", "metric", "ours", "published", "published row",
             "differs from ours", "source"]]
    for row in rows:
        g = row.group
        eps = epsilon_text(g.epsilon) + (f" {NOT_A_GUARANTEE_MARK}" if g.caveat else "")
        body.append([g.method, g.setting, eps, row.metric, row.ours, f"{row.published:.4g}",
                     str(row.entry.get("variant", "")), "; ".join(row.differences) or "same setting",
                     f"{row.entry['source']} [{row.entry['label']}]"])
    return markdown(body)
