"""DDPM++ UNet (NCSN++ "song" architecture) for DP-SGD training.

Follows the DDPM++ configuration of Song et al. (ICLR 2021, "Score-Based
Generative Modeling through SDEs", App. H) as used by DPDM (Dockhorn et al.,
TMLR 2023, §3.2 and `model/ncsnpp.py`): positional noise embedding, BigGAN
up/down residual blocks, skip rescaling by 1/sqrt(2), GroupNorm with
min(ch // 4, 32) groups, self-attention at chosen resolutions and at the
bottleneck, and class labels via `nn.Embedding(num_classes + 1, nf)` (the
extra row is the null class for classifier-free guidance).

DP-SGD constraints (per-example gradients): every parameter lives in an
`nn.Conv2d`, `nn.Linear`, `nn.GroupNorm` or `nn.Embedding`, so Opacus's grad
samplers cover all of them; nothing mixes examples of a batch (no BatchNorm);
no in-place ops and no branching on tensor values, so the net works under
`torch.func.vmap(torch.func.grad(...))` over `torch.func.functional_call`.

Initialisation follows DDPM++ (`init_scale = 0`): convolutions and linears
are Xavier-uniform with zero bias, and the last convolution of every residual
branch, the attention output projection and the output convolution start at
zero. Each block then starts as (a rescaled) identity and the network output
is zero, which the EDM/v-prediction wrappers turn into D(x) = c_skip * x.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESAMPLE_KINDS = ("biggan", "ddpm")


def _num_groups(channels: int) -> int:
    # DDPM++: GroupNorm with min(ch // 4, 32) groups.
    return min(channels // 4, 32)


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = _num_groups(channels)
    if groups < 1 or channels % groups != 0:
        raise ValueError(
            f"GroupNorm with min(ch // 4, 32) = {groups} groups cannot split {channels} channels; "
            f"choose nf and ch_mult so that every level's channel count (and the decoder's "
            f"level + skip concatenations) is >= 4 and divisible by its group count, e.g. nf a multiple of 32"
        )
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _init(module: nn.Conv2d | nn.Linear, zero: bool = False) -> nn.Module:
    """Xavier-uniform weights (score_sde `default_init`), zero bias; or all zero."""
    if zero:
        nn.init.zeros_(module.weight)
    else:
        nn.init.xavier_uniform_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def _conv(in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, zero: bool = False) -> nn.Conv2d:
    return _init(nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2), zero)


def positional_embedding(noise_labels: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (N,) noise labels -> (N, dim).

    Transformer positional encoding as in DDPM / score_sde
    `get_timestep_embedding`: frequencies from 1 down to 1/max_positions.
    """
    half = dim // 2
    dtype = torch.promote_types(noise_labels.dtype, torch.float32)  # at least float32
    freqs = torch.exp(
        -math.log(max_positions) * torch.arange(half, device=noise_labels.device, dtype=dtype) / max(half - 1, 1)
    )
    args = noise_labels.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """BigGAN-style residual block (score_sde `ResnetBlockBigGANpp`).

    h = Conv(act(GN(x))) [resampled before the conv if up/down]
    h = h + Linear(act(emb));  h = Conv_zero(Dropout(act(GN(h))))
    out = (skip(x) + h) / sqrt(2)   (skip = 1x1 conv if channels or size change)
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        dropout: float = 0.0,
        skip_rescale: bool = True,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        if up and down:
            raise ValueError("ResBlock cannot be both up and down")
        self.up, self.down, self.skip_rescale = up, down, skip_rescale
        self.norm0 = _group_norm(in_ch)
        self.conv0 = _conv(in_ch, out_ch)
        self.emb_proj = _init(nn.Linear(emb_dim, out_ch))
        self.norm1 = _group_norm(out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv1 = _conv(out_ch, out_ch, zero=True)
        # score_sde uses a 1x1 skip conv whenever channels change or the block resamples.
        self.skip = _conv(in_ch, out_ch, kernel_size=1) if (in_ch != out_ch or up or down) else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm0(x))
        h = self._resample(h)
        x = self._resample(x)
        h = self.conv0(h)
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.dropout(F.silu(self.norm1(h)))
        h = self.conv1(h)
        out = self.skip(x) + h
        return out * (1.0 / math.sqrt(2.0)) if self.skip_rescale else out


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels (score_sde `AttnBlockpp`).

    q, k, v and the output projection are 1x1 convolutions (DPDM's `NIN`);
    the softmax attention itself has no parameters. The output projection is
    zero-initialised.
    """

    def __init__(self, channels: int, skip_rescale: bool = True):
        super().__init__()
        self.skip_rescale = skip_rescale
        self.norm = _group_norm(channels)
        self.qkv = _conv(channels, 3 * channels, kernel_size=1)
        self.proj = _conv(channels, channels, kernel_size=1, zero=True)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        n, c, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, height * width).unbind(1)
        w = torch.einsum("nci,ncj->nij", q, k) * (c ** -0.5)
        w = torch.softmax(w, dim=-1)
        h = torch.einsum("nij,ncj->nci", w, v).reshape(n, c, height, width)
        out = x + self.proj(h)
        return out * (1.0 / math.sqrt(2.0)) if self.skip_rescale else out


