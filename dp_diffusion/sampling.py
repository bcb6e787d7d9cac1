"""Drawing labelled samples from a trained denoiser and writing them out."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.utils import save_image

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
) -> tuple[Tensor, Tensor | None]:
    """`num_samples` images in [-1, 1] (class-balanced labels if conditional)."""
    device = resolve_device(sample_cfg.device)
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


def load_samples(path: str | Path) -> tuple[Tensor, Tensor]:
    """Inverse of `save_samples` for the npz: images (N, C, H, W) in [-1, 1], labels."""
    data = np.load(path)
    pixels = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1, torch.from_numpy(data["labels"]).long()
