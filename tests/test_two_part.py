"""A method of several parts (`ToyTwoPart`): a private generator whose per-example loss passes through a
critic that trains alongside. The generator's gradients are always clipped and noised, the critic's never
(its update is plain SGD on its own loss, and the private step leaves its .grad alone); each private part is
a mechanism of its own in the ledger, and the guard, the calibration and the report use their composition."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from toy_models import ToyTwoPart, toy_dataset

from dp_diffusion.privacy import PrivacySpec
from dp_diffusion.privacy.accounting import calibrate_noise_multiplier, epsilon_for

pytestmark = pytest.mark.usefixtures("one_thread")
WORKER = Path(__file__).parent / "two_part_worker.py"


def toy(spec: PrivacySpec, dim: int = 6, **kwargs) -> tuple[ToyTwoPart, tuple[torch.Tensor, torch.Tensor]]:
    """A `ToyTwoPart` over 80 examples (q = 8/80) with its optimizers built, and a batch of 8."""
    module = ToyTwoPart(spec, dim=dim, **kwargs)
    data = toy_dataset(n=80, dim=dim)
    module.attach_private_data(data)
    module.configure_optimizers()
    return module, (data.tensors[0][:8], data.tensors[1][:8])


def naive_clipped_mean(module: ToyTwoPart, batch, clip: float, some_unclipped: bool = True) -> dict[str, torch.Tensor]:
    """sum_i min(1, C/(||g_i|| + 1e-6)) g_i / B over the generator's parameters, one backward per example."""
    generator = copy.deepcopy(module.generator)
    names, params = zip(*generator.named_parameters())
    grads = []
    for i in range(len(batch[0])):
        loss = module.generator_loss(generator, (batch[0][i:i + 1], batch[1][i:i + 1])).sum()
        grads.append(torch.autograd.grad(loss, params))
    norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in gs)) for gs in grads])
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and ((factors == 1).any() or not some_unclipped), "the test should clip some examples"
    return {n: sum(f * gs[j] for f, gs in zip(factors, grads)) / len(grads) for j, n in enumerate(names)}


def test_generator_step_is_the_clipped_mean_and_leaves_the_critic_alone():
    """Noise off (sigma = 0): the generator's update is exactly the naive clipped mean of gradients through
    the critic; the critic's weights and its .grad (a sentinel) are untouched; one ledger step, named."""
    spec = PrivacySpec(epsilon=1e6, delta=1e-3, accountant="rdp", noise_multiplier=0.0, max_grad_norm=1.0)
    module, batch = toy(spec, lr=0.1)
    expected = naive_clipped_mean(module, batch, clip=1.0)
    before = {n: p.detach().clone() for n, p in module.generator.named_parameters()}
    critic = {n: p.detach().clone() for n, p in module.critic.named_parameters()}
    sentinel = torch.full_like(module.critic.weight, 7.0)
    module.critic.weight.grad = sentinel.clone()
    module.private_step("generator", module.generator_loss, batch)
    for n, p in module.generator.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * expected[n], rtol=1e-5, atol=1e-6)
    assert torch.equal(module.critic.weight.grad, sentinel) and module.critic.bias.grad is None
    for n, p in module.critic.named_parameters():
        assert torch.equal(p.detach(), critic[n]), n
    assert module.ledger.mechanisms == {"generator": [(0.0, 0.1, 1)]}


def test_generator_noise_has_std_sigma_c_over_b():
    """Noise on: the update minus the clipped mean is Gaussian noise of std sigma*C/B (B = 8 expected)."""
    sigma, clip = 2.0, 1.0
    spec = PrivacySpec(epsilon=1e6, delta=1e-3, accountant="rdp", noise_multiplier=sigma, max_grad_norm=clip,
                       reproducible=True)
    module, batch = toy(spec, dim=24, lr=1.0)
    expected = naive_clipped_mean(module, batch, clip=clip, some_unclipped=False)
    before = {n: p.detach().clone() for n, p in module.generator.named_parameters()}
    module.private_step("generator", module.generator_loss, batch)
    noise = torch.cat([(before[n] - p.detach() - expected[n]).flatten()
                       for n, p in module.generator.named_parameters()])
    assert noise.numel() == 600
    assert noise.std().item() == pytest.approx(sigma * clip / 8, rel=0.12)
    assert noise.mean().abs().item() < 4 * sigma * clip / 8 / 600 ** 0.5


class CheckCritic(L.Callback):
    """Before each step, the plain-SGD update of the critic on its own loss; after it, the critic must hold it."""

    def __init__(self) -> None:
        self.checked = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        critic = copy.deepcopy(module.critic)
        loss = module.critic_loss(critic, module.generator, batch_idx)
        grads = torch.autograd.grad(loss, list(critic.parameters()))
        self.expected = [p.detach() - module.critic_lr * g for p, g in zip(critic.parameters(), grads)]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        for p, expected in zip(module.critic.parameters(), self.expected):
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
            assert p.grad is None
        self.checked += 1


