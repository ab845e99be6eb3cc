"""Preconditioning D(x̂; σ) = c_skip(σ)·x̂ + c_out(σ)·F(c_in(σ)·x̂; c_noise(σ))  (EDM Table 1).

One module serves every parameterization; they differ only in a table of coefficient
functions of σ. Every row has c_skip(0) = 1 and c_out(0) = 0, so D(x̂; 0) = x̂; a consistency
function f with the boundary condition f(x̂; σ_b) = x̂ (Song et al. 2023) takes c_skip and c_out
at σ − σ_b (Precond's boundary_sigma) and c_in, c_noise at σ.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from ..choices import choose
from .schedules import IDDPM, SIGMA_DATA, VP, iddpm_index

__all__ = ["Precond", "Coefficients", "PRECOND_KINDS", "coefficients", "SIGMA_DATA"]


class Coefficients(NamedTuple):
    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


class DDPMSteps(NamedTuple):
    """The number M of DDPM time steps the network's time input spans (VP and iDDPM), and iDDPM's C_1, C_2."""

    M: int = IDDPM.M
    C_1: float = IDDPM.C_1
    C_2: float = IDDPM.C_2


# Each row is a function of (σ, σ_d, vp, ddpm): vp holds the VP row's β_d, β_min; ddpm its DDPMSteps.
def _vp(sigma: Tensor, sigma_data: float, vp: VP, ddpm: DDPMSteps) -> Coefficients:
    """VP: c_skip = 1, c_out = −σ, c_in = 1/sqrt(σ² + 1), c_noise = (M − 1)·σ⁻¹_VP(σ); F predicts n."""
    return Coefficients(
        torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), (ddpm.M - 1) * vp.sigma_inv(sigma)
    )


def _iddpm(sigma: Tensor, sigma_data: float, vp: VP, ddpm: DDPMSteps) -> Coefficients:
    """iDDPM: c_skip = 1, c_out = −σ, c_in = 1/sqrt(σ² + 1), c_noise = M − 1 − argmin_j |u_j − σ|; F predicts n."""
    return Coefficients(torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), (ddpm.M - 1) - iddpm_index(sigma, *ddpm))


def _ve(sigma: Tensor, sigma_data: float, vp: VP, ddpm: DDPMSteps) -> Coefficients:
    """VE: c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(σ/2)."""
    return Coefficients(torch.ones_like(sigma), sigma, torch.ones_like(sigma), torch.log(0.5 * sigma))


def _edm(sigma: Tensor, sigma_data: float, vp: VP, ddpm: DDPMSteps) -> Coefficients:
    """EDM: c_skip = σ_d²/(σ² + σ_d²), c_out = σσ_d/sqrt(σ² + σ_d²), c_in = 1/sqrt(σ² + σ_d²), c_noise = ¼ ln σ."""
    norm = (sigma**2 + sigma_data**2).sqrt()
    return Coefficients(sigma_data**2 / norm**2, sigma * sigma_data / norm, 1 / norm, 0.25 * torch.log(sigma))


def _fm(sigma: Tensor, sigma_data: float, vp: VP, ddpm: DDPMSteps) -> Coefficients:
    """Flow matching: c_skip = 1/(1 + σ), c_out = −σ/(1 + σ), c_in = 1/(1 + σ), c_noise = σ/(1 + σ) = t; F predicts n − y."""
    inv = 1 / (1 + sigma)
    return Coefficients(inv, -sigma * inv, inv, sigma * inv)


def _trigflow(sigma: Tensor, sigma_data: float, vp: VP, ddpm: DDPMSteps) -> Coefficients:
    """TrigFlow (sCM), t = arctan(σ/σ_d): c_skip = cos² t, c_out = −σ_d sin t, c_in = cos t/σ_d, c_noise = t;
    D = cos t·x_t − sin t·σ_d F(x_t/σ_d, t) with x_t = cos t·x̂, and σ_d F predicts dx_t/dt = cos t·z − sin t·y."""
    norm = (sigma**2 + sigma_data**2).sqrt()
    return Coefficients(sigma_data**2 / norm**2, -sigma * sigma_data / norm, 1 / norm, torch.atan(sigma / sigma_data))


PRECOND_KINDS: MappingProxyType[str, Callable[..., Coefficients]] = MappingProxyType(
    {"vp": _vp, "ve": _ve, "edm": _edm, "fm": _fm, "trigflow": _trigflow, "iddpm": _iddpm}
)


def coefficients(
    sigma: Tensor, kind: str = "edm", sigma_data: float = SIGMA_DATA, beta_d: float = VP.beta_d,
    beta_min: float = VP.beta_min, M: int = IDDPM.M, C_1: float = IDDPM.C_1, C_2: float = IDDPM.C_2,
) -> Coefficients:
    """(c_skip, c_out, c_in, c_noise) of `kind` at `sigma` (same shape as sigma)."""
    fn = choose(PRECOND_KINDS, kind, "precond kind")
    sigma = sigma if isinstance(sigma, Tensor) else torch.as_tensor(sigma, dtype=torch.float64)
    return fn(sigma, sigma_data, VP(beta_d=beta_d, beta_min=beta_min), DDPMSteps(int(M), C_1, C_2))


def _param_dtype(net: object) -> torch.dtype | None:
    """dtype of the network's first floating parameter, None for a parameter-free callable."""
    if isinstance(net, nn.Module):
        for p in net.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


