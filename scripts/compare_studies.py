"""Several edm-study results side by side: one figure with a panel per study and a Markdown table of every solver
at NFE budgets.

    python scripts/compare_studies.py --study EDM=runs/study/edm --study FM=runs/study/fm --nfe 10 20 50 \\
        --figure fd_cls_solvers.png [--metric fd_cls]

Each study is TITLE=OUT, an edm-study output folder (its table.json). A table cell is the solver's score at the
point with the most NFE within the budget and above the budget before it, with that NFE in brackets; "–" where
it has none. A solver whose NFE varies per image (dpm_adaptive) gets one row per tolerance, with its mean NFE.
A study of several schedules (edm-study schedules=[...]) or with a teacher gets a row (and a curve) per schedule and
model, as edm-study's own figure has. Studies scored on other terms (another number of images, data set or metric
setting, as their provenance.json records them) are warned of, naming each one's value.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

from edm.cli import user_errors
from edm.evaluation.plots import plot_studies


def read_study(folder: str | Path) -> list[dict]:
    """The rows of an edm-study folder's table.json (a missing or unreadable table, or one whose rows are not
    edm-study's points, as side_by_side.py's table.json, names the folder)."""
    path = Path(folder) / "table.json"
    try:
        rows = json.loads(path.read_text())["rows"]
        if not all(isinstance(row, dict) and {"solver", "nfe"} <= row.keys() for row in rows):
            raise ValueError("its rows are not solver points with an nfe")
        return rows
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"compare_studies.py: error: {path} is not an edm-study table ({err}); run edm-study first")


SCORED_ON = ("num_images", "dataset", "dataset_contents", "metrics")  # what a score depends on besides the model
UNSCORED = ("cache_dir", "allow_pickle")  # a metric's settings that change no score: where it caches, what it may load


def scored_on(folder: str | Path) -> dict:
    """What an edm-study folder's scores were measured on (its provenance.json's SCORED_ON entries, each metric's
    settings apart, as "metrics.NAME", without UNSCORED: a metric only one study scored, or a cache elsewhere, is
    no difference in the others); {} where it has no readable record."""
    try:
        record = json.loads((Path(folder) / "provenance.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    found = {key: record[key] for key in SCORED_ON if key != "metrics" and key in record}
    metrics = record.get("metrics")
    for name, settings in (metrics if isinstance(metrics, dict) else {}).items():
        found[f"metrics.{name}"] = ({key: value for key, value in settings.items() if key not in UNSCORED}
                                    if isinstance(settings, dict) else settings)
    return found


def scoring_differences(records: Mapping[str, Mapping]) -> list[str]:
    """'KEY: TITLE=VALUE, ...' for each entry (scored_on's) in which the studies that record it differ: their scores
    are not comparable (FD_cls and FID are biased by the number of images, and depend on the data and the metric's
    settings)."""
    lines = []
    for key in dict.fromkeys(key for record in records.values() for key in record):
        values = {title: record[key] for title, record in records.items() if key in record}
        if len({json.dumps(value, sort_keys=True) for value in values.values()}) > 1:
            lines.append(f"{key}: " + ", ".join(f"{title}={json.dumps(value, sort_keys=True)}" for title, value in values.items()))
    return lines


def labelled(studies: Mapping[str, Sequence[Mapping]]) -> dict[str, list[dict]]:
    """The rows with their `label`: the solver (with its tolerance for an adaptive one), after the model where a
    study has a teacher and the schedule where one study has several, so that no two curves of a study share one."""
    several = any(len({r.get("schedule") for r in rows}) > 1 for rows in studies.values())
    out = {}
    for title, rows in studies.items():
        out[title] = []
        for row in rows:
            rtol = (row.get("options") or {}).get("rtol")
            parts = ([row["model"]] if row.get("model", "model") != "model" else []) + (
                [str(row.get("schedule"))] if several else []) + [row["solver"]]
            label = " ".join(parts) + ("" if rtol is None else f" (rtol {rtol:g})")
            out[title].append({**row, "label": label})
    return out


def markdown_table(studies: Mapping[str, Sequence[Mapping]], budgets: Sequence[int], metric: str) -> str:
    """| solver | TITLE, NFE ≤ budget ... |: per study and budget, the score of the point with the most NFE in
    (the budget before, budget]; rows as `labelled` names them."""
    labels = list(dict.fromkeys(r["label"] for rows in studies.values() for r in rows))
    header = ["solver"] + [f"{title}, NFE ≤ {budget}" for title in studies for budget in budgets]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for label in labels:
        cells = [f"`{label}`"]
        for rows in studies.values():
            points = sorted((r["nfe"], r[metric]) for r in rows if r["label"] == label)
            for i, budget in enumerate(budgets):
                lower = budgets[i - 1] if i else 0
                fits = [(nfe, score) for nfe, score in points if lower < nfe <= budget]
                cells.append(f"{fits[-1][1]:.3f} ({fits[-1][0]:g})" if fits else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", action="append", required=True, metavar="TITLE=OUT", help="an edm-study folder")
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50], help="the table's NFE budgets (default: 10 20 50)")
    parser.add_argument("--metric", default="fd_cls", help="the score to compare (a column of the tables)")
    parser.add_argument("--figure", help="write the side-by-side figure (PNG) here")
    args = parser.parse_args(argv)
    if min(args.nfe) < 1 or len(set(args.nfe)) < len(args.nfe):
        parser.error(f"--nfe {' '.join(map(str, args.nfe))}: give distinct budgets of 1 or more evaluations")
    studies, records = {}, {}
    for item in args.study:
        title, sep, folder = item.partition("=")  # the title first: a folder may hold "=" (runs/lr=0.1)
        if not sep or not title or not folder:
            parser.error(f"--study takes TITLE=OUT, got {item!r}")
        if title in studies:
            parser.error(f"two studies are titled {title!r}: give each its own TITLE")
        studies[title] = read_study(folder)
        records[title] = scored_on(folder)
    for line in scoring_differences(records):
        print(f"compare_studies.py: warning: the studies are scored on other terms, so their scores do not compare: "
              f"{line}", file=sys.stderr)
    missing = [title for title, rows in studies.items() if any(args.metric not in row for row in rows)]
    if missing:
        parser.error(f"the tables of {missing} have no {args.metric!r} column in every row (edm-study eval.metrics)")
    studies = labelled(studies)
    if args.figure:
        with user_errors("compare_studies.py"):  # a folder, or a place that cannot be written: one line
            plot_studies(studies, args.figure, score=args.metric, series="label")
    table = markdown_table(studies, sorted(args.nfe), args.metric)
    print(table)
    return table


if __name__ == "__main__":
    sys.exit(main() and 0)
