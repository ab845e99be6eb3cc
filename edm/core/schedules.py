"""Noise schedules as (σ(t), s(t)) pairs: x(t) = s(t)·(y + σ(t)·n)  (EDM section 2, Table 1).

Each schedule is a small frozen object with closed-form values and derivatives, the name of its
parameterization (the preconditioning and loss made for it) and its default time grid; time-step
discretizations are pure functions of (σ_min, σ_max, σ⁻¹) and combine with any schedule. A new
schedule is a class here (with its entry in SCHEDULES) and its configs/schedule/<name>.yaml.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..choices import choose

__all__ = [
    "Schedule",
    "VP",
    "VE",
    "EDM",
    "FlowMatching",
    "TrigFlow",
    "IDDPM",
    "SIGMA_DATA",
    "RHO",
    "get",
    "from_spec",
    "to_spec",
    "model_schedule",
    "ScheduleConfig",
    "SCHEDULES",
    "DISCRETIZATIONS",
    "time_steps",
    "check_num_steps",
    "uniform_t",
    "geometric_sigma",
    "karras_sigma",
    "log_snr_uniform",
    "iddpm_levels",
    "iddpm_sigmas",
    "iddpm_index",
]


SIGMA_DATA = 0.5  # σ_d, the standard deviation of the data (EDM's default for images in [−1, 1])
RHO = 7.0  # ρ of the karras discretization (EDM eq. 5); a schedule with a `rho` field uses its own


def _as_tensor(t: Tensor | float) -> Tensor:
    """Python numbers become float64 tensors; tensors keep their dtype and device."""
    return t if isinstance(t, Tensor) else torch.as_tensor(t, dtype=torch.float64)


class Schedule:
    """Base class: subclasses give σ(t), s(t), σ'(t), s'(t), σ⁻¹(σ) and a time range."""

    name: str = ""
    parameterization: str = ""  # the preconditioning and loss made for it: a key of PRECOND_KINDS and LOSS_KINDS
    default_discretization: str = "uniform"

    def sigma(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def scale(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def sigma_deriv(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def scale_deriv(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def sigma_inv(self, sigma: Tensor | float) -> Tensor:
        raise NotImplementedError

    @property
    def sigma_min(self) -> float:
        raise NotImplementedError

    @property
    def sigma_max(self) -> float:
        raise NotImplementedError

    def __post_init__(self) -> None:
        """0 ≤ σ_min < σ_max < ∞ (each schedule's own parameters are checked by its _check first)."""
        self._check()
        if not 0 <= self.sigma_min < self.sigma_max < math.inf:
            raise ValueError(f"{self.name} schedule: needs 0 ≤ sigma_min < sigma_max < inf; got sigma_min={self.sigma_min:g}, "
                             f"sigma_max={self.sigma_max:g} (schedule.sigma_min=..., schedule.sigma_max=...)")

    def _check(self) -> None:
        """Refuse parameters outside the schedule's domain (ValueError naming them)."""

    def round_time(self, t: Tensor) -> Tensor:
        """The time a sampler uses for t: t itself; a schedule of finitely many noise levels (IDDPM) rounds it to
        the time of the nearest one."""
        return t

    @property
    def t_min(self) -> float:
        """t at σ_min: the last nonzero time of the default grids."""
        return float(self.sigma_inv(torch.tensor(self.sigma_min, dtype=torch.float64)))

    @property
    def t_max(self) -> float:
        """t at σ_max: where sampling starts."""
        return float(self.sigma_inv(torch.tensor(self.sigma_max, dtype=torch.float64)))

    def time_steps(
        self,
        num_steps: int,
        discretization: str | None = None,
        *,
        rho: float | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """t_0 > ... > t_{N-1} > t_N = 0 (N + 1 values): `time_steps` of this schedule."""
        return time_steps(self, num_steps, discretization, rho=rho, dtype=dtype, device=device)


@dataclass(frozen=True)
class VP(Schedule):
    """Variance preserving (DDPM, Song et al. 2021): σ(t) = sqrt(exp(½β_d t² + β_min t) − 1), s = 1/sqrt(1 + σ²)."""

    beta_d: float = 19.9
    beta_min: float = 0.1
    epsilon_s: float = 1e-3
    t_end: float = 1.0
    name = "vp"
    parameterization = "vp"
    default_discretization = "uniform"

    def _check(self) -> None:
        """β_d > 0 (σ⁻¹ divides by it), β_min ≥ 0, 0 < ε_s < t_end."""
        if not (self.beta_d > 0 and self.beta_min >= 0 and 0 < self.epsilon_s < self.t_end < math.inf):
            raise ValueError(f"vp schedule: needs beta_d > 0, beta_min ≥ 0 and 0 < epsilon_s < t_end; got beta_d={self.beta_d:g}, "
                             f"beta_min={self.beta_min:g}, epsilon_s={self.epsilon_s:g}, t_end={self.t_end:g}")

    def __post_init__(self) -> None:
        """Only the parameters, in Python floats (σ_min, σ_max follow from them and would need tensors: Precond makes a
        VP inside compiled graphs)."""
        self._check()

    def _exponent(self, t: Tensor) -> Tensor:
        """½β_d t² + β_min t, the integral of the linear β(t)."""
        return 0.5 * self.beta_d * t**2 + self.beta_min * t

    def sigma(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return torch.expm1(self._exponent(t)).sqrt()

    def scale(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return torch.exp(-0.5 * self._exponent(t))

    def sigma_deriv(self, t: Tensor | float) -> Tensor:
        """σ'(t) = (β_d t + β_min) exp(½β_d t² + β_min t) / (2σ(t))."""
        t = _as_tensor(t)
        return (self.beta_d * t + self.beta_min) * torch.exp(self._exponent(t)) / (2 * self.sigma(t))

    def scale_deriv(self, t: Tensor | float) -> Tensor:
        """s'(t) = −½(β_d t + β_min) s(t)."""
        t = _as_tensor(t)
        return -0.5 * (self.beta_d * t + self.beta_min) * self.scale(t)

    def sigma_inv(self, sigma: Tensor | float) -> Tensor:
        """σ⁻¹(σ) = (sqrt(β_min² + 2β_d ln(σ² + 1)) − β_min) / β_d."""
        sigma = _as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)).sqrt() - self.beta_min) / self.beta_d

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(torch.tensor(self.epsilon_s, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(torch.tensor(self.t_end, dtype=torch.float64)))


@dataclass(frozen=True)
class VE(Schedule):
    """Variance exploding (SMLD/NCSN): σ(t) = sqrt(t), s(t) = 1."""

    sigma_min: float = 0.02  # type: ignore[assignment]
    sigma_max: float = 100.0  # type: ignore[assignment]
    name = "ve"
    parameterization = "ve"
    default_discretization = "geometric"

    def sigma(self, t: Tensor | float) -> Tensor:
        return _as_tensor(t).sqrt()

    def scale(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_as_tensor(t))

    def sigma_deriv(self, t: Tensor | float) -> Tensor:
        """σ'(t) = 1 / (2 sqrt(t))."""
        return 0.5 / _as_tensor(t).sqrt()

    def scale_deriv(self, t: Tensor | float) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def sigma_inv(self, sigma: Tensor | float) -> Tensor:
        """σ⁻¹(σ) = σ²."""
        return _as_tensor(sigma) ** 2


class _SigmaIsTime(Schedule):
    """σ(t) = t, s(t) = 1: the time is the noise level (EDM's and iDDPM's column of Table 1)."""

    def sigma(self, t: Tensor | float) -> Tensor:
        return _as_tensor(t).clone()

    def scale(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_as_tensor(t))

    def sigma_deriv(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_as_tensor(t))

    def scale_deriv(self, t: Tensor | float) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def sigma_inv(self, sigma: Tensor | float) -> Tensor:
        return _as_tensor(sigma).clone()


@dataclass(frozen=True)
class EDM(_SigmaIsTime):
    """EDM (Karras et al. 2022): σ(t) = t, s(t) = 1."""

    sigma_min: float = 0.002  # type: ignore[assignment]
    sigma_max: float = 80.0  # type: ignore[assignment]
    rho: float = RHO
    name = "edm"
    parameterization = "edm"
    default_discretization = "karras"

    def _check(self) -> None:
        if not self.rho > 0:
            raise ValueError(f"edm schedule: rho={self.rho:g} must be positive (EDM's: 7)")


@dataclass(frozen=True)
class FlowMatching(Schedule):
    """Flow matching / rectified flow: x_t = (1 − t) y + t n, i.e. σ(t) = t/(1 − t), s(t) = 1 − t."""

    sigma_min: float = 0.002  # type: ignore[assignment]
    sigma_max: float = 80.0  # type: ignore[assignment]
    name = "fm"
    parameterization = "fm"
    default_discretization = "uniform"

    def sigma(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return t / (1 - t)

    def scale(self, t: Tensor | float) -> Tensor:
        return 1 - _as_tensor(t)

    def sigma_deriv(self, t: Tensor | float) -> Tensor:
        """σ'(t) = 1 / (1 − t)²."""
        return 1 / (1 - _as_tensor(t)) ** 2

    def scale_deriv(self, t: Tensor | float) -> Tensor:
        return -torch.ones_like(_as_tensor(t))

    def sigma_inv(self, sigma: Tensor | float) -> Tensor:
        """σ⁻¹(σ) = σ / (1 + σ)."""
        sigma = _as_tensor(sigma)
        return sigma / (1 + sigma)


@dataclass(frozen=True)
class TrigFlow(Schedule):
    """TrigFlow (Lu & Song 2024, sCM): x_t = cos t·y + sin t·z with z ~ N(0, σ_d² I), t ∈ [0, π/2),
    i.e. σ(t) = σ_d tan t, s(t) = cos t."""

    sigma_min: float = 0.002  # type: ignore[assignment]
    sigma_max: float = 80.0  # type: ignore[assignment]
    sigma_data: float = SIGMA_DATA
    name = "trigflow"
    parameterization = "trigflow"
    default_discretization = "karras"

    def _check(self) -> None:
        if not self.sigma_data > 0:
            raise ValueError(f"trigflow schedule: sigma_data={self.sigma_data:g} must be positive")

    def sigma(self, t: Tensor | float) -> Tensor:
        return self.sigma_data * torch.tan(_as_tensor(t))

    def scale(self, t: Tensor | float) -> Tensor:
        return torch.cos(_as_tensor(t))

    def sigma_deriv(self, t: Tensor | float) -> Tensor:
        """σ'(t) = σ_d / cos² t."""
        return self.sigma_data / torch.cos(_as_tensor(t)) ** 2

    def scale_deriv(self, t: Tensor | float) -> Tensor:
        """s'(t) = −sin t."""
        return -torch.sin(_as_tensor(t))

    def sigma_inv(self, sigma: Tensor | float) -> Tensor:
        """σ⁻¹(σ) = arctan(σ / σ_d)."""
        return torch.atan(_as_tensor(sigma) / self.sigma_data)


def iddpm_sigmas(M: int, C_1: float, C_2: float, device: torch.device | str | None = None) -> Tensor:
    """iDDPM's noise levels u_0 > u_1 > ... > u_M = 0 in float64 (EDM Table 1, footnote):
    u_{j−1} = sqrt((u_j² + 1) / max(ᾱ_{j−1}/ᾱ_j, C_1) − 1) with ᾱ_j = sin²(π/2 · j / (M (C_2 + 1))), i.e.
    ln(u_j² + 1) = −Σ_{k=j+1}^{M} ln max(ᾱ_{k−1}/ᾱ_k, C_1) (M + 1 values: tens of microseconds). Computed on `device`,
    where they are used: a copy from the CPU would wait for a GPU's queued work at every call."""
    j = torch.arange(M + 1, dtype=torch.float64, device=device)
    alpha_bar = torch.sin(0.5 * math.pi * j / (M * (C_2 + 1))) ** 2
    log_ratio = torch.log((alpha_bar[:-1] / alpha_bar[1:]).clamp(min=C_1))  # ln max(ᾱ_{k−1}/ᾱ_k, C_1), k = 1..M
    log_v = torch.cat([-log_ratio.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64, device=device)])
    return torch.expm1(log_v).sqrt()


def _nearest(sigma: Tensor, u: Tensor) -> Tensor:
    """argmin_j |u_j − σ| (int64, σ's shape) for levels u on σ's device."""
    return (sigma.to(torch.float64).unsqueeze(-1) - u).abs().argmin(-1)


def iddpm_index(sigma: Tensor, M: int, C_1: float, C_2: float) -> Tensor:
    """argmin_j |u_j − σ| over iDDPM's levels u_0..u_M (iddpm_sigmas), in σ's shape and dtype, float32 at least (an
    index up to 1000 is not exact in bfloat16 or float16)."""
    u = iddpm_sigmas(M, C_1, C_2, sigma.device)
    return _nearest(sigma, u).to(torch.promote_types(sigma.dtype, torch.float32))


@dataclass(frozen=True)
class IDDPM(_SigmaIsTime):
    """Improved DDPM (Nichol & Dhariwal 2021) as EDM's Table 1 writes it: σ(t) = t, s(t) = 1 on iDDPM's M + 1
    noise levels u_j (iddpm_sigmas), where the network was trained: a sampler's times round to the nearest u_j
    (round_time), and σ_min, σ_max are clamped to [u_{M−1}, u_0] (as NVlabs/edm's samplers clamp them to the
    network's). σ_max 80 rounds to u_8 = 80.2, Table 1's j_0 = 8; σ_min 0.002 is clamped to u_{M−1} = 0.0064."""

    sigma_min: float = 0.002  # type: ignore[assignment]
    sigma_max: float = 80.0  # type: ignore[assignment]
    M: int = 1000
    C_1: float = 0.001
    C_2: float = 0.008
    name = "iddpm"
    parameterization = "iddpm"
    default_discretization = "iddpm"

    def __post_init__(self) -> None:
        """M is an integer (a config's 1000.0 is 1000) ≥ 2, 0 < C_1 < 1 (C_1 = 1 makes every level 0), C_2 ≥ 0;
        σ_min < σ_max, each clamped to [u_{M−1}, u_0]."""
        if isinstance(self.M, bool) or not float(self.M).is_integer() or self.M < 2:
            raise ValueError(f"iddpm schedule: M={self.M!r} must be an integer ≥ 2")
        object.__setattr__(self, "M", int(self.M))
        if not (0 < self.C_1 < 1 and self.C_2 >= 0 and 0 <= self.sigma_min < self.sigma_max):
            raise ValueError(f"iddpm schedule: needs 0 < C_1 < 1, C_2 ≥ 0 and 0 ≤ sigma_min < sigma_max; got "
                             f"C_1={self.C_1}, C_2={self.C_2}, sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")
        u = self.levels()
        lo, hi = float(u[self.M - 1]), float(u[0])
        for key in ("sigma_min", "sigma_max"):
            object.__setattr__(self, key, min(max(float(getattr(self, key)), lo), hi))

    def levels(self, device: torch.device | str | None = None) -> Tensor:
        """u_0 > ... > u_M = 0 (float64, on `device`: the CPU by default)."""
        return iddpm_sigmas(self.M, self.C_1, self.C_2, device)

    def index(self, sigma: Tensor) -> Tensor:
        """argmin_j |u_j − σ|, the index of the nearest noise level, in σ's dtype."""
        return iddpm_index(sigma, self.M, self.C_1, self.C_2)

    def round_time(self, t: Tensor) -> Tensor:
        """u_j nearest to t = σ."""
        u = self.levels(t.device)
        return u[_nearest(t, u)].to(t.dtype)


SCHEDULES: MappingProxyType[str, type[Schedule]] = MappingProxyType(
    {"vp": VP, "ve": VE, "edm": EDM, "fm": FlowMatching, "trigflow": TrigFlow, "iddpm": IDDPM}
)


def get(name: str, **kwargs) -> Schedule:
    """Build a schedule by name (a key of SCHEDULES) with keyword overrides of its defaults."""
    cls = choose(SCHEDULES, name, "schedule")
    try:
        return cls(**kwargs)
    except TypeError as err:
        fields = list(cls.__dataclass_fields__)
        raise ValueError(f"bad option for schedule {name!r}: {err}; valid options are {fields}") from None


def from_spec(spec: dict) -> Schedule:
    """The schedule of a spec {"name": ..., **options} (a checkpoint's "schedule"); None options keep defaults."""
    options = {k: v for k, v in spec.items() if k != "name" and v is not None}
    return get(spec["name"], **options)


def model_schedule(schedule: Schedule | None, how: str = "schedule=NAME") -> Schedule:
    """A model's schedule, or a ValueError that asks for one (`how`, naming the schedules) when it stores none."""
    if schedule is None:
        raise ValueError(f"the model stores no schedule: pass {how}, NAME one of {', '.join(SCHEDULES)}")
    return schedule


def to_spec(schedule: Schedule) -> dict:
    """{"name": ..., **every field}: the spec that rebuilds `schedule` with from_spec (checkpoints, records)."""
    return {"name": schedule.name, **dataclasses.asdict(schedule)}


def _options(self: Any) -> dict[str, float]:
    """The options that are set: the keyword arguments of `get`."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None}


def _build(self: Any, base: Schedule | None = None) -> Schedule:
    """get(name, **options()); with name None, `base` (a model's own schedule) with the set options replacing
    its fields. An option the schedule lacks is a ValueError naming the valid ones."""
    if self.name is not None:
        return get(self.name, **self.options())
    return from_spec({**to_spec(model_schedule(base)), **self.options()})


ScheduleConfig = dataclasses.make_dataclass(
    "ScheduleConfig",
    [("name", Optional[str], None)]
    + [(o, Optional[float], None) for o in sorted({f.name for cls in SCHEDULES.values() for f in dataclasses.fields(cls)})],
    namespace={
        "__doc__": "The `schedule` config group: a name (None: a model's own schedule) and every schedule's options; "
                   "None keeps the default (or the model's value).",
        "__module__": __name__, "options": _options, "build": _build,
    },
)


# --------------------------------------------------------------------------------------
# Discretizations: each returns the N nonzero times t_0 > ... > t_{N-1}; `time_steps` appends t_N = 0.


def _fractions(num_steps: int, dtype: torch.dtype, device) -> Tensor:
    """i / (N − 1) for i = 0..N−1 (just [0] when N = 1)."""
    i = torch.arange(num_steps, dtype=dtype, device=device)
    return i / max(num_steps - 1, 1)


def uniform_t(sched: Schedule, num_steps: int, *, dtype=torch.float64, device=None, **_) -> Tensor:
    """Uniform in t from t_max to t_min (EDM Table 1, VP: t_i = 1 + i/(N−1)(ε_s − 1))."""
    f = _fractions(num_steps, dtype, device)
    return (1 - f) * sched.t_max + f * sched.t_min


def geometric_sigma(sched: Schedule, num_steps: int, *, dtype=torch.float64, device=None, **_) -> Tensor:
    """Geometric in σ from σ_max to σ_min (EDM Table 1, VE: σ_i = σ_max (σ_min/σ_max)^{i/(N−1)})."""
    f = _fractions(num_steps, dtype, device)
    sigma = sched.sigma_max * (sched.sigma_min / sched.sigma_max) ** f
    return sched.sigma_inv(sigma)


def karras_sigma(sched: Schedule, num_steps: int, *, rho: float = RHO, dtype=torch.float64, device=None, **_) -> Tensor:
    """σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (EDM eq. 5)."""
    f = _fractions(num_steps, dtype, device)
    lo, hi = sched.sigma_min ** (1 / rho), sched.sigma_max ** (1 / rho)
    return sched.sigma_inv(((1 - f) * hi + f * lo) ** rho)


def log_snr_uniform(sched: Schedule, num_steps: int, *, dtype=torch.float64, device=None, **_) -> Tensor:
    """Uniform in log-SNR λ = −2 ln σ (DPM-Solver); SNR = 1/σ² for every schedule, so this is geometric in σ."""
    f = _fractions(num_steps, dtype, device)
    lam_max, lam_min = -2 * math.log(sched.sigma_min), -2 * math.log(sched.sigma_max)
    lam = (1 - f) * lam_min + f * lam_max
    return sched.sigma_inv(torch.exp(-0.5 * lam))


def _levels_inside(sched: Schedule) -> Tensor:
    """iDDPM's levels u_j in [σ_min, σ_max] of `sched`: of its own M, C_1, C_2, between the levels its σ_min and
    σ_max round to, when it is iddpm; else of IDDPM()'s, none above the schedule's σ_max (VP's t stays ≤ 1): EDM's
    σ_max 80 starts at u_9 = 71.3, where NVlabs' ablation_sampler passes σ_max 81 for this grid (u_8 = 80.2, Table
    1's j_0 = 8): schedule.sigma_max=81 gives its grid."""
    if isinstance(sched, IDDPM):
        u = sched.levels()
        lo, hi = u[_nearest(torch.tensor([sched.sigma_min, sched.sigma_max], dtype=torch.float64), u)].tolist()
    else:
        u, lo, hi = IDDPM().levels(), sched.sigma_min, sched.sigma_max
    return u[(u >= lo) & (u <= hi)]


def iddpm_levels(sched: Schedule, num_steps: int, *, dtype=torch.float64, device=None, **_) -> Tensor:
    """N of iDDPM's noise levels u_j, evenly spaced in j over the L in [σ_min, σ_max] (_levels_inside):
    j = ⌊(L − 1) i/(N − 1) + ½⌋ in exact integers, i.e. EDM Table 1's t_i = u_⌊j_0 + (M − 1 − j_0) i/(N − 1) + ½⌋ on
    the iddpm schedule (j_0 the index of the level its σ_max rounds to)."""
    inside = _levels_inside(sched).to(device)
    if len(inside) == 0:
        raise ValueError(f"discretization iddpm: no iDDPM noise level u_j lies in the {sched.name} schedule's "
                         f"[σ_min, σ_max] = [{sched.sigma_min:g}, {sched.sigma_max:g}]")
    i = torch.arange(num_steps, dtype=torch.int64, device=device)
    span = max(num_steps - 1, 1)
    j = (2 * (len(inside) - 1) * i + span) // (2 * span)
    return sched.sigma_inv(inside[j])


DISCRETIZATIONS: MappingProxyType[str, Callable[..., Tensor]] = MappingProxyType(
    {"uniform": uniform_t, "geometric": geometric_sigma, "karras": karras_sigma, "log_snr": log_snr_uniform,
     "iddpm": iddpm_levels}
)


def check_num_steps(num_steps: object) -> None:
    """A number of steps is a positive int (not a bool); ValueError naming the value otherwise."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")


def time_steps(
    sched: Schedule,
    num_steps: int,
    discretization: str | None = None,
    *,
    rho: float | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """The grid t_0 > ... > t_{N−1} > t_N = 0 of `discretization` for `sched` (N + 1 values), rounded as the
    schedule rounds a sampler's times; discretization None = the schedule's own, rho None = the schedule's ρ
    (EDM's field) or RHO."""
    check_num_steps(num_steps)
    discretization = discretization or sched.default_discretization
    rho = getattr(sched, "rho", RHO) if rho is None else rho
    fn = choose(DISCRETIZATIONS, discretization, "discretization")
    t = sched.round_time(fn(sched, num_steps, rho=rho, dtype=torch.float64, device=device))
    repeated = (t[1:] == t[:-1]).nonzero() if isinstance(sched, IDDPM) or discretization == "iddpm" else []
    if len(repeated):
        sigma = float(sched.sigma(t[int(repeated[0])]))
        count = len(_levels_inside(sched))
        raise ValueError(f"{num_steps} steps of discretization {discretization} on the {sched.name} schedule put two "
                         f"steps at one iDDPM noise level (σ = {sigma:.4g}), of the {count} in its [σ_min, σ_max]: use "
                         + (f"at most {count} steps" if discretization == "iddpm" else
                            f"fewer steps, or discretization iddpm, which spaces up to {count} steps apart"))
    return torch.cat([t, torch.zeros(1, dtype=t.dtype, device=t.device)]).to(dtype)
