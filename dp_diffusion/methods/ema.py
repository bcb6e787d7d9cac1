"""Exponential moving average of the parameters that train; everything frozen is shared, not copied.

`torch.optim.swa_utils.AveragedModel` deep-copies the whole module. A method whose denoiser is mostly
frozen (DP-LDM fine-tunes only the attention blocks of a pretrained latent model) would then hold a
second copy of every frozen weight that never changes. `TrainableEMA` copies only the parameters with
`requires_grad` when it is made; the frozen parameters and all buffers of its `module` are the live
module's own tensors. `module` is still a complete denoiser (sampling calls it), and its state_dict has
the same keys as `AveragedModel`'s (`module.<name>` and `n_averaged`), so checkpoints written with
`AveragedModel` load unchanged (`torch.save` writes a shared tensor once).

The update is `AveragedModel(..., multi_avg_fn=ema_with_warmup(decay), use_buffers=True)`'s, restricted
to the copied parameters: the first update copies, later ones lerp all tensors of a device and dtype
at once. With every parameter trainable and no buffers (today's UNets) the weights are bit-identical.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn


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


def copy_trainable(model: nn.Module) -> nn.Module:
    """A copy of `model` whose trainable parameters are new tensors and whose frozen parameters and
    buffers are `model`'s own (the submodules are new objects, so train/eval modes are separate)."""
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}
    shared.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo=shared)


class TrainableEMA(nn.Module):
    """EMA of `model`'s trainable parameters (which ones train is read when the EMA is made).

    `module`: the averaged denoiser (frozen parameters and buffers shared with `model`);
    `n_averaged`: updates taken; `update_parameters(model)` after each optimizer step.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy_trainable(model)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))
        self.update_fn = ema_with_warmup(decay)
        self._averaged = [name for name, p in model.named_parameters() if p.requires_grad]
        for name in self._averaged:
            self.module.get_parameter(name).requires_grad_(False)

    def averaged_names(self) -> list[str]:
        """The parameters this EMA averages (the others are the live module's)."""
        return list(self._averaged)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """One EMA step towards `model`'s current trainable parameters (the first update copies them)."""
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        first = int(self.n_averaged) == 0
        for name in self._averaged:
            averaged = self.module.get_parameter(name).detach()
            current = model.get_parameter(name).detach().to(averaged.device)
            if first:
                averaged.copy_(current)
            targets, sources = groups.setdefault((averaged.device, averaged.dtype), ([], []))
            targets.append(averaged)
            sources.append(current)
        if not first:
            for targets, sources in groups.values():
                self.update_fn(targets, sources, self.n_averaged.to(targets[0].device))
        self.n_averaged += 1
