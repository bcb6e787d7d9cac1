"""Data registry and datamodules. torchvision-backed sets are tested on tiny files written here; nothing downloads."""

from __future__ import annotations

import inspect
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
import torch
from omegaconf import OmegaConf
from PIL import Image

from dp_diffusion.data import (
    DatasetInfo,
    DatasetNotFoundError,
    ImageDataModule,
    UnknownDatasetError,
    available_datasets,
    build_datamodule,
    dataset_info,
)
from dp_diffusion.data.datasets import fixed_stratified_split, preprocess_celeba
from dp_diffusion.data.sources import SOURCES, fetch_files

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "data"
TORCHVISION_BACKED = ["mnist", "fashion_mnist", "emnist", "cifar10", "svhn", "celeba32", "celeba64"]


# --- registry and configs ---------------------------------------------------


def test_registry_covers_every_source_and_config() -> None:
    names = available_datasets()
    assert set(names) == set(SOURCES)
    assert set(names) == {p.stem for p in CONF_DIR.glob("*.yaml")}
    for name in names:
        info = dataset_info(name)
        assert isinstance(info, DatasetInfo) and info.name == name
        assert info.num_train > 0 and info.num_test > 0 and len(info.image_shape) == 3


def test_dataset_info_values() -> None:
    assert dataset_info("mnist5k") == DatasetInfo("mnist5k", 4000, 1000, (1, 28, 28), 10)
    assert dataset_info("emnist").num_classes == 26
    assert dataset_info("celeba64").image_shape == (3, 64, 64)
    assert not dataset_info("celeba32").conditional and dataset_info("cifar10").conditional


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(UnknownDatasetError) as excinfo:
        dataset_info("cifar100")
    assert isinstance(excinfo.value, ValueError)
    message = str(excinfo.value)
    assert "cifar100" in message
    assert all(name in message for name in available_datasets())
    with pytest.raises(UnknownDatasetError):
        build_datamodule("imagenet")


