"""Weights & Biases dashboards: what a training run (`logger=wandb`) and a results report log there.

A training run with `logger=wandb` (conf/logger/wandb.yaml; offline by default, `wandb sync` later) shows:

- the epsilon spent, per step: `privacy/epsilon`, logged by the privacy core's DP callback through
  Lightning, so every logger gets it;
- sample grids from the released model while it trains: :class:`SampleGrids` draws them from the EMA
  through the method's `generate()` (under `torch.no_grad`, outside the private step: no private data,
  no gradient, nothing accounted) every `every_n_steps` steps, under `samples/ema`;
- the evaluation metrics (`eval/<metric>`, logged by `train`) and, as the run summary, the privacy
  report and each metric with the backbone it was computed on (:func:`log_run_summary`);
- one group per Hydra sweep: conf/logger/wandb.yaml sets `group` from the sweep dir.

`dp-diffusion report --wandb` logs a report's plots and tables (:func:`log_report`).

`train` attaches this module with two calls (`wandb_callbacks(cfg)` into the private fit's callbacks,
`log_run_summary(trainer, record)` once the record is complete); both do nothing without a W&B logger.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torchvision.utils import make_grid

WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"
GRID_KEY = "samples/ema"


def wandb_loggers(trainer: L.Trainer) -> list[Any]:
    """The trainer's W&B loggers (none unless `logger=wandb`)."""
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def uses_wandb(cfg: Any) -> bool:
    """Whether the run's logger config is W&B's."""
    logger = cfg.get("logger") if hasattr(cfg, "get") else None
    return bool(logger) and logger.get("_target_") == WANDB_LOGGER


