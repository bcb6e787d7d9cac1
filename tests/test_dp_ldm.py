"""DP-LDM: built from its parts by config, public stages trained and cached by public config only, the
fine-tuned part alone changes under DP-SGD, generate() decodes latents, a checkpoint reloads, and
config errors are one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from dp_diffusion.build import build_method, config_to_dict
from dp_diffusion.cli import CONF_DIR
from dp_diffusion.config import ConfigError
from dp_diffusion.data.registry import dataset_info
from dp_diffusion.data import build_datamodule
from dp_diffusion.methods.dp_ldm import DPLDM
from dp_diffusion.sample import load_trained
from dp_diffusion.sampling import load_samples, to_uint8
from dp_diffusion.train import StoreConfig

pytestmark = pytest.mark.usefixtures("one_thread")

_FLOOR = importlib.util.spec_from_file_location(
    "autoencoder_floor", Path(__file__).parents[1] / "experiments" / "autoencoder_floor.py")
autoencoder_floor = importlib.util.module_from_spec(_FLOOR)
_FLOOR.loader.exec_module(autoencoder_floor)

TINY = [
    "method=dp_ldm", "data=digits",
    "method.parts.autoencoder.f=2", "method.parts.autoencoder.nf=8", "method.parts.autoencoder.latent_channels=2",
    "method.parts.backbone.nf=8", "method.parts.backbone.num_heads=2", "method.parts.backbone.context_dim=8",
    "method.module.pretraining.autoencoder_steps=3", "method.module.pretraining.autoencoder_batch_size=16",
    "method.module.pretraining.latent_steps=3", "method.module.pretraining.latent_batch_size=16",
    "train.steps=2", "train.batch_size=32", "train.physical_batch_size=32", "privacy.noise_multiplier=2.0",
]


def compose_cfg(tmp_path: Path, *overrides: str, public: tuple[str, ...] = ("public=dead_leaves", "public.size=64")):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=[*TINY, *public, f"method.module.cache_dir={tmp_path / 'cache'}",
                                            f"output_dir={tmp_path}", *overrides])


def cheap_trainer(root: Path, steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(root),
                     callbacks=list(callbacks))


class CountingTrainers:
    """make_trainer for fit_public_stages that records the stages it was asked to train."""

    def __init__(self, root: Path) -> None:
        self.root, self.names = root, []

    def __call__(self, steps: int, name: str) -> L.Trainer:
        self.names.append(name)
        return cheap_trainer(self.root / name, steps)


def test_built_from_parts_with_the_latent_shape_and_the_finetuned_share(tmp_path):
    module = build_method(compose_cfg(tmp_path), dataset_info("digits"), 1442)
    assert isinstance(module, DPLDM)
    assert module.latent_shape == (2, 4, 4)  # 8x8 digits, f=2
    backbone = module._backbone_of(module.denoiser)
    assert (backbone.in_channels, backbone.resolution, backbone.num_classes) == (2, 4, 10)
    trainable = {n for n, p in module.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all(".blocks" not in n for n in trainable)
    assert all("class_embed" in n or "down" in n or "mid" in n or "up" in n for n in trainable)
    assert not any(p.requires_grad for p in module.autoencoder.parameters())
    summary = module.finetune_summary
    assert 0 < summary.trainable < summary.total == sum(p.numel() for p in backbone.parameters())
    assert "fine-tuning 'condition'" in module.privacy_coverage().trained_with_dp[0]


def test_public_set_overlapping_the_private_one_is_refused(tmp_path):
    module = build_method(compose_cfg(tmp_path, public=("public=digits",)), dataset_info("digits"), 1442)
    with pytest.raises(ConfigError, match="digits"):
        module.fit_public_stages(CountingTrainers(tmp_path))


def test_no_public_set_and_a_bad_finetune_mode_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="public=digits"):
        build_method(compose_cfg(tmp_path, public=("public=none",)), dataset_info("digits"), 1442)
    with pytest.raises(ConfigError, match="method.finetune"):
        build_method(compose_cfg(tmp_path, "method.module.finetune=heads"), dataset_info("digits"), 1442)
    with pytest.raises(ConfigError, match="method.module.lrr: DPLDM takes no argument"):
        build_method(compose_cfg(tmp_path, "+method.module.lrr=0.1"), dataset_info("digits"), 1442)
    with pytest.raises(ConfigError, match="pretraining.latent_steps"):
        build_method(compose_cfg(tmp_path, "method.module.pretraining.latent_steps=0"), dataset_info("digits"), 1442)


def test_public_stages_are_cached_by_public_config_and_reused_across_epsilon(tmp_path):
    info = dataset_info("digits")
    first = build_method(compose_cfg(tmp_path, "privacy.epsilon=1"), info, 1442)
    trainers = CountingTrainers(tmp_path)
    first.fit_public_stages(trainers)
    assert trainers.names == ["public_autoencoder", "public_latent"]
    again = build_method(compose_cfg(tmp_path, "privacy.epsilon=10", "seed=3"), info, 1442)
    assert again.cache_key() == first.cache_key()  # private settings do not enter the key
    trainers = CountingTrainers(tmp_path)
    again.fit_public_stages(trainers)
    assert trainers.names == []  # loaded from the cache, nothing trained
    # Every weight comes from the public stages (the seed=3 initialisation is overwritten).
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    other = build_method(compose_cfg(tmp_path, "method.module.pretraining.latent_steps=4"), info, 1442)
    assert other.cache_key() != first.cache_key() and other.autoencoder_key() == first.autoencoder_key()
    trainers = CountingTrainers(tmp_path)
    other.fit_public_stages(trainers)
    assert trainers.names == ["public_latent"]  # the autoencoder stage has its own key: reused


def test_private_fit_changes_only_the_finetuned_part_then_reloads_and_generates(tmp_path):
    cfg = compose_cfg(tmp_path)
    datamodule = build_datamodule("digits", root=cfg.data.root)
    datamodule.setup("fit")
    module = build_method(cfg, dataset_info("digits"), len(datamodule.train_set))
    module.attach_private_data(datamodule.train_set)
    module.fit_public_stages(CountingTrainers(tmp_path))
    assert bool(module.public_stages_trained) and float(module.latent_scale) > 0
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    trainer = cheap_trainer(tmp_path, module.planned_steps, [StoreConfig(config_to_dict(cfg))])
    trainer.fit(module)
    assert module.logical_steps() == 2
    for name, param in module.named_parameters():
        changed = not torch.equal(before[name], param)
        if name in trainable or name.replace("ema.module.", "denoiser.", 1) in trainable:
            continue  # fine-tuned, or its EMA: may change
        assert not changed, f"{name} is frozen but changed"
    assert any(not torch.equal(before[n], module.get_parameter(n)) for n in trainable)
    ckpt = tmp_path / "final.ckpt"
    trainer.save_checkpoint(ckpt)

    reloaded = load_trained(ckpt)
    assert isinstance(reloaded, DPLDM) and bool(reloaded.public_stages_trained)
    sample_cfg = cfg.sample.copy()
    sample_cfg.num_steps, sample_cfg.device = 4, "cpu"
    a, labels = module.generate(4, sample_cfg, seed=1, disable_progress=True)
    b, _ = reloaded.generate(4, sample_cfg, seed=1, disable_progress=True)
    assert a.shape == (4, 1, 8, 8) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and labels.tolist() == [0, 1, 2, 3]

    # experiments/autoencoder_floor.py: the real images through the checkpoint's public autoencoder
    written = autoencoder_floor.main([str(ckpt), "--out", str(tmp_path / "floor"), "--num", "16"])
    floor_images, floor_labels = load_samples(written["npz"])
    real_images, real_labels = datamodule.train_tensors()
    chosen = autoencoder_floor.subset(len(real_images), 16, seed=0)
    assert floor_images.shape == (16, 1, 8, 8) and torch.equal(floor_labels, real_labels[chosen])
    expected = torch.from_numpy(to_uint8(reloaded.reconstruct(real_images[chosen]))).permute(0, 3, 1, 2)
    assert torch.equal(((floor_images + 1) * 127.5).round().to(torch.uint8), expected)
    assert not torch.equal(floor_images, real_images[chosen])  # a lossy autoencoder, not the images themselves


def test_the_autoencoder_floor_scores_every_class_of_a_class_sorted_split():
    """mnist5k's train split is ordered by class: its first half holds the digits 0-4 only, which made the
    floor's FID (scored against all ten) look worse than the autoencoder is. The subset is drawn at random."""
    labels = torch.arange(10).repeat_interleave(400)
    chosen = autoencoder_floor.subset(len(labels), 2000, seed=0)
    counts = torch.bincount(labels[chosen], minlength=10)
    assert len(chosen.unique()) == 2000 and counts.min() >= 150 and counts.max() <= 250
    assert torch.equal(chosen, autoencoder_floor.subset(len(labels), 2000, seed=0))  # reproducible
    assert not torch.equal(chosen, autoencoder_floor.subset(len(labels), 2000, seed=1))
    assert torch.equal(autoencoder_floor.subset(5, 2000, seed=0).sort().values, torch.arange(5))  # all of fewer
    assert len(labels[chosen[:100]].unique()) == 10  # the grid (the first 100 written) shows every class


