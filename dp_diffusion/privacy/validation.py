"""Refuses models whose layers mix examples within a batch (BatchNorm and the like)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from opacus.validators import ModuleValidator
from torch import nn

_BATCH_MIXING = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


class PrivacyError(ValueError):
    """A model or setting that would break the differential-privacy guarantee."""


def check_no_batch_mixing(module: nn.Module) -> None:
    """Raise PrivacyError naming every layer that mixes examples in a batch."""
    offenders = [name or type(module).__name__ for name, m in module.named_modules() if isinstance(m, _BATCH_MIXING)]
    if offenders:
        raise PrivacyError(
            "layers that mix examples within a batch break per-example clipping: "
            f"{', '.join(offenders)} (use GroupNorm instead of BatchNorm)"
        )
    errors = [e for e in ModuleValidator.validate(module, strict=False) if "BatchNorm" in str(e)]
    if errors:
        raise PrivacyError(f"model is not DP-compatible: {errors[0]}")


def check_buffers_unchanged(module: nn.Module, forward: Callable[[], Any]) -> Any:
    """Run `forward()` (a forward of `module`) in training mode; raise PrivacyError naming every layer whose
    buffers it changed, and return its result otherwise. Buffers and training flags are restored either way.

    A buffer updated in a training forward (running statistics: InstanceNorm or BatchNorm with
    `track_running_stats`, any custom cache of the batch) is a statistic of private data computed outside
    DP, and it is released with the weights (and copied into the EMA). Checked by running the model, not by
    a list of layer types, so that any layer that does this is caught.
    """
    named = dict(module.named_buffers())
    saved = {name: buf.detach().clone() for name, buf in named.items()}
    modes = {m: m.training for m in module.modules()}
    module.train()
    try:
        result = forward()
    finally:
        for m, training in modes.items():
            m.training = training
        after = dict(module.named_buffers())
        changed = [name for name, buf in saved.items()
                   if after.get(name) is None or after[name].shape != buf.shape or not torch.equal(after[name], buf)]
        changed += [name for name in after if name not in saved]
        with torch.no_grad():
            for name, buf in saved.items():
                if named[name].shape == buf.shape:
                    named[name].copy_(buf)
                owner_name, _, attr = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                if getattr(owner, attr, None) is not named[name]:  # reassigned, not updated in place
                    setattr(owner, attr, named[name])
    if changed:
        layers: dict[str, list[str]] = {}
        for name in changed:
            owner_name, _, attr = name.rpartition(".")
            layers.setdefault(owner_name, []).append(attr)
        described = "; ".join(f"{owner or type(module).__name__} ({type(module.get_submodule(owner)).__name__}: "
                              f"{', '.join(attrs)})" for owner, attrs in layers.items())
        raise PrivacyError(
            "layers update buffers from the batch in a training forward (statistics of private data outside DP, "
            f"released with the model): {described}; use track_running_stats=False or GroupNorm"
        )
    return result
