"""DP-LDM (Lyu et al., arXiv 2305.15759): a latent diffusion model learned from public data, DP fine-tuning of a part.

Algorithm (reference notes, papers-dpdm-dpldm.md Part 2):

1. Public stages (``fit_public_stages``, before the private fit, non-private): train the KL autoencoder
   on the public set (``public/``); compute the latent scale factor on public latents; pretrain the
   latent denoiser on scaled public latents with the run's ``diffusion/`` loss and the public labels.
   Both are cached under ``cache_dir`` by a key of their public config only (``public_cache_key``), so a
   sweep over epsilon pretrains once.
2. The pretrained class embedder is re-indexed for the private labels (``ClassEmbedder.extend_classes``:
   label y keeps public row y, labels the public set lacks get new rows), the weights are loaded, and
   ``method.module.finetune`` selects what DP-SGD trains (``nets/finetune.py``): everything else is
   frozen, takes no per-example gradient work and no noise.
3. Private stage: DP-SGD through the privacy core on latents of the private images, encoded by the
   frozen public encoder (the posterior mean, times the public scale factor). One (sigma, noise) draw per
   example unless ``privacy.noise_multiplicity`` says more (the paper uses one).
4. ``generate`` samples latents from the EMA denoiser and decodes them with the public decoder.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from dp_diffusion.build import CONFIG_KEY
from dp_diffusion.config import ConfigError
from dp_diffusion.console import announce
from dp_diffusion.data.public import load_public, public_cache_key
from dp_diffusion.data.registry import DatasetInfo
from dp_diffusion.diffusion.losses import DiffusionLoss
from dp_diffusion.methods.diffusion_module import PrivateDiffusion
from dp_diffusion.methods.public_stage import AutoencoderStage, PublicDiffusionStage
from dp_diffusion.methods.stage_cache import cached_stage
from dp_diffusion.nets.autoencoder import AutoencoderKL, latent_scale_factor
from dp_diffusion.nets.finetune import FinetuneSummary, select_trainable
from dp_diffusion.nets.latent_unet import LatentUNet
from dp_diffusion.privacy import Coverage, PrivacySpec
from dp_diffusion.sampling import draw_samples, resolve_device

log = logging.getLogger(__name__)
CACHE_FILE = "public_stages.pt"  # both stages (what pretrained=PATH takes)
AUTOENCODER_FILE = "autoencoder.pt"
ENCODE_BATCH = 256  # images per encoder call when encoding the public set


def _plain(cfg: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


PRETRAINING_DEFAULTS: dict[str, Any] = {
    "autoencoder_steps": 1500,
    "autoencoder_batch_size": 64,
    "autoencoder_lr": 1.0e-3,
    "latent_steps": 1500,
    "latent_batch_size": 128,
    "latent_lr": 1.0e-3,
    "noise_multiplicity": 1,
    "ema_decay": 0.999,
    "latent_std": 0.5,  # scaled latents get this std (EDM's sigma_data: the loss's data scale)
    "seed": 0,
}


def pretraining_settings(cfg: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    """`method.module.pretraining` with defaults; ConfigError (one line) on an unknown key or a bad value."""
    values = _plain(cfg)
    unknown = sorted(set(values) - set(PRETRAINING_DEFAULTS))
    if unknown:
        raise ConfigError(f"method.module.pretraining has unknown keys {unknown}; known: {sorted(PRETRAINING_DEFAULTS)}")
    settings = {**PRETRAINING_DEFAULTS, **values}
    for key, value in settings.items():
        if key == "seed":
            ok = isinstance(value, int) and value >= 0
        elif key.endswith(("steps", "batch_size", "multiplicity")):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        elif key == "ema_decay":
            ok = isinstance(value, (int, float)) and 0 <= value < 1
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if not ok:
            raise ConfigError(f"method.module.pretraining.{key} has a bad value {value!r}")
    return settings


STAGES_KEYS = ("architecture", "autoencoder", "latent_scale", "backbone", "public_classes")


def load_stage_file(path: Path, keys: tuple[str, ...], source: str) -> dict[str, Any]:
    """A public-stages file written by `fit_public_stages`; ConfigError (one line) for anything else (a run's
    checkpoint, which may hold weights trained on private data, is not public pretraining)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable, truncated or not a torch file: one message
        raise ConfigError(f"{source}: cannot read {path} as public stages ({type(err).__name__})") from None
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise ConfigError(f"{source}: {path} is not a {CACHE_FILE} of DP-LDM's public stages (it lacks "
                          f"{', '.join(missing)}); give the file an earlier run wrote under its cache_dir")
    return state


