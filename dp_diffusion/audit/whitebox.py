"""White-box (mechanism) audit: Dirac gradient canaries through the real DP-SGD step.

The auditor sees every noised update: a step pre-hook on the optimizer the DP
optimizer hands its noised, scaled gradient to (Opacus's `original_optimizer`;
the optimizer itself when privacy is off) reads the canary coordinates of that
gradient, and each canary's score is the sum of its coordinate over all steps.
An included canary adds C / B_exp each time Poisson sampling picks it; an
excluded one adds nothing; DP-SGD adds N(0, (sigma C / B_exp)^2) to every
coordinate at every step. A bug that skipped the noise or the clipping would
separate the two groups far beyond what the claimed epsilon allows.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor


class CanaryUpdateRecorder(Callback):
    """Sums the released update's canary coordinates over the steps of a fit."""

    def __init__(self, canary_weights: Tensor) -> None:
        self.canary_weights = canary_weights  # one coordinate per canary, any shape
        self.scores = torch.zeros(canary_weights.numel(), dtype=torch.float64)
        self.steps = 0
        self._handle: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        base = getattr(optimizer, "original_optimizer", optimizer)  # Opacus DPOptimizer wraps the base one
        self._handle = base.register_step_pre_hook(self._record)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _record(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        grad = self.canary_weights.grad
        if grad is not None:
            self.scores += grad.detach().reshape(-1).to("cpu", torch.float64)
        self.steps += 1

    def canary_scores(self) -> np.ndarray:
        return self.scores.numpy().copy()


def dirac_scale(max_grad_norm: float) -> float:
    """The canary loss's slope M: far above C, so min(1, C / ||M e_i||) M e_i = C e_i (to 1e-10 relative)."""
    return 1e4 * max_grad_norm if np.isfinite(max_grad_norm) else 1e4
