"""UniPC and DEIS in our σ(t), s(t) view: equal to diffusers' schedulers' formulas (s = 1, on the VE schedule), their
orders of convergence on every schedule, and their coefficient functions exact on polynomials.

The references restate huggingface/diffusers' UniPCMultistepScheduler (predict_x0, multistep_uni_p_bh_update,
multistep_uni_c_bh_update, step) and DEISMultistepScheduler (deis_first_order_update and the log-ρ second and
third order updates with their closed-form ind_fn integrals, step), release of 2025, with α = 1 and ρ = σ, in float64
python numbers; σ = 0 ends with x = D (the limit of their formulas there)."""

import math

import numpy as np
import pytest
import torch

import edm
from edm.core.samplers import deis_coefficients, unipc_coefficients

from conftest import CONTINUOUS_SCHEDULES
from test_samplers import measured_order

F64 = torch.float64


def _unipc_step_update(outputs, lambdas, x, lam_t, order, variant, model_t=None):
    """diffusers' multistep_uni_p_bh_update (model_t None) or multistep_uni_c_bh_update, predict_x0, α = 1."""
    m0, lam_s0 = outputs[-1], lambdas[-1]
    h = lam_t - lam_s0
    rks, D1s = [], []
    for i in range(1, order):
        rk = (lambdas[-(i + 1)] - lam_s0) / h
        rks.append(rk)
        D1s.append((outputs[-(i + 1)] - m0) / rk)
    rks.append(1.0)
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    B_h = hh if variant == "bh1" else math.expm1(hh)
    R, b = [], []
    for i in range(1, order + 1):
        R.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    R, b = np.array(R), np.array(b)
    x_t_ = math.exp(-lam_t) / math.exp(-lam_s0) * x - h_phi_1 * m0
    if model_t is None:
        if not D1s:
            return x_t_
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return x_t_ - B_h * sum(r * d for r, d in zip(rhos, D1s))
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
    corr = sum(r * d for r, d in zip(rhos[:-1], D1s)) if D1s else 0
    return x_t_ - B_h * (corr + rhos[-1] * (model_t - m0))


def ref_unipc(model, x, sigmas, order=2, variant="bh2", corrector=True, lower_order_final=True):
    """diffusers' UniPCMultistepScheduler.step over the σ's (last σ = 0); the sample after each step."""
    outputs, lambdas, last_sample, this_order, lower_order_nums, frames = [], [], None, None, 0, []
    n = len(sigmas) - 1
    for k in range(n):
        m = model(x, sigmas[k])
        if corrector and k > 0 and last_sample is not None:
            x = _unipc_step_update(outputs, lambdas, last_sample, -math.log(sigmas[k]), this_order, variant, model_t=m)
        outputs, lambdas = (outputs + [m])[-order:], (lambdas + [-math.log(sigmas[k])])[-order:]
        this_order = min(order, n - k) if lower_order_final else order
        this_order = min(this_order, lower_order_nums + 1)
        last_sample = x
        x = m if sigmas[k + 1] == 0 else _unipc_step_update(outputs, lambdas, x, -math.log(sigmas[k + 1]), this_order, variant)
        lower_order_nums = min(lower_order_nums + 1, order)
        frames.append(x)
    return torch.stack(frames)


def _ind_2(t, b, c):
    if t == 0:
        return 0.0  # the limit of t (ln t)^k at t = 0
    return t * (-math.log(c) + math.log(t) - 1) / (math.log(b) - math.log(c))


def _ind_3(t, b, c, d):
    if t == 0:
        return 0.0
    numerator = t * (math.log(c) * (math.log(d) - math.log(t) + 1) - math.log(d) * math.log(t) + math.log(d)
                     + math.log(t) ** 2 - 2 * math.log(t) + 2)
    return numerator / ((math.log(b) - math.log(c)) * (math.log(b) - math.log(d)))


