"""From a training config to the objects it names, each built and resolved once: schedule, loss, denoiser spec.

The loss and the preconditioning default to the schedule's parameterization; every other None
of the config is resolved here too, so what a run stores (the loss spec, the denoiser spec
{"network": build kwargs, "precond": Precond kwargs} and the schedule spec) has every default
filled in: checkpoints rebuild the same objects from them, and resume compares them as they are.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..choices import keyword_defaults
from ..core.consistency import ECTLoss, SCMLoss
from ..core.losses import LOSS_KINDS, Loss, target_weight
from ..core.meanflow import MeanFlowLoss
from ..core.precond import PRECOND_KINDS, Precond
from ..core.schedules import IDDPM, VP, Schedule
from ..data import ImageDataset, other_images
from ..data.augment import AUGMENT_DIM
from ..files import to_container
from ..hardware import RunWideLog
from ..latent import VAE, LatentConfig, VAEError, check_vae, load_vae, pixel_channels, same_latent_space
from ..networks import NetworkConfig, resolve as resolve_network
from .config import LossConfig, PrecondConfig, TrainConfig

if TYPE_CHECKING:
    from ..models.loading import ModelInfo

__all__ = [
    "Resolved", "resolve", "build_loss", "check_target_weight", "loss_spec", "precond_spec", "precond_defaults", "LOGVAR_CHANNELS",
    "network_spec", "resolved_network", "latent_vae", "latent_facts", "initial_denoiser", "with_teacher", "check_few_step_settings", "check_objective", "load_initial_weights",
]

logger = logging.getLogger(__name__)
run_logger = RunWideLog(logger)  # warnings about the run's settings: once per run

LOGVAR_CHANNELS = 128  # EDM2's uncertainty head width, when the loss learns its weighting


def build_loss(cfg: LossConfig, schedule: Schedule, sigma_data: float) -> Loss:
    """edm.Loss of the config, resolved (kind None = the schedule's parameterization, P_mean/P_std and
    learned_weighting the kind's); sigma_data is the precond's, so that λ c_out² = 1 holds."""
    return Loss(schedule, sigma_data=sigma_data, **dataclasses.asdict(cfg))


def loss_spec(loss: Loss | ECTLoss | SCMLoss | MeanFlowLoss) -> dict[str, Any]:
    """Its kind and every field of a (resolved) loss but its schedule: what a checkpoint records and resume compares."""
    return {"kind": loss.kind} | {f.name: getattr(loss, f.name) for f in dataclasses.fields(loss)
                                  if f.name not in ("schedule", "teacher")}


def precond_defaults() -> dict[str, Any]:
    """Every Precond keyword argument with its default: what a spec that omits a key means."""
    return keyword_defaults(Precond)


def precond_spec(cfg: PrecondConfig, schedule: Schedule, loss: Loss) -> dict[str, Any]:
    """Precond keyword arguments, every one set: kind None = the schedule's parameterization; β's None =
    the schedule's when it is VP, M, C_1, C_2 None the schedule's when it is iddpm, else Precond's defaults;
    logvar_channels None = LOGVAR_CHANNELS if the loss learns its weighting, else 0 (and 0 with such a loss is
    refused)."""
    spec = {**precond_defaults(), **{k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}}
    spec["kind"] = cfg.kind or schedule.parameterization
    for keys, cls in ((("beta_d", "beta_min"), VP), (("M", "C_1", "C_2"), IDDPM)):
        for key in keys:
            if getattr(cfg, key) is None and isinstance(schedule, cls):
                spec[key] = getattr(schedule, key)
    if cfg.logvar_channels is None:
        spec["logvar_channels"] = LOGVAR_CHANNELS if loss.learned_weighting else 0
    if loss.learned_weighting and spec["logvar_channels"] == 0:
        raise ValueError("the loss learns its weighting u(σ) (loss.kind=edm2 or loss.learned_weighting=true), which needs "
                         f"the denoiser's uncertainty head: leave precond.logvar_channels unset ({LOGVAR_CHANNELS}) or "
                         "set it > 0")
    return spec


def resolved_network(network: dict[str, Any]) -> dict[str, Any]:
    """{"name": ..., **every constructor argument} of a network spec (edm.networks.resolve), as plain lists."""
    name = network["name"]
    return {"name": name, **to_container(resolve_network(name, **{k: v for k, v in network.items() if k != "name"})[1])}


def check_target_weight(loss: Loss | ECTLoss | SCMLoss | MeanFlowLoss, precond_kind: str, schedule: Schedule) -> None:
    """Warn when the denoising loss's λ(σ)·c_out(σ)², the weight of the network's own target, is not 1 over the
    schedule's σ range: the loss and the preconditioning are then not one row of EDM Table 1."""
    if not isinstance(loss, Loss):
        return
    sigma = torch.logspace(np.log10(schedule.sigma_min), np.log10(schedule.sigma_max), 64, dtype=torch.float64)
    one = torch.ones_like(sigma)
    unit = lambda kind, precond: torch.allclose(target_weight(sigma, kind, precond, loss.sigma_data), one, rtol=1e-6)  # noqa: E731
    weight = target_weight(sigma, loss.kind, precond_kind, loss.sigma_data)
    if torch.allclose(weight, one, rtol=1e-6):
        return
    lo, hi = int(weight.argmin()), int(weight.argmax())
    preconds = [p for p in PRECOND_KINDS if unit(loss.kind, p)]
    losses = [k for k in LOSS_KINDS if unit(k, precond_kind)]
    absorbs = "; the learned weighting u(σ) has to absorb it" if loss.learned_weighting else ""
    run_logger.warning(
        "loss.kind=%s with precond.kind=%s weights the network's own target by λ(σ)·c_out(σ)² from %.3g (σ = %.3g) "
        "to %.3g (σ = %.3g) over the schedule's σ range, not 1 as in each row of EDM Table 1%s: precond.kind=%s or "
        "loss.kind=%s makes it 1", loss.kind, precond_kind, float(weight[lo]), float(sigma[lo]), float(weight[hi]),
        float(sigma[hi]), absorbs, "|".join(preconds), "|".join(losses))


def network_spec(cfg: TrainConfig, dataset: ImageDataset) -> dict[str, Any]:
    """edm.networks.build kwargs (with "name"), resolved: the set fields of cfg.network, the data set's shape
    and labels, augment_dim = AUGMENT_DIM when augmentation is on, the preset's values for the rest."""
    network = {k: v for k, v in to_container(cfg.network).items() if v is not None}
    for key, value in (
        ("img_resolution", dataset.resolution), ("in_channels", dataset.channels), ("label_dim", dataset.label_dim)
    ):
        if dataset.latent is not None and key != "label_dim" and network.get(key) not in (None, value):
            raise ValueError(f"network.{key}={network[key]}, but the latent data set holds {dataset.channels}x"
                             f"{dataset.resolution}x{dataset.resolution} VAE latents: drop network.{key} (the network "
                             "takes the latents' shape)")
        if network.get(key) not in (None, value):
            logger.info("network.%s=%s replaced by %s from data set %s", key, network[key], value, cfg.dataset.name)
        network[key] = value
    if cfg.augment.p > 0:
        network["augment_dim"] = AUGMENT_DIM  # the network is told each image's augmentation
    return resolved_network(network)


def latent_vae(cfg: TrainConfig, dataset: ImageDataset, device: Any) -> VAE | None:
    """The VAE of a latent data set (latent.vae, else the one the set records), None for pixels; its latents must
    have the set's channels, and its weights the fingerprint the set records."""
    if dataset.latent is None:
        return None
    name = cfg.latent.vae or dataset.latent.get("vae")
    if name is None:
        raise VAEError(f"the latent data set {cfg.dataset.root} does not say which VAE encoded it (no latents.json): "
                       "set latent.vae=FOLDER")
    vae = load_vae(cfg.latent, name, device, pixel_channels(dataset.latent))
    check_vae(vae, dataset.channels, dataset.latent, f"the data set {cfg.dataset.root}",
              "set latent.vae to the folder of the VAE that encoded it")
    check_latent_statistics(cfg.latent, dataset.latent.get("raw_statistics"), vae)
    return vae


def check_latent_statistics(cfg: LatentConfig, measured: dict | None, vae: VAE) -> None:
    """Warn when the data set's measured raw statistics (edm-encode's latents.json) do not map to about final_mean
    and final_std under the configured latent map: the constants are another VAE's."""
    if not measured:
        return
    mean = np.asarray(measured["mean"]) * vae.scale + vae.bias
    std = np.asarray(measured["std"]) * vae.scale
    if np.any(np.abs(std / cfg.final_std - 1) > 0.5) or np.any(np.abs(mean - cfg.final_mean) > 0.5 * cfg.final_std):
        run_logger.warning("the latents map to mean %s, std %s per channel (latent.final_mean=%s, final_std=%s wanted): "
                           "latent.raw_mean=%s, raw_std=%s are not this VAE's; set them to the data set's measured %s, %s "
                           "(its latents.json)", np.round(mean, 3).tolist(), np.round(std, 3).tolist(), cfg.final_mean,
                           cfg.final_std, list(cfg.raw_mean), list(cfg.raw_std), measured["mean"], measured["std"])


def latent_facts(vae: VAE, dataset: ImageDataset) -> dict[str, Any]:
    """What a latent run records (checkpoints, model folders): the VAE's facts, the pixel shape and pixel data set."""
    return vae.facts() | {"pixel_shape": dataset.latent.get("pixel_shape"), "dataset": dataset.latent.get("dataset")}


def check_model_fits(role: str, info: ModelInfo, cfg: TrainConfig, dataset: ImageDataset,
                     latent: dict[str, Any] | None, fix: str) -> None:
    """A model a run starts from or learns from (`role`: init or teacher) must make this run's data: latents of the
    same map as the run's (`latent`: its latent_facts, or None for pixels), then the data set's image shape (C, H, W)
    and classes (else `fix` is the advice); a model trained on other images of that shape is allowed, with a
    warning."""
    same_latent_space(latent, info.latent, f"{role} {info.source}", "this run's data")
    check_model_data(role, info.source, info.img_shape, info.label_dim, cfg, dataset, fix)
    warn_other_data(role, info.source, info.dataset, cfg)


def check_model_data(role: str, source: Any, shape: tuple, label_dim: int, cfg: TrainConfig, dataset: ImageDataset,
                     fix: str) -> None:
    """A model a run starts from or learns from must make the data set's images: shape (C, H, W) and classes."""
    want = (dataset.channels, dataset.resolution, dataset.resolution)
    if tuple(shape) != want or label_dim != dataset.label_dim:
        raise ValueError(f"{role} {source} models {'x'.join(map(str, shape))} images with {label_dim} classes, data set "
                         f"{cfg.dataset.name} has {'x'.join(map(str, want))} with {dataset.label_dim}: {fix}")


def warn_other_data(role: str, source: Any, recorded: dict[str, Any] | None, cfg: TrainConfig) -> None:
    """Warn when a model a run starts from or distils was trained on other images than the run's (another data set,
    size or resampling filter, where its record holds them: edm.data.other_images): allowed (a model tuned on new
    data), but said."""
    differ = other_images(recorded, dataclasses.asdict(cfg.dataset))
    diffs = [f"{key} {theirs!r}, this run {ours!r}" for key, theirs, ours in differ]
    if diffs:
        run_logger.warning("%s %s was trained on other images (%s): this run trains on dataset=%s", role, source,
                           "; ".join(diffs), cfg.dataset.name)


INIT_FREE = ("dropout", "label_dropout")  # network settings without weights: the config's apply to an init model
INIT_SET = ("second_noise",)  # network settings an objective sets on an init model (MeanFlow's second input)


def check_init_settings(cfg: TrainConfig, network: dict[str, Any], precond: dict[str, Any], path: Path) -> None:
    """init= trains the model's network and preconditioning, so a config that names others is refused, with the
    model's values: a network preset other than the default (network=) that differs from the model's, a network.*
    or precond.* value set to another than the model's (but INIT_FREE, INIT_SET and precond.boundary_sigma), and
    precond.sigma_data, which the loss reads too."""
    differ = [("network", cfg.network.name, network["name"])] if cfg.network.name not in (
        NetworkConfig.name, network["name"]) else []
    for group, config, model, skip in (("network", cfg.network, network, ("name", *INIT_FREE, *INIT_SET)),
                                       ("precond", cfg.precond, precond, ("boundary_sigma",))):
        for key, value in dataclasses.asdict(config).items():
            if key not in skip and value is not None and to_container(value) != to_container(model.get(key)):
                differ.append((f"{group}.{key}", value, model.get(key)))
    if differ:
        found = ", ".join(f"{key}={override_text(ours)} where the model has {override_text(theirs)}"
                          for key, ours, theirs in differ)
        fix = " ".join(f"{key}={override_text(theirs)}" for key, _, theirs in differ)
        raise ValueError(f"init={path} trains its own network and preconditioning, which the config's values (defaults "
                         f"included) contradict ({found}): set them to the model's ({fix}), or train without init=")


def override_text(value: Any) -> str:
    """A value as a command line override writes it: null, true, [1,2] (no spaces, which a shell would split)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    return str(value)


def initial_denoiser(cfg: TrainConfig, dataset: ImageDataset, latent: dict[str, Any] | None
                     ) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(denoiser spec, EMA weights, the file read) of the model cfg.init names: its network (network.dropout and
    network.label_dropout from the config where set) and preconditioning (precond.boundary_sigma from the
    config), which the config may not contradict (check_init_settings); its images must have the data set's shape
    and labels, and be the run's pixels or latents of the same map (`latent`: the run's latent_facts, or None)."""
    from ..models.loading import ModelInfo, model_latent, read_model_file

    path, state = read_model_file(cfg.init, ema=True)
    free = {key: getattr(cfg.network, key) for key in INIT_FREE if getattr(cfg.network, key) is not None}
    network = resolved_network({**state["denoiser"]["network"], **free,
                                **({"second_noise": True} if cfg.objective == "meanflow" else {})})
    precond = {**precond_defaults(), **state["denoiser"]["precond"], "boundary_sigma": cfg.precond.boundary_sigma}
    check_init_settings(cfg, network, precond, path)
    resolution = network.get("img_resolution")
    info = ModelInfo(img_shape=(network.get("in_channels"), resolution, resolution),
                     label_dim=network.get("label_dim") or 0, source=str(path), latent=model_latent(state),
                     dataset=(state.get("config") or {}).get("dataset"))
    check_model_fits("init", info, cfg, dataset, latent, "train on the model's data (dataset=, dataset.resolution=, "
                     "dataset.cond=) or start from another model")
    check_objective(cfg.objective, {"precond": precond}, str(path))  # before the schedule note, which this refusal voids
    logger.info("init: the denoiser of %s (network %s, precond %s), its EMA weights", path, network["name"], precond["kind"])
    trained = (state.get("schedule") or {}).get("name")
    if trained is not None and trained != cfg.schedule.name:
        logger.warning("init: %s was trained with schedule=%s; this run trains and samples with schedule=%s (its "
                       "preconditioning is the model's, %s; schedule=%s keeps the model's schedule)", path, trained,
                       cfg.schedule.name, precond["kind"], trained)
    return {"network": network, "precond": precond}, state["ema"], path


def check_few_step_settings(cfg: TrainConfig) -> None:
    """Warn when ECT starts from random weights (it tunes a trained denoiser: init=), or a few-step objective's own
    schedule outlasts total_kimg (the recipes' values are for 96 kimg): ECT that never leaves its first stage (r(t)
    never nears t), sCM whose tangent warm-up never ends."""
    if cfg.objective == "ect" and cfg.init is None:
        run_logger.warning("objective=ect without init= trains a consistency model from random weights; ECT tunes a "
                           "trained denoiser: init=RUN (a run folder, checkpoint or model file)")
    if cfg.objective == "ect" and cfg.total_kimg <= cfg.ect.stage_kimg:
        run_logger.warning("total_kimg=%g ends in ECT's first stage (ect.stage_kimg=%g), so Δt = t − r never shrinks: "
                           "scale ect.stage_kimg with total_kimg (recipe=ect: 8 stages of 12 kimg in 96)",
                           cfg.total_kimg, cfg.ect.stage_kimg)
    if cfg.objective in ("sct", "scd") and cfg.total_kimg < cfg.scm.warmup_kimg:
        run_logger.warning("total_kimg=%g ends within sCM's tangent warm-up (scm.warmup_kimg=%g), so the tangent never "
                           "reaches its full weight: scale scm.warmup_kimg with total_kimg (recipe=%s: 10 kimg of 96)",
                           cfg.total_kimg, cfg.scm.warmup_kimg, cfg.objective)


def check_objective(objective: str, spec: dict[str, Any], init: str | None = None) -> None:
    """MeanFlow's average velocity is the flow-matching network's: refuse another preconditioning (with `init`, the
    init model's)."""
    kind = spec["precond"]["kind"]
    if objective == "meanflow" and kind != "fm":
        fix = (f"init= a model trained with schedule=fm ({init} was trained with precond kind {kind})" if init
               else "use schedule=fm, or init= a model trained with schedule=fm")
        raise ValueError(f"objective=meanflow trains a flow-matching model (precond kind fm), not kind {kind}: {fix}")


SECOND_NOISE_KEYS = ("map_noise2.", "emb_noise2.", "emb_noise2_gain")  # a second noise input's parameters


def load_initial_weights(denoiser: Any, weights: dict[str, Any]) -> None:
    """Load an init model's weights; a second noise input that the model lacks keeps its zero initialization."""
    missing, unexpected = denoiser.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not any(part in k for part in SECOND_NOISE_KEYS)]
    if missing or unexpected:
        raise ValueError(f"the init model's weights do not fit its network: missing {missing}, unexpected {unexpected}")


