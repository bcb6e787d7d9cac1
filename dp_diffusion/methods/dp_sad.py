"""DP-SAD (Liu, Wang, Ge, ECCV 2024, arXiv 2408.14738): a student denoiser distilled from a frozen teacher,
against a discriminator, at one random noise level per example.

Algorithm (reference notes, papers-dpsad-dpsyngen-benchmarks.md section 1.2, reconstructed):

1. Teacher (``fit_public_stages``, before the private fit), by ``method.module.teacher.source``:
   ``dp``: a DPDM denoiser trained with DP-SGD on the private set, either in an earlier run
   (``teacher.checkpoint``: its EMA weights, read without building its method) or in this run
   (``checkpoint: null``: a ``DPDM`` module through the privacy core, calibrated to ``teacher.epsilon_fraction``
   of the target); its ledger is recorded in this run's ledger as mechanism "teacher" before calibration, so
   the student and discriminator get what the teacher left of the target and the reported epsilon composes
   all three;
   ``public``: pretrained on the ``public/`` set (no privacy cost), cached under ``cache_dir`` by a key of
   its public config only, so a sweep over epsilon pretrains it once; labels by the warm start's rule
   (``public_stage.trains_class_rows``): a labeled public set with the private classes (digits for MNIST)
   trains class rows and the teacher is asked with the student's labels, an unlabeled one (dead leaves)
   trains the null class, with which the teacher is then always asked;
   ``nonprivate``: trained on the private set without DP (the paper's setting; ``privacy_model=paper`` only).
   A teacher is trained from its own seed (``teacher.seed``); the run's generator continues as if it had not
   been, so a run that finds it cached trains exactly as one that made it. The teacher is frozen from then on.
2. One step, per example i of a Poisson batch: K noise levels sigma_ik and noises n_ik (``loss.draw``: the
   paper's "one random step r", K > 1 averaged before clipping as DPDM's noise multiplicity);
   x_r = x_i + sigma_ik n_ik (the forward process); teacher and student outputs at (x_r, sigma).
3. Discriminator: the order game of ``methods/adversarial.py`` on (teacher, student) outputs.
4. Student: lambda(sigma) [MSE(teacher, student) + MSE(x_i, student)] + lambda_adv * adversarial
   (``adversarial_weight``, the paper's lambda = 1; 0 switches the discriminator off).
5. ``method.module.privacy_model``:
   ``sound`` (default): the student by DP-SGD on its full per-example parameter gradient and the
   discriminator (whose input depends on private data) by DP-SGD too, two private parts of the core;
   the teacher ``dp`` or ``public``. Epsilon is a guarantee for the released student.
   ``paper``: as published: teacher and discriminator non-private (the discriminator a public optimizer
   although it sees private data: that is the paper), the student's update through the core's
   ``OutputSanitiser`` (each example's gradient at the student's output clipped to C and noised, the
   noise divided by T = ``num_timesteps`` with ``paper_noise_scaling``). Its epsilon is the paper's
   accounting and NOT a guarantee (reference notes, section 1.4): the report and the results record say so.
6. Samples come from the student's EMA (``PrivateDiffusion.generate``).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dp_diffusion.build import CONFIG_KEY
from dp_diffusion.checkpoints import read_checkpoint
from dp_diffusion.config import ConfigError, Rule, Settings, number, one_of, optional
from dp_diffusion.console import announce
from dp_diffusion.data.public import load_public, public_cache_key
from dp_diffusion.data.registry import DatasetInfo
from dp_diffusion.diffusion.losses import DiffusionLoss
from dp_diffusion.methods import adversarial
from dp_diffusion.methods.diffusion_module import PrivateDiffusion
from dp_diffusion.methods.dpdm import DPDM
from dp_diffusion.methods.public_stage import STAGE_TRAINING_RULES, PublicDiffusionStage, trains_class_rows
from dp_diffusion.methods.stage_cache import architecture_signature, cached_stage, loss_signature
from dp_diffusion.methods.warm_start import WarmStartSettings, load_warm_start
from dp_diffusion.privacy import Coverage, PrivacyError, PrivacyLedger, PrivacySpec, check_no_batch_mixing
from dp_diffusion.privacy.callback import CHECKPOINT_KEY
from dp_diffusion.privacy.output_sanitiser import (PAPER_ACCOUNTING_NOTE, PAPER_TIME_DILUTION_NOTE, OutputSanitiser,
                                                   paper_accounting)
from dp_diffusion.privacy.per_example import trainable_parameters
from dp_diffusion.report.records import EPSILON_IS_GUARANTEE

log = logging.getLogger(__name__)
PRIVACY_MODELS = ("sound", "paper")
TEACHER_SOURCES = ("dp", "public", "nonprivate")
STUDENT_INITS = ("scratch", "warm_start")  # the student from random weights (as published) or a public warm start
TEACHER_MECHANISM = "teacher"  # the ledger's name of a DP teacher's recorded history
PAPER_MECHANISM = "dp_sad_output_sanitiser"  # the ledger's name of the paper variant's (non-guarantee) steps
PUBLIC_TEACHER_FILE = "public_teacher.pt"  # the public teacher's EMA denoiser, under cache_dir/<key>/
TEACHER_COST_KEY = "dp_sad_teacher"  # checkpoint key: what an in-run DP teacher cost (epsilon, steps, wall time)
TRAINING_SETTINGS = tuple(STAGE_TRAINING_RULES)  # what trains a teacher (its cache key)


@dataclass(frozen=True)
class TeacherSettings(Settings):
    """`method.module.teacher`: where the teacher comes from, and how a `public`/`nonprivate` one is trained."""

    KEY: ClassVar[str] = "method.module.teacher"
    RULES: ClassVar[Mapping[str, Rule]] = {
        "source": one_of(TEACHER_SOURCES),
        "checkpoint": optional(Rule(lambda v: isinstance(v, str) and bool(v), "a path"), "null"),
        **STAGE_TRAINING_RULES,
        "epsilon_fraction": number(above=0, below=1),
    }

    source: str = "public"
    checkpoint: str | None = None  # source=dp: a `dp-diffusion train` checkpoint (final.ckpt); null: trained here
    steps: int = 1500  # training steps of a teacher trained in this run (all sources but a dp checkpoint)
    batch_size: int = 128
    lr: float = 1.0e-3
    noise_multiplicity: int = 1
    ema_decay: float = 0.999
    seed: int = 0  # the teacher's initialisation and diffusion draws; with privacy.reproducible, its masks and noise
    epsilon_fraction: float = 0.5  # source=dp trained in this run: its share of privacy.epsilon (the rest: student)

    @property
    def trained_in_run_with_dp(self) -> bool:
        """source=dp without a checkpoint: the teacher is trained with DP-SGD in this run."""
        return self.source == "dp" and self.checkpoint is None


def _plain(cfg: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


class DPSAD(PrivateDiffusion):
    """Student (released, `denoiser` and its EMA), frozen teacher, discriminator; see the module docstring."""

    def __init__(
        self,
        student: nn.Module,
        teacher_backbone: nn.Module,
        discriminator: nn.Module,
        loss: DiffusionLoss,
        *,
        privacy_model: str = "sound",
        adversarial_weight: float = 1.0,
        num_timesteps: int = 500,
        paper_noise_scaling: bool = True,
        teacher: Mapping[str, Any] | None = None,
        student_init: str = "scratch",
        warm_start: Mapping[str, Any] | None = None,
        public: Mapping[str, Any] | None = None,
        data_name: str = "",
        discriminator_lr: float = 3e-4,
        cache_dir: str | None = "runs/public_cache",
        **settings: Any,
    ) -> None:
        """`settings`: the run's settings, as `PrivateDiffusion` takes them (privacy, batch sizes, steps, ...);
        `student_init`: `scratch` (as published) or `warm_start` (the student first pretrained on the public set
        with `warm_start`'s settings, as DPDM's warm start: no privacy cost);
        `cache_dir`: where a public teacher and warm start are cached (None: trained every run)."""
        if privacy_model not in PRIVACY_MODELS:
            raise ConfigError(f"method.module.privacy_model must be one of {PRIVACY_MODELS}, got {privacy_model!r}")
        if not (isinstance(adversarial_weight, (int, float)) and adversarial_weight >= 0):
            raise ConfigError(f"method.module.adversarial_weight must be a number >= 0 (0: no discriminator), "
                              f"got {adversarial_weight!r}")
        if not (isinstance(num_timesteps, int) and num_timesteps >= 1):
            raise ConfigError(f"method.module.num_timesteps must be an integer >= 1, got {num_timesteps!r}")
        teacher_settings = TeacherSettings.from_config(teacher)
        if teacher_settings.source == "nonprivate" and privacy_model == "sound":
            raise ConfigError("method.module.teacher.source=nonprivate trains the teacher on the private data without "
                              "DP: allowed only with method.module.privacy_model=paper (use source=dp or public)")
        self.public_cfg = _plain(public)
        if teacher_settings.source == "public" and self.public_cfg.get("name") in (None, "none"):
            raise ConfigError("method.module.teacher.source=public pretrains the teacher on a public set: choose one, "
                              "e.g. public=dead_leaves (offline) or public=emnist")
        if student_init not in STUDENT_INITS:
            raise ConfigError(f"method.module.student_init must be one of {STUDENT_INITS}, got {student_init!r}")
        if student_init == "warm_start" and self.public_cfg.get("name") in (None, "none"):
            raise ConfigError("method.module.student_init=warm_start pretrains the student on a public set: choose "
                              "one, e.g. public=digits or public=dead_leaves (offline)")
        self.student_init = student_init
        self.warm_start = WarmStartSettings.from_config(warm_start)
        # The untrained student the warm start pretrains (a list: outside the module tree); only with a warm start.
        self._initial_student = [copy.deepcopy(student)] if student_init == "warm_start" else []
        super().__init__(student, loss, **settings)
        self._initial_teacher = [copy.deepcopy(teacher_backbone)]  # a list: outside the module tree
        self.teacher = loss.precondition(teacher_backbone).requires_grad_(False).eval()
        self.discriminator = discriminator
        self.privacy_model = privacy_model
        self.adversarial_weight = float(adversarial_weight)
        self.num_timesteps = num_timesteps
        self.paper_noise_scaling = bool(paper_noise_scaling)
        self.teacher_settings = teacher_settings
        self.data_name = data_name
        self.discriminator_lr = discriminator_lr
        self.cache_dir = cache_dir
        self.teacher_cost: dict[str, Any] | None = None  # an in-run DP teacher's epsilon, steps and wall time
        self.discriminator_optimizer = torch.optim.Adam(discriminator.parameters(), lr=discriminator_lr)
        self.sanitiser: OutputSanitiser | None = None
        self._student_optimizer: torch.optim.Optimizer | None = None
        self.register_buffer("teacher_trained", torch.tensor(False))
        # Whether the teacher knows the private classes (False: a public teacher trained on the null class only);
        # a buffer, so a resumed run (which does not train the teacher again) asks it as the first run did.
        self.register_buffer("teacher_class_rows", torch.tensor(teacher_settings.source != "public"))

    # ---- roles ---------------------------------------------------------------------------------
    @property
    def adversarial(self) -> bool:
        """Whether the discriminator plays (lambda > 0)."""
        return self.adversarial_weight > 0

    def private_parts(self) -> dict[str, nn.Module]:
        """sound: the discriminator (if on) and the student, each by DP-SGD. paper: the student only, named
        for calibration and the ledger; its update goes through the output sanitiser, not an engine."""
        if self.privacy_model == "sound" and self.adversarial:
            return {"discriminator": self.discriminator, "student": self.denoiser}
        return {"student": self.denoiser}

    def mechanism_name(self, part: str) -> str:
        return PAPER_MECHANISM if self.privacy_model == "paper" else part

    def public_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.discriminator_optimizer] if self.privacy_model == "paper" and self.adversarial else []

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam for a private part: at `discriminator_lr` for the discriminator's parameters, else `lr`."""
        ours = {id(p) for p in self.discriminator.parameters()}
        return torch.optim.Adam(params, lr=self.discriminator_lr if params and id(params[0]) in ours else self.lr)

    def train(self, mode: bool = True) -> DPSAD:
        super().train(mode)
        self.teacher.eval()  # frozen: never in training mode (dropout)
        return self

    # ---- the teacher (before the private fit) ------------------------------------------------------
    def fit_public_stages(self, make_trainer: Callable[[int, str], L.Trainer]) -> None:
        """Load (dp with a checkpoint) or train (dp in this run, public, nonprivate) the teacher; a dp teacher's
        history goes into the ledger before the student's sigma is calibrated."""
        s = self.teacher_settings
        if s.source == "dp" and self.plan is not None:
            raise PrivacyError("the DP teacher's history must be in the ledger before sigma is calibrated: call "
                               "fit_public_stages before training")
        if s.source == "dp" and s.checkpoint is not None:
            self._load_dp_teacher()
        else:
            # The teacher draws from its own seed; the private run's generator continues as if it had not been
            # trained, so a run that finds the public teacher cached trains exactly as one that made it.
            with torch.random.fork_rng(devices=[]):
                self.teacher.load_state_dict(self._trained_teacher(make_trainer))
        self.teacher.requires_grad_(False).eval()
        self.teacher_trained.fill_(True)
        if self.student_init == "warm_start":
            self._warm_start_student(make_trainer)

    def _warm_start_student(self, make_trainer: Callable[[int, str], L.Trainer]) -> None:
        """The student (and its EMA) from its pretraining on the public set: DPDM's warm start, the same cache."""
        load_warm_start(self, initial_backbone=self._initial_student[0], public_cfg=self.public_cfg,
                        settings=self.warm_start, data_name=self.data_name, make_trainer=make_trainer,
                        cache_dir=self.cache_dir)
        announce(f"DP-SAD: the student starts from its public {self.public_cfg['name']} warm start "
                 f"({self.warm_start.steps} steps)")

    def _trained_teacher(self, make_trainer: Callable[[int, str], L.Trainer]) -> dict[str, Tensor]:
        """The EMA weights of a teacher trained in this run: with DP (dp), without (nonprivate), or on the public
        set (public), that one from the cache when an earlier run made it."""
        source = self.teacher_settings.source
        if source == "dp":
            return self._train_dp_teacher(make_trainer)
        if source == "nonprivate":
            return self._train_teacher(make_trainer)
        path = Path(self.cache_dir) / self.public_teacher_key() / PUBLIC_TEACHER_FILE if self.cache_dir else None
        cached = cached_stage(path, f"DP-SAD: public teacher ({self.public_cfg.get('name')})",
                              lambda: self._train_public_teacher(make_trainer))
        self.teacher_class_rows.fill_(bool(cached["class_rows"]))
        return cached["weights"]

    def _train_public_teacher(self, make_trainer: Callable[[int, str], L.Trainer]) -> dict[str, Any]:
        """{"weights": the public teacher's EMA weights, "class_rows": whether it was trained on class rows}."""
        info = DatasetInfo(self.data_name, 0, 0, tuple(self.image_shape), self.num_classes)
        public = load_public(self.public_cfg, info)
        class_rows = trains_class_rows(public, self.num_classes, self.data_name)
        return {"weights": self._train_teacher(make_trainer, public, class_rows), "class_rows": class_rows}

    def public_teacher_key(self) -> str:
        """Cache key of the public teacher: the public set, the teacher's architecture, the loss and the teacher's
        training settings. Nothing private enters (the private set's image shape and class count are public)."""
        stage = {"teacher": architecture_signature(self._initial_teacher[0]), "loss": loss_signature(self.loss),
                 "settings": {k: getattr(self.teacher_settings, k) for k in TRAINING_SETTINGS},
                 "num_classes": self.num_classes, "labels": "public class y -> row y; unlabeled -> null row"}
        return public_cache_key(self.public_cfg, stage, image_shape=self.image_shape)

    def _record_teacher_history(self, ledger: PrivacyLedger, source: str) -> None:
        """Every mechanism of the teacher's `ledger` into this run's ledger as mechanism "teacher" (once: a run
        that already holds it, e.g. from its privacy state, keeps it)."""
        history = ledger.history
        if history and TEACHER_MECHANISM not in self.ledger.mechanisms:
            self.ledger.record(TEACHER_MECHANISM, history)
        log.info("DP-SAD: teacher from %s, its DP history (%d steps) recorded in the ledger as %r", source,
                 sum(n for _, _, n in history), TEACHER_MECHANISM)

    def _load_dp_teacher(self) -> None:
        """The EMA denoiser of a DP run's checkpoint as the teacher, and its ledger as mechanism "teacher"."""
        path = self.teacher_settings.checkpoint
        state = read_checkpoint(path)
        config, privacy = state.get(CONFIG_KEY), state.get(CHECKPOINT_KEY)
        if config is None or privacy is None:
            raise ConfigError(f"method.module.teacher.checkpoint={path!r} holds no run config or privacy state: "
                              "give a checkpoint written by `dp-diffusion train`")
        data = config["data"]["name"]
        if data != self.data_name:
            raise ConfigError(f"method.module.teacher.checkpoint={path!r} was trained on data={data}, this run on "
                              f"data={self.data_name}: a DP teacher must be trained on the same private set")
        spec, plan = privacy["spec"], privacy.get("plan") or {}
        if not spec["enabled"]:
            raise ConfigError(f"method.module.teacher.checkpoint={path!r} was trained with privacy=none: a teacher "
                              "on the private data without DP gives no guarantee (train it with privacy=dp)")
        if spec.get("reproducible") and not self.privacy_spec.reproducible:
            raise PrivacyError(f"method.module.teacher.checkpoint={path!r} was trained with privacy.reproducible="
                               "true (its noise is not secret): no guarantee to compose")
        if self.train_set is not None and plan.get("num_examples") not in (None, len(self.train_set)):
            raise ConfigError(f"method.module.teacher.checkpoint={path!r} was trained on N={plan['num_examples']} "
                              f"examples, this run has N={len(self.train_set)}: not the same private set")
        loss = f"{type(self.loss).__module__}.{type(self.loss).__name__}"
        if config["diffusion"].get("_target_") != loss:
            raise ConfigError(f"method.module.teacher.checkpoint={path!r} uses diffusion "
                              f"{config['diffusion'].get('_target_')}, this run {loss}: choose the teacher's diffusion/")
        prefix = "ema.module."  # the teacher's released (EMA) denoiser
        weights = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
        try:
            self.teacher.load_state_dict(weights)
        except RuntimeError:
            raise ConfigError(f"method.module.teacher.checkpoint={path!r}: its denoiser does not fit "
                              f"method.parts.teacher_backbone; set it to the checkpoint's model {config['model']}") from None
        ledger = PrivacyLedger(delta=spec["delta"], accountant=spec["accountant"])
        ledger.load_state_dict(privacy["ledger"])
        self._record_teacher_history(ledger, path)

    def _teacher_stage(self, cls: type[PrivateDiffusion], privacy: PrivacySpec, dataset: Any) -> PrivateDiffusion:
        """A fresh teacher denoiser (the untrained teacher backbone) as a `cls` module on `dataset`, with the
        teacher's training settings."""
        s = self.teacher_settings
        torch.manual_seed(s.seed)
        stage = cls(backbone=copy.deepcopy(self._initial_teacher[0]), loss=self.loss, privacy=privacy,
                    batch_size=min(s.batch_size, len(dataset)), physical_batch_size=self.physical_batch_size,
                    steps=s.steps, image_shape=self.image_shape, num_classes=self.num_classes, lr=s.lr,
                    ema_decay=s.ema_decay, seed=s.seed, num_workers=self.num_workers)
        stage.attach_private_data(dataset)
        return stage

    def _train_dp_teacher(self, make_trainer: Callable[[int, str], L.Trainer]) -> dict[str, Tensor]:
        """Train the teacher with DP-SGD on the private set in this run, as a DPDM run does (its own DP callback
        calibrates sigma to `epsilon_fraction` of the target and guards it); record its ledger as "teacher" and
        calibrate the student's part to what is left. Returns the teacher's EMA weights."""
        s = self.teacher_settings
        if self.train_set is None:
            raise RuntimeError("attach_private_data(dataset) must be called before fit_public_stages")
        spec = self.privacy_spec
        fraction = f"method.module.teacher.epsilon_fraction={s.epsilon_fraction:g}"
        # The run's DP settings (delta, C, accountant, secure/reproducible randomness, grad mode) at the teacher's
        # share of the target, sigma calibrated to it; the teacher's own noise multiplicity.
        privacy = replace(spec, epsilon=s.epsilon_fraction * spec.epsilon, noise_multiplier=None,
                          noise_multiplicity=s.noise_multiplicity)
        teacher = self._teacher_stage(DPDM, privacy, self.train_set)
        try:
            plan = teacher.ensure_plan()
        except (PrivacyError, ValueError) as err:
            raise ConfigError(f"{fraction}: no noise multiplier gives the teacher epsilon={privacy.epsilon:g} "
                              f"over {s.steps} steps ({' '.join(str(err).split())})") from None
        log.info("DP-SAD: training the teacher with DP on the private %s for %d steps (epsilon %g of the target %g, "
                 "sigma %.4g, q %.4g)", self.data_name, s.steps, privacy.epsilon, spec.epsilon,
                 plan.noise_multiplier, plan.sample_rate)
        started = time.perf_counter()
        trainer = make_trainer(s.steps, "dp_teacher")
        trainer.fit(teacher)
        seconds = time.perf_counter() - started
        self._record_teacher_history(teacher.ledger, "this run (DP-SGD on the private set)")
        self.teacher_cost = {"steps": trainer.global_step, "wall_time_s": seconds,
                             "epsilon_fraction": s.epsilon_fraction, "target_epsilon": privacy.epsilon,
                             "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate}
        if not spec.enabled:  # privacy=none: a non-private baseline, the teacher too (the report says so)
            self.teacher_cost.update(epsilon=None, accountant=None, target_epsilon=None)
            announce(f"DP-SAD: teacher trained in this run WITHOUT DP (privacy=none): {trainer.global_step} steps, "
                     f"{seconds:.1f} s")
            return teacher.sampling_denoiser().state_dict()
        epsilon, accountant = teacher.ledger.headline()
        self.teacher_cost.update(epsilon=epsilon, accountant=accountant)
        announce(f"DP-SAD: DP teacher trained in this run: {trainer.global_step} steps, epsilon={epsilon:.3g} "
                 f"(by {accountant.upper()}; its share {s.epsilon_fraction:g} of the target {spec.epsilon:g}), "
                 f"sigma={plan.noise_multiplier:.4g}, q={plan.sample_rate:.4g}, {seconds:.1f} s")
        try:  # the student's (and discriminator's) sigma, for what the teacher left: refused here in one line
            self.ensure_plan()
        except PrivacyError as err:
            raise ConfigError(f"{fraction} leaves the student nothing: {' '.join(str(err).split())}; "
                              "choose a smaller fraction") from None
        return teacher.sampling_denoiser().state_dict()

    def _train_teacher(self, make_trainer: Callable[[int, str], L.Trainer], public: Any = None,
                       class_rows: bool = True) -> dict[str, Tensor]:
        """Train the teacher without DP on the `public` set (class rows or the null class, by `class_rows`) or,
        with `public` None, on the private set (`nonprivate`, the paper's setting); returns its EMA weights."""
        s = self.teacher_settings
        if public is None and self.train_set is None:
            raise RuntimeError("attach_private_data(dataset) must be called before fit_public_stages")
        dataset = self.train_set if public is None else public
        stage = self._teacher_stage(
            PublicDiffusionStage, PrivacySpec(enabled=False, noise_multiplicity=s.noise_multiplicity,
                                              reproducible=True, grad_mode=self.privacy_spec.grad_mode), dataset)
        stage.null_labels = not class_rows
        name = "nonprivate_teacher" if public is None else "public_teacher"
        log.info("DP-SAD: training the teacher on %s for %d steps (%s%s)",
                 f"the private {self.data_name} WITHOUT DP" if public is None else self.public_cfg.get("name"),
                 s.steps, "not covered by any guarantee" if public is None else "no privacy cost",
                 "" if class_rows else "; the null class only: its set has no labels for the private classes")
        make_trainer(s.steps, name).fit(stage)
        return stage.sampling_denoiser().state_dict()

    def on_train_start(self) -> None:
        super().on_train_start()
        if not bool(self.teacher_trained):
            log.warning("DP-SAD: distilling from an untrained teacher (call fit_public_stages first; "
                        "`dp-diffusion train` does)")

    # ---- one step ---------------------------------------------------------------------------------
    def prepare_batch(self, batch: Any) -> dict[str, Tensor]:
        """Every per-example tensor of the step, examples first (B, K, ...): x_r from the forward process,
        sigma, the loss weight, labels after label dropout, the teacher's output and the student's (detached)."""
        images, labels = batch
        labels = labels if self.num_classes > 0 else None
        draw = self.loss.draw(images, labels, self.privacy_spec.noise_multiplicity)
        sigma = draw["sigma"]
        view = (*sigma.shape,) + (1,) * (images.ndim - 1)
        prepared = {"images": images, "sigma": sigma, "weight": self.loss.weight(sigma),
                    "noisy": images.unsqueeze(1) + sigma.reshape(view) * draw["noise"]}  # x_r ~ q(x_r | x_0)
        if labels is not None:
            null = torch.full_like(sigma, self.num_classes, dtype=torch.long)
            prepared["labels"] = torch.where(draw["keep_label"], labels.unsqueeze(1).expand_as(null), null)
        with torch.no_grad():
            prepared["teacher"] = self._forward_rows(self.teacher, prepared, self._teacher_labels(prepared))
            if self.adversarial:
                prepared["student"] = self._forward_rows(self.denoiser, prepared, prepared.get("labels"))
        return prepared

    def _teacher_labels(self, prepared: Mapping[str, Tensor]) -> Tensor | None:
        labels = prepared.get("labels")
        if labels is None or bool(self.teacher_class_rows):
            return labels
        return torch.full_like(labels, self.num_classes)  # a public teacher without class rows: its null class

    @staticmethod
    def _rows(prepared: Mapping[str, Tensor], key: str) -> Tensor:
        value = prepared[key]
        return value.reshape(-1, *value.shape[2:])

    def _forward_rows(self, net: nn.Module, prepared: Mapping[str, Tensor], labels: Tensor | None) -> Tensor:
        """net(x_r, sigma, y) on every (example, draw) row, back in (B, K, ...) shape; in chunks of the physical
        batch's rows (called without grad)."""
        x, sigma = self._rows(prepared, "noisy"), self._rows(prepared, "sigma")
        y = None if labels is None else labels.reshape(-1)
        size = self.physical_batch_size * prepared["sigma"].shape[1]
        chunks = [net(x[s:s + size], sigma[s:s + size], None if y is None else y[s:s + size])
                  for s in range(0, x.shape[0], size)]
        out = torch.cat(chunks) if chunks else torch.zeros_like(x)
        return out.reshape(prepared["noisy"].shape)

    def _discriminator_inputs(self, prepared: Mapping[str, Tensor]) -> dict[str, Any]:
        labels = prepared.get("labels")
        return {"noise_labels": self._rows(prepared, "sigma").log() / 4,  # EDM's c_noise
                "class_labels": None if labels is None else labels.reshape(-1)}

    def student_objective(self, student_out: Tensor, prepared: Mapping[str, Tensor]) -> Tensor:
        """(B,): lambda(sigma) [MSE(teacher, student) + MSE(x_0, student)] + lambda_adv * adversarial."""
        num_examples = prepared["sigma"].shape[0]
        target = prepared["images"].unsqueeze(1).expand_as(prepared["noisy"]).reshape(student_out.shape)
        teacher_out = self._rows(prepared, "teacher")
        loss = adversarial.distillation_loss(teacher_out, student_out, target, num_examples,
                                             self._rows(prepared, "weight"))
        if not self.adversarial:
            return loss
        adv = adversarial.student_adversarial_loss(self.discriminator, teacher_out, student_out,
                                                   num_examples=num_examples, **self._discriminator_inputs(prepared))
        return adversarial.student_loss(loss, adv, self.adversarial_weight)

    def student_loss(self, model: Any, prepared: Mapping[str, Tensor]) -> Tensor:
        """Per-example loss of the student `model` (the private step's functional view of it)."""
        labels = prepared.get("labels")
        out = model(self._rows(prepared, "noisy"), self._rows(prepared, "sigma"),
                    None if labels is None else labels.reshape(-1))
        return self.student_objective(out, prepared)

    def discriminator_loss(self, model: Any, prepared: Mapping[str, Tensor]) -> Tensor:
        """Per-example loss of the discriminator `model` on the (teacher, student) outputs, both detached."""
        return adversarial.discriminator_loss(model, self._rows(prepared, "teacher"), self._rows(prepared, "student"),
                                              num_examples=prepared["sigma"].shape[0],
                                              **self._discriminator_inputs(prepared))

    def per_example_losses(self) -> dict[str, Any]:
        """The private parts' per-example losses, as `training_step` steps them (sound: the discriminator's,
        if it plays, and the student's)."""
        losses = {"discriminator": self.discriminator_loss, "student": self.student_loss}
        return {part: losses[part] for part in self.private_parts()}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if not self.start_logical_step():
            return None
        prepared = self.prepare_batch(batch)
        if self.privacy_model == "sound":
            if self.adversarial:
                self.log_step(self.private_step("discriminator", self.discriminator_loss, prepared),
                              prefix="discriminator")
            self.log_step(self.private_step("student", self.student_loss, prepared), prefix="student")
        else:
            self._paper_step(prepared)
        self.on_private_step()
        return None

    # ---- the paper variant ----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """sound: the core's DP optimizers. paper: plain Adam for the student, whose gradient is sanitised at
        its output (`OutputSanitiser`, sigma from the callback's plan), and for the non-private discriminator."""
        if self.privacy_model == "sound":
            return super().configure_optimizers()
        plan = self.ensure_plan()
        self.ensure_randomness()
        self._engines = {}
        if self.privacy_spec.enabled:
            check_no_batch_mixing(self.denoiser)
        self._student_optimizer = torch.optim.Adam(list(trainable_parameters(self.denoiser).values()), lr=self.lr)
        self.sanitiser = self._make_sanitiser(plan.noise_multiplier, plan.expected_batch_size)
        return [self._student_optimizer, *self.public_optimizers()]

    def _make_sanitiser(self, sigma: float, expected_batch_size: float) -> OutputSanitiser | None:
        if not self.privacy_spec.enabled:
            return None
        return OutputSanitiser(self.privacy_spec.max_grad_norm, sigma, self.noise, expected_batch_size,
                               paper_time_dilution=self.num_timesteps if self.paper_noise_scaling else None)

    def _paper_step(self, prepared: Mapping[str, Tensor]) -> None:
        """The paper's step: the discriminator by plain Adam on private outputs, then the student's update with
        each example's output gradient clipped and noised (`OutputSanitiser`); one ledger step (the paper's
        accounting, not a guarantee)."""
        num_examples = prepared["sigma"].shape[0]
        if self.adversarial and num_examples > 0:
            loss = self.discriminator_loss(self.discriminator, prepared).mean()
            self.log("discriminator/loss", self.public_step(self.discriminator_optimizer, loss), batch_size=1)
        labels = prepared.get("labels")
        self.sanitised_output_step(
            "student", self._student_optimizer, self.sanitiser,
            lambda: self.denoiser(self._rows(prepared, "noisy"), self._rows(prepared, "sigma"),
                                  None if labels is None else labels.reshape(-1)),
            lambda out: self.student_objective(out, prepared), num_examples, self.plan.expected_batch_size)

    # ---- checkpoints -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.teacher_cost is not None:  # a resumed run reports what its teacher cost without training it again
            checkpoint[TEACHER_COST_KEY] = dict(self.teacher_cost)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As nn.Module's; a state written before `teacher_class_rows` existed gets the rule it ran by (a public
        teacher asked with the null class, any other with the labels)."""
        if "teacher_class_rows" not in state_dict:
            state_dict = {**state_dict, "teacher_class_rows": torch.tensor(self.teacher_settings.source != "public")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.teacher_cost = checkpoint.get(TEACHER_COST_KEY, self.teacher_cost)

    # ---- what the guarantee covers ----------------------------------------------------------------------
    def privacy_report(self) -> dict[str, Any]:
        """The core's report; for the paper variant marked as not a guarantee, with the paper's accounting."""
        report = super().privacy_report()
        if self.teacher_cost is not None:
            report["teacher"] = dict(self.teacher_cost)  # the in-run DP teacher's own epsilon and cost
        if self.privacy_model == "paper" and report["private"]:
            sanitiser = self.sanitiser
            if sanitiser is None:  # e.g. a reloaded checkpoint: the same settings, for the record only
                self.ensure_randomness()
                sanitiser = self._make_sanitiser(self.plan.noise_multiplier, self.plan.expected_batch_size)
            report[EPSILON_IS_GUARANTEE] = False
            report["epsilon_note"] = PAPER_ACCOUNTING_NOTE
            report["paper_accounting"] = paper_accounting(sanitiser, self.plan.sample_rate, report["steps"] or 0,
                                                          report["delta"], report["epsilon_accountant"] or "rdp")
            notes = [PAPER_ACCOUNTING_NOTE]
            if sanitiser.paper_time_dilution is not None:
                accounting = report["paper_accounting"]
                notes.append(f"{PAPER_TIME_DILUTION_NOTE} Here sigma / T = {accounting['noise_multiplier_added']:.3g} "
                             f"(T = {sanitiser.paper_time_dilution}), whose epsilon would be "
                             f"{accounting['epsilon_of_noise_added']:.3g} by the same accounting.")
            report["covers"]["notes"][:0] = notes
        return report

    def privacy_coverage(self) -> Coverage:
        released = ["EMA student denoiser weights (and samples drawn from it)"]
        source = self.teacher_settings.source
        public_name = self.public_cfg.get("name")
        where = (f"in this run, calibrated to epsilon_fraction={self.teacher_settings.epsilon_fraction:g} of the target"
                 if self.teacher_settings.trained_in_run_with_dp
                 else f"in an earlier run, {self.teacher_settings.checkpoint}")
        teacher = {
            "dp": f"teacher (DP-SGD on the private set {where}; its history is composed into epsilon as mechanism "
                  f"{TEACHER_MECHANISM!r})",
            "public": f"teacher (pretrained on public {public_name}; frozen)",
            "nonprivate": "teacher (trained on the private set WITHOUT DP)",
        }[source]
        warm = ([f"the student's warm start: pretrained on public {public_name} only"]
                if self.student_init == "warm_start" else [])
        if self.privacy_model == "paper":
            without = [teacher] if source == "nonprivate" else []
            if self.adversarial:
                without.append("discriminator (trained on teacher/student outputs at noised private images, "
                               "WITHOUT DP)")
            return Coverage(
                released=[released[0] + ": the paper's accounting, NOT a DP guarantee"],
                trained_with_dp=["student, by the paper's mechanism only: each example's gradient at the student's "
                                 "output clipped and noised (not DP-SGD on its parameters; not a guarantee)",
                                 *([teacher] if source == "dp" else [])],
                saw_private_data_without_dp=without,
                never_saw_private_data=[*([teacher] if source == "public" else []), *warm],
                notes=[f"DP-SAD privacy_model=paper, teacher.source={source}"],
            )
        trained = ["student (DP-SGD on all its parameters" + (", from its public warm start)" if warm else ")")]
        if self.adversarial:
            trained.append("discriminator (DP-SGD on all its parameters; its input depends on private data)")
        if source == "dp":
            trained.append(teacher)
        notes = [f"DP-SAD privacy_model=sound, teacher.source={source}"]
        if not self.adversarial:
            notes.append("adversarial_weight=0: no discriminator was trained or used")
        return Coverage(released=released, trained_with_dp=trained,
                        never_saw_private_data=[*([teacher] if source == "public" else []), *warm], notes=notes)
