"""DPM-Solver's singlestep solvers in our σ(t), s(t) view: dpm_fast and dpm_adaptive equal k-diffusion's (s = 1, VE
schedule), each DPM-Solver-k step has local error O(h^{k+1}), the adaptive one meets its tolerance, counts its
evaluations per image and gives each image the same result in any batch.

The references restate crowsonkb/k-diffusion's k_diffusion/sampling.py (DPMSolver.dpm_solver_{1,2,3}_step,
dpm_solver_fast, dpm_solver_adaptive and PIDStepSizeController; commit of 2024) line by line, with t = −ln σ."""

import math

import pytest
import torch

import edm
from edm.core.samplers import _dpm_solver_step

from test_samplers import SIGMA_END, SIGMA_MAX, make_gaussian_data, rk4_reference

F64 = torch.float64


class _KDiffusionDPMSolver:
    """k-diffusion's DPMSolver over model(x, σ) in float64, counting its evaluations."""

    def __init__(self, model):
        self.model, self.nfe = model, 0

    def eps(self, cache, key, x, t):
        if key not in cache:
            self.nfe += 1
            cache[key] = (x - self.model(x, math.exp(-t))) / math.exp(-t)
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        return x - math.exp(-t_next) * math.expm1(h) * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t_next, cache, r1=0.5):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - math.exp(-s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - math.exp(-t_next) * math.expm1(h) * eps - math.exp(-t_next) / (2 * r1) * math.expm1(h) * (eps_r1 - eps)

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - math.exp(-s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - math.exp(-s2) * math.expm1(r2 * h) * eps
              - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return x - math.exp(-t_next) * math.expm1(h) * eps - math.exp(-t_next) / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)

    def fast(self, x, t_start, t_end, nfe):
        m = math.floor(nfe / 3) + 1
        ts = torch.linspace(t_start, t_end, m + 1, dtype=F64).tolist()
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        for i, order in enumerate(orders):
            x = [self.step_1, self.step_2, self.step_3][order - 1](x, ts[i], ts[i + 1], {})
        return x

    def adaptive(self, x, t_start, t_end, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0,
                 dcoeff=0.0, accept_safety=0.81):
        b1, b2, b3 = (pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order
        s, x_prev, h, errs, rejects = t_start, x, h_init, [], 0
        while s < t_end - 1e-5:
            cache = {}
            t = min(t_end, s + h)
            if order == 2:
                x_low, x_high = self.step_1(x, s, t, cache), self.step_2(x, s, t, cache)
            else:
                x_low, x_high = self.step_2(x, s, t, cache, r1=1 / 3), self.step_3(x, s, t, cache)
            delta = torch.maximum(torch.tensor(atol, dtype=F64), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            inv_error = 1 / (float(error) + 1e-8)
            if not errs:
                errs = [inv_error] * 3
            errs[0] = inv_error
            factor = 1 + math.atan(errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3 - 1)
            if factor >= accept_safety:
                errs[2], errs[1] = errs[1], errs[0]
                x_prev, x, s = x_low, x_high, t
            else:
                rejects += 1
            h *= factor
        return x, rejects


def _model(den):
    return lambda x, s: den(x, torch.full((x.shape[0],), s, dtype=F64))


def test_dpm_fast_equals_k_diffusions_on_its_log_snr_grid(problem):
    """On k-diffusion's grid (uniform in λ, m = NFE/3 + 1 steps, orders 3, ..., 3, 2, 1) our dpm_fast ends where
    k-diffusion's does; the final denoising step is D at σ_min."""
    den, _, noise = problem
    sched = edm.schedules.VE()
    for nfe in (6, 12, 21):
        m = nfe // 3 + 1
        sigmas = torch.exp(-torch.linspace(-math.log(SIGMA_MAX), -math.log(0.002), m + 1, dtype=F64))
        t = torch.cat([sched.sigma_inv(sigmas), torch.zeros(1, dtype=F64)])
        _, traj = edm.sample(den, noise, sched, t_steps=t, solver="dpm_fast", final_denoise=True, return_trajectory=True)
        kd = _KDiffusionDPMSolver(_model(den))
        reference = kd.fast(SIGMA_MAX * noise, -math.log(SIGMA_MAX), -math.log(0.002), nfe)
        assert kd.nfe == nfe
        torch.testing.assert_close(traj[-2], reference, rtol=1e-9, atol=1e-9)  # x̂(σ_min), before the final D
        torch.testing.assert_close(traj[-1], den(reference, torch.full((8,), 0.002, dtype=F64)), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_equals_k_diffusions_per_image_and_saves_the_rejected_steps_evaluation(problem, order):
    """Each image alone, k-diffusion's dpm_adaptive (its error norm over that image); ours on the whole batch takes
    every image's own steps: the same x̂(σ_min), and evaluations = k-diffusion's − its rejected steps (a rejected
    step's ε(x̂) is reused), + 1 for the final denoising step."""
    den, _, noise = problem
    sched = edm.schedules.VE()
    t = sched.sigma_inv(torch.tensor([SIGMA_MAX, 0.002, 0.0], dtype=F64)).nan_to_num(0.0)
    items = []
    counted = lambda x, s, c=None: items.append(x.shape[0]) or den(x, s)  # noqa: E731
    _, traj = edm.sample(counted, noise, sched, t_steps=t, solver="dpm_adaptive", order=order, rtol=0.01, atol=1e-4,
                         final_denoise=True, return_trajectory=True)
    expected = 0
    for k in range(noise.shape[0]):
        kd = _KDiffusionDPMSolver(_model(den))
        x, rejects = kd.adaptive(SIGMA_MAX * noise[k:k + 1], -math.log(SIGMA_MAX), -math.log(0.002), order=order,
                                 rtol=0.01, atol=1e-4)
        torch.testing.assert_close(traj[-2, k:k + 1], x, rtol=1e-9, atol=1e-9)  # x̂(σ_min), before the final D
        expected += kd.nfe - rejects + 1
    assert sum(items) == expected
    assert expected > 4 * noise.shape[0]  # several steps per image


def test_dpm_adaptive_meets_tighter_tolerances_with_more_evaluations(problem):
    """Against an RK4 solution at σ = 0.5: the error falls with rtol, the NFE per image grows."""
    den, _, noise = problem
    reference = rk4_reference(den, SIGMA_MAX * noise, SIGMA_MAX, SIGMA_END)
    sched = edm.schedules.get("edm")
    t = torch.cat([sched.sigma_inv(torch.tensor([SIGMA_MAX, SIGMA_END], dtype=F64)), torch.zeros(1, dtype=F64)])
    errors, evaluations = [], []
    for rtol in (1e-1, 1e-2, 1e-3, 1e-4):
        items = []
        counted = lambda x, s, c=None: items.append(x.shape[0]) or den(x, s)  # noqa: E731
        _, traj = edm.sample(counted, noise, sched, t_steps=t, solver="dpm_adaptive", rtol=rtol, atol=rtol * 1e-2,
                             return_trajectory=True)
        errors.append((traj[-2] - reference).norm().item() / reference.norm().item())
        evaluations.append(sum(items) / noise.shape[0])
        assert errors[-1] < 10 * rtol  # rtol bounds each step's error; the global error stays within 10× of it
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert all(a < b for a, b in zip(evaluations, evaluations[1:])), evaluations


@pytest.mark.parametrize("name", ["vp", "edm", "fm"])
def test_dpm_adaptive_lands_on_the_grids_stops_for_every_schedule(problem, name):
    """The grid's points are stops: a 5-point grid reaches each of them (one trajectory frame per stop) and ends at
    the RK4 solution within the tolerance's error, on every schedule."""
    den, _, noise = problem
    sched = edm.schedules.get(name)
    reference = rk4_reference(den, SIGMA_MAX * noise, SIGMA_MAX, SIGMA_END)
    sigmas = torch.tensor([SIGMA_MAX, 20.0, 5.0, 1.5, SIGMA_END], dtype=F64)
    t = torch.cat([sched.sigma_inv(sigmas), torch.zeros(1, dtype=F64)])
    x, traj = edm.sample(den, noise, sched, t_steps=t, solver="dpm_adaptive", rtol=1e-4, atol=1e-6,
                         return_trajectory=True)
    assert traj.shape[0] == len(t)
    assert (traj[-2] / sched.scale(t[-2]) - reference).norm() / reference.norm() < 1e-3


@pytest.mark.parametrize("order, band", [(1, (1.8, 2.2)), (2, (2.8, 3.3)), (3, (3.7, 4.4))])
def test_each_dpm_solver_step_has_local_error_of_order_k_plus_1(problem, order, band):
    """One DPM-Solver-k step of h in λ from σ = 2 against RK4: the error falls as h^{k+1}."""
    den, _, noise = problem
    x0 = rk4_reference(den, SIGMA_MAX * noise, SIGMA_MAX, 2.0)
    eps_at = lambda x, s: (x - den(x, s.expand(x.shape[0]))) / s  # noqa: E731
    hs, errors = [0.4, 0.2, 0.1, 0.05], []
    for h in hs:
        sigma, sigma_next = torch.tensor(2.0, dtype=F64), torch.tensor(2.0 * math.exp(-h), dtype=F64)
        step, _ = _dpm_solver_step(eps_at, x0, eps_at(x0, sigma), sigma, sigma_next, order)
        exact = rk4_reference(den, x0, 2.0, 2.0 * math.exp(-h), steps=400)
        errors.append((step - exact).norm().item())
    x, y = torch.tensor(hs, dtype=F64).log(), torch.tensor(errors, dtype=F64).log()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    assert band[0] < slope.item() < band[1], (errors, slope.item())


def test_dpm_fast_with_eta_samples_the_data():
    """Ancestral dpm_fast (η = 1) from noise to the 64-point data set: mean and covariance within 5 standard errors."""
    data = make_gaussian_data()
    count = 2000
    g = torch.Generator().manual_seed(12)
    noise = torch.randn(count, 2, generator=g, dtype=F64)
    sched = edm.schedules.get("edm", sigma_min=1e-3)
    x = edm.sample(edm.IdealDenoiser(data), noise, sched, num_steps=24, solver="dpm_fast", eta=1.0, generator=g)
    mean, cov = data.mean(0), torch.cov(data.T, correction=0)
    assert ((x.mean(0) - mean).abs() < 5 * (cov.diagonal() / count).sqrt()).all(), (x.mean(0), mean)
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / count).sqrt()
    assert ((torch.cov(x.T, correction=0) - cov).abs() < 5 * se_cov).all()


def test_bad_options_name_the_solver_and_the_allowed_values():
    den = lambda x, s, c=None: x  # noqa: E731
    with pytest.raises(ValueError, match=r"dpm_adaptive: order must be one of \[2, 3\]"):
        edm.sample(den, torch.zeros(1, 2), "edm", num_steps=2, solver="dpm_adaptive", order=1)
    with pytest.raises(ValueError, match="dpm_adaptive: rtol, atol and h_init must be positive"):
        edm.sample(den, torch.zeros(1, 2), "edm", num_steps=2, solver="dpm_adaptive", rtol=0.0)
    with pytest.raises(ValueError, match=r"dpm_fast: order must be one of \[1, 2, 3\]"):
        edm.sample(den, torch.zeros(1, 2), "edm", num_steps=4, solver="dpm_fast", order=4)
