"""DP-SAD on the privacy core: the sound variant's student and discriminator are private parts (the student's
step leaves the teacher and discriminator alone, the discriminator's step is clipped and noised), a DP teacher's
history is composed into the run's epsilon before calibration, the paper variant's report says its epsilon is not
a guarantee, a non-private teacher is refused in the sound variant, and a checkpoint reloads and generates."""

from __future__ import annotations

import copy
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
from dp_diffusion.methods.dp_sad import DPSAD, PAPER_MECHANISM, TEACHER_MECHANISM
from dp_diffusion.privacy import summary
from dp_diffusion.privacy.accounting import calibrate_noise_multiplier, headline_epsilon
from dp_diffusion.report.records import not_a_guarantee
from dp_diffusion.sample import load_trained
from dp_diffusion.train import StoreConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "data=digits", "model=tiny", "model.nf=8", "public=dead_leaves", "public.size=64",
    "train.steps=2", "train.batch_size=32", "train.physical_batch_size=32",
]
SAD = [
    "method=dp_sad", "method.parts.discriminator.nf=8",
    "method.module.teacher.steps=2", "method.module.teacher.batch_size=16", "method.module.cache_dir=null",
]


def compose_cfg(tmp_path: Path, *overrides: str, method: tuple[str, ...] = tuple(SAD)):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=[*TINY, *method, f"output_dir={tmp_path}", *overrides])


def cheap_trainer(root: Path, steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(root),
                     callbacks=list(callbacks))


def make_trainer(root: Path):
    return lambda steps, name: cheap_trainer(root / name, steps)


def built(cfg, train_set=None):
    """The module of `cfg` with the digits train split attached."""
    if train_set is None:
        datamodule = build_datamodule("digits", root=cfg.data.root)
        datamodule.setup("fit")
        train_set = datamodule.train_set
    module = build_method(cfg, dataset_info("digits"), len(train_set))
    module.attach_private_data(train_set)
    return module


def fit(module, cfg, root: Path) -> L.Trainer:
    """Teacher stage, then the private fit; returns the trainer (to save checkpoints)."""
    module.fit_public_stages(make_trainer(root))
    trainer = cheap_trainer(root, module.planned_steps, [StoreConfig(config_to_dict(cfg))])
    trainer.fit(module)
    return trainer


def a_batch(module: DPSAD, n: int = 8):
    torch.manual_seed(1)
    images = torch.stack([module.train_set[i][0] for i in range(n)])
    labels = torch.tensor([int(module.train_set[i][1]) for i in range(n)])
    return module.prepare_batch((images, labels))


def state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in net.state_dict().items()}


def test_sound_student_step_leaves_teacher_and_discriminator_alone(tmp_path):
    """The student's private step changes the student only: the teacher's and the discriminator's weights are
    bit-identical and their .grad (sentinels) untouched; one ledger step under 'student'."""
    module = built(compose_cfg(tmp_path, "privacy.noise_multiplier=1.0"))
    assert isinstance(module, DPSAD) and set(module.private_parts()) == {"discriminator", "student"}
    module.configure_optimizers()
    prepared = a_batch(module)
    teacher, disc, student = state(module.teacher), state(module.discriminator), state(module.denoiser)
    sentinels = {}
    for name, p in [*module.discriminator.named_parameters(), *module.teacher.named_parameters()]:
        p.grad = torch.full_like(p, 7.0)
        sentinels[name] = p.grad
    module.private_step("student", module.student_loss, prepared)
    assert all(torch.equal(t, module.teacher.state_dict()[n]) for n, t in teacher.items())
    assert all(torch.equal(t, module.discriminator.state_dict()[n]) for n, t in disc.items())
    for name, p in [*module.discriminator.named_parameters(), *module.teacher.named_parameters()]:
        assert p.grad is sentinels[name] and bool((p.grad == 7.0).all()), name
    assert any(not torch.equal(t, module.denoiser.state_dict()[n]) for n, t in student.items())
    assert module.ledger.mechanisms == {"student": [(1.0, 32 / len(module.train_set), 1)]}
    assert not any(p.requires_grad for p in module.teacher.parameters())


