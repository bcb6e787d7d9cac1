"""DP-SynGen: stage ranges, truncated / union training noise, the switching denoiser, the privacy
report, a module round trip (synthetic stages, private fit, checkpoint, reload, sampling), and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import scipy.stats
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from dp_diffusion.build import build_method, config_to_dict
from dp_diffusion.cli import CONF_DIR
from dp_diffusion.config import ConfigError
from dp_diffusion.data.registry import dataset_info
from dp_diffusion.data import build_datamodule
from dp_diffusion.diffusion.losses import LOSSES, EDMLoss, VELoss
from dp_diffusion.diffusion.samplers import SAMPLERS, cfg_denoise, generate
from dp_diffusion.diffusion.stages import (
    STAGES,
    StageRanges,
    SwitchingDenoiser,
    UnionSigmaLoss,
    restrict_loss,
    sigma_cdf,
)
from dp_diffusion.methods.dp_syngen import DPSynGen
from dp_diffusion.sample import load_trained
from dp_diffusion.train import StoreConfig

E2, EM3 = math.exp(2.0), math.exp(-3.0)
P_MEAN, P_STD = -1.2, 1.2

pytestmark = pytest.mark.usefixtures("one_thread")




# --- stage ranges ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stage_assignment_and_boundaries_belong_to_context(dtype):
    ranges = StageRanges(2.0, -3.0)
    at_hi, at_lo = torch.tensor(E2, dtype=dtype), torch.tensor(EM3, dtype=dtype)
    sigma = torch.stack([
        torch.tensor(80.0, dtype=dtype), torch.nextafter(at_hi, at_hi + 1), at_hi, torch.nextafter(at_hi, at_hi - 1),
        torch.tensor(1.0, dtype=dtype), torch.nextafter(at_lo, at_lo + 1), at_lo, torch.nextafter(at_lo, at_lo - 1),
        torch.tensor(0.002, dtype=dtype),
    ])
    # 0 cleaning, 1 context, 2 coarse: a sigma exactly at either boundary is context (closed range).
    assert ranges.assign(sigma).tolist() == [2, 2, 1, 1, 1, 1, 1, 0, 0]
    assert STAGES == ("cleaning", "context", "coarse")


def test_stage_bounds_and_single_stage_variants():
    ranges = StageRanges(2.0, -3.0)
    assert ranges.bounds("coarse") == (E2, None) and ranges.bounds("cleaning") == (None, EM3)
    assert ranges.bounds("context") == (EM3, E2)
    no_cleaning = StageRanges(2.0, None)  # DP-SynGen "Coarse": only the coarse stage is synthetic
    assert no_cleaning.present() == ("context", "coarse")
    assert no_cleaning.assign(torch.tensor([1e-4, 100.0])).tolist() == [1, 2]
    with pytest.raises(ValueError, match="log_tau_cleaning must be < log_tau_coarse"):
        StageRanges(-3.0, 2.0)


# --- training noise: truncation and union ----------------------------------------------------------
def _ln_normal_cdf(sigma: np.ndarray) -> np.ndarray:
    return scipy.stats.norm.cdf((np.log(sigma) - P_MEAN) / P_STD)


@pytest.mark.parametrize("lo,hi", [(E2, None), (EM3, E2), (None, EM3)], ids=["coarse", "context", "cleaning"])
def test_truncated_sigma_stays_in_range_with_the_truncated_density(lo, hi):
    loss = restrict_loss(EDMLoss(), lo, hi)
    sigma = loss.sample_sigma((20_000,), generator=torch.Generator().manual_seed(0)).numpy()
    assert sigma.min() >= (lo or 0) and sigma.max() <= (hi or math.inf)
    f_lo = 0.0 if lo is None else _ln_normal_cdf(np.array(lo))
    f_hi = 1.0 if hi is None else _ln_normal_cdf(np.array(hi))
    truncated_cdf = lambda s: (_ln_normal_cdf(s) - f_lo) / (f_hi - f_lo)  # noqa: E731
    assert scipy.stats.kstest(sigma, truncated_cdf).pvalue > 1e-3
    assert EDMLoss().sigma_lo is None  # restrict_loss copies, never mutates


def test_union_sigma_is_the_base_distribution_restricted_to_both_ranges():
    loss = UnionSigmaLoss(EDMLoss(), [(None, EM3), (E2, None)])
    sigma = loss.sample_sigma((40_000,), generator=torch.Generator().manual_seed(1)).numpy()
    assert not ((sigma >= EM3) & (sigma <= E2)).any()
    a, b = _ln_normal_cdf(np.array(EM3)), _ln_normal_cdf(np.array(E2))
    mass = a + (1 - b)  # P(sigma < e^-3) + P(sigma > e^2) ~ 0.067 + 0.0038

    def union_cdf(s):
        f = _ln_normal_cdf(s)
        return (np.minimum(f, a) + np.maximum(f - b, 0)) / mass

    assert scipy.stats.kstest(sigma, union_cdf).pvalue > 1e-3
    # the coarse piece gets its probability mass as weight (~5 %), not half of the draws
    assert abs((sigma > E2).mean() - (1 - b) / mass) < 0.005
    assert loss.weights == pytest.approx([a / mass, (1 - b) / mass])


def test_union_sigma_for_a_uniform_log_sigma_loss():
    loss = UnionSigmaLoss(VELoss(sigma_min=0.02, sigma_max=100.0), [(None, 0.1), (10.0, None)])
    sigma = loss.sample_sigma((20_000,), generator=torch.Generator().manual_seed(2)).numpy()
    lo, hi = math.log(0.02), math.log(100.0)
    f = lambda s: np.clip((np.log(s) - lo) / (hi - lo), 0, 1)  # noqa: E731
    a, b = f(0.1), f(10.0)
    union_cdf = lambda s: (np.minimum(f(s), a) + np.maximum(f(s) - b, 0)) / (a + 1 - b)  # noqa: E731
    assert sigma.min() >= 0.02 and sigma.max() <= 100.0 and not ((sigma > 0.1) & (sigma < 10.0)).any()
    assert scipy.stats.kstest(sigma, union_cdf).pvalue > 1e-3


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_registered_sigma_cdf_matches_each_loss_sampler(name):
    for loss in (LOSSES[name](), restrict_loss(LOSSES[name](), 0.1, 5.0)):
        sigma = loss.sample_sigma((5_000,), generator=torch.Generator().manual_seed(3)).numpy()
        assert scipy.stats.kstest(sigma, lambda s: sigma_cdf(loss, torch.from_numpy(s)).numpy()).pvalue > 1e-3


# --- switching denoiser ----------------------------------------------------------------------------
class Stub(nn.Module):
    """Returns a constant image and records the sigmas and labels it was called with."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x, sigma, class_labels=None):
        self.calls.append((sigma.detach().clone(), None if class_labels is None else class_labels.clone()))
        return torch.full_like(x, self.value)


