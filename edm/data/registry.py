"""The data sets by name (the `dataset` config group): DatasetConfig, the DATASETS table and build_dataset.

A new data set is a loader entry in DATASETS (here, or a function of edm.data.sets) and its
configs/dataset/<name>.yaml; one that reads no dataset.root is also named in BUNDLED.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..choices import choose
from .latents import LatentDataset
from .sets import (
    DEFAULT_RESAMPLE, FASHION_MNIST_DEBIAN_ROOT, LABELS_NAME, DatasetNotFoundError, ImageDataset,
    ImageFolderDataset, Subset, XFlip, load_cifar10, load_digits, load_mnist,
)

__all__ = ["DatasetConfig", "DATASETS", "BUNDLED", "build_dataset", "check_dataset", "dataset_images", "dataset_record", "resample_unrecorded",
           "UNRECORDED_RESAMPLE"]

logger = logging.getLogger(__name__)


@dataclass
class DatasetConfig:
    """A training set (the `dataset` config group): images in [−1, 1], optional one-hot labels.

    name: a key of DATASETS (digits: embedded, no download); root: where the files are (unused
    for digits); resolution: resize to this (None = native; center-cropped to a square first) with PIL's `resample`
    filter (lanczos, as NVlabs dataset_tool.py; bicubic, bilinear, box, nearest); cond: class-conditional training
    (label_dim = number of classes); xflip: add mirrored copies; max_size: use the first N images;
    skip_bad: leave out the image files of a folder that cannot be read or do not fit.
    """

    name: str = "digits"
    root: Optional[str] = None
    resolution: Optional[int] = None
    resample: str = DEFAULT_RESAMPLE
    cond: bool = False
    xflip: bool = False
    num_workers: int = 0
    max_size: Optional[int] = None
    skip_bad: bool = False  # folder: leave out unreadable or mismatched image files (listed in a warning)


def _folder(cfg: DatasetConfig) -> ImageDataset:
    """Images in dataset.root, a folder or a zip (see ImageFolderDataset)."""
    if cfg.root is None or not (Path(cfg.root).is_dir() or Path(cfg.root).suffix.lower() == ".zip" and Path(cfg.root).is_file()):
        raise DatasetNotFoundError(
            f"dataset.root={cfg.root!r} is neither a folder nor a .zip; point it at a folder of images or a .zip of them "
            f"(class labels from a {LABELS_NAME}, as NVlabs dataset_tool.py writes, or one subfolder per class)"
        )
    return ImageFolderDataset(cfg.root, cfg.resolution, cfg.cond, cfg.skip_bad, cfg.resample)


def _latent(cfg: DatasetConfig) -> ImageDataset:
    """A latent data set in dataset.root (edm.data.latents): the VAE's latents have their own resolution."""
    if cfg.resolution is not None:
        raise ValueError(f"dataset.resolution={cfg.resolution} cannot resize a latent data set: encode the images at "
                         "the resolution you want (edm-encode dataset.resolution=R), and leave it unset here")
    if cfg.root is None:
        raise DatasetNotFoundError("dataset=latent needs dataset.root: the folder or zip that edm-encode wrote")
    return LatentDataset(cfg.root, cfg.cond)


DATASETS: MappingProxyType[str, Callable[[DatasetConfig], ImageDataset]] = MappingProxyType({
    "digits": lambda cfg: load_digits(cfg.resolution, cfg.cond, cfg.resample),
    "mnist": lambda cfg: load_mnist(cfg.root, False, cfg.resolution, cfg.cond, cfg.resample),
    # The Debian package dataset-fashion-mnist installs the files in FASHION_MNIST_DEBIAN_ROOT.
    "fashion_mnist": lambda cfg: load_mnist(cfg.root or FASHION_MNIST_DEBIAN_ROOT, True, cfg.resolution, cfg.cond,
                                            cfg.resample),
    "cifar10": lambda cfg: load_cifar10(cfg.root, cfg.resolution, cfg.cond, cfg.resample),
    "folder": _folder,
    "latent": _latent,
})
"""dataset.name -> the loader of that training set: a new data set is one entry here (and its yaml; in BUNDLED too
when it reads no dataset.root)."""


# What a record of a resized data set that names no filter stands for: it predates dataset.resample, and its images
# went through filters that no value of the setting repeats.
UNRECORDED_RESAMPLE = "unrecorded (bilinear, or bicubic for folders)"


