"""`python -m edm.train`: train any network under any schedule, on CPU, one GPU or many.

    python -m edm.train                                    # tiny net on embedded digits, CPU, minutes
    python -m edm.train schedule=ve network=ddpmpp dataset=cifar10 dataset.root=/data
    accelerate launch -m edm.train dataset=cifar10 ...      # multi-GPU / multi-node

One step: draw σ and n, per-example loss λ(σ)‖D(y + σn; σ) − y‖² (edm.Loss), optimize its batch
mean divided by the pixels per example C·H·W (so lr and grad_clip do not depend on resolution),
then an EMA update of the weights. Hydra's main only converts the config and calls `train`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .augment import AUGMENT_DIM, augment
from .config import TrainConfig, check_config, from_dictconfig, register_configs, to_container
from .data import ImageDataset, StreamBatchSampler, build_dataset, make_loader, save_image_grid, to_model_space
from .losses import Loss
from .samplers import sample
from .sampling import initial_noise, make_generators
from .schedules import VP, Schedule, get as get_schedule

__all__ = [
    "train",
    "train_step",
    "update_ema",
    "ema_beta",
    "learning_rate",
    "make_optimizer",
    "set_precision_flags",
    "denoiser_spec",
    "RunState",
    "TrainResult",
    "TrainingDivergedError",
    "RunDirError",
    "CONFIG_DIR",
    "main",
]

logger = logging.getLogger(__name__)


def _config_dir() -> str:
    """The Hydra configs: edm/configs in an installed wheel, else configs/ at the top of the repo
    (a checkout or an editable install; Hydra names the folder if it is missing)."""
    here = Path(__file__).resolve().parent
    packaged = here / "configs"
    return str(packaged if (packaged / "train.yaml").is_file() else here.parent / "configs")


CONFIG_DIR = _config_dir()


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; nothing was saved after the last finite check."""


class RunDirError(FileExistsError):
    """run_dir already holds checkpoints of another run and resume is off."""


@dataclass
class RunState:
    """The counters of a run: optimizer steps taken and training images seen."""

    step: int = 0
    cur_nimg: int = 0


@dataclass
class TrainResult:
    """What a finished (or interrupted) run left behind."""

    state: RunState
    checkpoint: Path | None
    grid: Path | None
    metrics: Path
    interrupted: bool = False


# ----------------------------------------------------------------------------- step math


def learning_rate(cur_nimg: int, lr: float, rampup_kimg: float, decay_kimg: float = 0.0) -> float:
    """lr · min(n / (rampup_kimg·1000), 1), times 1/sqrt(max(n / (decay_kimg·1000), 1)) if decay_kimg > 0."""
    value = lr * min(cur_nimg / max(rampup_kimg * 1000, 1e-8), 1.0)
    if decay_kimg > 0:
        value /= math.sqrt(max(cur_nimg / (decay_kimg * 1000), 1.0))
    return value


