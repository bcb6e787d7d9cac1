"""Privacy accounting: noise calibration and the per-run budget ledger.

Both are thin layers over Opacus's accountants (PRV of Gopi et al. 2021 and RDP
of Mironov et al. 2019, for the Poisson-subsampled Gaussian mechanism).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

log = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp")
# Opacus's PRV accountant is unreliable (slow, memory-hungry, or failing to find
# a domain) at large epsilon; above this we calibrate with RDP and say so.
PRV_MAX_RELIABLE_EPSILON = 10.0


def _new_accountant(name: str) -> PRVAccountant | RDPAccountant:
    if name == "prv":
        return PRVAccountant()
    if name == "rdp":
        return RDPAccountant()
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")


def epsilon_for(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str
) -> float:
    """Epsilon spent by `steps` Poisson-subsampled Gaussian steps."""
    if steps == 0:
        return 0.0
    acc = _new_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise_multiplier(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> tuple[float, str]:
    """Smallest sigma (within tolerance) whose epsilon after `steps` is <= `epsilon`.

    Returns (sigma, accountant actually used). PRV falls back to RDP, with a
    warning, where it is unreliable; RDP's bound is looser, so the fallback is safe.
    """
    if accountant == "prv" and epsilon > PRV_MAX_RELIABLE_EPSILON:
        warnings.warn(
            f"epsilon={epsilon} > {PRV_MAX_RELIABLE_EPSILON}: calibrating with the RDP "
            "accountant (Opacus's PRV accountant is unreliable there)",
            stacklevel=2,
        )
        accountant = "rdp"
    try:
        sigma = get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=epsilon_tolerance,
        )
    except (ValueError, RuntimeError, MemoryError) as err:
        if accountant != "prv":
            raise
        warnings.warn(f"PRV calibration failed ({err}); falling back to RDP", stacklevel=2)
        return calibrate_noise_multiplier(
            epsilon, delta, sample_rate, steps, "rdp", epsilon_tolerance
        )
    return float(sigma), accountant


@dataclass
class PrivacyLedger:
    """Every DP step actually taken, with epsilon by PRV and by RDP.

    Serialises with the checkpoint so a resumed run continues the same history.
    """

    delta: float
    accountant: str = "prv"

    def __post_init__(self) -> None:
        self._accountants = {name: _new_accountant(name) for name in ACCOUNTANTS}

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """(noise_multiplier, sample_rate, steps) runs, merged like Opacus does."""
        return list(self._accountants["rdp"].history)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        for acc in self._accountants.values():
            acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, accountant: str | None = None) -> float:
        """Epsilon spent so far by one accountant (default: the primary one)."""
        name = accountant or self.accountant
        if not self.history:
            return 0.0
        if name == "prv":
            try:
                return float(self._accountants["prv"].get_epsilon(delta=self.delta))
            except (ValueError, RuntimeError, MemoryError) as err:
                log.warning("PRV accountant failed (%s); reporting NaN for PRV", err)
                return math.nan
        return float(self._accountants[name].get_epsilon(delta=self.delta))

    def epsilons(self) -> dict[str, float]:
        return {name: self.epsilon(name) for name in ACCOUNTANTS}

    def epsilon_after_next(self, noise_multiplier: float, sample_rate: float) -> float:
        """Epsilon (primary accountant) if one more step were taken."""
        probe = _new_accountant(self.accountant)
        probe.history = self.history
        probe.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        return float(probe.get_epsilon(delta=self.delta))

    def state_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "accountant": self.accountant, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta = state["delta"]
        self.accountant = state["accountant"]
        for acc in self._accountants.values():
            acc.history = [tuple(entry) for entry in state["history"]]
