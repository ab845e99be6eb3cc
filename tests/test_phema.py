"""edm/training/phema.py: power-function EMAs and post-hoc EMA against their closed forms (EDM2 appendix C)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from edm.training.phema import SIGMA_REL_MAX, PowerEMA, exp_to_std, list_snapshots, posthoc_coefficients, profile_inner, profile_residual, std_to_exp

from conftest import power_run


def test_sigma_rel_and_exponent_are_inverse_and_sigma_rel_max_is_the_peak():
    stds = np.array([0.001, 0.01, 0.05, 0.1, 0.15, 0.25, 0.3])
    np.testing.assert_allclose(exp_to_std(std_to_exp(stds)), stds, rtol=1e-12)
    grid = np.linspace(-0.999, 50, 200001)
    assert SIGMA_REL_MAX * (1 - 1e-7) <= exp_to_std(grid).max() <= SIGMA_REL_MAX
    for bad in (0.0, -0.1, SIGMA_REL_MAX, 0.5, float("nan"), [0.1, float("nan")]):  # NaN lies in no interval
        with pytest.raises(ValueError, match="σ_rel must lie in"):
            std_to_exp(bad)


@pytest.mark.parametrize("batch", [1, 64])
def test_tracking_with_power_beta_gives_the_exact_discrete_profile(batch):
    """With β_k = (1 − Δt/t_k)^(γ+1) at t_k = kΔt, the EMA of θ_1..θ_N weighs θ_k by
    ∫_{(k−1)Δt}^{kΔt} p_t(τ) dτ = (k^(γ+1) − (k−1)^(γ+1)) / N^(γ+1): feed basis vectors and read the weights."""
    n, std = 300, 0.1
    gamma = float(std_to_exp(std))
    net = torch.nn.Linear(n, 1, bias=False).double()
    ema = PowerEMA(net, [std])
    for k in range(1, n + 1):
        with torch.no_grad():
            net.weight.zero_()
            net.weight[0, k - 1] = 1.0
        ema.update(net, k * batch, batch)
    k = np.arange(1, n + 1, dtype=np.float64)
    expected = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / n ** (gamma + 1)
    np.testing.assert_allclose(ema.emas[0].weight[0].numpy(), expected, rtol=1e-10, atol=1e-15)
    tau = (k - 0.5) / n  # and its standard deviation relative to t (= 1 here) is σ_rel, up to the discretization
    mean = (expected * tau).sum()
    assert np.sqrt((expected * (tau - mean) ** 2).sum()) == pytest.approx(std, rel=1e-3)


def test_a_half_life_ema_in_its_ramp_up_is_the_power_function_ema_of_gamma_ln2_over_the_ratio_minus_one():
    """While h = r·t (ema_rampup_ratio r), β = 0.5^(Δt/(r t)) ≈ (1 − Δt/t)^(ln 2 / r): EDM's half-life EMA is then the
    power-function profile with γ + 1 = ln 2 / r, σ_rel = exp_to_std(ln 2 / r − 1) (0.063 for r = 0.05), not the
    exponential profile of its final half-life (std h/ln 2 = r t/ln 2, 0.072 t), which it never reaches."""
    from edm.training.ema import ema_beta

    n, batch, ratio = 1500, 64, 0.05
    weights = np.zeros(n)  # of θ_k, the weights after step k, held on ((k − 1)Δt, kΔt]
    for k in range(n):
        beta = ema_beta(k * batch, batch, halflife_kimg=500.0, rampup_ratio=ratio)  # β of step k + 1, at cur_nimg = kΔt
        weights *= beta
        weights[k] = 1 - beta
    tau = (np.arange(n) + 0.5) / n
    mean = (weights * tau).sum()
    std = np.sqrt((weights * (tau - mean) ** 2).sum())
    assert std == pytest.approx(exp_to_std(np.log(2) / ratio - 1), rel=2e-3)
    assert std < 0.9 * ratio / np.log(2)


def test_profile_inner_product_equals_quadrature():
    rng = np.random.default_rng(0)
    for _ in range(5):
        (t_a, t_b), (s_a, s_b) = rng.uniform(0.2, 1.0, 2), rng.uniform(0.03, 0.25, 2)
        g_a, g_b = std_to_exp(s_a), std_to_exp(s_b)
        tau = np.linspace(0, min(t_a, t_b), 2_000_001)
        p = (g_a + 1) * tau**g_a / t_a ** (g_a + 1) * (g_b + 1) * tau**g_b / t_b ** (g_b + 1)
        quad = np.sum((p[1:] + p[:-1]) / 2 * np.diff(tau))
        assert profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(quad, rel=1e-6)


def test_reconstructing_an_input_profile_is_exact_up_to_the_conditioning():
    """The wanted profile is one of the snapshots': the least-squares weights are its unit vector."""
    in_t = np.repeat(np.arange(1, 9) * 1e5, 2)
    in_std = np.tile([0.05, 0.10], 8)
    A = profile_inner(in_t[:, None], std_to_exp(in_std)[:, None], in_t[None, :], std_to_exp(in_std)[None, :])
    bound = 10 * np.finfo(np.float64).eps * np.linalg.cond(A)
    for k in (3, 10, 15):
        x = posthoc_coefficients(in_t, in_std, in_t[k], in_std[k])[:, 0]
        assert np.abs(x - np.eye(len(in_t))[k]).max() <= bound
        assert profile_residual(in_t, in_std, in_t[k], in_std[k], x[:, None])[0] <= np.sqrt(bound)


