"""`dp-diffusion report`: tables per data set (mean ± std over seeds, backbone-named columns, the
not-a-guarantee mark), plots with the expected series, the sample mosaic, published numbers only where
the setting matches, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from dp_diffusion.cli import main as cli
from dp_diffusion.report import EPSILON_IS_GUARANTEE, load_records, write_report
from dp_diffusion.report.plots import frontier_figure, frontier_series, mosaic_cells
from dp_diffusion.report.published import PUBLISHED_FILE, compare, load_published
from dp_diffusion.report.build import with_kept_grid
from dp_diffusion.report.records import grid_path, setting, settings
from dp_diffusion.report.tables import group_runs

FID = "domain-cnn[mnist5k-train]"


def make_record(root: Path, method: str, eps: float | None, seed: int, fid: float, acc: float,
                data: str = "mnist5k", overrides: tuple[str, ...] = (), guarantee: bool = True,
                grid_colour: tuple[int, int, int] | None = (200, 200, 200)) -> dict:
    """A results record as `train` writes it, with its run dir and (optionally) its sample grid."""
    out = root / f"{method}-{data}-{eps}-{seed}-{len(overrides)}"
    out.mkdir(parents=True)
    if grid_colour is not None:
        Image.new("RGB", (30, 30), grid_colour).save(out / "samples_grid.png")
    privacy = {"private": eps is not None, "epsilon": eps, "target_epsilon": eps, "delta": 1e-5 if eps else None,
               "steps": 100 if eps else None, "planned_steps": 100, "dataset_size": 4000,
               "seeds_secret": eps is not None,
               "covers": {"released": ["student"], "trained_with_dp": ["student"],
                          "saw_private_data_without_dp": [], "never_saw_private_data": []}}
    if not guarantee:
        privacy[EPSILON_IS_GUARANTEE] = False
        privacy["epsilon_note"] = "DP-SAD paper variant: teacher and discriminator without DP"
    return {"kind": "train", "method": method, "data": data, "target_epsilon": eps, "epsilon": eps, "seed": seed,
            "overrides": [f"seed={seed}", f"method={method}", *overrides], "output_dir": str(out),
            "privacy": privacy, "samples": {"grid": str(out / "samples_grid.png")}, "wall_time_s": 60.0 + seed,
            "metrics": {"fid": {"value": fid, "backbone": FID if data == "mnist5k" else "domain-cnn[digits-train]",
                                "num_samples": 10},
                        "acc_cnn": {"value": acc, "selected_on": "synthetic validation split", "num_samples": 10}}}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    rows = [make_record(runs, "dpdm", 1.0, 0, 150.0, 0.40), make_record(runs, "dpdm", 1.0, 1, 170.0, 0.50),
            make_record(runs, "dpdm", 10.0, 0, 90.0, 0.70), make_record(runs, "dpdm", 10.0, 1, 110.0, 0.80),
            make_record(runs, "dpdm", None, 0, 10.0, 0.95),
            make_record(runs, "dp_sad", 10.0, 0, 60.0, 0.85, overrides=("method.variant=paper",), guarantee=False),
            make_record(runs, "dp_sad", 10.0, 1, 70.0, 0.87, overrides=("method.variant=paper",), guarantee=False),
            make_record(runs, "dpdm", 10.0, 0, 300.0, 0.30, data="digits", grid_colour=None),
            {"kind": "evaluate", "metrics": {}}]
    path = runs / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def section(text: str, data: str) -> str:
    return text.split(f"## {data}\n", 1)[1].split("\n## ", 1)[0].lstrip("\n")


def test_tables_per_data_set_pool_seeds_and_mark_non_guarantees(results, tmp_path):
    out = tmp_path / "report"
    text = write_report(load_records([results]), out).read_text()
    mnist = section(text, "mnist5k")
    header = mnist.splitlines()[0]
    assert f"fid [{FID}]" in header and "acc_cnn" in header
    assert "| dpdm | default | 1 | 2 | 100 | 60.5 ± 0.71 | 160 ± 14 | 0.45 ± 0.071 |" in mnist
    assert "| dpdm | default | 10 | 2 | 100 | 60.5 ± 0.71 | 100 ± 14 | 0.75 ± 0.071 |" in mnist
    assert "| dpdm | default | none (no DP) | 1 | 100 | 60 | 10 | 0.95 |" in mnist
    # the paper variant: marked, not pooled with anything, its reason under the table
    assert "| dp_sad | method.variant=paper | 10 † | 2 | 100 | 60.5 ± 0.71 | 65 ± 7.1 | 0.86 ± 0.014 |" in mnist
    assert "† dp_sad (method.variant=paper) at epsilon=10: DP-SAD paper variant" in mnist
    assert "| dpdm | default | 1 †" not in mnist and "| dpdm | default | 10 †" not in mnist
    digits = section(text, "digits")
    assert "fid [domain-cnn[digits-train]]" in digits.splitlines()[0] and FID not in digits.splitlines()[0]
    assert "| dpdm | default | 10 | 1 | 100 | 60 | 300 | 0.3 |" in digits


def test_plots_are_pngs_with_one_line_per_method(results, tmp_path):
    out = tmp_path / "report"
    text = write_report(load_records([results]), out).read_text()
    for name in ("fid_vs_epsilon_mnist5k.png", "accuracy_vs_epsilon_mnist5k.png", "samples_mnist5k.png",
                 "fid_vs_epsilon_digits.png"):
        assert f"]({name})" in text
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    groups, _ = group_runs([r for r in load_records([results]) if r["data"] == "mnist5k"])
    lines, baselines = frontier_series(groups, f"fid [{FID}]")
    std = pytest.approx(14.142, abs=1e-3)
    assert lines == {"dpdm": [(1.0, 160.0, std), (10.0, 100.0, std)],
                     "dp_sad (method.variant=paper) †": [(10.0, 65.0, pytest.approx(7.071, abs=1e-3))]}
    assert list(baselines) == ["dpdm, no DP"] and baselines["dpdm, no DP"][1:] == (10.0, 0.0)
    ax = frontier_figure({"fid": (lines, baselines)}, "FID", "t").axes[0]
    assert ax.get_xscale() == "log"
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == [
        "dp_sad (method.variant=paper) †", "dpdm", "dpdm, no DP"]
    assert len(ax.containers) == 2  # error bars for both methods
    # the non-private runs' reference line is drawn in the colour of their setting's line
    line_colour = next(c for c in ax.containers if c.get_label() == "dpdm").lines[0].get_color()
    reference = next(h for h in ax.get_lines() if h.get_label() == "dpdm, no DP")
    assert reference.get_linestyle() == "--" and reference.get_color() == line_colour


def test_mosaic_is_method_by_epsilon_from_the_runs_grids(results, tmp_path):
    groups, _ = group_runs([r for r in load_records([results]) if r["data"] == "mnist5k"])
    rows, columns, cells = mosaic_cells(groups)
    assert rows == ["dp_sad (method.variant=paper) †", "dpdm"]  # by method name
    assert columns == [1.0, 10.0, None]
    assert len(cells) == 4 and all(p.name == "samples_grid.png" and p.is_file() for p in cells.values())
    assert "-0-" in cells[("dpdm", 10.0)].parent.name  # the lowest seed's grid
    text = write_report(load_records([results]), tmp_path / "r").read_text()
    assert "No sample grids found" in section(text, "digits")  # the digits run wrote none


def test_published_numbers_only_where_method_data_and_epsilon_match(results, tmp_path):
    text = write_report(load_records([results]), tmp_path / "r").read_text()
    mnist = section(text, "mnist5k").split("### Published numbers", 1)[1]
    table = [line for line in mnist.splitlines() if line.startswith("| dpdm") or line.startswith("| dp_sad")]
    # DPDM Table 1 at epsilon 1 and 10 (two churn tunings), fid and acc_cnn each; DPImageBench's DPDM fid at 10;
    # DP-SAD's accuracy at 10. Nothing at 0.2 (no run), nothing for the non-private run.
    assert len([row for row in table if row.startswith("| dpdm |")]) == 2 * 2 * 2 + 1
    assert not any("| 0.2 |" in row or "| none" in row for row in table)
    fid_row = next(row for row in table if "| 10 | fid | 100 ± 14 | 5.01 |" in row)
    assert f"backbone: ours {FID}, theirs inception-v3-compat" in fid_row
    assert "data: ours mnist5k N=4000, theirs mnist N=60000" in fid_row and "Table 1" in fid_row
    acc_row = next(row for row in table if "| 1 | acc_cnn | 0.45 ± 0.071 | 0.934 |" in row)
    assert "classifier" not in acc_row  # same classifiers; the data size still differs
    sad = next(row for row in table if row.startswith("| dp_sad"))
    assert "| 10 † | acc_cnn | 0.86 ± 0.014 | 0.976 |" in sad
    assert "classifier: ours dpdm-classifiers, theirs unknown" in sad
    assert "third-party, unverified" in sad
    assert "No published number matches" in section(text, "digits")


def test_published_comparison_says_when_our_run_pretrained_on_public_data(tmp_path):
    """A warm-started DPDM run (its privacy report lists a public stage) beside DPDM's paper rows (from scratch):
    each row names the difference; a run whose config names a public set it never used (public=auto resolved,
    nothing pretrained) is not marked."""
    warm = make_record(tmp_path, "dpdm", 10.0, 0, 50.0, 0.83)
    warm["privacy"]["covers"]["never_saw_private_data"] = ["the warm start: the denoiser pretrained on public digits"]
    warm["config"] = {"public": {"name": "digits"}}
    unused = make_record(tmp_path, "dpdm", 1.0, 0, 300.0, 0.6)
    unused["config"] = {"public": {"name": "digits"}}
    groups, _ = group_runs([warm, unused])
    rows = compare(groups, load_published(PUBLISHED_FILE))
    at_10 = [r for r in rows if r.group.epsilon == 10.0 and r.entry["method"] == "dpdm"]
    at_1 = [r for r in rows if r.group.epsilon == 1.0]
    assert at_10 and all("public pretraining: ours digits, theirs none" in r.differences for r in at_10)
    assert at_1 and not any("public pretraining" in d for r in at_1 for d in r.differences)


def test_published_file_parses_and_every_number_has_a_source(tmp_path):
    entries = load_published(PUBLISHED_FILE)
    assert len(entries) >= 10
    for entry in entries:
        assert entry["source"].strip() and entry["label"] in ("paper", "3rd")
        values = entry["metrics"].values()
        assert values and all(isinstance(v, (int, float)) and not math.isnan(v) for v in values)
        assert all(0 <= v <= 1 for k, v in entry["metrics"].items() if k.startswith("acc_"))
    broken = tmp_path / "p.yaml"
    broken.write_text("- {method: dpdm, data: mnist, train_size: 1, epsilon: 1, metrics: {fid: 1}, label: paper}\n")
    from dp_diffusion.config import ConfigError

    with pytest.raises(ConfigError, match="entry 1 lacks source"):
        load_published(broken)


def test_run_dirs_are_read_once_each(results, tmp_path):
    """The shared results file and each run dir's own copy name the same runs: none is counted twice."""
    records = load_records([results])
    for record in records:
        (Path(record["output_dir"]) / "results.jsonl").write_text(json.dumps(record) + "\n")
    assert len(load_records([results.parent])) == len(records) == 8
    assert len(compare(group_runs(records)[0], load_published())) > 0


