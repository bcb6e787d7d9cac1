"""The real entry points (`dp-diffusion train/sample/evaluate`) on a tiny setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TINY = [
    "data=digits", "model=tiny", "train.steps=3", "train.batch_size=64", "train.physical_batch_size=32",
    "privacy.noise_multiplicity=2", "privacy.epsilon=5", "sample.num_samples=20", "sample.num_steps=4",
    "eval.num_samples=60", "eval.downstream.epochs=1", "eval.downstream.classifiers=[logreg,mlp]",
    "train.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1",
]


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DP_DIFFUSION_BACKBONE_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-m", "dp_diffusion", *args], capture_output=True, text=True,
                            timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    run_dir = root / "run"
    result = run_cli("train", *TINY, f"hydra.run.dir={run_dir}", f"results_file={root / 'all.jsonl'}",
                     cache=root / "cache")
    return run_dir, root, result


def test_train_writes_checkpoint_report_samples_and_results(trained):
    run_dir, root, result = trained
    assert "privacy: epsilon=" in result.stdout and "by PRV" in result.stdout
    report = json.loads((run_dir / "privacy.json").read_text())
    assert report["steps"] == 3 and report["noise_multiplicity"] == 2 and report["dataset_size"] == 1442
    assert 0 < report["epsilon_prv"] <= 5.0 and report["delta"] == 1e-5
    assert report["covers"]["released"] and report["covers"]["trained_with_dp"]
    for name in ("final.ckpt", "last.ckpt"):
        assert (run_dir / "checkpoints" / name).is_file()
    samples = np.load(run_dir / "samples.npz")
    assert samples["images"].shape == (60, 8, 8, 1) and samples["images"].dtype == np.uint8
    assert sorted(set(samples["labels"].tolist())) == list(range(10))
    assert (run_dir / "samples_grid.png").stat().st_size > 0
    record = json.loads((root / "all.jsonl").read_text().splitlines()[-1])
    assert record["method"] == "dpdm" and record["data"] == "digits" and record["target_epsilon"] == 5.0
    assert record["privacy"]["steps"] == 3
    assert record["epsilon"] == report["epsilon"] == record["privacy"]["epsilon"]  # one number
    assert any("private train split of digits" in line for line in report["evaluation"])
    for name in ("fid", "kid", "precision", "recall", "acc_logreg", "acc_mlp"):
        entry = record["metrics"][name]
        assert np.isfinite(entry["value"]) and entry["num_samples"] == 60
    assert record["metrics"]["fid"]["backbone"].startswith(("domain-cnn[digits-train]", "inception"))
    metrics_csv = next((run_dir / "logs").rglob("metrics.csv")).read_text()
    assert "eval/fid" in metrics_csv and "privacy/epsilon" in metrics_csv


def test_sample_command_reloads_the_checkpoint(trained):
    run_dir, root, _ = trained
    out = root / "sampled"
    run_cli("sample", f"checkpoint={run_dir / 'checkpoints' / 'final.ckpt'}", "num_samples=12", "sampler=edm",
            "num_steps=3", "knobs.s_churn=10", f"output_dir={out}", cache=root / "cache")
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (12, 8, 8, 1)
    assert samples["labels"].tolist() == [i % 10 for i in range(12)]


def test_evaluate_from_npz_and_from_checkpoint(trained):
    run_dir, root, _ = trained
    results = root / "eval.jsonl"
    common = ["data=digits", "eval.downstream.epochs=1", "eval.downstream.classifiers=[logreg]",
              f"results_file={results}"]
    run_cli("evaluate", f"samples={run_dir / 'samples.npz'}", *common, cache=root / "cache")
    run_cli("evaluate", f"checkpoint={run_dir / 'checkpoints' / 'final.ckpt'}", "eval.num_samples=30",
            "sample.num_steps=3", *common, cache=root / "cache")
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [("samples" in r, "checkpoint" in r) for r in records] == [(True, False), (False, True)]
    assert records[0]["metrics"]["fid"]["num_samples"] == 60
    assert records[1]["metrics"]["fid"]["num_samples"] == 30
    assert all(0.0 <= r["metrics"]["acc_logreg"]["value"] <= 1.0 for r in records)


def test_resume_with_more_steps_is_stopped_by_the_budget_guard(trained):
    run_dir, root, _ = trained
    out = root / "resumed"
    result = run_cli("train", *TINY[:-1], "train.steps=6", f"resume={run_dir / 'checkpoints' / 'last.ckpt'}",
                     "eval=none", "sample.num_samples=0", f"hydra.run.dir={out}",
                     f"results_file={root / 'all.jsonl'}", cache=root / "cache")
    report = json.loads((out / "privacy.json").read_text())
    # sigma was calibrated for 3 steps at epsilon=5: continuing must not spend more.
    assert report["steps"] == 3 and report["stopped_by_budget"] and report["epsilon_prv"] <= 5.0
    assert "budget guard" in result.stdout + result.stderr


def test_a_corrupt_checkpoint_is_a_one_line_error_for_resume_sample_and_evaluate(trained):
    run_dir, root, _ = trained
    full = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    truncated = root / "truncated.ckpt"
    truncated.write_bytes(full[: len(full) // 2])
    env = {**os.environ, "DP_DIFFUSION_BACKBONE_CACHE": str(root / "cache")}
    resumed = root / "resumed-from-truncated"
    commands = [
        ["train", *TINY, f"resume={truncated}", f"hydra.run.dir={resumed}", f"results_file={root / 'x.jsonl'}"],
        ["sample", f"checkpoint={truncated}", f"output_dir={root / 'x'}"],
        ["evaluate", f"checkpoint={truncated}", "data=digits", f"results_file={root / 'x.jsonl'}"],
    ]
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "dp_diffusion", *command], capture_output=True, text=True,
                                timeout=600, env=env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
        assert lines[0].startswith("error: checkpoint") and str(truncated) in lines[0]
    # A failed resume leaves no checkpoint behind (it used to leave an interrupted.ckpt at step 0).
    assert not (resumed / "checkpoints").exists()
