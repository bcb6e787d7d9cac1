"""Faults: a real training run killed at several points (one inside a checkpoint write, Ctrl-C, SIGTERM),
resumed from its newest checkpoint each time, ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dp_diffusion.build import CONFIG_KEY
from dp_diffusion.checkpoints import CheckpointError, read_checkpoint
from dp_diffusion.privacy.accounting import PrivacyLedger
from dp_diffusion.privacy.lightning import CHECKPOINT_KEY

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STEPS = 14
REPRODUCIBLE = "reproducible" in yaml.safe_load((ROOT / "conf" / "privacy" / "dp.yaml").read_text())
RUN = [
    "data=digits", "model=tiny", f"train.steps={STEPS}", "train.batch_size=64", "train.physical_batch_size=64",
    "train.checkpoint_every_n_steps=2", "privacy.epsilon=5", "eval=none", "sample.num_samples=0",
    "+trainer.enable_progress_bar=false",
    # Seeded noise and masks, so an interrupted run can be compared weight for weight with an uninterrupted one.
    *(["privacy.reproducible=true"] if REPRODUCIBLE else []),
]
LEDGER_KEYS = ("steps", "planned_steps", "noise_multiplier", "sample_rate", "history", "epsilon", "epsilon_rdp")


def train(run_dir: Path, *extra: str, kill_at: str | None = None, results: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT": kill_at or ""}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "kill_points.py"), "train", *RUN, *extra,
         f"hydra.run.dir={run_dir}", f"results_file={results}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out + err


def ledger_steps(state: dict) -> int:
    ledger = PrivacyLedger(delta=state[CONFIG_KEY]["privacy"]["delta"])
    ledger.load_state_dict(state[CHECKPOINT_KEY]["ledger"])
    return ledger.steps


def newest_checkpoint(run_dir: Path) -> tuple[Path, int]:
    """The checkpoint with the most steps, after checking that every .ckpt left behind is whole and consistent."""
    found = {}
    for path in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        state = read_checkpoint(path)  # a truncated file would raise here
        steps = ledger_steps(state)
        assert state["global_step"] == steps == int(state["state_dict"]["ema.n_averaged"]), path
        found[path] = steps
    newest = max(found, key=found.get)
    return newest, found[newest]


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    results = tmp_path / "results.jsonl"
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reference = train(reference_dir, results=results)  # runs beside the interrupted chain
    try:
        interrupted_chain(run_dir, results)
        code, reference_log = finish(reference)
    finally:
        reference.kill()
    assert code == 0, reference_log

    report, expected = (json.loads((d / "privacy.json").read_text()) for d in (run_dir, reference_dir))
    assert report["steps"] == STEPS
    assert {k: report[k] for k in LEDGER_KEYS} == {k: expected[k] for k in LEDGER_KEYS}
    final, expected_final = (read_checkpoint(d / "checkpoints" / "final.ckpt") for d in (run_dir, reference_dir))
    assert final["global_step"] == STEPS and not (run_dir / "checkpoints" / "interrupted.ckpt").exists()
    if REPRODUCIBLE:  # the privacy generators continue across every resume: the same weights, bit for bit
        for name, value in expected_final["state_dict"].items():
            assert torch.equal(final["state_dict"][name], value), name


def interrupted_chain(run_dir: Path, results: Path) -> None:
    # 1. SIGKILL inside step 3: the step-2 checkpoint is the newest.
    code, log = finish(train(run_dir, kill_at="step:3", results=results))
    assert code == -signal.SIGKILL, log
    resume_from, steps = newest_checkpoint(run_dir)
    assert steps == 2

    # 2. SIGKILL halfway through writing this process's 4th checkpoint file: step6.ckpt is written, then
    #    last.ckpt is being replaced. The old last.ckpt (step 4) must still be whole beside the partial file.
    code, log = finish(train(run_dir, f"resume={resume_from}", kill_at="write:4", results=results))
    assert code == -signal.SIGKILL, log
    partial = list((run_dir / "checkpoints").glob("*.partial"))
    assert [p.name for p in partial] == ["last.ckpt.partial"] and partial[0].stat().st_size > 0
    with pytest.raises(CheckpointError):
        read_checkpoint(partial[0])
    assert ledger_steps(read_checkpoint(run_dir / "checkpoints" / "last.ckpt")) == 4
    resume_from, steps = newest_checkpoint(run_dir)
    assert (resume_from.name, steps) == ("step6.ckpt", 6)

    # 3. SIGKILL right after a checkpoint file is in place (step8.ckpt, before last.ckpt follows).
    code, log = finish(train(run_dir, f"resume={resume_from}", kill_at="written:1", results=results))
    assert code == -signal.SIGKILL, log
    resume_from, steps = newest_checkpoint(run_dir)
    assert (resume_from.name, steps) == ("step8.ckpt", 8)

    # 4. Ctrl-C inside step 10: the step finishes, interrupted.ckpt and the report of what was spent are
    #    written, the resume command is printed, and the exit status is 130.
    code, log = finish(train(run_dir, f"resume={resume_from}", kill_at="interrupt:10", results=results))
    interrupted = run_dir / "checkpoints" / "interrupted.ckpt"
    assert code == 130, log
    assert f"resume={interrupted}" in log and f"hydra.run.dir={run_dir}" in log and "Traceback" not in log
    assert json.loads((run_dir / "privacy.json").read_text())["steps"] == 10
    resume_from, steps = newest_checkpoint(run_dir)
    assert (resume_from, steps) == (interrupted, 10)

    # 5. SIGTERM (a cluster's preemption) inside step 11: handled as Ctrl-C is.
    code, log = finish(train(run_dir, f"resume={resume_from}", kill_at="terminate:11", results=results))
    assert code == 130 and f"resume={interrupted}" in log and "Traceback" not in log, log
    resume_from, steps = newest_checkpoint(run_dir)
    assert (resume_from, steps) == (interrupted, 11)

    # 6. Resume to the end.
    code, log = finish(train(run_dir, f"resume={resume_from}", results=results))
    assert code == 0, log
