"""Structured training configs: dataclasses mirroring configs/train.yaml and its groups.

Each dataclass has exactly the field names of its yaml group (schedule/, dataset/, sampler/;
network/ is `edm.networks.NetworkConfig`), so Hydra rejects an unknown key at composition.
`register_configs()` puts the schemas into Hydra's ConfigStore; `from_dictconfig` turns a
composed DictConfig into a `TrainConfig`; `check_config` rejects bad values with a message
that names the key and the valid choices. Library code takes the dataclasses only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .augment import AUGMENT_DIM, AugmentConfig
from .networks import NetworkConfig

__all__ = [
    "ScheduleConfig",
    "PrecondConfig",
    "LossConfig",
    "DatasetConfig",
    "SamplerConfig",
    "TrainConfig",
    "NetworkConfig",
    "AugmentConfig",
    "register_configs",
    "from_dictconfig",
    "check_config",
    "to_container",
    "MIXED_PRECISION",
    "DATASETS",
]

MIXED_PRECISION = ("no", "fp16", "bf16")
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "folder")


@dataclass
class ScheduleConfig:
    """σ(t), s(t): `edm.schedules.get(name, **options)`; None keeps the schedule's default.

    vp takes beta_d, beta_min, epsilon_s, t_end; ve, edm and fm take sigma_min, sigma_max;
    edm also takes rho.
    """

    name: str = "edm"
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    rho: Optional[float] = None
    beta_d: Optional[float] = None
    beta_min: Optional[float] = None
    epsilon_s: Optional[float] = None
    t_end: Optional[float] = None

    def options(self) -> Dict[str, float]:
        """The schedule options that are set (the keyword arguments of `edm.schedules.get`)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None}


@dataclass
class PrecondConfig:
    """`edm.Precond(net, kind, sigma_data, beta_d, beta_min, M)`; sigma_data also feeds the loss.

    kind None = the schedule's own; beta_d/beta_min None = the schedule's when it is VP, else VP's defaults.
    """

    kind: Optional[str] = None
    sigma_data: float = 0.5
    beta_d: Optional[float] = None
    beta_min: Optional[float] = None
    M: int = 1000


@dataclass
class LossConfig:
    """`edm.Loss(schedule, kind, sigma_data=precond.sigma_data, ...)`: σ density and weight λ(σ).

    kind None = the schedule's own; P_mean/P_std serve kind edm, epsilon_t vp and fm, t_dist and
    logit_* fm.
    """

    kind: Optional[str] = None
    P_mean: float = -1.2
    P_std: float = 1.2
    epsilon_t: float = 1e-5
    t_dist: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class DatasetConfig:
    """A training set (see edm/data.py): images in [−1, 1], optional one-hot labels.

    name: digits (embedded, no download) | mnist | fashion_mnist | cifar10 | folder.
    root: where the files are (unused for digits); resolution: resize to this (None = native);
    cond: class-conditional training (label_dim = number of classes); xflip: add mirrored copies.
    """

    name: str = "digits"
    root: Optional[str] = None
    resolution: Optional[int] = None
    cond: bool = False
    xflip: bool = False
    num_workers: int = 0
    max_size: Optional[int] = None


@dataclass
class SamplerConfig:
    """How sample grids are drawn: `edm.sample(..., solver, num_steps, discretization, **options)`."""

    solver: str = "heun"
    num_steps: int = 18
    discretization: Optional[str] = None
    final_denoise: bool = False
    options: Dict[str, float] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Everything `edm.train.train` needs. Lengths are in images (kimg = 1000 images) or steps.

    batch_size is the global batch of one optimizer step (all processes, all accumulation
    rounds); batch_per_device is the micro-batch one process runs at once (None: batch_size /
    number of processes, i.e. no accumulation). The learning rate ramps up linearly over
    lr_rampup_kimg and, if lr_decay_kimg > 0, decays as lr / sqrt(kimg / lr_decay_kimg) after it.
    EMA: β = 0.5^(batch_size / max(h, 1e-8)), h = min(ema_halflife_kimg·1000, cur_nimg·ema_rampup_ratio).
    """

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precond: PrecondConfig = field(default_factory=PrecondConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    run_dir: str = "runs/train"
    resume: bool = False
    seed: int = 0

    batch_size: int = 128
    batch_per_device: Optional[int] = None
    total_kimg: float = 200.0
    lr: float = 1e-3
    lr_rampup_kimg: float = 10.0
    lr_decay_kimg: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    grad_clip: Optional[float] = None
    ema_halflife_kimg: float = 500.0
    ema_rampup_ratio: Optional[float] = 0.05

    mixed_precision: str = "no"
    compile: bool = False
    channels_last: bool = False
    cpu: bool = False
    tf32: bool = True
    cudnn_benchmark: bool = True

    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    grid_every: int = 0
    grid_size: int = 64
    grid_scale: Optional[int] = None
    grid_seed: int = 0
    progress: bool = True
    tensorboard: bool = True
    log_batch_indices: bool = False


def register_configs() -> None:
    """Store TrainConfig in Hydra's ConfigStore as `base_train`, train.yaml's first default.

    Every group (schedule, precond, loss, network, dataset, sampler) is a typed field of it, so
    a yaml or command-line key that the dataclass lacks fails at composition.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_train", node=TrainConfig)


