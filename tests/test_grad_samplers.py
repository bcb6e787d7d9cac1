"""Every per-example gradient mode against a naive per-example loop, on each layer
type and on the DDPM++ UNet with noise multiplicity."""

from __future__ import annotations

import copy

import pytest
import torch
from toy_models import (
    Probe,
    loop_per_example_grads,
    probe_case,
    probe_loss,
    shared_layers_case,
    tiny_unet_case,
    transformer_case,
)
from torch import nn

from dp_diffusion.privacy import grad_samplers
from dp_diffusion.privacy.per_example import PER_EXAMPLE_MODES, make_per_example_gradients

MODES = list(PER_EXAMPLE_MODES)


@pytest.mark.parametrize("noise_multiplicity", [1, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [probe_case, transformer_case], ids=["each_layer_type", "transformer_block"])
def test_per_example_gradients_match_naive_loop(case, mode, noise_multiplicity):
    """Every layer type of the probe, and a transformer block (LayerNorm and Linear layers on (B*K, tokens, dim)
    inputs: each example's gradient sums its draws and tokens), against the per-example loop."""
    model, loss_fn, batch = case(num_examples=4, noise_multiplicity=noise_multiplicity)
    expected = loop_per_example_grads(copy.deepcopy(model), loss_fn, batch)
    grads, _ = make_per_example_gradients(copy.deepcopy(model), mode)(loss_fn, batch)
    for name in expected[0]:
        for i in range(4):
            torch.testing.assert_close(grads[name][i], expected[i][name], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("rows", [(3, 1), (3, 4)])
def test_layer_norm_sampler_matches_naive_loop(rows):
    """The LayerNorm sampler alone, over two normalized dims, without bias, and with a frozen weight."""
    k, t = rows
    torch.manual_seed(0)
    x = torch.randn(5 * k, t, 3, 4, dtype=torch.float64)
    for layer in (nn.LayerNorm((3, 4), bias=False), nn.LayerNorm((3, 4))):
        layer = layer.double()
        with torch.no_grad():
            layer.weight.add_(torch.randn_like(layer.weight))
        weights = torch.randn(5 * k, t, 3, 4, dtype=torch.float64)
        expected = []
        for i in range(5):
            rows_i = x[i * k:(i + 1) * k]
            params = list(layer.parameters())
            expected.append(torch.autograd.grad((layer(rows_i) * weights[i * k:(i + 1) * k]).sum(), params))
        got = grad_samplers.layer_norm_grads(layer, x, weights, 5)
        for j, p in enumerate(layer.parameters()):
            torch.testing.assert_close(got[p], torch.stack([e[j] for e in expected]))
        layer.weight.requires_grad_(False)
        assert list(grad_samplers.layer_norm_grads(layer, x, weights, 5)) == ([layer.bias] if layer.bias is not None
                                                                              else [])


@pytest.mark.parametrize("mode", MODES)
def test_unet_with_noise_multiplicity_matches_naive_loop(mode):
    denoiser, loss_fn, batch = tiny_unet_case(num_examples=3, noise_multiplicity=4)
    expected = loop_per_example_grads(copy.deepcopy(denoiser), loss_fn, batch)
    grads, losses = make_per_example_gradients(copy.deepcopy(denoiser), mode)(loss_fn, batch)
    assert losses.shape == (3,)
    for name in expected[0]:
        for i in range(3):
            torch.testing.assert_close(grads[name][i], expected[i][name], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("draws", [1, 3])
def test_group_norm_reuses_the_forward_statistics(draws, monkeypatch):
    """The GroupNorm sampler takes mean and 1/std from the forward's autograd node when the
    output has one, and recomputes them when not (e.g. a first layer, whose output is a leaf)."""
    torch.manual_seed(0)
    layer = nn.GroupNorm(2, 4).double()
    x = torch.randn(3 * draws, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    output = layer(x)
    saved = grad_samplers.saved_group_norm_statistics(output, 3 * draws, 2, torch.float64)
    assert saved is not None
    torch.testing.assert_close(saved[0].reshape(3 * draws, 2), x.detach().reshape(3 * draws, 2, -1).mean(-1))
    g = torch.randn_like(output)
    recomputed = grad_samplers.group_norm_grads(layer, x.detach(), g, 3, output.detach())

    def no_recompute(*args, **kwargs):
        raise AssertionError("statistics recomputed although the forward saved them")

    monkeypatch.setattr(torch.ops.aten, "native_group_norm", no_recompute)
    reused = grad_samplers.group_norm_grads(layer, x.detach(), g, 3, output)
    assert grad_samplers.saved_group_norm_statistics(output.detach(), 3 * draws, 2, torch.float64) is None
    for p in (layer.weight, layer.bias):
        assert reused[p].shape == (3, 4)
        torch.testing.assert_close(reused[p], recomputed[p], rtol=1e-12, atol=1e-12)


def test_auto_picks_grouped_and_falls_back_for_unsupported_layers():
    from dp_diffusion.privacy.per_example import FunctorchGradients, GroupedGradients

    assert isinstance(make_per_example_gradients(Probe(), "auto"), GroupedGradients)
    odd = nn.Sequential(nn.Linear(3, 3), nn.PReLU())  # (LayerNorm has a sampler now)
    assert isinstance(make_per_example_gradients(odd, "auto"), FunctorchGradients)
    with pytest.raises(ValueError, match="grad_mode=functorch"):
        make_per_example_gradients(odd, "grouped")


def test_grouped_mode_under_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    model = Probe()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 2, 9, 9, generator=g), torch.tensor([0, 3, 3, 4]), torch.randn(4, 2, 2, 9, 9, generator=g))
    exact, _ = make_per_example_gradients(copy.deepcopy(model), "grouped")(probe_loss, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approx, _ = make_per_example_gradients(copy.deepcopy(model), "grouped")(probe_loss, batch)
    for name, value in exact.items():
        assert approx[name].dtype == torch.float32
        assert (approx[name] - value).norm() <= 0.05 * value.norm() + 1e-6, name


def test_grouped_mode_refuses_compiled_modules():
    with pytest.raises(ValueError, match="torch.compile"):
        make_per_example_gradients(torch.compile(Probe()), "grouped")
    in_place = Probe()
    in_place.norm.compile()  # Module.compile: no wrapper, the hooks would still be hidden
    with pytest.raises(ValueError, match="torch.compile"):
        make_per_example_gradients(in_place, "grouped")


@pytest.mark.parametrize("case", ["probe", "shared", "unet"])
def test_grouped_norms_taken_on_the_way_equal_the_norms_of_the_gradients(case):
    """`last_norms` (what the clipping uses) is the per-example norm over all parameters,
    shared layers and tied weights counted once, with their calls summed first."""
    model, loss_fn, batch = {
        "probe": lambda: probe_case(num_examples=4, noise_multiplicity=3),
        "shared": shared_layers_case,
        "unet": lambda: tiny_unet_case(num_examples=3, noise_multiplicity=4),
    }[case]()
    engine = make_per_example_gradients(model, "grouped")
    grads, _ = engine(loss_fn, batch)
    expected = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)
    assert engine.last_norms is not None and (engine.last_norms > 0).all()
    torch.testing.assert_close(engine.last_norms, expected.to(engine.last_norms.dtype), rtol=1e-5, atol=0)
    reference = loop_per_example_grads(copy.deepcopy(model), loss_fn, batch)
    for name in grads:  # and the gradients themselves are still the naive loop's
        for i, want in enumerate(reference):
            torch.testing.assert_close(grads[name][i], want[name], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("parameters_need_grad", [False, True])
def test_output_gradients_are_handed_over_once_each_and_not_held(parameters_need_grad):
    """`stream_output_grads` (the first backward of grouped and ghost) hands each captured call's output
    gradient to `take` once, and by then the ones handed over before are freed: they are not all held
    until the pass ends. With trainable parameters (ghost's forward) as with detached ones (grouped's)."""
    import weakref

    from dp_diffusion.privacy.per_example import LayerCapture, stream_output_grads

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(6)])
    detached = {k: p.detach() for k, p in model.named_parameters()}  # grouped mode's forward
    capture = LayerCapture(model)
    taken, alive_at_take = [], []

    def take(index, g):
        alive_at_take.append(sum(ref() is not None for _, ref in taken))
        taken.append((index, weakref.ref(g)))

    with capture.recording(3) as records, torch.enable_grad():
        x = torch.randn(3, 4)
        out = model(x) if parameters_need_grad else torch.func.functional_call(model, detached, (x,))
        stream_output_grads(out.pow(2).sum(1), records, take)
    assert sorted(i for i, _ in taken) == list(range(6))
    assert max(alive_at_take) <= 1, alive_at_take
    assert all(p.grad is None for p in model.parameters())


def test_hooks_refuse_inputs_without_b_times_k_leading_rows():
    """A sequence-first Linear sees (T, B, D): its leading rows are positions, not examples."""
    from toy_models import SequenceFirst, odd_model_case

    from dp_diffusion.privacy import PrivacyError

    model, loss_fn, batch = odd_model_case(SequenceFirst, num_examples=3)  # T = 4 rows, B = 3
    with pytest.raises(PrivacyError, match=r"layer lin \(Linear\) got an input with 4 leading rows"):
        make_per_example_gradients(model, "grouped")(loss_fn, batch)


def test_parametrised_layers_are_not_hookable():
    from toy_models import WeightNormed

    from dp_diffusion.privacy.grad_samplers import unsupported_parameters

    assert unsupported_parameters(Probe()) == []
    new_style = unsupported_parameters(WeightNormed())
    assert "lin.parametrizations.weight.original0" in new_style and "head.weight" not in new_style
    with pytest.warns(FutureWarning):
        old_style = WeightNormed(old_style=True)
    assert sorted(unsupported_parameters(old_style)) == ["lin.weight_g", "lin.weight_v"]
