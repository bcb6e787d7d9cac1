"""`dp-diffusion audit`: train once with canaries, score them, bound epsilon from below.

The record (`kind: "audit"`) goes to the run's results.jsonl and to
`results_file`, like train's; the verdict compares the lower bound with the
epsilon the run's own accountant claims for the same training.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, open_dict
from torch.utils.data import Dataset, Subset

from dp_diffusion.audit.blackbox import canary_losses, fixed_draws
from dp_diffusion.audit.bounds import audit_bounds
from dp_diffusion.audit.canaries import add_canaries, audit_dataset, binary_pattern_images, draw_membership
from dp_diffusion.audit.whitebox import CanaryUpdateRecorder, dirac_scale
from dp_diffusion.build import build_method, config_to_dict
from dp_diffusion.config import ConfigError
from dp_diffusion.data.public import resolve_public
from dp_diffusion.run_config import validate_config, validate_privacy
from dp_diffusion.data.registry import dataset_info
from dp_diffusion.data import build_datamodule
from dp_diffusion.evaluate import append_results
from dp_diffusion.privacy import PrivateTrainingModule

MODES = ("whitebox", "blackbox")
REFERENCES = ("initial", "retrain")
WEAK_BLACKBOX = ("black-box audits are weak: loss scores on mnist5k with a tiny model reached only AUC 0.59-0.63 "
                 "and a lower bound of about 0.1 even without DP; a low bound here proves nothing")


def _int_at_least(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def validate_audit(cfg: DictConfig) -> None:
    """One ConfigError line for the first bad `audit.*` value."""
    audit = cfg.get("audit")
    if audit is None:
        raise ConfigError("the audit config needs an `audit:` block (see conf/audit.yaml)")

    def require(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"audit.{key} must be {allowed}, got {audit.get(key)!r}")

    require(audit.get("mode") in MODES, "mode", f"one of {MODES}")
    require(_int_at_least(audit.get("canaries"), 4), "canaries", "an integer >= 4 (m, the number of canaries)")
    require(audit.get("steps") is None or _int_at_least(audit.get("steps"), 1), "steps", "null or an integer >= 1")
    beta = audit.get("beta")
    require(isinstance(beta, float) and 0 < beta < 1, "beta", "a number in (0, 1) (1 - confidence)")
    delta = audit.get("delta")
    require(delta is None or (isinstance(delta, (int, float)) and 0 <= delta < 1), "delta",
            "null (the run's delta) or a number in [0, 1)")
    require(audit.get("max_real_examples") is None or _int_at_least(audit.get("max_real_examples"), 1),
            "max_real_examples", "null (all) or an integer >= 1")
    require(_int_at_least(audit.get("draws"), 1), "draws", "an integer >= 1 (noise draws per black-box score)")
    require(audit.get("reference") in REFERENCES, "reference", f"one of {REFERENCES}")
    require(_int_at_least(audit.get("seed"), 0), "seed", "an integer >= 0")


def real_subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """The real training rows the audit trains on: all, or a fixed random `limit` of them."""
    if limit is None or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 3))  # type: ignore[arg-type]
    return Subset(dataset, order[:limit].tolist())


def fit(cfg: DictConfig, module: PrivateTrainingModule, out: Path, callbacks: list[Callback]) -> L.Trainer:
    """The method's public stages, then the private fit, on a Lightning trainer as `train` builds one."""
    from dp_diffusion.train import build_public_trainer

    module.fit_public_stages(lambda steps, name: build_public_trainer(cfg, out / name, steps))
    trainer = instantiate(cfg.trainer, max_steps=module.planned_steps, max_epochs=-1, default_root_dir=str(out),
                          logger=False, enable_checkpointing=False, callbacks=callbacks, limit_val_batches=0,
                          num_sanity_val_steps=0)
    trainer.fit(module)
    return trainer


def verdict(mode: str, lower: float, claimed: float, confidence: float) -> str:
    """One line comparing the empirical lower bound with the claimed epsilon."""
    head = f"audit ({mode}): lower bound {lower:.2f} (confidence {confidence:.0%})"
    if not math.isfinite(claimed):
        line = f"{head}; claimed epsilon inf (no DP): nothing to check, the bound shows what the audit detects"
    elif lower <= claimed:
        line = f"{head} <= claimed {claimed:.2f}: consistent"
    else:
        line = f"{head} exceeds the claim {claimed:.2f}: the implementation or the accounting is wrong"
    if mode == "blackbox":
        line += f" ({WEAK_BLACKBOX})"
    return line


