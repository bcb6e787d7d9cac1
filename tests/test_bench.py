"""The benchmark runs end to end on a tiny setting: rows, ratios, JSON and --compare (numbers are not checked)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from dp_diffusion.bench import (
    GRAD_MODES,
    NONPRIVATE,
    build_denoiser,
    dp_label,
    main,
    make_batch,
    nonprivate_step,
    run_benchmark,
)

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
        main(["--modes", "grouped,magic", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--modes: unknown ['magic']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--batch-size", "8", "--physical-batch-size", "9", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--physical-batch-size must be in [1, --batch-size=8], got 9" in capsys.readouterr().err


def test_chunked_nonprivate_step_takes_the_same_step(monkeypatch, one_thread):
    """The baseline accumulates over physical chunks exactly as over one batch (SGD: the update is lr * grad)."""
    monkeypatch.setattr(torch.optim, "Adam", torch.optim.SGD)
    device = torch.device("cpu")
    template, loss = build_denoiser("tiny")
    batch = make_batch(loss, batch_size=5, noise_multiplicity=2, device=device)
    after = []
    for physical in (None, 2):
        denoiser = copy.deepcopy(template)
        nonprivate_step(denoiser, loss, batch, device, physical_batch_size=physical)()
        after.append(torch.cat([p.detach().flatten() for p in denoiser.parameters()]))
    start = torch.cat([p.detach().flatten() for p in template.parameters()])
    moved = (after[0] - start).abs().max()
    assert moved > 1e-6  # the step did something
    torch.testing.assert_close(after[1] - start, after[0] - start, rtol=1e-4, atol=1e-4 * moved.item())


def test_training_rows_are_timed_round_robin_and_an_oom_row_is_skipped():
    """Rows of one K alternate call by call (a machine-speed drift hits all alike); a row that runs
    out of memory mid-timing is reported as skipped and the others go on."""
    from dp_diffusion.bench import _Benchmark, _new_row

    bench = _Benchmark("tiny", 4, torch.device("cpu"), repeats=3, warmup=1, seed=0, verbose=False)
    calls = []

    def step(name, fail_on=None):
        def call():
            calls.append(name)
            if calls.count(name) == fail_on:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return call

    rows = {name: _new_row(name, 1, None, None, None) for name in "abcd"}
    bench.time_round_robin([(rows["a"], step("a")), (rows["b"], step("b", fail_on=2)), (rows["c"], None),
                            (rows["d"], step("d"))])
    assert calls == ["a", "b", "d", "a", "b", "d", "a", "d"]
    assert len(rows["a"]["times_ms"]) == 3 and rows["a"]["ms"] == sorted(rows["a"]["times_ms"])[1]
    assert rows["b"]["ms"] is None and "out of memory" in rows["b"]["note"]
    assert rows["c"]["ms"] is None and rows["d"]["ms"] is not None


@pytest.mark.slow
def test_variant_rows_run_on_cpu_and_compiled_rows_are_not_recompiled_while_timed(monkeypatch, tmp_path):
    """The GPU variants (bf16 autocast, channels-last, torch.compile) also run on CPU: their DP rows
    are timed only after their per-example gradients were checked against eager fp32, a compiled
    model's DP row is skipped with the reason, and nothing compiles while the rows are timed."""
    from torch import nn
    from torch._dynamo.utils import counters

    from dp_diffusion.bench import _Benchmark

    compile_module = nn.Module.compile
    # Dynamo's graph capture without Inductor's code generation: the same caching, in seconds.
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compile_module(self, backend="eager"))
    compiled_while_timing = []
    time_round_robin = _Benchmark.time_round_robin

    def timed(self, prepared):
        before = counters["frames"]["total"]
        time_round_robin(self, prepared)
        compiled_while_timing.append(counters["frames"]["total"] - before)

    monkeypatch.setattr(_Benchmark, "time_round_robin", timed)
    settings = {**TINY, "noise_multiplicities": (1,), "modes": ("grouped",), "samplers": (), "repeats": 2}
    result = run_benchmark(out=tmp_path / "variants", variants=("bf16", "channels_last", "compile"), **settings)
    rows = {r["what"]: r for r in result["train"]}
    for variant in ("bf16 autocast", "channels-last"):
        assert rows[f"{NONPRIVATE} + {variant}"]["ms"] > 0
        dp = rows[f"DP grouped + {variant}"]
        assert dp["ms"] > 0 and "per-example grads vs eager fp32: rel. err." in dp["note"]
    assert rows[f"{NONPRIVATE} + torch.compile"]["ms"] > 0
    assert rows["DP grouped + torch.compile"]["ms"] is None
    assert "skipped" in rows["DP grouped + torch.compile"]["note"]
    assert "cannot see inside a torch.compile'd module" in rows["DP grouped + torch.compile"]["note"]
    assert compiled_while_timing == [0]


def test_an_interrupted_run_writes_the_rows_it_finished(monkeypatch, tmp_path, capsys):
    """Ctrl-C in the middle of a long run: the K values finished so far are written, marked as
    partial, and the command exits with 130."""
    from dp_diffusion.bench import _Benchmark

    training_rows = _Benchmark.training_rows

    def interrupted_at_second_k(self, k, modes, variants):
        if k == 2:
            raise KeyboardInterrupt
        return training_rows(self, k, modes, variants)

    monkeypatch.setattr(_Benchmark, "training_rows", interrupted_at_second_k)
    out = tmp_path / "partial"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "tiny", "--batch-size", "4", "--noise-multiplicity", "1,2", "--modes", "grouped",
              "--samplers", "ddim", "--sample-steps", "2", "--sample-batch", "4", "--repeats", "1", "--warmup", "1",
              "--device", "cpu", "--threads", "1", "--out", str(out)])
    assert exit_info.value.code == 130
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err
    saved = json.loads(out.with_suffix(".json").read_text())
    assert {r["id"] for r in saved["train"]} == {f"{NONPRIVATE} K=1", "DP grouped K=1"}
    assert all(r["ms"] > 0 for r in saved["train"])
    assert saved["sample"] == []
    assert "K in [1] of [1, 2], 0 of 1 samplers" in saved["interrupted"]
    assert "**Partial results**, interrupted (Ctrl-C)" in out.with_suffix(".md").read_text()
