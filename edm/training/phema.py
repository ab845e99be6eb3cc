"""Power-function EMA and post-hoc EMA (Karras et al. 2024, EDM2 section 3 and appendix C).

A power-function EMA with exponent γ averages the training weights θ(τ) seen up to time t
(in training images) with the profile

    p_t(τ) = (γ + 1) τ^γ / t^(γ + 1),  0 ≤ τ ≤ t,

tracked during training with β(t) = (1 − Δt/t)^(γ + 1) after each step of Δt images (eq. 127).
Profiles are named by their width relative to t, σ_rel = √((γ + 1) / ((γ + 2)² (γ + 3))) (eq. 123).

Post-hoc EMA: snapshots θ̂_i of profiles (t_i, γ_i) are combined as Σ x_i θ̂_i, with x the least-squares
fit of a wanted profile (t_r, γ_r) in L²(0, ∞): A x = b, A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_r⟩, where
(eq. 151)

    ⟨p_a, p_b⟩ = (γ_a + 1)(γ_b + 1) / (γ_a + γ_b + 1) · (t_min / t_max)^γ_(max) / t_max,

γ_(max) being the exponent of the profile that ends later; x is rescaled to sum to 1.
"""

from __future__ import annotations

import copy
import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.checkpoint import CheckpointError

from ..files import atomic_write
from ..provenance import SNAPSHOT_DIR, SNAPSHOT_FILE, SNAPSHOT_GLOB
from .ema import update_ema

__all__ = [
    "exp_to_std", "std_to_exp", "SIGMA_REL_MAX", "power_beta", "profile_inner", "posthoc_coefficients", "profile_residual",
    "POOR_FIT", "PowerEMA", "combine", "SNAPSHOT_DIR", "SNAPSHOT_GLOB", "Snapshot", "snapshot_path", "trim_snapshots", "write_snapshot", "list_snapshots",
]

SNAPSHOT_FORMAT = "edm-phema-snapshot/1"
# A post-hoc profile whose fit residual ‖Σ x_i p_i − p_r‖ / ‖p_r‖ exceeds this is reported: its weights may lie that
# share of the averaged weights' size from the wanted EMA's (profile_residual's bound). Snapshots every 1/12 of a run
# tracking 0.05 and 0.10 fit σ_rel up to 0.20 below it (0.039), 0.25 above it (0.11).
POOR_FIT = 0.05


def exp_to_std(gamma: float | np.ndarray) -> np.ndarray:
    """σ_rel = √((γ + 1) / ((γ + 2)² (γ + 3)))  (eq. 123)."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3))


# σ_rel(γ) peaks where d ln σ_rel/dγ = 0, i.e. γ² + 3γ + 1 = 0: no profile is wider than this.
SIGMA_REL_MAX = float(exp_to_std((np.sqrt(5) - 3) / 2))


def std_to_exp(std: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """γ of σ_rel: the largest real root of γ³ + 7γ² + (16 − σ_rel⁻²) γ + 12 − σ_rel⁻² = 0  (eq. 126)."""
    std = np.asarray(std, dtype=np.float64)
    if not np.all((std > 0) & (std < SIGMA_REL_MAX)):  # NaN too
        raise ValueError(f"σ_rel must lie in (0, {SIGMA_REL_MAX:.4f}), got {std.tolist()}")
    roots = [np.roots([1, 7, 16 - s, 12 - s]) for s in std.reshape(-1) ** -2]
    return np.array([r[np.abs(r.imag) < 1e-9].real.max() for r in roots]).reshape(std.shape)


def power_beta(std: float, t: float, dt: float) -> float:
    """β = (1 − Δt/t)^(γ + 1): the EMA step that keeps the power-function profile at time t  (eq. 127)."""
    return float((1 - dt / t) ** (std_to_exp(std) + 1))


def profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """⟨p_a, p_b⟩ = ∫ p_a p_b dτ of two power-function profiles (broadcasting arrays)  (eq. 151)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    t_max, t_min = np.maximum(t_a, t_b), np.minimum(t_a, t_b)
    gamma_late = np.where(t_a < t_b, gamma_b, gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_min / t_max) ** gamma_late / t_max


