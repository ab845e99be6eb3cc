"""The ideal denoiser: E[y | x̂] of a finite data set against a direct computation."""

import pytest
import torch

import edm

F64 = torch.float64


def _posterior_mean(data, x_hat, sigma):
    """Σ_k p_k y_k with p_k ∝ N(x̂; y_k, σ²I), computed directly from Gaussian densities."""
    d2 = ((x_hat[:, None, :] - data[None, :, :]) ** 2).sum(-1)  # [B, K]
    dens = torch.exp(-d2 / (2 * sigma[:, None] ** 2))
    return (dens / dens.sum(1, keepdim=True)) @ data


def test_matches_direct_posterior_mean():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(6, 4, generator=g, dtype=F64)
    x_hat = torch.randn(10, 4, generator=g, dtype=F64) * 2
    sigma = torch.linspace(0.8, 5.0, 10, dtype=F64)
    torch.testing.assert_close(edm.IdealDenoiser(data)(x_hat, sigma), _posterior_mean(data, x_hat, sigma))


def test_stable_at_tiny_and_huge_sigma():
    g = torch.Generator().manual_seed(1)
    data = torch.randn(5, 2, 3, 3, generator=g, dtype=F64)
    den = edm.IdealDenoiser(data)
    x_hat = data[[3]] + 1e-4 * torch.randn(1, 2, 3, 3, generator=g, dtype=F64)
    torch.testing.assert_close(den(x_hat, 1e-3), data[[3]])  # naive exp(−d²/2σ²) underflows to 0/0 here
    torch.testing.assert_close(den(x_hat * 1e6, 1e9), data.mean(0, keepdim=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(den(x_hat, 0.0), data[[3]])


def test_class_conditional_posterior():
    data = torch.tensor([[0.0], [1.0], [10.0], [11.0]], dtype=F64)
    den = edm.IdealDenoiser(data, labels=torch.tensor([0, 0, 1, 1]))
    x = torch.tensor([[0.2], [0.2]], dtype=F64)
    sigma = torch.tensor([5.0, 5.0], dtype=F64)
    out = den(x, sigma, torch.tensor([0, 1]))
    expected = [_posterior_mean(data[:2], x[:1], sigma[:1]), _posterior_mean(data[2:], x[1:], sigma[1:])]
    torch.testing.assert_close(out, torch.cat(expected))
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 1]), 2).to(F64)
    torch.testing.assert_close(den(x, sigma, one_hot), out)


def test_batching_in_chunks_changes_nothing():
    g = torch.Generator().manual_seed(2)
    data = torch.randn(7, 3, generator=g, dtype=F64)
    x = torch.randn(9, 3, generator=g, dtype=F64)
    torch.testing.assert_close(edm.IdealDenoiser(data, chunk_size=2)(x, 0.7), edm.IdealDenoiser(data)(x, 0.7))


def test_bad_input():
    with pytest.raises(ValueError, match="NaN or Inf"):
        edm.IdealDenoiser(torch.tensor([[float("nan")]]))
    den = edm.IdealDenoiser(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="x_hat items have shape"):
        den(torch.zeros(4, 3), 1.0)
    with pytest.raises(ValueError, match="without `labels`"):
        den(torch.zeros(4, 2), 1.0, torch.zeros(4))
