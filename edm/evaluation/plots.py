"""Figures people would rather look at than read: the loss curve of a run, a score against NFE, the
scores of arms trained on paired seeds.

matplotlib draws off-screen (Agg) into PNGs written atomically; nothing here opens a window.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

from ..files import atomic_write

__all__ = ["LOSS_CURVE_NAME", "plot_loss_curve", "plot_score_vs_nfe", "plot_studies", "plot_paired_scores"]

LOSS_CURVE_NAME = "loss.png"  # beside samples-final.png in a run folder


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def plot_loss_curve(metrics_jsonl: str | Path, path: str | Path) -> Path:
    """loss (per pixel, log scale) against kimg from a run's metrics.jsonl, with lr on a second axis."""
    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    kimg = [r["kimg"] for r in records]
    few = {"marker": "o", "ms": 4} if len(records) < 10 else {}  # a line of one point draws nothing
    ax.plot(kimg, [r["loss"] for r in records], color="tab:blue", lw=1.2, **few)
    if all(r["loss"] > 0 and math.isfinite(r["loss"]) for r in records) and records:
        ax.set_yscale("log")
    ax.set_xlabel("kimg")
    ax.set_ylabel("loss per pixel", color="tab:blue")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot(kimg, [r["lr"] for r in records], color="tab:gray", lw=0.8, ls="--", **few)
    lr.set_ylabel("lr", color="tab:gray")
    ax.set_title(f"{Path(metrics_jsonl).parent.name}: {len(records)} records")
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def _draw_score_vs_nfe(ax, rows: Sequence[Mapping], score: str, series: str, styles: Mapping[str, dict]) -> None:
    """One line per value of `series` on `ax`: score against NFE (log x at 1, 2, 5, 10, ...; log y where the scores
    span > 20×)."""
    from matplotlib import ticker

    for name in dict.fromkeys(str(r[series]) for r in rows):
        points = sorted((r["nfe"], r[score]) for r in rows if str(r[series]) == name)
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, **styles[name])
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    values = [r[score] for r in rows if r[score] > 0]
    if values and max(values) > 20 * min(values):  # few-step points beside many-step ones: a log scale shows both
        ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations per image)")
    ax.set_ylabel(score)
    ax.grid(alpha=0.3, which="both")


def _styles(names: Sequence[str]) -> dict[str, dict]:
    """A colour and marker per series: the default cycle up to 10, tab20 with four markers beyond."""
    import matplotlib

    names = list(dict.fromkeys(names))
    if len(names) <= 10:
        return {name: {"marker": "o", "color": f"C{i}"} for i, name in enumerate(names)}
    colors = matplotlib.colormaps["tab20"].colors
    return {name: {"marker": "osD^"[i % 4], "color": colors[i % 20], "markersize": 4, "lw": 1.2}
            for i, name in enumerate(names)}


def plot_score_vs_nfe(
    rows: Sequence[Mapping], path: str | Path, *, score: str, series: str = "solver", title: str = ""
) -> Path:
    """score against NFE (log x; log y too where the scores span more than 20×), one line per value of `series`
    (e.g. solver), from table rows; with more than 10 lines the legend goes beside the plot."""
    return plot_studies({title: rows}, path, score=score, series=series)


def plot_studies(
    studies: Mapping[str, Sequence[Mapping]], path: str | Path, *, score: str, series: str = "solver"
) -> Path:
    """One panel per study (title -> table rows), score against NFE, the same colour per series in every panel
    and one legend: e.g. every solver on an EDM and a flow-matching model side by side."""
    plt = _figure()
    styles = _styles([str(r[series]) for rows in studies.values() for r in rows])
    many = len(styles) > 10
    fig, axes = plt.subplots(1, len(studies), figsize=(6 * len(studies) + (2 if many else 0), 4), squeeze=False,
                             sharey=False)
    for ax, (title, rows) in zip(axes[0], studies.items()):
        _draw_score_vs_nfe(ax, rows, score, series, styles)
        ax.set_title(title, fontsize=9)
    if many or len(studies) > 1:
        handles = [plt.Line2D([], [], **style) for style in styles.values()]
        fig.legend(handles, list(styles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    else:
        axes[0][0].legend()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def plot_paired_scores(
    scores: Mapping[str, Mapping[int, float]], path: str | Path, *, score: str, title: str = ""
) -> Path:
    """One column per arm (scores[arm][seed]), a dot per seed, a grey line joining each seed's dots
    across the arms (what pairing compares) and a bar at each arm's mean."""
    plt = _figure()
    arms = list(scores)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(arms), 4))
    for seed in sorted({k for per_seed in scores.values() for k in per_seed}):
        xs = [i for i, arm in enumerate(arms) if seed in scores[arm]]
        ax.plot(xs, [scores[arms[i]][seed] for i in xs], color="0.75", zorder=1)
        ax.scatter(xs, [scores[arms[i]][seed] for i in xs], zorder=2, s=18)
    for i, arm in enumerate(arms):
        values = list(scores[arm].values())
        if values:
            ax.hlines(sum(values) / len(values), i - 0.25, i + 0.25, color="black", zorder=3)
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set_xlim(-0.5, len(arms) - 0.5)
    ax.set_ylabel(f"{score} (lower is better)")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=9)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
