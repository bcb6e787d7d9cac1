"""DP-SAD's teachers trained in the run: a `dp` teacher without a checkpoint is trained with DP-SGD on the private
set through the privacy core at `epsilon_fraction` of the target, its history is composed with the student's (whose
sigma is calibrated to what it left), a resumed run neither retrains nor re-records it; a bad fraction is a one-line
ConfigError; a `public` teacher is cached by its public config and the second run loads it without a trainer; a
labeled public set trains the teacher's class rows (asked with the student's labels), an unlabeled one its null
class."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hydra import compose, initialize_config_dir
from torch.utils.data import Subset

from dp_diffusion.build import build_method, config_to_dict
from dp_diffusion.cli import CONF_DIR
from dp_diffusion.data import build_datamodule
from dp_diffusion.data.registry import dataset_info
from dp_diffusion.config import ConfigError
from dp_diffusion.methods.dp_sad import DPSAD, PUBLIC_TEACHER_FILE, TEACHER_MECHANISM
from dp_diffusion.methods.dpdm import DPDM
from dp_diffusion.privacy import PrivacyError
from dp_diffusion.privacy.accounting import calibrate_noise_multiplier, headline_epsilon
from dp_diffusion.train import StoreConfig
from test_dp_sad import SAD, TINY, built, cheap_trainer, compose_cfg, state

pytestmark = pytest.mark.usefixtures("one_thread")

IN_RUN_DP = ("method.module.teacher.source=dp", "method.module.teacher.batch_size=16")


class Trainers:
    """`make_trainer` for `fit_public_stages` that remembers the stages it built trainers for, and the trainers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.names: list[str] = []
        self.trainers = []

    def __call__(self, steps: int, name: str):
        self.names.append(name)
        self.trainers.append(cheap_trainer(self.root / name, steps))
        return self.trainers[-1]


def test_in_run_dp_teacher_is_trained_with_noise_and_composed_with_the_student(tmp_path):
    """source=dp, no checkpoint: a DPDM teacher trained with DP on the private set (noise drawn, weights moved)
    at epsilon_fraction of the target, recorded as 'teacher'; the student's sigma is larger than without it; the
    reported epsilon composes both, is within the target and above the teacher's alone; the teacher is frozen."""
    cfg = compose_cfg(tmp_path, "privacy.epsilon=10", *IN_RUN_DP, "method.module.teacher.epsilon_fraction=0.4")
    module = built(cfg)
    untrained = state(module.teacher)
    trainers = Trainers(tmp_path)
    rng = torch.get_rng_state()
    module.fit_public_stages(trainers)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's generator continues as if no teacher was trained
    assert trainers.names == ["dp_teacher"]
    teacher = trainers.trainers[0].lightning_module
    assert isinstance(teacher, DPDM) and teacher.train_set is module.train_set
    n = len(module.train_set)
    spec = teacher.privacy_spec
    assert spec.epsilon == pytest.approx(4.0) and spec.noise_multiplier is None
    assert (spec.delta, spec.max_grad_norm, spec.accountant, spec.secure_mode, spec.reproducible) == (
        1e-5, 1.0, "prv", False, False)
    assert teacher.randomness.kind == "entropy" and teacher.noise.steps_drawn == 2  # noise drawn at each step
    sigma_t = teacher.plan.noise_multiplier
    assert sigma_t == pytest.approx(calibrate_noise_multiplier(4.0, 1e-5, 16 / n, 2, "prv")[0])
    assert module.ledger.mechanisms == {TEACHER_MECHANISM: [(sigma_t, 16 / n, 2)]}
    assert any(not torch.equal(t, module.teacher.state_dict()[k]) for k, t in untrained.items())
    released = teacher.sampling_denoiser().state_dict()  # the teacher's EMA weights
    assert all(torch.equal(t, released[k]) for k, t in module.teacher.state_dict().items())

    cost = module.teacher_cost
    assert cost["steps"] == 2 and cost["wall_time_s"] > 0 and 0 < cost["epsilon"] <= 4.0
    q = 32 / n
    sigma = module.plan.noise_multiplier  # calibrated at the end of fit_public_stages, to what the teacher left
    assert sigma > calibrate_noise_multiplier(10.0, 1e-5, q, 4, module.plan.accountant)[0]

    frozen = state(module.teacher)
    trainer = cheap_trainer(tmp_path, module.planned_steps, [StoreConfig(config_to_dict(cfg))])
    trainer.fit(module)
    assert all(torch.equal(t, module.teacher.state_dict()[k]) for k, t in frozen.items())
    assert module.ledger.mechanisms["student"] == module.ledger.mechanisms["discriminator"] == [(sigma, q, 2)]
    report = module.privacy_report()
    composed, _ = headline_epsilon([(sigma_t, 16 / n, 2), (sigma, q, 4)], 1e-5, module.plan.accountant)
    assert report["epsilon"] == pytest.approx(composed, rel=1e-6)
    assert cost["epsilon"] < report["epsilon"] <= 10.0
    assert set(report["mechanisms"]) == {TEACHER_MECHANISM, "student", "discriminator"}
    assert report["teacher"]["epsilon"] == cost["epsilon"]
    assert any("in this run" in line for line in report["covers"]["trained_with_dp"])


def test_resumed_run_neither_retrains_nor_records_the_teacher_again(tmp_path):
    """A run stopped after one student step and resumed (without fit_public_stages, as `dp-diffusion train` does)
    keeps the teacher's weights and its one ledger entry, and reports its cost from the checkpoint."""
    cfg = compose_cfg(tmp_path, *IN_RUN_DP, "privacy.accountant=rdp")
    first = built(cfg)
    first.fit_public_stages(Trainers(tmp_path))
    trainer = cheap_trainer(tmp_path, 1, [StoreConfig(config_to_dict(cfg))])
    trainer.fit(first)
    ckpt = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(ckpt)
    recorded = list(first.ledger.mechanisms[TEACHER_MECHANISM])

    resumed = built(cfg)
    assert resumed.ledger.mechanisms == {}
    cheap_trainer(tmp_path, 2, [StoreConfig(config_to_dict(cfg))]).fit(resumed, ckpt_path=str(ckpt))
    assert resumed.ledger.mechanisms[TEACHER_MECHANISM] == recorded
    assert resumed.ledger.steps_of("student") == 2 and resumed.plan == first.plan
    assert all(torch.equal(t, resumed.teacher.state_dict()[k]) for k, t in first.teacher.state_dict().items())
    assert bool(resumed.teacher_trained) and resumed.teacher_cost == first.teacher_cost
    with pytest.raises(PrivacyError, match="before sigma is calibrated"):  # never a second teacher in one ledger
        resumed.fit_public_stages(Trainers(tmp_path / "again"))


def test_teacher_noise_follows_privacy_reproducible(tmp_path):
    """privacy.reproducible=true: the teacher's masks and noise are seeded too (the run's setting, not its own)."""
    module = built(compose_cfg(tmp_path, *IN_RUN_DP, "privacy.reproducible=true", "privacy.accountant=rdp"))
    trainers = Trainers(tmp_path)
    module.fit_public_stages(trainers)
    teacher = trainers.trainers[0].lightning_module
    assert teacher.privacy_spec.reproducible and teacher.randomness.kind == "reproducible"


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "-0.2", "half"])
def test_a_bad_epsilon_fraction_is_a_one_line_config_error(tmp_path, fraction):
    with pytest.raises(ConfigError, match="epsilon_fraction") as err:
        built(compose_cfg(tmp_path, *IN_RUN_DP, f"method.module.teacher.epsilon_fraction={fraction}"))
    assert "\n" not in str(err.value)


def test_a_fraction_that_leaves_nothing_is_a_one_line_config_error(tmp_path, monkeypatch):
    """Too small a share for the teacher (no sigma reaches it) and a remainder the core cannot calibrate the student
    to (its PrivacyError) are both one-line ConfigErrors naming the fraction; no teacher is recorded by the first."""
    module = built(compose_cfg(tmp_path, *IN_RUN_DP, "privacy.epsilon=0.001", "privacy.accountant=rdp",
                               "method.module.teacher.epsilon_fraction=0.001"))
    trainers = Trainers(tmp_path)
    with pytest.raises(ConfigError, match="epsilon_fraction=0.001") as err:
        module.fit_public_stages(trainers)
    assert "\n" not in str(err.value) and trainers.names == [] and not module.ledger.mechanisms

    module = built(compose_cfg(tmp_path, *IN_RUN_DP, "privacy.accountant=rdp",
                               "method.module.teacher.epsilon_fraction=0.9"))

    def refuse(self):
        raise PrivacyError("privacy.epsilon=10: the mechanisms already recorded spent epsilon=10.2 (by RDP), "
                           "nothing is left of the target 10")

    monkeypatch.setattr(DPSAD, "ensure_plan", refuse)
    with pytest.raises(ConfigError, match="epsilon_fraction=0.9 leaves the student nothing") as err:
        module.fit_public_stages(Trainers(tmp_path / "b"))
    assert "\n" not in str(err.value) and "nothing is left of the target 10" in str(err.value)


def test_public_teacher_is_cached_by_its_public_config(tmp_path):
    """The second run with the same public teacher loads it from the cache (no trainer built) and gets the same
    weights and the same private-stage randomness; a run at another epsilon shares the key, another teacher
    setting does not."""
    cache = f"method.module.cache_dir={tmp_path / 'cache'}"
    first, trainers = built(compose_cfg(tmp_path, cache)), Trainers(tmp_path / "a")
    torch.manual_seed(5)
    first.fit_public_stages(trainers)
    after_first = torch.rand(3)
    assert trainers.names == ["public_teacher"]
    path = tmp_path / "cache" / first.public_teacher_key() / PUBLIC_TEACHER_FILE
    assert path.is_file()

    second, again = built(compose_cfg(tmp_path, cache, "privacy.epsilon=1")), Trainers(tmp_path / "b")
    assert second.public_teacher_key() == first.public_teacher_key()
    torch.manual_seed(5)
    second.fit_public_stages(again)
    assert again.names == [] and torch.equal(torch.rand(3), after_first)
    assert all(torch.equal(t, second.teacher.state_dict()[k]) for k, t in first.teacher.state_dict().items())
    assert bool(second.teacher_trained)

    other = built(compose_cfg(tmp_path, cache, "method.module.teacher.lr=1e-4"))
    assert other.public_teacher_key() != first.public_teacher_key()
    wider = built(compose_cfg(tmp_path, cache, "model.nf=16"))
    assert wider.public_teacher_key() != first.public_teacher_key()


def test_in_run_teacher_of_a_non_private_baseline_is_reported_as_such(tmp_path):
    """privacy=none: the teacher is trained without noise like the rest of the run; nothing enters the ledger and
    the report lists it among what saw private data without DP."""
    module = built(compose_cfg(tmp_path, *IN_RUN_DP, "privacy=none"))
    trainers = Trainers(tmp_path)
    module.fit_public_stages(trainers)
    assert trainers.trainers[0].lightning_module.plan.noise_multiplier == 0.0
    assert module.ledger.mechanisms == {} and module.teacher_cost["steps"] == 2
    assert module.teacher_cost["epsilon"] is None
    report = module.privacy_report()
    assert not report["private"] and any("teacher" in line for line in report["covers"]["saw_private_data_without_dp"])