def _switching(num_classes=10):
    stubs = {"cleaning": Stub(-1.0), "context": Stub(0.0), "coarse": Stub(1.0)}
    return SwitchingDenoiser(StageRanges(2.0, -3.0), stubs, num_classes=num_classes), stubs


def test_switching_routes_each_row_and_gives_labels_only_to_the_context_model():
    denoiser, stubs = _switching()
    sigma = torch.tensor([80.0, E2, 1.0, EM3, 0.002, 10.0], dtype=torch.float64)
    x = torch.zeros(6, 1, 4, 4, dtype=torch.float64)
    labels = torch.arange(6)
    out = denoiser(x, sigma, labels)
    # boundaries e^2 and e^-3 go to context (value 0)
    assert out[:, 0, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.0, -1.0, 1.0]
    (ctx_sigma, ctx_labels), = stubs["context"].calls
    assert ctx_labels.tolist() == [1, 2, 3] and ctx_sigma.tolist() == [E2, 1.0, EM3]
    (_, coarse_labels), = stubs["coarse"].calls
    (_, cleaning_labels), = stubs["cleaning"].calls
    assert coarse_labels.tolist() == [10, 10] and cleaning_labels.tolist() == [10]  # null class id


def test_switching_with_scalar_sigma_unconditional_and_guidance():
    denoiser, stubs = _switching(num_classes=0)
    x = torch.zeros(3, 1, 4, 4)
    assert torch.all(denoiser(x, 30.0) == 1.0) and torch.all(denoiser(x, torch.tensor(0.01)) == -1.0)
    assert stubs["coarse"].calls[0][1] is None and stubs["coarse"].calls[0][0].shape == (3,)
    denoiser, stubs = _switching(num_classes=10)
    cfg_denoise(denoiser, x, 0.01, torch.tensor([1, 2, 3]), guidance_scale=2.0, num_classes=10)
    assert stubs["cleaning"].calls[0][1].tolist() == [10] * 6  # both CFG halves get the null label


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_queries_each_stage_only_inside_its_range(sampler):
    denoiser, stubs = _switching()
    knobs = {"s_churn": 5.0} if sampler == "edm" else {}
    generate(denoiser, 4, (1, 4, 4), batch_size=4, sampler=sampler, num_steps=12, num_classes=10, disable=True,
             **knobs)
    ranges = {"cleaning": (0, EM3), "context": (EM3, E2), "coarse": (E2, math.inf)}
    for stage, stub in stubs.items():
        assert stub.calls, f"{stage} never called"
        seen = torch.cat([s for s, _ in stub.calls])
        lo, hi = ranges[stage]
        assert seen.min() >= lo and seen.max() <= hi


