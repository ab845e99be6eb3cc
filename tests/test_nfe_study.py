"""edm/evaluation/nfe_study.py: quality against counted NFE, a table and a plot per metric, resumable by point."""

from __future__ import annotations

import dataclasses

import json
import subprocess
from pathlib import Path

import pytest

from edm.data import DatasetConfig
from edm.evaluation.nfe_study import StudyConfig, run_study
from edm.provenance import ProvenanceError
from edm.evaluation.quality import ClassifierConfig
from edm.evaluation.scorers import METRICS, EvalConfig, FdClsConfig

from conftest import command

QUICK = ClassifierConfig(steps=200)  # a few seconds on the 8x8 digits


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("quality-cache")


def quick_eval(cache: Path, *metrics: str, **options) -> EvalConfig:
    """The study's metrics with the quick classifier and the module's classifier cache."""
    cfg = EvalConfig(metrics=list(metrics or ["fd_cls"]))
    cfg.fd_cls = FdClsConfig(classifier=QUICK, cache_dir=str(cache))
    for key, value in options.items():
        setattr(cfg.fid, key, value)
    return cfg


def test_the_nfe_study_writes_table_and_plot_and_resumes_by_point(tmp_path, tiny_checkpoint, cache):
    """Points of counted NFE (Heun 2N − 1, Euler N); a rerun computes only new points; a folder made
    with other settings is refused."""
    ckpt = tiny_checkpoint(tmp_path / "m.pt", perturb=0.05)
    out = tmp_path / "study"
    cfg = StudyConfig(checkpoint=str(ckpt), solvers=["heun", "euler"], steps=[2, 3], num_images=32, batch=16,
                      out=str(out), dataset=DatasetConfig(name="digits"), eval=quick_eval(cache), progress=False)
    rows = run_study(cfg)
    assert [(r["solver"], r["steps"], r["nfe"]) for r in rows] == [("euler", 2, 2), ("euler", 3, 3), ("heun", 2, 3), ("heun", 3, 5)]
    assert all(r["fd_cls"] > 0 and r["num_images"] == 32 for r in rows)
    assert (out / "table.csv").read_text().splitlines()[0].startswith("model,schedule,solver,steps,nfe")
    from PIL import Image

    assert Image.open(out / "fd_cls_vs_nfe.png").format == "PNG"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()}
    cfg.steps = [2, 3, 4]
    rows = run_study(cfg)
    assert len(rows) == 6 and {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir() if p.name in before} == before
    cfg.num_images = 16
    with pytest.raises(ProvenanceError, match="num_images: folder 32, now 16"):
        run_study(cfg)
    cfg.num_images, cfg.discretization = 32, "uniform"  # the points' names do not say their time grid
    with pytest.raises(ProvenanceError, match="discretization: folder None, now 'uniform'"):
        run_study(cfg)


def test_a_study_refuses_new_points_once_its_data_sets_files_changed(tmp_path, tiny_checkpoint, cache):
    """Points scored against a folder's images do not sit beside points scored against other images under one name:
    an image rewritten in place changes the record's dataset_contents, and the study is refused naming it."""
    import os

    import numpy as np
    from PIL import Image

    from edm.data import load_digits

    digits = load_digits()
    root = tmp_path / "data"
    for k in range(60):
        label = int(digits.labels[k])
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.images[k, 0].numpy()).save(root / str(label) / f"{k}.png")
    ckpt = tiny_checkpoint(tmp_path / "m.pt", label_dim=10)
    cfg = StudyConfig(checkpoint=str(ckpt), solvers=["euler"], steps=[2], num_images=16, batch=16, out=str(tmp_path / "s"),
                      dataset=DatasetConfig(name="folder", root=str(root), cond=True), eval=quick_eval(cache),
                      progress=False)
    run_study(cfg)
    first = sorted(root.rglob("*.png"))[0]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(first)
    os.utime(first, ns=(1, 1))
    cfg.steps = [2, 3]
    with pytest.raises(ProvenanceError, match="dataset_contents: folder '60:"):
        run_study(cfg)


