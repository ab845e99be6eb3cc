"""MeanFlow: the second noise input of every network preset, the average velocity of the flow-matching denoiser,
MeanFlow's loss and sampler against a closed form (Gaussian data, whose flow map is affine), training end to end."""

import math

import pytest
import torch

import edm
from edm import networks
from edm.core.meanflow import MeanFlowLoss, average_velocity
from edm.training.build import load_initial_weights

from conftest import SMALL_PRESETS

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(preset: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return networks.build(preset, img_resolution=8, in_channels=2, **SMALL_PRESETS[preset], **kw).double().eval()


@pytest.mark.parametrize("preset", list(SMALL_PRESETS))
def test_the_second_noise_input_starts_at_zero_and_old_weights_load(preset):
    """Off (the default) the network has exactly its old parameters; on, an old network's weights load (the new
    input keeps its zero start) and the output is the old one for any second level, until the new weights move."""
    old = _build(preset)
    new = _build(preset, second_noise=True)
    extra = set(new.state_dict()) - set(old.state_dict())
    assert extra and all("noise2" in k for k in extra) and set(old.state_dict()) <= set(new.state_dict())
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.1 * torch.randn_like(p))
    load_initial_weights(new, old.state_dict())
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 2, 8, 8, generator=g, dtype=F64), torch.tensor([0.3, 0.9], dtype=F64)
    for c2 in (None, torch.tensor([0.0, 0.0], dtype=F64), torch.tensor([0.5, -0.2], dtype=F64)):
        torch.testing.assert_close(new(x, c, c_noise2=c2), old(x, c), rtol=0, atol=0)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if "noise2" in name:
                p.add_(0.5)
    assert not torch.allclose(new(x, c, c_noise2=torch.tensor([0.5, -0.2], dtype=F64)), new(x, c))
    with pytest.raises(ValueError, match=r"no second noise input .*\(network.second_noise=true\)"):
        old(x, c, c_noise2=c)


def test_the_second_input_is_c_noise_of_sigma_minus_c_noise_of_sigma_r():
    """Precond's sigma_r feeds c_noise(σ) − c_noise(σ_r): for flow matching t − r."""
    seen = {}

    def net(x, c_noise, class_labels=None, c_noise2=None):
        seen["c2"] = c_noise2
        return x

    den = edm.Precond(net, kind="fm")
    t, r = torch.tensor([0.9, 0.5], dtype=F64), torch.tensor([0.2, 0.5], dtype=F64)
    den(torch.zeros(2, 3, dtype=F64), t / (1 - t), sigma_r=r / (1 - r))
    torch.testing.assert_close(seen["c2"], t - r)


class GaussianFlow(torch.nn.Module):
    """The exact average velocity of flow matching for 1-D data N(μ, s²), as a flow-matching denoiser: z_t has mean
    m_t = (1 − t)μ and sd_t = sqrt((1 − t)²s² + t²), its flow map is affine, z_r = m_r + (sd_r/sd_t)(z_t − m_t),
    u = (z_t − z_r)/(t − r) (at r = t the velocity −μ + (sd_t'/sd_t)(z_t − m_t)), and D = z_t − t·u."""

    def __init__(self, mu: float, s: float) -> None:
        super().__init__()
        self.mu, self.s = mu, s

    def moments(self, t):
        sd = ((1 - t) ** 2 * self.s**2 + t**2).sqrt()
        return (1 - t) * self.mu, sd, (t - (1 - t) * self.s**2) / sd

    def u(self, z, r, t):
        m_t, sd_t, dsd_t = self.moments(t)
        m_r, sd_r, _ = self.moments(r)
        same = (t - r).abs() < 1e-12
        gap = torch.where(same, torch.ones_like(t), t - r)
        average = (z - m_r.view(-1, 1) - (sd_r / sd_t).view(-1, 1) * (z - m_t.view(-1, 1))) / gap.view(-1, 1)
        velocity = -self.mu + (dsd_t / sd_t).view(-1, 1) * (z - m_t.view(-1, 1))
        return torch.where(same.view(-1, 1), velocity, average)

    def forward(self, x_hat, sigma, class_labels=None, sigma_r=None):
        t = sigma / (1 + sigma)
        r = t if sigma_r is None else sigma_r / (1 + sigma_r)
        z = x_hat * (1 - t).view(-1, 1)
        return z - t.view(-1, 1) * self.u(z, r, t)


