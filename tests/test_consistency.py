"""Consistency models: the boundary condition f(x̂; σ_b) = x̂ on every precond kind and network preset, ECT's loss
against its closed forms, and the consistency sampler."""

import json
import math
import re

import pytest
import torch

import edm
from edm import networks
from edm.core.consistency import ECTLoss, SCMLoss, check_ect_stages, ect_gap, trigflow_F, trigflow_tangent
from edm.core.precond import PRECOND_KINDS

from conftest import SMALL_PRESETS

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(preset: str) -> torch.nn.Module:
    """The preset, small, with every parameter moved off its initialization (some presets zero their output layer)."""
    torch.manual_seed(0)
    net = networks.build(preset, img_resolution=8, in_channels=2, **SMALL_PRESETS[preset]).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("preset", list(SMALL_PRESETS))
@pytest.mark.parametrize("kind", list(PRECOND_KINDS))
def test_the_boundary_condition_holds_exactly_on_every_kind_and_preset(preset, kind):
    """boundary_sigma σ_b: f(x̂; σ_b) = x̂ bit for bit, and f differs from x̂ above it."""
    sigma_b = 0.002
    f = edm.Precond(small_net(preset), kind=kind, boundary_sigma=sigma_b)
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert torch.equal(f(x, torch.full((3,), sigma_b, dtype=F64)), x)
    assert not torch.allclose(f(x, torch.full((3,), 0.5, dtype=F64)), x)


@pytest.mark.parametrize("kind", list(PRECOND_KINDS))
def test_the_boundary_shifts_c_skip_and_c_out_only(kind):
    """c_skip and c_out are the row's at σ − σ_b, c_in and c_noise the row's at σ; σ_b = 0 is the plain denoiser.
    For kind edm, c_skip is Song et al.'s σ_d²/((σ − σ_b)² + σ_d²)."""
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=F64)
    plain = edm.Precond(torch.nn.Identity(), kind=kind).coefficients(sigma)
    bounded = edm.Precond(torch.nn.Identity(), kind=kind, boundary_sigma=0.002).coefficients(sigma)
    shifted = edm.Precond(torch.nn.Identity(), kind=kind).coefficients(sigma - 0.002)
    torch.testing.assert_close(bounded, plain._replace(c_skip=shifted.c_skip, c_out=shifted.c_out), rtol=0, atol=0)
    if kind == "edm":
        torch.testing.assert_close(bounded.c_skip, 0.25 / ((sigma - 0.002) ** 2 + 0.25), rtol=1e-14, atol=0)


def test_a_negative_boundary_is_refused():
    with pytest.raises(ValueError, match="boundary_sigma=-0.1 must be >= 0"):
        edm.Precond(torch.nn.Identity(), boundary_sigma=-0.1)


# ----------------------------------------------------------------------------- ECT's loss


