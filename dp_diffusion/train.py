"""`dp-diffusion train`: validate, load data, train through the privacy core,
write the privacy report, sample, and evaluate."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from omegaconf import DictConfig

from dp_diffusion.build import build_method, config_to_dict
from dp_diffusion.config import validate_config, validate_privacy
from dp_diffusion.data.registry import build_datamodule, dataset_info
from dp_diffusion.privacy import summary, write_report
from dp_diffusion.sampling import draw_samples, save_samples

log = logging.getLogger(__name__)
CONFIG_KEY = "dp_diffusion_config"


class StoreConfig(Callback):
    """Puts the resolved run config into every checkpoint, so `sample` can rebuild the model."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config


def build_trainer(cfg: DictConfig, out: Path, max_steps: int, config: dict[str, Any]) -> L.Trainer:
    checkpoints = out / "checkpoints"
    callbacks = [
        StoreConfig(config),
        ModelCheckpoint(
            dirpath=checkpoints,
            filename="step{step}",
            auto_insert_metric_name=False,
            every_n_train_steps=cfg.train.checkpoint_every_n_steps,
            save_last=True,
            save_top_k=1,
        ),
        OnExceptionCheckpoint(dirpath=checkpoints, filename="interrupted"),
    ]
    return instantiate(
        cfg.trainer,
        max_steps=max_steps,
        max_epochs=-1,
        default_root_dir=str(out),
        logger=instantiate(cfg.logger),
        callbacks=callbacks,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Train one run end to end; returns its results record."""
    started = time.time()
    validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(cfg.output_dir)
    config = config_to_dict(cfg)
    info = dataset_info(cfg.data.name)

    datamodule = build_datamodule(**cfg.data, seed=cfg.seed)
    datamodule.prepare_data()
    datamodule.setup()
    num_examples = len(datamodule.train_set)
    validate_privacy(cfg.privacy, num_examples)
    module = build_method(cfg, info, num_examples)
    module.attach_private_data(datamodule.train_set)

    trainer = build_trainer(cfg, out, module.planned_steps, config)
    trainer.fit(module, ckpt_path=cfg.resume)
    record: dict[str, Any] = {"config": config, "output_dir": str(out)}
    if not trainer.is_global_zero:
        return record
    final = out / "checkpoints" / "final.ckpt"
    trainer.save_checkpoint(final)
    report = module.privacy_report()
    write_report(report, out / "privacy.json")
    print(summary(report))
    record["privacy"] = {k: v for k, v in report.items() if k != "history"}
    record["checkpoint"] = str(final)

    if trainer.interrupted:
        print(f"training interrupted; resume with: dp-diffusion train resume={out / 'checkpoints' / 'last.ckpt'}")
        return record
    if cfg.sample.num_samples > 0:
        images, labels = draw_samples(
            module.sampling_denoiser(), cfg.sample.num_samples, info.image_shape, module.num_classes, cfg.sample,
            seed=cfg.seed,
        )
        paths = save_samples(images, labels, out)
        print(f"samples: {paths['npz']}  grid: {paths['grid']}")
        record["samples"] = {k: str(v) for k, v in paths.items()}
    record["wall_time_s"] = round(time.time() - started, 1)
    with open(out / "results.jsonl", "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
    return record
