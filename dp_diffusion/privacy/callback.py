"""The DP callback every private-training module gets: the run's privacy state and what happens around the steps.

`DPCallback` holds the plan (sigma calibrated once), the ledger of every private mechanism, the budget
guard's decision, the privacy randomness (Poisson masks and noise) and their checkpointed state, and it
does the work a method never writes itself:

- calibration (`ensure_plan`): sigma for this run's private parts, composed with any history the ledger
  already holds from elsewhere (e.g. a DP teacher's), so that the total meets the target;
- the budget guard (`on_train_batch_start`): no logical step that would take the composed epsilon past
  the target; training stops, says so, and keeps a valid checkpoint;
- the privacy state in checkpoints (`on_save_checkpoint` / `on_load_checkpoint`, under `CHECKPOINT_KEY`),
  and the check that a resumed run asks the checkpoint's privacy settings;
- the headline epsilon in the logs (`privacy/epsilon`) and the privacy report.

`PrivateTrainingModule.configure_callbacks()` returns the module's callback, so a plain
`L.Trainer(...).fit(module)` gets it, beside any callbacks given to the trainer. Lightning
(`Trainer._run`) attaches the model's callbacks (`_attach_model_callbacks`) right after
`strategy.connect(model)`, before the `setup` hooks and before `_restore_modules_and_callbacks` restores a
checkpoint (module hook first, then the callbacks' `on_load_checkpoint`), and both come before
`strategy.setup` calls `configure_optimizers`: a resumed run's plan and ledger are restored before the
engines are built from them. (Strategies with `restore_checkpoint_after_setup`, e.g. DeepSpeed, restore
after the optimizers are built and are not supported.)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from dp_diffusion.privacy.accounting import History, PrivacyLedger, calibrate_after, epsilon_for, headline_epsilon
from dp_diffusion.privacy.randomness import NoiseStream, PrivacyRandomness
from dp_diffusion.privacy.report import build_report
from dp_diffusion.privacy.spec import PrivacyPlan, PrivacySpec, make_plan
from dp_diffusion.privacy.validation import PrivacyError

if TYPE_CHECKING:
    from dp_diffusion.privacy.lightning import PrivateTrainingModule

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "dp_diffusion_privacy"
# What a resumed run must share with its checkpoint, and the config key each one comes from.
RESUME_SETTINGS = {
    "enabled": "privacy.enabled",
    "epsilon": "privacy.epsilon",
    "delta": "privacy.delta",
    "max_grad_norm": "privacy.max_grad_norm",
    "noise_multiplicity": "privacy.noise_multiplicity",
    "batch_size": "train.batch_size",
    "num_examples": "N (training examples)",
    "accountant": "privacy.accountant",
    "noise_multiplier": "privacy.noise_multiplier",
    "reproducible": "privacy.reproducible",
    "secure_mode": "privacy.secure_mode",
}


def resume_settings(spec: dict[str, Any], batch_size: float | None, num_examples: int | None) -> dict[str, Any]:
    """The settings a resume compares (`RESUME_SETTINGS`), from a spec's fields and the batch/data sizes."""
    values = {**spec, "batch_size": batch_size, "num_examples": num_examples}
    return {key: values.get(key, False if key in ("reproducible", "secure_mode") else None)
            for key in RESUME_SETTINGS}