def test_configs_are_build_datamodule_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DP_DIFFUSION_DATA", str(tmp_path))
    allowed = set(inspect.signature(build_datamodule).parameters) - {"batch_size", "seed"}
    for path in sorted(CONF_DIR.glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        assert set(cfg) == allowed, path.name
        assert cfg["name"] == path.stem and cfg["download"] is False and cfg["root"] == str(tmp_path)
        dm = build_datamodule(**cfg, batch_size=8, seed=0)  # builds without touching the disk
        assert dm.root == tmp_path.resolve()


def test_bad_loader_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        build_datamodule("digits", batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        build_datamodule("digits", num_workers=-1)


def test_bad_settings_are_one_line_config_errors() -> None:
    from dp_diffusion.config import ConfigError

    with pytest.raises(ConfigError, match=r"^data.num_workers must be an integer >= 0, got -1$"):
        build_datamodule("digits", num_workers=-1)
    with pytest.raises(ConfigError, match=r"^data.download must be true or false, got 'yes'$"):
        build_datamodule("digits", download="yes")
    with pytest.raises(ConfigError, match="data.name must be one of"):  # UnknownDatasetError is a ConfigError
        build_datamodule("imagenet")


def test_build_datamodule_lives_in_datamodule_and_registry_stays_free_of_lightning() -> None:
    from dp_diffusion.data import datamodule, registry

    assert build_datamodule is datamodule.build_datamodule
    assert not hasattr(registry, "build_datamodule")  # the registry holds facts only (no Lightning import)


# --- embedded sets: mnist5k and digits ----------------------------------------


@pytest.fixture(scope="module", params=["mnist5k", "digits"])
def embedded(request: pytest.FixtureRequest) -> ImageDataModule:
    dm = build_datamodule(request.param, batch_size=64)
    dm.prepare_data()  # nothing to download, nothing missing
    dm.setup()
    return dm


def test_embedded_shapes_range_and_sizes(embedded: ImageDataModule) -> None:
    info = embedded.info
    assert len(embedded.train_set) == info.num_train and len(embedded.test_set) == info.num_test
    image, label = embedded.train_set[0]
    assert image.dtype == torch.float32 and tuple(image.shape) == info.image_shape
    assert label.dtype == torch.int64
    for images, labels in (embedded.train_tensors(), embedded.test_tensors()):
        assert images.dtype == torch.float32 and tuple(images.shape[1:]) == info.image_shape
        assert labels.dtype == torch.int64 and len(labels) == len(images)
        assert images.min() == -1.0 and images.max() == 1.0
        assert set(labels.tolist()) == set(range(info.num_classes))


def test_embedded_split_is_stratified(embedded: ImageDataModule) -> None:
    train = np.bincount(embedded.train_tensors()[1].numpy())
    test = np.bincount(embedded.test_tensors()[1].numpy())
    total = train + test
    assert np.all(test == total // 5)  # every fifth example of each class
    if embedded.info.name == "mnist5k":
        assert np.all(train == 400) and np.all(test == 100)


def test_embedded_train_and_test_are_disjoint(embedded: ImageDataModule) -> None:
    def as_bytes(images: torch.Tensor) -> set[bytes]:
        return {row.tobytes() for row in images.flatten(1).numpy()}

    train = as_bytes(embedded.train_tensors()[0])
    test = as_bytes(embedded.test_tensors()[0])
    assert len(train) == embedded.info.num_train and len(test) == embedded.info.num_test
    assert not train & test


def test_embedded_split_ignores_seed(embedded: ImageDataModule) -> None:
    other = build_datamodule(embedded.info.name, seed=123)
    mine = embedded.train_tensors() + embedded.test_tensors()
    theirs = other.train_tensors() + other.test_tensors()
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


def test_train_loader_order_depends_only_on_seed(embedded: ImageDataModule) -> None:
    name = embedded.info.name

    def first_labels(seed: int) -> torch.Tensor:
        return next(iter(build_datamodule(name, batch_size=64, seed=seed).train_dataloader()))[1]

    assert torch.equal(first_labels(0), first_labels(0))
    assert not torch.equal(first_labels(0), first_labels(1))


def test_loaders_cover_splits_without_dropping(embedded: ImageDataModule) -> None:
    sizes = [len(labels) for _, labels in embedded.train_dataloader()]
    assert sum(sizes) == embedded.info.num_train and max(sizes) == 64
    images, labels = next(iter(embedded.test_dataloader()))
    assert images.shape == (64, *embedded.info.image_shape) and labels.dtype == torch.int64
    assert torch.equal(labels, embedded.test_tensors()[1][:64])  # test loader keeps file order


def test_fixed_stratified_split_is_interleaved() -> None:
    labels = np.array([0, 1] * 10)
    train, test = fixed_stratified_split(labels)
    assert test.tolist() == [8, 9, 18, 19] and len(train) == 16


# --- torchvision-backed sets on tiny files ----------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST idx file: magic 0x0000 08 <ndim> (uint8), big-endian dims, raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def random_images(rng: np.random.Generator, n: int, *shape: int) -> np.ndarray:
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    images.reshape(n, -1)[:, 0] = 0  # every image spans the full range
    images.reshape(n, -1)[:, 1] = 255
    return images


def load_with_warning(dm: ImageDataModule) -> None:
    """Tiny files are not the official sizes: setup warns about it."""
    with pytest.warns(UserWarning, match="official split"):
        dm.setup()


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_format(tmp_path: Path, name: str, folder: str) -> None:
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    train_images, test_images = random_images(rng, 12, 28, 28), random_images(rng, 5, 28, 28)
    write_idx(raw / "train-images-idx3-ubyte", train_images)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(12) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte", test_images)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(5))

    dm = build_datamodule(name, root=str(tmp_path), batch_size=4)
    dm.prepare_data()
    load_with_warning(dm)
    images, labels = dm.train_tensors()
    assert images.shape == (12, 1, 28, 28) and labels.tolist() == (np.arange(12) % 10).tolist()
    assert torch.equal(images[:, 0], torch.from_numpy(train_images).float() / 255 * 2 - 1)
    assert dm.test_tensors()[1].tolist() == [0, 1, 2, 3, 4]
    batch_images, batch_labels = next(iter(dm.train_dataloader()))
    assert batch_images.shape == (4, 1, 28, 28) and batch_labels.dtype == torch.int64


def test_emnist_letters_orientation_and_labels(tmp_path: Path) -> None:
    upright = np.zeros((3, 28, 28), dtype=np.uint8)
    upright[:, 0, 5] = 255  # a mark in the top row, left of centre
    raw = tmp_path / "EMNIST" / "raw"
    # The EMNIST files store every image transposed.
    write_idx(raw / "emnist-letters-train-images-idx3-ubyte", upright.transpose(0, 2, 1))
    write_idx(raw / "emnist-letters-train-labels-idx1-ubyte", np.array([1, 2, 26]))
    write_idx(raw / "emnist-letters-test-images-idx3-ubyte", upright[:1].transpose(0, 2, 1))
    write_idx(raw / "emnist-letters-test-labels-idx1-ubyte", np.array([26]))

    dm = build_datamodule("emnist", root=tmp_path)
    load_with_warning(dm)
    images, labels = dm.train_tensors()
    assert torch.equal(images[:, 0], torch.from_numpy(upright).float() / 255 * 2 - 1)
    assert labels.tolist() == [0, 1, 25]
    assert dm.test_tensors()[1].tolist() == [25]


def test_cifar10_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 3}
    for k, (filename, n) in enumerate(batches.items()):
        data = random_images(rng, n, 3 * 32 * 32)
        data[0, :1024], data[0, 1024:] = 255, 0  # first image: pure red (rows are R, G, B planes)
        entry = {"batch_label": filename, "labels": [k] * n, "data": data}
        (folder / filename).write_bytes(pickle.dumps(entry))

    dm = build_datamodule("cifar10", root=tmp_path)
    load_with_warning(dm)
    images, labels = dm.train_tensors()
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert torch.all(images[0, 0] == 1) and torch.all(images[0, 1:] == -1)
    assert images.min() == -1 and images.max() == 1
    assert dm.test_tensors()[1].tolist() == [5, 5, 5]


def test_svhn_mat_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for filename, n in [("train_32x32.mat", 4), ("test_32x32.mat", 2)]:
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        x[1, 2, 0, 0] = 255  # image 0, red channel, row 1, column 2
        x[1, 2, 1:, 0] = 0
        y = np.array([[10], [1], [9], [3]][:n], dtype=np.uint8)  # SVHN labels digit 0 as 10
        scipy.io.savemat(tmp_path / filename, {"X": x, "y": y})

    dm = build_datamodule("svhn", root=tmp_path)
    load_with_warning(dm)
    images, labels = dm.train_tensors()
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 1, 9, 3]
    assert images[0, :, 1, 2].tolist() == [1.0, -1.0, -1.0]
    assert dm.test_tensors()[1].tolist() == [0, 1]


def write_celeba(root: Path, partition: list[int], skip_image: int | None = None) -> None:
    folder = root / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, code in enumerate(partition, start=1):
        filename = f"{i:06d}.jpg"
        lines.append(f"{filename} {code}\n")
        if i != skip_image:
            pixels = rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / filename)
    (root / "celeba" / "list_eval_partition.txt").write_text("".join(lines))


