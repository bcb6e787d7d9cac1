"""Canaries that ride through the real training path, recognised by an id carried in the batch.

The private set the run trains on is the real set plus all m canary rows; each
row yields `(image, label, canary_id)` with id -1 for real examples. A canary
left out of the game (probability 1/2) stays in the set with a per-example loss
of zero: its gradient is zero, so clipping, the clipped sum and the noise are
exactly those of the set without it, and the sample rate q = B/(N+m) does not
depend on which canaries are in (with the rows removed, N, and so q, would tell
how many are in).

The method's module is built by the project's own builder and given
`CanaryTraining` as a mixin (`add_canaries`): it adds the id to the batch and
wraps the method's own per-example loss; Poisson sampling, per-example
gradients, clipping, noise and the ledger are the privacy core's, untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

from dp_diffusion.privacy import PrivateTrainingModule


def draw_membership(m: int, seed: int) -> Tensor:
    """Which of the m canaries are in: each independently with probability 1/2 (bool, (m,))."""
    return torch.rand(m, generator=torch.Generator().manual_seed(seed)) < 0.5


def binary_pattern_images(m: int, shape: tuple[int, int, int], seed: int) -> Tensor:
    """m fixed random images of pixels in {-1, 1}: far from any natural image (out of distribution)."""
    bits = torch.rand((m, *shape), generator=torch.Generator().manual_seed(seed + 1)) < 0.5
    return bits.float() * 2 - 1


class RealRows(Dataset):
    """A data set's `(image, label)` rows as `(image, label, -1)`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        image, label = self.dataset[index]
        return image, torch.as_tensor(label), torch.tensor(-1)


class CanaryRows(Dataset):
    """Canary i as `(images[i], labels[i], i)`."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.images[index], self.labels[index], torch.tensor(index)


def audit_dataset(real: Dataset, canary_images: Tensor, canary_labels: Tensor) -> Dataset:
    """The private set of an audit run: every real row, then every canary row."""
    return ConcatDataset([RealRows(real), CanaryRows(canary_images, canary_labels)])


class CanaryProbe(nn.Module):
    """The private module plus one audit-only layer `canaries`: Linear(m, 1), one weight per canary.

    `probe(*args)` is the private module's forward; `probe(canary_input=x)` is
    `canaries(x)`. Canary i's input row is M e_i, so its loss M theta_i has the
    gradient M e_i on this layer alone (a Dirac canary in parameter space).
    Real rows feed zeros, so they never touch these coordinates: the update
    there is exactly the canaries' clipped gradients plus the DP noise, with no
    interference from the data. Being an ordinary Linear layer, it is seen by
    every per-example gradient mode (grouped, ghost, opacus, functorch), so the
    audit runs the mode the user's training runs.
    """

    def __init__(self, inner: nn.Module, m: int) -> None:
        super().__init__()
        self.inner = inner
        self.canaries = nn.Linear(m, 1, bias=False)
        nn.init.zeros_(self.canaries.weight)

    def forward(self, *args: Any, canary_input: Tensor | None = None, **kwargs: Any) -> Tensor:
        if canary_input is not None:
            return self.canaries(canary_input).squeeze(-1)
        return self.inner(*args, **kwargs)


class CanaryTraining:
    """Mixin for a `PrivateTrainingModule` whose batches carry canary ids.

    White-box (`canary_probe` set): a canary's per-example loss is
    M * theta_i (theta = the probe's canary weights, M >> C), so its gradient is
    M e_i and its clipped gradient exactly C e_i (a Dirac canary).
    Black-box: a canary is an ordinary training image with the method's own loss.
    Either way an excluded canary's loss is multiplied by 0.
    """

    canary_included: Tensor
    canary_scale: float
    canary_probe: CanaryProbe | None

    def private_module(self) -> nn.Module:
        if self.canary_probe is not None:
            return self.canary_probe
        return super().private_module()  # type: ignore[misc]

    def prepare_batch(self, batch: Any) -> Any:
        images, labels, ids = batch
        inner = super().prepare_batch((images, labels))  # type: ignore[misc]
        is_canary = ids >= 0
        included = self.canary_included.to(ids.device)[ids.clamp(min=0)]
        if self.canary_probe is None:  # the loss weight: 0 for an excluded canary, 1 otherwise
            return inner, is_canary, (included | ~is_canary).to(images.dtype)
        # Row i: M e_(id) for an included canary, zeros otherwise (a real row, an excluded canary).
        hits = (is_canary & included).to(images.dtype) * self.canary_scale
        canary_input = torch.zeros((len(ids), len(self.canary_included)), dtype=images.dtype, device=ids.device)
        canary_input[torch.arange(len(ids), device=ids.device), ids.clamp(min=0)] = hits
        return inner, is_canary, canary_input

    def per_example_loss(self, model: Any, batch: Any) -> Tensor:
        inner, is_canary, extra = batch
        if self.canary_probe is None:
            return super().per_example_loss(model, inner) * extra  # type: ignore[misc]
        # The layer hooks read every call's rows as B examples x K draws, example-major, as the
        # denoiser's: each example's row repeated K times at 1/K sums back to M theta_i.
        k = self.privacy_spec.noise_multiplicity  # type: ignore[attr-defined]
        rows = extra.repeat_interleave(k, dim=0) / k
        dirac = model(canary_input=rows).view(-1, k).sum(dim=1)
        loss = super().per_example_loss(model, inner)  # type: ignore[misc]
        return torch.where(is_canary, dirac.to(loss.dtype), loss)


def add_canaries(module: PrivateTrainingModule, included: Tensor, dirac: bool, scale: float = 0.0) -> None:
    """Make `module` (built by `build_method`) train on canary-carrying batches, in place."""
    cls = type(module)
    module.canary_probe = None  # type: ignore[attr-defined]
    if dirac:
        probe = CanaryProbe(module.private_module(), len(included))
        module.canary_probe = probe  # type: ignore[attr-defined]
    module.canary_included = included.clone()  # type: ignore[attr-defined]
    module.canary_scale = float(scale)  # type: ignore[attr-defined]
    # A subclass made here, not in build_method, so that the method's own class
    # (from the config) stays what is trained; only batches and the loss change.
    module.__class__ = type(f"Canary{cls.__name__}", (CanaryTraining, cls), {})
