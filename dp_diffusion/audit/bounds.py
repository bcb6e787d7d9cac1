"""Empirical lower bounds on epsilon from a membership game over canaries.

Two bounds, each valid at confidence 1 - beta under the hypothesis that the
audited mechanism is (epsilon, delta)-DP:

* `one_run_epsilon_lower_bound`: the one-run audit of Steinke, Nasr and
  Jagielski ("Privacy Auditing with One (1) Training Run", NeurIPS 2023,
  arXiv 2305.08846). m canaries, each in with probability 1/2; the auditor
  makes r guesses ("in" for the k+ highest scores, "out" for the k- lowest) and
  W of them are right. The paper's main theorem for approximate DP: for all v,

      P[W >= v] <= f(v) + 2 m delta * max_{i=1..m} (f(v - i) - f(v)) / i,
      f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v].

  Without delta this is the pure-DP statement (W dominated by the binomial);
  dropping the delta term would overstate the bound.
* `clopper_pearson_epsilon_lower_bound`: the classical threshold test. For a
  fixed threshold, (epsilon, delta)-DP gives TPR <= e^eps FPR + delta and
  TNR <= e^eps FNR + delta, so eps >= log((1 - delta - FNR) / FPR) and
  eps >= log((1 - delta - FPR) / FNR); FPR and FNR are replaced by their
  Clopper-Pearson upper confidence limits. The threshold is chosen on one half
  of the canaries and evaluated on the other, so the choice costs no confidence.

scipy has the binomial and beta distributions; the tests built from them here
are not in any library we use (Opacus, Lightning), hence written out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

# Epsilons above this are reported as this value: no audit with a few thousand
# canaries can reject more (all of 1,000 guesses right rejects about 8).
EPSILON_CAP = 50.0


def one_run_p_value(correct: int, guesses: int, canaries: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[W >= correct] for an (epsilon, delta)-DP mechanism (Steinke et al., main theorem).

    `guesses` is r (the number of non-abstaining guesses), `canaries` is m.
    """
    if guesses == 0 or correct <= 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))  # e^eps / (1 + e^eps)

    def tail(v: np.ndarray | float) -> np.ndarray:  # f(v) = P[Binomial(r, p) >= v]
        return stats.binom.sf(np.ceil(v) - 1, guesses, p)

    bound = float(tail(correct))
    if delta > 0:
        i = np.arange(1, canaries + 1, dtype=np.float64)
        bound += 2 * canaries * delta * float(np.max((tail(correct - i) - bound) / i))
    return min(1.0, bound)


def largest_rejected_epsilon(p_value: Any, beta: float, cap: float = EPSILON_CAP, grid: int = 400) -> float:
    """sup{eps in [0, cap]: p_value(eps) <= beta}, or 0 when no epsilon is rejected.

    The sup of the rejected set, not the first crossing: a mechanism that is
    eps-DP is eps'-DP for every eps' >= eps, so the smallest bound over all
    eps' >= eps is itself valid and monotone, and it is <= beta exactly up to
    that sup. A grid scan finds the largest rejected grid point; bisection
    towards the next grid point keeps a rejected point, so the result never
    exceeds the sup.
    """
    points = np.linspace(0.0, cap, grid + 1)
    rejected = [e for e in points if p_value(float(e)) <= beta]
    if not rejected:
        return 0.0
    low = float(rejected[-1])
    if low >= cap:
        return cap
    high = low + cap / grid
    for _ in range(30):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if p_value(mid) <= beta else (low, mid)
    return low


def one_run_epsilon_lower_bound(correct: int, guesses: int, canaries: int, delta: float, beta: float) -> float:
    """The largest epsilon whose (epsilon, delta)-DP hypothesis `correct` of `guesses` rejects at level beta."""
    return largest_rejected_epsilon(lambda eps: one_run_p_value(correct, guesses, canaries, eps, delta), beta)


