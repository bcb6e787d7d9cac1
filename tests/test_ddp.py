"""DDP with 2 CPU processes (gloo): identical weights on every rank, noise added once, and Poisson
rounds in step on every rank even when local batches are often empty."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "ddp_worker.py"
pytestmark = pytest.mark.ddp


def run_ranks(command: list[str], cwd: Path | None = None) -> tuple[str, str]:
    """Run a multi-process command to success; returns (stdout, stderr).

    Own session, so that ranks out of step (hung in an all-reduce) are all killed on timeout.
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, cwd=cwd)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, stderr[-3000:]
    return stdout, stderr


def run_worker(tmp_path: Path, kind: str, grad_mode: str = "auto") -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_ranks([sys.executable, str(WORKER), str(tmp_path), kind, grad_mode])
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_ranks_hold_identical_weights_after_dp_steps(tmp_path):
    ranks = run_worker(tmp_path, "weights")
    assert all(r["world_size"] == 2 and r["steps"] == 4 for r in ranks)
    for name, value in ranks[0]["after"].items():
        assert torch.equal(value, ranks[1]["after"][name]), name
        assert not torch.equal(value, ranks[0]["before"][name]), f"{name} was not updated"


def test_ghost_mode_takes_the_same_steps_as_grouped(tmp_path):
    """Same seed: ghost clipping with Opacus's distributed fast-gradient-clipping optimizer gives
    the same weights as per-example gradients with DistributedDPOptimizer, on every rank."""
    grouped = run_worker(tmp_path / "grouped", "weights", "grouped")
    ghost = run_worker(tmp_path / "ghost", "weights", "ghost")
    assert all(r["steps"] == 4 for r in ghost)
    for name, value in ghost[0]["after"].items():
        assert torch.equal(value, ghost[1]["after"][name]), name
        torch.testing.assert_close(value, grouped[0]["after"][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_mode", ["auto", "ghost"])
def test_noise_is_added_once_across_ranks(tmp_path, grad_mode):
    ranks = run_worker(tmp_path, "noise", grad_mode)
    before = torch.cat([v.flatten() for v in ranks[0]["before"].values()])
    after = torch.cat([v.flatten() for v in ranks[0]["after"].values()])
    # Zero gradients, SGD lr=1: 4 steps of N(0, (sigma*C/B)^2) noise with B the global expected batch.
    expected = 2.0 * 0.5 / 16 * math.sqrt(4)
    measured = (after - before).std().item()
    assert measured == pytest.approx(expected, rel=0.08)  # sqrt(2) larger if both ranks added noise


@pytest.mark.parametrize("grad_mode", ["auto", "ghost"])
def test_tiny_per_rank_batches_keep_ranks_in_step_at_rate_q(tmp_path, grad_mode):
    """Two expected examples per rank (q = 0.05, 40 examples each): every rank takes every round,
    empty or not (a noise-only step where the global batch is empty), the same 20 rounds in each
    epoch, and each example joins a round with probability q. Opacus's sampler skips empty
    local batches: its per-rank inclusion rate is q / (1 - (1-q)^40) = 0.057, and its ranks fall
    out of step (this run, on the code before the fix, hung in an all-reduce)."""
    ranks = run_worker(tmp_path, "poisson", grad_mode)
    n, q, rounds = 80, 0.05, 200
    for r in ranks:
        assert r["steps"] == rounds and len(r["rounds"]) == rounds
        assert Counter(epoch for epoch, _ in r["rounds"]) == {e: 20 for e in range(10)}
        assert any(not examples for _, examples in r["rounds"])  # empty local batches were taken
    assert [e for e, _ in ranks[0]["rounds"]] == [e for e, _ in ranks[1]["rounds"]]
    shards = [{i for _, examples in r["rounds"] for i in examples} for r in ranks]
    assert not shards[0] & shards[1]
    included, trials = sum(len(x) for r in ranks for _, x in r["rounds"]), rounds * n
    assert abs(included - q * trials) <= 4 * math.sqrt(trials * q * (1 - q))
    for name, value in ranks[0]["after"].items():
        assert torch.equal(value, ranks[1]["after"][name]), name


@pytest.mark.slow
def test_train_command_runs_two_process_ddp(tmp_path):
    """`dp-diffusion train trainer=ddp`: Lightning relaunches the command for rank 1 (from sys.argv, which
    holds no command word), every rank takes part in the final save, and rank 0 writes the report."""
    run_dir = tmp_path / "run"
    args = ["data=digits", "model=tiny", "train.steps=3", "train.batch_size=64", "train.physical_batch_size=32",
            "eval=none", "sample.num_samples=0", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
            "privacy.epsilon=5", f"hydra.run.dir={run_dir}", f"results_file={tmp_path / 'all.jsonl'}"]
    stdout, stderr = run_ranks([sys.executable, "-m", "dp_diffusion", "train", *args], cwd=tmp_path)
    assert "Traceback" not in stderr and "MEMBER: 2/2" in stdout + stderr
    report = json.loads((run_dir / "privacy.json").read_text())
    assert report["steps"] == 3 and report["epsilon"] <= 5.0
    assert (run_dir / "checkpoints" / "final.ckpt").is_file()


@pytest.mark.slow
def test_dp_sad_with_an_in_run_dp_teacher_runs_two_process_ddp(tmp_path):
    """DP-SAD whose teacher is trained with DP in the run, under `trainer=ddp` with 2 processes: the teacher's
    stage and the student's fit both run on both ranks to the end, the report composes the teacher's, the
    discriminator's and the student's mechanisms within the target, and the teacher's line is printed once."""
    run_dir = tmp_path / "run"
    args = ["method=dp_sad", "data=digits", "model=tiny", "model.nf=8", "public=dead_leaves", "public.size=64",
            "method.module.teacher.source=dp", "method.module.teacher.steps=3", "method.module.teacher.batch_size=32",
            "method.parts.discriminator.nf=8", "train.steps=3", "train.batch_size=64", "train.physical_batch_size=32",
            "eval=none", "sample.num_samples=0", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
            "privacy.epsilon=5", f"hydra.run.dir={run_dir}", f"results_file={tmp_path / 'all.jsonl'}",
            f"method.module.cache_dir={tmp_path / 'cache'}"]
    stdout, stderr = run_ranks([sys.executable, "-m", "dp_diffusion", "train", *args], cwd=tmp_path)
    assert "Traceback" not in stderr and "MEMBER: 2/2" in stdout + stderr
    assert stdout.count("DP-SAD: DP teacher trained in this run: 3 steps") == 1
    report = json.loads((run_dir / "privacy.json").read_text())
    assert set(report["mechanisms"]) == {"teacher", "discriminator", "student"}
    assert report["steps"] == 3 and report["epsilon"] <= 5.0
    assert (run_dir / "checkpoints" / "final.ckpt").is_file()
