"""ODE and SDE samplers for any (σ(t), s(t)) schedule, all with one signature.

Every solver is a plain function
    solver(denoiser, x, t_steps, schedule, *, class_labels=None, generator=None, callback=None, **options)
that integrates from x = x(t_0) along the grid t_0 > ... > t_N and returns x(t_N).
`callback(i, x)` is called after step i with x(t_{i+1}). Gradients are the caller's choice.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from ..choices import choose
from ..progress import progress_bar
from .denoisers import GuidedDenoiser, boundary_sigma
from .schedules import DISCRETIZATIONS, Schedule, check_num_steps, get as get_schedule

__all__ = [
    "SOLVERS",
    "sample",
    "euler",
    "heun",
    "stochastic",
    "euler_maruyama",
    "dpmpp_2m",
    "consistency",
    "meanflow",
    "euler_ancestral",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
    "dpm_fast",
    "dpm_adaptive",
    "unipc",
    "deis",
    "ancestral_step",
    "step_noise",
    "lms_coefficients",
    "deis_coefficients",
    "unipc_coefficients",
    "CONSISTENCY_SOLVERS",
    "MEANFLOW_SOLVERS",
    "ADAPTIVE_SOLVERS",
    "consistency_grid",
    "solver_time_steps",
    "ode_derivative",
    "denoise",
    "randn_like",
    "churn_noise",
    "heun_step",
    "check_t_steps",
    "check_options",
    "check_solver",
    "SamplerConfig",
]

Denoiser = Callable[..., Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[int, Tensor], None] | None


# ----------------------------------------------------------------------------- shared pieces


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    """N(0, I) noise shaped like x; a sequence of generators gives one stream per batch item."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device) for g in generator])


def denoise(denoiser: Denoiser, x: Tensor, t: Tensor, schedule: Schedule, class_labels: Tensor | None) -> Tensor:
    """D(x/s(t); σ(t)) with σ broadcast to the batch, in x's dtype."""
    sigma = schedule.sigma(t).expand(x.shape[0])
    return denoiser(x / schedule.scale(t), sigma, class_labels).to(x.dtype)


def ode_derivative(
    denoiser: Denoiser, x: Tensor, t: Tensor, schedule: Schedule, class_labels: Tensor | None
) -> Tensor:
    """dx/dt = (σ'/σ + s'/s) x − (σ' s/σ) D(x/s; σ(t))  (EDM eq. 4)."""
    sigma, s = schedule.sigma(t), schedule.scale(t)
    dsigma, ds = schedule.sigma_deriv(t), schedule.scale_deriv(t)
    D = denoise(denoiser, x, t, schedule, class_labels)
    return (dsigma / sigma + ds / s) * x - dsigma * s / sigma * D


def heun_step(
    denoiser: Denoiser, x: Tensor, t_cur: Tensor, t_next: Tensor, schedule: Schedule, class_labels: Tensor | None,
    *, last: bool | None = None,
) -> Tensor:
    """One step of EDM Algorithm 1: Euler, plus the trapezoidal correction unless t_next = 0.

    `last` (t_next = 0) may be given by a caller that knows it, saving a device-to-host read of t_next.
    """
    h = t_next - t_cur
    d_cur = ode_derivative(denoiser, x, t_cur, schedule, class_labels)
    x_next = x + h * d_cur
    if last is None:
        last = float(t_next) == 0.0
    if last:
        return x_next
    d_next = ode_derivative(denoiser, x_next, t_next, schedule, class_labels)
    return x + h * (0.5 * d_cur + 0.5 * d_next)


def churn_noise(
    x: Tensor, t_cur: Tensor, schedule: Schedule, gamma: float, s_noise: float, generator: Generator
) -> tuple[Tensor, Tensor]:
    """Raise the noise from σ(t) to σ(t̂) = (1 + γ)σ(t)  (EDM Algorithm 2, lines 5–6, any σ and s); t̂ is rounded
    as the schedule rounds a sampler's times (IDDPM: to the nearest of its noise levels)."""
    sigma = schedule.sigma(t_cur)
    t_hat = schedule.round_time(schedule.sigma_inv(sigma + gamma * sigma)).to(t_cur.dtype)
    sigma_hat, s_hat = schedule.sigma(t_hat), schedule.scale(t_hat)
    extra = (sigma_hat**2 - sigma**2).clamp_min(0).sqrt() * s_hat * s_noise
    return s_hat / schedule.scale(t_cur) * x + extra * randn_like(x, generator), t_hat


def _steps(t_steps: Tensor):
    """(i, t_cur, t_next, t_next == 0) over consecutive grid points.

    The grid is read to the host once, so that no step needs a device-to-host read (a GPU
    synchronisation) to know whether it ends at t = 0.
    """
    t_host = t_steps.tolist()
    return ((i, t_steps[i], t_steps[i + 1], t_host[i + 1] == 0.0) for i in range(len(t_steps) - 1))


# ----------------------------------------------------------------------------- solvers


def _in_t(x: Tensor, t_steps: Tensor, callback: Callback, step: Callable[..., Tensor]) -> Tensor:
    """The loop of the solvers that work in x and t: x ← step(i, x, t_i, t_{i+1}, last) along the grid (last:
    t_{i+1} = 0), passed to the callback after each step."""
    for i, t_cur, t_next, last in _steps(t_steps):
        x = step(i, x, t_cur, t_next, last)
        if callback is not None:
            callback(i, x)
    return x


def euler(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
) -> Tensor:
    """Explicit Euler on the probability-flow ODE (first order): x_{i+1} = x_i + (t_{i+1} − t_i)·dx/dt(x_i, t_i)."""
    def step(i, x, t_cur, t_next, last):
        return x + (t_next - t_cur) * ode_derivative(denoiser, x, t_cur, schedule, class_labels)

    return _in_t(x, t_steps, callback, step)


def heun(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
) -> Tensor:
    """Heun's second-order method (EDM Algorithm 1): x_{i+1} = x_i + h(d_i + d'_{i+1})/2 with d'_{i+1} at the Euler
    point; the last step to t = 0 is an Euler step."""
    def step(i, x, t_cur, t_next, last):
        return heun_step(denoiser, x, t_cur, t_next, schedule, class_labels, last=last)

    return _in_t(x, t_steps, callback, step)


