"""One way in for a trained denoiser: any model file the project reads becomes a checkpoint dict,
and one loader turns that dict into the denoiser and what generation needs to know about it.

    edm checkpoint (.pt) or run folder  --load_checkpoint-->  checkpoint dict  --load_model-->  (Precond, ModelInfo)
    NVlabs/edm snapshot (.pkl)          --nvlabs.read_nvlabs + to_checkpoint-->  checkpoint dict
    model folder (model.safetensors + model.json, edm.models.export)  --read_export (no pickle)-->  checkpoint dict

The checkpoint dict's "schedule" is the model's own (an NVlabs VE snapshot keeps its σ range).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..choices import choose
from .checkpoint import denoiser_from_state, find_latest, load_checkpoint
from ..core.consistency import CONSISTENCY_OBJECTIVES, SOLVER_OPTION, samplers_for
from ..core.denoisers import GuidedDenoiser, check_guidance_weight
from ..core.samplers import CONSISTENCY_SOLVERS, MEANFLOW_SOLVERS, SOLVERS
from ..data import BUNDLED, UNRECORDED_RESAMPLE, DatasetConfig, other_images, resample_unrecorded, root_contents_key
from ..files import FolderLock, file_sha256
from .export import CARRIED, META_NAME, export_state, is_export, read_export
from .nvlabs import read_nvlabs, to_checkpoint
from ..core.schedules import Schedule, from_spec
from ..latent import same_latent_space
from ..provenance import refuse_foreign_folder

__all__ = ["ModelInfo", "read_model_file", "load_model", "model_latent", "model_record", "guided", "export_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What generation needs to know about a loaded denoiser besides its weights."""

    img_shape: tuple[int, int, int] | None  # (C, H, W)
    label_dim: int = 0
    label_dropout: float = 0.0
    schedule: Schedule | None = None
    source: str = ""
    dataset: dict | None = None  # the training data set's config (edm checkpoints), for scoring against it
    latent: dict | None = None  # latent models: {vae, vae_fingerprint, scale, bias, pixel_shape, dataset} (edm.latent)
    objective: str = "denoising"  # what it was trained for: a denoiser, or a consistency function (ect)
    inputs: dict | None = None  # what its run read (edm.training.run.run_inputs): the data's resolved root and contents

    def check_solver(self, solver: str, option: str = SOLVER_OPTION, steps: str = "sampler.num_steps=1, 2, 4",
                     role: str = "") -> None:
        """Refuse a name that is no solver, then a solver made for another kind of model: the consistency sampler
        needs a consistency function and is the only one that samples it; the MeanFlow sampler needs a MeanFlow model
        (which ODE solvers sample too). The advice names the caller's keys: `option` picks a solver (NAME as {}),
        `steps` the few-step counts (edm-sample's by default); `role` is what the model is to the caller ("teacher")."""
        choose(SOLVERS, solver, "solver")
        if self.sampled_by(solver):
            return
        own, name = samplers_for(self.objective, option), f"{role} {self.source}".strip()
        if self.objective in CONSISTENCY_OBJECTIVES and solver not in CONSISTENCY_SOLVERS:
            raise ValueError(f"{name} is a consistency model (objective={self.objective}); solver {solver} is not "
                             f"for consistency models: use {option.format('consistency')} ({steps})")
        if solver in CONSISTENCY_SOLVERS and self.objective not in CONSISTENCY_OBJECTIVES:
            raise ValueError(f"{name} is not a consistency model (objective={self.objective}); sampler {solver} "
                             f"needs one: tune one with edm-train recipe=ect init={self.source or 'MODEL'}, or sample "
                             f"this one with {own}")
        if solver in MEANFLOW_SOLVERS and self.objective != "meanflow":
            raise ValueError(f"{name} was trained with objective={self.objective}; sampler {solver} needs a "
                             f"MeanFlow model (edm-train recipe=meanflow init=A_FLOW_MATCHING_RUN): sample this one "
                             f"with {own}")

    def sampled_by(self, solver: str) -> bool:
        """Whether `solver` samples this kind of model (check_solver says why not)."""
        consistency = self.objective in CONSISTENCY_OBJECTIVES
        return (solver in CONSISTENCY_SOLVERS) == consistency and (solver not in MEANFLOW_SOLVERS or
                                                                   self.objective == "meanflow")

    @property
    def pixel_shape(self) -> tuple[int, int, int] | None:
        """[C, H, W] of the model's images: its own shape, or for a latent model the pixels it records (None when it
        does not, as edm2's pickles)."""
        if self.latent is None:
            return self.img_shape
        shape = self.latent.get("pixel_shape")
        return tuple(shape) if shape else None

    @property
    def pixel_dataset(self) -> dict | None:
        """The data set record of the model's images: its training set, or for a latent model the pixel data its
        latents record (None when they do not: its training set is only the latent set, dataset=latent)."""
        return self.dataset if self.latent is None else self.latent.get("dataset")

    def training_dataset(self) -> DatasetConfig | None:
        """The training set's config (edm checkpoints record it; for a latent model, the pixel data its latents
        were encoded from), for scoring against it; None if unknown."""
        dataset = (self.latent or {}).get("dataset") or self.dataset
        if not dataset:
            return None
        if resample_unrecorded(dataset):
            raise ValueError(f"{self.source} was trained on {dataset.get('name')} resized to {dataset['resolution']}px "
                             f"before runs recorded dataset.resample ({UNRECORDED_RESAMPLE}): no data set of this edm "
                             "has its pixels; name the data to score against, e.g. dataset=NAME dataset.resolution=R "
                             "dataset.resample=bilinear")
        known = {f.name for f in dataclasses.fields(DatasetConfig)}
        # a record's None (no filter at the native size, no workers) stands for the field's default
        config = DatasetConfig(**{k: v for k, v in dataset.items() if k in known and v is not None})
        if config.name in BUNDLED:  # it reads no root, whatever the record holds
            return dataclasses.replace(config, root=None)
        recorded = (self.inputs or {}).get("dataset_root")
        if self.latent is None and config.root is not None and recorded:
            if not Path(recorded).exists():  # the data (or the model) moved
                logger.warning("%s was trained on %s, which is not here: scoring against dataset.root=%s as its config "
                               "wrote it (pass dataset=NAME dataset.root=PATH to name the data)", self.source, recorded,
                               config.root)
                return config
            config = dataclasses.replace(config, root=recorded)  # the folder it read, from any directory
            if root_contents_key(recorded) != (self.inputs or {}).get("dataset_contents"):
                logger.warning("the files of %s changed since %s was trained on them: its score is against the data "
                               "as it is now", recorded, self.source)
        return config

    def require_pixels(self, what: str = "this") -> None:
        """Refuse a model whose samples are VAE latents where `what` needs the model's own pixels."""
        if self.latent is not None:
            raise ValueError(f"{self.source} generates VAE latents {list(self.img_shape or ())} (of {self.latent['vae']}), "
                             f"not images: {what} needs a pixel model")


