"""The benchmark runs end to end on a tiny setting: rows, ratios, JSON and --compare (numbers are not checked)."""

from __future__ import annotations

import json
import math

import pytest

from dp_diffusion.bench import GRAD_MODES, NONPRIVATE, dp_label, main, run_benchmark

TINY = dict(model="tiny", batch_size=4, noise_multiplicities=(1, 2), samplers=("ddim",), sample_steps=2,
            sample_batch=4, repeats=1, warmup=1, device="cpu", threads=1, verbose=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny"
    return run_benchmark(out=out, **TINY), out


@pytest.mark.slow
def test_one_row_per_mode_and_k_plus_baselines(tiny_run):
    result, _ = tiny_run
    expected = {f"{what} K={k}" for k in (1, 2) for what in [NONPRIVATE, *map(dp_label, GRAD_MODES)]}
    ids = [r["id"] for r in result["train"]]
    assert sorted(ids) == sorted(expected)
    for row in result["train"]:
        for key in ("ms", "ratio", "vs_k_min"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["id"], key, row[key])
        assert row["note"] == ""
    assert all(r["ratio"] == 1.0 for r in result["train"] if r["what"] == NONPRIVATE)
    (sample,) = result["sample"]
    assert sample["nfe"] == 2 and sample["images_per_s"] > 0


@pytest.mark.slow
def test_markdown_and_json_are_written(tiny_run):
    result, out = tiny_run
    markdown = out.with_suffix(".md").read_text()
    assert "| DP grouped | 2 |" in markdown and "| ddim | 2 | 2 | 4 |" in markdown
    assert "CUDA-only" in markdown  # the GPU rows are skipped on CPU, and say so
    reloaded = json.loads(out.with_suffix(".json").read_text())
    assert reloaded["train"] == result["train"] and reloaded["sample"] == result["sample"]
    assert reloaded["env"]["torch"] and reloaded["env"]["threads"] == 1


@pytest.mark.slow
def test_compare_against_previous_json(tiny_run, tmp_path, capsys):
    _, out = tiny_run
    previous = out.with_suffix(".json")
    main(["--model", "tiny", "--batch-size", "4", "--noise-multiplicity", "1", "--modes", "grouped",
          "--samplers", "ddim", "--sample-steps", "2", "--sample-batch", "4", "--repeats", "1", "--warmup", "1",
          "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "now"), "--compare", str(previous)])
    printed = capsys.readouterr().out
    assert f"## Compared with {previous}" in printed
    rows = {r["id"]: r for r in json.loads((tmp_path / "now.json").read_text())["compare"]["rows"]}
    assert set(rows) == {f"{NONPRIVATE} K=1", "DP grouped K=1", "sample ddim steps=2"}
    for row in rows.values():
        assert math.isfinite(row["now_over_then"]) and row["now_over_then"] > 0


def test_bad_settings_name_the_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--modes", "grouped,ghost", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--modes: unknown ['ghost']" in capsys.readouterr().err
