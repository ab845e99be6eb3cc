"""Samplers checked against the math, with the exact (ideal) denoiser of a small data set.

The probability-flow ODE is one ODE in x̂ = x/s whatever the schedule: dx̂/dσ = (x̂ − D(x̂; σ))/σ.
The reference below integrates it with classical RK4 in u = ln σ, independently of edm.samplers.
"""

import math

import pytest
import torch

import edm
from edm.core.samplers import SamplerConfig
from edm.core.schedules import EDM

from conftest import CONTINUOUS_SCHEDULES

F64 = torch.float64
SIGMA_MAX, SIGMA_END = 80.0, 0.5  # order tests stop where trajectories are still smooth (before they collapse onto points)


def make_problem():
    """(the ideal denoiser of 8 points in 3-D, the points, 8 noise vectors): the ODE problem of these tests."""
    g = torch.Generator().manual_seed(1)
    data = torch.randn(8, 3, generator=g, dtype=F64)
    noise = torch.randn(8, 3, generator=g, dtype=F64)
    return edm.IdealDenoiser(data), data, noise


def rk4_reference(den, x_hat, sigma_from, sigma_to, steps=200):
    """x̂(σ_to) from x̂(σ_from) by RK4 on dx̂/du = x̂ − D(x̂; e^u), u = ln σ."""
    f = lambda x, u: x - den(x, torch.exp(u).expand(x.shape[0]))  # noqa: E731
    us = torch.linspace(math.log(sigma_from), math.log(sigma_to), steps + 1, dtype=F64)
    for a, b in zip(us[:-1], us[1:]):
        h = b - a
        k1 = f(x_hat, a)
        k2 = f(x_hat + h / 2 * k1, a + h / 2)
        k3 = f(x_hat + h / 2 * k2, a + h / 2)
        k4 = f(x_hat + h * k3, b)
        x_hat = x_hat + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x_hat


def grid_for(sched, num_steps, sigma_min=SIGMA_END, sigma_max=SIGMA_MAX):
    """The same ρ = 7 σ grid expressed in each schedule's own time t, ending with t = 0."""
    sigma = edm.schedules.karras_sigma(EDM(sigma_min=sigma_min, sigma_max=sigma_max), num_steps)
    return torch.cat([sched.sigma_inv(sigma), torch.zeros(1, dtype=F64)])


