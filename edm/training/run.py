"""A training run's live objects and their checkpoint: what is saved, and how a run resumes exactly.

A checkpoint holds the denoiser, schedule and loss specs (edm.training.build), the raw and EMA weights,
the optimizer, the counters, every process's random state and the resolved config.
`restore` refuses a checkpoint whose denoiser or schedule differs from the config's (both
resolved, so a checkpoint that spelled out a preset's values matches a config that did not).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.losses import Loss
from ..core.precond import SIGMA_DATA
from ..core.schedules import Schedule, from_spec, to_spec
from ..data import BUNDLED, UNRECORDED_RESAMPLE, ImageDataset, resample_unrecorded, resolved_root, root_contents_key
from ..files import FolderLock, atomic_write, differences, flatten, to_container
from ..hardware import RunWideLog
from ..models import checkpoint as ckpt
from .build import build_loss, latent_facts, loss_spec, precond_defaults, resolved_network
from .config import LossConfig, TrainConfig
from .phema import SNAPSHOT_DIR, PowerEMA, snapshot_path, write_snapshot
from .runlog import kimg_text

__all__ = [
    "RunState", "Run", "RunDirError", "stream_seed", "seed_draws", "micro_batch_size", "check_batch_layout", "restore",
    "save_checkpoint", "save_snapshot", "remove_stale_temporaries", "trim_metrics", "settings_as_trained",
    "checkpoint_settings", "saved_precond_spec", "saved_loss_spec", "check_resume_changes", "other_run", "RESUME_FIXED", "RESUME_FREE",
    "listed",
]

logger = logging.getLogger(__name__)
run_logger = RunWideLog(logger)  # what every process would say alike: once per run


class RunDirError(FileExistsError):
    """run_dir holds checkpoints of another run and resume is off."""


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporaries (.NAME.XXXX.tmp, edm.files.atomic_write) that killed writes left in run_dir and its
    snapshot folder: of checkpoints, power-EMA snapshots, metrics, grids (no finished file is one). Called by the
    main process that has just locked run_dir, before this launch writes anything."""
    stale = sorted([*Path(run_dir).glob(".*.tmp"), *(Path(run_dir) / SNAPSHOT_DIR).glob(".*.tmp")])
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d temporary file(s) of interrupted checkpoint writes in %s", len(stale), run_dir)
    return stale


