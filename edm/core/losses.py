"""One training loss for every schedule: E_{σ, y, n}[ λ(σ) ‖D(y + σn; σ) − y‖² ]  (EDM eq. 2, Table 1).

The loss is three named pieces: the training density of σ, the weight λ(σ) and the squared
error. In each schedule's row λ(σ)·c_out(σ)² = 1, so the network's own target has unit weight.

With learned weighting (EDM2 eq. 21; the `edm2` kind, or learned_weighting=True with any kind) the
denoiser also returns u(σ), and each example's loss is λ(σ)/e^u ‖D − y‖² + u·dim(y): e^u learns
the loss's scale at each σ, which evens out the gradients across noise levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

import torch
from torch import Tensor

from ..choices import check_choice, choose
from .precond import coefficients
from .schedules import IDDPM, SIGMA_DATA, VP, FlowMatching, Schedule

__all__ = ["Loss", "LOSS_KINDS", "LOGNORMAL", "loss_weight", "target_weight", "squared_error", "learns_weighting"]


# λ(σ): one pure function per kind.
def _weight_inv_sigma2(sigma: Tensor, sigma_data: float) -> Tensor:
    """VP, VE and iDDPM: λ = 1/σ²."""
    return 1 / sigma**2


def _weight_edm(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM and TrigFlow: λ = (σ² + σ_d²)/(σ σ_d)² (TrigFlow: 1/(σ_d sin t)², so λ‖D − y‖² = ‖σ_d F − dx_t/dt‖²/σ_d²)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _weight_fm(sigma: Tensor, sigma_data: float) -> Tensor:
    """Flow matching: λ = (1 + σ)²/σ², the weight of the velocity target n − y."""
    return (1 + sigma) ** 2 / sigma**2


# σ ~ p(σ): one pure function per kind of (loss, u ~ U(0, 1) [B], normal() -> z ~ N(0, 1) [B]).
# Every kind draws u first; edm and fm then draw z, so the random stream is fixed per kind.
def _sigma_vp(loss: "Loss", u: Tensor, normal: Callable[[], Tensor]) -> Tensor:
    """VP: t ~ U(ε_t, t_end), σ = σ_VP(t) with the schedule's β's when it is VP."""
    vp = loss.schedule if isinstance(loss.schedule, VP) else VP()
    return vp.sigma(loss.epsilon_t + u * (vp.t_end - loss.epsilon_t))


def _sigma_ve(loss: "Loss", u: Tensor, normal: Callable[[], Tensor]) -> Tensor:
    """VE: ln σ ~ U(ln σ_min, ln σ_max) of the schedule."""
    lo, hi = math.log(loss.schedule.sigma_min), math.log(loss.schedule.sigma_max)
    return torch.exp(lo + u * (hi - lo))


def _sigma_iddpm(loss: "Loss", u: Tensor, normal: Callable[[], Tensor]) -> Tensor:
    """iDDPM: σ = u_j with j ~ U{0, ..., M − 1}, the schedule's noise levels when it is iddpm."""
    ddpm = loss.schedule if isinstance(loss.schedule, IDDPM) else IDDPM()
    j = (u * ddpm.M).long().clamp(max=ddpm.M - 1)
    return ddpm.levels(u.device).to(u.dtype)[j]


def _sigma_edm(loss: "Loss", u: Tensor, normal: Callable[[], Tensor]) -> Tensor:
    """EDM, EDM2 and TrigFlow: ln σ ~ N(P_mean, P_std²) (sCM's τ = ln(σ_d tan t))."""
    return torch.exp(loss.P_mean + loss.P_std * normal())


def _sigma_fm(loss: "Loss", u: Tensor, normal: Callable[[], Tensor]) -> Tensor:
    """Flow matching: t ~ U(ε_t, 1 − ε_t), or logit-normal clamped to it; σ = t/(1 − t)."""
    z = normal()
    if loss.t_dist == "logit_normal":
        t = torch.sigmoid(loss.logit_mean + loss.logit_std * z).clamp(loss.epsilon_t, 1 - loss.epsilon_t)
    else:
        t = loss.epsilon_t + u * (1 - 2 * loss.epsilon_t)
    return FlowMatching().sigma(t)


_SIGMA_DENSITIES: MappingProxyType[str, Callable[["Loss", Tensor, Callable[[], Tensor]], Tensor]] = MappingProxyType(
    {"vp": _sigma_vp, "ve": _sigma_ve, "edm": _sigma_edm, "fm": _sigma_fm, "trigflow": _sigma_edm, "edm2": _sigma_edm,
     "iddpm": _sigma_iddpm}
)

_WEIGHTS: MappingProxyType[str, Callable[[Tensor, float], Tensor]] = MappingProxyType(
    {"vp": _weight_inv_sigma2, "ve": _weight_inv_sigma2, "edm": _weight_edm, "fm": _weight_fm, "trigflow": _weight_edm,
     "edm2": _weight_edm, "iddpm": _weight_inv_sigma2}
)
# (P_mean, P_std) of the lognormal kinds: EDM (Table 1), sCM's CIFAR-10 TrigFlow and EDM2's ImageNet-512 presets
# (ImageNet-64: −0.8, 1.6).
LOGNORMAL = MappingProxyType({"edm": (-1.2, 1.2), "trigflow": (-1.0, 1.4), "edm2": (-0.4, 1.0)})
LEARNED_KINDS = ("edm2",)  # kinds whose loss learns its weighting u(σ) unless told otherwise
LOSS_KINDS = tuple(_WEIGHTS)
T_DISTS = ("uniform", "logit_normal")  # flow matching: how t is drawn