class SampleGrids(Callback):
    """Logs a grid of `num_samples` samples from the released model (the EMA) every `every_n_steps`
    training steps and at the end of training, and the privacy report as the run summary when
    training ends. Only rank 0 samples; the same `seed` each time, so grids differ only by training."""

    def __init__(self, sample_cfg: Any, every_n_steps: int, num_samples: int = 64, seed: int = 0) -> None:
        self.sample_cfg = sample_cfg
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        self.logged_steps: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.global_step not in self.logged_steps:
            self.log_grid(trainer, pl_module)
        if trainer.is_global_zero and hasattr(pl_module, "privacy_report"):
            for logger in wandb_loggers(trainer):
                logger.experiment.summary.update({"privacy": summary_value(pl_module.privacy_report())})

    @torch.no_grad()
    def log_grid(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Draw the grid from the EMA (post-processing of the released model) and log it."""
        loggers = wandb_loggers(trainer)
        if not loggers or not trainer.is_global_zero:
            return
        step = trainer.global_step
        images, _ = pl_module.generate(self.num_samples, self.sample_cfg, seed=self.seed, device=pl_module.device,
                                       disable_progress=True)
        grid = make_grid((images.float().cpu().clamp(-1, 1) + 1) / 2, nrow=max(1, math.isqrt(len(images))),
                         padding=1)
        pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        epsilon = trainer.callback_metrics.get("privacy/epsilon")
        caption = f"step {step}" + (f", epsilon {float(epsilon):.3g}" if epsilon is not None else "")
        for logger in loggers:
            logger.log_image(key=GRID_KEY, images=[pixels], caption=[caption], step=step)
        self.logged_steps.append(step)


def wandb_callbacks(cfg: Any, num_samples: int = 64, every_n_steps: int | None = None) -> list[Callback]:
    """The callbacks a run with `logger=wandb` adds to its private fit: grids of `num_samples` samples
    every `every_n_steps` steps (default: the checkpoint interval, `train.checkpoint_every_n_steps`), with
    the run's sampler (`sample`) and `seed`. Each grid costs one sampling pass of `num_samples` images
    (`sample.num_steps` denoiser calls), on rank 0."""
    if not uses_wandb(cfg):
        return []
    every = int(cfg.train.checkpoint_every_n_steps if every_n_steps is None else every_n_steps)
    return [SampleGrids(cfg.sample, every, num_samples, int(cfg.seed))]


def summary_value(value: Any) -> Any:
    """A JSON-safe copy for a W&B summary: non-finite floats as strings, the ledger's history left out."""
    if isinstance(value, Mapping):
        return {str(k): summary_value(v) for k, v in value.items() if k != "history"}
    if isinstance(value, (list, tuple)):
        return [summary_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def run_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a finished run puts in its W&B summary: the privacy report, each metric with what it was
    measured with, the epsilon spent, the wall time and the sample paths."""
    summary: dict[str, Any] = {"privacy": summary_value(record.get("privacy") or {}),
                               "epsilon": summary_value(record.get("epsilon"))}
    for name, entry in (record.get("metrics") or {}).items():
        summary[f"eval/{name}"] = float(entry["value"])
        summary[f"eval_protocol/{name}"] = summary_value({k: v for k, v in entry.items() if k != "value"})
    for key in ("wall_time_s", "target_epsilon", "method", "data", "seed"):
        if record.get(key) is not None:
            summary[key] = summary_value(record[key])
    return summary


def log_run_summary(trainer: L.Trainer, record: Mapping[str, Any]) -> None:
    """Put the finished run's record (privacy report, metrics with their backbones) in the summary of
    each W&B logger of `trainer`; nothing without one."""
    if not trainer.is_global_zero:
        return
    for logger in wandb_loggers(trainer):
        logger.experiment.summary.update(run_summary(record))


# ---- the report ---------------------------------------------------------------------------------

def markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """The tables of a RESULTS.md, keyed by the headings above them: `<data>/frontier` for a data set's
    table, `<data>/<sub_heading>` below it (`mnist5k/published_numbers`). Header row first; the `---`
    row is left out."""
    tables: dict[str, list[list[str]]] = {}
    data, sub = "results", "frontier"
    current: list[list[str]] | None = None
    for line in text.splitlines():
        heading = re.match(r"^(#{2,3}) (.+)$", line)
        if heading:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", heading.group(2).strip()).strip("_").lower()
            data, sub = (name, "frontier") if len(heading.group(1)) == 2 else (data, name)
            current = None
            continue
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if all(set(c) <= {"-"} for c in cells):
            continue
        if current is None:
            current = tables.setdefault(f"{data}/{sub}", [])
        current.append(cells)
    return tables


def log_report(folder: str | Path, project: str = "dp-diffusion", group: str | None = None,
               save_dir: str | Path | None = None) -> Path:
    """Log a `dp-diffusion report` folder to W&B: each table as a W&B table, each PNG as an image,
    RESULTS.md as a file. Offline unless WANDB_MODE says otherwise (sync with `wandb sync`). Returns the
    run's local folder, complete (the W&B service is shut down to flush it; the next run starts another)."""
    import wandb

    folder = Path(folder)
    results = folder / "RESULTS.md"
    run = wandb.init(project=project, group=group or f"report-{folder.resolve().name}", job_type="report",
                     name=f"report-{folder.resolve().name}", dir=str(save_dir) if save_dir else None,
                     mode=os.environ.get("WANDB_MODE", "offline"))
    try:
        logged: dict[str, Any] = {}
        for name, rows in markdown_tables(results.read_text()).items():
            header, *body = rows
            logged[f"report/tables/{name}"] = wandb.Table(columns=header, data=[r + [""] * (len(header) - len(r))
                                                                                for r in body])
        for png in sorted(folder.glob("*.png")):
            logged[f"report/plots/{png.stem}"] = wandb.Image(str(png), caption=png.name)
        run.log(logged)
        run.save(str(results), base_path=str(folder), policy="now")
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
        wandb.teardown()  # the W&B service writes the run's files after finish() returns; this waits for it
    return run_dir


__all__: Sequence[str] = ["GRID_KEY", "SampleGrids", "log_report", "log_run_summary", "run_summary",
                          "wandb_callbacks", "wandb_loggers"]
