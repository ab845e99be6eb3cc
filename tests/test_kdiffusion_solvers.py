"""k-diffusion's solver set in our σ(t), s(t) view: equal to k-diffusion's own formulas (s = 1, on the VE schedule),
the orders of convergence of the deterministic ones, the data statistics of the stochastic ones, every schedule.

The references below restate crowsonkb/k-diffusion's k_diffusion/sampling.py (sample_euler_ancestral, sample_dpm_2,
sample_dpm_2_ancestral, sample_lms, sample_dpmpp_2s_ancestral, sample_dpmpp_sde, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde; commit of
2024) line by line in σ, with torch.randn(generator=...) as the noise sampler; lms integrates its Lagrange basis
with Simpson's rule on 2001 points (k-diffusion: scipy's quad). dpmpp_3m_sde's variant="exact" weights d₂ by −2φ₃, the
exact integral of the quadratic through the last three D's, where k-diffusion (and the default variant) has −φ₃, which
makes the solver second order (test_dpmpp_3m_sde_is_third_order_with_the_exact_weight)."""

import functools
import math

import pytest
import torch

import edm

from conftest import CONTINUOUS_SCHEDULES
from test_samplers import measured_order

F64 = torch.float64


def _ancestral(s0, s1, eta):
    up = min(s1, eta * (s1**2 * (s0**2 - s1**2) / s0**2) ** 0.5)
    return (s1**2 - up**2) ** 0.5, up


def _d(model, x, s):
    return (x - model(x, s)) / s


def ref_euler_ancestral(model, x, sigmas, g, eta=1.0):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up = _ancestral(sigmas[i], sigmas[i + 1], eta)
        x = x + (x - denoised) / sigmas[i] * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + torch.randn(x.shape, generator=g, dtype=x.dtype) * up
    return x


def _dpm2(model, x, denoised, s0, s1):
    mid = math.exp(0.5 * (math.log(s0) + math.log(s1)))
    x_2 = x + (x - denoised) / s0 * (mid - s0)
    return x + _d(model, x_2, mid) * (s1 - s0)


def ref_dpm_2(model, x, sigmas, g):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + (x - denoised) / sigmas[i] * (0 - sigmas[i])
        else:
            x = _dpm2(model, x, denoised, sigmas[i], sigmas[i + 1])
    return x


