"""The first step's check (`privacy/self_check.py`): models whose per-example gradients the hooks would
get wrong are refused (or, under grad_mode=auto, handled by functorch), layers that keep statistics of
the batch in buffers are refused, and a normal UNet passes without anything it touched changing."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from toy_models import (
    RunningStatistics,
    SequenceFirst,
    WeightNormed,
    WeightUsedOutsideItsCall,
    WeightWithoutLayerCall,
    loop_per_example_grads,
    odd_model_case,
    tiny_unet_case,
)
from torch import nn

from dp_diffusion.privacy import PrivacyError, PrivacyLedger, PrivacySpec, PrivateOptimization, make_plan
from dp_diffusion.privacy.per_example import FunctorchGradients, GroupedGradients
from dp_diffusion.privacy.self_check import first_step_check
from dp_diffusion.privacy.validation import check_buffers_unchanged

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.* is deprecated")]
HOOK_MODES = ["grouped", "ghost"]


def engine_for(model: nn.Module, mode: str, clip: float = 1.0, expected_batch: int = 4) -> PrivateOptimization:
    spec = PrivacySpec(max_grad_norm=clip, noise_multiplier=0.0, grad_mode=mode, delta=1e-3)
    return PrivateOptimization(model, torch.optim.SGD(model.parameters(), lr=1.0), spec,
                               make_plan(spec, 100, expected_batch, 10), PrivacyLedger(delta=1e-3), 8)


def update_of(model: nn.Module, mode: str, loss_fn, batch) -> torch.Tensor:
    """The flattened update of one noiseless step (C = 1, expected batch 4) of a copy of `model`."""
    model = copy.deepcopy(model)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    engine_for(model, mode).step(loss_fn, batch)
    return before - torch.cat([p.detach().flatten() for p in model.parameters()])


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("mode", HOOK_MODES)
def test_weight_also_used_outside_its_layer_is_refused(mode):
    """Ghost clipping would under-clip it (its norm misses the second use); grouped would miss that gradient."""
    model, loss_fn, batch = odd_model_case(WeightUsedOutsideItsCall)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(PrivacyError, match=rf"grad_mode={mode}: .*disagree with functorch.*relative error") as info:
        engine_for(model, mode).step(loss_fn, batch)
    assert "grad_mode=functorch" in one_line_error(info)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # refused before any update


def test_auto_falls_back_to_functorch_and_clips_each_example_to_c(caplog):
    model, loss_fn, batch = odd_model_case(WeightUsedOutsideItsCall)
    with caplog.at_level(logging.WARNING):
        auto = update_of(model, "auto", loss_fn, batch)
    assert "falls back to functorch" in caplog.text
    torch.testing.assert_close(auto, update_of(model, "functorch", loss_fn, batch))
    # One example's effect on the (noiseless) update, times the expected batch size, is at most C = 1.
    without_first = update_of(model, "auto", loss_fn, (batch[0][1:],))
    assert (auto - without_first).norm() * 4 <= 1.0 + 1e-9
    assert (auto - without_first).norm() * 4 >= 0.99  # and it is clipped, not vanishing


@pytest.mark.parametrize("mode", HOOK_MODES)
def test_parameter_used_outside_any_hooked_call_is_refused(mode):
    model, loss_fn, batch = odd_model_case(WeightWithoutLayerCall)
    with pytest.raises(PrivacyError, match=rf"grad_mode={mode}: parameter lin\.(weight|bias) is used in the forward "
                                           "outside any hooked layer call"):
        engine_for(model, mode).step(loss_fn, batch)


@pytest.mark.parametrize("old_style", [False, True])
@pytest.mark.parametrize("mode", HOOK_MODES)
def test_weight_norm_is_refused_by_hook_modes(mode, old_style):
    model, _, _ = odd_model_case(WeightNormed, 4, old_style)
    name = "weight_g" if old_style else "original0"
    with pytest.raises(PrivacyError, match=rf"grad_mode={mode} supports only .*{name}"):
        engine_for(model, mode)


@pytest.mark.parametrize("old_style", [False, True])
def test_weight_norm_under_auto_gets_the_per_example_gradients_of_g_and_v(old_style):
    model, loss_fn, batch = odd_model_case(WeightNormed, 4, old_style)
    engine = engine_for(model, "auto")
    assert isinstance(engine.gradients, FunctorchGradients)
    grads, _ = engine.gradients(loss_fn, batch)
    expected = loop_per_example_grads(model, loss_fn, batch)
    for name in expected[0]:
        for i in range(4):
            torch.testing.assert_close(grads[name][i], expected[i][name])


@pytest.mark.parametrize("num_examples", [4, 3])  # T = 4 = B: rows look right; T = 4, B = 3: they do not
@pytest.mark.parametrize("mode", HOOK_MODES)
def test_sequence_first_linear_is_refused(mode, num_examples):
    model, loss_fn, batch = odd_model_case(SequenceFirst, num_examples)
    with pytest.raises(PrivacyError, match=rf"grad_mode={mode}: .*(disagree with functorch|layer lin \(Linear\) got "
                                           "an input with 4 leading rows)") as info:
        engine_for(model, mode).step(loss_fn, batch)
    one_line_error(info)


def test_sequence_first_linear_under_auto_is_attributed_to_the_right_examples():
    model, loss_fn, batch = odd_model_case(SequenceFirst)
    engine = engine_for(copy.deepcopy(model), "auto")
    assert isinstance(engine.gradients, GroupedGradients)  # what auto picks from the layer types alone
    engine.step(loss_fn, batch)
    assert isinstance(engine.gradients, FunctorchGradients)
    torch.testing.assert_close(update_of(model, "auto", loss_fn, batch), update_of(model, "functorch", loss_fn, batch))


@pytest.mark.parametrize("mode", ["auto", "functorch", "grouped", "ghost"])  # Opacus refuses it itself
def test_layer_with_running_statistics_is_refused_and_its_buffers_restored(mode):
    model, loss_fn, batch = odd_model_case(RunningStatistics)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with pytest.raises(PrivacyError, match=r"norm \(InstanceNorm2d: running_mean, running_var") as info:
        engine_for(model, mode).step(loss_fn, batch)
    assert "track_running_stats=False" in one_line_error(info)
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name


def test_buffer_check_passes_fixed_buffers_and_returns_the_forward():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, track_running_stats=False))
    model.register_buffer("fixed", torch.arange(3.0))
    model.eval()
    out = check_buffers_unchanged(model, lambda: model(torch.ones(2, 1, 4, 4)))
    assert out.shape == (2, 2, 2, 2)
    assert not model.training  # the training flag is restored


@pytest.mark.parametrize("mode", ["auto", *HOOK_MODES, "opacus"])
def test_tiny_unet_passes_and_the_check_leaves_no_trace(mode):
    """A normal UNet (zero-initialised output layers included) passes; the check moves no parameter,
    buffer, training flag, gradient or random state."""
    denoiser, loss_fn, batch = tiny_unet_case(num_examples=5, noise_multiplicity=2)
    zeroed = [p for name, p in denoiser.named_parameters() if "conv_out" in name]
    with torch.no_grad():
        for p in zeroed:  # as the UNet initialises its output layer
            p.zero_()
    state = copy.deepcopy(denoiser.state_dict())
    engine = engine_for(denoiser, mode)
    rng = torch.get_rng_state()
    assert first_step_check(engine, loss_fn, batch) is True
    assert torch.equal(torch.get_rng_state(), rng)
    assert denoiser.training
    for name, value in denoiser.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(p.grad is None for p in denoiser.parameters())
    if mode == "auto":
        assert isinstance(engine.gradients, GroupedGradients)  # no fallback needed


def test_check_runs_until_a_batch_has_two_examples():
    model, loss_fn, batch = odd_model_case(SequenceFirst, 4)
    engine = engine_for(model, "grouped")
    empty = (batch[0][:0],)
    assert first_step_check(engine, loss_fn, empty) is False
    engine.step(loss_fn, empty)  # an empty Poisson batch: noise only, still to be checked
    assert not engine.first_step_checked
    with pytest.raises(PrivacyError):
        engine.step(loss_fn, batch)


@pytest.mark.parametrize("mode", HOOK_MODES)
def test_dropout_does_not_make_the_check_refuse(mode):
    """The two sides of the comparison would draw different dropout masks: the check runs with dropout off."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 1), nn.Flatten(0)).double()
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    engine = engine_for(model, mode)
    engine.step(lambda m, b: m(b[0]) ** 2, (x,))
    assert engine.first_step_checked and model[1].training


