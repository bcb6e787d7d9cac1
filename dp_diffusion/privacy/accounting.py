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
# Above this RDP epsilon PRV is not even asked: its domain grows with epsilon (at 1e9 Opacus asked for a
# 118 TiB array); measured here, PRV still answered in < 1 s and < 1 GB at RDP epsilon 82.
PRV_MAX_EPSILON_TRIED = 100.0


def _new_accountant(name: str) -> PRVAccountant | RDPAccountant:
    if name == "prv":
        return PRVAccountant()
    if name == "rdp":
        return RDPAccountant()
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")


def _history_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon of a (sigma, q, steps) history by one accountant; NaN where PRV is out of its range or fails."""
    if not history:
        return 0.0
    if accountant == "prv" and _history_epsilon(history, delta, "rdp") > PRV_MAX_EPSILON_TRIED:
        return math.nan
    acc = _new_accountant(accountant)
    acc.history = list(history)
    if accountant == "rdp":
        return float(acc.get_epsilon(delta=delta))
    try:
        return float(acc.get_epsilon(delta=delta))
    except (ValueError, RuntimeError, MemoryError) as err:
        log.warning("PRV accountant failed (%s); PRV epsilon not available", err)
        return math.nan


def headline_epsilon(
    history: list[tuple[float, float, int]], delta: float, accountant: str
) -> tuple[float, str]:
    """(epsilon, accountant used): `accountant`'s value, or RDP's where PRV has none (never NaN).

    RDP's bound is looser than PRV's, so falling back never understates what was spent.
    """
    eps = _history_epsilon(history, delta, accountant)
    if math.isnan(eps):
        return _history_epsilon(history, delta, "rdp"), "rdp"
    return eps, accountant


def epsilon_for(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str
) -> float:
    """Epsilon spent by `steps` Poisson-subsampled Gaussian steps (RDP's where PRV has no value)."""
    if steps == 0:
        return 0.0
    return headline_epsilon([(noise_multiplier, sample_rate, steps)], delta, accountant)[0]


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
        """Epsilon spent so far. With no argument: the headline value (the primary accountant's, or RDP's
        where PRV has none; never NaN). With an accountant's name: that one's (NaN where PRV has none)."""
        if accountant is None:
            return self.headline()[0]
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        return _history_epsilon(self.history, self.delta, accountant)

    def headline(self) -> tuple[float, str]:
        """(epsilon, accountant used) of the one number a run shows everywhere."""
        return headline_epsilon(self.history, self.delta, self.accountant)

    def epsilons(self) -> dict[str, float]:
        return {name: self.epsilon(name) for name in ACCOUNTANTS}

    def epsilon_after_next(self, noise_multiplier: float, sample_rate: float) -> float:
        """Epsilon (primary accountant) if one more step were taken."""
        probe = _new_accountant("rdp")
        probe.history = self.history
        probe.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        return headline_epsilon(probe.history, self.delta, self.accountant)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "accountant": self.accountant, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta = state["delta"]
        self.accountant = state["accountant"]
        for acc in self._accountants.values():
            acc.history = [tuple(entry) for entry in state["history"]]