def ref_dpm_2_ancestral(model, x, sigmas, g, eta=1.0):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up = _ancestral(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x + (x - denoised) / sigmas[i] * (down - sigmas[i])
        else:
            x = _dpm2(model, x, denoised, sigmas[i], down)
            x = x + torch.randn(x.shape, generator=g, dtype=x.dtype) * up
    return x


def _lms_coeff(order, t, i, j):
    tau = torch.linspace(t[i], t[i + 1], 2001, dtype=F64)
    prod = torch.ones_like(tau)
    for k in range(order):
        if k != j:
            prod = prod * (tau - t[i - k]) / (t[i - j] - t[i - k])
    w = torch.ones(2001, dtype=F64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return float((w * prod).sum() * (t[i + 1] - t[i]) / 6000)


def ref_lms(model, x, sigmas, g, order=4):
    ds = []
    for i in range(len(sigmas) - 1):
        ds = (ds + [_d(model, x, sigmas[i])])[-order:]
        cur = min(i + 1, order)
        x = x + sum(_lms_coeff(cur, sigmas, i, j) * d for j, d in zip(range(cur), reversed(ds)))
    return x


def ref_dpmpp_2s_ancestral(model, x, sigmas, g, eta=1.0):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up = _ancestral(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x + (x - denoised) / sigmas[i] * (down - sigmas[i])
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (math.exp(-s) / math.exp(-t)) * x - math.expm1(-h * 0.5) * denoised
            x = (math.exp(-t_next) / math.exp(-t)) * x - math.expm1(-h) * model(x_2, math.exp(-s))
        if sigmas[i + 1] > 0:
            x = x + torch.randn(x.shape, generator=g, dtype=x.dtype) * up
    return x


def ref_dpmpp_sde(model, x, sigmas, g, eta=1.0, r=0.5):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + (x - denoised) / sigmas[i] * (0 - sigmas[i])
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            sd, su = _ancestral(math.exp(-t), math.exp(-s), eta)
            s_ = -math.log(sd)
            x_2 = (math.exp(-s_) / math.exp(-t)) * x - math.expm1(t - s_) * denoised
            x_2 = x_2 + torch.randn(x.shape, generator=g, dtype=x.dtype) * su
            denoised_2 = model(x_2, math.exp(-s))
            sd, su = _ancestral(math.exp(-t), math.exp(-t_next), eta)
            t_next_ = -math.log(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (math.exp(-t_next_) / math.exp(-t)) * x - math.expm1(t - t_next_) * denoised_d
            x = x + torch.randn(x.shape, generator=g, dtype=x.dtype) * su
    return x


def ref_dpmpp_2m_sde(model, x, sigmas, g, eta=1.0, solver_type="midpoint"):
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = -math.log(sigmas[i + 1]) + math.log(sigmas[i])
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * math.exp(-eta_h) * x + -math.expm1(-h - eta_h) * denoised
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (-math.expm1(-h - eta_h) / (-h - eta_h) + 1) * (1 / r) * (denoised - old)
                else:
                    x = x + 0.5 * -math.expm1(-h - eta_h) * (1 / r) * (denoised - old)
            if eta:
                x = x + torch.randn(x.shape, generator=g, dtype=x.dtype) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * eta_h))
            h_last = h
        old = denoised
    return x


def ref_dpmpp_3m_sde(model, x, sigmas, g, eta=1.0, d2_weight=1.0):
    """k-diffusion's sample_dpmpp_3m_sde; d2_weight=2: d₂'s exact weight, −2φ₃."""
    d_1, d_2, h_1, h_2 = None, None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = -math.log(sigmas[i + 1]) + math.log(sigmas[i])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x + -math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - d2_weight * (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - d_1) / (h_1 / h)
            if eta:
                x = x + torch.randn(x.shape, generator=g, dtype=x.dtype) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * h * eta))
        d_1, d_2, h_1, h_2 = denoised, d_1, h, h_1
    return x