class Precond(nn.Module):
    """Denoiser D(x̂; σ) = c_skip x̂ + c_out F(c_in x̂; c_noise) around a network F(x, c_noise, class_labels).

    logvar_channels > 0 adds EDM2's uncertainty head u(σ) = MPConv(MPFourier(¼ ln σ)) (eq. 21), the
    learned loss weighting (edm.Loss with learned weighting); it is a function of σ alone, so every
    kind feeds it ¼ ln σ (EDM2's c_noise), whatever the network's c_noise is. Kind iddpm also takes a network of
    twice the data's channels (iDDPM's learned variance after its n) and uses the first half.
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        kind: str = "edm",
        sigma_data: float = SIGMA_DATA,
        beta_d: float = VP.beta_d,
        beta_min: float = VP.beta_min,
        M: int = IDDPM.M,
        C_1: float = IDDPM.C_1,
        C_2: float = IDDPM.C_2,
        logvar_channels: int = 0,
        boundary_sigma: float = 0.0,
    ) -> None:
        super().__init__()
        choose(PRECOND_KINDS, kind, "precond kind")
        if not 0.0 <= boundary_sigma < float("inf"):
            raise ValueError(f"boundary_sigma={boundary_sigma!r} must be >= 0 (the σ_min where f(x̂; σ_min) = x̂)")
        self.boundary_sigma = float(boundary_sigma)
        self.net = net
        self.kind = kind
        self.sigma_data = float(sigma_data)
        self.beta_d, self.beta_min, self.M = float(beta_d), float(beta_min), int(M)
        self.C_1, self.C_2 = float(C_1), float(C_2)
        if logvar_channels:
            from ..networks.edm2 import MPConv, MPFourier

            self.logvar_fourier = MPFourier(logvar_channels)
            self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def logvar(self, sigma: Tensor) -> Tensor:
        """u(σ) [B], the learned log-variance of the loss at σ (EDM2 eq. 21)."""
        if not hasattr(self, "logvar_linear"):
            raise ValueError("this denoiser has no uncertainty head: build it with logvar_channels > 0 "
                             "(precond.logvar_channels) to learn the loss weighting")
        return self.logvar_linear(self.logvar_fourier(0.25 * torch.log(sigma))).reshape(-1)

    def coefficients(self, sigma: Tensor) -> Coefficients:
        """(c_skip, c_out, c_in, c_noise) at `sigma`, same shape as `sigma`; with boundary_sigma σ_b > 0,
        c_skip(σ − σ_b) and c_out(σ − σ_b), so that D(x̂; σ_b) = x̂ exactly."""
        at = lambda s: coefficients(s, self.kind, self.sigma_data, self.beta_d, self.beta_min, self.M, self.C_1, self.C_2)  # noqa: E731
        if not self.boundary_sigma:
            return at(sigma)
        shifted = at(sigma - self.boundary_sigma)
        return at(sigma)._replace(c_skip=shifted.c_skip, c_out=shifted.c_out)

    def forward(
        self,
        x_hat: Tensor,
        sigma: Tensor | float,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        return_logvar: bool = False,
        sigma_r: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """D(x̂; σ) for x̂ of shape [B, ...] and σ of shape [B] (or a scalar, broadcast to the batch);
        with return_logvar, (D, u(σ)) for the learned loss weighting. sigma_r [B] gives a network built with
        second_noise its second input c_noise(σ) − c_noise(σ_r) (for kind fm, MeanFlow's t − r)."""
        sigma = torch.as_tensor(sigma, dtype=x_hat.dtype, device=x_hat.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x_hat.shape[0])
        if sigma.shape != x_hat.shape[:1]:
            raise ValueError(f"sigma must have shape [batch] = {list(x_hat.shape[:1])}, got {list(sigma.shape)}")
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        view = (-1,) + (1,) * (x_hat.ndim - 1)
        net_dtype = _param_dtype(self.net) or x_hat.dtype
        kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
        if sigma_r is not None:
            sigma_r = torch.as_tensor(sigma_r, dtype=x_hat.dtype, device=x_hat.device).expand(x_hat.shape[0])
            kwargs["c_noise2"] = (c_noise - self.coefficients(sigma_r).c_noise).to(net_dtype)
        F_x = self.net((c_in.view(view) * x_hat).to(net_dtype), c_noise.to(net_dtype), class_labels=class_labels, **kwargs)
        if self.kind == "iddpm" and F_x.ndim == x_hat.ndim and F_x.shape[1] == 2 * x_hat.shape[1]:
            F_x = F_x[:, : x_hat.shape[1]]  # iDDPM's network predicts n, then its learned variance, which D does not use
        if F_x.shape != x_hat.shape:
            raise ValueError(f"network output shape {list(F_x.shape)} differs from its input {list(x_hat.shape)}"
                             + (" (or twice its channels, for kind iddpm)" if self.kind == "iddpm" else ""))
        denoised = c_skip.view(view) * x_hat + c_out.view(view) * F_x.to(x_hat.dtype)
        return (denoised, self.logvar(sigma).to(x_hat.dtype)) if return_logvar else denoised

    def extra_repr(self) -> str:
        boundary = f", boundary_sigma={self.boundary_sigma}" if self.boundary_sigma else ""
        return f"kind={self.kind!r}, sigma_data={self.sigma_data}{boundary}"

