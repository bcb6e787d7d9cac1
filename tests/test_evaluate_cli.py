"""`dp-diffusion evaluate samples=` refuses files it cannot score with one line naming the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dp_diffusion.config import ConfigError
from dp_diffusion.data.registry import dataset_info
from dp_diffusion.evaluate import validate_eval
from dp_diffusion.sampling import load_samples, save_samples

DIGITS = dataset_info("digits")  # 8x8 grey, 10 classes


def write_text(path: Path) -> Path:
    path.write_text("these are not samples\n")
    return path


def write_other_keys(path: Path) -> Path:
    np.savez(path, x=np.zeros((4, 8, 8, 1), np.uint8), y=np.arange(4))
    return path


def write_mnist_shaped(path: Path) -> Path:
    np.savez(path, images=np.zeros((4, 28, 28, 1), np.uint8), labels=np.arange(4))
    return path


def write_three(path: Path) -> Path:
    np.savez(path, images=np.zeros((3, 8, 8, 1), np.uint8), labels=np.arange(3))
    return path


def write_truncated(path: Path) -> Path:
    write_mnist_shaped(path)
    path.write_bytes(path.read_bytes()[:100])
    return path


@pytest.mark.parametrize(
    "name, write, says",
    [
        ("samples.txt", write_text, "is not a NumPy .npz archive"),
        ("truncated.npz", write_truncated, "is not a NumPy .npz archive"),
        ("other_keys.npz", write_other_keys, "holds arrays ['x', 'y'] but lacks ['images', 'labels']"),
        ("mnist.npz", write_mnist_shaped, "holds images of (28, 28, 1) (H, W, C) but data=digits has (8, 8, 1)"),
        # Precision/recall (in the default metrics) takes each point's 3rd nearest neighbour.
        ("three.npz", write_three, "has 3 images; eval.metrics=['fid', 'kid', 'isc', 'prc'] need at least 4"),
    ],
)
def test_evaluate_refuses_the_file_in_one_line(tmp_path, name, write, says):
    path = write(tmp_path / name)
    result = subprocess.run(
        [sys.executable, "-m", "dp_diffusion", "evaluate", f"samples={path}", "data=digits",
         f"results_file={tmp_path / 'results.jsonl'}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "DP_DIFFUSION_BACKBONE_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: samples="), result.stderr
    assert str(path) in lines[0] and says in lines[0]
    assert not (tmp_path / "results.jsonl").exists()


def test_written_samples_load_back(tmp_path):
    images = torch.linspace(-1, 1, 6 * 64).reshape(6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 9])
    paths = save_samples(images, labels, tmp_path)
    loaded, loaded_labels = load_samples(paths["npz"], DIGITS)
    assert loaded.shape == (6, 1, 8, 8) and torch.allclose(loaded, images, atol=1 / 127.5)
    assert loaded_labels.tolist() == labels.tolist()


@pytest.mark.parametrize(
    "arrays, says",
    [
        ({"images": np.zeros((4, 8, 8, 1), np.float32), "labels": np.arange(4)}, "images of dtype float32"),
        ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.arange(4)}, "shape (4, 8, 8)"),
        ({"images": np.zeros((4, 8, 8, 1), np.uint8), "labels": np.arange(3)}, "labels of dtype int64 and shape (3,)"),
        ({"images": np.zeros((4, 8, 8, 1), np.uint8), "labels": np.full(4, 0.5)}, "labels of dtype float64"),
        ({"images": np.zeros((1, 8, 8, 1), np.uint8), "labels": np.arange(1)}, "has 1 image(s)"),
        ({"images": np.zeros((4, 8, 8, 1), np.uint8), "labels": np.arange(4) + 7}, "labels 7..10 but data=digits"),
        ({"images": np.zeros((4, 8, 8, 3), np.uint8), "labels": np.arange(4)}, "(8, 8, 3) (H, W, C)"),
    ],
)
def test_load_samples_refuses_other_contents(tmp_path, arrays, says):
    path = tmp_path / "samples.npz"
    np.savez(path, **arrays)
    with pytest.raises(ConfigError) as err:
        load_samples(path, DIGITS)
    assert str(path) in str(err.value) and says in str(err.value) and "\n" not in str(err.value)


def test_load_samples_refuses_npy_and_pickled_arrays(tmp_path):
    np.save(tmp_path / "images.npy", np.zeros((4, 8, 8, 1), np.uint8))
    with pytest.raises(ConfigError, match="is a single .npy array"):
        load_samples(tmp_path / "images.npy")
    np.savez(tmp_path / "objects.npz", images=np.array([{"a": 1}], dtype=object), labels=np.zeros(1))
    with pytest.raises(ConfigError, match="unreadable images or labels"):
        load_samples(tmp_path / "objects.npz")


def test_eval_num_samples_must_cover_precision_recall():
    quick = OmegaConf.load(Path(__file__).parents[1] / "conf" / "eval" / "quick.yaml")
    validate_eval(OmegaConf.merge(quick, {"num_samples": 4}))
    with pytest.raises(ConfigError, match=r"eval.num_samples must be an integer >= 4 .* got 3"):
        validate_eval(OmegaConf.merge(quick, {"num_samples": 3}))
    validate_eval(OmegaConf.merge(quick, {"num_samples": 2, "metrics": ["fid", "kid"]}))
