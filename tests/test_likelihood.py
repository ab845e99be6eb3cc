"""Likelihood by the probability-flow ODE, checked against a Gaussian data set where everything is closed form.

For data y ~ N(μ, Σ) the ideal denoiser is D(x̂; σ) = μ + Σ(Σ + σ²I)⁻¹(x̂ − μ) and the marginal
of x̂ = y + σn is N(μ, Σ + σ²I), so log p_σmin(y) is known exactly (torch.distributions).
"""

import math

import pytest
import torch

import edm
from edm.core.likelihood import bits_per_dim, bpd_from_log_likelihood, dequantize, gaussian_log_prob, likelihood_grid, log_likelihood

from conftest import CONTINUOUS_SCHEDULES

F64 = torch.float64


class GaussianDenoiser(torch.nn.Module):
    """E[y | x̂] for y ~ N(μ, Σ): μ + Q diag(λ/(λ + σ²)) Qᵀ (x̂ − μ) with Σ = Q diag(λ) Qᵀ."""

    def __init__(self, mu: torch.Tensor, cov: torch.Tensor) -> None:
        super().__init__()
        self.mu, self.cov = mu, cov
        self.lam, self.q = torch.linalg.eigh(cov)

    def forward(self, x_hat, sigma, class_labels=None):
        shape = x_hat.shape
        z = (x_hat.reshape(shape[0], -1) - self.mu) @ self.q
        gain = self.lam / (self.lam + sigma.reshape(-1, 1) ** 2)
        return (self.mu + (gain * z) @ self.q.T).reshape(shape)

    def log_marginal(self, x_hat, sigma):
        """log N(x̂; μ, Σ + σ²I), the exact density of the noisy data."""
        cov = self.cov + sigma**2 * torch.eye(len(self.mu), dtype=self.cov.dtype)
        return torch.distributions.MultivariateNormal(self.mu, cov).log_prob(x_hat.reshape(x_hat.shape[0], -1))


