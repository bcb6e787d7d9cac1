"""Results records: reading them from results files or run dirs, and what the report needs to know
about each (its setting, its epsilon, whether that epsilon is a guarantee).

A record is one line of `results.jsonl` as `train` writes it (`dp_diffusion/train.py`): `kind`,
`method`, `data`, `target_epsilon` (the swept value; older records hold it as `epsilon`), `seed`,
`overrides`, `output_dir`, `privacy` (the privacy report without its history), `samples` (paths of
`samples.npz` and the grid PNG), `metrics` (name -> {value, backbone | selected_on, ...}) and
`wall_time_s`.

Whether the epsilon is a guarantee
----------------------------------
A run whose epsilon is NOT a differential-privacy guarantee sets, in its privacy report (which
becomes `record["privacy"]`)::

    "epsilon_is_guarantee": false

(`EPSILON_IS_GUARANTEE`; DP-SAD's `paper` variant sets it, with `epsilon_note` saying why). The report
also treats as not a guarantee a run whose report lists components that saw private data without DP
(`covers.saw_private_data_without_dp`), holds a mechanism marked `"is_guarantee": false`, or whose
noise seeds were not secret (`privacy.reproducible=true`). Such runs are marked in every table and
plot; their numbers are never pooled with guaranteed runs of the same setting.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dp_diffusion.config import ConfigError

EPSILON_IS_GUARANTEE = "epsilon_is_guarantee"
"""Key in `record["privacy"]` (and the privacy report): false when the epsilon is not a guarantee."""

RESULTS_NAME = "results.jsonl"
SOURCE_KEY = "_results_file"  # where the report read a record (relative paths in it are resolved from there)

# Overrides that do not change what is measured: pooled over (seed), on their own axis (method, data,
# epsilon), or bookkeeping (where things are written, which logger, a resumed run's checkpoint).
IGNORED_OVERRIDES = ("seed=", "hydra.", "results_file=", "privacy.epsilon=", "privacy=", "method=", "data=",
                     "output_dir=", "overwrite=", "resume=", "logger=", "logger.", "trainer.enable_progress_bar=")
# The same, as keys of a run's resolved config (`frontier` is the label the frontier script adds).
IGNORED_CONFIG_KEYS = ("seed", "hydra", "results_file", "privacy.epsilon", "output_dir", "overwrite", "resume",
                       "logger", "trainer.enable_progress_bar", "frontier")


def read_results_file(path: Path) -> list[dict[str, Any]]:
    """The records of one results file (every kind); a line that is not JSON is a ConfigError naming it."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{number} is not a JSON results record (expected lines as `train` "
                              "writes them to results.jsonl)") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def results_files(source: Path) -> list[Path]:
    """The results files of `source`: the file itself, or every results.jsonl under a run or sweep dir."""
    if source.is_file():
        return [source]
    if source.is_dir():
        found = sorted(source.rglob(RESULTS_NAME))
        if not found:
            raise ConfigError(f"no {RESULTS_NAME} under {source} (train writes one into each run dir)")
        return found
    raise ConfigError(f"no results file or run dir at {source}")


def identity(record: Mapping[str, Any]) -> str:
    """What makes two records the same run (a sweep writes each run to its dir and to the shared file)."""
    if not record.get("output_dir"):  # nothing names the run: only an identical line is the same run
        return json.dumps(record, sort_keys=True, default=str)
    keys = ("method", "data", "seed", "output_dir", "checkpoint", "wall_time_s", "target_epsilon", "epsilon")
    return json.dumps([record.get(k) for k in keys], default=str)