def ema_beta(cur_nimg: int, batch_size: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    """β = 0.5^(B / max(h, 1e-8)), h = min(halflife_kimg·1000, cur_nimg·rampup_ratio)  (EDM)."""
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """θ_ema ← β θ_ema + (1 − β) θ for parameters; buffers are copied."""
    ema_params = list(ema.parameters())
    if ema_params:
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def train_step(
    model: nn.Module,
    loss_fn: Loss,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[Tensor, Tensor | None]],
    accelerator: Any,
    generator: torch.Generator,
    lr: float,
    grad_clip: float | None = None,
) -> Tensor:
    """One optimizer step on the global batch, split into micro-batches (gradient accumulation).

    Each micro-batch is (y, class_labels) or (y, class_labels, augment_labels). Optimizes
    mean_batch(λ‖D − y‖²) / (C·H·W); gradients are averaged over micro-batches and processes.
    Returns that loss as a device tensor (no host sync).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, (y, labels, *augment_labels) in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        kwargs = {"augment_labels": augment_labels[0]} if augment_labels and augment_labels[0] is not None else {}
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            loss = loss_fn(model, y, labels, generator=generator, **kwargs).mean() / y[0].numel()
            accelerator.backward(loss / len(micro_batches))
        total += loss.detach()
    if grad_clip is not None:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(micro_batches)


# ----------------------------------------------------------------------------- set-up


def denoiser_spec(cfg: TrainConfig, dataset: ImageDataset) -> dict:
    """{"network": build kwargs, "precond": Precond kwargs}. The data set decides img_resolution,
    in_channels and label_dim (resize with dataset.resolution); out_channels defaults to in_channels."""
    network = {k: v for k, v in to_container(cfg.network).items() if v is not None}
    for key, value in (
        ("img_resolution", dataset.resolution), ("in_channels", dataset.channels), ("label_dim", dataset.label_dim)
    ):
        if network.get(key) not in (None, value):
            logger.info("network.%s=%s replaced by %s from data set %s", key, network[key], value, cfg.dataset.name)
        network[key] = value
    network.setdefault("out_channels", network["in_channels"])
    if cfg.augment.p > 0:
        network["augment_dim"] = AUGMENT_DIM  # the network is told each image's augmentation
    return {"network": network, "precond": precond_kwargs(cfg)}


def precond_kwargs(cfg: TrainConfig) -> dict:
    """Precond keyword arguments with the defaults filled in: kind = the schedule's, VP β's = the schedule's."""
    p, schedule = cfg.precond, get_schedule(cfg.schedule.name, **cfg.schedule.options())
    vp = schedule if isinstance(schedule, VP) else VP()
    return {
        "kind": p.kind or schedule.name,
        "sigma_data": p.sigma_data,
        "beta_d": vp.beta_d if p.beta_d is None else p.beta_d,
        "beta_min": vp.beta_min if p.beta_min is None else p.beta_min,
        "M": p.M,
    }


def schedule_spec(cfg: TrainConfig) -> dict:
    """{"name": ..., **options}: the arguments of edm.schedules.get."""
    return {"name": cfg.schedule.name, **cfg.schedule.options()}


def make_loss(cfg: TrainConfig, schedule: Schedule) -> Loss:
    """edm.Loss of the config; sigma_data is the precond's, so that λ c_out² = 1 holds."""
    c = cfg.loss
    return Loss(
        schedule, kind=c.kind, sigma_data=cfg.precond.sigma_data, P_mean=c.P_mean, P_std=c.P_std,
        epsilon_t=c.epsilon_t, t_dist=c.t_dist, logit_mean=c.logit_mean, logit_std=c.logit_std,
    )


def set_backend_flags(cfg: TrainConfig) -> None:
    """TF32 and cuDNN autotuning from the config (entry points only; the library never sets them)."""
    set_precision_flags(cfg.tf32, cfg.cudnn_benchmark)


def set_precision_flags(tf32: bool, cudnn_benchmark: bool) -> None:
    """TF32 for the fp32 matmuls/convs that remain, and cuDNN autotuning (entry points call this)."""
    precision = "tf32" if tf32 else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark


def make_optimizer(
    params, lr: float, betas: Sequence[float], eps: float, device: torch.device
) -> torch.optim.Optimizer:
    """Adam; the fused CUDA kernel on GPUs (one launch for all parameters), the default elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def use_cpu(cfg: TrainConfig) -> bool:
    """CPU when asked or when there is no GPU; then processes started by a launcher join over gloo."""
    return cfg.cpu or not torch.cuda.is_available()


@dataclass
class Run:
    """The live objects of one training run, handed to the I/O helpers."""

    cfg: TrainConfig
    accelerator: Any
    model: nn.Module  # prepared (possibly DDP / compiled) denoiser used for training
    net: nn.Module  # the plain Precond module whose state_dict is saved
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Loss
    schedule: Schedule
    generator: torch.Generator
    spec: dict
    dataset: ImageDataset
    state: RunState = field(default_factory=RunState)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def _seed_for(seed: int, rank: int) -> int:
    """Per-process seed of the training-noise generator and the global RNG (dropout)."""
    return (int(seed) * 7919 + 1 + rank) % (2**63)


def rng_state(generator: torch.Generator) -> dict:
    """This process's random state: the global CPU/CUDA RNGs and the training-noise generator."""
    cuda = torch.cuda.get_rng_state() if generator.device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "generator": generator.get_state()}


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and generator.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])
    generator.set_state(state["generator"])