def measured_order(problem, reference, name, solver, steps=(16, 32, 64, 128), **options) -> tuple[float, list[float]]:
    """(slope of −log(error) against log(steps), the errors) at the last nonzero time over `steps`."""
    errors = [error_at_last_nonzero_time(problem, reference, name, solver, n, **options) for n in steps]
    x, y = torch.tensor(steps, dtype=F64).log(), torch.tensor(errors, dtype=F64).log()
    return float(-((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()), errors


def error_at_last_nonzero_time(problem, reference, name, solver, num_steps, **options):
    den, _, noise = problem
    sched = edm.schedules.get(name)
    t = grid_for(sched, num_steps)
    _, traj = edm.sample(den, noise, sched, t_steps=t, solver=solver, return_trajectory=True, **options)
    x_hat = traj[-2] / sched.scale(t[-2])
    return (x_hat - reference).norm().item() / reference.norm().item()


@pytest.mark.parametrize("name", CONTINUOUS_SCHEDULES)
@pytest.mark.parametrize("solver, tol", [("euler", 0.03), ("heun", 4e-4), ("dpmpp_2m", 4e-4), ("stochastic", 4e-4)])
def test_ode_solvers_converge_to_reference(problem, reference, name, solver, tol):
    assert error_at_last_nonzero_time(problem, reference, name, solver, 512) < tol


@pytest.mark.parametrize("name", CONTINUOUS_SCHEDULES)
@pytest.mark.parametrize("solver, band", [("euler", (0.85, 1.25)), ("heun", (1.8, 2.4)), ("dpmpp_2m", (1.8, 2.5))])
def test_order_of_convergence(problem, reference, name, solver, band):
    """Slope of log(error) against log(steps) as steps double: ≈ 1 for Euler, ≈ 2 for Heun and DPM-Solver++(2M)."""
    slope, errors = measured_order(problem, reference, name, solver)
    assert band[0] < slope < band[1], (errors, slope)


def test_all_schedules_reach_the_same_endpoint(problem):
    """VP, VE, EDM and FM started from the same noise at the same σ_max solve one ODE in x̂."""
    den, data, noise = problem
    sigma_min = 1e-3
    ends, mids = {}, {}
    for name in CONTINUOUS_SCHEDULES:
        sched = edm.schedules.get(name)
        t = grid_for(sched, 512, sigma_min=sigma_min)
        x, traj = edm.sample(den, noise, sched, t_steps=t, solver="heun", return_trajectory=True)
        ends[name] = x
        mids[name] = traj[256] / sched.scale(t[256])  # x̂ at the same σ on every grid
        denoised = edm.sample(den, noise, sched, t_steps=t, solver="heun", final_denoise=True)
        nearest = data[torch.cdist(denoised, data).argmin(dim=1)]
        torch.testing.assert_close(denoised, nearest, rtol=0, atol=1e-9)
        ends[name + "+denoise"] = denoised
    for name in CONTINUOUS_SCHEDULES[1:]:
        torch.testing.assert_close(mids[name], mids["edm"], rtol=0, atol=3e-3)
        torch.testing.assert_close(ends[name + "+denoise"], ends["vp+denoise"], rtol=0, atol=1e-9)
    # EDM and FM (σ linear in t near 0) land exactly; VP and VE keep a residual of order σ_min.
    for name in CONTINUOUS_SCHEDULES:
        residual = (ends[name] - ends["edm+denoise"]).abs().max().item()
        assert residual < (1e-9 if name in ("edm", "fm") else 10 * sigma_min), (name, residual)


def test_heun_on_iddpms_own_levels_solves_the_ode_to_second_order(problem):
    """The iddpm schedule's grid (N of its levels u_j, evenly spaced in j from u_8 = 80.2) is a grid of the same ODE
    in σ = t: Heun from σ_max reaches RK4's x̂ at the first level below 0.5, its error falling ≥ 8× per 4× steps."""
    den, _, noise = problem
    sched = edm.schedules.IDDPM()
    errors = []
    for num_steps in (62, 248):  # (991 / 61, 991 / 247): levels at j = 8 + 16.25 i and 8 + 4.01 i
        t = sched.time_steps(num_steps)
        k = int((t[:-1] < SIGMA_END).nonzero()[0])
        reference = rk4_reference(den, float(t[0]) * noise, float(t[0]), float(t[k]), steps=400)
        _, traj = edm.sample(den, noise, sched, t_steps=t, solver="heun", return_trajectory=True)
        errors.append(((traj[k] - reference).norm() / reference.norm()).item())
    assert errors[1] < errors[0] / 8 and errors[1] < 1e-3, errors


def test_churn_on_iddpm_rounds_the_raised_noise_level_to_one_of_its_levels():
    """EDM Algorithm 2 on the iddpm schedule: t̂ = the level nearest (1 + γ)σ, and x gains noise up to σ(t̂)."""
    sched = edm.schedules.IDDPM()
    u = sched.levels()
    x = torch.zeros(20000, 1, dtype=F64)
    x_hat, t_hat = edm.core.samplers.churn_noise(x, u[500], sched, 0.3, 1.0, torch.Generator().manual_seed(0))
    assert float(t_hat) == float(u[(u - 1.3 * u[500]).abs().argmin()]) and float(t_hat) != float(1.3 * u[500])
    expected_std = math.sqrt(float(t_hat) ** 2 - float(u[500]) ** 2)
    assert abs(x_hat.std().item() / expected_std - 1) < 5 / math.sqrt(2 * 20000)


def make_gaussian_data():
    """64 points drawn from a correlated 2-D Gaussian: the data set of the SDE tests."""
    g = torch.Generator().manual_seed(3)
    chol = torch.tensor([[1.0, 0.0], [0.6, 0.5]], dtype=F64)
    return torch.tensor([1.0, -2.0], dtype=F64) + torch.randn(64, 2, generator=g, dtype=F64) @ chol.T


@pytest.mark.parametrize("name", CONTINUOUS_SCHEDULES)
@pytest.mark.parametrize("solver, options", [("euler_maruyama", {}), ("stochastic", {"churn": 30.0})])
def test_sde_samples_match_data_statistics(gaussian_data, name, solver, options):
    count = 3000
    den = edm.IdealDenoiser(gaussian_data)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(count, 2, generator=g, dtype=F64)
    small_sigma_min = {"epsilon_s": 1e-5} if name == "vp" else {"sigma_min": 1e-3}  # VP's σ_min follows from ε_s
    sched = edm.schedules.get(name, **small_sigma_min)  # σ_min ≈ 1e-3, so D(x̂; σ_min) picks one point
    steps = 256 if solver == "euler_maruyama" else 64
    # The ρ = 7 grid for every schedule: uniform-t grids end with a σ ratio of ~60 (VP) whose step error biases the result.
    x = edm.sample(
        den, noise, sched, num_steps=steps, solver=solver, generator=g, final_denoise=True, discretization="karras", **options
    )
    mean, cov = gaussian_data.mean(0), torch.cov(gaussian_data.T, correction=0)
    se_mean = (cov.diagonal() / count).sqrt()
    assert ((x.mean(0) - mean).abs() < 5 * se_mean).all(), (x.mean(0), mean)
    sample_cov = torch.cov(x.T, correction=0)
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / count).sqrt()
    assert ((sample_cov - cov).abs() < 5 * se_cov).all(), (sample_cov, cov)
    # Every sample is one of the data points, and the points are hit about uniformly.
    dist, idx = torch.cdist(x, gaussian_data).min(dim=1)
    assert (dist < 1e-3).double().mean() > 0.99, dist.max()
    counts = torch.bincount(idx, minlength=64).to(F64)
    chi2 = ((counts - count / 64) ** 2 / (count / 64)).sum().item()
    assert chi2 < 63 + 5 * math.sqrt(2 * 63)


@pytest.mark.parametrize("final_denoise", [False, True])
def test_stochastic_churn_is_S_churn_over_the_N_steps_to_zero(final_denoise):
    """γ = S_churn/N with N = num_steps whether the last step is the solver's or final_denoise's: the first
    evaluation is at σ̂ = (1 + γ)σ(t_0)."""
    seen = []
    den = lambda x, sigma, labels=None: (seen.append(float(sigma.reshape(-1)[0])), torch.zeros_like(x))[1]  # noqa: E731
    num_steps, churn = 8, 2.0
    sched = edm.schedules.get("edm")
    edm.sample(den, torch.randn(2, 3, dtype=F64), sched, num_steps=num_steps, solver="stochastic", churn=churn,
               final_denoise=final_denoise, generator=torch.Generator().manual_seed(0))
    assert seen[0] == pytest.approx((1 + churn / num_steps) * sched.sigma_max, rel=1e-12)


def test_stochastic_without_churn_is_heun(problem):
    den, _, noise = problem
    a = edm.sample(den, noise, "edm", num_steps=12, solver="heun")
    b = edm.sample(den, noise, "edm", num_steps=12, solver="stochastic", churn=0.0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["ve", "vp", "edm"])
def test_euler_maruyama_ends_on_the_denoised_image_without_final_denoise(problem, name):
    """Its step to t = 0 is x̂ = D(x̂; σ_{N−1}), which final_denoise=True also takes: the two agree exactly (an
    Euler–Maruyama step there would leave noise of about √3·σ_{N−1}, 0.035 under VE)."""
    den, _, noise = problem
    a, b = (edm.sample(den, noise, name, num_steps=10, solver="euler_maruyama", final_denoise=final,
                       generator=torch.Generator().manual_seed(5)) for final in (False, True))
    assert torch.equal(a, b)


@pytest.mark.parametrize("solver", ["stochastic", "euler_maruyama"])
def test_per_image_generators_make_batches_splittable(problem, solver):
    den, _, _ = problem
    seeds = range(6)
    noise = torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(s), dtype=F64) for s in seeds])
    gens = lambda ids: [torch.Generator().manual_seed(100 + s) for s in ids]  # noqa: E731
    opts = {"churn": 20.0} if solver == "stochastic" else {}
    whole = edm.sample(den, noise, "edm", num_steps=10, solver=solver, generator=gens(seeds), **opts)
    parts = [
        edm.sample(den, noise[ids], "edm", num_steps=10, solver=solver, generator=gens(ids), **opts)
        for ids in ([0, 1], [2, 3, 4, 5])
    ]
    # the same draws per image: equal to float64 round-off (BLAS may block a batch of 6 and of 2
    # differently, one ulp apart); other generators move images by O(1)
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-12)
    other = edm.sample(den, noise, "edm", num_steps=10, solver=solver, generator=gens(range(6, 12)), **opts)
    assert (other - whole).abs().max() > 1e-3


