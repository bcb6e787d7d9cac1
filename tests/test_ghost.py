"""grad_mode=ghost: per-example norms and clipped sums against a naive per-example loop,
both per-layer paths (ghost norm, materialised), shared layers, and the engine step."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from toy_models import (
    Probe,
    ToyRegression,
    loop_per_example_grads,
    per_example_loss,
    probe_case,
    probe_loss,
    shared_layers_case,
    tiny_unet_case,
    toy_dataset,
    transformer_case,
)
from torch import nn

from dp_diffusion.privacy import PrivacyLedger, PrivacySpec, PrivateOptimization, make_plan
from dp_diffusion.privacy.ghost import (
    GhostClipping,
    ghost_norm_is_cheaper,
    linear_ghost_sq_norms,
)
from dp_diffusion.privacy.grad_samplers import linear_grads
from dp_diffusion.privacy.per_example import make_per_example_gradients

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_norms_and_clipped_sum(model: nn.Module, loss_fn, batch, clip: float | None = None):
    """Per-example gradient norms and sum_i min(1, C/(norm_i + 1e-6)) g_i, one backward per example.

    `clip=None` takes C = the median norm, so that some examples are clipped and some not.
    """
    grads = loop_per_example_grads(model, loss_fn, batch)
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in example.values())) for example in grads])
    clip = norms.median().item() if clip is None else clip
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipped = {name: sum(factors[i] * grads[i][name] for i in range(len(grads))) for name in grads[0]}
    return norms, clipped, clip


def ghost_norms_and_clipped_sum(model: nn.Module, loss_fn, batch, clip: float):
    norms, losses = GhostClipping(model, clip)(loss_fn, batch)
    assert losses.shape == norms.shape
    return norms, {name: p.grad for name, p in model.named_parameters()}


def assert_matches_naive(model: nn.Module, loss_fn, batch, rtol: float = 1e-7, atol: float = 1e-10):
    """Ghost norms and clipped sum equal the loop's, with C = the median norm."""
    expected_norms, expected_sum, clip = naive_norms_and_clipped_sum(copy.deepcopy(model), loss_fn, batch)
    norms, clipped_sum = ghost_norms_and_clipped_sum(copy.deepcopy(model), loss_fn, batch, clip)
    torch.testing.assert_close(norms, expected_norms, rtol=rtol, atol=atol)
    assert (expected_norms > clip).any() and (expected_norms < clip).any(), "test should clip some, not all"
    for name, value in expected_sum.items():
        torch.testing.assert_close(clipped_sum[name], value, rtol=rtol, atol=atol)


def toy_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def toy_batch(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 6, generator=g, dtype=torch.float64), 3 * torch.randn(n, generator=g, dtype=torch.float64),
            torch.randn(n, k, 6, generator=g, dtype=torch.float64))


def toy_loss(model, batch):
    return per_example_loss(model, batch, 0.5)


@pytest.mark.parametrize("k", [1, 3])
def test_toy_regression_norms_and_clipped_sum_match_naive_loop(k):
    torch.manual_seed(0)
    net = toy_net()
    # Rows per example = K. Linear(6, 8): K^2 < 48, ghost norm. Linear(8, 1): ghost
    # at K=1, materialised at K=3 (9 >= 8): both paths are exercised.
    assert ghost_norm_is_cheaper(net[0], k)
    assert ghost_norm_is_cheaper(net[2], k) == (k == 1)
    assert_matches_naive(net, toy_loss, toy_batch(7, k))


@pytest.mark.parametrize("k", [1, 3])
def test_each_layer_type_norms_and_clipped_sum_match_naive_loop(k):
    assert_matches_naive(*probe_case(num_examples=5, noise_multiplicity=k))


@pytest.mark.parametrize("k", [1, 3])
def test_transformer_block_norms_and_clipped_sum_match_naive_loop(k):
    """LayerNorm (materialised) and Linear layers on (B*K, tokens, dim) inputs: the qkv layer takes the ghost
    norm at K=1 (5 tokens: 25 < 6 x 18) and is materialised at K=3 (225 >= 108)."""
    model, loss_fn, batch = transformer_case(num_examples=5, noise_multiplicity=k)
    assert ghost_norm_is_cheaper(model.qkv, 5 * k) == (k == 1)
    assert_matches_naive(model, loss_fn, batch)