REFERENCES = {
    "euler_ancestral": (ref_euler_ancestral, {}), "dpm_2": (ref_dpm_2, {}), "dpm_2_ancestral": (ref_dpm_2_ancestral, {}),
    "lms": (ref_lms, {}), "dpmpp_2s_ancestral": (ref_dpmpp_2s_ancestral, {}), "dpmpp_sde": (ref_dpmpp_sde, {"brownian": False}),
    "dpmpp_2m_sde": (ref_dpmpp_2m_sde, {}),
    "dpmpp_2m_sde-heun": (ref_dpmpp_2m_sde, {"solver_type": "heun"}), "dpmpp_3m_sde": (ref_dpmpp_3m_sde, {}),
    "dpmpp_3m_sde-exact": (functools.partial(ref_dpmpp_3m_sde, d2_weight=2.0), {"variant": "exact"}),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_each_solver_equals_k_diffusions_formula_on_the_ve_schedule(problem, name):
    """s = 1 (VE): our solver in x̂ is k-diffusion's, draw for draw from one generator, to float64 round-off. The
    denoiser is that of Gaussian data, D = (c²x̂ + σ²μ)/(c² + σ²), smooth at every σ: the final D of a finite data set
    would snap any nearby x̂ to the same point and hide a difference in the steps before it."""
    _, _, noise = problem
    mu, c2 = torch.tensor([0.3, -0.2, 0.1], dtype=F64), 0.25
    den = lambda x, sigma, labels=None: (c2 * x + sigma.reshape(-1, 1) ** 2 * mu) / (c2 + sigma.reshape(-1, 1) ** 2)  # noqa: E731
    solver, options = name.split("-")[0], REFERENCES[name][1]
    sched = edm.schedules.VE()
    t = sched.time_steps(12)
    sigmas = sched.sigma(t).tolist()
    model = lambda x, s: den(x, torch.full((x.shape[0],), s, dtype=F64))  # noqa: E731
    ours = edm.sample(den, noise, sched, t_steps=t, solver=solver, generator=torch.Generator().manual_seed(5), **options)
    ref_options = {k: v for k, v in options.items() if k not in ("brownian", "variant")}  # fresh draws on both sides
    reference = REFERENCES[name][0](model, sigmas[0] * noise, sigmas, torch.Generator().manual_seed(5), **ref_options)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", CONTINUOUS_SCHEDULES)
@pytest.mark.parametrize("solver, options, band", [
    ("dpm_2", {}, (1.8, 2.4)),
    ("dpmpp_2m_sde", {"eta": 0.0}, (1.8, 2.5)),  # η = 0: DPM-Solver++(2M)
    # Orders 4 and 3 in theory; the first steps run at orders 1..3 and the grid is pre-asymptotic at 16-128 steps.
    ("lms", {}, (2.8, 4.3)),
    ("dpmpp_3m_sde", {"eta": 0.0, "variant": "exact"}, (2.2, 3.3)),
])
def test_orders_of_the_deterministic_solvers(problem, reference, name, solver, options, band):
    slope, errors = measured_order(problem, reference, name, solver, **options)
    assert band[0] < slope < band[1], (errors, slope)


def test_dpmpp_3m_sde_is_third_order_with_the_exact_weight():
    """On D(x̂; σ) = sin λ (λ = −ln σ), where dx̂/dλ = sin λ − x̂ has the solution (sin λ − cos λ)/2 + C e^{−λ},
    the error of DPM-Solver++(3M) (η = 0) on λ-uniform grids falls as N⁻³ with variant="exact", and as N⁻² with
    k-diffusion's d₂ weight (the default)."""
    sched = edm.schedules.get("edm")
    den = lambda x, sigma, labels=None: torch.sin(-sigma.log()).reshape(-1, 1).expand_as(x)  # noqa: E731
    particular = lambda lam: (math.sin(lam) - math.cos(lam)) / 2  # noqa: E731
    for variant, band in (("exact", (2.7, 3.3)), ("k_diffusion", (1.7, 2.2))):
        errors = []
        for n in (64, 128, 256):
            t = sched.time_steps(n, "log_snr", dtype=F64)
            _, traj = edm.sample(den, torch.ones(1, 1, dtype=F64) / t[0], sched, t_steps=t, solver="dpmpp_3m_sde",
                                 eta=0.0, variant=variant, return_trajectory=True)
            lam_0, lam = -math.log(t[0]), -math.log(t[-2])
            exact = particular(lam) + (1.0 - particular(lam_0)) * math.exp(lam_0 - lam)
            errors.append(abs(traj[-2].item() - exact))
        orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
        assert all(band[0] < p < band[1] for p in orders), (variant, errors, orders)


def test_lms_coefficients_integrate_polynomials_exactly():
    """Σ_j c_ij p(σ_{i−j}) = ∫ p dσ over [σ_i, σ_{i+1}] for every polynomial of degree < order."""
    from edm.core.samplers import lms_coefficients

    sigmas = [80.0, 30.0, 9.0, 2.5, 0.7, 0.1]
    for order in (1, 2, 3, 4):
        c = lms_coefficients(sigmas, 4, order)
        for degree in range(order):
            exact = (sigmas[5] ** (degree + 1) - sigmas[4] ** (degree + 1)) / (degree + 1)
            assert sum(cj * sigmas[4 - j] ** degree for j, cj in enumerate(c)) == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError, match="lms: order must be a positive integer"):
        edm.sample(lambda x, s, c=None: x, torch.zeros(1, 2), "edm", num_steps=3, solver="lms", order=0)


@pytest.mark.parametrize("name", CONTINUOUS_SCHEDULES)
@pytest.mark.parametrize("solver", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                                    "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_stochastic_solvers_sample_the_data(gaussian_data, name, solver):
    """From noise to the 64-point data set (σ_min 1e-3): the samples' mean and covariance are the data's within 5
    standard errors, and nearly every sample lands on a data point."""
    count = 2000
    den = edm.IdealDenoiser(gaussian_data)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(count, 2, generator=g, dtype=F64)
    options = {"epsilon_s": 1e-5} if name == "vp" else {"sigma_min": 1e-3}
    sched = edm.schedules.get(name, **options)
    x = edm.sample(den, noise, sched, num_steps=64, solver=solver, generator=g, discretization="karras")
    mean, cov = gaussian_data.mean(0), torch.cov(gaussian_data.T, correction=0)
    assert ((x.mean(0) - mean).abs() < 5 * (cov.diagonal() / count).sqrt()).all(), (x.mean(0), mean)
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / count).sqrt()
    assert ((torch.cov(x.T, correction=0) - cov).abs() < 5 * se_cov).all()
    assert (torch.cdist(x, gaussian_data).min(dim=1).values < 1e-2).double().mean() > 0.99


