"""The privacy report: one headline epsilon, and a statement of everything the guarantee does and does not cover."""

from __future__ import annotations

import json
import math

import pytest

from dp_diffusion.privacy import Coverage, PrivacyLedger, PrivacySpec, build_report, make_plan, summary
from dp_diffusion.privacy.report import describe_evaluation, write_report

DPDM_LIKE = Coverage(released=["EMA denoiser weights"], trained_with_dp=["denoiser (all parameters)"])


def ledger_after(plan, steps: int) -> PrivacyLedger:
    ledger = PrivacyLedger(delta=1e-5, accountant="prv")
    for _ in range(steps):
        ledger.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    return ledger


def test_huge_epsilon_has_a_finite_headline_from_the_calibrating_accountant():
    """privacy.epsilon=1e9 calibrates with RDP (PRV cannot): the headline is RDP's value, never NaN."""
    spec = PrivacySpec(epsilon=1e9, delta=1e-5, accountant="prv")
    with pytest.warns(UserWarning, match="RDP"):
        plan = make_plan(spec, num_examples=4000, batch_size=256, steps=20)
    assert plan.accountant == "rdp"
    report = build_report(spec, plan, ledger_after(plan, 20), DPDM_LIKE)
    assert math.isfinite(report["epsilon"]) and report["epsilon"] == report["epsilon_rdp"]
    assert report["epsilon_accountant"] == "rdp" and report["epsilon_prv"] is None
    assert report["epsilon"] <= 1e9
    json.loads(json.dumps(report), parse_constant=lambda c: pytest.fail(f"{c} in privacy.json"))
    assert "epsilon=1e+09 (by RDP; n/a by PRV" in summary(report)


def test_headline_is_prv_where_prv_calibrated():
    spec = PrivacySpec(epsilon=2.0, delta=1e-5)
    plan = make_plan(spec, num_examples=4000, batch_size=256, steps=50)
    report = build_report(spec, plan, ledger_after(plan, 50), DPDM_LIKE)
    assert report["epsilon_accountant"] == "prv" and report["epsilon"] == report["epsilon_prv"] <= 2.0
    assert report["epsilon_prv"] < report["epsilon_rdp"]
    assert report["mechanisms"]["dp_sgd"]["steps"] == 50
    assert report["mechanisms"]["dp_sgd"]["epsilon_prv"] == pytest.approx(report["epsilon"])


def test_non_private_run_claims_no_dp_use():
    spec = PrivacySpec(enabled=False, epsilon=math.inf, delta=0.0)
    plan = make_plan(spec, num_examples=4000, batch_size=256, steps=5)
    report = build_report(spec, plan, PrivacyLedger(delta=0.0), DPDM_LIKE)
    text = summary(report)
    assert report["covers"]["trained_with_dp"] == []
    assert report["covers"]["saw_private_data_without_dp"] == ["denoiser (all parameters)"]
    assert "trained with DP on private data" not in text and "inside DP-SGD" not in text
    assert "saw private data WITHOUT DP: denoiser" in text and report["seeds_secret"] is False


def test_report_states_what_is_treated_as_public_and_where_the_noise_came_from():
    plan_spec = PrivacySpec(epsilon=5.0, delta=1e-5)
    plan = make_plan(plan_spec, num_examples=4000, batch_size=256, steps=10)
    report = build_report(plan_spec, plan, ledger_after(plan, 10), DPDM_LIKE)
    assert any("N=4000" in line for line in report["treated_as_public"])
    assert report["seeds_secret"] is True
    assert any("OS entropy" in note for note in report["covers"]["notes"])
    assert any("inside DP-SGD" in note for note in report["covers"]["notes"])
    secure = build_report(PrivacySpec(epsilon=5.0, delta=1e-5, secure_mode=True), plan, ledger_after(plan, 10),
                          DPDM_LIKE)
    assert any("cryptographically secure" in note for note in secure["covers"]["notes"])
    partial = Coverage(released=["student"], trained_with_dp=["student"], saw_private_data_without_dp=["teacher"])
    assert not any("inside DP-SGD" in n for n in build_report(plan_spec, plan, ledger_after(plan, 10),
                                                               partial)["covers"]["notes"])


def test_evaluation_use_of_private_data_is_stated(tmp_path):
    metrics = {
        "fid": {"value": 30.0, "backbone": "domain-cnn[mnist5k-train]", "num_samples": 100},
        "kid": {"value": 0.1, "backbone": "domain-cnn[mnist5k-train]", "num_samples": 100},
        "acc_cnn": {"value": 0.7, "num_samples": 100, "num_test": 1000},
    }
    lines = describe_evaluation(metrics, "train", "mnist5k")
    text = "\n".join(lines)
    assert "fid, kid compare the samples with the private train split of mnist5k" in text
    assert "domain-cnn[mnist5k-train]" in text and "not released and not covered" in text
    assert "acc_cnn" in text and "real test split" in text
    assert describe_evaluation({}, "train", "mnist5k") == []
    spec = PrivacySpec(epsilon=5.0, delta=1e-5)
    plan = make_plan(spec, num_examples=4000, batch_size=256, steps=10)
    report = build_report(spec, plan, ledger_after(plan, 10), DPDM_LIKE)
    report["evaluation"] = lines
    written = json.loads(write_report(report, tmp_path / "privacy.json").read_text())
    assert written["evaluation"] == lines
    assert "evaluation: fid, kid compare" in summary(report)


def test_logged_epsilon_is_the_reports_headline_even_where_prv_has_none():
    """The progress bar / logger value, privacy.json's epsilon and the ledger's are one number."""
    import lightning as L
    from toy_models import ToyRegression, toy_dataset

    for spec in (PrivacySpec(epsilon=4.0, delta=1e-3), PrivacySpec(epsilon=1e9, delta=1e-3)):
        module = ToyRegression(spec, steps=7)
        module.attach_private_data(toy_dataset())
        L.Trainer(max_steps=7, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu", log_every_n_steps=5).fit(module)
        report = module.privacy_report()
        logged = float(module.trainer.callback_metrics["privacy/epsilon"])
        assert math.isfinite(report["epsilon"]) and report["steps"] == 7
        assert logged == pytest.approx(report["epsilon"], rel=1e-6)
        assert report["epsilon_accountant"] == module.ledger.headline()[1] == module.plan.accountant