def test_trajectory_start_dtype_and_gradients(problem):
    den, _, noise = problem
    sched = edm.schedules.get("vp")
    x, traj = edm.sample(den, noise, sched, num_steps=5, solver="euler", return_trajectory=True)
    t0 = sched.time_steps(5)[0]
    assert traj.shape == (6, *noise.shape)
    torch.testing.assert_close(traj[0], sched.scale(t0) * sched.sigma(t0) * noise)
    assert torch.equal(traj[-1], x)
    assert edm.sample(den, noise.float(), sched, num_steps=3).dtype == torch.float32
    z = noise.clone().requires_grad_(True)
    edm.sample(den, z, "edm", num_steps=4).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_class_labels_reach_the_denoiser():
    data = torch.tensor([[-5.0, 0.0], [-4.0, 1.0], [5.0, 0.0], [4.0, 1.0]], dtype=F64)
    den = edm.IdealDenoiser(data, labels=torch.tensor([0, 0, 1, 1]))
    noise = torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    labels = torch.tensor([0, 1] * 10)
    x = edm.sample(den, noise, "edm", num_steps=32, class_labels=labels)
    assert ((x[:, 0] < 0) == (labels == 0)).all()


def test_progress_bar_counts_the_steps_and_changes_nothing(problem, monkeypatch, capsys):
    den, _, noise = problem
    bars = []

    class Recorder:
        def __init__(self, total, desc, unit, **kwargs):
            self.total, self.desc, self.ticks, self.closed = total, desc, 0, False
            bars.append(self)

        def update(self, n):
            self.ticks += n

        def close(self):
            self.closed = True

    with_bar = edm.sample(den, noise, "edm", num_steps=3, progress=True)
    assert "sampling" in capsys.readouterr().err  # the real bar, on stderr
    monkeypatch.setattr(edm.samplers, "progress_bar", Recorder)
    for final_denoise in (False, True):
        edm.sample(den, noise, "edm", num_steps=3, progress=True, final_denoise=final_denoise)
    assert [(b.total, b.ticks, b.closed) for b in bars] == [(3, 3, True), (3, 3, True)]  # one tick per step
    assert torch.equal(with_bar, edm.sample(den, noise, "edm", num_steps=3))


