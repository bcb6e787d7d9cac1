"""The one interface methods use to train on private data: a LightningModule base.

A method subclasses `PrivateTrainingModule` and says only what is special about
it: which module sees private data (`private_module`), its optimizer, how a
batch gets its random draws (`prepare_batch`), its per-example loss, and what
the guarantee covers. Per-example gradients, clipping and noise happen in
`private_step` (through the engines of `privacy/engine.py`); Poisson sampling in
the module's loader; calibration, the budget guard, the privacy state in
checkpoints, epsilon logging and the report in the module's `DPCallback`
(`privacy/callback.py`), which `configure_callbacks` hands to every trainer.

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

from typing import Any, Callable

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset

from dp_diffusion.privacy.accounting import DEFAULT_MECHANISM, PrivacyLedger
from dp_diffusion.privacy.callback import CHECKPOINT_KEY, DPCallback
from dp_diffusion.privacy.engine import PrivateOptimization, is_distributed
from dp_diffusion.privacy.per_example import trainable_parameters
from dp_diffusion.privacy.randomness import NoiseStream, PrivacyRandomness
from dp_diffusion.privacy.report import Coverage
from dp_diffusion.privacy.sampling import poisson_loader
from dp_diffusion.privacy.spec import PrivacyPlan, PrivacySpec
from dp_diffusion.privacy.validation import PrivacyError, check_no_batch_mixing

DEFAULT_PART = "model"  # the one private part of a single-part method (`private_module()`)


class PrivateTrainingModule(L.LightningModule):
    """Manual-optimization LightningModule whose private gradients go through the privacy core.

    The run's privacy state (plan, ledger, guard, randomness) lives in `self.dp`, the module's
    `DPCallback`; `plan`, `ledger`, `allowed_steps`, `stopped_by_budget`, `randomness`, `noise` and
    `rounds_taken` read it, and `ensure_plan`, `logical_steps`, `epsilon_spent`, `check_resume` and
    `privacy_report` delegate to it. A subclass that overrides `configure_callbacks` returns
    `super().configure_callbacks()` among its own.

    `keep_privacy_rng_in_checkpoint`: set it to False before writing a checkpoint
    to release (e.g. `final.ckpt`): the secret the masks and the noise are
    derived from is then left out (with it, anyone could regenerate past noise).
    A run resumed from such a checkpoint draws fresh entropy and logs that it did.
    """

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
        self.dp = DPCallback(privacy, batch_size, steps, seed)
        self._engines: dict[str, PrivateOptimization] = {}

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

    # ---- the privacy state (held by the DP callback) -------------------------------
    @property
    def plan(self) -> PrivacyPlan | None:
        return self.dp.plan

    @plan.setter
    def plan(self, value: PrivacyPlan | None) -> None:
        self.dp.plan = value

    @property
    def ledger(self) -> PrivacyLedger:
        return self.dp.ledger

    @property
    def allowed_steps(self) -> int | None:
        return self.dp.allowed_steps

    @allowed_steps.setter
    def allowed_steps(self, value: int | None) -> None:
        self.dp.allowed_steps = value

    @property
    def stopped_by_budget(self) -> bool:
        return self.dp.stopped_by_budget

    @stopped_by_budget.setter
    def stopped_by_budget(self, value: bool) -> None:
        self.dp.stopped_by_budget = value

    @property
    def keep_privacy_rng_in_checkpoint(self) -> bool:
        return self.dp.keep_rng_in_checkpoint

    @keep_privacy_rng_in_checkpoint.setter
    def keep_privacy_rng_in_checkpoint(self, value: bool) -> None:
        self.dp.keep_rng_in_checkpoint = value

    @property
    def randomness(self) -> PrivacyRandomness | None:
        return self.dp.randomness

    @property
    def noise(self) -> NoiseStream:
        return self.dp.noise

    @property
    def rounds_taken(self) -> int:
        return self.dp.rounds_taken

    def ensure_randomness(self) -> PrivacyRandomness:
        """The run's privacy randomness, restored or fresh (`DPCallback.ensure_randomness`; all ranks call it)."""
        return self.dp.ensure_randomness()

    def ensure_plan(self) -> PrivacyPlan:
        """Calibrate sigma once (`DPCallback.ensure_plan`)."""
        return self.dp.ensure_plan(self)

    def logical_steps(self) -> int:
        """Logical DP steps taken by this run's private parts (`DPCallback.logical_steps`)."""
        return self.dp.logical_steps(self)

    def epsilon_spent(self) -> float:
        """The headline epsilon, as logged (`DPCallback.epsilon_spent`)."""
        return self.dp.epsilon_spent(self.trainer, self)

    def check_resume(self, checkpoint: dict[str, Any]) -> None:
        """Raise PrivacyError if `checkpoint`'s privacy settings differ from this run's.

        Lightning checks on load; a caller may call it on a loaded checkpoint before `fit` to fail earlier.
        """
        self.dp.check_resume(checkpoint, self)

    def privacy_report(self) -> dict[str, Any]:
        return self.dp.report(self)

    # ---- plumbing ---------------------------------------------------------------
    def configure_callbacks(self) -> list[Callback]:
        return [self.dp]

    def attach_private_data(self, dataset: Dataset) -> None:
        self.train_set = dataset

    def mechanism_name(self, part: str) -> str:
        """The ledger's name for `part`'s steps: "dp_sgd" for the one part of a single-part method (as in
        checkpoints and reports written before parts were named), else the part's name."""
        return DEFAULT_MECHANISM if list(self.private_parts()) == [DEFAULT_PART] else part

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

    def start_logical_step(self) -> bool:
        """Start of every `training_step`: False when the DP callback's budget guard refused this batch (the
        budget is spent, training stops): take no step. The callback counted the Poisson round and, on
        resume, continued the global generators before the step (`DPCallback.open_step`)."""
        return self.dp.step_allowed

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if not self.start_logical_step():
            return None
        stats = self.private_step(DEFAULT_PART, self.per_example_loss, self.prepare_batch(batch))
        self.on_private_step()
        self.log_step(stats)
        return None

    def per_example_losses(self) -> dict[str, Callable[[Any, Any], Tensor]]:
        """Each private part's per-example loss, as `training_step` passes it to `private_step` (default: the
        one part's `per_example_loss`). What `dp-diffusion bench` times for each part."""
        return {part: self.per_example_loss for part in self.private_parts()}

    def engine(self, part: str) -> PrivateOptimization:
        """The DP-SGD engine of private part `part` (built by `configure_optimizers`)."""
        return self._engines[part]

    def private_step(self, part: str, loss_fn: Callable[[Any, Any], Tensor], batch: Any) -> dict[str, Tensor]:
        """One logical DP-SGD step for private part `part`: per-example gradients of `loss_fn(model, batch)`
        (shape (B,)) for that part's trainable parameters only, clipping, noise from the run's noise stream,
        one ledger step under its mechanism name. Returns the engine's loggable statistics.

        The first private part steps through Lightning's optimizer wrapper (precision plugin, hooks, and
        the trainer's step count); further parts step their DP optimizer directly, because Lightning counts
        one global step per wrapped optimizer step and `trainer.max_steps` is in logical steps.
        """
        if not self.dp.step_allowed:
            raise PrivacyError("private_step after the budget guard refused the batch: training_step must "
                               "return when start_logical_step() is False")
        engine = self._engines[part]
        first = next(iter(self._engines)) == part
        optimizer = self._wrapped(engine.optimizer) if first else engine.optimizer
        return engine.step(loss_fn, batch, optimizer.step)

    def sanitised_output_step(self, part: str, optimizer: Optimizer, sanitiser: Any | None,
                              output_fn: Callable[[], Tensor], objective_fn: Callable[[Tensor], Tensor],
                              num_examples: int, expected_batch_size: float) -> None:
        """One step of private part `part` whose per-example gradients are sanitised at the part's OUTPUT
        (`output_sanitiser.OutputSanitiser`: each example's output gradient clipped to C, noise sigma*C), not
        at its parameters: the DP-SAD paper's mechanism, which bounds no example's effect on the weights, so
        its ledger steps are the paper's accounting, not a guarantee (the method's report must say so).

        `output_fn()` is the part's output on the batch (example-major rows), `objective_fn(out)` its
        per-example objective; gradients of the part's trainable parameters only, one optimizer step through
        Lightning's wrapper (one trainer step), one ledger step under the part's mechanism name when private.
        """
        if not self.dp.step_allowed:
            raise PrivacyError("sanitised_output_step after the budget guard refused the batch: training_step "
                               "must return when start_logical_step() is False")
        params = list(trainable_parameters(self.private_parts()[part]).values())
        if num_examples > 0:
            out = output_fn()
            if sanitiser is not None:
                total = objective_fn(sanitiser(out, num_examples=num_examples)).sum()  # it divides by B
            else:
                total = objective_fn(out).sum() / expected_batch_size
            grads = torch.autograd.grad(total, params, allow_unused=True)
        else:  # an empty Poisson batch: a zero update (the noise of an empty batch is the sanitiser's to add)
            grads = [None] * len(params)
        for p, grad in zip(params, grads):
            p.grad = torch.zeros_like(p) if grad is None else grad
        self._wrapped(optimizer).step()
        optimizer.zero_grad(set_to_none=True)
        if self.privacy_spec.enabled:
            plan = self.ensure_plan()
            self.ledger.step(plan.noise_multiplier, plan.sample_rate, mechanism=self.mechanism_name(part))

    def public_step(self, optimizer: Optimizer, loss: Tensor) -> Tensor:
        """One ordinary step of a non-private part: gradients of `loss` for `optimizer`'s parameters only
        (so a private part's .grad is untouched), averaged across ranks, then the optimizer's step.

        Averaged here by hand: the DP callback turned DDP's reducer off (require_backward_grad_sync=False)
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
        """Log a private step's statistics (the DP callback logs the headline epsilon after the step)."""
        for name, value in stats.items():
            self.log(f"{prefix}/{name}", value, prog_bar=name == "loss", batch_size=1)

    def _wrapped(self, optimizer: Optimizer) -> Any:
        """Lightning's wrapper of `optimizer` when a trainer is attached, else `optimizer` itself."""
        if self._trainer is None:
            return optimizer
        optimizers = self.optimizers()
        for wrapper in optimizers if isinstance(optimizers, list) else [optimizers]:
            if wrapper.optimizer is optimizer:
                return wrapper
        return optimizer

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The DP callback wrote the privacy state already, except in a weights-only checkpoint: Lightning
        # calls callbacks' on_save_checkpoint only for full ones (checkpoint_connector.dump_checkpoint,
        # `if not weights_only`), then this hook always.
        if CHECKPOINT_KEY not in checkpoint:
            self.dp.save_state(checkpoint, self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Inside a trainer's fit the DP callback restores the privacy state (Lightning calls this hook, then
        # the callbacks'); outside one (e.g. `sample.load_trained` calling this hook by hand) this does.
        if not self.dp.in_fit:
            self.dp.load_state(checkpoint, self)