def test_runs_of_one_resolved_config_are_one_setting(tmp_path):
    """The same config started by the frontier script (`+frontier=<entry>`) and by hand (`public=font_digits`)
    is one line, named by the frontier entry; a run with the hand run's overrides but another config stays
    apart, and a record without a config still pools by its overrides."""
    runs = tmp_path / "runs"
    config = {"method": {"name": "dpdm"}, "public": {"name": "font_digits"}, "privacy": {"epsilon": 1.0},
              "seed": 0, "output_dir": "a", "frontier": "dpdm_warm_font"}
    by_frontier = make_record(runs, "dpdm", 1.0, 0, 160.0, 0.6,
                              overrides=("public=font_digits", "+frontier=dpdm_warm_font"))
    by_hand = make_record(runs, "dpdm", 10.0, 0, 30.0, 0.8, overrides=("public=font_digits",))
    by_frontier["config"] = config
    by_hand["config"] = {**config, "privacy": {"epsilon": 10.0}, "seed": 1, "output_dir": "b", "frontier": None}
    other = make_record(runs, "dpdm", 10.0, 1, 50.0, 0.7, overrides=("public=digits",))
    other["config"] = {**config, "public": {"name": "digits"}}
    old = make_record(runs, "dpdm", 1.0, 0, 350.0, 0.66, overrides=("public=digits",))  # no config kept
    # by_hand's overrides, another config (e.g. a default changed since): the label does not pool it with by_hand
    twin = make_record(runs, "dpdm", 10.0, 2, 40.0, 0.75, overrides=("public=font_digits",))
    twin["config"] = {**by_hand["config"], "method": {"name": "dpdm", "warm_start": {"steps": 1500}}}
    # the frontier entry's recipe without privacy, started by hand: its ceiling, on its line
    ceiling = make_record(runs, "dpdm", None, 3, 7.0, 0.86, overrides=("privacy=none",))
    ceiling["config"] = {**config, "privacy": {"enabled": False, "epsilon": float("inf")}, "frontier": None}
    groups, _ = group_runs([by_frontier, by_hand, other, old, twin, ceiling])
    assert [(g.epsilon, g.setting, len(g.runs)) for g in groups] == [
        (1.0, "+frontier=dpdm_warm_font public=font_digits", 1), (1.0, "public=digits", 1),
        (10.0, "+frontier=dpdm_warm_font public=font_digits", 1), (10.0, "public=digits", 1),
        (10.0, "public=font_digits", 1), (None, "+frontier=dpdm_warm_font public=font_digits", 1)]
    lines, _ = frontier_series(groups, f"fid [{FID}]")
    assert [point[:2] for point in lines["dpdm (+frontier=dpdm_warm_font public=font_digits)"]] == [
        (1.0, 160.0), (10.0, 30.0)]
    assert [point[:2] for point in lines["dpdm (public=digits)"]] == [(1.0, 350.0), (10.0, 50.0)]