def _differences(saved: Any, ours: Any, prefix: str = "") -> list[str]:
    """'key: checkpoint X, config Y' for each leaf where two plain containers differ."""
    saved, ours = to_container(saved), to_container(ours)
    if isinstance(saved, dict) and isinstance(ours, dict):
        return [d for k in sorted(set(saved) | set(ours), key=str)
                for d in _differences(saved.get(k), ours.get(k), f"{prefix}{k}.")]
    return [] if saved == ours else [f"{prefix[:-1]}: checkpoint {saved!r}, config {ours!r}"]


def restore(run: Run, path: Path) -> None:
    """Load model, EMA, optimizer, counters and this process's RNG state from checkpoint `path`."""
    state = ckpt.load_checkpoint(path)
    for key in ("optimizer", "step", "cur_nimg", "rng"):
        if key not in state:
            raise ckpt.CheckpointError(f"checkpoint {path} has no {key!r}: it holds weights only and cannot be resumed")
    diffs = _differences({"denoiser": state["denoiser"], "schedule": state["schedule"]},
                         {"denoiser": run.spec, "schedule": schedule_spec(run.cfg)})
    if diffs:
        raise ckpt.CheckpointError(
            f"checkpoint {path} does not match the config ({'; '.join(diffs)}); "
            "resume with the settings it was trained with, or start a new run_dir"
        )
    try:
        run.net.load_state_dict(state["model"])
        run.ema.load_state_dict(state["ema"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ckpt.CheckpointError(f"checkpoint {path}: saved weights do not fit the model: {err}") from None
    if state.get("grad_scaler") is not None and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(state["grad_scaler"])
    run.state = RunState(step=int(state["step"]), cur_nimg=int(state["cur_nimg"]))
    per_rank = state["rng"]
    rank, world = run.accelerator.process_index, run.accelerator.num_processes
    if len(per_rank) == world:
        set_rng_state(run.generator, per_rank[rank])
    else:
        logger.warning("checkpoint was written by %d processes, this run has %d: random streams are re-seeded", len(per_rank), world)
        torch.manual_seed(_seed_for(run.cfg.seed + run.state.step, rank))
        run.generator.manual_seed(_seed_for(run.cfg.seed + run.state.step, rank))
    logger.info("resumed from %s at step %d (%.1f kimg)", path, run.state.step, run.state.cur_nimg / 1000)


# ----------------------------------------------------------------------------- I/O


def save_checkpoint(run: Run) -> Path:
    """Write run_dir/checkpoint-<step>.pt atomically (main process) and prune old ones; every
    process must call this (the per-process RNG states are gathered)."""
    from accelerate.utils import gather_object

    rng = gather_object([rng_state(run.generator)])
    path = ckpt.checkpoint_path(run.run_dir, run.state.step)
    if run.is_main:
        scaler = run.accelerator.scaler
        ckpt.save_checkpoint(path, {
            "format": "edm-checkpoint-v1",
            "denoiser": run.spec,
            "schedule": schedule_spec(run.cfg),
            "model": run.net.state_dict(),
            "ema": run.ema.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "step": run.state.step,
            "cur_nimg": run.state.cur_nimg,
            "rng": rng,
            "config": to_container(run.cfg),
        })
        if run.cfg.keep_checkpoints > 0:
            for _, old in ckpt.list_checkpoints(run.run_dir)[: -run.cfg.keep_checkpoints]:
                old.unlink(missing_ok=True)
        logger.info("saved %s", path)
    run.accelerator.wait_for_everyone()
    return path


def grid_scale(cfg: TrainConfig, dataset: ImageDataset) -> int:
    """Pixel upscaling of grids: cfg.grid_scale, or ceil(64 / resolution) so tiles are >= 64 px."""
    return cfg.grid_scale or max(1, math.ceil(64 / dataset.resolution))


@torch.no_grad()
def write_grid(run: Run, path: Path) -> Path:
    """Sample grid_size images with the EMA denoiser and the configured sampler; one seed per image."""
    cfg, ds, device = run.cfg, run.dataset, run.accelerator.device
    shape = (ds.channels, ds.resolution, ds.resolution)
    generators = make_generators(range(cfg.grid_seed, cfg.grid_seed + cfg.grid_size), device)
    noise = initial_noise(generators, shape, torch.float32, device)
    labels = None
    if ds.label_dim > 0:
        labels = torch.eye(ds.label_dim, device=device)[torch.arange(cfg.grid_size, device=device) % ds.label_dim]
    s = cfg.sampler
    images = sample(
        run.ema, noise, run.schedule, num_steps=s.num_steps, solver=s.solver, class_labels=labels,
        generator=generators, discretization=s.discretization, final_denoise=s.final_denoise, **s.options,
    )
    return save_image_grid(images, path, scale=grid_scale(cfg, ds))


class RunLog:
    """Main-process logging sinks: metrics.jsonl (appended on resume), TensorBoard if installed, a tqdm bar."""

    def __init__(self, run: Run, total_steps: int) -> None:
        self.enabled = run.is_main
        self.path = run.run_dir / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        self.file = open(self.path, "a", encoding="utf-8")
        if run.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run.run_dir / "tensorboard"))
            except ImportError:
                logger.info("tensorboard is not installed; metrics go to %s only", self.path)
        if run.cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=run.state.step, unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def log(run_log: RunLog, record: dict) -> None:
    """One metrics record: a JSON line, TensorBoard scalars and the progress bar's numbers."""
    if not run_log.enabled:
        return
    run_log.file.write(json.dumps(record) + "\n")
    run_log.file.flush()
    if run_log.writer is not None:
        for key in ("loss", "lr", "images_per_s", "ema_beta"):
            run_log.writer.add_scalar(f"train/{key}", record[key], record["step"])
    if run_log.bar is not None:
        run_log.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}", refresh=False)
    logger.debug("%s", record)


