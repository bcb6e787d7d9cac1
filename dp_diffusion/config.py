"""Validation of a composed config, before any data is loaded or model built.

Every user mistake becomes one `ConfigError` line naming the key, the value
and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig

from dp_diffusion.data.registry import UnknownDatasetError, dataset_info
from dp_diffusion.diffusion.samplers import SAMPLERS
from dp_diffusion.methods import METHODS
from dp_diffusion.privacy.accounting import ACCOUNTANTS
from dp_diffusion.privacy.per_example import GRAD_MODES


class ConfigError(ValueError):
    """A config value the user has to change."""


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_privacy(privacy: DictConfig, num_examples: int) -> None:
    """Checks of `privacy.*` that hold for every method."""
    _require(isinstance(privacy.enabled, bool), "privacy.enabled", privacy.enabled, "true or false")
    k = privacy.noise_multiplicity
    _require(_is_int(k) and k >= 1, "privacy.noise_multiplicity", k, "an integer >= 1")
    _require(privacy.grad_mode in GRAD_MODES, "privacy.grad_mode", privacy.grad_mode, f"one of {GRAD_MODES}")
    for key in ("secure_mode", "reproducible"):
        value = privacy.get(key, False)
        _require(isinstance(value, bool), f"privacy.{key}", value, "true or false")
    if privacy.get("secure_mode", False) and privacy.get("reproducible", False):
        raise ConfigError("privacy.reproducible=true seeds the noise from the config's seed and "
                          "privacy.secure_mode=true draws it from the OS: set at most one of them")
    if not privacy.enabled:
        return
    eps = privacy.epsilon
    _require(_is_number(eps) and 0 < eps < math.inf, "privacy.epsilon", eps, "a finite number > 0")
    delta = privacy.delta
    _require(_is_number(delta) and 0 < delta < 1, "privacy.delta", delta, "in (0, 1)")
    _require(
        delta < 1 / num_examples,
        "privacy.delta",
        delta,
        f"< 1/N = {1 / num_examples:.3g} for N={num_examples} training examples (delta >= 1/N allows "
        "releasing whole records)",
    )
    c = privacy.max_grad_norm
    _require(_is_number(c) and 0 < c < math.inf, "privacy.max_grad_norm", c, "a finite number > 0")
    _require(privacy.accountant in ACCOUNTANTS, "privacy.accountant", privacy.accountant, f"one of {ACCOUNTANTS}")
    sigma = privacy.noise_multiplier
    _require(sigma is None or (_is_number(sigma) and sigma > 0), "privacy.noise_multiplier", sigma,
             "null (calibrate from epsilon) or a number > 0")


def validate_training(train: DictConfig, num_examples: int) -> None:
    b = train.batch_size
    _require(_is_int(b) and 1 <= b <= num_examples, "train.batch_size", b,
             f"an integer in [1, N={num_examples}] (the data set size)")
    pb = train.physical_batch_size
    _require(_is_int(pb) and pb >= 1, "train.physical_batch_size", pb, "an integer >= 1")
    if train.steps is None:
        _require(_is_number(train.epochs) and train.epochs > 0, "train.epochs", train.epochs, "a number > 0")
    else:
        _require(_is_int(train.steps) and train.steps >= 1, "train.steps", train.steps, "null or an integer >= 1")
    every = train.checkpoint_every_n_steps
    _require(_is_int(every) and every >= 1, "train.checkpoint_every_n_steps", every, "an integer >= 1")


def validate_sampling(sample: DictConfig, guidance_from_checkpoint: bool = False) -> None:
    """`guidance_from_checkpoint`: a null guidance_scale means "as the checkpoint's training run sampled"."""
    _require(sample.sampler in SAMPLERS, "sample.sampler", sample.sampler, f"one of {sorted(SAMPLERS)}")
    _require(_is_int(sample.num_steps) and sample.num_steps >= 1, "sample.num_steps", sample.num_steps,
             "an integer >= 1")
    _require(_is_int(sample.num_samples) and sample.num_samples >= 0, "sample.num_samples", sample.num_samples,
             "an integer >= 0")
    _require(_is_int(sample.batch_size) and sample.batch_size >= 1, "sample.batch_size", sample.batch_size,
             "an integer >= 1")
    if not (guidance_from_checkpoint and sample.guidance_scale is None):
        _require(_is_number(sample.guidance_scale), "sample.guidance_scale", sample.guidance_scale,
                 "a number" + (" or null (the training run's)" if guidance_from_checkpoint else ""))


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid value in a training config."""
    _require(cfg.method.name in METHODS, "method.name", cfg.method.name, f"one of {sorted(METHODS)}")
    try:
        info = dataset_info(cfg.data.name)
    except UnknownDatasetError as err:
        raise ConfigError(str(err)) from None
    validate_privacy(cfg.privacy, info.num_train)
    validate_training(cfg.train, info.num_train)
    validate_sampling(cfg.sample)
    conditional = cfg.method.get("conditional", False) and info.num_classes > 0
    if cfg.sample.guidance_scale != 0 and conditional and not cfg.diffusion.get("label_dropout", 0) > 0:
        raise ConfigError(f"sample.guidance_scale must be 0 when diffusion.label_dropout is 0 (guidance needs the "
                          f"label-dropped model), got {cfg.sample.guidance_scale}")
