"""Consistency training by tuning a denoiser (ECT: Geng et al. 2024, "Consistency Models Made Easy").

The consistency function f(x̂; σ) is a preconditioned denoiser (edm.Precond): every precond row
has f(x̂; 0) = x̂, and boundary_sigma σ_b moves that boundary to f(x̂; σ_b) = x̂. ECT trains f
so that two points of one noise trajectory, x̂_t = y + t·n and x̂_r = y + r·n with r < t, map to
the same output:

    loss = w(t, r) · d(f(x̂_t; t), sg[f(x̂_r; r)]),   ln t ~ N(P_mean, P_std²),
    r = max(t · (1 − q^−(s+1) · n(t)), σ_b),   n(t) = 1 + k·sigmoid(−b·t),

where s is the stage (training images / stage_kimg, so Δt = t − r halves every stage), sg stops
the gradient, the target at r = σ_b is x̂_r itself (the boundary), both passes share the
dropout mask, and

    metric "pseudo_huber": d = sqrt(‖Δ‖² + c²) − c,  weighting "ect": w = 1/(t − r)
    metric "l2":           d = ‖Δ‖²,                 weighting "edm": w = λ(t) of the denoising loss

At r = σ_b = 0 the target is y and the loss is w(t, 0)·d(D(y + t·n; t), y): with metric l2 and
weighting edm, exactly the denoising loss of edm.Loss(kind="edm").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..choices import check_choice
from .losses import loss_weight
from .schedules import SIGMA_DATA

__all__ = ["ECTLoss", "ECT_METRICS", "ECT_WEIGHTINGS", "CONSISTENCY_OBJECTIVES", "ect_r", "pseudo_huber"]

CONSISTENCY_OBJECTIVES = ("ect",)  # training objectives whose model is a consistency function, not a denoiser
ECT_METRICS = ("pseudo_huber", "l2")
ECT_WEIGHTINGS = ("ect", "edm")


def ect_r(t: Tensor, stage: int, q: float, k: float, b: float) -> Tensor:
    """ECT's mapping r(t) = t·(1 − q^−(stage+1)·(1 + k·sigmoid(−b·t))), clamped at 0."""
    return (t * (1 - q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * t)))).clamp_min(0)


def pseudo_huber(delta: Tensor, c: float) -> Tensor:
    """Per-example sqrt(‖Δ‖² + c²) − c (‖Δ‖ at c = 0), summed over all but the batch dimension."""
    sq = delta.pow(2).flatten(1).sum(dim=1)
    return (sq + c**2).sqrt() - c


@dataclass(frozen=True)
class ECTLoss:
    """ECT's consistency loss (module docstring) around a consistency function f = a Precond.

    `at(cur_nimg)` gives the loss of the training step at cur_nimg (its stage); `boundary_sigma` and
    `sigma_data` come from the precond. The defaults are ECT's CIFAR-10 settings (locuslab/ect's run_ecm.sh: the
    stage advances every 3.2 Mimg, 8 stages in 25.6 Mimg; c = 0 makes the metric the L2 norm ‖Δ‖)."""

    sigma_data: float = SIGMA_DATA
    boundary_sigma: float = 0.0
    P_mean: float = -1.1
    P_std: float = 2.0
    q: float = 2.0
    k: float = 8.0
    b: float = 1.0
    stage_kimg: float = 3200.0
    metric: str = "pseudo_huber"
    c: float = 0.0
    weighting: str = "ect"
    stage: int = 0

    def __post_init__(self) -> None:
        check_choice(ECT_METRICS, self.metric, "ect.metric")
        check_choice(ECT_WEIGHTINGS, self.weighting, "ect.weighting")
        if not (self.q > 1 and self.stage_kimg > 0 and self.c >= 0 and self.P_std > 0):
            raise ValueError(f"ECT needs q > 1, stage_kimg > 0, c >= 0 and P_std > 0; got q={self.q}, "
                             f"stage_kimg={self.stage_kimg}, c={self.c}, P_std={self.P_std}")

    kind = "ect"  # what logs and records call this loss
    learned_weighting = False  # no uncertainty head u(σ)

    def at(self, cur_nimg: int) -> "ECTLoss":
        """The loss of the step that starts at cur_nimg training images: stage ⌊cur_nimg / stage_kimg⌋."""
        stage = int(cur_nimg // (self.stage_kimg * 1000))
        return self if stage == self.stage else dataclasses.replace(self, stage=stage)

    def sample_t(self, batch: int, *, generator=None, device=None, dtype=torch.float32) -> Tensor:
        """ln t ~ N(P_mean, P_std²), truncated to t > σ_b when σ_b > 0 (z is carried through the normal CDF
        onto the tail above ln σ_b, so every draw is one z of the stream)."""
        z = torch.randn(batch, generator=generator, device=device, dtype=dtype)
        if self.boundary_sigma > 0:
            lo = 0.5 * math.erfc(-(math.log(self.boundary_sigma) - self.P_mean) / (self.P_std * math.sqrt(2)))  # Φ(a)
            u = lo + (1 - lo) * torch.special.ndtr(z.double())
            z = torch.special.ndtri(u).to(dtype)
        return torch.exp(self.P_mean + self.P_std * z)

    def r(self, t: Tensor) -> Tensor:
        """The second point of the pair: ect_r at this stage, never below the boundary σ_b."""
        return ect_r(t, self.stage, self.q, self.k, self.b).clamp_min(self.boundary_sigma)

    def weight(self, t: Tensor, r: Tensor) -> Tensor:
        """w(t, r): 1/(t − r) (ect) or the denoising loss's λ(t) (edm)."""
        return 1 / (t - r) if self.weighting == "ect" else loss_weight(t, "edm", self.sigma_data)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """d(a, b) per example."""
        delta = a - b
        return pseudo_huber(delta, self.c) if self.metric == "pseudo_huber" else delta.pow(2).flatten(1).sum(dim=1)

    def __call__(
        self,
        denoiser: Callable[..., Tensor],
        y: Tensor,
        class_labels: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        sigma: Tensor | None = None,
        r: Tensor | None = None,
        noise: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        """Per-example w(t, r)·d(f(y + t·n; t), sg f(y + r·n; r)), shape [B]; t (`sigma`), n and r are drawn
        (r from t) unless given."""
        t = self.sample_t(y.shape[0], generator=generator, device=y.device, dtype=y.dtype) if sigma is None else sigma
        if noise is None:
            noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        r = self.r(t) if r is None else r
        view = (-1,) + (1,) * (y.ndim - 1)
        kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
        x_r = y + r.view(view) * noise
        devices = [y.device] if y.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the target's pass replays this pass's dropout draws
            f_t = denoiser(y + t.view(view) * noise, t, class_labels, **kwargs)
        inside = r > self.boundary_sigma
        with torch.no_grad():
            r_safe = torch.where(inside, r, t)  # f at the boundary is x̂_r itself: no evaluation at σ = 0
            f_r = denoiser(x_r, r_safe, class_labels, **kwargs)
            target = torch.where(inside.view(view), f_r, x_r)
        return self.weight(t, r) * self.distance(f_t, target)

