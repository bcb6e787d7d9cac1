"""Stages trained on public data before the private fit: no private example is involved, so no privacy cost.

`PublicDiffusionStage` trains a denoiser on a public (or programmatic) data set through the same
training path as a private run, with `PrivacySpec(enabled=False)`: Poisson batches, no clipping, no
noise, no accounting. `AutoencoderStage` trains an autoencoder on public images. Both are ordinary
LightningModules that a method's `fit_public_stages(make_trainer)` fits with the trainer it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dp_diffusion.config import ConfigError, Rule, integer, number
from dp_diffusion.methods.diffusion_module import PrivateDiffusion
from dp_diffusion.privacy import Coverage

__all__ = ["STAGE_TRAINING_RULES", "AutoencoderStage", "PublicDiffusionStage", "trains_class_rows"]

# How a denoiser stage trained without privacy is configured (DPDM's warm start, DP-SAD's teacher): each
# setting's rule, as `dp_diffusion.config.Settings` reads them.
STAGE_TRAINING_RULES: Mapping[str, Rule] = {
        "steps": integer(1),
        "batch_size": integer(1),
        "lr": number(above=0, finite=True),
        "noise_multiplicity": integer(1),
        "ema_decay": number(at_least=0, below=1),
        "seed": integer(0),
}


def trains_class_rows(public: Any, num_classes: int, private_name: str) -> bool:
    """The label rule of a denoiser pretrained on a `public` set (a `PublicImages`) for a private set of
    `num_classes` classes: public class y trains class row y (True) when both sets are labeled; an unlabeled
    public set (or an unconditional private one) trains the null class only (False). A public set with more
    classes than the private one is a ConfigError."""
    if num_classes == 0 or not public.conditional:
        return False
    if public.num_classes > num_classes:
        raise ConfigError(f"public={public.name} has {public.num_classes} classes, the private set "
                          f"{private_name} {num_classes}: public class y trains private class row y, so "
                          f"it needs at most {num_classes} (or public.labels=false: the null class only)")
    return True


class PublicDiffusionStage(PrivateDiffusion):
    """A denoiser trained on public data only (labels as the data set gives them; `null_labels` replaces
    every label by the null class, as DP-SynGen's synthetic stages are trained)."""

    null_labels: bool = False

    def prepare_batch(self, batch: Any) -> Any:
        images, labels = batch
        if self.num_classes == 0:
            labels = None
        elif self.null_labels:
            labels = torch.full((images.shape[0],), self.num_classes, dtype=torch.long, device=images.device)
        draw = self.loss.draw(images, labels, self.privacy_spec.noise_multiplicity)
        return images, labels, draw

    def privacy_coverage(self) -> Coverage:
        return Coverage(released=[], trained_with_dp=[], never_saw_private_data=["public stage model"])


class AutoencoderStage(L.LightningModule):
    """Trains `autoencoder` (an object with `loss(x, generator) -> (total, ...)` per example) on public
    images with Adam; shuffled batches from a generator seeded by `seed`, so a stage is reproducible."""

    def __init__(self, autoencoder: nn.Module, dataset: Dataset, batch_size: int, lr: float, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.dataset = dataset
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.dataset, batch_size=min(self.batch_size, len(self.dataset)), shuffle=True,
                          drop_last=True, generator=generator, num_workers=self.num_workers)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.autoencoder.parameters(), lr=self.lr)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, _ = batch
        loss = self.autoencoder.loss(images).total.mean()
        self.log("public/autoencoder_loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss
