"""Several edm-study results side by side: one figure with a panel per study and a Markdown table of every solver
at NFE budgets.

    python scripts/compare_studies.py --study EDM=runs/study/edm --study FM=runs/study/fm --nfe 10 20 50 \\
        --figure fd_cls_solvers.png [--metric fd_cls]

Each study is TITLE=OUT, an edm-study output folder (its table.json). A table cell is the solver's score at the
point with the most NFE within the budget and above the budget before it, with that NFE in brackets; "–" where
it has none. A solver whose NFE varies per image (dpm_adaptive) gets one row per tolerance, with its mean NFE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

from edm.evaluation.plots import plot_studies


def read_study(folder: str | Path) -> list[dict]:
    """The rows of an edm-study folder's table.json (a missing or unreadable table names the folder)."""
    path = Path(folder) / "table.json"
    try:
        return json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"compare_studies.py: error: {path} is not an edm-study table ({err}); run edm-study first")


def _label(row: Mapping) -> str:
    """A row's solver, with its tolerance for an adaptive one."""
    rtol = (row.get("options") or {}).get("rtol")
    return row["solver"] if rtol is None else f"{row['solver']} (rtol {rtol:g})"


def markdown_table(studies: Mapping[str, Sequence[Mapping]], budgets: Sequence[int], metric: str) -> str:
    """| solver | TITLE, NFE ≤ budget ... |: per study and budget, the score of the point with the most NFE in
    (the budget before, budget]."""
    labels = list(dict.fromkeys(_label(r) for rows in studies.values() for r in rows))
    header = ["solver"] + [f"{title}, NFE ≤ {budget}" for title in studies for budget in budgets]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for label in labels:
        cells = [f"`{label}`"]
        for rows in studies.values():
            points = sorted((r["nfe"], r[metric]) for r in rows if _label(r) == label)
            for i, budget in enumerate(budgets):
                lower = budgets[i - 1] if i else 0
                fits = [(nfe, score) for nfe, score in points if lower < nfe <= budget]
                cells.append(f"{fits[-1][1]:.3f} ({fits[-1][0]:g})" if fits else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--study", action="append", required=True, metavar="TITLE=OUT", help="an edm-study folder")
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50], help="the table's NFE budgets")
    parser.add_argument("--metric", default="fd_cls", help="the score to compare (a column of the tables)")
    parser.add_argument("--figure", help="write the side-by-side figure (PNG) here")
    args = parser.parse_args(argv)
    studies = {}
    for item in args.study:
        title, sep, folder = item.rpartition("=")
        if not sep:
            parser.error(f"--study takes TITLE=OUT, got {item!r}")
        studies[title] = read_study(folder)
    missing = [title for title, rows in studies.items() if rows and args.metric not in rows[0]]
    if missing:
        parser.error(f"the tables of {missing} have no {args.metric!r} column")
    if args.figure:
        plot_studies(studies, args.figure, score=args.metric)
    table = markdown_table(studies, sorted(args.nfe), args.metric)
    print(table)
    return table


if __name__ == "__main__":
    sys.exit(main() and 0)