def mnist5k_student(tmp_path: Path, public: str, *overrides: str) -> DPSAD:
    """A DP-SAD module on 64 embedded MNIST digits (private) with the public teacher on `public`."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[
            "data=mnist5k", f"public={public}", "model=tiny", "model.nf=8", "train.steps=2", "train.batch_size=32",
            "train.physical_batch_size=32", *SAD, f"method.module.cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path}", *overrides])
    datamodule = build_datamodule("mnist5k", root=cfg.data.root)
    datamodule.setup("fit")
    train_set = Subset(datamodule.train_set, range(64))
    module = build_method(cfg, dataset_info("mnist5k"), len(train_set))
    module.attach_private_data(train_set)
    return module


def test_labeled_public_teacher_learns_the_class_rows_and_is_asked_with_the_students_labels(tmp_path):
    """public=digits for mnist5k: the teacher trains class rows y (the warm start's rule) and a step asks it with
    the student's (label-dropped) labels; dead leaves (unlabeled): its null class, for every example. The rule
    travels with the cached teacher and in the module's state (a resumed run asks the teacher the same way)."""
    module, trainers = mnist5k_student(tmp_path, "digits"), Trainers(tmp_path / "a")
    assert not bool(module.teacher_class_rows)  # a public teacher: unknown until trained
    module.fit_public_stages(trainers)
    assert not trainers.trainers[0].lightning_module.null_labels
    assert bool(module.teacher_class_rows) and bool(module.state_dict()["teacher_class_rows"])
    images, labels = next(iter(torch.utils.data.DataLoader(module.train_set, batch_size=8)))
    prepared = module.prepare_batch((images, labels))
    assert torch.equal(module._teacher_labels(prepared), prepared["labels"])
    assert set(labels.tolist()) & set(prepared["labels"].reshape(-1).tolist())  # real classes, not all null

    cached, again = mnist5k_student(tmp_path, "digits", "privacy.epsilon=1"), Trainers(tmp_path / "b")
    cached.fit_public_stages(again)
    assert again.names == [] and bool(cached.teacher_class_rows)

    unlabeled, leaves = mnist5k_student(tmp_path, "dead_leaves", "public.size=64"), Trainers(tmp_path / "c")
    unlabeled.fit_public_stages(leaves)
    assert leaves.trainers[0].lightning_module.null_labels and not bool(unlabeled.teacher_class_rows)
    prepared = unlabeled.prepare_batch((images, labels))
    assert torch.all(unlabeled._teacher_labels(prepared) == unlabeled.num_classes)


def test_a_state_written_before_the_class_rows_flag_loads_with_the_rule_it_ran_by(tmp_path):
    """A DP-SAD state without `teacher_class_rows` (written before it existed) loads: a public teacher is then
    asked with the null class, as it was; a state that has the flag keeps it."""
    module = built(compose_cfg(tmp_path))
    state = module.state_dict()
    old = {k: v for k, v in state.items() if k != "teacher_class_rows"}
    module.teacher_class_rows.fill_(True)
    module.load_state_dict(old)
    assert not bool(module.teacher_class_rows)
    state["teacher_class_rows"] = torch.tensor(True)
    module.load_state_dict(state)
    assert bool(module.teacher_class_rows)


def test_student_warm_start_is_dpdms_cached_public_pretraining(tmp_path):
    """student_init=warm_start: the student and its EMA start from the public pretraining DPDM's warm start makes
    (the same cache entry: a DPDM run with the same public set and model then trains nothing), the teacher is
    trained as before, and the privacy report lists the warm start among what never saw private data."""
    warm = ("method.module.student_init=warm_start", "method.module.warm_start.steps=2",
            "method.module.warm_start.batch_size=16")
    module, trainers = mnist5k_student(tmp_path, "digits", *warm), Trainers(tmp_path / "a")
    untrained = {k: v.clone() for k, v in module.denoiser.state_dict().items()}
    module.fit_public_stages(trainers)
    assert trainers.names == ["public_teacher", "public_warm_start"]
    pretrained = trainers.trainers[1].lightning_module.sampling_denoiser().state_dict()
    student, ema = module.denoiser.state_dict(), module.ema.module.state_dict()
    assert all(torch.equal(student[k], t) and torch.equal(ema[k], t) for k, t in pretrained.items())
    assert any(not torch.equal(untrained[k], student[k]) for k in untrained)
    covers = module.privacy_report()["covers"]
    assert any("warm start" in line for line in covers["never_saw_private_data"])
    assert any("from its public warm start" in line for line in covers["trained_with_dp"])

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[
            "data=mnist5k", "public=digits", "model=tiny", "model.nf=8", "train.steps=2", "train.batch_size=32",
            "train.physical_batch_size=32", "method=dpdm", f"method.module.cache_dir={tmp_path / 'cache'}",
            "method.module.warm_start.steps=2", "method.module.warm_start.batch_size=16", f"output_dir={tmp_path}"])
    dpdm, again = build_method(cfg, dataset_info("mnist5k"), 64), Trainers(tmp_path / "b")
    dpdm.fit_public_stages(again)
    assert again.names == []  # DPDM found the student's warm start in the cache
    assert all(torch.equal(dpdm.denoiser.state_dict()[k], t) for k, t in pretrained.items())


@pytest.mark.parametrize("overrides, message", [
    (("public=dead_leaves", "method.module.student_init=public_digits"), "student_init must be one of"),
    (("public=none", "method.module.teacher.source=dp", "method.module.student_init=warm_start"),
     "student_init=warm_start pretrains the student on a public set"),
])
def test_a_bad_student_init_is_a_one_line_config_error(tmp_path, overrides, message):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[*(o for o in TINY if not o.startswith("public")), *SAD,
                                           f"output_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=message) as err:
        built(cfg)
    assert "\n" not in str(err.value)
