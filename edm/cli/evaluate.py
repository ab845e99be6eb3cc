"""`edm-eval`: score images and models, FID (+ precision/recall), reference statistics, bits/dim.

    edm-eval metric=fid images=OUT ref=cifar10-32x32.npz inception=pt_inception-2015-12-05-6726825d.pth
    edm-eval metric=fid images=OUT/samples.npz dataset=cifar10 dataset.root=DATA inception=... precision_recall=true
    edm-eval metric=ref dataset=cifar10 dataset.root=DATA inception=... dest=refs/cifar10.npz
    edm-eval metric=bpd checkpoint=RUN/checkpoint-00100000.pt dataset=cifar10 dataset.root=DATA num=1000

report=FILE merges the numbers into a JSON file (e.g. the report.json that edm-sample wrote next
to the images) under "metrics". A key that the chosen metric does not use is refused. Nothing is
downloaded (`edm-eval --help`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..core import likelihood
from ..evaluation import metrics
from ..generation import outputs
from ..training.build import build_schedule
from ..files import OutputWriteError, write_json
from ..choices import choose
from . import CONFIG_DIR, fail
from ..training.config import ScheduleConfig
from ..data import DatasetConfig
from ..models.loading import load_model

__all__ = ["ScoreConfig", "EvaluateConfig", "score_images", "METRIC_KEYS"]


@dataclass
class ScoreConfig:
    """FID (and precision/recall) of generated images against a reference: the keys edm-sample's eval.* shares."""

    inception: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth, or NVlabs inception-2015-12-05.pkl/.pt
    allow_pickle: bool = False  # allow .pkl / TorchScript detectors (both run code stored in the file)
    ref: Optional[str] = None  # statistics .npz (mu, sigma) or reference images (folder / .npz); else dataset=NAME
    cache_dir: Optional[str] = None  # where reference statistics of image data are cached
    precision_recall: bool = False  # needs reference images
    pr_features: Optional[str] = None  # NVlabs' VGG-16 (vgg16.pt / vgg16.pkl, needs allow_pickle); null = Inception's
    k: int = 3  # neighbours of precision/recall
    batch: int = 64  # images per forward pass
    max_images: Optional[int] = None  # use at most this many images of each set


@dataclass
class EvaluateConfig(ScoreConfig):
    metric: Optional[str] = None  # fid | ref | bpd
    images: Optional[str] = None  # fid: generated images (folder of PNGs or .npz)
    data: Optional[str] = None  # ref, bpd: images (folder or .npz) instead of dataset=NAME
    dest: Optional[str] = None  # ref: the statistics .npz to write (mu, sigma, num_images)
    report: Optional[str] = None  # merge the numbers into this JSON file (under "metrics")
    cpu: bool = False  # run on CPU even when a GPU is present
    checkpoint: Optional[str] = None  # bpd: edm checkpoint (.pt or run folder), model folder or NVlabs .pkl
    ema: bool = True  # bpd: EMA weights (false: the raw ones)
    num: Optional[int] = None  # bpd: the first NUM images
    steps: int = 128  # bpd: ODE steps
    discretization: str = "karras"  # bpd: time grid of the ODE
    integrator: str = "rk4"  # bpd: rk4 | heun
    divergence: str = "hutchinson"  # bpd: exact | hutchinson | auto
    noise: str = "rademacher"  # bpd: Hutchinson probes, rademacher | gaussian
    dequantization: str = "uniform"  # bpd: uniform | center
    dtype: str = "float32"  # bpd: float32 | float64
    seed: int = 0  # bpd: seed of the dequantization and Hutchinson noise
    schedule: Optional[ScheduleConfig] = None  # bpd: the `schedule` group; null = the checkpoint's
    dataset: Optional[DatasetConfig] = None  # the `dataset` group (configs/dataset/), as in training


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)