def test_a_reconstructed_profile_matches_the_directly_tracked_one_within_the_fit_residual():
    """θ_rec − θ_r = ∫ (Σ x_i p_i − p_r) θ̄ dτ for the piecewise-constant path θ̄ of the training weights, so
    by Cauchy-Schwarz |θ_rec − θ_r| ≤ ‖Σ x_i p_i − p_r‖ ‖θ̄‖ per coordinate: the bound is the fit's residual."""
    steps, batch, every, dims = 2000, 64, 100, 16
    g = torch.Generator().manual_seed(0)
    path = torch.cumsum(torch.randn(steps, dims, generator=g, dtype=torch.float64), 0) / 10 + torch.linspace(0, 3, steps)[:, None]
    net = torch.nn.Linear(dims, 1, bias=False).double()
    snapshots, direct = PowerEMA(net, [0.05, 0.10]), PowerEMA(net, [0.15])
    in_t, in_std, weights = [], [], []
    for k in range(1, steps + 1):
        with torch.no_grad():
            net.weight.copy_(path[k - 1][None])
        snapshots.update(net, k * batch, batch)
        direct.update(net, k * batch, batch)
        if k % every == 0:
            for std, ema in zip(snapshots.stds, snapshots.emas):
                in_t.append(k * batch), in_std.append(std), weights.append(ema.weight[0].clone())
    t_r = steps * batch
    x = posthoc_coefficients(in_t, in_std, t_r, 0.15)
    reconstructed = sum(float(w) * theta for w, theta in zip(x[:, 0], weights))
    tracked = direct.emas[0].weight[0]
    g_r = std_to_exp(0.15)
    norm_p = np.sqrt(profile_inner(t_r, g_r, t_r, g_r))
    residual = profile_residual(in_t, in_std, t_r, 0.15, x)[0] * norm_p
    path_norm = (path.pow(2).sum(0) * batch).sqrt()  # ‖θ̄‖ over (0, t_r], each piece Δt = batch long
    error = (reconstructed - tracked).abs()
    assert torch.all(error <= residual * path_norm * (1 + 1e-6) + 1e-12)
    assert 0 < residual < 0.05 and float(error.max() / (tracked - path[0]).abs().max()) < 1e-2


# ----------------------------------------------------------------------------- in training, and edm-posthoc


def test_power_emas_snapshot_and_resume_exactly(tmp_path, tiny_train, one_thread):
    """8 steps straight and 4 + 4 after a resume write the same snapshots and end at the same EMAs; a snapshot taken
    after the checkpoint a run resumes from is deleted (the resumed run takes its own)."""
    from edm.models.checkpoint import load_checkpoint

    straight = power_run(tiny_train, tmp_path / "straight")
    power_run(tiny_train, tmp_path / "halves", "total_kimg=0.032")
    after = tmp_path / "halves" / "phema" / "snapshot-000000000080.safetensors"
    after.write_bytes(b"taken after the checkpoint, before a crash")  # the resumed run drops it (and ends at 64)
    resumed = power_run(tiny_train, tmp_path / "halves", "resume=true")
    assert not after.exists()
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["phema"]["stds"] == [0.05, 0.1]
    for ea, eb in zip(a["phema"]["emas"], b["phema"]["emas"]):
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    snaps_a, snaps_b = list_snapshots(tmp_path / "straight"), list_snapshots(tmp_path / "halves")
    assert [s.cur_nimg for s in snaps_a] == [s.cur_nimg for s in snaps_b] == [16, 32, 48, 64]
    for sa, sb in zip(snaps_a, snaps_b):
        for i in range(2):
            wa, wb = sa.weights(i), sb.weights(i)  # each call reads the file
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    last = snaps_a[-1].weights(1)
    assert all(torch.equal(last[k], a["phema"]["emas"][1][k]) for k in last)  # the latest snapshot is the live EMA


def test_resuming_with_other_profiles_is_refused(tmp_path, tiny_train, one_thread):
    from edm.models.checkpoint import CheckpointError

    power_run(tiny_train, tmp_path / "run", "total_kimg=0.032")
    with pytest.raises(CheckpointError, match="ema_sigma_rel: checkpoint \\[0.05, 0.1\\], config \\[0.05, 0.2\\]"):
        power_run(tiny_train, tmp_path / "run", "resume=true", "ema_sigma_rel=[0.05,0.2]")
