"""Brownian-tree noise: one Brownian path W(σ) per image, the same whatever points a sampler queries it at.

An SDE solver's step from σ_i to σ_{i+1} takes the standardized increment (W(σ_{i+1}) − W(σ_i))/sqrt(|σ_{i+1} − σ_i|)
instead of fresh N(0, I) noise, so a seed fixes one path and refining the grid converges to one sample (as
k-diffusion's BrownianTreeNoiseSampler does with torchsde). The path is a binary tree of Brownian bridges over
[σ_lo, σ_hi]: W(σ_lo) = 0, W(σ_hi) ~ N(0, σ_hi − σ_lo), and each midpoint given its interval's ends is
N((W(l) + W(r))/2, (r − l)/4). Its normal draws are a counter-based hash (splitmix64) of (image seed, node,
element), so a query needs no stored state; below a width of tol·(σ_hi − σ_lo) the path is linear.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["BrownianTree", "hashed_normal"]

_MASK = (1 << 64) - 1


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= _MASK
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 bits."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(z: Tensor) -> Tensor:
    """splitmix64's finalizer on int64 tensors (wrapping arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ _shift(z, 30)) * _MIX1
    z = (z ^ _shift(z, 27)) * _MIX2
    return z ^ _shift(z, 31)


def hashed_normal(seeds: Tensor, node: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
    """N(0, 1) [B, numel], a pure function of (seed b, node b, element): Box–Muller on two hashed 53-bit uniforms."""
    element = torch.arange(numel, device=seeds.device, dtype=torch.int64)
    key = _splitmix64(_splitmix64(seeds[:, None] ^ _splitmix64(node[:, None])) + 2 * element)
    u1 = (_shift(_splitmix64(key), 11).double() + 0.5) / 2.0**53
    u2 = (_shift(_splitmix64(key + 1), 11).double() + 0.5) / 2.0**53
    return ((-2 * u1.log()).sqrt() * torch.cos(2 * math.pi * u2)).to(dtype)


class BrownianTree:
    """W(σ) for a batch of shape [B, ...], one path per image seed, on [sigma_lo, sigma_hi] (module docstring)."""

    def __init__(self, shape: Sequence[int], seeds: Sequence[int] | Tensor, sigma_lo: float, sigma_hi: float, *,
                 tol: float = 1e-6, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        if not 0 <= sigma_lo < sigma_hi:
            raise ValueError(f"BrownianTree needs 0 <= sigma_lo < sigma_hi, got [{sigma_lo}, {sigma_hi}]")
        self.shape, self.dtype = tuple(shape), dtype
        self.seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device).reshape(-1)
        if len(self.seeds) != self.shape[0]:
            raise ValueError(f"{len(self.seeds)} seeds for a batch of {self.shape[0]}")
        self.lo, self.hi = float(sigma_lo), float(sigma_hi)
        self.depth = max(1, math.ceil(math.log2(1 / tol)))
        self.numel = math.prod(self.shape[1:])
        zero = torch.zeros(len(self.seeds), self.numel, dtype=torch.float64, device=self.seeds.device)
        self._path = [(self.lo, self.hi, zero, math.sqrt(self.hi - self.lo) * self._draw(1), 1)]  # root: W(lo), W(hi)
        self._recent: dict[float, Tensor] = {}  # W at the last few points: a step's end is the next step's start

    def _draw(self, node: int) -> Tensor:
        nodes = torch.full_like(self.seeds, node)
        return hashed_normal(self.seeds, nodes, self.numel, torch.float64)

    def __call__(self, sigma: float) -> Tensor:
        """W(σ) [B, ...] (σ clamped to the tree's range). The last four values and the last descent (depth levels
        at most) are kept: a step's end is the next step's start, and consecutive queries share most of a descent."""
        s = min(max(float(sigma), self.lo), self.hi)
        if s not in self._recent:
            self._recent = {**dict(list(self._recent.items())[-3:]), s: self._descend(s)}
        return self._recent[s]

    def _descend(self, s: float) -> Tensor:
        """W(s) by bisection from the deepest level of the last descent whose interval holds s."""
        path = self._path
        while len(path) > 1 and not path[-1][0] <= s <= path[-1][1]:
            path.pop()
        left, right, w_left, w_right, node = path[-1]
        while len(path) <= self.depth and s not in (left, right):
            mid = 0.5 * (left + right)
            w_mid = 0.5 * (w_left + w_right) + 0.5 * math.sqrt(right - left) * self._draw(2 * node)
            if s < mid:
                right, w_right, node = mid, w_mid, 2 * node
            else:
                left, w_left, node = mid, w_mid, 2 * node + 1
            path.append((left, right, w_left, w_right, node))
        w = w_left if s == left else w_right if s == right else w_left + (s - left) / (right - left) * (w_right - w_left)
        return w.reshape(self.shape).to(self.dtype)

    def increment(self, sigma: float, sigma_next: float) -> Tensor:
        """(W(σ_next) − W(σ))/sqrt(|σ_next − σ|): N(0, I) for one step, the same for a step of any other grid that
        covers the same interval."""
        return (self(sigma_next) - self(sigma)) / math.sqrt(abs(sigma_next - sigma))
