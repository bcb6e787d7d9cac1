"""Resume continues every random stream and never replays one; it refuses changed privacy settings;
the privacy randomness is secret by default and secure in secure mode."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_privacy import engine_for, make_batch, quiet_trainer
from toy_models import ToyRegression, per_example_loss, toy_dataset

from dp_diffusion.privacy import PrivacyError, PrivacySpec
from dp_diffusion.privacy.lightning import CHECKPOINT_KEY

# A given sigma and a generous target: these tests are about randomness, not the budget.
DP = dict(epsilon=50.0, delta=1e-3, noise_multiplier=1.0, max_grad_norm=0.5, accountant="rdp")
NONE = dict(enabled=False, epsilon=math.inf, delta=0.0, max_grad_norm=math.inf)


class Record(L.Callback):
    """Each round's batch (its examples, by target value) and the weights before and after each step."""

    def __init__(self) -> None:
        self.masks: list[list[float]] = []
        self.weights: list[torch.Tensor] = []

    @staticmethod
    def flat(module: ToyRegression) -> torch.Tensor:
        return torch.cat([p.detach().flatten().clone() for p in module.net.parameters()])

    def on_train_start(self, trainer, module):
        self.weights.append(self.flat(module))

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.masks.append(sorted(batch[1].tolist()))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.weights.append(self.flat(module))

    def updates(self) -> list[torch.Tensor]:
        """With a zero-gradient loss and SGD, each step's update is its noise vector (times -lr/B)."""
        return [b - a for a, b in zip(self.weights, self.weights[1:])]


def fit(spec: dict, steps: int, ckpt: Path | None = None, checkpoint_dir: Path | None = None,
        zero_grad_model: bool = False, dim: int = 6) -> tuple[ToyRegression, Record]:
    """ToyRegression on 64 examples, expected batch 16 (4 rounds an epoch), a checkpoint every 3 steps if asked."""
    module = ToyRegression(PrivacySpec(**spec), dim=dim, steps=8, zero_grad_model=zero_grad_model)
    module.attach_private_data(toy_dataset(dim=dim))
    record = Record()
    callbacks: list[L.Callback] = [record]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=3, save_top_k=-1))
    quiet_trainer(max_steps=steps, callbacks=callbacks, enable_checkpointing=checkpoint_dir is not None).fit(
        module, ckpt_path=ckpt)
    return module, record


def checkpoint_at_step_3(spec: dict, tmp_path: Path, **kwargs) -> tuple[Path, Record]:
    _, record = fit(spec, 3, checkpoint_dir=tmp_path, **kwargs)
    (checkpoint,) = tmp_path.glob("*step=3.ckpt")
    return checkpoint, record


def assert_nothing_repeats(earlier: list, later: list) -> None:
    for i, x in enumerate(later):
        for j, y in enumerate(earlier):
            same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
            assert not same, f"step {i} of the resumed run repeats step {j}"