def read_model_file(path: str | Path, ema: bool = True, key: str = "checkpoint") -> tuple[Path, dict]:
    """(the file read, its checkpoint dict) for an edm checkpoint, a run folder (its latest checkpoint), a
    model folder of edm.models.export (model.safetensors + model.json: no pickle at all) or an NVlabs .pkl (read
    without running its code); `key` is the option that named it, for the errors."""
    path = Path(path)
    if is_export(path):
        return read_export(path, ema)
    if path.is_dir():
        latest = find_latest(path)
        if latest is None:
            raise FileNotFoundError(f"{key} {str(path)!r} is a folder without checkpoint-*.pt or model.json: pass "
                                    f"{key}=RUN_DIR, RUN_DIR/<file>.pt, a model folder or an NVlabs .pkl")
        path = latest
    if not path.is_file():
        raise FileNotFoundError(f"{key} {str(path)!r} does not exist: pass {key}=RUN_DIR, RUN_DIR/<file>.pt, a model folder "
                                "or an NVlabs .pkl")
    if path.suffix == ".pkl":
        return path, to_checkpoint(read_nvlabs(path), str(path))
    return path, load_checkpoint(path)


def model_record(source: str | Path | None, key: str) -> dict[str, str | None]:
    """The identity of the model read from `source` (ModelInfo.source; None: no model) in a record:
    KEY_sha256 of that file and, for a model folder's weights, KEY_model_json_sha256 of its model.json (the spec
    and schedule the weights are read with: an edit to it is another model)."""
    if source is None:
        return {f"{key}_sha256": None}
    source = Path(source)
    meta = source.parent / META_NAME
    json_hash = {f"{key}_model_json_sha256": file_sha256(meta)} if is_export(source) and meta.is_file() else {}
    return {f"{key}_sha256": file_sha256(source)} | json_hash


