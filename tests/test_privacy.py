"""Invariants of the privacy core: clipping, noise, noise multiplicity, accounting,
calibration, checkpoint/resume and the budget guard."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from toy_models import ToyRegression, per_example_loss, toy_dataset
from torch import nn

from dp_diffusion.privacy import (
    Coverage,
    PrivacyError,
    PrivacyLedger,
    PrivacySpec,
    PrivateOptimization,
    build_report,
    calibrate_noise_multiplier,
    check_no_batch_mixing,
    epsilon_for,
    make_plan,
)
from dp_diffusion.privacy.per_example import make_per_example_gradients

MODES = ["grouped", "functorch", "opacus"]
ENGINE_MODES = [*MODES, "ghost"]  # ghost forms clipped sums only, so it is tested through the engine


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu")
    return L.Trainer(**{**defaults, **kwargs})


def make_batch(n: int, dim: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), 3 * torch.randn(n, generator=g), torch.randn(n, k, dim, generator=g)


def naive_per_example_grads(net: nn.Module, batch, noise_scale: float) -> list[list[torch.Tensor]]:
    """Loop over examples; each example's loss is the mean of its K draws, computed draw by draw."""
    x, y, noise = batch
    grads = []
    for i in range(len(x)):
        net.zero_grad()
        draws = [((net(x[i : i + 1] + noise_scale * noise[i, k : k + 1]).squeeze() - y[i]) ** 2)
                 for k in range(noise.shape[1])]
        (sum(draws) / len(draws)).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    return grads


def engine_for(net: nn.Module, spec: PrivacySpec, num_examples: int, batch_size: int, physical: int, lr: float = 1.0):
    plan = make_plan(spec, num_examples, batch_size, steps=10)
    ledger = PrivacyLedger(delta=spec.delta)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    return PrivateOptimization(net, optimizer, spec, plan, ledger, physical), ledger


@pytest.mark.parametrize("mode", MODES)
def test_per_example_gradient_is_gradient_of_k_averaged_loss(mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))
    batch = make_batch(6, 5, k=4)
    grads, losses = make_per_example_gradients(copy.deepcopy(net), mode)(
        lambda m, b: per_example_loss(m, b, 0.5), batch
    )
    expected = naive_per_example_grads(net, batch, 0.5)
    for j, (name, _) in enumerate(net.named_parameters()):
        assert grads[name].shape[0] == 6  # one gradient per example, not per draw
        for i in range(6):
            torch.testing.assert_close(grads[name][i], expected[i][j], atol=1e-5, rtol=1e-4)
    assert losses.shape == (6,)


