"""A training run's live objects and their checkpoint: what is saved, and how a run resumes exactly.

A checkpoint holds the denoiser spec and schedule spec (edm.build), the raw and EMA weights,
the optimizer, the counters, every process's random state and the resolved config.
`restore` refuses a checkpoint whose denoiser or schedule differs from the config's (both
resolved, so a checkpoint that spelled out a preset's values matches a config that did not).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .build import resolved_network, schedule_spec
from .config import TrainConfig, to_container
from .data import ImageDataset
from .losses import Loss
from .schedules import Schedule

__all__ = ["RunState", "Run", "seed_for", "rng_state", "set_rng_state", "restore", "save_checkpoint"]

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """The counters of a run: optimizer steps taken and training images seen."""

    step: int = 0
    cur_nimg: int = 0


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
    spec: dict  # the denoiser spec (edm.build.denoiser_spec)
    dataset: ImageDataset
    state: RunState = field(default_factory=RunState)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def seed_for(seed: int, rank: int) -> int:
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
    saved = {"network": resolved_network(state["denoiser"]["network"]), "precond": state["denoiser"]["precond"]}
    diffs = _differences({"denoiser": saved, "schedule": state["schedule"]},
                         {"denoiser": run.spec, "schedule": schedule_spec(run.schedule)})
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
        torch.manual_seed(seed_for(run.cfg.seed + run.state.step, rank))
        run.generator.manual_seed(seed_for(run.cfg.seed + run.state.step, rank))
    logger.info("resumed from %s at step %d (%.1f kimg)", path, run.state.step, run.state.cur_nimg / 1000)


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
            "schedule": schedule_spec(run.schedule),
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
