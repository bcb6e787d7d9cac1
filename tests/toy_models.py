"""Tiny private-training modules for the privacy-core tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from dp_diffusion.diffusion.losses import EDMLoss
from dp_diffusion.nets import UNet
from dp_diffusion.privacy import Coverage, PrivacySpec, PrivateTrainingModule
from dp_diffusion.privacy.per_example import batch_size_of


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


class Probe(nn.Module):
    """One of each supported layer type, with awkward settings (stride, groups, no bias),
    a 1x1 conv and a conv to one channel (the grouped sampler's special cases), and a LayerNorm
    and a Linear on (B, tokens, channels) inputs (the feature map's positions as tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 6)
        self.conv = nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3, bias=False)
        self.norm = nn.GroupNorm(3, 6)
        self.pointwise = nn.Conv2d(6, 4, 1)
        self.narrow = nn.Conv2d(4, 1, (3, 2), padding=(1, 2))
        self.head = nn.Linear(1, 1)
        # Positions as tokens: a LayerNorm and a Linear on (B, tokens, channels) inputs.
        self.token_norm = nn.LayerNorm(6)
        self.token_mix = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.conv(x) + self.embed(labels)[:, :, None, None]
        h = torch.tanh(self.norm(self.grouped(h)))
        tokens = self.token_mix(self.token_norm(h.flatten(2).transpose(1, 2)))
        h = h + torch.tanh(tokens).transpose(1, 2).reshape(h.shape)
        h = self.narrow(self.pointwise(h))
        return self.head(h.mean(dim=(2, 3))).squeeze(1)


class SharedLayers(nn.Module):
    """One Linear called twice in a forward, and a weight tied between two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.twice = nn.Linear(5, 5)
        self.first = nn.Linear(5, 5, bias=False)
        self.second = nn.Linear(5, 5)
        self.second.weight = self.first.weight
        self.head = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.twice(torch.tanh(self.twice(x))))
        h = torch.tanh(self.second(torch.tanh(self.first(h))))
        return self.head(h).squeeze(-1)


def probe_loss(model, batch):
    """Mean over K noisy draws of each example (rows ordered example-major)."""
    x, labels, noise = batch
    b, k = noise.shape[:2]
    rows = (x.unsqueeze(1) + noise).reshape(b * k, *x.shape[1:])
    out = model(rows, labels.repeat_interleave(k))
    return (out.reshape(b, k) ** 2).mean(1)


def probe_case(num_examples: int, noise_multiplicity: int):
    """A float64 `Probe`, `probe_loss` and a batch of `num_examples` (at most 5) with K noise draws each."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(num_examples, 2, 9, 9, generator=g, dtype=torch.float64),
             torch.tensor([0, 3, 3, 4, 1])[:num_examples],
             torch.randn(num_examples, noise_multiplicity, 2, 9, 9, generator=g, dtype=torch.float64))
    return Probe().double(), probe_loss, batch


def shared_layers_case():
    """A float64 `SharedLayers`, a loss over 2 rows per example, and a batch of 6."""
    torch.manual_seed(0)
    model = SharedLayers().double()
    x = torch.randn(6, 2, 5, dtype=torch.float64)

    def loss_fn(m, batch):
        (x,) = batch
        return m(x.reshape(-1, 5)).reshape(x.shape[0], -1).pow(2).mean(dim=1)

    return model, loss_fn, (x,)


def loop_per_example_grads(model: nn.Module, loss_fn, batch) -> list[dict[str, torch.Tensor]]:
    """Reference: one backward per example; `batch` is a pytree of tensors with examples first."""
    grads = []
    for i in range(batch_size_of(batch)):
        model.zero_grad()
        example = tree_map(lambda t: t[i : i + 1], batch)
        loss_fn(model, example).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return grads


def tiny_unet_case(num_examples: int, noise_multiplicity: int):
    """(preconditioned float64 tiny UNet, per-example EDM loss fn, batch with K draws) for gradient checks."""
    torch.manual_seed(0)
    net = UNet(1, 1, 8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_classes=3).double()
    for p in net.parameters():  # zero-initialised layers would make most gradients trivially 0
        p.data += 0.05 * torch.randn_like(p)
    loss = EDMLoss(num_classes=3, label_dropout=0.5)
    images = torch.randn(num_examples, 1, 8, 8, dtype=torch.float64)
    labels = torch.arange(num_examples) % 3
    draw = {k: v.double() if v.is_floating_point() else v
            for k, v in loss.draw(images, labels, noise_multiplicity).items()}

    def loss_fn(model, b):
        return loss(model, b[0], b[1], b[2])

    return loss.precondition(net), loss_fn, (images, labels, draw)


