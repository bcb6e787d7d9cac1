"""`dp-diffusion audit`: canaries through the real training path, and the bound against the claim."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from dp_diffusion.audit.run import run_audit
from dp_diffusion.cli import CONF_DIR
from dp_diffusion.config import ConfigError

# privacy.reproducible: masks and noise seeded from `seed`, so each test sees the same draws.
TINY = ["data=digits", "model=tiny", "privacy.reproducible=true", "audit.max_real_examples=20",
        "train.batch_size=20", "train.physical_batch_size=16", "+trainer.enable_progress_bar=false"]


def audit_config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("audit", overrides=[*TINY, f"output_dir={tmp_path / 'run'}",
                                           f"results_file={tmp_path / 'all.jsonl'}", *overrides])


@pytest.mark.parametrize("grad_mode,k", [
    ("auto", 1),
    pytest.param("functorch", 2, marks=pytest.mark.slow),
    pytest.param("ghost", 2, marks=pytest.mark.slow),
])
def test_dirac_canaries_are_clipped_to_c_and_excluded_ones_leave_no_trace(tmp_path, one_thread, grad_mode, k):
    # Noise almost off: each canary's summed update is (times sampled) * C / B_exp if it is in,
    # 0 if it is out. Its raw gradient is 1e4 * C, so an unclipped canary would show 1e4 times more.
    # Every per-example gradient mode sees the canary layer, with noise multiplicity too.
    cfg = audit_config(tmp_path, "privacy.noise_multiplier=0.001", "privacy.epsilon=1e9", "privacy.max_grad_norm=0.5",
                       f"privacy.grad_mode={grad_mode}", f"privacy.noise_multiplicity={k}",
                       "audit.canaries=20", "audit.steps=4")
    record = run_audit(cfg)
    saved = np.load(tmp_path / "run" / "canary_scores.npz")
    units = saved["scores"] / (0.5 / 20)  # C / B_exp
    members = saved["members"]
    assert record["steps"] == 4 and members.sum() == record["canaries_in"]
    assert np.abs(units - np.round(units)).max() < 0.05
    assert np.all(np.abs(units[~members]) < 0.05)
    assert units[members].max() >= 1 and units.max() <= 4.05


@pytest.mark.slow
def test_whitebox_detects_missing_noise(tmp_path, one_thread):
    # The power check: with the noise (nearly) off, the audit proves a large epsilon.
    cfg = audit_config(tmp_path, "privacy.noise_multiplier=0.01", "privacy.epsilon=1e9",
                       "audit.canaries=100", "audit.steps=30")
    record = run_audit(cfg)
    assert record["auc"] > 0.95
    assert record["epsilon_lower_bound"] > 2.0  # 100 canaries can prove at most about 2.9 at 95%


@pytest.mark.slow
def test_whitebox_dp_run_at_small_epsilon_is_consistent(tmp_path, one_thread):
    cfg = audit_config(tmp_path, "privacy.epsilon=1", "audit.canaries=100", "audit.steps=30")
    record = run_audit(cfg)
    assert 0.9 < record["claimed_epsilon"] <= 1.0
    assert record["epsilon_lower_bound"] <= record["claimed_epsilon"]
    assert record["consistent"] and "consistent" in record["verdict"]
    line = json.loads((tmp_path / "all.jsonl").read_text().splitlines()[-1])
    assert line["kind"] == "audit" and line["mode"] == "whitebox"
    for key in ("auc", "epsilon_lower_bound", "confidence", "claimed_epsilon"):
        assert isinstance(line[key], float) and math.isfinite(line[key])
    assert line["confidence"] == 0.95


@pytest.mark.slow
def test_blackbox_run_records_bounds_and_says_it_is_weak(tmp_path, one_thread):
    cfg = audit_config(tmp_path, "audit.mode=blackbox", "privacy=none", "audit.canaries=20", "audit.steps=3",
                       "audit.draws=4", "audit.reference=retrain")
    record = run_audit(cfg)
    assert record["kind"] == "audit" and record["mode"] == "blackbox" and record["claimed_epsilon"] == math.inf
    assert 0 <= record["auc"] <= 1 and record["epsilon_lower_bound"] >= 0
    assert "weak" in record["verdict"] and "proves nothing" in record["verdict"]


def test_bad_audit_value_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="audit.mode must be one of"):
        run_audit(audit_config(tmp_path, "audit.mode=greybox"))
    with pytest.raises(ConfigError, match="audit.canaries must be"):
        run_audit(audit_config(tmp_path, "audit.canaries=1"))


@pytest.mark.slow
def test_cli_runs_end_to_end(tmp_path):
    run_dir = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "dp_diffusion", "audit", *TINY, "privacy.epsilon=2", "audit.canaries=10",
         "audit.steps=2", f"hydra.run.dir={run_dir}", f"results_file={tmp_path / 'all.jsonl'}"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "audit (whitebox): lower bound" in result.stdout and "claimed" in result.stdout
    record = json.loads((run_dir / "results.jsonl").read_text())
    assert record["kind"] == "audit" and record["canaries"] == 10
    bad = subprocess.run([sys.executable, "-m", "dp_diffusion", "audit", "audit.beta=2",
                          f"hydra.run.dir={tmp_path / 'bad'}"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: audit.beta must be a number in (0, 1) (1 - confidence), got 2"]