@pytest.mark.parametrize("name, size", [("celeba32", 32), ("celeba64", 64)])
def test_celeba_official_partition(tmp_path: Path, name: str, size: int) -> None:
    write_celeba(tmp_path, partition=[0, 0, 0, 1, 2, 2])
    dm = build_datamodule(name, root=tmp_path, batch_size=2)
    dm.prepare_data()
    load_with_warning(dm)
    assert len(dm.train_set) == 3 and len(dm.test_set) == 2  # the "valid" image is in neither
    image, label = dm.train_set[0]
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert -1 <= image.min() and image.max() <= 1
    assert label.dtype == torch.int64 and label.item() == 0
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (2, 3, size, size) and labels.tolist() == [0, 0]
    with pytest.raises(ValueError, match="train_dataloader"):
        dm.train_tensors()  # CelebA is never materialized as one float tensor


def test_celeba_preprocessing_takes_the_central_140_pixels() -> None:
    pixels = np.zeros((218, 178, 3), dtype=np.uint8)
    pixels[39:179, 19:159] = 255  # exactly the central 140x140 square
    for size in (32, 64):
        out = preprocess_celeba(Image.fromarray(pixels), size)
        assert out.dtype == torch.uint8 and out.shape == (3, size, size)
        assert torch.all(out == 255)


