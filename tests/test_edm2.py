"""EDM2's magnitude-preserving U-Net, its uncertainty head and the learned loss weighting (Karras et al. 2024)."""

from __future__ import annotations

import math

import pytest
import torch

import edm
from edm import networks
from edm.networks.edm2 import MPConv, MPFourier, force_weight_normalization_, mp_cat, mp_silu, mp_sum, normalize

from conftest import CONTINUOUS_SCHEDULES

F64 = torch.float64


def unit_normal(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------------------- magnitude preservation


def test_the_mp_operations_keep_unit_magnitude():
    """For independent N(0, 1) inputs each operation's output has second moment 1 (EDM2 eq. 81, 88, 103):
    checked to 4 standard errors of the mean of 10⁶ squares (std of x² ≈ √2, so 4·√2/1000)."""
    a, b = unit_normal(1000, 1000, seed=1), unit_normal(1000, 1000, seed=2)
    tol = 4 * math.sqrt(2) / 1000
    for t in (0.3, 0.5, 0.8):
        assert float(mp_sum(a, b, t).pow(2).mean()) == pytest.approx(1, abs=tol)
    assert float(mp_cat(a[:, :300], b[:, :700], t=0.3).pow(2).mean()) == pytest.approx(1, abs=tol)
    assert float(mp_silu(a).pow(2).mean()) == pytest.approx(1, abs=0.01)  # 0.596 is rounded in the paper
    w = normalize(unit_normal(8, 40, 3, 3))
    torch.testing.assert_close(w.pow(2).mean(dim=(1, 2, 3)), torch.ones(8, dtype=F64), rtol=1e-3, atol=0)


def test_mp_conv_output_has_unit_magnitude_and_forced_normalization_makes_unit_weights():
    conv = MPConv(64, 32, kernel=[3, 3]).double()
    with torch.no_grad():
        conv.weight.mul_(7.0)  # any scale: the layer normalizes it
    x = unit_normal(16, 64, 24, 24)
    with torch.no_grad():
        y = conv.eval()(x)
    assert float(y[:, :, 1:-1, 1:-1].pow(2).mean()) == pytest.approx(1, rel=0.05)
    weight = conv.weight.detach().clone()
    conv.train()(x)
    assert torch.equal(conv.weight, weight)  # the forward writes nothing
    force_weight_normalization_(torch.nn.Sequential(conv))
    fan_in = 64 * 9
    torch.testing.assert_close(conv.weight.pow(2).sum(dim=(1, 2, 3)), torch.full((32,), float(fan_in), dtype=F64),
                               rtol=1e-3, atol=0)


def test_mp_fourier_is_root_two_cosine():
    emb = MPFourier(16).double()
    c = unit_normal(5)
    torch.testing.assert_close(emb(c), math.sqrt(2) * torch.cos(c[:, None] * emb.freqs + emb.phases))


# ----------------------------------------------------------------------------- the U-Net


# EDM2's Table 2 (parameter counts of its networks, ImageNet-512 latents: 64x64x4, 1000 classes).
@pytest.mark.parametrize("name,count", [
    ("edm2-xxs", 31_308_901), ("edm2-xs", 124_713_125), ("edm2-s", 280_212_709), ("edm2-m", 497_807_653),
    ("edm2-l", 777_497_957), ("edm2-xl", 1_119_283_621), ("edm2-xxl", 1_523_164_645),
])
def test_edm2_parameter_counts_are_the_papers(name, count):
    with torch.device("meta"):
        net = networks.build(name)
    assert sum(p.numel() for p in net.parameters()) == count
    paper = {"edm2-xs": 125e6, "edm2-s": 280e6, "edm2-m": 498e6, "edm2-l": 777e6, "edm2-xl": 1.1e9, "edm2-xxl": 1.5e9}
    if name in paper:  # the table's rounded figures
        digits = 2 if paper[name] >= 1e9 else 3
        assert float(f"{count:.{digits}g}") == paper[name]


def test_edm2_has_no_biases_and_starts_as_zero():
    net = networks.build("edm2-tiny", img_resolution=16, in_channels=3, label_dim=10).double().requires_grad_(False)
    names = [n for n, _ in net.named_parameters()]
    assert not any(n.endswith(".bias") for n in names)
    assert all(p.ndim >= 2 or n.endswith(("out_gain", "emb_gain")) for n, p in net.named_parameters())
    x, c = unit_normal(2, 3, 16, 16), unit_normal(2)
    assert torch.equal(net(x, c, torch.eye(10)[:2].double()), torch.zeros_like(x))  # the output gain starts at 0
    with torch.no_grad():  # the gains start at 0 (F = 0, no conditioning); as after some training:
        for name, p in net.named_parameters():
            if name.endswith(("out_gain", "emb_gain")):
                p.fill_(1.0)
    out = net(x, c, torch.eye(10)[:2].double())
    assert out.shape == x.shape and 0.05 < float(out.pow(2).mean()) < 20  # unit-ish magnitude, not exploding
    assert not torch.allclose(out, net(x, c + 1, torch.eye(10)[:2].double()))  # depends on c_noise
    assert not torch.allclose(out, net(x, c, torch.eye(10)[2:4].double()))  # and on the label


# ----------------------------------------------------------------------------- learned weighting


def test_precond_uncertainty_head_is_mp_fourier_of_quarter_log_sigma():
    torch.manual_seed(0)
    den = edm.Precond(networks.build("edm2-tiny", img_resolution=8, in_channels=1), kind="vp", logvar_channels=16).double()
    sigma = torch.tensor([0.01, 0.5, 20.0], dtype=F64)
    x = unit_normal(3, 1, 8, 8)
    denoised, u = den(x, sigma, return_logvar=True)
    torch.testing.assert_close(denoised, den(x, sigma))
    torch.testing.assert_close(u, den.logvar_linear(den.logvar_fourier(sigma.log() / 4)).reshape(-1))
    with pytest.raises(ValueError, match="no uncertainty head.*logvar_channels"):
        edm.Precond(den.net)(x, sigma, return_logvar=True)


class FixedDenoiser(torch.nn.Module):
    """D = y + e (a fixed error e) and a free log-variance u per σ: the loss's minimizer in u is closed form."""

    def __init__(self, y, error, u):
        super().__init__()
        self.y, self.error = y, error
        self.u = torch.nn.Parameter(torch.full((y.shape[0],), float(u), dtype=y.dtype))

    def forward(self, x, sigma, class_labels=None, return_logvar=False):
        return (self.y + self.error, self.u) if return_logvar else self.y + self.error


@pytest.mark.parametrize("kind", ["edm2", "vp"])
def test_learned_weighting_is_minimized_at_the_log_of_the_weighted_error(kind):
    """L(u) = λ e^(−u) ‖e‖² + u·d is minimized at u* = ln(λ ‖e‖² / d): the weighting learns the loss's scale."""
    y, error = unit_normal(4, 1, 6, 6, seed=3), 0.1 * unit_normal(4, 1, 6, 6, seed=4)
    loss = edm.Loss(edm.schedules.get("edm"), kind=kind, learned_weighting=True)
    sigma = torch.tensor([0.1, 1.0, 3.0, 10.0], dtype=F64)
    den = FixedDenoiser(y, error, u=0.0)
    value = loss(den, y, sigma=sigma, noise=torch.zeros_like(y))
    err = error.pow(2).flatten(1).sum(1)
    torch.testing.assert_close(value, loss.weight(sigma) * err + 0.0)
    u_star = torch.log(loss.weight(sigma) * err / y[0].numel())
    with torch.no_grad():
        den.u.copy_(u_star)
    loss(den, y, sigma=sigma, noise=torch.zeros_like(y)).sum().backward()
    torch.testing.assert_close(den.u.grad, torch.zeros(4, dtype=F64), atol=1e-9, rtol=0)


def test_edm2_loss_defaults_are_edm2s_lognormal_and_learn_the_weighting():
    loss = edm.Loss(edm.schedules.get("edm"), kind="edm2")
    assert (loss.P_mean, loss.P_std, loss.learned_weighting) == (-0.4, 1.0, True)
    assert (edm.Loss(edm.schedules.get("edm")).P_mean, edm.Loss(edm.schedules.get("edm")).learned_weighting) == (-1.2, False)
    ln_sigma = loss.sample_sigma(200_000, generator=torch.Generator().manual_seed(0), dtype=F64).log()
    assert float(ln_sigma.mean()) == pytest.approx(-0.4, abs=4 / math.sqrt(200_000))
    assert float(ln_sigma.std()) == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize("schedule", CONTINUOUS_SCHEDULES)
def test_edm2_trains_under_every_schedule(schedule, tmp_path, tiny_train, one_thread):
    """network=edm2-tiny with loss.kind=edm2 and a power-function EMA: the uncertainty head is built, trained and
    saved, the loss stays finite, and the EMA's snapshots are written, under every schedule."""
    from edm.cli import compose
    from edm.models.checkpoint import load_checkpoint
    from edm.training.loop import train

    cfg = compose("train", [*tiny_train, f"run_dir={tmp_path}", f"schedule={schedule}", "network=edm2-tiny",
                            "loss.kind=edm2", "lr=0.01", "ema_sigma_rel=[0.1]", "ema_snapshot_kimg=0.016"])
    result = train(cfg)
    state = load_checkpoint(result.checkpoint)
    assert state["denoiser"]["precond"]["logvar_channels"] == 128 and state["denoiser"]["network"]["name"] == "edm2-tiny"
    assert "logvar_linear.weight" in state["model"]
    init = edm.Precond(networks.build("edm2-tiny", img_resolution=8, in_channels=1), logvar_channels=128)
    assert not torch.equal(state["model"]["logvar_linear.weight"], init.logvar_linear.weight)  # it was trained
    assert all(math.isfinite(v["loss"]) for v in map(eval_json, result.metrics.read_text().splitlines()))
    from edm.training.phema import list_snapshots

    assert [s.cur_nimg for s in list_snapshots(tmp_path)] == [16, 32] and state["phema"]["stds"] == [0.1]


def eval_json(line):
    import json

    return json.loads(line)


def test_a_loss_that_learns_its_weighting_needs_the_head():
    """Refused when the config is resolved, before a run folder is touched."""
    from edm.training.build import resolve
    from edm.training.config import TrainConfig

    cfg = TrainConfig()
    cfg.loss.kind, cfg.precond.logvar_channels = "edm2", 0
    with pytest.raises(ValueError, match="needs the denoiser's uncertainty head.*precond.logvar_channels"):
        resolve(cfg)
    cfg.loss.kind, cfg.loss.learned_weighting = "edm", True
    with pytest.raises(ValueError, match="needs the denoiser's uncertainty head"):
        resolve(cfg)
    cfg.precond.logvar_channels = None  # unset: the head is built
    assert resolve(cfg).precond["logvar_channels"] == 128
