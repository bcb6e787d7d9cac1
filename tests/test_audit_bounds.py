"""The audit's lower bounds on epsilon, on cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dp_diffusion.audit.bounds import (
    audit_bounds,
    clopper_pearson_epsilon_lower_bound,
    clopper_pearson_upper,
    membership_auc,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    threshold_epsilon,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_correct_pure_dp_matches_the_closed_form(r):
    # With delta = 0 and W = r: P[Binomial(r, p) >= r] = p^r <= beta  <=>  eps >= logit(beta^(1/r)).
    assert one_run_epsilon_lower_bound(r, r, r, 0.0, 0.05) == pytest.approx(logit(0.05 ** (1 / r)), abs=1e-6)


def test_all_correct_grows_with_the_number_of_guesses_and_stays_finite():
    bounds = [one_run_epsilon_lower_bound(r, r, 1000, 1e-5, 0.05) for r in (10, 50, 200, 1000)]
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert 5.0 < bounds[-1] < 7.0  # 1,000 right guesses cannot reject much more than log(1000)


def test_the_delta_term_lowers_the_bound_monotonically():
    bounds = [one_run_epsilon_lower_bound(90, 100, 100, d, 0.05) for d in (0.0, 1e-6, 1e-4, 1e-3)]
    assert bounds[0] > 0
    assert all(a >= b for a, b in zip(bounds, bounds[1:]))
    assert bounds[0] > bounds[-1]
    # And the p-value with delta is never below the pure-DP one.
    assert one_run_p_value(90, 100, 100, 1.0, 1e-4) >= one_run_p_value(90, 100, 100, 1.0, 0.0)


def test_half_right_rejects_nothing():
    assert one_run_epsilon_lower_bound(50, 100, 100, 1e-5, 0.05) == 0.0
    assert one_run_epsilon_lower_bound(0, 0, 100, 1e-5, 0.05) == 0.0


def test_random_scores_give_a_bound_near_zero():
    rng = np.random.default_rng(0)
    scores, members = rng.normal(size=1000), rng.random(1000) < 0.5
    result = audit_bounds(scores, members, 1e-5, 0.05)
    assert abs(result["auc"] - 0.5) < 0.05
    assert result["epsilon_lower_bound"] < 0.2


def test_one_run_bound_is_valid_for_randomized_response():
    # An eps-DP mechanism per canary (randomized response at eps = 1): the bound exceeds 1
    # with probability <= beta. 200 audits at beta = 0.1: expect <= 20, allow a margin.
    rng = np.random.default_rng(1)
    eps, m, beta, exceed = 1.0, 200, 0.1, 0
    for _ in range(200):
        members = rng.random(m) < 0.5
        truthful = rng.random(m) < 1 / (1 + math.exp(-eps))
        correct = int(np.sum(truthful))  # guess the reported bit for every canary
        exceed += one_run_epsilon_lower_bound(correct, m, m, 0.0, beta) > eps
    assert exceed <= 30


def test_clopper_pearson_upper_limit():
    assert clopper_pearson_upper(0, 10, 0.05) == pytest.approx(1 - 0.05 ** (1 / 10))  # exact at 0 successes
    assert clopper_pearson_upper(10, 10, 0.05) == 1.0


def test_threshold_epsilon_known_case_and_delta():
    # No errors in 100 + 100: FPR_hi = FNR_hi = 1 - 0.025^(1/100); eps = log((1 - FNR_hi) / FPR_hi).
    hi = 1 - 0.025 ** (1 / 100)
    assert threshold_epsilon(0, 100, 0, 100, 0.0, 0.05) == pytest.approx(math.log((1 - hi) / hi))
    assert threshold_epsilon(0, 100, 0, 100, 1e-2, 0.05) < threshold_epsilon(0, 100, 0, 100, 0.0, 0.05)
    assert threshold_epsilon(50, 100, 50, 100, 0.0, 0.05) == 0.0


def test_clopper_pearson_separated_scores_give_a_positive_bound():
    rng = np.random.default_rng(2)
    members = rng.random(400) < 0.5
    eps, threshold = clopper_pearson_epsilon_lower_bound(members + 0.01 * rng.normal(size=400), members, 1e-5, 0.05)
    assert 2.5 < eps < 6 and 0.05 < threshold < 1.05  # any threshold between the two groups


def test_auc():
    assert membership_auc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([True, True, False, False])) == 1.0
    assert membership_auc(np.array([0.0, 1.0]), np.array([True, False])) == 0.0
    assert membership_auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