def test_reproducible_resume_takes_the_same_masks_noise_and_weights(tmp_path):
    """Resumed mid-epoch at step 3 and run across the epoch boundary to step 7: the same masks,
    the same noise and diffusion draws (so, on CPU, bit-identical weights) as the uninterrupted run."""
    spec = {**DP, "reproducible": True}
    _, uninterrupted = fit(spec, 7)
    checkpoint, first = checkpoint_at_step_3(spec, tmp_path)
    _, resumed = fit(spec, 7, ckpt=checkpoint)
    assert first.masks == uninterrupted.masks[:3]
    assert resumed.masks == uninterrupted.masks[3:]
    assert len(resumed.weights) == 5
    for got, want in zip(resumed.weights, uninterrupted.weights[3:]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("grad_mode", ["auto", "ghost"])
def test_no_step_of_a_resumed_run_repeats_an_earlier_mask_or_noise(tmp_path, grad_mode):
    spec = {**DP, "grad_mode": grad_mode}
    checkpoint, first = checkpoint_at_step_3(spec, tmp_path, zero_grad_model=True)
    module, resumed = fit(spec, 6, ckpt=checkpoint, zero_grad_model=True)
    assert module.ledger.steps == 6 and len(resumed.masks) == 3
    assert_nothing_repeats(first.masks, resumed.masks)
    noise = first.updates() + resumed.updates()
    assert all(n.abs().min() > 0 for n in noise)  # every step was noised
    assert_nothing_repeats(noise[:3], noise[3:])


def test_default_runs_with_the_same_config_seed_draw_different_masks_and_noise():
    runs = [fit(DP, 3, zero_grad_model=True)[1] for _ in range(2)]
    assert runs[0].weights[0].equal(runs[1].weights[0])  # the config seed still fixes the initialisation
    assert runs[0].masks != runs[1].masks
    for a, b in zip(runs[0].updates(), runs[1].updates()):
        assert not torch.equal(a, b)


def test_released_checkpoint_holds_no_privacy_secret_and_resume_draws_fresh_entropy(tmp_path, caplog):
    module, first = fit(DP, 3, zero_grad_model=True)
    trainer = module.trainer
    assert torch.load(save(trainer, module, tmp_path / "last.ckpt"), weights_only=False)[
        CHECKPOINT_KEY]["randomness"]["secret"] == module.randomness.secret
    module.keep_privacy_rng_in_checkpoint = False
    released = save(trainer, module, tmp_path / "final.ckpt")
    state = torch.load(released, weights_only=False)[CHECKPOINT_KEY]["randomness"]
    assert state["secret"] is None and state["rounds_taken"] == 3 and state["noise_steps"] == 3
    _, resumed = fit(DP, 5, ckpt=released, zero_grad_model=True)
    assert "fresh OS entropy" in caplog.text
    assert_nothing_repeats(first.updates(), resumed.updates())


def save(trainer: L.Trainer, module: ToyRegression, path: Path) -> Path:
    trainer.save_checkpoint(path)
    return path


def test_resuming_a_non_private_checkpoint_under_dp_is_refused(tmp_path):
    checkpoint, _ = checkpoint_at_step_3(NONE, tmp_path)
    with pytest.raises(PrivacyError) as err:
        fit(DP, 6, ckpt=checkpoint)
    message = str(err.value)
    assert "\n" not in message
    assert "privacy.enabled=False" in message and "privacy.enabled=True" in message
    assert "privacy.epsilon=inf" in message and "privacy.epsilon=50" in message


@pytest.mark.parametrize("change", [{"delta": 1e-4}, {"epsilon": 1.0}, {"reproducible": True},
                                    {"noise_multiplicity": 2}])
def test_resuming_with_changed_privacy_settings_is_refused(tmp_path, change):
    checkpoint, _ = checkpoint_at_step_3(DP, tmp_path)
    ((key, value),) = change.items()
    with pytest.raises(PrivacyError, match=rf"privacy\.{key}=.*this run asks privacy\.{key}=") as err:
        fit({**DP, **change}, 6, ckpt=checkpoint)
    assert "\n" not in str(err.value)
    assert str(err.value).count("privacy.") == 2  # only the changed key is named


def test_secure_mode_noise_has_std_sigma_c_over_b_and_leaves_the_global_generator_alone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(400, 10), torch.nn.Linear(10, 1))  # 4,021 parameters
    sigma, clip, expected_batch = 2.0, 0.5, 16
    spec = PrivacySpec(max_grad_norm=clip, noise_multiplier=sigma, delta=1e-3, secure_mode=True)
    engine, _ = engine_for(net, spec, num_examples=160, batch_size=expected_batch, physical=8)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    batch = make_batch(16, 400, k=1)
    global_state = torch.get_rng_state()
    engine.step(lambda m, b: per_example_loss(m, b, 0.5, zero=True), batch)
    assert torch.equal(torch.get_rng_state(), global_state)  # the noise came from the OS, not torch
    delta = torch.cat([p.detach().flatten() for p in net.parameters()]) - before
    assert delta.std().item() == pytest.approx(sigma * clip / expected_batch, rel=0.05)


def test_secure_mode_training_masks_have_rate_q():
    module = ToyRegression(PrivacySpec(**DP, secure_mode=True), steps=8)
    module.attach_private_data(toy_dataset(n=200))
    loader = module.train_dataloader()
    assert module.randomness.kind == "secure"
    sizes = [len(batch[1]) for _ in range(20) for batch in loader]
    trials, q = len(sizes) * 200, module.plan.sample_rate
    assert len(sizes) == 20 * 12 and abs(sum(sizes) - trials * q) <= 4 * math.sqrt(trials * q * (1 - q))


def test_reproducible_and_secure_mode_together_is_a_config_error():
    from omegaconf import OmegaConf

    from dp_diffusion.config import ConfigError
    from dp_diffusion.run_config import validate_privacy

    base = dict(enabled=True, noise_multiplicity=1, grad_mode="auto", epsilon=1.0, delta=1e-5, max_grad_norm=1.0,
                accountant="rdp", noise_multiplier=None, secure_mode=True, reproducible=False)
    validate_privacy(OmegaConf.create(base), 1000)
    with pytest.raises(ConfigError, match="privacy.reproducible=true .* privacy.secure_mode=true"):
        validate_privacy(OmegaConf.create({**base, "reproducible": True}), 1000)
    with pytest.raises(ConfigError, match="privacy.reproducible must be true or false, got 'yes'"):
        validate_privacy(OmegaConf.create({**base, "reproducible": "yes"}), 1000)