def trim_metrics(path: Path, step: int) -> int:
    """Drop the records of a JSON-lines log (metrics.jsonl, batch-indices-rank*.jsonl) after `step` (logged after the
    checkpoint a run resumes from, which the resumed run logs again), and lines that are not JSON records (one cut
    short by a crash or a full disk, logged); returns how many were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)

    def record(line: str) -> dict | None:
        try:
            value = json.loads(line)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    records = [(line, record(line) if line.strip() else {}) for line in lines]  # a blank line is kept
    torn = sum(r is None for _, r in records)
    if torn:
        run_logger.warning("%s: dropping %d line(s) that are not JSON records (a write cut short)", path, torn)
    keep = [line for line, r in records if r is not None and r.get("step", 0) <= step]
    if len(keep) < len(lines):
        atomic_write(path, lambda f: f.write("".join(keep).encode()))
    return len(lines) - len(keep)


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
    spec: dict  # the denoiser spec (edm.training.build.denoiser_spec)
    dataset: ImageDataset
    lock: FolderLock | None = None  # held by the main process while the run owns run_dir
    let_go: Callable[[BaseException | None], None] | None = None  # called with the run's error (or None) before the lock is released
    phema: PowerEMA | None = None  # EDM2's power-function EMAs (cfg.ema_sigma_rel), when tracked
    vae: Any = None  # edm.latent.VAE of a latent data set (decodes grids; its fingerprint is recorded), else None
    state: RunState = field(default_factory=RunState)
    resumes: list = field(default_factory=list)  # [{"step", "changes": [{"key", "checkpoint", "config"}]}] per resume
    inputs: dict | None = None  # what the run reads besides its settings (run_inputs), recorded and compared on resume

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def stream_seed(seed: int, stream: str, index: int, step: int = 0) -> int:
    """The 63-bit seed of one random stream: BLAKE2b of (seed, stream, index, step). Distinct streams and runs never
    share a seed, and none equals a data permutation's small seed (edm.data.epoch_permutation), as a linear formula
    can: seed·7919 + 1 + index would be 1 for seed 0, the seed of its P_1."""
    digest = hashlib.blake2b(f"edm/{int(seed)}/{stream}/{int(index)}/{int(step)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63)


def seed_draws(generator: torch.Generator, seed: int, position: int, stream: str = "noise") -> None:
    """Seed the random draws of the micro-batch that starts at `position` of the run's data stream (the images
    drawn before it, whatever the number of processes): "noise" seeds the training generator (σ, n) and the global
    RNG (dropout) from their own streams, "augment" the training generator for the augmentation. So a micro-batch of
    the same place and size draws the same numbers in any process layout, and on resume. ("latent" seeds the draw
    of a latent data set's latents from their posteriors.)"""
    generator.manual_seed(stream_seed(seed, stream, position))
    if stream == "noise":
        torch.manual_seed(stream_seed(seed, "global", position))


def micro_batch_size(cfg: TrainConfig, world: int) -> int:
    """Images per micro-batch: batch_per_device, else batch_size / processes."""
    return cfg.batch_per_device or cfg.batch_size // world


def check_batch_layout(cfg: TrainConfig, world: int) -> int:
    """The micro-batch size (micro_batch_size) where batch_size splits into micro-batches of it over `world`
    processes, else a ValueError saying how to make it split."""
    micro = micro_batch_size(cfg, world)
    if cfg.batch_size % world != 0:  # (no batch_per_device then splits it either)
        how = ("is smaller than", "fewer processes") if cfg.batch_size < world else (
            "does not split over", "a number of processes that divides it")
        raise ValueError(f"batch_size={cfg.batch_size} {how[0]} the {world} processes of this launch (each takes an equal "
                         f"share of every step): set batch_size to a multiple of {world}, or launch {how[1]}")
    if cfg.batch_size % (micro * world) != 0:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of batch_per_device ({micro}) x processes "
                         f"({world}) = {micro * world}: set batch_per_device to a divisor of {cfg.batch_size // world}")
    return micro


def model_inputs(init_file: str | Path | None, teacher_file: str | Path | None) -> dict[str, Any]:
    """The identities (model_record) of the files init= and teacher= were read from."""
    from ..models.loading import model_record

    return model_record(init_file, "init") | model_record(teacher_file, "teacher")


def run_inputs(cfg: TrainConfig, init_file: str | Path | None, teacher_file: str | Path | None,
               models: dict[str, Any]) -> dict[str, Any]:
    """What a run reads besides its settings, as facts a resume compares (the config names them by paths, which a
    resume from another directory resolves elsewhere, and whose files may change): the data set's resolved root and
    its root_contents_key, and `models` (model_inputs of the files init= and teacher= were read from)."""
    root = resolved_root(cfg.dataset.root)
    files = {f"{key}_file": str(Path(file).resolve()) if file is not None else None
             for key, file in (("init", init_file), ("teacher", teacher_file))}  # where they were read: named, not compared
    return {"dataset_root": root, "dataset_contents": root_contents_key(root) if root else None, **models, **files}


INPUT_KEYS = ("dataset.root", "init", "teacher")  # config paths whose run_inputs facts a resume compares instead


def _unread(cfg: TrainConfig) -> tuple[str, ...]:
    """("dataset.root",) for a bundled data set, which reads none (so a root its checkpoint records is neither a
    setting nor an input of the run); else ()."""
    return ("dataset.root",) if cfg.dataset.name in BUNDLED else ()


def _read_facts(inputs: dict, cfg: TrainConfig) -> dict:
    """run_inputs facts of what the run reads: a bundled set's recorded root (and its contents) is none of them."""
    return {k: v for k, v in inputs.items() if not (_unread(cfg) and k.startswith("dataset_"))}