def test_celeba_reports_missing_images(tmp_path: Path) -> None:
    write_celeba(tmp_path, partition=[0, 0, 2], skip_image=2)
    with pytest.raises(DatasetNotFoundError, match="000002.jpg"):
        build_datamodule("celeba32", root=tmp_path).prepare_data()


# --- missing files and failed downloads ---------------------------------------------


@pytest.mark.parametrize("name", TORCHVISION_BACKED)
def test_missing_files_name_the_directory(tmp_path: Path, name: str) -> None:
    dm = build_datamodule(name, root=tmp_path / "nothing_here", download=False)
    expected_dir = SOURCES[name].directory((tmp_path / "nothing_here").resolve())
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError) as excinfo:
            step()
        err = excinfo.value
        assert isinstance(err, FileNotFoundError)
        message = str(err)
        assert "\n" not in message
        assert repr(name) in message and str(expected_dir) in message and "data.download=true" in message
        assert err.name == name and err.path == str(expected_dir) and Path(err.path).is_absolute()


def test_missing_split_files_are_listed(tmp_path: Path) -> None:
    write_idx(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(DatasetNotFoundError, match="t10k-images-idx3-ubyte") as excinfo:
        build_datamodule("mnist", root=tmp_path).setup("fit")
    assert "raw/train-images-idx3-ubyte," not in str(excinfo.value)


def write_mnist_raw(root: Path, files: tuple[str, ...] = SOURCES["mnist"].required) -> np.ndarray:
    """Tiny MNIST idx files under root/MNIST/raw, as torchvision's download leaves them; returns the train images."""
    train_images = random_images(np.random.default_rng(0), 6, 28, 28)
    contents = {
        "raw/train-images-idx3-ubyte": train_images, "raw/train-labels-idx1-ubyte": np.arange(6),
        "raw/t10k-images-idx3-ubyte": train_images[:2], "raw/t10k-labels-idx1-ubyte": np.arange(2),
    }
    for name in files:
        write_idx(root / "MNIST" / name, contents[name])
    return train_images


# The fetch step is given the test's own file writer in place of torchvision's
# download: the data is made here, nothing asks for a download; `no_network` guards the rest.
def test_fetched_files_load(tmp_path: Path, no_network: None) -> None:
    made = {}
    fetch_files("mnist", tmp_path, lambda root: made.setdefault("train", write_mnist_raw(root)))
    dm = build_datamodule("mnist", root=tmp_path)
    dm.prepare_data()
    load_with_warning(dm)
    images, labels = dm.train_tensors()
    assert torch.equal(images[:, 0], torch.from_numpy(made["train"]).float() / 255 * 2 - 1)
    assert labels.tolist() == list(range(6))


@pytest.mark.parametrize("error", [URLError("no route to host"), RuntimeError("Error downloading train-images")])
def test_failed_fetch_becomes_dataset_not_found(tmp_path: Path, error: Exception, no_network: None) -> None:
    def interrupted(root: Path) -> None:  # the train images arrive, then the connection fails
        write_mnist_raw(root, files=("raw/train-images-idx3-ubyte",))
        raise error

    with pytest.raises(DatasetNotFoundError, match="download failed") as excinfo:
        fetch_files("mnist", tmp_path, interrupted)
    assert excinfo.value.__cause__ is error
    assert str(tmp_path.resolve() / "MNIST") in str(excinfo.value)


def test_incomplete_fetch_lists_missing_files(tmp_path: Path, no_network: None) -> None:
    partial = ("raw/train-images-idx3-ubyte", "raw/train-labels-idx1-ubyte")
    with pytest.raises(DatasetNotFoundError, match="the download did not produce them") as excinfo:
        fetch_files("mnist", tmp_path, lambda root: write_mnist_raw(root, files=partial))
    assert "raw/t10k-images-idx3-ubyte" in str(excinfo.value) and "raw/train-images" not in str(excinfo.value)


def test_fetch_skipped_when_files_exist(tmp_path: Path, no_network: None) -> None:
    def fail(root: Path) -> None:
        raise AssertionError("must not fetch")

    for filename in SOURCES["svhn"].required:
        scipy.io.savemat(tmp_path / filename, {"X": np.zeros((32, 32, 3, 1), np.uint8), "y": np.ones((1, 1), np.uint8)})
    fetch_files("svhn", tmp_path, fail)
    build_datamodule("svhn", root=tmp_path).prepare_data()