def test_clear_errors(problem):
    den, _, noise = problem
    with pytest.raises(ValueError, match="solver 'rk45' is not valid; choose one of: euler, heun, stochastic, euler_maruyama, dpmpp_2m"):
        edm.sample(den, noise, "edm", solver="rk45")
    with pytest.raises(ValueError, match="strictly decrease"):
        edm.sample(den, noise, "edm", t_steps=[1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="end with t_N = 0"):
        edm.sample(den, noise, "edm", t_steps=[2.0, 1.0])
    with pytest.raises(ValueError, match="outside the fm schedule's range"):
        edm.sample(den, noise, "fm", t_steps=[1.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="class_labels has batch 3, noise has batch 8"):
        edm.sample(den, noise, "edm", class_labels=torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        edm.sample(den, noise * float("nan"), "edm")
    with pytest.raises(ValueError, match=r"solver 'heun' does not take option\(s\) \['churn'\]"):
        edm.sample(den, noise, "edm", solver="heun", churn=1.0)
    with pytest.raises(ValueError, match=r"solver 'stochastic': churn=-40 must be a number ≥ 0"):
        edm.sample(den, noise, "edm", solver="stochastic", churn=-40)  # γ < 0 would be no churn at all
    with pytest.raises(ValueError, match=r"solver 'euler_ancestral': eta=-1.0, s_noise=-1 must be a number ≥ 0"):
        edm.sample(den, noise, "edm", solver="euler_ancestral", eta=-1.0, s_noise=-1)
    with pytest.raises(ValueError, match=r"s_tmin=2.0 > s_tmax=1.0 leaves no σ where churn applies"):
        edm.sample(den, noise, "edm", solver="stochastic", churn=40, s_tmin=2.0, s_tmax=1.0)
    with pytest.raises(ValueError, match="schedule .* is not valid"):
        edm.sample(den, noise, "cosine")


DENOISER_SOLVERS = [name for name in edm.samplers.SOLVERS
                    if name not in edm.samplers.CONSISTENCY_SOLVERS + edm.samplers.MEANFLOW_SOLVERS]


@pytest.mark.parametrize("solver", DENOISER_SOLVERS)
def test_every_solver_samples_a_batch_as_its_parts_with_class_labels_and_per_image_seeds(problem, solver):
    """Each image's result depends on its noise, label and generator only, for every solver (dpm_adaptive's steps
    included): a batch of 6 equals its parts [0, 1] and [2..5] to float64 round-off, and the labels reach D."""
    den, _, _ = problem
    noise = torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(s), dtype=F64) for s in range(6)])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 0, 1, 0]), 2).to(F64)
    labelled = lambda x, sigma, c: den(x, sigma) + 0.3 * (c[:, :1] - c[:, 1:])  # noqa: E731
    gens = lambda ids: [torch.Generator().manual_seed(100 + s) for s in ids]  # noqa: E731
    options = {"eta": 1.0} if solver == "dpm_fast" else {}
    run = lambda ids, c: edm.sample(labelled, noise[ids], "edm", num_steps=8, solver=solver, class_labels=c[ids],  # noqa: E731
                                    generator=gens(ids), **options)
    whole = run(list(range(6)), labels)
    torch.testing.assert_close(torch.cat([run([0, 1], labels), run([2, 3, 4, 5], labels)]), whole, rtol=0, atol=1e-10)
    assert (run(list(range(6)), labels.flip(1)) - whole).abs().max() > 1e-3


