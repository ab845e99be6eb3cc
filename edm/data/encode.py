"""Encoding a data set with a VAE (edm-encode): any data set we read becomes a latent data set in NVlabs/edm2's
layout (edm.data.latents), streamed, resumable and in one or many processes.

    encode_dataset(EncodeConfig(dataset=DatasetConfig("folder", root="images"), latent=LatentConfig(vae="vae"),
                                out="latents"))

Image i goes to NNNNN/img-mean-std-NNNNNNNN.npy (float32 [2c, h, w]: the posterior's mean and std, the VAE
seeing x/255 as edm2's encoder), each file written atomically as its batch is encoded, so memory does not
grow with the data set and a stopped run continues where it stopped. Process r of W encodes images r, r + W, ...
The main process owns the folder (a lock and a provenance record of the VAE's fingerprint and the data set),
then writes dataset.json (the labels, when the data set has classes) and latents.json (the VAE, the pixel data,
its shape, the raw latents' statistics per channel). An `out` ending in .zip is encoded into OUT.parts/ and packed into the zip at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import FolderLock, atomic_write, to_container, write_json
from ..latent import LATENTS_NAME, LatentConfig, load_vae
from ..progress import progress_bar
from ..provenance import claim, refuse_foreign_folder
from .latents import latent_name
from .registry import DatasetConfig, build_dataset, dataset_record
from .sets import LABELS_NAME, ImageDataset, resolved_root, root_contents_key

__all__ = ["EncodeConfig", "encode_dataset", "raw_statistics", "LATENTS_FORMAT"]

logger = logging.getLogger(__name__)
LATENTS_FORMAT = "edm-latents/1"


@dataclass
class EncodeConfig:
    """Every key of edm-encode: the pixel data (`dataset` group), the VAE (`latent.vae`, latent.batch images
    per call, latent.dtype), the output folder or .zip."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    out: str = "???"
    overwrite: bool = False  # delete out's earlier latents first (else other settings are refused)
    cpu: bool = False
    progress: bool = True


def _source(cfg: DatasetConfig) -> dict:
    """The pixel data set as latents.json and the provenance record name it: root absolute, and without the
    settings that do not change the latents (labels are always carried over; dataset_record drops the workers)."""
    return dataset_record(cfg) | {"root": resolved_root(cfg.root), "cond": False}


def _images_record(dataset: ImageDataset, root: str | None) -> dict:
    """Which images latent k is of: their count, for a folder or zip a hash of its ordered file names (a file
    added or removed shifts every later index), and the root's root_contents_key (a file replaced in place changes
    it)."""
    base = dataset
    while getattr(base, "files", None) is None and getattr(base, "base", None) is not None:
        base = base.base  # through Subset and XFlip
    files = getattr(base, "files", None)
    digest = hashlib.sha256("\n".join(files[: len(dataset)]).encode()).hexdigest() if files is not None else None
    contents = root_contents_key(root) if root else None
    return {"count": len(dataset), "files_sha256": digest, "contents": contents}


def _latent_complete(path: Path) -> bool:
    """Whether a latent file holds a whole .npy array (a write cut short by a machine crash leaves less)."""
    try:
        np.load(path, mmap_mode="r", allow_pickle=False)  # maps the whole array: refused when the file is short
    except (OSError, ValueError, EOFError):
        return False
    return True


def _pack(folder: Path, names: list[str], dest: Path) -> None:
    """Store `names` of `folder` in the zip `dest`, uncompressed (as edm2's dataset_tool.py), atomically."""
    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
            for name in names:
                z.write(folder / name, name)

    atomic_write(dest, write)


MAP_KEYS = ("raw_mean", "raw_std", "final_mean", "final_std")  # the latent map: training's, not the stored latents'


