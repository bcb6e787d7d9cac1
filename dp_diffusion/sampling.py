"""Drawing labelled samples from a trained denoiser and writing them out."""

from __future__ import annotations

import inspect
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.utils import save_image

from dp_diffusion.config import ConfigError
from dp_diffusion.data.registry import DatasetInfo
from dp_diffusion.diffusion.samplers import generate, get_sampler


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def balanced_labels(num_samples: int, num_classes: int) -> Tensor | None:
    return torch.arange(num_samples) % num_classes if num_classes > 0 else None


def draw_samples(
    denoiser: torch.nn.Module,
    num_samples: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    sample_cfg: Any,
    seed: int = 0,
    disable_progress: bool = False,
    *,
    sigma_range: tuple[float, float],
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`num_samples` images in [-1, 1] (class-balanced labels if conditional) from `denoiser`, with the
    sampler and knobs of `sample_cfg` over the noise levels `sigma_range` (the loss's
    `sampling_sigma_range()`). `device`: where to sample; None: `sample_cfg.device`.

    The building block of a method's `generate()`; `sample`, `evaluate` and `train` call that hook."""
    device = resolve_device(sample_cfg.device if device is None else str(device))
    denoiser = denoiser.to(device).eval()
    accepted = inspect.signature(get_sampler(sample_cfg.sampler)).parameters
    knobs = {k: v for k, v in dict(sample_cfg.knobs or {}).items() if k in accepted}
    if num_classes > 0:
        knobs.update(guidance_scale=float(sample_cfg.guidance_scale), num_classes=num_classes)
    return generate(
        denoiser,
        num_samples,
        tuple(image_shape),
        sample_cfg.batch_size,
        sampler=sample_cfg.sampler,
        num_steps=sample_cfg.num_steps,
        class_labels=balanced_labels(num_samples, num_classes),
        device=device,
        seed=seed,
        sigma_min=sigma_range[0],
        sigma_max=sigma_range[1],
        disable=disable_progress,
        **knobs,
    )


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def save_samples(images: Tensor, labels: Tensor | None, out_dir: str | Path, grid_size: int = 100) -> dict[str, Path]:
    """Write `samples.npz` (images uint8 NHWC, labels) and a PNG grid of the first images."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "samples.npz"
    label_array = labels.cpu().numpy() if labels is not None else np.zeros(len(images), dtype=np.int64)
    np.savez_compressed(npz, images=to_uint8(images), labels=label_array)
    grid = out / "samples_grid.png"
    shown = images[:grid_size].float().cpu()
    save_image((shown + 1) / 2, grid, nrow=max(1, int(np.ceil(np.sqrt(len(shown))))), padding=1)
    return {"npz": npz, "grid": grid}


SAMPLES_FORMAT = "an .npz written by train/sample, with images (uint8, N x H x W x C) and labels (integers, N)"


def load_samples(path: str | Path, data: DatasetInfo | None = None) -> tuple[Tensor, Tensor]:
    """Inverse of `save_samples` for the npz: images (N, C, H, W) in [-1, 1], labels.

    A file that is not such an npz, or (given `data`) whose images are not of the data set's shape or
    whose labels are not among its classes, is a ConfigError naming the file and what was expected.
    """
    images, labels = _read_npz(Path(path))

    def refuse(problem: str) -> ConfigError:
        return ConfigError(f"samples={str(path)!r} {problem}; expected {SAMPLES_FORMAT}")

    if images.dtype != np.uint8 or images.ndim != 4:
        raise refuse(f"has images of dtype {images.dtype} and shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise refuse(f"has labels of dtype {labels.dtype} and shape {labels.shape} for {len(images)} images")
    if len(images) < 2:
        raise refuse(f"has {len(images)} image(s); evaluation needs at least 2")
    if data is not None:
        c, h, w = data.image_shape
        if images.shape[1:] != (h, w, c):
            raise ConfigError(f"samples={str(path)!r} holds images of {images.shape[1:]} (H, W, C) but "
                              f"data={data.name} has {(h, w, c)}: evaluate them with the data set they were drawn for")
        if data.num_classes and (labels.min() < 0 or labels.max() >= data.num_classes):
            raise ConfigError(f"samples={str(path)!r} has labels {labels.min()}..{labels.max()} but data={data.name} "
                              f"has classes 0..{data.num_classes - 1}")
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1, torch.from_numpy(labels).long()


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The `images` and `labels` arrays of an npz; anything else is a ConfigError naming the file."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"samples={str(path)!r} does not exist; expected {SAMPLES_FORMAT}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # text, pickles, empty or truncated files
        raise ConfigError(f"samples={str(path)!r} is not a NumPy .npz archive; expected {SAMPLES_FORMAT}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ConfigError(f"samples={str(path)!r} is a single .npy array, not an .npz archive; "
                          f"expected {SAMPLES_FORMAT}")
    with data:
        missing = [key for key in ("images", "labels") if key not in data.files]
        if missing:
            raise ConfigError(f"samples={str(path)!r} holds arrays {data.files} but lacks {missing}; "
                              f"expected {SAMPLES_FORMAT}")
        try:
            return data["images"], data["labels"]
        except (OSError, ValueError, zipfile.BadZipFile):  # object arrays (pickles) or a damaged member
            raise ConfigError(f"samples={str(path)!r} has unreadable images or labels (pickled or damaged); "
                              f"expected {SAMPLES_FORMAT}") from None