def test_nfe_budgets_pick_each_solvers_steps_and_an_adaptive_solver_has_a_point_per_tolerance(tmp_path, tiny_checkpoint,
                                                                                                cache):
    """nfe=[5, 9]: each solver gets its most steps within each budget (Heun 2N − 1, Euler N, DPM-Solver-fast 3N − 5);
    dpm_adaptive one point per rtol, its NFE the mean of each image's own count; options reach their solver, are
    recorded in the rows, and a change of them is refused in the same folder."""
    ckpt = tiny_checkpoint(tmp_path / "m.pt", perturb=0.05)
    out = tmp_path / "budgets"
    cfg = StudyConfig(checkpoint=str(ckpt), solvers=["heun", "euler", "dpm_fast", "dpm_adaptive", "stochastic"], nfe=[5, 9],
                      rtols=[0.2, 0.05], options={"stochastic": {"churn": 10.0}}, num_images=24, batch=16, out=str(out),
                      dataset=DatasetConfig(name="digits"), eval=quick_eval(cache), progress=False)
    rows = run_study(cfg)
    fixed = {(r["solver"], r["steps"], r["nfe"]) for r in rows if r["solver"] != "dpm_adaptive"}
    assert fixed == {("heun", 3, 5), ("heun", 5, 9), ("euler", 5, 5), ("euler", 9, 9), ("dpm_fast", 3, 4),
                     ("dpm_fast", 4, 7), ("stochastic", 3, 5), ("stochastic", 5, 9)}
    assert all(r["options"] == {"churn": 10.0} for r in rows if r["solver"] == "stochastic")
    adaptive = sorted((r["options"]["rtol"], r["nfe"]) for r in rows if r["solver"] == "dpm_adaptive")
    assert [rtol for rtol, _ in adaptive] == [0.05, 0.2] and adaptive[0][1] > adaptive[1][1] > 4
    assert sorted(p.name for p in (out / "points").glob("edm-dpm_adaptive-*")) == [
        "edm-dpm_adaptive-rtol0.05.json", "edm-dpm_adaptive-rtol0.2.json"]
    cfg.options = {"stochastic": {"churn": 20.0}}
    with pytest.raises(ProvenanceError, match="options"):
        run_study(cfg)
    cfg.options = {"lms": {"order": 2}}
    with pytest.raises(ValueError, match=r"options names solver\(s\) \['lms'\] that the study does not run"):
        run_study(cfg)
    for empty in ({"solvers": []}, {"steps": [], "nfe": []}, {"schedules": []}):  # a table of no point is refused
        with pytest.raises(ValueError, match="the study has no point"):
            run_study(dataclasses.replace(cfg, options={}, **empty))


