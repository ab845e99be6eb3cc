"""Paired comparisons of scores: two arms scored on the same seeds.

With d_k = b_k − a_k for seeds k = 1..n, the mean paired difference d̄ has the 95 % interval
d̄ ± t_{0.975, n−1} · s_d / √n (Student's t, s_d the sample standard deviation of the d_k). Pairing
removes what the seed does to both arms alike (initial weights, data order, noise), so the interval
is narrower than that of two independent means whenever the arms' scores move together.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from typing import Sequence

__all__ = ["student_t_cdf", "student_t_quantile", "mean_sd", "PairedDifference", "paired_difference"]


def student_t_cdf(x: float, df: float) -> float:
    """P(T ≤ x) for Student's t with `df` degrees of freedom from the tail P(T ≤ −|x|) = ½ I_{df/(df+x²)}(df/2, ½)
    = ½ − ½ I_{x²/(df+x²)}(½, df/2), the regularized incomplete beta function evaluated by its continued fraction
    (Numerical Recipes §6.4), and 1 − the tail for x > 0. The second form is taken only where its fraction converges
    as it is (x² (df + 2) < 3 df: |x| < √3, where the tail is above 4 %, so ½ − ½ I loses no digit that matters),
    the first everywhere else: neither argument rounds nor does _incomplete_beta take 1 − z, and the tail keeps its
    relative precision however far out x lies, also for many degrees of freedom (at df = 100 it is 5e-17 at x = −√df)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if x * x * (df + 2) < 3 * df:
        tail = 0.5 - 0.5 * _incomplete_beta(0.5, df / 2, x * x / (df + x * x))
    else:
        tail = 0.5 * _incomplete_beta(df / 2, 0.5, df / (df + x * x))
    return tail if x <= 0 else 1.0 - tail


def _incomplete_beta(a: float, b: float, z: float) -> float:
    """I_z(a, b) = z^a (1 − z)^b / (a B(a, b)) · 1/(1 + d_1/(1 + d_2/(1 + ...))), using the symmetry
    I_z(a, b) = 1 − I_{1−z}(b, a) where the fraction converges slowly."""
    if z <= 0 or z >= 1:
        return 0.0 if z <= 0 else 1.0
    if z > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(b, a, 1 - z)
    log_front = a * math.log(z) + b * math.log1p(-z) - math.log(a) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    # Lentz's method for the continued fraction with d_{2m+1} = −(a+m)(a+b+m)z / ((a+2m)(a+2m+1)),
    # d_{2m} = m(b−m)z / ((a+2m−1)(a+2m)).
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * z / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * z / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * z / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f


@functools.lru_cache(maxsize=256)
def student_t_quantile(p: float, df: float) -> float:
    """x with P(T ≤ x) = p for Student's t with `df` degrees of freedom: bisection on student_t_cdf in the lower
    tail, where it keeps its relative precision; x(p) = −x(1 − p) above ½ (1 − p is exact there)."""
    if not 0 < p < 1:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p >= 0.5:
        return 0.0 if p == 0.5 else -student_t_quantile(1 - p, df)
    lo, hi = -1.0, 0.0
    while student_t_cdf(lo, df) > p:
        lo, hi = 2 * lo, lo
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with n − 1; nan for one value)."""
    if not values:
        raise ValueError("no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


@dataclass(frozen=True)
class PairedDifference:
    """d̄ = mean_k(b_k − a_k) over n pairs, its sample sd, and the `level` interval d̄ ± t·s_d/√n."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    level: float = 0.95

    def excludes_zero(self) -> bool:
        """Whether the interval lies on one side of 0 (the arms differ at this level)."""
        return self.low > 0 or self.high < 0


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedDifference:
    """The paired difference b − a of two arms scored on the same n seeds (a[k] and b[k] share seed k)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same seeds: {len(a)} against {len(b)}")
    mean, sd = mean_sd([y - x for x, y in zip(a, b)])
    n = len(a)
    half = student_t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n) if n > 1 else math.inf
    return PairedDifference(n, mean, sd, mean - half, mean + half, level)