def test_adversarial_weight_zero_switches_the_discriminator_off(tmp_path):
    """lambda = 0: the student is the only private part (sigma calibrated for it alone), the discriminator is
    neither run nor trained, and the report says so."""
    module = built(compose_cfg(tmp_path, "method.module.adversarial_weight=0"))
    assert set(module.private_parts()) == {"student"} and module.public_optimizers() == []
    module.configure_optimizers()
    prepared = a_batch(module)
    assert "student" not in prepared and set(module._engines) == {"student"}
    disc = state(module.discriminator)
    module.private_step("student", module.student_loss, prepared)
    assert all(torch.equal(t, module.discriminator.state_dict()[n]) for n, t in disc.items())
    assert all(p.grad is None for p in module.discriminator.parameters())
    coverage = module.privacy_coverage()
    assert not any("discriminator" in line for line in coverage.trained_with_dp)
    assert any("no discriminator" in note for note in coverage.notes)


def naive_clipped_sum(module: DPSAD, prepared, clip: float) -> dict[str, torch.Tensor]:
    """sum_i clip_C(g_i) over the discriminator's parameters, one backward per example."""
    disc = copy.deepcopy(module.discriminator)
    names, params = zip(*disc.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in zip(names, params)}
    clipped = 0
    for i in range(prepared["sigma"].shape[0]):
        one = {k: v[i:i + 1] for k, v in prepared.items()}
        grads = torch.autograd.grad(module.discriminator_loss(disc, one).sum(), params)
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        clipped += factor < 1
        for n, g in zip(names, grads):
            total[n] += factor * g
    assert clipped == prepared["sigma"].shape[0], "the test should clip every example"
    return total


@pytest.mark.parametrize("sigma", [0.0, 4.0])
def test_sound_discriminator_step_is_clipped_and_noised(tmp_path, sigma):
    """The discriminator is a private part: its gradient is the clipped sum over examples plus N(0, (sigma C)^2),
    divided by the expected batch (32); one ledger step under 'discriminator'."""
    clip = 1e-3
    module = built(compose_cfg(tmp_path, f"privacy.noise_multiplier={sigma}", f"privacy.max_grad_norm={clip}",
                               "privacy.reproducible=true"))
    module.configure_optimizers()
    prepared = a_batch(module)
    expected = naive_clipped_sum(module, prepared, clip)
    engine = module._engines["discriminator"]
    seen = {}

    def step() -> None:
        engine.optimizer.pre_step()  # clip, noise, scale, account: what the DP optimizer's step does first
        seen.update({n: p.grad.detach().clone() for n, p in module.discriminator.named_parameters()})

    engine.step(module.discriminator_loss, prepared, step)
    deviation = torch.cat([(seen[n] * 32 - expected[n]).flatten() for n in expected])
    if sigma == 0:
        assert deviation.abs().max() < 1e-6
    else:
        assert deviation.numel() > 5000
        assert deviation.std().item() == pytest.approx(sigma * clip, rel=0.05)
    assert module.ledger.mechanisms == {"discriminator": [(sigma, 32 / len(module.train_set), 1)]}


def test_nonprivate_teacher_in_the_sound_variant_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="privacy_model=paper") as err:
        built(compose_cfg(tmp_path, "method.module.teacher.source=nonprivate"))
    assert "\n" not in str(err.value)
    # source=dp without a checkpoint is no longer an error: the teacher is trained with DP in the run
    # (tests/test_dp_sad_teacher.py)
    assert built(compose_cfg(tmp_path, "method.module.teacher.source=dp")).teacher_settings.trained_in_run_with_dp


