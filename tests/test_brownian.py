"""Brownian-tree noise: hashed normals, one consistent path per seed, and SDE samples that converge as the grid is
refined instead of changing with it."""

import math

import pytest
import torch

import edm
from edm.core.brownian import BrownianTree, hashed_normal

F64 = torch.float64


def test_hashed_normals_are_standard_normal_and_depend_on_every_key():
    """10⁶ draws: mean and variance within 5 standard errors, Kolmogorov–Smirnov below its 1 % value; another seed,
    node or element gives other numbers."""
    seeds = torch.arange(1000, dtype=torch.int64)
    z = hashed_normal(seeds, torch.full_like(seeds, 7), 1000, F64).flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n) and abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    cdf = 0.5 * torch.erfc(-z.sort().values / math.sqrt(2))
    i = torch.arange(1, n + 1, dtype=F64)
    assert torch.maximum(i / n - cdf, cdf - (i - 1) / n).max() < 1.63 / math.sqrt(n)
    a = hashed_normal(seeds[:2], torch.tensor([7, 7]), 4, F64)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a, hashed_normal(seeds[:2], torch.tensor([8, 8]), 4, F64))


def test_one_seed_is_one_path_whatever_is_queried():
    """W at a point does not depend on what was queried before, increments over a split interval add up, and
    increments over disjoint intervals have variance their length and are uncorrelated (4000 paths)."""
    tree = BrownianTree((4000, 3), torch.arange(4000), 0.0, 80.0, dtype=F64)
    first = tree(13.7)
    tree(0.3), tree(70.0)
    torch.testing.assert_close(tree(13.7), first, rtol=0, atol=0)
    torch.testing.assert_close(tree(40.0) - tree(2.0), (tree(40.0) - tree(9.5)) + (tree(9.5) - tree(2.0)))
    d1, d2 = tree(10.0) - tree(2.0), tree(50.0) - tree(10.0)
    n = d1.numel()
    assert abs(d1.var().item() / 8.0 - 1) < 5 * math.sqrt(2 / n) and abs(d2.var().item() / 40.0 - 1) < 5 * math.sqrt(2 / n)
    corr = (d1 * d2).mean() / (d1.std() * d2.std())
    assert abs(corr.item()) < 5 / math.sqrt(n)
    assert torch.equal(tree(0.0), torch.zeros(4000, 3, dtype=F64))


@pytest.mark.parametrize("solver, options", [("euler_ancestral", {}), ("dpmpp_2m_sde", {}), ("euler_maruyama", {}),
                                             ("dpm_fast", {"eta": 1.0})])
def test_refining_the_grid_converges_to_one_sample_with_brownian_noise(solver, options):
    """Gaussian data (its exact denoiser), the same seeds at 32, 64, ..., 512 steps: with Brownian-tree noise the
    samples approach one another as the grid is refined (the strong error of the scheme falls); with fresh noise per
    step they stay as far apart as two independent samples."""
    g = torch.Generator().manual_seed(0)
    den = lambda x, sigma, labels=None: 0.5 + 0.09 / (0.09 + sigma[:, None] ** 2) * (x - 0.5)  # noqa: E731  N(0.5, 0.3²) data
    noise = torch.randn(16, 2, generator=g, dtype=F64)
    sched = edm.schedules.EDM(sigma_min=0.05)

    def run(steps, brownian):
        gens = [torch.Generator().manual_seed(100 + k) for k in range(16)]
        return edm.sample(den, noise, sched, num_steps=steps, solver=solver, generator=gens, brownian=brownian,
                          discretization="karras", **options)

    tree = [run(n, True) for n in (32, 64, 128, 256, 512)]
    gaps = [(a - b).norm().item() for a, b in zip(tree, tree[1:])]
    assert gaps[-1] < 0.5 * gaps[0], gaps
    fresh = [run(n, False) for n in (256, 512)]
    assert (fresh[0] - fresh[1]).norm().item() > 5 * gaps[-1], ((fresh[0] - fresh[1]).norm().item(), gaps)