@pytest.mark.parametrize("k", [1, 3])
def test_unet_norms_and_clipped_sum_match_naive_loop(k):
    denoiser, loss_fn, batch = tiny_unet_case(num_examples=4, noise_multiplicity=k)
    assert any(type(m) is nn.Linear and ghost_norm_is_cheaper(m, k) for m in denoiser.modules())
    assert_matches_naive(denoiser, loss_fn, batch, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("rows", [(1, 1), (3, 1), (2, 5)])
def test_linear_over_sequence_positions_both_paths_match_naive(rows):
    """Rows of an example are its K draws times its T positions; both norm paths agree with the loop."""
    k, t = rows
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    x = torch.randn(6, k, t, 4, dtype=torch.float64)

    def loss_fn(model, batch):
        (x,) = batch
        return torch.sin(model(x.reshape(-1, t, 4))).reshape(x.shape[0], -1).sum(dim=1)

    grads = loop_per_example_grads(copy.deepcopy(layer), loss_fn, (x,))
    expected = torch.stack([sum((g**2).sum() for g in example.values()) for example in grads])
    a = x.reshape(-1, t, 4)
    g = torch.cos(layer(a)).detach()  # d loss / d output
    torch.testing.assert_close(linear_ghost_sq_norms(layer, a, g, 6), expected)
    materialised = sum(grad.reshape(6, -1).pow(2).sum(dim=1) for grad in linear_grads(layer, a, g, 6).values())
    torch.testing.assert_close(materialised, expected)
    assert ghost_norm_is_cheaper(layer, k * t) == ((k * t) ** 2 < 12)


def test_shared_layers_sum_gradients_over_calls_before_the_norm():
    assert_matches_naive(*shared_layers_case())


def test_engine_step_equals_grouped_step_with_the_same_noise():
    """Chunked logical step with noise: ghost and grouped give the same update, stats and accounting."""
    torch.manual_seed(1)
    net = toy_net()
    batch = toy_batch(7, 3, seed=2)
    norms, _, _ = naive_norms_and_clipped_sum(copy.deepcopy(net), toy_loss, batch)
    assert (norms > 0.3).any(), "test should exercise clipping"
    results = []
    for mode in ("grouped", "ghost"):
        model = copy.deepcopy(net)
        spec = PrivacySpec(max_grad_norm=0.3, noise_multiplier=0.7, noise_multiplicity=3, grad_mode=mode, delta=1e-3)
        plan = make_plan(spec, 80, 8, steps=10)
        ledger = PrivacyLedger(delta=spec.delta)
        engine = PrivateOptimization(model, torch.optim.SGD(model.parameters(), lr=1.0), spec, plan, ledger, 3)
        torch.manual_seed(5)  # the noise draws: same generator state, same parameter order
        stats = engine.step(lambda m, b: per_example_loss(m, b, 0.5), batch)
        results.append((model, stats, ledger.steps))
    (grouped, grouped_stats, grouped_steps), (ghost, ghost_stats, ghost_steps) = results
    assert grouped_steps == ghost_steps == 1
    torch.testing.assert_close(ghost_stats["update_norm"], grouped_stats["update_norm"])
    for p, q, p0 in zip(ghost.parameters(), grouped.parameters(), net.parameters()):
        assert not torch.equal(p, p0)
        torch.testing.assert_close(p, q)
        assert p.grad is None


def test_engine_ignores_stale_gradients_and_other_modules():
    """Only this step's clipped sum is released; a module outside the private one keeps its .grad."""
    torch.manual_seed(1)
    net = toy_net()
    other = nn.Linear(1, 1).double()
    clip, expected_batch = 0.3, 8
    spec = PrivacySpec(max_grad_norm=clip, noise_multiplier=0.0, noise_multiplicity=2, grad_mode="ghost", delta=1e-3)
    plan = make_plan(spec, 80, expected_batch, steps=10)
    engine = PrivateOptimization(net, torch.optim.SGD(net.parameters(), lr=1.0), spec, plan,
                                 PrivacyLedger(delta=spec.delta), 4)
    batch = toy_batch(7, 2, seed=3)

    def loss_through(head: nn.Module):
        return lambda m, b: per_example_loss(lambda x: head(m(x)), b, 0.5)

    _, expected, _ = naive_norms_and_clipped_sum(copy.deepcopy(net), loss_through(copy.deepcopy(other)), batch, clip)
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.full_like(p, 100.0)  # left over from elsewhere: must not be released
    engine.step(loss_through(other), batch)
    for (name, p), p0 in zip(net.named_parameters(), before):
        torch.testing.assert_close(p0 - p.detach(), expected[name] / expected_batch)
    assert other.weight.grad is None and other.bias.grad is None


def test_empty_poisson_batch_adds_noise_and_counts():
    torch.manual_seed(0)
    net = nn.Linear(50, 1)
    spec = PrivacySpec(max_grad_norm=1.0, noise_multiplier=1.0, delta=1e-3, grad_mode="ghost")
    ledger = PrivacyLedger(delta=spec.delta)
    engine = PrivateOptimization(net, torch.optim.SGD(net.parameters(), lr=1.0), spec, make_plan(spec, 100, 10, 10),
                                 ledger, 4)
    before = net.weight.detach().clone()
    stats = engine.step(lambda m, b: per_example_loss(m, b, 0.5), (torch.zeros(0, 50), torch.zeros(0),
                                                                   torch.zeros(0, 2, 50)))
    assert ledger.steps == 1
    assert stats["update_norm"] > 0
    assert not torch.equal(before, net.weight.detach())
    norms, losses = GhostClipping(net, 1.0)(lambda m, b: per_example_loss(m, b, 0.5),
                                            (torch.zeros(0, 50), torch.zeros(0), torch.zeros(0, 2, 50)))
    assert norms.shape == losses.shape == (0,)


def test_lightning_fit_in_ghost_mode_counts_every_step():
    module = ToyRegression(PrivacySpec(epsilon=8.0, delta=1e-3, noise_multiplicity=2, grad_mode="ghost"),
                           steps=3, physical_batch_size=5)
    module.attach_private_data(toy_dataset())
    L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(module)
    assert module.ledger.steps == 3


def test_ghost_is_a_mode_but_not_a_per_example_gradient_engine():
    from dp_diffusion.privacy.per_example import GRAD_MODES, GroupedGradients

    assert "ghost" in GRAD_MODES
    assert isinstance(make_per_example_gradients(toy_net(), "auto"), GroupedGradients)  # auto never picks ghost
    with pytest.raises(ValueError, match="GhostClipping"):
        make_per_example_gradients(toy_net(), "ghost")
    with pytest.raises(ValueError, match="grad_mode=ghost supports only"):
        GhostClipping(nn.Sequential(nn.Linear(3, 3), nn.PReLU()), 1.0)  # (LayerNorm has a sampler now)


def test_bf16_autocast_norms_and_sum_are_close_to_fp32():
    torch.manual_seed(0)
    model = Probe()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 2, 9, 9, generator=g), torch.tensor([0, 3, 3, 4]), torch.randn(4, 2, 2, 9, 9, generator=g))
    exact_model, approx_model = copy.deepcopy(model), copy.deepcopy(model)
    exact, _ = GhostClipping(exact_model, 0.5)(probe_loss, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approx, _ = GhostClipping(approx_model, 0.5)(probe_loss, batch)
    torch.testing.assert_close(approx, exact, rtol=0.02, atol=1e-3)
    for p, q in zip(approx_model.parameters(), exact_model.parameters()):
        assert p.grad.dtype == torch.float32
        assert (p.grad - q.grad).norm() <= 0.05 * q.grad.norm() + 1e-6


def test_config_accepts_grad_mode_ghost():
    from hydra import compose, initialize_config_dir

    from dp_diffusion.cli import CONF_DIR
    from dp_diffusion.run_config import validate_config

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        validate_config(compose("config", overrides=["privacy.grad_mode=ghost"]))


def test_ghost_hooks_refuse_inputs_without_b_times_k_leading_rows():
    from toy_models import SequenceFirst, odd_model_case

    from dp_diffusion.privacy import PrivacyError

    model, loss_fn, batch = odd_model_case(SequenceFirst, num_examples=3)  # T = 4 rows, B = 3
    with pytest.raises(PrivacyError, match=r"layer lin \(Linear\) got an input with 4 leading rows"):
        GhostClipping(model, 1.0)(loss_fn, batch)
