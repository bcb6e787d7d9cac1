"""Evaluation: sample fidelity (FID, KID, IS, precision/recall) and downstream utility.

* :func:`compute_fidelity` -- metrics of samples against a reference set on a named backbone
  (torch-fidelity's Inception-v3 when its weights are on disk, or a CNN trained on the
  reference data); every value records the backbone it was computed with.
* :func:`downstream_accuracy` -- DPDM's protocol: train LogReg / MLP / CNN on labelled
  synthetic samples, select the epoch on held-out synthetic data, report real test accuracy.

Both train their classifiers (the domain CNN; LogReg / MLP / CNN) from one zoo with one loop:
:mod:`dp_diffusion.metrics.classifiers`.
"""

from dp_diffusion.metrics.backbones import (
    Backbone,
    BackboneUnavailableError,
    DomainBackboneConfig,
    available_backbones,
    build_backbone,
    build_domain_backbone,
    extract_features,
    register_with_torch_fidelity,
)
from dp_diffusion.metrics.downstream import downstream_accuracy
from dp_diffusion.metrics.fidelity import (
    compute_fidelity,
    fid_from_features,
    fidelity_from_features,
    inception_score_from_logits,
    kid_from_features,
    precision_recall_from_features,
)

__all__ = [
    "Backbone",
    "BackboneUnavailableError",
    "DomainBackboneConfig",
    "available_backbones",
    "build_backbone",
    "build_domain_backbone",
    "compute_fidelity",
    "downstream_accuracy",
    "extract_features",
    "fid_from_features",
    "fidelity_from_features",
    "inception_score_from_logits",
    "kid_from_features",
    "precision_recall_from_features",
    "register_with_torch_fidelity",
]
