"""Black-box (data) audit: out-of-distribution canary images, scored by the released model's loss.

Each canary is a fixed random binary image; the run trains on the real set
plus the included canaries through the real path. The released (EMA) denoiser
is then scored on every canary by its diffusion loss over many fixed noise
draws (the same (sigma, noise) draws for every canary), calibrated per canary
against a reference model's loss on the same draws: the initial weights, or a
model trained the same way without any canary (`audit.reference=retrain`,
twice the compute). Score = reference loss - released loss: how much training
lowered this canary's loss beyond what any model of the data would.

This is weak by nature: the model's loss on one image of thousands moves
little, and the score sees only the end of training. Loss scores on mnist5k
with a tiny model reached AUC 0.59-0.63 and a lower bound of about 0.1 even
without DP. A low bound from this mode proves nothing about the guarantee.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from dp_diffusion.diffusion.losses import DiffusionLoss


def fixed_draws(loss: DiffusionLoss, image_shape: tuple[int, ...], num_draws: int, seed: int) -> dict[str, Tensor]:
    """`num_draws` noise draws (sigma from the training distribution, Gaussian noise), labels always kept."""
    generator = torch.Generator().manual_seed(seed + 2)
    probe = torch.zeros((1, *image_shape))
    draw = loss.draw(probe, None, noise_multiplicity=num_draws, generator=generator)
    draw["keep_label"] = torch.ones_like(draw["keep_label"])
    return draw


@torch.no_grad()
def canary_losses(denoiser: nn.Module, loss: DiffusionLoss, images: Tensor, labels: Tensor | None,
                  draw: dict[str, Tensor], rows_per_forward: int = 512) -> np.ndarray:
    """Each canary's loss averaged over the same draws, (m,)."""
    denoiser.eval()
    chunk = max(1, rows_per_forward // draw["sigma"].shape[1])
    device = next(denoiser.parameters()).device
    out = []
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].to(device)
        y = None if labels is None else labels[start : start + chunk].to(device)
        shared = {k: v.expand(len(x), *v.shape[1:]).to(device) for k, v in draw.items()}
        out.append(loss(denoiser, x, y, shared).double().cpu())
    return torch.cat(out).numpy()