# --- module: build, privacy report, round trip -----------------------------------------------------
def compose_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[
            "method=dp_syngen", "data=digits", "model=tiny", "train.steps=2", "train.batch_size=64",
            "train.physical_batch_size=32", "privacy.noise_multiplicity=2", "privacy.epsilon=5",
            "method.module.synthetic.steps=2", "method.module.synthetic.batch_size=16",
            "method.module.synthetic.size=64", "method.module.synthetic.noise_multiplicity=2",
            "privacy.noise_multiplier=2.0",  # skip calibration (the CLI test calibrates)
            f"output_dir={tmp_path}", *overrides,
        ])


def cheap_trainer(root: Path, steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(root),
                     callbacks=list(callbacks))


def test_config_errors_name_the_key(tmp_path):
    info = dataset_info("digits")
    with pytest.raises(ConfigError, match="method.module.variant"):
        build_method(compose_cfg(tmp_path, "method.module.variant=both"), info)
    with pytest.raises(ConfigError, match="synthetic.steps"):
        build_method(compose_cfg(tmp_path, "method.module.synthetic.steps=0"), info)
    with pytest.raises(ConfigError, match="no synthetic stage"):
        build_method(compose_cfg(tmp_path, "method.module.log_tau_coarse=null",
                                 "method.module.log_tau_cleaning=null"), info)


@pytest.mark.parametrize("shared", [False, True])
def test_privacy_report_only_context_spends_budget(tmp_path, shared):
    cfg = compose_cfg(tmp_path, f"method.module.synthetic.shared_model={str(shared).lower()}")
    module = build_method(cfg, dataset_info("digits"), 1442)
    assert module.loss.sigma_lo == pytest.approx(EM3) and module.loss.sigma_hi == pytest.approx(E2)
    assert list(module.stage_models) == (["coarse_cleaning"] if shared else ["coarse", "cleaning"])
    module.attach_private_data(torch.utils.data.TensorDataset(torch.zeros(1442, 1, 8, 8)))
    covers = module.privacy_report()["covers"]
    assert len(covers["trained_with_dp"]) == 1 and covers["trained_with_dp"][0].startswith("context stage")
    never = " | ".join(covers["never_saw_private_data"])
    assert "coarse" in never and "cleaning" in never and "synthetic dead_leaves images only" in never
    assert not covers["saw_private_data_without_dp"]
    assert any("switching sampler" in r for r in covers["released"])


