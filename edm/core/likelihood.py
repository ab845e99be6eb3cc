"""Negative log-likelihood in bits/dim through the probability-flow ODE (Song et al. 2021, app. D).

What is computed: log p_σmin(y), the density of the model's noisy marginal at σ_min = σ(t_0)
evaluated at the data y, i.e. the data are treated as x̂ at σ_min. With x = s(t)·x̂ and the
ODE dx/dt = f(x, t) of EDM eq. 4 (edm.samplers.ode_derivative), the instantaneous change of
variables integrated from t_0 (data) to T = t_max gives

    log p_x(x(t_0); t_0) = log p_x(x(T); T) + ∫_{t_0}^{T} ∇·f(x(t), t) dt,

and since p_x̂ = p_x · s^D at every t,

    log p_σmin(y) = log π(x̂(T)) + ∫_{t_0}^{T} ∇·f dt + D (ln s(t_0) − ln s(T)),

with the prior π = N(0, σ(T)² I) on x̂ (i.e. N(0, s(T)² σ(T)² I) on x). ∇·f is exact (one
autograd pass per dimension, small D) or Hutchinson's estimate εᵀ(∂f/∂x)ε with a fixed ε per
example (Rademacher or Gaussian, from an explicit generator). The ODE is integrated with a
fixed-step RK4 or Heun method in u = ln σ(t) (dx/du = f · σ/σ', smooth for every schedule)
between the points of a schedule discretization of [t_0, T].

Bits/dim of 8-bit data k ∈ {0..255}^D, mapped to x = (k + u − ½)/127.5 − 1 with dequantization
noise u ∈ [0, 1)^D: the density of k + u is p_x(x)·127.5^(−D), so by Jensen
    −log₂ P(k) ≤ E_u[−log₂ p_x(x) + log₂ q(u | k)] + D log₂ 127.5,
    bpd = −(log p_x(x) − log q(u | k) − D ln 127.5) / (D ln 2)
(uniform dequantization: q = 1, log q = 0). A model uniform on the bins scores exactly 8.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from ..choices import check_choice
from .samplers import Generator, ode_derivative, randn_like
from .schedules import Schedule, get as get_schedule

__all__ = [
    "LogLikelihood",
    "log_likelihood",
    "bits_per_dim",
    "bpd_from_log_likelihood",
    "dequantize",
    "divergence",
    "gaussian_log_prob",
    "likelihood_grid",
    "INTEGRATORS",
    "DIVERGENCES",
    "HUTCHINSON_NOISES",
    "DEQUANTIZATIONS",
]

Denoiser = Callable[..., Tensor]
Drift = Callable[[Tensor, Tensor], Tensor]
INTEGRATORS = ("rk4", "heun")
DIVERGENCES = ("exact", "hutchinson", "auto")
HUTCHINSON_NOISES = ("rademacher", "gaussian")
DEQUANTIZATIONS = ("uniform", "center")
EIGHT_BIT_SCALE = 127.5


class LogLikelihood(NamedTuple):
    """Per-example results [B] in nats: logp = prior_logp + delta_logp."""

    logp: Tensor
    prior_logp: Tensor
    delta_logp: Tensor


def gaussian_log_prob(x: Tensor, sigma: Tensor | float) -> Tensor:
    """log N(x; 0, σ² I) per example: −‖x‖²/(2σ²) − D ln σ − (D/2) ln 2π."""
    flat = x.flatten(1)
    dim = flat.shape[1]
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return -0.5 * flat.pow(2).sum(1) / sigma**2 - dim * torch.log(sigma) - 0.5 * dim * math.log(2 * math.pi)


def divergence(drift: Drift, x: Tensor, t: Tensor, method: str, eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(f(x, t), ∇·f per example): exact Σ_i ∂f_i/∂x_i (D backward passes) or Hutchinson εᵀ(∂f/∂x)ε."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        f = drift(x, t)
        flat = f.flatten(1)
        if method == "exact":
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for i in range(flat.shape[1]):
                (grad,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i + 1 < flat.shape[1])
                div = div + grad.flatten(1)[:, i]
        elif method == "hutchinson":
            if eps is None:
                raise ValueError("the Hutchinson estimator needs its probe vectors eps")
            (grad,) = torch.autograd.grad((f * eps).sum(), x)
            div = (grad * eps).flatten(1).sum(1)
        else:
            check_choice(("exact", "hutchinson"), method, "divergence method")
    return f.detach(), div.detach()


def likelihood_grid(
    schedule: Schedule, num_steps: int, discretization: str | None = "karras", *, dtype=torch.float64, device=None
) -> Tensor:
    """Increasing times t_0 = t_min < ... < t_N = t_max: a sampling grid (Karras ρ-spacing by default) of N + 1 nonzero times, reversed."""
    return schedule.time_steps(num_steps + 1, discretization, dtype=dtype, device=device)[:-1].flip(0)


def _rk4_step(field: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], x: Tensor, t0: Tensor, t1: Tensor):
    """Classical RK4 on the augmented system d(x, ℓ)/dt = (f, ∇·f); returns (x(t1), ∫_{t0}^{t1} ∇·f dt)."""
    h = t1 - t0
    f1, d1 = field(x, t0)
    f2, d2 = field(x + 0.5 * h * f1, t0 + 0.5 * h)
    f3, d3 = field(x + 0.5 * h * f2, t0 + 0.5 * h)
    f4, d4 = field(x + h * f3, t1)
    return x + h / 6 * (f1 + 2 * f2 + 2 * f3 + f4), h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)


def _heun_step(field: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], x: Tensor, t0: Tensor, t1: Tensor):
    """Heun (trapezoidal) on the augmented system; returns (x(t1), ∫_{t0}^{t1} ∇·f dt)."""
    h = t1 - t0
    f1, d1 = field(x, t0)
    f2, d2 = field(x + h * f1, t1)
    return x + 0.5 * h * (f1 + f2), 0.5 * h * (d1 + d2)


def _probe(x: Tensor, noise: str, generator: Generator) -> Tensor:
    """Hutchinson probe ε: Gaussian N(0, I) or Rademacher ±1 (the sign of a Gaussian), one per example."""
    eps = randn_like(x, generator)
    if noise == "gaussian":
        return eps
    if noise == "rademacher":
        return torch.where(eps >= 0, 1.0, -1.0).to(x.dtype)
    check_choice(HUTCHINSON_NOISES, noise, "Hutchinson noise")


def log_likelihood(
    denoiser: Denoiser,
    y: Tensor,
    schedule: Schedule | str,
    *,
    num_steps: int = 128,
    discretization: str | None = "karras",
    t_steps: Tensor | Sequence[float] | None = None,
    integrator: str = "rk4",
    divergence_method: str = "auto",
    hutchinson_noise: str = "rademacher",
    exact_max_dim: int = 64,
    class_labels: Tensor | None = None,
    generator: Generator = None,
    prior_logp: Callable[[Tensor], Tensor] | None = None,
) -> LogLikelihood:
    """log p_σmin(y) per example [B] by the probability-flow ODE from t_0 = t_min to T = t_max (module docstring).

    t_steps (increasing, from t_0 > 0 to T) overrides num_steps/discretization. divergence_method
    'auto' is exact for D ≤ exact_max_dim and Hutchinson otherwise. prior_logp(x̂_T) replaces
    the default prior log N(x̂_T; 0, σ(T)² I). Computation follows y's dtype (float64 for exact tests).
    """
    if isinstance(schedule, str):
        schedule = get_schedule(schedule)
    check_choice(INTEGRATORS, integrator, "integrator")
    check_choice(DIVERGENCES, divergence_method, "divergence method")
    if y.ndim < 2 or not y.is_floating_point():
        raise ValueError(f"y must be a floating-point batch [B, ...], got {y.dtype} of shape {list(y.shape)}")
    dim = y[0].numel()
    method = divergence_method if divergence_method != "auto" else ("exact" if dim <= exact_max_dim else "hutchinson")
    if t_steps is None:
        t_steps = likelihood_grid(schedule, num_steps, discretization, dtype=y.dtype, device=y.device)
    else:
        t_steps = torch.as_tensor(t_steps, dtype=y.dtype, device=y.device)
    if t_steps.ndim != 1 or len(t_steps) < 2 or not (t_steps[1:] > t_steps[:-1]).all() or float(t_steps[0]) <= 0:
        raise ValueError("t_steps must be an increasing 1-D grid of at least 2 times starting above 0")

    eps = _probe(y, hutchinson_noise, generator) if method == "hutchinson" else None

    def drift(x: Tensor, t: Tensor) -> Tensor:
        return ode_derivative(denoiser, x, t, schedule, class_labels)

    def field_u(x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """(dx/du, d(∫∇·f)/du) in u = ln σ: both times dt/du = σ(t)/σ'(t)."""
        t = schedule.sigma_inv(torch.exp(u)).to(u.dtype)
        f, div = divergence(drift, x, t, method, eps)
        dt_du = schedule.sigma(t) / schedule.sigma_deriv(t)
        return f * dt_du, div * dt_du

    step = _rk4_step if integrator == "rk4" else _heun_step
    t0, t_end = t_steps[0], t_steps[-1]
    u_steps = torch.log(schedule.sigma(t_steps))
    x = schedule.scale(t0) * y
    integral = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
    for i in range(len(u_steps) - 1):
        x, part = step(field_u, x, u_steps[i], u_steps[i + 1])
        integral = integral + part
    x_hat_T = x / schedule.scale(t_end)
    prior = prior_logp(x_hat_T) if prior_logp is not None else gaussian_log_prob(x_hat_T, schedule.sigma(t_end))
    delta = integral + dim * (torch.log(schedule.scale(t0)) - torch.log(schedule.scale(t_end)))
    return LogLikelihood(prior + delta, prior, delta)