_SHARED = {"batch", "cpu", "report", "dataset", "metric"}
_SCORE = {f.name for f in dataclasses.fields(ScoreConfig)}
METRIC_KEYS = {  # the keys each metric reads; any other key on the command line is refused
    "fid": _SHARED | _SCORE | {"images"},
    "ref": _SHARED | {"data", "dest", "inception", "allow_pickle", "max_images"},
    "bpd": _SHARED | {"checkpoint", "ema", "data", "num", "steps", "discretization", "integrator", "divergence",
                      "noise", "dequantization", "dtype", "seed", "schedule"},
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def score_images(e: ScoreConfig, images: str | Path, dataset: Optional[DatasetConfig], device: torch.device,
                 default_cache: str | Path | None = None) -> dict:
    """FID (and precision/recall) of `images` against e.ref, else the data set `dataset`."""
    extractor = metrics.load_inception(e.inception, device, allow_pickle=e.allow_pickle)
    pr_extractor = None
    if e.pr_features is not None:
        if not e.precision_recall:
            raise ValueError("pr_features is the detector of precision/recall: add precision_recall=true")
        pr_extractor = metrics.load_vgg16(e.pr_features, device, allow_pickle=e.allow_pickle)
    common = dict(
        extractor_key=Path(e.inception).stem, cache_dir=e.cache_dir or default_cache, batch_size=e.batch, device=device,
        with_precision_recall=e.precision_recall, k=e.k, max_images=e.max_images,
        pr_extractor=pr_extractor, pr_extractor_key=Path(e.pr_features).stem if e.pr_features else None,
    )
    if e.ref is not None:
        return metrics.evaluate_images(images, extractor, ref=e.ref, **common)
    if dataset is None:
        raise ValueError("FID needs a reference: ref=STATS.npz|IMAGES or dataset=NAME [dataset.root=PATH]")
    batches, key = metrics.dataset_reference(dataset, e.batch)
    return metrics.evaluate_images(images, extractor, ref_batches=batches, ref_key=key, **common)


def _dataset(cfg: EvaluateConfig, cond: bool = False) -> Optional[DatasetConfig]:
    if cfg.dataset is None:
        return None
    return dataclasses.replace(cfg.dataset, cond=cond, max_size=cfg.num if cfg.metric == "bpd" else cfg.dataset.max_size)


def _one_source(cfg: EvaluateConfig, key: str, what: str, forms: str = "folder or .npz") -> None:
    """Exactly one of `key`=PATH and dataset=NAME."""
    if (getattr(cfg, key) is None) == (cfg.dataset is None):
        raise ValueError(f"metric={cfg.metric}: give the {what} as {key}=PATH ({forms}) or dataset=NAME")


def run_fid(cfg: EvaluateConfig, device: torch.device) -> dict:
    if cfg.images is None:
        raise ValueError("metric=fid needs images=PATH (a folder of PNGs or an .npz)")
    _one_source(cfg, "ref", "reference", "statistics .npz, image folder or .npz")
    return score_images(cfg, cfg.images, _dataset(cfg), device)


def run_ref(cfg: EvaluateConfig, device: torch.device) -> dict:
    _one_source(cfg, "data", "images")
    if cfg.dest is None:
        raise ValueError("metric=ref needs dest=FILE.npz, where the statistics go")
    extractor = metrics.load_inception(cfg.inception, device, allow_pickle=cfg.allow_pickle)
    if cfg.data is not None:
        batches = metrics.image_batches(cfg.data, cfg.batch, cfg.max_images)
    else:
        batches = metrics.dataset_reference(_dataset(cfg), cfg.batch)[0]()
    mu, sigma, n = metrics.feature_statistics(extractor, batches, device=device, max_images=cfg.max_images)
    metrics.save_statistics(cfg.dest, mu, sigma, n)
    return {"statistics": str(cfg.dest), "num_images": n, "feature_extractor": Path(cfg.inception).stem}


def _bpd_batches(cfg: EvaluateConfig, label_dim: int):
    """(uint8 images [B, C, H, W], one-hot labels or None) batches of the data, at most `num` images."""
    if cfg.dataset is not None:
        from torch.utils.data import DataLoader

        from ..data import build_dataset

        data = build_dataset(_dataset(cfg, cond=label_dim > 0))
        if label_dim and data.label_dim != label_dim:
            raise ValueError(f"the model has label_dim {label_dim}, the data set {data.label_dim}")
        for images, labels, _ in DataLoader(data, batch_size=cfg.batch):
            yield images, (labels if label_dim else None)
        return
    if label_dim:
        raise ValueError("bits/dim of a class-conditional model needs labels: use dataset=NAME (its class labels)")
    for x in metrics.image_batches(cfg.data, cfg.batch, cfg.num):
        yield ((x + 1) * 127.5).round().to(torch.uint8), None


def run_bpd(cfg: EvaluateConfig, device: torch.device) -> dict:
    _one_source(cfg, "data", "test images")
    if cfg.checkpoint is None:
        raise ValueError("metric=bpd needs checkpoint=PATH (a run folder, checkpoint, model folder or NVlabs .pkl)")
    dtype = choose(DTYPES, cfg.dtype, "dtype")
    denoiser, info = load_model(cfg.checkpoint, ema=cfg.ema, device=device)
    info.require_pixels()
    schedule = build_schedule(cfg.schedule) if cfg.schedule is not None else info.schedule
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    options = dict(
        num_steps=cfg.steps, discretization=cfg.discretization, integrator=cfg.integrator,
        divergence_method=cfg.divergence, hutchinson_noise=cfg.noise, dtype=dtype,
    )
    values = []
    for images, labels in _bpd_batches(cfg, info.label_dim):
        images = images.to(device)
        labels = None if labels is None else labels.to(device=device, dtype=dtype)
        bpd = likelihood.bits_per_dim(
            denoiser, images, schedule, dequantization=cfg.dequantization, generator=generator,
            class_labels=labels, **options,
        )
        values.append(bpd.cpu())
        print(f"{sum(len(v) for v in values)} images: {float(torch.cat(values).mean()):.4f} bits/dim", file=sys.stderr)
    if not values:
        raise ValueError("no test images")
    bpd = torch.cat(values).double()
    return {
        "bpd": float(bpd.mean()), "bpd_stderr": float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else None,
        "bpd_num_images": len(bpd),
        "bpd_settings": {
            "checkpoint": str(Path(cfg.checkpoint).resolve()), "schedule": {"name": schedule.name, **dataclasses.asdict(schedule)},
            "sigma_min": float(schedule.sigma(likelihood.likelihood_grid(schedule, cfg.steps, cfg.discretization)[0])),
            "dequantization": cfg.dequantization, "seed": cfg.seed, "batch": cfg.batch, "ema": cfg.ema,
            **{k: (str(v) if k == "dtype" else v) for k, v in options.items()},
        },
    }


RUNS = {"fid": run_fid, "ref": run_ref, "bpd": run_bpd}


def check_keys(metric: Optional[str], overrides: list[str]) -> None:
    """The metric is one of RUNS, and every key given on the command line is one it reads."""
    if metric is None:
        raise ValueError("say what to compute: metric=fid | ref | bpd (edm-eval --help)")
    choose(RUNS, metric, "metric")
    given = {o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] for o in overrides}
    unused = sorted(k for k in given - METRIC_KEYS[metric] if k != "hydra")
    if unused:
        others = {k: [m for m, keys in METRIC_KEYS.items() if k in keys] for k in unused}
        raise ValueError(f"metric={metric} does not read {', '.join(unused)} (" + "; ".join(
            f"{k}: {'metric=' + '|'.join(m) if m else 'no metric'}" for k, m in others.items()) + ")")


def merge_report(path: str | None, numbers: dict) -> None:
    """Add `numbers` under "metrics" of the JSON file at `path` (created if absent)."""
    if path is None:
        return
    report: dict[str, Any] = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    report.setdefault("metrics", {}).update(numbers)
    write_json(path, report)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(dcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        check_keys(dcfg.metric, list(HydraConfig.get().overrides.task))
        cfg: EvaluateConfig = OmegaConf.to_object(dcfg)
        device = torch.device("cpu" if cfg.cpu or not torch.cuda.is_available() else "cuda")
        numbers = RUNS[cfg.metric](cfg, device)
        merge_report(cfg.report, numbers)
    except (ValueError, FileNotFoundError, ImportError, OutputWriteError) as err:
        fail("edm-eval", err)
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