def check_no_latent_map(latent: LatentConfig) -> None:
    """Refuse latent.raw_mean/raw_std/final_mean/final_std set to other than their defaults: edm-encode stores the
    raw posteriors and records no map, so they would be dropped without a word; edm-train takes them."""
    defaults = LatentConfig()
    changed = [f"latent.{key}" for key in MAP_KEYS
               if np.asarray(getattr(latent, key), float).tolist() != np.asarray(getattr(defaults, key), float).tolist()]
    if changed:
        raise ValueError(f"{', '.join(changed)}: edm-encode stores the VAE's raw latents, which the latent map does not "
                         "change (it is not recorded); set the map on edm-train (dataset=latent "
                         f"{' '.join(key + '=...' for key in changed)}) and drop it here")


# settings each process may have its own of, the rest must agree: its loader's workers and its VAE calls' batch (neither
# is in the latents' record)
PER_PROCESS_SETTINGS = ("progress", "dataset.num_workers", "latent.batch")


def encode_dataset(cfg: EncodeConfig) -> dict:
    """Encode cfg.dataset into cfg.out in every process of the launch (accelerate's PartialState); returns the
    main process's report (images encoded now, by all processes, and in all; the output)."""
    from accelerate import PartialState
    from accelerate.utils import reduce

    from ..hardware import check_same_settings, check_shared_folder, use_cpu

    check_no_latent_map(cfg.latent)
    state = PartialState(cpu=use_cpu(cfg.cpu))
    check_same_settings(to_container(cfg), "edm-encode", ignore=PER_PROCESS_SETTINGS)  # each encodes its share of one folder
    out = Path(cfg.out)
    packed = out.suffix.lower() == ".zip"
    work = out.with_name(out.name + ".parts") if packed else out
    if packed and out.exists() and not cfg.overwrite:
        raise FileExistsError(f"out {out} exists: choose another out=, or pass overwrite=true to replace it")
    dataset = build_dataset(dataclasses.replace(cfg.dataset, cond=False))  # labels: dataset.label_of
    if dataset.latent is not None:
        raise ValueError(f"dataset {cfg.dataset.name} holds latents already; encode a pixel data set")
    vae = load_vae(cfg.latent, device=state.device, latent_map=False)  # any VAE: the map is training's
    if dataset.channels not in (1, vae.in_channels):
        raise ValueError(f"the VAE takes {vae.in_channels}-channel images, data set {cfg.dataset.name} has "
                         f"{dataset.channels} channels")
    if dataset.resolution % vae.factor:
        raise ValueError(f"the VAE downsamples by {vae.factor}: dataset.resolution={dataset.resolution} must be a "
                         f"multiple of it")
    record = {"format": LATENTS_FORMAT, "vae_fingerprint": vae.fingerprint, "vae_dtype": cfg.latent.dtype,
              "dataset": _source(cfg.dataset), "images": _images_record(dataset, cfg.dataset.root)}
    refuse_foreign_folder(work)  # not a training run's folder nor a model folder
    lock = None
    if state.is_main_process:
        lock = FolderLock(work, key="out", owner="encoder").acquire()
        try:
            earlier = [work / LABELS_NAME, work / LATENTS_NAME, *work.glob("[0-9]" * 5)]
            claim(work, record, earlier, command="edm-encode", overwrite=cfg.overwrite)
        except BaseException:
            lock.release()
            raise
        logger.info("encoding %d images of %s with VAE %s (%s) on %d process(es) -> %s", len(dataset), cfg.dataset.name,
                    vae.name, vae.fingerprint, state.num_processes, out)
    try:
        check_shared_folder(state, work, "out")  # every process's latents in the one folder the main process finishes
        mine = _encode_shard(dataset, vae, work, state.process_index, state.num_processes, cfg)
        logger.info("process %d encoded %d image(s)", state.process_index, mine)
        made = int(reduce(torch.tensor(mine, device=state.device), reduction="sum"))  # all processes'; waits for all
        if not state.is_main_process:
            return {}
        return _finish(dataset, vae, cfg, work, out, packed, made)
    finally:
        if lock is not None:
            lock.release()


