"""Consistency models over any denoiser: ECT (Geng et al. 2024, "Consistency Models Made Easy") and
continuous-time consistency on TrigFlow (sCT and sCD; Lu & Song 2024).

The consistency function f(x̂; σ) is a preconditioned denoiser (edm.Precond): every precond row
has f(x̂; 0) = x̂, and boundary_sigma σ_b moves that boundary to f(x̂; σ_b) = x̂. ECT trains f
so that two points of one noise trajectory, x̂_t = y + t·n and x̂_r = y + r·n with r < t, map to
the same output:

    loss = w(t, r) · d(f(x̂_t; t), sg[f(x̂_r; r)]),   ln t ~ N(P_mean, P_std²),
    r = max(t · (1 − q^−(s+1) · n(t)), σ_b),   n(t) = 1 + k·sigmoid(−b·t),

where s is the stage (training images / stage_kimg, so Δt = t − r halves every stage), sg stops
the gradient, the target at r = σ_b is x̂_r itself (the boundary), both passes share the
dropout mask, and

    metric "pseudo_huber": d = sqrt(‖Δ‖² + c²) − c,  weighting "ect": w = 1/(t − r)
    metric "l2":           d = ‖Δ‖²,                 weighting "edm": w = λ(t) of the denoising loss

At r = σ_b = 0 the target is y and the loss is w(t, 0)·d(D(y + t·n; t), y): with metric l2 and
weighting edm, exactly the denoising loss of edm.Loss(kind="edm").

sCM works in TrigFlow's x_t = cos t·y + sin t·z (z = σ_d n, σ = σ_d tan t), where the consistency function
is f(x_t, t) = cos t·x_t − sin t·σ_d F(x_t, t). Any denoiser D(x̂; σ) is such an f, with
F(x_t, t) = (cos t·x_t − D(x_t/cos t; σ_d tan t)) / (σ_d sin t)  (for precond kind trigflow, its network), so sCM
tunes a model of any parameterization. With ln σ ~ N(P_mean, P_std²), t = arctan(σ/σ_d):

    dx_t/dt = cos t·z − sin t·y (sCT)  or  σ_d F_teacher(x_t, t) (sCD),
    (F⁻, cos t sin t·dF⁻/dt) = jvp(F_θ⁻, (x_t, t), (cos t sin t·dx_t/dt, cos t sin t))   (no gradient),
    g = −cos² t·(σ_d F⁻ − dx_t/dt) − ρ·cos t sin t·(x_t + σ_d dF⁻/dt),   g ← g / (rms(g) + c),
    loss = ‖F_θ(x_t, t) − F⁻ − g‖² / (σ·dim),

with the tangent warm-up ρ = min(1, images / warmup_kimg), c = 0.1, and the prior weight 1/σ = 1/(σ_d tan t); with a
boundary σ_b > 0, ln σ is truncated to σ > σ_b, as ECT's t (f is the consistency function above σ_b only).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..choices import check_choice
from .losses import LOGNORMAL, loss_weight
from .schedules import SIGMA_DATA

__all__ = [
    "ECTLoss", "SCMLoss", "ECT_METRICS", "ECT_WEIGHTINGS", "CONSISTENCY_OBJECTIVES", "SOLVER_OPTION", "samplers_for", "ect_r", "ect_gap",
    "check_ect_stages", "ECT_MIN_GAP", "pseudo_huber", "lognormal_above",
    "trigflow_F", "trigflow_tangent", "per_example", "same_draws", "forward_jvp",
]

CONSISTENCY_OBJECTIVES = ("ect", "sct", "scd")  # training objectives whose model is a consistency function, not a denoiser
ECT_METRICS = ("pseudo_huber", "l2")
ECT_WEIGHTINGS = ("ect", "edm")


SOLVER_OPTION = "sampler={}"  # how edm-sample picks a solver, NAME as {}: the default of the refusals' advice


def samplers_for(objective: str, option: str = SOLVER_OPTION) -> str:
    """The samplers of a model trained with `objective`, as a refusal names them: the consistency sampler alone for a
    consistency function; the MeanFlow sampler or an ODE solver for MeanFlow's average velocity; an ODE solver else.
    `option` is how the caller's command picks a solver, NAME as {} (edm-study: "solvers=[{}]")."""
    if objective in CONSISTENCY_OBJECTIVES:
        return option.format("consistency")
    ode = f"an ODE solver ({option.format('heun')})"
    return f"{option.format('meanflow')} or {ode}" if objective == "meanflow" else ode


