"""scripts/compare_studies.py and edm.evaluation.plots.plot_studies: several edm-study tables side by side."""

from __future__ import annotations

import json

import pytest

from conftest import load_script


def _study(folder, rows):
    folder.mkdir()
    (folder / "table.json").write_text(json.dumps({"rows": rows}))
    return folder


def _row(solver, nfe, score, **options):
    return {"solver": solver, "nfe": nfe, "fd_cls": score, **({"options": options} if options else {})}


def test_the_table_puts_each_point_under_the_budget_it_fits_and_the_figure_has_a_panel_per_study(tmp_path):
    """A cell is the point with the most NFE in (the budget before, budget]; adaptive points get a row per tolerance;
    with 17 solvers and two studies the figure is one PNG with the legend beside it."""
    compare = load_script("compare_studies")
    edm = _study(tmp_path / "edm", [_row("heun", 9, 30.0), _row("heun", 19, 12.0), _row("heun", 49, 4.0),
                                    _row("euler", 10, 40.0), _row("dpm_adaptive", 31.5, 5.5, rtol=0.05)])
    fm = _study(tmp_path / "fm", [_row("heun", 9, 20.0), _row("euler", 10, 25.0), _row("euler", 20, 11.0)]
                + [_row(f"solver{i}", 10, float(i)) for i in range(15)])
    figure = tmp_path / "both.png"
    table = compare.main(["--study", f"EDM={edm}", "--study", f"FM={fm}", "--nfe", "10", "20", "50",
                          "--figure", str(figure)])
    lines = table.splitlines()
    assert lines[0] == "| solver | EDM, NFE ≤ 10 | EDM, NFE ≤ 20 | EDM, NFE ≤ 50 | FM, NFE ≤ 10 | FM, NFE ≤ 20 | FM, NFE ≤ 50 |"
    assert "| `heun` | 30.000 (9) | 12.000 (19) | 4.000 (49) | 20.000 (9) | – | – |" in lines
    assert "| `euler` | 40.000 (10) | – | – | 25.000 (10) | 11.000 (20) | – |" in lines
    assert "| `dpm_adaptive (rtol 0.05)` | – | – | 5.500 (31.5) | – | – | – |" in lines
    from PIL import Image

    assert Image.open(figure).format == "PNG" and Image.open(figure).size[0] > Image.open(figure).size[1] * 2


def test_a_folder_without_a_table_or_metric_is_named(tmp_path):
    compare = load_script("compare_studies")
    with pytest.raises(SystemExit, match="is not an edm-study table"):
        compare.main(["--study", f"A={tmp_path}"])
    folder = _study(tmp_path / "a", [_row("heun", 9, 1.0)])
    with pytest.raises(SystemExit):
        compare.main(["--study", f"A={folder}", "--metric", "fid"])


def test_the_schedules_and_the_teacher_of_one_study_get_their_own_rows(tmp_path):
    """A study of two schedules (or a model and its teacher) holds a heun row of each: neither replaces the other."""
    compare = load_script("compare_studies")
    rows = [_row("heun", 9, 5.0) | {"model": "model", "schedule": "edm"},
            _row("heun", 9, 50.0) | {"model": "model", "schedule": "vp"},
            _row("heun", 9, 3.0) | {"model": "teacher", "schedule": "edm"}]
    folder = _study(tmp_path / "lr=0.1", rows)  # a folder whose name holds "="
    table = compare.main(["--study", f"A={folder}", "--nfe", "10", "--figure", str(tmp_path / "a.png")]).splitlines()
    assert {"| `edm heun` | 5.000 (9) |", "| `vp heun` | 50.000 (9) |", "| `teacher edm heun` | 3.000 (9) |"} <= set(table)
    one = _study(tmp_path / "one", rows[:1])  # one schedule: rows by solver, as studies of different schedules align
    assert "| `heun` | 5.000 (9) |" in compare.main(["--study", f"A={one}", "--nfe", "10"]).splitlines()


def test_a_repeated_title_and_a_metric_missing_from_a_later_row_are_refused(tmp_path, capsys):
    compare = load_script("compare_studies")
    a = _study(tmp_path / "a", [_row("heun", 9, 1.0), {"solver": "euler", "nfe": 10}])
    b = _study(tmp_path / "b", [_row("heun", 9, 2.0)])
    for argv, message in ((["--study", f"A={a}"], "have no 'fd_cls' column in every row"),
                          (["--study", f"A={b}", "--study", f"A={b}"], "two studies are titled 'A'")):
        with pytest.raises(SystemExit):
            compare.main(argv)
        assert message in capsys.readouterr().err