@pytest.mark.parametrize("name", ["ve", "vp"])
@pytest.mark.parametrize("solver", ["dpm_2_ancestral", "dpmpp_2s_ancestral"])
def test_an_ancestral_step_whose_sigma_down_is_zero_is_x_equals_D_plus_its_noise(name, solver):
    """η > 1 makes σ_up = σ_{i+1}, σ_down = 0 on every step with σ_{i+1}/σ_i ≤ sqrt(1 − 1/η²) (η = 3: all of a
    12-step grid). Such a step ends at x̂ = D(x̂; σ_i) (the Euler step to σ_down = 0, as k-diffusion's), then takes
    its noise σ_{i+1}·n: one evaluation a step and none at σ = 0, where a second DPM-Solver-2 stage divides 0 by 0
    and DPM-Solver++(2S)'s midpoint would call the network at σ = 0 (c_noise = ln 0)."""
    mu, c2 = torch.tensor([0.3, -0.2, 0.1], dtype=F64), 0.25
    levels = []

    def den(x, sigma, labels=None):
        levels.append(float(sigma.min()))
        return (c2 * x + sigma.reshape(-1, 1) ** 2 * mu) / (c2 + sigma.reshape(-1, 1) ** 2)

    eta, sched = 3.0, edm.schedules.get(name)
    t = sched.time_steps(12)
    sigmas, scales = sched.sigma(t), sched.scale(t)
    assert (sigmas[1:] / sigmas[:-1] <= (1 - 1 / eta**2) ** 0.5).all()
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    ours = edm.sample(den, noise, sched, t_steps=t, solver=solver, eta=eta, generator=torch.Generator().manual_seed(5))
    assert min(levels) > 0 and len(levels) == 12, levels
    g = torch.Generator().manual_seed(5)
    x_hat = sigmas[0] * noise
    for i in range(12):
        x_hat = den(x_hat, sigmas[i].expand(4))
        if i < 11:
            x_hat = x_hat + sigmas[i + 1] * torch.randn(x_hat.shape, generator=g, dtype=F64)
    torch.testing.assert_close(ours, scales[-1] * x_hat, rtol=1e-12, atol=1e-12)


def test_dpmpp_2s_ancestral_with_eta_above_one_equals_k_diffusions_formula():
    """η = 1.5 on EDM's grid (s = 1): the steps with σ_{i+1}/σ_i ≤ sqrt(5)/3 end at σ_down = 0 (k-diffusion's Euler branch), the
    others are DPM-Solver++(2S) steps to σ_down > 0: draw for draw k-diffusion's sample_dpmpp_2s_ancestral, with its
    evaluations (none at σ = 0; this denoiser's D(x̂; 0) = x̂ would hide one in the result)."""
    mu, c2 = torch.tensor([0.3, -0.2, 0.1], dtype=F64), 0.25
    levels = []

    def den(x, sigma, labels=None):
        levels.append(float(sigma.min()))
        return (c2 * x + sigma.reshape(-1, 1) ** 2 * mu) / (c2 + sigma.reshape(-1, 1) ** 2)

    model = lambda x, s: den(x, torch.full((x.shape[0],), s, dtype=F64))  # noqa: E731
    sched = edm.schedules.EDM()
    t = sched.time_steps(24)
    sigmas = sched.sigma(t).tolist()
    ratios = [b / a for a, b in zip(sigmas[:-2], sigmas[1:-1])]
    assert min(ratios) <= 5**0.5 / 3 < max(ratios)  # both branches are taken
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    ours = edm.sample(den, noise, sched, t_steps=t, solver="dpmpp_2s_ancestral", eta=1.5,
                      generator=torch.Generator().manual_seed(5))
    assert min(levels) > 0 and len(levels) == 24 + sum(r > 5**0.5 / 3 for r in ratios), levels
    reference = ref_dpmpp_2s_ancestral(model, sigmas[0] * noise, sigmas, torch.Generator().manual_seed(5), eta=1.5)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
