"""Which parameters of a public-pretrained latent denoiser DP fine-tuning trains (DP-LDM, reference notes 2.4).

Modes (`method.finetune`):
- `attention`: the self-attention sublayer (LayerNorm + q/k/v/out) of every transformer block: the
  paper's unconditional setting (`train_attention_only`, its `AttentionBlock`s).
- `condition`: every transformer block (feed-forward included) plus the class embedder: the paper's
  conditional setting (`train_condition_only`).
- `blocks_from=k`: transformer blocks k..N (1-based, forward order) plus the class embedder: the paper's
  layer ablation, where `ablation_blocks: 9` trains blocks 9-16 of 16 and the embedder (CIFAR-10).
- `all`: every parameter (full fine-tuning of the public-pretrained model: PDP-Diffusion's baseline).
- `lora`: rank-r adapters on the q/k/v/out projections of every attention layer, all else frozen
  (DPImageBench's DP-LoRA). This adds modules: select after loading the pretrained weights.

`select_trainable` sets `requires_grad` accordingly (the privacy core then forms per-example gradients
and noise for those parameters only) and returns the count and share it trains.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dp_diffusion.config import ConfigError
from dp_diffusion.nets.latent_unet import Attention, ClassEmbedder, TransformerBlock
from dp_diffusion.nets.lora import add_lora

__all__ = ["FINETUNE_MODES", "FinetuneSummary", "select_trainable"]

FINETUNE_MODES = ("attention", "condition", "blocks_from=k", "all", "lora")
LORA_TARGETS = ("q", "k", "v", "out")


@dataclass(frozen=True)
class FinetuneSummary:
    """What a fine-tuning mode trains: `trainable` of `total` parameters (adapters included in both)."""

    mode: str
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        return {"mode": self.mode, "trainable": self.trainable, "total": self.total, "share": self.share}

    def __str__(self) -> str:
        return (f"fine-tuning {self.mode!r}: {self.trainable:,} of {self.total:,} parameters "
                f"({100 * self.share:.1f}%)")


def _blocks_from(mode: str, num_blocks: int) -> int:
    value = mode.split("=", 1)[1].strip()
    if not value.isdigit() or not 1 <= int(value) <= num_blocks:
        raise ConfigError(f"method.finetune=blocks_from=k needs an integer k in [1, {num_blocks}] "
                          f"(the model has {num_blocks} transformer blocks), got {mode!r}")
    return int(value)


def select_trainable(model: nn.Module, mode: str, lora_rank: int = 4, lora_alpha: float | None = None
                     ) -> FinetuneSummary:
    """Freeze `model` except the part `mode` names (see the module docstring); `lora_rank`/`lora_alpha`
    apply to mode `lora` only. Raises a one-line ConfigError for an unknown mode or a model without
    transformer blocks."""
    mode = str(mode).strip()
    known = mode in FINETUNE_MODES or mode.startswith("blocks_from=")
    if not known:
        raise ConfigError(f"method.finetune must be one of {', '.join(FINETUNE_MODES)}, got {mode!r}")
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    embedders = [m for m in model.modules() if isinstance(m, ClassEmbedder)]
    if not blocks and mode != "all":
        raise ConfigError(f"method.finetune={mode} needs a model with transformer blocks "
                          f"(a LatentUNet), got {type(model).__name__}")
    attentions = [m for block in blocks for m in block.modules() if isinstance(m, Attention)]
    if mode == "lora":
        if lora_rank < 1:
            raise ConfigError(f"method.lora_rank must be >= 1, got {lora_rank}")
        for attention in attentions:
            add_lora(attention, LORA_TARGETS, lora_rank, lora_alpha)

    model.requires_grad_(mode == "all")
    if mode == "attention":
        for block in blocks:
            for name in TransformerBlock.SELF_ATTENTION:
                getattr(block, name).requires_grad_(True)
    elif mode == "condition" or mode.startswith("blocks_from="):
        first = _blocks_from(mode, len(blocks)) if mode != "condition" else 1
        for part in [*blocks[first - 1:], *embedders]:
            part.requires_grad_(True)
    elif mode == "lora":
        for attention in attentions:
            for name in LORA_TARGETS:
                layer = getattr(attention, name)
                if layer is not None:
                    layer.down.requires_grad_(True)
                    layer.up.requires_grad_(True)
    params = list(model.parameters())
    return FinetuneSummary(mode, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
