"""edm/core/denoisers.py: the ideal denoiser against a direct computation, guidance, the autocast/compile fast path."""

import math

import pytest
import torch

import edm
from edm.core.denoisers import GuidedDenoiser, fast_denoiser

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


# ----------------------------------------------------------------------------- wrappers


def test_guidance_combines_the_conditional_and_unconditional_calls():
    calls = []

    def den(x, sigma, class_labels):
        calls.append(len(x))
        return x + class_labels.sum(1, keepdim=True).reshape(-1, 1, 1, 1) * 1.0 + 0.5

    x = torch.zeros(3, 1, 2, 2)
    sigma = torch.ones(3)
    labels = torch.eye(3)
    cond = den(x, sigma, labels)
    uncond = den(x, sigma, torch.zeros_like(labels))
    calls.clear()
    torch.testing.assert_close(GuidedDenoiser(den, 1.0)(x, sigma, labels), cond)
    torch.testing.assert_close(GuidedDenoiser(den, 0.0)(x, sigma, labels), uncond)
    torch.testing.assert_close(GuidedDenoiser(den, 2.5)(x, sigma, labels), uncond + 2.5 * (cond - uncond))
    assert calls == [3, 6, 6]  # w = 1 is one plain call; otherwise one call on a doubled batch


# Guidance against closed forms: the ideal denoisers of two finite data sets, A (main) and B (guide).

def _two_ideal_denoisers():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 1, 2, 2, generator=g, dtype=F64), torch.randn(7, 1, 2, 2, generator=g, dtype=F64) * 0.7
    return edm.IdealDenoiser(a), edm.IdealDenoiser(b)


class _Counted(torch.nn.Module):
    """A denoiser that counts the items it evaluates."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser, self.items = denoiser, 0

    def forward(self, x, sigma, class_labels=None):
        self.items += x.shape[0]
        return self.denoiser(x, sigma, class_labels)


@pytest.mark.parametrize("schedule", ["vp", "ve", "edm", "fm", "trigflow"])
@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m"])
def test_autoguided_sampling_follows_the_closed_form_for_every_schedule_and_solver(schedule, solver):
    """With σ in (0.2, 5] guided: x follows D_B + w (D_A − D_B) = (1 − w) D_B + w D_A inside the interval
    and D_A outside, to float64 round-off; the guide costs one evaluation per item only inside it."""
    d_a, d_b = _two_ideal_denoisers()
    w, (lo, hi) = 2.5, (0.2, 5.0)

    def closed_form(x, sigma, class_labels=None):
        inside = ((sigma > lo) & (sigma <= hi)).view(-1, 1, 1, 1)
        return torch.where(inside, (1 - w) * d_b(x, sigma) + w * d_a(x, sigma), d_a(x, sigma))

    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    main, guide = _Counted(d_a), _Counted(d_b)
    guided = GuidedDenoiser(main, w, guide=guide, interval=(lo, hi))
    got = edm.sample(guided, noise, schedule, num_steps=12, solver=solver)
    torch.testing.assert_close(got, edm.sample(closed_form, noise, schedule, num_steps=12, solver=solver), rtol=1e-10, atol=1e-10)
    sched = edm.schedules.get(schedule)
    t_steps = sched.time_steps(12, dtype=F64)
    evaluated = []  # σ of every denoiser call of the solver, from an unguided run
    edm.sample(lambda x, s, c=None: evaluated.append(float(s.flatten()[0])) or d_a(x, s), noise, sched, t_steps=t_steps, solver=solver)
    inside = sum(lo < s <= hi for s in evaluated)
    assert 0 < inside < len(evaluated)  # the interval splits the trajectory
    assert main.items == 4 * len(evaluated) and guide.items == 4 * inside
    assert guided.evaluations == 4 * (len(evaluated) + inside)  # per image: one a step, two where guided


@pytest.mark.parametrize("schedule", ["vp", "edm"])
def test_guidance_is_exactly_the_main_denoiser_at_w_1_or_outside_its_interval(schedule):
    d_a, d_b = _two_ideal_denoisers()
    noise = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    plain = edm.sample(d_a, noise, schedule, num_steps=8)
    guide = _Counted(d_b)
    at_one = GuidedDenoiser(d_a, 1.0, guide=guide)
    assert torch.equal(edm.sample(at_one, noise, schedule, num_steps=8), plain)
    nowhere = GuidedDenoiser(d_a, 3.0, guide=guide, interval=(1e6, 1e7))  # σ never exceeds 1e6
    assert torch.equal(edm.sample(nowhere, noise, schedule, num_steps=8), plain)
    assert guide.items == 0


def test_guidance_options_are_checked():
    with pytest.raises(ValueError, match="interval"):
        GuidedDenoiser(lambda x, s, c=None: x, 2.0, interval=(3.0, 1.0))
    with pytest.raises(ValueError, match="needs class labels"):
        GuidedDenoiser(lambda x, s, c=None: x, 2.0)(torch.zeros(2, 1, 2, 2), torch.ones(2))


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf])
def test_a_guidance_weight_that_is_not_a_finite_number_is_refused(weight):
    with pytest.raises(ValueError, match=f"guidance={weight}: the guidance weight must be a finite number"):
        GuidedDenoiser(lambda x, s, c=None: x, weight, guide=lambda x, s, c=None: x)


def _tiny_denoiser(label_dim: int = 0) -> edm.Precond:
    torch.manual_seed(0)
    net = edm.networks.build("tiny", img_resolution=8, in_channels=1, model_channels=8, label_dim=label_dim)
    return edm.Precond(net, kind="edm").eval()


@pytest.mark.parametrize("mixed_precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_fast_denoiser_runs_the_network_in_half_precision(mixed_precision, dtype):
    """Convolutions see bf16/fp16; D comes back in x̂'s dtype, within half-precision tolerance of fp32."""
    den = _tiny_denoiser(label_dim=3)
    seen = []
    hook = den.net.enc["8x8_conv"].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    fast = fast_denoiser(den, mixed_precision)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0])
    labels = torch.eye(3)[[0, 1, 2, 0]]
    with torch.no_grad():
        ref, out = den(x, sigma, labels), fast(x, sigma, labels)
    hook.remove()
    assert seen == [torch.float32, dtype] and out.dtype == torch.float32
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 2e-2, rel
    assert fast_denoiser(den, "no") is den


def test_fast_denoiser_channels_last_is_the_same_function():
    den = _tiny_denoiser(label_dim=3)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma, labels = torch.tensor([0.01, 0.5, 3.0, 80.0]), torch.eye(3)[[0, 1, 2, 0]]
    with torch.no_grad():
        ref = den(x, sigma, labels)
        fast = fast_denoiser(den, "no", channels_last=True)
        out = fast(x, sigma, labels)
    big = max((p for p in den.parameters() if p.ndim == 4), key=torch.numel)
    assert big.is_contiguous(memory_format=torch.channels_last) and not big.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_fast_denoiser_rejects_unknown_precisions():
    with pytest.raises(ValueError, match="mixed_precision 'int8' is not valid; choose one of: no, fp16, bf16"):
        fast_denoiser(_tiny_denoiser(), "int8")


@pytest.mark.slow
def test_compiled_denoiser_matches_eager():
    """compile=true (inductor on CPU) gives the eager denoiser's samples; a new σ does not recompile."""
    torch._dynamo.reset()
    den = _tiny_denoiser()
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fast = fast_denoiser(den, "no", compile=True)
    with torch.no_grad():
        ref = edm.sample(den, noise, "edm", num_steps=4)
        out = edm.sample(fast, noise, "edm", num_steps=4)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