class WeightUsedOutsideItsCall(nn.Module):
    """A Linear layer whose weight is also used outside its own call (`F.linear(x, layer.weight)`)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(x)) + torch.nn.functional.linear(x, self.lin.weight)).squeeze(-1)


class WeightWithoutLayerCall(nn.Module):
    """A Linear layer that is never called: its parameters are used only through `F.linear`."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(torch.nn.functional.linear(x, self.lin.weight, self.lin.bias))
        return self.head(h).squeeze(-1)


class WeightNormed(nn.Module):
    """A weight-normalised Linear layer: `parametrizations.weight_norm`, or the old `weight_norm`."""

    def __init__(self, old_style: bool = False) -> None:
        super().__init__()
        norm = torch.nn.utils.weight_norm if old_style else torch.nn.utils.parametrizations.weight_norm
        self.lin = norm(nn.Linear(4, 4))
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(x))).squeeze(-1)


class SequenceFirst(nn.Module):
    """Takes (B, T, D) and runs its Linear layers on the sequence-first (T, B, D) view."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x.transpose(0, 1)))
        return self.head(h).transpose(0, 1).mean(dim=(1, 2))


class RunningStatistics(nn.Module):
    """A conv net with an InstanceNorm that tracks running statistics (updated from the batch in training)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4, track_running_stats=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.conv(x))).mean(dim=(2, 3))).squeeze(-1)


def squared_output_loss(model, batch):
    """Per-example loss 10 * model(x)^2 (large enough that C = 1 clips)."""
    (x,) = batch
    return 10 * model(x) ** 2


def odd_model_case(model_cls: type[nn.Module], num_examples: int = 4, *args):
    """(float64 `model_cls(*args)`, `squared_output_loss`, a batch of `num_examples`): inputs (B, 4), or
    (B, 4, 4) for `SequenceFirst`, (B, 1, 5, 5) for `RunningStatistics`."""
    torch.manual_seed(0)
    model = model_cls(*args).double()
    shape = {SequenceFirst: (4, 4), RunningStatistics: (1, 5, 5)}.get(model_cls, (4,))
    x = 3 * torch.randn(num_examples, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, squared_output_loss, (x,)


class TinyTransformerBlock(nn.Module):
    """A pre-norm transformer block on (B, tokens, dim): LayerNorm, single-head attention through Linear
    layers (3-D inputs), LayerNorm, a GELU MLP, and a Linear head averaged over tokens."""

    def __init__(self, dim: int = 6, hidden: int = 10) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        h = x + self.proj(attention @ v)
        h = h + self.mlp(self.norm2(h))
        return self.head(h).mean(dim=(1, 2))


def transformer_loss(model, batch):
    """Mean over K noisy draws of each example's squared output; inputs (B, tokens, dim), rows example-major."""
    x, noise = batch
    b, k = noise.shape[:2]
    rows = (x.unsqueeze(1) + noise).reshape(b * k, *x.shape[1:])
    return (model(rows).reshape(b, k) ** 2).mean(1)


def transformer_case(num_examples: int, noise_multiplicity: int, tokens: int = 5, dim: int = 6):
    """A float64 `TinyTransformerBlock` (LayerNorm affine parameters perturbed off 1 and 0), `transformer_loss`
    and a batch of `num_examples` with K noise draws each."""
    torch.manual_seed(0)
    model = TinyTransformerBlock(dim).double()
    with torch.no_grad():
        for norm in (model.norm1, model.norm2):
            norm.weight.add_(0.3 * torch.randn_like(norm.weight))
            norm.bias.add_(0.3 * torch.randn_like(norm.bias))
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(num_examples, tokens, dim, generator=g, dtype=torch.float64),
             0.5 * torch.randn(num_examples, noise_multiplicity, tokens, dim, generator=g, dtype=torch.float64))
    return model, transformer_loss, batch


