"""Preconditioning: the coefficient table of docs/design.md and the wrapper's wiring."""

import math

import pytest
import torch

import edm
from edm.core.losses import loss_weight
from tests.test_schedules import _iddpm_levels

F64 = torch.float64
SIGMAS = [0.002, 0.1, 0.5, 1.0, 7.3, 80.0]
KINDS = list(edm.precond.PRECOND_KINDS)  # every row: a new one is checked against its _table entry


def _table(kind: str, s: float, sd: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) from docs/design.md, scalar math."""
    if kind == "vp":
        bd, bm = 19.9, 0.1
        t = (math.sqrt(bm**2 + 2 * bd * math.log(s**2 + 1)) - bm) / bd
        return 1.0, -s, 1 / math.sqrt(s**2 + 1), 999 * t
    if kind == "ve":
        return 1.0, s, 1.0, math.log(s / 2)
    if kind == "edm":
        return sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2), 1 / math.sqrt(s**2 + sd**2), 0.25 * math.log(s)
    if kind == "trigflow":  # t = arctan(σ/σ_d): cos² t, −σ_d sin t, cos t/σ_d, t
        t = math.atan(s / sd)
        return math.cos(t) ** 2, -sd * math.sin(t), math.cos(t) / sd, t
    if kind == "iddpm":  # c_noise = M − 1 − argmin_j |u_j − σ|
        u = _iddpm_levels()
        return 1.0, -s, 1 / math.sqrt(s**2 + 1), 999 - min(range(len(u)), key=lambda j: abs(u[j] - s))
    if kind == "fm":
        return 1 / (1 + s), -s / (1 + s), 1 / (1 + s), s / (1 + s)
    raise AssertionError(f"precond kind {kind!r} has no reference row: write its c_skip, c_out, c_in, c_noise from "
                         "docs/design.md's table into tests/test_precond.py's _table")


@pytest.mark.parametrize("kind", KINDS)
def test_coefficients_match_table(kind):
    den = edm.Precond(torch.nn.Identity(), kind=kind, sigma_data=0.5)
    sigma = torch.tensor(SIGMAS, dtype=F64)
    got = den.coefficients(sigma)
    for j, name in enumerate(("c_skip", "c_out", "c_in", "c_noise")):
        expected = torch.tensor([_table(kind, s)[j] for s in SIGMAS], dtype=F64)
        torch.testing.assert_close(got[j], expected, rtol=1e-10, atol=1e-14, msg=f"{kind} {name}")


@pytest.mark.parametrize("kind", KINDS)
def test_weight_times_c_out_squared_is_one(kind):
    sigma = torch.logspace(-3, 2, 50, dtype=F64)
    c_out = edm.Precond(torch.nn.Identity(), kind=kind, sigma_data=0.3).coefficients(sigma).c_out
    torch.testing.assert_close(loss_weight(sigma, kind, sigma_data=0.3) * c_out**2, torch.ones_like(sigma))


class _Recorder(torch.nn.Module):
    """F(x, c_noise) = x·a + c_noise; remembers what it was called with."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7, dtype=F64))

    def forward(self, x, c_noise, class_labels=None):
        self.seen = (x, c_noise, class_labels)
        return x * self.a + c_noise.view(-1, 1, 1, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_wrapper_computes_d_from_f(kind):
    net = _Recorder()
    den = edm.Precond(net, kind=kind)
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    sigma = torch.tensor([0.05, 1.0, 20.0], dtype=F64)
    labels = torch.eye(3, dtype=F64)
    out = den(x, sigma, labels)
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in den.coefficients(sigma))
    expected = c_skip * x + c_out * (c_in * x * 0.7 + c_noise)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(net.seen[0], c_in * x)
    torch.testing.assert_close(net.seen[1], c_noise.flatten())
    assert net.seen[2] is labels


@pytest.mark.parametrize("kind, target", [("vp", "n"), ("iddpm", "n"), ("fm", "n - y")])
def test_network_targets(kind, target):
    """With vp and iddpm the network predicts n, with fm the velocity n − y: feeding the true target gives D = y."""
    y, n = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0], dtype=F64)
    oracle = (lambda x, c, class_labels=None: n) if target == "n" else (lambda x, c, class_labels=None: n - y)
    den = edm.Precond(oracle, kind=kind)
    torch.testing.assert_close(den(y + sigma[:, None] * n, sigma), y)


