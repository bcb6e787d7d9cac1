"""`dp-diffusion train`: validate, load data, train through the privacy core,
write the privacy report, sample, and evaluate."""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from dp_diffusion.build import CONFIG_KEY, build_method, config_to_dict
from dp_diffusion.checkpoints import (CHECKPOINT_DIR, INTERRUPTED, SafeCheckpointIO, check_run_dir,
                                      clear_checkpoints, read_checkpoint)
from dp_diffusion.config import ConfigError
from dp_diffusion.data.public import resolve_public
from dp_diffusion.run_config import validate_config, validate_privacy
from dp_diffusion.data.registry import dataset_info
from dp_diffusion.data import build_datamodule
from dp_diffusion.evaluate import append_results, flat_metrics, format_metrics, score_samples, validate_eval
from dp_diffusion.privacy import summary, write_report
from dp_diffusion.privacy.report import describe_evaluation
from dp_diffusion.run_estimate import RunEstimate, after_training
from dp_diffusion.sampling import save_samples
from dp_diffusion.wandb_logging import log_run_summary, wandb_callbacks

log = logging.getLogger(__name__)


class StoreConfig(Callback):
    """Puts the resolved run config into every checkpoint, so `sample` can rebuild the model."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config


def build_logger(cfg: DictConfig, **overrides: Any) -> Any:
    """The configured Lightning logger; a missing optional package is a config error, not a traceback."""
    try:
        return instantiate(cfg.logger, **overrides)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ImportError, ModuleNotFoundError)):
            raise ConfigError(f"logger={cfg.logger._target_.rsplit('.', 1)[-1]} needs a package that is not "
                              f"installed ({' '.join(str(cause).split())}); pip install it or choose logger=csv") from None
        raise


class StopOnInterrupt(Callback):
    """Ctrl-C stops training after the step in progress; a second Ctrl-C aborts at once.

    (SIGTERM needs nothing here: Lightning turns it into SIGTERMException between
    steps, which `run_training` treats as this first Ctrl-C.)

    Stopping between steps keeps weights, ledger and EMA of the same step in the
    checkpoint written next. Lightning's own handling of KeyboardInterrupt saves
    wherever the step was and exits with status 1 from inside `fit`, before a
    privacy report can be written.
    """

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Route SIGINT to this callback for the duration of the block (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._request)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _request(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupted: stopping after the current step (Ctrl-C again to abort without a checkpoint)",
              file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        requested = self.requested
        if trainer.world_size > 1:  # every rank stops at the same step
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            self.requested = True
            trainer.should_stop = True


def finish_loggers(trainer: L.Trainer) -> None:
    """Close W&B runs so the next job of a Hydra multirun starts a new one."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "_experiment", None)
        if experiment is not None and hasattr(experiment, "finish"):
            experiment.finish()