def check_resume_inputs(saved: dict | None, ours: dict, path: Path) -> list[dict]:
    """A resume reads what the run read: another data folder, another teacher file (by resolved path and file hash),
    or starting from a model where the run did not (or the reverse) is refused; data files changed in place and
    another init file (whose weights the resume does not read again) are warned of. Returns the changes, recorded
    in the next checkpoints."""
    if saved is None:  # a checkpoint that records no inputs: its config's paths were compared as settings
        return []
    changes = [{"key": f"inputs.{k}", "checkpoint": a, "config": b} for k, a, b in differences(saved, ours)
               if not k.endswith("_file")]

    def refused(change: dict) -> bool:
        key = change["key"].removeprefix("inputs.")
        return key.startswith(("dataset_root", "teacher")) or (key.startswith("init") and None in (
            change["checkpoint"], change["config"]))

    stop = [c for c in changes if refused(c)]
    if stop:
        listed = "; ".join(f"{c['key']}: checkpoint {c['checkpoint']!r}, now {c['config']!r}" for c in stop)
        read = "; ".join(f"{k}: {saved.get(k)} then, {ours.get(k)} now" for k in ("teacher_file", "init_file")
                         if saved.get(k) or ours.get(k))
        raise ckpt.CheckpointError(f"checkpoint {path} was trained on other inputs ({listed}{'; ' + read if read else ''}): "
                                   "resume with the data folder, teacher and init the run read (a teacher= run folder "
                                   "names its latest checkpoint: give the file the run read), or start a new run_dir")
    if changes:
        run_logger.warning("resuming %s: %s; the run goes on with them as they are now, and the next checkpoints "
                           "record them", path, "; ".join(f"{c['key']} changed since the checkpoint "
                                                          f"({c['checkpoint']!r} -> {c['config']!r})" for c in changes))
    return changes


def _differences(saved: Any, ours: Any) -> list[str]:
    """'key: checkpoint X, config Y' for each leaf where two nested containers differ (a missing leaf is None)."""
    return [f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in differences(saved, ours)]


# Training settings a resume may not change: the loss (what is optimized), the data set, the seed (the data
# order and every random stream) and the global batch (the data order and the EMA), so the resumed run would not
# continue the saved one. Loss, network, precond and schedule are compared as resolved specs.
RESUME_FIXED = ("seed", "batch_size", "dataset.name", "dataset.root", "dataset.resolution", "dataset.resample",
                "dataset.cond", "dataset.xflip", "dataset.max_size", "loss.", "ema_sigma_rel", "objective", "init",
                "teacher", "ect.", "scm.", "meanflow.")  # a key ending in "." stands for every key under it
# Settings that change how a run is carried out or reported, not what it computes.
RESUME_FREE = ("resume", "run_dir", "total_kimg", "log_every", "checkpoint_every", "keep_checkpoints", "grid_every",
               "grid_size", "grid_scale", "grid_seed", "progress", "trackers", "tracker_project", "log_batch_indices", "compile",
               "batch_per_device",
               "channels_last", "cpu", "tf32", "cudnn_benchmark", "dataset.num_workers",
               "sampler.",  # the sample grids' sampler
               "latent.")  # latent runs:
# their latent space (VAE fingerprint, scale, bias, pixel data) is compared as recorded facts (check_resume_vae)


