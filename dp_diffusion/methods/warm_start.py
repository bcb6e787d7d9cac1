"""A public warm start for a pixel-space denoiser (PDP-Diffusion's recipe): pretrain it on a public set
without privacy, then train it on the private set with DP-SGD from those weights.

Public pretraining costs no privacy: no private example is read (the public loader knows only the private
set's registry name and image shape). The pretrained weights are cached by a key of the public set, the
denoiser's architecture, the loss and the warm-start settings (`stage_cache.cached_stage`), so every run of
a sweep over epsilon starts from one pretraining.

Labels (the stated rule): public class y trains the denoiser's class row y, so a public set with the private
set's classes in the same order (scikit-learn's digits for MNIST) pretrains the conditional model class by
class; an unlabeled public set (`public.labels=false`, dead leaves) trains the null class only (the row
classifier-free guidance uses); a public set with more classes than the private one is a config error.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn

from dp_diffusion.config import Rule, Settings
from dp_diffusion.data.public import load_public, public_cache_key
from dp_diffusion.data.registry import DatasetInfo
from dp_diffusion.diffusion.losses import DiffusionLoss
from dp_diffusion.methods.diffusion_module import PrivateDiffusion
from dp_diffusion.methods.public_stage import STAGE_TRAINING_RULES, PublicDiffusionStage, trains_class_rows
from dp_diffusion.methods.stage_cache import architecture_signature, cached_stage, loss_signature
from dp_diffusion.privacy import PrivacySpec

__all__ = ["WarmStartSettings", "load_warm_start", "warm_start_weights"]

log = logging.getLogger(__name__)
WARM_START_FILE = "warm_start.pt"


@dataclass(frozen=True)
class WarmStartSettings(Settings):
    """`method.module.warm_start`: how the denoiser is pretrained on the public set (`public=...`)."""

    KEY: ClassVar[str] = "method.module.warm_start"
    RULES: ClassVar[Mapping[str, Rule]] = STAGE_TRAINING_RULES

    steps: int = 600
    batch_size: int = 128
    lr: float = 2.0e-3
    noise_multiplicity: int = 1
    ema_decay: float = 0.999
    seed: int = 0


def warm_start_weights(
    *,
    initial_backbone: nn.Module,
    loss: DiffusionLoss,
    public_cfg: Mapping[str, Any],
    settings: WarmStartSettings,
    private_info: DatasetInfo,
    make_trainer: Callable[[int, str], L.Trainer],
    physical_batch_size: int,
    grad_mode: str = "auto",
    cache_dir: str | None,
    num_workers: int = 0,
) -> dict[str, Tensor]:
    """The EMA denoiser's state dict after pretraining a copy of `initial_backbone` (untrained) on the public
    set, from the cache when this public set, architecture, loss and settings were pretrained before.

    `private_info` carries only the private set's name (to refuse an overlapping public set), image shape
    and class count."""
    num_classes = private_info.num_classes
    key = public_cache_key(public_cfg, {"warm_start": dict(vars(settings)), "num_classes": num_classes,
                                        "backbone": architecture_signature(initial_backbone),
                                        "loss": loss_signature(loss)},
                           image_shape=private_info.image_shape)
    path = Path(cache_dir) / key / WARM_START_FILE if cache_dir else None

    def pretrain() -> dict[str, Tensor]:
        public = load_public(public_cfg, private_info)
        class_rows = trains_class_rows(public, num_classes, private_info.name)
        torch.manual_seed(settings.seed)  # the stage's draws come from its own seed, whatever the run's
        stage = PublicDiffusionStage(
            backbone=copy.deepcopy(initial_backbone), loss=loss,
            privacy=PrivacySpec(enabled=False, noise_multiplicity=settings.noise_multiplicity, reproducible=True,
                                grad_mode=grad_mode),
            batch_size=min(settings.batch_size, len(public)), physical_batch_size=physical_batch_size,
            steps=settings.steps, image_shape=private_info.image_shape, num_classes=num_classes,
            lr=settings.lr, ema_decay=settings.ema_decay, seed=settings.seed, num_workers=num_workers)
        stage.null_labels = not class_rows
        stage.attach_private_data(public)  # the public set: the stage's privacy is disabled
        log.info("warm start: pretraining the denoiser on public %s (%d images) for %d steps (no privacy cost)",
                 public.name, len(public), settings.steps)
        make_trainer(settings.steps, "public_warm_start").fit(stage)
        return stage.sampling_denoiser().state_dict()

    # The pretraining draws from its own seed; the private run's generator continues as if it had not run,
    # so a run that finds the weights cached trains exactly as the one that made them.
    with torch.random.fork_rng(devices=[]):
        return cached_stage(path, f"warm start (public {public_cfg.get('name')})", pretrain)


def load_warm_start(
    module: PrivateDiffusion,
    *,
    initial_backbone: nn.Module,
    public_cfg: Mapping[str, Any],
    settings: WarmStartSettings,
    data_name: str,
    make_trainer: Callable[[int, str], L.Trainer],
    cache_dir: str | None,
) -> None:
    """Load `warm_start_weights` into a `PrivateDiffusion` module's denoiser and its EMA (DPDM's denoiser,
    DP-SAD's student), pretraining them first unless cached."""
    info = DatasetInfo(data_name, 0, 0, tuple(module.image_shape), module.num_classes)
    weights = warm_start_weights(
        initial_backbone=initial_backbone, loss=module.loss, public_cfg=public_cfg, settings=settings,
        private_info=info, make_trainer=make_trainer, physical_batch_size=module.physical_batch_size,
        cache_dir=cache_dir, grad_mode=module.privacy_spec.grad_mode, num_workers=module.num_workers)
    module.denoiser.load_state_dict(weights)
    module.ema.module.load_state_dict(weights)