def per_example(t: Tensor, like: Tensor) -> Tensor:
    """t [B] viewed as [B, 1, ..., 1], to scale the examples of `like` [B, ...]."""
    return t.reshape((-1,) + (1,) * (like.ndim - 1))


def same_draws(device: torch.device):
    """A region whose random draws (dropout masks) are undone on exit, so that the next pass of the network
    draws the same ones: the two passes of a few-step loss share one dropout mask."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def forward_jvp(fn: Callable[..., Tensor], primals: tuple, tangents: tuple) -> tuple[Tensor, Tensor]:
    """(fn(primals), its derivative along tangents) by forward-mode autodiff (torch.func.jvp); attention runs on
    SDPA's math kernel, which has a forward rule (the flash and memory-efficient kernels have none). torch's own
    deprecation warning from loading its forward-mode decompositions (torch.jit.script) is not shown."""
    from torch.func import jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        return jvp(fn, primals, tangents)


def ect_gap(t: Tensor, stage: int, q: float, k: float, b: float) -> Tensor:
    """ECT's Δt = t − r = t·q^−(stage+1)·(1 + k·sigmoid(−b·t)), computed as itself (t − r in float32 keeps few digits
    of a small Δt)."""
    return t * q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * t))


def ect_r(t: Tensor, stage: int, q: float, k: float, b: float) -> Tensor:
    """ECT's mapping r(t) = t·(1 − q^−(stage+1)·(1 + k·sigmoid(−b·t))) = t − Δt, clamped at 0."""
    return (t - ect_gap(t, stage, q, k, b)).clamp_min(0)


# The smallest relative gap Δt/t ≥ q^−(s+1) a stage may reach: 1024 float32 ulps (2^−13), so that x̂_t − x̂_r keeps
# about 10 bits. Past it r rounds towards t, d(f_t, f_r) has no gradient and the loss turns NaN.
ECT_MIN_GAP = 2.0**-13


def check_ect_stages(q: float, stage_kimg: float, total_kimg: float) -> None:
    """Refuse a run whose last stage s = ⌈total_kimg / stage_kimg⌉ − 1 has q^−(s+1) < ECT_MIN_GAP."""
    last = math.ceil(total_kimg / stage_kimg - 1e-9) - 1  # (a quotient that is whole up to round-off is whole)
    if q ** -(last + 1) < ECT_MIN_GAP:
        stages = math.floor(math.log(1 / ECT_MIN_GAP) / math.log(q) + 1e-9)  # the most stages float32 resolves
        least = math.ceil(total_kimg / stages * 1e4) / 1e4  # rounded up: the value named passes
        most = math.floor(stages * stage_kimg * 1e4) / 1e4  # rounded down: likewise
        raise ValueError(
            f"total_kimg={total_kimg:g} with ect.stage_kimg={stage_kimg:g} reaches ECT stage {last}, where t − r ≥ "
            f"t·{q:g}^−{last + 1} = {q ** -(last + 1):.2g}·t is below float32's resolution ({ECT_MIN_GAP:.2g}·t): the pair "
            f"x̂_t, x̂_r loses its difference and the loss turns NaN. At most {stages} stages: set ect.stage_kimg ≥ "
            f"{_kimg(least)} (ECT trains 8 stages) or total_kimg ≤ {_kimg(most)} (a resume keeps its run's "
            "ect.stage_kimg)")