def test_a_side_by_side_table_is_named_as_no_study_and_bad_budgets_or_figure_end_in_one_line(tmp_path, capsys):
    """side_by_side.py's table.json also has rows (of arms, without solver and nfe); duplicated or non-positive
    budgets would print an empty column; a figure path that is a folder cannot be written."""
    compare = load_script("compare_studies")
    arms = _study(tmp_path / "sbs", [{"arm": "ours", "kind": "edm-train", "scores": {"0": 4.2}}])
    with pytest.raises(SystemExit, match=r"table.json is not an edm-study table \(its rows are not solver points"):
        compare.main(["--study", f"A={arms}"])
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "table.json").write_text("[1, 2]")  # JSON, but no table
    with pytest.raises(SystemExit, match="is not an edm-study table"):
        compare.main(["--study", f"A={tmp_path / 'list'}"])
    study = _study(tmp_path / "a", [_row("heun", 9, 1.0)])
    for argv, message in ((["--nfe", "10", "10"], "--nfe 10 10: give distinct budgets of 1 or more"),
                          (["--nfe", "0", "10"], "--nfe 0 10: give distinct budgets"),
                          (["--figure", str(tmp_path)], "compare_studies.py: error: cannot write")):
        with pytest.raises(SystemExit):
            compare.main(["--study", f"A={study}", *argv])
        assert message in capsys.readouterr().err


def test_studies_scored_on_other_numbers_of_images_or_data_are_warned_of_naming_each_value(tmp_path, capsys):
    """FD_cls is biased by the number of images: studies of 2000 and 500 images side by side read as if one solver
    were better; their provenance.json tells, and each differing entry is named with every study's value."""
    compare = load_script("compare_studies")
    folders = {}
    for title, n, data in (("A", 2000, "digits"), ("B", 500, "digits"), ("C", 2000, "mnist")):
        folders[title] = _study(tmp_path / title, [_row("heun", 9, 3.0)])
        record = {"command": "edm-study", "num_images": n, "dataset": {"name": data}, "metrics": {"fd_cls": {}}}
        (folders[title] / "provenance.json").write_text(json.dumps(record))
    compare.main(["--study", f"A={folders['A']}", "--study", f"B={folders['B']}"])
    err = capsys.readouterr().err
    assert "warning: the studies are scored on other terms" in err and "num_images: A=2000, B=500" in err
    assert "dataset" not in err
    compare.main(["--study", f"A={folders['A']}", "--study", f"C={folders['C']}"])
    err = capsys.readouterr().err
    assert 'dataset: A={"name": "digits"}, C={"name": "mnist"}' in err and "num_images" not in err
    compare.main(["--study", f"A={folders['A']}", "--study", f"A2={_study(tmp_path / 'A2', [_row('heun', 9, 3.0)])}"])
    assert capsys.readouterr().err == ""  # a study without a record is compared on what the others record


def test_studies_that_differ_only_in_a_metric_the_other_lacks_or_in_a_cache_folder_are_not_warned_of(tmp_path, capsys):
    """A study that also scored FID, or kept its classifiers in another cache, scored FD_cls on the same terms: no
    warning that its scores do not compare. Other settings of a metric both scored are named as that metric's."""
    compare = load_script("compare_studies")
    fd_cls = {"classifier": {"steps": 2000}, "cache_dir": None}
    metrics = {"A": {"fd_cls": fd_cls},
               "B": {"fd_cls": fd_cls | {"cache_dir": "/scratch/quality"}, "fid": {"inception": None, "cache_dir": None}},
               "C": {"fd_cls": fd_cls | {"classifier": {"steps": 500}}}}
    folders = {}
    for title, scored in metrics.items():
        folders[title] = _study(tmp_path / title, [_row("heun", 9, 3.0)])
        record = {"command": "edm-study", "num_images": 2000, "dataset": {"name": "digits"}, "metrics": scored}
        (folders[title] / "provenance.json").write_text(json.dumps(record))
    compare.main(["--study", f"A={folders['A']}", "--study", f"B={folders['B']}"])
    assert capsys.readouterr().err == ""
    compare.main(["--study", f"A={folders['A']}", "--study", f"C={folders['C']}"])
    assert 'metrics.fd_cls: A={"classifier": {"steps": 2000}}, C={"classifier": {"steps": 500}}' in capsys.readouterr().err
