"""Sample-fidelity metrics: FID, KID, Inception Score and improved precision/recall.

Features come from a named backbone (:mod:`dp_diffusion.metrics.backbones`); the metric math is
torch-fidelity's (``*_features_to_metric`` functions), run on features we extract ourselves
from in-memory tensors. (Going through ``torch_fidelity.calculate_metrics`` with a generator
would hit its ``np.int`` use, which crashes on NumPy >= 1.24; feeding it a Dataset works too,
see :func:`dp_diffusion.metrics.backbones.register_with_torch_fidelity`.)

Protocol notes (papers-dpdm-dpldm.md §1.10, papers-dpsad-dpsyngen-benchmarks.md §3.4-§5):

* The reference set is chosen by the caller; the papers use the (private) **train** split.
* Precision/recall follow Kynkaanniemi et al. 2019 with k = 3 neighbours (self excluded) and
  torch-fidelity's ``<=`` ball membership (DPImageBench's ``fld`` uses a strict ``<``).
* KID: unbiased MMD^2 with the cubic polynomial kernel, mean and std over random subsets.
* Numbers are only comparable across runs that share the backbone ``name``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from dp_diffusion.metrics.backbones import Backbone, DomainBackboneConfig, build_backbone, extract_features

__all__ = [
    "METRICS",
    "compute_fidelity",
    "fid_from_features",
    "fidelity_from_features",
    "inception_score_from_logits",
    "kid_from_features",
    "precision_recall_from_features",
]

METRICS = ("fid", "kid", "isc", "prc")

# Above this many pairwise distances, torch-fidelity's PRC works block-wise to bound memory.
_PRC_FULL_MATRIX_LIMIT = 10_000 * 10_000


def fid_from_features(gen: Tensor, real: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (Heusel et al. 2017)."""
    stats_gen = fid_features_to_statistics(gen.double().cpu())
    stats_real = fid_features_to_statistics(real.double().cpu())
    return float(fid_statistics_to_metric(stats_gen, stats_real, verbose=False)["frechet_inception_distance"])


