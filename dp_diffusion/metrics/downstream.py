"""Downstream utility: train classifiers on labelled synthetic images, test on real ones.

The protocol of DPDM's ``train_downstream_classifiers.py`` (papers-dpdm-dpldm.md §1.10), also
used by DP-LDM for MNIST: Adam 3e-4, batch 128, 50 epochs; the epoch is **selected on held-out
synthetic data** and the **real test accuracy at that epoch** is reported. Selecting on the
real test set (DPImageBench's ``sen`` mode, §3.4 of papers-dpsad-dpsyngen-benchmarks.md)
overestimates utility and is deliberately not offered.

Differences from the reference script (on purpose): the training set is shuffled each epoch
with a seeded generator (DPDM's loader iterated sorted files), and the selection split is
carved out of the synthetic training set with ``val_fraction`` unless a separate synthetic
validation set is given (DPDM sampled a second set).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["CLASSIFIERS", "CNN", "LogReg", "MLP", "build_classifier", "downstream_accuracy", "train_and_select"]


class LogReg(nn.Module):
    """Multinomial logistic regression: Linear(C*H*W -> classes)."""

    def __init__(self, image_shape: Sequence[int], num_classes: int):
        super().__init__()
        c, h, w = image_shape
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MLP(nn.Module):
    """C*H*W -> 100 -> classes with a ReLU (DPDM's MLP)."""

    def __init__(self, image_shape: Sequence[int], num_classes: int, hidden: int = 100):
        super().__init__()
        c, h, w = image_shape
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN(nn.Module):
    """DPDM's CNN: conv 32-64-128 (3x3, no padding) with max-pool and dropout 0.5, FC -> 128 -> classes.

    The flattened size follows the input: 1152 for 28x28 (as in DPDM), 2048 for 32x32 (as in
    DP-LDM's MNIST script). Images under 18x18 (the 8x8 digits), which the unpadded convs and
    pools would shrink to nothing, get padded ("same") convs instead: 512 features for 8x8.
    """

    MIN_UNPADDED = 18  # 18 -> conv 16 -> pool 8 -> conv 6 -> pool 3 -> conv 1
    MIN_PADDED = 4  # 4 -> pool 2 -> pool 1

    def __init__(self, image_shape: Sequence[int], num_classes: int, dropout: float = 0.5):
        super().__init__()
        c, h, w = image_shape
        if min(h, w) < self.MIN_PADDED:
            raise ValueError(f"the CNN classifier needs images of at least {self.MIN_PADDED}x{self.MIN_PADDED}, "
                             f"got {h}x{w}")
        padding = 0 if min(h, w) >= self.MIN_UNPADDED else 1
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=padding),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(32, 64, 3, padding=padding),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(64, 128, 3, padding=padding),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, c, h, w)).shape[1]
        self.classifier = nn.Sequential(
            nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


CLASSIFIERS: dict[str, type[nn.Module]] = {"logreg": LogReg, "mlp": MLP, "cnn": CNN}


def build_classifier(name: str, image_shape: Sequence[int], num_classes: int) -> nn.Module:
    if name not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {sorted(CLASSIFIERS)}, got '{name}'")
    return CLASSIFIERS[name](tuple(image_shape), num_classes)


@torch.no_grad()
def _accuracy(model: nn.Module, images: Tensor, labels: Tensor, device, batch_size: int = 1024) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        correct += (model(x).argmax(dim=1) == y).sum().item()
    return correct / len(images)


def train_and_select(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    epochs: int = 50,
    batch_size: int = 128,
    lr: float = 3e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "classifier",
    disable_progress: bool = False,
) -> dict:
    """Train ``model`` with Adam; keep the epoch with the best (synthetic) validation accuracy.

    Returns ``{"accuracy": real test accuracy at the selected epoch, "best_epoch" (1-based),
    "val_accuracy", "val_curve", "epochs", "num_train", "num_val", "num_test"}``.
    """
    train_x, train_y = train
    generator = torch.Generator().manual_seed(seed)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    best_val, best_epoch, best_state = -1.0, 0, None
    val_curve: list[float] = []
    bar = tqdm(range(1, epochs + 1), disable=disable_progress, desc=desc, leave=False)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(train_x[idx].to(device)), train_y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_acc = _accuracy(model, *val, device)
        val_curve.append(val_acc)
        if val_acc > best_val:
            best_val, best_epoch = val_acc, epoch
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix(val=f"{val_acc:.4f}", best=f"{best_val:.4f}@{best_epoch}")
    model.load_state_dict(best_state)
    return {
        "accuracy": _accuracy(model, *test, device),
        "best_epoch": best_epoch,
        "val_accuracy": best_val,
        "val_curve": val_curve,
        "epochs": epochs,
        "num_train": len(train_x),
        "num_val": len(val[0]),
        "num_test": len(test[0]),
    }


def downstream_accuracy(
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    classifiers: Sequence[str] = ("logreg", "mlp", "cnn"),
    epochs: int = 50,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    val_images: Tensor | None = None,
    val_labels: Tensor | None = None,
    batch_size: int = 128,
    lr: float = 3e-4,
    num_classes: int | None = None,
    disable_progress: bool = False,
) -> dict[str, dict]:
    """Train each classifier on (synthetic) ``train_images``, select the epoch on a held-out
    synthetic split, and report accuracy on the real ``test_images``.

    Args:
        train_images, train_labels: labelled synthetic samples, (N, C, H, W) in [-1, 1], (N,).
        test_images, test_labels: the **real test split**.
        classifiers: any of ``"logreg"``, ``"mlp"``, ``"cnn"``.
        epochs: training epochs per classifier (50 in DPDM).
        val_fraction: share of the synthetic set held out for epoch selection (ignored when
            ``val_images`` / ``val_labels`` -- a second synthetic set -- are given).
        seed: seeds the split, the initialisation, the shuffling and dropout.

    Returns:
        ``{name: {"accuracy", "best_epoch", "val_accuracy", "val_curve", ...}}``.
    """
    for name in classifiers:
        if name not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {sorted(CLASSIFIERS)}, got '{name}'")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    train_images, train_labels = train_images.float().cpu(), train_labels.long().cpu()
    if val_images is None or val_labels is None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, round(val_fraction * len(train_images)))
        val_idx, train_idx = order[:n_val], order[n_val:]
        val = (train_images[val_idx], train_labels[val_idx])
        train = (train_images[train_idx], train_labels[train_idx])
    else:
        val = (val_images.float().cpu(), val_labels.long().cpu())
        train = (train_images, train_labels)
    test = (test_images.float().cpu(), test_labels.long().cpu())
    if num_classes is None:
        num_classes = int(max(train[1].max(), test[1].max()).item()) + 1
    image_shape = tuple(train_images.shape[1:])

    results = {}
    for name in classifiers:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # initialisation and dropout masks
            model = build_classifier(name, image_shape, num_classes)
            results[name] = train_and_select(
                model,
                train,
                val,
                test,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                device=device,
                desc=f"downstream {name}",
                disable_progress=disable_progress,
            )
    return results
