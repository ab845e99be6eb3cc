"""Checkpoints: plain dicts of tensors and containers, written atomically, read with weights_only.

A training checkpoint holds (at least):
  "denoiser": {"network": build kwargs incl. "name", "precond": Precond kwargs}
  "schedule": {"name": ..., **schedule options}
  "model", "ema": state_dicts of the Precond module (raw and EMA weights)
  "config": the resolved training config as plain containers
  plus training state for resume ("optimizer", "step", "cur_nimg", "processes", "batch_per_device", ...).
Files are named checkpoint-<step>.pt; `find_latest` picks the highest step and never a
temporary file, so a crash during a write leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .. import networks
from ..core.precond import Precond
from ..files import atomic_write, zip_crc_failure
from ..provenance import CHECKPOINT_FILE, CHECKPOINT_NAME, list_checkpoints

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "build_denoiser",
    "load_denoiser",
    "denoiser_from_state",
    "checkpoint_path",
    "list_checkpoints",
    "prune_checkpoints",
    "find_latest",
    "REQUIRED_KEYS",
]

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("denoiser", "schedule", "model", "ema", "config")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, of the wrong format or does not fit the config."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write `state` to `path` atomically and durably (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(state, f))


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
_RESTORE = "restore it from a copy"  # a damaged file that is no run's checkpoint-<step>.pt


def damaged_way_out(path: Path, otherwise: str) -> str:
    """What to do about a damaged `path`: a run's checkpoint-<step>.pt falls back to the one before it in its folder,
    named; with none before it the run can only start over; a file named otherwise gets `otherwise`."""
    match = CHECKPOINT_NAME.match(path.name)
    if match is None:
        return otherwise
    earlier = [p for step, p in list_checkpoints(path.parent) if step < int(match.group(1))]
    if earlier:
        return f"if it is a run's latest, delete it to fall back to the run's earlier checkpoint {earlier[-1].name}"
    return ("no earlier checkpoint is beside it: restore it from a copy, or start the run over (delete it, then "
            "resume=true, or another run_dir)")


def _check_crc(path: Path) -> None:
    """Every member of the checkpoint's zip archive matches the CRC-32 torch.save wrote for it (zip_crc_failure);
    CheckpointError names the member otherwise. An archive too broken to list is left to torch.load, whose error
    names it."""
    failure = zip_crc_failure(path)
    if failure is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: {failure}, so its bytes changed after it was written; "
                              f"{damaged_way_out(path, _RESTORE)}")


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint with torch.load(weights_only=True); CheckpointError names the file and problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:
        what = "an empty file" if not head else f"a file that starts with {head!r}, not a torch.save archive"
        hint = (" (a power-EMA snapshot: make a model of it with edm-posthoc)" if path.name.startswith("snapshot-")
                and path.suffix == ".safetensors" else "")
        raise CheckpointError(f"{path} is not a checkpoint: it is {what}{hint}; "
                              f"{damaged_way_out(path, 'pass an edm checkpoint-*.pt (or its run folder)')}")
    _check_crc(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for bad files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a torch file ({type(err).__name__}: {err}); "
            f"{damaged_way_out(path, _RESTORE)}"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not an edm checkpoint: it lacks {', '.join(missing)}")
    return state


def build_denoiser(spec: dict) -> Precond:
    """The untrained denoiser of state["denoiser"]: Precond(networks.build(**network), **precond)."""
    try:
        network, precond = dict(spec["network"]), dict(spec["precond"])
        name = network.pop("name")
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"bad denoiser spec {spec!r}: needs network (with name) and precond ({err})") from None
    return Precond(networks.build(name, **network), **precond)


def denoiser_from_state(state: dict, ema: bool = True, source: str = "checkpoint") -> Precond:
    """The denoiser of a checkpoint dict (eval mode, CPU): its spec rebuilt, the EMA (or raw) weights loaded strictly;
    an NVlabs snapshot's (config source "nvlabs") holds EMA weights only."""
    if not ema and (state.get("config") or {}).get("source") == "nvlabs":
        raise CheckpointError(f"{source} holds an NVlabs snapshot's EMA weights only (its training loop saves no raw "
                              "network): load it with ema=true")
    denoiser = build_denoiser(state["denoiser"])
    key = "ema" if ema else "model"
    try:
        denoiser.load_state_dict(state[key])
    except RuntimeError as err:
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckpointError(f"{source}: weights {key!r} do not fit its denoiser spec ({len(problems)} problem(s): "
                              f"{shown})") from None
    return denoiser.eval()


def load_denoiser(path: str | Path, ema: bool = True, map_location: Any = "cpu") -> tuple[Precond, dict]:
    """(denoiser in eval mode with the EMA (or raw) weights, the checkpoint dict)."""
    state = load_checkpoint(path, map_location)
    denoiser = denoiser_from_state(state, ema, f"checkpoint {path}")
    return denoiser.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu"), state


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """run_dir/checkpoint-<step, 8 digits>.pt."""
    return Path(run_dir) / CHECKPOINT_FILE.format(step)


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest checkpoints of run_dir (keep <= 0 keeps every one); returns those deleted."""
    old = [path for _, path in list_checkpoints(run_dir)[:-keep]] if keep > 0 else []
    for path in old:
        path.unlink(missing_ok=True)
    return old


def find_latest(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in run_dir, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None
