"""The privacy report every training run writes (`privacy.json`) and prints."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dp_diffusion.privacy.accounting import PrivacyLedger, headline_epsilon
from dp_diffusion.privacy.spec import PrivacyPlan, PrivacySpec


@dataclass
class Coverage:
    """What the guarantee covers: stated by each method, printed in every report."""

    released: list[str]
    trained_with_dp: list[str]
    saw_private_data_without_dp: list[str] = field(default_factory=list)
    never_saw_private_data: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _as_run(coverage: Coverage, private: bool) -> Coverage:
    """The method's coverage as it holds for this run: without DP, what would be DP-trained saw private data plainly."""
    if private:
        return coverage
    return replace(
        coverage,
        trained_with_dp=[],
        saw_private_data_without_dp=[*coverage.trained_with_dp, *coverage.saw_private_data_without_dp],
    )


def randomness_statement(spec: PrivacySpec) -> str:
    """Where the noise and the Poisson masks came from, and whether anyone can reproduce them."""
    if spec.reproducible:
        return ("privacy.reproducible=true: the noise and the Poisson masks are seeded from the config's `seed`; "
                "anyone who knows the config can regenerate them, so the guarantee does NOT hold (debugging only)")
    if spec.secure_mode:
        return ("secure_mode: the noise and the Poisson masks come from the OS's cryptographically secure "
                "generator; nothing stored can regenerate them")
    return ("the noise and the Poisson masks are seeded from OS entropy at the start of the run (not from the "
            "config's `seed`, never logged); resumable checkpoints (last.ckpt, step*.ckpt) hold the generator "
            "states and must be kept as private as the data; final.ckpt does not hold them")


def build_report(
    spec: PrivacySpec,
    plan: PrivacyPlan,
    ledger: PrivacyLedger,
    coverage: Coverage,
    stopped_by_budget: bool = False,
    steps: int | None = None,
) -> dict[str, Any]:
    """The run's privacy report: one headline epsilon (the accountant that calibrated and guarded the run,
    or RDP where PRV has no value), both accountants' values, the schedule, and what the guarantee covers.

    `steps`: logical steps taken (default: the ledger's steps, which is that for a single mechanism); each
    mechanism's own count is in `mechanisms`."""
    coverage = _as_run(coverage, spec.enabled)
    notes = list(coverage.notes)
    public = [f"the private data set's size N={plan.num_examples} (it sets the sample rate q = B/N)"]
    if spec.enabled:
        epsilon, accountant = headline_epsilon(ledger.history, spec.delta, plan.accountant)
        epsilons = ledger.epsilons()
        if accountant != plan.accountant:
            notes.append(f"{plan.accountant.upper()} has no value for this history: the headline epsilon is "
                         f"{accountant.upper()}'s (a looser bound)")
        if not coverage.saw_private_data_without_dp:
            notes.append("during training every use of private data is inside DP-SGD; samples are post-processing")
        if spec.log_private_loss:
            notes.append("privacy.log_private_loss=true: logged training losses are NOT covered")
        notes.append(randomness_statement(spec))
    else:
        epsilon, accountant, epsilons = math.inf, None, {"prv": math.inf, "rdp": math.inf}
        notes.insert(0, "privacy=none: NO differential-privacy guarantee for this run")
    return {
        "private": spec.enabled,
        "epsilon": epsilon,
        "epsilon_accountant": accountant,
        "epsilon_prv": _finite_or_none(epsilons["prv"]),
        "epsilon_rdp": epsilons["rdp"],
        "target_epsilon": spec.epsilon if spec.enabled else None,
        "delta": spec.delta if spec.enabled else None,
        "accountant": plan.accountant,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "expected_batch_size": plan.expected_batch_size,
        "steps": (ledger.steps if steps is None else steps) if spec.enabled else None,
        "planned_steps": plan.steps,
        "max_grad_norm": spec.max_grad_norm if spec.enabled else None,
        "noise_multiplicity": spec.noise_multiplicity,
        "dataset_size": plan.num_examples,
        "stopped_by_budget": stopped_by_budget,
        "seeds_secret": spec.enabled and not spec.reproducible,
        "secure_mode": spec.secure_mode,
        "history": ledger.history,
        "mechanisms": _mechanisms(ledger) if spec.enabled else {},
        "treated_as_public": public,
        "covers": {**asdict(coverage), "notes": notes},
        "evaluation": [],
    }


