"""The privacy report every training run writes (`privacy.json`) and prints."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dp_diffusion.privacy.accounting import PrivacyLedger
from dp_diffusion.privacy.spec import PrivacyPlan, PrivacySpec


@dataclass
class Coverage:
    """What the guarantee covers: stated by each method, printed in every report."""

    released: list[str]
    trained_with_dp: list[str]
    saw_private_data_without_dp: list[str] = field(default_factory=list)
    never_saw_private_data: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def build_report(
    spec: PrivacySpec,
    plan: PrivacyPlan,
    ledger: PrivacyLedger,
    coverage: Coverage,
    stopped_by_budget: bool = False,
) -> dict[str, Any]:
    epsilons = ledger.epsilons() if spec.enabled else {"prv": math.inf, "rdp": math.inf}
    notes = list(coverage.notes)
    if not spec.enabled:
        notes.insert(0, "privacy=none: NO differential-privacy guarantee for this run")
    if spec.enabled and spec.log_private_loss:
        notes.append("privacy.log_private_loss=true: logged training losses are NOT covered")
    return {
        "private": spec.enabled,
        "epsilon": epsilons.get(ledger.accountant if spec.enabled else "prv"),
        "epsilon_prv": epsilons["prv"],
        "epsilon_rdp": epsilons["rdp"],
        "target_epsilon": spec.epsilon if spec.enabled else None,
        "delta": spec.delta if spec.enabled else None,
        "accountant": plan.accountant,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "expected_batch_size": plan.expected_batch_size,
        "steps": ledger.steps if spec.enabled else None,
        "planned_steps": plan.steps,
        "max_grad_norm": spec.max_grad_norm if spec.enabled else None,
        "noise_multiplicity": spec.noise_multiplicity,
        "dataset_size": plan.num_examples,
        "stopped_by_budget": stopped_by_budget,
        "history": ledger.history,
        "covers": {**asdict(coverage), "notes": notes},
    }


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
        head = (
            f"privacy: ({report['epsilon_prv']:.3g} by PRV, {report['epsilon_rdp']:.3g} by RDP; "
            f"target {report['target_epsilon']:g}), delta={report['delta']:g} | "
            f"sigma={report['noise_multiplier']:.4g} q={report['sample_rate']:.4g} "
            f"steps={report['steps']}/{report['planned_steps']} C={report['max_grad_norm']:g} "
            f"K={report['noise_multiplicity']} N={report['dataset_size']}"
        )
    lines = [head, f"  released: {', '.join(covers['released'])}"]
    if covers["trained_with_dp"]:
        lines.append(f"  trained with DP on private data: {', '.join(covers['trained_with_dp'])}")
    if covers["saw_private_data_without_dp"]:
        lines.append(f"  saw private data WITHOUT DP: {', '.join(covers['saw_private_data_without_dp'])}")
    if covers["never_saw_private_data"]:
        lines.append(f"  never saw private data: {', '.join(covers['never_saw_private_data'])}")
    lines += [f"  note: {n}" for n in covers["notes"]]
    if report["stopped_by_budget"]:
        lines.append("  training stopped by the budget guard before exceeding the target epsilon")
    return "\n".join(lines)
