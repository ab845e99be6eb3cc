"""edm/evaluation/quality.py: FD_cls, the Fréchet distance in a classifier trained once on the data set."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from edm.data import DatasetConfig, build_dataset, to_model_space
from edm.evaluation.metrics import frechet_distance
from edm.evaluation.quality import ClassifierConfig, QualityCacheError, QualityScore


ROOT = Path(__file__).resolve().parents[1]
QUICK = ClassifierConfig(steps=200)  # a few seconds on the 8x8 digits


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


def test_a_corrupt_cached_classifier_is_refused_in_one_line_naming_the_folder(digits_score, cache):
    """classifier.pt cut short, garbage or not a state dict: one line naming the cache folder and its deletion, never
    torch's advice to load it with weights_only=False (which would run the file's code)."""
    folder = next(cache.glob(f"digits-8px-{digits_score.meta['key']}"))
    weights = (folder / "classifier.pt").read_bytes()
    try:
        for bad in (weights[: len(weights) // 2], b"garbage", b"", pickle.dumps([1, 2]), None):
            if bad is None:
                torch.save(torch.zeros(2), folder / "classifier.pt")
            else:
                (folder / "classifier.pt").write_bytes(bad)
            with pytest.raises(QualityCacheError, match=rf"^quality cache {folder}: classifier.pt .*; delete {folder} "
                                                        "to train it again$") as err:
                QualityScore.for_dataset(DatasetConfig(name="digits"), QUICK, cache_dir=cache, progress=False)
            assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    finally:
        (folder / "classifier.pt").write_bytes(weights)


def test_a_cached_classifier_whose_bytes_changed_is_refused_not_scored_with(digits_score, cache):
    """One flipped bit in classifier.pt's weights still loads (torch.load skips the archive's CRCs) and would
    give other scores: refused in one line naming the cache folder, as a corrupt checkpoint is."""
    folder = next(cache.glob(f"digits-8px-{digits_score.meta['key']}"))
    weights = (folder / "classifier.pt").read_bytes()
    damaged = bytearray(weights)
    damaged[len(damaged) // 2] ^= 0x10  # inside a tensor's data
    try:
        (folder / "classifier.pt").write_bytes(bytes(damaged))
        with pytest.raises(QualityCacheError, match=rf"^quality cache {folder}: classifier.pt is corrupt \(.* fails its "
                                                    rf"CRC-32 check\); delete {folder} to train it again$"):
            QualityScore.for_dataset(DatasetConfig(name="digits"), QUICK, cache_dir=cache, progress=False)
    finally:
        (folder / "classifier.pt").write_bytes(weights)


def test_a_cache_entry_with_its_statistics_cut_short_or_its_record_not_an_object_is_named_unreadable(digits_score,
                                                                                                      cache):
    """reference.npz cut short (zipfile's BadZipFile) or meta.json holding null: one line naming the cache folder and
    its deletion, not a traceback."""
    folder = next(cache.glob(f"digits-8px-{digits_score.meta['key']}"))
    saved = {name: (folder / name).read_bytes() for name in ("reference.npz", "meta.json")}
    try:
        for name, bad in (("reference.npz", saved["reference.npz"][:100]), ("meta.json", b"null")):
            (folder / name).write_bytes(bad)
            with pytest.raises(QualityCacheError, match=rf"^quality cache {folder} is unreadable \(.*\); delete {folder} "
                                                        "to train it again$"):
                QualityScore.for_dataset(DatasetConfig(name="digits"), QUICK, cache_dir=cache, progress=False)
            (folder / name).write_bytes(saved[name])
    finally:
        for name, data in saved.items():
            (folder / name).write_bytes(data)


@pytest.mark.parametrize("setting, named", [({"steps": 0}, "classifier.steps=0 (needs 1 or more)"),
                                            ({"batch_size": 0}, "classifier.batch_size=0 (needs 1 or more)"),
                                            ({"lr": 0.0}, "classifier.lr=0.0 (needs > 0)"),
                                            ({"holdout": 1.0}, "classifier.holdout=1.0 (needs 0 <= holdout < 1)")])
def test_a_classifier_that_cannot_be_trained_is_refused_naming_the_setting(setting, named):
    """steps=0 (or no learning rate) left the classifier at its random weights, which scored every model near 0."""
    with pytest.raises(ValueError, match=re.escape(f"FD_cls's classifier cannot be trained with {named}")):
        ClassifierConfig(**setting)


def test_images_of_another_shape_and_data_without_labels_are_refused(digits_score, tmp_path):
    with pytest.raises(ValueError, match=r"shape \[3, 8, 8\] cannot be scored against data set digits"):
        digits_score(torch.zeros(4, 3, 8, 8))
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match="trains a classifier on class labels"):
        QualityScore.for_dataset(DatasetConfig(name="folder", root=str(tmp_path)), QUICK, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="dataset.resample") as err:  # other faults of the data set are its own
        QualityScore.for_dataset(DatasetConfig(name="digits", resolution=6, resample="cubic"), QUICK, cache_dir=tmp_path / "c")
    assert "class labels" not in str(err.value)


def test_the_same_files_under_another_folder_reuse_the_cached_classifier(tmp_path, monkeypatch):
    """The cache entry is keyed by the data's content (every image and label), not its path: a copied folder is
    scored with the classifier trained on the original; a changed image is other data."""
    import shutil

    from PIL import Image

    import edm.evaluation.quality as quality

    first = tmp_path / "data"
    for label in range(2):
        (first / str(label)).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8), 20 * i + 100 * label, dtype=np.uint8)).save(first / str(label) / f"{i}.png")
    quick = ClassifierConfig(steps=2, batch_size=4)
    trained = QualityScore.for_dataset(DatasetConfig(name="folder", root=str(first)), quick, cache_dir=tmp_path / "c",
                                       progress=False)
    shutil.copytree(first, tmp_path / "copy")
    monkeypatch.setattr(quality, "_train", lambda *a, **k: pytest.fail("trained again for the same files"))
    copied = QualityScore.for_dataset(DatasetConfig(name="folder", root=str(tmp_path / "copy")), quick,
                                      cache_dir=tmp_path / "c", progress=False)
    assert copied.meta["key"] == trained.meta["key"]
    Image.fromarray(np.full((8, 8), 7, dtype=np.uint8)).save(tmp_path / "copy" / "0" / "0.png")
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        QualityScore.for_dataset(DatasetConfig(name="folder", root=str(tmp_path / "copy")), quick,
                                 cache_dir=tmp_path / "c", progress=False)


def test_a_cache_entry_written_when_the_key_held_the_datas_folder_is_still_used(tmp_path, monkeypatch):
    """Entries written before the key left out dataset.root (its description held "root") are of the same content
    and classifier settings: a scorer of that data set loads such an entry, with its key, instead of training another
    classifier (minutes, and on a GPU other weights, so other FD_cls numbers than the user's earlier ones)."""
    import hashlib
    import json
    import shutil

    import edm.evaluation.quality as quality

    quick = ClassifierConfig(steps=2, batch_size=4)
    trained = QualityScore.for_dataset(DatasetConfig(name="digits"), quick, cache_dir=tmp_path / "new", progress=False)
    settings = {key: trained.meta[key] for key in ("version", "data", "classifier")}
    settings["data"] = {**settings["data"], "root": None}  # as the entry was described before
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    new = next((tmp_path / "new").glob("digits-*"))
    old = tmp_path / "old" / f"digits-8px-{key}"
    shutil.copytree(new, old)
    (old / "meta.json").write_text(json.dumps({**trained.meta, **settings, "key": key}))
    monkeypatch.setattr(quality, "_train", lambda *a, **k: pytest.fail("trained again for a cached classifier"))
    loaded = QualityScore.for_dataset(DatasetConfig(name="digits"), quick, cache_dir=tmp_path / "old", progress=False)
    assert loaded.meta["key"] == key and [p.name for p in (tmp_path / "old").iterdir()] == [old.name]


def test_processes_that_need_one_classifier_at_once_train_it_once(tmp_path, monkeypatch):
    """Two scorers started together on an empty cache: one trains and writes the entry while holding its lock,
    the other waits and loads that entry, so both score with the same weights and statistics."""
    import threading
    import time

    import edm.evaluation.quality as quality

    trained = []

    def slow_train(images, labels, classes, config, device, progress):
        trained.append(threading.get_ident())
        time.sleep(1.0)  # both scorers are inside for_dataset by now
        torch.manual_seed(len(trained))  # a second training would give other weights
        return quality.FeatureClassifier(images.shape[1], classes, config.width, config.feature_dim), 0.5

    monkeypatch.setattr(quality, "_train", slow_train)
    scores = []
    threads = [threading.Thread(target=lambda: scores.append(QualityScore.for_dataset(
        DatasetConfig(name="digits"), QUICK, cache_dir=tmp_path, progress=False))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(trained) == 1 and len(scores) == 2
    x = torch.zeros(4, 1, 8, 8)
    assert torch.equal(scores[0].features(x), scores[1].features(x))
    assert np.array_equal(scores[0].mu, scores[1].mu) and np.array_equal(scores[0].sigma, scores[1].sigma)


# ----------------------------------------------------------------------------- the NFE study