def dataset_record(cfg: DatasetConfig) -> dict:
    """The config as records of what was made from it hold it: without num_workers (workers only read), and with
    resample None when nothing is resized (no filter touches the pixels, so records written before the setting
    existed still compare equal)."""
    return dataclasses.asdict(cfg) | {"num_workers": None} | ({} if cfg.resolution is not None else {"resample": None})


def resample_unrecorded(record: Mapping[str, Any]) -> bool:
    """Whether a data set record (a DatasetConfig as a dict) resizes but names no filter (UNRECORDED_RESAMPLE)."""
    return record.get("resolution") is not None and "resample" not in record


DATA_IDENTITY = ("name", "resolution", "resample")  # what makes a data set's images, where a model's record holds it


def other_images(recorded: Mapping[str, Any] | None, ours: Mapping[str, Any] | None) -> list[tuple[str, Any, Any]]:
    """(key, recorded's, ours) for each DATA_IDENTITY field in which two data set records (DatasetConfig dicts) make
    other images, where both name it; the filter counts only where both sets are resized. [] when either is unknown."""
    if not recorded or not ours:
        return []
    resized = recorded.get("resolution") is not None and ours.get("resolution") is not None
    return [(key, recorded[key], ours[key]) for key in DATA_IDENTITY
            if recorded.get(key) is not None and ours.get(key) is not None and recorded[key] != ours[key]
            and (key != "resample" or resized)]


BUNDLED = ("digits",)  # data sets that read no dataset.root (shipped inside a package, or made in memory)


def check_dataset(cfg: DatasetConfig) -> None:
    """A known dataset.name, and no dataset.root for a bundled set (one set with another's root in mind would
    train on the bundled images unnoticed)."""
    choose(DATASETS, cfg.name, "dataset.name")
    if cfg.name in BUNDLED and cfg.root is not None:
        *reading, last = [name for name in DATASETS if name not in BUNDLED]
        raise ValueError(f"dataset={cfg.name} is bundled and reads no dataset.root (got {cfg.root}): drop dataset.root, "
                         f"or name the data set it holds: dataset={', '.join(reading)} or {last}")


def warn_missing_classes(full: ImageDataset, subset: ImageDataset) -> list[int]:
    """Warn where dataset.max_size's first N items hold only some of the set's classes (a set stored sorted by class:
    class folders, MNIST-style sorted files), so the subset is no sample of the data. Returns the classes left out."""
    if full.num_classes < 2 or len(subset) == len(full):
        return []
    missing = sorted({full.label_of(i) for i in range(len(full))} - {subset.label_of(i) for i in range(len(subset))})
    if missing:
        listed = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        logger.warning("dataset.max_size=%d keeps the first %d of %d items, which hold no image of class(es) %s: the "
                       "set is stored in class order, so the subset is no sample of it", len(subset), len(subset),
                       len(full), listed)
    return missing


def build_dataset(cfg: DatasetConfig) -> ImageDataset:
    """The training set described by `cfg` (see DatasetConfig and DATASETS), subset and mirrored as asked."""
    check_dataset(cfg)
    dataset = DATASETS[cfg.name](cfg)
    if cfg.max_size is not None:
        subset = Subset(dataset, cfg.max_size)
        warn_missing_classes(dataset, subset)
        dataset = subset
    if cfg.xflip:
        dataset = XFlip(dataset)
    logger.info(
        "dataset %s: %d %s, %dx%dx%d, label_dim %d",
        cfg.name, len(dataset), "latents" if dataset.latent is not None else "images", dataset.channels,
        dataset.resolution, dataset.resolution, dataset.label_dim,
    )
    return dataset


def dataset_images(dataset: ImageDataset, indices: Sequence[int] | None = None) -> tuple[Tensor, Tensor | None]:
    """(uint8 images [N, C, H, W], class indices [N] or None when unconditional) of a data set's items
    (all of them, or `indices`), in memory: for scoring and for the quality classifier."""
    if dataset.latent is not None:
        raise ValueError("a latent data set holds VAE latents, not images: score against the pixel data it was encoded "
                         f"from ({(dataset.latent.get('dataset') or {}).get('name') or 'dataset=NAME'})")
    items = [dataset[int(i)] for i in (range(len(dataset)) if indices is None else indices)]
    if not items:
        raise ValueError("no images to read")
    images = torch.stack([item[0] for item in items])
    labels = torch.stack([item[1].argmax() for item in items]) if dataset.label_dim else None
    return images, labels
