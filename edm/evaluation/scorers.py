"""Every metric in one table: a scorer maps images and their labels to numbers.

A scorer takes images [N, C, H, W] (uint8 pixels as saved, or floats in [−1, 1]) and their class
indices [N] (or None) and returns a dict of numbers, its headline number under the metric's name
(what edm-study plots). METRICS gives each metric its options (a
dataclass: `edm-eval metric=NAME metric.KEY=...`, `edm-sample eval.metrics=[NAME] eval.NAME.KEY=...`,
`edm-study eval.metrics=[...]`), how its scorer is built from them and a ScoringContext, and what it
scores. edm-eval, edm-sample and edm-study all iterate this table: a new metric is its scorer and
one row.

    fid     FID against reference statistics, images or the data set (+ precision/recall)  samples
    fd_cls  FD_cls (and class accuracy) in a classifier trained on the data set             samples
    bpd     bits/dim of data images under the context's model (a denoiser)                  data
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, List, Optional

import torch
from torch import Tensor

from ..choices import choose, keyword_defaults
from ..core import likelihood
from ..core.consistency import CONSISTENCY_OBJECTIVES
from ..core.schedules import Schedule, to_spec
from ..data import DatasetConfig, build_dataset, dataset_images
from ..files import file_sha256
from ..hardware import DTYPES
from ..progress import counted_batches
from . import metrics
from .quality import ClassifierConfig, QualityScore

__all__ = [
    "Scorer", "ScoringContext", "FidConfig", "FdClsConfig", "BpdConfig", "Metric", "METRICS", "check_metrics", "build_scorers",
    "eval_schema", "EvalConfig", "metric_files", "option_files", "evaluate", "NoDatasetError",
]

Scorer = Callable[[Tensor, Optional[Tensor]], dict]


class NoDatasetError(ValueError):
    """A metric needs a data set (its reference or classifier) and none was given or named by a model."""


@dataclass
class ScoringContext:
    """What a scorer may use besides its options: the data set (the reference of fid, the classifier's
    data of fd_cls; by default the model's training set), the device, images per forward pass, the
    default cache of reference statistics, the shape the scored images will have, and the model (a
    denoiser, its edm.models.loading.ModelInfo and the schedule to evaluate it under) when one is evaluated, and
    whether the work is counted on progress bars (stderr)."""

    dataset: DatasetConfig | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch: int = 64
    cache_dir: str | Path | None = None
    image_shape: tuple[int, ...] | None = None
    model: Any = None
    info: Any = None
    schedule: Schedule | None = None
    progress: bool = False


# ----------------------------------------------------------------------------- fid


@dataclass
class FidConfig:
    """FID (Heusel et al. 2017) in Inception-v3 features, and improved precision/recall."""

    inception: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth, or NVlabs' inception-2015-12-05.pkl/.pt
    allow_pickle: bool = False  # allow .pkl / TorchScript detectors (both run code stored in the file)
    ref: Optional[str] = None  # statistics .npz (mu, sigma) or reference images (folder / .npz); null: the data set
    cache_dir: Optional[str] = None  # where reference statistics of image data are cached (null: the context's)
    precision_recall: bool = False  # needs reference images
    pr_features: Optional[str] = None  # NVlabs' VGG-16 (vgg16.pt / vgg16.pkl, needs allow_pickle); null = Inception's
    k: int = 3  # neighbours of precision/recall
    max_images: Optional[int] = None  # use at most this many images of each set


def fid_scorer(cfg: FidConfig, ctx: ScoringContext) -> Scorer:
    """FID (and precision/recall) of images against cfg.ref, else the context's data set."""
    extractor = metrics.load_inception(cfg.inception, ctx.device, allow_pickle=cfg.allow_pickle)
    pr_extractor = None
    if cfg.pr_features is not None:
        if not cfg.precision_recall:
            raise ValueError("pr_features is the detector of precision/recall: set fid's precision_recall=true too")
        pr_extractor = metrics.load_vgg16(cfg.pr_features, ctx.device, allow_pickle=cfg.allow_pickle)
    common = dict(
        extractor_key=metrics.detector_key(cfg.inception),  # the weights, not their name
        cache_dir=cfg.cache_dir or ctx.cache_dir, batch_size=ctx.batch,
        device=ctx.device, with_precision_recall=cfg.precision_recall, k=cfg.k, max_images=cfg.max_images,
        pr_extractor=pr_extractor, pr_extractor_key=Path(cfg.pr_features).stem if cfg.pr_features else None,
        progress=ctx.progress,
    )
    if cfg.ref is not None:
        if metrics.is_statistics_file(cfg.ref):  # statistics of other weights are refused before any image is made
            metrics.load_statistics(cfg.ref, feature_extractor=common["extractor_key"])
        reference: dict[str, Any] = {"ref": cfg.ref}
    elif ctx.dataset is not None:
        batches, key = metrics.dataset_reference(ctx.dataset, ctx.batch)
        reference = {"ref_batches": batches, "ref_key": key}
    else:
        raise NoDatasetError("FID needs a reference: its ref=STATS.npz|IMAGES, or a data set (dataset=NAME "
                         "[dataset.root=PATH], or a model that names its training data)")
    return lambda images, labels=None: metrics.evaluate_images(images, extractor, **reference, **common)


# ----------------------------------------------------------------------------- fd_cls


@dataclass
class FdClsConfig:
    """FD_cls, the Fréchet distance in a small classifier's features trained on the data set (not FID)."""

    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    cache_dir: Optional[str] = None  # the classifiers' cache (null: $EDM_CACHE/quality or ~/.cache/edm/quality)


def fd_cls_scorer(cfg: FdClsConfig, ctx: ScoringContext) -> Scorer:
    """QualityScore of the context's data set (its classifier trained once and cached)."""
    if ctx.dataset is None:
        raise NoDatasetError("FD_cls needs the data set its classifier learns: dataset=NAME [dataset.root=PATH] (or a "
                         "model that names its training data)")
    return QualityScore.for_dataset(ctx.dataset, cfg.classifier, cache_dir=cfg.cache_dir, device=ctx.device,
                                    progress=ctx.progress, image_shape=ctx.image_shape)


# ----------------------------------------------------------------------------- bpd


_LIKELIHOOD, _BPD = keyword_defaults(likelihood.log_likelihood), keyword_defaults(likelihood.bits_per_dim)


@dataclass
class BpdConfig:
    """Bits/dim of 8-bit data under the context's model: the probability-flow ODE's exact log-likelihood
    (edm.core.likelihood), averaged over the images with its standard error."""

    num_steps: int = _LIKELIHOOD["num_steps"]  # ODE steps
    discretization: Optional[str] = _LIKELIHOOD["discretization"]  # time grid of the ODE
    integrator: str = _LIKELIHOOD["integrator"]  # rk4 | heun
    divergence_method: str = _LIKELIHOOD["divergence_method"]  # exact | hutchinson | auto
    hutchinson_noise: str = _LIKELIHOOD["hutchinson_noise"]  # rademacher | gaussian
    exact_max_dim: int = _LIKELIHOOD["exact_max_dim"]  # auto: exact up to this many dimensions
    dequantization: str = _BPD["dequantization"]  # uniform | center
    dtype: str = "float32"  # float32 | float64
    seed: int = 0  # seed of the dequantization and Hutchinson noise
    max_images: Optional[int] = None  # score the first N images only


def bpd_scorer(cfg: BpdConfig, ctx: ScoringContext) -> Scorer:
    """bits_per_dim of uint8 images (and labels, for a class-conditional model) under ctx.model."""
    if ctx.model is None:
        raise ValueError("bits/dim scores a model: give it (checkpoint=PATH)")
    objective = getattr(ctx.info, "objective", "denoising")
    if objective in CONSISTENCY_OBJECTIVES:  # its output is f(x̂; σ), no D(x̂; σ) whose ODE has a likelihood
        raise ValueError(f"bits/dim needs a denoiser: {ctx.info.source} is a consistency model (objective={objective}), "
                         "whose output does not define the probability-flow ODE; score the denoiser it was tuned from "
                         "(its run's init= model, or teacher= for scd) with checkpoint=")
    if cfg.num_steps < 1:
        raise ValueError(f"metric.num_steps={cfg.num_steps}: the ODE needs at least 1 step")
    dtype = choose(DTYPES, cfg.dtype, "dtype")
    schedule = ctx.schedule
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("dequantization", "dtype", "seed", "max_images")}
    label_dim = int(getattr(ctx.info, "label_dim", 0) or 0)

    def score(images: Tensor, labels: Tensor | None = None) -> dict:
        if images.is_floating_point():
            raise ValueError("bits/dim needs 8-bit images (uint8 0..255)")
        if label_dim and labels is None:
            raise ValueError("bits/dim of a class-conditional model needs the images' labels: use dataset=NAME")
        if label_dim and int(labels.max()) >= label_dim:
            raise ValueError(f"the model takes {label_dim} classes, the data has labels up to {int(labels.max())}")
        images, labels = images[:cfg.max_images], None if labels is None else labels[:cfg.max_images]
        generator = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
        values = []
        chunks = counted_batches(images.split(ctx.batch), "bits/dim", total=len(images), enabled=ctx.progress)
        for chunk, chunk_labels in zip(chunks, labels.split(ctx.batch) if label_dim else itertools.repeat(None)):
            x = chunk.to(ctx.device)
            one_hot = None
            if label_dim:
                one_hot = torch.nn.functional.one_hot(chunk_labels.long(), label_dim).to(ctx.device, dtype)
            values.append(likelihood.bits_per_dim(ctx.model, x, schedule, dequantization=cfg.dequantization,
                                                  generator=generator, class_labels=one_hot, dtype=dtype,
                                                  **options).double().cpu())
        if not values:
            raise ValueError("no images to score")
        bpd = torch.cat(values)
        bad = (~torch.isfinite(bpd)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"bits/dim is NaN or Inf for {len(bad)} of {len(bpd)} images (the first: image {bad[0]}): "
                             "the model's weights may be damaged, or the ODE unstable for it (more num_steps)")
        grid = likelihood.likelihood_grid(schedule, cfg.num_steps, cfg.discretization)
        return {"bpd": float(bpd.mean()), "bpd_stderr": float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else None,
                "bpd_num_images": len(bpd),
                "bpd_settings": {"model": getattr(ctx.info, "source", None), "schedule": to_spec(schedule),
                                 "sigma_min": float(schedule.sigma(grid[0])), "batch": ctx.batch, **dataclasses.asdict(cfg)}}

    return score


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Metric:
    """One row: the options' dataclass, the scorer built from them and a context, and what it scores
    ("samples": generated images; "data": data images under the context's model)."""

    schema: type
    build: Callable[[Any, ScoringContext], Scorer]
    scores: str = "samples"