def learns_weighting(kind: str, learned_weighting: bool | None = None) -> bool:
    """Whether the loss of `kind` learns u(σ): learned_weighting, or None = the kind's own (edm2: yes)."""
    return kind in LEARNED_KINDS if learned_weighting is None else bool(learned_weighting)


def loss_weight(sigma: Tensor, kind: str = "edm", sigma_data: float = SIGMA_DATA) -> Tensor:
    """λ(σ) of `kind` (Table 1 of docs/design.md)."""
    return choose(_WEIGHTS, kind, "loss kind")(sigma, sigma_data)


def target_weight(sigma: Tensor, kind: str, precond_kind: str, sigma_data: float = SIGMA_DATA) -> Tensor:
    """λ(σ)·c_out(σ)²: the weight of the network's own target in λ‖D − y‖² = λ c_out² ‖F − (y − c_skip x̂)/c_out‖²,
    for the loss `kind` on the preconditioning `precond_kind`; 1 where they are one row of Table 1."""
    return loss_weight(sigma, kind, sigma_data) * coefficients(sigma, precond_kind, sigma_data).c_out ** 2


def squared_error(denoised: Tensor, y: Tensor) -> Tensor:
    """Per-example ‖D − y‖², summed over all but the batch dimension: shape [B]."""
    return (denoised - y).pow(2).flatten(1).sum(dim=1)


@dataclass(frozen=True)
class Loss:
    """The training loss: σ ~ p(σ) of `kind`, λ(σ) of `kind`, per-example λ‖D(y + σn; σ) − y‖².

    kind (default: the schedule's parameterization) picks the row of the table:
      vp:  t ~ U(ε_t, 1), σ = σ_VP(t)        ve: ln σ ~ U(ln σ_min, ln σ_max)
      edm: ln σ ~ N(P_mean, P_std²)          fm: t ~ U(ε_t, 1 − ε_t) or logit-normal, σ = t/(1 − t)
      trigflow: ln σ ~ N(P_mean, P_std²) with sCM's P_mean, P_std, and EDM's λ
      edm2: as edm with EDM2's P_mean, P_std, and learned weighting
      iddpm: σ = u_j, j ~ U{0, ..., M − 1}, λ = 1/σ²
    The VP row uses the schedule's β's when the schedule is VP; the VE row uses its σ range; the iDDPM row its
    noise levels when it is iddpm.
    P_mean/P_std None are the kind's (LOGNORMAL); learned_weighting None is the kind's (edm2 only).
    """

    schedule: Schedule
    kind: str | None = None
    sigma_data: float = SIGMA_DATA
    P_mean: float | None = None
    P_std: float | None = None
    epsilon_t: float = 1e-5
    t_dist: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    learned_weighting: bool | None = None

    def __post_init__(self) -> None:
        """Resolve every None: kind = the schedule's parameterization, P_mean/P_std and learned_weighting the kind's."""
        kind = self.kind or self.schedule.parameterization
        choose(_WEIGHTS, kind, "loss kind")
        check_choice(T_DISTS, self.t_dist, "t_dist")
        default_mean, default_std = LOGNORMAL.get(kind, LOGNORMAL["edm"])
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "P_mean", default_mean if self.P_mean is None else float(self.P_mean))
        object.__setattr__(self, "P_std", default_std if self.P_std is None else float(self.P_std))
        object.__setattr__(self, "learned_weighting", learns_weighting(kind, self.learned_weighting))

    def at(self, cur_nimg: int) -> "Loss":
        """The loss of the training step at cur_nimg: the denoising loss does not change during training."""
        return self

    def sample_sigma(
        self, batch: int, *, generator: torch.Generator | None = None, device=None, dtype=torch.float32
    ) -> Tensor:
        """Draw σ [batch] from the training distribution of `kind`."""
        u = torch.rand(batch, generator=generator, device=device, dtype=dtype)
        normal = lambda: torch.randn(batch, generator=generator, device=device, dtype=dtype)  # noqa: E731
        return _SIGMA_DENSITIES[self.kind](self, u, normal)

    def weight(self, sigma: Tensor) -> Tensor:
        """λ(σ)."""
        return loss_weight(sigma, self.kind, self.sigma_data)

    def __call__(
        self,
        denoiser: Callable[..., Tensor],
        y: Tensor,
        class_labels: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        sigma: Tensor | None = None,
        noise: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        """Per-example loss λ(σ)‖D(y + σn; σ) − y‖², shape [B]; σ and n are drawn unless given.
        With learned weighting: λ(σ)/e^u ‖D − y‖² + u·dim(y), u(σ) from denoiser(..., return_logvar=True)."""
        if sigma is None:
            sigma = self.sample_sigma(y.shape[0], generator=generator, device=y.device, dtype=y.dtype)
        if noise is None:
            noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        x_hat = y + sigma.reshape((-1,) + (1,) * (y.ndim - 1)) * noise
        kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
        if not self.learned_weighting:
            return self.weight(sigma) * squared_error(denoiser(x_hat, sigma, class_labels, **kwargs), y)
        denoised, u = denoiser(x_hat, sigma, class_labels, return_logvar=True, **kwargs)
        return self.weight(sigma) / u.exp() * squared_error(denoised, y) + u * y[0].numel()
