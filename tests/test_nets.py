"""Tests for the DDPM++ UNet: shapes, parameter counts, DP-SGD compatibility."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch.func import functional_call, grad, vmap

from dp_diffusion.nets import UNet

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
DPDM_MNIST_PARAMS = 1_753_345  # DPDM paper "1.75M"; computed from nv-tlabs/DPDM configs


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def tiny(resolution: int = 8, channels: int = 1, num_classes: int = 10, **kwargs) -> UNet:
    kw = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_classes=num_classes)
    kw.update(kwargs)
    return UNet(channels, channels, resolution, **kw)


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter: zero-initialised layers would make outputs and
    most gradients exactly zero and the comparisons vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return net


def batch(n: int, channels: int, resolution: int, num_classes: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, resolution, resolution, generator=gen)
    sigma = torch.rand(n, generator=gen) * 2 - 1
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return x, sigma, y


def load_model(name: str, channels: int, resolution: int, num_classes: int) -> UNet:
    cfg = OmegaConf.load(CONF_MODEL / f"{name}.yaml")
    return instantiate(cfg, in_channels=channels, out_channels=channels, resolution=resolution, num_classes=num_classes)


# ---------------------------------------------------------------- shapes / sizes


@pytest.mark.parametrize(
    "channels,resolution,ch_mult,attn,out_channels",
    [
        (1, 28, (1, 2, 2), (7,), 1),  # DPDM MNIST: 28 -> 14 -> 7
        (3, 32, (1, 2, 2), (8, 16), 3),  # CelebA-32
        (1, 8, (1, 2), (4,), 2),  # sklearn digits, out != in
    ],
)
def test_output_shape(channels, resolution, ch_mult, attn, out_channels):
    net = UNet(channels, out_channels, resolution, nf=8, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn, num_classes=10)
    x, sigma, y = batch(2, channels, resolution)
    assert net(x, sigma, y).shape == (2, out_channels, resolution, resolution)


def test_ddpm_resample_shape():
    net = tiny(resolution=28, resample="ddpm")
    x, sigma, y = batch(2, 1, 28)
    assert net(x, sigma, y).shape == (2, 1, 28, 28)


def test_dpdm_mnist_param_count():
    net = load_model("dpdm", channels=1, resolution=28, num_classes=10)
    assert abs(n_params(net) - DPDM_MNIST_PARAMS) <= 0.05 * DPDM_MNIST_PARAMS
    assert n_params(net) == DPDM_MNIST_PARAMS  # exact match with DPDM's ncsnpp


@pytest.mark.parametrize(
    "name,channels,resolution,num_classes,expected",
    [("dpdm_cifar10", 3, 32, 10, 1_754_499), ("dpdm_celeba32", 3, 32, 0, 1_804_451)],
)
def test_dpdm_config_param_counts(name, channels, resolution, num_classes, expected):
    # Counts computed from nv-tlabs/DPDM configs (reference §1.8).
    assert n_params(load_model(name, channels, resolution, num_classes)) == expected


def test_tiny_config_small_and_runs():
    net = load_model("tiny", channels=1, resolution=28, num_classes=10)
    assert 100_000 <= n_params(net) <= 250_000
    x, sigma, y = batch(2, 1, 28)
    assert net(x, sigma, y).shape == (2, 1, 28, 28)
    # works on 8x8 digits too
    assert load_model("tiny", 1, 8, 10)(*batch(2, 1, 8)).shape == (2, 1, 8, 8)


def test_zero_init_output():
    net = tiny()
    assert torch.count_nonzero(net(*batch(2, 1, 8))) == 0


# ---------------------------------------------------------------- errors


def test_bad_resolution_raises():
    with pytest.raises(ValueError, match=r"divisible by 2\*\*\(len\(ch_mult\) - 1\) = 4.*resolution=30"):
        UNet(1, 1, 30, ch_mult=(1, 2, 2), attn_resolutions=())


def test_unknown_attn_resolution_raises():
    with pytest.raises(ValueError, match=r"attn_resolutions .* not UNet level resolutions \[32, 16, 8\]"):
        UNet(3, 3, 32, attn_resolutions=(7,))


@pytest.mark.parametrize("nf", [2, 48])  # 2: zero groups; 48: decoder concat 144 ch vs 32 groups
def test_bad_group_norm_width_raises(nf):
    with pytest.raises(ValueError, match="GroupNorm with min"):
        UNet(1, 1, 8, nf=nf, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())


def test_bad_resample_raises():
    with pytest.raises(ValueError, match="resample must be one of"):
        tiny(resample="fir")


# ---------------------------------------------------------------- conditioning


def test_class_embedding_null_id():
    net = randomize(tiny(num_classes=10)).eval()
    x, sigma, y = batch(3, 1, 8)
    null = torch.full((3,), 10, dtype=torch.long)
    out_null = net(x, sigma, null)
    assert torch.isfinite(out_null).all()
    assert torch.equal(net(x, sigma, None), out_null)  # None = null class
    assert not torch.allclose(net(x, sigma, y), out_null)  # labels matter
    with pytest.raises(IndexError):
        net(x, sigma, torch.full((3,), 11, dtype=torch.long))


def test_unconditional_ignores_labels():
    net = randomize(tiny(num_classes=0)).eval()
    assert net.label_embed is None
    x, sigma, y = batch(2, 1, 8)
    assert torch.equal(net(x, sigma, y), net(x, sigma, None))


# ---------------------------------------------------------------- DP-SGD compatibility


@pytest.mark.parametrize("train", [False, True])
def test_no_example_mixing(train):
    net = randomize(tiny(dropout=0.1))
    net.train(train)
    x, sigma, y = batch(4, 1, 8, seed=1)
    x2, sigma2, y2 = batch(4, 1, 8, seed=2)
    x2[0], sigma2[0], y2[0] = x[0], sigma[0], y[0]
    torch.manual_seed(0)  # same dropout masks in both calls
    out = net(x, sigma, y)
    torch.manual_seed(0)
    out2 = net(x2, sigma2, y2)
    torch.testing.assert_close(out2[0], out[0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out2[1:], out[1:])


@pytest.mark.parametrize("config", ["dpdm", "tiny"])
def test_opacus_validator_clean(config):
    net = load_model(config, channels=1, resolution=28, num_classes=10)
    assert ModuleValidator.validate(net, strict=True) == []


def per_example_loss(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (out - x).square().flatten(1).sum(1)


def naive_per_example_grads(net, x, sigma, y):
    grads = []
    for i in range(x.shape[0]):
        net.zero_grad()
        per_example_loss(net(x[i : i + 1], sigma[i : i + 1], y[i : i + 1]), x[i : i + 1]).sum().backward()
        grads.append({name: p.grad.detach().clone() for name, p in net.named_parameters()})
    net.zero_grad()
    return {name: torch.stack([g[name] for g in grads]) for name in grads[0]}


@pytest.fixture(scope="module")
def tiny_grad_setup():
    # float64 so that the comparison checks the math, not float32 rounding
    # (per-example gradients here are O(10); float32 agrees to ~1e-6 relative).
    net = randomize(tiny(resolution=8, num_classes=10, attn_resolutions=(4,))).double()
    x, sigma, y = batch(3, 1, 8)
    x, sigma = x.double(), sigma.double()
    y[2] = 10  # null class in the batch
    return net, (x, sigma, y), naive_per_example_grads(net, x, sigma, y)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # inputs need no grad
def test_opacus_grad_sample_matches_loop(tiny_grad_setup):
    net, (x, sigma, y), expected = tiny_grad_setup
    gsm = GradSampleModule(net, loss_reduction="sum")
    try:
        per_example_loss(gsm(x, sigma, y), x).sum().backward()
        for name, p in net.named_parameters():
            assert p.grad_sample is not None, f"no grad_sample for {name}"
            torch.testing.assert_close(p.grad_sample, expected[name], atol=1e-8, rtol=1e-6, msg=name)
    finally:
        gsm._close()
        net.zero_grad(set_to_none=True)


def test_vmap_grad_matches_loop(tiny_grad_setup):
    net, (x, sigma, y), expected = tiny_grad_setup
    params = {name: p.detach() for name, p in net.named_parameters()}
    buffers = {name: b.detach() for name, b in net.named_buffers()}

    def loss(params, xi, si, yi):
        out = functional_call(net, (params, buffers), (xi[None], si[None], yi[None]))
        return per_example_loss(out, xi[None]).sum()

    grads = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, sigma, y)
    assert grads.keys() == expected.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], atol=1e-8, rtol=1e-6, msg=name)
