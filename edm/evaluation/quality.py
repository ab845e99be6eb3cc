"""An offline quality score: the Fréchet distance in the features of a small classifier that the
project trains on the data set itself (FD_cls), and that classifier's accuracy on samples.

    score = QualityScore.for_dataset(DatasetConfig(name="fashion_mnist", resolution=16))
    score(images)                # {"fd_cls": ..., "num_images": N}
    score(images, labels)        # also "class_accuracy" (class-conditional samples)

FD_cls = ‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2(Σ_r Σ_g)^½) of Gaussians fitted to the classifier's
penultimate features of real images (the data set, up to max_images of it) and of generated
ones. It needs no download, so it runs anywhere, but it is not FID: the features are not
Inception's, so a number compares only with numbers of the same classifier on the same data
set (`meta["key"]` names both). FID with local Inception weights is edm.metrics.

The classifier is trained once per (data set content, ClassifierConfig) and cached as a plain
state_dict (loaded with weights_only=True) beside its reference statistics and a meta.json that
the loader checks; any other data or settings get their own folder. An entry written while the key also held
dataset.root (the same content) is still loaded, under its own key. Processes that need the same
entry at once train it once: the first holds the folder's lock, the others wait for it and load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import FolderLock, atomic_write, read_record, write_json, zip_crc_failure
from ..data import DatasetConfig, NoLabelsError, as_model_space, build_dataset, dataset_images, to_model_space
from .metrics import frechet_distance, warn_few_images

__all__ = ["ClassifierConfig", "FeatureClassifier", "QualityScore", "QualityCacheError", "default_cache_dir",
           "SCORE_NAME"]

logger = logging.getLogger(__name__)

SCORE_NAME = "fd_cls"  # the key of the score in tables and reports (never "fid")
CACHE_VERSION = 1  # bump when the classifier or its training changes: old caches are then not reused


class QualityCacheError(ValueError):
    """A cached classifier does not match what it claims to be; the message names the folder."""


def default_cache_dir() -> Path:
    """$EDM_CACHE/quality, else ~/.cache/edm/quality."""
    root = os.environ.get("EDM_CACHE") or Path.home() / ".cache" / "edm"
    return Path(root) / "quality"


@dataclass
class ClassifierConfig:
    """The feature classifier and its training: width·(1, 2) channels at full and half resolution,
    a feature_dim-wide penultimate layer, Adam for `steps` batches of `batch_size` of the data,
    `holdout` of it kept out for the reported accuracy; max_images caps the images used."""

    width: int = 32
    feature_dim: int = 64
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    holdout: float = 0.1
    max_images: int = 50_000

    def __post_init__(self) -> None:
        counts = {"width": self.width, "feature_dim": self.feature_dim, "steps": self.steps,
                  "batch_size": self.batch_size, "max_images": self.max_images}
        bad = [f"classifier.{key}={value} (needs 1 or more)" for key, value in counts.items() if value < 1]
        bad += [f"classifier.lr={self.lr} (needs > 0)"] * (not self.lr > 0)
        bad += [f"classifier.holdout={self.holdout} (needs 0 <= holdout < 1)"] * (not 0 <= self.holdout < 1)
        if bad:
            raise ValueError(f"FD_cls's classifier cannot be trained with {', '.join(bad)}: an untrained classifier's "
                             "features would score every model alike")


class FeatureClassifier(nn.Module):
    """conv3×3(C→w) → conv3×3 stride 2 (w→w) → conv3×3 (w→2w) → conv3×3 stride 2 (2w→2w) → mean over
    pixels → linear(2w→d): the features φ(x) (each followed by SiLU); logits = linear(d→classes)(φ(x))."""

    def __init__(self, channels: int, classes: int, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        w = width
        self.convs = nn.ModuleList([
            nn.Conv2d(channels, w, 3, padding=1), nn.Conv2d(w, w, 3, stride=2, padding=1),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
        ])
        self.proj = nn.Linear(2 * w, feature_dim)
        self.head = nn.Linear(feature_dim, classes)

    def features(self, x: Tensor) -> Tensor:
        """φ(x) [N, feature_dim] of images x [N, C, H, W] in [−1, 1]."""
        for conv in self.convs:
            x = F.silu(conv(x))
        return F.silu(self.proj(x.mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _load_images(dataset_cfg: DatasetConfig, max_images: int, seed: int) -> tuple[Tensor, Tensor, dict]:
    """(uint8 images [N, C, H, W], class indices [N], description) of up to max_images images of the
    data set, a seeded random subset when it is larger; the description holds its content hash and no path, so the
    same files under another folder are the same data."""
    cfg = dataclasses.replace(dataset_cfg, cond=True, xflip=False, num_workers=0)
    try:
        dataset = build_dataset(cfg)
    except NoLabelsError as err:
        raise ValueError(f"the quality score trains a classifier on class labels, and data set {cfg.name} has "
                         f"none ({err}); use FID with local Inception weights instead") from None
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
    images, labels = dataset_images(dataset, order.tolist())
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images.numpy()).tobytes())
    digest.update(labels.numpy().astype(np.int64).tobytes())
    description = {"name": cfg.name, "resolution": dataset.resolution, "channels": dataset.channels,
                   "classes": dataset.num_classes, "size": n, "images_used": len(order), "max_size": cfg.max_size,
                   "sha256": digest.hexdigest()}
    return images, labels, description


def _train(
    images: Tensor, labels: Tensor, classes: int, config: ClassifierConfig, device: torch.device, progress: bool
) -> tuple[FeatureClassifier, float]:
    """The classifier trained on all but the held-out images, and its accuracy on the held-out ones."""
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    order = torch.randperm(images.shape[0], generator=gen)
    held = max(1, int(round(config.holdout * images.shape[0])))
    test, train = order[:held], order[held:]
    net = FeatureClassifier(images.shape[1], classes, config.width, config.feature_dim).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    from ..progress import progress_bar

    bar = progress_bar(config.steps, "quality classifier", "step", leave=False) if progress else None
    for step in range(config.steps):
        batch = train[torch.randint(len(train), (config.batch_size,), generator=gen)]
        x = to_model_space(images[batch]).to(device)
        loss = F.cross_entropy(net(x), labels[batch].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay to 0
            group["lr"] = config.lr * 0.5 * (1 + np.cos(np.pi * (step + 1) / config.steps))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    net.eval().requires_grad_(False)
    predicted = torch.cat([net(to_model_space(images[chunk]).to(device)).argmax(1).cpu() for chunk in test.split(512)])
    return net, float((predicted == labels[test]).double().mean())


def _entry(cache: Path, data: dict, config: ClassifierConfig) -> tuple[Path, dict, str]:
    """(folder, settings, key) of the cache entry of `data` (_load_images' description) and `config`: key = the first
    16 hex digits of the SHA-256 of the settings (CACHE_VERSION, data, config) as sorted JSON."""
    settings = {"version": CACHE_VERSION, "data": data, "classifier": dataclasses.asdict(config)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache / f"{data['name']}-{data['resolution']}px-{key}", settings, key


class QualityScore:
    """FD_cls of images against the data set, and class accuracy; see the module docstring."""

    def __init__(self, classifier: FeatureClassifier, mu: np.ndarray, sigma: np.ndarray, meta: dict) -> None:
        self.classifier, self.mu, self.sigma, self.meta = classifier.eval().requires_grad_(False), mu, sigma, meta

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """φ [N, d] (float64, CPU) of images [N, C, H, W] of the data set's shape (uint8 or in [−1, 1])."""
        shape = [self.meta["data"]["channels"], self.meta["data"]["resolution"], self.meta["data"]["resolution"]]
        if list(images.shape[1:]) != shape:
            raise ValueError(f"images of shape {list(images.shape[1:])} cannot be scored against data set "
                             f"{self.meta['data']['name']} of shape {shape}")
        return torch.cat([self.classifier.features(as_model_space(chunk).to(self.device)).double().cpu()
                          for chunk in images.split(batch_size)])

    @torch.no_grad()
    def __call__(self, images: Tensor, labels: Tensor | None = None) -> dict[str, Any]:
        """{"fd_cls", "num_images"} (+ "class_accuracy" when class indices [N] are given)."""
        phi = self.features(images)
        if phi.shape[0] < 2:
            raise ValueError("the Fréchet distance needs at least 2 images")
        mu, sigma = phi.mean(0).numpy(), np.cov(phi.numpy(), rowvar=False)
        warn_few_images("FD_cls", phi.shape[0], phi.shape[1])
        result: dict[str, Any] = {SCORE_NAME: frechet_distance(mu, sigma, self.mu, self.sigma), "num_images": int(phi.shape[0])}
        if labels is not None:
            logits = self.classifier.head(phi.to(self.device, torch.float32)).cpu()
            result["class_accuracy"] = float((logits.argmax(1) == labels.cpu()).double().mean())
        return result

    @classmethod
    def for_dataset(
        cls, dataset: DatasetConfig, config: ClassifierConfig | None = None, *,
        cache_dir: str | Path | None = None, device: torch.device | str = "cpu", progress: bool = True,
        image_shape: tuple[int, ...] | None = None,
    ) -> "QualityScore":
        """The score of a data set: its cached classifier when one matches, else trained now and cached. With
        `image_shape` (C, H, W) of the images to be scored, another shape than the data set's is refused first."""
        config = config or ClassifierConfig()
        device = torch.device(device)
        images, labels, data = _load_images(dataset, config.max_images, config.seed)
        shape = (data["channels"], data["resolution"], data["resolution"])
        if image_shape is not None and tuple(image_shape) != shape:
            c, h, w = image_shape
            resize = f"dataset.resolution={h} (and the dataset.resample the model's data had), or " \
                if c == shape[0] and h == w else ""
            raise ValueError(f"the images are {list(image_shape)}, data set {data['name']} has {list(shape)} ones: "
                             f"score against the data set the images' model learned: {resize}dataset=NAME ...")
        cache = Path(cache_dir or default_cache_dir())
        folder, settings, key = _entry(cache, data, config)
        earlier = _entry(cache, data | {"root": dataset.root}, config)  # keyed with the folder's path, as before:
        if not (folder / "meta.json").is_file() and (earlier[0] / "meta.json").is_file():  # the same content
            folder, settings, key = earlier
        if (folder / "meta.json").is_file():
            return cls._load(folder, settings, key, data["classes"], device)
        with FolderLock(folder, key="quality cache", owner="quality classifier training", wait=True):
            if (folder / "meta.json").is_file():  # trained by a process that held the lock first
                return cls._load(folder, settings, key, data["classes"], device)
            return cls._train_and_cache(folder, images, labels, data, settings, key, config, device, progress)

    @classmethod
    def _train_and_cache(
        cls, folder: Path, images: torch.Tensor, labels: torch.Tensor, data: dict, settings: dict, key: str,
        config: ClassifierConfig, device: torch.device, progress: bool,
    ) -> "QualityScore":
        """Train the classifier, take the data's feature statistics and write the cache entry (meta.json last)."""
        start = time.time()
        logger.info("training the quality classifier of %s (%d images) -> %s", data["name"], len(images), folder)
        net, accuracy = _train(images, labels, data["classes"], config, device, progress)
        score = cls(net, np.zeros(1), np.zeros((1, 1)), {**settings, "key": key})
        phi = score.features(to_model_space(images))
        score.mu, score.sigma = phi.mean(0).numpy(), np.cov(phi.numpy(), rowvar=False)
        score.meta.update(holdout_accuracy=accuracy, train_seconds=round(time.time() - start, 1))
        state = {k: v.cpu() for k, v in net.state_dict().items()}
        atomic_write(folder / "classifier.pt", lambda f: torch.save(state, f))
        atomic_write(folder / "reference.npz", lambda f: np.savez(f, mu=score.mu, sigma=score.sigma))
        write_json(folder / "meta.json", score.meta)  # last: a folder without it is not a cache entry
        logger.info("quality classifier of %s: held-out accuracy %.3f", data["name"], accuracy)
        return score

    @classmethod
    def _load(cls, folder: Path, settings: dict, key: str, classes: int, device: torch.device) -> "QualityScore":
        fix = f"delete {folder} to train it again"
        try:
            meta = read_record(folder / "meta.json")
            with np.load(folder / "reference.npz") as ref:
                mu, sigma = ref["mu"], ref["sigma"]
        except (OSError, ValueError, RuntimeError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise QualityCacheError(f"quality cache {folder} is unreadable ({type(err).__name__}: {err}); {fix}") from None
        damaged = zip_crc_failure(folder / "classifier.pt")
        if damaged is not None:
            raise QualityCacheError(f"quality cache {folder}: classifier.pt is corrupt ({damaged}); {fix}")
        try:
            state = torch.load(folder / "classifier.pt", map_location="cpu", weights_only=True)
        except OSError as err:
            raise QualityCacheError(f"quality cache {folder} is unreadable ({err}); {fix}") from None
        except Exception as err:  # torch's own advice (weights_only=False) would run the file's code: not given here
            raise QualityCacheError(f"quality cache {folder}: classifier.pt is unreadable ({type(err).__name__}: "
                                    f"cut short or not a weights file); {fix}") from None
        if not isinstance(state, dict):
            raise QualityCacheError(f"quality cache {folder}: classifier.pt holds a {type(state).__name__}, not the "
                                    f"classifier's weights; {fix}")
        saved = {k: meta.get(k) for k in settings}
        if saved != json.loads(json.dumps(settings)) or meta.get("key") != key:
            raise QualityCacheError(f"quality cache {folder} was made for other data or settings; {fix}")
        config = settings["classifier"]
        net = FeatureClassifier(settings["data"]["channels"], classes, config["width"], config["feature_dim"])
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise QualityCacheError(f"quality cache {folder}: classifier weights do not fit ({err}); {fix}") from None
        logger.info("quality classifier of %s from cache %s", settings["data"]["name"], folder)
        return cls(net.to(device), mu, sigma, meta)