# Options under which a solver's host reads are counted: stochastic's churn on part of the grid; dpmpp_sde's noise
# from independent draws, as its Brownian tree (brownian=true) is a host-side search that reads each step's σ.
HOST_READ_OPTIONS = {"stochastic": {"churn": 10.0, "s_tmin": 0.1}, "dpmpp_sde": {"brownian": False}}


@pytest.mark.parametrize("solver", DENOISER_SOLVERS)
def test_solvers_read_nothing_back_per_step(solver, host_reads):
    """On a GPU every float(t), bool(t), t.item() or t.tolist() waits for the device. Every
    solver reads the time grid to the host once, so its number of reads does not grow with
    the number of steps."""
    reads, options = host_reads, HOST_READ_OPTIONS.get(solver, {})

    def count(num_steps: int) -> int:
        t_steps = EDM().time_steps(num_steps, dtype=torch.float64)
        x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        reads.clear()
        edm.samplers.SOLVERS[solver](lambda x_hat, sigma, labels=None: 0.5 * x_hat, x, t_steps, EDM(),
                                     generator=torch.Generator().manual_seed(1), **options)
        return len(reads)

    few, many = count(4), count(32)
    assert few == many, (solver, few, many)


def test_sampler_config_is_checked_when_made_and_gives_the_sample_keywords():
    with pytest.raises(ValueError, match="solver 'rk45' is not valid"):
        SamplerConfig("rk45")
    with pytest.raises(ValueError, match="num_steps"):
        SamplerConfig("heun", 0)
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['churn'\]"):
        SamplerConfig("heun", 18, options={"churn": 1.0})
    with pytest.raises(ValueError, match="discretization 'cosine' is not valid"):
        SamplerConfig("heun", 18, discretization="cosine")
    config = SamplerConfig("stochastic", 5, "karras", True, {"churn": 10.0})
    assert config.kwargs() == dict(solver="stochastic", num_steps=5, discretization="karras", final_denoise=True, churn=10.0)


