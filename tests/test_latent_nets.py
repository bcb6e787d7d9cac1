"""DP-LDM's networks: the KL autoencoder, the latent UNet with transformer blocks, its class embedder, LoRA
adapters and the fine-tune selection; per-example gradients of each fine-tuned part against the naive loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_map

from dp_diffusion.config import ConfigError
from dp_diffusion.diffusion.losses import VPLoss
from dp_diffusion.nets import UNet
from dp_diffusion.nets.autoencoder import AutoencoderKL, latent_scale_factor
from dp_diffusion.nets.finetune import FINETUNE_MODES, select_trainable
from dp_diffusion.nets.latent_unet import LatentUNet, TransformerBlock
from dp_diffusion.nets.lora import LoRALinear, merge_lora
from dp_diffusion.privacy import PrivacyLedger, PrivacySpec, PrivateOptimization, make_plan
from dp_diffusion.privacy import grad_samplers
from dp_diffusion.privacy.per_example import GroupedGradients, make_per_example_gradients, trainable_parameters

pytestmark = pytest.mark.usefixtures("one_thread")
MODES = ["attention", "condition", "blocks_from=2", "all", "lora"]


# --- autoencoder -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [28, 32])
@pytest.mark.parametrize("f", [2, 4, 8])
def test_autoencoder_shapes(resolution, f):
    ae = AutoencoderKL(1, resolution, f=f, latent_channels=3, nf=8)
    x = torch.randn(2, 1, resolution, resolution)
    posterior = ae.encode(x)
    side = -(-resolution // f)  # 28 with f = 8 is padded to 32: 4x4 latents
    assert posterior.mean.shape == posterior.logvar.shape == (2, 3, side, side) and ae.latent_shape == (3, side, side)
    z = posterior.sample(torch.Generator().manual_seed(0))
    assert ae.decode(z).shape == x.shape
    assert posterior.kl().shape == (2,)


def test_autoencoder_latent_multiple_pads_for_a_halvable_latent_and_refuses_other_sizes():
    ae = AutoencoderKL(1, 28, f=4, nf=8, latent_multiple=2)
    assert ae.encode(torch.randn(1, 1, 28, 28)).mean.shape[-2:] == (8, 8)  # 28 -> 32 -> 8, not 7
    with pytest.raises(ValueError, match="28x28"):
        ae.encode(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="f must be one of"):
        AutoencoderKL(1, 28, f=3)


def test_autoencoder_loss_goes_down():
    torch.manual_seed(0)
    ae = AutoencoderKL(1, 16, f=4, latent_channels=2, nf=8, kl_weight=1e-3)
    g = torch.Generator().manual_seed(1)
    # smooth random images in [-1, 1]: upsampled 4x4 noise
    x = torch.tanh(nn.functional.interpolate(torch.randn(8, 1, 4, 4, generator=g), size=16, mode="bilinear"))
    optimizer = torch.optim.Adam(ae.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        parts = ae.loss(x, g)
        assert parts.total.shape == (8,)
        torch.testing.assert_close(parts.total, parts.reconstruction + 1e-3 * parts.kl)
        optimizer.zero_grad()
        parts.total.mean().backward()
        optimizer.step()
        losses.append(float(parts.total.detach().mean()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_latent_scale_factor_is_one_over_the_std():
    z = 2.0 * torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert latent_scale_factor(z) == pytest.approx(1 / float(z.double().std()))
    assert latent_scale_factor(z) == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError, match="positive finite std"):
        latent_scale_factor(torch.ones(4, 3, 2, 2))


def test_autoencoder_has_no_batch_norm():
    ae = AutoencoderKL(3, 32, f=8)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ae.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in ae.modules())


# --- latent UNet ----------------------------------------------------------------------------------------

def tiny_latent_unet(num_classes: int = 3, **kwargs) -> LatentUNet:
    """Float64, every parameter perturbed (zero-initialised layers would make most gradients 0)."""
    torch.manual_seed(0)
    args = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, num_heads=2, context_dim=6)
    net = LatentUNet(2, 2, 4, num_classes=num_classes, **{**args, **kwargs}).double()
    _perturb(net)
    return net


def _perturb(net: nn.Module) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("num_classes", [0, 10])
def test_latent_unet_trains_with_the_epsilon_prediction_loss(num_classes):
    """The backbone signature the preconditioning wrappers call; VPLoss (DDPM epsilon-prediction) runs on it."""
    net = LatentUNet(3, 3, 8, nf=16, num_classes=num_classes, num_heads=4, context_dim=8)
    assert (net.class_embed is None) == (num_classes == 0)
    assert all((block.attn2 is None) == (num_classes == 0) for block in net.transformer_blocks())
    loss = VPLoss(num_classes=num_classes, label_dropout=0.1 if num_classes else 0.0)
    z = torch.randn(4, 3, 8, 8)
    labels = torch.arange(4) % 10 if num_classes else None
    draw = loss.draw(z, labels, noise_multiplicity=2, generator=torch.Generator().manual_seed(0))
    per_example = loss(loss.precondition(net), z, labels, draw)
    assert per_example.shape == (4,)
    # Zero-initialised output: F = 0, so the epsilon-prediction loss ||F - n||^2 is the mean squared noise.
    torch.testing.assert_close(per_example, (draw["noise"] ** 2).flatten(2).mean(2).mean(1), rtol=1e-4, atol=1e-5)
    per_example.mean().backward()
    assert net.conv_out.weight.grad.abs().sum() > 0


def test_class_labels_condition_the_output_and_none_is_the_null_class():
    net = tiny_latent_unet(num_classes=3)
    x, t = torch.randn(2, 2, 4, 4, dtype=torch.float64), torch.tensor([3.0, 3.0], dtype=torch.float64)
    out = [net(x, t, torch.tensor([c, c])) for c in range(4)]
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(net(x, t, None), out[3])


def test_transformer_block_count_and_order_as_dp_ldm_cifar10():
    """DP-LDM's CIFAR-10 layout (ch_mult 1,2,2,4, two res blocks, transformers at three levels) has 16
    transformer blocks; blocks_from=9 trains the last 8 (the paper's `ablation_blocks: 9`) and the embedder."""
    net = LatentUNet(3, 3, 16, nf=8, ch_mult=(1, 2, 2, 4), num_res_blocks=2, transformer_resolutions=(16, 8, 4),
                     num_heads=2, num_classes=10, context_dim=4)
    blocks = net.transformer_blocks()
    assert len(blocks) == 16
    names = {id(m): n for n, m in net.named_modules()}
    assert [names[id(b)].split(".")[0] for b in blocks] == ["down"] * 6 + ["mid"] + ["up"] * 9
    select_trainable(net, "blocks_from=9")
    assert [all(p.requires_grad for p in b.parameters()) for b in blocks] == [False] * 8 + [True] * 8
    assert all(p.requires_grad for p in net.class_embed.parameters())


def test_extend_classes_keeps_public_rows_adds_new_ones_and_moves_the_null_row():
    net = tiny_latent_unet(num_classes=5)
    public = net.class_embed.embedding.weight.detach().clone()
    net.extend_classes(8)
    rows = net.class_embed.embedding.weight.detach()
    assert rows.shape[0] == 9 and net.num_classes == 8 and net.architecture["num_classes"] == 8
    torch.testing.assert_close(rows[:5], public[:5])
    torch.testing.assert_close(rows[5:8], public[:5].mean(0).expand(3, -1))
    torch.testing.assert_close(rows[8], public[5])  # the null row, now at index num_classes
    net.extend_classes(2)  # fewer private classes: rows 2.. have no label, the null row moves to 2
    rows = net.class_embed.embedding.weight.detach()
    torch.testing.assert_close(rows, torch.stack([public[0], public[1], public[5]]))
    x, t = torch.randn(2, 2, 4, 4, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(net(x, t, None), net(x, t, torch.tensor([2, 2])))


# --- fine-tune selection -------------------------------------------------------------------------------------

def expected_trainable(net: LatentUNet, mode: str) -> set[str]:
    """Trainable parameter names for `mode`, from the parameter names alone."""
    block_names = [n for n, m in net.named_modules() if isinstance(m, TransformerBlock)]
    names = [n for n, _ in net.named_parameters()]
    in_block = {n: next((i for i, b in enumerate(block_names) if n.startswith(b + ".")), None) for n in names}
    if mode == "all":
        return set(names)
    if mode == "attention":
        return {n for n in names if in_block[n] is not None and (".norm1." in n or ".attn1." in n)}
    if mode == "lora":
        return {n for n in names if n.endswith((".down.weight", ".up.weight")) and ".attn" in n}
    first = int(mode.split("=")[1]) - 1 if "=" in mode else 0
    return {n for n in names if n.startswith("class_embed.") or (in_block[n] is not None and in_block[n] >= first)}


@pytest.mark.parametrize("mode", MODES)
def test_select_trainable_freezes_all_but_the_named_part(mode):
    net = tiny_latent_unet(num_classes=3)
    linears = [m for b in net.transformer_blocks() for n, m in b.named_modules()
               if type(m) is nn.Linear and n.split(".")[-1] in ("q", "k", "v", "out") and n.startswith("attn")]
    summary = select_trainable(net, mode, lora_rank=2)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(net, mode)
    total = sum(p.numel() for p in net.parameters())
    assert summary.trainable == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert summary.total == total and summary.share == pytest.approx(summary.trainable / total)
    assert f"{summary.trainable:,} of {total:,}" in str(summary)
    if mode == "lora":
        # rank 2 on q/k/v/out of each self-attention, v/out of each cross-attention (one context token: no q/k)
        assert len(linears) == 6 * len(net.transformer_blocks())
        assert summary.trainable == sum(2 * (m.in_features + m.out_features) for m in linears)
        assert all(type(getattr(a, n)) is LoRALinear for b in net.transformer_blocks() for a in (b.attn1, b.attn2)
                   for n in ("q", "k", "v", "out") if getattr(a, n) is not None)
    else:
        assert 0 < summary.trainable <= total and (summary.share == 1.0) == (mode == "all")


@pytest.mark.parametrize("mode", ["everything", "blocks_from=0", "blocks_from=8", "blocks_from=x", "lora=2"])
def test_invalid_finetune_modes_are_one_line_config_errors(mode):
    net = tiny_latent_unet(num_classes=3)  # 7 transformer blocks
    with pytest.raises(ConfigError) as info:
        select_trainable(net, mode)
    assert "\n" not in str(info.value) and "method.finetune" in str(info.value)
    assert set(FINETUNE_MODES) >= {"attention", "condition", "all", "lora"}


def test_modes_needing_transformer_blocks_refuse_a_plain_unet():
    with pytest.raises(ConfigError, match="transformer blocks"):
        select_trainable(UNet(1, 1, 8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()), "condition")


def test_lora_starts_as_the_base_model_and_merges_back():
    net = tiny_latent_unet(num_classes=3)
    x, t, y = torch.randn(2, 2, 4, 4, dtype=torch.float64), torch.ones(2, dtype=torch.float64), torch.tensor([0, 2])
    before = net(x, t, y)
    select_trainable(net, "lora", lora_rank=2)
    torch.testing.assert_close(net(x, t, y), before)  # up is zero-initialised
    _perturb(net)
    adapted = net(x, t, y)
    keys = set(net.state_dict())
    assert merge_lora(net) == 6 * len(net.transformer_blocks())
    torch.testing.assert_close(net(x, t, y), adapted)
    assert not any(isinstance(m, LoRALinear) for m in net.modules()) and keys != set(net.state_dict())


# --- per-example gradients of each fine-tuned part ----------------------------------------------------------

def latent_case(mode: str, num_examples: int = 3, noise_multiplicity: int = 2, context_tokens: int = 1):
    """(VP-preconditioned tiny LatentUNet with `mode` selected, per-example epsilon-prediction loss, batch)."""
    net = tiny_latent_unet(num_classes=3, context_tokens=context_tokens)
    select_trainable(net, mode, lora_rank=2)
    if mode == "lora":
        _perturb(net)  # the adapters' zero-initialised up layers
    loss = VPLoss(num_classes=3, label_dropout=0.5)  # some rows take the null class
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(num_examples, 2, 4, 4, generator=g, dtype=torch.float64)
    labels = torch.arange(num_examples) % 3
    draw = {k: v.double() if v.is_floating_point() else v
            for k, v in loss.draw(latents, labels, noise_multiplicity, generator=g).items()}

    def loss_fn(model, batch):
        return loss(model, batch[0], batch[1], batch[2])

    return loss.precondition(net), loss_fn, (latents, labels, draw)


def naive_trainable_grads(model: nn.Module, loss_fn, batch, num_examples: int) -> list[dict[str, torch.Tensor]]:
    """One autograd pass per example, over the trainable parameters only."""
    names, params = zip(*trainable_parameters(model).items())
    out = []
    for i in range(num_examples):
        example = tree_map(lambda t, i=i: t[i:i + 1], batch)
        out.append(dict(zip(names, torch.autograd.grad(loss_fn(model, example).sum(), params))))
    return out


def _spy_samplers(monkeypatch) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    calls: list[tuple[nn.Module, list[nn.Parameter]]] = []
    for layer_type, sampler in list(grad_samplers.GRAD_SAMPLERS.items()):
        def spy(layer, *args, _sampler=sampler, **kwargs):
            out = _sampler(layer, *args, **kwargs)
            calls.append((layer, list(out)))
            return out
        monkeypatch.setitem(grad_samplers.GRAD_SAMPLERS, layer_type, spy)
    return calls


@pytest.mark.parametrize("mode,context_tokens", [(m, 1) for m in MODES] + [("condition", 2), ("lora", 2)])
def test_grouped_per_example_gradients_match_the_naive_loop_and_skip_frozen_layers(mode, context_tokens, monkeypatch):
    """Grouped mode (picked by auto) on the fine-tuned part, K = 2 draws per example: equal to the naive loop;
    only layers with trainable parameters are hooked, and a sampler forms each trainable parameter once.
    Two context tokens: cross-attention with its q/k projections and LayerNorm."""
    model, loss_fn, batch = latent_case(mode, context_tokens=context_tokens)
    if context_tokens == 2:
        assert all(b.attn2.q is not None and b.norm2 is not None for b in model.backbone.transformer_blocks())
    trainable = trainable_parameters(model)
    expected = naive_trainable_grads(copy.deepcopy(model), loss_fn, batch, 3)
    engine = make_per_example_gradients(model, "auto")
    assert isinstance(engine, GroupedGradients)
    hooked = set(engine.capture._params)
    assert hooked == {m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    calls = _spy_samplers(monkeypatch)
    grads, losses = engine(loss_fn, batch)
    assert losses.shape == (3,) and set(grads) == set(trainable)
    formed = [p for _, params in calls for p in params]
    assert sorted(map(id, formed)) == sorted(map(id, trainable.values()))  # frozen layers: no per-example work
    for name in trainable:
        assert any(expected[i][name].abs().sum() > 0 for i in range(3)), f"{name} has a zero gradient"
        for i in range(3):
            torch.testing.assert_close(grads[name][i], expected[i][name], rtol=1e-7, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["condition", "lora"])
def test_dp_step_passes_the_first_step_check_and_leaves_frozen_parameters_bit_identical(mode):
    """A noiseless clipped step through the privacy core (the first step's check compares grouped with functorch)."""
    model, loss_fn, batch = latent_case(mode)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    spec = PrivacySpec(max_grad_norm=1e-3, noise_multiplier=0.0, grad_mode="grouped", delta=1e-3)
    optimizer = torch.optim.SGD(list(trainable_parameters(model).values()), lr=1.0)
    engine = PrivateOptimization(model, optimizer, spec, make_plan(spec, 100, 3, 10), PrivacyLedger(delta=1e-3), 8)
    engine.step(loss_fn, batch)
    assert engine.first_step_checked
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]) and p.grad is None, name
    moved = sum(float((trainable[n] - p.detach()).square().sum()) for n, p in model.named_parameters()
                if n in trainable) ** 0.5
    assert 0 < moved <= 1e-3 * (1 + 1e-9)  # three examples clipped to C = 1e-3, summed, divided by B = 3
