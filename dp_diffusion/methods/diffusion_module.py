"""A preconditioned denoiser trained on private data through the privacy core.

Shared by the methods that train a pixel-space diffusion model with DP-SGD
(DPDM, DP-SynGen's context stage): the method modules add only what differs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from dp_diffusion.diffusion.losses import DiffusionLoss
from dp_diffusion.privacy import PrivacySpec, PrivateTrainingModule


def ema_decay_at(decay: float, num_averaged: int) -> float:
    """The EMA decay after `num_averaged` updates: min(decay, (1 + n) / (10 + n)).

    A fixed 0.999 (DPDM, 4,500 steps) would leave a short CPU run's EMA mostly at
    its random initialisation; the ramp makes no difference to long runs.
    """
    return min(decay, (1.0 + num_averaged) / (10.0 + num_averaged))


def ema_with_warmup(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """`AveragedModel` multi_avg_fn: in place, all tensors at once, with the decay of `ema_decay_at`."""

    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - ema_decay_at(decay, int(num_averaged)))

    return update


class PrivateDiffusion(PrivateTrainingModule):
    """Denoiser D(x; sigma, y) = precond(backbone), its EMA, and a per-example diffusion loss."""

    def __init__(
        self,
        backbone: nn.Module,
        loss: DiffusionLoss,
        privacy: PrivacySpec,
        batch_size: int,
        physical_batch_size: int,
        steps: int,
        image_shape: tuple[int, int, int],
        num_classes: int = 0,
        lr: float = 3e-4,
        ema_decay: float = 0.999,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(privacy, batch_size, physical_batch_size, steps, seed=seed, num_workers=num_workers)
        self.loss = loss
        self.denoiser = loss.precondition(backbone)
        # EMA of the weights (DPDM: 0.999), updated once per logical step taken.
        self.ema = AveragedModel(self.denoiser, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.lr = lr

    def private_module(self) -> nn.Module:
        return self.denoiser

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.lr)

    def prepare_batch(self, batch: Any) -> Any:
        images, labels = batch
        labels = labels if self.num_classes > 0 else None
        draw = self.loss.draw(images, labels, self.privacy_spec.noise_multiplicity)
        return images, labels, draw

    def per_example_loss(self, model: Any, batch: Any) -> Tensor:
        images, labels, draw = batch
        return self.loss(model, images, labels, draw)

    def on_private_step(self) -> None:
        self.ema.update_parameters(self.denoiser)

    def sampling_denoiser(self) -> nn.Module:
        """The EMA denoiser, in eval mode (what is released and sampled from)."""
        return self.ema.module.eval()