class Critic(nn.Module):
    """A module outside the private one, with trainable parameters of its own (a discriminator, a teacher)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def critic_case(num_examples: int = 6, noise_multiplicity: int = 2):
    """(float64 private net, float64 `Critic`, loss through the critic, batch): the private net's output
    passes through the critic on its way to the per-example loss, as a generator's through a discriminator."""
    torch.manual_seed(0)
    private = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    critic = Critic(3).double()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(num_examples, 6, generator=g, dtype=torch.float64),
             torch.randn(num_examples, noise_multiplicity, 6, generator=g, dtype=torch.float64))

    def loss_fn(model, b):
        x, noise = b
        n, k, d = noise.shape
        out = model((x.unsqueeze(1) + 0.5 * noise).reshape(n * k, d))
        return (critic(out).reshape(n, k) ** 2).mean(1) * 10

    return private, critic, loss_fn, batch


def frozen_unet_case(num_examples: int, noise_multiplicity: int, trainable: str = "up.0"):
    """`tiny_unet_case` with every parameter frozen except those whose name contains `trainable`."""
    denoiser, loss_fn, batch = tiny_unet_case(num_examples, noise_multiplicity)
    for name, p in denoiser.named_parameters():
        p.requires_grad_(trainable in name)
    return denoiser, loss_fn, batch


class ToyTwoPart(PrivateTrainingModule):
    """A two-part method: a private generator (Linear) whose per-example loss passes through a critic
    (Linear) that trains alongside on a loss of its own.

    Generator, per example i: (critic(generator(x_i)) - y_i)^2, by DP-SGD (`private_step`). Critic: with
    `dp_critic=False` a non-private part whose loss is the mean of critic(generator(z))^2 over public draws z
    (drawn per rank and step, so that ranks differ without the all-reduce), stepped first by plain SGD
    (`public_step`); with `dp_critic=True` a second private part, per example (critic(generator(x_i)) - y_i)^2
    with the generator held fixed, stepped first by DP-SGD: two mechanisms in the ledger.
    """

    def __init__(self, privacy: PrivacySpec, dim: int = 6, batch_size: int = 8, physical_batch_size: int = 8,
                 steps: int = 4, lr: float = 0.1, critic_lr: float = 0.2, dp_critic: bool = False,
                 seed: int = 0) -> None:
        super().__init__(privacy, batch_size, physical_batch_size, steps, seed=seed)
        torch.manual_seed(seed)
        self.generator = nn.Linear(dim, dim)
        self.critic = nn.Linear(dim, 1)
        self.lr, self.critic_lr, self.dp_critic = lr, critic_lr, dp_critic
        self.critic_optimizer = torch.optim.SGD(self.critic.parameters(), lr=critic_lr)

    def private_parts(self) -> dict[str, nn.Module]:
        parts = {"generator": self.generator}
        return {"critic": self.critic, **parts} if self.dp_critic else parts

    def public_optimizers(self) -> list[torch.optim.Optimizer]:
        return [] if self.dp_critic else [self.critic_optimizer]

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr)

    def public_draws(self, step: int) -> Tensor:
        g = torch.Generator().manual_seed(1000 * self.global_rank + step)
        return torch.randn(5, self.generator.in_features, generator=g)

    def critic_loss(self, critic: nn.Module, generator: nn.Module, step: int) -> Tensor:
        return (critic(generator(self.public_draws(step))) ** 2).mean()

    def generator_loss(self, generator: Any, batch: Any) -> Tensor:
        x, y = batch
        return (self.critic(generator(x)).squeeze(-1) - y) ** 2

    def dp_critic_loss(self, critic: Any, batch: Any) -> Tensor:
        x, y = batch
        return (critic(self.generator(x).detach()).squeeze(-1) - y) ** 2

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if not self.start_logical_step():
            return None
        if self.dp_critic:
            self.log_step(self.private_step("critic", self.dp_critic_loss, batch), prefix="critic")
        else:
            self.public_step(self.critic_optimizer, self.critic_loss(self.critic, self.generator, batch_idx))
        self.log_step(self.private_step("generator", self.generator_loss, batch), prefix="generator")
        return None

    def privacy_coverage(self) -> Coverage:
        public = [] if self.dp_critic else ["critic (trained on the DP generator's outputs of public draws)"]
        return Coverage(released=["generator"], trained_with_dp=list(self.private_parts()),
                        never_saw_private_data=public)