def dequantize(
    images: Tensor, *, dequantization: str = "uniform", noise: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """x = (k + u − ½)/127.5 − 1 for 8-bit k [B, ...] in 0..255: u ~ U[0, 1) ('uniform'), u = ½ ('center') or u = noise."""
    k = images.to(torch.float64) if not images.is_floating_point() else images
    if noise is not None:
        u = noise.to(k.dtype)
    elif dequantization == "uniform":
        u = torch.rand(k.shape, generator=generator, dtype=k.dtype, device=k.device)
    elif dequantization == "center":
        u = torch.full_like(k, 0.5)
    else:
        check_choice(DEQUANTIZATIONS, dequantization, "dequantization")
    return (k + u - 0.5) / EIGHT_BIT_SCALE - 1


def bpd_from_log_likelihood(logp: Tensor, dim: int, log_q: Tensor | float = 0.0) -> Tensor:
    """bpd = −(log p_x(x) − log q(u|k) − D ln 127.5) / (D ln 2) for 8-bit data on [−1, 1]."""
    return -(logp - log_q - dim * math.log(EIGHT_BIT_SCALE)) / (dim * math.log(2))


def bits_per_dim(
    denoiser: Denoiser,
    images: Tensor,
    schedule: Schedule | str,
    *,
    dequantization: str = "uniform",
    dequant_noise: Tensor | None = None,
    dequant_log_q: Tensor | float = 0.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    **likelihood_options,
) -> Tensor:
    """Bits/dim [B] of 8-bit images [B, C, H, W] (integers 0..255): dequantize, ODE log-likelihood, convert.

    Variational dequantization: pass dequant_noise u ~ q(u | k) and its log-density dequant_log_q.
    The Hutchinson probes and the uniform noise both come from `generator`.
    """
    if images.is_floating_point() and (images.min() < 0 or images.max() > 255):
        raise ValueError("bits_per_dim expects 8-bit images with values 0..255 (use x = (k + u − ½)/127.5 − 1 yourself otherwise)")
    x = dequantize(images, dequantization=dequantization, noise=dequant_noise, generator=generator).to(dtype)
    result = log_likelihood(denoiser, x, schedule, generator=generator, **likelihood_options)
    return bpd_from_log_likelihood(result.logp, x[0].numel(), dequant_log_q)
