"""Issue 16: the run estimate. A fake clock makes every figure of the printed line exact (no timed tests):
a fit's steps, its seconds per step over steps 2..6, its total (the warm-up step as it was, the steps
left at the timed rate) and its end; a resumed fit counts only the steps it has left; a privacy budget
that allows fewer steps than planned is the end; a fit of two steps or fewer says nothing."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from test_privacy import quiet_trainer
from toy_models import ToyRegression, toy_dataset
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dp_diffusion.privacy import PrivacySpec
from dp_diffusion.run_estimate import RunEstimate, after_training, format_duration

pytestmark = pytest.mark.usefixtures("one_thread")

NOW = datetime(2026, 11, 30, 18, 0, tzinfo=timezone.utc)
LINE = re.compile(r"estimate(?: \((?P<stage>\w+)\))?: (?P<steps>[\d,]+) (?P<what>.*?)at (?P<rate>[\d.]+) s/step "
                  r"\(timed over steps (?P<a>\d+)-(?P<b>\d+)\) -> training about (?P<total>.+?) "
                  r"\(ends ~(?P<ends>[\w: ]+) UTC\)(?:; (?P<then>.*))?$")


class FakeClock:
    """Seconds that pass only when a step ends: `warm_up + per_step` for a fit's first step, `per_step` after."""

    def __init__(self, per_step: float, warm_up: float) -> None:
        self.t, self.per_step, self.warm_up = 1000.0, per_step, warm_up

    def __call__(self) -> float:
        return self.t


class Tick(L.Callback):
    """Advances the fake clock at the end of each step, before `RunEstimate` reads it (it comes first)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock, self.first = clock, True

    def on_train_start(self, trainer, module) -> None:
        self.first = True

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.clock.t += self.clock.per_step + (self.clock.warm_up if self.first else 0.0)
        self.first = False


class TinyRegression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x).squeeze(1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 3, generator=g), torch.randn(32, generator=g)), batch_size=4)


def fit(module: L.LightningModule, max_steps: int, clock: FakeClock, ckpt_path: Path | None = None,
        **estimate) -> RunEstimate:
    callback = RunEstimate(clock=clock, now=lambda: NOW, **estimate)
    trainer = quiet_trainer(max_steps=max_steps, max_epochs=-1, callbacks=[Tick(clock), callback])
    trainer.fit(module, ckpt_path=ckpt_path)
    return callback


def parse(line: str | None) -> dict[str, str]:
    match = LINE.match(line or "")
    assert match, f"not an estimate line: {line!r}"
    return match.groupdict()


def test_the_line_gives_steps_rate_total_and_end_from_the_timed_steps(capsys):
    clock = FakeClock(per_step=60.0, warm_up=45.0)
    estimate = fit(TinyRegression(), 30, clock, then="then sampling 2,000 images and evaluation")
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("estimate")]
    assert printed == [estimate.line]  # once, on stdout
    got = parse(estimate.line)
    assert (got["steps"], got["rate"], got["a"], got["b"]) == ("30", "60", "2", "6")
    # warm-up 45 s + 30 steps of 60 s = 1845 s; printed after step 6, so 24 steps (24 min) are left
    assert got["total"] == "31 min" and got["ends"] == "18:24"
    assert got["stage"] is None and got["what"] == "steps "
    assert got["then"] == "then sampling 2,000 images and evaluation"


def test_a_short_fit_times_fewer_steps_and_leaves_one_after_the_line():
    estimate = fit(TinyRegression(), 4, FakeClock(per_step=2.5, warm_up=10.0), stage="public_warm_start")
    got = parse(estimate.line)
    assert (got["stage"], got["steps"], got["rate"], got["a"], got["b"]) == ("public_warm_start", "4", "2.5", "2", "3")
    assert got["total"] == "20 s" and got["then"] is None  # 10 + 4 * 2.5


@pytest.mark.parametrize("steps", [1, 2])
def test_a_fit_of_two_steps_or_fewer_prints_nothing(steps, capsys):
    estimate = fit(TinyRegression(), steps, FakeClock(per_step=1.0, warm_up=1.0))
    assert estimate.line is None and "estimate" not in capsys.readouterr().out


def test_a_resumed_fit_estimates_the_steps_it_has_left(tmp_path):
    clock = FakeClock(per_step=3.0, warm_up=20.0)
    module = TinyRegression()
    trainer = quiet_trainer(max_steps=8, max_epochs=-1)  # one epoch of 8 batches
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "step8.ckpt")

    estimate = fit(TinyRegression(), 108, clock, ckpt_path=tmp_path / "step8.ckpt")
    got = parse(estimate.line)
    assert (got["steps"], got["a"], got["b"]) == ("100", "10", "14")
    assert got["what"] == "remaining steps (resumed at step 8) "
    assert got["rate"] == "3" and got["total"] == "5 min" and got["ends"] == "18:04"  # 20 + 100 * 3 s; 94 left


def test_a_privacy_budget_that_allows_fewer_steps_is_the_end():
    """Sigma given, a DP teacher's history in the ledger: the guard allows fewer than the 20 planned steps."""
    module = ToyRegression(PrivacySpec(epsilon=4.0, delta=1e-3, accountant="rdp", noise_multiplier=1.0), steps=20)
    module.ledger.record("teacher", [(1.5, 0.1, 40)])
    module.attach_private_data(toy_dataset())
    estimate = fit(module, 20, FakeClock(per_step=1.0, warm_up=0.0))
    allowed = module.allowed_steps
    assert 2 < allowed < 20 and module.logical_steps() == allowed
    got = parse(estimate.line)
    assert got["steps"] == str(allowed) and f"(the privacy budget allows {allowed} of 20)" in got["what"]


def test_the_estimate_changes_nothing_the_fit_computes():
    """Same weights, ledger and global generator state with and without the callback (it only reads clocks)."""
    def run(with_estimate: bool):
        L.seed_everything(3, verbose=False)
        module = ToyRegression(PrivacySpec(epsilon=4.0, delta=1e-3, accountant="rdp", reproducible=True), steps=8)
        module.attach_private_data(toy_dataset())
        callbacks = [RunEstimate(clock=FakeClock(1.0, 1.0), now=lambda: NOW)] if with_estimate else []
        quiet_trainer(max_steps=8, max_epochs=-1, callbacks=callbacks).fit(module)
        assert not with_estimate or callbacks[0].line is not None
        return module.net.state_dict(), module.ledger.state_dict(), torch.random.get_rng_state()

    (weights, ledger, rng), (weights2, ledger2, rng2) = run(True), run(False)
    assert weights.keys() == weights2.keys() and all(torch.equal(weights[k], weights2[k]) for k in weights)
    assert ledger == ledger2 and torch.equal(rng, rng2)


def test_after_training_names_what_train_does_next():
    cfg = OmegaConf.create({"sample": {"num_samples": 100, "num_steps": 50, "sampler": "ddim_stochastic"},
                            "eval": {"enabled": True, "num_samples": 2000}})
    assert after_training(cfg) == "then sampling 2,000 images (50 ddim_stochastic steps each) and evaluation"
    cfg.eval.enabled = False
    assert after_training(cfg) == "then sampling 100 images (50 ddim_stochastic steps each)"
    cfg.sample.num_samples = 0
    assert after_training(cfg) == "then no sampling"


def test_format_duration():
    assert [format_duration(s) for s in (44.6, 1336, 5400, 11520)] == ["45 s", "22 min", "1.5 h", "3.2 h"]
