"""experiments/aggregate.py pools seeds, not settings, and labels columns by backbone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("aggregate", Path(__file__).parents[1] / "experiments" / "aggregate.py")
aggregate = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(aggregate)


def record(eps, seed, fid, acc, overrides=()):
    return {"kind": "train", "method": "dpdm", "data": "mnist5k", "epsilon": eps,
            "overrides": [f"seed={seed}", *overrides],
            "metrics": {"fid": {"value": fid, "backbone": "domain-cnn[mnist5k-train]", "num_samples": 10},
                        "acc_mlp": {"value": acc, "selected_on": "synthetic validation split", "num_samples": 10}}}


def test_table_pools_seeds_and_separates_settings(tmp_path):
    path = tmp_path / "results.jsonl"
    rows = [record(10.0, 0, 100.0, 0.5), record(10.0, 1, 110.0, 0.7), record(10.0, 0, 50.0, 0.9, ["model.nf=8"]),
            record(None, 0, 20.0, 0.95), {"kind": "evaluate", "metrics": {}}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = aggregate.table(aggregate.load_records(path), ("fid", "acc_mlp"))
    lines = text.splitlines()
    assert "fid [domain-cnn[mnist5k-train]]" in lines[0] and "acc_mlp" in lines[0]
    assert len(lines) == 2 + 3
    assert "| 10 | default | 2 | 105 ± 7.1 | 0.6 ± 0.14 |" in text
    assert "| 10 | model.nf=8 | 1 | 50 | 0.9 |" in text
    assert "| none | default | 1 | 20 | 0.95 |" in text