def load_model(
    path: str | Path, *, ema: bool = True, device: torch.device | str = "cpu", image_shape: Sequence[int] | None = None,
    key: str = "checkpoint",
) -> tuple[nn.Module, ModelInfo]:
    """The denoiser (eval mode, on `device`) and its ModelInfo from any file `read_model_file` reads.

    Shape (C, H, W) and labels come from the network spec; the schedule is the checkpoint's
    "schedule"; `image_shape` overrides the shape; `key` names the option that gave `path` in errors.
    """
    path, state = read_model_file(path, ema, key)
    denoiser = denoiser_from_state(state, ema, str(path))
    spec, net = state["denoiser"]["network"], denoiser.net
    channels, resolution = spec.get("in_channels"), spec.get("img_resolution") or getattr(net, "img_resolution", None)
    shape = (int(channels), int(resolution), int(resolution)) if channels and resolution else None
    if image_shape is not None:
        shape = _check_shape(image_shape)
    elif shape is None:
        raise ValueError(f"cannot tell the image shape of {str(path)!r}: set image_shape=[C,H,W] in the config")
    info = ModelInfo(
        img_shape=shape, label_dim=int(getattr(net, "label_dim", 0) or 0),
        label_dropout=float(getattr(net, "label_dropout", 0.0) or 0.0),
        schedule=from_spec(state["schedule"]) if state.get("schedule") else None, source=str(path),
        dataset=(state.get("config") or {}).get("dataset"), latent=model_latent(state),
        objective=(state.get("config") or {}).get("objective") or "denoising", inputs=state.get("inputs"),
    )
    return denoiser.to(device), info