def gaussian_problem(dim=3, n=4, diagonal=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if diagonal:
        cov = torch.diag(torch.rand(dim, generator=g, dtype=F64) + 0.2)
    else:
        a = torch.randn(dim, dim, generator=g, dtype=F64) * 0.5
        cov = a @ a.T + 0.1 * torch.eye(dim, dtype=F64)
    mu = 0.3 * torch.randn(dim, generator=g, dtype=F64)
    y = mu + torch.randn(n, dim, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
    return GaussianDenoiser(mu, cov), y


def exact_prior(den, schedule, grid):
    """log density of the true marginal at σ(T): removes the prior mismatch, leaving only ODE error."""
    sigma_T = schedule.sigma(grid[-1])
    return lambda x_hat_T: den.log_marginal(x_hat_T, sigma_T)


@pytest.mark.parametrize("name", CONTINUOUS_SCHEDULES)
def test_exact_divergence_matches_gaussian_log_density(name):
    den, y = gaussian_problem()
    schedule = edm.schedules.get(name)
    grid = likelihood_grid(schedule, 96)
    result = log_likelihood(den, y, schedule, t_steps=grid, divergence_method="exact", prior_logp=exact_prior(den, schedule, grid))
    expected = den.log_marginal(y, schedule.sigma(grid[0]))
    torch.testing.assert_close(result.logp, expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(result.logp, result.prior_logp + result.delta_logp)


@pytest.mark.parametrize("name", CONTINUOUS_SCHEDULES)
def test_default_gaussian_prior_is_close_for_a_large_sigma_max(name):
    """π = N(0, σ_T² I) differs from N(μ, Σ + σ_T² I) by O(‖Σ‖/σ_T²): small, but not zero."""
    den, y = gaussian_problem()
    schedule = edm.schedules.get(name)
    result = log_likelihood(den, y, schedule, num_steps=64, divergence_method="exact")
    expected = den.log_marginal(y, schedule.sigma(likelihood_grid(schedule, 64)[0]))
    torch.testing.assert_close(result.logp, expected, rtol=0, atol=1e-2)


def test_rk4_and_heun_converge_at_their_orders():
    den, y = gaussian_problem()
    schedule = edm.schedules.get("edm")
    expected = den.log_marginal(y, schedule.sigma_min)

    def error(integrator, steps):
        grid = likelihood_grid(schedule, steps)
        r = log_likelihood(den, y, schedule, t_steps=grid, integrator=integrator, divergence_method="exact",
                           prior_logp=exact_prior(den, schedule, grid))
        return float((r.logp - expected).abs().max())

    assert error("heun", 64) < error("heun", 32) / 3  # second order: ~4x per doubling
    assert error("rk4", 32) < error("rk4", 16) / 10  # fourth order: ~16x per doubling
    assert error("rk4", 32) < error("heun", 32) / 10


def test_hutchinson_rademacher_is_exact_for_a_diagonal_jacobian():
    """With Σ diagonal the drift's Jacobian is diagonal and εᵀAε = tr A for ε ∈ {±1}^D."""
    den, y = gaussian_problem(dim=4, diagonal=True)
    g = torch.Generator().manual_seed(3)
    exact = log_likelihood(den, y, "edm", num_steps=24, divergence_method="exact")
    hutch = log_likelihood(den, y, "edm", num_steps=24, divergence_method="hutchinson", generator=g)
    torch.testing.assert_close(hutch.logp, exact.logp, rtol=0, atol=1e-10)


def test_hutchinson_gaussian_probes_are_unbiased():
    den, y = gaussian_problem(dim=3, n=1)
    reps = 2000
    g = torch.Generator().manual_seed(4)
    exact = log_likelihood(den, y, "vp", num_steps=6, divergence_method="exact").logp
    est = log_likelihood(den, y.expand(reps, -1).clone(), "vp", num_steps=6, divergence_method="hutchinson",
                         hutchinson_noise="gaussian", generator=g).logp
    stderr = est.std() / math.sqrt(reps)
    assert est.std() > 1e-3  # it is an estimate, not the exact value
    assert abs(float(est.mean() - exact)) < 4 * float(stderr)


def test_auto_divergence_uses_exact_below_the_threshold():
    den, y = gaussian_problem(dim=3)
    g = torch.Generator().manual_seed(0)
    exact = log_likelihood(den, y, "fm", num_steps=8, divergence_method="exact").logp
    auto_small = log_likelihood(den, y, "fm", num_steps=8, exact_max_dim=3).logp
    auto_hutch = log_likelihood(den, y, "fm", num_steps=8, exact_max_dim=2, hutchinson_noise="gaussian", generator=g).logp
    torch.testing.assert_close(auto_small, exact)
    assert not torch.allclose(auto_hutch, exact)


def test_gaussian_log_prob_matches_torch_distributions():
    x = torch.randn(3, 2, 2, dtype=F64)
    expected = torch.distributions.Normal(0.0, 1.7).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, 1.7), expected)


def test_uniform_density_on_the_bins_scores_exactly_eight_bits():
    """p_x uniform on [−1 − 1/255, 1 + 1/255]^D (the 256 bins of width 1/127.5) is 8 bits/dim."""
    dim = 12
    logp = torch.tensor([dim * math.log(127.5 / 256)], dtype=F64)
    torch.testing.assert_close(bpd_from_log_likelihood(logp, dim), torch.tensor([8.0], dtype=F64))
    # A variational q(u|k) with density 2 on half of each bin recovers the bits it concentrated.
    torch.testing.assert_close(bpd_from_log_likelihood(logp + dim * math.log(2), dim, log_q=dim * math.log(2)), torch.tensor([8.0], dtype=F64))


def test_dequantize_maps_bin_centres_to_the_eight_bit_grid():
    k = torch.tensor([[0, 128, 255]], dtype=torch.uint8)
    torch.testing.assert_close(dequantize(k, dequantization="center"), k.double() / 127.5 - 1)
    g = torch.Generator().manual_seed(0)
    x = dequantize(k.expand(1000, 3), generator=g)
    offset = (x - (k.double() / 127.5 - 1)) * 127.5  # = u − ½
    assert offset.min() >= -0.5 and offset.max() < 0.5 and abs(float(offset.mean())) < 0.05
    with pytest.raises(ValueError, match="dequantization"):
        dequantize(k, dequantization="gaussian")


def test_bits_per_dim_of_a_gaussian_model_matches_the_closed_form():
    den, _ = gaussian_problem(dim=3, n=1)
    den.mu = den.mu * 0 + 0.1
    images = torch.tensor([[10, 128, 250], [0, 60, 255]], dtype=torch.uint8)
    u = torch.tensor([[0.2, 0.5, 0.9], [0.1, 0.3, 0.7]], dtype=F64)
    schedule = edm.schedules.get("edm")
    grid = likelihood_grid(schedule, 96)
    bpd = bits_per_dim(den, images, schedule, dequant_noise=u, dtype=F64, t_steps=grid, divergence_method="exact",
                       prior_logp=exact_prior(den, schedule, grid))
    x = (images.double() + u - 0.5) / 127.5 - 1
    logp = den.log_marginal(x, schedule.sigma(grid[0]))
    expected = -(logp - 3 * math.log(127.5)) / (3 * math.log(2))
    torch.testing.assert_close(bpd, expected, rtol=0, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    den, y = gaussian_problem()
    with pytest.raises(ValueError, match="integrator"):
        log_likelihood(den, y, "edm", integrator="euler")
    with pytest.raises(ValueError, match="divergence"):
        log_likelihood(den, y, "edm", divergence_method="trace")
    with pytest.raises(ValueError, match="increasing"):
        log_likelihood(den, y, "edm", t_steps=[1.0, 0.5])
    with pytest.raises(ValueError, match="8-bit"):
        bits_per_dim(den, y * 1000, "edm")


def test_edm_eval_bpd_equals_the_library(tmp_path):
    """edm-eval metric=bpd on a tiny checkpoint: same number as bits_per_dim with the same seed."""
    import json
    import subprocess

    import numpy as np

    from conftest import command

    from edm.models import checkpoint
    from edm.models.loading import load_model

    spec = {"network": {"name": "tiny", "img_resolution": 8, "in_channels": 1, "out_channels": 1, "label_dim": 0,
                        "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1},
            "precond": {"kind": "vp", "sigma_data": 0.5}}
    torch.manual_seed(0)
    weights = checkpoint.build_denoiser(spec).state_dict()
    checkpoint.save_checkpoint(tmp_path / "ckpt.pt", {"denoiser": spec, "schedule": {"name": "vp"}, "ema": weights,
                                                      "model": weights, "config": {}})
    images = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "test.npz", images=images)
    cmd = [command("edm-eval"), "metric=bpd", f"checkpoint={tmp_path / 'ckpt.pt'}", f"data={tmp_path / 'test.npz'}",
           "metric.num_steps=2", "metric.divergence_method=hutchinson", "metric.seed=5", "cpu=true",
           f"report={tmp_path / 'r.json'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "bits/dim:" in proc.stderr and "/2 [" in proc.stderr  # the images counted on a bar (progress=true, default)
    reported = json.loads((tmp_path / "r.json").read_text())["metrics"]["bpd"]
    denoiser, info = load_model(tmp_path / "ckpt.pt")
    k = torch.from_numpy(images).permute(0, 3, 1, 2)
    expected = bits_per_dim(denoiser, k, info.schedule, generator=torch.Generator().manual_seed(5), num_steps=2,
                            divergence_method="hutchinson")
    assert reported["bpd"] == pytest.approx(float(expected.double().mean()), rel=1e-5)
    assert reported["bpd_num_images"] == 2 and reported["bpd_settings"]["schedule"]["name"] == "vp"
    weights = {k: v.fill_(float("nan")) if k.endswith("bias") else v for k, v in weights.items()}  # a damaged model
    checkpoint.save_checkpoint(tmp_path / "nan.pt", {"denoiser": spec, "schedule": {"name": "vp"}, "ema": weights,
                                                     "model": weights, "config": {}})
    proc = subprocess.run([*cmd[:2], f"checkpoint={tmp_path / 'nan.pt'}", *cmd[3:-1], "progress=false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and "bits/dim is NaN or Inf for 2 of 2 images" in proc.stderr, proc.stderr
    assert "bits/dim:" not in proc.stderr