def dp_teacher(tmp_path: Path, *overrides: str) -> Path:
    """A DPDM checkpoint on digits (2 DP steps at epsilon 5), as `dp-diffusion train` writes it."""
    cfg = compose_cfg(tmp_path / "teacher", "privacy.epsilon=5", *overrides, method=("method=dpdm",))
    module = built(cfg)
    trainer = cheap_trainer(tmp_path / "teacher", module.planned_steps, [StoreConfig(config_to_dict(cfg))])
    trainer.fit(module)
    path = tmp_path / "teacher" / "final.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_dp_teacher_history_is_composed_then_the_run_reloads_and_generates(tmp_path):
    """A DP teacher's ledger is recorded as 'teacher' before calibration: sigma is larger than without it, the
    composed epsilon (teacher + discriminator + student) is the accountant's composition and meets the target;
    the teacher is bit-identical after distillation; the saved run reloads and generates the same images."""
    teacher_ckpt = dp_teacher(tmp_path)
    teacher_history = torch.load(teacher_ckpt, weights_only=False)["dp_diffusion_privacy"]["ledger"]["mechanisms"]
    cfg = compose_cfg(tmp_path, "privacy.epsilon=10", "method.module.teacher.source=dp",
                      f"method.module.teacher.checkpoint={teacher_ckpt}")
    module = built(cfg)
    module.fit_public_stages(make_trainer(tmp_path))
    recorded = [tuple(e) for h in teacher_history.values() for e in h]
    assert module.ledger.mechanisms == {TEACHER_MECHANISM: recorded} and sum(n for *_, n in recorded) == 2
    teacher = state(module.teacher)
    trainer = cheap_trainer(tmp_path, module.planned_steps, [StoreConfig(config_to_dict(cfg))])
    trainer.fit(module)
    assert all(torch.equal(t, module.teacher.state_dict()[n]) for n, t in teacher.items())
    assert all(p.grad is None for p in module.teacher.parameters())
    q = 32 / len(module.train_set)
    sigma = module.plan.noise_multiplier
    assert sigma > calibrate_noise_multiplier(10.0, 1e-5, q, 4, module.plan.accountant)[0]
    assert module.ledger.mechanisms["student"] == module.ledger.mechanisms["discriminator"] == [(sigma, q, 2)]
    composed, _ = headline_epsilon([*recorded, (sigma, q, 4)], 1e-5, module.plan.accountant)
    report = module.privacy_report()
    assert report["epsilon"] == pytest.approx(composed, rel=1e-6) and report["epsilon"] <= 10.0
    assert set(report["mechanisms"]) == {TEACHER_MECHANISM, "student", "discriminator"}
    assert report["steps"] == 2 and not report["covers"]["saw_private_data_without_dp"]
    assert any("teacher" in line for line in report["covers"]["trained_with_dp"])

    ckpt = tmp_path / "final.ckpt"
    trainer.save_checkpoint(ckpt)
    reloaded = load_trained(ckpt)
    assert isinstance(reloaded, DPSAD) and bool(reloaded.teacher_trained)
    assert reloaded.ledger.mechanisms == module.ledger.mechanisms
    sample_cfg = cfg.sample.copy()
    sample_cfg.num_steps, sample_cfg.device = 4, "cpu"
    a, labels = module.generate(4, sample_cfg, seed=1, disable_progress=True)
    b, _ = reloaded.generate(4, sample_cfg, seed=1, disable_progress=True)
    assert a.shape == (4, 1, 8, 8) and torch.equal(a, b) and labels.tolist() == [0, 1, 2, 3]


def test_dp_teacher_of_another_data_set_or_without_privacy_is_refused(tmp_path):
    cfg = compose_cfg(tmp_path / "none", "privacy=none", method=("method=dpdm",))
    module = built(cfg)
    trainer = cheap_trainer(tmp_path / "none", 1, [StoreConfig(config_to_dict(cfg))])
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "none.ckpt")
    student = built(compose_cfg(tmp_path, "method.module.teacher.source=dp",
                                f"method.module.teacher.checkpoint={tmp_path / 'none.ckpt'}"))
    with pytest.raises(ConfigError, match="privacy=none"):
        student.fit_public_stages(make_trainer(tmp_path))
    student.data_name = "mnist5k"
    with pytest.raises(ConfigError, match="same private set"):
        student.fit_public_stages(make_trainer(tmp_path))
    assert not student.ledger.mechanisms