def model_latent(state: dict) -> dict | None:
    """What a latent model records of its VAE (edm runs: "latent"; NVlabs/edm2: its StabilityVAEEncoder, whose
    VAE has no recorded fingerprint), None for pixel models."""
    if state.get("latent"):
        return state["latent"]
    reference = (state.get("config") or {}).get("reference") or {}
    if reference.get("encoder") != "StabilityVAEEncoder":
        return None
    return {"vae": reference.get("vae_name"), "vae_fingerprint": None, "scale": reference.get("latent_scale"),
            "bias": reference.get("latent_bias"), "pixel_shape": None, "dataset": None}


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or min(int(v) for v in shape) < 1:
        raise ValueError(f"image_shape must be [C, H, W] with positive sizes, got {list(shape)}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def guided(
    denoiser: nn.Module, info: ModelInfo, weight: float = 1.0, guide: str | Path | None = None, *,
    interval: Sequence[float] | None = None, ema: bool = True, device: torch.device | str = "cpu",
    solvers: Sequence[str] = (),
) -> tuple[GuidedDenoiser, ModelInfo | None]:
    """The main denoiser under guidance: classifier-free (no guide; a class-conditional model) or
    autoguidance (`guide`, any model file load_model reads), guided where σ ∈ interval = (σ_lo, σ_hi].

    A guide is a denoiser D(x̂; σ) like the main one, so schedules never need converting; it must
    make images of the main model's shape and take its labels (the same label_dim, or none: an
    unconditional guide ignores them), and each of `solvers` (those that will sample) must sample it, as they
    evaluate it as they do the model: a consistency model guides the consistency sampler only, and only a MeanFlow
    model the meanflow sampler (which passes σ_r to both). (GuidedDenoiser, the guide's ModelInfo or None).
    """
    check_guidance_weight(weight)
    if weight == 1.0 and (guide is not None or interval is not None):
        raise ValueError("a guide and a guidance interval act only with a guidance weight: set guidance=W (W != 1)")
    guide_model, guide_info = None, None
    if guide is not None:
        guide_model, guide_info = load_model(guide, ema=ema, device=device, key="guide")
        if Path(guide_info.source).resolve() == Path(info.source).resolve():
            raise ValueError(f"guide {guide} is the model's own file {info.source}: D_g = D makes guidance do nothing "
                             "at twice the cost; autoguidance needs a weaker model of the same data (a smaller or "
                             "shorter-trained one)")
        if guide_info.img_shape != info.img_shape:
            raise ValueError(f"guide {guide} makes {list(guide_info.img_shape)} images, the model "
                             f"{list(info.img_shape)}: a guide must be a model of the same data")
        same_latent_space(info.latent, guide_info.latent, f"guide {guide}")
        if guide_info.label_dim not in (0, info.label_dim):
            raise ValueError(f"guide {guide} takes {guide_info.label_dim} class labels, the model {info.label_dim}: "
                             "a guide must take the model's labels (or none)")
        differ = other_images(guide_info.pixel_dataset, info.pixel_dataset)  # a latent set's name is latent
        if differ:
            listed = "; ".join(f"{key} {theirs!r}, the model {ours!r}" for key, theirs, ours in differ)
            raise ValueError(f"guide {guide} was trained on other images than the model ({listed}): a guide must be a "
                             "model of the same data; train it with the model's data set overrides (dataset=..., "
                             "dataset.resolution, dataset.resample)")
        for solver in solvers:
            if not guide_info.sampled_by(solver):
                sigma_r = " with σ_r, which only a MeanFlow model takes" if solver in MEANFLOW_SOLVERS else ""
                raise ValueError(f"guide {guide} was trained with objective={guide_info.objective}, which solver "
                                 f"{solver} does not sample (it evaluates the guide as it does the model{sigma_r}): give "
                                 f"a guide of the model's kind (objective={info.objective})")
        if _same_weights(denoiser, guide_model):
            raise ValueError(f"guide {guide} holds the model's own weights ({info.source}, exported or copied): D_g = D "
                             "makes guidance do nothing at twice the cost; autoguidance needs a weaker model of the same "
                             "data (a smaller or shorter-trained one)")
    elif weight != 1.0 and info.label_dim == 0:
        raise ValueError("classifier-free guidance needs a class-conditional model (this one has label_dim = 0); "
                         "pass a guide model for autoguidance")
    lo_hi = (0.0, float("inf")) if interval is None else tuple(float(v) for v in interval)
    if len(lo_hi) != 2:
        raise ValueError(f"guidance_interval must be [sigma_lo, sigma_hi], got {list(interval or [])}")
    return GuidedDenoiser(denoiser, weight, guide=guide_model, interval=lo_hi), guide_info


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two denoisers hold equal tensors in the same order (a wrapper's prefixed names do not matter)."""
    ta, tb = list(a.state_dict().values()), list(b.state_dict().values())
    return len(ta) == len(tb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb))


def export_model(source: str | Path, dest: str | Path, ema: bool = True, overwrite: bool = False) -> tuple[Path, Path]:
    """Any model file edm.models.loading reads (a checkpoint, a run folder, an NVlabs .pkl) as the model folder
    `dest`, its EMA (or raw) weights checked against their spec first; `dest` may not be a training run's folder, nor
    (unless overwrite) hold a model of another source. (the file read, the folder written)."""
    refuse_foreign_folder(dest, own="model.json")
    path, state = read_model_file(source, ema)
    denoiser_from_state(state, ema, str(path))  # the weights must fit their spec before anything is written
    with FolderLock(dest, key="out", owner="model export"):
        carried = {key: state[key] for key in CARRIED if key in state}  # how a model folder's weights were made
        return path, export_state(state, dest, ema=ema, source_sha256=file_sha256(path), extra=carried,
                                  overwrite=overwrite)
