"""A method's `generate()` hook: what `sample`, `evaluate` and `train` draw from. The sampler's noise
range comes from the loss; DP-SynGen samples through its switching denoiser."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from dp_diffusion.build import build_method
from dp_diffusion.cli import CONF_DIR
from dp_diffusion.data.registry import dataset_info
from dp_diffusion.diffusion import samplers
from dp_diffusion.diffusion.stages import SwitchingDenoiser, restrict_loss

DIFFUSIONS = sorted(p.stem for p in (Path(CONF_DIR) / "diffusion").glob("*.yaml"))
DIGITS = dataset_info("digits")


def compose_cfg(*overrides: str):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["data=digits", "model=tiny", "sample.num_steps=4", "sample.batch_size=3",
                                            "sample.device=cpu", *overrides])


def randomized(module: torch.nn.Module) -> torch.nn.Module:
    """Every floating tensor of `module` (denoiser, EMA, stage models) set to its own random values."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            if tensor.is_floating_point():
                tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator))
    return module


def direct(module, num_samples: int, sample_cfg, seed: int, **schedule) -> torch.Tensor:
    """The same draw made by calling the sampler by hand."""
    knobs = {"eta": sample_cfg.knobs.eta} if sample_cfg.sampler == "ddim_stochastic" else {}
    images, _ = samplers.generate(
        module.sampling_denoiser(), num_samples, (1, 8, 8), sample_cfg.batch_size, sampler=sample_cfg.sampler,
        num_steps=sample_cfg.num_steps, class_labels=torch.arange(num_samples) % 10, seed=seed, disable=True,
        guidance_scale=float(sample_cfg.guidance_scale), num_classes=10, **knobs, **schedule)
    return images


@pytest.mark.parametrize("name", DIFFUSIONS)
def test_each_loss_reports_the_range_the_sampler_used_before(name):
    """Every parameterization was sampled over generate()'s defaults, EDM's [0.002, 80]; restricting the
    training range (a DP-SynGen stage) does not change the sampling range."""
    defaults = inspect.signature(samplers.generate).parameters
    before = (defaults["sigma_min"].default, defaults["sigma_max"].default)
    loss = instantiate(compose_cfg(f"diffusion={name}").diffusion, num_classes=10)
    assert loss.sampling_sigma_range() == before == (0.002, 80.0)
    assert restrict_loss(loss, 0.05, 7.0).sampling_sigma_range() == before


def test_generate_is_the_sampler_over_the_loss_range(one_thread):
    cfg = compose_cfg("sample.sampler=ddim_stochastic", "sample.guidance_scale=1.0")
    module = randomized(build_method(cfg, DIGITS))
    images, labels = module.generate(5, cfg.sample, seed=2)
    assert labels.tolist() == [0, 1, 2, 3, 4] and images.shape == (5, 1, 8, 8)
    assert torch.equal(images, direct(module, 5, cfg.sample, 2))
    assert torch.equal(images, module.generate(5, cfg.sample, seed=2)[0])
    assert not torch.equal(images, module.generate(5, cfg.sample, seed=3)[0])

    module.loss.sampling_sigma_max = 10.0  # a loss that samples elsewhere: generate follows it
    narrower, _ = module.generate(5, cfg.sample, seed=2)
    assert not torch.equal(narrower, images)
    assert torch.equal(narrower, direct(module, 5, cfg.sample, 2, sigma_min=0.002, sigma_max=10.0))


def test_the_device_argument_overrides_the_sample_config(one_thread):
    cfg = compose_cfg("sample.device=cuda:7")
    module = randomized(build_method(cfg, DIGITS))
    images, _ = module.generate(2, cfg.sample, seed=0, device="cpu")
    assert images.device.type == "cpu"


def test_dp_syngen_generates_through_its_switching_denoiser(one_thread):
    cfg = compose_cfg("method=dp_syngen", "sample.sampler=ddim")
    module = randomized(build_method(cfg, DIGITS))
    module.public_stages_trained.fill_(True)  # randomized stands in for trained stage models
    assert isinstance(module.sampling_denoiser(), SwitchingDenoiser)
    images, _ = module.generate(4, cfg.sample, seed=1)
    assert torch.equal(images, direct(module, 4, cfg.sample, 1))
    context_only, _ = samplers.generate(module.ema.module, 4, (1, 8, 8), 3, sampler="ddim", num_steps=4,
                                        seed=1, num_classes=10, disable=True)
    assert not torch.equal(images, context_only)  # the stage models take part
