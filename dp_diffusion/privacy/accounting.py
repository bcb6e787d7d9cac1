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


History = list[tuple[float, float, int]]
DEFAULT_MECHANISM = "dp_sgd"


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




def _append_step(history: History, noise_multiplier: float, sample_rate: float) -> None:
    """One more step, merged into the last entry when (sigma, q) repeats (as Opacus's accountants do)."""
    if history and history[-1][:2] == (noise_multiplier, sample_rate):
        history[-1] = (noise_multiplier, sample_rate, history[-1][2] + 1)
    else:
        history.append((noise_multiplier, sample_rate, 1))


def calibrate_after(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: History,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> tuple[float, str]:
    """Smallest sigma (within tolerance) such that `prior` composed with `steps` new steps at rate
    `sample_rate` stays <= `epsilon`. Returns (sigma, accountant actually used).

    Written by hand: Opacus's `get_noise_multiplier` knows no prior history. The same bisection on sigma,
    over the composed history, with the same PRV-to-RDP fallback as `calibrate_noise_multiplier`.
    """
    if not prior:
        return calibrate_noise_multiplier(epsilon, delta, sample_rate, steps, accountant, epsilon_tolerance)
    spent, used = headline_epsilon(prior, delta, accountant)
    if spent >= epsilon:
        raise ValueError(f"the mechanisms already recorded spent epsilon={spent:.4g} (by {used.upper()}), "
                         f"nothing is left of the target {epsilon:g}")

    def composed(sigma: float) -> tuple[float, str]:
        return headline_epsilon([*prior, (sigma, sample_rate, steps)], delta, accountant)

    low, high = 0.0, 10.0
    while composed(high)[0] > epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon={epsilon:g} after the recorded mechanisms")
    while True:
        sigma = (low + high) / 2
        eps, used = composed(sigma)
        if eps > epsilon:
            low = sigma
        elif epsilon - eps <= epsilon_tolerance or high - low < 1e-6:
            break
        else:
            high = sigma
    eps, used = composed(high)
    return float(high), used


@dataclass
class PrivacyLedger:
    """Every DP step actually taken, by every mechanism of the run, with the composed epsilon by PRV and RDP.

    Each private mechanism (a DP teacher's history read from its checkpoint, a student's steps, a critic's)
    keeps its own (sigma, q, steps) history under a name; epsilon is that of their composition (both
    accountants compose heterogeneous Poisson-subsampled Gaussian steps). Serialises with the checkpoint
    so a resumed run continues the same histories.
    """

    delta: float
    accountant: str = "prv"

    def __post_init__(self) -> None:
        self.mechanisms: dict[str, History] = {}

    @property
    def history(self) -> History:
        """Every mechanism's (noise_multiplier, sample_rate, steps) runs, in the order mechanisms first stepped."""
        return [entry for history in self.mechanisms.values() for entry in history]

    @property
    def steps(self) -> int:
        """Steps of all mechanisms together."""
        return sum(n for _, _, n in self.history)

    def steps_of(self, mechanism: str) -> int:
        return sum(n for _, _, n in self.mechanisms.get(mechanism, []))

    def step(self, noise_multiplier: float, sample_rate: float, mechanism: str = DEFAULT_MECHANISM) -> None:
        _append_step(self.mechanisms.setdefault(mechanism, []), float(noise_multiplier), float(sample_rate))

    def record(self, mechanism: str, history: History) -> None:
        """Add a mechanism's whole history at once (e.g. a DP teacher's, read from its checkpoint)."""
        if mechanism in self.mechanisms:
            raise ValueError(f"the ledger already holds a mechanism named {mechanism!r}")
        self.mechanisms[mechanism] = [(float(s), float(q), int(n)) for s, q, n in history]

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

    def shares(self) -> dict[str, dict[str, Any]]:
        """Each mechanism alone: its history, steps and epsilon by both accountants (they do not add up:
        the composed epsilon is less than the sum)."""
        return {
            name: {
                "history": list(history),
                "steps": sum(n for _, _, n in history),
                **{f"epsilon_{acc}": _history_epsilon(history, self.delta, acc) for acc in ACCOUNTANTS},
            }
            for name, history in self.mechanisms.items()
        }

    def epsilon_after_next(self, noise_multiplier: float, sample_rate: float,
                           mechanism: str = DEFAULT_MECHANISM) -> float:
        """Headline epsilon if `mechanism` took one more step."""
        probe = {name: list(history) for name, history in self.mechanisms.items()}
        _append_step(probe.setdefault(mechanism, []), float(noise_multiplier), float(sample_rate))
        return headline_epsilon([e for h in probe.values() for e in h], self.delta, self.accountant)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "accountant": self.accountant, "history": self.history,
                "mechanisms": {name: list(history) for name, history in self.mechanisms.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta = state["delta"]
        self.accountant = state["accountant"]
        # Checkpoints written before mechanisms were named hold one history: the run's DP-SGD.
        mechanisms = state.get("mechanisms") or ({DEFAULT_MECHANISM: state["history"]} if state["history"] else {})
        self.mechanisms = {name: [tuple(entry) for entry in history] for name, history in mechanisms.items()}