def _kimg(value: float) -> str:
    """A value rounded to 4 decimals as written, all its digits kept (:g keeps 6 and may round it past the limit)."""
    return f"{value:.4f}".rstrip("0").rstrip(".")


def lognormal_above(
    batch: int, P_mean: float, P_std: float, floor: float = 0.0, *, generator=None, device=None, dtype=torch.float32,
) -> Tensor:
    """σ with ln σ ~ N(P_mean, P_std²), truncated to σ > floor when floor > 0 (a consistency function's boundary σ_b):
    z is carried through the normal CDF onto the tail above ln floor, so every draw is one z of the stream."""
    z = torch.randn(batch, generator=generator, device=device, dtype=dtype)
    if floor > 0:
        lo = 0.5 * math.erfc(-(math.log(floor) - P_mean) / (P_std * math.sqrt(2)))  # Φ(a)
        u = lo + (1 - lo) * torch.special.ndtr(z.double())
        z = torch.special.ndtri(u).to(dtype)
    return torch.exp(P_mean + P_std * z)


def pseudo_huber(delta: Tensor, c: float) -> Tensor:
    """Per-example sqrt(‖Δ‖² + c²) − c (‖Δ‖ at c = 0), summed over all but the batch dimension."""
    sq = delta.pow(2).flatten(1).sum(dim=1)
    return (sq + c**2).sqrt() - c