def test_finetune_report_says_pretraining_never_saw_private_data(tmp_path):
    module = build_method(compose_cfg(tmp_path, "method.module.variant=finetune"), dataset_info("digits"))
    assert module.loss.sigma_lo is None and module.loss.sigma_hi is None and not list(module.stage_models)
    cov = module.privacy_coverage()
    assert "pretrained initial weights" in cov.never_saw_private_data[0]
    assert any("never saw private data; the released model did" in n for n in cov.notes)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_round_trip_synthetic_stages_private_fit_checkpoint_reload_and_sample(tmp_path):
    cfg = compose_cfg(tmp_path)
    datamodule = build_datamodule("digits", root=cfg.data.root)
    datamodule.setup("fit")
    module = build_method(cfg, dataset_info("digits"), len(datamodule.train_set))
    module.attach_private_data(datamodule.train_set)
    before = _state(module.stage_models)
    module.fit_public_stages(lambda steps, name: cheap_trainer(tmp_path / name, steps))
    after = _state(module.stage_models)
    assert bool(module.public_stages_trained)
    assert any(not torch.equal(before[k], after[k]) for k in before), "synthetic training changed nothing"
    assert not any(p.requires_grad for p in module.stage_models.parameters())

    trainer = cheap_trainer(tmp_path, module.planned_steps, [StoreConfig(config_to_dict(cfg))])
    trainer.fit(module)
    assert module.ledger.steps == 2  # only the private fit is accounted
    assert all(torch.equal(after[k], v) for k, v in _state(module.stage_models).items())  # frozen
    ckpt = tmp_path / "final.ckpt"
    trainer.save_checkpoint(ckpt)

    reloaded = load_trained(ckpt)
    assert isinstance(reloaded, DPSynGen) and bool(reloaded.public_stages_trained)
    original = module.state_dict()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, original[k]), k
    kw = dict(num_samples=4, image_shape=(1, 8, 8), batch_size=4, num_steps=6, num_classes=10, disable=True)
    a, _ = generate(module.sampling_denoiser(), **kw)
    b, labels = generate(reloaded.sampling_denoiser(), **kw)
    assert isinstance(reloaded.sampling_denoiser(), SwitchingDenoiser)
    assert torch.isfinite(b).all() and torch.equal(a, b) and labels.tolist() == [0, 1, 2, 3]


def test_finetune_loads_the_synthetic_pretrained_weights(tmp_path):
    cfg = compose_cfg(tmp_path, "method.module.variant=finetune")
    module = build_method(cfg, dataset_info("digits"), 1442)
    module.fit_public_stages(lambda steps, name: cheap_trainer(tmp_path / name, steps))
    denoiser, ema = _state(module.denoiser), _state(module.ema.module)
    assert all(torch.equal(denoiser[k], ema[k]) for k in denoiser)
    assert any(v.abs().sum() > 0 for k, v in denoiser.items() if "conv_out" in k)  # trained: output no longer 0
    assert not isinstance(module.sampling_denoiser(), SwitchingDenoiser)


# --- the real entry point --------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_trains_and_writes_the_stage_coverage(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "method=dp_syngen", "data=digits", "model=tiny", "train.steps=2", "train.batch_size=64",
            "train.physical_batch_size=32", "privacy.noise_multiplicity=2", "privacy.epsilon=5",
            "method.module.synthetic.steps=2", "method.module.synthetic.batch_size=16",
            "method.module.synthetic.size=64", "eval=none", "sample.num_samples=8", "sample.num_steps=4",
            f"hydra.run.dir={run_dir}", f"results_file={tmp_path / 'all.jsonl'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: a second thread only waits on shared CPUs
    result = subprocess.run([sys.executable, "-m", "dp_diffusion", *args], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((run_dir / "privacy.json").read_text())
    assert report["private"] and report["steps"] == 2 and 0 < report["epsilon_prv"] <= 5
    covers = report["covers"]
    assert covers["trained_with_dp"][0].startswith("context stage")
    assert any(s.startswith("coarse stage") for s in covers["never_saw_private_data"])
    assert any(s.startswith("cleaning stage") for s in covers["never_saw_private_data"])
    assert "never saw private data: coarse stage" in result.stdout
    for name in ("synthetic_coarse", "synthetic_cleaning"):
        assert (run_dir / name).is_dir()
    assert np.load(run_dir / "samples.npz")["images"].shape == (8, 8, 8, 1)
    assert load_trained(run_dir / "checkpoints" / "final.ckpt").variant == "switching"
