"""Bad configs give one clear line naming the key, the value and what is allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from dp_diffusion.cli import CONF_DIR
from dp_diffusion.config import ConfigError
from dp_diffusion.run_config import validate_config
from dp_diffusion.methods import METHODS


def compose_config(*overrides: str):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_default_config_is_valid():
    cfg = compose_config()
    validate_config(cfg)
    assert cfg.method.name == "dpdm" and cfg.data.name == "mnist5k" and cfg.privacy.epsilon == 10.0


@pytest.mark.parametrize(
    "override,message",
    [
        ("privacy.epsilon=-1", "privacy.epsilon must be a finite number > 0, got -1"),
        ("privacy.epsilon=0", "privacy.epsilon must be a finite number > 0, got 0"),
        ("privacy.delta=0.001", "privacy.delta must be < 1/N = 0.00025 for N=4000"),
        ("privacy.max_grad_norm=0", "privacy.max_grad_norm must be a finite number > 0, got 0"),
        ("privacy.max_grad_norm=-2.5", "privacy.max_grad_norm must be a finite number > 0, got -2.5"),
        ("privacy.noise_multiplicity=0", "privacy.noise_multiplicity must be an integer >= 1, got 0"),
        ("privacy.accountant=moments", "privacy.accountant must be one of ('prv', 'rdp'), got 'moments'"),
        ("privacy.grad_mode=magic", "privacy.grad_mode must be one of"),
        ("train.batch_size=5000", "train.batch_size must be an integer in [1, N=4000]"),
        ("train.physical_batch_size=0", "train.physical_batch_size must be an integer >= 1, got 0"),
        ("train.epochs=0", "train.epochs must be a number > 0, got 0"),
        ("data.name=imagenet", "unknown data set 'imagenet'; data.name must be one of: mnist5k"),
        ("method.name=gan", f"method.name must be one of {sorted(METHODS)}, got 'gan'"),
        ("sample.sampler=euler", "sample.sampler must be one of ['ddim', 'ddim_stochastic', 'edm'], got 'euler'"),
        ("diffusion.label_dropout=0 sample.guidance_scale=1.5", "sample.guidance_scale must be 0 when "
         "diffusion.label_dropout is 0 (guidance needs the label-dropped model), got 1.5"),
    ],
)
def test_bad_value_names_key_value_and_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(*override.split()))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dp_diffusion", *args], capture_output=True, text=True, timeout=300)


def test_cli_reports_bad_config_in_one_line_without_traceback(tmp_path):
    result = run_cli("train", "privacy.epsilon=-1", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: privacy.epsilon must be a finite number > 0, got -1" in result.stderr


def test_cli_reports_missing_data_files_with_their_path(tmp_path):
    result = run_cli("train", "data=mnist", f"data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(tmp_path / "nowhere") in result.stderr and "download" in result.stderr


def test_cli_unknown_group_option_and_command():
    result = run_cli("train", "method=nonexistent")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "method/nonexistent" in result.stderr and "Available options" in result.stderr
    result = run_cli("fly")
    assert result.returncode == 2 and "unknown command 'fly'" in result.stderr


def test_sample_and_evaluate_guidance_defaults_to_the_training_runs():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from dp_diffusion.run_config import validate_sampling
    from dp_diffusion.sample import with_training_guidance

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        sample_cfg = compose("sample", overrides=["checkpoint=x.ckpt"])
        evaluate_cfg = compose("evaluate")
    trained = SimpleNamespace(run_config=compose_config("sample.guidance_scale=2.5"))
    for cfg in (sample_cfg, evaluate_cfg.sample):
        assert cfg.guidance_scale is None
        validate_sampling(cfg, guidance_from_checkpoint=True)
        assert with_training_guidance(cfg, trained).guidance_scale == 2.5
        assert cfg.guidance_scale is None  # the user's config is not modified
    explicit = OmegaConf.merge(sample_cfg, {"guidance_scale": 0.0})
    assert with_training_guidance(explicit, trained).guidance_scale == 0.0
    old_run = SimpleNamespace(run_config=OmegaConf.create({"data": {"name": "mnist5k"}}))
    assert with_training_guidance(sample_cfg, old_run).guidance_scale == 0.0
    with pytest.raises(ConfigError, match="sample.guidance_scale must be a number, got None"):
        validate_sampling(sample_cfg)  # a training config must say it


# --- the shared checks (dp_diffusion.config) -------------------------------------------------------
def test_rules_say_what_is_allowed():
    from dp_diffusion.config import BOOL, integer, number, one_of, optional

    cases = [
        (integer(1), 0, "an integer >= 1"), (integer(1), True, "an integer >= 1"),
        (integer(0, 3), 4, "an integer in [0, 3]"), (number(above=0, finite=True), float("inf"), "a finite number > 0"),
        (number(above=0, below=1), 1, "in (0, 1)"), (number(at_least=0, below=0.5), 0.5, "in [0, 0.5)"),
        (number(), float("nan"), "a number"), (BOOL, 1, "true or false"),
        (one_of(("prv", "rdp")), "moments", "one of ('prv', 'rdp')"),
        (optional(integer(1), "null (all)"), 0, "null (all) or an integer >= 1"),
    ]
    for rule, bad, allowed in cases:
        with pytest.raises(ConfigError) as err:
            rule.check("block.key", bad)
        assert str(err.value) == f"block.key must be {allowed}, got {bad!r}"
    for rule, good in [(integer(1), 1), (number(above=0), 1e-9), (BOOL, False), (optional(integer(1)), None)]:
        rule.check("block.key", good)


def test_settings_reject_unknown_keys_and_name_the_dotted_key():
    from dataclasses import dataclass

    from omegaconf import OmegaConf

    from dp_diffusion.config import Settings, integer, number

    @dataclass(frozen=True)
    class Stage(Settings):
        KEY = "method.module.stage"
        RULES = {"steps": integer(1), "lr": number(above=0)}
        steps: int = 10
        batch_size: int = 4
        lr: float = 1e-3

        def validate(self) -> None:
            super().validate()
            self.require(self.batch_size <= self.steps, "batch_size", f"<= steps = {self.steps}")

    assert Stage.from_config(None) == Stage() and Stage.from_config(OmegaConf.create({"steps": 5})).steps == 5
    with pytest.raises(ConfigError, match=r"^method.module.stage has unknown keys \['stpes'\]; known: "
                                          r"\['batch_size', 'lr', 'steps'\]$"):
        Stage.from_config({"stpes": 5})
    with pytest.raises(ConfigError, match=r"^method.module.stage.lr must be a number > 0, got -1$"):
        Stage.from_config({"lr": -1})
    with pytest.raises(ConfigError, match=r"^method.module.stage.batch_size must be <= steps = 2, got 4$"):
        Stage.from_config({"steps": 2})


def test_config_module_holds_only_the_shared_helpers():
    import dp_diffusion.config as config

    # The run-config checks live in dp_diffusion.run_config (they import the registries; config imports nothing).
    assert not hasattr(config, "validate_config") and hasattr(config, "Settings")
