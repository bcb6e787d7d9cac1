"""The one interface methods use to train on private data: a LightningModule base.

A method subclasses `PrivateTrainingModule` and says only what is special about
it: which module sees private data (`private_module`), its optimizer, how a
batch gets its random draws (`prepare_batch`), its per-example loss, and what
the guarantee covers. Poisson sampling, calibration, per-example gradients,
clipping, noise, accounting, the budget guard and checkpointing of the privacy
state all happen here.

A method with several parts names its private parts (`private_parts`), each
trained by its own DP-SGD engine and recorded in the ledger under its own name,
and its non-private parts' optimizers (`public_optimizers`); its
`training_step` calls `start_logical_step()`, then `private_step(part, ...)` once
per private part and `public_step(optimizer, loss)` for each non-private part.

Resuming continues every random stream a step draws from: the Poisson masks
and the noise (`randomness.PrivacyRandomness`, counted in rounds and noise
steps) and torch's global CPU/CUDA generators (the diffusion draws), and it
refuses a run whose privacy settings differ from the checkpoint's.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset

import torch.distributed as dist

from dp_diffusion.privacy.accounting import DEFAULT_MECHANISM, PrivacyLedger, epsilon_for
from dp_diffusion.privacy.engine import PrivateOptimization, is_distributed
from dp_diffusion.privacy.per_example import trainable_parameters
from dp_diffusion.privacy.randomness import NoiseStream, PrivacyRandomness
from dp_diffusion.privacy.report import Coverage, build_report
from dp_diffusion.privacy.sampling import poisson_loader
from dp_diffusion.privacy.spec import PrivacyPlan, PrivacySpec, make_plan
from dp_diffusion.privacy.validation import PrivacyError, check_no_batch_mixing

log = logging.getLogger(__name__)
DEFAULT_PART = "model"  # the one private part of a single-part method (`private_module()`)
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


def max_steps_within_budget(plan: PrivacyPlan, spec: PrivacySpec, mechanisms: int = 1) -> int:
    """Logical steps the run may take: the planned ones, or fewer if they would exceed the target.

    Stopping at the plan is deliberate: sigma was calibrated for it, and a later
    override of the step count must not silently spend more. With `mechanisms`
    private parts each taking one step at (sigma, q) per logical step, n logical
    steps compose k*n identical steps: the ledger's composed epsilon after n logical
    steps is exactly `epsilon_for(sigma, q, k*n)` (composition does not depend on order).
    """

    def within(n: int) -> bool:
        return epsilon_for(plan.noise_multiplier, plan.sample_rate, n * mechanisms, spec.delta,
                           plan.accountant) <= spec.epsilon

    if within(plan.steps):
        return plan.steps
    low, high = 0, plan.steps  # within(low) holds, within(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if within(mid) else (low, mid)
    return low


class PrivateTrainingModule(L.LightningModule):
    """Manual-optimization LightningModule whose private gradients go through the privacy core.

    `keep_privacy_rng_in_checkpoint`: set it to False before writing a checkpoint
    to release (e.g. `final.ckpt`): the secret the masks and the noise are
    derived from is then left out (with it, anyone could regenerate past noise).
    A run resumed from such a checkpoint draws fresh entropy and logs that it did.
    """

    keep_privacy_rng_in_checkpoint: bool = True

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
        self._engines: dict[str, PrivateOptimization] = {}
        # Privacy randomness: made when training starts (or restored from a checkpoint), never logged.
        self.randomness: PrivacyRandomness | None = None
        self.noise = NoiseStream(None)
        self.rounds_taken = 0  # Poisson rounds handed to training_step: the mask stream's counter
        self._stored_randomness: dict[str, Any] | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._epsilon_cache: tuple[int, float] | None = None

    # ---- what a method provides -------------------------------------------------
    def private_module(self) -> nn.Module:
        """The module whose trainable parameters are updated from private data."""
        raise NotImplementedError

    def private_parts(self) -> dict[str, nn.Module]:
        """Each module trained by DP-SGD on private data, by name; each gets its own engine and base optimizer
        (`build_optimizer`) and its own mechanism in the ledger. Default: one part, `private_module()`."""
        return {DEFAULT_PART: self.private_module()}

    def public_optimizers(self) -> list[Optimizer]:
        """Optimizers of the non-private parts (a critic, a public stage), stepped with `public_step`."""
        return []

    def build_optimizer(self, params: list[nn.Parameter]) -> Optimizer:
        """The base optimizer of a private part (called once per part with its trainable parameters)."""
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

    def mechanism_name(self, part: str) -> str:
        """The ledger's name for `part`'s steps: "dp_sgd" for the one part of a single-part method (as in
        checkpoints and reports written before parts were named), else the part's name."""
        return DEFAULT_MECHANISM if list(self.private_parts()) == [DEFAULT_PART] else part

    def ensure_plan(self) -> PrivacyPlan:
        """Calibrate sigma once. With k private parts, each taking one step per logical step at the same
        (sigma, q), sigma is calibrated for k*planned steps: the composition of k mechanisms of n identical
        steps is one mechanism of k*n steps. `plan.steps` stays in logical steps."""
        parts = len(self.private_parts())
        if self.plan is None:
            if self.train_set is None:
                raise RuntimeError("attach_private_data(dataset) must be called before training")
            self.plan = make_plan(self.privacy_spec, len(self.train_set), self.batch_size,
                                  self.planned_steps * parts)
            if parts > 1:
                self.plan = replace(self.plan, steps=self.planned_steps)
        # One epsilon: the accountant that calibrated sigma (RDP where PRV could not) also guards and reports.
        self.ledger.accountant = self.plan.accountant
        if self.allowed_steps is None:
            spec = replace(self.privacy_spec, accountant=self.plan.accountant)
            self.allowed_steps = (max_steps_within_budget(self.plan, spec, mechanisms=parts) if spec.enabled
                                  else self.plan.steps)
        return self.plan

    def ensure_randomness(self) -> PrivacyRandomness:
        """The run's privacy randomness: restored from the checkpoint, or fresh (all ranks must call this)."""
        if self.randomness is None:
            spec = self.privacy_spec
            self.randomness = PrivacyRandomness.for_run(spec.secure_mode, spec.reproducible, self.seed)
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

    def configure_optimizers(self) -> Optimizer | list[Optimizer]:
        """One DP optimizer per private part (all drawing from the run's noise stream), then the public ones."""
        plan = self.ensure_plan()
        self.ensure_randomness()
        self._engines = {}
        for part, module in self.private_parts().items():
            if self.privacy_spec.enabled:
                check_no_batch_mixing(module)
            base = self.build_optimizer(list(trainable_parameters(module).values()))
            self._engines[part] = PrivateOptimization(
                module, base, self.privacy_spec, plan, self.ledger, self.physical_batch_size, noise=self.noise,
                mechanism=self.mechanism_name(part),
            )
        optimizers = [engine.optimizer for engine in self._engines.values()] + self.public_optimizers()
        return optimizers[0] if len(optimizers) == 1 else optimizers

    def train_dataloader(self) -> DataLoader:
        plan = self.ensure_plan()
        return poisson_loader(self.train_set, plan.sample_rate, self.ensure_randomness(),
                              start_round=self.rounds_taken, num_workers=self.num_workers)

    def on_train_start(self) -> None:
        # Gradients are all-reduced by the DP optimizer after clipping and noise,
        # not by DDP's reducer (whose buckets would need equal chunk counts per rank).
        ddp = self.trainer.model
        if hasattr(ddp, "require_backward_grad_sync"):
            ddp.require_backward_grad_sync = False

    def logical_steps(self) -> int:
        """Logical DP steps taken: the most steps any of this run's private parts has taken (each takes one
        per logical step); mechanisms recorded from elsewhere (a DP teacher's history) do not count."""
        return max((self.ledger.steps_of(self.mechanism_name(part)) for part in self.private_parts()), default=0)

    def budget_exhausted(self) -> bool:
        """True when one more logical step would take the composed epsilon of all parts past the target."""
        return self.privacy_spec.enabled and self.logical_steps() >= (self.allowed_steps or 0)

    def start_logical_step(self) -> bool:
        """Start of every `training_step`: count the Poisson round, continue the global generators on
        resume, and apply the budget guard. False: the budget is spent, take no step (training stops)."""
        self.rounds_taken += 1
        if self._pending_rng is not None:
            # Restored here, not on load: between load and the first step Lightning
            # builds the loader and prefetches, which must not shift the stream.
            restore_global_rng(self._pending_rng, rank=self.global_rank)
            self._pending_rng = None
        if self.budget_exhausted():
            if not self.stopped_by_budget:
                log.warning(
                    "privacy budget guard: %d steps taken; one more would exceed epsilon=%g. Stopping.",
                    self.logical_steps(),
                    self.privacy_spec.epsilon,
                )
            self.stopped_by_budget = True
            self.trainer.should_stop = True
            return False
        return True

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if not self.start_logical_step():
            return None
        stats = self.private_step(DEFAULT_PART, self.per_example_loss, self.prepare_batch(batch))
        self.on_private_step()
        self.log_step(stats)
        return None

    def private_step(self, part: str, loss_fn: Callable[[Any, Any], Tensor], batch: Any) -> dict[str, Tensor]:
        """One logical DP-SGD step for private part `part`: per-example gradients of `loss_fn(model, batch)`
        (shape (B,)) for that part's trainable parameters only, clipping, noise from the run's noise stream,
        one ledger step under its mechanism name. Returns the engine's loggable statistics.

        The first private part steps through Lightning's optimizer wrapper (precision plugin, hooks, and
        the trainer's step count); further parts step their DP optimizer directly, because Lightning counts
        one global step per wrapped optimizer step and `trainer.max_steps` is in logical steps.
        """
        engine = self._engines[part]
        first = next(iter(self._engines)) == part
        optimizer = self._wrapped(engine.optimizer) if first else engine.optimizer
        return engine.step(loss_fn, batch, optimizer.step)

    def public_step(self, optimizer: Optimizer, loss: Tensor) -> Tensor:
        """One ordinary step of a non-private part: gradients of `loss` for `optimizer`'s parameters only
        (so a private part's .grad is untouched), averaged across ranks, then the optimizer's step.

        Averaged here by hand: `on_train_start` turned DDP's reducer off (require_backward_grad_sync=False)
        so that private gradients are summed only after clipping and noise; the public parts must not lose
        the all-reduce with it. Stepped directly, not through Lightning's wrapper, so that the trainer's
        step count stays one per logical step. Returns the detached loss.
        """
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer's torch optimizer
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        world_size = dist.get_world_size() if is_distributed() else 1
        for p, grad in zip(params, grads):
            p.grad = torch.zeros_like(p) if grad is None else grad
            if world_size > 1:
                dist.all_reduce(p.grad)
                p.grad /= world_size
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def log_step(self, stats: dict[str, Tensor], prefix: str = "train") -> None:
        """Log a private step's statistics and the headline epsilon."""
        for name, value in stats.items():
            self.log(f"{prefix}/{name}", value, prog_bar=name == "loss", batch_size=1)
        if self.privacy_spec.enabled:
            self.log("privacy/epsilon", self.epsilon_spent(), prog_bar=True, batch_size=1)

    def _wrapped(self, optimizer: Optimizer) -> Any:
        """Lightning's wrapper of `optimizer` when a trainer is attached, else `optimizer` itself."""
        if self._trainer is None:
            return optimizer
        optimizers = self.optimizers()
        for wrapper in optimizers if isinstance(optimizers, list) else [optimizers]:
            if wrapper.optimizer is optimizer:
                return wrapper
        return optimizer

    def epsilon_spent(self) -> float:
        """The headline epsilon (`PrivacyLedger.headline`), the number the report gives too.

        Recomputed on the trainer's logging steps and the last step only: PRV takes
        about 0.17 s for a 600-step history on a 2-core CPU, a third of a DPDM step;
        in between the progress bar shows the value of the last logging step.
        """
        every = max(1, self.trainer.log_every_n_steps)
        steps = self.logical_steps()
        max_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else steps
        last = steps >= min(self.allowed_steps or steps, max_steps)
        if self._epsilon_cache is None or steps % every == 0 or last or self._epsilon_cache[0] > steps:
            self._epsilon_cache = (steps, self.ledger.epsilon())
        return self._epsilon_cache[1]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "spec": asdict(self.privacy_spec),
            "plan": self.plan.to_dict() if self.plan else None,
            "allowed_steps": self.allowed_steps,
            "ledger": self.ledger.state_dict(),
            "stopped_by_budget": self.stopped_by_budget,
            "settings": self.resume_settings(),
            "randomness": self._randomness_state(),
            "global_rng": global_rng_state(),
        }

    def resume_settings(self) -> dict[str, Any]:
        """This run's values of the settings a resume must share (`RESUME_SETTINGS`)."""
        num_examples = len(self.train_set) if self.train_set is not None else None
        return resume_settings(asdict(self.privacy_spec), self.batch_size, num_examples)

    def _randomness_state(self) -> dict[str, Any]:
        """Counters always; the secret only if kept, and never for secure mode (nothing to store)."""
        randomness = self.randomness  # None before training starts: nothing drawn yet
        keep = randomness is not None and randomness.checkpointable and self.keep_privacy_rng_in_checkpoint
        return {"kind": randomness.kind if randomness else None, "secret": randomness.secret if keep else None,
                "rounds_taken": self.rounds_taken, "noise_steps": self.noise.steps_drawn}

    def check_resume(self, checkpoint: dict[str, Any]) -> None:
        """Raise PrivacyError if `checkpoint`'s privacy settings differ from this run's (see `check_resume_settings`).

        Lightning calls it on load; a caller may call it on a loaded checkpoint before `fit` to fail earlier.
        """
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        plan = state.get("plan") or {}
        stored = state.get("settings") or resume_settings(
            state["spec"], plan.get("expected_batch_size"), plan.get("num_examples"))
        check_resume_settings(stored, self.resume_settings())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        self.check_resume(checkpoint)
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

    def privacy_report(self) -> dict[str, Any]:
        return build_report(self.privacy_spec, self.ensure_plan(), self.ledger, self.privacy_coverage(),
                            self.stopped_by_budget, steps=self.logical_steps())



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