def with_teacher(loss: SCMLoss, cfg: TrainConfig, dataset: ImageDataset, device: Any, latent: dict[str, Any] | None
                 ) -> tuple[SCMLoss, str]:
    """(sCD's loss with its teacher: the EMA denoiser of cfg.teacher, frozen, on `device`, the file read); its images
    must be the data set's, pixels or latents of the same map as the run's (`latent`: its latent_facts, or None)."""
    from ..models.loading import load_model

    teacher, info = load_model(cfg.teacher, device=device)
    check_model_fits("teacher", info, cfg, dataset, latent, "distil a teacher of this data")
    if info.objective != "denoising":
        raise ValueError(f"teacher {info.source} is a consistency model (objective={info.objective}): sCD distils a denoiser")
    logger.info("teacher: the denoiser of %s", info.source)
    return dataclasses.replace(loss, teacher=teacher.requires_grad_(False)), info.source


@dataclass(frozen=True)
class Resolved:
    """A training config's schedule, loss and precond spec, every None resolved."""

    schedule: Schedule
    loss: Loss | ECTLoss | SCMLoss | MeanFlowLoss
    precond: dict[str, Any]

    def denoiser_spec(self, cfg: TrainConfig, dataset: ImageDataset) -> dict[str, Any]:
        """{"network": network_spec, "precond": the precond spec}: what edm.models.checkpoint.build_denoiser takes."""
        return {"network": network_spec(cfg, dataset), "precond": self.precond}


