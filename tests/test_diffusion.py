"""Tests for dp_diffusion.diffusion: preconditioning, losses, sigma sampling, samplers, vmap."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from dp_diffusion.diffusion import (
    EDMLoss,
    EDMPrecond,
    VELoss,
    VEPrecond,
    VLoss,
    VPLoss,
    VPPrecond,
    VPrecond,
    build_loss,
    cfg_denoise,
    generate,
    get_sampler,
    karras_sigmas,
    loglinear_sigmas,
    sample_ddim,
    sample_ddim_stochastic,
    sample_edm_heun,
)

SD = math.sqrt(1 / 3)
SIGMAS = [0.05, 0.7, 3.0, 40.0]


class Recorder(nn.Module):
    """Backbone returning a fixed tensor F and recording its inputs."""

    def __init__(self, F):
        super().__init__()
        self.F = F
        self.calls = []

    def forward(self, x, noise_labels, class_labels):
        self.calls.append((x.clone(), noise_labels.clone(), None if class_labels is None else class_labels.clone()))
        return self.F.expand_as(x)


def hand_coefficients(name, s):
    """(c_skip, c_out, c_in, c_noise) with plain math, EDM Table 1 / DPDM."""
    if name == "edm":
        return SD**2 / (s**2 + SD**2), s * SD / math.sqrt(s**2 + SD**2), 1 / math.sqrt(s**2 + SD**2), math.log(s) / 4
    if name == "v":
        return 1 / (s**2 + 1), -s / math.sqrt(1 + s**2), 1 / math.sqrt(1 + s**2), 2 / math.pi * math.atan(s)
    if name == "vp":
        bd, bm = 19.9, 0.1
        t = (math.sqrt(bm**2 + 2 * bd * math.log(s**2 + 1)) - bm) / bd
        return 1.0, -s, 1 / math.sqrt(s**2 + 1), 999 * t
    if name == "ve":
        return 1.0, s, 1.0, math.log(s / 2)
    raise KeyError(name)


PRECONDS = {"edm": EDMPrecond, "v": VPrecond, "vp": VPPrecond, "ve": VEPrecond}


@pytest.mark.parametrize("name", list(PRECONDS))
def test_precond_coefficients(name):
    torch.manual_seed(0)
    F = torch.tensor([0.3, -1.1]).reshape(1, 1, 1, 2).double()
    net = PRECONDS[name](Recorder(F))
    x = torch.randn(len(SIGMAS), 1, 1, 2, dtype=torch.float64)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    D = net(x, sigma)
    x_in, c_noise, _ = net.backbone.calls[0]
    for i, s in enumerate(SIGMAS):
        c_skip, c_out, c_in, cn = hand_coefficients(name, s)
        np.testing.assert_allclose(x_in[i].numpy(), c_in * x[i].numpy(), rtol=1e-12)
        np.testing.assert_allclose(c_noise[i].item(), cn, rtol=1e-12)
        np.testing.assert_allclose(D[i].numpy(), c_skip * x[i].numpy() + c_out * F[0].numpy(), rtol=1e-12)


def test_vp_t_of_sigma_roundtrip():
    from dp_diffusion.diffusion.precond import vp_sigma, vp_sigma_inv
    t = torch.linspace(1e-5, 1, 7, dtype=torch.float64)
    torch.testing.assert_close(vp_sigma_inv(vp_sigma(t, 19.9, 0.1), 19.9, 0.1), t)


def test_v_precond_predicts_v():
    """With F = v = alpha n - s x (alpha = 1/sqrt(1+sigma^2), s = sigma alpha) VPrecond recovers x exactly."""
    torch.manual_seed(0)
    x0, n = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.randn(4, 1, 2, 2, dtype=torch.float64)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    a = (1 / torch.sqrt(1 + sigma**2)).reshape(-1, 1, 1, 1)
    v = a * n - sigma.reshape(-1, 1, 1, 1) * a * x0

    class Oracle(nn.Module):
        def forward(self, x, c_noise, y):
            return v

    torch.testing.assert_close(VPrecond(Oracle())(x0 + sigma.reshape(-1, 1, 1, 1) * n, sigma), x0)


LOSS_WEIGHTS = {
    "edm": lambda s: (s**2 + SD**2) / (s * SD) ** 2,
    "v": lambda s: (s**2 + 1) / s**2,
    "vp": lambda s: 1 / s**2,
    "ve": lambda s: 1 / s**2,
}


@pytest.mark.parametrize("name", list(LOSS_WEIGHTS))
def test_loss_matches_hand_computation(name):
    loss = build_loss(name)
    F = np.array([0.25, -0.5, 1.0, 0.0])
    net = loss.precondition(Recorder(torch.tensor(F).reshape(1, 1, 2, 2)))
    images = torch.tensor([[0.1, -0.2, 0.9, -1.0], [0.5, 0.5, -0.5, 0.0]], dtype=torch.float64).reshape(2, 1, 2, 2)
    sig = np.array([[0.3, 2.0], [8.0, 0.05]])
    noise = np.arange(16, dtype=np.float64).reshape(2, 2, 1, 2, 2) / 8 - 1
    draw = {"sigma": torch.tensor(sig), "noise": torch.tensor(noise), "keep_label": torch.ones(2, 2, dtype=torch.bool)}
    got = loss(net, images, None, draw)
    assert got.shape == (2,)
    x = images.numpy().reshape(2, 4)
    expected = []
    for i in range(2):
        per_draw = []
        for k in range(2):
            s = sig[i, k]
            c_skip, c_out, _, _ = hand_coefficients(name, s)
            noisy = x[i] + s * noise[i, k].reshape(4)
            D = c_skip * noisy + c_out * F
            per_draw.append(LOSS_WEIGHTS[name](s) * np.mean((D - x[i]) ** 2))
        expected.append(np.mean(per_draw))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("name", list(LOSS_WEIGHTS))
def test_noise_multiplicity_is_mean_of_single_draws(name):
    torch.manual_seed(0)
    loss = build_loss(name)
    net = loss.precondition(TinyNet(channels=2, num_classes=0))
    images = torch.randn(3, 2, 4, 4)
    draw = loss.draw(images, None, noise_multiplicity=4, generator=torch.Generator().manual_seed(1))
    assert draw["sigma"].shape == (3, 4) and draw["noise"].shape == (3, 4, 2, 4, 4) and draw["keep_label"].shape == (3, 4)
    full = loss(net, images, None, draw)
    singles = torch.stack([loss(net, images, None, {k: v[:, j:j + 1] for k, v in draw.items()}) for j in range(4)], 1)
    torch.testing.assert_close(full, singles.mean(1), rtol=1e-5, atol=1e-6)


def test_label_dropout_uses_null_class():
    loss = EDMLoss(label_dropout=0.5, num_classes=10)
    rec = Recorder(torch.zeros(1))
    net = loss.precondition(rec)
    images = torch.zeros(200, 1, 2, 2)
    labels = torch.arange(200) % 10
    draw = loss.draw(images, labels, noise_multiplicity=3, generator=torch.Generator().manual_seed(0))
    loss(net, images, labels, draw)
    seen = rec.calls[0][2].reshape(200, 3)
    keep = draw["keep_label"]
    assert torch.equal(seen[keep], labels[:, None].expand(200, 3)[keep])
    assert (seen[~keep] == 10).all()
    assert 0.4 < keep.float().mean() < 0.6
    # no dropout -> all kept
    assert EDMLoss().draw(images, labels, 3)["keep_label"].all()
    with pytest.raises(ValueError, match="num_classes"):
        EDMLoss(label_dropout=0.1)


def test_draw_is_reproducible_with_generator():
    loss = VLoss()
    images = torch.zeros(4, 1, 2, 2)
    a = loss.draw(images, None, 2, generator=torch.Generator().manual_seed(5))
    b = loss.draw(images, None, 2, generator=torch.Generator().manual_seed(5))
    for k in a:
        assert torch.equal(a[k], b[k])


# --- sigma distributions ------------------------------------------------------------------------
N_SIGMA = 20000


def _sigmas(loss, seed=0):
    return loss.sample_sigma((N_SIGMA,), generator=torch.Generator().manual_seed(seed)).numpy()


@pytest.mark.parametrize("lo,hi", [(None, None), (0.5, 3.0), (None, 0.1), (20.0, None), (60.0, 200.0)])
def test_edm_sigma_truncated_normal(lo, hi):
    s = _sigmas(EDMLoss(sigma_lo=lo, sigma_hi=hi))
    assert (s >= (lo or 0)).all() and (s <= (hi or np.inf)).all()
    a = -np.inf if lo is None else (math.log(lo) + 1.2) / 1.2
    b = np.inf if hi is None else (math.log(hi) + 1.2) / 1.2
    assert stats.kstest(np.log(s), stats.truncnorm(a, b, loc=-1.2, scale=1.2).cdf).pvalue > 1e-3


@pytest.mark.parametrize("lo,hi", [(None, None), (0.1, 2.0)])
def test_v_sigma_uniform_in_t(lo, hi):
    loss = VLoss(sigma_lo=lo, sigma_hi=hi)
    s = _sigmas(loss)
    s_lo = max(math.exp(-13 / 2), lo or 0)
    s_hi = min(math.exp(9 / 2), hi or np.inf)
    assert s.min() >= s_lo * (1 - 1e-9) and s.max() <= s_hi * (1 + 1e-9)
    assert loss.sigma_range() == pytest.approx((s_lo, s_hi))
    t = 2 / np.pi * np.arctan(s)
    t_lo, t_hi = 2 / np.pi * math.atan(s_lo), 2 / np.pi * math.atan(s_hi)
    assert stats.kstest(t, stats.uniform(t_lo, t_hi - t_lo).cdf).pvalue > 1e-3


@pytest.mark.parametrize("lo,hi", [(None, None), (0.5, 10.0)])
def test_vp_sigma_uniform_in_t(lo, hi):
    s = _sigmas(VPLoss(sigma_lo=lo, sigma_hi=hi))
    t = (np.sqrt(0.01 + 2 * 19.9 * np.log1p(s**2)) - 0.1) / 19.9
    t_of = lambda sig: (math.sqrt(0.01 + 2 * 19.9 * math.log1p(sig**2)) - 0.1) / 19.9
    t_lo = 1e-5 if lo is None else t_of(lo)
    t_hi = 1.0 if hi is None else t_of(hi)
    assert t.min() >= t_lo - 1e-9 and t.max() <= t_hi + 1e-9
    assert stats.kstest(t, stats.uniform(t_lo, t_hi - t_lo).cdf).pvalue > 1e-3


@pytest.mark.parametrize("lo,hi", [(None, None), (1.0, 5.0)])
def test_ve_sigma_loguniform(lo, hi):
    s = _sigmas(VELoss(sigma_lo=lo, sigma_hi=hi))
    a, b = math.log(lo or 0.02), math.log(hi or 100.0)
    assert np.log(s).min() >= a - 1e-9 and np.log(s).max() <= b + 1e-9
    assert stats.kstest(np.log(s), stats.uniform(a, b - a).cdf).pvalue > 1e-3


def test_empty_restriction_and_registry_errors():
    with pytest.raises(ValueError, match="does not intersect"):
        VELoss(sigma_lo=200.0, sigma_hi=300.0).sigma_range()
    with pytest.raises(ValueError, match="sigma_lo must be < sigma_hi"):
        EDMLoss(sigma_lo=2.0, sigma_hi=1.0)
    with pytest.raises(ValueError, match="edm.*v.*ve.*vp"):
        build_loss("ddpm")
    with pytest.raises(ValueError, match="ddim"):
        get_sampler("euler")
    assert isinstance(build_loss("v", logsnr_min=-5), VLoss)
    assert EDMLoss().sigma_range() == (0.002, 80.0)


# --- samplers on the analytic Gaussian denoiser --------------------------------------------------
MU = torch.tensor([0.5, -0.3, 0.2, 0.0]).reshape(1, 1, 2, 2)
S_DATA = 0.5


def gaussian_denoiser(x, sigma, class_labels=None):
    """Ideal denoiser for x ~ N(mu, s^2 I): D = mu + s^2/(s^2+sigma^2)(x - mu)."""
    sigma = sigma.reshape(-1, 1, 1, 1)
    return MU + S_DATA**2 / (S_DATA**2 + sigma**2) * (x - MU)


# Step counts keep the discretization bias of the final std below ~0.007 (computed from the linear
# recursion each sampler induces on this Gaussian): Euler/ancestral are 1st order (rel. bias ~1.4/n
# and ~2.9/n), Heun is 2nd order.
@pytest.mark.parametrize("sampler,steps,knobs", [
    ("ddim", 250, {}),
    ("ddim_stochastic", 500, {"eta": 1.0}),
    ("ddim_stochastic", 400, {"eta": 0.5}),
    ("edm", 50, {}),
    ("edm", 100, {"s_churn": 20.0, "s_min": 0.05, "s_max": 50.0}),
])
def test_samplers_recover_gaussian(sampler, steps, knobs):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4000, 1, 2, 2, generator=g, dtype=torch.float64)
    x = get_sampler(sampler)(gaussian_denoiser, latents, karras_sigmas(steps), disable=True, generator=g, **knobs)
    mean, std = x.mean(0), x.std(0)
    # sample-mean s.e. = 0.5/sqrt(4000) ~ 0.008; sample-std s.e. ~ 0.0056
    torch.testing.assert_close(mean, MU[0].double(), atol=0.03, rtol=0)
    torch.testing.assert_close(std, torch.full_like(std, S_DATA), atol=0.025, rtol=0)


def test_schedules():
    k = karras_sigmas(10, 0.01, 50.0, rho=7)
    assert len(k) == 11 and k[-1] == 0 and (k[:-1].diff() < 0).all()
    assert k[0].item() == pytest.approx(50.0) and k[-2].item() == pytest.approx(0.01)
    ll = loglinear_sigmas(5, 0.1, 10.0)
    np.testing.assert_allclose(ll.numpy(), [10, math.sqrt(10), 1, 1 / math.sqrt(10), 0.1, 0], rtol=1e-12)
    with pytest.raises(ValueError, match="decreasing"):
        sample_ddim(gaussian_denoiser, torch.zeros(1, 1, 2, 2), torch.tensor([1.0, 2.0, 0.0]), disable=True)


def test_guidance_arithmetic():
    calls = []

    def label_denoiser(x, sigma, y):
        calls.append(x.shape[0])
        return torch.zeros_like(x) + y.to(x.dtype).reshape(-1, 1, 1, 1)

    x = torch.zeros(3, 1, 2, 2)
    y = torch.tensor([0, 3, 7])
    out = cfg_denoise(label_denoiser, x, 1.0, y, guidance_scale=2.0, num_classes=10)
    expected = (3 * y - 2 * 10).float()  # (1 + w) D_cond - w D_uncond
    torch.testing.assert_close(out[:, 0, 0, 0], expected)
    # the last step (sigma -> 0) of every sampler returns the guided D
    for name in ["ddim", "ddim_stochastic", "edm"]:
        got = get_sampler(name)(label_denoiser, x, torch.tensor([1.0, 0.0]), y, guidance_scale=2.0,
                                num_classes=10, disable=True)
        torch.testing.assert_close(got[:, 0, 0, 0], expected)
    # w == 0: a single conditional pass of batch size 3
    calls.clear()
    torch.testing.assert_close(cfg_denoise(label_denoiser, x, 1.0, y, 0.0, 10)[:, 0, 0, 0], y.float())
    assert calls == [3]
    with pytest.raises(ValueError, match="num_classes"):
        cfg_denoise(label_denoiser, x, 1.0, y, guidance_scale=1.0, num_classes=0)


def test_generate_batches_and_labels():
    batches = []

    def den(x, sigma, y):
        batches.append(x.shape[0])
        return gaussian_denoiser(x, sigma) * 5  # pushes values out of [-1, 1] to test clamping

    imgs, labels = generate(den, 10, (1, 2, 2), batch_size=4, sampler="ddim", num_steps=3, num_classes=3,
                            disable=True)
    assert imgs.shape == (10, 1, 2, 2) and imgs.abs().max() <= 1
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert batches[:3] == [4, 4, 4] and batches[-1] == 2 and len(batches) == 9
    imgs2, labels2 = generate(den, 5, (1, 2, 2), batch_size=5, sampler="edm", num_steps=2, seed=3, disable=True,
                              s_churn=1.0)
    imgs3, _ = generate(den, 5, (1, 2, 2), batch_size=5, sampler="edm", num_steps=2, seed=3, disable=True,
                        s_churn=1.0)
    assert labels2 is None and torch.equal(imgs2, imgs3)
    given = torch.tensor([2, 2, 1])
    _, labels4 = generate(den, 3, (1, 2, 2), batch_size=2, class_labels=given, disable=True)
    assert torch.equal(labels4, given)


# --- per-example gradients: torch.func.vmap(grad) and Opacus ---------------------------------------
class TinyNet(nn.Module):
    """Conv2d backbone that uses both the noise label and the class label."""

    def __init__(self, channels=1, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.noise = nn.Linear(1, channels)
        self.embed = nn.Embedding(num_classes + 1, channels) if num_classes else None

    def forward(self, x, noise_labels, class_labels):
        h = self.conv(x) + self.noise(noise_labels.reshape(-1, 1))[:, :, None, None]
        if self.embed is not None and class_labels is not None:
            h = h + self.embed(class_labels)[:, :, None, None]
        return h


@pytest.mark.parametrize("name", ["edm", "v", "vp", "ve"])
def test_vmap_per_example_grads_match_loop(name):
    torch.manual_seed(0)
    loss = build_loss(name, label_dropout=0.3, num_classes=3)
    net = loss.precondition(TinyNet(channels=2, num_classes=3))
    images, labels = torch.randn(5, 2, 4, 4), torch.randint(0, 3, (5,))
    draw = loss.draw(images, labels, noise_multiplicity=3, generator=torch.Generator().manual_seed(0))
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p, image, label, d):
        denoiser = lambda x, s, y: torch.func.functional_call(net, p, (x, s, y))
        return loss(denoiser, image[None], label[None], {k: v[None] for k, v in d.items()})[0]

    grads = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0, 0))(params, images, labels, draw)
    for i in range(5):
        net.zero_grad()
        loss(net, images[i:i + 1], labels[i:i + 1], {k: v[i:i + 1] for k, v in draw.items()}).sum().backward()
        for k, p in net.named_parameters():
            torch.testing.assert_close(grads[k][i], p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_opacus_grad_sample_rows():
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(0)
    loss = EDMLoss(label_dropout=0.2, num_classes=3)
    net = opacus.GradSampleModule(loss.precondition(TinyNet(channels=1, num_classes=3)))
    images, labels = torch.randn(4, 1, 4, 4), torch.randint(0, 3, (4,))
    draw = loss.draw(images, labels, noise_multiplicity=2)
    loss(net, images, labels, draw).sum().backward()
    for p in net.parameters():
        assert p.grad_sample.shape == (8, *p.shape)  # B*K rows, averaged over K by the DP optimizer
