"""DP-SynGen (Choi et al., arXiv 2412.09842): synthetic images for the stages that need no private data.

Algorithm (our reading; the official runner is missing, see the reference notes section 2):

1. Split the noise levels into stages (``diffusion/stages.py``): coarse sigma > e^2, cleaning
   sigma < e^-3, context in between (boundaries ``log_tau_coarse`` / ``log_tau_cleaning``).
2. Public stages (``fit_public_stages``, before the private fit, non-private): train the coarse and
   cleaning stage models on programmatically generated images (dead leaves), each with the base
   training sigma distribution truncated to its range, or one shared model on the union of both
   ranges. The images come from a random program with no private input: no privacy cost.
3. Private stage: the context model (this module's denoiser) is trained with DP-SGD on private data,
   its sigma distribution truncated to the context range: only this spends privacy budget.
4. Sampling switches model per row by sigma (``SwitchingDenoiser``); the stage models are frozen
   submodules of this module, so one checkpoint holds the whole released sampler. ``generate`` (the
   base's) samples through it: what differs from DPDM is only ``sampling_denoiser``.

``variant: finetune`` (the paper's "FineTune"): pretrain ONE model on all sigmas on synthetic images,
load it into the denoiser (and its EMA), then fine-tune it with DP-SGD on all sigmas.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from dp_diffusion.config import BOOL, ConfigError, Rule, Settings, integer, number, one_of, optional
from dp_diffusion.data.synthetic import SYNTHETIC_FAMILIES, SyntheticImages
from dp_diffusion.diffusion.losses import DiffusionLoss
from dp_diffusion.diffusion.stages import StageRanges, SwitchingDenoiser, UnionSigmaLoss, restrict_loss
from dp_diffusion.methods.diffusion_module import PrivateDiffusion
from dp_diffusion.methods.public_stage import PublicDiffusionStage
from dp_diffusion.privacy import Coverage, PrivacySpec

log = logging.getLogger(__name__)
VARIANTS = ("switching", "finetune")
SYNTHETIC_STAGES = ("coarse", "cleaning")
SHARED = "coarse_cleaning"  # key of the one model serving both synthetic stages (shared_model: true)
PRETRAINED = "all"  # name of the finetune variant's all-sigma pretraining run


@dataclass(frozen=True)
class SyntheticSettings(Settings):
    """`method.module.synthetic`: how the synthetic-data stages are trained (non-private)."""

    KEY: ClassVar[str] = "method.module.synthetic"
    RULES: ClassVar[Mapping[str, Rule]] = {
        "family": one_of(sorted(SYNTHETIC_FAMILIES)),
        "shared_model": BOOL,
        "size": integer(1),
        "steps": integer(1),
        "batch_size": integer(1),
        "noise_multiplicity": integer(1),
        "physical_batch_size": optional(integer(1)),
        "lr": number(above=0),
        "ema_decay": number(at_least=0, below=1),
        "seed": integer(0),
    }

    family: str = "dead_leaves"
    family_kwargs: dict[str, Any] = field(default_factory=dict)
    size: int = 100_000  # synthetic images (rendered on the fly from (seed, index))
    seed: int = 1  # seed of the synthetic image program (public)
    shared_model: bool = False  # one model for coarse + cleaning (sigma on the union of both ranges)
    steps: int = 500
    batch_size: int = 128
    physical_batch_size: int | None = None  # null: the private run's train.physical_batch_size
    lr: float = 4.0e-4
    noise_multiplicity: int = 4
    ema_decay: float = 0.999

    def validate(self) -> None:
        super().validate()
        self.require(self.batch_size <= self.size, "batch_size", f"<= synthetic.size = {self.size}")


class SyntheticStage(PublicDiffusionStage):
    """A stage model trained on synthetic images only, always with the null class label.

    Runs through the same privacy-core path with ``PrivacySpec(enabled=False)``: Poisson batches, no
    clipping, no noise, no accounting, because no private example is involved.
    """

    null_labels = True  # synthetic images carry no class: the null class id, as the switching sampler passes it

    def privacy_coverage(self) -> Coverage:
        return Coverage(released=[], trained_with_dp=[], never_saw_private_data=["synthetic stage model"])


class DPSynGen(PrivateDiffusion):
    """DP-SynGen: the context-stage denoiser (DP) plus frozen synthetic-stage models (no privacy cost)."""

    def __init__(
        self,
        backbone: nn.Module,
        loss: DiffusionLoss,
        *,
        variant: str = "switching",
        log_tau_coarse: float | None = 2.0,
        log_tau_cleaning: float | None = -3.0,
        synthetic: Mapping[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        """`settings`: the run's settings, as `PrivateDiffusion` takes them (privacy, batch sizes, steps, ...)."""
        if variant not in VARIANTS:
            raise ConfigError(f"method.module.variant must be one of {VARIANTS}, got {variant!r}")
        try:
            ranges = StageRanges(log_tau_coarse=log_tau_coarse, log_tau_cleaning=log_tau_cleaning)
        except ValueError as err:
            raise ConfigError(f"method.module: {err}") from None
        if variant == "switching" and ranges.present() == ("context",):
            raise ConfigError("method.module.variant=switching needs log_tau_coarse or log_tau_cleaning (or both) "
                              "set; with neither there is no synthetic stage (that is DPDM)")
        synthetic_settings = SyntheticSettings.from_config(synthetic)
        # Stage backbones start from a copy of the untrained backbone: its initialization is random
        # and data-independent, so the copies carry no private information.
        initial_backbone = copy.deepcopy(backbone)
        base_loss = loss
        if variant == "switching":
            try:
                loss = restrict_loss(loss, *ranges.bounds("context"))  # truncated, not rejected
            except ValueError as err:
                raise ConfigError(f"method.module: context stage {ranges.describe('context')}: {err}") from None
        super().__init__(backbone, loss, **settings)
        self.variant = variant
        self.ranges = ranges
        self.synthetic = synthetic_settings
        self.base_loss = base_loss
        self._initial_backbone = [initial_backbone]  # a list keeps it out of the module tree and checkpoint
        # Frozen synthetic-stage denoisers (EMA weights), saved in the module's checkpoint.
        self.stage_models = nn.ModuleDict(
            {key: base_loss.precondition(copy.deepcopy(initial_backbone)) for key in self._synthetic_keys()}
        )
        self.stage_models.requires_grad_(False)
        self.register_buffer("public_stages_trained", torch.tensor(False))

    # ---- stages -------------------------------------------------------------------------------
    def synthetic_stages(self) -> tuple[str, ...]:
        """The stages trained on synthetic images (none for finetune)."""
        if self.variant == "finetune":
            return ()
        return tuple(s for s in SYNTHETIC_STAGES if s in self.ranges.present())

    def _synthetic_keys(self) -> tuple[str, ...]:
        stages = self.synthetic_stages()
        if self.synthetic.shared_model and len(stages) > 1:
            return (SHARED,)
        return stages

    def _owner(self, stage: str) -> str:
        """Key in `stage_models` of the model serving `stage`."""
        return SHARED if SHARED in self.stage_models else stage

    def _stage_loss(self, key: str) -> DiffusionLoss:
        """Training sigma of a synthetic run: its range (truncated), the union of ranges, or all sigmas."""
        if key == PRETRAINED:
            return self.base_loss
        if key == SHARED:
            return UnionSigmaLoss(self.base_loss, [self.ranges.bounds(s) for s in self.synthetic_stages()])
        return restrict_loss(self.base_loss, *self.ranges.bounds(key))

    # ---- public (synthetic) stages ------------------------------------------------------------
    def fit_public_stages(self, make_trainer: Callable[[int, str], L.Trainer]) -> None:
        """Train the synthetic stages (non-private) and copy their EMA weights in, frozen."""
        if self.variant == "finetune":
            pretrained = self._train_on_synthetic(PRETRAINED, make_trainer)
            weights = pretrained.ema.module.state_dict()
            self.denoiser.load_state_dict(weights)
            self.ema.module.load_state_dict(weights)
        else:
            for key in self.stage_models:
                trained = self._train_on_synthetic(key, make_trainer)
                self.stage_models[key].load_state_dict(trained.ema.module.state_dict())
            self.stage_models.requires_grad_(False)
        self.public_stages_trained.fill_(True)

    def _train_on_synthetic(self, key: str, make_trainer: Callable[[int, str], L.Trainer]) -> SyntheticStage:
        s = self.synthetic
        stage = SyntheticStage(
            backbone=copy.deepcopy(self._initial_backbone[0]),
            loss=self._stage_loss(key),
            privacy=PrivacySpec(enabled=False, noise_multiplicity=s.noise_multiplicity,
                                grad_mode=self.privacy_spec.grad_mode),
            batch_size=s.batch_size,
            physical_batch_size=s.physical_batch_size or self.physical_batch_size,
            steps=s.steps,
            image_shape=self.image_shape,
            num_classes=self.num_classes,
            lr=s.lr,
            ema_decay=s.ema_decay,
            seed=self.seed,
            num_workers=self.num_workers,
        )
        # The private data's image shape (C, H, W) is public metadata; C = 1 renders grey leaves.
        stage.attach_private_data(SyntheticImages(s.family, s.size, self.image_shape, s.seed, **s.family_kwargs))
        log.info("DP-SynGen: training synthetic stage %r (%s) for %d steps on %s images (no privacy cost)",
                 key, self._range_text(key), s.steps, s.family)
        make_trainer(s.steps, f"synthetic_{key}").fit(stage)
        return stage

    def _range_text(self, key: str) -> str:
        if key == PRETRAINED:
            return "all sigma"
        if key == SHARED:
            return " or ".join(self.ranges.describe(s) for s in self.synthetic_stages())
        return self.ranges.describe(key)

    def on_train_start(self) -> None:
        super().on_train_start()
        if not bool(self.public_stages_trained):
            log.warning("DP-SynGen: the private fit starts before the synthetic stages were trained "
                        "(call fit_public_stages first; `dp-diffusion train` does)")

    # ---- sampling -----------------------------------------------------------------------------
    def sampling_denoiser(self) -> nn.Module:
        """The released sampler: one module routing each row by sigma (finetune: the EMA denoiser)."""
        if self.variant == "finetune":
            return super().sampling_denoiser()
        if not bool(self.public_stages_trained):
            log.warning("DP-SynGen: sampling with synthetic stage models that were never trained")
        models: dict[str, nn.Module] = {"context": super().sampling_denoiser()}
        for stage in self.synthetic_stages():
            models[stage] = self.stage_models[self._owner(stage)].eval()
        return SwitchingDenoiser(self.ranges, models, conditional=("context",), num_classes=self.num_classes).eval()

    # ---- what the guarantee covers ------------------------------------------------------------
    def privacy_coverage(self) -> Coverage:
        family = self.synthetic.family
        notes = [
            "only the private fit spends privacy budget; the synthetic images come from a random program "
            "with no private input (it uses only the public image shape)",
            "samples are post-processing of the released weights",
        ]
        if self.variant == "finetune":
            return Coverage(
                released=["EMA denoiser weights, all sigma (and samples drawn from it)"],
                trained_with_dp=["denoiser (all parameters), fine-tuned on private data at all sigma"],
                never_saw_private_data=[f"pretrained initial weights (synthetic {family} images only, all sigma)"],
                notes=["the pretrained weights never saw private data; the released model did, only through "
                       "DP-SGD", *notes],
            )
        context = self.ranges.describe("context")
        synthetic = [f"{key.replace('_', ' + ')} stage model ({self._range_text(key)})" for key in self.stage_models]
        return Coverage(
            released=[f"context stage EMA denoiser ({context})", *synthetic,
                      "the switching sampler combining them (one checkpoint), and samples drawn from it"],
            trained_with_dp=[f"context stage denoiser (all parameters; private data seen only at {context})"],
            never_saw_private_data=[f"{model}: synthetic {family} images only" for model in synthetic],
            notes=[f"stage boundaries (log_tau_coarse={self.ranges.log_tau_coarse}, "
                   f"log_tau_cleaning={self.ranges.log_tau_cleaning}) are fixed in the config, not chosen "
                   "from private data", *notes],
        )