def clopper_pearson_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided upper confidence limit (level 1 - alpha) for a binomial proportion."""
    if trials == 0 or successes >= trials:
        return 1.0
    return float(stats.beta.ppf(1.0 - alpha, successes + 1, trials - successes))


def threshold_epsilon(false_pos: int, negatives: int, false_neg: int, positives: int, delta: float,
                      alpha: float) -> float:
    """Lower bound on epsilon from one threshold's errors, FPR and FNR each bounded at level alpha/2."""
    fpr_hi = clopper_pearson_upper(false_pos, negatives, alpha / 2)
    fnr_hi = clopper_pearson_upper(false_neg, positives, alpha / 2)
    candidates = [0.0]
    for miss, false_alarm in ((fnr_hi, fpr_hi), (fpr_hi, fnr_hi)):
        if 1.0 - delta - miss > 0:
            candidates.append(math.log((1.0 - delta - miss) / false_alarm) if false_alarm > 0 else EPSILON_CAP)
    return min(EPSILON_CAP, max(candidates))


def _errors_at(scores: np.ndarray, members: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    guess_in = scores >= threshold
    return (int(np.sum(guess_in & ~members)), int(np.sum(~members)),
            int(np.sum(~guess_in & members)), int(np.sum(members)))


def clopper_pearson_epsilon_lower_bound(
    scores: np.ndarray, members: np.ndarray, delta: float, beta: float, seed: int = 0
) -> tuple[float, float]:
    """(epsilon lower bound, chosen threshold): threshold picked on a random half, bound from the other half."""
    scores, members = np.asarray(scores, dtype=np.float64), np.asarray(members, dtype=bool)
    order = np.random.default_rng(seed).permutation(len(scores))
    select, evaluate = order[: len(order) // 2], order[len(order) // 2 :]
    candidates = np.unique(scores[select])
    if len(candidates) == 0:
        return 0.0, math.inf
    best = max(candidates, key=lambda t: threshold_epsilon(*_errors_at(scores[select], members[select], t),
                                                           delta, beta))
    return threshold_epsilon(*_errors_at(scores[evaluate], members[evaluate], best), delta, beta), float(best)


def membership_auc(scores: np.ndarray, members: np.ndarray) -> float:
    """P[score of a random member > score of a random non-member] (ties count 1/2): the ROC AUC."""
    scores, members = np.asarray(scores, dtype=np.float64), np.asarray(members, dtype=bool)
    if members.all() or not members.any():
        return math.nan
    ranks = stats.rankdata(scores)
    n_in, n_out = int(members.sum()), int((~members).sum())
    return float((ranks[members].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


@dataclass(frozen=True)
class GuessResult:
    """The one-run game at one guess budget: k+ "in" guesses, k- "out" guesses, how many right."""

    k_plus: int
    k_minus: int
    correct: int
    epsilon_lower_bound: float


def one_run_audit(scores: np.ndarray, members: np.ndarray, delta: float, beta: float,
                  guess_fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)) -> tuple[float, list[GuessResult]]:
    """Best one-run bound over guess budgets r = fraction * m (k+ = k- = r/2), Bonferroni over the budgets.

    Each budget is tested at beta / len(budgets), so the maximum over them holds
    at confidence 1 - beta: trying several budgets costs no validity.
    """
    scores, members = np.asarray(scores, dtype=np.float64), np.asarray(members, dtype=bool)
    m = len(scores)
    order = np.argsort(-scores, kind="stable")  # highest score first
    results = []
    level = beta / len(guess_fractions)
    for fraction in guess_fractions:
        k = max(1, int(round(fraction * m / 2)))
        k = min(k, m // 2)
        top, bottom = order[:k], order[m - k :]
        correct = int(members[top].sum() + (~members[bottom]).sum())
        eps = one_run_epsilon_lower_bound(correct, 2 * k, m, delta, level)
        results.append(GuessResult(k, k, correct, eps))
    return max(r.epsilon_lower_bound for r in results), results


def audit_bounds(scores: np.ndarray, members: np.ndarray, delta: float, beta: float, seed: int = 0) -> dict[str, Any]:
    """AUC and both lower bounds; each bound at beta/2, so the headline (their maximum) holds at 1 - beta."""
    one_run, games = one_run_audit(scores, members, delta, beta / 2)
    cp, threshold = clopper_pearson_epsilon_lower_bound(scores, members, delta, beta / 2, seed=seed)
    return {
        "auc": membership_auc(scores, members),
        "epsilon_lower_bound": max(one_run, cp),
        "confidence": 1.0 - beta,
        "epsilon_lower_bound_one_run": one_run,
        "epsilon_lower_bound_clopper_pearson": cp,
        "clopper_pearson_threshold": threshold,
        "one_run_games": [asdict(g) for g in games],
    }
