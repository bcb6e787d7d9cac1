"""EMA of the denoiser: the warm-up ramp, one update per logical DP step, and it is what samples."""

from __future__ import annotations

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torch.optim.swa_utils import AveragedModel

from dp_diffusion.build import build_method
from dp_diffusion.cli import CONF_DIR
from dp_diffusion.data.registry import build_datamodule, dataset_info
from dp_diffusion.methods.diffusion_module import ema_decay_at, ema_with_warmup


def test_ema_follows_the_warm_up_recursion():
    model = nn.Linear(3, 2)
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(0.9), use_buffers=True)
    expected = None
    for step in range(40):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ema.update_parameters(model)
        # AveragedModel copies on its first update; later updates use the decay after n updates.
        rate = ema_decay_at(0.9, step)
        expected = float(step) if expected is None else rate * expected + (1 - rate) * step
        torch.testing.assert_close(ema.module.weight, torch.full((2, 3), expected))
    assert ema_decay_at(0.9, 1) == 2 / 11 and ema_decay_at(0.9, 1000) == 0.9


def test_ema_updates_once_per_logical_step_and_is_sampled(tmp_path, one_thread):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[
            "data=digits", "model=tiny", "train.steps=3", "train.batch_size=64", "train.physical_batch_size=16",
            "privacy.noise_multiplier=2.0", f"output_dir={tmp_path}",
        ])
    datamodule = build_datamodule("digits", root=cfg.data.root)
    datamodule.setup("fit")
    module = build_method(cfg, dataset_info("digits"), len(datamodule.train_set))
    module.attach_private_data(datamodule.train_set)
    L.Trainer(max_steps=3, max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              default_root_dir=str(tmp_path)).fit(module)
    assert module.ledger.steps == 3
    assert int(module.ema.n_averaged) == 3  # several physical chunks per step, one EMA update
    raw, averaged = module.denoiser.state_dict(), module.sampling_denoiser().state_dict()
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)
    assert module.sampling_denoiser() is module.ema.module
