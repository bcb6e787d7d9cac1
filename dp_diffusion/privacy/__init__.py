"""The shared differential-privacy core: the only place that clips and noises."""

from dp_diffusion.privacy.accounting import PrivacyLedger, calibrate_noise_multiplier, epsilon_for
from dp_diffusion.privacy.callback import DPCallback
from dp_diffusion.privacy.engine import PrivateOptimization
from dp_diffusion.privacy.lightning import PrivateTrainingModule
from dp_diffusion.privacy.report import Coverage, build_report, summary, write_report
from dp_diffusion.privacy.spec import PrivacyPlan, PrivacySpec, make_plan, plan_steps
from dp_diffusion.privacy.validation import PrivacyError, check_no_batch_mixing

__all__ = [
    "Coverage",
    "DPCallback",
    "PrivacyError",
    "PrivacyLedger",
    "PrivacyPlan",
    "PrivacySpec",
    "PrivateOptimization",
    "PrivateTrainingModule",
    "build_report",
    "calibrate_noise_multiplier",
    "check_no_batch_mixing",
    "epsilon_for",
    "make_plan",
    "plan_steps",
    "summary",
    "write_report",
]