class Resample(nn.Module):
    """DDPM-style resampling layer between levels: strided 3x3 conv down, or
    nearest-neighbour x2 then 3x3 conv up (used when `resample="ddpm"`)."""

    def __init__(self, channels: int, up: bool):
        super().__init__()
        self.up = up
        self.conv = _conv(channels, channels, stride=1 if up else 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


def run_levels(net: nn.Module, h: Tensor, run: Callable[[nn.Module, Tensor], Tensor]) -> Tensor:
    """The encoder-bottleneck-decoder pass of a UNet with `down`, `mid` and `up` module lists: `run(module, h)`
    applies one block; `_down_pushes[i]` says whether down block i's output is a skip connection and
    `_up_pops[i]` whether up block i takes one (concatenated on channels) first."""
    skips = [h]
    for module, push in zip(net.down, net._down_pushes):
        h = run(module, h)
        if push:
            skips.append(h)
    for module in net.mid:
        h = run(module, h)
    for module, pop in zip(net.up, net._up_pops):
        if pop:
            h = torch.cat([h, skips.pop()], dim=1)
        h = run(module, h)
    return h


class UNet(nn.Module):
    """DDPM++ UNet: `net(x, noise_labels, class_labels) -> (N, out_channels, H, W)`.

    Args:
        in_channels, out_channels: image channels in and out.
        resolution: input height = width; must be divisible by 2**(len(ch_mult) - 1).
        nf: base channel count; level i has nf * ch_mult[i] channels.
        ch_mult: channel multiplier per level (one level per resolution).
        num_res_blocks: residual blocks per level (the decoder has one more).
        attn_resolutions: level resolutions (e.g. 7 for 28 -> 14 -> 7) that get
            self-attention after each residual block; the bottleneck always has
            one attention block (res, attn, res).
        num_classes: 0 for unconditional; else labels in [0, num_classes], where
            `num_classes` is the null class (classifier-free guidance).
        dropout: dropout inside residual blocks.
        skip_rescale: divide residual sums by sqrt(2) (DDPM++).
        resample: "biggan" (resampling inside residual blocks, DDPM++/DPDM) or
            "ddpm" (separate strided-conv / upsample-conv layers).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resolution: int,
        nf: int = 32,
        ch_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (7,),
        num_classes: int = 0,
        dropout: float = 0.0,
        skip_rescale: bool = True,
        resample: str = "biggan",
    ):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        num_levels = len(ch_mult)
        if num_levels < 1:
            raise ValueError("ch_mult must have at least one level, got ()")
        factor = 2 ** (num_levels - 1)
        if resolution <= 0 or resolution % factor != 0:
            raise ValueError(
                f"UNet resolution must be divisible by 2**(len(ch_mult) - 1) = {factor} "
                f"(ch_mult={ch_mult} halves the image {num_levels - 1} times), got resolution={resolution}; "
                f"use a shorter ch_mult or resize the data"
            )
        level_res = [resolution // 2**i for i in range(num_levels)]
        unused = sorted(set(attn_resolutions) - set(level_res))
        if unused:
            raise ValueError(
                f"attn_resolutions {list(attn_resolutions)} contain {unused}, which are not UNet level "
                f"resolutions {level_res} for resolution={resolution}, ch_mult={ch_mult}; "
                f"pick attn_resolutions from {level_res} (the bottleneck always has attention)"
            )
        if resample not in RESAMPLE_KINDS:
            raise ValueError(f"resample must be one of {RESAMPLE_KINDS}, got {resample!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")

        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        self.num_classes = num_classes
        self.nf = nf
        emb_dim = 4 * nf
        block = dict(emb_dim=emb_dim, dropout=dropout, skip_rescale=skip_rescale)

        # Noise (and label) embedding: positional(nf) [+ Embedding(nf)] -> Linear, SiLU, Linear.
        self.label_embed = nn.Embedding(num_classes + 1, nf) if num_classes > 0 else None
        self.emb_mlp0 = _init(nn.Linear(nf, emb_dim))
        self.emb_mlp1 = _init(nn.Linear(emb_dim, emb_dim))

        self.conv_in = _conv(in_channels, nf)

        # Encoder: every residual block (+ attention) and every downsampling
        # layer pushes its output as a skip connection.
        self.down = nn.ModuleList()
        self._down_pushes: list[bool] = []  # does module i's output become a skip?
        skip_ch = [nf]
        ch = nf
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, nf * mult, **block))
                ch = nf * mult
                if level_res[level] in attn_resolutions:
                    self._down_pushes.append(False)
                    self.down.append(AttnBlock(ch, skip_rescale))
                self._down_pushes.append(True)
                skip_ch.append(ch)
            if level != num_levels - 1:
                if resample == "biggan":
                    self.down.append(ResBlock(ch, ch, down=True, **block))
                else:
                    self.down.append(Resample(ch, up=False))
                self._down_pushes.append(True)
                skip_ch.append(ch)

        # Bottleneck: res, attn, res.
        self.mid = nn.ModuleList([ResBlock(ch, ch, **block), AttnBlock(ch, skip_rescale), ResBlock(ch, ch, **block)])

        # Decoder: num_res_blocks + 1 residual blocks per level, each taking one skip.
        self.up = nn.ModuleList()
        self._up_pops: list[bool] = []
        for level in reversed(range(num_levels)):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skip_ch.pop(), nf * ch_mult[level], **block))
                self._up_pops.append(True)
                ch = nf * ch_mult[level]
            if level_res[level] in attn_resolutions:
                self.up.append(AttnBlock(ch, skip_rescale))
                self._up_pops.append(False)
            if level != 0:
                if resample == "biggan":
                    self.up.append(ResBlock(ch, ch, up=True, **block))
                else:
                    self.up.append(Resample(ch, up=True))
                self._up_pops.append(False)
        assert not skip_ch, "skip connections left unused"

        self.norm_out = _group_norm(ch)
        self.conv_out = _conv(ch, out_channels, zero=True)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, C, H, W); noise_labels: (N,) float (c_noise); class_labels: (N,) int64
        in [0, num_classes] or None (= the null class). Class labels are ignored
        when num_classes == 0."""
        n = x.shape[0]
        noise_labels = noise_labels.reshape(-1).expand(n)
        emb = positional_embedding(noise_labels, self.nf).to(x.dtype)
        if self.label_embed is not None:
            if class_labels is None:
                class_labels = torch.full((n,), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_embed(class_labels.reshape(-1).long())
        emb = self.emb_mlp1(F.silu(self.emb_mlp0(emb)))

        h = run_levels(self, self.conv_in(x), lambda module, h: module(h, emb))
        return self.conv_out(F.silu(self.norm_out(h)))
