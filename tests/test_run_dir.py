"""A run directory is never silently continued or clobbered (the real `dp-diffusion train`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dp_diffusion.checkpoints import read_checkpoint

pytestmark = pytest.mark.slow

TINY = ["data=digits", "model=tiny", "train.batch_size=64", "train.physical_batch_size=64",
        "train.checkpoint_every_n_steps=2", "privacy.epsilon=5", "eval=none", "sample.num_samples=0",
        "+trainer.enable_progress_bar=false"]


def train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dp_diffusion", "train", *TINY, *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused_in_one_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert all(word in lines[0] for word in words), lines[0]


@pytest.fixture
def earlier_run(tmp_path) -> Path:
    """A run directory as an earlier run leaves it (the checkpoint's contents do not matter: nothing may read it)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("the earlier run's config\n")
    (run / "cli.log").write_text("the earlier run's log\n")
    return run


def test_a_fresh_run_into_a_dir_with_checkpoints_is_refused_and_writes_nothing(earlier_run, tmp_path):
    before = snapshot(earlier_run)
    result = train("train.steps=2", f"hydra.run.dir={earlier_run}", f"results_file={tmp_path / 'r.jsonl'}")
    refused_in_one_line(result, str(earlier_run), "overwrite=true", "resume=")
    assert snapshot(earlier_run) == before and not (tmp_path / "r.jsonl").exists()


def test_a_run_that_fails_validation_writes_nothing_into_an_existing_dir(earlier_run, tmp_path):
    (earlier_run / "checkpoints" / "last.ckpt").unlink()
    before = snapshot(earlier_run)
    # delta >= 1/N is only found once the data set is loaded: the late check still comes before any write.
    result = train("train.steps=2", "privacy.delta=0.01", f"hydra.run.dir={earlier_run}")
    refused_in_one_line(result, "privacy.delta")
    assert snapshot(earlier_run) == before


def test_overwrite_starts_afresh_instead_of_continuing(tmp_path):
    run = tmp_path / "run"
    first = train("train.steps=4", f"hydra.run.dir={run}", f"results_file={tmp_path / 'r.jsonl'}")
    assert first.returncode == 0, first.stderr[-3000:]
    # Continuing the 4-step run would train nothing and keep global_step 4; a fresh 2-step run ends at 2.
    second = train("train.steps=2", "overwrite=true", f"hydra.run.dir={run}", f"results_file={tmp_path / 'r.jsonl'}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert read_checkpoint(run / "checkpoints" / "final.ckpt")["global_step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["final.ckpt", "last.ckpt", "step2.ckpt"]
    assert "steps: 2" in (run / ".hydra" / "config.yaml").read_text() and (run / ".hydra" / "hydra.yaml").is_file()
    assert "overwrite=true" in (run / ".hydra" / "overrides.yaml").read_text()
    assert "ckpt_path" not in second.stderr  # Lightning's "resuming from last" warning is not even raised