def test_the_sampler_config_defaults_are_edm_sample_defaults():
    """Training grids, edm-sample and edm.sample sample alike when nothing is set: one set of defaults."""
    import inspect

    parameters = inspect.signature(edm.sample).parameters
    assert {key: parameters[key].default for key in SamplerConfig().kwargs()} == SamplerConfig().kwargs()


def test_the_evaluation_count_of_settings_counts_a_guided_evaluation_twice():
    """Heun's 4 steps evaluate D 2N − 1 = 7 times; guided everywhere, 14; guided only for σ ≤ 1e-4, below the
    grid's σ_min = 0.002, 7 again."""
    heun = SamplerConfig("heun", 4)
    assert heun.evaluations_per_image(EDM(), guidance=2.0) == 14
    assert heun.evaluations_per_image(EDM(), guidance=2.0, interval=(0.0, 1e-4)) == 7


@pytest.mark.parametrize("solver, options, nfe", [("heun", {}, 7), ("euler", {}, 4), ("stochastic", {"churn": 40}, 7),
                                                  ("euler_ancestral", {}, 4)])
def test_the_evaluation_count_of_settings_leaves_the_global_random_state_alone(solver, options, nfe):
    """SamplerConfig.evaluations_per_image runs the solver on a stand-in (Heun: 2N − 1 with its step to 0 an Euler
    one): a stochastic solver draws from its own generator, so edm-sample's check before work changes no draw."""
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert SamplerConfig(solver, 4, options=options).evaluations_per_image(EDM()) == nfe
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("solver", ["consistency", "meanflow"])
def test_final_denoise_is_refused_with_the_few_step_samplers_whose_last_step_is_the_model_output(solver):
    """final_denoise makes the last step x = D(x̂; σ_{N−1}): for the consistency sampler that is its own last step (the
    flag did nothing, yet reports recorded it), for MeanFlow's it drops σ_r (no MeanFlow step). Both are refused where
    settings are checked, naming why and the option to change."""
    reason = {"consistency": r"changes nothing: a consistency step already ends at the model's output f\(x̂; σ_\{N−1\}\)",
              "meanflow": r"would replace its last jump D\(x̂; σ_\{N−1\}, σ_r = 0\) by the denoiser at r = t"}[solver]
    message = rf"^sampler.final_denoise=true with solver {solver} {reason}.*: set sampler.final_denoise=false$"
    with pytest.raises(ValueError, match=message):
        SamplerConfig(solver, 2, final_denoise=True)
    with pytest.raises(ValueError, match=message):
        edm.sample(lambda x, sigma, labels=None, **kw: x, torch.zeros(1, 1), "fm", num_steps=2, solver=solver,
                   final_denoise=True)
    assert SamplerConfig(solver, 2).final_denoise is False
