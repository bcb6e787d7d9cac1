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

__all__ = ["cached_stage"]

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