def resolve(cfg: TrainConfig) -> Resolved:
    """Build the config's schedule and loss and resolve its precond, once and before any work (bad schedule
    options, or a learned weighting without its head, fail here)."""
    schedule = cfg.schedule.build()
    own = getattr(schedule, "sigma_data", cfg.precond.sigma_data)  # TrigFlow's σ(t) = σ_d tan t names σ_d too
    if own != cfg.precond.sigma_data:
        raise ValueError(f"schedule.sigma_data={own} differs from precond.sigma_data={cfg.precond.sigma_data}: "
                         "set both to the data's standard deviation")
    if cfg.objective == "ect":
        loss = ECTLoss(sigma_data=cfg.precond.sigma_data, boundary_sigma=cfg.precond.boundary_sigma,
                       **dataclasses.asdict(cfg.ect))
    elif cfg.objective == "meanflow":
        loss = MeanFlowLoss(**dataclasses.asdict(cfg.meanflow))
    elif cfg.objective in ("sct", "scd"):  # scd's teacher joins once the run knows its device (with_teacher)
        loss = SCMLoss(sigma_data=cfg.precond.sigma_data, boundary_sigma=cfg.precond.boundary_sigma,
                       **dataclasses.asdict(cfg.scm))
    else:
        loss = build_loss(cfg.loss, schedule, cfg.precond.sigma_data)
    precond = precond_spec(cfg.precond, schedule, loss)
    if cfg.init is None:  # with init, the init model's preconditioning is checked once it is read
        check_objective(cfg.objective, {"precond": precond})
    return Resolved(schedule, loss, precond)