def ref_deis(model, x, sigmas, order=2, lower_order_final=True):
    """diffusers' DEISMultistepScheduler.step over the σ's (last σ = 0, reached by order 1: x = D); the sample after
    each step."""
    eps_list, lower_order_nums, frames = [], 0, []
    n = len(sigmas) - 1
    for k in range(n):
        eps_list = (eps_list + [(x - model(x, sigmas[k])) / sigmas[k]])[-order:]
        final = k == n - 1 and lower_order_final and n < 15
        second = k == n - 2 and lower_order_final and n < 15
        rho_t, rho = sigmas[k + 1], sigmas[k - 2:k + 1][::-1]
        if order == 1 or lower_order_nums < 1 or final:
            x = x - (sigmas[k] - rho_t) * eps_list[-1]  # α = 1: x − σ_t (e^h − 1) ε = x + (σ_t − σ_s) ε
        elif order == 2 or lower_order_nums < 2 or second:
            s0, s1 = sigmas[k], sigmas[k - 1]
            c1 = _ind_2(rho_t, s0, s1) - _ind_2(s0, s0, s1)
            c2 = _ind_2(rho_t, s1, s0) - _ind_2(s0, s1, s0)
            x = x + c1 * eps_list[-1] + c2 * eps_list[-2]
        else:
            s0, s1, s2 = rho
            c1 = _ind_3(rho_t, s0, s1, s2) - _ind_3(s0, s0, s1, s2)
            c2 = _ind_3(rho_t, s1, s2, s0) - _ind_3(s0, s1, s2, s0)
            c3 = _ind_3(rho_t, s2, s0, s1) - _ind_3(s0, s2, s0, s1)
            x = x + c1 * eps_list[-1] + c2 * eps_list[-2] + c3 * eps_list[-3]
        lower_order_nums = min(lower_order_nums + 1, order)
        frames.append(x)
    return torch.stack(frames)


