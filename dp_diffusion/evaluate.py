"""Scoring samples against real data, and `dp-diffusion evaluate`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import Tensor

from dp_diffusion.config import ConfigError, is_int, one_of, require
from dp_diffusion.run_config import validate_sampling
from dp_diffusion.data.registry import dataset_info
from dp_diffusion.data import build_datamodule
from dp_diffusion.metrics import BackboneUnavailableError, compute_fidelity, downstream_accuracy
from dp_diffusion.sampling import load_samples, resolve_device, save_samples

REFERENCE_SPLITS = ("train", "test")
REAL_SAMPLES = ("real-train", "real-test")


def validate_eval(eval_cfg: DictConfig) -> None:
    """One-line ConfigError for a bad `eval` block (the shared rules of `dp_diffusion.config`)."""
    one_of(REFERENCE_SPLITS).check("eval.reference_split", eval_cfg.reference_split)
    fewest = minimum_samples(eval_cfg)
    n = eval_cfg.num_samples
    require(is_int(n) and n >= fewest, "eval.num_samples", n,
            f"an integer >= {fewest} for eval.metrics={list(eval_cfg.metrics)}")


def minimum_samples(eval_cfg: DictConfig) -> int:
    """The fewest samples every configured metric can score: precision/recall's k-NN balls (k = 3) need 4."""
    return 4 if "prc" in eval_cfg.metrics else 2


def score_samples(images: Tensor, labels: Tensor | None, data_cfg: DictConfig, eval_cfg: DictConfig,
                  seed: int = 0) -> dict[str, Any]:
    """Every configured metric of `images`; each names its backbone and sample count."""
    datamodule = build_datamodule(**data_cfg, seed=seed)
    datamodule.prepare_data()
    datamodule.setup()
    reference, reference_labels = (
        datamodule.train_tensors() if eval_cfg.reference_split == "train" else datamodule.test_tensors()
    )
    device = resolve_device(eval_cfg.device)
    metrics: dict[str, Any] = {}
    try:
        metrics.update(
            compute_fidelity(
                images,
                reference,
                backbone=eval_cfg.backbone,
                metrics=tuple(eval_cfg.metrics),
                reference_labels=reference_labels,
                reference_name=data_cfg.name,
                reference_split=eval_cfg.reference_split,
                weights_path=eval_cfg.weights_path,
                allow_download=eval_cfg.allow_download,
                device=device,
                seed=seed,
            )
        )
    except BackboneUnavailableError as err:
        raise ConfigError(str(err).replace("\n", " ")) from None
    info = dataset_info(data_cfg.name)
    if eval_cfg.downstream.enabled and labels is not None and info.num_classes > 0:
        test_images, test_labels = datamodule.test_tensors()
        accuracies = downstream_accuracy(
            images, labels, test_images, test_labels,
            classifiers=tuple(eval_cfg.downstream.classifiers),
            epochs=eval_cfg.downstream.epochs,
            seed=seed,
            device=device,
            num_classes=info.num_classes,
        )
        for name, result in accuracies.items():
            metrics[f"acc_{name}"] = {
                "value": result["accuracy"],
                "selected_on": "synthetic validation split",
                "best_epoch": result["best_epoch"],
                "num_samples": len(images),
                "num_test": result["num_test"],
            }
    return metrics


def flat_metrics(metrics: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """`{prefix + name: value}` for loggers."""
    return {f"{prefix}{name}": float(entry["value"]) for name, entry in metrics.items()}


def append_results(record: dict[str, Any], *paths: str | Path) -> None:
    line = json.dumps(record, default=str)
    for path in paths:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(line + "\n")


def format_metrics(metrics: dict[str, Any]) -> str:
    rows = []
    for name, entry in metrics.items():
        if "backbone" in entry:
            where = f"{entry['backbone']}, n={entry['num_samples']}"
        else:  # downstream accuracy: trained on the samples, scored on the real test split
            where = (f"real test split, n={entry.get('num_test')}; trained on n={entry['num_samples']} samples, "
                     f"epoch chosen on a {entry.get('selected_on', '')}")
        rows.append(f"  {name:<10} {entry['value']:>10.4g}   [{where}]")
    return "\n".join(rows)


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate an `.npz` of samples or a checkpoint (which is sampled first)."""
    started = time.time()
    validate_eval(cfg.eval)
    if (cfg.samples is None) == (cfg.checkpoint is None):
        raise ConfigError("give exactly one of samples=PATH.npz or checkpoint=PATH.ckpt")
    source: dict[str, Any]
    data_cfg = cfg.data
    if cfg.samples in REAL_SAMPLES:
        # The ceiling: real images scored as if they were samples.
        datamodule = build_datamodule(**data_cfg, seed=cfg.seed)
        datamodule.setup()
        split = cfg.samples.removeprefix("real-")
        images, labels = datamodule.train_tensors() if split == "train" else datamodule.test_tensors()
        source = {"samples": cfg.samples}
    elif cfg.samples is not None:
        path = Path(cfg.samples)
        if not path.is_file():
            raise ConfigError(f"samples must be an existing .npz written by train/sample, got {str(path)!r}")
        images, labels = load_samples(path, dataset_info(data_cfg.name))
        if len(images) < minimum_samples(cfg.eval):
            raise ConfigError(f"samples={str(path)!r} has {len(images)} images; eval.metrics="
                              f"{list(cfg.eval.metrics)} need at least {minimum_samples(cfg.eval)}")
        source = {"samples": str(path)}
    else:
        from dp_diffusion.sample import load_trained, with_training_guidance

        validate_sampling(cfg.sample, guidance_from_checkpoint=True)
        module = load_trained(cfg.checkpoint)
        sample_cfg = with_training_guidance(cfg.sample, module)
        data_cfg = module.run_config.data if cfg.data_from_checkpoint else cfg.data
        images, labels = module.generate(cfg.eval.num_samples, sample_cfg, seed=cfg.seed)
        save_samples(images, labels, Path(cfg.checkpoint).parent.parent / "eval_samples")
        source = {"checkpoint": str(cfg.checkpoint)}
    metrics = score_samples(images, labels, data_cfg, cfg.eval, seed=cfg.seed)
    print(format_metrics(metrics))
    record = {"kind": "evaluate", **source, "data": data_cfg.name, "reference_split": cfg.eval.reference_split,
              "metrics": metrics, "wall_time_s": round(time.time() - started, 1)}
    append_results(record, cfg.results_file)
    return record
