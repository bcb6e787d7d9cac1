"""experiments/aggregate.py pools seeds, not settings, and labels columns by backbone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("aggregate", Path(__file__).parents[1] / "experiments" / "aggregate.py")
aggregate = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(aggregate)


def record(eps, seed, fid, acc, overrides=(), steps=100, wall=60.0):
    return {"kind": "train", "method": "dpdm", "data": "mnist5k", "epsilon": eps,
            "overrides": [f"seed={seed}", *overrides], "wall_time_s": wall,
            "privacy": {"steps": steps if eps is not None else None, "planned_steps": steps},
            "metrics": {"fid": {"value": fid, "backbone": "domain-cnn[mnist5k-train]", "num_samples": 10},
                        "acc_mlp": {"value": acc, "selected_on": "synthetic validation split", "num_samples": 10}}}


def without_evaluation(eps, seed, steps, wall, overrides=("eval=none",)):
    """A record as `train` writes it with eval=none: no "metrics" key."""
    row = record(eps, seed, 0.0, 0.0, overrides, steps, wall)
    del row["metrics"]
    return row


def test_table_pools_seeds_and_separates_settings(tmp_path):
    path = tmp_path / "results.jsonl"
    rows = [record(10.0, 0, 100.0, 0.5), record(10.0, 1, 110.0, 0.7), record(10.0, 0, 50.0, 0.9, ["model.nf=8"]),
            record(None, 0, 20.0, 0.95), {"kind": "evaluate", "metrics": {}}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = aggregate.table(aggregate.load_records(path), ("fid", "acc_mlp"))
    lines = text.splitlines()
    assert "fid [domain-cnn[mnist5k-train]]" in lines[0] and "acc_mlp" in lines[0]
    assert len(lines) == 2 + 3
    assert "| 10 | default | 2 | 100 | 60 ± 0 | 105 ± 7.1 | 0.6 ± 0.14 |" in text
    assert "| 10 | model.nf=8 | 1 | 100 | 60 | 50 | 0.9 |" in text
    assert "| none | default | 1 | 100 | 60 | 20 | 0.95 |" in text


def test_runs_without_evaluation_are_listed_with_steps_and_wall_time(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    rows = [without_evaluation(1.0, 0, 120, 30.0), without_evaluation(1.0, 1, 110, 40.0),
            without_evaluation(None, 0, 50, 12.5, ()), {"kind": "evaluate", "metrics": {}}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    aggregate.main([str(path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| method | data | epsilon | setting | runs | steps | wall time (s) |"
    assert lines[2:] == ["| dpdm | mnist5k | 1 | eval=none | 2 | 110-120 | 35 ± 7.1 |",
                         "| dpdm | mnist5k | none | default | 1 | 50 | 12.5 |"]


def test_runs_with_and_without_evaluation_share_the_table(tmp_path):
    path = tmp_path / "results.jsonl"
    rows = [record(10.0, 0, 100.0, 0.5), without_evaluation(10.0, 0, 80, 20.0)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = aggregate.table(aggregate.load_records(path), ("fid", "acc_mlp"))
    assert "| 10 | default | 1 | 100 | 60 | 100 | 0.5 |" in text
    assert "| 10 | eval=none | 1 | 80 | 20 | - | - |" in text
