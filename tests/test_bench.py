"""The benchmark runs end to end on a tiny setting: rows, ratios, JSON and --compare (numbers are not checked)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dp_diffusion.bench import (
    GRAD_MODES,
    NONPRIVATE,
    BenchSettingsError,
    build_module,
    compose_config,
    dp_label,
    main,
    make_batch,
    part_losses,
    row_config,
    run_benchmark,
    timed_step,
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


def _weights(module):
    return torch.cat([p.detach().flatten() for part in module.private_parts().values() for p in part.parameters()])


def _step(cfg, physical=None, k=2, mode=None, batch_size=5):
    """A row's module and its timed step, built as the benchmark builds them."""
    device = torch.device("cpu")
    module = build_module(row_config(cfg, batch_size, physical, k, mode, seed=0), device)
    batch = make_batch(cfg, batch_size, device, seed=0)
    return module, timed_step(module, batch, part_losses(module, device))


def test_chunked_nonprivate_step_takes_the_same_step(monkeypatch, one_thread):
    """The baseline accumulates over physical chunks exactly as over one batch (SGD: the update is lr * grad)."""
    monkeypatch.setattr(torch.optim, "Adam", torch.optim.SGD)
    cfg = compose_config("dpdm", "tiny")
    after = []
    for physical in (None, 2):
        module, step = _step(cfg, physical)
        start = _weights(module)
        torch.manual_seed(0)  # the same diffusion draws in prepare_batch
        step()
        after.append(_weights(module))
    moved = (after[0] - start).abs().max()
    assert moved > 1e-6  # the step did something
    torch.testing.assert_close(after[1] - start, after[0] - start, rtol=1e-4, atol=1e-4 * moved.item())


@pytest.mark.parametrize("method", ["dpdm", "dp_syngen"])
def test_rows_time_the_methods_own_private_step(method, one_thread):
    """Each row is the method's module built from conf/ (DP, or its non-private twin with the same
    weights) and its step is the module's private_step: the DP row takes a ledger step, clips and
    noises; the twin takes the plain step."""
    from dp_diffusion.methods.dp_syngen import DPSynGen
    from dp_diffusion.methods.dpdm import DPDM

    cfg = compose_config(method, "tiny")
    private, private_step = _step(cfg, mode="grouped")
    twin, twin_step = _step(cfg)
    assert type(private) is type(twin) is {"dpdm": DPDM, "dp_syngen": DPSynGen}[method]
    assert private.privacy_spec.enabled and private.privacy_spec.grad_mode == "grouped"
    assert not twin.privacy_spec.enabled and private.privacy_spec.noise_multiplicity == 2
    start = _weights(private)
    torch.testing.assert_close(_weights(twin), start, rtol=0, atol=0)
    for step in (private_step, twin_step):
        torch.manual_seed(0)
        step()
    assert private.ledger.steps_of(private.mechanism_name("model")) == 1
    assert twin.ledger.steps_of(twin.mechanism_name("model")) == 0
    assert not torch.equal(_weights(private), start) and not torch.equal(_weights(twin), start)
    assert not torch.allclose(_weights(private), _weights(twin))  # clipped and noised: another update


def test_overrides_reach_the_composed_config_and_bench_keys_are_refused(capsys):
    cfg = compose_config("dp_syngen", "tiny", ["method.module.log_tau_cleaning=null"])
    assert cfg.method.module.log_tau_cleaning is None and cfg.data.name == "mnist"
    assert cfg.privacy.noise_multiplier == 1.0 and cfg.model.nf == 16
    with pytest.raises(BenchSettingsError, match="set train.batch_size with --batch-size"):
        compose_config("dpdm", "tiny", ["train.batch_size=8"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", "--override", "no_such_group=1"])
    assert exit_info.value.code == 2
    assert "--override:" in capsys.readouterr().err


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


def test_compare_reads_results_written_before_methods_were_options():
    """benchmarks/results/*.json predate --method and --override: compared as DPDM with no overrides,
    row by row id."""
    from pathlib import Path

    from dp_diffusion.bench import compare_markdown, compare_rows

    old = json.loads((Path(__file__).parent.parent / "benchmarks" / "results" / "cpu-dpdm.json").read_text())
    assert "method" not in old["settings"]
    now = {"train": [{"id": f"{NONPRIVATE} K=1", "ms": 2 * old["train"][0]["ms"]},
                     {"id": "DP grouped K=1", "ms": None}], "sample": []}
    rows = compare_rows(now, old)
    assert rows[0]["now_over_then"] == pytest.approx(2.0) and rows[1]["now_over_then"] is None
    settings = {**old["settings"], "method": "dpdm", "overrides": []}
    text = compare_markdown({"against": "old.json", "env": old["env"], "settings": old["settings"], "rows": rows},
                            old["env"], settings)
    assert "differ in" not in text and f"| {NONPRIVATE} K=1 |" in text
    assert "differ in: method" in compare_markdown(
        {"against": "old.json", "env": old["env"], "settings": old["settings"], "rows": rows}, old["env"],
        {**settings, "method": "dp_syngen"})


def test_against_times_the_other_methods_dp_step_in_the_same_round_robin(monkeypatch, tmp_path, capsys):
    """`--method dp_sad --against dpdm`: one more row per K, DPDM's own DP step (its module, the first mode),
    timed in the same rounds; its note gives DP-SAD's DP step over it. A bad --against names the option."""
    from dp_diffusion import bench as bench_module
    from dp_diffusion.methods.dpdm import DPDM

    built = []
    original = bench_module.build_module

    def recording(cfg, device, variant=None):
        built.append(original(cfg, device, variant))
        return built[-1]

    monkeypatch.setattr(bench_module, "build_module", recording)
    settings = {**TINY, "samplers": (), "noise_multiplicities": (1,), "repeats": 2}
    result = run_benchmark(out=tmp_path / "against", method="dp_sad", against="dpdm", modes=("grouped",),
                           overrides=["method.parts.discriminator.nf=8"], **settings)
    rows = {r["what"]: r for r in result["train"]}
    assert list(rows) == [NONPRIVATE, dp_label("grouped"), "dpdm: DP grouped"]
    other = rows["dpdm: DP grouped"]
    assert len(other["times_ms"]) == 2 and other["ms"] > 0
    assert other["vs_method"] == pytest.approx(rows[dp_label("grouped")]["ms"] / other["ms"])
    assert f"dp_sad DP grouped / this: {other['vs_method']:.2f}x" in other["note"]
    dpdm_rows = [m for m in built if type(m) is DPDM]
    assert len(dpdm_rows) == 1 and dpdm_rows[0].privacy_spec.grad_mode == "grouped"
    assert dpdm_rows[0].ledger.steps_of(dpdm_rows[0].mechanism_name("model")) >= 3  # warm-up + timed calls
    assert result["settings"]["against"] == "dpdm"
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--method", "dpdm", "--against", "dpdm"])
    assert "--against must be another method" in capsys.readouterr().err