CASES = {
    "unipc-1": ("unipc", ref_unipc, {"order": 1}), "unipc-2": ("unipc", ref_unipc, {"order": 2}),
    "unipc-3": ("unipc", ref_unipc, {"order": 3}), "unipc-2-bh1": ("unipc", ref_unipc, {"order": 2, "variant": "bh1"}),
    "unipc-3-bh1-no-corrector": ("unipc", ref_unipc, {"order": 3, "variant": "bh1", "corrector": False}),
    "unipc-2-full-order-final": ("unipc", ref_unipc, {"order": 2, "lower_order_final": False}),
    "deis-1": ("deis", ref_deis, {"order": 1}), "deis-2": ("deis", ref_deis, {"order": 2}),
    "deis-3": ("deis", ref_deis, {"order": 3}), "deis-3-full-order-final": ("deis", ref_deis, {"order": 3, "lower_order_final": False}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("num_steps", [6, 20])
def test_each_solver_equals_diffusers_formula_on_the_ve_schedule(problem, case, num_steps):
    """s = 1 (VE): our solver in x̂ is diffusers' scheduler with α = 1, after every step, to float64 round-off
    (6 steps: the lowered final orders; 20: none for DEIS, which diffusers lowers only under 15 steps)."""
    den, _, noise = problem
    solver, ref, options = CASES[case]
    sched = edm.schedules.VE()
    t = sched.time_steps(num_steps)
    sigmas = sched.sigma(t).tolist()
    model = lambda x, s: den(x, torch.full((x.shape[0],), s, dtype=F64))  # noqa: E731
    _, traj = edm.sample(den, noise, sched, t_steps=t, solver=solver, return_trajectory=True, **options)
    torch.testing.assert_close(traj[1:], ref(model, sigmas[0] * noise, sigmas, **options), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", CONTINUOUS_SCHEDULES)
@pytest.mark.parametrize("solver, options, band", [
    ("deis", {"order": 1}, (0.9, 1.2)),  # DDIM
    ("deis", {"order": 2}, (1.9, 2.4)),
    ("deis", {"order": 3}, (2.5, 3.4)),  # pre-asymptotic at 16-128 steps, as lms
    ("unipc", {"order": 1, "lower_order_final": False}, (1.9, 2.3)),  # UniPC-p: order p + 1
    ("unipc", {"order": 2, "lower_order_final": False}, (2.6, 3.4)),
    ("unipc", {"order": 2, "corrector": False, "lower_order_final": False}, (1.9, 2.4)),  # UniP-p alone: order p
])
def test_orders_of_unipc_and_deis(problem, reference, name, solver, options, band):
    slope, errors = measured_order(problem, reference, name, solver, **options)
    assert band[0] < slope < band[1], (errors, slope)


def test_deis_coefficients_integrate_polynomials_in_log_sigma_exactly():
    """Σ_j c_ij p(ln σ_{i−j}) = ∫ p(ln σ) dσ over [σ_i, σ_{i+1}] (σ_{i+1} = 0 included) for deg p < order,
    against Gauss–Legendre quadrature in u = ln σ with weight e^u."""
    sigmas = [80.0, 30.0, 9.0, 2.5, 0.7, 0.1, 0.0]
    nodes, weights = np.polynomial.legendre.leggauss(60)
    for i in (3, 5):
        lo = math.log(sigmas[i + 1]) if sigmas[i + 1] > 0 else math.log(sigmas[i]) - 60.0
        hi = math.log(sigmas[i])
        u = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)
        for order in (1, 2, 3):
            c = deis_coefficients(sigmas, i, order)
            for degree in range(order):
                exact = -0.5 * (hi - lo) * float((weights * u**degree * np.exp(u)).sum())
                got = sum(cj * math.log(sigmas[i - j]) ** degree for j, cj in enumerate(c))
                assert got == pytest.approx(exact, rel=1e-10, abs=1e-12)


def test_unipc_coefficients_match_the_taylor_conditions():
    """ρ solves Σ_m ρ_m r_m^{k−1} = b_k; B(h)·ρ does not depend on the variant (bh1, bh2) once solved."""
    rks, h = [-0.8, -1.7, 1.0], 0.3
    B1, rho1 = unipc_coefficients(rks, h, "bh1")
    B2, rho2 = unipc_coefficients(rks, h, "bh2")
    assert B1 == pytest.approx(-h) and B2 == pytest.approx(math.expm1(-h))
    np.testing.assert_allclose(B1 * np.array(rho1), B2 * np.array(rho2), rtol=1e-12)
    R = np.vander(np.array(rks), 3, increasing=True).T
    phi = [math.expm1(-h) / -h - 1]
    for k in (2, 3):
        phi.append(phi[-1] / -h - 1 / math.factorial(k))
    b = [phi[k] * math.factorial(k + 1) / B1 for k in range(3)]
    np.testing.assert_allclose(R @ np.array(rho1), b, rtol=1e-12)


def test_unipc_bh2_predictor_alone_is_dpm_solver_pp_2m(problem):
    """UniP-2 with B(h) = expm1(−h) and ρ = ½ is DPM-Solver++(2M), step for step, on every schedule."""
    den, _, noise = problem
    for name in CONTINUOUS_SCHEDULES:
        ours = edm.sample(den, noise, name, num_steps=12, solver="unipc", corrector=False, lower_order_final=False)
        torch.testing.assert_close(ours, edm.sample(den, noise, name, num_steps=12, solver="dpmpp_2m"), rtol=1e-10, atol=1e-10)


def test_bad_options_name_the_solver():
    den = lambda x, s, c=None: x  # noqa: E731
    with pytest.raises(ValueError, match=r"unipc: order must be one of \[1, 2, 3\]"):
        edm.sample(den, torch.zeros(1, 2), "edm", num_steps=4, solver="unipc", order=4)
    with pytest.raises(ValueError, match="unipc: variant must be 'bh1' or 'bh2'"):
        edm.sample(den, torch.zeros(1, 2), "edm", num_steps=4, solver="unipc", variant="bh3")
    with pytest.raises(ValueError, match=r"deis: order must be one of \[1, 2, 3\]"):
        edm.sample(den, torch.zeros(1, 2), "edm", num_steps=4, solver="deis", order=True)
