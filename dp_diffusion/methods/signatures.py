"""What identifies a network or a loss in a public-stage cache key (`data.public.public_cache_key`).

Two stages trained from the same public set, the same architecture, the same loss and the same settings
are the same stage; anything that changes the trained weights must change the signature. Nothing here
reads data: a signature is built from an untrained module and a loss object only.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["architecture_signature", "loss_signature"]


def _plain_settings(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(obj).items()
            if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str))}


def architecture_signature(module: nn.Module) -> dict[str, Any]:
    """A network's architecture: its layers (repr), its parameter and buffer shapes, and the plain settings each
    submodule keeps (e.g. a residual block's `skip_rescale`, which neither the repr nor the shapes show)."""
    settings = {name or ".": plain for name, sub in module.named_modules() if (plain := _plain_settings(sub))}
    return {"class": type(module).__name__, "layers": repr(module),
            "shapes": {k: list(v.shape) for k, v in module.state_dict().items()}, "settings": settings}


def loss_signature(loss: Any) -> dict[str, Any]:
    """A diffusion loss: its class and its plain settings (sigma distribution, sigma_data, label dropout, ...)."""
    return {"class": type(loss).__name__, **_plain_settings(loss)}