def load_records(sources: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The training records of all `sources` (results files or run dirs), each run once.

    No training record at all is a ConfigError: there is nothing to report."""
    seen: set[str] = set()
    records = []
    names = []
    for source in sources:
        for path in results_files(Path(source)):
            names.append(str(path))
            for record in read_results_file(path):
                if record.get("kind") != "train" or identity(record) in seen:
                    continue
                if not record.get("method") or not record.get("data"):
                    raise ConfigError(f"{path} holds a training record without method or data")
                seen.add(identity(record))
                records.append({**record, SOURCE_KEY: str(path)})
    if not records:
        raise ConfigError(f"no training records in {', '.join(names) or 'the given sources'} "
                          "(lines with kind=train, as `dp-diffusion train` appends them)")
    return records


def setting(record: Mapping[str, Any]) -> str:
    """The run's other overrides: runs differing in these are not pooled as seeds."""
    kept = [o for o in record.get("overrides", []) if not o.lstrip("+~").startswith(IGNORED_OVERRIDES)]
    return " ".join(sorted(kept)) or "default"


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _kept_config(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's flattened resolved config without the keys that IGNORED_CONFIG_KEYS names (None: no config)."""
    config = record.get("config")
    if not isinstance(config, Mapping):
        return None
    return {key: value for key, value in _flat(config).items()
            if not any(key == k or key.startswith(k + ".") for k in IGNORED_CONFIG_KEYS)}


def _canonical(value: Any) -> str:
    """One string per value, equal exactly when the values are (keys sorted; non-JSON values by str)."""
    return json.dumps(value, sort_keys=True, default=str)


def _split_privacy(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the config without its privacy block, the privacy block or None for a non-private run). A non-private
    run's privacy block only says `privacy=none` (its epsilon column says so too), so a recipe run with and
    without privacy is one setting."""
    rest = {key: value for key, value in config.items() if not key.startswith("privacy.")}
    privacy = {key: value for key, value in config.items() if key.startswith("privacy.")}
    return rest, None if config.get("privacy.enabled") is False else privacy


def _differing(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys that every config holds and whose values are not all equal. A key some lack is no difference:
    it was added to the code after those runs, with the behaviour they had as its default."""
    common = set.intersection(*(set(c) for c in configs)) if configs else set()
    return sorted(k for k in common if len({_canonical(c[k]) for c in configs}) > 1)


def _classes(configs: Sequence[Mapping[str, Any]]) -> list[int]:
    """Each config's class: configs that agree on their common keys (`_differing`) share one."""
    representatives: list[Mapping[str, Any]] = []
    classes = []
    for config in configs:
        match = next((i for i, r in enumerate(representatives) if not _differing([r, config])), None)
        if match is None:
            representatives.append(config)
            match = len(representatives) - 1
        classes.append(match)
    return classes


def _suffixes(configs: Sequence[Mapping[str, Any]], most: int = 3) -> list[str]:
    """Each config's ' (key=value, ...)': the keys that tell these configs' classes apart (none if one class)."""
    classes = _classes(configs)
    if len(set(classes)) < 2:
        return [""] * len(configs)
    keys = _differing(configs)
    if not keys:  # the classes differ only in keys that some of the others lack
        return [f" (config {c + 1})" for c in classes]
    shown, hidden = keys[:most], len(keys) - most
    more = f", +{hidden} more" if hidden > 0 else ""
    return [" (" + ", ".join(f"{k}={c[k]}" for k in shown) + more + ")" for c in configs]


def _disambiguated(chosen: dict[tuple, str], split: Mapping[tuple, tuple[dict[str, Any], dict[str, Any] | None]]
                   ) -> dict[tuple, str]:
    """`chosen` labels, where settings of one method and data set that share a label but not a config get the
    keys that tell them apart appended (first outside the privacy block, then, among private runs, within it)."""
    clashes: dict[tuple, list[tuple]] = {}
    for key, label in chosen.items():
        clashes.setdefault((key[0], key[1], label), []).append(key)
    named = dict(chosen)
    for (_, _, label), keys in clashes.items():
        if "+frontier=" in label:
            # One frontier entry is one setting: the script pins what an entry ran with when a default changes,
            # and a default it leaves unpinned does not act on it (DPDM from scratch keeps its warm-start
            # keys), so its runs pool across such changes.
            continue
        parts = [split[key] for key in keys]  # (config outside the privacy block, privacy block or None)
        rest_classes = _classes([rest for rest, _ in parts])
        for key, suffix in zip(keys, _suffixes([rest for rest, _ in parts])):
            named[key] += suffix
        for rest_class in set(rest_classes):
            private = [(key, privacy) for key, (_, privacy), c in zip(keys, parts, rest_classes)
                       if c == rest_class and privacy is not None]
            for (key, _), suffix in zip(private, _suffixes([privacy for _, privacy in private])):
                named[key] += suffix
    return named


def settings(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each record's setting label (`setting`), where records of one method and data set with the same resolved
    config (`record["config"]` without IGNORED_CONFIG_KEYS) share one: the same config started by a frontier
    entry and by hand, or under `public=auto` and its resolved name, is one setting. Of such records' labels the
    one naming a frontier entry wins (the committed command's name), then the most used, then the shortest.
    Settings whose configs differ but whose labels agree (`dp-diffusion train` before and after a default
    changed) get the differing keys appended, so they never pool, except under a frontier entry's label (one
    entry is one setting); a recipe run without privacy takes the label of its private runs (it is their line's
    ceiling). A record without a config keeps its own label; records with one label pool (`group_runs`)."""
    labels = [setting(record) for record in records]
    pools: dict[tuple, list[str]] = {}
    split: dict[tuple, tuple[dict[str, Any], dict[str, Any] | None]] = {}  # (rest, privacy block) per config
    keys: list[tuple | None] = []
    for record, label in zip(records, labels):
        kept, key = _kept_config(record), None
        if kept is not None:
            key = (record.get("method"), record.get("data"), _canonical(kept))
            pools.setdefault(key, []).append(label)
            split[key] = _split_privacy(kept)
        keys.append(key)

    def preference(label: str, labels: list[str]) -> tuple:
        return "+frontier=" not in label, -labels.count(label), len(label), label

    chosen = {key: min(pool, key=lambda label: preference(label, pool)) for key, pool in pools.items()}
    # A recipe run without privacy (its ceiling) takes the name of the same recipe's private runs.
    for key, (rest, privacy) in split.items():
        if privacy is None:
            names = [chosen[key]] + [chosen[other] for other, (other_rest, other_privacy) in split.items()
                                     if other[:2] == key[:2] and other_privacy is not None
                                     and not _differing([rest, other_rest])]
            chosen[key] = min(names, key=lambda label: preference(label, names))
    named = _disambiguated(chosen, split)
    return [label if key is None else named[key] for label, key in zip(labels, keys)]


def swept_epsilon(record: Mapping[str, Any]) -> float | None:
    """The epsilon the run was asked for (None: non-private). Records written before the spent epsilon
    was recorded hold only the target, as `epsilon`."""
    eps = record.get("target_epsilon", record.get("epsilon"))
    return None if eps is None else float(eps)


def not_a_guarantee(record: Mapping[str, Any]) -> str | None:
    """Why the run's epsilon is not a differential-privacy guarantee, or None when it is one (or the run
    is non-private, which the epsilon column already says)."""
    privacy = record.get("privacy") or {}
    if swept_epsilon(record) is None or privacy.get("private") is False:
        return None
    if privacy.get(EPSILON_IS_GUARANTEE) is False:
        return str(privacy.get("epsilon_note") or "the run's privacy report says its epsilon is not a guarantee")
    for key, value in privacy.items():
        if isinstance(value, Mapping) and value.get("is_guarantee") is False:
            return str(value.get("note") or f"privacy.{key} is not a guarantee")
    unprotected = (privacy.get("covers") or {}).get("saw_private_data_without_dp") or []
    if unprotected:
        return "saw private data without DP: " + ", ".join(map(str, unprotected))
    if privacy.get("seeds_secret") is False:
        return "noise seeded from the config (privacy.reproducible=true)"
    return None


def steps_taken(record: Mapping[str, Any]) -> int | None:
    """Training steps of the run: the ledger's count, or the planned steps for `privacy=none` (no ledger;
    a run is recorded only when it finished)."""
    privacy = record.get("privacy") or {}
    steps = privacy.get("steps")
    return steps if steps is not None else privacy.get("planned_steps")


def grid_path(record: Mapping[str, Any]) -> Path | None:
    """The run's sample grid PNG (`sampling.save_samples` writes `samples_grid.png`), if it exists.

    Paths in a record are as `train` saw them; a relative one is tried from the current directory, then
    from the results file's folder and its parents (`runs/results.jsonl` names `runs/<method>/...`), and
    a run dir's own results file finds the grid beside it."""
    named = []
    grid = (record.get("samples") or {}).get("grid")
    if grid:
        named.append(Path(grid))
    if record.get("output_dir"):
        named.append(Path(record["output_dir"]) / "samples_grid.png")
    source = Path(record[SOURCE_KEY]).resolve().parent if record.get(SOURCE_KEY) else None
    bases = [Path.cwd(), *([source, *source.parents] if source else [])]
    candidates = [p for p in named if p.is_absolute()]
    candidates += [base / p for p in named if not p.is_absolute() for base in bases]
    if source is not None:
        candidates.append(source / "samples_grid.png")
    return next((p for p in candidates if p.is_file()), None)
