"""Structured training configs: dataclasses mirroring configs/train.yaml and its groups.

Each group's schema has exactly the options of the library object it configures, with that
object's defaults, so a default is written once (in the library) and Hydra rejects an unknown
key at composition:
  schedule/  edm.core.schedules.ScheduleConfig: `name` plus every option of the schedules
  precond    PrecondConfig: the keyword arguments of edm.Precond
  loss       LossConfig: the fields of edm.Loss (sigma_data comes from precond)
  network/   edm.networks.NetworkConfig;  dataset/  edm.data.DatasetConfig
  sampler/   edm.core.samplers.SamplerConfig;  augment   edm.data.augment.AugmentConfig
  latent     edm.latent.LatentConfig: the VAE of a latent data set (dataset=latent) and its latent map
edm.cli.train stores the schema in Hydra's ConfigStore; `check_config` rejects bad values with a
message that names the key and the valid choices. Library code takes the dataclasses only.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

from ..choices import check_choice, choose, options_schema
from ..core.consistency import CONSISTENCY_OBJECTIVES, ECTLoss, SCMLoss, check_ect_stages, samplers_for
from ..core.losses import LOSS_KINDS, Loss
from ..core.meanflow import MeanFlowLoss
from ..core.precond import PRECOND_KINDS, Precond
from ..core.samplers import CONSISTENCY_SOLVERS, MEANFLOW_SOLVERS, SamplerConfig
from ..core.schedules import SCHEDULES, ScheduleConfig
from ..data import DatasetConfig, check_dataset
from ..data.augment import AUGMENT_DIM, AugmentConfig
from ..hardware import MIXED_PRECISION
from ..latent import LatentConfig
from ..networks import NetworkConfig

__all__ = [
    "ScheduleConfig",
    "PrecondConfig",
    "LossConfig",
    "ECTConfig",
    "SCMConfig",
    "MeanFlowConfig",
    "OBJECTIVES",
    "DatasetConfig",
    "SamplerConfig",
    "TrainConfig",
    "NetworkConfig",
    "AugmentConfig",
    "LatentConfig",
    "check_config",
    "run_folder",
]

PrecondConfig = options_schema(
    "PrecondConfig", Precond, skip=("net",), unset=("kind", "beta_d", "beta_min", "M", "C_1", "C_2", "logvar_channels"),
    module=__name__,
    doc="`edm.Precond(net, **options)`; sigma_data also feeds the loss. kind None = the schedule's parameterization; "
        "beta_d/beta_min None = the schedule's when it is VP, M/C_1/C_2 the schedule's when it is iddpm, else "
        "Precond's defaults; logvar_channels None = "
        "LOGVAR_CHANNELS when the loss learns its weighting, else 0.",
)

LossConfig = options_schema(
    "LossConfig", Loss, skip=("schedule", "sigma_data"), module=__name__,
    doc="`edm.Loss(schedule, sigma_data=precond.sigma_data, **options)`: σ density and weight λ(σ); "
        "kind None = the schedule's parameterization; P_mean/P_std None = the kind's (edm: −1.2, 1.2; edm2: −0.4, 1.0); "
        "learned_weighting None = the kind's (edm2).",
)

ECTConfig = options_schema(
    "ECTConfig", ECTLoss, skip=("sigma_data", "boundary_sigma", "stage"), module=__name__,
    doc="`edm.core.consistency.ECTLoss(sigma_data=precond.sigma_data, boundary_sigma=precond.boundary_sigma, **options)`: "
        "ECT's consistency loss (objective=ect).",
)

SCMConfig = options_schema(
    "SCMConfig", SCMLoss, skip=("sigma_data", "boundary_sigma", "warmup", "teacher"), module=__name__,
    doc="`edm.core.consistency.SCMLoss(sigma_data=precond.sigma_data, boundary_sigma=precond.boundary_sigma, **options)`: "
        "sCM's continuous-time consistency loss (objective=sct, or scd with teacher=MODEL).",
)

MeanFlowConfig = options_schema(
    "MeanFlowConfig", MeanFlowLoss, module=__name__,
    doc="`edm.core.meanflow.MeanFlowLoss(**options)`: MeanFlow's average-velocity loss (objective=meanflow).",
)

# What a run optimizes: edm.Loss (the `loss` group), ECTLoss (`ect`), SCMLoss (`scm`; scd: with `teacher`) or
# MeanFlowLoss (`meanflow`).
OBJECTIVES = ("denoising", "ect", "sct", "scd", "meanflow")


@dataclass
class TrainConfig:
    """Everything `edm.training.loop.train` needs, with the defaults of `edm-train` (the tiny network
    on the embedded digits, minutes on a CPU). Lengths are in images (kimg = 1000 images) or steps.

    batch_size is the global batch of one optimizer step (all processes, all accumulation
    rounds); batch_per_device is the micro-batch one process runs at once (None: batch_size /
    number of processes, i.e. no accumulation). The learning rate ramps up linearly over
    lr_rampup_kimg and, if lr_decay_kimg > 0, decays as lr / sqrt(kimg / lr_decay_kimg) after it.
    EMA: β = 0.5^(batch_size / max(h, 1e-8)), h = min(ema_halflife_kimg·1000, cur_nimg·ema_rampup_ratio).
    ema_sigma_rel: power-function EMAs (EDM2) tracked beside it, one per σ_rel; every ema_snapshot_kimg
    their weights go to run_dir/phema/ for post-hoc EMA (edm-posthoc).
    objective: "denoising" optimizes `loss` (edm.Loss), "ect" `ect` (ECT's consistency loss), "sct" and "scd" `scm`
    (sCM's continuous-time consistency loss; scd distils the model `teacher`), "meanflow" `meanflow` (MeanFlow's
    average velocity, for flow matching with network.second_noise).
    init: a trained model (run folder, checkpoint, model folder or NVlabs .pkl) whose EMA weights start the
    run, with its network and preconditioning: network.dropout, network.label_dropout and precond.boundary_sigma
    are the config's where set; any other network or precond value of the config, defaults included (a network
    preset other than the default, precond.sigma_data), must be the model's (edm.training.build.check_init_settings).
    """

    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="edm"))
    precond: PrecondConfig = field(default_factory=PrecondConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    ect: ECTConfig = field(default_factory=ECTConfig)
    scm: SCMConfig = field(default_factory=SCMConfig)
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)

    objective: str = "denoising"
    init: Optional[str] = None
    teacher: Optional[str] = None
    run_dir: Optional[str] = None  # None: runs/<dataset>-<schedule>-<network> (run_folder)
    resume: bool = False
    seed: int = 0

    batch_size: int = 64
    batch_per_device: Optional[int] = None
    total_kimg: float = 96.0
    lr: float = 2e-3
    lr_rampup_kimg: float = 5.0
    lr_decay_kimg: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    adam_eps: float = 1e-8
    grad_clip: Optional[float] = None
    ema_halflife_kimg: float = 500.0
    ema_rampup_ratio: Optional[float] = 0.05
    ema_sigma_rel: List[float] = field(default_factory=list)  # EDM2 power-function EMAs, e.g. [0.05, 0.10]
    ema_snapshot_kimg: float = 0.0  # snapshots of those EMAs every this many kimg (0 = none)

    mixed_precision: Optional[str] = None  # None = the launcher's (accelerate launch / accelerate config), else "no"
    compile: Optional[bool] = None  # None = the launcher's dynamo backend, else off
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
    trackers: List[str] = field(default_factory=lambda: ["tensorboard"])  # accelerate's: tensorboard, wandb, mlflow, aim, comet_ml, ...
    tracker_project: str = "edm"  # the trackers' project (W&B, MLflow, ...); TensorBoard writes run_dir/<it>
    log_batch_indices: bool = False


FLOAT32_MAX = 3.4028234663852886e38  # larger values overflow to inf in the float32 arithmetic of training


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{key}={value!r} must be {bound if math.isfinite(value) else 'a finite number ' + bound}")
    if value > FLOAT32_MAX:
        raise ValueError(f"{key}={value!r} overflows float32 (largest {FLOAT32_MAX:.3g}); give a smaller value")


def _check_power_ema(cfg: TrainConfig) -> None:
    from .phema import SIGMA_REL_MAX

    rels = list(cfg.ema_sigma_rel)
    bad = [r for r in rels if not 0 < r < SIGMA_REL_MAX]
    if bad:
        raise ValueError(f"ema_sigma_rel={rels}: each σ_rel must lie in (0, {SIGMA_REL_MAX:.4f}) (EDM2 uses [0.05, 0.10])")
    if len(set(rels)) != len(rels):
        raise ValueError(f"ema_sigma_rel={rels} names a profile twice")
    _positive("ema_snapshot_kimg", cfg.ema_snapshot_kimg, allow_zero=True)
    if cfg.ema_snapshot_kimg > 0 and not rels:
        raise ValueError("ema_snapshot_kimg > 0 stores power-function EMAs: set ema_sigma_rel too, e.g. [0.05,0.10]")
    if rels and cfg.ema_snapshot_kimg == 0:
        raise ValueError(f"ema_sigma_rel={rels} tracks power-function EMAs for post-hoc EMA, which edm-posthoc makes from "
                         "their snapshots: set ema_snapshot_kimg=K too (recipe=small: 8), or drop ema_sigma_rel")


def run_folder(cfg: TrainConfig) -> str:
    """cfg.run_dir, else runs/<dataset.name>-<schedule.name>-<network.name> (runs/digits-edm-tiny by default)."""
    return cfg.run_dir or f"runs/{cfg.dataset.name}-{cfg.schedule.name}-{cfg.network.name}"


def check_config(cfg: TrainConfig) -> None:
    """Reject bad values before any work starts; each message names the key and what is valid.

    The schedule's options, the sampler and the network preset are checked where they are
    built (edm.training.build, SamplerConfig, edm.networks.build), each in one place.
    """
    choose(SCHEDULES, cfg.schedule.name, "schedule.name")  # (None, a model's own schedule, is for sampling)
    if cfg.precond.kind is not None:
        choose(PRECOND_KINDS, cfg.precond.kind, "precond.kind")
    if cfg.loss.kind is not None:
        check_choice(LOSS_KINDS, cfg.loss.kind, "loss.kind")
    check_choice(OBJECTIVES, cfg.objective, "objective")
    if cfg.objective in CONSISTENCY_OBJECTIVES and cfg.sampler.solver not in CONSISTENCY_SOLVERS:
        raise ValueError(f"objective={cfg.objective} trains a consistency model; its sample grids need sampler=consistency "
                         f"(recipe=ect sets it), not {cfg.sampler.solver}")
    if cfg.objective not in CONSISTENCY_OBJECTIVES and cfg.sampler.solver in CONSISTENCY_SOLVERS:
        raise ValueError(f"sampler={cfg.sampler.solver} samples consistency models: train one with objective=ect "
                         f"(recipe=ect), or sample this objective's model with {samplers_for(cfg.objective)}")
    for key in ("init", "teacher"):
        path = getattr(cfg, key)
        if path is not None and not os.path.exists(path):
            raise ValueError(f"{key}={path!r} does not exist: give a run folder, checkpoint, model folder or NVlabs .pkl")
    if cfg.sampler.solver in MEANFLOW_SOLVERS and cfg.objective != "meanflow":
        raise ValueError(f"sampler={cfg.sampler.solver} samples MeanFlow models: train one with objective=meanflow "
                         f"(recipe=meanflow), or sample this objective's model with {samplers_for(cfg.objective)}")
    if cfg.objective == "meanflow" and cfg.init is None and not cfg.network.second_noise:
        raise ValueError("objective=meanflow needs the network's second noise input (t − r): set network.second_noise=true "
                         "(recipe=meanflow does; with init= the model gets it, zero-initialized)")
    if (cfg.objective == "scd") != (cfg.teacher is not None):
        raise ValueError("objective=scd distils a teacher: set teacher=MODEL (a trained denoiser)" if cfg.objective == "scd"
                         else f"teacher={cfg.teacher} is used by objective=scd only (objective={cfg.objective})")
    _positive("precond.sigma_data", cfg.precond.sigma_data)
    check_dataset(cfg.dataset)
    if cfg.latent.vae is not None and cfg.dataset.name != "latent":
        raise ValueError(f"latent.vae={cfg.latent.vae} decodes latent data sets; dataset {cfg.dataset.name} holds pixels: "
                         "encode it first (edm-encode) and train with dataset=latent dataset.root=LATENTS, or drop latent.vae")
    if cfg.dataset.resolution is not None:
        _positive("dataset.resolution", cfg.dataset.resolution)
    if cfg.dataset.max_size is not None:
        _positive("dataset.max_size", cfg.dataset.max_size)
    if cfg.mixed_precision is not None:
        check_choice(MIXED_PRECISION, cfg.mixed_precision, "mixed_precision")
    if not 0 <= cfg.augment.p <= 1:
        raise ValueError(f"augment.p={cfg.augment.p!r} must be in [0, 1] (0 = no augmentation; EDM's CIFAR-10: 0.12)")
    for f in dataclasses.fields(cfg.augment):
        _positive(f"augment.{f.name}", getattr(cfg.augment, f.name), allow_zero=True)
    if cfg.augment.p > 0 and cfg.network.augment_dim not in (None, 0, AUGMENT_DIM):
        raise ValueError(
            f"augment.p > 0 gives the network {AUGMENT_DIM} augmentation labels, but network.augment_dim="
            f"{cfg.network.augment_dim}: set network.augment_dim={AUGMENT_DIM} (or 0, which augment.p > 0 turns into {AUGMENT_DIM})"
        )
    _positive("batch_size", cfg.batch_size)
    if cfg.batch_per_device is not None:
        _positive("batch_per_device", cfg.batch_per_device)
    _positive("total_kimg", cfg.total_kimg)
    if cfg.objective == "ect" and cfg.ect.q > 1 and cfg.ect.stage_kimg > 0:  # (other q, stage_kimg: ECTLoss refuses)
        check_ect_stages(cfg.ect.q, cfg.ect.stage_kimg, cfg.total_kimg)
    _positive("lr", cfg.lr)
    _positive("lr_rampup_kimg", cfg.lr_rampup_kimg, allow_zero=True)
    _positive("lr_decay_kimg", cfg.lr_decay_kimg, allow_zero=True)
    if len(cfg.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.adam_betas):
        raise ValueError(f"adam_betas={list(cfg.adam_betas)!r} must be two numbers in [0, 1)")
    _positive("adam_eps", cfg.adam_eps, allow_zero=True)
    if cfg.grad_clip is not None:
        _positive("grad_clip", cfg.grad_clip)
    _positive("ema_halflife_kimg", cfg.ema_halflife_kimg, allow_zero=True)
    _check_power_ema(cfg)
    if cfg.ema_rampup_ratio is not None:
        _positive("ema_rampup_ratio", cfg.ema_rampup_ratio)
    for key in ("log_every", "checkpoint_every"):
        _positive(key, getattr(cfg, key))
    for key in ("grid_every", "keep_checkpoints", "grid_size"):
        _positive(key, getattr(cfg, key), allow_zero=True)
    if cfg.grid_scale is not None:
        _positive("grid_scale", cfg.grid_scale)