def test_classifier_free_guidance_in_a_study_acts_only_inside_its_guidance_interval(tmp_path, tiny_checkpoint, cache):
    """guidance=w without a guide (classifier-free) and guidance_interval=[lo, hi]: as in edm-sample, only the
    evaluations at σ ∈ (lo, hi] call the network twice. Heun 3 on EDM's grid evaluates σ = 80, σ_1, σ_1, σ_2, σ_2
    (σ_i = (80^(1/7) + i/2 (0.002^(1/7) − 80^(1/7)))^7; σ_1 ≈ 2.52 lies inside (0.28, 2.9]): NFE 5 + 2 = 7, not 10.
    An interval without a guidance weight is refused, as edm-sample refuses it."""
    ckpt = tiny_checkpoint(tmp_path / "m.pt", label_dim=10, perturb=0.05)
    cfg = StudyConfig(checkpoint=str(ckpt), solvers=["heun"], steps=[3], guidance=2.0, guidance_interval=[0.28, 2.9],
                      num_images=16, batch=16, out=str(tmp_path / "cfg"), dataset=DatasetConfig(name="digits"),
                      eval=quick_eval(cache), progress=False)
    sigma = [(80 ** (1 / 7) + i / 2 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(3)]
    evaluated = [sigma[0], sigma[1], sigma[1], sigma[2], sigma[2]]
    guided = sum(0.28 < s <= 2.9 for s in evaluated)
    assert guided == 2
    [row] = run_study(cfg)
    assert row["nfe"] == len(evaluated) + guided
    with pytest.raises(ValueError, match="act only with a guidance weight"):
        run_study(dataclasses.replace(cfg, guidance=1.0, out=str(tmp_path / "unguided")))


def test_a_consistency_model_and_its_teacher_share_one_table_and_plot(tmp_path, tiny_checkpoint, cache, caplog):
    """teacher=MODEL adds that model's teacher_solvers x teacher_steps points (model "teacher") to the study of a
    consistency model (the teacher given as its run folder, as docs/training.md shows), labelled so in the log too;
    each model refuses the other kind's solvers."""
    import logging

    from edm.models import checkpoint

    (tmp_path / "teacher-run").mkdir()
    teacher = tiny_checkpoint(tmp_path / "teacher-run" / "checkpoint-00000100.pt", perturb=0.05)
    student = tmp_path / "student.pt"
    state = checkpoint.load_checkpoint(teacher)
    checkpoint.save_checkpoint(student, state | {"config": {"objective": "ect"}})
    cfg = StudyConfig(checkpoint=str(student), solvers=["consistency"], steps=[1, 2], teacher=str(teacher.parent),
                      teacher_solvers=["heun"], teacher_steps=[2], num_images=16, batch=16, out=str(tmp_path / "s"),
                      dataset=DatasetConfig(name="digits"), eval=quick_eval(cache), progress=False)
    with caplog.at_level(logging.INFO, logger="edm.evaluation.nfe_study"):
        rows = run_study(cfg)
    assert [(r["model"], r["solver"], r["nfe"]) for r in rows] == [("model", "consistency", 1), ("model", "consistency", 2),
                                                                   ("teacher", "heun", 3)]
    points = [r.getMessage() for r in caplog.records if " steps: NFE " in r.getMessage()]
    assert [p.split(" steps")[0] for p in points] == ["edm consistency 1", "edm consistency 2", "teacher: edm heun 2"]
    assert sorted(p.name for p in (tmp_path / "s" / "points").iterdir()) == [
        "edm-consistency-001.json", "edm-consistency-002.json", "teacher-edm-heun-002.json"]
    cfg.teacher_solvers = ["consistency"]
    with pytest.raises(ValueError, match="is not a consistency model .* tune one with edm-train recipe=ect"):
        run_study(cfg)
    cfg.solvers, cfg.teacher_solvers = ["heun"], ["heun"]
    with pytest.raises(ValueError, match=r"is a consistency model .* use solvers=\[consistency\] \(steps=\[1,2,4\]\)"):
        run_study(cfg)


def test_the_nfe_study_command(tmp_path, tiny_checkpoint, cache):
    ckpt = tiny_checkpoint(tmp_path / "m.pt", perturb=0.05)
    out = tmp_path / "cli"
    cmd = [command("edm-study"), f"checkpoint={ckpt}", "dataset=digits",
           "solvers=[euler,stochastic]", "steps=[2,4]", "num_images=16", f"out={out}", "eval.fd_cls.classifier.steps=200",
           "+options.stochastic={churn: 5}",
           f"eval.fd_cls.cache_dir={cache}",
           "progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert "4 points" in proc.stdout and len(rows) == 4
    assert [r.get("options") for r in rows if r["solver"] == "stochastic"] == [{"churn": 5}] * 2
    proc = subprocess.run([command("edm-study"), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert "not FID" in proc.stdout and "solvers" in proc.stdout


def test_with_local_inception_weights_the_study_reports_fid_too(tmp_path, tiny_checkpoint, cache, inception_weights):
    path, _ = inception_weights  # random weights with pytorch-fid's layout: the code path, not the numbers
    ckpt = tiny_checkpoint(tmp_path / "m.pt", perturb=0.05)
    cfg = StudyConfig(checkpoint=str(ckpt), solvers=["euler"], steps=[2], num_images=8, batch=8, out=str(tmp_path / "s"),
                      dataset=DatasetConfig(name="digits", max_size=32),
                      eval=quick_eval(cache, "fd_cls", "fid", inception=str(path)), progress=False)
    (row,) = run_study(cfg)
    assert row["fid"] > 0 and row["fd_cls"] > 0
    assert (tmp_path / "s" / "fid_vs_nfe.png").is_file() and (tmp_path / "s" / "fd_cls_vs_nfe.png").is_file()


def test_a_study_refuses_a_solver_in_its_own_keys_naming_the_teacher_and_a_misspelt_solver_is_unknown(tmp_path,
                                                                                                     tiny_checkpoint):
    """edm-study's refusals advise its own keys (solvers=, steps=; teacher_solvers=, teacher_steps=), not edm-sample's
    sampler=; a refused teacher is named the teacher; a misspelt solver is an unknown solver, not one of another kind."""
    from edm.models import checkpoint

    state = checkpoint.load_checkpoint(tiny_checkpoint(tmp_path / "denoiser.pt"))
    for objective in ("ect", "sct"):
        checkpoint.save_checkpoint(tmp_path / f"{objective}.pt", state | {"config": {"objective": objective}})
    cfg = StudyConfig(checkpoint=str(tmp_path / "ect.pt"), out=str(tmp_path / "z"), progress=False)
    with pytest.raises(ValueError, match=r"ect.pt is a consistency model \(objective=ect\); solver heun is not for "
                                         r"consistency models: use solvers=\[consistency\] \(steps=\[1,2,4\]\)$"):
        run_study(cfg)
    cfg.solvers = ["consistancy"]
    with pytest.raises(ValueError, match="solver 'consistancy' is not valid; choose one of: "):
        run_study(cfg)
    cfg.solvers, cfg.teacher = ["consistency"], str(tmp_path / "sct.pt")
    with pytest.raises(ValueError, match=r"^teacher .*sct.pt is a consistency model \(objective=sct\); solver heun is not "
                                         r"for consistency models: use teacher_solvers=\[consistency\] "
                                         r"\(teacher_steps=\[1,2,4\]\)$"):
        run_study(cfg)
    cfg.teacher, cfg.teacher_solvers = str(tmp_path / "denoiser.pt"), ["consistency"]
    with pytest.raises(ValueError, match=r"^teacher .* is not a consistency model .* or sample this one with an ODE "
                                         r"solver \(teacher_solvers=\[heun\]\)$"):
        run_study(cfg)
    cfg.teacher, cfg.teacher_solvers = str(tiny_checkpoint(tmp_path / "cond.pt", label_dim=10)), ["heun"]
    with pytest.raises(ValueError, match=r"^teacher .*cond.pt makes \(1, 8, 8\) images with 10 classes, .* with 0: give "
                                         r"teacher= a model of the same data \(e.g. the one the model was tuned from\)$"):
        run_study(cfg)  # a teacher of other images: the fix is named
    assert not (tmp_path / "z").exists()


def test_a_misspelt_metric_is_refused_by_name_before_the_study_starts(tmp_path, tiny_checkpoint):
    """eval.metrics=[fdcls] is refused as edm-sample refuses it, naming the valid metrics (not an AttributeError)."""
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    cfg = StudyConfig(checkpoint=str(ckpt), solvers=["heun"], steps=[2], num_images=16, out=str(tmp_path / "s"),
                      dataset=DatasetConfig(name="digits"), eval=EvalConfig(metrics=["fdcls"]), progress=False)
    with pytest.raises(ValueError, match=rf"^metric 'fdcls' is not valid; choose one of: {', '.join(METRICS)} \(did you mean fd_cls\?\)$"):
        run_study(cfg)
    assert not (tmp_path / "s").exists()


def test_a_study_refused_for_a_metric_setting_writes_nothing_in_out_and_the_corrected_command_runs_there(
        tmp_path, tiny_checkpoint, cache):
    """The scorers are set up before OUT is claimed: a study refused for a metric's setting (fid without its
    Inception file) leaves no provenance.json, so the corrected command is not refused as "other settings"."""
    ckpt = tiny_checkpoint(tmp_path / "m.pt", perturb=0.05)
    out = tmp_path / "st2"
    cfg = StudyConfig(checkpoint=str(ckpt), solvers=["heun"], steps=[2], num_images=16, batch=16, out=str(out),
                      dataset=DatasetConfig(name="digits"), eval=quick_eval(cache, "fd_cls", "fid"), progress=False)
    with pytest.raises(FileNotFoundError, match="no Inception weights file given"):
        run_study(cfg)
    assert not out.exists()  # no provenance.json, nothing
    cfg.eval.metrics = ["fd_cls"]
    (row,) = run_study(cfg)
    assert row["fd_cls"] > 0


def test_steps_and_nfe_budgets_together_are_refused(tmp_path, tiny_checkpoint):
    """nfe= replaces steps=: a study given both (steps other than its default) is refused naming both keys, not run
    with steps silently ignored."""
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    cfg = StudyConfig(checkpoint=str(ckpt), solvers=["heun"], steps=[2], nfe=[5], num_images=16, out=str(tmp_path / "s"),
                      dataset=DatasetConfig(name="digits"), progress=False)
    with pytest.raises(ValueError, match=r"^steps=\[2\] and nfe=\[5\]: .*; drop steps= to study the budgets, or nfe="):
        run_study(cfg)
    assert not (tmp_path / "s").exists()


def test_the_study_refuses_a_launch_of_several_processes(tmp_path, tiny_checkpoint):
    """edm-study splits no work between processes: under `accelerate launch --num_processes 2` each process ran the
    whole study and one failed on the other's lock of OUT ("in use by an NFE study"). Every process now refuses the
    launch in one line before any work, saying how to run it."""
    import os
    import sys

    from conftest import REPO

    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "edm.cli.nfe_study", f"checkpoint={ckpt}",
              "solvers=[euler]", "steps=[2]", "num_images=8", f"out={tmp_path / 'study'}", "progress=false"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", EDM_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(launch, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("edm-study: error: edm-study runs in one process, but this launch started 2 (WORLD_SIZE=2)") == 2
    assert not (tmp_path / "study").exists() and not (tmp_path / "cache").exists()


def karras_sigmas(n: int, rho: float = 7.0, sigma_min: float = 0.002, sigma_max: float = 80.0) -> list[float]:
    """σ_0..σ_{n−1} of the EDM grid (Karras et al. 2022, eq. 5), where Euler evaluates D."""
    return [(sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
            for i in range(n)]


def test_nfe_budgets_count_each_guided_evaluation_twice(tmp_path, tiny_checkpoint, cache):
    """nfe=[6] under CFG in the interval (0.28, 2.9]: Euler gets the most steps N with N + (its σ_i in the interval)
    ≤ 6, the NFE the study then counts, not the 6 steps an unguided count allows."""
    ckpt = tiny_checkpoint(tmp_path / "m.pt", label_dim=10, perturb=0.05)
    cost = {n: n + sum(0.28 < s <= 2.9 for s in karras_sigmas(n)) for n in range(2, 7)}
    n = max(k for k, nfe in cost.items() if nfe <= 6)
    assert cost[6] > 6
    cfg = StudyConfig(checkpoint=str(ckpt), solvers=["euler"], nfe=[6], num_images=8, batch=8, out=str(tmp_path / "s"),
                      dataset=DatasetConfig(name="digits"), eval=quick_eval(cache), guidance=2.0,
                      guidance_interval=[0.28, 2.9], progress=False)
    [row] = run_study(cfg)
    assert (row["steps"], row["nfe"]) == (n, cost[n])