def test_the_exact_average_velocity_is_a_fixed_point_of_meanflows_loss():
    """For Gaussian data the exact u satisfies MeanFlow's identity u = v − (t − r) du/dt along every path, so the loss
    vanishes for r ≠ t as for r = t; the flow-matching velocity in its place (u(z, r, t) = v(z, t)) does not."""
    flow = GaussianFlow(mu=0.7, s=0.4)
    g = torch.Generator().manual_seed(0)
    n = torch.randn(6, 1, generator=g, dtype=F64)
    y = 0.7 + 0.4 * torch.randn(6, 1, generator=g, dtype=F64)
    t = torch.tensor([0.2, 0.5, 0.9, 0.95, 0.6, 0.3], dtype=F64)
    r = torch.tensor([0.0, 0.1, 0.3, 0.95, 0.59, 0.3], dtype=F64)
    loss = MeanFlowLoss(adaptive_p=0.0)
    u = average_velocity(flow, (1 - t).view(-1, 1) * y + t.view(-1, 1) * n, r, t)
    assert u.shape == (6, 1)
    # The loss's own path: z_t = (1 − t) y + t n with v = n − y. The exact u's target equals u only on the flow's
    # trajectories, i.e. with v the flow's velocity at z_t; MeanFlow's conditional v averages to it: check both.
    z = (1 - t).view(-1, 1) * y + t.view(-1, 1) * n
    v_flow = flow.u(z, t, t)
    value = loss(flow, z - t.view(-1, 1) * v_flow, t=t, r=r, noise=z + (1 - t).view(-1, 1) * v_flow)
    assert value.abs().max() < 1e-20, value
    instantaneous = lambda x_hat, sigma, labels=None, sigma_r=None: flow(x_hat, sigma, labels)  # noqa: E731
    wrong = loss(instantaneous, z - t.view(-1, 1) * v_flow, t=t, r=r, noise=z + (1 - t).view(-1, 1) * v_flow)
    assert (wrong[(t - r).abs() > 0.05] > 1e-6).all() and wrong[(t - r).abs() < 1e-12].abs().max() < 1e-20


def test_meanflow_at_r_equal_t_is_the_flow_matching_loss():
    """r = t and p = 0: ‖u − v‖² = λ(σ)‖D − y‖², edm.Loss's flow-matching loss, on a network with a second input."""
    torch.manual_seed(0)
    net = networks.build("tiny", img_resolution=8, in_channels=1, model_channels=8, second_noise=True).double()
    den = edm.Precond(net, kind="fm")
    g = torch.Generator().manual_seed(1)
    y, n = torch.randn(4, 1, 8, 8, generator=g, dtype=F64), torch.randn(4, 1, 8, 8, generator=g, dtype=F64)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=F64)
    fm = edm.Loss(edm.schedules.FlowMatching())(den, y, sigma=t / (1 - t), noise=n)
    torch.testing.assert_close(MeanFlowLoss(adaptive_p=0.0)(den, y, t=t, r=t.clone(), noise=n), fm, rtol=1e-10, atol=0)
    adaptive = MeanFlowLoss(adaptive_p=1.0, adaptive_c=1e-3)(den, y, t=t, r=t.clone(), noise=n)
    torch.testing.assert_close(adaptive, fm / (fm + 1e-3), rtol=1e-10, atol=0)


