"""Validation of a composed run config, before any data is loaded or model built.

Every user mistake becomes one `ConfigError` line naming the key, the value and what is allowed (the rules
and the message are those of :mod:`dp_diffusion.config`). Hydra's struct mode already refuses unknown keys
in the composed blocks; these checks are about values.
"""

from __future__ import annotations

from dataclasses import replace

from omegaconf import DictConfig

from dp_diffusion.config import BOOL, ConfigError, Rule, check_rules, integer, number, one_of, optional, require
from dp_diffusion.data.registry import dataset_info
from dp_diffusion.diffusion.samplers import SAMPLERS
from dp_diffusion.methods import METHODS
from dp_diffusion.privacy.accounting import ACCOUNTANTS
from dp_diffusion.privacy.per_example import GRAD_MODES

POSITIVE_INT = integer(1)
# privacy.* checked for every run, and those that only matter when privacy.enabled
PRIVACY_RULES: dict[str, Rule] = {
    "enabled": BOOL,
    "noise_multiplicity": POSITIVE_INT,
    "grad_mode": one_of(GRAD_MODES),
    "secure_mode": BOOL,
    "reproducible": BOOL,
}
DP_RULES: dict[str, Rule] = {
    "epsilon": number(above=0, finite=True),
    "delta": number(above=0, below=1),
    "max_grad_norm": number(above=0, finite=True),
    "accountant": one_of(ACCOUNTANTS),
    "noise_multiplier": optional(number(above=0), "null (calibrate from epsilon)"),
}
SAMPLING_RULES: dict[str, Rule] = {
    "sampler": one_of(sorted(SAMPLERS)),
    "num_steps": POSITIVE_INT,
    "num_samples": integer(0),
    "batch_size": POSITIVE_INT,
}


def validate_privacy(privacy: DictConfig, num_examples: int) -> None:
    """Checks of `privacy.*` that hold for every method."""
    check_rules(privacy, PRIVACY_RULES, "privacy", defaults={"secure_mode": False, "reproducible": False})
    if privacy.get("secure_mode", False) and privacy.get("reproducible", False):
        raise ConfigError("privacy.reproducible=true seeds the noise from the config's seed and "
                          "privacy.secure_mode=true draws it from the OS: set at most one of them")
    if not privacy.enabled:
        return
    check_rules(privacy, DP_RULES, "privacy")
    require(privacy.delta < 1 / num_examples, "privacy.delta", privacy.delta,
            f"< 1/N = {1 / num_examples:.3g} for N={num_examples} training examples (delta >= 1/N allows "
            "releasing whole records)")


def validate_training(train: DictConfig, num_examples: int) -> None:
    """Checks of `train.*`; `num_examples` bounds the (expected) batch size."""
    batch_size = replace(integer(1, num_examples), allowed=f"an integer in [1, N={num_examples}] (the data set size)")
    batch_size.check("train.batch_size", train.batch_size)
    POSITIVE_INT.check("train.physical_batch_size", train.physical_batch_size)
    if train.steps is None:
        number(above=0).check("train.epochs", train.epochs)
    else:
        optional(POSITIVE_INT).check("train.steps", train.steps)
    POSITIVE_INT.check("train.checkpoint_every_n_steps", train.checkpoint_every_n_steps)


def validate_sampling(sample: DictConfig, guidance_from_checkpoint: bool = False) -> None:
    """`guidance_from_checkpoint`: a null guidance_scale means "as the checkpoint's training run sampled"."""
    check_rules(sample, SAMPLING_RULES, "sample")
    if not (guidance_from_checkpoint and sample.guidance_scale is None):
        allowed = "a number" + (" or null (the training run's)" if guidance_from_checkpoint else "")
        replace(number(), allowed=allowed).check("sample.guidance_scale", sample.guidance_scale)


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid value in a training config."""
    one_of(sorted(METHODS)).check("method.name", cfg.method.name)
    info = dataset_info(cfg.data.name)  # UnknownDatasetError is a ConfigError
    validate_privacy(cfg.privacy, info.num_train)
    validate_training(cfg.train, info.num_train)
    validate_sampling(cfg.sample)
    conditional = cfg.method.get("conditional", False) and info.num_classes > 0
    if cfg.sample.guidance_scale != 0 and conditional and not cfg.diffusion.get("label_dropout", 0) > 0:
        raise ConfigError(f"sample.guidance_scale must be 0 when diffusion.label_dropout is 0 (guidance needs the "
                          f"label-dropped model), got {cfg.sample.guidance_scale}")
