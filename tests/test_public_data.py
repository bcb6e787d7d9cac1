"""Public data sets (conf/public/, data/public.py): shapes, ranges, labels, refusals, cache key. Nothing downloads."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from dp_diffusion.config import ConfigError
from dp_diffusion.data import DatasetNotFoundError, dataset_info
from dp_diffusion.data.public import (
    LUMA,
    PublicImages,
    adapt_images,
    load_public,
    normalise_public,
    public_cache_key,
    resolve_public,
    validate_public,
)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
PUBLIC_GROUP = sorted(p.stem for p in (Path(CONF_DIR) / "public").glob("*.yaml"))
MNIST_SHAPE, CIFAR_SHAPE = dataset_info("mnist5k"), dataset_info("cifar10")


def compose_config(*overrides: str):
    # conf/config.yaml lists `public: none` in its defaults: `public=` picks another.
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def first(ds: PublicImages, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(ds[i] for i in range(n)))
    return torch.stack(images), torch.stack(labels)


def one_line_config_error(excinfo: pytest.ExceptionInfo) -> str:
    assert excinfo.type is ConfigError
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- the config group --------------------------------------------------------------


def test_group_has_the_public_sets() -> None:
    expected = {"auto", "none", "emnist", "svhn", "cifar10", "imagenet32", "imagenet64", "dead_leaves", "digits",
                "font_digits"}
    assert set(PUBLIC_GROUP) == expected


@pytest.mark.parametrize("name", PUBLIC_GROUP)
def test_every_group_file_composes_and_validates(name: str, tmp_path: Path) -> None:
    cfg = compose_config("data=mnist5k", f"public={name}", f"data.root={tmp_path}")
    resolve_public(cfg)  # auto: mnist5k's embedded public set
    spec = validate_public(cfg.public, dataset_info(cfg.data.name))
    assert spec["name"] == ("font_digits" if name == "auto" else name)
    if "root" in spec:  # file-backed public sets read from data.root
        assert spec["root"] == str(tmp_path)


# --- offline sets in the private shape --------------------------------------------


@pytest.mark.parametrize("private", ["mnist5k", "cifar10"])
def test_digits_in_the_private_shape(private: str) -> None:
    cfg = compose_config(f"data={private}", "public=digits")
    info = dataset_info(private)
    ds = load_public(cfg.public, info)
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.conditional  # split: all
    images, labels = first(ds, 40)
    assert images.shape == (40, *info.image_shape) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() <= 1 and images.max() > 0.5
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    # margin 4/28: a black border, the digit inside
    border = int(info.image_shape[1] * 0.143)  # at least this many pixels on every side
    assert torch.all(images[..., :border, :] == -1) and torch.all(images[..., :, -border:] == -1)
    assert images[..., border:-border, border:-border].amax(dim=(1, 2, 3)).min() > 0
    if info.image_shape[0] == 3:  # grey -> RGB repeats the grey plane
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])


@pytest.mark.parametrize("private", ["mnist5k", "cifar10"])
def test_dead_leaves_in_the_private_shape_unlabeled(private: str) -> None:
    info = dataset_info(private)
    ds = load_public({"name": "dead_leaves", "size": 5, "seed": 3}, info)
    images, labels = first(ds, 5)
    assert len(ds) == 5 and images.shape == (5, *info.image_shape)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.1
    assert ds.num_classes == 0 and not ds.conditional and labels.tolist() == [0] * 5
    assert labels.dtype == torch.int64
    again, _ = first(load_public({"name": "dead_leaves", "size": 5, "seed": 3}, info), 5)
    assert torch.equal(images, again)


def test_labels_false_makes_a_labeled_set_unlabeled() -> None:
    ds = load_public({"name": "digits", "labels": False, "max_images": 30}, MNIST_SHAPE)
    assert len(ds) == 30 and ds.num_classes == 0 and first(ds, 30)[1].tolist() == [0] * 30


def test_adaptation_rules() -> None:
    rgb = torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    grey = adapt_images(rgb, (1, 4, 4))
    luma01 = LUMA[0] * 1 + LUMA[1] * 0 + LUMA[2] * 0.75  # the same colour in [0, 1]
    assert grey.shape == (2, 1, 4, 4) and torch.allclose(grey, torch.tensor(luma01 * 2 - 1))
    framed = adapt_images(torch.ones(1, 1, 8, 8), (3, 10, 10), margin=0.2)
    assert framed.shape == (1, 3, 10, 10)
    assert torch.all(framed[..., 2:8, 2:8] == 1) and framed.sum() == 3 * (36 - 64)


# --- Downsampled ImageNet from npz batches -------------------------------------------


def write_imagenet(folder: Path, size: int, batches: dict[str, list[int]]) -> None:
    """Downsampled ImageNet npz files: data uint8 (N, 3*size*size) as R, G, B planes; labels 1..1000."""
    folder.mkdir(parents=True, exist_ok=True)
    for filename, labels in batches.items():
        data = np.zeros((len(labels), 3, size, size), dtype=np.uint8)
        data[:, 0] = 255  # pure red
        data[:, 2, 0, 0] = np.asarray(labels) % 256  # tag each image by its label in the blue plane
        np.savez(folder / filename, data=data.reshape(len(labels), -1), labels=np.asarray(labels), mean=np.zeros(3))


@pytest.fixture
def imagenet_root(tmp_path: Path) -> Path:
    # As the official zips extract: train and val in their own folders; batch 10 sorts after batch 2.
    write_imagenet(tmp_path / "Imagenet32" / "Imagenet32_train_npz", 32, {
        "train_data_batch_1.npz": [1, 2],
        "train_data_batch_10.npz": [1000],
        "train_data_batch_2.npz": [7, 8, 9],
    })
    write_imagenet(tmp_path / "Imagenet32" / "Imagenet32_val_npz", 32, {"val_data.npz": [5, 6]})
    return tmp_path


def test_imagenet32_loads_in_the_cifar_shape(imagenet_root: Path) -> None:
    cfg = compose_config("data=cifar10", "public=imagenet32", f"data.root={imagenet_root}")
    ds = load_public(cfg.public, CIFAR_SHAPE)
    images, labels = first(ds, len(ds))
    assert ds.num_classes == 1000 and labels.tolist() == [0, 1, 6, 7, 8, 999]  # batch order 1, 2, 10; 1-based
    assert images.shape == (6, 3, 32, 32)
    assert torch.all(images[:, 0] == 1) and torch.all(images[:, 1] == -1)
    blue_tag = ((labels + 1) % 256).float() / 255 * 2 - 1
    assert torch.allclose(images[:, 2, 0, 0], blue_tag)


def test_imagenet32_to_grey_28(imagenet_root: Path) -> None:
    ds = load_public({"name": "imagenet32", "root": str(imagenet_root), "split": "test"}, MNIST_SHAPE)
    images, labels = first(ds, 2)
    assert images.shape == (2, 1, 28, 28) and labels.tolist() == [4, 5]
    red_luma = LUMA[0] * 2 - 1  # pure red, mostly; the blue tag pixel blurs into one corner
    assert torch.allclose(images[0, 0, 10:, 10:], torch.tensor(red_luma))


def test_imagenet_split_all_and_max_images(imagenet_root: Path) -> None:
    spec = {"name": "imagenet32", "root": str(imagenet_root), "split": "all"}
    assert first(load_public(spec, CIFAR_SHAPE), 8)[1].tolist() == [0, 1, 6, 7, 8, 999, 4, 5]
    capped = load_public({**spec, "max_images": 4}, CIFAR_SHAPE)
    assert len(capped) == 4 and first(capped, 4)[1].tolist() == [0, 1, 6, 7]


def test_imagenet_wrong_resolution_and_missing_files(imagenet_root: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:  # 32x32 files where the 64x64 ones are expected
        load_public({"name": "imagenet64", "root": str(imagenet_root), "folder": "Imagenet32"}, CIFAR_SHAPE)
    assert "expected uint8 (N, 12288) for imagenet64" in one_line_config_error(excinfo)
    with pytest.raises(DatasetNotFoundError) as missing:
        load_public({"name": "imagenet64", "root": str(imagenet_root)}, CIFAR_SHAPE)
    assert str(imagenet_root / "Imagenet64") in str(missing.value)


# --- torchvision-backed sets through the registry's loaders, on tiny files ------------


def test_cifar10_public_through_the_registry(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for k, filename in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        data = np.zeros((2, 3 * 32 * 32), dtype=np.uint8)
        data[:, :1024] = 255  # pure red
        (folder / filename).write_bytes(pickle.dumps({"data": data, "labels": [k, k]}))
    cfg = compose_config("data=mnist5k", "public=cifar10", f"data.root={tmp_path}")
    with pytest.warns(UserWarning, match="official split"):
        ds = load_public(cfg.public, MNIST_SHAPE)
    images, labels = first(ds, len(ds))
    assert images.shape == (10, 1, 28, 28) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert torch.allclose(images, torch.tensor(LUMA[0] * 2 - 1)) and ds.num_classes == 10


def write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_emnist_letters_public_for_rgb_private(tmp_path: Path) -> None:
    raw = tmp_path / "EMNIST" / "raw"
    for split, labels in [("train", [1, 26, 3]), ("test", [2])]:
        write_idx(raw / f"emnist-letters-{split}-images-idx3-ubyte", np.full((len(labels), 28, 28), 255))
        write_idx(raw / f"emnist-letters-{split}-labels-idx1-ubyte", np.array(labels))
    with pytest.warns(UserWarning, match="official split"):
        ds = load_public({"name": "emnist", "root": str(tmp_path)}, CIFAR_SHAPE)
    images, labels = first(ds, 3)
    assert ds.num_classes == 26 and labels.tolist() == [0, 25, 2]
    assert images.shape == (3, 3, 32, 32) and torch.all(images == 1)


# --- refusals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "public, private, says",
    [
        ("digits", "digits", "public=digits is the private data set"),
        ("cifar10", "cifar10", "public=cifar10 is the private data set"),
        ("mnist", "mnist5k", "public=mnist shares images with the private data set 'mnist5k' (MNIST digits)"),
        ("mnist5k", "mnist", "public=mnist5k shares images with the private data set 'mnist' (MNIST digits)"),
        ("celeba64", "celeba32", "shares images with the private data set 'celeba32' (CelebA faces)"),
    ],
)
def test_public_overlapping_private_is_refused(public: str, private: str, says: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        validate_public({"name": public}, dataset_info(private))
    assert says in one_line_config_error(excinfo)


def test_refused_before_reading_and_through_hydra() -> None:
    cfg = compose_config("data=digits", "public=digits")
    with pytest.raises(ConfigError) as excinfo:
        load_public(cfg.public, dataset_info(cfg.data.name))
    assert "is the private data set" in one_line_config_error(excinfo)


def test_disjoint_pairs_are_allowed() -> None:
    for public, private in [("emnist", "mnist"), ("emnist", "mnist5k"), ("digits", "mnist5k"), ("svhn", "mnist"),
                            ("imagenet32", "cifar10"), ("imagenet64", "celeba64"), ("dead_leaves", "mnist5k")]:
        assert validate_public({"name": public}, dataset_info(private))["name"] == public


def test_none_validates_but_does_not_load() -> None:
    cfg = compose_config("public=none")
    assert validate_public(cfg.public, MNIST_SHAPE) == {"name": "none"}
    with pytest.raises(ConfigError) as excinfo:
        load_public(cfg.public, MNIST_SHAPE)
    assert "public=none" in one_line_config_error(excinfo)


@pytest.mark.parametrize(
    "cfg, says",
    [
        ({"name": "imagenet"}, "public.name must be one of ['none', "),
        ({"name": "digits", "colour": True}, "public: unknown keys ['colour'] for public set 'digits'"),
        ({"name": "dead_leaves", "labels": True}, "unknown keys ['labels']"),
        ({"name": "digits", "margin": 0.5}, "public.margin must be in [0, 0.5), got 0.5"),
        ({"name": "svhn", "split": "val"}, "public.split must be one of ['train', 'test', 'all'], got 'val'"),
        ({"name": "imagenet32", "max_images": 0}, "public.max_images must be null or an integer >= 1, got 0"),
    ],
)
def test_bad_public_config_is_one_line(cfg: dict, says: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        normalise_public(cfg)
    assert says in one_line_config_error(excinfo)


# --- cache key ---------------------------------------------------------------------

STAGE = {"autoencoder": {"channels": [32, 64], "downsample": 4}, "steps": 2000, "seed": 0}


def test_cache_key_is_stable() -> None:
    cfg = compose_config("public=digits").public
    key = public_cache_key(cfg, STAGE, image_shape=(1, 28, 28))
    assert len(key) == 16 and int(key, 16) >= 0
    reordered = {"seed": 0, "steps": 2000, "autoencoder": {"downsample": 4, "channels": [32, 64]}}
    assert public_cache_key(dict(cfg), reordered, image_shape=[1, 28, 28]) == key
    # Pinned: a key that drifts (json, hashing, defaults) would silently miss every cache.
    assert key == public_cache_key({"name": "digits", "split": "all", "margin": 0.143}, STAGE, image_shape=(1, 28, 28))
    assert key == "8948a61d153488db"


def test_cache_key_independent_of_private_config(tmp_path: Path) -> None:
    keys = {
        public_cache_key(compose_config(*overrides, "public=imagenet32").public, STAGE, image_shape=(3, 32, 32))
        for overrides in [
            ("data=cifar10", "privacy.epsilon=1"),
            ("data=celeba32", "privacy.epsilon=10", f"data.root={tmp_path}", "train.epochs=3", "seed=7"),
            ("data=svhn", "privacy=none", "data.download=true"),
        ]
    }
    assert len(keys) == 1  # public.root follows data.root, but where the files are is not what they hold


def test_cache_key_follows_public_config() -> None:
    base = public_cache_key({"name": "digits"}, STAGE, image_shape=(1, 28, 28))
    changed = [
        public_cache_key({"name": "digits", "split": "all"}, STAGE, image_shape=(1, 28, 28)),
        public_cache_key({"name": "dead_leaves"}, STAGE, image_shape=(1, 28, 28)),
        public_cache_key({"name": "digits"}, {**STAGE, "seed": 1}, image_shape=(1, 28, 28)),
        public_cache_key({"name": "digits"}, {**STAGE, "steps": 2001}, image_shape=(1, 28, 28)),
        public_cache_key({"name": "digits"}, STAGE, image_shape=(3, 32, 32)),
    ]
    assert len({base, *changed}) == 6


def test_cache_key_refuses_private_config() -> None:
    with pytest.raises(ValueError, match=r"private config \['privacy'\]"):
        public_cache_key({"name": "digits"}, {**STAGE, "privacy": {"epsilon": 1}})
