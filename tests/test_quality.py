"""The offline quality score (edm.evaluation.quality: FD_cls) and the NFE study built on it (edm.evaluation.nfe_study)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from edm.data import DatasetConfig, build_dataset, to_model_space
from edm.evaluation.metrics import frechet_distance
from edm.evaluation.nfe_study import StudyConfig, run_study
from edm.generation.provenance import ProvenanceError
from edm.evaluation.quality import ClassifierConfig, QualityCacheError, QualityScore
from edm.evaluation.scorers import EvalConfig, FdClsConfig

from conftest import command

ROOT = Path(__file__).resolve().parents[1]
QUICK = ClassifierConfig(steps=200)  # a few seconds on the 8x8 digits


def quick_eval(cache: Path, *metrics: str, **options) -> EvalConfig:
    """The study's metrics with the quick classifier and the module's classifier cache."""
    cfg = EvalConfig(metrics=list(metrics or ["fd_cls"]))
    cfg.fd_cls = FdClsConfig(classifier=QUICK, cache_dir=str(cache))
    for key, value in options.items():
        setattr(cfg.fid, key, value)
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("quality-cache")


@pytest.fixture(scope="module")
def digits_score(cache):
    return QualityScore.for_dataset(DatasetConfig(name="digits"), QUICK, cache_dir=cache, progress=False)


@pytest.fixture(scope="module")
def digits():
    ds = build_dataset(DatasetConfig(name="digits", cond=True))
    images = to_model_space(torch.stack([ds[i][0] for i in range(len(ds))]))
    return images, torch.stack([ds[i][1].argmax() for i in range(len(ds))])


def test_fd_cls_is_the_frechet_distance_of_the_classifier_features(digits_score, digits):
    images, labels = digits
    fake = images[:500].flip(-1)  # mirrored digits: a different distribution
    phi = digits_score.features(fake).numpy()
    expected = frechet_distance(phi.mean(0), np.cov(phi, rowvar=False), digits_score.mu, digits_score.sigma)
    assert digits_score(fake)["fd_cls"] == pytest.approx(expected, rel=1e-9)


def test_the_data_scores_zero_against_itself_and_far_better_than_noise(digits_score, digits):
    images, labels = digits
    real = digits_score(images, labels)
    noise = digits_score(torch.rand_like(images) * 2 - 1)
    assert real["fd_cls"] < 1e-6 * noise["fd_cls"] and real["num_images"] == len(images)
    assert real["class_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert digits_score.meta["holdout_accuracy"] > 0.5 and "class_accuracy" not in noise


def test_a_cached_classifier_is_reused_and_a_tampered_one_refused(digits_score, digits, cache, monkeypatch):
    import edm.evaluation.quality

    monkeypatch.setattr(edm.evaluation.quality, "_train", lambda *a, **k: pytest.fail("trained again despite a cache entry"))
    again = QualityScore.for_dataset(DatasetConfig(name="digits"), QUICK, cache_dir=cache, progress=False)
    x = digits[0][:64]
    assert torch.equal(again.features(x), digits_score.features(x)) and again.meta["key"] == digits_score.meta["key"]
    folder = next(cache.glob(f"digits-8px-{digits_score.meta['key']}"))
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(meta | {"classifier": meta["classifier"] | {"steps": 1}}))
    try:
        with pytest.raises(QualityCacheError, match=f"{folder}.*other data or settings.*delete"):
            QualityScore.for_dataset(DatasetConfig(name="digits"), QUICK, cache_dir=cache, progress=False)
    finally:
        (folder / "meta.json").write_text(json.dumps(meta))
    monkeypatch.undo()
    other = ClassifierConfig(steps=20)  # other settings: their own folder, never the first one's
    QualityScore.for_dataset(DatasetConfig(name="digits"), other, cache_dir=cache, progress=False)
    assert len(list(cache.glob("digits-8px-*"))) == 2


def test_images_of_another_shape_and_data_without_labels_are_refused(digits_score, tmp_path):
    with pytest.raises(ValueError, match=r"shape \[3, 8, 8\] cannot be scored against data set digits"):
        digits_score(torch.zeros(4, 3, 8, 8))
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match="trains a classifier on class labels"):
        QualityScore.for_dataset(DatasetConfig(name="folder", root=str(tmp_path)), QUICK, cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- the NFE study


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
    assert (out / "table.csv").read_text().splitlines()[0].startswith("schedule,solver,steps,nfe")
    from PIL import Image

    assert Image.open(out / "fd_cls_vs_nfe.png").format == "PNG"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()}
    cfg.steps = [2, 3, 4]
    rows = run_study(cfg)
    assert len(rows) == 6 and {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir() if p.name in before} == before
    cfg.num_images = 16
    with pytest.raises(ProvenanceError, match="num_images: folder 32, now 16"):
        run_study(cfg)


def test_the_nfe_study_command(tmp_path, tiny_checkpoint, cache):
    ckpt = tiny_checkpoint(tmp_path / "m.pt", perturb=0.05)
    out = tmp_path / "cli"
    cmd = [command("edm-study"), f"checkpoint={ckpt}", "dataset=digits",
           "solvers=[euler]", "steps=[2,4]", "num_images=16", f"out={out}", "eval.fd_cls.classifier.steps=200",
           f"eval.fd_cls.cache_dir={cache}",
           "progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 points" in proc.stdout and len(json.loads((out / "table.json").read_text())["rows"]) == 2
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
