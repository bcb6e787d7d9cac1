"""Every embedded data set runs the default `dp-diffusion train` end to end, evaluation included.

The runs keep the default evaluation (`eval=quick` today: every fidelity metric, every downstream
classifier) and are shortened only in size: few steps, few samples, one classifier epoch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from dp_diffusion.data.sources import SOURCES, EmbeddedSource

pytestmark = pytest.mark.slow

# Every data set that needs no files: one added later is covered without touching this test.
EMBEDDED = sorted(name for name, source in SOURCES.items() if isinstance(source, EmbeddedSource))
CONF = Path(__file__).parents[1] / "conf"
EVAL_NAME = next(entry.eval for entry in OmegaConf.load(CONF / "config.yaml").defaults if "eval" in entry)
DEFAULT_EVAL = OmegaConf.load(CONF / "eval" / f"{EVAL_NAME}.yaml")
SHORTER = {"eval.num_samples": 40, "eval.downstream.epochs": 1}
# The public warm start (public=auto: font_digits on mnist5k) is shortened too; it is cached in the test's folder.
SHORT = ["train.steps=2", "train.batch_size=64", "train.physical_batch_size=64", "sample.num_samples=20",
         "sample.num_steps=2", "method.module.warm_start.steps=2", "method.module.warm_start.batch_size=16",
         *(f"{key}={value}" for key, value in SHORTER.items())]


def expected_metrics() -> set[str]:
    """What the default evaluation reports: `prc` gives precision, recall and f_score."""
    names = {m for m in DEFAULT_EVAL.metrics if m != "prc"}
    if "prc" in DEFAULT_EVAL.metrics:
        names |= {"precision", "recall", "f_score"}
    return names | {f"acc_{name}" for name in DEFAULT_EVAL.downstream.classifiers}


@pytest.fixture(scope="module")
def backbone_cache(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the runs keep the domain backbone, as users do under ~/.cache: in pytest's cache, so only the first
    session trains it (on mnist5k that is most of the run). Its key covers the data, the recipe and the code's
    version, so a kept backbone is the one a fresh run would train; `test_metrics.py` tests the training."""
    cache = getattr(pytestconfig, "cache", None)  # None under -p no:cacheprovider
    return cache.mkdir("dp_diffusion_backbones") if cache else tmp_path_factory.mktemp("backbones")


def test_the_embedded_data_sets_are_found():
    assert {"mnist5k", "digits"} <= set(EMBEDDED)


@pytest.mark.parametrize("name", EMBEDDED)
def test_default_run_evaluates_every_metric(tmp_path, backbone_cache, name):
    # One thread: on shared CPUs a second OpenMP thread mostly waits (measured: 124 s -> 41 s for both runs).
    env = {**os.environ, "DP_DIFFUSION_BACKBONE_CACHE": str(backbone_cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "dp_diffusion", "train", f"data={name}", *SHORT,
                             f"hydra.run.dir={tmp_path / 'run'}", f"results_file={tmp_path / 'all.jsonl'}",
                             f"method.module.cache_dir={tmp_path / 'cache'}"],
                            capture_output=True, text=True, timeout=900, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output[-4000:]
    record = json.loads((tmp_path / "all.jsonl").read_text().splitlines()[-1])
    assert record["data"] == name and record["privacy"]["steps"] == 2
    # The default evaluation, only smaller: nothing switched off.
    shortened = OmegaConf.merge(DEFAULT_EVAL, OmegaConf.from_dotlist([f"{k}={v}" for k, v in SHORTER.items()]).eval)
    assert record["config"]["eval"] == OmegaConf.to_container(shortened)
    metrics = record["metrics"]
    assert set(metrics) == expected_metrics()
    for metric, entry in metrics.items():
        assert np.isfinite(entry["value"]), (metric, entry)
        assert entry["num_samples"] == SHORTER["eval.num_samples"]
    assert all(0.0 <= metrics[f"acc_{c}"]["value"] <= 1.0 for c in DEFAULT_EVAL.downstream.classifiers)
