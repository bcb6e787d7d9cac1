"""DPDM's public warm start: pretraining on a public set never reads the private set, is cached by public
config only (a sweep over epsilon pretrains once), starts DP-SGD from the pretrained weights, maps labels
by the stated rule, and bad settings are one-line errors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import Dataset

from dp_diffusion.build import build_method
from dp_diffusion.cli import CONF_DIR
from dp_diffusion.config import ConfigError
from dp_diffusion.data.registry import DatasetInfo, dataset_info
from dp_diffusion.diffusion.losses import EDMLoss
from dp_diffusion.methods.dpdm import DPDM
from dp_diffusion.methods.warm_start import WarmStartSettings, warm_start_weights
from dp_diffusion.nets import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.nf=8", "method.module.warm_start.steps=3", "method.module.warm_start.batch_size=16",
        "train.steps=2", "train.batch_size=32", "train.physical_batch_size=32", "privacy.noise_multiplier=2.0"]


def compose_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=[*TINY, f"method.module.cache_dir={tmp_path / 'cache'}", *overrides])


class CountingTrainers:
    """make_trainer for fit_public_stages that records the stages it was asked to train."""

    def __init__(self, root: Path) -> None:
        self.root, self.names = root, []

    def __call__(self, steps: int, name: str) -> L.Trainer:
        self.names.append(name)
        return L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(self.root / name))


class Untouchable(Dataset):
    """A private set that fails on any access."""

    def __len__(self) -> int:
        return 4000

    def __getitem__(self, index: int):
        raise AssertionError("public pretraining read the private set")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_warm_start_pretrains_on_public_only_and_a_second_run_reuses_it(tmp_path):
    cfg = compose_cfg(tmp_path, "data=mnist5k", "public=digits", "public.max_images=64")
    module = build_method(cfg, dataset_info("mnist5k"), 4000)
    assert isinstance(module, DPDM)
    module.attach_private_data(Untouchable())
    initial = _state(module.denoiser)
    trainers = CountingTrainers(tmp_path)
    module.fit_public_stages(trainers)
    assert trainers.names == ["public_warm_start"]
    warm = _state(module.denoiser)
    assert any(not torch.equal(warm[k], initial[k]) for k in warm)  # pretraining changed the weights
    assert all(torch.equal(v, module.ema.module.state_dict()[k]) for k, v in warm.items())  # EMA starts there
    cached = list((tmp_path / "cache").glob("*/warm_start.pt"))
    assert len(cached) == 1

    # Another epsilon: same public config, so the same pretraining, loaded; nothing trained.
    again = build_method(compose_cfg(tmp_path, "data=mnist5k", "public=digits", "public.max_images=64",
                                     "privacy.noise_multiplier=5.0"), dataset_info("mnist5k"), 4000)
    trainers_again = CountingTrainers(tmp_path)
    again.fit_public_stages(trainers_again)
    assert trainers_again.names == []
    assert all(torch.equal(v, again.denoiser.state_dict()[k]) for k, v in warm.items())

    # Another public config is another pretraining.
    other = build_method(compose_cfg(tmp_path, "data=mnist5k", "public=digits", "public.max_images=32"),
                         dataset_info("mnist5k"), 4000)
    other.fit_public_stages(CountingTrainers(tmp_path))
    assert len(list((tmp_path / "cache").glob("*/warm_start.pt"))) == 2
    assert "public digits pretraining" in module.privacy_coverage().trained_with_dp[0]


def test_without_a_public_set_nothing_is_pretrained(tmp_path):
    module = build_method(compose_cfg(tmp_path, "data=digits"), dataset_info("digits"), 1442)
    initial = _state(module.denoiser)
    trainers = CountingTrainers(tmp_path)
    module.fit_public_stages(trainers)
    assert trainers.names == []
    assert all(torch.equal(v, module.denoiser.state_dict()[k]) for k, v in initial.items())
    assert module.privacy_coverage().trained_with_dp == ["denoiser (all parameters)"]


def test_an_unlabeled_public_set_trains_only_the_null_class_row(tmp_path):
    module = build_method(compose_cfg(tmp_path, "data=digits", "public=dead_leaves", "public.size=64"),
                          dataset_info("digits"), 1442)
    backbone = next(m for m in module.denoiser.modules() if isinstance(m, UNet))
    before = backbone.label_embed.weight.detach().clone()
    module.fit_public_stages(CountingTrainers(tmp_path))
    after = backbone.label_embed.weight.detach()
    assert torch.equal(after[:10], before[:10])  # the digits' class rows: no public example had them
    assert not torch.equal(after[10], before[10])  # the null class row learned from dead leaves


def test_a_public_set_with_more_classes_is_a_config_error(tmp_path):
    loss = EDMLoss(num_classes=3)
    backbone = UNet(in_channels=1, out_channels=1, resolution=28, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(), num_classes=3)
    with pytest.raises(ConfigError, match="public=digits has 10 classes.*at most 3"):
        warm_start_weights(initial_backbone=backbone, loss=loss, public_cfg={"name": "digits", "max_images": 32},
                           settings=WarmStartSettings(), private_info=DatasetInfo("mnist5k", 0, 0, (1, 28, 28), 3),
                           make_trainer=CountingTrainers(tmp_path), physical_batch_size=16, cache_dir=None)


def test_bad_warm_start_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="method.module.warm_start.steps must be an integer >= 1"):
        build_method(compose_cfg(tmp_path, "data=digits", "method.module.warm_start.steps=0"),
                     dataset_info("digits"), 1442)
    with pytest.raises(ConfigError, match="warm_start"):
        build_method(compose_cfg(tmp_path, "data=digits", "+method.module.warm_start.stepz=3"),
                     dataset_info("digits"), 1442)
    module = build_method(compose_cfg(tmp_path, "data=digits", "public=digits"), dataset_info("digits"), 1442)
    with pytest.raises(ConfigError, match="digits"):  # the private set itself is no public set
        module.fit_public_stages(CountingTrainers(tmp_path))


def test_public_auto_resolves_by_the_private_set_name(tmp_path):
    from dp_diffusion.data.public import resolve_public

    default = compose_cfg(tmp_path)
    assert default.public.name == "auto"
    resolve_public(default)  # the main job: mnist5k -> digits drawn from a font
    assert default.public.name == "font_digits" and default.public.size == 20_000
    on_digits = compose_cfg(tmp_path, "data=digits")
    resolve_public(on_digits)  # digits is the private set: no public set
    assert on_digits.public.name == "none"
    kept = compose_cfg(tmp_path, "+public.size=50")
    resolve_public(kept)
    assert (kept.public.name, kept.public.size) == ("font_digits", 50)
    explicit = compose_cfg(tmp_path, "public=dead_leaves")
    resolve_public(explicit)
    assert explicit.public.name == "dead_leaves"
    with pytest.raises(ConfigError, match="public=auto is none for data=digits"):
        resolve_public(compose_cfg(tmp_path, "data=digits", "+public.max_images=50"))