def listed(key: str, keys: tuple[str, ...]) -> bool:
    """Whether a dotted key is one of keys (an entry ending in "." stands for every key under it)."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys)


def _is_fixed(key: str) -> bool:
    return listed(key, RESUME_FIXED)


def saved_loss_spec(state: dict) -> dict:
    """The resolved loss of a checkpoint: its "loss" spec, or for a checkpoint written before runs recorded
    one, the loss its config and schedule build."""
    if state.get("loss") is not None:
        return state["loss"]
    config = state.get("config") or {}
    try:
        loss_cfg = LossConfig(**config.get("loss", {}))
    except TypeError as err:
        raise ckpt.CheckpointError(f"the checkpoint's loss settings are not this version's ({err}); start a new run_dir") from None
    sigma_data = (config.get("precond") or {}).get("sigma_data", SIGMA_DATA)
    return loss_spec(build_loss(loss_cfg, from_spec(state["schedule"]), sigma_data))


def saved_precond_spec(state: dict) -> dict:
    """The preconditioning a checkpoint's denoiser records, today's defaults for keys it lacks."""
    return {**precond_defaults(), **state["denoiser"]["precond"]}


def settings_as_trained(config: Any, loss: dict, precond: dict | None = None) -> dict:
    """A run's settings as it trains them: its config with the loss, and the preconditioning where given, as the
    resolved specs (a kind None is the schedule's parameterization, VP's β's the schedule's, ...) in place of the
    config's `loss` and `precond`; without `precond` the config's is left out. A run from `init` trains the init
    model's preconditioning, so there the config's precond as written stands for it (and `init` itself is compared)."""
    record = to_container(config)
    if precond is not None and record.get("init"):
        precond = record.get("precond", {})
    settings = {key: value for key, value in record.items() if key not in ("precond", "loss")}
    return {**settings, "loss": loss} | ({"precond": precond} if precond is not None else {})


def checkpoint_settings(state: dict) -> dict:
    """settings_as_trained of a checkpoint: its loss spec and recorded preconditioning (saved_precond_spec)."""
    return settings_as_trained(state.get("config") or {}, saved_loss_spec(state), saved_precond_spec(state))


def setting_differences(saved: dict, ours: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved, ours) for each setting that two records of what a run trains differ in: the keys both hold (a key
    of one version only says nothing), and dataset.resample where a resized run's record lacks it
    (resample_unrecorded: no value of the setting repeats its images)."""
    changes = differences(saved, ours, shared_only=True)
    a, b = flatten(saved), flatten(ours)
    saved_data = {key.removeprefix("dataset."): value for key, value in a.items() if key.startswith("dataset.")}
    if resample_unrecorded(saved_data) and "dataset.resample" in b:
        changes.append(("dataset.resample", UNRECORDED_RESAMPLE, b["dataset.resample"]))
    return changes


def other_run(path: Path, cfg: TrainConfig) -> list[str]:
    """'KEY: run A, now B' for each setting in RESUME_FIXED (the loss aside: it is compared resolved, on resume) where
    the run of checkpoint `path` differs from cfg, as written in the two configs: a resume could not continue it. []
    when the checkpoint cannot be read (the resume names that problem)."""
    try:
        state = ckpt.load_checkpoint(path)
    except (ckpt.CheckpointError, OSError):
        return []
    saved, inputs = state.get("config") or {}, state.get("inputs")
    as_facts = (INPUT_KEYS if inputs is not None else ()) + _unread(cfg)  # compared as what the paths name, as a resume does
    diffs = [f"{k}: run {a!r}, now {b!r}" for k, a, b in setting_differences(saved, to_container(cfg))
             if _is_fixed(k) and not k.startswith("loss.") and k not in as_facts]
    if inputs is not None and not _unread(cfg):
        root = resolved_root(cfg.dataset.root)
        if inputs.get("dataset_root") != root:
            diffs.append(f"dataset.root: run {inputs.get('dataset_root')!r}, now {root!r}")
        diffs += [f"{k}: run {saved.get(k)!r}, now {getattr(cfg, k)!r}" for k in ("init", "teacher")
                  if bool(saved.get(k)) != bool(getattr(cfg, k))]
    return diffs


