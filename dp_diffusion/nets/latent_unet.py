"""Latent denoiser for DP-LDM: a UNet whose blocks at chosen resolutions are transformer blocks.

Follows the conditional latent-diffusion UNet of DP-LDM (Lyu et al., arXiv 2305.15759; CompVis
`openaimodel.UNetModel` with `SpatialTransformer`s, reference notes Part 2, 2.2-2.4): residual blocks
carry the noise embedding, and class labels enter only through cross-attention to the context a
class embedder gives (`ClassEmbedder`, the CompVis `cond_stage_model`). A transformer block is
GroupNorm, 1x1 projection in, LayerNorm + self-attention, LayerNorm + cross-attention to the context,
LayerNorm + GEGLU feed-forward, 1x1 projection out (zero-initialised), added to its input.

`net(x, noise_labels, class_labels) -> (N, out_channels, H, W)` like `nets.unet.UNet`, so the
`diffusion/` preconditioning wrappers and losses train it unchanged (DP-LDM's epsilon-prediction
DDPM is `VPLoss`: with VPPrecond, c_skip = 1 and c_out = -sigma make the backbone predict the noise and
the weight 1/sigma^2 turns the loss into ||F - n||^2).

DP-SGD constraints: attention is written with `nn.Linear` on (B, tokens, dim) inputs and
`nn.LayerNorm` (not `nn.MultiheadAttention`), so the privacy core's grouped per-example mode covers
every parameter; nothing mixes the examples of a batch (GroupNorm only).

Two departures from the reference code, both stated: (1) with a one-token context (the class embedder
gives one token, as in DP-LDM) the softmax over one key is 1 whatever the query, so cross-attention is
v-then-out and has no q/k projections nor the LayerNorm before it: in the reference they exist but
always get a zero gradient, and under DP only noise. (2) The head count is part of `architecture`, so
a loader can refuse a checkpoint trained with other heads (reference pitfall 2.9.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dp_diffusion.nets.unet import ResBlock, _conv, _group_norm, _init, positional_embedding, run_levels

__all__ = ["Attention", "FeedForward", "TransformerBlock", "ClassEmbedder", "LatentUNet"]


class Attention(nn.Module):
    """Multi-head scaled dot-product attention of (B, T, dim) queries over a (B, S, context_dim) context.

    q, k, v, out are `nn.Linear` layers on 3-D inputs. Without a context it is self-attention. With
    `context_tokens == 1` there are no q/k layers (one key: all attention weights are 1).
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, context_tokens: int = 0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        kv_dim = dim if context_dim is None else context_dim
        single_key = context_dim is not None and context_tokens == 1
        self.q = None if single_key else nn.Linear(dim, dim, bias=False)
        self.k = None if single_key else nn.Linear(kv_dim, dim, bias=False)
        self.v = nn.Linear(kv_dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        if self.q is None:  # one key: softmax(.) = 1, the output is v(context) at every query
            return self.out(self.v(context)).expand(-1, x.shape[1], -1)
        b, t, dim = x.shape
        h = self.num_heads

        def heads(z: Tensor) -> Tensor:  # (B, T, dim) -> (B, heads, T, dim / heads)
            return z.reshape(b, z.shape[1], h, dim // h).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(context)), heads(self.v(context))
        weights = torch.softmax(q @ k.transpose(-1, -2) * (dim // h) ** -0.5, dim=-1)  # Vaswani et al. Eq. 1
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, dim))


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020), as in the latent-diffusion transformer: Linear -> a * GELU(gate) -> Linear."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(self.dropout(a * F.gelu(gate)))


class TransformerBlock(nn.Module):
    """Latent-diffusion `SpatialTransformer` of depth 1 on (N, C, H, W) feature maps.

    h = proj_in(GN(x)) as (N, HW, C) tokens; h += attn1(LN1(h)); h += attn2(LN2(h), context);
    h += ff(LN3(h)); out = x + proj_out(h) (proj_out zero-initialised). Without `context_dim`
    (an unconditional model) there is no cross-attention; with a one-token context, no LN2 (see the
    module docstring).
    """

    # The self-attention sublayer: what `finetune` mode "attention" trains.
    SELF_ATTENTION = ("norm1", "attn1")

    def __init__(self, channels: int, num_heads: int, context_dim: int | None = None, context_tokens: int = 1,
                 ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.norm = _group_norm(channels)
        self.proj_in = _conv(channels, channels, kernel_size=1)
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = Attention(channels, num_heads)
        self.attn2 = None if context_dim is None else Attention(channels, num_heads, context_dim, context_tokens)
        # With one context token the cross-attention output does not depend on its queries: no LN2.
        self.norm2 = nn.LayerNorm(channels) if self.attn2 is not None and self.attn2.q is not None else None
        self.norm3 = nn.LayerNorm(channels)
        self.ff = FeedForward(channels, ff_mult, dropout)
        self.proj_out = _conv(channels, channels, kernel_size=1, zero=True)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        n, c, height, width = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (N, HW, C)
        h = h + self.attn1(self.norm1(h))
        if self.attn2 is not None:
            if context is None:
                raise ValueError("a cross-attention transformer block needs a context (class embedding)")
            h = h + self.attn2(self.norm2(h) if self.norm2 is not None else h, context)
        h = h + self.ff(self.norm3(h))
        h = h.transpose(1, 2).reshape(n, c, height, width)
        return x + self.proj_out(h)


class ClassEmbedder(nn.Module):
    """Class labels -> a (N, context_tokens, context_dim) cross-attention context.

    Rows 0..num_classes-1 embed the classes; row `num_classes` is the null class (the label the
    diffusion losses use for label dropout and the samplers for classifier-free guidance); labels
    None mean the null class.
    """

    def __init__(self, num_classes: int, context_dim: int, context_tokens: int = 1):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"a class embedder needs num_classes >= 1, got {num_classes}")
        self.num_classes, self.context_dim, self.context_tokens = num_classes, context_dim, context_tokens
        self.embedding = nn.Embedding(num_classes + 1, context_tokens * context_dim)

    def forward(self, labels: Tensor | None, n: int, device: torch.device) -> Tensor:
        if labels is None:
            labels = torch.full((n,), self.num_classes, dtype=torch.long, device=device)
        labels = labels.reshape(-1).long()
        return self.embedding(labels).reshape(labels.shape[0], self.context_tokens, self.context_dim)

    @torch.no_grad()
    def extend_classes(self, num_classes: int) -> None:
        """Re-index the table for a label set of `num_classes` classes (e.g. the private set's).

        Rule: label y < min(num_classes, public classes) keeps public row y (DP-LDM: MNIST digits 0-9
        reuse EMNIST letter rows 0-9, CIFAR-10 classes reuse ImageNet rows 0-9); labels the public
        embedder lacks (y >= public classes) get new rows, initialised to the mean of the public class
        rows (a function of public weights only); the null row moves to index `num_classes`, where the
        losses and samplers look for it. Public rows >= `num_classes` are dropped: no private label
        selects them, and trainable they would only take noise.
        """
        if num_classes < 1:
            raise ValueError(f"extend_classes needs num_classes >= 1, got {num_classes}")
        old = self.embedding.weight
        keep = min(num_classes, self.num_classes)
        new = old.new_empty(num_classes + 1, old.shape[1])
        new[:keep] = old[:keep]
        new[keep:num_classes] = old[:self.num_classes].mean(dim=0)
        new[num_classes] = old[self.num_classes]
        self.embedding = nn.Embedding(num_classes + 1, old.shape[1], device=old.device, dtype=old.dtype)
        self.embedding.weight.copy_(new)
        self.embedding.weight.requires_grad_(old.requires_grad)
        self.num_classes = num_classes


class LatentUNet(nn.Module):
    """UNet with transformer blocks: `net(x, noise_labels, class_labels) -> (N, out_channels, H, W)`.

    Args:
        in_channels, out_channels: latent channels in and out.
        resolution: latent height = width; divisible by 2**(len(ch_mult) - 1).
        nf: base channel count; level i has nf * ch_mult[i] channels.
        ch_mult: channel multiplier per level.
        num_res_blocks: residual blocks per level (the decoder has one more).
        transformer_resolutions: level resolutions whose residual blocks are each followed by a transformer
            block; None: every level (DP-LDM's MNIST and CIFAR-10 models). The bottleneck always has one
            (res, transformer, res).
        num_heads: attention heads of every transformer block.
        num_classes: 0 for unconditional (no embedder, no cross-attention); else labels in [0, num_classes],
            `num_classes` being the null class.
        context_dim, context_tokens: the class embedder's context shape (DP-LDM MNIST: 5 and 1).
        ff_mult: feed-forward width multiplier.
        dropout: dropout in residual blocks and feed-forward layers.
        skip_rescale: divide residual-block sums by sqrt(2) (off in latent diffusion's UNet).

    Transformer blocks are numbered in forward order (encoder, bottleneck, decoder), the order of
    `transformer_blocks()`, as DP-LDM's layer ablation counts them.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resolution: int,
        nf: int = 32,
        ch_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        transformer_resolutions: Sequence[int] | None = None,
        num_heads: int = 4,
        num_classes: int = 0,
        context_dim: int = 32,
        context_tokens: int = 1,
        ff_mult: int = 4,
        dropout: float = 0.0,
        skip_rescale: bool = False,
    ):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        num_levels = len(ch_mult)
        if num_levels < 1:
            raise ValueError("ch_mult must have at least one level, got ()")
        factor = 2 ** (num_levels - 1)
        if resolution <= 0 or resolution % factor:
            raise ValueError(f"LatentUNet resolution must be divisible by 2**(len(ch_mult) - 1) = {factor}, got "
                             f"resolution={resolution}; use a shorter ch_mult or the autoencoder's latent_multiple")
        level_res = [resolution // 2**i for i in range(num_levels)]
        if transformer_resolutions is None:
            transformer_resolutions = level_res
        transformer_resolutions = tuple(int(r) for r in transformer_resolutions)
        unused = sorted(set(transformer_resolutions) - set(level_res))
        if unused:
            raise ValueError(f"transformer_resolutions contain {unused}, which are not level resolutions {level_res}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if context_tokens < 1:
            raise ValueError(f"context_tokens must be >= 1, got {context_tokens}")
        for mult in ch_mult:
            if (nf * mult) % num_heads:
                raise ValueError(f"num_heads={num_heads} must divide every level's channels nf * ch_mult = {nf * mult}")

        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        self.num_classes, self.nf = num_classes, nf
        self.architecture: dict[str, Any] = dict(
            in_channels=in_channels, out_channels=out_channels, resolution=resolution, nf=nf, ch_mult=list(ch_mult),
            num_res_blocks=num_res_blocks, transformer_resolutions=list(transformer_resolutions),
            num_heads=num_heads, num_classes=num_classes, context_dim=context_dim, context_tokens=context_tokens,
            ff_mult=ff_mult, skip_rescale=skip_rescale)
        emb_dim = 4 * nf
        res = dict(emb_dim=emb_dim, dropout=dropout, skip_rescale=skip_rescale)
        cross = context_dim if num_classes > 0 else None

        def transformer(ch: int) -> TransformerBlock:
            return TransformerBlock(ch, num_heads, cross, context_tokens, ff_mult, dropout)

        self.class_embed = ClassEmbedder(num_classes, context_dim, context_tokens) if num_classes > 0 else None
        self.emb_mlp0 = _init(nn.Linear(nf, emb_dim))
        self.emb_mlp1 = _init(nn.Linear(emb_dim, emb_dim))
        self.conv_in = _conv(in_channels, nf)

        self.down = nn.ModuleList()
        self._down_pushes: list[bool] = []
        skip_ch, ch = [nf], nf
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, nf * mult, **res))
                ch = nf * mult
                if level_res[level] in transformer_resolutions:
                    self._down_pushes.append(False)
                    self.down.append(transformer(ch))
                self._down_pushes.append(True)
                skip_ch.append(ch)
            if level != num_levels - 1:
                self.down.append(ResBlock(ch, ch, down=True, **res))
                self._down_pushes.append(True)
                skip_ch.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, **res), transformer(ch), ResBlock(ch, ch, **res)])

        self.up = nn.ModuleList()
        self._up_pops: list[bool] = []
        for level in reversed(range(num_levels)):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skip_ch.pop(), nf * ch_mult[level], **res))
                self._up_pops.append(True)
                ch = nf * ch_mult[level]
                if level_res[level] in transformer_resolutions:
                    self.up.append(transformer(ch))
                    self._up_pops.append(False)
            if level != 0:
                self.up.append(ResBlock(ch, ch, up=True, **res))
                self._up_pops.append(False)
        assert not skip_ch, "skip connections left unused"

        self.norm_out = _group_norm(ch)
        self.conv_out = _conv(ch, out_channels, zero=True)

    def transformer_blocks(self) -> list[TransformerBlock]:
        """The transformer blocks in forward order (DP-LDM's block numbering)."""
        return [m for m in self.modules() if isinstance(m, TransformerBlock)]

    def extend_classes(self, num_classes: int) -> None:
        """Map a label set of `num_classes` classes onto the embedder's rows (rule: `ClassEmbedder.extend_classes`)."""
        if self.class_embed is None:
            raise ValueError("an unconditional LatentUNet (num_classes=0) has no class embedder to extend")
        self.class_embed.extend_classes(num_classes)
        self.num_classes = self.architecture["num_classes"] = num_classes

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x: (N, C, H, W) latents; noise_labels: (N,) float (c_noise); class_labels: (N,) int64 in
        [0, num_classes] or None (= the null class); ignored when num_classes == 0."""
        n = x.shape[0]
        emb = positional_embedding(noise_labels.reshape(-1).expand(n), self.nf).to(x.dtype)
        emb = self.emb_mlp1(F.silu(self.emb_mlp0(emb)))
        context = self.class_embed(class_labels, n, x.device).to(x.dtype) if self.class_embed is not None else None

        def run(module: nn.Module, h: Tensor) -> Tensor:
            return module(h, context) if isinstance(module, TransformerBlock) else module(h, emb)

        return self.conv_out(F.silu(self.norm_out(run_levels(self, self.conv_in(x), run))))