def fit(module: ToyTwoPart, max_steps: int, callbacks=()) -> L.Trainer:
    module.attach_private_data(toy_dataset(n=80, dim=6))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module)
    return trainer


def test_critic_trains_by_plain_sgd_beside_the_private_generator():
    """Through Lightning: each step's critic update is plain SGD on its own loss (never clipped or noised,
    while sigma = 1 noises the generator); the trainer counts logical steps; the ledger holds the generator's
    steps under its name, and the report's epsilon is the ledger's."""
    spec = PrivacySpec(epsilon=1e6, delta=1e-3, accountant="rdp", noise_multiplier=1.0, max_grad_norm=0.5,
                       reproducible=True)
    module = ToyTwoPart(spec, steps=3)
    check = CheckCritic()
    trainer = fit(module, max_steps=3, callbacks=[check])
    assert check.checked == 3 and trainer.global_step == 3
    assert module.ledger.mechanisms == {"generator": [(1.0, 0.1, 3)]}
    report = module.privacy_report()
    assert report["epsilon"] == module.ledger.epsilon() == epsilon_for(1.0, 0.1, 3, 1e-3, "rdp")


def test_two_private_parts_compose_in_calibration_guard_and_report():
    """A DP critic and a DP generator: sigma is calibrated so that their composition (2 x 6 steps) meets
    epsilon = 2; each part's 6 steps are recorded under its name; the guard stops at the plan although the
    trainer asks for more; the report's epsilon is the composed one, within the target."""
    spec = PrivacySpec(epsilon=2.0, delta=1e-3, accountant="rdp", max_grad_norm=0.5, reproducible=True)
    module = ToyTwoPart(spec, steps=6, dp_critic=True)
    trainer = fit(module, max_steps=9)
    sigma, _ = calibrate_noise_multiplier(2.0, 1e-3, 0.1, 12, "rdp")
    assert module.plan.noise_multiplier == sigma > calibrate_noise_multiplier(2.0, 1e-3, 0.1, 6, "rdp")[0]
    assert module.plan.steps == 6 and module.allowed_steps == 6
    assert module.ledger.mechanisms == {"critic": [(sigma, 0.1, 6)], "generator": [(sigma, 0.1, 6)]}
    assert module.stopped_by_budget and trainer.global_step == 6
    composed = module.ledger.epsilon()
    assert composed == pytest.approx(epsilon_for(sigma, 0.1, 12, 1e-3, "rdp"), rel=1e-9)
    assert composed > epsilon_for(sigma, 0.1, 6, 1e-3, "rdp")
    report = module.privacy_report()
    assert report["epsilon"] == composed <= 2.0
    assert report["steps"] == report["planned_steps"] == 6  # logical steps; each part's 6 are in its share
    assert {name: share["steps"] for name, share in report["mechanisms"].items()} == {"critic": 6, "generator": 6}


@pytest.mark.ddp
def test_two_part_ddp_keeps_both_parts_in_sync(tmp_path):
    """2-process DDP (gloo): the critic's public draws differ by rank, yet after 4 steps both the critic and
    the generator hold identical weights on both ranks (and both moved)."""
    from test_ddp import run_ranks

    run_ranks([sys.executable, str(WORKER), str(tmp_path)])
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["world_size"] == 2 and r["mechanisms"] == {"generator": [(1.0, 0.1, 4)]} for r in ranks)
    for part in ("generator", "critic"):
        for name, value in ranks[0]["after"][part].items():
            assert torch.equal(value, ranks[1]["after"][part][name]), f"{part}.{name}"
            assert not torch.equal(value, ranks[0]["before"][part][name]), f"{part}.{name} was not updated"


def test_a_recorded_mechanism_does_not_count_as_this_runs_steps():
    """A history recorded from elsewhere (a DP teacher's) is composed into epsilon but is not a step of
    this run: the guard and the report count only the run's own private steps."""
    from toy_models import ToyRegression

    module = ToyRegression(PrivacySpec(epsilon=50.0, delta=1e-3, noise_multiplier=1.0), steps=3)
    module.ledger.record("teacher", [(50.0, 0.01, 10)])
    module.attach_private_data(toy_dataset())
    L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module)
    assert module.ledger.steps_of("dp_sgd") == 3 and module.ledger.steps == 13
    assert module.logical_steps() == 3 and not module.stopped_by_budget
    report = module.privacy_report()
    assert report["steps"] == 3 and set(report["mechanisms"]) == {"teacher", "dp_sgd"}