def test_the_time_pairs_are_ordered_and_a_quarter_apart():
    t, r = MeanFlowLoss().sample_tr(20000, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert (r <= t).all() and (t < 1).all() and (r > 0).all()
    apart = (r < t).double().mean().item()
    assert abs(apart - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 20000)


def test_one_meanflow_step_with_the_exact_average_velocity_is_the_flow_map():
    """sampler=meanflow: z_0 = z_{t_0} − t_0·u(z_{t_0}, 0, t_0), the flow's affine map to the data, in one evaluation."""
    flow = GaussianFlow(mu=0.7, s=0.4)
    noise = torch.randn(5, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    sched = edm.schedules.FlowMatching()
    calls = []
    counted = lambda x, s, c=None, sigma_r=None: calls.append(1) or flow(x, s, c, sigma_r)  # noqa: E731
    out = edm.sample(counted, noise, sched, num_steps=1, solver="meanflow")
    t0 = sched.time_steps(1)[0]
    z = sched.scale(t0) * sched.sigma(t0) * noise
    m, sd, _ = flow.moments(t0.reshape(1))
    torch.testing.assert_close(out, 0.7 + 0.4 * (z - m) / sd, rtol=1e-12, atol=1e-12)
    assert len(calls) == 1
    two = edm.sample(flow, noise, sched, num_steps=2, solver="meanflow")
    torch.testing.assert_close(two, out, rtol=1e-10, atol=1e-12)  # the exact u composes: any grid, one map


@pytest.mark.parametrize("schedule", ["fm", "edm", "vp", "ve", "trigflow"])
def test_meanflow_steps_with_the_exact_average_velocity_are_the_flow_map_on_every_schedule(schedule):
    """The average velocity is a function of (x̂, σ, σ_r), whatever the schedule: a jump is x̂_r = (σ_r/σ)·x̂ +
    (1 − σ_r/σ)·D(x̂; σ, σ_r), so 1, 2 or 3 steps land on the PF-ODE's map of N(μ, s²) data from σ_0 to 0,
    x̂_0 = μ + s·(x̂ − μ)/sqrt(s² + σ_0²), on every schedule (not only where an Euler step in t is that jump)."""
    flow = GaussianFlow(mu=0.7, s=0.4)
    sched = edm.schedules.get(schedule)
    noise = torch.randn(5, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    for steps in (1, 2, 3):
        out = edm.sample(flow, noise, sched, num_steps=steps, solver="meanflow")
        sigma_0 = sched.sigma(sched.time_steps(steps + 1, dtype=F64)[0])
        exact = 0.7 + 0.4 * noise * sigma_0 / (0.4**2 + sigma_0**2).sqrt() - 0.7 * 0.4 / (0.4**2 + sigma_0**2).sqrt()
        torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-12)


def test_n_meanflow_steps_are_n_jumps_none_spent_between_sigma_min_and_0():
    """The default meanflow grid is the (N + 1)-point schedule grid less σ_min: each evaluation jumps from one grid
    point to the next, the last to 0. With a flow-matching model (u = v, so each jump is an Euler step) on N(μ, s²)
    data, the samples' spread then grows towards s with the steps."""
    flow = GaussianFlow(mu=0.7, s=0.4)
    sched = edm.schedules.FlowMatching()
    instantaneous = lambda x_hat, sigma, labels=None, sigma_r=None: (calls.append((sigma[0].item(), sigma_r[0].item()))
                                                                      or flow(x_hat, sigma, labels))  # noqa: E731
    noise = torch.randn(4000, 1, generator=torch.Generator().manual_seed(3), dtype=F64)
    spread = {}
    for n in (1, 2, 4):
        calls = []
        spread[n] = edm.sample(instantaneous, noise, sched, num_steps=n, solver="meanflow").std().item()
        t = sched.time_steps(n + 1, dtype=F64)
        jumps = torch.cat([t[:n], t[-1:]])
        expected = [sched.sigma(point).item() for pair in zip(jumps[:-1], jumps[1:]) for point in pair]
        assert [sigma for call in calls for sigma in call] == pytest.approx(expected, rel=1e-12) and len(calls) == n
        assert all(sigma > 2 * sched.sigma_min for sigma, _ in calls)  # no evaluation at σ_min
    # One Euler step from t_0 ≈ 1 lands on the mean; a second from t ≈ 1/2 restores a spread of order s (a jump from
    # σ_min would move z by about σ_min·u only), and more steps come closer to s (Euler from below).
    assert spread[1] < 0.01 and 0.1 < spread[2] < spread[4] < 0.4


def test_recipe_meanflow_trains_and_samples_in_one_step(compose_train, tmp_path):
    """recipe=meanflow: flow matching with the second input, finite losses, a one-step grid, a model that samples
    with sampler=meanflow (and with the ODE solvers: at r = t it is a flow-matching model); wrong pairings fail."""
    import json

    from edm.models.loading import load_model
    from edm.training.loop import train

    result = train(compose_train("recipe=meanflow"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(math.isfinite(r["loss"]) for r in records)
    assert (tmp_path / "run" / "samples-final.png").exists()
    den, info = load_model(result.checkpoint)
    assert info.objective == "meanflow" and den.net.map_noise2 is not None
    info.check_solver("meanflow")
    info.check_solver("heun")
    x = edm.sample(den, torch.randn(2, 1, 8, 8), info.schedule, num_steps=1, solver="meanflow")
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="needs the network's second noise input .* set network.second_noise=true"):
        train(compose_train("recipe=meanflow", "network.second_noise=false", run_dir=tmp_path / "b"))
    with pytest.raises(ValueError, match="objective=meanflow trains a flow-matching model .* not kind edm"):
        train(compose_train("recipe=meanflow", "schedule=edm", run_dir=tmp_path / "c"))
    with pytest.raises(ValueError, match="sampler=meanflow samples MeanFlow models"):
        train(compose_train("sampler=meanflow", run_dir=tmp_path / "d"))


def test_recipe_meanflow_tunes_a_flow_matching_run(compose_train, tmp_path, caplog):
    """init= a flow-matching run: its network gains the zero-initialized second input and its weights load."""
    from edm.models import checkpoint as ckpt
    from edm.training.loop import train

    teacher = train(compose_train("schedule=fm", run_dir=tmp_path / "fm")).checkpoint
    result = train(compose_train("recipe=meanflow", f"init={teacher}", run_dir=tmp_path / "mf"))
    state = ckpt.load_checkpoint(result.checkpoint)
    assert state["denoiser"]["network"]["second_noise"] is True
    edm_run = train(compose_train(run_dir=tmp_path / "edm")).checkpoint
    with pytest.raises(ValueError, match="not kind edm: init= a model trained with schedule=fm .*edm.* was trained with "
                                         "precond kind edm"):
        train(compose_train("recipe=meanflow", f"init={edm_run}", run_dir=tmp_path / "mf2"))
    # one error: no note first that the run trains with schedule=fm and that schedule=edm would keep the model's
    assert "keeps the model's schedule" not in caplog.text


@pytest.mark.parametrize("preset", list(SMALL_PRESETS))
def test_the_noise_embedding_stays_in_float32_under_bf16_autocast(preset, monkeypatch):
    """Under bf16 autocast the convolutions run in bf16 but the noise-level embedding (both levels) in float32, as
    few-step losses that differentiate in time need."""
    net = networks.build(preset, img_resolution=8, in_channels=2, second_noise=True, **SMALL_PRESETS[preset])
    seen = []
    embed = net.embed
    monkeypatch.setattr(net, "embed", lambda *a, **k: seen.append(embed(*a, **k)) or seen[-1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 2, 8, 8), torch.tensor([0.1, 0.5]), c_noise2=torch.tensor([0.2, 0.0]))
    assert seen[0].dtype == torch.float32 and out.dtype == torch.bfloat16


def test_a_time_pair_given_in_half_is_refused():
    """t and r are one draw (t ≥ r): t given without r (or r without t) was dropped and both redrawn."""
    y = torch.randn(3, 1, 4, 4, dtype=F64)
    den = lambda x, sigma, labels=None, sigma_r=None: x  # noqa: E731 (never called)
    t = torch.full((3,), 0.5, dtype=F64)
    for half in ({"t": t}, {"r": t}):
        with pytest.raises(ValueError, match=r"give both \(r = t for the flow-matching loss\), or neither"):
            MeanFlowLoss()(den, y, **half)
