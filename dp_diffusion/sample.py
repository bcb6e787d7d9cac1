"""`dp-diffusion sample`: rebuild a trained model from its checkpoint and draw samples."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dp_diffusion.build import CONFIG_KEY, build_method
from dp_diffusion.checkpoints import CheckpointError, read_checkpoint
from dp_diffusion.run_config import validate_sampling
from dp_diffusion.data.registry import dataset_info
from dp_diffusion.methods.diffusion_module import PrivateDiffusion
from dp_diffusion.sampling import save_samples


def load_trained(checkpoint: str | Path) -> PrivateDiffusion:
    """The trained module stored in `checkpoint` (config, weights and EMA), read without running code from it."""
    path = Path(checkpoint)
    state = read_checkpoint(path)
    cfg = OmegaConf.create(state[CONFIG_KEY])
    info = dataset_info(cfg.data.name)
    module = build_method(cfg, info)
    try:
        module.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r}: its weights do not fit the model its config describes ({first[:200]})"
        ) from None
    module.on_load_checkpoint(state)
    module.run_config = cfg  # the training config, e.g. to evaluate against its data set
    return module


def with_training_guidance(sample_cfg: DictConfig, module: PrivateDiffusion) -> DictConfig:
    """`sample_cfg`, its null guidance_scale replaced by the one the training run sampled with (0 if none)."""
    if sample_cfg.guidance_scale is not None:
        return sample_cfg
    trained = OmegaConf.select(module.run_config, "sample.guidance_scale", default=None)
    filled = sample_cfg.copy()
    filled.guidance_scale = 0.0 if trained is None else float(trained)
    return filled


def run_sampling(cfg: DictConfig) -> dict[str, Path]:
    validate_sampling(cfg, guidance_from_checkpoint=True)
    module = load_trained(cfg.checkpoint)
    cfg = with_training_guidance(cfg, module)
    out = Path(cfg.output_dir) if cfg.output_dir else Path(cfg.checkpoint).parent.parent / f"samples_{cfg.sampler}"
    images, labels = module.generate(cfg.num_samples, cfg, seed=cfg.seed)
    paths = save_samples(images, labels, out)
    print(f"wrote {len(images)} samples: {paths['npz']}  grid: {paths['grid']}")
    return paths
