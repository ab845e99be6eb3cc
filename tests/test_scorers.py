"""edm/evaluation/scorers.py: one table of metrics, each a scorer of images and labels, for every command."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edm.data import DatasetConfig
from edm.evaluation.quality import ClassifierConfig, QualityScore
from edm.evaluation.scorers import (
    METRICS, BpdConfig, EvalConfig, FdClsConfig, ScoringContext, build_scorers, evaluate, metric_files,
)

QUICK = FdClsConfig(classifier=ClassifierConfig(steps=50))
DIGITS = DatasetConfig(name="digits")


def digit_like(n: int, seed: int) -> np.ndarray:
    """uint8 [n, 8, 8, 1] images, smooth enough to sit near the digits."""
    rng = np.random.default_rng(seed)
    return (rng.random((n, 8, 8, 1)) * 64 + np.linspace(0, 128, 8)[None, :, None, None]).astype(np.uint8)


def test_the_eval_config_has_one_options_field_per_metric_and_picks_none_by_default():
    fields = {f.name: f.type for f in dataclasses.fields(EvalConfig)}
    assert set(fields) == {"metrics", *METRICS} and EvalConfig().metrics == []
    assert all(isinstance(getattr(EvalConfig(), name), METRICS[name].schema) for name in METRICS)


def test_fd_cls_of_an_image_file_is_the_quality_score_of_its_pixels(tmp_path):
    """edm-eval metric=fd_cls reads the images (and an edm-sample npz's labels) and scores them as the library does."""
    images, labels = digit_like(12, 0), np.arange(12) % 10
    np.savez(tmp_path / "samples.npz", images=images, seeds=np.arange(12), labels=labels)
    cfg = dataclasses.replace(QUICK, cache_dir=str(tmp_path / "cache"))
    got = evaluate("fd_cls", cfg, ScoringContext(dataset=DIGITS), images=tmp_path / "samples.npz")
    score = QualityScore.for_dataset(DIGITS, cfg.classifier, cache_dir=cfg.cache_dir, progress=False)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    expected = score(pixels, torch.from_numpy(labels))
    assert got == pytest.approx(expected, rel=1e-6)  # (the cached classifier against the one just trained)
    assert got["fd_cls"] > 0 and 0 <= got["class_accuracy"] <= 1 and got["num_images"] == 12


def test_a_metric_is_given_what_it_scores_or_refused_naming_the_way(tmp_path):
    np.savez(tmp_path / "x.npz", images=digit_like(4, 1))
    with pytest.raises(ValueError, match="metric=fd_cls scores generated images: give images=PATH"):
        evaluate("fd_cls", QUICK, ScoringContext(dataset=DIGITS), data=tmp_path / "x.npz")
    with pytest.raises(ValueError, match="metric=bpd scores data under a model"):
        evaluate("bpd", BpdConfig(), ScoringContext(dataset=DIGITS), images=tmp_path / "x.npz")
    with pytest.raises(ValueError, match="bits/dim scores a model: give it"):
        evaluate("bpd", BpdConfig(), ScoringContext(), data=tmp_path / "x.npz")
    with pytest.raises(ValueError, match=r"or dataset=NAME \(not both, not images=\)"):
        evaluate("bpd", BpdConfig(), ScoringContext(dataset=DIGITS), data=tmp_path / "x.npz")
    with pytest.raises(ValueError, match=r"metric.max_images=0: give at least 1"):  # before any image is read
        evaluate("bpd", BpdConfig(max_images=0), ScoringContext(), data=tmp_path / "x.npz")
    with pytest.raises(ValueError, match=r"metric.num_steps=0: the ODE needs at least 1 step"):
        evaluate("bpd", BpdConfig(num_steps=0), ScoringContext(model=torch.nn.Identity()), data=tmp_path / "x.npz")
    with pytest.raises(ValueError, match="FD_cls needs the data set its classifier learns"):
        evaluate("fd_cls", QUICK, ScoringContext(), images=tmp_path / "x.npz")
    with pytest.raises(ValueError, match="metric 'fd' is not valid; choose one of: fid, fd_cls, bpd"):
        evaluate("fd", QUICK, ScoringContext(), images=tmp_path / "x.npz")


def test_fid_statistics_of_another_extractor_are_refused_when_the_scorer_is_made_before_any_image(tmp_path,
                                                                                                inception_weights):
    """edm-sample and edm-study make the scorer before the first image: ref= statistics that record other weights
    than metric.inception are refused there, not after every image is made."""
    from edm.evaluation import metrics
    from edm.evaluation.scorers import FidConfig, fid_scorer

    path, _ = inception_weights
    metrics.save_statistics(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048), 10,
                            feature_extractor="inception:0123456789ab")
    with pytest.raises(ValueError, match=r"ref.npz were made by feature extractor inception:0123456789ab"):
        fid_scorer(FidConfig(inception=str(path), ref=str(tmp_path / "ref.npz")), ScoringContext())


def test_generated_images_take_only_the_metrics_of_samples(tmp_path):
    with pytest.raises(ValueError, match="eval.metrics names fd_cls more than once"):
        build_scorers(EvalConfig(metrics=["fd_cls", "fd_cls"]), ScoringContext(dataset=DIGITS))
    cfg = EvalConfig(metrics=["bpd"])
    with pytest.raises(ValueError, match="metric bpd scores data under a model, not generated images: use edm-eval metric=bpd"):
        build_scorers(cfg, ScoringContext(dataset=DIGITS))
    cfg = EvalConfig(metrics=["fd_cls"])
    cfg.fd_cls = dataclasses.replace(QUICK, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"the images are \[3, 32, 32\], data set digits has \[1, 8, 8\]"):
        build_scorers(cfg, ScoringContext(dataset=DIGITS, image_shape=(3, 32, 32)))


def test_a_record_pins_the_files_a_metric_reads(tmp_path):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights")
    cfg = EvalConfig(metrics=["fid"])
    cfg.fid.inception, cfg.fid.ref = str(weights), str(tmp_path / "missing.npz")
    files = metric_files(cfg, ["fid"])
    assert list(files) == ["fid.inception_sha256"] and len(files["fid.inception_sha256"]) == 64


def test_bits_per_dim_of_a_consistency_model_is_refused_naming_its_denoiser(tmp_path, tiny_checkpoint):
    """edm-eval metric=bpd integrates the probability-flow ODE through D(x̂; σ): a consistency function (objective
    ect, sct, scd) is no such D, so its bits/dim is refused before any image is scored, naming the denoiser to score."""
    from edm.cli.evaluate import EvaluateConfig, run
    from edm.models import checkpoint

    state = checkpoint.load_checkpoint(tiny_checkpoint(tmp_path / "denoiser.pt"))
    checkpoint.save_checkpoint(tmp_path / "ect.pt", state | {"config": {"objective": "ect"}})
    np.savez(tmp_path / "x.npz", images=digit_like(2, 0))
    cfg = EvaluateConfig(metric=BpdConfig(num_steps=1), checkpoint=str(tmp_path / "ect.pt"), data=str(tmp_path / "x.npz"),
                         cpu=True)
    with pytest.raises(ValueError, match=r"^bits/dim needs a denoiser: .*ect.pt is a consistency model \(objective=ect\)"
                                         r".* score the denoiser it was tuned from"):
        run(cfg, "bpd")
