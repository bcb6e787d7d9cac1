"""A file cache for stages trained on public data: made once, reused by every run that asks with the same key.

Keys come from `dp_diffusion.data.public.public_cache_key` (public config only, never private config), so
the runs of a sweep over epsilon share one pretraining.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["architecture_signature", "cached_stage", "loss_signature"]

log = logging.getLogger(__name__)


def cached_stage(path: Path | None, what: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`make()`'s state dict, or the one cached at `path` (written atomically when made; `path` None: no cache)."""
    if path is not None and path.exists():
        log.info("%s loaded from the cache %s; not trained again", what, path)
        return torch.load(path, map_location="cpu", weights_only=True)
    state = make()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One temporary name per process: the jobs of a parallel sweep (or DDP ranks) that pretrain the
        # same stage each write their own file, and the last rename wins with a complete one.
        partial = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.partial")
        torch.save(state, partial)
        partial.replace(path)  # atomic: an interrupted write never leaves a cache entry
        log.info("%s cached in %s", what, path)
    return state


def architecture_signature(module: nn.Module) -> dict[str, Any]:
    """What identifies a network's architecture for a cache key: its layers (repr), its parameter and buffer
    shapes, and the plain settings each submodule keeps (e.g. a residual block's `skip_rescale`)."""
    settings = {}
    for name, sub in module.named_modules():
        plain = {k: v for k, v in vars(sub).items()
                 if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str))}
        if plain:
            settings[name or "."] = plain
    return {"class": type(module).__name__, "layers": repr(module),
            "shapes": {k: list(v.shape) for k, v in module.state_dict().items()}, "settings": settings}


def loss_signature(loss: Any) -> dict[str, Any]:
    """What identifies a diffusion loss for a cache key: its class and its plain settings."""
    return {"class": type(loss).__name__,
            **{k: v for k, v in vars(loss).items() if isinstance(v, (bool, int, float, str))}}
