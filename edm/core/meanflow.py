"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling") over the flow-matching denoiser.

Flow matching's path is z_t = (1 − t)·y + t·n with velocity v = n − y (x̂ = z_t/(1 − t), σ = t/(1 − t)). The
average velocity u(z_t, r, t) = 1/(t − r) ∫_r^t v(z_τ, τ) dτ moves z_t to z_r = z_t − (t − r)·u in one step. The
network is the flow-matching denoiser's (precond kind fm: D = z_t − t·F) with its second noise input
c_noise(σ_t) − c_noise(σ_r) = t − r (network.second_noise; Precond's sigma_r), so

    u(z_t, r, t) = (z_t − D(z_t/(1 − t); σ_t, σ_r)) / t,

which at r = t is the flow-matching velocity. MeanFlow's identity du/dt = (v − u)/(t − r) along the path gives
the target and the loss

    (u, du/dt) = jvp(u, (z_t, r, t), (v, 0, 1)),   u_tgt = v − (t − r)·du/dt   (no gradient),
    loss = ‖u_θ − u_tgt‖² / sg(‖u_θ − u_tgt‖² + c)^p,

with t, r two logit-normal draws (t the larger), r = t for all but a `ratio` of the pairs. At r = t and p = 0
this is the flow-matching loss ‖u − v‖² = λ(σ)‖D − y‖² of edm.Loss(kind="fm").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .consistency import forward_jvp, per_example, same_draws

__all__ = ["MeanFlowLoss", "average_velocity"]


def average_velocity(
    denoiser: Callable[..., Tensor], z: Tensor, r: Tensor, t: Tensor, class_labels: Tensor | None = None, **kwargs
) -> Tensor:
    """u(z_t, r, t) = (z_t − D(z_t/(1 − t); σ_t, σ_r))/t of a flow-matching denoiser with a second noise input."""
    sigma_t, sigma_r = t / (1 - t), r / (1 - r)
    D = denoiser(z / per_example(1 - t, z), sigma_t, class_labels, sigma_r=sigma_r, **kwargs)
    return (z - D) / per_example(t, z)


@dataclass(frozen=True)
class MeanFlowLoss:
    """MeanFlow's loss (module docstring). Defaults: the paper's (logit-normal(−0.4, 1.0), 25 % of pairs with
    r ≠ t, adaptive weighting p = 1, c = 1e-3); t and r are kept in [epsilon_t, 1 − epsilon_t]."""

    P_mean: float = -0.4
    P_std: float = 1.0
    ratio: float = 0.25
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-3
    epsilon_t: float = 1e-5

    kind = "meanflow"
    learned_weighting = False

    def __post_init__(self) -> None:
        if not (self.P_std > 0 and 0 <= self.ratio <= 1 and self.adaptive_p >= 0 and self.adaptive_c > 0
                and 0 < self.epsilon_t < 0.5):
            raise ValueError(f"MeanFlow needs P_std > 0, 0 <= ratio <= 1, adaptive_p >= 0, adaptive_c > 0 and "
                             f"0 < epsilon_t < 0.5; got {self}")

    def at(self, cur_nimg: int) -> "MeanFlowLoss":
        """The loss of the step at cur_nimg: it does not change during training."""
        return self

    def sample_tr(self, batch: int, *, generator=None, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
        """(t, r): two logit-normal draws, t the larger; r = t except for a `ratio` of the pairs."""
        z = torch.randn(2, batch, generator=generator, device=device, dtype=dtype)
        tr = torch.sigmoid(self.P_mean + self.P_std * z).clamp(self.epsilon_t, 1 - self.epsilon_t)
        t, r = tr.max(dim=0).values, tr.min(dim=0).values
        apart = torch.rand(batch, generator=generator, device=device, dtype=dtype) < self.ratio
        return t, torch.where(apart, r, t)

    def __call__(
        self,
        denoiser: Callable[..., Tensor],
        y: Tensor,
        class_labels: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        t: Tensor | None = None,
        r: Tensor | None = None,
        noise: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        """Per-example adaptively weighted ‖u_θ − u_tgt‖², shape [B]; the pair (t, r) and n are drawn unless given."""
        if (t is None) != (r is None):
            raise ValueError("MeanFlowLoss draws t and r as one pair: give both (r = t for the flow-matching loss), "
                             "or neither")
        if t is None:
            t, r = self.sample_tr(y.shape[0], generator=generator, device=y.device, dtype=y.dtype)
        if noise is None:
            noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
        z = per_example(1 - t, y) * y + per_example(t, y) * noise
        v = noise - y
        inner = getattr(denoiser, "module", denoiser)  # the forward-mode pass needs no gradient sync (DDP)
        u_fn = lambda zz, rr, tt: average_velocity(inner, zz, rr, tt, class_labels, **kwargs)  # noqa: E731
        with torch.no_grad(), same_draws(y.device):  # the gradient pass replays its dropout draws
            _, dudt = forward_jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
        target = v - per_example(t - r, y) * dudt
        u = average_velocity(denoiser, z, r, t, class_labels, **kwargs)
        error = (u - target).pow(2).flatten(1).sum(dim=1)
        return error / (error.detach() + self.adaptive_c) ** self.adaptive_p