class _Scale(torch.nn.Module):
    """f(x̂; σ) = a·x̂ + b·σ (one parameter each): a consistency 'network' whose gradients have closed forms."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.8, dtype=F64))
        self.b = torch.nn.Parameter(torch.tensor(0.1, dtype=F64))

    def forward(self, x, sigma, class_labels=None):
        return self.a * x + self.b * sigma.view(-1, *([1] * (x.ndim - 1)))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(6, 2, 4, 4, generator=g, dtype=F64)
    n = torch.randn(6, 2, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 60.0], dtype=F64)
    return y, n, t


def test_ect_mapping_function_and_its_stages():
    """r = t·(1 − q^−(s+1)·(1 + k·sigmoid(−b·t))) clamped at 0 (ECT's sigmoid mapping); the stage is
    ⌊images / stage_kimg⌋, and from one stage to the next Δt = t − r halves (where r > 0)."""
    loss = ECTLoss(q=2.0, k=8.0, b=1.0, stage_kimg=10.0)
    t = torch.tensor([0.002, 0.05, 0.5, 2.0, 20.0, 80.0], dtype=F64)
    for nimg, stage in [(0, 0), (9999, 0), (10000, 1), (35000, 3)]:
        at = loss.at(nimg)
        assert at.stage == stage
        expected = [max(v * (1 - 2.0 ** -(stage + 1) * (1 + 8 / (1 + math.exp(v)))), 0.0) for v in t.tolist()]
        torch.testing.assert_close(at.r(t), torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)
    r3, r4 = loss.at(30000).r(t), loss.at(40000).r(t)
    inside = r3 > 0
    torch.testing.assert_close((t - r4)[inside], (t - r3)[inside] / 2, rtol=1e-12, atol=0)
    assert loss.at(0).r(torch.tensor([0.002], dtype=F64)).item() == 0  # early stages: small t pairs with r = 0


def test_ect_weight_is_one_over_the_gap_itself_at_every_stage_float32_resolves():
    """w = 1/(t − r) with t − r = t·q^−(s+1)·n(t) as ECT writes it: in float32 at stage 12 (2^−13, the last stage
    check_ect_stages allows with q = 2) the weight matches float64's to 1e-6, where 1/(t − r) of the rounded r is off
    by up to ~1e-3; the loss of a pair there is finite with a finite gradient."""
    t64 = torch.logspace(-2, 1.9, 200, dtype=F64)
    loss = ECTLoss(stage_kimg=1.0).at(12000)
    exact = 1 / ect_gap(t64, 12, loss.q, loss.k, loss.b)
    t32 = t64.float()
    torch.testing.assert_close(loss.weight(t32, loss.gap(t32)).double(), exact, rtol=1e-6, atol=0)
    rounded = 1 / (t32 - loss.r(t32)).double()
    assert ((rounded - exact).abs() / exact).max() > 1e-4  # what a difference of rounded times would give
    check_ect_stages(2.0, 1.0, 13.0)  # stages 0..12 pass; a 14th does not
    check_ect_stages(2.0, 15 / 13, 15.0)  # 13 stages of 15/13 kimg: a whole quotient up to round-off
    with pytest.raises(ValueError, match=r"reaches ECT stage 13.*At most 13 stages: set ect.stage_kimg ≥ 1.077 .*"
                                         r"or total_kimg ≤ 13 \(a resume keeps its run's ect.stage_kimg\)"):
        check_ect_stages(2.0, 1.0, 14.0)  # a resume may not change ect.stage_kimg: the total_kimg that fits is named
    check_ect_stages(2.0, 0.1, 1.3)  # the total_kimg named for ect.stage_kimg=0.1 passes
    for stage_kimg, total_kimg in ((100.123, 1400.0), (1.0, 16049.3333)):  # named values of more than 6 digits
        with pytest.raises(ValueError) as refused:
            check_ect_stages(2.0, stage_kimg, total_kimg)
        least = float(re.search(r"ect.stage_kimg ≥ ([0-9.]+) ", str(refused.value)).group(1))
        most = float(re.search(r"or total_kimg ≤ ([0-9.]+) ", str(refused.value)).group(1))
        check_ect_stages(2.0, least, total_kimg)  # each value named passes, not one rounded to 6 digits past it
        check_ect_stages(2.0, stage_kimg, most)
    y, n, t = _batch()
    den = edm.Precond(_conv_net(), kind="edm").float()
    value = loss(den, y.float(), sigma=t.float(), noise=n.float())
    value.sum().backward()
    assert torch.isfinite(value).all() and all(torch.isfinite(p.grad).all() for p in den.parameters())


def test_ect_at_r_zero_is_the_denoising_loss():
    """With r = 0 the target is y (the boundary), so ECT's loss is w(t, 0)·d(D(y + t·n; t), y): with metric l2 and
    weighting edm exactly edm.Loss's EDM denoising loss λ(t)‖D − y‖², and with ECT's own (c = 0) ‖D − y‖/t."""
    y, n, t = _batch()
    den = edm.Precond(_conv_net(), kind="edm")
    zero = torch.zeros_like(t)
    denoising = edm.Loss(edm.schedules.EDM())(den, y, sigma=t, noise=n)
    as_edm = ECTLoss(metric="l2", weighting="edm")(den, y, sigma=t, r=zero, noise=n)
    torch.testing.assert_close(as_edm, denoising, rtol=1e-12, atol=0)
    ect = ECTLoss()(den, y, sigma=t, r=zero, noise=n)
    error = (den(y + t.view(-1, 1, 1, 1) * n, t) - y).flatten(1).norm(dim=1)
    torch.testing.assert_close(ect, error / t, rtol=1e-12, atol=0)
    huber = ECTLoss(c=0.3)(den, y, sigma=t, r=zero, noise=n)
    torch.testing.assert_close(huber, ((error**2 + 0.09).sqrt() - 0.3) / t, rtol=1e-12, atol=0)


def _conv_net() -> torch.nn.Module:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1).double()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x, c_noise, class_labels=None):
            return self.conv(x) * (1 + c_noise.view(-1, 1, 1, 1))

    return Net()


def test_ect_target_is_the_same_trajectory_without_gradient():
    """Both points share the noise n, the target f(y + r·n; r) carries no gradient, and the weight is 1/(t − r):
    for f = a·x̂ + b·σ and metric l2, ∂loss/∂a = w·2⟨f_t − f_r, x̂_t⟩ and ∂loss/∂b = w·2⟨f_t − f_r, t⟩."""
    y, n, t = _batch(1)
    f = _Scale()
    loss = ECTLoss(metric="l2")
    r = loss.r(t)
    value = loss(f, y, sigma=t, noise=n)
    x_t, x_r = y + t.view(-1, 1, 1, 1) * n, y + r.view(-1, 1, 1, 1) * n
    with torch.no_grad():
        f_t, f_r = f(x_t, t), torch.where((r > 0).view(-1, 1, 1, 1), f(x_r, r), x_r)
        w = 1 / (t - r)
        torch.testing.assert_close(value, w * (f_t - f_r).pow(2).flatten(1).sum(1))
    value.sum().backward()
    delta = (f_t - f_r).flatten(1)
    torch.testing.assert_close(f.a.grad, (w * 2 * (delta * x_t.flatten(1)).sum(1)).sum())
    torch.testing.assert_close(f.b.grad, (w * 2 * delta.sum(1) * t).sum())


def test_an_ect_pair_given_without_its_t_is_refused():
    """r is the pair's second point below t: an r without t (sigma) paired with a drawn t, t − r of either sign."""
    y = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"ECTLoss's r is the second point of the pair below t \(sigma\)"):
        ECTLoss()(lambda x, sigma, labels=None: x, y, r=torch.full((3,), 0.1, dtype=torch.float64))