def test_paper_variant_reports_that_its_epsilon_is_not_a_guarantee(tmp_path):
    """privacy_model=paper with a non-private teacher: the student's update goes through the output sanitiser
    (the ledger counts the paper's steps under its own name), the teacher and discriminator are listed as having
    seen private data without DP, and the report, its summary and the results record say: not a guarantee."""
    cfg = compose_cfg(tmp_path, "method.module.privacy_model=paper", "method.module.teacher.source=nonprivate")
    module = built(cfg)
    assert module.public_optimizers() == [module.discriminator_optimizer]
    module.fit_public_stages(make_trainer(tmp_path))
    disc, student, teacher = state(module.discriminator), state(module.denoiser), state(module.teacher)
    fit_trainer = cheap_trainer(tmp_path, module.planned_steps)
    fit_trainer.fit(module)
    assert fit_trainer.global_step == 2
    assert any(not torch.equal(t, module.discriminator.state_dict()[n]) for n, t in disc.items())
    assert any(not torch.equal(t, module.denoiser.state_dict()[n]) for n, t in student.items())
    assert all(torch.equal(t, module.teacher.state_dict()[n]) for n, t in teacher.items())
    sanitiser = module.sanitiser
    assert sanitiser.paper_time_dilution == 500 and sanitiser.noise_multiplier == module.plan.noise_multiplier
    assert set(module.ledger.mechanisms) == {PAPER_MECHANISM}

    report = module.privacy_report()
    assert report["epsilon_is_guarantee"] is False and "NOT a differential-privacy guarantee" in report["epsilon_note"]
    assert report["paper_accounting"]["is_guarantee"] is False
    assert report["paper_accounting"]["epsilon_paper"] == pytest.approx(report["epsilon"], rel=1e-6)
    unprotected = report["covers"]["saw_private_data_without_dp"]
    assert any("teacher" in u for u in unprotected) and any("discriminator" in u for u in unprotected)
    text = summary(report)
    assert "NOT a differential-privacy guarantee" in text and "sigma / T" in text
    assert text.splitlines()[0].endswith("NOT a differential-privacy guarantee (the paper's accounting; see the notes)")
    record = {"kind": "train", "target_epsilon": 10.0, "privacy": {k: v for k, v in report.items() if k != "history"}}
    assert "NOT a differential-privacy guarantee" in not_a_guarantee(record)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [(), ("method.module.privacy_model=paper", "method.module.teacher.source=nonprivate")])
def test_cpu_experiment_runs_a_few_steps_through_the_cli(tmp_path, variant):
    """`dp-diffusion train experiment=dp_sad_mnist5k_cpu` (on digits with a dead-leaves teacher, a few steps), both
    privacy models: the run writes privacy.json, samples and a results record; only the paper variant's record
    is marked."""
    import json
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "dp_diffusion", "train", "experiment=dp_sad_mnist5k_cpu", *TINY[:5], *variant,
               "train.steps=2", "train.batch_size=32", "train.physical_batch_size=32",
               "method.module.teacher.steps=2", "method.module.teacher.batch_size=16", "sample.num_samples=4",
               "sample.num_steps=2", "eval.enabled=false", f"hydra.run.dir={run_dir}",
               f"method.module.cache_dir={tmp_path / 'cache'}",
               f"results_file={tmp_path / 'all.jsonl'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert (run_dir / "samples.npz").exists() and (run_dir / "checkpoints" / "final.ckpt").exists()
    report = json.loads((run_dir / "privacy.json").read_text())
    (record,) = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert record["method"] == "dp_sad" and record["privacy"]["steps"] == 2
    if variant:
        assert report["epsilon_is_guarantee"] is False and record["privacy"]["epsilon_is_guarantee"] is False
        assert "NOT a differential-privacy guarantee" in result.stdout and not_a_guarantee(record)
    else:
        assert "epsilon_is_guarantee" not in report and not_a_guarantee(record) is None
        assert set(report["mechanisms"]) == {"discriminator", "student"} and report["epsilon"] <= 10.0


def test_sound_variant_composed_epsilon_matches_google_dp_accounting(tmp_path):
    """The sound variant's reported epsilon (RDP) composes the ledger's three mechanisms (the DP teacher's history,
    the discriminator's and the student's steps) as Google's dp-accounting RDP accountant does, within 1%."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    teacher_ckpt = dp_teacher(tmp_path)
    cfg = compose_cfg(tmp_path, "privacy.epsilon=10", "privacy.accountant=rdp", "method.module.teacher.source=dp",
                      f"method.module.teacher.checkpoint={teacher_ckpt}")
    module = built(cfg)
    fit(module, cfg, tmp_path)
    mechanisms = module.ledger.mechanisms
    assert set(mechanisms) == {TEACHER_MECHANISM, "discriminator", "student"}
    assert module.ledger.steps_of("student") == module.ledger.steps_of("discriminator") == 2
    assert mechanisms[TEACHER_MECHANISM][0][0] != mechanisms["student"][0][0]  # two different sigmas composed
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        for entries in mechanisms.values() for sigma, q, steps in entries
    ]))
    google = accountant.get_epsilon(1e-5)
    report = module.privacy_report()
    assert report["epsilon_accountant"] == "rdp" and report["epsilon"] == report["epsilon_rdp"]
    assert report["epsilon"] == pytest.approx(google, rel=0.01)
    assert 5 < report["epsilon"] <= 10  # more than the teacher's epsilon 5 alone, within the total target