@pytest.mark.parametrize("case", ["frozen_unet", "transformer"])
@pytest.mark.parametrize("mode", ["auto", *HOOK_MODES, "opacus"])
def test_frozen_layers_and_layer_norm_pass_and_the_check_leaves_no_trace(mode, case):
    """A UNet with all but one block frozen, and a transformer block (LayerNorm, 3-D Linear), pass the check;
    frozen parameters get no gradient and nothing moves."""
    from toy_models import frozen_unet_case, transformer_case

    if case == "frozen_unet":
        model, loss_fn, batch = frozen_unet_case(num_examples=5, noise_multiplicity=2, trainable="mid.1")
    else:
        model, loss_fn, batch = transformer_case(num_examples=5, noise_multiplicity=2)
    state = copy.deepcopy(model.state_dict())
    engine = engine_for(model, mode)
    assert first_step_check(engine, loss_fn, batch) is True
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(p.grad is None for p in model.parameters())
    if mode == "auto":
        assert isinstance(engine.gradients, GroupedGradients)  # no fallback needed


class LayerNormWeightReused(nn.Module):
    """A LayerNorm whose weight is also used outside its own call; the Linear before it is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4).requires_grad_(False)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.lin(x))) + x * self.norm.weight
        return self.head(h).squeeze(-1)


@pytest.mark.parametrize("mode", HOOK_MODES)
def test_layer_norm_weight_used_outside_its_call_is_refused(mode):
    model, loss_fn, batch = odd_model_case(LayerNormWeightReused)
    with pytest.raises(PrivacyError, match=rf"grad_mode={mode}: .*disagree with functorch"):
        engine_for(model, mode).step(loss_fn, batch)
