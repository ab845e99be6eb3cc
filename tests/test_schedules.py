"""Schedules: σ(t), s(t), derivatives and inverses against the closed forms of docs/design.md, in float64."""

import math
import re

import pytest
import torch

import edm
from edm.core.schedules import DISCRETIZATIONS, EDM, IDDPM, VE, VP, FlowMatching

F64 = torch.float64


def _reference(name: str):
    """σ(t) and s(t) written out independently from the docs/design.md table, with scalar math."""
    bd, bm = 19.9, 0.1
    table = {
        "vp": (lambda t: math.sqrt(math.exp(0.5 * bd * t * t + bm * t) - 1),
               lambda t: 1 / math.sqrt(1 + (math.exp(0.5 * bd * t * t + bm * t) - 1))),
        "ve": (lambda t: math.sqrt(t), lambda t: 1.0),
        "edm": (lambda t: t, lambda t: 1.0),
        "fm": (lambda t: t / (1 - t), lambda t: 1 - t),
        "trigflow": (lambda t: 0.5 * math.tan(t), lambda t: math.cos(t)),
        "iddpm": (lambda t: t, lambda t: 1.0),
    }
    assert name in table, (f"schedule {name!r} has no reference: write its σ(t), s(t) from its paper into "
                           "tests/test_schedules.py's _reference (docs/design.md, Conventions: a new schedule)")
    return table[name]


TIMES = {
    "vp": [1e-3, 0.01, 0.2, 0.5, 0.9, 1.0],
    "ve": [4e-4, 0.01, 1.0, 37.0, 1e4],
    "edm": [0.002, 0.1, 1.0, 13.0, 80.0],
    "fm": [0.002, 0.1, 0.5, 0.9, 0.98],
    "trigflow": [0.004, 0.1, 0.7, 1.2, 1.5],
    "iddpm": [0.0065, 0.1, 1.0, 13.0, 80.2],
}


def _times(name: str) -> list[float]:
    """TIMES of a schedule, or an assertion that asks for them."""
    assert name in TIMES, (f"schedule {name!r} has no test times: write times in its range into tests/test_schedules.py's "
                           "TIMES (docs/design.md, Conventions: a new schedule)")
    return TIMES[name]


ALL = list(edm.schedules.SCHEDULES)  # every registered schedule: a new one is checked against its _reference
TABLE_1 = ["vp", "ve", "edm", "fm", "trigflow", "iddpm"]  # EDM Table 1's schedules, each its own parameterization


def _iddpm_levels(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008) -> list[float]:
    """u_0..u_M by EDM Table 1's recurrence, scalar math: u_M = 0, u_{j−1} = sqrt((u_j² + 1)/max(ᾱ_{j−1}/ᾱ_j, C_1) − 1),
    ᾱ_j = sin²(π/2 · j/(M(C_2 + 1)))."""
    alpha_bar = lambda j: math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2  # noqa: E731
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C_1) - 1)
    return u


@pytest.mark.parametrize("name", ALL)
def test_sigma_and_scale_match_formulas(name):
    sched = edm.schedules.get(name)
    sigma_ref, scale_ref = _reference(name)
    t = torch.tensor(_times(name), dtype=F64)
    expected_sigma = torch.tensor([sigma_ref(v) for v in _times(name)], dtype=F64)
    expected_scale = torch.tensor([scale_ref(v) for v in _times(name)], dtype=F64)
    torch.testing.assert_close(sched.sigma(t), expected_sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.scale(t), expected_scale, rtol=1e-12, atol=0)
    assert sched.sigma(t).dtype == F64


