"""A preconditioned denoiser trained on private data through the privacy core.

Shared by the methods that train a pixel-space diffusion model with DP-SGD
(DPDM, DP-SynGen's context stage): the method modules add only what differs.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from dp_diffusion.diffusion.losses import DiffusionLoss
from dp_diffusion.methods.ema import TrainableEMA, ema_decay_at, ema_with_warmup
from dp_diffusion.privacy import PrivacySpec, PrivateTrainingModule
from dp_diffusion.sampling import draw_samples, resolve_device

__all__ = ["PrivateDiffusion", "ema_decay_at", "ema_with_warmup"]


class PrivateDiffusion(PrivateTrainingModule):
    """Denoiser D(x; sigma, y) = precond(backbone), its EMA, and a per-example diffusion loss.

    Built by `dp_diffusion.build.build_method` from its parts (`method.parts` in the config; here one,
    `backbone`), the loss (`diffusion/`) and the run's settings. A method with other parts takes them as
    constructor arguments of the same names, and says in `part_shapes` what each is sized by.
    """

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
        # EMA of the trainable weights (DPDM: 0.999), updated once per logical step taken; frozen weights
        # are the denoiser's own (so freeze a part before this point).
        self.ema = TrainableEMA(self.denoiser, ema_decay)
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

    @classmethod
    def part_shapes(cls, part: str, data: Mapping[str, Any], built: Mapping[str, Any]) -> dict[str, Any]:
        """The shape arguments offered to part `part` when it is built: `data` (in_channels, out_channels,
        resolution, num_classes, image_shape of the private data) unless a method says otherwise, e.g. a
        latent UNet sized by the autoencoder built before it (`built`: the parts built so far, in the
        order `method.parts` lists them). Each part receives those its constructor names."""
        return dict(data)

    def sampling_denoiser(self) -> nn.Module:
        """The EMA denoiser, in eval mode (what is released and sampled from)."""
        return self.ema.module.eval()

    def sampling_sigma_range(self) -> tuple[float, float]:
        """The sampler's (sigma_min, sigma_max): the loss's `sampling_sigma_range()`."""
        return self.loss.sampling_sigma_range()

    @torch.no_grad()
    def generate(self, num_samples: int, sample_cfg: Any, seed: int = 0, device: str | torch.device | None = None,
                 disable_progress: bool = False) -> tuple[Tensor, Tensor | None]:
        """`num_samples` images (N, C, H, W) in [-1, 1] and their labels (class-balanced; None if
        unconditional) from the released model, with `sample_cfg`'s sampler, steps, guidance and knobs;
        the same `seed` gives the same images. `device`: None for `sample_cfg.device` (auto: CUDA if any).

        What `sample`, `evaluate` and `train` call. A method that samples differently overrides what
        differs: the denoiser (`sampling_denoiser`, DP-SynGen's switching sampler), the noise range
        (`sampling_sigma_range`), or this (a latent method decodes what the denoiser samples).
        """
        where = resolve_device(sample_cfg.device if device is None else str(device))
        self.to(where)  # all of it: the EMA shares its frozen weights with the live parts
        return draw_samples(self.sampling_denoiser(), num_samples, self.image_shape, self.num_classes, sample_cfg,
                            seed=seed, disable_progress=disable_progress,
                            sigma_range=self.sampling_sigma_range(), device=where)