class StopOnSignal:
    """While active, the first SIGINT (Ctrl-C) or SIGTERM only sets `requested`: the loop then saves a
    checkpoint and stops. A second SIGINT raises KeyboardInterrupt at once. Main thread only."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s: saving a checkpoint after this step (Ctrl-C again exits without saving)", signal.Signals(signum).name)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- the run


def setup(cfg: TrainConfig) -> Run:
    """Data, denoiser, EMA, optimizer and accelerator; resumes from run_dir's latest checkpoint if asked."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps mixed precision and dynamo settings in a process-wide singleton; forget
    # those of an earlier train() in this process (the distributed PartialState is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, cpu=use_cpu(cfg), dynamo_backend="inductor" if cfg.compile else "no"
    )
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning("mixed_precision=fp16 has no effect on CPU (accelerate autocasts only bf16 there); use bf16")
    run_dir = Path(cfg.run_dir)
    latest = ckpt.find_latest(run_dir)
    if latest is not None and not cfg.resume:
        raise RunDirError(
            f"run_dir {run_dir} already holds {latest.name}; pass resume=true to continue that run, "
            "or choose another run_dir (or delete the folder) to start over"
        )
    dataset = build_dataset(cfg.dataset)
    spec = denoiser_spec(cfg, dataset)
    schedule = get_schedule(cfg.schedule.name, **cfg.schedule.options())

    torch.manual_seed(cfg.seed)  # identical initial weights in every process
    net = ckpt.build_denoiser(spec).train()
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = make_optimizer(net.parameters(), cfg.lr, cfg.adam_betas, cfg.adam_eps, accelerator.device)
    model, optimizer = accelerator.prepare(net, optimizer)
    ema.to(accelerator.device)
    rank = accelerator.process_index
    torch.manual_seed(_seed_for(cfg.seed, rank))
    generator = torch.Generator(accelerator.device).manual_seed(_seed_for(cfg.seed, rank))
    run = Run(cfg, accelerator, model, net, ema, optimizer, make_loss(cfg, schedule), schedule, generator, spec, dataset)
    if cfg.resume and latest is not None:
        restore(run, latest)
    elif cfg.resume:
        logger.warning("resume=true but %s holds no checkpoint: starting a new run", run_dir)
    nparams = sum(p.numel() for p in net.parameters())
    logger.info("network %s: %d parameters; %d process(es) on %s", spec["network"]["name"], nparams, accelerator.num_processes, accelerator.device)
    return run


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which saves before stopping."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _batches(run: Run, micro_batch: int):
    """Endless (y in [−1, 1], one-hot labels or None, augmentation labels or None, indices)
    micro-batches on the device; augmented (cfg.augment) with the run's generator."""
    acc, cfg = run.accelerator, run.cfg
    sampler = StreamBatchSampler(
        len(run.dataset), cfg.seed, cfg.batch_size, micro_batch, acc.process_index, acc.num_processes,
        start_nimg=run.state.cur_nimg,
    )
    loader = make_loader(
        run.dataset, sampler, cfg.dataset.num_workers, pin_memory=acc.device.type == "cuda",
        worker_init_fn=_ignore_sigint,
    )
    for images, labels, indices in loader:
        y = to_model_space(images.to(acc.device, non_blocking=True))
        if cfg.channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        labels = labels.to(acc.device, non_blocking=True) if labels.shape[1] > 0 else None
        augment_labels = None
        if cfg.augment.p > 0:
            y, augment_labels = augment(y, cfg.augment, run.generator)
        yield y, labels, augment_labels, indices


