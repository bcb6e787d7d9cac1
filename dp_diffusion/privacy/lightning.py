"""The one interface methods use to train on private data: a LightningModule base.

A method subclasses `PrivateTrainingModule` and says only what is special about
it: which module sees private data (`private_module`), its optimizer, how a
batch gets its random draws (`prepare_batch`), its per-example loss, and what
the guarantee covers. Poisson sampling, calibration, per-example gradients,
clipping, noise, accounting, the budget guard and checkpointing of the privacy
state all happen here.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from typing import Any, Callable

import lightning as L
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset

from dp_diffusion.privacy.accounting import PrivacyLedger, epsilon_for
from dp_diffusion.privacy.engine import PrivateOptimization
from dp_diffusion.privacy.per_example import trainable_parameters
from dp_diffusion.privacy.report import Coverage, build_report
from dp_diffusion.privacy.sampling import poisson_loader
from dp_diffusion.privacy.spec import PrivacyPlan, PrivacySpec, make_plan
from dp_diffusion.privacy.validation import check_no_batch_mixing

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "dp_diffusion_privacy"


def max_steps_within_budget(plan: PrivacyPlan, spec: PrivacySpec) -> int:
    """Steps the run may take: the planned ones, or fewer if they would exceed the target.

    Stopping at the plan is deliberate: sigma was calibrated for it, and a later
    override of the step count must not silently spend more.
    """

    def within(n: int) -> bool:
        return epsilon_for(plan.noise_multiplier, plan.sample_rate, n, spec.delta, plan.accountant) <= spec.epsilon

    if within(plan.steps):
        return plan.steps
    low, high = 0, plan.steps  # within(low) holds, within(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if within(mid) else (low, mid)
    return low


class PrivateTrainingModule(L.LightningModule):
    """Manual-optimization LightningModule whose private gradients go through the privacy core."""

    def __init__(
        self,
        privacy: PrivacySpec,
        batch_size: int,
        physical_batch_size: int,
        steps: int,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.privacy_spec = privacy
        self.batch_size = batch_size
        self.physical_batch_size = physical_batch_size
        self.planned_steps = steps
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.plan: PrivacyPlan | None = None
        self.allowed_steps: int | None = None
        self.ledger = PrivacyLedger(delta=privacy.delta, accountant=privacy.accountant)
        self.stopped_by_budget = False
        self._engine: PrivateOptimization | None = None

    # ---- what a method provides -------------------------------------------------
    def private_module(self) -> nn.Module:
        """The module whose trainable parameters are updated from private data."""
        raise NotImplementedError

    def build_optimizer(self, params: list[nn.Parameter]) -> Optimizer:
        raise NotImplementedError

    def prepare_batch(self, batch: Any) -> Any:
        """Add every random draw the loss needs, so the loss is deterministic."""
        return batch

    def per_example_loss(self, model: Any, batch: Any) -> Tensor:
        """Loss of each example, shape (B,); `model` is `private_module()` or a functional view of it."""
        raise NotImplementedError

    def privacy_coverage(self) -> Coverage:
        raise NotImplementedError

    def on_private_step(self) -> None:
        """Called after each logical step actually taken (e.g. EMA update)."""

    def fit_public_stages(self, make_trainer: Callable[[int, str], L.Trainer]) -> None:
        """Train components that never see private data, before the private fit.

        `make_trainer(max_steps, name)` gives a Lightning trainer writing under
        the run's `name/` folder. Default: nothing to do.
        """

    # ---- plumbing ---------------------------------------------------------------
    def attach_private_data(self, dataset: Dataset) -> None:
        self.train_set = dataset

    def ensure_plan(self) -> PrivacyPlan:
        if self.plan is None:
            if self.train_set is None:
                raise RuntimeError("attach_private_data(dataset) must be called before training")
            self.plan = make_plan(self.privacy_spec, len(self.train_set), self.batch_size, self.planned_steps)
        if self.allowed_steps is None:
            spec = replace(self.privacy_spec, accountant=self.plan.accountant)
            self.allowed_steps = max_steps_within_budget(self.plan, spec) if spec.enabled else self.plan.steps
        return self.plan

    def configure_optimizers(self) -> Optimizer:
        plan = self.ensure_plan()
        module = self.private_module()
        if self.privacy_spec.enabled:
            check_no_batch_mixing(module)
        base = self.build_optimizer(list(trainable_parameters(module).values()))
        self._engine = PrivateOptimization(
            module, base, self.privacy_spec, plan, self.ledger, self.physical_batch_size
        )
        return self._engine.optimizer

    def train_dataloader(self) -> DataLoader:
        plan = self.ensure_plan()
        return poisson_loader(self.train_set, plan.sample_rate, self.seed, self.num_workers)

    def on_train_start(self) -> None:
        # Gradients are all-reduced by the DP optimizer after clipping and noise,
        # not by DDP's reducer (whose buckets would need equal chunk counts per rank).
        ddp = self.trainer.model
        if hasattr(ddp, "require_backward_grad_sync"):
            ddp.require_backward_grad_sync = False

    def budget_exhausted(self) -> bool:
        return self.privacy_spec.enabled and self.ledger.steps >= (self.allowed_steps or 0)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if self.budget_exhausted():
            if not self.stopped_by_budget:
                log.warning(
                    "privacy budget guard: %d steps taken; one more would exceed epsilon=%g. Stopping.",
                    self.ledger.steps,
                    self.privacy_spec.epsilon,
                )
            self.stopped_by_budget = True
            self.trainer.should_stop = True
            return None
        optimizer = self.optimizers()
        stats = self._engine.step(self.per_example_loss, self.prepare_batch(batch), optimizer.step)
        self.on_private_step()
        for name, value in stats.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=1)
        if self.privacy_spec.enabled:
            eps = self.ledger.epsilon("rdp")
            self.log("privacy/epsilon_rdp", eps, prog_bar=True, batch_size=1)
        return None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "spec": asdict(self.privacy_spec),
            "plan": self.plan.to_dict() if self.plan else None,
            "allowed_steps": self.allowed_steps,
            "ledger": self.ledger.state_dict(),
            "stopped_by_budget": self.stopped_by_budget,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        # sigma is calibrated once and stored: a resumed run keeps it.
        self.plan = PrivacyPlan(**state["plan"]) if state["plan"] else None
        self.allowed_steps = state["allowed_steps"]
        self.ledger.load_state_dict(state["ledger"])
        self.stopped_by_budget = state["stopped_by_budget"]

    def privacy_report(self) -> dict[str, Any]:
        return build_report(
            self.privacy_spec, self.ensure_plan(), self.ledger, self.privacy_coverage(), self.stopped_by_budget
        )

