"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) on linear layers, for DP-LoRA fine-tuning.

`LoRALinear(base)` computes base(x) + (alpha / r) * up(down(x)) (LoRA Eq. 3, h = W0 x + B A x) with the
base layer frozen, `down` (A: in -> r) Kaiming-uniform as in `loralib`, and `up` (B: r -> out) zero, so
the adapted layer starts equal to the base. All three are plain `nn.Linear` submodules and the module
has no parameters of its own, so the privacy core's per-example gradient samplers (which see layer
types, not this wrapper) cover the adapters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["LoRALinear", "add_lora", "merge_lora"]


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable rank-`rank` update scaled by `alpha / rank`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scale = (rank if alpha is None else alpha) / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.down = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.up = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        base.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * self.up(self.down(x))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` computing the same function: W0 + (alpha / r) B A."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                          device=self.base.weight.device, dtype=self.base.weight.dtype)
        layer.weight.copy_(self.base.weight + self.scale * self.up.weight @ self.down.weight)
        if self.base.bias is not None:
            layer.bias.copy_(self.base.bias)
        return layer


def add_lora(module: nn.Module, names: tuple[str, ...], rank: int, alpha: float | None = None) -> list[LoRALinear]:
    """Replace the `nn.Linear` children called one of `names` of every submodule of `module` by `LoRALinear`s
    (children already adapted are kept); returns every adapter in `module`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in names and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, rank, alpha))
    return [m for m in module.modules() if isinstance(m, LoRALinear)]


def merge_lora(module: nn.Module) -> int:
    """Fold every adapter of `module` back into a plain `nn.Linear` (same function, base state_dict keys);
    returns how many were merged."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
                count += 1
    return count