def load_base_weights(model: nn.Module, weights: Mapping[str, Tensor]) -> None:
    """Load weights of a model without LoRA adapters into `model`, which may have them: a key
    `...q.weight` goes to `...q.base.weight` where the adapter wraps the layer; adapters keep their init."""
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    for key, value in weights.items():
        if key not in own:
            head, _, leaf = key.rpartition(".")
            key = f"{head}.base.{leaf}"
        if key not in own:
            raise KeyError(f"pretrained weight {key!r} has no place in the fine-tuned model")
        mapped[key] = value
    missing = [k for k in own if k not in mapped and ".down." not in k and ".up." not in k]
    if missing:
        raise KeyError(f"pretrained weights lack {missing[:3]}")
    model.load_state_dict(mapped, strict=False)


class DPLDM(PrivateDiffusion):
    """The latent denoiser (DP fine-tuned part), the frozen public autoencoder, and their public stages."""

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        backbone: LatentUNet,
        loss: DiffusionLoss,
        *,
        finetune: str = "condition",
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        public: Mapping[str, Any] | None = None,
        autoencoder_public: Mapping[str, Any] | None = None,
        data_name: str = "",
        pretraining: Mapping[str, Any] | None = None,
        cache_dir: str | None = "runs/public_cache",
        pretrained: str | None = None,
        **settings: Any,
    ) -> None:
        """`settings`: the run's settings, as `PrivateDiffusion` takes them (privacy, batch sizes, steps, ...)."""
        self.public_cfg = _plain(public)
        if not self.public_cfg or self.public_cfg.get("name") in (None, "none"):
            raise ConfigError("method=dp_ldm pretrains on a public set: choose one, e.g. public=digits "
                              "(offline), public=dead_leaves (offline) or public=emnist")
        pretraining = pretraining_settings(pretraining)
        # The autoencoder's own public set (null: the same as the latent model's), e.g. sharp dead-leaves
        # images for the autoencoder while the latent model learns digits from upsampled 8x8 ones.
        self.autoencoder_public_cfg = _plain(autoencoder_public) or self.public_cfg
        # The untrained architecture, kept (outside the module tree) to build the public pretraining model.
        initial = copy.deepcopy(backbone)
        summary = select_trainable(backbone, finetune, lora_rank=lora_rank, lora_alpha=lora_alpha)
        super().__init__(backbone, loss, **settings)
        self.autoencoder = autoencoder.requires_grad_(False)  # no dropout or batch statistics: mode-free
        self.finetune = finetune
        self.lora_rank = lora_rank if finetune == "lora" else None
        self.finetune_summary: FinetuneSummary = summary
        self.pretraining = pretraining
        self.cache_dir = cache_dir
        self.pretrained = pretrained
        self.data_name = data_name
        self._initial_backbone = [initial]  # a list keeps it out of the module tree and the checkpoint
        self.register_buffer("latent_scale", torch.tensor(1.0))
        self.register_buffer("public_stages_trained", torch.tensor(False))
        log.info("DP-LDM: %s", summary)

    def check_resume(self, checkpoint: dict[str, Any]) -> None:
        """Also refuse, in one line, a checkpoint that fine-tuned another part (`finetune`, LoRA rank): its
        optimizer state and trainable parameters would not fit this run's."""
        super().check_resume(checkpoint)
        stored = ((checkpoint.get(CONFIG_KEY) or {}).get("method") or {}).get("module") or {}
        if "finetune" not in stored:
            return
        was = (stored["finetune"], stored.get("lora_rank") if stored["finetune"] == "lora" else None)
        if was != (self.finetune, self.lora_rank):
            def text(finetune: str, rank: int | None) -> str:
                return f"method.module.finetune={finetune}" + (f" (lora_rank={rank})" if rank is not None else "")

            raise ConfigError(f"resume: checkpoint fine-tuned {text(*was)}; this run asks "
                              f"{text(self.finetune, self.lora_rank)}: resume with the same part or start a new run")

    @classmethod
    def part_shapes(cls, part: str, data: Mapping[str, Any], built: Mapping[str, Any]) -> dict[str, Any]:
        """The latent denoiser is sized by the autoencoder's latent (channels, side); the autoencoder by the data."""
        if part != "backbone":
            return dict(data)
        if "autoencoder" not in built:
            raise ConfigError("method.parts must list autoencoder before backbone (the backbone is sized by its latent)")
        channels, side, _ = built["autoencoder"].latent_shape
        return {**data, "in_channels": channels, "out_channels": channels, "resolution": side,
                "image_shape": (channels, side, side)}

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.autoencoder.latent_shape)

    # ---- public stages ---------------------------------------------------------------------
    def autoencoder_key(self) -> str:
        """Cache key of the autoencoder stage: the public set, its architecture and its training settings."""
        s = self.pretraining
        stage = {
            "autoencoder": {"class": type(self.autoencoder).__name__, "f": self.autoencoder.f,
                            "latent_channels": self.autoencoder.latent_channels,
                            "kl_weight": self.autoencoder.kl_weight,
                            "shapes": {k: list(v.shape) for k, v in self.autoencoder.state_dict().items()}},
            "settings": {k: s[k] for k in ("autoencoder_steps", "autoencoder_batch_size", "autoencoder_lr", "seed")},
        }
        return public_cache_key(self.autoencoder_public_cfg, stage, image_shape=self.image_shape)

    def cache_key(self) -> str:
        """Cache key of the latent stage (which holds both stages): the autoencoder stage's key, the latent
        UNet's architecture, the loss and the latent pretraining settings. Nothing private enters."""
        stage = {
            "autoencoder_key": self.autoencoder_key(),
            "backbone": _plain(self._initial_backbone[0].architecture),
            "loss": {"class": type(self.loss).__name__,
                     **{k: v for k, v in vars(self.loss).items() if isinstance(v, (int, float, str, bool))
                        and k not in ("num_classes", "label_dropout")}},
            "settings": {k: v for k, v in self.pretraining.items() if not k.startswith("autoencoder_")},
            "conditional": self.num_classes > 0,
        }
        return public_cache_key(self.public_cfg, stage, image_shape=self.image_shape)

    def fit_public_stages(self, make_trainer: Callable[[int, str], L.Trainer]) -> None:
        """Train (or load from `pretrained` or the cache) the public autoencoder and latent model, then set up
        fine-tuning. Each stage is cached under its own key, so changing the latent stage keeps the autoencoder."""
        if self.pretrained is not None:
            path = Path(self.pretrained)
            if not path.is_file():
                raise ConfigError(f"pretrained={self.pretrained}: no such file (give a {CACHE_FILE} written by an "
                                  "earlier DP-LDM run's public stages)")
            state = load_stage_file(path, STAGES_KEYS, f"pretrained={self.pretrained}")
            log.info("DP-LDM: public stages loaded from pretrained=%s; not trained again", path)
        else:
            path = Path(self.cache_dir) / self.cache_key() / CACHE_FILE if self.cache_dir else None
            # The public stages draw from their own seeds; the private run's global generator continues
            # as if they had not run, so a run that finds them cached trains exactly as one that made them.
            with torch.random.fork_rng(devices=[]):
                state = cached_stage(path, "DP-LDM: public stages", lambda: self._train_public_stages(make_trainer))
        self._load_public_stages(state, str(path) if path is not None else "the public stages")

    def architecture(self) -> dict[str, Any]:
        """What pretrained public stages must match: the latent UNet's constructor settings (classes aside)
        and the autoencoder's parameter shapes."""
        backbone = {k: v for k, v in _plain(self._initial_backbone[0].architecture).items() if k != "num_classes"}
        return {"backbone": backbone,
                "autoencoder": {k: list(v.shape) for k, v in self.autoencoder.state_dict().items()}}

    def _check_architecture(self, stored: Mapping[str, Any], source: str) -> None:
        """ConfigError naming each setting where `stored` (the pretrained stages') differs from this model's."""
        mine = self.architecture()
        differences = [f"backbone.{k}: {stored['backbone'].get(k)!r} there, {v!r} here"
                       for k, v in mine["backbone"].items() if stored["backbone"].get(k) != v]
        if stored["autoencoder"] != mine["autoencoder"]:
            differences.append("autoencoder parameter shapes")
        if differences:
            raise ConfigError(f"DP-LDM: {source} was pretrained with another architecture ("
                              f"{'; '.join(differences)}): match method.parts to it or pretrain again")

    def _public_info(self) -> DatasetInfo:
        """What the public loader knows of the private set: its registry name (to refuse an overlapping
        public set) and its image shape; nothing read from private data."""
        return DatasetInfo(self.data_name, 0, 0, tuple(self.image_shape), self.num_classes)

    def _train_public_stages(self, make_trainer: Callable[[int, str], L.Trainer]) -> dict[str, Any]:
        s = self.pretraining
        public = load_public(self.public_cfg, self._public_info())
        ae_path = Path(self.cache_dir) / self.autoencoder_key() / AUTOENCODER_FILE if self.cache_dir else None
        ae_public = (public if self.autoencoder_public_cfg == self.public_cfg
                     else load_public(self.autoencoder_public_cfg, self._public_info()))
        ae_state = cached_stage(ae_path, "DP-LDM: public autoencoder",
                                lambda: self._train_autoencoder(ae_public, make_trainer))
        autoencoder = copy.deepcopy(self.autoencoder)
        autoencoder.load_state_dict(ae_state)
        torch.manual_seed(s["seed"] + 1)  # the latent stage's draws: the same whether the autoencoder was cached
        images, labels = self._encode_all(autoencoder, public)
        scale = s["latent_std"] * latent_scale_factor(images)
        latents = TensorDataset(images * scale, labels)
        # Public classes; an unlabeled public set pretrains one class (label 0), which the private labels extend.
        public_classes = max(public.num_classes, 1) if self.num_classes > 0 else 0
        backbone = LatentUNet(**{**self._initial_backbone[0].architecture, "num_classes": public_classes})
        stage_loss = copy.copy(self.loss)
        stage_loss.num_classes = public_classes  # the null class of the public label set
        stage = PublicDiffusionStage(
            backbone=backbone, loss=stage_loss,
            privacy=PrivacySpec(enabled=False, noise_multiplicity=s["noise_multiplicity"], reproducible=True,
                                grad_mode=self.privacy_spec.grad_mode),
            batch_size=min(s["latent_batch_size"], len(latents)), physical_batch_size=self.physical_batch_size,
            steps=s["latent_steps"], image_shape=self.latent_shape, num_classes=public_classes,
            lr=s["latent_lr"], ema_decay=s["ema_decay"], seed=s["seed"], num_workers=self.num_workers)
        stage.attach_private_data(latents)  # public latents: the stage's privacy is disabled
        log.info("DP-LDM: pretraining the latent model on public latents %s for %d steps (no privacy cost)",
                 tuple(self.latent_shape), s["latent_steps"])
        make_trainer(s["latent_steps"], "public_latent").fit(stage)
        return {"architecture": self.architecture(), "autoencoder": autoencoder.state_dict(),
                "latent_scale": float(scale),
                "backbone": self._backbone_of(stage.sampling_denoiser()).state_dict(),
                "public_classes": public_classes}

    def _train_autoencoder(self, public: Any, make_trainer: Callable[[int, str], L.Trainer]) -> dict[str, Tensor]:
        s = self.pretraining
        torch.manual_seed(s["seed"])  # public stages: reproducible from their own seed, whatever the run's
        log.info("DP-LDM: training the autoencoder on public %s (%d images) for %d steps (no privacy cost)",
                 public.name, len(public), s["autoencoder_steps"])
        autoencoder = copy.deepcopy(self.autoencoder).requires_grad_(True).train()
        make_trainer(s["autoencoder_steps"], "public_autoencoder").fit(
            AutoencoderStage(autoencoder, public, s["autoencoder_batch_size"], s["autoencoder_lr"], s["seed"],
                             self.num_workers))
        return autoencoder.requires_grad_(False).state_dict()

    @staticmethod
    def _backbone_of(denoiser: nn.Module) -> nn.Module:
        """The backbone inside a preconditioned denoiser (the loss's `precondition` wrapper)."""
        for module in denoiser.modules():
            if isinstance(module, LatentUNet):
                return module
        raise TypeError("the denoiser holds no LatentUNet")

    @torch.no_grad()
    def _encode_all(self, autoencoder: AutoencoderKL, dataset: Any) -> tuple[Tensor, Tensor]:
        loader = torch.utils.data.DataLoader(dataset, batch_size=ENCODE_BATCH, shuffle=False)
        means, labels = [], []
        # disable=None: a bar on a terminal only (100,000 dead-leaves images take minutes on a 2-core CPU)
        for images, y in tqdm(loader, desc="DP-LDM: encoding the public set", disable=None, leave=False):
            means.append(autoencoder.encode(images).mean)
            labels.append(y)
        return torch.cat(means), torch.cat(labels)

    def _load_public_stages(self, state: Mapping[str, Any], source: str) -> None:
        self._check_architecture(state["architecture"], source)
        self.autoencoder.load_state_dict(state["autoencoder"])
        self.latent_scale.fill_(state["latent_scale"])
        pretrained = LatentUNet(**{**self._initial_backbone[0].architecture, "num_classes": state["public_classes"]})
        pretrained.load_state_dict(state["backbone"])
        if self.num_classes > 0:
            pretrained.extend_classes(self.num_classes)
        backbone = self._backbone_of(self.denoiser)
        load_base_weights(backbone, pretrained.state_dict())
        load_base_weights(self._backbone_of(self.ema.module), pretrained.state_dict())
        self.public_stages_trained.fill_(True)
        how = "with DP" if self.privacy_spec.enabled else "WITHOUT privacy (privacy=none)"
        announce(f"DP-LDM: {self.finetune_summary} {how} (public {self.public_cfg['name']} pretraining)")

    def on_train_start(self) -> None:
        super().on_train_start()
        if not bool(self.public_stages_trained):
            log.warning("DP-LDM: the private fit starts from an untrained public stage "
                        "(call fit_public_stages first; `dp-diffusion train` does)")

    # ---- private stage -----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Scaled latents of `images` by the frozen public encoder (posterior mean): a per-example map."""
        return self.autoencoder.encode(images).mean * self.latent_scale

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents decoded by the public decoder into images clamped to [-1, 1]."""
        return torch.cat([self.autoencoder.decode(chunk / self.latent_scale)
                          for chunk in latents.split(ENCODE_BATCH)]).clamp(-1.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """`images` through the public autoencoder (encoder mean, then decoder): the best a perfect latent
        model could give with this autoencoder."""
        return self.decode_latents(torch.cat([self.encode(chunk) for chunk in images.split(ENCODE_BATCH)]))

    def prepare_batch(self, batch: Any) -> Any:
        images, labels = batch
        return super().prepare_batch((self.encode(images), labels))

    @torch.no_grad()
    def generate(self, num_samples: int, sample_cfg: Any, seed: int = 0, device: str | torch.device | None = None,
                 disable_progress: bool = False) -> tuple[Tensor, Tensor | None]:
        """Latents from the EMA denoiser, decoded by the public decoder into images in [-1, 1]."""
        where = resolve_device(sample_cfg.device if device is None else str(device))
        self.to(where)
        latents, labels = draw_samples(self.sampling_denoiser(), num_samples, self.latent_shape, self.num_classes,
                                       sample_cfg, seed=seed, disable_progress=disable_progress,
                                       sigma_range=self.sampling_sigma_range(), device=where)
        return self.decode_latents(latents), labels

    # ---- what the guarantee covers -------------------------------------------------------------
    def privacy_coverage(self) -> Coverage:
        name = self.public_cfg["name"]
        ae_name = self.autoencoder_public_cfg["name"]
        return Coverage(
            released=["EMA latent denoiser weights", "public autoencoder (decoder) weights",
                      "samples decoded from latents drawn from them"],
            trained_with_dp=[f"latent denoiser, {self.finetune_summary} "
                             f"(fine-tuned on latents of private images)"],
            never_saw_private_data=[f"autoencoder (public {ae_name} only; frozen; its encoder maps each private "
                                    "image to a latent, a per-example function)",
                                    f"the latent denoiser's frozen weights (pretrained on public {name})",
                                    "the latent scale factor (public latents only)"],
            notes=["the public set is chosen in the config; choosing it by comparing public sets with the private "
                   "data (as the paper's MNIST public set was, by FID) is outside this guarantee",
                   "samples are post-processing of the released weights"],
        )
