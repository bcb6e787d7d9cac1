"""Data sets: a static registry (no I/O) and Lightning datamodules.

``ImageDataModule`` is imported lazily so that config validation through
:func:`dataset_info` does not pay for importing lightning and torchvision.
"""

from typing import Any

from dp_diffusion.data.registry import (
    DatasetInfo,
    DatasetNotFoundError,
    UnknownDatasetError,
    available_datasets,
    build_datamodule,
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
    if name == "ImageDataModule":
        from dp_diffusion.data.datamodule import ImageDataModule

        return ImageDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