def _mechanisms(ledger: PrivacyLedger) -> dict[str, dict[str, Any]]:
    return {name: {key: _finite_or_none(value) if isinstance(value, float) else value for key, value in share.items()}
            for name, share in ledger.shares().items()}


def _finite_or_none(value: float) -> float | None:
    """NaN (an accountant without a value) as JSON null; infinity stays (privacy=none)."""
    return None if math.isnan(value) else value


def describe_evaluation(metrics: dict[str, Any], reference_split: str, data_name: str) -> list[str]:
    """What evaluating `metrics` read of the private data, outside the guarantee (never released)."""
    if not metrics:
        return []
    lines = []
    fidelity = sorted(name for name, entry in metrics.items() if "backbone" in entry)
    if fidelity:
        split = "private train split" if reference_split == "train" else "real test split"
        lines.append(f"{', '.join(fidelity)} compare the samples with the {split} of {data_name} "
                     "(reference features computed without DP)")
        domain = sorted({entry["backbone"] for name, entry in metrics.items()
                         if "backbone" in entry and str(entry["backbone"]).startswith("domain")})
        if domain:
            lines.append(f"feature backbone {', '.join(domain)}: a classifier trained on real {data_name} images "
                         "without DP, cached on this machine; it is not released and not covered")
    downstream = sorted(name for name, entry in metrics.items() if "backbone" not in entry)
    if downstream:
        lines.append(f"{', '.join(downstream)}: classifiers trained on the samples and scored on the real test "
                     f"split of {data_name}")
    lines.append("evaluation results are statistics of real data outside the guarantee; they are not released "
                 "by the run and are not covered by its epsilon")
    return lines


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    return str(value)


def summary(report: dict[str, Any]) -> str:
    """A few human-readable lines for the console."""
    covers = report["covers"]
    if not report["private"]:
        head = "privacy: NONE (non-private baseline, no DP guarantee)"
    else:
        by = report["epsilon_accountant"].upper()
        other = "RDP" if by == "PRV" else "PRV"
        other_value = report[f"epsilon_{other.lower()}"]
        other_text = "n/a" if other_value is None else f"{other_value:.3g}"
        head = (
            f"privacy: epsilon={report['epsilon']:.3g} (by {by}; {other_text} by {other}; "
            f"target {report['target_epsilon']:g}), delta={report['delta']:g} | "
            f"sigma={report['noise_multiplier']:.4g} q={report['sample_rate']:.4g} "
            f"steps={report['steps']}/{report['planned_steps']} C={report['max_grad_norm']:g} "
            f"K={report['noise_multiplicity']} N={report['dataset_size']}"
        )
        if report.get("epsilon_is_guarantee") is False:
            head += " | NOT a differential-privacy guarantee (the paper's accounting; see the notes)"
    lines = [head, f"  released: {', '.join(covers['released'])}"]
    if covers["trained_with_dp"]:
        lines.append(f"  trained with DP on private data: {', '.join(covers['trained_with_dp'])}")
    if covers["saw_private_data_without_dp"]:
        lines.append(f"  saw private data WITHOUT DP: {', '.join(covers['saw_private_data_without_dp'])}")
    if covers["never_saw_private_data"]:
        lines.append(f"  never saw private data: {', '.join(covers['never_saw_private_data'])}")
    lines += [f"  note: {n}" for n in covers["notes"]]
    lines += [f"  treated as public: {p}" for p in report.get("treated_as_public", [])]
    lines += [f"  evaluation: {e}" for e in report.get("evaluation", [])]
    if report["stopped_by_budget"]:
        lines.append("  training stopped by the budget guard before exceeding the target epsilon")
    return "\n".join(lines)
