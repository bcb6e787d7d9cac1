"""One logical DP-SGD step: per-example gradients, clipping, noise, accounting.

This is the only place where private gradients are clipped and noised. The
clipping, noise and accountant hook are Opacus's `DPOptimizer` (or
`DistributedDPOptimizer`, which adds the noise on rank 0 only and all-reduces),
given the per-example norms when the gradient engine took them on the way
(`clipping.StreamlinedClipping`).
What Opacus lacks, and this module adds: per-example gradients of a loss that
averages K noise draws (noise multiplicity) without B*K per-example gradients,
and a logical Poisson batch split into physical chunks inside one Lightning
step with exactly one accountant step per logical batch (Opacus's
`BatchMemoryManager` does not fit a Lightning train loader).

With `grad_mode=ghost` no per-example gradients are formed: each chunk adds
its clipped sum to `p.grad` (`ghost.GhostClipping`), and Opacus's
`DPOptimizerFastGradientClipping` (`DistributedDPOptimizerFastGradientClipping`
under DDP) only adds the noise, scales by the expected batch size and calls the
same accountant hook.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils._pytree import tree_map

from dp_diffusion.privacy.accounting import DEFAULT_MECHANISM, PrivacyLedger
from dp_diffusion.privacy.clipping import (
    SourcedDistributedDPOptimizerFastGradientClipping,
    SourcedDPOptimizerFastGradientClipping,
    StreamlinedDistributedDPOptimizer,
    StreamlinedDPOptimizer,
)
from dp_diffusion.privacy.ghost import GhostClipping
from dp_diffusion.privacy.per_example import (
    PerExampleLoss,
    batch_size_of,
    make_per_example_gradients,
    trainable_parameters,
)
from dp_diffusion.privacy.randomness import NoiseStream, PrivacyRandomness
from dp_diffusion.privacy.self_check import first_step_check
from dp_diffusion.privacy.spec import PrivacyPlan, PrivacySpec


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def split_batch(batch: Any, chunk_size: int) -> list[Any]:
    """Physical chunks of at most `chunk_size` examples (one, possibly empty, at least)."""
    size = batch_size_of(batch)
    starts = range(0, max(size, 1), chunk_size)
    return [tree_map(lambda t, s=s: t[s : s + chunk_size] if isinstance(t, Tensor) else t, batch) for s in starts]


class PrivateOptimization:
    """Runs logical steps for `module`'s trainable parameters under `spec`.

    With `spec.enabled=False` the same chunked path runs without clipping or
    noise (the non-private baseline).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        spec: PrivacySpec,
        plan: PrivacyPlan,
        ledger: PrivacyLedger,
        physical_batch_size: int,
        noise: NoiseStream | None = None,
        mechanism: str = DEFAULT_MECHANISM,
    ) -> None:
        """`noise`: the run's noise stream (`PrivateTrainingModule` passes it); None: torch's global
        generator, or OS entropy with `spec.secure_mode` (for tests and benchmarks). `mechanism`: the
        name the ledger records this engine's steps under."""
        if noise is None and spec.secure_mode:
            noise = NoiseStream(PrivacyRandomness("secure"))
        self.module = module
        self.spec = spec
        self.plan = plan
        self.ledger = ledger
        self.mechanism = mechanism
        self.physical_batch_size = physical_batch_size
        self.params = trainable_parameters(module)
        self.distributed = is_distributed()
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.ghost: GhostClipping | None = None
        self.first_step_checked = not spec.enabled  # see `step`
        if spec.enabled:
            if spec.grad_mode == "ghost":
                # Clipping happens in GhostClipping; these optimizers only noise, scale and account.
                optimizer_cls = (SourcedDistributedDPOptimizerFastGradientClipping if self.distributed
                                 else SourcedDPOptimizerFastGradientClipping)
            else:
                optimizer_cls = StreamlinedDistributedDPOptimizer if self.distributed else StreamlinedDPOptimizer
            self.optimizer: Optimizer = optimizer_cls(
                optimizer,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=spec.max_grad_norm,
                # Per rank; DistributedDPOptimizer divides by world size again.
                expected_batch_size=max(1, round(plan.expected_batch_size / self.world_size)),
                loss_reduction="mean",
                noise=noise,
            )
            self.optimizer.attach_step_hook(self._account)
            if spec.grad_mode == "ghost":
                self.ghost = GhostClipping(module, spec.max_grad_norm)
            else:
                self.gradients = make_per_example_gradients(module, spec.grad_mode)
        else:
            self.optimizer = optimizer

    def _account(self, _optimizer: Optimizer) -> None:
        self.ledger.step(noise_multiplier=self.plan.noise_multiplier, sample_rate=self.plan.sample_rate,
                         mechanism=self.mechanism)

    def step(
        self,
        loss_fn: PerExampleLoss,
        batch: Any,
        optimizer_step: Callable[[], Any] | None = None,
    ) -> dict[str, Tensor]:
        """One logical step over `batch`; `optimizer_step` defaults to `self.optimizer.step`.

        Returns statistics safe to log: the norm of the released (noised)
        update, and the private loss only if `spec.log_private_loss`.
        """
        optimizer_step = optimizer_step or self.optimizer.step
        if not self.first_step_checked:  # once: refuse a model the gradient mode gets wrong (self_check.py)
            self.first_step_checked = first_step_check(self, loss_fn, batch)
        chunks = split_batch(batch, self.physical_batch_size)
        if self.ghost is not None:
            loss_sum = self._ghost_chunks(loss_fn, chunks)
        elif self.spec.enabled:
            loss_sum = self._private_chunks(loss_fn, chunks)
        else:
            loss_sum = self._non_private_chunks(loss_fn, chunks)
        optimizer_step()
        stats = {"update_norm": self._grad_norm()}
        self.optimizer.zero_grad(set_to_none=True)
        if self.spec.log_private_loss or not self.spec.enabled:
            stats["loss"] = loss_sum / max(1, batch_size_of(batch))
        return stats

    def _private_chunks(self, loss_fn: PerExampleLoss, chunks: list[Any]) -> Tensor:
        loss_sum = torch.zeros(())
        for i, chunk in enumerate(chunks):
            grads, losses = self.gradients(loss_fn, chunk)
            loss_sum = loss_sum + losses.sum().cpu()
            for name, p in self.params.items():
                p.grad_sample = grads[name]
            self.optimizer.per_sample_norms = self.gradients.last_norms  # None: Opacus takes them
            if i < len(chunks) - 1:
                # Clip and add to p.summed_grad; the last chunk is clipped,
                # noised and accounted by the optimizer step.
                self.optimizer.clip_and_accumulate()
                for p in self.params.values():
                    p.grad_sample = None
        return loss_sum

    def _ghost_chunks(self, loss_fn: PerExampleLoss, chunks: list[Any]) -> Tensor:
        # The DP optimizer noises whatever p.grad holds: it must be exactly
        # this step's clipped sum, or a stray gradient would go out unclipped.
        for p in self.params.values():
            p.grad = None
        loss_sum = torch.zeros(())
        for chunk in chunks:
            _, losses = self.ghost(loss_fn, chunk)
            loss_sum = loss_sum + losses.sum().cpu()
        for p in self.params.values():
            if p.grad is None:  # empty batch (Poisson): the update is noise only
                p.grad = torch.zeros_like(p)
        return loss_sum

    def _non_private_chunks(self, loss_fn: PerExampleLoss, chunks: list[Any]) -> Tensor:
        loss_sum = torch.zeros(())
        scale = 1.0 / self.plan.expected_batch_size
        for chunk in chunks:
            if batch_size_of(chunk) == 0:
                continue
            losses = loss_fn(self.module, chunk)
            # Gradients of the trainable parameters only, not .backward(): a module outside this one
            # that the loss passes through (a critic, a teacher) keeps its .grad.
            params = list(self.params.values())
            grads = torch.autograd.grad(losses.sum() * scale, params, allow_unused=True) if params else ()
            for p, grad in zip(params, grads):
                if grad is not None:
                    p.grad = grad if p.grad is None else p.grad + grad
            loss_sum = loss_sum + losses.detach().sum().cpu()
        for p in self.params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.distributed:
                dist.all_reduce(p.grad)
        return loss_sum

    def _grad_norm(self) -> Tensor:
        grads = [p.grad.detach() for p in self.params.values() if p.grad is not None]
        return torch.stack(torch._foreach_norm(grads)).norm() if grads else torch.zeros(())