def kid_from_features(
    gen: Tensor, real: Tensor, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> dict[str, float]:
    """KID (Binkowski et al. 2018): {"mean", "std", "subset_size"} over ``subsets`` random subsets.

    ``subset_size`` is capped at the smaller set size (the cap is reported as ``subset_size``).
    """
    subset_size = min(subset_size, len(gen), len(real))
    out = kid_features_to_metric(
        gen.double().cpu(),
        real.double().cpu(),
        kid_subset_size=subset_size,
        kid_subsets=subsets,
        rng_seed=seed,
        verbose=False,
    )
    return {
        "mean": out["kernel_inception_distance_mean"],
        "std": out["kernel_inception_distance_std"],
        "subset_size": subset_size,
    }


def inception_score_from_logits(logits: Tensor, splits: int = 10, seed: int = 0) -> dict[str, float]:
    """Inception Score (Salimans et al. 2016) from classifier logits: {"mean", "std"} over splits."""
    splits = max(1, min(splits, len(logits)))
    out = isc_features_to_metric(logits.double().cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return {"mean": out["inception_score_mean"], "std": out["inception_score_std"]}


def precision_recall_from_features(gen: Tensor, real: Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision / recall (Kynkaanniemi et al. 2019, arXiv 1904.06991), k-NN balls.

    Precision: share of generated points inside the real manifold; recall: share of real points
    inside the generated manifold. Each manifold is the union of balls around its points with
    radius = distance to the k-th nearest neighbour in the same set (self excluded).
    """
    if min(len(gen), len(real)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set")
    out = prc_features_to_metric(
        gen.float().cpu(),
        real.float().cpu(),
        prc_neighborhood=k,
        prc_batch_size=10_000,
        save_cpu_ram=len(gen) * len(real) > _PRC_FULL_MATRIX_LIMIT,
        verbose=False,
    )
    return {"precision": out["precision"], "recall": out["recall"], "f_score": out["f_score"]}


def _entry(value: float, backbone: str, num_samples: int, num_reference: int | None, **extra: Any) -> dict:
    return {
        "value": float(value),
        "backbone": backbone,
        "num_samples": num_samples,
        "num_reference": num_reference,
        **extra,
    }


def fidelity_from_features(
    gen: Mapping[str, Tensor],
    real: Mapping[str, Tensor],
    backbone_name: str,
    metrics: Sequence[str] = METRICS,
    prc_neighborhood: int = 3,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    isc_splits: int = 10,
    seed: int = 0,
) -> dict[str, dict]:
    """Metric entries from already-extracted features (``{"features": ..., "logits": ...}``).

    Returns ``{"fid", "kid", "isc", "precision", "recall", "f_score"}`` entries (those
    requested), each ``{"value", "backbone", "num_samples", "num_reference", ...}``.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"metrics must be a subset of {METRICS}, got unknown {sorted(unknown)}")
    n, m = len(gen["features"]), len(real["features"])
    results: dict[str, dict] = {}
    if "fid" in metrics:
        results["fid"] = _entry(fid_from_features(gen["features"], real["features"]), backbone_name, n, m)
    if "kid" in metrics:
        kid = kid_from_features(gen["features"], real["features"], kid_subset_size, kid_subsets, seed)
        results["kid"] = _entry(
            kid["mean"], backbone_name, n, m, std=kid["std"], subset_size=kid["subset_size"], subsets=kid_subsets
        )
    if "isc" in metrics:
        if "logits" not in gen:
            raise ValueError(f"backbone '{backbone_name}' has no classifier head: drop 'isc' from metrics")
        isc = inception_score_from_logits(gen["logits"], isc_splits, seed)
        # The Inception Score uses the samples only (the reference set plays no part).
        results["isc"] = _entry(isc["mean"], backbone_name, n, None, std=isc["std"], splits=isc_splits)
    if "prc" in metrics:
        prc = precision_recall_from_features(gen["features"], real["features"], prc_neighborhood)
        for key in ("precision", "recall", "f_score"):
            results[key] = _entry(prc[key], backbone_name, n, m, k=prc_neighborhood)
    return results


def compute_fidelity(
    samples: Tensor,
    reference: Tensor | Mapping[str, Tensor],
    backbone: str | Backbone = "auto",
    metrics: Sequence[str] = METRICS,
    prc_neighborhood: int = 3,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    isc_splits: int = 10,
    *,
    reference_labels: Tensor | None = None,
    reference_name: str | None = None,
    reference_split: str = "train",
    weights_path: str | os.PathLike | None = None,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    domain_config: DomainBackboneConfig | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    disable_progress: bool = True,
) -> dict[str, dict]:
    """FID / KID / IS / precision-recall of ``samples`` against ``reference``.

    Args:
        samples: generated images, (N, C, H, W) in [-1, 1].
        reference: real images (M, C, H, W) in [-1, 1] -- by the papers' protocol the private
            **train** split, chosen by the caller -- or features already extracted with
            :func:`~dp_diffusion.metrics.backbones.extract_features` on the same backbone.
        backbone: ``"auto"`` | ``"inception"`` | ``"fid-helper"`` | ``"domain"``, or a built
            :class:`~dp_diffusion.metrics.backbones.Backbone`. ``"domain"`` (and ``"auto"``
            without Inception weights) trains/loads a CNN on ``reference`` with
            ``reference_labels``, cached under ``reference_name``.
        metrics: subset of ``("fid", "kid", "isc", "prc")``; ``"prc"`` yields ``precision``,
            ``recall`` and ``f_score`` entries.
        prc_neighborhood: k of the k-NN balls (3 as in Kynkaanniemi et al. 2019).
        kid_subset_size, kid_subsets: KID subset size (capped at the set sizes) and count.
        isc_splits: number of splits of the Inception Score.
        weights_path, allow_download: Inception weights file / permission to download them.
        cache_dir, domain_config: cache directory and training recipe of the domain backbone.
        seed: seeds KID subsets and the IS shuffle.

    Returns:
        ``{metric: {"value": float, "backbone": name, "num_samples": N, "num_reference": M,
        ...}}``; KID and IS entries add ``std``, precision/recall add ``k``.
    """
    if not isinstance(backbone, Backbone):
        if isinstance(reference, Mapping):
            raise ValueError(
                "reference features were given, so pass the Backbone that extracted them, not a name"
            )
        backbone = build_backbone(
            backbone,
            reference_name=reference_name,
            reference_images=reference,
            reference_labels=reference_labels,
            reference_split=reference_split,
            weights_path=weights_path,
            allow_download=allow_download,
            cache_dir=cache_dir,
            domain_config=domain_config,
            device=device,
            disable_progress=disable_progress,
        )
    gen = extract_features(backbone, samples, batch_size, device, disable_progress)
    if isinstance(reference, Mapping):
        real = reference
    else:
        if tuple(reference.shape[1:]) != tuple(samples.shape[1:]):
            raise ValueError(
                f"samples {tuple(samples.shape[1:])} and reference {tuple(reference.shape[1:])} differ in shape"
            )
        real = extract_features(backbone, reference, batch_size, device, disable_progress)
    return fidelity_from_features(
        gen,
        real,
        backbone.name,
        metrics=metrics,
        prc_neighborhood=prc_neighborhood,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        isc_splits=isc_splits,
        seed=seed,
    )
