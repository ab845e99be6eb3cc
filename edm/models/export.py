"""A model folder without pickles: DIR/model.safetensors (the weights) + DIR/model.json (what they are).

    path, state = read_model_file("runs/digits-edm-tiny")   # edm.models.loading: any model file -> checkpoint dict
    export_state(state, "export/digits")                     # its EMA denoiser as a model folder (edm-export)
    load_model("export/digits")                              # edm.models.loading reads it like any model file

model.json holds the denoiser spec (network with every preset value, precond), the schedule,
which weights these are (EMA or raw), the training data set's config when known, the facts of
an NVlabs original (e.g. an EDM2 model's VAE latents), a latent model's VAE (edm.latent), the SHA-256 of the file they came
from, and that of model.safetensors (a load refuses weights whose bytes changed; a folder written before lacks it). Reading it needs json and safetensors only: no pickle, no torch.load, nothing that can run code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .checkpoint import CheckpointError

from ..files import atomic_write
from ..files import read_record, write_json

__all__ = ["WEIGHTS_NAME", "META_NAME", "FORMAT", "is_export", "export_state", "read_export"]

WEIGHTS_NAME, META_NAME = "model.safetensors", "model.json"
FORMAT = "edm-model/1"


def is_export(path: str | Path) -> bool:
    """A model folder (holding model.json) or its model.safetensors."""
    path = Path(path)
    return (path / META_NAME).is_file() if path.is_dir() else path.name == WEIGHTS_NAME


def export_state(state: dict, dest: str | Path, *, ema: bool = True, source_sha256: str | None = None,
                 extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write a checkpoint dict's EMA (or raw) weights and description as a model folder `dest`;
    `extra` adds entries to model.json (e.g. how post-hoc EMA made the weights). A model folder there of another
    source file or other weights is refused unless `overwrite` (the same export again is made again)."""
    from safetensors.torch import save

    key = "ema" if ema else "model"
    if key not in state:
        raise CheckpointError(f"the model holds no {'EMA' if ema else 'raw'} weights ({key!r}); "
                              f"export the {'raw' if ema else 'EMA'} ones instead")
    dest = Path(dest)
    if not overwrite:
        _refuse_another_model(dest, source_sha256, "ema" if ema else "raw")
    dest.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().cpu().contiguous() for name, t in state[key].items()}
    data = save(weights)
    (dest / META_NAME).unlink(missing_ok=True)  # first: new weights never sit under an old model.json
    atomic_write(dest / WEIGHTS_NAME, lambda f: f.write(data))
    meta = {
        "format": FORMAT, "denoiser": state["denoiser"], "schedule": state.get("schedule"),
        "weights": "ema" if ema else "raw", "step": state.get("step"),
        "dataset": (state.get("config") or {}).get("dataset"), "source_sha256": source_sha256,
        "reference": (state.get("config") or {}).get("reference"),
        "objective": (state.get("config") or {}).get("objective") or "denoising", "latent": state.get("latent"),
        "inputs": state.get("inputs"), "weights_sha256": hashlib.sha256(data).hexdigest(),
        **(extra or {}),
    }
    write_json(dest / META_NAME, meta)  # last: a folder without it is not a model folder
    return dest


def _refuse_another_model(dest: Path, source_sha256: str | None, weights: str) -> None:
    """Refuse a model folder `dest` made from another source file or of other weights (or unreadable)."""
    if not (dest / META_NAME).is_file():
        return
    try:
        meta = read_record(dest / META_NAME)
    except (OSError, ValueError):
        meta = {}
    old, new = (meta.get("source_sha256"), meta.get("weights")), (source_sha256, weights)
    if old != new or source_sha256 is None:
        raise ValueError(f"{dest} holds a model exported from another file or weights (source sha256 "
                         f"{str(old[0])[:16]}, {old[1]} weights; now {str(new[0])[:16]}, {new[1]}): give another "
                         "out=DIR, or pass overwrite=true to replace it")


# the way out of a damaged model folder: its model.json may be unreadable, which an export over it takes for another
# model's, so the advice names overwrite=true
MAKE_AGAIN = ("export the model again with overwrite=true (edm-export checkpoint=SOURCE out=FOLDER overwrite=true; a "
              "post-hoc EMA folder: run edm-posthoc again)")

# model.json entries that say how the weights were made (edm-posthoc's fit) and travel with them into a new export
CARRIED = ("posthoc_ema",)


def read_export(path: str | Path, ema: bool = True) -> tuple[Path, dict]:
    """(the weights file, a checkpoint dict) of a model folder, read with json and safetensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights_file, meta_file = folder / WEIGHTS_NAME, folder / META_NAME
    try:
        meta = read_record(meta_file)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{meta_file} is unreadable ({err}): {MAKE_AGAIN}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file} is not an edm model folder (format {meta.get('format')!r}, expected {FORMAT!r})")
    wanted = "ema" if ema else "raw"
    if meta["weights"] != wanted:
        raise CheckpointError(f"{folder} holds the {meta['weights']} weights only, not the {wanted} ones; "
                              f"load it with ema={'true' if meta['weights'] == 'ema' else 'false'}")
    try:
        data = weights_file.read_bytes()
        weights = load(data)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{weights_file} is unreadable ({err}): {MAKE_AGAIN}") from None
    if meta.get("weights_sha256") not in (None, hashlib.sha256(data).hexdigest()):
        raise CheckpointError(f"{weights_file} is corrupt: its SHA-256 is not the one {META_NAME} records (its bytes changed "
                              f"after it was written): {MAKE_AGAIN}")
    config = {key: meta[key] for key in ("dataset", "reference", "objective") if meta.get(key)}  # reference: an NVlabs file's facts
    state = {"denoiser": meta["denoiser"], "schedule": meta["schedule"], "ema" if ema else "model": weights,
             "config": config, "step": meta.get("step"), "latent": meta.get("latent"), "inputs": meta.get("inputs"),
             **{key: meta[key] for key in CARRIED if meta.get(key) is not None}}
    return weights_file, state
