"""Official NVlabs/edm and NVlabs/edm2 network snapshots (`network-snapshot-*.pkl`, `edm-*.pkl`,
`edm2-*.pkl`) without their code.

An NVlabs snapshot is `pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=...,
dataset_kwargs=...))`. Its torch modules are `torch_utils.persistence` classes: each one is
stored as `_reconstruct_persistent_obj(meta)`, where meta = {type, version, module_src,
class_name, state} carries the defining module's *source code*, which a plain `pickle.load`
executes. Tensors are stored the way plain pickle stores them: `_rebuild_parameter(
_rebuild_tensor_v2(_load_from_bytes(b), offset, size, stride, ...))`, b being a torch.save
blob of one storage (and torch's own `_load_from_bytes` unpickles b with weights_only=False).

`read_nvlabs` unpickles with an allow-list instead (edm.models.unpickler): the persistence
reconstructor becomes a stand-in that returns the meta record (the source is never run), storages
are read with `torch.load(weights_only=True)`, torch containers become inert records of their
state, and every other global is refused. The snapshot's `ema` entry (EDMPrecond, VPPrecond or
VEPrecond around a SongUNet or DhariwalUNet) then becomes our `Precond` around
`edm.networks.build(...)` with the same hyper-parameters and the same weights:

    reference `model.<name>`  ->  our `net.<name>`   (layer names are identical)

An NVlabs/edm2 snapshot is `pickle.dump(EasyDict(encoder=..., dataset_kwargs=..., loss_fn=..., ema=...))`
with `ema` its Precond (EDM coefficients) around its UNet, stored in float16, and the uncertainty
head logvar_fourier / logvar_linear: `unet.<name>` becomes our `net.<name>` (edm.networks.edm2), the
head keeps its names (Precond(logvar_channels=...)), and the weights become float32. The encoder
says what the network generates: pixels (StandardRGBEncoder) or Stable Diffusion VAE latents
(StabilityVAEEncoder, whose scale and bias are read from their numpy arrays without numpy).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core.precond import Precond
from ..core.schedules import IDDPM, iddpm_sigmas
from ..provenance import refuse_foreign_folder, run_marks
from .checkpoint import CheckpointError, denoiser_from_state
from .unpickler import TENSOR_GLOBALS, TorchModuleRecord, array_values, restricted_load

__all__ = [
    "NVlabsError",
    "PersistentObject",
    "NVlabsSnapshot",
    "unpickle",
    "read_nvlabs",
    "load_nvlabs",
    "denoiser_from_snapshot",
    "reference_state_dict",
    "convert_state_dict",
    "to_checkpoint",
    "convert",
    "SUPPORTED_PRECONDS",
    "SUPPORTED_MODELS",
]

logger = logging.getLogger(__name__)


class NVlabsError(CheckpointError):
    """An NVlabs/edm pickle that cannot (or must not) be loaded; the message names the file and the cause."""


# --------------------------------------------------------------------------------------
# Restricted unpickling: the stand-ins that the allow-listed globals resolve to.


class PersistentObject(NamedTuple):
    """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` stood for: class name and state.

    `state` is the object's `__dict__` (for a torch module: `_parameters`, `_buffers`,
    `_modules`, plain attributes and the recorded `_init_args` / `_init_kwargs`).
    The meta's `module_src` is dropped unread.
    """

    class_name: str
    version: int
    state: dict


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
    """Stand-in for the persistence reconstructor: validate meta and keep class name and state."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError(f"malformed torch_utils.persistence record {type(meta).__name__}")
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"persistent {meta['class_name']} has a state of type {type(state).__name__}")
    return PersistentObject(meta["class_name"], int(meta.get("version", 0)), state)


class _EasyDict(dict):
    """Stand-in for dnnlib.EasyDict: a plain dict."""


# (module, name) -> stand-in: NVlabs' own globals, beside those of tensors and containers.
SAFE_GLOBALS: Mapping[tuple[str, str], Any] = MappingProxyType({
    **TENSOR_GLOBALS,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): _EasyDict,
})


def unpickle(path: str | os.PathLike) -> Any:
    """The object stored in NVlabs pickle `path`, built only from SAFE_GLOBALS; NVlabsError otherwise."""
    return restricted_load(path, SAFE_GLOBALS, "an NVlabs pickle", NVlabsError)


# --------------------------------------------------------------------------------------
# Reading the `ema` network: hyper-parameters and state.

REQUIRED = "<required>"  # a constructor parameter without a default

# The reference constructors' parameters in signature order, with their defaults.
_SONG_UNET = MappingProxyType({
    "img_resolution": REQUIRED, "in_channels": REQUIRED, "out_channels": REQUIRED, "label_dim": 0, "augment_dim": 0,
    "model_channels": 128, "channel_mult": (1, 2, 2, 2), "channel_mult_emb": 4, "num_blocks": 4,
    "attn_resolutions": (16,), "dropout": 0.10, "label_dropout": 0.0, "embedding_type": "positional",
    "channel_mult_noise": 1, "encoder_type": "standard", "decoder_type": "standard", "resample_filter": (1, 1),
})
_DHARIWAL_UNET = MappingProxyType({
    "img_resolution": REQUIRED, "in_channels": REQUIRED, "out_channels": REQUIRED, "label_dim": 0, "augment_dim": 0,
    "model_channels": 192, "channel_mult": (1, 2, 3, 4), "channel_mult_emb": 4, "num_blocks": 3,
    "attn_resolutions": (32, 16, 8), "dropout": 0.10, "label_dropout": 0.0,
})
# NVlabs/edm2's UNet, its Block keyword arguments (**block_kwargs) included.
_EDM2_UNET = MappingProxyType({
    "img_resolution": REQUIRED, "img_channels": REQUIRED, "label_dim": REQUIRED, "model_channels": 192,
    "channel_mult": (1, 2, 3, 4), "channel_mult_noise": None, "channel_mult_emb": None, "num_blocks": 3,
    "attn_resolutions": (16, 8), "label_balance": 0.5, "concat_balance": 0.5, "resample_filter": (1, 1),
    "channels_per_head": 64, "dropout": 0.0, "res_balance": 0.3, "attn_balance": 0.3, "clip_act": 256,
})
SUPPORTED_MODELS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {"SongUNet": _SONG_UNET, "DhariwalUNet": _DHARIWAL_UNET, "UNet": _EDM2_UNET}
)
"""Reference network class -> its constructor parameters and defaults (our build() takes the same names)."""

SUPPORTED_PRECONDS: Mapping[str, str] = MappingProxyType(
    {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve", "iDDPMPrecond": "iddpm", "Precond": "edm"}
)
"""Reference preconditioning class -> our Precond kind (Precond: NVlabs/edm2's, EDM's parameterization)."""
# The child that holds the network, and the network classes it may be, per precond class (else NVlabs/edm's).
_WRAPPED = MappingProxyType({"Precond": ("unet", ("UNet",))})
_EDM_WRAPPED = ("model", ("SongUNet", "DhariwalUNet"))


@dataclass(frozen=True)
class NVlabsSnapshot:
    """An NVlabs `ema` network in our terms: denoiser spec, schedule, converted Precond state_dict.

    denoiser: {"network": build kwargs incl. "name", "precond": Precond kwargs incl. "kind"};
    schedule: {"name": ..., **schedule kwargs} matching the preconditioning;
    reference: facts about the original (class names, use_fp16, sigma range, epsilon_t).
    """

    denoiser: dict
    schedule: dict
    state_dict: dict[str, Tensor] = field(repr=False)
    reference: dict


def _module_state(obj: Any, where: str) -> dict:
    """The pickled __dict__ of a persistent module or a torch container record."""
    if isinstance(obj, (PersistentObject, TorchModuleRecord)):
        return getattr(obj, "state", None) or {}
    raise NVlabsError(f"{where} is a {type(obj).__name__}, not a torch module")


def reference_state_dict(obj: Any, prefix: str = "") -> dict[str, Tensor]:
    """state_dict() of a pickled module tree: parameters, persistent buffers, then submodules, recursively."""
    state = _module_state(obj, prefix.rstrip(".") or "the network")
    out: dict[str, Tensor] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    entries = [(n, t) for n, t in (state.get("_parameters") or {}).items()]
    entries += [(n, t) for n, t in (state.get("_buffers") or {}).items() if n not in skip]
    for name, tensor in entries:
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor):
            raise NVlabsError(f"{prefix}{name} is a {type(tensor).__name__}, not a tensor")
        out[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(reference_state_dict(child, f"{prefix}{name}."))
    return out


_OWN_ENTRIES = ("logvar_fourier.", "logvar_linear.")  # NVlabs/edm2's uncertainty head: the same names in our Precond


def convert_state_dict(reference: Mapping[str, Tensor], child: str = "model") -> dict[str, Tensor]:
    """Reference Precond state_dict -> ours: `<child>.<name>` (model. for NVlabs/edm, unet. for edm2) becomes
    `net.<name>` (layer names are shared); edm2's uncertainty head keeps its names."""
    out: dict[str, Tensor] = {}
    for key, value in reference.items():
        if key.startswith(_OWN_ENTRIES) and child == "unet":
            out[key] = value
        elif key.startswith(child + "."):
            out["net." + key.removeprefix(child + ".")] = value
        else:
            raise NVlabsError(f"reference state entry {key!r} is outside the wrapped model (iDDPM buffers?)")
    return out


def _encoder_facts(encoder: Any) -> dict[str, Any]:
    """What NVlabs/edm2's `encoder` says about the data: pixels (StandardRGBEncoder) or Stable Diffusion
    VAE latents (StabilityVAEEncoder: latents = raw · scale + bias)."""
    if not isinstance(encoder, PersistentObject):
        return {}
    facts: dict[str, Any] = {"encoder": encoder.class_name}
    if encoder.class_name == "StabilityVAEEncoder":
        state = encoder.state
        facts |= {"vae_name": str(state.get("vae_name")), "latent_scale": array_values(state.get("scale")),
                  "latent_bias": array_values(state.get("bias"))}
    return facts


def _init_kwargs(obj: PersistentObject, params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Constructor arguments recorded by persistence (`_init_args`, `_init_kwargs`), defaults filled in."""
    args, kwargs = obj.state.get("_init_args"), obj.state.get("_init_kwargs")
    if args is None or kwargs is None:
        raise NVlabsError(f"{where} ({obj.class_name}) has no recorded constructor arguments")
    names = list(params)
    what = f"{where} ({obj.class_name})"
    if len(args) > len(names):
        raise NVlabsError(f"{what} got {len(args)} positional arguments, expected at most {len(names)}")
    given = dict(zip(names, args)) | dict(kwargs)
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise NVlabsError(f"{what} has arguments the reference does not define: {', '.join(unknown)}")
    missing = [n for n in names if params[n] == REQUIRED and n not in given]
    if missing:
        raise NVlabsError(f"{what} lacks required arguments: {', '.join(missing)}")
    return {name: given.get(name, default) for name, default in params.items()}


def _plain(value: Any) -> Any:
    """Tuples and lists become lists of plain values, so specs stay plain containers."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _network_spec(model: PersistentObject, where: str) -> dict[str, Any]:
    """Our build() kwargs for the reference SongUNet / DhariwalUNet / EDM2 UNet."""
    kwargs = {k: _plain(v) for k, v in _init_kwargs(model, SUPPORTED_MODELS[model.class_name], where).items()}
    if model.class_name == "UNet":
        from ..networks.presets import EDM2_SIZES

        channels = kwargs.pop("img_channels")
        size = next((s for s, (c, _) in EDM2_SIZES.items() if c == kwargs["model_channels"]), "s")
        return {"name": f"edm2-{size}", "in_channels": channels, "out_channels": channels, "label_dropout": 0.0, **kwargs}
    if model.class_name == "SongUNet":
        name = "ncsnpp" if kwargs["embedding_type"] == "fourier" else "ddpmpp"
    else:
        name = "adm"
    return {"name": name, **kwargs}


def _precond_spec(ema: PersistentObject) -> tuple[dict, dict, dict]:
    """(Precond kwargs, schedule, reference facts) from the reference Precond's attributes."""
    state, kind = ema.state, SUPPORTED_PRECONDS[ema.class_name]

    def num(name: str, default: float) -> float:
        return float(state.get(name, default))

    facts = {"precond_class": ema.class_name, "use_fp16": bool(state.get("use_fp16", False))}
    if ema.class_name == "Precond":  # NVlabs/edm2: EDM coefficients, σ unbounded, the uncertainty head
        head = (state.get("_modules") or {}).get("logvar_fourier")
        freqs = (_module_state(head, "ema.logvar_fourier").get("_buffers") or {}).get("freqs") if head is not None else None
        precond = {"kind": "edm", "sigma_data": num("sigma_data", 0.5),
                   "logvar_channels": int(freqs.numel()) if isinstance(freqs, Tensor) else 0}
        return precond, {"name": "edm"}, facts
    if kind == "edm":
        precond = {"kind": "edm", "sigma_data": num("sigma_data", 0.5)}
        schedule = {"name": "edm"}
        facts |= {"sigma_min": num("sigma_min", 0.0), "sigma_max": num("sigma_max", math.inf)}
    elif kind == "vp":
        precond = {"kind": "vp", "sigma_data": 0.5, "beta_d": num("beta_d", 19.9), "beta_min": num("beta_min", 0.1),
                   "M": int(state.get("M", 1000))}
        schedule = {"name": "vp", "beta_d": precond["beta_d"], "beta_min": precond["beta_min"]}
        facts |= {"epsilon_t": num("epsilon_t", 1e-5)}
    elif kind == "iddpm":
        ddpm = {"M": int(state.get("M", IDDPM.M)), "C_1": num("C_1", IDDPM.C_1), "C_2": num("C_2", IDDPM.C_2)}
        precond = {"kind": "iddpm", "sigma_data": 0.5, **ddpm}
        schedule = {"name": "iddpm", **ddpm}
        facts |= {"sigma_min": num("sigma_min", 0.0), "sigma_max": num("sigma_max", math.inf)}
    else:
        precond = {"kind": "ve", "sigma_data": 0.5}
        schedule = {"name": "ve", "sigma_min": num("sigma_min", 0.02), "sigma_max": num("sigma_max", 100.0)}
    return precond, schedule, facts


def _ema(root: Any, path: str) -> tuple[PersistentObject, str]:
    """The snapshot's `ema` entry, checked to be a supported Precond around a supported network, and the
    name of the child that holds that network."""
    if not isinstance(root, dict) or "ema" not in root:
        found = sorted(map(str, root)) if isinstance(root, dict) else type(root).__name__
        raise NVlabsError(f"{path}: expected a dict with an 'ema' network (an NVlabs snapshot), found {found}")
    ema = root["ema"]
    if not isinstance(ema, PersistentObject):
        raise NVlabsError(f"{path}: 'ema' is a {type(ema).__name__}, not a torch_utils.persistence network")
    if ema.class_name not in SUPPORTED_PRECONDS:
        raise NVlabsError(f"{path}: 'ema' is a {ema.class_name}; supported: {', '.join(SUPPORTED_PRECONDS)}")
    child, wanted = _WRAPPED.get(ema.class_name, _EDM_WRAPPED)
    model = (ema.state.get("_modules") or {}).get(child)
    if not isinstance(model, PersistentObject) or model.class_name not in wanted:
        found = model.class_name if isinstance(model, PersistentObject) else type(model).__name__
        raise NVlabsError(f"{path}: 'ema.{child}' is a {found}; supported: {', '.join(wanted)}")
    return ema, child


def read_nvlabs(path: str | os.PathLike) -> NVlabsSnapshot:
    """Parse an NVlabs/edm snapshot safely into our denoiser spec, schedule and state_dict."""
    path = os.fspath(path)
    root = unpickle(path)
    ema, child = _ema(root, path)
    model = ema.state["_modules"][child]
    try:  # NVlabsError is a ValueError; TypeError/ValueError also come from malformed recorded values
        network = _network_spec(model, f"ema.{child}")
        precond, schedule, facts = _precond_spec(ema)
        reference = reference_state_dict(ema)
        if precond["kind"] == "iddpm":
            _check_levels(reference.pop("u", None), precond)
        facts |= {"stored_dtype": str(next(iter(reference.values())).dtype).removeprefix("torch.")}
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in convert_state_dict(reference, child).items()}
        facts |= _encoder_facts(root.get("encoder"))
    except (TypeError, ValueError, StopIteration) as err:
        raise NVlabsError(f"{path}: {err}") from None
    channels = (1, 2) if precond["kind"] == "iddpm" else (1,)  # iDDPM's network adds its learned variance's
    if network["out_channels"] not in [k * network["in_channels"] for k in channels]:
        raise NVlabsError(f"{path}: ema.model maps {network['in_channels']} to {network['out_channels']} channels; "
                          "our Precond needs equal input and output channels"
                          + (" or, for iDDPM, twice as many out" if precond["kind"] == "iddpm" else ""))
    facts |= {"model_class": model.class_name}
    return NVlabsSnapshot({"network": network, "precond": precond}, schedule, state_dict, facts)


def _check_levels(u: Tensor | None, precond: dict) -> None:
    """iDDPMPrecond's stored noise levels u_j are those of its M, C_1 and C_2 (float32 round-off: its table
    comes from a float32 recurrence, ours from the closed form in float64; measured ≤ 4.8e-4 relative, at u_{M−1})."""
    ours = iddpm_sigmas(precond["M"], precond["C_1"], precond["C_2"])
    if not isinstance(u, Tensor) or u.shape != ours.shape:
        shape = list(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise NVlabsError(f"ema.u (iDDPM's noise levels) is {shape}, expected {list(ours.shape)} for M={precond['M']}")
    if not torch.allclose(u.double(), ours, rtol=1e-3, atol=1e-6):
        raise NVlabsError(f"ema.u differs from iDDPM's noise levels for M={precond['M']}, C_1={precond['C_1']}, "
                          f"C_2={precond['C_2']} (largest difference {float((u.double() - ours).abs().max()):.3g})")


def denoiser_from_snapshot(snap: NVlabsSnapshot, source: str = "snapshot") -> Precond:
    """Our Precond for a parsed snapshot, through its checkpoint dict (`to_checkpoint`) and the loader of
    every checkpoint (edm.models.checkpoint.denoiser_from_state): weights load with strict=True, eval mode."""
    try:
        return denoiser_from_state(to_checkpoint(snap, source), source=source)
    except (ValueError, TypeError) as err:
        raise NVlabsError(f"{source}: cannot rebuild {snap.reference['model_class']} {snap.denoiser}: {err}") from None


def load_nvlabs(path: str | os.PathLike) -> Precond:
    """Our Precond (eval mode, fp32, CPU) equal to the `ema` network of NVlabs/edm snapshot `path`.

    Never runs code stored in the pickle; NVlabsError names the problem for anything that
    is not a supported snapshot (other classes, iDDPM, truncated or foreign files).
    """
    snap = read_nvlabs(path)
    denoiser = denoiser_from_snapshot(snap, os.fspath(path))
    logger.info("loaded %s(%s) from %s", snap.reference["precond_class"], snap.reference["model_class"], path)
    return denoiser


def to_checkpoint(snap: NVlabsSnapshot, source: str) -> dict:
    """Our checkpoint dict for a snapshot: denoiser spec, schedule, ema = model = converted weights, config."""
    weights = dict(snap.state_dict)
    reference = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in snap.reference.items()}
    return {
        "denoiser": snap.denoiser,
        "schedule": snap.schedule,
        "ema": weights,
        "model": weights,
        "config": {"source": "nvlabs", "pickle": os.path.basename(source), "reference": reference,
                   "denoiser": snap.denoiser, "schedule": snap.schedule},
    }


def convert(pkl: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> NVlabsSnapshot:
    """Write NVlabs snapshot `pkl` as a model folder `out` (edm.models.export), or as an edm checkpoint when
    `out` ends in .pt; its weights must load strictly first, and its code never runs. A model of another source
    there (any .pt file) is refused unless `overwrite`, a run's or another command's folder always, and so is a .pt
    named as a run's checkpoint or in a run's folder. The parsed snapshot."""
    from ..files import FolderLock, file_sha256
    from .checkpoint import save_checkpoint
    from .export import export_state

    pkl, out = os.fspath(pkl), os.fspath(out)
    snap = read_nvlabs(pkl)
    denoiser_from_snapshot(snap, pkl)  # the weights must load strictly before anything is written
    state = to_checkpoint(snap, pkl)
    if out.endswith(".pt"):
        folder = os.path.dirname(os.path.abspath(out))
        if run_marks(folder) or os.path.basename(out).startswith("checkpoint-"):
            raise ValueError(f"out={out} would be a checkpoint of a training run ({folder} is a run's folder, or the "
                             "name is a run checkpoint's, checkpoint-*.pt, which edm-train resumes from and edm-sample "
                             "reads as a run's latest): give a file of another name outside run folders")
        if os.path.exists(out) and not overwrite:
            raise ValueError(f"{out} exists: give another out=FILE.pt, or pass overwrite=true to replace it")
        save_checkpoint(out, state)  # atomic: a file appears whole or not at all
    else:
        refuse_foreign_folder(out, own="model.json")  # not a run's folder, nor another command's results
        with FolderLock(out, key="out", owner="model export"):
            export_state(state, out, source_sha256=file_sha256(pkl), overwrite=overwrite)
    return snap