def check_resume_changes(state: dict, cfg: TrainConfig, loss: Loss, path: Path, mismatch: list[str] = ()) -> list[dict]:
    """The training settings that differ from checkpoint `state`'s (checkpoint_settings: the loss as resolved specs):
    refuse those in RESUME_FIXED, in one message with `mismatch` (restore's differences of denoiser and schedule),
    warn (once per run) about those that change the optimization; return all (they are recorded in the next
    checkpoints)."""
    skip = ("network.", "precond.", "schedule.")  # compared as the resolved denoiser spec and schedule (restore)
    saved = {k: v for k, v in flatten(checkpoint_settings(state)).items() if not k.startswith(skip)}
    ours = {k: v for k, v in flatten(settings_as_trained(cfg, loss_spec(loss))).items() if not k.startswith(skip)}
    changes = setting_differences(saved, ours)
    as_facts = (INPUT_KEYS if state.get("inputs") is not None else ()) + _unread(cfg)  # paths compared as run_inputs facts
    fixed = [f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in changes if _is_fixed(k) and k not in as_facts]
    refusals = ([f"does not match the config ({'; '.join(mismatch)})"] if mismatch else []) + (
        [f"was trained with other settings that a resume may not change ({'; '.join(fixed)}; fixed are the loss, data "
         "set, seed, global batch, power EMAs, objective and its options, init and teacher)"] if fixed else [])
    if refusals:
        raise ckpt.CheckpointError(f"checkpoint {path} {' and '.join(refusals)}: resume with the settings it was "
                                   "trained with, or start a new run_dir")
    altered = [f"{k}: {a!r} -> {b!r}" for k, a, b in changes if not listed(k, RESUME_FREE) and not _is_fixed(k)
               and k not in as_facts]
    if altered:
        run_logger.warning("resuming %s with changed training settings (%s): the run goes on, but not as the saved run "
                           "would have; the changes are recorded in the next checkpoints", path, "; ".join(altered))
    return [{"key": k, "checkpoint": a, "config": b} for k, a, b in changes]


def check_resume_vae(saved: dict | None, ours: dict | None, path: Path) -> None:
    """A latent run resumes in the same latent space: the VAE of the same weights (by fingerprint; its folder may
    move), the same scale and bias, the same pixel data (edm.training.build.latent_facts of checkpoint and config)."""
    if saved is None and ours is None:
        return
    if saved is None or ours is None:
        raise ckpt.CheckpointError(f"checkpoint {path} was trained on {'pixels' if saved is None else 'VAE latents'}, the "
                                   f"config's data set holds {'pixels' if ours is None else 'latents'}: resume on its data set")
    if saved.get("vae_fingerprint") != ours["vae_fingerprint"]:
        raise ckpt.CheckpointError(f"checkpoint {path} was trained with VAE {saved.get('vae')} (fingerprint "
                                   f"{saved.get('vae_fingerprint')}), latent.vae={ours['vae']} has fingerprint "
                                   f"{ours['vae_fingerprint']}: resume with the run's VAE (latent.vae=ITS_FOLDER)")
    space = ("scale", "bias", "pixel_shape", "dataset")
    diffs = _differences({key: saved.get(key) for key in space}, {key: ours[key] for key in space})
    if diffs:
        raise ckpt.CheckpointError(f"checkpoint {path} was trained in another latent space ({'; '.join(diffs)}): resume "
                                   "with its latent.raw_mean/raw_std/final_mean/final_std and its latent data set")


