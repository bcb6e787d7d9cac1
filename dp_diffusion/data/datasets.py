"""Torch datasets returning ``(image, label)``: float32 (C, H, W) in [-1, 1], int64 label."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

CELEBA_CROP = 140  # side of the center crop taken from the 178x218 aligned faces before resizing


def to_signed_unit(images: torch.Tensor, max_value: int = 255) -> torch.Tensor:
    """Integer pixels in [0, max_value] as float32 in [-1, 1] (0 -> -1, max_value -> 1 exactly)."""
    return images.to(torch.float32) / max_value * 2 - 1


class InMemoryImages(Dataset):
    """Integer images held in memory as uint8, scaled to [-1, 1] on access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_value: int = 255) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.max_value = max_value

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_signed_unit(self.images[index], self.max_value), self.labels[index]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as float32 (N, C, H, W) in [-1, 1] and labels as int64 (N,)."""
        return to_signed_unit(self.images, self.max_value), self.labels.clone()


def preprocess_celeba(image: Image.Image, size: int) -> torch.Tensor:
    """CelebA face as uint8 (3, size, size): center crop 140x140, then resize."""
    image = TF.center_crop(image.convert("RGB"), [CELEBA_CROP, CELEBA_CROP])
    image = TF.resize(image, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.pil_to_tensor(image)


class CelebAImages(Dataset):
    """CelebA JPEGs decoded and preprocessed on access (the set is too big to hold as floats); label 0."""

    def __init__(self, image_dir: str | Path, filenames: Sequence[str], size: int) -> None:
        self.image_dir = Path(image_dir)
        self.filenames = list(filenames)
        self.size = size

    def __len__(self) -> int:
        return len(self.filenames)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.image_dir / self.filenames[index]) as image:
            pixels = preprocess_celeba(image, self.size)
        return to_signed_unit(pixels), torch.zeros((), dtype=torch.int64)


def fixed_stratified_split(labels: np.ndarray, test_every: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices: within each class, in file order, every ``test_every``-th example is test.

    Depends on nothing but the labels, so the split is the same for every seed
    and every numpy version.
    """
    labels = np.asarray(labels)
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank_in_class[members] = np.arange(len(members))
    is_test = rank_in_class % test_every == test_every - 1
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)
