"""Latent data sets in NVlabs/edm2's layout: one `NNNNN/img-mean-std-NNNNNNNN.npy` per image (the VAE
posterior's mean and std, float32 [2c, h, w]), dataset.json labels, in a folder or read in place from a zip.
edm-encode (edm.data.encode) writes them, with a latents.json that says which VAE and pixel data made them.
Items are (mean-std float32 [2c, h, w], one-hot label, index); training draws the latents from them
(edm.latent.final_latents). Arrays are read with numpy's pickle-free loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..latent import LATENTS_NAME
from .sets import BadImagesError, DatasetNotFoundError, ImageDataset, ImageSource, NoLabelsError, json_labels

__all__ = ["LATENT_SUFFIX", "latent_name", "LatentDataset", "read_latents_record"]

LATENT_SUFFIX = ".npy"


def latent_name(index: int) -> str:
    """edm2's name of image `index` in a latent data set: NNNNN/img-mean-std-NNNNNNNN.npy."""
    return f"{index:08d}"[:5] + f"/img-mean-std-{index:08d}.npy"


def read_latents_record(source: ImageSource) -> dict[str, Any]:
    """latents.json of a latent data set (the VAE, its fingerprint and the pixel data it encoded); the keys are
    None for a set without one (e.g. made by edm2's dataset_tool.py)."""
    record: dict[str, Any] = {"vae": None, "vae_fingerprint": None, "dataset": None, "pixel_shape": None}
    if LATENTS_NAME in source.all_names:
        try:
            with source.open(LATENTS_NAME) as f:
                record |= json.load(f)
        except (OSError, ValueError) as err:
            raise ValueError(f"{source.where(LATENTS_NAME)} is unreadable ({err}): encode the data set again") from None
    return record


class LatentDataset(ImageDataset):
    """A latent data set (see the module) in `root`, a folder or a zip; channels = c, the model's channels."""

    def __init__(self, root: str | Path, cond: bool = False) -> None:
        self.root = Path(root)
        if not (self.root.is_dir() or self.root.is_file()):
            raise DatasetNotFoundError(f"dataset.root={str(root)!r} does not exist: give the folder or zip that "
                                       "edm-encode (or edm2's dataset_tool.py encode) wrote")
        self.source = ImageSource(self.root, extensions=(LATENT_SUFFIX,))
        self.files = self.source.names
        if not self.files:
            raise DatasetNotFoundError(f"no {LATENT_SUFFIX} latents in {self.root}; encode images with edm-encode first")
        first = self._array(self.files[0])
        if first.ndim != 3 or first.shape[0] % 2 or first.shape[1] != first.shape[2]:
            raise BadImagesError(f"{self.source.where(self.files[0])} holds an array of shape {list(first.shape)}, not "
                                 "a VAE posterior's mean and std [2c, h, h]")
        self.shape = tuple(first.shape)
        self.channels, self.resolution = first.shape[0] // 2, first.shape[1]
        labelled = json_labels(self.source, self.files)
        self.labels = [labelled[name] for name in self.files] if labelled else [0] * len(self.files)
        self.num_classes = max(labelled.values()) + 1 if labelled else 0
        self.cond = bool(cond)
        if cond and not self.num_classes:
            raise NoLabelsError(f"dataset.cond=true needs class labels: {self.root} has no labelled dataset.json")
        self.latent = read_latents_record(self.source)

    def _array(self, name: str) -> np.ndarray:
        try:
            with self.source.open(name) as f:
                return np.load(f, allow_pickle=False)
        except Exception as err:  # numpy raises ValueError, OSError, EOFError, ... for bad files
            raise BadImagesError(f"{self.source.where(name)}: cannot read a latent array ({type(err).__name__}: {err}); "
                                 "encode the data set again") from None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        name = self.files[index]
        array = self._array(name)
        if array.shape != self.shape or array.dtype.kind != "f":
            raise BadImagesError(f"{self.source.where(name)} holds {array.dtype} {list(array.shape)}, the first latent "
                                 f"float {list(self.shape)}; encode the data set again")
        return torch.from_numpy(array.astype(np.float32)), self.one_hot(self.labels[index]), index