METRICS: MappingProxyType[str, Metric] = MappingProxyType({
    "fid": Metric(FidConfig, fid_scorer),
    "fd_cls": Metric(FdClsConfig, fd_cls_scorer),
    "bpd": Metric(BpdConfig, bpd_scorer, scores="data"),
})


def eval_schema() -> type:
    """EvalConfig: `metrics` (the names to compute) and one field per row of METRICS with its options."""
    fields = [("metrics", List[str], field(default_factory=list))]
    fields += [(name, m.schema, field(default_factory=m.schema)) for name, m in METRICS.items()]
    doc = "Scores of generated images: `metrics` names the rows of edm.evaluation.scorers.METRICS to compute."
    return dataclasses.make_dataclass("EvalConfig", fields, namespace={"__doc__": doc, "__module__": __name__})


EvalConfig = eval_schema()


def check_metrics(cfg: Any, scores: str = "samples") -> list[Metric]:
    """The rows cfg.metrics names (an EvalConfig), each one that scores `scores`; a ValueError names any other."""
    rows = []
    repeated = sorted({name for name in cfg.metrics if list(cfg.metrics).count(name) > 1})
    if repeated:
        raise ValueError(f"eval.metrics names {', '.join(repeated)} more than once: name each metric once")
    for name in cfg.metrics:
        metric = choose(METRICS, name, "metric")
        if metric.scores != scores:
            raise ValueError(f"metric {name} scores {metric.scores} under a model, not generated images: "
                             f"use edm-eval metric={name}")
        rows.append(metric)
    return rows