class FailsOnAccess(torch.utils.data.Dataset):
    """A private set that raises if anything reads an example: public pretraining must not."""

    def __len__(self) -> int:
        return 1442

    def __getitem__(self, index: int):
        raise AssertionError("public pretraining read the private set")


def test_public_pretraining_never_reads_the_private_set(tmp_path):
    module = build_method(compose_cfg(tmp_path), dataset_info("digits"), 1442)
    module.attach_private_data(FailsOnAccess())
    module.fit_public_stages(CountingTrainers(tmp_path))
    assert bool(module.public_stages_trained)


def test_pretrained_stages_of_another_architecture_are_a_one_line_error(tmp_path):
    first = build_method(compose_cfg(tmp_path), dataset_info("digits"), 1442)
    first.fit_public_stages(CountingTrainers(tmp_path))
    stages = tmp_path / "cache" / first.cache_key() / "public_stages.pt"
    assert stages.is_file()
    other = build_method(compose_cfg(tmp_path, "method.parts.backbone.num_heads=4", f"pretrained={stages}"),
                         dataset_info("digits"), 1442)
    with pytest.raises(ConfigError, match=r"backbone.num_heads: 2 there, 4 here"):
        other.fit_public_stages(CountingTrainers(tmp_path))
    same = build_method(compose_cfg(tmp_path, f"pretrained={stages}"), dataset_info("digits"), 1442)
    trainers = CountingTrainers(tmp_path)
    same.fit_public_stages(trainers)
    assert trainers.names == [] and bool(same.public_stages_trained)


