"""DDP with 2 CPU processes (gloo): identical weights on every rank, noise added once."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "ddp_worker.py"
pytestmark = pytest.mark.ddp


def run_worker(tmp_path: Path, kind: str) -> list[dict]:
    result = subprocess.run([sys.executable, str(WORKER), str(tmp_path), kind], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_ranks_hold_identical_weights_after_dp_steps(tmp_path):
    ranks = run_worker(tmp_path, "weights")
    assert all(r["world_size"] == 2 and r["steps"] == 4 for r in ranks)
    for name, value in ranks[0]["after"].items():
        assert torch.equal(value, ranks[1]["after"][name]), name
        assert not torch.equal(value, ranks[0]["before"][name]), f"{name} was not updated"


def test_noise_is_added_once_across_ranks(tmp_path):
    ranks = run_worker(tmp_path, "noise")
    before = torch.cat([v.flatten() for v in ranks[0]["before"].values()])
    after = torch.cat([v.flatten() for v in ranks[0]["after"].values()])
    # Zero gradients, SGD lr=1: 4 steps of N(0, (sigma*C/B)^2) noise with B the global expected batch.
    expected = 2.0 * 0.5 / 16 * math.sqrt(4)
    measured = (after - before).std().item()
    assert measured == pytest.approx(expected, rel=0.08)  # sqrt(2) larger if both ranks added noise
