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

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor

from dp_diffusion.metrics.classifiers import CLASSIFIERS, accuracy, build_classifier, fit_classifier

__all__ = ["downstream_accuracy"]


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
        model, history = fit_classifier(
            partial(build_classifier, name, image_shape, num_classes),
            train,
            val=val,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
            desc=f"downstream {name}",
            disable_progress=disable_progress,
        )
        results[name] = {"accuracy": accuracy(model, *test, device), **history, "num_test": len(test[0])}
    return results