@pytest.mark.parametrize("finetune", ["attention", "lora"])
def test_noise_lands_only_on_trainable_parameters_with_std_sigma_c_over_b(tmp_path, finetune):
    sigma, clip, batch = 3.0, 0.5, 32
    cfg = compose_cfg(tmp_path, f"method.module.finetune={finetune}", f"privacy.noise_multiplier={sigma}",
                      f"privacy.max_grad_norm={clip}", f"train.batch_size={batch}")
    module = build_method(cfg, dataset_info("digits"), 1442)
    module.attach_private_data(torch.utils.data.TensorDataset(torch.zeros(1442, 1, 8, 8),
                                                              torch.zeros(1442, dtype=torch.long)))
    module.configure_optimizers()
    images, labels = torch.randn(batch, 1, 8, 8), torch.arange(batch) % 10
    prepared = module.prepare_batch((images, labels))
    grads = {}

    def capture(*args, **kwargs) -> None:  # the base optimizer's step: keep what it would apply, apply nothing
        grads.update({n: None if p.grad is None else p.grad.clone() for n, p in module.denoiser.named_parameters()})

    engine = module._engines["model"]
    engine.optimizer.original_optimizer.step = capture  # clipping and noise (Opacus' pre_step) still run

    # A loss with zero gradient: what reaches the parameters is the noise alone.
    zero_loss = lambda model, b: 0.0 * module.per_example_loss(model, b)  # noqa: E731
    engine.step(zero_loss, prepared)
    trainable = {n for n, p in module.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all(grads[n] is None for n in grads if n not in trainable)
    noise = torch.cat([grads[n].flatten() for n in trainable])
    assert noise.numel() > 2000
    assert noise.std().item() == pytest.approx(sigma * clip / batch, rel=0.08)


def test_the_autoencoder_can_have_its_own_public_set(tmp_path):
    own = "+method.module.autoencoder_public={name: dead_leaves, size: 48, seed: 3}"
    module = build_method(compose_cfg(tmp_path, own, "data=mnist5k", public=("public=digits",)),
                          dataset_info("mnist5k"), 4000)
    same = build_method(compose_cfg(tmp_path, "data=mnist5k", public=("public=digits",)), dataset_info("mnist5k"), 4000)
    assert module.autoencoder_key() != same.autoencoder_key() and module.cache_key() != same.cache_key()
    trainers = CountingTrainers(tmp_path)
    module.fit_public_stages(trainers)
    assert trainers.names == ["public_autoencoder", "public_latent"]
    never = " ".join(module.privacy_coverage().never_saw_private_data)
    assert "autoencoder (public dead_leaves only" in never and "pretrained on public digits" in never


def test_pretrained_that_is_not_a_public_stages_file_is_a_one_line_error(tmp_path):
    checkpoint_like = tmp_path / "final.ckpt"
    torch.save({"state_dict": {}, "dp_diffusion_privacy": {}}, checkpoint_like)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    for path, message in ((checkpoint_like, "is not a public_stages.pt"), (garbage, "cannot read")):
        module = build_method(compose_cfg(tmp_path, f"pretrained={path}"), dataset_info("digits"), 1442)
        with pytest.raises(ConfigError, match=message):
            module.fit_public_stages(CountingTrainers(tmp_path))


def test_cache_write_leaves_no_temporary_file(tmp_path):
    module = build_method(compose_cfg(tmp_path), dataset_info("digits"), 1442)
    module.fit_public_stages(CountingTrainers(tmp_path))
    written = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert written == ["autoencoder.pt", "public_stages.pt"]


def test_resuming_a_checkpoint_that_finetuned_another_part_is_a_one_line_error(tmp_path):
    """A checkpoint whose run fine-tuned `all` (or LoRA of another rank) cannot be resumed as `condition`: the
    error names both; the same part passes."""
    from dp_diffusion.build import CONFIG_KEY

    module = build_method(compose_cfg(tmp_path), dataset_info("digits"), 1442)
    same = {CONFIG_KEY: config_to_dict(compose_cfg(tmp_path))}
    module.check_resume(same)
    other = {CONFIG_KEY: config_to_dict(compose_cfg(tmp_path, "method.module.finetune=all"))}
    with pytest.raises(ConfigError, match="finetune=all; this run asks method.module.finetune=condition") as err:
        module.check_resume(other)
    assert "\n" not in str(err.value)
    lora = build_method(compose_cfg(tmp_path, "method.module.finetune=lora", "method.module.lora_rank=2"),
                        dataset_info("digits"), 1442)
    lora.check_resume({CONFIG_KEY: config_to_dict(compose_cfg(tmp_path, "method.module.finetune=lora",
                                                              "method.module.lora_rank=2"))})
    with pytest.raises(ConfigError, match=r"lora \(lora_rank=4\); this run asks .*lora \(lora_rank=2\)"):
        lora.check_resume({CONFIG_KEY: config_to_dict(compose_cfg(tmp_path, "method.module.finetune=lora"))})


@pytest.mark.parametrize("privacy, said", [("privacy=dp", "with DP"), ("privacy=none", "WITHOUT privacy")])
def test_the_announcement_says_whether_the_finetuning_is_private(tmp_path, capsys, privacy, said):
    module = build_method(compose_cfg(tmp_path, privacy), dataset_info("digits"), 1442)
    module.fit_public_stages(CountingTrainers(tmp_path))
    announced = [line for line in capsys.readouterr().out.splitlines() if line.startswith("DP-LDM: fine-tuning")]
    assert len(announced) == 1 and said in announced[0], announced
