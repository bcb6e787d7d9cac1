"""Every experiment config composes, validates, builds its model, and calibrates sigma
as in the DPDM reference table (shared/reference/papers-dpdm-dpldm.md, 1.7)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dp_diffusion.build import build_method
from dp_diffusion.cli import CONF_DIR
from dp_diffusion.run_config import validate_config
from dp_diffusion.data.registry import dataset_info
from dp_diffusion.privacy import make_plan

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def compose_experiment(name: str, *overrides: str):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *overrides])


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_validates_and_builds(name):
    cfg = compose_experiment(name)
    validate_config(cfg)
    module = build_method(cfg, dataset_info(cfg.data.name))
    params = sum(p.numel() for p in module.denoiser.parameters())
    if name.startswith(("dpdm_", "dp_syngen_")) and not name.endswith("_cpu"):  # CPU-sized ones: the tiny net
        assert 1.7e6 < params < 1.85e6  # DPDM's networks: 1.75M-1.80M parameters


@pytest.mark.parametrize(
    "name,sigma",
    [("dpdm_mnist_eps10", 2.49), ("dpdm_mnist_eps1", 18.3), ("dpdm_cifar10_eps10", 2.48)],
)
def test_rdp_calibration_matches_reference_sigma(name, sigma):
    cfg = compose_experiment(name, "privacy.accountant=rdp")
    info = dataset_info(cfg.data.name)
    module = build_method(cfg, info)
    plan = make_plan(module.privacy_spec, info.num_train, cfg.train.batch_size, module.planned_steps)
    assert plan.noise_multiplier == pytest.approx(sigma, rel=0.03)