def test_trigflow_row_is_scms_parameterization():
    """With x_t = cos t·x̂ (s(t) = cos t) and t = arctan(σ/σ_d), D(x̂; σ) is sCM's consistency function
    f(x_t, t) = cos t·x_t − sin t·σ_d F(x_t/σ_d, t); fed the velocity dx_t/dt = cos t·z − sin t·y (z = σ_d n) as
    σ_d F, it returns y; and its loss λ‖D − y‖² is TrigFlow's diffusion loss ‖σ_d F − dx_t/dt‖² over σ_d²."""
    sd = 0.6
    g = torch.Generator().manual_seed(0)
    y, n = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    t = torch.tensor([0.01, 0.3, 0.8, 1.2, 1.55], dtype=F64)
    sched = edm.schedules.get("trigflow", sigma_data=sd)
    sigma = sched.sigma(t)
    x_hat = y + sigma[:, None] * n
    x_t = sched.scale(t)[:, None] * x_hat
    torch.testing.assert_close(x_t, torch.cos(t)[:, None] * y + torch.sin(t)[:, None] * sd * n)

    def F(x, c_noise, class_labels=None):
        return torch.sin(3 * x) + c_noise[:, None] ** 2

    den = edm.Precond(F, kind="trigflow", sigma_data=sd)
    f_scm = torch.cos(t)[:, None] * x_t - torch.sin(t)[:, None] * sd * F(x_t / sd, t)
    torch.testing.assert_close(den(x_hat, sigma), f_scm, rtol=1e-12, atol=1e-12)

    velocity = torch.cos(t)[:, None] * sd * n - torch.sin(t)[:, None] * y
    oracle = edm.Precond(lambda x, c, class_labels=None: velocity / sd, kind="trigflow", sigma_data=sd)
    torch.testing.assert_close(oracle(x_hat, sigma), y, rtol=1e-12, atol=1e-12)

    loss = edm.Loss(sched, sigma_data=sd)
    assert (loss.kind, loss.P_mean, loss.P_std) == ("trigflow", -1.0, 1.4)
    expected = (sd * F(x_t / sd, t) - velocity).pow(2).sum(1) / sd**2
    torch.testing.assert_close(loss(den, y, sigma=sigma, noise=n), expected, rtol=1e-10, atol=1e-12)


def test_scalar_sigma_broadcasts_and_bad_shapes_fail():
    den = edm.Precond(lambda x, c, class_labels=None: x, kind="edm")
    x = torch.randn(5, 3)
    torch.testing.assert_close(den(x, 0.5), den(x, torch.full((5,), 0.5)))
    with pytest.raises(ValueError, match=r"sigma must have shape \[batch\]"):
        den(x, torch.ones(4))
    bad = edm.Precond(lambda x, c, class_labels=None: x[:, :2], kind="edm")
    with pytest.raises(ValueError, match="network output shape"):
        bad(x, 0.5)


def test_unknown_kind_lists_valid():
    with pytest.raises(ValueError, match="precond kind 'adm' is not valid; choose one of: vp, ve, edm, fm, trigflow, iddpm"):
        edm.Precond(torch.nn.Identity(), kind="adm")


def test_iddpm_c_noise_is_the_index_of_the_nearest_level_counted_from_the_end():
    """At σ = u_j, c_noise = M − 1 − j; between two levels, the nearer one's; M, C_1 and C_2 are the Precond's."""
    u = _iddpm_levels(40, 0.002, 0.1)
    den = edm.Precond(torch.nn.Identity(), kind="iddpm", M=40, C_1=0.002, C_2=0.1)
    j = torch.tensor([0, 3, 17, 39, 40])
    sigma = torch.tensor([u[k] for k in j], dtype=F64)
    torch.testing.assert_close(den.coefficients(sigma).c_noise, (39 - j).to(F64))
    between = torch.tensor([0.51 * u[17] + 0.49 * u[18], 0.49 * u[17] + 0.51 * u[18]], dtype=F64)
    torch.testing.assert_close(den.coefficients(between).c_noise, torch.tensor([22.0, 21.0], dtype=F64))


def test_iddpm_c_noise_is_exact_in_half_precision():
    """c_noise = M − 1 − j up to 999 is not representable in bfloat16: the index stays float32."""
    u = _iddpm_levels()
    sigma = torch.tensor([u[2], u[500], u[997]], dtype=torch.bfloat16)
    j = edm.schedules.IDDPM().index(sigma)
    assert j.dtype == torch.float32
    c_noise = edm.Precond(torch.nn.Identity(), kind="iddpm").coefficients(sigma).c_noise
    nearest = [min(range(len(u)), key=lambda k: abs(u[k] - float(s))) for s in sigma]
    assert c_noise.tolist() == [999.0 - k for k in nearest]


def test_iddpm_uses_the_first_half_of_a_network_with_twice_the_channels():
    """iDDPM's network outputs n and then its learned variance: D takes the first C channels; other kinds refuse."""
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    sigma = torch.tensor([0.5, 3.0], dtype=F64)
    n, variance = torch.randn_like(x), torch.randn_like(x)
    net = lambda x_in, c_noise, class_labels=None: torch.cat([n, variance], 1)  # noqa: E731
    den = edm.Precond(net, kind="iddpm")
    torch.testing.assert_close(den(x, sigma), x - sigma.view(-1, 1, 1, 1) * n)
    with pytest.raises(ValueError, match=r"network output shape \[2, 6, 4, 4\] differs from its input \[2, 3, 4, 4\]$"):
        edm.Precond(net, kind="vp")(x, sigma)


def test_network_dtype_is_cast_back_in_one_place():
    net = torch.nn.Conv2d(2, 2, 1).to(torch.bfloat16)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = net

        def forward(self, x, c, class_labels=None):
            assert x.dtype == torch.bfloat16 and c.dtype == torch.bfloat16
            return self.conv(x)

    den = edm.Precond(Wrap(), kind="edm")
    out = den(torch.randn(2, 2, 4, 4), torch.tensor([0.5, 2.0]))
    assert out.dtype == torch.float32


def test_every_kinds_coefficients_trace_into_one_graph_without_breaks():
    """torch.compile puts the network and its preconditioning in one graph (fast_denoiser's fullgraph): the table,
    including the VP and iDDPM rows and the schedule objects they make, traces without a graph break."""
    sigma = torch.rand(4, dtype=torch.float32) * 80 + 0.01
    for kind in edm.precond.PRECOND_KINDS:
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda s: sum(edm.precond.coefficients(s, kind)))(sigma)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (kind, explained.break_reasons)