def _encode_shard(dataset: ImageDataset, vae, work: Path, rank: int, world: int, cfg: EncodeConfig) -> int:
    """Encode this process's images that have no file yet; returns how many."""
    mine = range(rank, len(dataset), world)
    todo = [i for i in mine if not _latent_complete(work / latent_name(i))]  # missing, or cut short
    if len(todo) < len(mine):
        logger.info("resuming: %d of this process's images are encoded already", len(mine) - len(todo))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, todo), batch_size=vae.batch,
                                         num_workers=cfg.dataset.num_workers)
    bar = progress_bar(len(todo), "encoding", "img") if cfg.progress and rank == 0 else None
    try:
        for images, _, indices in loader:
            mean_std = vae.encode_pixels(images).cpu().numpy()
            for index, array in zip(indices.tolist(), mean_std):
                atomic_write(work / latent_name(index), lambda f: np.save(f, array), durable=False)
            if bar is not None:
                bar.update(len(indices))
    finally:
        if bar is not None:
            bar.close()
    return len(todo)


def raw_statistics(paths) -> dict[str, list[float]]:
    """Per channel, the mean and standard deviation of the raw latents z = mean + std·n over a latent data set's
    files (one pass; float64 sums): E[z] = avg(mean), Var[z] = avg(mean² + std²) − E[z]²."""
    first = second = None
    count = 0
    for path in paths:
        try:
            array = np.load(path, allow_pickle=False).astype(np.float64)
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"latent {path} is unreadable ({type(err).__name__}: {err}): delete it and run "
                             "edm-encode again to encode its image anew") from None
        mean, std = np.split(array, 2)
        s1, s2 = mean.sum(axis=(1, 2)), (mean**2 + std**2).sum(axis=(1, 2))
        first, second = (s1, s2) if first is None else (first + s1, second + s2)
        count += mean[0].size
    mu = first / count
    return {"mean": [round(float(v), 4) for v in mu],
            "std": [round(float(v), 4) for v in np.sqrt(np.maximum(second / count - mu**2, 0))]}


def _finish(dataset: ImageDataset, vae, cfg: EncodeConfig, work: Path, out: Path, packed: bool, made: int) -> dict:
    """dataset.json and latents.json beside the latents (then the zip, when asked); the report."""
    names = [latent_name(i) for i in range(len(dataset))]
    missing = [name for name in names if not (work / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} latents are missing in {work} (e.g. {missing[0]}): run edm-encode again to "
                           "finish them")
    labels = [[name, dataset.label_of(i)] for i, name in enumerate(names)] if dataset.num_classes else None
    write_json(work / LABELS_NAME, {"labels": labels})
    pixel_shape = [dataset.channels, dataset.resolution, dataset.resolution]
    statistics = raw_statistics(work / name for name in names)
    write_json(work / LATENTS_NAME, {"format": LATENTS_FORMAT, "vae": vae.name, "vae_fingerprint": vae.fingerprint,
                                     "vae_dtype": cfg.latent.dtype, "dataset": _source(cfg.dataset),
                                     "pixel_shape": pixel_shape, "images": len(names), "raw_statistics": statistics})
    logger.info("raw latent statistics per channel: mean %s, std %s (latent.raw_mean and latent.raw_std default to EDM2's "
                "for sd-vae-ft-mse; set them to these for another VAE)", statistics["mean"], statistics["std"])
    if packed:
        _pack(work, [*names, LABELS_NAME, LATENTS_NAME], out)
        shutil.rmtree(work)
    report = {"out": str(out), "images": len(names), "encoded_now": made, "vae": vae.name,
              "vae_fingerprint": vae.fingerprint, "latent_shape": [2 * vae.latent_channels, *[s // vae.factor for s in pixel_shape[1:]]]}
    logger.info("%d latents %s -> %s", len(names), json.dumps(report["latent_shape"]), out)
    return report