@dataclass(frozen=True)
class ECTLoss:
    """ECT's consistency loss (module docstring) around a consistency function f = a Precond.

    `at(cur_nimg)` gives the loss of the training step at cur_nimg (its stage); `boundary_sigma` and
    `sigma_data` come from the precond. The defaults are ECT's CIFAR-10 settings (locuslab/ect's run_ecm.sh: the
    stage advances every 3.2 Mimg, 8 stages in 25.6 Mimg; c = 0 makes the metric the L2 norm ‖Δ‖)."""

    sigma_data: float = SIGMA_DATA
    boundary_sigma: float = 0.0
    P_mean: float = -1.1
    P_std: float = 2.0
    q: float = 2.0
    k: float = 8.0
    b: float = 1.0
    stage_kimg: float = 3200.0
    metric: str = "pseudo_huber"
    c: float = 0.0
    weighting: str = "ect"
    stage: int = 0

    def __post_init__(self) -> None:
        check_choice(ECT_METRICS, self.metric, "ect.metric")
        check_choice(ECT_WEIGHTINGS, self.weighting, "ect.weighting")
        if not (self.q > 1 and self.stage_kimg > 0 and self.c >= 0 and self.P_std > 0):
            raise ValueError(f"ECT needs q > 1, stage_kimg > 0, c >= 0 and P_std > 0; got q={self.q}, "
                             f"stage_kimg={self.stage_kimg}, c={self.c}, P_std={self.P_std}")
        if self.metric == "l2" and self.c != 0:
            raise ValueError(f"ect.c={self.c} is the pseudo-Huber metric's c, which ect.metric=l2 does not use: drop "
                             "ect.c, or set ect.metric=pseudo_huber")

    kind = "ect"  # what logs and records call this loss
    learned_weighting = False  # no uncertainty head u(σ)

    def at(self, cur_nimg: int) -> "ECTLoss":
        """The loss of the step that starts at cur_nimg training images: stage ⌊cur_nimg / stage_kimg⌋."""
        stage = int(cur_nimg // (self.stage_kimg * 1000))
        return self if stage == self.stage else dataclasses.replace(self, stage=stage)

    def sample_t(self, batch: int, *, generator=None, device=None, dtype=torch.float32) -> Tensor:
        """ln t ~ N(P_mean, P_std²), truncated to t > σ_b when σ_b > 0 (lognormal_above)."""
        return lognormal_above(batch, self.P_mean, self.P_std, self.boundary_sigma, generator=generator, device=device,
                               dtype=dtype)

    def r(self, t: Tensor) -> Tensor:
        """The second point of the pair: ect_r at this stage, never below the boundary σ_b."""
        return ect_r(t, self.stage, self.q, self.k, self.b).clamp_min(self.boundary_sigma)

    def gap(self, t: Tensor) -> Tensor:
        """t − r of the pair that r(t) draws, as ect_gap (not a difference of rounded times), t − σ_b where r is σ_b."""
        return torch.minimum(ect_gap(t, self.stage, self.q, self.k, self.b), t - self.boundary_sigma)

    def weight(self, t: Tensor, gap: Tensor) -> Tensor:
        """w(t, r) with gap = t − r: 1/(t − r) (ect) or the denoising loss's λ(t) (edm)."""
        return 1 / gap if self.weighting == "ect" else loss_weight(t, "edm", self.sigma_data)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """d(a, b) per example."""
        delta = a - b
        return pseudo_huber(delta, self.c) if self.metric == "pseudo_huber" else delta.pow(2).flatten(1).sum(dim=1)

    def __call__(
        self,
        denoiser: Callable[..., Tensor],
        y: Tensor,
        class_labels: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        sigma: Tensor | None = None,
        r: Tensor | None = None,
        noise: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        """Per-example w(t, r)·d(f(y + t·n; t), sg f(y + r·n; r)), shape [B]; t (`sigma`), n and r are drawn
        (r from t) unless given."""
        if sigma is None and r is not None:
            raise ValueError("ECTLoss's r is the second point of the pair below t (sigma): give sigma with it, or neither")
        t = self.sample_t(y.shape[0], generator=generator, device=y.device, dtype=y.dtype) if sigma is None else sigma
        if noise is None:
            noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        r, gap = (self.r(t), self.gap(t)) if r is None else (r, t - r)
        kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
        x_r = y + per_example(r, y) * noise
        with same_draws(y.device):  # the target's pass replays this pass's dropout draws
            f_t = denoiser(y + per_example(t, y) * noise, t, class_labels, **kwargs)
        inside = r > self.boundary_sigma
        with torch.no_grad():
            r_safe = torch.where(inside, r, t)  # f at the boundary is x̂_r itself: no evaluation at σ = 0
            f_r = denoiser(x_r, r_safe, class_labels, **kwargs)
            target = torch.where(per_example(inside, y), f_r, x_r)
        return self.weight(t, gap) * self.distance(f_t, target)


def trigflow_F(
    denoiser: Callable[..., Tensor], x_t: Tensor, t: Tensor, sigma_data: float, class_labels: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """F(x_t, t) = (cos t·x_t − D(x_t/cos t; σ_d tan t)) / (σ_d sin t): the TrigFlow network output that makes
    the denoiser D sCM's f(x_t, t) = cos t·x_t − sin t·σ_d F."""
    cos, sin = per_example(torch.cos(t), x_t), per_example(torch.sin(t), x_t)
    D = denoiser(x_t / cos, sigma_data * torch.tan(t), class_labels, **kwargs)
    return (cos * x_t - D) / (sigma_data * sin)


def trigflow_tangent(
    denoiser: Callable[..., Tensor], x_t: Tensor, t: Tensor, dxt_dt: Tensor, sigma_data: float,
    class_labels: Tensor | None = None, **kwargs,
) -> tuple[Tensor, Tensor]:
    """(F(x_t, t), cos t sin t·dF/dt) along the trajectory dx_t/dt, by forward-mode autodiff (torch.func.jvp with
    tangents (cos t sin t·dx_t/dt, cos t sin t)): forward_jvp."""
    cs = torch.cos(t) * torch.sin(t)
    fn = lambda x, tt: trigflow_F(denoiser, x, tt, sigma_data, class_labels, **kwargs)  # noqa: E731
    return forward_jvp(fn, (x_t, t), (per_example(cs, x_t) * dxt_dt, cs))


@dataclass(frozen=True)
class SCMLoss:
    """sCM's continuous-time consistency loss on TrigFlow (module docstring): sCT, or sCD when `teacher` (a
    denoiser, frozen) gives dx_t/dt. `at(cur_nimg)` sets the tangent warm-up ρ; `boundary_sigma` and `sigma_data`
    come from the precond. The defaults are sCM's CIFAR-10
    settings (FastGen's config_scm: P_mean −1.0, P_std 1.4, TrigFlow's LOGNORMAL; c = 0.1, warm-up 10,000
    iterations of 512)."""

    sigma_data: float = SIGMA_DATA
    boundary_sigma: float = 0.0
    P_mean: float = LOGNORMAL["trigflow"][0]
    P_std: float = LOGNORMAL["trigflow"][1]
    tangent_c: float = 0.1
    warmup_kimg: float = 5120.0
    warmup: float = 0.0  # ρ of this step (set by `at`)
    teacher: Callable[..., Tensor] | None = dataclasses.field(default=None, compare=False, repr=False)

    learned_weighting = False

    def __post_init__(self) -> None:
        if not (self.P_std > 0 and self.tangent_c > 0 and self.warmup_kimg >= 0 and self.boundary_sigma >= 0):
            raise ValueError(f"sCM needs P_std > 0, tangent_c > 0, warmup_kimg >= 0 and boundary_sigma >= 0; got "
                             f"P_std={self.P_std}, tangent_c={self.tangent_c}, warmup_kimg={self.warmup_kimg}, "
                             f"boundary_sigma={self.boundary_sigma}")

    @property
    def kind(self) -> str:
        return "scd" if self.teacher is not None else "sct"

    def at(self, cur_nimg: int) -> "SCMLoss":
        """The loss of the step at cur_nimg: ρ = min(1, cur_nimg / warmup_kimg)."""
        warmup = 1.0 if self.warmup_kimg == 0 else min(1.0, cur_nimg / (self.warmup_kimg * 1000))
        return dataclasses.replace(self, warmup=warmup)

    def __call__(
        self,
        denoiser: Callable[..., Tensor],
        y: Tensor,
        class_labels: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        sigma: Tensor | None = None,
        noise: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        """Per-example ‖F_θ(x_t, t) − F⁻ − g‖² / (σ·dim), shape [B]; σ (t = arctan(σ/σ_d)) and n are drawn unless given."""
        if sigma is None:
            sigma = lognormal_above(y.shape[0], self.P_mean, self.P_std, self.boundary_sigma, generator=generator,
                                    device=y.device, dtype=y.dtype)
        if noise is None:
            noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        sd = self.sigma_data
        kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
        t = torch.atan(sigma / sd)
        cos, sin = per_example(torch.cos(t), y), per_example(torch.sin(t), y)
        z = sd * noise
        x_t = cos * y + sin * z
        if self.teacher is None:
            dxt_dt = cos * z - sin * y
        else:
            with torch.no_grad():
                dxt_dt = sd * trigflow_F(self.teacher, x_t, t, sd, class_labels, **kwargs)
        inner = getattr(denoiser, "module", denoiser)  # the forward-mode pass needs no gradient sync (DDP)
        with torch.no_grad(), same_draws(y.device):  # the gradient pass replays its dropout draws
            F_minus, dF = trigflow_tangent(inner, x_t, t, dxt_dt, sd, class_labels, **kwargs)
        F_theta = trigflow_F(denoiser, x_t, t, sd, class_labels, **kwargs)
        g = -cos**2 * (sd * F_minus - dxt_dt) - self.warmup * (cos * sin * x_t + sd * dF)
        rms = g.flatten(1).pow(2).mean(dim=1).sqrt()
        g = g / per_example(rms + self.tangent_c, g)
        dim = y[0].numel()
        return (F_theta - F_minus - g).pow(2).flatten(1).sum(dim=1) / (sigma * dim)
