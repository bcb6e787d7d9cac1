"""The ledger composes several private mechanisms into one epsilon; calibration accounts for what was spent."""

from __future__ import annotations

import pytest

from dp_diffusion.privacy.accounting import PrivacyLedger, calibrate_after, epsilon_for

TEACHER = (1.5, 0.05, 300)   # (sigma, q, steps): e.g. a DP teacher's history read from its checkpoint
STUDENT = (1.6, 0.02, 900)


def google_epsilons(histories, delta):
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in histories
    ])
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event)
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(event)
    return rdp.get_epsilon(delta), pld.get_epsilon(delta)


def two_mechanism_ledger(delta: float) -> PrivacyLedger:
    ledger = PrivacyLedger(delta=delta)
    ledger.record("teacher", [TEACHER])
    sigma, q, steps = STUDENT
    for _ in range(steps):
        ledger.step(sigma, q, mechanism="student")
    return ledger


def test_composed_epsilon_of_two_mechanisms_matches_google_dp_accounting():
    delta = 1e-5
    ledger = two_mechanism_ledger(delta)
    assert ledger.mechanisms == {"teacher": [TEACHER], "student": [STUDENT]}
    assert ledger.steps_of("student") == 900 and ledger.steps == 1200
    rdp, pld = google_epsilons([TEACHER, STUDENT], delta)
    assert ledger.epsilon("rdp") == pytest.approx(rdp, rel=0.01)
    assert ledger.epsilon("prv") == pytest.approx(pld, rel=0.01)
    shares = ledger.shares()
    alone = [shares[name]["epsilon_prv"] for name in ("teacher", "student")]
    assert max(alone) < ledger.epsilon("prv") < sum(alone)  # composition costs more than either, less than the sum


def test_ledger_state_round_trips_and_reads_single_history_checkpoints():
    ledger = two_mechanism_ledger(1e-5)
    restored = PrivacyLedger(delta=0.1)
    restored.load_state_dict(ledger.state_dict())
    assert restored.mechanisms == ledger.mechanisms and restored.delta == 1e-5
    old_format = {"delta": 1e-5, "accountant": "prv", "history": [(1.3, 0.064, 300)]}
    restored.load_state_dict(old_format)
    assert restored.mechanisms == {"dp_sgd": [(1.3, 0.064, 300)]}
    with pytest.raises(ValueError, match="already holds"):
        ledger.record("teacher", [TEACHER])


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibration_after_a_prior_history_meets_the_total_target(accountant):
    delta, target, (q, steps) = 1e-5, 4.0, STUDENT[1:]
    sigma, used = calibrate_after(target, delta, q, steps, prior=[TEACHER], accountant=accountant)
    total = PrivacyLedger(delta=delta, accountant=used)
    total.record("teacher", [TEACHER])
    total.record("student", [(sigma, q, steps)])
    assert target - 0.05 <= total.epsilon() <= target
    alone = epsilon_for(sigma, q, steps, delta, used)
    assert alone < target  # the student alone gets less than the whole budget
    with pytest.raises(ValueError, match="nothing is left"):
        calibrate_after(2.5, delta, q, steps, prior=[TEACHER], accountant=accountant)