def check_resume_settings(stored: dict[str, Any], given: dict[str, Any]) -> None:
    """Raise PrivacyError, in one line naming each differing key, unless the run asks what the checkpoint used.

    Planned steps may differ: the budget guard stops a run that asks for more.
    A key unknown on either side (None) is not compared.
    """

    def text(value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    differing = [key for key in RESUME_SETTINGS
                 if stored.get(key) is not None and given.get(key) is not None and stored[key] != given[key]]
    if differing:
        was = ", ".join(f"{RESUME_SETTINGS[k]}={text(stored[k])}" for k in differing)
        asks = ", ".join(f"{RESUME_SETTINGS[k]}={text(given[k])}" for k in differing)
        raise PrivacyError(f"resume: checkpoint was trained with {was}; this run asks {asks}: "
                           "resume with the same privacy settings or start a new run")


def max_steps_within_budget(plan: PrivacyPlan, spec: PrivacySpec, mechanisms: int = 1, prior: History = ()) -> int:
    """Logical steps the run may take: the planned ones, or fewer if they would exceed the target.

    Stopping at the plan is deliberate: sigma was calibrated for it, and a later
    override of the step count must not silently spend more. With `mechanisms`
    private parts each taking one step at (sigma, q) per logical step, n logical
    steps compose k*n identical steps: the ledger's composed epsilon after n logical
    steps is exactly `epsilon_for(sigma, q, k*n)` (composition does not depend on order),
    composed with `prior`, the history the ledger held before this run (a DP teacher's).
    """

    def within(n: int) -> bool:
        if not prior:
            return epsilon_for(plan.noise_multiplier, plan.sample_rate, n * mechanisms, spec.delta,
                               plan.accountant) <= spec.epsilon
        new = [(plan.noise_multiplier, plan.sample_rate, n * mechanisms)] if n else []
        return headline_epsilon([*prior, *new], spec.delta, plan.accountant)[0] <= spec.epsilon

    if within(plan.steps):
        return plan.steps
    low, high = 0, plan.steps  # within(low) holds (or nothing is left: 0), within(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if within(mid) else (low, mid)
    return low


def global_rng_state() -> dict[str, Any]:
    """torch's global CPU (and, if initialised, CUDA) generator states: the step's other draws."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng(state: dict[str, Any], rank: int = 0) -> None:
    """Continue the global generators from `global_rng_state()` (CUDA only on as many devices as stored).

    Only rank 0's states are stored; other ranks continue from a seed drawn from them and offset by their
    rank, so their diffusion draws stay distinct from rank 0's (these draws protect no privacy).
    """
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if rank > 0:
        torch.manual_seed(int(torch.randint(2**62, (1,)).item()) + rank)


class DPCallback(Callback):
    """The run's privacy state and the DP machinery around a `PrivateTrainingModule`'s steps.

    One per module (the module makes it and returns it from `configure_callbacks`); its methods take the
    module for what only the module knows: the private data set's size and the names of its private parts.
    `keep_rng_in_checkpoint`: False leaves the secret the masks and the noise derive from out of the
    checkpoints written meanwhile (a released `final.ckpt`).
    """

    def __init__(self, privacy: PrivacySpec, batch_size: int, planned_steps: int, seed: int = 0) -> None:
        self.spec = privacy
        self.batch_size = batch_size
        self.planned_steps = planned_steps
        self.seed = seed
        self.plan: PrivacyPlan | None = None
        self.allowed_steps: int | None = None
        self.ledger = PrivacyLedger(delta=privacy.delta, accountant=privacy.accountant)
        self.stopped_by_budget = False
        self.keep_rng_in_checkpoint = True
        # Privacy randomness: made when training starts (or restored from a checkpoint), never logged.
        self.randomness: PrivacyRandomness | None = None
        self.noise = NoiseStream(None)
        self.rounds_taken = 0  # Poisson rounds handed to training_step: the mask stream's counter
        self.step_allowed = True  # the guard's decision for the batch in hand
        self.in_fit = False  # between `setup` and `teardown`: Lightning restores checkpoints through the hooks
        self._stored_randomness: dict[str, Any] | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._epsilon_cache: tuple[int, float] | None = None

    # ---- calibration and the guard -------------------------------------------------------
    @staticmethod
    def mechanisms(module: PrivateTrainingModule) -> list[str]:
        """The ledger's names of this run's private parts."""
        return [module.mechanism_name(part) for part in module.private_parts()]

    def prior_history(self, module: PrivateTrainingModule) -> History:
        """What the ledger holds from elsewhere (mechanisms recorded before this run, e.g. a DP teacher's)."""
        own = set(self.mechanisms(module))
        return [entry for name, history in self.ledger.mechanisms.items() if name not in own for entry in history]

    def ensure_plan(self, module: PrivateTrainingModule) -> PrivacyPlan:
        """Calibrate sigma once. With k private parts, each taking one step per logical step at the same
        (sigma, q), sigma is calibrated for k*planned steps: the composition of k mechanisms of n identical
        steps is one mechanism of k*n steps. A history already in the ledger (`prior_history`) is composed
        in: sigma is the smallest that keeps prior + k*n steps within the target (`calibrate_after`).
        `plan.steps` stays in logical steps."""
        parts = len(self.mechanisms(module))
        prior = self.prior_history(module)
        if self.plan is None:
            if module.train_set is None:
                raise RuntimeError("attach_private_data(dataset) must be called before training")
            num_examples = len(module.train_set)
            spec = self.spec
            if prior and spec.enabled and spec.noise_multiplier is None:
                try:  # q = B/N, as make_plan's
                    sigma, used = calibrate_after(spec.epsilon, spec.delta, self.batch_size / num_examples,
                                                  self.planned_steps * parts, prior, spec.accountant)
                except ValueError as err:
                    raise PrivacyError(f"privacy.epsilon={spec.epsilon:g}: {err}") from None
                spec = replace(spec, noise_multiplier=sigma, accountant=used)
            self.plan = make_plan(spec, num_examples, self.batch_size, self.planned_steps * parts)
            if parts > 1:
                self.plan = replace(self.plan, steps=self.planned_steps)
        # One epsilon: the accountant that calibrated sigma (RDP where PRV could not) also guards and reports.
        self.ledger.accountant = self.plan.accountant
        if self.allowed_steps is None:
            spec = replace(self.spec, accountant=self.plan.accountant)
            self.allowed_steps = (max_steps_within_budget(self.plan, spec, mechanisms=parts, prior=prior)
                                  if spec.enabled else self.plan.steps)
        return self.plan

    def logical_steps(self, module: PrivateTrainingModule) -> int:
        """Logical DP steps taken: the most steps any of this run's private parts has taken (each takes one
        per logical step); mechanisms recorded from elsewhere (a DP teacher's history) do not count."""
        return max((self.ledger.steps_of(name) for name in self.mechanisms(module)), default=0)

    def budget_exhausted(self, module: PrivateTrainingModule) -> bool:
        """True when one more logical step would take the composed epsilon of all mechanisms past the target."""
        return self.spec.enabled and self.logical_steps(module) >= (self.allowed_steps or 0)

    def open_step(self, trainer: L.Trainer, module: PrivateTrainingModule) -> bool:
        """Start of a logical step: count the Poisson round, continue the global generators on resume, and
        apply the budget guard. False: the budget is spent, take no step (training stops)."""
        self.rounds_taken += 1
        if self._pending_rng is not None:
            # Restored here, not on load: between load and the first step Lightning
            # builds the loader and prefetches, which must not shift the stream.
            restore_global_rng(self._pending_rng, rank=module.global_rank)
            self._pending_rng = None
        if self.budget_exhausted(module):
            if not self.stopped_by_budget:
                log.warning("privacy budget guard: %d steps taken; one more would exceed epsilon=%g. Stopping.",
                            self.logical_steps(module), self.spec.epsilon)
            self.stopped_by_budget = True
            trainer.should_stop = True
            return False
        return True

    # ---- randomness ---------------------------------------------------------------------
    def ensure_randomness(self) -> PrivacyRandomness:
        """The run's privacy randomness: restored from the checkpoint, or fresh (all ranks must call this)."""
        if self.randomness is None:
            self.randomness = PrivacyRandomness.for_run(self.spec.secure_mode, self.spec.reproducible, self.seed)
            if self._stored_randomness is not None:
                self._restore_randomness(self._stored_randomness)
            self.randomness.share_from_rank0()
            self.noise.source = self.randomness
        return self.randomness

    def _restore_randomness(self, state: dict[str, Any]) -> None:
        self.rounds_taken = state["rounds_taken"]
        self.noise.steps_drawn = state["noise_steps"]
        if self.randomness is None:
            return  # restored by ensure_randomness
        if state.get("secret") is not None:
            self.randomness.load_state_dict(state)
        elif self.randomness.kind == "entropy":
            log.warning("resume: the checkpoint holds no privacy generator state (a released checkpoint); "
                        "the Poisson masks and the noise continue from fresh OS entropy")

    def _randomness_state(self) -> dict[str, Any]:
        """Counters always; the secret only if kept, and never for secure mode (nothing to store)."""
        randomness = self.randomness  # None before training starts: nothing drawn yet
        keep = randomness is not None and randomness.checkpointable and self.keep_rng_in_checkpoint
        return {"kind": randomness.kind if randomness else None, "secret": randomness.secret if keep else None,
                "rounds_taken": self.rounds_taken, "noise_steps": self.noise.steps_drawn}

    # ---- checkpoints ----------------------------------------------------------------------
    def resume_settings(self, module: PrivateTrainingModule) -> dict[str, Any]:
        """This run's values of the settings a resume must share (`RESUME_SETTINGS`)."""
        num_examples = len(module.train_set) if module.train_set is not None else None
        return resume_settings(asdict(self.spec), self.batch_size, num_examples)

    def check_resume(self, checkpoint: dict[str, Any], module: PrivateTrainingModule) -> None:
        """Raise PrivacyError if `checkpoint`'s privacy settings differ from this run's (see `check_resume_settings`)."""
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        plan = state.get("plan") or {}
        stored = state.get("settings") or resume_settings(
            state["spec"], plan.get("expected_batch_size"), plan.get("num_examples"))
        check_resume_settings(stored, self.resume_settings(module))

    def save_state(self, checkpoint: dict[str, Any], module: PrivateTrainingModule) -> None:
        """Write the privacy state into `checkpoint` under `CHECKPOINT_KEY`."""
        checkpoint[CHECKPOINT_KEY] = {
            "spec": asdict(self.spec),
            "plan": self.plan.to_dict() if self.plan else None,
            "allowed_steps": self.allowed_steps,
            "ledger": self.ledger.state_dict(),
            "stopped_by_budget": self.stopped_by_budget,
            "settings": self.resume_settings(module),
            "randomness": self._randomness_state(),
            "global_rng": global_rng_state(),
        }

    def load_state(self, checkpoint: dict[str, Any], module: PrivateTrainingModule) -> None:
        """Restore the privacy state `save_state` wrote (after `check_resume`); a checkpoint without one is left alone."""
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        self.check_resume(checkpoint, module)
        # sigma is calibrated once and stored: a resumed run keeps it.
        self.plan = PrivacyPlan(**state["plan"]) if state["plan"] else None
        self.allowed_steps = state["allowed_steps"]
        self.ledger.load_state_dict(state["ledger"])
        if self.plan is not None:
            self.ledger.accountant = self.plan.accountant
        self.stopped_by_budget = state["stopped_by_budget"]
        if "randomness" in state:
            self._stored_randomness = state["randomness"]
            self._restore_randomness(state["randomness"])
        self._pending_rng = state.get("global_rng")

    # ---- epsilon and the report -----------------------------------------------------------
    def epsilon_spent(self, trainer: L.Trainer, module: PrivateTrainingModule) -> float:
        """The headline epsilon (`PrivacyLedger.headline`), the number the report gives too.

        Recomputed on the trainer's logging steps and the last step only: PRV takes
        about 0.17 s for a 600-step history on a 2-core CPU, a third of a DPDM step;
        in between the progress bar shows the value of the last logging step.
        """
        every = max(1, trainer.log_every_n_steps)
        steps = self.logical_steps(module)
        max_steps = trainer.max_steps if trainer.max_steps > 0 else steps
        last = steps >= min(self.allowed_steps or steps, max_steps)
        if self._epsilon_cache is None or steps % every == 0 or last or self._epsilon_cache[0] > steps:
            self._epsilon_cache = (steps, self.ledger.epsilon())
        return self._epsilon_cache[1]

    def report(self, module: PrivateTrainingModule) -> dict[str, Any]:
        """The run's privacy report (`build_report`): what was spent, by whom, and what it covers."""
        return build_report(self.spec, self.ensure_plan(module), self.ledger, module.privacy_coverage(),
                            self.stopped_by_budget, steps=self.logical_steps(module))

    # ---- Lightning hooks --------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.in_fit = True
        self.step_allowed = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.in_fit = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.in_fit = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Private gradients are all-reduced by the DP optimizer after clipping and noise, not by DDP's
        # reducer (whose buckets would need equal chunk counts per rank); `public_step` all-reduces the rest.
        ddp = trainer.model
        if hasattr(ddp, "require_backward_grad_sync"):
            ddp.require_backward_grad_sync = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.step_allowed = self.open_step(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.step_allowed and self.spec.enabled:
            pl_module.log("privacy/epsilon", self.epsilon_spent(trainer, pl_module), prog_bar=True, batch_size=1)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.save_state(checkpoint, pl_module)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.load_state(checkpoint, pl_module)
