"""KL-regularised convolutional autoencoder for latent diffusion (DP-LDM's first stage, trained on PUBLIC data).

A small version of the CompVis `AutoencoderKL` DP-LDM uses (Rombach et al. 2022, §3 and App. G;
reference notes 2.2-2.3): the encoder maps an image to the mean and log-variance of a diagonal Gaussian
over a (latent_channels, H/f, W/f) latent, the decoder maps a latent back to an image, and training
minimises reconstruction + kl_weight * KL(q(z|x) || N(0, I)) (the reference adds LPIPS and a patch
discriminator, left out here). The downsampling factor f is 2, 4 or 8 (one stride-2 convolution per
halving).

Sizes that f does not divide (28 for f = 8, or any size with `latent_multiple`): `encode` pads the image
(replicating its border, centred) to the next multiple of f * latent_multiple and `decode` crops back to
`resolution`. So 28x28 with f = 8 gives 4x4 latents (as the paper's 32x32 MNIST), and with f = 4 and
latent_multiple = 2 gives 8x8 latents, which a two-level latent UNet can halve.

GroupNorm only, no layer that mixes the examples of a batch. It never sees private data in training;
encoding private images for DP fine-tuning is a fixed public function applied per example.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dp_diffusion.nets.unet import _conv, _group_norm

__all__ = ["DiagonalGaussian", "AutoencoderKL", "AutoencoderLoss", "latent_scale_factor", "DOWNSAMPLING_FACTORS"]

DOWNSAMPLING_FACTORS = (2, 4, 8)


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)) per latent element (logvar clamped to [-30, 20] as in latent diffusion)."""

    def __init__(self, mean: Tensor, logvar: Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * n, n ~ N(0, I) drawn from `generator` (reparameterised: differentiable)."""
        gen_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=gen_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def kl(self) -> Tensor:
        """Per-example KL(q || N(0, I)), summed over latent elements: 1/2 sum(mean^2 + var - 1 - logvar). Shape (N,)."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class AutoencoderLoss(NamedTuple):
    """Per-example losses, shape (N,) each: total = reconstruction + kl_weight * kl."""

    total: Tensor
    reconstruction: Tensor
    kl: Tensor


class _ResBlock(nn.Module):
    """GN -> SiLU -> conv -> GN -> SiLU -> conv, plus a (1x1 if channels change) skip."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm0, self.conv0 = _group_norm(in_ch), _conv(in_ch, out_ch)
        self.norm1, self.conv1 = _group_norm(out_ch), _conv(out_ch, out_ch)
        self.skip = _conv(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        return self.skip(x) + self.conv1(F.silu(self.norm1(h)))


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AutoencoderKL(nn.Module):
    """`encode(x) -> DiagonalGaussian`, `decode(z) -> image`, `loss(x) -> AutoencoderLoss`.

    Args:
        in_channels: image channels.
        resolution: image height = width (decode crops to it).
        f: downsampling factor, one of 2, 4, 8.
        latent_channels: channels of the latent.
        nf: base channel count; the level after i halvings has nf * ch_mult[i] channels.
        ch_mult: log2(f) + 1 multipliers; None: 1, 2, 2, ...
        num_res_blocks: residual blocks per level.
        kl_weight: weight of the KL term (latent diffusion: 1e-6).
        latent_multiple: pad so that the latent side is a multiple of this (e.g. 2**(levels - 1) of the
            latent UNet).
    """

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        f: int = 4,
        latent_channels: int = 3,
        nf: int = 32,
        ch_mult: Sequence[int] | None = None,
        num_res_blocks: int = 1,
        kl_weight: float = 1e-6,
        latent_multiple: int = 1,
    ):
        super().__init__()
        if f not in DOWNSAMPLING_FACTORS:
            raise ValueError(f"autoencoder downsampling factor f must be one of {DOWNSAMPLING_FACTORS}, got {f}")
        halvings = int(math.log2(f))
        ch_mult = (1,) + (2,) * halvings if ch_mult is None else tuple(int(m) for m in ch_mult)
        if len(ch_mult) != halvings + 1:
            raise ValueError(f"autoencoder ch_mult needs log2(f) + 1 = {halvings + 1} entries for f={f}, "
                             f"got {list(ch_mult)}")
        if latent_multiple < 1 or kl_weight < 0 or latent_channels < 1:
            raise ValueError(f"autoencoder needs latent_multiple >= 1, kl_weight >= 0 and latent_channels >= 1, got "
                             f"{latent_multiple}, {kl_weight}, {latent_channels}")
        self.in_channels, self.resolution, self.f = in_channels, resolution, f
        self.latent_channels, self.kl_weight = latent_channels, kl_weight
        step = f * latent_multiple
        self.padded_resolution = -(-resolution // step) * step
        self.latent_resolution = self.padded_resolution // f
        chans = [nf * m for m in ch_mult]

        encoder: list[nn.Module] = [_conv(in_channels, chans[0])]
        ch = chans[0]
        for level, out_ch in enumerate(chans):
            for _ in range(num_res_blocks):
                encoder.append(_ResBlock(ch, out_ch))
                ch = out_ch
            if level != halvings:
                encoder.append(_conv(ch, ch, stride=2))
        encoder += [_ResBlock(ch, ch), _group_norm(ch), nn.SiLU(), _conv(ch, 2 * latent_channels)]
        self.encoder = nn.Sequential(*encoder)

        decoder: list[nn.Module] = [_conv(latent_channels, ch), _ResBlock(ch, ch)]
        for level in reversed(range(halvings + 1)):
            for _ in range(num_res_blocks):
                decoder.append(_ResBlock(ch, chans[level]))
                ch = chans[level]
            if level != 0:
                decoder.append(_Upsample(ch))
        decoder += [_group_norm(ch), nn.SiLU(), _conv(ch, in_channels)]
        self.decoder = nn.Sequential(*decoder)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_resolution, self.latent_resolution)

    def _pad(self, x: Tensor) -> Tensor:
        extra = self.padded_resolution - x.shape[-1]
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            raise ValueError(f"autoencoder built for {self.resolution}x{self.resolution} images, got "
                             f"{tuple(x.shape[-2:])}")
        if extra == 0:
            return x
        before = extra // 2
        return F.pad(x, (before, extra - before, before, extra - before), mode="replicate")

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """(N, C, resolution, resolution) images -> q(z|x) over (N, latent_channels, latent_res, latent_res)."""
        mean, logvar = self.encoder(self._pad(x)).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: Tensor) -> Tensor:
        """Latents -> (N, C, resolution, resolution) images (the padding `encode` added cropped off)."""
        x = self.decoder(z)
        before = (self.padded_resolution - self.resolution) // 2
        return x[..., before:before + self.resolution, before:before + self.resolution]

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Reconstruction of x through a sampled latent."""
        return self.decode(self.encode(x).sample(generator))

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> AutoencoderLoss:
        """Per-example reconstruction (L1, summed over pixels) + kl_weight * KL (summed over latent elements),
        the latent-diffusion `LPIPSWithDiscriminator` weighting without its perceptual and adversarial terms."""
        posterior = self.encode(x)
        reconstruction = (self.decode(posterior.sample(generator)) - x).abs().flatten(1).sum(1)
        kl = posterior.kl()
        return AutoencoderLoss(reconstruction + self.kl_weight * kl, reconstruction, kl)


@torch.no_grad()
def latent_scale_factor(latents: Tensor) -> float:
    """1 / std of all latent elements (latent diffusion's `scale_factor`), so scaled latents have unit variance.

    Compute it on PUBLIC latents only: a statistic of private latents used outside the DP mechanism would
    leak (DESIGN.md, privacy invariant 5).
    """
    std = latents.detach().double().std()
    if not torch.isfinite(std) or std <= 0:
        raise ValueError(f"latent_scale_factor needs latents with a positive finite std, got {float(std)}")
    return float(1.0 / std)