@pytest.mark.parametrize("mode", ENGINE_MODES)
def test_update_is_mean_of_clipped_per_example_gradients(mode):
    """Noise off: one logical step (split in physical chunks) equals the naive clipped mean."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))
    reference = copy.deepcopy(net)
    clip, expected_batch = 0.3, 8
    spec = PrivacySpec(max_grad_norm=clip, noise_multiplier=0.0, noise_multiplicity=3, grad_mode=mode, delta=1e-3)
    engine, ledger = engine_for(net, spec, num_examples=80, batch_size=expected_batch, physical=3)
    batch = make_batch(7, 5, k=3, seed=2)  # a Poisson batch need not have the expected size
    before = [p.detach().clone() for p in net.parameters()]
    engine.step(lambda m, b: per_example_loss(m, b, 0.5), batch)

    per_example = naive_per_example_grads(reference, batch, 0.5)
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in grads)) for grads in per_example])
    assert (norms > clip).all(), "test should exercise clipping"
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipped_norms = norms * factors
    assert (clipped_norms <= clip + 1e-6).all()
    for j, (p, p0) in enumerate(zip(net.parameters(), before)):
        update = sum(factors[i] * per_example[i][j] for i in range(7)) / expected_batch
        torch.testing.assert_close(p0 - p.detach(), update, atol=1e-6, rtol=1e-4)
    assert ledger.steps == 1  # three physical chunks, one logical step


@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_noise_std_matches_sigma_c_over_b(mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(400, 10), nn.Linear(10, 1))  # 4,021 parameters
    sigma, clip, expected_batch = 2.0, 0.5, 16
    spec = PrivacySpec(max_grad_norm=clip, noise_multiplier=sigma, delta=1e-3, grad_mode=mode)
    engine, _ = engine_for(net, spec, num_examples=160, batch_size=expected_batch, physical=8)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    batch = make_batch(16, 400, k=1)
    engine.step(lambda m, b: per_example_loss(m, b, 0.5, zero=True), batch)
    delta = torch.cat([p.detach().flatten() for p in net.parameters()]) - before
    expected_std = sigma * clip / expected_batch
    assert abs(delta.mean()) < 4 * expected_std / math.sqrt(delta.numel())
    assert delta.std().item() == pytest.approx(expected_std, rel=0.05)


@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_empty_poisson_batch_still_adds_noise_and_counts(mode):
    torch.manual_seed(0)
    net = nn.Linear(50, 1)
    spec = PrivacySpec(max_grad_norm=1.0, noise_multiplier=1.0, delta=1e-3, grad_mode=mode)
    engine, ledger = engine_for(net, spec, num_examples=100, batch_size=10, physical=4)
    before = net.weight.detach().clone()
    engine.step(lambda m, b: per_example_loss(m, b, 0.5), make_batch(0, 50, k=2))
    assert ledger.steps == 1
    assert not torch.equal(before, net.weight.detach())


def test_epsilon_does_not_depend_on_noise_multiplicity():
    plans = [make_plan(PrivacySpec(epsilon=3.0, delta=1e-5, noise_multiplicity=k), 4000, 256, 300) for k in (1, 32)]
    assert plans[0].noise_multiplier == plans[1].noise_multiplier
    ledgers = []
    for k in (1, 8):
        module = ToyRegression(PrivacySpec(epsilon=5.0, delta=1e-3, noise_multiplicity=k), steps=4)
        module.attach_private_data(toy_dataset())
        quiet_trainer(max_steps=4).fit(module)
        ledgers.append(module.ledger)
    assert ledgers[0].history == ledgers[1].history
    assert ledgers[0].epsilons() == ledgers[1].epsilons()


@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.01, 1000), (2.49, 1 / 15, 4500), (1.3, 0.064, 300)])
def test_epsilon_matches_google_dp_accounting(sigma, q, steps):
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event)
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(event)
    delta = 1e-5
    ledger = PrivacyLedger(delta=delta)
    for _ in range(steps):
        ledger.step(noise_multiplier=sigma, sample_rate=q)
    assert ledger.epsilon("rdp") == pytest.approx(rdp.get_epsilon(delta), rel=0.01)
    assert ledger.epsilon("prv") == pytest.approx(pld.get_epsilon(delta), rel=0.01)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("target", [0.5, 2.0, 10.0])
def test_calibration_reaches_target_without_exceeding(accountant, target):
    q, steps, delta = 0.064, 300, 1e-5
    sigma, used = calibrate_noise_multiplier(target, delta, q, steps, accountant)
    eps = epsilon_for(sigma, q, steps, delta, used)
    assert target - 0.05 <= eps <= target


def test_budget_guard_stops_training_and_says_so(caplog):
    module = ToyRegression(PrivacySpec(epsilon=4.0, delta=1e-3), steps=5)
    module.attach_private_data(toy_dataset())
    trainer = quiet_trainer(max_steps=50)
    trainer.fit(module)
    assert module.ledger.steps == 5
    assert module.stopped_by_budget
    assert module.ledger.epsilon() <= 4.0
    assert "budget guard" in caplog.text


def test_budget_guard_with_given_sigma_stops_before_target():
    spec = PrivacySpec(epsilon=2.0, delta=1e-3, noise_multiplier=0.9)
    module = ToyRegression(spec, steps=40)
    module.attach_private_data(toy_dataset())
    quiet_trainer(max_steps=40).fit(module)
    assert 0 < module.ledger.steps < 40
    assert module.ledger.epsilon() <= 2.0
    assert module.ledger.epsilon_after_next(0.9, module.plan.sample_rate) > 2.0


def test_resume_gives_same_accountant_history(tmp_path):
    spec = PrivacySpec(epsilon=6.0, delta=1e-3, noise_multiplicity=2)

    def fit(steps, ckpt=None, checkpoint_dir=None):
        module = ToyRegression(spec, steps=6)
        module.attach_private_data(toy_dataset())
        callbacks = [ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=3, save_top_k=-1)] if checkpoint_dir else []
        quiet_trainer(max_steps=steps, callbacks=callbacks, enable_checkpointing=bool(callbacks)).fit(module, ckpt_path=ckpt)
        return module

    uninterrupted = fit(6)
    fit(3, checkpoint_dir=tmp_path)
    (checkpoint,) = tmp_path.glob("*.ckpt")
    resumed = fit(6, ckpt=str(checkpoint))
    assert resumed.ledger.history == uninterrupted.ledger.history
    assert resumed.ledger.steps == 6
    assert resumed.plan == uninterrupted.plan
    assert resumed.ledger.epsilons() == pytest.approx(uninterrupted.ledger.epsilons())


def test_batchnorm_is_refused_with_a_clear_error():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(PrivacyError, match="BatchNorm"):
        check_no_batch_mixing(net)
    check_no_batch_mixing(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4)))


def test_report_states_what_is_covered():
    module = ToyRegression(PrivacySpec(epsilon=4.0, delta=1e-3, noise_multiplicity=3), steps=3)
    module.attach_private_data(toy_dataset())
    quiet_trainer(max_steps=3).fit(module)
    report = module.privacy_report()
    for key in ("epsilon_prv", "epsilon_rdp", "delta", "noise_multiplier", "sample_rate", "steps",
                "max_grad_norm", "noise_multiplicity", "dataset_size", "covers"):
        assert key in report
    assert report["steps"] == 3 and report["noise_multiplicity"] == 3 and report["dataset_size"] == 64
    assert report["epsilon_prv"] <= report["epsilon_rdp"] + 1e-9
    assert report["covers"]["released"] == ["toy net"]


def test_non_private_mode_uses_same_path_without_noise():
    torch.manual_seed(0)
    net = nn.Linear(5, 1)
    spec = PrivacySpec(enabled=False)
    engine, ledger = engine_for(net, spec, num_examples=80, batch_size=8, physical=3)
    batch = make_batch(8, 5, k=2)
    reference = copy.deepcopy(net)
    engine.step(lambda m, b: per_example_loss(m, b, 0.5), batch)
    losses = per_example_loss(reference, batch, 0.5)
    (losses.sum() / 8).backward()
    torch.testing.assert_close(reference.weight.detach() - reference.weight.grad, net.weight.detach())
    assert ledger.steps == 0
    report = build_report(spec, engine.plan, ledger, Coverage(released=["x"], trained_with_dp=[]))
    assert report["private"] is False and "NO differential-privacy" in report["covers"]["notes"][0]


def test_clipping_with_given_norms_equals_opacus_clipping():
    """The grouped engine's norms go to `StreamlinedDPOptimizer`; its clipped, scaled sum is Opacus's own."""
    from opacus.optimizers import DPOptimizer

    from dp_diffusion.privacy.clipping import StreamlinedDPOptimizer

    torch.manual_seed(0)
    params = [nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(4))]
    samples = [torch.randn(5, 3, 2) * 2, torch.randn(5, 4)]
    samples[0][1] *= 0.01  # one example inside the clip norm, the rest clipped
    samples[1][1] *= 0.01
    norms = torch.stack([s.reshape(5, -1).norm(dim=1) for s in samples], dim=1).norm(dim=1)
    assert norms[1] < 1 < norms.max()

    def summed(cls, given):
        optimizer = cls(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                        expected_batch_size=5)
        for p, s in zip(params, samples):
            p.grad_sample = s.clone()
        if given is not None:
            optimizer.per_sample_norms = given
        optimizer.clip_and_accumulate()
        optimizer.add_noise()  # sigma = 0
        optimizer.scale_grad()
        out = [p.grad.clone() for p in params]
        for p in params:
            p.grad_sample, p.summed_grad, p.grad = None, None, None
        return out

    want = summed(DPOptimizer, None)
    for got, ref in zip(summed(StreamlinedDPOptimizer, norms), want):
        torch.testing.assert_close(got, ref)
    for got, ref in zip(summed(StreamlinedDPOptimizer, None), want):  # no norms given: Opacus takes them
        torch.testing.assert_close(got, ref)
    with pytest.raises(RuntimeError, match="per_sample_norms has 4 rows"):
        summed(StreamlinedDPOptimizer, norms[:4])