def _gram(in_t, in_std, out_t, out_std) -> tuple[np.ndarray, np.ndarray]:
    in_t, in_g = np.asarray(in_t, dtype=np.float64), std_to_exp(in_std)
    out_t, out_g = np.broadcast_arrays(np.asarray(out_t, dtype=np.float64), std_to_exp(out_std))
    A = profile_inner(in_t[:, None], in_g[:, None], in_t[None, :], in_g[None, :])
    B = profile_inner(in_t[:, None], in_g[:, None], out_t.reshape(1, -1), out_g.reshape(1, -1))
    return A, B


def posthoc_coefficients(in_t: Sequence[float], in_std: Sequence[float], out_t, out_std) -> np.ndarray:
    """x [inputs, outputs]: the snapshots' weights whose profile Σ x_i p_i best fits each wanted
    profile (t_r, σ_rel) in L²; solved in float64 and scaled so each column sums to 1."""
    A, B = _gram(in_t, in_std, out_t, out_std)
    X = np.linalg.solve(A, B)
    return X / X.sum(axis=0, keepdims=True)


def profile_residual(in_t, in_std, out_t, out_std, X: np.ndarray) -> np.ndarray:
    """‖Σ x_i p_i − p_r‖ / ‖p_r‖ of each output column of X: how well the snapshots express it."""
    A, B = _gram(in_t, in_std, out_t, out_std)
    out_t, out_g = np.broadcast_arrays(np.asarray(out_t, dtype=np.float64), std_to_exp(out_std))
    pp = profile_inner(out_t.reshape(-1), out_g.reshape(-1), out_t.reshape(-1), out_g.reshape(-1))
    err2 = np.einsum("io,ij,jo->o", X, A, X) - 2 * np.einsum("io,io->o", X, B) + pp
    return np.sqrt(np.maximum(err2, 0) / pp)


class PowerEMA:
    """Power-function EMAs of a module, one per σ_rel, updated together after each optimizer step."""

    def __init__(self, net: nn.Module, stds: Sequence[float]) -> None:
        std_to_exp(list(stds))  # a bad σ_rel fails here
        self.stds = [float(s) for s in stds]
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.stds]

    def update(self, net: nn.Module, cur_nimg: int, batch_size: int) -> None:
        """θ_ema ← β θ_ema + (1 − β) θ with β = power_beta(σ_rel, t = cur_nimg, Δt = batch_size)."""
        for std, ema in zip(self.stds, self.emas):
            update_ema(ema, net, power_beta(std, cur_nimg, batch_size))

    def state_dict(self) -> dict:
        return {"stds": list(self.stds), "emas": [ema.state_dict() for ema in self.emas]}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["stds"]] != self.stds:
            raise ValueError(f"the saved power EMAs have σ_rel {state['stds']}, this run tracks {self.stds}")
        for ema, saved in zip(self.emas, state["emas"]):
            ema.load_state_dict(saved)


def combine(weighted: Iterable[tuple[dict[str, torch.Tensor], Sequence[float]]], outputs: int) -> list[dict[str, torch.Tensor]]:
    """[Σ_i w_ij θ_i for j < outputs] over (θ_i, w_i) pairs taken one at a time (θ_i a state_dict, w_i its
    weight per output): floating-point entries summed in float64 and cast back, others from the last θ_i."""
    totals: list[dict[str, torch.Tensor]] = [{} for _ in range(outputs)]
    last: dict[str, torch.Tensor] = {}
    for last, w in weighted:
        for key, t in last.items():
            if not t.is_floating_point():
                continue
            t64 = t.to(torch.float64)  # once per entry, shared by every output
            for total, w_j in zip(totals, w):
                if key in total:
                    total[key].add_(t64, alpha=float(w_j))
                else:
                    total[key] = t64 * float(w_j)
    return [{k: total[k].to(t.dtype) if t.is_floating_point() else t.clone() for k, t in last.items()} for total in totals]


# ----------------------------------------------------------------------------- snapshots on disk