def test_settings_with_one_label_but_other_configs_are_told_apart(tmp_path):
    """`dp-diffusion train` before and after a default changed: both runs are labelled `default`; the report
    names each by the keys that differ instead of pooling them as seeds. The same recipe without privacy keeps
    the recipe's label (its privacy block differs only in saying `privacy=none`), and two private runs that
    differ only in the privacy block are told apart by it."""
    runs = tmp_path / "runs"
    private = {"enabled": True, "delta": 1e-5, "max_grad_norm": 1.0}
    config = {"method": {"name": "dpdm", "warm_start": {"steps": 600}}, "public": {"name": "digits"},
              "privacy": private}
    before = make_record(runs, "dpdm", 10.0, 0, 50.0, 0.82)
    before["config"] = config
    after = make_record(runs, "dpdm", 10.0, 1, 27.0, 0.85)
    after["config"] = {**config, "method": {"name": "dpdm", "warm_start": {"steps": 1500}},
                       "public": {"name": "font_digits"}}
    ceiling = make_record(runs, "dpdm", 10.0, 2, 7.0, 0.86)
    ceiling.update(target_epsilon=None, epsilon=None)
    ceiling["config"] = {**after["config"], "privacy": {"enabled": False, "delta": 0.0, "max_grad_norm": "inf"}}
    other_delta = make_record(runs, "dpdm", 10.0, 3, 28.0, 0.84)
    other_delta["config"] = {**after["config"], "privacy": {**private, "delta": 1e-6}}
    records = [before, after, ceiling, other_delta]
    assert [setting(r) for r in records] == ["default"] * 4
    assert settings(records) == [
        "default (method.warm_start.steps=600, public.name=digits)",
        "default (method.warm_start.steps=1500, public.name=font_digits) (privacy.delta=1e-05)",
        "default (method.warm_start.steps=1500, public.name=font_digits)",
        "default (method.warm_start.steps=1500, public.name=font_digits) (privacy.delta=1e-06)"]
    groups, _ = group_runs(records)
    assert sorted(len(g.runs) for g in groups) == [1, 1, 1, 1]
    # a run from before `warm_start` was a key (its config lacks it) is no other setting for lacking it
    legacy = make_record(runs, "dpdm", 10.0, 4, 26.0, 0.83)
    legacy["config"] = {**after["config"], "method": {"name": "dpdm"}}
    labels = settings([*records, legacy])
    assert labels[1] == labels[4] == "default (public.name=font_digits) (privacy.delta=1e-05)"
    assert labels[0] == "default (public.name=digits)"
    groups, _ = group_runs([*records, legacy])
    assert sorted(len(g.runs) for g in groups) == [1, 1, 1, 2]
    # under a frontier entry's label the runs stay one setting: the script pins what matters when a default
    # changes, and a changed default it leaves unpinned does not act on the entry (`public=none` ignores
    # the warm start's steps)
    scratch = []
    for seed, steps in ((5, 600), (6, 1500)):
        record = make_record(runs, "dpdm", 10.0, seed, 170.0, 0.7, overrides=("public=none", "+frontier=dpdm_scratch"))
        record["config"] = {**config, "method": {"name": "dpdm", "warm_start": {"steps": steps}},
                            "public": {"name": "none"}}
        scratch.append(record)
    assert settings(scratch) == ["+frontier=dpdm_scratch public=none"] * 2
    assert [len(g.runs) for g in group_runs(scratch)[0]] == [2]


