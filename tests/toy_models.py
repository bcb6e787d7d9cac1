"""Tiny private-training modules for the privacy-core tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dp_diffusion.privacy import Coverage, PrivacySpec, PrivateTrainingModule


class ToyRegression(PrivateTrainingModule):
    """Linear regression with a per-example squared error; K noisy copies of each input.

    Draw k of example i perturbs its input by `noise_scale * n_ik`; the example's
    loss is the mean over its K draws (noise multiplicity).
    """

    def __init__(self, privacy: PrivacySpec, dim: int = 6, batch_size: int = 16,
                 physical_batch_size: int = 16, steps: int = 5, lr: float = 1.0,
                 noise_scale: float = 0.5, zero_grad_model: bool = False, seed: int = 0) -> None:
        super().__init__(privacy, batch_size, physical_batch_size, steps, seed=seed)
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, 1))
        self.lr = lr
        self.noise_scale = noise_scale
        self.zero_grad_model = zero_grad_model

    def private_module(self) -> nn.Module:
        return self.net

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr)

    def prepare_batch(self, batch: Any) -> Any:
        x, y = batch
        k = self.privacy_spec.noise_multiplicity
        return x, y, torch.randn(x.shape[0], k, x.shape[1])

    def per_example_loss(self, model: Any, batch: Any) -> Tensor:
        return per_example_loss(model, batch, self.noise_scale, self.zero_grad_model)

    def privacy_coverage(self) -> Coverage:
        return Coverage(released=["toy net"], trained_with_dp=["toy net"])


def per_example_loss(model: Any, batch: Any, noise_scale: float, zero: bool = False) -> Tensor:
    x, y, noise = batch
    b, k, d = noise.shape
    inputs = (x.unsqueeze(1) + noise_scale * noise).reshape(b * k, d)
    pred = model(inputs).reshape(b, k)
    loss = ((pred - y.unsqueeze(1)) ** 2).mean(dim=1)
    return loss * 0.0 if zero else loss


def toy_dataset(n: int = 64, dim: int = 6, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = (x @ torch.randn(dim, generator=g)).unsqueeze(1).squeeze(1) * 3.0
    return torch.utils.data.TensorDataset(x, y)
