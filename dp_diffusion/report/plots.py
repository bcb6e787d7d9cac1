"""Report figures (matplotlib, Agg backend: no display needed): quality against epsilon, one line per
method with error bars over seeds on a log-scale epsilon axis, and the mosaic of sample grids."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from dp_diffusion.report.records import grid_path  # noqa: E402
from dp_diffusion.report.tables import Group, frontier_order  # noqa: E402

NO_DP = ", no DP"  # the legend label of a setting's non-private runs: "<setting>, no DP"
Point = tuple[float, float, float]  # epsilon, mean, std over seeds
Series = dict[str, list[Point]]  # line label -> points by rising epsilon


def frontier_series(groups: Sequence[Group], column: str) -> tuple[Series, dict[str, Point]]:
    """The points of one metric column: per line (method and setting), (epsilon, mean, std) by rising
    epsilon; and the non-private runs as (nan, mean, std) per line, drawn as horizontal references."""
    lines: Series = {}
    baselines: dict[str, Point] = {}
    for group in sorted(groups, key=frontier_order):
        stats = group.stats(column)
        if stats is None:
            continue
        if group.epsilon is None:
            baselines[f"{group.label}{NO_DP}"] = (math.nan, *stats)
        else:
            lines.setdefault(group.label, []).append((group.epsilon, *stats))
    return lines, baselines


def frontier_figure(panels: Mapping[str, tuple[Series, dict[str, Point]]], ylabel: str, title: str) -> Figure:
    """One panel per metric column: a line with error bars per method against epsilon (log scale), the
    non-private runs as dashed horizontal lines."""
    # The legend goes under the axes (many settings would cover the lines), the figure as tall as it needs.
    legend_lines = max((sum(textwrap.fill(label, 60).count("\n") + 1.3 for label in [*lines, *baselines])
                        for lines, baselines in panels.values()), default=0)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2 + 0.13 * legend_lines), squeeze=False)
    for ax, (name, (lines, baselines)) in zip(axes[0], panels.items()):
        colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
        line_colours = {label: next(colours) for label in lines}
        for label, points in lines.items():
            eps, mean, std = zip(*points)
            ax.errorbar(eps, mean, yerr=std, label=textwrap.fill(label, 60), marker="o", capsize=3,
                        color=line_colours[label], linestyle=":" if label.endswith("†") else "-")
        for label, (_, mean, std) in baselines.items():
            # a setting's run without privacy in its line's colour (its ceiling)
            colour = line_colours.get(label.removesuffix(NO_DP)) or next(colours)
            ax.axhline(mean, linestyle="--", color=colour, label=textwrap.fill(label, 60))
            if std > 0:
                ax.axhspan(mean - std, mean + std, color=colour, alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    return titled(fig, title)


def titled(fig: Figure, title: str) -> Figure:
    """`fig` laid out under `title`, in a band of its own above the axes' titles."""
    title = textwrap.fill(title, 70)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.25 + 0.2 * title.count("\n")) / fig.get_figheight()))
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mosaic_cells(groups: Sequence[Group]) -> tuple[list[str], list[float | None], dict[tuple[str, float | None], Path]]:
    """Rows (method and setting), columns (epsilon; None = no DP, last) and the grid PNG of each cell
    (the lowest seed's that has one)."""
    rows, columns, cells = [], [], {}
    for group in sorted(groups, key=frontier_order):
        runs = sorted(group.runs, key=lambda r: (r.get("seed") is None, r.get("seed") or 0))
        grid = next((p for p in map(grid_path, runs) if p is not None), None)
        if grid is None:
            continue
        if group.label not in rows:
            rows.append(group.label)
        if group.epsilon not in columns:
            columns.append(group.epsilon)
        cells[(group.label, group.epsilon)] = grid
    columns.sort(key=lambda e: math.inf if e is None else e)
    return rows, columns, cells


def mosaic_figure(groups: Sequence[Group], title: str) -> Figure | None:
    """The sample grids side by side, method x epsilon; None when no run has a grid."""
    rows, columns, cells = mosaic_cells(groups)
    if not cells:
        return None
    fig, axes = plt.subplots(len(rows), len(columns), squeeze=False,
                             figsize=(max(2.6 * len(columns) + 1.5, 6.0), 2.6 * len(rows) + 0.8))
    for i, row in enumerate(rows):
        for j, eps in enumerate(columns):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            grid = cells.get((row, eps))
            if grid is None:
                ax.text(0.5, 0.5, "no run", ha="center", va="center", fontsize=8, color="grey")
            else:
                with Image.open(grid) as image:
                    ax.imshow(image.convert("RGB"))
            if i == 0:
                ax.set_title("no DP" if eps is None else f"epsilon = {eps:g}", fontsize=9)
            if j == 0:
                ax.set_ylabel(textwrap.fill(row, 28), fontsize=7)
    return titled(fig, title)