def from_dictconfig(cfg: Any) -> TrainConfig:
    """Composed Hydra config (DictConfig typed by base_train) -> TrainConfig, interpolations resolved."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, TrainConfig):
        raise TypeError(f"expected a config composed from base_train, got {type(obj).__name__}")
    return obj


def to_container(cfg: Any) -> Any:
    """Dataclasses -> plain dicts/lists/str/float/int/bool/None (for checkpoints and logs)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_container(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {str(k): to_container(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_container(v) for v in cfg]
    return cfg


def _choice(key: str, value: Any, valid: Any) -> None:
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and math.isfinite(value)):
        raise ValueError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def check_config(cfg: TrainConfig) -> None:
    """Reject bad values before any work starts; each message names the key and what is valid."""
    from . import losses, precond, samplers, schedules

    _choice("schedule.name", cfg.schedule.name, list(schedules.SCHEDULES))
    schedules.get(cfg.schedule.name, **cfg.schedule.options())  # raises on options the schedule lacks
    if cfg.precond.kind is not None:
        _choice("precond.kind", cfg.precond.kind, list(precond.PRECOND_KINDS))
    if cfg.loss.kind is not None:
        _choice("loss.kind", cfg.loss.kind, list(losses.LOSS_KINDS))
    _choice("loss.t_dist", cfg.loss.t_dist, ["uniform", "logit_normal"])
    _positive("precond.sigma_data", cfg.precond.sigma_data)
    _choice("dataset.name", cfg.dataset.name, DATASETS)
    if cfg.dataset.resolution is not None:
        _positive("dataset.resolution", cfg.dataset.resolution)
    _choice("sampler.solver", cfg.sampler.solver, list(samplers.SOLVERS))
    samplers.check_options(cfg.sampler.solver, samplers.SOLVERS[cfg.sampler.solver], dict(cfg.sampler.options))
    if cfg.sampler.discretization is not None:
        _choice("sampler.discretization", cfg.sampler.discretization, list(schedules.DISCRETIZATIONS))
    _positive("sampler.num_steps", cfg.sampler.num_steps)
    _choice("mixed_precision", cfg.mixed_precision, MIXED_PRECISION)
    if not 0 <= cfg.augment.p <= 1:
        raise ValueError(f"augment.p={cfg.augment.p!r} must be in [0, 1] (0 = no augmentation; EDM's CIFAR-10: 0.12)")
    for f in dataclasses.fields(cfg.augment):
        _positive(f"augment.{f.name}", getattr(cfg.augment, f.name), allow_zero=True)
    if cfg.augment.p > 0 and cfg.network.augment_dim not in (0, AUGMENT_DIM):
        raise ValueError(
            f"augment.p > 0 gives the network {AUGMENT_DIM} augmentation labels, but network.augment_dim="
            f"{cfg.network.augment_dim}: set network.augment_dim={AUGMENT_DIM} (or 0, which augment.p > 0 turns into {AUGMENT_DIM})"
        )
    _positive("batch_size", cfg.batch_size)
    if cfg.batch_per_device is not None:
        _positive("batch_per_device", cfg.batch_per_device)
    _positive("total_kimg", cfg.total_kimg)
    _positive("lr", cfg.lr)
    _positive("lr_rampup_kimg", cfg.lr_rampup_kimg, allow_zero=True)
    _positive("lr_decay_kimg", cfg.lr_decay_kimg, allow_zero=True)
    if len(cfg.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.adam_betas):
        raise ValueError(f"adam_betas={list(cfg.adam_betas)!r} must be two numbers in [0, 1)")
    _positive("adam_eps", cfg.adam_eps, allow_zero=True)
    if cfg.grad_clip is not None:
        _positive("grad_clip", cfg.grad_clip)
    _positive("ema_halflife_kimg", cfg.ema_halflife_kimg, allow_zero=True)
    if cfg.ema_rampup_ratio is not None:
        _positive("ema_rampup_ratio", cfg.ema_rampup_ratio)
    for key in ("log_every", "checkpoint_every"):
        _positive(key, getattr(cfg, key))
    for key in ("grid_every", "keep_checkpoints", "grid_size"):
        _positive(key, getattr(cfg, key), allow_zero=True)
    if cfg.grid_scale is not None:
        _positive("grid_scale", cfg.grid_scale)