def build_trainer(cfg: DictConfig, out: Path, max_steps: int, config: dict[str, Any],
                  callbacks: list[Callback], checkpoint_io: SafeCheckpointIO) -> L.Trainer:
    """The private fit's trainer. No OnExceptionCheckpoint: with one, Lightning resumes from the run dir's
    newest checkpoint when `ckpt_path` is None, and saves mid-step on any exception."""
    checkpoints = out / CHECKPOINT_DIR
    callbacks = [
        *callbacks,
        StoreConfig(config),
        RunEstimate(then=after_training(cfg)),
        ModelCheckpoint(
            dirpath=checkpoints,
            filename="step{step}",
            auto_insert_metric_name=False,
            every_n_train_steps=cfg.train.checkpoint_every_n_steps,
            save_last=True,
            save_top_k=1,
        ),
    ]
    return instantiate(
        cfg.trainer,
        max_steps=max_steps,
        max_epochs=-1,
        default_root_dir=str(out),
        logger=build_logger(cfg),
        callbacks=callbacks,
        plugins=[checkpoint_io],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


def quiet_third_party_noise() -> None:
    """Drop log lines and warnings that carry no information for our users."""
    # Lightning adds its own console handler; Hydra's root handler would print every line twice.
    logging.getLogger("lightning.pytorch").propagate = False
    for pattern in (".*LeafSpec.*", "Optimal order is the largest alpha", ".*litlogger.*",
                    ".*does not have many workers.*",
                    ".*Total length of `DataLoader` across ranks is zero.*",
                    # Lightning asks the DataLoader object for state_dict(); ours has none because the Poisson
                    # rounds continue from the privacy state in the checkpoint (rounds taken, generator
                    # secret), which tests/test_resume.py and tests/test_kill_resume.py check.
                    ".*your dataloader is not resumable.*",
                    # check_run_dir decides whether a run dir that holds checkpoints may be used.
                    ".*exists and is not empty.*",
                    # We checkpoint the state after the step: the one the accountant has counted.
                    "Using ModelCheckpoint with manual optimization.*",
                    # Frozen parts (DP-LDM's autoencoder, DP-SAD's teacher) are kept in eval mode on purpose.
                    ".*module\\(s\\) in eval mode at the start of training.*"):
        warnings.filterwarnings("ignore", message=pattern)


def build_public_trainer(cfg: DictConfig, out: Path, max_steps: int) -> L.Trainer:
    """A trainer for a stage trained on public or synthetic data only (no privacy state)."""
    return instantiate(
        cfg.trainer,
        max_steps=max_steps,
        max_epochs=-1,
        default_root_dir=str(out),
        logger=build_logger(cfg, save_dir=str(out)),
        callbacks=[RunEstimate(stage=out.name)],
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Train one run end to end; returns its results record.

    Everything is validated before the first write into the run directory, so a
    refused run leaves an existing directory as it was.
    """
    started = time.time()
    quiet_third_party_noise()
    resolve_public(cfg)  # public=auto: the private set's embedded public set, recorded as resolved
    validate_config(cfg)
    validate_eval(cfg.eval)
    out = Path(cfg.output_dir)
    overwrite = cfg.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise ConfigError(f"overwrite must be true or false, got {overwrite!r}")
    rank_zero = rank_zero_only.rank == 0  # DDP's other ranks share rank 0's run dir
    if rank_zero:
        check_run_dir(out, cfg.resume, overwrite)
    resumed = {} if cfg.resume is None else {str(cfg.resume): read_checkpoint(cfg.resume)}
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    config = config_to_dict(cfg)
    info = dataset_info(cfg.data.name)

    datamodule = build_datamodule(**cfg.data, seed=cfg.seed)
    datamodule.prepare_data()
    datamodule.setup()
    num_examples = len(datamodule.train_set)
    validate_privacy(cfg.privacy, num_examples)
    module = build_method(cfg, info, num_examples)
    module.attach_private_data(datamodule.train_set)
    for state in resumed.values():  # Lightning checks it again on load; here it fails before any write
        module.check_resume(state)

    if rank_zero:  # validated: from here on the run writes into `out`
        if overwrite and clear_checkpoints(out):
            log.warning("overwrite=true: removed the checkpoints of an earlier run in %s", out)
        save_hydra_config(cfg, out)
    if cfg.resume is None:  # on resume, public stages come back with the checkpoint
        module.fit_public_stages(lambda steps, name: build_public_trainer(cfg, out / name, steps))
    interrupt = StopOnInterrupt()
    trainer = build_trainer(cfg, out, module.planned_steps, config, [interrupt, *wandb_callbacks(cfg)],
                            SafeCheckpointIO(resumed))
    with interrupt.armed():
        try:
            trainer.fit(module, ckpt_path=cfg.resume)  # None: fresh run (nothing resumes unless resume= says so)
        except SIGTERMException:  # e.g. a cluster's preemption: Lightning raises it between steps
            interrupt.requested = True
        except SystemExit:  # a second Ctrl-C: Lightning stops mid-step and exits from inside fit
            if not interrupt.requested:
                raise
            print(f"training aborted mid-step; the newest checkpoint in {out / CHECKPOINT_DIR} holds the last "
                  "complete step and its privacy ledger", file=sys.stderr, flush=True)
            raise KeyboardInterrupt from None
    record: dict[str, Any] = {
        "kind": "train",
        "method": cfg.method.name,
        "data": cfg.data.name,
        "target_epsilon": cfg.privacy.epsilon if cfg.privacy.enabled else None,
        "epsilon": None,  # spent: the report's headline, once training has ended
        "seed": cfg.seed,
        "overrides": hydra_overrides(),
        "output_dir": str(out),
        "config": config,
    }
    # Saving is collective under DDP (every rank calls it, rank 0 writes); the rest is rank 0's.
    if interrupt.requested:
        stop_interrupted(trainer, module, out)
    final = out / CHECKPOINT_DIR / "final.ckpt"
    module.keep_privacy_rng_in_checkpoint = False  # released: without the secret the noise derives from
    try:
        trainer.save_checkpoint(final)
    finally:
        module.keep_privacy_rng_in_checkpoint = True
    if not trainer.is_global_zero:
        return record
    (out / CHECKPOINT_DIR / INTERRUPTED).unlink(missing_ok=True)  # superseded by this run's own checkpoints
    report = module.privacy_report()
    write_report(report, out / "privacy.json")
    print(summary(report))
    record["privacy"] = {k: v for k, v in report.items() if k != "history"}
    record["epsilon"] = report["epsilon"] if report["private"] else None
    record["checkpoint"] = str(final)

    record.update(sample_and_evaluate(cfg, module, trainer, out))
    if record.get("metrics"):  # what evaluation read of the private data goes into the report too
        report["evaluation"] = record["privacy"]["evaluation"] = describe_evaluation(
            record["metrics"], cfg.eval.reference_split, cfg.data.name)
        write_report(report, out / "privacy.json")
        print("\n".join(f"  evaluation: {line}" for line in report["evaluation"]))
    record["wall_time_s"] = round(time.time() - started, 1)
    append_results(record, out / "results.jsonl", cfg.results_file)
    log_run_summary(trainer, record)  # W&B only: the privacy report and metrics as the run's summary
    finish_loggers(trainer)
    return record


def hydra_overrides() -> list[str]:
    """The command-line overrides of this run (empty outside Hydra)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def save_hydra_config(cfg: DictConfig, out: Path) -> None:
    """Write `.hydra/{config,hydra,overrides}.yaml` as Hydra's `output_subdir` would.

    conf/config.yaml turns Hydra's own copy off (it is written before any of our
    code runs, so a refused run would overwrite the directory's record of the run
    it belongs to); this writes it once the run is validated.
    """
    if not HydraConfig.initialized():
        return
    folder = out / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    hydra_cfg = HydraConfig.instance().cfg
    files = {"config.yaml": cfg, "hydra.yaml": hydra_cfg, "overrides.yaml": hydra_cfg.hydra.overrides.task}
    for name, node in files.items():
        (folder / name).write_text(OmegaConf.to_yaml(node))


def stop_interrupted(trainer: L.Trainer, module: Any, out: Path) -> None:
    """After Ctrl-C: checkpoint, report what was spent, say how to resume; raises KeyboardInterrupt."""
    checkpoint = out / CHECKPOINT_DIR / INTERRUPTED
    trainer.save_checkpoint(checkpoint)
    if not trainer.is_global_zero:
        raise KeyboardInterrupt
    report = module.privacy_report()
    write_report(report, out / "privacy.json")
    print(summary(report))
    kept = [o for o in hydra_overrides() if not o.lstrip("+~").startswith(("resume=", "hydra.run.dir=", "overwrite="))]
    command = shlex.join(["dp-diffusion", "train", *kept, f"resume={checkpoint}", f"hydra.run.dir={out}"])
    print(f"training interrupted after step {trainer.global_step}; checkpoint: {checkpoint}\n"
          f"privacy report (what was spent): {out / 'privacy.json'}\nresume with: {command}", flush=True)
    raise KeyboardInterrupt


def sample_and_evaluate(cfg: DictConfig, module: Any, trainer: L.Trainer, out: Path) -> dict[str, Any]:
    """Samples for the grid (and, if enabled, for evaluation), metrics to loggers and the record."""
    wanted = max(cfg.sample.num_samples, cfg.eval.num_samples if cfg.eval.enabled else 0)
    if wanted == 0:
        return {}
    images, labels = module.generate(wanted, cfg.sample, seed=cfg.seed)
    paths = save_samples(images, labels, out)
    print(f"samples: {paths['npz']}  grid: {paths['grid']}")
    result: dict[str, Any] = {"samples": {k: str(v) for k, v in paths.items()}}
    log_grid(trainer, paths["grid"])
    if cfg.eval.enabled:
        metrics = score_samples(images, labels, cfg.data, cfg.eval, seed=cfg.seed)
        print("evaluation:\n" + format_metrics(metrics))
        for logger in trainer.loggers:
            logger.log_metrics(flat_metrics(metrics), step=trainer.global_step)
            logger.save()
        result["metrics"] = metrics
    return result


def log_grid(trainer: L.Trainer, grid: Path) -> None:
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # W&B (and other image-capable loggers)
            logger.log_image(key="samples", images=[str(grid)], step=trainer.global_step)
