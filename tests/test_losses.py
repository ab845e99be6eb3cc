"""The training loss: σ densities, weights, the unit-weight network target, gradients."""

import math

import pytest
import torch

import edm

F64 = torch.float64


@pytest.mark.parametrize("name", edm.schedules.SCHEDULES)
def test_ideal_denoiser_of_one_point_gives_zero_loss(name):
    y = torch.randn(1, 3, 4, 4, dtype=F64)
    loss = edm.Loss(edm.schedules.get(name))
    batch = y.expand(64, -1, -1, -1)
    value = loss(edm.IdealDenoiser(y), batch, generator=torch.Generator().manual_seed(0))
    assert value.shape == (64,)
    assert value.abs().max() < 1e-18


class TinyNet(torch.nn.Module):
    def __init__(self, channels=2):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = torch.nn.Linear(1, channels)

    def forward(self, x, c_noise, class_labels=None):
        return self.conv(x) + self.emb(c_noise[:, None].to(x.dtype))[:, :, None, None]


@pytest.mark.parametrize("precond_kind", edm.precond.PRECOND_KINDS)
@pytest.mark.parametrize("kind", edm.losses.LOSS_KINDS)
def test_any_loss_on_any_precond_weights_the_network_target_by_target_weight(kind, precond_kind):
    """λ‖D − y‖² = λ c_out² ‖F(c_in x̂; c_noise) − (y − c_skip x̂)/c_out‖² for every pair of kinds (λ c_out² = 1 on
    the schedule's own: the next test)."""
    torch.manual_seed(0)
    net = TinyNet().double()
    den = edm.Precond(net, kind=precond_kind)
    y = torch.randn(6, 2, 5, 5, dtype=F64)
    n = torch.randn_like(y)
    sigma = torch.tensor([0.003, 0.05, 0.4, 1.0, 9.0, 70.0], dtype=F64)
    value = edm.Loss(edm.schedules.get("edm"), kind=kind, learned_weighting=False)(den, y, sigma=sigma, noise=n)
    x_hat = y + sigma.view(-1, 1, 1, 1) * n
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in den.coefficients(sigma))
    error = (net(c_in * x_hat, c_noise.flatten()) - (y - c_skip * x_hat) / c_out).pow(2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(value, edm.losses.target_weight(sigma, kind, precond_kind) * error, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", edm.precond.PRECOND_KINDS)
def test_target_weight_is_one_on_the_schedules_own_preconditioning_and_not_on_another_rows(kind):
    """λ c_out² = 1 within a row of Table 1; EDM's λ on VP's c_out = −σ is (σ² + σ_d²)/σ_d² instead."""
    sigma = torch.logspace(-3, 2, 50, dtype=F64)
    torch.testing.assert_close(edm.losses.target_weight(sigma, kind, kind), torch.ones_like(sigma))
    torch.testing.assert_close(edm.losses.target_weight(sigma, "edm", "vp"), (sigma**2 + 0.25) / 0.25)


def test_gradients_flow_to_the_network():
    torch.manual_seed(0)
    net = TinyNet()
    den = edm.Precond(net, kind="edm")
    y = torch.randn(8, 2, 6, 6)
    edm.Loss(edm.schedules.get("edm"))(den, y).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def _sigmas(kind, count=40000, **kw):
    loss = edm.Loss(edm.schedules.get(kind), **kw)
    return loss.sample_sigma(count, generator=torch.Generator().manual_seed(1), dtype=F64)


def _assert_uniform(u, lo, hi, count):
    """Mean and variance of U(lo, hi) within 5 standard errors."""
    assert u.min() >= lo and u.max() <= hi
    mean, var = (lo + hi) / 2, (hi - lo) ** 2 / 12
    assert abs(u.mean().item() - mean) < 5 * math.sqrt(var / count)
    assert abs(u.var().item() - var) < 5 * var * math.sqrt(0.8 / count)  # Var of s² for a uniform: 0.8 σ⁴/n


def test_edm_sigma_is_log_normal():
    log_sigma = _sigmas("edm").log()
    se = 1.2 / math.sqrt(len(log_sigma))
    assert abs(log_sigma.mean().item() + 1.2) < 5 * se
    assert abs(log_sigma.std().item() - 1.2) < 5 * 1.2 / math.sqrt(2 * len(log_sigma))


def test_ve_sigma_is_log_uniform():
    _assert_uniform(_sigmas("ve").log(), math.log(0.02), math.log(100.0), 40000)


def test_vp_t_is_uniform():
    _assert_uniform(edm.schedules.VP().sigma_inv(_sigmas("vp")), 1e-5, 1.0, 40000)


def test_fm_t_is_uniform_or_logit_normal():
    _assert_uniform(edm.schedules.FlowMatching().sigma_inv(_sigmas("fm")), 0.0, 1.0, 40000)
    t = edm.schedules.FlowMatching().sigma_inv(_sigmas("fm", t_dist="logit_normal", logit_mean=0.5))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 5 / math.sqrt(40000)
    assert abs(logit.std().item() - 1.0) < 5 / math.sqrt(2 * 40000)


def test_iddpm_sigma_is_a_level_of_uniform_index_below_M():
    """σ = u_j with j ~ U{0, ..., M − 1}: every draw is a level (never u_M = 0); j has mean (M − 1)/2 and variance
    (M² − 1)/12 within 5 standard errors, and its own schedule's levels are used."""
    count, M = 40000, 1000
    sigma = _sigmas("iddpm", count)
    levels = edm.schedules.IDDPM().levels()
    j = (sigma[:, None] - levels).abs().argmin(1).to(F64)
    torch.testing.assert_close(sigma, levels[j.long()], rtol=0, atol=0)
    assert j.max() <= M - 1 and sigma.min() > 0
    mean, var = (M - 1) / 2, (M**2 - 1) / 12
    assert abs(j.mean().item() - mean) < 5 * math.sqrt(var / count)
    assert abs(j.var().item() - var) < 5 * var * math.sqrt(0.8 / count)
    small = edm.Loss(edm.schedules.IDDPM(M=20)).sample_sigma(400, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert set(small.tolist()) == set(edm.schedules.IDDPM(M=20).levels()[:20].tolist())


def test_loss_kind_can_differ_from_schedule_and_bad_kind_fails():
    loss = edm.Loss(edm.schedules.get("vp"), kind="edm")
    assert loss.kind == "edm"
    with pytest.raises(ValueError, match="loss kind 'l1' is not valid; choose one of: vp, ve, edm, fm, trigflow, edm2, iddpm"):
        edm.Loss(edm.schedules.get("vp"), kind="l1")
    with pytest.raises(ValueError, match="t_dist '.*' is not valid; choose one of: uniform, logit_normal"):
        edm.Loss(edm.schedules.get("fm"), t_dist="beta")


def test_generator_makes_the_loss_reproducible():
    torch.manual_seed(0)
    den = edm.Precond(TinyNet(), kind="edm")
    y = torch.randn(4, 2, 4, 4)
    loss = edm.Loss(edm.schedules.get("edm"))
    a = loss(den, y, generator=torch.Generator().manual_seed(5))
    b = loss(den, y, generator=torch.Generator().manual_seed(5))
    c = loss(den, y, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
