"""DPDM (Dockhorn et al., TMLR 2023): a denoiser trained with DP-SGD, from scratch or from a public warm start.

Algorithm 1 of the paper is exactly `PrivateDiffusion` on the privacy core:
Poisson batch, K noise draws per example averaged before clipping (noise
multiplicity), clip to C, Gaussian noise, Adam, EMA. With a public set
(`public=digits`) the denoiser is first pretrained on it without privacy and
DP-SGD starts from those weights (PDP-Diffusion's recipe; `methods/warm_start.py`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dp_diffusion.console import announce
from dp_diffusion.diffusion.losses import DiffusionLoss
from dp_diffusion.methods.diffusion_module import PrivateDiffusion
from dp_diffusion.methods.warm_start import WarmStartSettings, load_warm_start
from dp_diffusion.privacy import Coverage


class DPDM(PrivateDiffusion):
    """Differentially Private Diffusion Model (optionally warm-started on a public set)."""

    def __init__(
        self,
        backbone: nn.Module,
        loss: DiffusionLoss,
        *,
        public: Mapping[str, Any] | None = None,
        warm_start: Mapping[str, Any] | None = None,
        cache_dir: str | None = "runs/public_cache",
        data_name: str = "",
        **settings: Any,
    ) -> None:
        """`public`: a public set config (none: from scratch); `warm_start`: its pretraining settings;
        `settings`: the run's settings, as `PrivateDiffusion` takes them."""
        public = OmegaConf.to_container(public, resolve=True) if isinstance(public, DictConfig) else dict(public or {})
        self.public_cfg = public if public.get("name") not in (None, "none") else {}
        self.warm_start = WarmStartSettings.from_config(warm_start)
        # The untrained backbone the warm start pretrains (a list keeps it out of the module tree); only kept
        # when there is a public set, so a run from scratch holds no second copy of the weights.
        self._initial_backbone = [copy.deepcopy(backbone)] if self.public_cfg else []
        super().__init__(backbone, loss, **settings)
        self.cache_dir = cache_dir
        self.data_name = data_name

    def fit_public_stages(self, make_trainer: Callable[[int, str], L.Trainer]) -> None:
        """With a public set: pretrain the denoiser on it (or load the cached pretraining) and start from it."""
        if not self.public_cfg:
            return
        load_warm_start(self, initial_backbone=self._initial_backbone[0], public_cfg=self.public_cfg,
                        settings=self.warm_start, data_name=self.data_name, make_trainer=make_trainer,
                        cache_dir=self.cache_dir)
        announce(f"DPDM: warm start from public {self.public_cfg['name']} pretraining "
                 f"({self.warm_start.steps} steps); DP-SGD trains every parameter from there")

    def privacy_coverage(self) -> Coverage:
        if not self.public_cfg:
            return Coverage(
                released=["EMA denoiser weights (and samples drawn from it)"],
                trained_with_dp=["denoiser (all parameters)"],
            )
        name = self.public_cfg["name"]
        return Coverage(
            released=["EMA denoiser weights (and samples drawn from it)"],
            trained_with_dp=[f"denoiser (all parameters), starting from its public {name} pretraining"],
            never_saw_private_data=[f"the warm start: the denoiser pretrained on public {name} only"],
            notes=["the public set is chosen in the config; choosing it by comparing public sets with the private "
                   "data is outside this guarantee"],
        )