def build_scorers(cfg: Any, ctx: ScoringContext, scores: str = "samples") -> dict[str, Scorer]:
    """{name: scorer} of the metrics cfg.metrics names (an EvalConfig); each must score `scores`."""
    return {name: metric.build(getattr(cfg, name), ctx) for name, metric in zip(cfg.metrics, check_metrics(cfg, scores))}


def metric_files(cfg: Any, names: list[str]) -> dict[str, str]:
    """option_files of each named metric's options in cfg (an EvalConfig)."""
    return {key: digest for name in names for key, digest in option_files(name, getattr(cfg, name)).items()}


def option_files(name: str, options: Any) -> dict[str, str]:
    """{"<name>.<key>_sha256": hash} of every option of metric `name` that names an existing file (detector weights,
    reference statistics): what a provenance record must pin besides the options."""
    return {f"{name}.{key}_sha256": file_sha256(value) for key, value in dataclasses.asdict(options).items()
            if isinstance(value, str) and Path(value).is_file()}


def evaluate(name: str, options: Any, ctx: ScoringContext, *, images: str | Path | None = None,
             data: str | Path | None = None) -> dict:
    """One metric's numbers (edm-eval): of the image files `images` for a metric of samples; of the data
    images `data` (a folder or .npz), else of ctx.dataset, under ctx.model for a metric of data."""
    metric = choose(METRICS, name, "metric")
    if metric.scores == "samples" and (images is None or data is not None):
        raise ValueError(f"metric={name} scores generated images: give images=PATH (a folder of image files or "
                         "an .npz), and its reference as the metric's options or dataset=NAME")
    if metric.scores == "data" and ((data is None) == (ctx.dataset is None) or images is not None):
        both = "not both, " if data is not None and ctx.dataset is not None else ""
        raise ValueError(f"metric={name} scores data under a model: give the data as data=PATH (folder or .npz) "
                         f"or dataset=NAME ({both}not images=), and the model as checkpoint=PATH")
    limit = getattr(options, "max_images", None)
    if limit is not None and limit < 1:
        raise ValueError(f"metric.max_images={limit}: give at least 1 (null: every image)")
    if ctx.info is not None:
        ctx = dataclasses.replace(ctx, image_shape=ctx.info.pixel_shape)
    elif images is not None:
        ctx = dataclasses.replace(ctx, image_shape=metrics.source_image_shape(images))
    scorer = metric.build(options, ctx)  # weights, references and classifiers before the images are read
    if images is not None:
        x, labels = metrics.read_images(images, limit)
    elif data is not None:
        x, labels = metrics.read_images(data, limit)
    else:
        x, labels = dataset_images(build_dataset(dataclasses.replace(ctx.dataset, max_size=limit or ctx.dataset.max_size)))
    return scorer(x, labels)
