"""Gradient hygiene of the private step: only the private module's trainable parameters get gradients
(a critic the loss passes through keeps its .grad), frozen layers get no per-example gradients, and
LayerNorm / 3-D Linear layers (transformer blocks) run in the grouped mode."""

from __future__ import annotations

import copy

import pytest
import torch
from toy_models import TinyTransformerBlock, critic_case, frozen_unet_case
from torch import nn
from torch.utils._pytree import tree_map

from dp_diffusion.privacy import PrivacyLedger, PrivacySpec, PrivateOptimization, make_plan
from dp_diffusion.privacy import grad_samplers
from dp_diffusion.privacy.per_example import (
    PER_EXAMPLE_MODES,
    GroupedGradients,
    batch_size_of,
    make_per_example_gradients,
    trainable_parameters,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ALL_MODES = [*PER_EXAMPLE_MODES, "ghost", "non-private"]


def engine_for(model: nn.Module, mode: str, clip: float = 1.0, expected_batch: int = 4,
               physical_batch: int = 8) -> PrivateOptimization:
    """A noiseless engine (sigma = 0) with SGD(lr=1) over `model`'s trainable parameters; mode
    "non-private" is the same chunked path with privacy disabled."""
    enabled = mode != "non-private"
    spec = PrivacySpec(enabled=enabled, max_grad_norm=clip, noise_multiplier=0.0,
                       grad_mode=mode if enabled else "auto", delta=1e-3)
    optimizer = torch.optim.SGD(list(trainable_parameters(model).values()), lr=1.0)
    return PrivateOptimization(model, optimizer, spec, make_plan(spec, 100, expected_batch, 10),
                               PrivacyLedger(delta=1e-3), physical_batch)


def naive_clipped_mean(model: nn.Module, loss_fn, batch, clip: float, expected_batch: int) -> dict[str, torch.Tensor]:
    """sum_i min(1, C/(||g_i|| + 1e-6)) g_i / expected batch size over the trainable parameters, one backward per
    example."""
    model = copy.deepcopy(model)
    names, params = zip(*trainable_parameters(model).items())
    grads = []
    for i in range(batch_size_of(batch)):
        example = tree_map(lambda t, i=i: t[i:i + 1], batch)
        grads.append(dict(zip(names, torch.autograd.grad(loss_fn(model, example).sum(), params))))
    norms = torch.stack([torch.sqrt(sum((g[n] ** 2).sum() for n in names)) for g in grads])
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any(), "the test should clip"
    return {n: sum(factors[i] * grads[i][n] for i in range(len(grads))) / expected_batch for n in names}


@pytest.mark.parametrize("mode", ALL_MODES)
def test_a_critic_the_loss_passes_through_keeps_its_grad(mode):
    """The private loss runs through a critic with trainable parameters: the step updates the private
    net and leaves the critic's .grad None (two physical chunks, and the first step's check)."""
    private, critic, loss_fn, batch = critic_case(num_examples=6)
    before = [p.detach().clone() for p in private.parameters()]
    critic_before = [p.detach().clone() for p in critic.parameters()]
    engine_for(private, mode, physical_batch=4).step(loss_fn, batch)
    assert all(p.grad is None for p in critic.parameters()), mode
    assert all(torch.equal(p, q) for p, q in zip(critic.parameters(), critic_before))
    assert all(not torch.equal(p, q) for p, q in zip(private.parameters(), before))


@pytest.mark.parametrize("mode", PER_EXAMPLE_MODES)
def test_per_example_engines_leave_a_critic_alone(mode):
    private, critic, loss_fn, batch = critic_case(num_examples=3)
    grads, _ = make_per_example_gradients(private, mode)(loss_fn, batch)
    assert set(grads) == set(dict(private.named_parameters()))
    for p in critic.parameters():
        assert p.grad is None and getattr(p, "grad_sample", None) is None


def _spy_samplers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """Record each sampler call: the layer and the parameters it returned per-example gradients for."""
    calls: list[tuple[nn.Module, list[nn.Parameter]]] = []
    for layer_type, sampler in list(grad_samplers.GRAD_SAMPLERS.items()):
        def spy(layer, *args, _sampler=sampler, **kwargs):
            out = _sampler(layer, *args, **kwargs)
            calls.append((layer, list(out)))
            return out
        monkeypatch.setitem(grad_samplers.GRAD_SAMPLERS, layer_type, spy)
    return calls


@pytest.mark.parametrize("mode", ["grouped", "ghost"])
def test_frozen_layers_get_no_per_example_gradients(mode, monkeypatch):
    """All but one attention block of a tiny UNet frozen (with a bias-only layer too): per-example gradients
    are formed only for trainable parameters, each once, and the update equals the naive clipped mean."""
    denoiser, loss_fn, batch = frozen_unet_case(num_examples=4, noise_multiplicity=2, trainable="mid.1")
    bias_only = denoiser.backbone.conv_in
    bias_only.bias.requires_grad_(True)
    trainable = trainable_parameters(denoiser)
    assert 0 < len(trainable) < len(list(denoiser.parameters())) // 10
    expected = naive_clipped_mean(denoiser, loss_fn, batch, clip=0.056, expected_batch=4)
    frozen_before = {n: p.detach().clone() for n, p in denoiser.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in trainable.items()}
    engine = engine_for(denoiser, mode, clip=0.056)
    engine.first_step_checked = True  # the check compares with functorch: count the mode's own work only
    calls = _spy_samplers(monkeypatch)
    engine.step(loss_fn, batch)
    formed = [p for _, params in calls for p in params]
    assert all(p.requires_grad for p in formed)
    layers = {layer for layer, _ in calls}
    assert all(any(p.requires_grad for p in layer.parameters(recurse=False)) for layer in layers)
    assert bias_only in layers and [bias_only.bias] in [params for layer, params in calls if layer is bias_only]
    if mode == "grouped":  # every trainable parameter once; ghost takes Linear norms without forming them
        assert sorted(id(p) for p in formed) == sorted(id(p) for p in trainable.values())
    for name, p in denoiser.named_parameters():
        if name in frozen_before:
            assert p.grad is None and torch.equal(p, frozen_before[name]), name
        else:
            torch.testing.assert_close(trainable_before[name] - p.detach(), expected[name], rtol=1e-6, atol=1e-10)


def test_grouped_engine_returns_only_trainable_parameters():
    denoiser, loss_fn, batch = frozen_unet_case(num_examples=3, noise_multiplicity=1, trainable="mid.1")
    grads, _ = make_per_example_gradients(denoiser, "grouped")(loss_fn, batch)
    assert set(grads) == set(trainable_parameters(denoiser))
    assert all(getattr(p, "grad_sample", None) is None and p.grad is None for p in denoiser.parameters())


def test_auto_picks_grouped_for_a_transformer_block():
    assert isinstance(make_per_example_gradients(TinyTransformerBlock(), "auto"), GroupedGradients)


@pytest.mark.parametrize("mode", ["grouped", "ghost", "opacus", "functorch"])
def test_transformer_block_step_equals_naive_clipped_mean(mode):
    """LayerNorm + 3-D Linear block through the whole step, first step's check included."""
    from toy_models import transformer_case

    model, loss_fn, batch = transformer_case(num_examples=5, noise_multiplicity=2)
    expected = naive_clipped_mean(model, loss_fn, batch, clip=0.05, expected_batch=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine_for(model, mode, clip=0.05, physical_batch=3).step(loss_fn, batch)
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name], rtol=1e-6, atol=1e-10)
