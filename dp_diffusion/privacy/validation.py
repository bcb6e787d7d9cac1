"""Refuses models whose layers mix examples within a batch (BatchNorm and the like)."""

from __future__ import annotations

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