def restore(run: Run, path: Path) -> None:
    """Load model, EMA, optimizer and counters from checkpoint `path`; the random draws continue by position
    (seed_draws), and one line says whether the process layout changed them."""
    state = ckpt.load_checkpoint(path)
    for key in ("optimizer", "step", "cur_nimg"):
        if key not in state:
            raise ckpt.CheckpointError(f"checkpoint {path} has no {key!r}: it holds weights only and cannot be resumed")
    saved = {"network": resolved_network(state["denoiser"]["network"]),
             "precond": saved_precond_spec(state)}
    diffs = _differences({"denoiser": saved, "schedule": state["schedule"]},
                         {"denoiser": run.spec, "schedule": to_spec(run.schedule)})
    changes = check_resume_changes(state, run.cfg, run.loss_fn, path, diffs)  # refuses diffs with the fixed settings
    check_resume_vae(state.get("latent"), latent_facts(run.vae, run.dataset) if run.vae is not None else None, path)
    saved_inputs = state.get("inputs")
    changes += check_resume_inputs(saved_inputs and _read_facts(saved_inputs, run.cfg),
                                   _read_facts(run.inputs or {}, run.cfg), path)
    saved_size = state.get("dataset_size")
    if saved_size is not None and saved_size != len(run.dataset):
        run_logger.warning("the data set has %d images, the checkpoint's had %d: the data order from here on differs from "
                           "the saved run's", len(run.dataset), saved_size)
        changes.append({"key": "dataset_size", "checkpoint": saved_size, "config": len(run.dataset)})
    run.resumes = list(state.get("resumes") or []) + [{"step": int(state["step"]), "changes": changes}]
    try:
        run.net.load_state_dict(state["model"])
        run.ema.load_state_dict(state["ema"])
        run.optimizer.load_state_dict(state["optimizer"])
        for group in run.optimizer.param_groups:  # the saved state brings the saved betas and eps: the config's rule
            group["betas"], group["eps"] = tuple(run.cfg.adam_betas), run.cfg.adam_eps
        if run.phema is not None:
            if state.get("phema") is None:
                raise ValueError("it tracks no power-function EMAs (ema_sigma_rel); resume without them or start a new run_dir")
            run.phema.load_state_dict(state["phema"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ckpt.CheckpointError(f"checkpoint {path}: saved weights do not fit the model: {err}") from None
    if state.get("grad_scaler") is not None and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(state["grad_scaler"])
    run.state = RunState(step=int(state["step"]), cur_nimg=int(state["cur_nimg"]))
    log_layout_change(state, run.accelerator.num_processes, micro_batch_size(run.cfg, run.accelerator.num_processes))
    logger.info("resumed from %s at step %d (%s kimg)", path, run.state.step, kimg_text(run.state.cur_nimg / 1000))


def log_layout_change(state: dict, world: int, micro: int) -> None:
    """One log line (once per run) when a run resumes on another number of processes or micro-batch size than its
    checkpoint's."""
    saved_world, saved_micro = state.get("processes"), state.get("batch_per_device")
    if (saved_world, saved_micro) == (world, micro) or saved_world is None:
        return
    layout = f"{world} process(es) x {micro} images per micro-batch (the checkpoint: {saved_world} x {saved_micro})"
    if saved_micro == micro:
        run_logger.info("continuing on %s: the same global batch, data order and draws (each micro-batch's σ, n, dropout and "
                        "augmentation are seeded by its place in the data stream); only reduction order differs", layout)
    else:
        run_logger.warning("continuing on %s: the same global batch and data order; σ, n, dropout and augmentation are drawn "
                           "per micro-batch, so from here on they differ from the saved run's", layout)


def save_snapshot(run: Run) -> Path:
    """run_dir/phema/snapshot-<cur_nimg>.safetensors: every power-function EMA now (main process writes)."""
    path = snapshot_path(run.run_dir, run.state.cur_nimg)
    if run.is_main:
        write_snapshot(path, run.phema, {
            "cur_nimg": run.state.cur_nimg, "step": run.state.step, "batch_size": run.cfg.batch_size,
            "denoiser": run.spec, "schedule": to_spec(run.schedule), "config": to_container(run.cfg),
            "latent": latent_facts(run.vae, run.dataset) if run.vae is not None else None, "inputs": run.inputs,
        })
    return path


def save_checkpoint(run: Run) -> Path:
    """Write run_dir/checkpoint-<step>.pt atomically (main process) and prune old ones; every
    process must call this (they wait for the file)."""
    path = ckpt.checkpoint_path(run.run_dir, run.state.step)
    if run.is_main:
        scaler = run.accelerator.scaler
        ckpt.save_checkpoint(path, {
            "format": "edm-checkpoint-v1",
            "denoiser": run.spec,
            "schedule": to_spec(run.schedule),
            "loss": loss_spec(run.loss_fn),
            "model": run.net.state_dict(),
            "ema": run.ema.state_dict(),
            "phema": run.phema.state_dict() if run.phema is not None else None,
            "optimizer": run.optimizer.state_dict(),
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "step": run.state.step,
            "cur_nimg": run.state.cur_nimg,
            "processes": run.accelerator.num_processes,
            "batch_per_device": micro_batch_size(run.cfg, run.accelerator.num_processes),
            "config": to_container(run.cfg),
            "dataset_size": len(run.dataset),
            "resumes": run.resumes,
            "latent": latent_facts(run.vae, run.dataset) if run.vae is not None else None,
            "inputs": run.inputs,
        })
        ckpt.prune_checkpoints(run.run_dir, run.cfg.keep_checkpoints)
        logger.info("saved %s", path)
    run.accelerator.wait_for_everyone()
    return path
