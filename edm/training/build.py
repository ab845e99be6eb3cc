"""From a training config to the objects it names, each built once: schedule, denoiser spec, loss.

The denoiser spec {"network": build kwargs, "precond": Precond kwargs} and the schedule spec
{"name": ..., **fields} are plain containers with every default filled in: they go into
checkpoints, which rebuild the same denoiser and schedule from them.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any

from ..data.augment import AUGMENT_DIM
from .config import LossConfig, PrecondConfig, ScheduleConfig, TrainConfig
from ..files import to_container
from ..data import ImageDataset
from ..core.losses import Loss, learns_weighting
from ..networks import resolve as resolve_network
from ..core.precond import Precond
from ..core.schedules import VP, Schedule, get as get_schedule

__all__ = [
    "build_schedule", "schedule_spec", "precond_spec", "precond_defaults", "LOGVAR_CHANNELS", "network_spec", "resolved_network", "denoiser_spec", "build_loss",
]

logger = logging.getLogger(__name__)


def build_schedule(cfg: ScheduleConfig) -> Schedule:
    """edm.schedules.get(name, **options); an option the schedule lacks is a ValueError naming the valid ones."""
    return get_schedule(cfg.name, **cfg.options())


def schedule_spec(schedule: Schedule) -> dict[str, Any]:
    """{"name": ..., **every field}: the arguments that rebuild `schedule` with edm.schedules.get."""
    return {"name": schedule.name, **dataclasses.asdict(schedule)}


LOGVAR_CHANNELS = 128  # EDM2's uncertainty head width, when the loss learns its weighting


def precond_defaults() -> dict[str, Any]:
    """Every Precond keyword argument with its default: what a spec that omits a key means."""
    return {p.name: p.default for p in inspect.signature(Precond).parameters.values() if p.name != "net"}


def precond_spec(cfg: PrecondConfig, schedule: Schedule, learned_weighting: bool = False) -> dict[str, Any]:
    """Precond keyword arguments, every one set: kind None = the schedule's; β's None = the schedule's
    when it is VP, else Precond's defaults; logvar_channels None = LOGVAR_CHANNELS if the loss learns
    its weighting, else 0."""
    defaults = precond_defaults()
    vp = schedule if isinstance(schedule, VP) else None
    spec = {**defaults, **{k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}}
    spec["kind"] = cfg.kind or schedule.name
    for key in ("beta_d", "beta_min"):
        if getattr(cfg, key) is None and vp is not None:
            spec[key] = getattr(vp, key)
    if cfg.logvar_channels is None:
        spec["logvar_channels"] = LOGVAR_CHANNELS if learned_weighting else 0
    return spec


def resolved_network(network: dict[str, Any]) -> dict[str, Any]:
    """{"name": ..., **every constructor argument} of a network spec (edm.networks.resolve), as plain lists."""
    name = network["name"]
    return {"name": name, **to_container(resolve_network(name, **{k: v for k, v in network.items() if k != "name"})[1])}


def network_spec(cfg: TrainConfig, dataset: ImageDataset) -> dict[str, Any]:
    """edm.networks.build kwargs (with "name"), resolved: the set fields of cfg.network, the data set's shape
    and labels, augment_dim = AUGMENT_DIM when augmentation is on, the preset's values for the rest."""
    network = {k: v for k, v in to_container(cfg.network).items() if v is not None}
    for key, value in (
        ("img_resolution", dataset.resolution), ("in_channels", dataset.channels), ("label_dim", dataset.label_dim)
    ):
        if network.get(key) not in (None, value):
            logger.info("network.%s=%s replaced by %s from data set %s", key, network[key], value, cfg.dataset.name)
        network[key] = value
    if cfg.augment.p > 0:
        network["augment_dim"] = AUGMENT_DIM  # the network is told each image's augmentation
    return resolved_network(network)


def denoiser_spec(cfg: TrainConfig, dataset: ImageDataset, schedule: Schedule) -> dict[str, Any]:
    """{"network": network_spec, "precond": precond_spec}: what edm.checkpoint.build_denoiser takes."""
    learned = learns_weighting(cfg.loss.kind or schedule.name, cfg.loss.learned_weighting)
    return {"network": network_spec(cfg, dataset), "precond": precond_spec(cfg.precond, schedule, learned)}


def build_loss(cfg: LossConfig, schedule: Schedule, sigma_data: float) -> Loss:
    """edm.Loss of the config; sigma_data is the precond's, so that λ c_out² = 1 holds."""
    return Loss(schedule, sigma_data=sigma_data, **dataclasses.asdict(cfg))