def stochastic(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
    churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> Tensor:
    """EDM Algorithm 2: churn γ_i = min(S_churn/N, √2 − 1) where S_tmin ≤ σ(t_i) ≤ S_tmax, then a Heun step.
    N counts the steps to t = 0: a grid that ends above 0 is one step short of it (edm.sample's final_denoise)."""
    sigmas = schedule.sigma(t_steps.cpu()).tolist()  # σ(t_i) on the host, read once
    num_steps = len(t_steps) - 1 + (sigmas[-1] > 0)
    gamma_max = min(churn / num_steps, math.sqrt(2) - 1)

    def step(i, x, t_cur, t_next, last):
        gamma = gamma_max if s_tmin <= sigmas[i] <= s_tmax else 0.0
        x_hat, t_hat = churn_noise(x, t_cur, schedule, gamma, s_noise, generator) if gamma > 0 else (x, t_cur)
        return heun_step(denoiser, x_hat, t_hat, t_next, schedule, class_labels, last=last)

    return _in_t(x, t_steps, callback, step)


def euler_maruyama(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
    brownian: bool = False,
) -> Tensor:
    """Euler–Maruyama on the reverse SDE in x̂ = x/s with β(t) = σ'/σ  (EDM eq. 6):
    dx̂ = −(σ'σ + βσ²) ∇log p dt + sqrt(2β) σ dω̄,  ∇log p = (D(x̂; σ) − x̂)/σ²; `brownian`: Brownian-tree noise.
    The step to t = 0 is x̂ = D(x̂; σ_{N−1}) (Song et al.'s noise removal): an Euler–Maruyama step there would
    leave noise of about √3·σ_{N−1} in the image."""
    noise = step_noise(x, t_steps, schedule, generator, brownian)

    def step(i, x, t_cur, t_next, last):
        sigma, dsigma = schedule.sigma(t_cur), schedule.sigma_deriv(t_cur)
        beta = dsigma / sigma
        x_hat = x / schedule.scale(t_cur)
        D = denoise(denoiser, x, t_cur, schedule, class_labels)
        if last:
            return schedule.scale(t_next) * D
        score = (D - x_hat) / sigma**2
        dt = t_next - t_cur
        x_hat = x_hat - (dsigma * sigma + beta * sigma**2) * score * dt
        x_hat = x_hat + (2 * beta * dt.abs()).sqrt() * sigma * noise(sigma, schedule.sigma(t_next))
        return schedule.scale(t_next) * x_hat

    return _in_t(x, t_steps, callback, step)


def dpmpp_2m(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in x̂ = x/s with λ = −ln σ:
    x̂_{i+1} = (σ_{i+1}/σ_i) x̂_i − expm1(−h_i) D̃_i,  D̃_i = (1 + 1/(2r)) D_i − 1/(2r) D_{i−1},  r = h_{i−1}/h_i;
    the last step is x̂ = D. It is dpmpp_2m_sde with η = 0 (its midpoint correction ½φ·(h/h_{i−1})(D_i − D_{i−1}) is
    the D_{i−1} term of D̃ above)."""
    return dpmpp_2m_sde(denoiser, x, t_steps, schedule, class_labels=class_labels, generator=generator,
                        callback=callback, eta=0.0)


# ----------------------------------------------------------------------------- k-diffusion's solver set
# Each works in x̂ = x/s and σ = σ(t) on the caller's grid and returns x = s(t_N)·x̂ (k-diffusion's formulas are
# the case s = 1): one definition serves every schedule.


def _in_sigma(x: Tensor, t_steps: Tensor, schedule: Schedule, callback: Callback, step: Callable[..., Tensor]) -> Tensor:
    """The loop every k-diffusion solver shares: x̂ = x/s(t_0); x̂ ← step(i, x̂, σ_i, σ_{i+1}, last) along the grid
    (σ as 0-d tensors, last: t_{i+1} = 0); x = s(t_{i+1})·x̂ after each step, passed to the callback."""
    sigma, scale = schedule.sigma(t_steps), schedule.scale(t_steps)
    x_hat = x / scale[0]
    for i, _, _, last in _steps(t_steps):
        x_hat = step(i, x_hat, sigma[i], sigma[i + 1], last)
        x = scale[i + 1] * x_hat
        if callback is not None:
            callback(i, x)
    return x


def _at(denoiser: Denoiser, x_hat: Tensor, sigma: Tensor, class_labels: Tensor | None) -> Tensor:
    """D(x̂; σ) with σ broadcast to the batch, in x̂'s dtype."""
    return denoiser(x_hat, sigma.expand(x_hat.shape[0]), class_labels).to(x_hat.dtype)


def step_noise(x: Tensor, t_steps: Tensor, schedule: Schedule, generator: Generator, brownian: bool):
    """noise(σ, σ_next) -> N(0, I) like x for an SDE step: fresh draws from the generator(s), or with `brownian` the
    standardized increments of one Brownian path per image over [0, σ(t_0)] (edm.core.brownian; each image's seed
    is drawn once from its generator), so that a seed gives the same path on any grid."""
    if not brownian:
        return lambda sigma, sigma_next: randn_like(x, generator)
    from .brownian import BrownianTree

    if generator is None or isinstance(generator, torch.Generator):
        seeds = torch.randint(0, 2**62, (x.shape[0],), generator=generator)
    else:
        seeds = torch.cat([torch.randint(0, 2**62, (1,), generator=g, device=g.device).cpu() for g in generator])
    tree = BrownianTree(x.shape, seeds.to(x.device), 0.0, float(schedule.sigma(t_steps[0])), dtype=x.dtype, device=x.device)
    return lambda sigma, sigma_next: tree.increment(float(sigma), float(sigma_next))


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """(σ_down, σ_up): σ_up = min(σ_{i+1}, η·sqrt(σ_{i+1}²(σ_i² − σ_{i+1}²)/σ_i²)), σ_down = sqrt(σ_{i+1}² − σ_up²)."""
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
    return (sigma_next**2 - up**2).sqrt(), up


def _ancestral_grid(t_steps: Tensor, schedule: Schedule, eta: float) -> tuple[Tensor, Tensor, list[bool]]:
    """ancestral_step of every step of the grid: (σ_down, σ_up), and whether σ_down = 0, read on the host once. With
    η > 1 a step with σ_{i+1}/σ_i ≤ sqrt(1 − 1/η²) has σ_down = 0: a solver takes x̂ = D there (the Euler step to
    σ_down, as k-diffusion), since a second evaluation would be at σ = 0 (DPM-Solver-2: 0/0)."""
    sigma = schedule.sigma(t_steps)
    sigma_down, sigma_up = ancestral_step(sigma[:-1], sigma[1:], eta)
    return sigma_down, sigma_up, (sigma_down == 0).tolist()


def euler_ancestral(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0, brownian: bool = False,
) -> Tensor:
    """Ancestral Euler (k-diffusion's euler_ancestral): x̂ ← x̂ + (σ_down − σ_i)(x̂ − D(x̂; σ_i))/σ_i, then
    x̂ ← x̂ + s_noise·σ_up·n (ancestral_step's σ_down, σ_up)."""
    noise = step_noise(x, t_steps, schedule, generator, brownian)

    def step(i, x_hat, sigma, sigma_next, last):
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x_hat = x_hat + (sigma_down - sigma) * (x_hat - _at(denoiser, x_hat, sigma, class_labels)) / sigma
        return x_hat if last else x_hat + s_noise * sigma_up * noise(sigma, sigma_next)

    return _in_sigma(x, t_steps, schedule, callback, step)


def _dpm2_step(denoiser: Denoiser, x_hat: Tensor, D: Tensor, sigma: Tensor, sigma_to: Tensor,
               class_labels: Tensor | None) -> Tensor:
    """DPM-Solver-2's step from σ to σ_to: x̂_mid = x̂ + (σ_mid − σ)(x̂ − D)/σ with σ_mid = sqrt(σ·σ_to), then
    x̂ + (σ_to − σ)(x̂_mid − D(x̂_mid; σ_mid))/σ_mid."""
    sigma_mid = (sigma.log() + 0.5 * (sigma_to.log() - sigma.log())).exp()
    x_mid = x_hat + (sigma_mid - sigma) * (x_hat - D) / sigma
    return x_hat + (sigma_to - sigma) * (x_mid - _at(denoiser, x_mid, sigma_mid, class_labels)) / sigma_mid


def dpm_2(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
) -> Tensor:
    """DPM-Solver-2 (k-diffusion's dpm_2, without churn): second order, two evaluations a step (one to σ = 0)."""

    def step(i, x_hat, sigma, sigma_next, last):
        D = _at(denoiser, x_hat, sigma, class_labels)
        return D if last else _dpm2_step(denoiser, x_hat, D, sigma, sigma_next, class_labels)

    return _in_sigma(x, t_steps, schedule, callback, step)


def dpm_2_ancestral(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0, brownian: bool = False,
) -> Tensor:
    """Ancestral DPM-Solver-2 (k-diffusion's dpm_2_ancestral): a DPM-Solver-2 step to σ_down, then noise of σ_up; a
    step with σ_down = 0 (η > 1, _ancestral_grid) is x̂ = D, then the noise (k-diffusion adds none there)."""
    noise = step_noise(x, t_steps, schedule, generator, brownian)
    sigma_down, sigma_up, to_zero = _ancestral_grid(t_steps, schedule, eta)

    def step(i, x_hat, sigma, sigma_next, last):
        D = _at(denoiser, x_hat, sigma, class_labels)
        if last:
            return D
        x_hat = D if to_zero[i] else _dpm2_step(denoiser, x_hat, D, sigma, sigma_down[i], class_labels)
        return x_hat + s_noise * sigma_up[i] * noise(sigma, sigma_next)

    return _in_sigma(x, t_steps, schedule, callback, step)


def _lagrange_basis(nodes: Sequence[float]) -> list:
    """The Lagrange basis ℓ_j through `nodes` (ℓ_j(node_k) = δ_jk) as numpy polynomial coefficients, in float64."""
    import numpy as np
    from numpy.polynomial import polynomial as P

    basis = []
    for j, node in enumerate(nodes):
        ell = np.array([1.0])
        for k, other in enumerate(nodes):
            if k != j:
                ell = P.polymul(ell, np.array([-other, 1.0]) / (node - other))
        basis.append(ell)
    return basis


def lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> list[float]:
    """∫_{σ_i}^{σ_{i+1}} ℓ_j(σ) dσ for the Lagrange basis ℓ_j through σ_i, σ_{i−1}, ..., σ_{i−order+1} (exact
    polynomial integration, in float64)."""
    from numpy.polynomial import polynomial as P

    coefficients = []
    for ell in _lagrange_basis([sigmas[i - k] for k in range(order)]):
        antiderivative = P.polyint(ell)
        coefficients.append(float(P.polyval(sigmas[i + 1], antiderivative) - P.polyval(sigmas[i], antiderivative)))
    return coefficients


def deis_coefficients(sigmas: Sequence[float], i: int, order: int) -> list[float]:
    """∫_{σ_i}^{σ_{i+1}} ℓ_j(ln σ) dσ for the Lagrange basis ℓ_j in u = ln σ through σ_i, ..., σ_{i−order+1}: with
    dσ = e^u du, ∫ P(u) e^u du = e^u (P − P' + P'' − ...), which is 0 at σ = 0 (exact, in float64)."""
    import math as m

    from numpy.polynomial import polynomial as P

    def antiderivative(ell, sigma: float) -> float:
        if sigma == 0.0:
            return 0.0
        u, total, sign, poly = m.log(sigma), 0.0, 1.0, ell
        while len(poly) and poly.any():
            total, sign, poly = total + sign * float(P.polyval(u, poly)), -sign, P.polyder(poly)
        return sigma * total

    basis = _lagrange_basis([m.log(sigmas[i - k]) for k in range(order)])
    return [antiderivative(ell, sigmas[i + 1]) - antiderivative(ell, sigmas[i]) for ell in basis]


def _multistep_slopes(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, class_labels: Tensor | None,
    callback: Callback, orders: Sequence[int], coefficients: Callable[[Sequence[float], int, int], list[float]],
) -> Tensor:
    """x̂_{i+1} = x̂_i + Σ_j c_ij ε_{i−j}, ε = (x̂ − D)/σ = dx̂/dσ, over the last orders[i] slopes, c_ij =
    coefficients(σ's in float64, i, orders[i]): the Adams–Bashforth form that lms and DEIS share."""
    sigmas = schedule.sigma(t_steps.cpu().double()).tolist()
    slopes: list[Tensor] = []

    def step(i, x_hat, sigma, sigma_next, last):
        slopes[:] = (slopes + [(x_hat - _at(denoiser, x_hat, sigma, class_labels)) / sigma])[-max(orders):]
        weights = coefficients(sigmas, i, orders[i])
        return x_hat + sum(w * d for w, d in zip(weights, reversed(slopes)))

    return _in_sigma(x, t_steps, schedule, callback, step)


def _check_order(solver: str, order: object, allowed: Sequence[int]) -> None:
    if isinstance(order, bool) or order not in allowed:
        raise ValueError(f"{solver}: order must be one of {list(allowed)}, got {order!r}")


def lms(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep in σ (k-diffusion's lms): x̂_{i+1} = x̂_i + Σ_j c_ij d_{i−j}, d = (x̂ − D)/σ, with c_ij the
    integrals of the Lagrange basis in σ over the last `order` σ's; one evaluation a step."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"lms: order must be a positive integer, got {order!r}")
    orders = [min(i + 1, order) for i in range(len(t_steps) - 1)]
    return _multistep_slopes(denoiser, x, t_steps, schedule, class_labels, callback, orders, lms_coefficients)


def deis(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
    order: int = 2, lower_order_final: bool = True,
) -> Tensor:
    """DEIS-tAB in log ρ (Zhang & Chen 2023; diffusers' DEISMultistepScheduler, whose ρ = σ/α is our σ):
    x̂_{i+1} = x̂_i + Σ_j c_ij ε_{i−j}, ε = (x̂ − D)/σ, c_ij = ∫_{σ_i}^{σ_{i+1}} ℓ_j(ln σ) dσ (deis_coefficients; exact to
    σ = 0); order 1 is DDIM. Orders warm up 1, 2, ...; with lower_order_final on grids under 15 steps the last step
    is order 1 and the one before at most 2 (as diffusers'); one evaluation a step."""
    _check_order("deis", order, (1, 2, 3))
    num_steps = len(t_steps) - 1
    orders = [min(i + 1, order) for i in range(num_steps)]
    if lower_order_final and num_steps < 15:
        orders = orders[:-2] + [min(o, 2) for o in orders[-2:-1]] + [1]
    return _multistep_slopes(denoiser, x, t_steps, schedule, class_labels, callback, orders, deis_coefficients)


def dpmpp_2s_ancestral(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0, brownian: bool = False,
) -> Tensor:
    """Ancestral DPM-Solver++(2S) (k-diffusion's dpmpp_2s_ancestral), λ = −ln σ, h = λ_down − λ_i, r = ½:
    x̂_s = (σ_s/σ_i) x̂ − expm1(−h/2) D_i,  x̂ = (σ_down/σ_i) x̂ − expm1(−h) D(x̂_s; σ_s),  then noise of σ_up; a step
    with σ_down = 0 (η > 1, _ancestral_grid) is x̂ = D, then the noise."""
    noise = step_noise(x, t_steps, schedule, generator, brownian)
    sigma_down, sigma_up, to_zero = _ancestral_grid(t_steps, schedule, eta)

    def step(i, x_hat, sigma, sigma_next, last):
        D = _at(denoiser, x_hat, sigma, class_labels)
        if last:
            return D
        if to_zero[i]:
            return D + s_noise * sigma_up[i] * noise(sigma, sigma_next)
        h = sigma.log() - sigma_down[i].log()
        sigma_s = (sigma.log() - 0.5 * h).exp()
        x_s = sigma_s / sigma * x_hat - torch.expm1(-0.5 * h) * D
        x_hat = sigma_down[i] / sigma * x_hat - torch.expm1(-h) * _at(denoiser, x_s, sigma_s, class_labels)
        return x_hat + s_noise * sigma_up[i] * noise(sigma, sigma_next)

    return _in_sigma(x, t_steps, schedule, callback, step)


def dpmpp_sde(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, brownian: bool = True,
) -> Tensor:
    """Stochastic DPM-Solver++ (k-diffusion's dpmpp_sde), λ = −ln σ, h = λ_{i+1} − λ_i: an ancestral DPM-Solver++
    substep to σ_s = e^{−(λ_i + r h)}, then the step to σ_{i+1} with D̃ = (1 − 1/(2r)) D_i + 1/(2r) D(x̂_s; σ_s), each
    followed by its ancestral noise; the last step is Euler. Its two noises are increments of one Brownian path over
    overlapping intervals (brownian, the default, as k-diffusion's): with independent draws (brownian=false) the
    samples' variance is 16 % low at 64 steps on the data of tests/test_kdiffusion_solvers.py."""
    if not 0 < r <= 1:
        raise ValueError(f"dpmpp_sde: r must be in (0, 1], got {r!r}")
    noise = step_noise(x, t_steps, schedule, generator, brownian)

    def step(i, x_hat, sigma, sigma_next, last):
        D = _at(denoiser, x_hat, sigma, class_labels)
        if last:
            return D
        sigma_s = (sigma.log() + r * (sigma_next.log() - sigma.log())).exp()
        down, up = ancestral_step(sigma, sigma_s, eta)
        x_s = down / sigma * x_hat - torch.expm1(down.log() - sigma.log()) * D
        x_s = x_s + s_noise * up * noise(sigma, sigma_s)
        D_mix = (1 - 1 / (2 * r)) * D + 1 / (2 * r) * _at(denoiser, x_s, sigma_s, class_labels)
        down, up = ancestral_step(sigma, sigma_next, eta)
        x_hat = down / sigma * x_hat - torch.expm1(down.log() - sigma.log()) * D_mix
        return x_hat + s_noise * up * noise(sigma, sigma_next)

    return _in_sigma(x, t_steps, schedule, callback, step)


def dpmpp_2m_sde(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint", brownian: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) SDE (k-diffusion's dpmpp_2m_sde), h = λ_{i+1} − λ_i, η·h of it stochastic:
    x̂ = (σ_{i+1}/σ_i) e^{−ηh} x̂ − expm1(−h − ηh) D_i + a correction from D_{i−1} (midpoint or heun)
    + σ_{i+1} sqrt(−expm1(−2ηh)) n; the last step is x̂ = D."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"dpmpp_2m_sde: solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    noise = step_noise(x, t_steps, schedule, generator, brownian)
    previous: list[Tensor] = []  # [D_{i−1}, h_{i−1}] once there is a step behind

    def step(i, x_hat, sigma, sigma_next, last):
        D = _at(denoiser, x_hat, sigma, class_labels)
        if last:
            return D
        h = sigma.log() - sigma_next.log()
        eta_h = eta * h
        phi = -torch.expm1(-h - eta_h)
        x_hat = sigma_next / sigma * torch.exp(-eta_h) * x_hat + phi * D
        if previous:
            D_prev, h_prev = previous
            weight = (phi / (-h - eta_h) + 1) if solver_type == "heun" else 0.5 * phi
            x_hat = x_hat + weight * h / h_prev * (D - D_prev)
        if eta:
            x_hat = x_hat + s_noise * sigma_next * (-torch.expm1(-2 * eta_h)).sqrt() * noise(sigma, sigma_next)
        previous[:] = [D, h]
        return x_hat

    return _in_sigma(x, t_steps, schedule, callback, step)


DPMPP_3M_D2_WEIGHTS = MappingProxyType({"k_diffusion": 1.0, "exact": 2.0})  # dpmpp_3m_sde's variants: w of −w φ₃ d₂


def dpmpp_3m_sde(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0, brownian: bool = False, variant: str = "k_diffusion",
) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's dpmpp_3m_sde), h_η = (1 + η)h:
    x̂ = e^{−h_η} x̂ − expm1(−h_η) D_i + φ₂ d₁ − w φ₃ d₂ (divided differences of the last three D's, d₁ ≈ hD',
    d₂ ≈ h²D''/2; φ₂ = expm1(−h_η)/h_η + 1, φ₃ = φ₂/h_η − ½) + σ_{i+1} sqrt(−expm1(−2ηh)) n; the last step is x̂ = D.
    variant="exact": w = 2, the exact integral of the quadratic term (third order at η = 0); "k_diffusion" (the
    default): k-diffusion's w = 1, as DPM-Solver's and diffusers' third-order multistep, second order at η = 0 but
    steadier on coarse grids (docs/evaluation.md)."""
    d2_weight = choose(DPMPP_3M_D2_WEIGHTS, variant, "dpmpp_3m_sde: variant")
    noise = step_noise(x, t_steps, schedule, generator, brownian)
    history: list[tuple[Tensor, Tensor]] = []  # (D, h) of the last two steps, newest first

    def step(i, x_hat, sigma, sigma_next, last):
        D = _at(denoiser, x_hat, sigma, class_labels)
        if last:
            return D
        h = sigma.log() - sigma_next.log()
        h_eta = h * (eta + 1)
        x_hat = torch.exp(-h_eta) * x_hat - torch.expm1(-h_eta) * D
        phi_2 = torch.expm1(-h_eta) / h_eta + 1
        if len(history) == 2:
            (D_1, h_1), (D_2, h_2) = history
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (D - D_1) / r0, (D_1 - D_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x_hat = x_hat + phi_2 * d1 - d2_weight * (phi_2 / h_eta - 0.5) * d2
        elif history:
            D_1, h_1 = history[0]
            x_hat = x_hat + phi_2 * (D - D_1) / (h_1 / h)
        if eta:
            x_hat = x_hat + s_noise * sigma_next * (-torch.expm1(-2 * h * eta)).sqrt() * noise(sigma, sigma_next)
        history[:] = [(D, h)] + history[:1]
        return x_hat

    return _in_sigma(x, t_steps, schedule, callback, step)


def _dpm_solver_step(
    eps_at: Callable[[Tensor, Tensor], Tensor], x_hat: Tensor, eps: Tensor, sigma: Tensor, sigma_next: Tensor, order: int,
) -> tuple[Tensor, Tensor | None]:
    """DPM-Solver-`order` (Lu et al. 2022, eqs. 3.7, Algorithms 4–5 with r₁ = ½ | ⅓, r₂ = ⅔) from σ to σ_next in
    λ = −ln σ, h = λ_next − λ, ε = (x̂ − D)/σ = eps_at(x̂, σ), stages at σ_k = σ e^{−r_k h}; with its embedded estimate
    of one order less on the same stages (order 3: DPM-Solver-2 with r₁ = ⅓; order 2: DPM-Solver-1; order 1: None):
        1:  x̂ − σ_next expm1(h) ε
        2:  x̂₁ − σ_next/(2r₁) expm1(h) (ε(u₁) − ε),   u₁ = x̂ − σ₁ expm1(r₁h) ε
        3:  x̂₁ − σ_next/r₂ (expm1(h)/h − 1) (ε(u₂) − ε),   u₂ = u₁ − σ₂ (r₂/r₁)(expm1(r₂h)/(r₂h) − 1)(ε(u₁) − ε), u₁ at σ₂
    σ, σ_next: 0-d or one per item, shaped to broadcast against x̂."""
    h = sigma.log() - sigma_next.log()
    first = x_hat - sigma_next * torch.expm1(h) * eps
    if order == 1:
        return first, None
    r1 = 0.5 if order == 2 else 1 / 3
    sigma_1 = sigma * torch.exp(-r1 * h)
    eps_1 = eps_at(x_hat - sigma_1 * torch.expm1(r1 * h) * eps, sigma_1)
    second = first - sigma_next / (2 * r1) * torch.expm1(h) * (eps_1 - eps)
    if order == 2:
        return second, first
    r2 = 2 / 3
    sigma_2 = sigma * torch.exp(-r2 * h)
    u_2 = (x_hat - sigma_2 * torch.expm1(r2 * h) * eps
           - sigma_2 * (r2 / r1) * (torch.expm1(r2 * h) / (r2 * h) - 1) * (eps_1 - eps))
    third = first - sigma_next / r2 * (torch.expm1(h) / h - 1) * (eps_at(u_2, sigma_2) - eps)
    return third, second


def _eps(denoiser: Denoiser, x_hat: Tensor, sigma: Tensor, class_labels: Tensor | None) -> Tensor:
    """ε(x̂, σ) = (x̂ − D(x̂; σ))/σ with σ 0-d or one per item (shaped to broadcast against x̂)."""
    return (x_hat - _at(denoiser, x_hat, sigma.reshape(-1), class_labels)) / sigma


def dpm_fast(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
    order: int = 3, eta: float = 0.0, s_noise: float = 1.0, brownian: bool = False,
) -> Tensor:
    """DPM-Solver-fast (Lu et al. 2022, §3.4; k-diffusion's dpm_fast) on the caller's grid: singlestep DPM-Solver-`order`
    steps (_dpm_solver_step), the last two above σ = 0 of orders min(order, 2) and 1 (k-diffusion's order sequence
    for an NFE divisible by 3 on its λ-uniform grid, discretization=log_snr); a step to σ = 0 is x̂ = D. With η > 0,
    each step goes to max(σ_down, σ_end) and adds noise of sqrt(σ_{i+1}² − that²) (σ_end: the last σ > 0).
    Evaluations: `order` per step above σ = 0, one for the step to it."""
    _check_order("dpm_fast", order, (1, 2, 3))
    sigmas = schedule.sigma(t_steps)
    positive = len(t_steps) - 1 - int(float(t_steps[-1]) == 0.0)
    orders = [order] * (positive - 2) + [min(order, 2), 1] if positive >= 2 else [1] * positive
    noise = step_noise(x, t_steps, schedule, generator, brownian) if eta else None
    eps_at = lambda x_hat, sigma: _eps(denoiser, x_hat, sigma, class_labels)  # noqa: E731
    sigma_end = sigmas[positive] if positive else sigmas[0]

    def step(i, x_hat, sigma, sigma_next, last):
        if last:
            return _at(denoiser, x_hat, sigma, class_labels)
        down = torch.maximum(sigma_end, ancestral_step(sigma, sigma_next, eta)[0]) if eta else sigma_next
        x_hat = _dpm_solver_step(eps_at, x_hat, eps_at(x_hat, sigma), sigma, down, orders[i])[0]
        return x_hat + s_noise * (sigma_next**2 - down**2).sqrt() * noise(sigma, sigma_next) if eta else x_hat

    return _in_sigma(x, t_steps, schedule, callback, step)


def dpm_adaptive(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
    order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
    pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81,
) -> Tensor:
    """DPM-Solver-12 / -23 with step-size control (Lu et al. 2022, §4 and Algorithm 6; k-diffusion's dpm_adaptive),
    each image with its own steps. A trial step of h in λ = −ln σ gives DPM-Solver-`order` and its embedded estimate
    x̂_low (_dpm_solver_step); E = ‖(x̂_low − x̂_high)/δ‖_rms, δ = max(atol, rtol·max(|x̂_low|, |x̂_prev|)); the PID
    controller's factor 1 + atan(f − 1), f = E_n^{−b₁} E_{n−1}^{−b₂} E_{n−2}^{−b₃} (b = (p+i+d, −(p+2d), d)/order), multiplies
    h, and the step is taken when the factor ≥ accept_safety. The grid's points are stops the steps land on (the
    default two-step grid [σ_max, σ_min, 0] leaves the steps to the controller); the step to σ = 0 is x̂ = D. A
    rejected step reuses its ε(x̂) (k-diffusion evaluates it again). Each image's evaluations depend on it alone;
    GuidedDenoiser counts them per image."""
    _check_order("dpm_adaptive", order, (2, 3))
    if not (rtol > 0 and atol > 0 and h_init > 0):
        raise ValueError(f"dpm_adaptive: rtol, atol and h_init must be positive, got {rtol}, {atol}, {h_init}")
    batch, view = x.shape[0], (-1,) + (1,) * (x.ndim - 1)
    b = torch.tensor([pcoeff + icoeff + dcoeff, -(pcoeff + 2 * dcoeff), dcoeff], dtype=torch.float64, device=x.device) / order
    atol_floor = torch.tensor(atol, dtype=x.dtype, device=x.device)
    h = torch.full((batch,), float(h_init), dtype=torch.float64, device=x.device)
    inverse_errors = torch.full((batch, 3), math.nan, dtype=torch.float64, device=x.device)  # 1/E of the last accepted
    state: dict[str, Tensor] = {}  # x̂_prev, ε at each image's current point and whether it is fresh, across stops

    def labels(items: Tensor) -> Tensor | None:
        return None if class_labels is None else class_labels[items]

    def step(i, x_hat, sigma, sigma_next, last):
        if last:
            return _at(denoiser, x_hat, sigma, class_labels)
        x_hat = x_hat.clone()
        if "x_prev" not in state:
            state["x_prev"], state["eps"] = x_hat.clone(), torch.zeros_like(x_hat)
            state["fresh"] = torch.zeros(batch, dtype=torch.bool, device=x.device)
        x_prev, eps, fresh = state["x_prev"], state["eps"], state["fresh"]
        lam_end = -sigma_next.log()
        lam = (-sigma.log()).expand(batch).clone()
        while (active := (lam < lam_end - 1e-5).nonzero().flatten()).numel():
            stale = active[~fresh[active]]
            if stale.numel():
                eps[stale] = _eps(denoiser, x_hat[stale], torch.exp(-lam[stale]).view(view), labels(stale))
                fresh[stale] = True
            lam_next = torch.minimum(lam_end, lam[active] + h[active].to(lam.dtype))
            sigma_a, sigma_b = torch.exp(-lam[active]).view(view), torch.exp(-lam_next).view(view)
            eps_at = lambda u, sigma_k: _eps(denoiser, u, sigma_k, labels(active))  # noqa: E731
            high, low = _dpm_solver_step(eps_at, x_hat[active], eps[active], sigma_a, sigma_b, order)
            delta = torch.maximum(atol_floor, rtol * torch.maximum(low.abs(), x_prev[active].abs()))
            error = ((low - high) / delta).flatten(1).norm(dim=1).double() / math.sqrt(x[0].numel())
            errors = inverse_errors[active]
            errors[:, 0] = 1 / (error + 1e-8)
            errors[:, 1:] = torch.where(errors[:, 1:].isnan(), errors[:, :1], errors[:, 1:])
            factor = 1 + torch.atan((errors.log() @ b).exp() - 1)
            accept = factor >= accept_safety
            errors[accept, 2], errors[accept, 1] = errors[accept, 1], errors[accept, 0]
            inverse_errors[active], h[active] = errors, h[active] * factor
            taken = active[accept]
            x_prev[taken], x_hat[taken], lam[taken] = low[accept], high[accept], lam_next[accept]
            fresh[taken] = False
        return x_hat

    return _in_sigma(x, t_steps, schedule, callback, step)


def unipc_coefficients(rks: Sequence[float], h: float, variant: str) -> tuple[float, list[float]]:
    """(B(h), ρ) of UniPC (Zhao et al. 2023; data prediction, hh = −h): B(h) = hh (bh1) or expm1(hh) (bh2),
    b_k = k!·φ_{k+1}(hh)/B(h) with φ₁ = expm1(hh)/hh and φ_{k+1} = (φ_k − 1/k!)/hh, and ρ solving
    Σ_m ρ_m r_m^{k−1} = b_k (k = 1..len(rks)) over the ratios rks = (λ_{i−m} − λ_i)/h (a corrector's last ratio is 1)."""
    import numpy as np

    hh = -h
    B = hh if variant == "bh1" else math.expm1(hh)
    phi, factorial, b = math.expm1(hh) / hh - 1, 1.0, []
    for k in range(1, len(rks) + 1):
        b.append(phi * factorial / B)
        factorial *= k + 1
        phi = phi / hh - 1 / factorial
    if not rks:
        return B, []
    R = np.vander(np.asarray(rks, dtype=np.float64), len(rks), increasing=True).T
    return B, np.linalg.solve(R, np.asarray(b)).tolist()


def unipc(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
    order: int = 2, variant: str = "bh2", corrector: bool = True, lower_order_final: bool = True,
) -> Tensor:
    """UniPC (Zhao et al. 2023; diffusers' UniPCMultistepScheduler with data prediction) in x̂ = x/s, λ = −ln σ,
    h = λ_{i+1} − λ_i, D1_m = (D_{i−m} − D_i)/r_m, r_m = (λ_{i−m} − λ_i)/h:
    UniP-p  x̂_{i+1} = (σ_{i+1}/σ_i) x̂_i − expm1(−h) D_i − B(h) Σ_{m<p} ρ_m D1_m   (p = 2: ρ = ½, with bh2 DPM-Solver++(2M));
    UniC-p  the same step again with D_{i+1} = D(x̂_{i+1}) as one more difference (ratio 1; p = 1: ρ = ½), before the
            next predictor, which reuses D_{i+1}: no extra evaluation.
    Orders warm up 1, 2, ...; lower_order_final caps step i at N − i; the step to σ = 0 is x̂ = D; one evaluation a step."""
    _check_order("unipc", order, (1, 2, 3))
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc: variant must be 'bh1' or 'bh2', got {variant!r}")
    num_steps = len(t_steps) - 1
    sigmas = schedule.sigma(t_steps.cpu().double()).tolist()
    lam = [-math.log(v) if v > 0 else math.inf for v in sigmas]
    D: dict[int, Tensor] = {}  # D at the grid points that later steps still use
    previous: list = []  # [x̂ at point i − 1, the order of its predictor step]

    def update(x_hat: Tensor, i: int, p: int, D_next: Tensor | None = None) -> Tensor:
        """UniP-p from point i to i + 1; with D_next (D at point i + 1), UniC-p of that step."""
        h = lam[i + 1] - lam[i]
        rks = [(lam[i - m] - lam[i]) / h for m in range(1, p)]
        differences = [(D[i - m] - D[i]) / r for m, r in zip(range(1, p), rks)]
        if D_next is not None:
            rks, differences = rks + [1.0], differences + [D_next - D[i]]
        B, rho = unipc_coefficients(rks, h, variant)
        if len(rks) == 1:
            rho = [0.5]  # UniP-2 and UniC-1 (one difference) use ρ = ½, as diffusers' (the solve gives b₁ = ½ + O(h))
        x_next = sigmas[i + 1] / sigmas[i] * x_hat - math.expm1(-h) * D[i]
        return x_next - B * sum(r * d for r, d in zip(rho, differences)) if differences else x_next

    def step(i, x_hat, sigma, sigma_next, last):
        D[i] = _at(denoiser, x_hat, sigma, class_labels)
        if corrector and previous:
            x_hat = update(previous[0], i - 1, previous[1], D[i])
        D.pop(i - order, None)
        p = min(order, i + 1, num_steps - i if lower_order_final else order)
        previous[:] = [x_hat, p]
        return D[i] if last else update(x_hat, i, p)

    return _in_sigma(x, t_steps, schedule, callback, step)


def consistency(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
    sigmas: Sequence[float] | None = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) for a consistency function f = the denoiser
    with its boundary f(x̂; σ_b) = x̂ (boundary_sigma; 0 for a plain denoiser): ŷ = f(x/s(t_i); σ(t_i)), then
    x = s(t_{i+1})·(ŷ + sqrt(σ(t_{i+1})² − σ_b²)·n_i) with fresh noise n_i (x = ŷ at t_{i+1} = 0), one evaluation a
    step, on the grid t_steps, or with its N − 1 intermediate times at the noise levels `sigmas` (consistency_grid;
    ECT and sCM use [0.821] for 2 steps), which must not lie below σ_b."""
    grid = consistency_grid(t_steps, schedule, sigmas)
    sigma_b = boundary_sigma(denoiser)
    if sigma_b and bool((schedule.sigma(grid[1:-1]) < sigma_b).any()):
        raise ValueError(f"consistency: the noise levels {schedule.sigma(grid[1:-1]).tolist()} must not lie below the "
                         f"model's boundary σ_b = {sigma_b:g} (precond.boundary_sigma), where f(x̂; σ_b) = x̂")

    def step(i, x, t_cur, t_next, last):
        y = denoise(denoiser, x, t_cur, schedule, class_labels)
        if last:
            return y
        sigma = schedule.sigma(t_next)
        level = (sigma**2 - sigma_b**2).sqrt() if sigma_b else sigma  # the noise y lacks beyond f's boundary σ_b
        return schedule.scale(t_next) * (y + level * randn_like(x, generator))

    return _in_t(x, grid, callback, step)


def meanflow(
    denoiser: Denoiser, x: Tensor, t_steps: Tensor, schedule: Schedule, *,
    class_labels: Tensor | None = None, generator: Generator = None, callback: Callback = None,
) -> Tensor:
    """MeanFlow's sampler (Geng et al. 2025) z_r = z_t − (t − r)·u(z_t, r, t) from each grid time t_i to the next: in
    x̂ = x/s and σ, for any schedule, x̂_{i+1} = (σ_r/σ)·x̂_i + (1 − σ_r/σ)·D(x̂_i; σ, σ_r) with σ = σ(t_i),
    σ_r = σ(t_{i+1}) (edm.core.meanflow: for flow matching exactly z_r = z_t − (t − r)·u); one evaluation a step."""
    def step(i, x, t_cur, t_next, last):
        sigma, sigma_r = schedule.sigma(t_cur), schedule.sigma(t_next)
        x_hat = x / schedule.scale(t_cur)
        D = denoiser(x_hat, sigma.expand(x.shape[0]), class_labels,
                     sigma_r=sigma_r.to(x.dtype).expand(x.shape[0])).to(x.dtype)
        ratio = sigma_r / sigma
        return schedule.scale(t_next) * (ratio * x_hat + (1 - ratio) * D)

    return _in_t(x, t_steps, callback, step)


SOLVERS: MappingProxyType[str, Callable[..., Tensor]] = MappingProxyType(
    {"euler": euler, "heun": heun, "stochastic": stochastic, "euler_maruyama": euler_maruyama, "dpmpp_2m": dpmpp_2m,
     "consistency": consistency, "meanflow": meanflow, "euler_ancestral": euler_ancestral, "dpm_2": dpm_2,
     "dpm_2_ancestral": dpm_2_ancestral, "lms": lms, "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
     "dpmpp_sde": dpmpp_sde, "dpmpp_2m_sde": dpmpp_2m_sde, "dpmpp_3m_sde": dpmpp_3m_sde, "dpm_fast": dpm_fast,
     "dpm_adaptive": dpm_adaptive, "unipc": unipc, "deis": deis}
)
CONSISTENCY_SOLVERS = ("consistency",)  # solvers for consistency functions (few-step models), not denoisers
MEANFLOW_SOLVERS = ("meanflow",)  # solvers that need a model of the average velocity (objective meanflow)
ADAPTIVE_SOLVERS = ("dpm_adaptive",)  # solvers that choose their own steps (rtol, atol); the grid's points are stops


def consistency_grid(t_steps: Tensor, schedule: Schedule, sigmas: Sequence[float] | None) -> Tensor:
    """t_steps with its N − 1 intermediate times moved to the noise levels σ_1 > ... > σ_{N−1} of `sigmas`
    (None: t_steps unchanged); a wrong count or order is a ValueError naming what fits."""
    if sigmas is None:
        return t_steps
    num_steps = len(t_steps) - 1
    sigma_0 = float(schedule.sigma(t_steps[0]))
    values = [float(s) for s in sigmas]
    if len(values) != num_steps - 1 or any(not 0 < b < a for a, b in zip([sigma_0] + values, values)):
        raise ValueError(f"consistency: sigmas={values} must be {num_steps - 1} decreasing noise level(s) below "
                         f"σ(t_0) = {sigma_0:g} for {num_steps} step(s), e.g. sigmas=[0.821] with 2 steps")
    inner = schedule.sigma_inv(torch.tensor(values, dtype=torch.float64)).to(t_steps)
    return torch.cat([t_steps[:1], inner, t_steps[-1:]])


def solver_time_steps(
    schedule: Schedule, solver: str, num_steps: int, discretization: str | None = None, *,
    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
) -> Tensor:
    """The default grid of `solver`: the schedule's num_steps grid; for a consistency or MeanFlow solver (few-step
    jumps) the (N + 1)-step grid without its last point σ_min, so that no evaluation is spent on the jump from σ_min
    to 0, where f(x̂; σ) ≈ x̂ (2 MeanFlow steps would move z by σ_min-sized t·u in their second)."""
    if solver not in CONSISTENCY_SOLVERS + MEANFLOW_SOLVERS:
        return schedule.time_steps(num_steps, discretization, dtype=dtype, device=device)
    t = schedule.time_steps(num_steps + 1, discretization, dtype=dtype, device=device)
    return torch.cat([t[:num_steps], t[-1:]])


# ----------------------------------------------------------------------------- entry point


def check_t_steps(t_steps: Tensor, schedule: Schedule) -> None:
    """A valid grid is 1-D, finite, strictly decreasing, ends with t_N = 0 and has σ(t_0) finite."""
    if t_steps.ndim != 1 or len(t_steps) < 2:
        raise ValueError(f"t_steps must be a 1-D grid with at least 2 points, got shape {list(t_steps.shape)}")
    if not torch.isfinite(t_steps).all():
        raise ValueError("t_steps contains NaN or Inf")
    if not (t_steps[1:] < t_steps[:-1]).all():
        raise ValueError(f"t_steps must strictly decrease, got {t_steps.tolist()}")
    if float(t_steps[-1]) != 0.0:
        raise ValueError(f"t_steps must end with t_N = 0, got t_N = {float(t_steps[-1])}")
    sigma, s = schedule.sigma(t_steps[:-1]), schedule.scale(t_steps)
    if not (torch.isfinite(sigma).all() and (sigma > 0).all() and torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError(
            f"σ(t) or s(t) is not finite and positive on t_steps {t_steps.tolist()}: "
            f"times are outside the {schedule.name} schedule's range"
        )


def _check_inputs(noise: Tensor, class_labels: Tensor | None) -> None:
    if noise.ndim < 2:
        raise ValueError(f"noise must have shape [batch, ...], got {list(noise.shape)}")
    if not noise.is_floating_point() or not torch.isfinite(noise).all():
        raise ValueError("noise must be a finite floating-point tensor")
    if class_labels is not None and class_labels.shape[0] != noise.shape[0]:
        raise ValueError(f"class_labels has batch {class_labels.shape[0]}, noise has batch {noise.shape[0]}")


NONNEGATIVE_OPTIONS = ("churn", "s_tmin", "s_tmax", "s_noise", "eta")  # amounts of noise and the σ where it is added


def _at_least_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def solver_options(fn: Callable[..., Tensor]) -> list[str]:
    """The options a solver takes: its keyword-only arguments but the labels, generator and callback."""
    allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    return [a for a in allowed if a not in ("class_labels", "generator", "callback")]


def check_options(name: str, fn: Callable[..., Tensor], options: dict) -> None:
    """Options of solver `name` must be keyword-only arguments of `fn` (e.g. churn for stochastic)."""
    allowed = solver_options(fn)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"solver {name!r} does not take option(s) {unknown}; its options are {allowed}")
    negative = sorted(k for k in NONNEGATIVE_OPTIONS if k in options and not _at_least_zero(options[k]))
    if negative:
        raise ValueError(f"solver {name!r}: {', '.join(f'{k}={options[k]}' for k in negative)} must be a number ≥ 0 "
                         "(a negative churn or noise amount would silently turn the noise off or flip it)")
    if options.get("s_tmin", 0.0) > options.get("s_tmax", float("inf")):
        raise ValueError(f"solver {name!r}: s_tmin={options['s_tmin']} > s_tmax={options['s_tmax']} leaves no σ "
                         "where churn applies")


FINAL_DENOISE_REFUSALS = MappingProxyType({  # solvers whose last step is the model's output: what final_denoise does
    "consistency": "changes nothing: a consistency step already ends at the model's output f(x̂; σ_{N−1})",
    "meanflow": "would replace its last jump D(x̂; σ_{N−1}, σ_r = 0) by the denoiser at r = t, which is no MeanFlow step",
})


def check_solver(solver: str, options: dict, final_denoise: bool = False, key: str = "solver") -> Callable[..., Tensor]:
    """The solver function of `solver`, once its name, `options` and `final_denoise` are known to be valid; `key`
    names the setting in a refusal."""
    fn = choose(SOLVERS, solver, key)
    check_options(solver, fn, options)
    if final_denoise and solver in FINAL_DENOISE_REFUSALS:
        raise ValueError(f"sampler.final_denoise=true with solver {solver} {FINAL_DENOISE_REFUSALS[solver]}: set "
                         "sampler.final_denoise=false")
    return fn


@dataclass
class SamplerConfig:
    """How to sample, checked when made: `edm.sample(denoiser, noise, schedule, **config.kwargs())`.

    Training's sample grids, edm-sample and the configs/sampler/ group all use this one
    object, and its defaults are edm.sample's; `options` are the solver's keyword options (e.g.
    churn for stochastic).
    """

    solver: str = "heun"
    num_steps: int = 18
    discretization: Optional[str] = None  # None: the schedule's own
    final_denoise: bool = False
    options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_solver(self.solver, dict(self.options), self.final_denoise, "sampler.solver")
        check_num_steps(self.num_steps)
        if self.discretization is not None:
            choose(DISCRETIZATIONS, self.discretization, "sampler.discretization")

    def grid(self, schedule: Schedule) -> Tensor:
        """The t grid (float64) these settings integrate on: what reports record."""
        t = solver_time_steps(schedule, self.solver, self.num_steps, self.discretization)
        return consistency_grid(t, schedule, self.options.get("sigmas")) if self.solver in CONSISTENCY_SOLVERS else t

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of edm.sample that this config sets."""
        return dict(solver=self.solver, num_steps=self.num_steps, discretization=self.discretization,
                    final_denoise=self.final_denoise, **self.options)

    def evaluations_per_image(self, schedule: Schedule, guidance: float = 1.0,
                              interval: tuple[float, float] = (0.0, math.inf)) -> int:
        """The NFE of these settings for one image, counted by a run on a stand-in denoiser (D = 0; a fixed-step
        solver's count does not depend on D) under guidance of weight `guidance` in `interval`, as GuidedDenoiser
        counts it (a guided evaluation is two). The run also checks every option's value (a solver checks its
        order, variant, tolerances, ... when it starts) before any real work."""
        stand_in = lambda x, sigma, labels=None, **kwargs: torch.zeros_like(x)  # noqa: E731
        counting = GuidedDenoiser(stand_in, guidance, stand_in, interval)
        sample(counting, torch.zeros(1, 1, dtype=torch.float64), schedule, generator=torch.Generator().manual_seed(0),
               **self.kwargs())  # its own noise: the global random state is left as it was
        return counting.evaluations


def sample(
    denoiser: Denoiser,
    noise: Tensor,
    schedule: Schedule | str,
    num_steps: int = SamplerConfig.num_steps,
    solver: str = SamplerConfig.solver,
    t_steps: Tensor | Sequence[float] | None = None,
    class_labels: Tensor | None = None,
    generator: Generator = None,
    *,
    discretization: str | None = SamplerConfig.discretization,
    final_denoise: bool = SamplerConfig.final_denoise,
    progress: bool = False,
    return_trajectory: bool = False,
    **solver_options,
) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate from x(t_0) = s(t_0) σ(t_0)·noise to x(t_N = 0), which is y-space.

    t_steps (a decreasing grid ending with 0) overrides num_steps/discretization. With
    final_denoise the last step is x = D(x̂; σ_{N−1}) instead of the solver's step to 0.
    Returns x(0), or (x(0), trajectory [N + 1, *noise.shape]) with return_trajectory.
    """
    if isinstance(schedule, str):
        schedule = get_schedule(schedule)
    fn = check_solver(solver, solver_options, final_denoise)
    _check_inputs(noise, class_labels)
    if t_steps is None:
        t_steps = solver_time_steps(schedule, solver, num_steps, discretization, dtype=noise.dtype, device=noise.device)
    else:
        t_steps = torch.as_tensor(t_steps, dtype=noise.dtype, device=noise.device)
    check_t_steps(t_steps, schedule)

    x = schedule.scale(t_steps[0]) * schedule.sigma(t_steps[0]) * noise
    frames = [x] if return_trajectory else None
    bar = progress_bar(len(t_steps) - 1, "sampling", "step", leave=False) if progress else None

    def callback(i: int, x_i: Tensor) -> None:
        if frames is not None:
            frames.append(x_i)
        if bar is not None:
            bar.update(1)

    grid = t_steps[:-1] if final_denoise else t_steps
    try:
        if len(grid) > 1:
            x = fn(denoiser, x, grid, schedule, class_labels=class_labels, generator=generator, callback=callback, **solver_options)
        if final_denoise:
            x = denoise(denoiser, x, grid[-1], schedule, class_labels)
            callback(len(t_steps) - 2, x)
    finally:
        if bar is not None:
            bar.close()
    return (x, torch.stack(frames)) if return_trajectory else x