def snapshot_path(run_dir: str | Path, cur_nimg: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / SNAPSHOT_FILE.format(int(cur_nimg))


def trim_snapshots(run_dir: str | Path, cur_nimg: int) -> list[Path]:
    """Delete the snapshots of run_dir taken after cur_nimg training images (written after the checkpoint a run resumes
    from, or by a run that left no checkpoint when resume=true starts it over): the resumed run writes its own, and
    edm-posthoc would otherwise mix two trainings. The deleted paths."""
    dropped = []
    for path in sorted((Path(run_dir) / SNAPSHOT_DIR).glob(SNAPSHOT_GLOB)):
        digits = path.stem.removeprefix("snapshot-")
        if digits.isdigit() and int(digits) > cur_nimg:
            path.unlink()
            dropped.append(path)
    return dropped


def _crc32(tensor: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's bytes."""
    return zlib.crc32(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def write_snapshot(path: str | Path, power_ema: PowerEMA, meta: dict[str, Any]) -> Path:
    """Every profile's weights at one time, as safetensors ("<profile index>/<name>") with `meta` and the
    σ_rel list as JSON in its header: read back with no pickle. Written atomically."""
    from safetensors.torch import save

    tensors = {f"{i}/{name}": t.detach().cpu().contiguous()
               for i, ema in enumerate(power_ema.emas) for name, t in ema.state_dict().items()}
    header = {"format": SNAPSHOT_FORMAT, "meta": json.dumps({**meta, "stds": power_ema.stds}),
              "crc32": json.dumps({key: _crc32(t) for key, t in tensors.items()})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save(tensors, metadata=header)
    atomic_write(path, lambda f: f.write(data))
    return path


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: its time (training images), its profiles' σ_rel and its meta (denoiser spec, schedule, config)."""

    path: Path
    cur_nimg: int
    stds: tuple[float, ...]
    meta: dict

    def profiles(self) -> list[dict[str, torch.Tensor]]:
        """The state_dict of every profile, in the order of stds, from one read of the file; each tensor checked
        against the CRC-32 written with it (safetensors keeps none; snapshots written without them are read as
        they are) and for non-finite values."""
        from safetensors import safe_open

        with safe_open(self.path, "pt") as f:
            sums = json.loads((f.metadata() or {}).get("crc32") or "{}")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        out: list[dict[str, torch.Tensor]] = [{} for _ in self.stds]
        for key, value in tensors.items():
            if key in sums and _crc32(value) != sums[key]:
                raise CheckpointError(f"{self.path} is corrupt: {key} fails its CRC-32 check (its bytes changed after "
                                      "it was written); delete it and rerun with overwrite=true (post-hoc EMA fits the "
                                      "others), or train again")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise CheckpointError(f"{self.path} holds non-finite weights ({key}): the run diverged before its next "
                                      "log record, or the file's bytes changed after it was written; delete it and "
                                      "rerun with overwrite=true (post-hoc EMA fits the others), or train again")
            index, name = key.split("/", 1)
            out[int(index)][name] = value
        return out

    def weights(self, profile: int) -> dict[str, torch.Tensor]:
        """The state_dict of profile `profile` (an index into stds)."""
        return self.profiles()[profile]


def list_snapshots(run_dir: str | Path) -> list[Snapshot]:
    """The snapshots of a run folder (or of its phema/ folder), by time; a file that is not one is named."""
    from safetensors import SafetensorError, safe_open

    folder = Path(run_dir)
    folder = folder / SNAPSHOT_DIR if (folder / SNAPSHOT_DIR).is_dir() else folder
    snaps = []
    for path in sorted(folder.glob(SNAPSHOT_GLOB)):
        try:
            with safe_open(path, "pt") as f:
                header = f.metadata() or {}
            meta = json.loads(header["meta"]) if header.get("format") == SNAPSHOT_FORMAT else None
        except (OSError, SafetensorError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path} is not a readable power-EMA snapshot ({err}); delete it or train again") from None
        if meta is None:
            raise CheckpointError(f"{path} is not a power-EMA snapshot (format {header.get('format')!r})")
        snaps.append(Snapshot(path, int(meta["cur_nimg"]), tuple(float(s) for s in meta["stds"]), meta))
    return sorted(snaps, key=lambda s: s.cur_nimg)