def run_audit(cfg: DictConfig) -> dict[str, Any]:
    """Train once with canaries, score them, and record the AUC and lower bounds next to the claim."""
    from dp_diffusion.train import quiet_third_party_noise

    started = time.time()
    quiet_third_party_noise()
    validate_audit(cfg)
    audit = cfg.audit
    whitebox = audit.mode == "whitebox"
    if audit.steps is not None:
        with open_dict(cfg):
            cfg.train.steps = audit.steps
    resolve_public(cfg)
    validate_config(cfg)
    out = Path(cfg.output_dir)
    info = dataset_info(cfg.data.name)
    datamodule = build_datamodule(**cfg.data, seed=cfg.seed)
    datamodule.prepare_data()
    datamodule.setup("fit")
    real = real_subset(datamodule.train_set, audit.max_real_examples, audit.seed)

    m = int(audit.canaries)
    included = draw_membership(m, audit.seed)
    shape = tuple(info.image_shape)
    if whitebox:  # the image is never used: a Dirac canary's loss reads only its own coordinate
        images, labels = torch.zeros((m, *shape)), torch.zeros(m, dtype=torch.int64)
    else:
        images = binary_pattern_images(m, shape, audit.seed)
        labels = torch.randint(max(1, info.num_classes), (m,), generator=torch.Generator().manual_seed(audit.seed))
    dataset = audit_dataset(real, images, labels)
    validate_privacy(cfg.privacy, len(dataset))
    print(f"audit ({audit.mode}): {m} canaries ({int(included.sum())} in) beside {len(real)} real examples "
          f"of {cfg.data.name}; output {out}", flush=True)

    def build(members: torch.Tensor) -> PrivateTrainingModule:
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # the same initial weights for every model
        module = build_method(cfg, info, len(dataset))
        add_canaries(module, members, dirac=whitebox, scale=dirac_scale(cfg.privacy.max_grad_norm))
        module.attach_private_data(dataset)
        return module

    module = build(included)
    initial = None
    if not whitebox:  # the released denoiser as it is before training: the default reference
        initial = copy.deepcopy(module.sampling_denoiser())
        module.train()  # sampling_denoiser() switched the EMA copy to eval mode
    callbacks: list[Callback] = []
    if whitebox:
        recorder = CanaryUpdateRecorder(module.canary_probe.canaries.weight)  # type: ignore[attr-defined]
        callbacks.append(recorder)
    fit(cfg, module, out / "target", callbacks)
    report = module.privacy_report()

    if whitebox:
        scores = recorder.canary_scores()
    else:
        scores = blackbox_scores(cfg, module, initial, images, labels, info.num_classes > 0, build, out)

    claimed = float(report["epsilon"]) if report.get("epsilon") is not None else math.inf
    delta = audit.delta if audit.delta is not None else (report.get("delta") or 1e-5)
    members = included.numpy()
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "canary_scores.npz", scores=scores, members=members)
    bounds = audit_bounds(scores, members, float(delta), float(audit.beta), seed=int(audit.seed))
    line = verdict(audit.mode, bounds["epsilon_lower_bound"], claimed, bounds["confidence"])
    record: dict[str, Any] = {
        "kind": "audit",
        "mode": audit.mode,
        "method": cfg.method.name,
        "data": cfg.data.name,
        "private": bool(cfg.privacy.enabled),
        "claimed_epsilon": claimed,
        "target_epsilon": cfg.privacy.epsilon if cfg.privacy.enabled else None,
        "delta": float(delta),
        **{k: v for k, v in bounds.items()},
        "consistent": bounds["epsilon_lower_bound"] <= claimed,
        "verdict": line,
        "canaries": m,
        "canaries_in": int(included.sum()),
        "real_examples": len(real),
        "steps": report.get("steps") or module.planned_steps,
        "noise_multiplier": report.get("noise_multiplier"),
        "sample_rate": report.get("sample_rate"),
        "seed": cfg.seed,
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
        "output_dir": str(out),
        "wall_time_s": round(time.time() - started, 1),
        "config": config_to_dict(cfg),
    }
    append_results(record, out / "results.jsonl", cfg.results_file)
    print(f"audit: AUC {bounds['auc']:.3f} over {m} canaries; epsilon lower bounds: one-run "
          f"{bounds['epsilon_lower_bound_one_run']:.2f}, Clopper-Pearson "
          f"{bounds['epsilon_lower_bound_clopper_pearson']:.2f}; claimed epsilon {claimed:.3g}")
    print(line, flush=True)
    return record


def blackbox_scores(cfg: DictConfig, module: PrivateTrainingModule, initial: Any, images: torch.Tensor,
                    labels: torch.Tensor, conditional: bool, build: Callable[[torch.Tensor], PrivateTrainingModule],
                    out: Path) -> np.ndarray:
    """Reference loss - released loss per canary, over the same fixed draws."""
    audit = cfg.audit
    draw = fixed_draws(module.loss, tuple(images.shape[1:]), int(audit.draws), int(audit.seed))
    y = labels if conditional else None
    if audit.reference == "retrain":
        print("audit (blackbox): training the reference model without canaries", flush=True)
        reference_module = build(torch.zeros(len(images), dtype=torch.bool))
        fit(cfg, reference_module, out / "reference", [])
        reference = reference_module.sampling_denoiser()
    else:
        reference = initial
    released = canary_losses(module.sampling_denoiser(), module.loss, images, y, draw)
    return canary_losses(reference, module.loss, images, y, draw) - released
