"""edm/evaluation/stats.py: Student's t against its closed forms, and the paired interval's coverage."""

from __future__ import annotations

import math
import random
from statistics import NormalDist

import pytest

from edm.evaluation.stats import mean_sd, paired_difference, student_t_cdf, student_t_quantile


@pytest.mark.parametrize("x", [-30.0, -2.0, -0.3, 0.0, 0.7, 4.0, 100.0])
def test_t_cdf_with_one_and_two_degrees_of_freedom_is_the_closed_form(x):
    """df = 1 is Cauchy: ½ + atan(x)/π; df = 2: ½ + x / (2 sqrt(2 + x²))."""
    assert student_t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-12)
    assert student_t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-12)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_inverts_the_closed_forms_and_tends_to_the_normal(p):
    """df = 1: tan(π(p − ½)); df = 2: (2p − 1)/sqrt(2p(1 − p)); df → ∞: the normal quantile."""
    assert student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert student_t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert student_t_quantile(p, 1e6) == pytest.approx(NormalDist().inv_cdf(p), rel=1e-5)
    assert student_t_quantile(1 - p, 5) == pytest.approx(-student_t_quantile(p, 5), rel=1e-12)


@pytest.mark.parametrize("x", [1e3, 1e6, 1e9, 1e15])
def test_far_tails_of_t_keep_their_relative_precision(x):
    """P(T ≤ −x) = atan(1/x)/π (df = 1) and 1/(√(2 + x²)(√(2 + x²) + x)) (df = 2) to 1e-12 relative, where the
    tail is far below the float spacing of 1; so are the quantiles of such tails, tan(π(p − ½)) and (2p − 1)/√(2p(1 − p))."""
    cauchy, two = math.atan(1 / x) / math.pi, 1 / (math.sqrt(2 + x * x) * (math.sqrt(2 + x * x) + x))
    assert student_t_cdf(-x, 1) == pytest.approx(cauchy, rel=1e-12, abs=0)  # approx adds abs=1e-12 otherwise
    assert student_t_cdf(-x, 2) == pytest.approx(two, rel=1e-12, abs=0)
    assert student_t_quantile(cauchy, 1) == pytest.approx(-1 / math.tan(math.pi * cauchy), rel=1e-9)
    assert student_t_quantile(two, 2) == pytest.approx((2 * two - 1) / math.sqrt(2 * two * (1 - two)), rel=1e-9)


@pytest.mark.parametrize("df, x", [(30, 5.0), (100, 9.0), (1000, 30.0), (1e4, 30.0)])
def test_tails_of_many_degrees_of_freedom_keep_their_relative_precision(df, x):
    """Within √df of 0 the tail of a large df is still far below the float spacing of ½ (1e-142 at df = 1000,
    x = 30): P(T ≤ −x) = ½ I_{df/(df+x²)}(df/2, ½) to 1e-10 relative, the incomplete beta function taken from mpmath's
    hypergeometric series at 40 digits, and the quantile of that tail is −x."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(40):
        tail = float(mpmath.betainc(mpmath.mpf(df) / 2, 0.5, 0, df / (df + mpmath.mpf(x) ** 2), regularized=True) / 2)
    assert student_t_cdf(-x, df) == pytest.approx(tail, rel=1e-10, abs=0)
    assert student_t_quantile(tail, df) == pytest.approx(-x, rel=1e-9)


def test_t_cdf_of_odd_degrees_matches_its_closed_form():
    """df = 3: ½ + (1/π)(x/(√3 (1 + x²/3)) + atan(x/√3))."""
    for x in (-5.0, -1.0, 0.4, 2.5):
        closed = 0.5 + (x / (math.sqrt(3) * (1 + x * x / 3)) + math.atan(x / math.sqrt(3))) / math.pi
        assert student_t_cdf(x, 3) == pytest.approx(closed, abs=1e-12)


def test_paired_interval_is_mean_plus_minus_t_times_standard_error():
    d = paired_difference([1.0, 2.0, 4.0], [2.0, 3.25, 5.5])  # differences 1, 1.25, 1.5
    mean, sd = mean_sd([1.0, 1.25, 1.5])
    half = student_t_quantile(0.975, 2) * sd / math.sqrt(3)
    assert (d.n, d.mean, d.sd) == (3, mean, sd)
    assert (d.low, d.high) == pytest.approx((mean - half, mean + half))
    assert d.excludes_zero() and not paired_difference([1.0, 2.0, 4.0], [2.0, 2.5, 6.0]).excludes_zero()
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0], [1.0, 2.0])


def test_paired_interval_covers_the_true_difference_95_percent_of_the_time():
    """Scores a_k = s_k + e_k, b_k = s_k + δ + e'_k with a shared seed effect s_k much larger than the
    arms' noise: over 4000 trials of 5 seeds, the interval holds δ in 95 % of them (binomial sd 0.34 %),
    and it is much narrower than the spread of the scores themselves."""
    rng = random.Random(0)
    delta, hits, widths = 0.3, 0, []
    for _ in range(4000):
        seed_effect = [rng.gauss(0, 3) for _ in range(5)]
        a = [s + rng.gauss(0, 0.2) for s in seed_effect]
        b = [s + delta + rng.gauss(0, 0.2) for s in seed_effect]
        d = paired_difference(a, b)
        hits += d.low <= delta <= d.high
        widths.append(d.high - d.low)
    assert abs(hits / 4000 - 0.95) < 0.015
    assert sorted(widths)[2000] < 1.0  # the scores' own sd is 3