@pytest.mark.parametrize("name", ALL)
def test_derivatives_match_autograd(name):
    sched = edm.schedules.get(name)
    t = torch.tensor(_times(name), dtype=F64, requires_grad=True)
    # `+ 0 * t` keeps constant functions (s = 1, σ' = 1) in the graph so their gradient is 0.
    (dsigma,) = torch.autograd.grad((sched.sigma(t) + 0 * t).sum(), t)
    (dscale,) = torch.autograd.grad((sched.scale(t) + 0 * t).sum(), t)
    torch.testing.assert_close(sched.sigma_deriv(t.detach()), dsigma, rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(sched.scale_deriv(t.detach()), dscale, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("name", ALL)
def test_sigma_inv_round_trips(name):
    sched = edm.schedules.get(name)
    t = torch.tensor(_times(name), dtype=F64)
    torch.testing.assert_close(sched.sigma_inv(sched.sigma(t)), t, rtol=1e-10, atol=1e-13)
    sigma = torch.tensor([0.002, 0.05, 1.0, 10.0, 80.0], dtype=F64)
    torch.testing.assert_close(sched.sigma(sched.sigma_inv(sigma)), sigma, rtol=1e-10, atol=0)


def test_vp_sigma_inv_formula():
    sigma = torch.tensor([0.01, 0.5, 3.0, 150.0], dtype=F64)
    bd, bm = 19.9, 0.1
    expected = [(math.sqrt(bm**2 + 2 * bd * math.log(s**2 + 1)) - bm) / bd for s in sigma.tolist()]
    torch.testing.assert_close(VP().sigma_inv(sigma), torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)


def test_float_input_gives_float64_and_tensors_keep_dtype():
    assert VP().sigma(0.5).dtype == F64
    assert EDM().sigma(torch.tensor([1.0], dtype=torch.float32)).dtype == torch.float32


def test_default_ranges():
    assert VP().t_max == 1.0 and VP().t_min == pytest.approx(1e-3, rel=1e-12)
    assert VE().t_min == pytest.approx(0.02**2) and VE().t_max == pytest.approx(100.0**2)
    assert EDM().t_min == pytest.approx(0.002) and EDM().t_max == pytest.approx(80.0)
    assert FlowMatching().t_max == pytest.approx(80 / 81)


# ------------------------------------------------------------------ time steps


def test_default_time_steps_follow_edm_table_1():
    N = 7
    i = torch.arange(N, dtype=F64)
    # VP: uniform in t from 1 to ε_s.
    vp = VP().time_steps(N)
    torch.testing.assert_close(vp[:-1], 1 + i / (N - 1) * (1e-3 - 1), rtol=1e-12, atol=0)
    # VE: geometric in σ from σ_max to σ_min, t = σ².
    ve = VE().time_steps(N)
    torch.testing.assert_close(ve[:-1], 100.0**2 * (0.02**2 / 100.0**2) ** (i / (N - 1)), rtol=1e-12, atol=0)
    # EDM: ρ = 7.
    edm_t = EDM().time_steps(N)
    expected = (80 ** (1 / 7) + i / (N - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(edm_t[:-1], expected, rtol=1e-12, atol=0)
    # Flow matching: uniform in t.
    fm = FlowMatching().time_steps(N)
    assert torch.allclose(fm[:-2] - fm[1:-1], fm[0] - fm[1], rtol=1e-12)
    for grid in (vp, ve, edm_t, fm):
        assert grid.shape == (N + 1,) and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("disc", sorted(DISCRETIZATIONS))
def test_every_discretization_with_every_schedule(name, disc):
    """Each grid runs from σ_max to σ_min; iddpm's from the largest to the smallest iDDPM level in [σ_min, σ_max]; on
    the iddpm schedule, from the level nearest σ_max to the one nearest σ_min."""
    sched = edm.schedules.get(name)
    t = sched.time_steps(10, disc)
    assert t.shape == (11,) and t[-1] == 0 and (t[1:] < t[:-1]).all()
    sigma = sched.sigma(t[:-1])
    lo, hi = sched.sigma_min, sched.sigma_max
    levels = _iddpm_levels()
    if name == "iddpm":
        lo, hi = (min(levels, key=lambda u: abs(u - v)) for v in (lo, hi))
    elif disc == "iddpm":
        inside = [u for u in levels if lo <= u <= hi]
        lo, hi = min(inside), max(inside)
    torch.testing.assert_close(sigma[0], torch.tensor(hi, dtype=F64), rtol=1e-9, atol=0)
    torch.testing.assert_close(sigma[-1], torch.tensor(lo, dtype=F64), rtol=1e-9, atol=0)


def test_discretizations_have_their_shape_in_sigma():
    sched = EDM()
    sigma = sched.sigma(sched.time_steps(9, "geometric")[:-1])
    ratios = sigma[1:] / sigma[:-1]
    torch.testing.assert_close(ratios, ratios[0].expand_as(ratios))
    # log-SNR uniform: SNR = 1/σ², so it is geometric in σ too.
    torch.testing.assert_close(sched.time_steps(9, "log_snr"), sched.time_steps(9, "geometric"))
    rho3 = sched.sigma(sched.time_steps(9, "karras", rho=3.0)[:-1]) ** (1 / 3)
    torch.testing.assert_close(rho3[1:] - rho3[:-1], (rho3[1] - rho3[0]).expand(8))


def test_time_steps_dtype_and_single_step():
    t = EDM().time_steps(1, dtype=torch.float32)
    assert t.dtype == torch.float32 and t.tolist() == [80.0, 0.0]


def test_bad_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="schedule 'vpp' is not valid; choose one of: vp, ve, edm, fm, trigflow"):
        edm.schedules.get("vpp")
    with pytest.raises(ValueError, match="discretization 'cosine' is not valid; choose one of: uniform, geometric, karras, log_snr"):
        EDM().time_steps(4, "cosine")
    with pytest.raises(ValueError, match="num_steps"):
        EDM().time_steps(0)
    with pytest.raises(ValueError, match="bad option for schedule 've'"):
        edm.schedules.get("ve", rho=3)


def test_get_passes_options():
    assert edm.schedules.get("ve", sigma_max=50.0).sigma_max == 50.0
    assert edm.schedules.get("vp", beta_d=10.0).beta_d == 10.0


def test_a_spec_rebuilds_its_schedule():
    """from_spec inverts {"name", **fields} (what checkpoints store); None options keep the defaults."""
    import dataclasses

    for schedule in (edm.schedules.VP(beta_d=12.0, epsilon_s=1e-4), edm.schedules.VE(sigma_max=50.0), EDM(rho=5.0)):
        assert edm.schedules.from_spec({"name": schedule.name, **dataclasses.asdict(schedule)}) == schedule
        assert edm.schedules.from_spec(edm.schedules.to_spec(schedule)) == schedule
    assert edm.schedules.from_spec({"name": "edm", "sigma_min": None}) == EDM()
    with pytest.raises(ValueError, match="bad option for schedule 've'"):
        edm.schedules.from_spec({"name": "ve", "rho": 7.0})
    with pytest.raises(ValueError, match="num_steps must be a positive integer, got True"):
        EDM().time_steps(True)


def test_each_schedule_names_its_parameterization_for_the_precond_and_loss():
    """The precond and loss kinds a schedule defaults to: a row of EDM's Table 1, for the six of Table 1 their own
    (a new schedule may name an existing row: docs/design.md adds a row only for a parameterization of its own)."""
    from edm.core.losses import LOSS_KINDS, Loss
    from edm.core.precond import PRECOND_KINDS

    for name, cls in edm.schedules.SCHEDULES.items():
        assert cls.parameterization in PRECOND_KINDS and cls.parameterization in LOSS_KINDS
        assert Loss(cls()).kind == cls.parameterization
    assert all(edm.schedules.SCHEDULES[name].parameterization == name for name in TABLE_1)


def test_a_schedule_config_without_a_name_changes_fields_of_a_models_schedule():
    """sampling's schedule.sigma_max=40 alone: the model's schedule with that field replaced (its other fields
    kept); with a name, that schedule with its defaults and the given options."""
    from edm.core.schedules import ScheduleConfig

    model = EDM(sigma_min=0.01, rho=5.0)
    assert ScheduleConfig(sigma_max=40.0).build(model) == EDM(sigma_min=0.01, sigma_max=40.0, rho=5.0)
    assert ScheduleConfig().build(model) == model
    assert ScheduleConfig(name="edm", sigma_max=40.0).build(model) == EDM(sigma_max=40.0)
    assert ScheduleConfig(name="vp").build(model) == VP()
    with pytest.raises(ValueError, match="the model stores no schedule: pass schedule=NAME, NAME one of vp, ve, edm, fm, trigflow, iddpm"):
        ScheduleConfig(sigma_max=40.0).build()
    with pytest.raises(ValueError, match="bad option for schedule 'edm'"):
        ScheduleConfig(beta_d=3.0).build(model)


# ------------------------------------------------------------------ iDDPM


def test_iddpm_levels_follow_edm_table_1s_recurrence():
    """iddpm_sigmas (a closed form in float64) equals the recurrence; u_M = 0 and the levels decrease."""
    for M, C_1, C_2 in ((1000, 0.001, 0.008), (40, 0.02, 0.1)):
        u = edm.schedules.iddpm_sigmas(M, C_1, C_2)
        torch.testing.assert_close(u, torch.tensor(_iddpm_levels(M, C_1, C_2), dtype=F64), rtol=1e-10, atol=0)
        assert u[-1] == 0 and (u[1:] < u[:-1]).all()


def test_iddpm_range_and_default_grid_are_edm_table_1s():
    """σ_max 80 rounds to u_8 (j0 = 8) and σ_min is clamped to u_{M−1}; the default grid is
    t_i = u_⌊j0 + (M − 1 − j0) i/(N − 1) + ½⌋, ties included (exact integers)."""
    u = _iddpm_levels()
    sched = IDDPM()
    assert sched.sigma_max == 80.0 and sched.sigma_min == pytest.approx(u[999], rel=1e-12)
    assert u[8] == pytest.approx(80.2037, rel=1e-5) and u[999] == pytest.approx(0.0064254, rel=1e-4)
    for N in (1, 2, 18, 59, 256, 992):  # N = 59: i = 29 lands exactly on j = 8 + 495.5
        j = [8 + (2 * 991 * i + (N - 1)) // (2 * (N - 1)) if N > 1 else 8 for i in range(N)]
        assert j == [math.floor(8 + 991 * i / max(N - 1, 1) + 0.5) for i in range(N)] or N == 59
        torch.testing.assert_close(sched.time_steps(N), torch.tensor([u[k] for k in j] + [0.0], dtype=F64), rtol=1e-10, atol=0)
    assert int(IDDPM().index(IDDPM().time_steps(59)[29:30])) == 504  # 8 + 496: the tie ½ rounds up
    levels = _iddpm_levels(40, 0.001, 0.1)
    narrow = IDDPM(M=40, C_2=0.1, sigma_max=levels[3] * 1.01)
    torch.testing.assert_close(narrow.time_steps(3), torch.tensor([levels[3], levels[21], levels[39], 0.0], dtype=F64))
    assert IDDPM(M=4000).time_steps(1)[0] == pytest.approx(min(_iddpm_levels(4000), key=lambda v: abs(v - 80)))


def test_the_iddpm_grid_on_another_schedule_keeps_its_sigma_max_and_at_81_is_table_1s():
    """On EDM's schedule no level lies above σ_max: 80 starts at u_9; σ_max 81 (NVlabs' ablation_sampler's for this
    grid) gives the iddpm schedule's own grid, j0 = 8, to the last level."""
    u = _iddpm_levels()
    assert float(edm.schedules.get("edm").time_steps(18, "iddpm")[0]) == pytest.approx(u[9], rel=1e-12)
    table_1 = IDDPM().time_steps(18)
    torch.testing.assert_close(edm.schedules.get("edm", sigma_max=81.0).time_steps(18, "iddpm"), table_1, rtol=1e-12, atol=0)


def test_iddpm_rounds_a_samplers_times_to_its_nearest_noise_level():
    """Every grid of the iddpm schedule lies on its levels, each the nearest to the discretization's own σ."""
    u = torch.tensor(_iddpm_levels(), dtype=F64)
    sched = IDDPM()
    karras = edm.schedules.karras_sigma(sched, 18)
    nearest = u[(karras[:, None] - u).abs().argmin(1)]
    torch.testing.assert_close(sched.time_steps(18, "karras")[:-1], nearest, rtol=1e-10, atol=0)
    assert (nearest - karras).abs().max() > 0.3  # rounding moved them
    torch.testing.assert_close(sched.round_time(torch.tensor([75.0, 76.0, 1e-9], dtype=F64)),
                               torch.tensor([u[9], u[8], 0.0], dtype=F64), rtol=1e-10, atol=0)


def test_iddpm_refuses_a_grid_that_puts_two_steps_on_one_level():
    with pytest.raises(ValueError, match="100 steps of discretization karras on the iddpm schedule put two steps at one "
                                         "iDDPM noise level \\(σ = 80.2\\), of the 992 in its \\[σ_min, σ_max\\]: use "
                                         "fewer steps, or discretization iddpm, which spaces up to 992 steps apart"):
        IDDPM().time_steps(100, "karras")
    assert len(IDDPM().time_steps(992).unique()) == 993
    with pytest.raises(ValueError, match="993 steps of discretization iddpm on the iddpm schedule"):
        IDDPM().time_steps(993)
    with pytest.raises(ValueError, match="995 steps of discretization iddpm on the vp schedule .* of the 993 in its "
                                         "\\[σ_min, σ_max\\]: use at most 993 steps$"):
        VP().time_steps(995, "iddpm")


def test_iddpm_options_are_checked_and_its_range_clamped_to_its_levels():
    """M is an integer ≥ 2 (Hydra's 1000.0 is 1000), 0 < C_1 < 1 (C_1 = 1 makes every level 0); σ_min and σ_max are
    clamped to [u_{M−1}, u_0], where the network was trained."""
    assert IDDPM(M=500.0) == IDDPM(M=500) and isinstance(IDDPM(M=500.0).M, int)
    with pytest.raises(ValueError, match="M=2.5 must be an integer ≥ 2"):
        IDDPM(M=2.5)
    with pytest.raises(ValueError, match="needs 0 < C_1 < 1"):
        IDDPM(C_1=1.0)
    u = _iddpm_levels()
    assert IDDPM(sigma_min=0.0).sigma_min == pytest.approx(u[999]) and IDDPM(sigma_max=1e9).sigma_max == pytest.approx(u[0])
    assert IDDPM(sigma_max=40.0).time_steps(1)[0] == pytest.approx(min(u, key=lambda v: abs(v - 40)))
    with pytest.raises(ValueError, match="bad option for schedule 'iddpm'"):
        edm.schedules.get("iddpm", rho=5.0)


@pytest.mark.parametrize("name,options,named", [
    ("edm", {"sigma_min": 1.0, "sigma_max": 1.0}, "sigma_min=1, sigma_max=1"),
    ("edm", {"sigma_min": 100.0}, "sigma_min=100, sigma_max=80"),
    ("ve", {"sigma_max": -5.0}, "sigma_min=0.02, sigma_max=-5"),
    ("fm", {"sigma_min": float("nan")}, "sigma_min=nan"),
    ("trigflow", {"sigma_max": float("inf")}, "sigma_max=inf"),
    ("vp", {"beta_d": -30.0}, "beta_d=-30"),
    ("vp", {"epsilon_s": 0.0}, "epsilon_s=0"),
    ("edm", {"rho": 0.0}, "rho=0"),
    ("trigflow", {"sigma_data": 0.0}, "sigma_data=0"),
])
def test_a_schedule_outside_its_domain_is_refused_when_made_naming_the_values(name, options, named):
    """Made, not when a grid or a loss meets NaN: a degenerate or inverted σ range, a non-finite one, VP's β_d ≤ 0 or
    ε_s = 0, EDM's ρ ≤ 0, TrigFlow's σ_d ≤ 0."""
    with pytest.raises(ValueError, match=f"{name} schedule: .*{re.escape(named)}"):
        edm.schedules.get(name, **options)


def test_time_steps_default_to_the_schedules_own_grid_and_rho():
    """time_steps(sched, N) is sched.time_steps(N): the schedule's discretization and, for EDM, its ρ."""
    for sched in (VP(), VE(), EDM(rho=5.0), IDDPM()):
        torch.testing.assert_close(edm.schedules.time_steps(sched, 6), sched.time_steps(6), rtol=0, atol=0)
    torch.testing.assert_close(EDM(rho=5.0).time_steps(6), EDM().time_steps(6, rho=5.0), rtol=0, atol=0)
