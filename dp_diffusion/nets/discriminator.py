"""DP-SAD's discriminator: one logit per example from a teacher/student output pair at (x_r, r).

DP-SAD (Liu, Wang, Ge, ECCV 2024, arXiv 2408.14738) trains the student against a
discriminator eps_phi whose input is the concatenation C(x_psi, x_theta) of the teacher's
and the student's outputs at the same noisy input x_r and step r (reference notes,
section 1.1; the pairing and the labels are only known from a third-party summary). So the
input here is the channel concatenation of two outputs, `first` and `second`; which pairs
count as real and fake is the loss's business (`methods/adversarial.py`).

What the paper implies about x_r: nothing says the discriminator sees x_r itself, so by
default it does not (`with_input=False`). With `with_input=True`, x_r is concatenated too,
as in a conditional (pix2pix-style) discriminator: it can then judge an output against the
input it came from. Either way its input carries private data (the outputs depend on x_r).

Conditioning: the step r (or sigma, or the c_noise the student's backbone gets) through the
UNet's sinusoidal embedding and a two-layer MLP, added inside every residual block; class
labels either by projection (Miyato & Koyama, ICLR 2018: logit += <embed(y), features>)
or added to the time embedding, as the UNet does. Labels are in [0, num_classes], where
`num_classes` is the null class (as `UNet`, for a student trained with label dropout).
The paper's best ablation conditions both the student and the discriminator.

DP-SGD constraints, as `UNet`: only Conv2d, Linear, GroupNorm and Embedding parameters
(every per-example gradient mode covers them), GroupNorm instead of BatchNorm (nothing
mixes the examples of a batch), no buffers, no in-place ops, so it can itself be trained
by DP-SGD (DP-SAD's sound variant, where its input carries private data).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dp_diffusion.nets.unet import ResBlock, _conv, _group_norm, _init, positional_embedding

CLASS_CONDITIONING = ("projection", "embedding")


class Discriminator(nn.Module):
    """`disc(first, second, noise_labels, class_labels=None, x=None) -> (N,)` logits.

    Args:
        in_channels: channels of one output (the image's); the first conv sees 2 * in_channels,
            or 3 * in_channels with `with_input`.
        resolution: input height = width; must be divisible by 2**(len(ch_mult) - 1).
        num_classes: 0 for unconditional; else labels in [0, num_classes] (`num_classes` = null class).
        nf: base channel count; level i has nf * ch_mult[i] channels.
        ch_mult: channel multiplier per level; every level but the last halves the resolution.
        num_res_blocks: residual blocks per level before its downsampling block.
        with_input: also concatenate the noisy input x_r (pass it as `x`).
        class_conditioning: "projection" or "embedding" (see the module docstring).
        dropout: dropout inside residual blocks.
    """

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        num_classes: int = 0,
        nf: int = 32,
        ch_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        with_input: bool = False,
        class_conditioning: str = "projection",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        if not ch_mult:
            raise ValueError("discriminator ch_mult must have at least one level, got ()")
        factor = 2 ** (len(ch_mult) - 1)
        if resolution <= 0 or resolution % factor != 0:
            raise ValueError(f"discriminator resolution must be divisible by 2**(len(ch_mult) - 1) = {factor}, "
                             f"got resolution={resolution} with ch_mult={ch_mult}; use a shorter ch_mult")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if class_conditioning not in CLASS_CONDITIONING:
            raise ValueError(f"class_conditioning must be one of {CLASS_CONDITIONING}, got {class_conditioning!r}")
        if num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be >= 0, got {num_res_blocks}")

        self.in_channels, self.resolution, self.num_classes = in_channels, resolution, num_classes
        self.nf, self.with_input = nf, with_input
        self.class_conditioning = class_conditioning if num_classes > 0 else None
        emb_dim = 4 * nf
        block = dict(emb_dim=emb_dim, dropout=dropout)

        self.emb_mlp0 = _init(nn.Linear(nf, emb_dim))
        self.emb_mlp1 = _init(nn.Linear(emb_dim, emb_dim))
        self.label_embed = (nn.Embedding(num_classes + 1, nf)
                            if self.class_conditioning == "embedding" else None)

        self.conv_in = _conv((3 if with_input else 2) * in_channels, nf)
        self.blocks = nn.ModuleList()
        ch = nf
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.blocks.append(ResBlock(ch, nf * mult, **block))
                ch = nf * mult
            if level != len(ch_mult) - 1:
                self.blocks.append(ResBlock(ch, nf * ch_mult[level + 1], down=True, **block))
                ch = nf * ch_mult[level + 1]
        self.norm_out = _group_norm(ch)
        self.head = _init(nn.Linear(ch, 1))
        # Projection discriminator (Miyato & Koyama 2018, Eq. 3): logit = psi(h) + <embed(y), h>.
        self.label_project = (nn.Embedding(num_classes + 1, ch)
                              if self.class_conditioning == "projection" else None)
        if self.label_project is not None:
            nn.init.zeros_(self.label_project.weight)  # starts as the unconditional discriminator

    def forward(
        self,
        first: torch.Tensor,
        second: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        x: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """first, second: (N, C, H, W) outputs; noise_labels: (N,) float (r, sigma or c_noise);
        class_labels: (N,) int64 in [0, num_classes] or None (= the null class), ignored when
        unconditional; x: (N, C, H, W) noisy input, required with `with_input` and refused otherwise."""
        if (x is not None) != self.with_input:
            raise ValueError("this discriminator was built with with_input="
                             f"{self.with_input}: pass x={'the noisy input' if self.with_input else 'None'}")
        n = first.shape[0]
        h = torch.cat([first, second] + ([x] if x is not None else []), dim=1)
        emb = positional_embedding(noise_labels.reshape(-1).expand(n), self.nf).to(h.dtype)
        labels = None
        if self.class_conditioning is not None:
            labels = (torch.full((n,), self.num_classes, dtype=torch.long, device=h.device)
                      if class_labels is None else class_labels.reshape(-1).long())
        if self.label_embed is not None:
            emb = emb + self.label_embed(labels)
        emb = self.emb_mlp1(F.silu(self.emb_mlp0(emb)))

        h = self.conv_in(h)
        for block in self.blocks:
            h = block(h, emb)
        features = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        logits = self.head(features).squeeze(1)
        if self.label_project is not None:
            logits = logits + (self.label_project(labels) * features).sum(dim=1)
        return logits
