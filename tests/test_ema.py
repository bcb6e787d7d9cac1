"""EMA of the denoiser: the warm-up ramp, one update per logical DP step, and it is what samples;
it averages only the trainable parameters (frozen ones are the live module's) and is bit-identical to
`AveragedModel` when everything trains, with the same checkpoint keys."""

from __future__ import annotations

import io

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torch.optim.swa_utils import AveragedModel

from dp_diffusion.build import build_method
from dp_diffusion.cli import CONF_DIR
from dp_diffusion.data.registry import dataset_info
from dp_diffusion.data import build_datamodule
from dp_diffusion.diffusion.losses import EDMLoss
from dp_diffusion.methods.diffusion_module import ema_decay_at, ema_with_warmup
from dp_diffusion.methods.dpdm import DPDM
from dp_diffusion.methods.ema import TrainableEMA
from dp_diffusion.nets import UNet
from dp_diffusion.privacy import PrivacySpec


def test_ema_follows_the_warm_up_recursion():
    model = nn.Linear(3, 2)
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(0.9), use_buffers=True)
    expected = None
    for step in range(40):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ema.update_parameters(model)
        # AveragedModel copies on its first update; later updates use the decay after n updates.
        rate = ema_decay_at(0.9, step)
        expected = float(step) if expected is None else rate * expected + (1 - rate) * step
        torch.testing.assert_close(ema.module.weight, torch.full((2, 3), expected))
    assert ema_decay_at(0.9, 1) == 2 / 11 and ema_decay_at(0.9, 1000) == 0.9


def test_ema_updates_once_per_logical_step_and_is_sampled(tmp_path, one_thread):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[
            "data=digits", "model=tiny", "train.steps=3", "train.batch_size=64", "train.physical_batch_size=16",
            "privacy.noise_multiplier=2.0", f"output_dir={tmp_path}",
        ])
    datamodule = build_datamodule("digits", root=cfg.data.root)
    datamodule.setup("fit")
    module = build_method(cfg, dataset_info("digits"), len(datamodule.train_set))
    module.attach_private_data(datamodule.train_set)
    L.Trainer(max_steps=3, max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              default_root_dir=str(tmp_path)).fit(module)
    assert module.ledger.steps == 3
    assert int(module.ema.n_averaged) == 3  # several physical chunks per step, one EMA update
    raw, averaged = module.denoiser.state_dict(), module.sampling_denoiser().state_dict()
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)
    assert module.sampling_denoiser() is module.ema.module


def tiny_unet() -> UNet:
    return UNet(in_channels=1, out_channels=1, resolution=8, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(), num_classes=3)


def dpdm(backbone: nn.Module) -> DPDM:
    return DPDM(backbone=backbone, loss=EDMLoss(num_classes=3), privacy=PrivacySpec(noise_multiplier=1.0),
                batch_size=8, physical_batch_size=8, steps=3, image_shape=(1, 8, 8), num_classes=3, ema_decay=0.9)


def perturb(module: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def test_ema_of_a_fully_trainable_denoiser_is_bit_identical_to_averaged_model():
    torch.manual_seed(0)
    module = dpdm(tiny_unet())
    reference = AveragedModel(module.denoiser, multi_avg_fn=ema_with_warmup(0.9), use_buffers=True)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        perturb(module.denoiser, generator)
        module.on_private_step()
        reference.update_parameters(module.denoiser)
    ours, theirs = module.ema.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)  # checkpoints written with AveragedModel load as they are
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert int(module.ema.n_averaged) == 5


def test_ema_averages_only_trainable_parameters_and_shares_the_frozen_ones():
    torch.manual_seed(0)
    backbone = tiny_unet()
    backbone.conv_in.requires_grad_(False)
    backbone.down.requires_grad_(False)
    module = dpdm(backbone)
    live, ema = module.denoiser, module.sampling_denoiser()
    frozen = [name for name, p in live.named_parameters() if not p.requires_grad]
    trainable = [name for name, p in live.named_parameters() if p.requires_grad]
    assert frozen and trainable and module.ema.averaged_names() == trainable
    assert all(ema.get_parameter(n) is live.get_parameter(n) for n in frozen)  # shared, not copied
    assert all(ema.get_parameter(n).data_ptr() != live.get_parameter(n).data_ptr() for n in trainable)
    assert not any(p.requires_grad for p in ema.parameters())
    assert all(live.get_parameter(n).requires_grad for n in trainable)  # the live part still trains

    generator = torch.Generator().manual_seed(1)
    expected = None
    for step in range(4):
        perturb(live, generator)  # frozen ones too: the EMA reads them from the live module
        module.on_private_step()
        current = {n: live.get_parameter(n).detach().clone() for n in trainable}
        rate = ema_decay_at(0.9, step)
        expected = current if expected is None else {n: torch.lerp(expected[n], current[n], 1 - rate)
                                                     for n in trainable}
    assert all(torch.equal(ema.get_parameter(n), expected[n]) for n in trainable)
    assert all(torch.equal(ema.get_parameter(n), live.get_parameter(n)) for n in frozen)
    assert list(ema.state_dict()) == list(live.state_dict())  # a complete denoiser


def test_checkpoint_keeps_its_keys_writes_frozen_weights_once_and_loads():
    torch.manual_seed(0)
    backbone = tiny_unet()
    backbone.down.requires_grad_(False)
    module = dpdm(backbone)
    module.on_private_step()
    state = module.state_dict()
    legacy_keys = ["ema." + k for k in AveragedModel(module.denoiser, use_buffers=True).state_dict()]
    assert [k for k in state if k.startswith("ema.")] == legacy_keys

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    storage = {k: v.untyped_storage().data_ptr() for k, v in saved.items()}
    frozen = [k for k in state if k.startswith("denoiser.backbone.down.")]
    trainable = [k for k in state if k.startswith("denoiser.") and k not in frozen]
    assert frozen and all(storage[k] == storage["ema.module." + k.removeprefix("denoiser.")] for k in frozen)
    assert all(storage[k] != storage["ema.module." + k.removeprefix("denoiser.")] for k in trainable)

    torch.manual_seed(1)
    other = tiny_unet()
    other.down.requires_grad_(False)
    fresh = dpdm(other)
    fresh.load_state_dict({k: v.clone() for k, v in state.items()})
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


def test_trainable_ema_leaves_a_module_without_frozen_parameters_alone():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    ema = TrainableEMA(model, 0.5)
    assert not any(a is b for a, b in zip(ema.module.parameters(), model.parameters()))
