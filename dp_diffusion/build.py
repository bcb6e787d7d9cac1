"""Builds a method's LightningModule from a composed config (train and sample share it)."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dp_diffusion.config import ConfigError
from dp_diffusion.data.registry import DatasetInfo
from dp_diffusion.privacy import PrivacySpec, PrivateTrainingModule, plan_steps

# Where `dp-diffusion train` stores the resolved run config in each checkpoint.
CONFIG_KEY = "dp_diffusion_config"


def planned_steps(cfg: DictConfig, num_examples: int) -> int:
    if cfg.train.steps is not None:
        return int(cfg.train.steps)
    return plan_steps(num_examples, cfg.train.batch_size, cfg.train.epochs)


def build_method(cfg: DictConfig, info: DatasetInfo, num_examples: int | None = None) -> PrivateTrainingModule:
    """The method's module with its backbone and loss, sized for data set `info`."""
    channels, height, _ = info.image_shape
    num_classes = info.num_classes if cfg.method.conditional else 0
    try:
        backbone = instantiate(
            cfg.model, in_channels=channels, out_channels=channels, resolution=height, num_classes=num_classes
        )
        loss_overrides: dict[str, Any] = {"num_classes": num_classes}
        if num_classes == 0 and "label_dropout" in cfg.diffusion:
            loss_overrides["label_dropout"] = 0.0
        loss = instantiate(cfg.diffusion, **loss_overrides)
    except ValueError as err:
        raise ConfigError(f"model/method config for data set {info.name!r}: {err}") from None
    # Partial: objects (backbone, loss, spec) are passed directly, not through OmegaConf.
    method_cls = instantiate(cfg.method.module, _partial_=True)
    return method_cls(
        backbone=backbone,
        loss=loss,
        privacy=PrivacySpec.from_config(cfg.privacy),
        batch_size=cfg.train.batch_size,
        physical_batch_size=cfg.train.physical_batch_size,
        steps=planned_steps(cfg, num_examples or info.num_train),
        image_shape=tuple(info.image_shape),
        num_classes=num_classes,
        seed=cfg.seed,
        num_workers=cfg.train.num_workers,
    )


def config_to_dict(cfg: DictConfig) -> dict[str, Any]:
    """A plain, resolved copy of the config (stored in checkpoints and results)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
