"""Lightning datamodule over any registered data set."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from dp_diffusion.config import BOOL, integer
from dp_diffusion.data.datasets import InMemoryImages
from dp_diffusion.data.registry import DatasetInfo, dataset_info
from dp_diffusion.data.sources import SOURCES, load_split, prepare_files


class ImageDataModule(L.LightningDataModule):
    """Train and test splits of one registered data set, as ``(image, label)`` pairs.

    Images are float32 (C, H, W) in [-1, 1], labels int64. The splits are
    fixed; ``seed`` only drives the shuffling order of the train loader.
    The splits are loaded by ``setup()`` or on first access to
    ``train_set`` / ``test_set``.
    """

    def __init__(
        self,
        name: str,
        root: str | os.PathLike[str] = "data",
        download: bool = False,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.info: DatasetInfo = dataset_info(name)
        integer(1).check("batch_size", batch_size)
        integer(0).check("data.num_workers", num_workers)
        BOOL.check("data.download", download)
        self.root = Path(root).expanduser().resolve()
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._train_set: Dataset | None = None
        self._test_set: Dataset | None = None

    def prepare_data(self) -> None:
        """Download the files when ``download`` is set; raise DatasetNotFoundError if they are missing."""
        prepare_files(self.info.name, self.root, self.download)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits ``stage`` needs ("fit": train, "test": test, None: both)."""
        if stage in (None, "fit"):
            _ = self.train_set
        if stage in (None, "test"):
            _ = self.test_set

    @property
    def train_set(self) -> Dataset:
        """The training split."""
        if self._train_set is None:
            self._train_set = self._load(train=True)
        return self._train_set

    @property
    def test_set(self) -> Dataset:
        """The test split."""
        if self._test_set is None:
            self._test_set = self._load(train=False)
        return self._test_set

    def _load(self, train: bool) -> Dataset:
        split = load_split(self.info.name, self.root, train)
        expected = self.info.num_train if train else self.info.num_test
        if len(split) != expected:
            warnings.warn(
                f"data set {self.info.name!r}: loaded {len(split)} {'train' if train else 'test'} images from "
                f"{SOURCES[self.info.name].directory(self.root)}, the official split has {expected}; "
                "the files may be incomplete or not the official release",
                stacklevel=3,
            )
        return split

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the order depends only on ``seed``."""
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def test_dataloader(self) -> DataLoader:
        """Test batches in file order."""
        return DataLoader(
            self.test_set,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole training split: images float32 (N, C, H, W) in [-1, 1], labels int64 (N,)."""
        return self._tensors(self.train_set)

    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole test split: images float32 (N, C, H, W) in [-1, 1], labels int64 (N,)."""
        return self._tensors(self.test_set)

    def _tensors(self, split: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(split, InMemoryImages):
            raise ValueError(
                f"data set {self.info.name!r} is read lazily from disk and too large to hold as one float "
                "tensor; iterate over train_dataloader() / test_dataloader() instead"
            )
        return split.tensors()


def build_datamodule(
    name: str,
    root: str | os.PathLike[str] = "data",
    download: bool = False,
    batch_size: int = 256,
    num_workers: int = 0,
    seed: int = 0,
) -> ImageDataModule:
    """Datamodule for data set ``name`` (a ``data`` config block's keys) with files under ``root``.

    Nothing is read until ``prepare_data()`` / ``setup()`` (or the first
    access to ``train_set`` / ``test_set``).
    """
    return ImageDataModule(
        name, root=root, download=download, batch_size=batch_size, num_workers=num_workers, seed=seed
    )
