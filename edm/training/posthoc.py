"""Post-hoc EMA (EDM2): any σ_rel's EMA of a run, from its power-EMA snapshots, as model folders.

    edm-train ... ema_sigma_rel=[0.05,0.10] ema_snapshot_kimg=8            # snapshots in RUN/phema/
    reconstruct(PosthocConfig(run_dir="RUN", sigma_rel=[0.05, 0.10, 0.15], out="RUN/posthoc"))

Each σ_rel becomes a model folder OUT/ema-<σ_rel>/ (model.safetensors + model.json, as edm-export
writes; model.json names the snapshots, their weights and the fit's residual), read by every
command. The snapshots are combined by the least-squares weights of edm.training.phema.posthoc_coefficients.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..files import FolderLock, differences, read_record, write_json
from ..provenance import claim, refuse_foreign_folder
from ..models.checkpoint import CheckpointError
from ..models.export import export_state
from .phema import POOR_FIT, Snapshot, combine, list_snapshots, posthoc_coefficients, profile_residual, std_to_exp

__all__ = ["PosthocConfig", "reconstruct", "output_name"]

logger = logging.getLogger(__name__)


@dataclass
class PosthocConfig:
    run_dir: str = "???"  # a training run folder with phema/ snapshots (or the phema/ folder)
    sigma_rel: List[float] = field(default_factory=list)  # the EMA profiles to reconstruct, e.g. [0.05,0.10,0.15]
    out: str = "???"  # OUT/ema-<σ_rel>/ per profile, OUT/posthoc.json
    at_kimg: Optional[float] = None  # reconstruct at this snapshot's time; null = the latest snapshot
    overwrite: bool = False  # delete OUT's earlier results first (else a folder made from other snapshots is refused)


def output_name(std: float) -> str:
    return f"ema-{std:.3f}"


def _one_run(snaps: list) -> None:
    """Snapshots of one training: one denoiser and schedule, and the settings a resume may not change (seed, data,
    batch, σ_rel's: edm.training.run.RESUME_FIXED; the loss is fixed as its resolved spec, which snapshots do not hold,
    so its config keys are not compared) alike; otherwise refused naming the first difference."""
    from .run import listed, RESUME_FIXED

    first = snaps[0]
    for s in snaps[1:]:
        if s.meta["denoiser"] != first.meta["denoiser"] or s.meta["schedule"] != first.meta["schedule"]:
            raise CheckpointError(f"{s.path} holds another denoiser or schedule than {first.path}: the snapshots "
                                  "are not of one run")
        fixed = [(k, a, b) for k, a, b in differences(first.meta.get("config") or {}, s.meta.get("config") or {},
                                                      shared_only=True)
                 if listed(k, RESUME_FIXED) and not k.startswith("loss.")]
        if fixed:
            key, a, b = fixed[0]
            raise CheckpointError(f"{s.path} is of another training than {first.path} ({key}: {a!r} vs {b!r}): the "
                                  "snapshots are not of one run; move the other run's snapshots away")


def _snapshot_digest(snapshot) -> str:
    """A snapshot's identity in OUT's record: the SHA-256 of its header's meta (config with the seed, step, σ_rel's)."""
    return hashlib.sha256(json.dumps(snapshot.meta, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reconstruct(cfg: PosthocConfig) -> list[dict]:
    """Write OUT/ema-<σ_rel>/ for each cfg.sigma_rel; a summary per profile (also in OUT/posthoc.json)."""
    if not cfg.sigma_rel:
        raise ValueError("sigma_rel is empty: name the EMA profiles to reconstruct, e.g. sigma_rel=[0.05,0.10]")
    std_to_exp(list(cfg.sigma_rel))  # a bad σ_rel fails before any reading
    stds = sorted(set(float(v) for v in cfg.sigma_rel))
    clash = _shared_folder(stds)
    if clash:
        raise ValueError(f"sigma_rel={list(cfg.sigma_rel)}: {clash[1]:g}, {clash[0]:g} would share the folder "
                         f"{output_name(clash[0])} (three decimals): give values that differ there")
    refuse_foreign_folder(cfg.out)
    if not Path(cfg.run_dir).is_dir():
        what = "is a file, not a folder" if Path(cfg.run_dir).exists() else "does not exist"
        raise FileNotFoundError(f"run_dir={cfg.run_dir} {what}: give the training run's folder")
    snaps = list_snapshots(cfg.run_dir)
    if not snaps:
        raise FileNotFoundError(f"no power-EMA snapshots in {cfg.run_dir}: train with ema_sigma_rel=[0.05,0.10] "
                                "ema_snapshot_kimg=K (snapshots go to run_dir/phema/)")
    at = snaps[-1].cur_nimg if cfg.at_kimg is None else round(cfg.at_kimg * 1000)
    if at not in {s.cur_nimg for s in snaps}:
        raise ValueError(f"at_kimg={cfg.at_kimg} is no snapshot's time; snapshots at kimg "
                         f"{', '.join(f'{s.cur_nimg / 1000:g}' for s in snaps)}")
    snaps = [s for s in snaps if s.cur_nimg <= at]
    first = snaps[0]
    _one_run(snaps)
    inputs = [(s, i) for s in snaps for i in range(len(s.stds))]
    in_t, in_std = [s.cur_nimg for s, _ in inputs], [s.stds[i] for s, i in inputs]
    out = Path(cfg.out)
    with FolderLock(out, key="out", owner="post-hoc EMA"):
        record = {"run_dir": str(Path(cfg.run_dir).resolve()), "at_nimg": at,
                  "snapshots": {s.path.name: {"bytes": s.path.stat().st_size, "stds": list(s.stds),
                                              "meta_sha256": _snapshot_digest(s)} for s in snaps}}
        claim(out, record, [*out.glob("ema-*"), out / "posthoc.json"], command="edm-posthoc", overwrite=cfg.overwrite)
        _refuse_renamed(out / "posthoc.json", stds)
        X = posthoc_coefficients(in_t, in_std, at, stds)
        residual = profile_residual(in_t, in_std, at, stds, X)
        _report_poor_fits(stds, residual, snaps)
        profiles = (profile for s in snaps for profile in s.profiles())  # each file read once, one at a time
        emas = combine(zip(profiles, X), len(stds))
        summary = []
        for j, std in enumerate(stds):
            state = {"denoiser": first.meta["denoiser"], "schedule": first.meta["schedule"], "config": first.meta["config"],
                     "step": snaps[-1].meta["step"], "ema": emas[j], "latent": first.meta.get("latent"),
                     "inputs": snaps[-1].meta.get("inputs")}  # the newest: what the run read last
            info = {"sigma_rel": std, "at_kimg": at / 1000, "residual": float(residual[j]),
                    "inputs": [{"snapshot": s.path.name, "sigma_rel": s.stds[i], "weight": float(X[k, j])}
                               for k, (s, i) in enumerate(inputs)]}
            folder = export_state(state, out / output_name(std), extra={"posthoc_ema": info},
                                  overwrite=True)  # the folder's claim above holds it to these snapshots
            summary.append({**info, "folder": str(folder)})
        write_json(out / "posthoc.json", {"at_kimg": at / 1000, "profiles": _merged(out / "posthoc.json", summary)})
    return summary


def _report_poor_fits(stds: list[float], residual: np.ndarray, snaps: list[Snapshot]) -> None:
    """Warn of each σ_rel whose profile the snapshots fit worse than POOR_FIT, naming what fits it better."""
    tracked = sorted({std for s in snaps for std in s.stds})
    for std, r in zip(stds, residual):
        if r > POOR_FIT:
            logger.warning("sigma_rel %g: the %d snapshot(s) fit its EMA profile only to a relative residual of %.2g "
                           "(above %g), so its weights may be that far from that EMA's; a sigma_rel nearer the tracked "
                           "%s, or a run with more snapshots (a smaller ema_snapshot_kimg), fits better", std, len(snaps),
                           r, POOR_FIT, tracked)


def _listed(listing: Path) -> list[dict]:
    """The profiles posthoc.json lists ([] without a readable one; entries that are no profile left out)."""
    try:
        record = read_record(listing) if listing.is_file() else {}
    except (OSError, ValueError):
        return []
    profiles = record.get("profiles", [])
    return [p for p in profiles if isinstance(p, dict) and "sigma_rel" in p] if isinstance(profiles, list) else []


def _shared_folder(stds: list[float], earlier: list[float] = ()) -> tuple[float, float] | None:
    """(σ_rel, other) where a σ_rel of `stds` and another of the earlier ones in `stds` or of `earlier` would share one
    ema-<σ_rel> folder (three decimals); None if none do."""
    for i, std in enumerate(stds):
        for other in [*stds[:i], *earlier]:
            if other != std and output_name(other) == output_name(std):
                return std, other
    return None


def _refuse_renamed(listing: Path, stds: list[float]) -> None:
    """Refuse a σ_rel whose folder an earlier call's different σ_rel holds (both round to one ema-<σ_rel> name)."""
    clash = _shared_folder(stds, [p["sigma_rel"] for p in _listed(listing)])
    if clash:
        raise ValueError(f"sigma_rel {clash[0]:g} would replace {output_name(clash[0])}, which holds sigma_rel "
                         f"{clash[1]:g} of an earlier call: give values that differ in three decimals")


def _merged(listing: Path, summary: list[dict]) -> list[dict]:
    """OUT's profiles: those posthoc.json lists from earlier calls on the same snapshots (OUT's claim), with this
    call's in place of any of the same σ_rel, by σ_rel."""
    earlier = _listed(listing)
    made = {p["sigma_rel"] for p in summary}
    return sorted([p for p in earlier if p.get("sigma_rel") not in made] + summary, key=lambda p: p["sigma_rel"])
