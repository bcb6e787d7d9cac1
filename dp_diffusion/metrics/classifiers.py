"""The classifiers evaluation trains, and the one supervised loop that trains them.

Two uses: the domain backbone (:class:`DomainCNN`, trained on the real reference split; its
feature layer gives FID/KID/precision-recall features) and downstream accuracy (DPDM's
:class:`LogReg`, :class:`MLP` and :class:`CNN`, trained on synthetic samples with the epoch
selected on held-out synthetic data). Both conv nets are presets of one :class:`ConvNet`, and
both uses train with :func:`fit_classifier`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "CLASSIFIERS",
    "CNN",
    "ConvNet",
    "DomainCNN",
    "LogReg",
    "MLP",
    "accuracy",
    "build_classifier",
    "fit_classifier",
]


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


class ConvNet(nn.Module):
    """[conv3x3 -> ReLU -> max-pool 2 -> dropout] per width -> flatten -> FC ``hidden`` + ReLU
    (+ dropout): the features (:meth:`features`); a linear ``head`` gives the logits.

    ``padding`` is the convs' (1 keeps the size, 0 shrinks it by 2); ``pool_last=False`` leaves
    the last conv unpooled; ``dropout=0`` adds no dropout layers. The flattened size follows the
    input; an input that the convs and pools would shrink to nothing is refused.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = (32, 64, 128),
        hidden: int = 128,
        padding: int = 1,
        pool_last: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        c, h, w = image_shape
        smallest = self.min_size(len(widths), padding, pool_last)
        if min(h, w) < smallest:
            raise ValueError(f"this conv net needs images of at least {smallest}x{smallest}, got {h}x{w}")
        layers: list[nn.Module] = []
        channels = c
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, padding=padding), nn.ReLU()]
            if pool_last or i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
                if dropout:
                    layers.append(nn.Dropout(dropout))
            channels = width
        layers.append(nn.Flatten())
        # The probe runs in training mode, so with dropout it draws from the global RNG: part
        # of what a seed fixes (the downstream CNN's initialisation has always included it).
        with torch.no_grad():
            self.flat_features = nn.Sequential(*layers)(torch.zeros(1, c, h, w)).shape[1]
        layers += [nn.Linear(self.flat_features, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, num_classes)

    @staticmethod
    def min_size(depth: int, padding: int, pool_last: bool) -> int:
        """Smallest height/width that leaves at least 1x1 after ``depth`` conv(+pool) blocks."""
        size = 1
        for i in reversed(range(depth)):
            if pool_last or i < depth - 1:
                size *= 2
            size += 2 * (1 - padding)
        return size

    def features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, hidden): the layer before the logits."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class CNN(ConvNet):
    """DPDM's downstream CNN: conv 32-64-128 (3x3, no padding), max-pool after the first two,
    dropout 0.5, FC -> 128 -> classes.

    The flattened size follows the input: 1152 for 28x28 (as in DPDM), 2048 for 32x32 (as in
    DP-LDM's MNIST script). Images under 18x18 (the 8x8 digits), which the unpadded convs and
    pools would shrink to nothing, get padded ("same") convs instead: 512 features for 8x8.
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int, dropout: float = 0.5):
        unpadded_ok = min(image_shape[1:]) >= self.min_size(3, padding=0, pool_last=False)
        super().__init__(image_shape, num_classes, padding=0 if unpadded_ok else 1, pool_last=False, dropout=dropout)


class DomainCNN(ConvNet):
    """The domain backbone: padded conv3x3 + ReLU + max-pool per width, FC ``feature_dim`` + ReLU
    (the features) -> logits; no dropout."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        widths: Sequence[int] = (32, 64, 128),
        feature_dim: int = 128,
    ):
        super().__init__((in_channels, *image_size), num_classes, widths, hidden=feature_dim)


CLASSIFIERS: dict[str, type[nn.Module]] = {"logreg": LogReg, "mlp": MLP, "cnn": CNN}


def build_classifier(name: str, image_shape: Sequence[int], num_classes: int) -> nn.Module:
    """One of :data:`CLASSIFIERS` by name, for (C, H, W) images."""
    if name not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {sorted(CLASSIFIERS)}, got '{name}'")
    return CLASSIFIERS[name](tuple(image_shape), num_classes)


@torch.no_grad()
def accuracy(
    model: nn.Module, images: Tensor, labels: Tensor, device: str | torch.device = "cpu", batch_size: int = 1024
) -> float:
    """Share of ``images`` whose arg-max logit is the label (``model`` is left in eval mode)."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        correct += (model(x).argmax(dim=1) == y).sum().item()
    return correct / len(images)


def fit_classifier(
    build: Callable[[], nn.Module],
    train: tuple[Tensor, Tensor],
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 3e-4,
    seed: int = 0,
    val: tuple[Tensor, Tensor] | None = None,
    device: str | torch.device = "cpu",
    desc: str = "classifier",
    disable_progress: bool = False,
) -> tuple[nn.Module, dict]:
    """Build a classifier and train it with Adam on cross-entropy, on shuffled minibatches.

    ``seed`` fixes the initialisation, the shuffling and dropout; the caller's global RNG is left
    as it was. With ``val`` (images, labels), the weights of the epoch with the best validation
    accuracy (the first, on ties) are kept; without it, those of the last epoch.

    Returns the model (on ``device``, in eval mode) and ``{"best_epoch" (1-based),
    "val_accuracy", "val_curve", "epochs", "num_train", "num_val"}`` (``val_accuracy`` is None
    and ``val_curve`` empty without ``val``).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    train_x, train_y = train
    generator = torch.Generator().manual_seed(seed)
    best_val, best_epoch, best_state = -1.0, epochs, None
    val_curve: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initialisation and dropout masks
        model = build().to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
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
            if val is None:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                continue
            val_accuracy = accuracy(model, *val, device)
            val_curve.append(val_accuracy)
            if val_accuracy > best_val:
                best_val, best_epoch = val_accuracy, epoch
                best_state = copy.deepcopy(model.state_dict())
            bar.set_postfix(val=f"{val_accuracy:.4f}", best=f"{best_val:.4f}@{best_epoch}")
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, {
        "best_epoch": best_epoch,
        "val_accuracy": best_val if val is not None else None,
        "val_curve": val_curve,
        "epochs": epochs,
        "num_train": len(train_x),
        "num_val": len(val[0]) if val is not None else 0,
    }
