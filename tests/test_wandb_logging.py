"""W&B in offline mode: a training run's folder holds the epsilon per step, the EMA sample grids at the
checkpoint interval (media files), the evaluation metrics and the privacy report as its summary, in its
sweep's group; `dp-diffusion report --wandb` logs the report's tables and plots."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow

TINY = [
    "data=digits", "model=tiny", "train.steps=4", "train.batch_size=64", "train.physical_batch_size=32",
    "privacy.epsilon=5", "sample.num_samples=16", "sample.num_steps=3", "eval.num_samples=60",
    "eval.metrics=[fid]", "eval.downstream.epochs=1", "eval.downstream.classifiers=[logreg]",
    "train.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1", "logger=wandb", "logger.group=sweep-x",
]


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """The run's group, history rows and final summary from its `.wandb` file (a LevelDB-style log of
    protobuf records: 32 KiB blocks, 7-byte record headers, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, payloads = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            payloads.append(pending)
    run: dict[str, Any] = {"history": [], "summary": {}}
    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")

        def items(entries):
            return {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}
        if kind == "run":
            run["group"] = record.run.run_group
        elif kind == "history":
            run["history"].append(items(record.history.item))
        elif kind == "summary":
            run["summary"].update(items(record.summary.update))
    return run


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, one_thread):
    """One tiny training with logger=wandb, offline, with the W&B callbacks attached as `train` should."""
    from hydra import compose, initialize_config_dir

    import dp_diffusion.train as train
    from dp_diffusion.cli import CONF_DIR
    from dp_diffusion.wandb_logging import SampleGrids, log_run_summary, wandb_callbacks

    root = tmp_path_factory.mktemp("wandb")
    patch = pytest.MonkeyPatch()
    rng_kept, log_grid = [], SampleGrids.log_grid

    def watched(self, trainer, module):  # training's own random stream must not see the sampling
        state, training = torch.get_rng_state(), module.training
        log_grid(self, trainer, module)
        rng_kept.append(torch.equal(state, torch.get_rng_state()) and module.training == training)
    patch.setattr(SampleGrids, "log_grid", watched)
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("WANDB_DIR", str(root))
    patch.setenv("WANDB_SILENT", "true")
    patch.setenv("DP_DIFFUSION_BACKBONE_CACHE", str(root / "cache"))
    if not hasattr(train, "wandb_callbacks"):  # until train.py attaches them itself
        build_trainer, finish = train.build_trainer, train.finish_loggers
        finished: dict[str, Any] = {}
        patch.setattr(train, "build_trainer", lambda cfg, out, steps, config, callbacks, io: build_trainer(
            cfg, out, steps, config, [*callbacks, *wandb_callbacks(cfg)], io))
        patch.setattr(train, "append_results", lambda record, *paths: finished.update(record=record))

        def finish_loggers(trainer):
            log_run_summary(trainer, finished["record"])
            finish(trainer)
        patch.setattr(train, "finish_loggers", finish_loggers)
    out = root / "run"
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"output_dir={out}", f"results_file={root / 'all.jsonl'}"])
    try:
        record = train.run_training(cfg)
    finally:
        patch.undo()
    import wandb

    wandb.teardown()  # the W&B service writes the offline run's file after finish() returns
    run_dir = next((out / "wandb").glob("offline-run-*"))
    return record, run_dir, read_offline_run(run_dir), rng_kept


def test_epsilon_spent_reaches_wandb_each_step(wandb_run):
    record, _, run, _ = wandb_run
    epsilons = [row["privacy/epsilon"] for row in run["history"] if "privacy/epsilon" in row]
    assert len(epsilons) == 4 and epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]
    assert epsilons[-1] == pytest.approx(record["privacy"]["epsilon"], rel=1e-6)
    assert run["group"] == "sweep-x"


def test_ema_grids_at_checkpoints_are_media_files(wandb_run):
    _, run_dir, run, rng_kept = wandb_run
    grids = [row for row in run["history"] if "samples/ema/_type" in row or "samples/ema" in row]
    steps = [row["trainer/global_step"] for row in grids]
    assert steps == [2, 4]  # the checkpoint interval; the end of training (step 4) is not logged twice
    assert rng_kept == [True, True]  # neither the global random stream nor train/eval mode changed
    for row in grids:
        filenames = row.get("samples/ema/filenames") or [row["samples/ema"]["filenames"]][0]
        for name in filenames:
            with Image.open(run_dir / "files" / name) as image:  # 64 digits of 8x8, 8 a row, 1-pixel padding
                assert image.size == (8 * 9 + 1, 8 * 9 + 1)
    captions = [row.get("samples/ema/captions") for row in grids]
    assert all(c and c[0].startswith("step ") and "epsilon" in c[0] for c in captions)


def test_summary_holds_the_privacy_report_and_metrics_with_backbones(wandb_run):
    record, _, run, _ = wandb_run
    summary = run["summary"]
    privacy = summary["privacy"]
    assert privacy["epsilon"] == pytest.approx(record["privacy"]["epsilon"])
    assert privacy["noise_multiplier"] == pytest.approx(record["privacy"]["noise_multiplier"])
    assert privacy["steps"] == 4 and privacy["covers"]["released"] and "evaluation" in privacy
    assert summary["eval/fid"] == pytest.approx(record["metrics"]["fid"]["value"])
    assert summary["eval_protocol/fid"]["backbone"] == record["metrics"]["fid"]["backbone"]
    assert summary["eval/acc_logreg"] == pytest.approx(record["metrics"]["acc_logreg"]["value"])


def test_report_logs_tables_and_plots(tmp_path, monkeypatch):
    """`dp-diffusion report --wandb` on two records: the offline run holds the plots and the tables."""
    from dp_diffusion.cli import main as cli

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = [{"kind": "train", "method": "dpdm", "data": "mnist5k", "target_epsilon": eps, "seed": 0,
             "overrides": [], "output_dir": str(tmp_path / f"r{eps}"), "wall_time_s": 1.0,
             "privacy": {"private": True, "steps": 3, "dataset_size": 4000},
             "metrics": {"fid": {"value": 100.0 / eps, "backbone": "domain-cnn[mnist5k-train]"},
                         "acc_cnn": {"value": 0.5 + eps / 100}}} for eps in (1.0, 10.0)]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli(["report", str(results), "--out", str(tmp_path / "rep"), "--wandb"])
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    run = read_offline_run(run_dir)
    logged = {k for row in run["history"] for k in row}
    assert {"report/plots/fid_vs_epsilon_mnist5k/_type", "report/plots/accuracy_vs_epsilon_mnist5k/_type",
            "report/tables/mnist5k/frontier/_type", "report/tables/mnist5k/published_numbers/_type"} <= logged
    table = json.loads(next(run_dir.glob("files/media/table/report/tables/mnist5k/frontier_*.table.json")).read_text())
    assert table["columns"][:3] == ["method", "setting", "epsilon"] and len(table["data"]) == 2
    assert (run_dir / "files" / "RESULTS.md").is_file()
    assert len(list(run_dir.glob("files/media/images/report/plots/*.png"))) == 2
