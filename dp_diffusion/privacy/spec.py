"""What a run asks of the privacy core, and the plan calibrated from it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from dp_diffusion.privacy.accounting import calibrate_noise_multiplier


@dataclass(frozen=True)
class PrivacySpec:
    """User-facing DP settings (`conf/privacy/*.yaml`)."""

    enabled: bool = True
    epsilon: float = 10.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplicity: int = 1
    accountant: str = "prv"
    grad_mode: str = "auto"
    noise_multiplier: float | None = None
    secure_mode: bool = False
    log_private_loss: bool = False
    reproducible: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "PrivacySpec":
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in dict(cfg).items() if k in fields})


@dataclass(frozen=True)
class PrivacyPlan:
    """The calibrated DP-SGD schedule: stored once, restored on resume."""

    sample_rate: float
    steps: int
    noise_multiplier: float
    accountant: str
    num_examples: int
    expected_batch_size: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_steps(num_examples: int, batch_size: int, epochs: float) -> int:
    """Logical steps for `epochs` passes with expected batch `batch_size` (q = B/N)."""
    return max(1, int(math.floor(epochs * num_examples / batch_size)))


def make_plan(spec: PrivacySpec, num_examples: int, batch_size: int, steps: int) -> PrivacyPlan:
    """Sample rate q = B/N; sigma calibrated to (epsilon, delta) over `steps` unless given."""
    sample_rate = batch_size / num_examples
    accountant = spec.accountant
    if not spec.enabled:
        sigma = 0.0
    elif spec.noise_multiplier is not None:
        sigma = float(spec.noise_multiplier)
    else:
        sigma, accountant = calibrate_noise_multiplier(
            spec.epsilon, spec.delta, sample_rate, steps, spec.accountant
        )
    return PrivacyPlan(
        sample_rate=sample_rate,
        steps=steps,
        noise_multiplier=sigma,
        accountant=accountant,
        num_examples=num_examples,
        expected_batch_size=batch_size,
    )

