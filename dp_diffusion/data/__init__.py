"""Data sets: a static registry (no I/O) and Lightning datamodules.

``ImageDataModule`` and ``build_datamodule`` are imported lazily so that config
validation through :func:`dataset_info` does not pay for importing lightning and
torchvision.
"""

import importlib
from typing import Any

from dp_diffusion.data.registry import (
    DatasetInfo,
    DatasetNotFoundError,
    UnknownDatasetError,
    available_datasets,
    dataset_info,
)

__all__ = [
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageDataModule",
    "UnknownDatasetError",
    "available_datasets",
    "build_datamodule",
    "dataset_info",
]


def __getattr__(name: str) -> Any:
    if name in ("ImageDataModule", "build_datamodule"):
        return getattr(importlib.import_module("dp_diffusion.data.datamodule"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
