"""The DP callback: every private-training module gets it, beside the trainer's callbacks and on resume;
it calibrates against a history already in the ledger, guards the composed budget, keeps the privacy
state in every checkpoint, and refuses a private step the guard did not allow."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_privacy import quiet_trainer
from toy_models import ToyRegression, toy_dataset

from dp_diffusion.privacy import DPCallback, PrivacyError, PrivacySpec, calibrate_noise_multiplier
from dp_diffusion.privacy.accounting import headline_epsilon
from dp_diffusion.privacy.lightning import CHECKPOINT_KEY

DP = dict(epsilon=4.0, delta=1e-3, accountant="rdp")  # RDP: calibration against a history in well under a second
TEACHER = [(1.5, 0.1, 40)]  # a DP teacher's history: epsilon 1.73 of the 4.0 (RDP, delta 1e-3)
Q, STEPS = 16 / 64, 5  # ToyRegression: expected batch 16 of 64 examples


def toy(steps: int = STEPS, prior: list | None = None, **spec) -> ToyRegression:
    module = ToyRegression(PrivacySpec(**{**DP, **spec}), steps=steps)
    if prior:
        module.ledger.record("teacher", prior)
    module.attach_private_data(toy_dataset())
    return module


def test_the_module_brings_its_callback_beside_the_trainers_own():
    class Count(L.Callback):
        def __init__(self) -> None:
            self.batches = 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.batches += 1

    module, count = toy(), Count()
    trainer = quiet_trainer(max_steps=3, callbacks=[count])
    trainer.fit(module)
    assert [c for c in trainer.callbacks if isinstance(c, DPCallback)] == [module.dp]
    assert count.batches == 3 and module.ledger.steps_of("dp_sgd") == 3 and module.dp.rounds_taken == 3
    assert float(trainer.callback_metrics["privacy/epsilon"]) == pytest.approx(module.ledger.epsilon(), rel=1e-6)


def test_calibration_composes_the_history_already_in_the_ledger():
    plain, module = toy(), toy(prior=TEACHER)
    quiet_trainer(max_steps=50).fit(plain)
    quiet_trainer(max_steps=50).fit(module)
    alone = calibrate_noise_multiplier(DP["epsilon"], DP["delta"], Q, STEPS, "rdp")[0]
    assert plain.plan.noise_multiplier == alone
    assert module.plan.noise_multiplier > alone * 1.02  # the teacher spent part of the budget
    # All planned steps taken, then the guard stopped; the composed total meets the target, within 0.05.
    assert module.ledger.steps_of("dp_sgd") == STEPS == module.allowed_steps and module.stopped_by_budget
    composed = module.ledger.epsilon()
    assert composed == headline_epsilon([*TEACHER, (module.plan.noise_multiplier, Q, STEPS)], DP["delta"], "rdp")[0]
    assert DP["epsilon"] - 0.05 <= composed <= DP["epsilon"]
    report = module.privacy_report()
    assert report["epsilon"] == composed and report["steps"] == STEPS
    assert set(report["mechanisms"]) == {"teacher", "dp_sgd"}


def test_the_guard_counts_the_history_already_in_the_ledger():
    """With a given sigma, the teacher's history leaves room for fewer steps than the plan."""
    plain, module = toy(steps=20, noise_multiplier=1.0), toy(steps=20, prior=TEACHER, noise_multiplier=1.0)
    assert plain.ensure_plan().noise_multiplier == module.ensure_plan().noise_multiplier == 1.0
    quiet_trainer(max_steps=20).fit(module)
    assert 0 < module.allowed_steps < plain.allowed_steps
    assert module.logical_steps() == module.allowed_steps and module.stopped_by_budget
    assert module.ledger.epsilon() <= DP["epsilon"] < module.ledger.epsilon_after_next(1.0, Q)


def test_a_history_that_spent_the_whole_target_is_a_one_line_error():
    module = toy(prior=[(0.5, 0.5, 100)])
    with pytest.raises(PrivacyError, match="privacy.epsilon=4: the mechanisms already recorded spent") as err:
        module.ensure_plan()
    assert "\n" not in str(err.value)


def test_a_private_step_the_guard_refused_is_an_error():
    """A method whose training_step forgets `start_logical_step()` cannot step past the budget."""

    class Forgetful(ToyRegression):
        def training_step(self, batch, batch_idx):
            self.private_step("model", self.per_example_loss, self.prepare_batch(batch))

    module = Forgetful(PrivacySpec(**DP), steps=3)
    module.attach_private_data(toy_dataset())
    with pytest.raises(PrivacyError, match="budget guard refused"):
        quiet_trainer(max_steps=10).fit(module)
    assert module.ledger.steps == 3 and module.stopped_by_budget


def fit_with_checkpoints(tmp_path: Path, steps: int, ckpt: Path | None = None, **checkpoint) -> ToyRegression:
    module = toy(steps=6, prior=TEACHER)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, **checkpoint)
    quiet_trainer(max_steps=steps, callbacks=[saver], enable_checkpointing=True).fit(module, ckpt_path=ckpt)
    return module


def test_resume_restores_plan_ledger_and_guard_through_the_callback(tmp_path):
    uninterrupted = toy(steps=6, prior=TEACHER)
    quiet_trainer(max_steps=6).fit(uninterrupted)
    fit_with_checkpoints(tmp_path, 3)
    (checkpoint,) = tmp_path.glob("*step=3.ckpt")
    state = torch.load(checkpoint, weights_only=False)[CHECKPOINT_KEY]
    assert set(state) == {"spec", "plan", "allowed_steps", "ledger", "stopped_by_budget", "settings",
                          "randomness", "global_rng"}
    assert state["ledger"]["mechanisms"]["teacher"] == TEACHER and state["randomness"]["rounds_taken"] == 3
    resumed = fit_with_checkpoints(tmp_path / "resumed", 6, ckpt=checkpoint)
    assert resumed.plan == uninterrupted.plan and resumed.allowed_steps == uninterrupted.allowed_steps
    assert resumed.ledger.mechanisms == uninterrupted.ledger.mechanisms
    assert resumed.logical_steps() == 6 and resumed.dp.rounds_taken == 6


def test_weights_only_checkpoints_and_loads_outside_a_fit_keep_the_privacy_state(tmp_path):
    """Lightning skips callbacks' on_save_checkpoint for weights-only checkpoints: the module hook writes
    the state then; and a checkpoint loaded by hand (as `sample.load_trained` does) restores it."""
    trained = fit_with_checkpoints(tmp_path, 3, save_weights_only=True)
    (checkpoint,) = tmp_path.glob("*step=3.ckpt")
    state = torch.load(checkpoint, weights_only=False)
    assert "optimizer_states" not in state and CHECKPOINT_KEY in state
    loaded = toy(steps=6)
    loaded.on_load_checkpoint(state)
    assert loaded.plan == trained.plan and loaded.ledger.mechanisms == trained.ledger.mechanisms
    assert loaded.allowed_steps == trained.allowed_steps and loaded.logical_steps() == 3
    with pytest.raises(PrivacyError, match="privacy.delta"):
        toy(delta=1e-4).on_load_checkpoint(state)