def test_ect_passes_share_the_dropout_mask():
    """At r = t the two passes see the same input: with dropout on, the loss is 0 only if both use one mask."""
    net = networks.build("tiny", img_resolution=8, in_channels=2, dropout=0.5).double().train()
    den = edm.Precond(net, kind="edm")
    y, n, t = _batch(2)
    y, n = y.repeat(1, 1, 2, 2), n.repeat(1, 1, 2, 2)
    torch.manual_seed(5)
    loss = ECTLoss(metric="l2", weighting="edm")(den, y, sigma=t, r=t.clone(), noise=n)  # (1/(t − r) is inf here)
    assert loss.abs().max() == 0
    torch.manual_seed(5)
    first = den(y + t.view(-1, 1, 1, 1) * n, t)
    assert not torch.equal(first, den(y + t.view(-1, 1, 1, 1) * n, t))  # dropout is on: two draws differ


def test_ect_with_a_boundary_draws_t_above_it():
    """boundary_sigma σ_b > 0: ln t is N(P_mean, P_std²) truncated to t > σ_b (Kolmogorov–Smirnov against its CDF),
    r never falls below σ_b, and the target at r = σ_b is x̂_r itself (f's boundary)."""
    loss = ECTLoss(boundary_sigma=0.05, P_mean=-1.1, P_std=2.0)
    t = loss.sample_t(20000, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert t.min() > 0.05
    z = (t.log().sort().values + 1.1) / 2.0
    phi = lambda v: 0.5 * torch.erfc(-v / math.sqrt(2))  # noqa: E731
    lo = phi(torch.tensor((math.log(0.05) + 1.1) / 2.0, dtype=F64))
    cdf = (phi(z) - lo) / (1 - lo)
    i = torch.arange(1, len(z) + 1, dtype=F64)
    ks = torch.maximum(i / len(z) - cdf, cdf - (i - 1) / len(z)).max()
    assert ks < 1.63 / math.sqrt(len(z))  # the 1 % critical value
    assert loss.r(t).min() >= 0.05


def test_sct_with_a_boundary_draws_sigma_above_it(compose_train):
    """precond.boundary_sigma σ_b > 0 bounds sCM's consistency function too (f(x̂; σ_b) = x̂; the sampler refuses levels
    below it): its ln σ is N(P_mean, P_std²) truncated to σ > σ_b (Kolmogorov–Smirnov against its CDF), as ECT's t,
    and edm-train hands the precond's σ_b to the loss."""
    loss = SCMLoss(boundary_sigma=0.2, P_mean=-1.0, P_std=1.4)
    seen = []
    f = lambda x, sigma, class_labels=None: seen.append(sigma.clone()) or 0 * x  # noqa: E731
    loss(f, torch.zeros(20000, 1, dtype=F64), generator=torch.Generator().manual_seed(0))
    sigma = (0.5 * torch.tan(torch.atan(seen[-1] / 0.5))).sort().values
    assert sigma.min() > 0.2
    phi = lambda v: 0.5 * torch.erfc(-v / math.sqrt(2))  # noqa: E731
    lo = phi(torch.tensor((math.log(0.2) + 1.0) / 1.4, dtype=F64))
    cdf = (phi((sigma.log() + 1.0) / 1.4) - lo) / (1 - lo)
    i = torch.arange(1, len(sigma) + 1, dtype=F64)
    ks = torch.maximum(i / len(sigma) - cdf, cdf - (i - 1) / len(sigma)).max()
    assert ks < 1.63 / math.sqrt(len(sigma))  # the 1 % critical value
    from edm.training.build import resolve

    assert resolve(compose_train("recipe=sct", "precond.boundary_sigma=0.002")).loss.boundary_sigma == 0.002


# ----------------------------------------------------------------------------- the consistency sampler


@pytest.mark.parametrize("schedule", ["edm", "vp", "trigflow"])
def test_the_consistency_sampler_is_song_et_al_algorithm_1(schedule):
    """ŷ_0 = f(σ_0·n; σ_0), then ŷ_i = f(ŷ_{i−1} + σ_i·n_i; σ_i) for the intermediate σ's, whatever s(t): one
    evaluation per step, fresh noise from the generator at every step."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(5, 3, generator=g, dtype=F64)
    f = edm.IdealDenoiser(data)
    noise = torch.randn(4, 3, generator=g, dtype=F64)
    sched = edm.schedules.get(schedule)
    calls = []
    counted = lambda x, sigma, class_labels=None: calls.append(1) or f(x, sigma)  # noqa: E731
    out = edm.sample(counted, noise, sched, num_steps=3, solver="consistency", generator=torch.Generator().manual_seed(7),
                     sigmas=[2.0, 0.5])
    assert len(calls) == 3
    replay = torch.Generator().manual_seed(7)
    sigma_0 = sched.sigma(sched.time_steps(3)[0])
    y = f(sigma_0 * noise, sigma_0.expand(4))
    for sigma in (2.0, 0.5):
        s = torch.tensor(sigma, dtype=F64)
        y = f(y + s * torch.randn(noise.shape, generator=replay, dtype=F64), s.expand(4))
    torch.testing.assert_close(out, y, rtol=1e-9, atol=1e-12)


def test_the_consistency_sampler_renoises_to_the_noise_beyond_the_models_boundary():
    """A consistency function with boundary f(x̂; σ_b) = x̂ (Precond's boundary_sigma) maps to x̂ at σ_b, which
    already holds noise σ_b: Algorithm 1 adds sqrt(σ_i² − σ_b²)·n_i, read from the model through guidance and
    autocast wrappers; a level below σ_b is refused."""
    from edm.core.denoisers import AutocastDenoiser, GuidedDenoiser, boundary_sigma

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 3, generator=g, dtype=F64)
    net = lambda x, c_noise, class_labels=None: torch.tanh(x @ weight) * (1 + c_noise.view(-1, 1))  # noqa: E731
    f = edm.Precond(net, kind="edm", boundary_sigma=0.05)
    noise = torch.randn(4, 3, generator=g, dtype=F64)
    sched = edm.schedules.EDM()
    replay = torch.Generator().manual_seed(7)
    sigma_0 = sched.sigma(sched.time_steps(2)[0])
    y = f(sigma_0 * noise, sigma_0.expand(4))
    y = f(y + math.sqrt(0.5**2 - 0.05**2) * torch.randn(noise.shape, generator=replay, dtype=F64),
          torch.tensor(0.5, dtype=F64).expand(4))
    for model in (f, GuidedDenoiser(f, 1.0)):
        out = edm.sample(model, noise, sched, num_steps=2, solver="consistency", generator=torch.Generator().manual_seed(7),
                         sigmas=[0.5])
        torch.testing.assert_close(out, y, rtol=1e-12, atol=1e-12)
    assert boundary_sigma(torch.compile(AutocastDenoiser(GuidedDenoiser(f, 2.0), torch.bfloat16))) == 0.05
    with pytest.raises(ValueError, match=r"must not lie below the model's boundary σ_b = 0.05"):
        edm.sample(f, noise, sched, num_steps=2, solver="consistency", sigmas=[0.01])


def test_the_consistency_samplers_default_levels_and_bad_ones():
    """Without sigmas the intermediate levels are the schedule's (N + 1)-step grid without its last point σ_min;
    a list of the wrong length or order is refused, naming what fits."""
    sched = edm.schedules.EDM()
    seen = []
    f = lambda x, sigma, class_labels=None: seen.append(float(sigma[0])) or 0 * x  # noqa: E731
    edm.sample(f, torch.zeros(1, 2, dtype=F64), sched, num_steps=4, solver="consistency")
    torch.testing.assert_close(torch.tensor(seen, dtype=F64), sched.sigma(sched.time_steps(5)[:4]), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"sigmas=\[0.5\] must be 3 decreasing noise level\(s\) below σ\(t_0\) = 80"):
        edm.sample(f, torch.zeros(1, 2), sched, num_steps=4, solver="consistency", sigmas=[0.5])
    with pytest.raises(ValueError, match="must be 2 decreasing"):
        edm.sample(f, torch.zeros(1, 2), sched, num_steps=3, solver="consistency", sigmas=[0.5, 2.0])


# ----------------------------------------------------------------------------- ECT end to end


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny denoiser trained for 4 steps on the embedded digits (TINY_TRAIN), in a run folder."""
    from conftest import TINY_TRAIN
    from edm.cli import compose
    from edm.training.loop import train

    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    train(compose("train", [*TINY_TRAIN, f"run_dir={run_dir}"]))
    return run_dir


def test_an_init_model_is_not_contradicted_by_the_configs_network_or_preconditioning(compose_train, teacher, tmp_path):
    """init= trains the model's own network and preconditioning: a config that sets others (a network preset, a
    network.* or precond.* value, and σ_d, which the loss reads too) is refused before any work, naming the model's
    values; network.dropout and precond.boundary_sigma are the config's to set, and values equal to the model's pass."""
    from edm.training.loop import setup

    base = ["recipe=ect", f"init={teacher}", "total_kimg=0.008"]
    refusals = [(["network=edm2-tiny"], r"network=edm2-tiny where the model has tiny\b.*set them to the model's \(network=tiny\)"),
                (["network.model_channels=16"], r"network.model_channels=16 where the model has 8.*network.model_channels=8\)"),
                (["precond.kind=vp"], r"precond.kind=vp where the model has edm"),
                (["network.channel_mult=[1,2,2]"], r"network.channel_mult=\[1,2,2\] where the model has \[1,2\].*"
                                                    r"network.channel_mult=\[1,2\]\)"),
                (["precond.sigma_data=1.0"], r"precond.sigma_data=1.0 where the model has 0.5.*precond.sigma_data=0.5\)")]
    for i, (overrides, message) in enumerate(refusals):
        with pytest.raises(ValueError, match=f"init=.* trains its own network and preconditioning.*{message}"):
            setup(compose_train(*base, *overrides, run_dir=tmp_path / f"refused{i}"))
        assert not (tmp_path / f"refused{i}" / "checkpoint-00000000.pt").exists()
    setup(compose_train(*base, "network.model_channels=8", "precond.kind=edm", "network.dropout=0.3",
                        "precond.boundary_sigma=0.002", run_dir=tmp_path / "agrees"))


def test_a_few_step_schedule_that_outlasts_the_run_and_ect_from_random_weights_are_warned_of(compose_train, caplog):
    """ECT ending in its first stage (Δt never shrinks) and sCM ending within its tangent warm-up say so, naming the
    key to scale; a run that reaches its second stage or ends its warm-up does not; ECT without init= says that it
    starts from random weights."""
    from edm.training.build import check_few_step_settings

    cases = [(("recipe=ect", "total_kimg=4"), "ends in ECT's first stage (ect.stage_kimg=12)"),
             (("recipe=ect", "total_kimg=4", "ect.stage_kimg=2"), "objective=ect without init= trains a consistency model"),
             (("recipe=sct", "total_kimg=4"), "ends within sCM's tangent warm-up (scm.warmup_kimg=10)"),
             (("recipe=ect", "total_kimg=4", "ect.stage_kimg=2", "init=runs/a-denoiser"), None),
             (("recipe=scd", "total_kimg=4", "scm.warmup_kimg=4"), None)]
    for overrides, warning in cases:
        caplog.clear()
        with caplog.at_level("WARNING"):
            check_few_step_settings(compose_train(*overrides))
        messages = [r.getMessage() for r in caplog.records]
        if warning is None:
            assert messages == [], (overrides, messages)
        else:
            assert any(warning in m for m in messages), (overrides, messages)


def test_a_model_trained_on_other_images_is_warned_of_as_init_or_teacher(compose_train, caplog):
    """init= and teacher= models trained on another data set, size or resampling filter than the run's are allowed
    (a model tuned on new data) but named; the filter of an unresized set and fields a record lacks say nothing."""
    from edm.training.build import warn_other_data

    cfg = compose_train("dataset=digits", "dataset.resolution=16", "dataset.resample=bilinear")
    cases = [({"name": "fashion_mnist", "resolution": 16, "resample": "bilinear"}, "name 'fashion_mnist', this run 'digits'"),
             ({"name": "digits", "resolution": 16, "resample": "lanczos"}, "resample 'lanczos', this run 'bilinear'"),
             ({"name": "digits", "resolution": 16}, None), (None, None)]
    for recorded, warning in cases:
        caplog.clear()
        with caplog.at_level("WARNING"):
            warn_other_data("teacher", "T.pt", recorded, cfg)
        assert (warning is None and not caplog.records) or (warning in caplog.text and "teacher T.pt" in caplog.text)
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_other_data("init", "I.pt", {"name": "digits", "resample": "box"}, compose_train("dataset=digits"))
    assert not caplog.records


def test_an_init_model_of_another_schedule_is_warned_of(compose_train, teacher, tmp_path, caplog):
    """init= takes the model's network and preconditioning, not its schedule: a run on another one says so."""
    import logging

    from edm.training.loop import train

    with caplog.at_level(logging.WARNING, logger="edm.training.build"):
        train(compose_train("recipe=ect", f"init={teacher}", "schedule=vp", "total_kimg=0.008", "ect.stage_kimg=0.016"))
    assert "was trained with schedule=edm; this run trains and samples with schedule=vp" in caplog.text
    assert "schedule=edm keeps the model's schedule" in caplog.text


def test_recipe_ect_tunes_a_trained_model_and_resumes(compose_train, teacher, tmp_path):
    """recipe=ect init=RUN starts from RUN's EMA weights with its network and precond, trains ECT's loss with
    the stage advancing by images, writes consistency-sampled grids, records objective=ect, resumes exactly,
    and its model samples only with the consistency sampler."""
    from edm.models import checkpoint as ckpt
    from edm.models.loading import load_model
    from edm.training.loop import train
    from edm.training.run import saved_loss_spec

    overrides = ["recipe=ect", f"init={teacher}", "network.dropout=0.2",
                 "ect.stage_kimg=0.016", "checkpoint_every=2", "sampler.num_steps=1"]
    full = train(compose_train(*overrides, run_dir=tmp_path / "full"))
    state = ckpt.load_checkpoint(full.checkpoint)
    assert state["config"]["objective"] == "ect" and saved_loss_spec(state)["kind"] == "ect"
    teacher_state = ckpt.load_checkpoint(ckpt.find_latest(teacher))
    assert state["denoiser"] == {  # the init model's network and precond, with the config's dropout (no weights)
        "network": teacher_state["denoiser"]["network"] | {"dropout": 0.2},
        "precond": teacher_state["denoiser"]["precond"] | {"boundary_sigma": 0.0}}
    assert any(not torch.equal(state["model"][k], teacher_state["ema"][k]) for k in state["model"])
    assert (tmp_path / "full" / "samples-final.png").exists()

    cut = compose_train(*overrides, "total_kimg=0.016", run_dir=tmp_path / "cut")
    train(cut)
    resumed = train(compose_train(*overrides, "resume=true", run_dir=tmp_path / "cut"))
    again = ckpt.load_checkpoint(resumed.checkpoint)
    for key in state["model"]:
        torch.testing.assert_close(again["model"][key], state["model"][key], rtol=0, atol=0)

    model, info = load_model(tmp_path / "full")
    assert info.objective == "ect"
    info.check_solver("consistency")
    with pytest.raises(ValueError, match="is a consistency model .* use sampler=consistency"):
        info.check_solver("heun")
    _, teacher_info = load_model(teacher)
    with pytest.raises(ValueError, match="is not a consistency model .* tune one with edm-train recipe=ect init="):
        teacher_info.check_solver("consistency")


@pytest.mark.parametrize("overrides, needle", [
    (["objective=ect"], "objective=ect trains a consistency model; its sample grids need sampler=consistency"),
    (["sampler=consistency"], "sampler=consistency samples consistency models: train one with objective=ect"),
    (["recipe=meanflow", "sampler=consistency"], "or sample this objective's model with sampler=meanflow or an ODE solver"),
    (["recipe=ect", "init=no/such/run"], "init='no/such/run' does not exist"),
    (["recipe=ect", "ect.q=1"], "ECT needs q > 1"),
    (["recipe=ect", "ect.metric=l2", "ect.c=0.03"], "ect.c=0.03 is the pseudo-Huber metric's c, which ect.metric=l2 "
                                                   "does not use: drop ect.c, or set ect.metric=pseudo_huber"),
    (["recipe=ect", "total_kimg=400"], "total_kimg=400 with ect.stage_kimg=12 reaches ECT stage 33, where t − r ≥ "
                                       "t·2^−34"),  # 13 stages resolve: 2^−13 = 1024 float32 ulps
])
def test_bad_ect_settings_fail_before_training(compose_train, tmp_path, overrides, needle):
    from edm.training.loop import train

    with pytest.raises(ValueError, match=re.escape(needle)):
        train(compose_train(*overrides))
    assert not (tmp_path / "run").exists()


def test_init_or_teacher_of_other_images_is_refused(compose_train, tmp_path, tiny_checkpoint, teacher):
    from edm.training.loop import train

    other = tiny_checkpoint(tmp_path / "other.pt", label_dim=10)
    with pytest.raises(ValueError, match=r"init .* models 1x8x8 images with 10 classes, data set digits has 1x8x8 with 0"):
        train(compose_train("recipe=ect", f"init={other}"))
    with pytest.raises(ValueError, match=r"teacher .* models 1x8x8 images with 10 classes, data set digits has 1x8x8 "
                                         r"with 0: distil a teacher of this data"):
        train(compose_train("recipe=scd", f"init={teacher}", f"teacher={other}"))


# ----------------------------------------------------------------------------- sCM: TrigFlow and the JVP


def test_trigflow_F_of_a_trigflow_denoiser_is_its_network():
    """For precond kind trigflow, F(x_t, t) = (cos t·x_t − D(x_t/cos t; σ_d tan t))/(σ_d sin t) is the network's
    own output F(x_t/σ_d, t)."""
    net = small_net("tiny")
    den = edm.Precond(net, kind="trigflow", sigma_data=0.5)
    x_t = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.tensor([0.05, 0.7, 1.4], dtype=F64)
    torch.testing.assert_close(trigflow_F(den, x_t, t, 0.5), net(x_t / 0.5, t), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("preset", list(SMALL_PRESETS))
@pytest.mark.parametrize("kind", ["edm", "trigflow", "vp"])
def test_the_jvp_equals_central_finite_differences_on_every_preset(preset, kind):
    """cos t sin t·dF/dt along dx_t/dt by forward-mode autodiff equals the central difference
    (F(x_t + h·v_x, t + h·v_t) − F(x_t − h·v_x, t − h·v_t))/2h in float64, through every network preset
    (attention included) and the preconditioning: every layer has a forward-mode rule, no fallback is needed."""
    den = edm.Precond(small_net(preset), kind=kind)
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 2, 8, 8, generator=g, dtype=F64)
    dx = torch.randn(2, 2, 8, 8, generator=g, dtype=F64)
    t = torch.tensor([0.3, 1.1], dtype=F64)
    F, dF = trigflow_tangent(den, x_t, t, dx, 0.5)
    torch.testing.assert_close(F, trigflow_F(den, x_t, t, 0.5), rtol=1e-12, atol=1e-12)
    cs = torch.cos(t) * torch.sin(t)

    def central(h):
        plus = trigflow_F(den, x_t + h * cs.view(-1, 1, 1, 1) * dx, t + h * cs, 0.5)
        minus = trigflow_F(den, x_t - h * cs.view(-1, 1, 1, 1) * dx, t - h * cs, 0.5)
        return (plus - minus) / (2 * h)

    # Richardson's O(h⁴) difference at the best of three steps: truncation falls and round-off grows as h shrinks, and
    # where they cross depends on the network (VP's c_noise spans 999 t_VP, steep in t; EDM2 normalizes its weights).
    errors = []
    for h in (1e-5, 1e-6, 1e-7):
        fd = (4 * central(h) - central(2 * h)) / 3
        errors.append(((dF - fd).abs().max() / fd.abs().max()).item())
    assert min(errors) < 1e-6, errors


def test_the_consistency_function_of_one_point_is_a_fixed_point_of_sct():
    """For data = one point y₀ the exact consistency function is f ≡ y₀ (the ideal denoiser): then
    σ_d F = dx_t/dt and x_t + σ_d dF/dt = 0, so the tangent g and the loss vanish, at every t."""
    y0 = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    f = edm.IdealDenoiser(y0)
    y = y0.expand(5, -1, -1, -1)
    sigma = torch.tensor([0.01, 0.2, 1.0, 5.0, 60.0], dtype=F64)
    loss = SCMLoss().at(10**9)
    assert loss.warmup == 1.0 and loss.kind == "sct"
    value = loss(f, y, sigma=sigma, noise=torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=F64))
    assert value.abs().max() < 1e-20


def test_the_sct_gradient_is_the_normalized_tangent():
    """F_θ equals F⁻ in value, so ∂loss/∂θ = −2/(σ·dim)·⟨g, ∂F_θ/∂θ⟩ with g = ĝ/(rms(ĝ) + c),
    ĝ = −cos² t (σ_d F − dx_t/dt) − ρ cos t sin t (x_t + σ_d dF/dt); checked for F linear in θ (kind trigflow,
    network θ·x so that F = θ·x_t/σ_d), with ρ = 0.5 half-way through the warm-up."""
    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.tensor(0.3, dtype=F64))

        def forward(self, x, c_noise, class_labels=None):
            return self.theta * x + 0 * c_noise.view(-1, 1, 1, 1)

    net = Linear()
    den = edm.Precond(net, kind="trigflow", sigma_data=0.5)
    g_ = torch.Generator().manual_seed(2)
    y = torch.randn(3, 1, 4, 4, generator=g_, dtype=F64)
    n = torch.randn(3, 1, 4, 4, generator=g_, dtype=F64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=F64)
    loss = SCMLoss(warmup_kimg=2.0).at(1000)
    assert loss.warmup == 0.5
    loss(den, y, sigma=sigma, noise=n).sum().backward()
    t = torch.atan(sigma / 0.5).view(-1, 1, 1, 1)
    cos, sin = torch.cos(t), torch.sin(t)
    x_t, dxdt = cos * y + sin * 0.5 * n, cos * 0.5 * n - sin * y
    with torch.no_grad():
        F = net.theta * x_t / 0.5
        dF = net.theta * dxdt / 0.5  # F depends on t only through x_t
        tangent = -cos**2 * (0.5 * F - dxdt) - 0.5 * cos * sin * (x_t + 0.5 * dF)
        tangent = tangent / (tangent.flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1, 1) + 0.1)
        expected = (-2 / (sigma * 16) * (tangent * x_t / 0.5).flatten(1).sum(1)).sum()
    torch.testing.assert_close(net.theta.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("recipe", ["sct", "scd"])
def test_recipes_sct_and_scd_tune_a_trained_model(compose_train, teacher, tmp_path, recipe):
    """recipe=sct (and scd, distilling the same teacher) from init=RUN: finite losses that the run records, the
    loss spec of its kind, a grid sampled with the consistency sampler."""
    from edm.models import checkpoint as ckpt
    from edm.training.loop import train
    from edm.training.run import saved_loss_spec

    extra = [f"teacher={teacher}"] if recipe == "scd" else []
    result = train(compose_train(f"recipe={recipe}", f"init={teacher}", "sampler.num_steps=1", "scm.warmup_kimg=0.016",
                                 *extra))
    state = ckpt.load_checkpoint(result.checkpoint)
    spec = saved_loss_spec(state)
    assert state["config"]["objective"] == recipe and spec["kind"] == recipe and "teacher" not in spec
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(math.isfinite(r["loss"]) for r in records)
    assert (tmp_path / "run" / "samples-final.png").exists()


def test_an_scd_run_refuses_to_resume_with_a_teacher_whose_run_trained_on(compose_train, teacher, tmp_path):
    """teacher=RUN reads that run's latest checkpoint: once the teacher's run has trained on, the same teacher= names
    other weights, and the resume is refused naming the changed hash (the path alone is the same)."""
    import shutil

    from edm.models import checkpoint as ckpt
    from edm.training.loop import train

    moving = tmp_path / "teacher-run"
    shutil.copytree(teacher, moving)
    tune = ("recipe=scd", f"init={teacher}", f"teacher={moving}", "sampler.num_steps=1", "scm.warmup_kimg=0.016")
    train(compose_train(*tune, "total_kimg=0.016"))
    train(compose_train(*tune, "total_kimg=0.032", "resume=true"))  # the same teacher file: it resumes
    latest = max(moving.glob("checkpoint-*.pt"))
    shutil.copy(latest, moving / "checkpoint-99999999.pt")  # the teacher's run saved a newer checkpoint ...
    state = torch.load(moving / "checkpoint-99999999.pt", weights_only=True)
    state["step"] += 1  # ... of other bytes
    torch.save(state, moving / "checkpoint-99999999.pt")
    with pytest.raises(ckpt.CheckpointError, match="inputs.teacher_sha256: checkpoint '.*', now '.*'"):
        train(compose_train(*tune, "total_kimg=0.048", "resume=true"))


def test_scd_needs_a_teacher_and_only_scd_takes_one(compose_train, teacher):
    from edm.training.loop import train

    with pytest.raises(ValueError, match="objective=scd distils a teacher: set teacher=MODEL"):
        train(compose_train("recipe=scd", f"init={teacher}"))
    with pytest.raises(ValueError, match="is used by objective=scd only"):
        train(compose_train("recipe=sct", f"init={teacher}", f"teacher={teacher}"))


@pytest.mark.parametrize("recipe", [pytest.param("ect", marks=pytest.mark.slow), "sct", "meanflow"])  # sct, meanflow: JVPs under DDP
def test_few_step_recipes_train_on_two_processes_with_post_hoc_ema(recipe, teacher, tmp_path, tiny_train, one_thread_env):
    """Two CPU processes (gloo) train each few-step objective with power-function EMAs; post-hoc EMA makes a model
    folder that keeps the objective, so the few-step sampler takes it."""
    import subprocess
    import sys

    from conftest import REPO
    from edm.models.loading import load_model
    from edm.training.posthoc import PosthocConfig, reconstruct

    run_dir = tmp_path / "ddp"
    init = [] if recipe == "meanflow" else [f"init={teacher}"]
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "edm.train", *tiny_train, f"recipe={recipe}", *init,
         f"run_dir={run_dir}", "grid_size=0", "cpu=true", "ema_sigma_rel=[0.1]", "ema_snapshot_kimg=0.016",
         "sampler.num_steps=1", "scm.warmup_kimg=0.016"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=one_thread_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(math.isfinite(r["loss"]) for r in records)
    (summary,) = reconstruct(PosthocConfig(run_dir=str(run_dir), sigma_rel=[0.1], out=str(tmp_path / "posthoc")))
    _, info = load_model(summary["folder"])
    assert info.objective == recipe
    info.check_solver("meanflow" if recipe == "meanflow" else "consistency")


def test_the_sct_loss_stays_in_float32_under_bf16_autocast():
    """Under bf16 autocast the network's convolutions run in bf16; sCM's tangent, its normalization and the loss are
    computed in float32 (the data's dtype), and the loss is finite."""
    den = edm.Precond(networks.build("tiny", img_resolution=8, in_channels=1, model_channels=8), kind="edm")
    y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = SCMLoss().at(10**6)(den, y, generator=torch.Generator().manual_seed(1))
    assert value.dtype == torch.float32 and torch.isfinite(value).all()