def test_relative_grid_paths_resolve_from_the_results_file(tmp_path, monkeypatch):
    """`train` run from the repository root records runs/...; the report may run anywhere else."""
    repo = tmp_path / "repo"
    record = make_record(repo / "runs", "dpdm", 1.0, 0, 1.0, 0.5)
    relative = Path(record["output_dir"]).relative_to(repo)
    record.update(output_dir=str(relative), samples={"grid": str(relative / "samples_grid.png")})
    (repo / "runs" / "results.jsonl").write_text(json.dumps(record) + "\n")
    monkeypatch.chdir(tmp_path)
    groups, _ = group_runs(load_records([repo / "runs" / "results.jsonl"]))
    assert list(mosaic_cells(groups)[2].values()) == [(repo / relative / "samples_grid.png").resolve()]


def test_the_report_keeps_the_grids_so_it_regenerates_without_the_run_dirs(results, tmp_path):
    """A report copies each run's grid into its folder; regenerated after the run dirs are gone (a fresh
    clone, a cleaned runs/), its mosaic still holds every cell."""
    out = tmp_path / "report"
    records = load_records([results])
    write_report(records, out)
    kept = sorted((out / "grids").iterdir())
    assert len(kept) == sum(grid_path(r) is not None for r in records) > 0
    for record in records:
        shutil.rmtree(record["output_dir"], ignore_errors=True)
    assert all(grid_path(r) is None for r in records)
    text = write_report(load_records([results]), out).read_text()
    assert "No sample grids found" not in section(text, "mnist5k")
    groups, _ = group_runs([with_kept_grid(r, out / "grids") for r in load_records([results])
                            if r["data"] == "mnist5k"])
    assert len(mosaic_cells(groups)[2]) == 4 and sorted((out / "grids").iterdir()) == kept


def test_cli_writes_the_folder(results, tmp_path, capsys):
    out = tmp_path / "folder"
    cli(["report", str(results), "--out", str(out)])
    assert f"report: {out / 'RESULTS.md'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["RESULTS.md", "fid_vs_epsilon_mnist5k.png", "accuracy_vs_epsilon_mnist5k.png", "samples_mnist5k.png",
         "fid_vs_epsilon_digits.png", "accuracy_vs_epsilon_digits.png", "grids"])


@pytest.mark.parametrize("content, expected", [
    (None, "no results file or run dir at"),
    ("", "no training records in"),
    ('{"kind": "evaluate"}\n', "no training records in"),
    ("not json\n", "is not a JSON results record"),
])
def test_bad_input_is_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / "results.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        cli(["report", str(path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and expected in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