def train(cfg: TrainConfig, callback: Callable[[Run], None] | None = None) -> TrainResult:
    """Train until total_kimg; `callback(run)` runs after every step (tests use it to inject faults)."""
    check_config(cfg)
    run = setup(cfg)
    acc, state = run.accelerator, run.state
    world = acc.num_processes
    micro = cfg.batch_per_device or cfg.batch_size // world
    if cfg.batch_size % (micro * world) != 0:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of batch_per_device ({micro}) x processes ({world})")
    accum = cfg.batch_size // (micro * world)
    total_nimg = int(round(cfg.total_kimg * 1000))
    total_steps = state.step + max(0, math.ceil((total_nimg - state.cur_nimg) / cfg.batch_size))
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if run.is_main and state.step == 0 and cfg.grid_size > 0:
        reals = torch.stack([run.dataset[i][0] for i in range(min(cfg.grid_size, len(run.dataset)))])
        save_image_grid(to_model_space(reals), run.run_dir / "data.png", scale=grid_scale(cfg, run.dataset))
    indices_log = open(run.run_dir / f"batch-indices-rank{acc.process_index}.jsonl", "a") if cfg.log_batch_indices else None
    logger.info("training %d steps of %d images (%d x %d x %d accumulation) to %s", total_steps - state.step,
                cfg.batch_size, micro, world, accum, run.run_dir)

    batches = _batches(run, micro)
    run_log = RunLog(run, total_steps)
    loss_sum, loss_count = torch.zeros((), device=acc.device), 0
    t_last, nimg_last = time.perf_counter(), state.cur_nimg
    checkpoint, grid, interrupted = ckpt.find_latest(run.run_dir), None, False
    try:
        with StopOnSignal() as stop:
            while state.cur_nimg < total_nimg:
                micro_batches = [next(batches) for _ in range(accum)]
                if indices_log is not None:
                    for i, (*_, indices) in enumerate(micro_batches):
                        indices_log.write(json.dumps({"step": state.step, "round": i, "indices": indices.tolist()}) + "\n")
                lr = learning_rate(state.cur_nimg, cfg.lr, cfg.lr_rampup_kimg, cfg.lr_decay_kimg)
                loss = train_step(run.model, run.loss_fn, run.optimizer, [batch[:3] for batch in micro_batches],
                                  acc, run.generator, lr, cfg.grad_clip)
                beta = ema_beta(state.cur_nimg, cfg.batch_size, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio)
                update_ema(run.ema, run.net, beta)
                state.step += 1
                state.cur_nimg += cfg.batch_size
                loss_sum += loss
                loss_count += 1
                run_log.advance()
                if callback is not None:
                    callback(run)

                done = state.cur_nimg >= total_nimg
                save_now = state.step % cfg.checkpoint_every == 0
                grid_now = cfg.grid_every > 0 and state.step % cfg.grid_every == 0 and not done
                stopping = stop.requested and world == 1
                if not (done or save_now or grid_now or stopping or state.step % cfg.log_every == 0):
                    continue
                # Sync point: the only host syncs of the loop.
                totals = acc.reduce(torch.stack([loss_sum, torch.tensor(float(stop.requested), device=acc.device)]), "sum")
                mean_loss = float(totals[0]) / (loss_count * world)
                stopping = stopping or float(totals[1]) > 0
                if not math.isfinite(mean_loss):
                    raise TrainingDivergedError(
                        f"loss became {mean_loss} in steps {state.step - loss_count + 1} to {state.step}; stopped "
                        f"without saving. The last good checkpoint is {ckpt.find_latest(run.run_dir)}. Lower lr, set "
                        "grad_clip or use mixed_precision=no, then resume=true"
                    )
                now = time.perf_counter()
                log(run_log, {
                    "step": state.step, "kimg": state.cur_nimg / 1000, "loss": mean_loss, "lr": lr, "ema_beta": beta,
                    "images_per_s": (state.cur_nimg - nimg_last) / max(now - t_last, 1e-9), "time": time.time(),
                })
                loss_sum.zero_()
                loss_count, t_last, nimg_last = 0, now, state.cur_nimg
                if grid_now and run.is_main:
                    write_grid(run, run.run_dir / f"samples-{state.step:08d}.png")
                if save_now or done or stopping:
                    checkpoint = save_checkpoint(run)
                if stopping:
                    interrupted = True
                    logger.warning("stopped at step %d on request; resume with resume=true", state.step)
                    break
    finally:
        run_log.close()
        if indices_log is not None:
            indices_log.close()
    if not interrupted and run.is_main and cfg.grid_size > 0:
        grid = write_grid(run, run.run_dir / "samples-final.png")
        logger.info("wrote %s", grid)
    acc.wait_for_everyone()
    return TrainResult(state, checkpoint, grid, run.run_dir / "metrics.jsonl", interrupted)


# ----------------------------------------------------------------------------- entry point


def _hydra_main() -> None:
    import hydra
    from accelerate import PartialState

    @hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
    def main(dcfg: Any) -> None:
        cfg = from_dictconfig(dcfg)
        is_main = PartialState(cpu=use_cpu(cfg)).is_main_process  # the state train's Accelerator joins
        if not is_main:
            logging.getLogger("edm").setLevel(logging.WARNING)
        set_backend_flags(cfg)
        try:
            result = train(cfg)
        except (ValueError, FileNotFoundError, FileExistsError, TrainingDivergedError) as err:
            # config, data, checkpoint and divergence errors: the message says what to do
            print(f"edm.train: error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        if is_main:
            print(f"step {result.state.step} ({result.state.cur_nimg / 1000:.1f} kimg); checkpoint: {result.checkpoint}")
            if result.grid is not None:
                print(f"samples: {result.grid}")
        if result.interrupted:
            raise SystemExit(130)

    register_configs()
    main()


main = _hydra_main

if __name__ == "__main__":  # run the imported module, so classes and loggers are edm.train's
    from edm.train import main as _main

    _main()
