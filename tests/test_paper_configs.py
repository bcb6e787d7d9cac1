"""The papers' DP-LDM and DP-SAD experiment configs (conf/experiment/dp_ldm_*, dp_sad_*, all but *_cpu) each
compose, validate, and run: their parts shrunk to tiny widths (every other setting as the paper config has
it: depths, attention, fine-tuned part, teacher source, privacy model, epsilon, delta, C), public stages of
2 steps, then 2 private steps on tiny files of the private and public sets written here under data.root.
The privacy report counts the 2 steps within the target epsilon, and samples have the private set's shape."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_data import random_images, write_celeba, write_idx
from test_dp_ldm import CountingTrainers, cheap_trainer
from test_public_data import write_imagenet

from dp_diffusion.build import build_method
from dp_diffusion.cli import CONF_DIR
from dp_diffusion.data import build_datamodule, dataset_info
from dp_diffusion.data.public import IMAGENET_SIZES
from dp_diffusion.data.sources import SOURCES
from dp_diffusion.run_config import validate_config

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

PAPER_EXPERIMENTS = sorted(
    p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")
    if p.stem.startswith(("dp_ldm_", "dp_sad_")) and not p.stem.endswith("_cpu")
)
NUM_TRAIN, NUM_PUBLIC, BATCH = 64, 16, 8
# Widths only (depths, attention placement and the fine-tuned blocks stay the paper config's); public
# stages of 2 steps; the private fit of 2 steps at q = 8/64 (a smaller q calibrates faster).
TINY = {
    "dp_ldm": [
        "method.parts.autoencoder.nf=8", "method.parts.backbone.nf=8", "method.parts.backbone.num_heads=2",
        "method.parts.backbone.context_dim=8",
        "method.module.pretraining.autoencoder_steps=2", f"method.module.pretraining.autoencoder_batch_size={BATCH}",
        "method.module.pretraining.latent_steps=2", f"method.module.pretraining.latent_batch_size={BATCH}",
    ],
    "dp_sad": [
        "model.nf=8", "method.parts.discriminator.nf=8",
        "method.module.teacher.steps=2", f"method.module.teacher.batch_size={BATCH}",
    ],
}
PUBLIC_STAGES = {"dp_ldm": ["public_autoencoder", "public_latent"], "dp_sad": ["public_teacher"]}
RUN = ["train.steps=2", f"train.batch_size={BATCH}", f"train.physical_batch_size={BATCH}"]


# --- tiny files in each loader's layout (the primitives are test_data's / test_public_data's) ---------------


def write_idx_set(name: str, root: Path, n_train: int) -> None:
    """MNIST-format idx files (mnist, fashion_mnist, emnist letters) with every class present."""
    source, info = SOURCES[name], dataset_info(name)
    rng = np.random.default_rng(0)
    for path in source.required:  # raw/<prefix>-images-idx3-ubyte, raw/<prefix>-labels-idx1-ubyte per split
        n = n_train if "train" in path else 4
        if "images" in path:
            write_idx(source.directory(root) / path, random_images(rng, n, 28, 28))
        else:
            write_idx(source.directory(root) / path, np.arange(n) % info.num_classes + source.label_offset)


def write_cifar10(root: Path, n_train: int) -> None:
    """CIFAR-10 python batches: the train images spread over the five batch files."""
    folder = SOURCES["cifar10"].directory(root)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_sizes = [n_train // 5 + (i < n_train % 5) for i in range(5)]
    for name, n in zip(SOURCES["cifar10"].required, [*train_sizes, 4]):  # data_batch_1..5, test_batch
        entry = {"data": random_images(rng, n, 3 * 32 * 32), "labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry))


def write_private(name: str, root: Path) -> None:
    if name in ("celeba32", "celeba64"):
        write_celeba(root, partition=[0] * NUM_TRAIN + [2, 2])
    elif name == "cifar10":
        write_cifar10(root, NUM_TRAIN)
    else:
        write_idx_set(name, root, NUM_TRAIN)


def write_public(public, root: Path) -> None:
    if public.name in IMAGENET_SIZES:
        size = IMAGENET_SIZES[public.name]
        write_imagenet(root / public.folder, size, {"train_data_batch_1.npz": list(range(1, NUM_PUBLIC + 1))})
    elif public.name == "emnist":
        write_idx_set("emnist", root, NUM_PUBLIC)
    else:
        raise AssertionError(f"no tiny files for public={public.name}: add a writer here")


# --- the configs ---------------------------------------------------------------------------------------


def compose_experiment(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=[f"experiment={name}", *overrides])


def test_the_papers_settings_are_all_here():
    """Issue 14's five DP-LDM settings and issue 15's five DP-SAD settings."""
    assert PAPER_EXPERIMENTS == [
        "dp_ldm_celeba32_eps1", "dp_ldm_celeba64_eps1", "dp_ldm_cifar10_eps10", "dp_ldm_mnist_eps1",
        "dp_ldm_mnist_eps10", "dp_sad_celeba64_eps10", "dp_sad_fashion_mnist_eps1", "dp_sad_fashion_mnist_eps10",
        "dp_sad_mnist_eps1", "dp_sad_mnist_eps10",
    ]


@pytest.mark.parametrize("name", PAPER_EXPERIMENTS)
def test_paper_config_composes_validates_and_runs_two_private_steps(name, tmp_path):
    paper = compose_experiment(name)
    validate_config(paper)  # as written, against the official set sizes
    method = paper.method.name
    if method == "dp_sad":  # the sound variant, with its teacher source said
        assert paper.method.module.privacy_model == "sound" and paper.method.module.teacher.source == "public"
    cfg = compose_experiment(name, *TINY[method], *RUN, f"data.root={tmp_path}", f"output_dir={tmp_path}",
                             *([f"method.module.cache_dir={tmp_path / 'cache'}"] if method in ("dp_ldm", "dp_sad") else []))
    validate_config(cfg)
    write_private(cfg.data.name, tmp_path)
    write_public(cfg.public, tmp_path)

    datamodule = build_datamodule(cfg.data.name, root=cfg.data.root)
    with pytest.warns(UserWarning, match="official split"):  # tiny files, not the official sizes
        datamodule.setup("fit")
    train_set = datamodule.train_set
    assert len(train_set) == NUM_TRAIN
    module = build_method(cfg, dataset_info(cfg.data.name), len(train_set))
    module.attach_private_data(train_set)
    trainers = CountingTrainers(tmp_path)
    module.fit_public_stages(trainers)
    assert trainers.names == PUBLIC_STAGES[method]
    trainer = cheap_trainer(tmp_path, module.planned_steps)
    trainer.fit(module)

    report = module.privacy_report()
    assert report["steps"] == 2 and module.logical_steps() == 2
    assert 0 < report["epsilon"] <= paper.privacy.epsilon and report["delta"] == paper.privacy.delta
    if method == "dp_sad":
        assert set(report["mechanisms"]) == {"discriminator", "student"}
        assert not report["covers"]["saw_private_data_without_dp"]
    sample_cfg = cfg.sample.copy()
    sample_cfg.num_steps, sample_cfg.device = 2, "cpu"
    images, _ = module.generate(3, sample_cfg, seed=1, disable_progress=True)
    assert images.shape == (3, *train_set[0][0].shape) == (3, *dataset_info(cfg.data.name).image_shape)
    assert torch.isfinite(images).all()
