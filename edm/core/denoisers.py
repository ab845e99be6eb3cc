"""Denoisers D(x̂; σ, class_labels) besides a trained Precond, and wrappers around any denoiser.

- IdealDenoiser: the exact D(x̂; σ) = E[y | x̂] = Σ_k w_k y_k of a finite data set,
  w = softmax_k(−‖x̂ − y_k‖² / (2σ²))  (EDM Appendix B.3).
- GuidedDenoiser: classifier-free guidance and autoguidance, optionally within a σ interval.
- AutocastDenoiser and fast_denoiser: the network under bf16/fp16 autocast and torch.compile.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..choices import choose
from ..hardware import MIXED_PRECISION

__all__ = ["IdealDenoiser", "GuidedDenoiser", "check_guidance_weight", "AutocastDenoiser", "fast_denoiser", "boundary_sigma"]


def _softmax(logits: Tensor) -> Tensor:
    """Row-wise softmax exp(l − max l) / Σ exp(l − max l).

    Written out because torch.softmax on small CPU tensors can stall for milliseconds in
    OpenMP barriers when the cores are busy; these element-wise ops do not.
    """
    w = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    return w / w.sum(dim=1, keepdim=True)


class IdealDenoiser(nn.Module):
    """Exact E[y | x̂ = y + σn] for y uniform over the rows of `data` [K, ...].

    With `labels` ([K] integers) the posterior of a class-conditional call is restricted to
    the points of the requested class (`class_labels` as integers [B] or one-hot [B, L]).
    """

    def __init__(self, data: Tensor, labels: Tensor | None = None, chunk_size: int = 4096) -> None:
        super().__init__()
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f"data must have shape [K, ...] with K >= 1, got {list(data.shape)}")
        if not torch.isfinite(data).all():
            raise ValueError("data contains NaN or Inf values")
        if labels is not None and labels.shape != data.shape[:1]:
            raise ValueError(f"labels must have shape [K] = {list(data.shape[:1])}, got {list(labels.shape)}")
        flat = data.reshape(data.shape[0], -1)
        self.register_buffer("data", flat)
        self.register_buffer("half_sq_norm", 0.5 * (flat**2).sum(dim=1))
        self.register_buffer("labels", None if labels is None else labels.long())
        self.item_shape = tuple(data.shape[1:])
        self.chunk_size = chunk_size

    def log_weights(self, x_hat: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """ln w_k up to a constant per row: (x̂·y_k − ½‖y_k‖²)/σ²; the ‖x̂‖² term cancels in the softmax."""
        x = x_hat.reshape(x_hat.shape[0], -1).to(self.data.dtype)
        score = x @ self.data.T - self.half_sq_norm  # [B, K]
        sigma2 = sigma.to(score.dtype).reshape(-1, 1) ** 2
        # σ = 0: the posterior is a point mass on the nearest data point.
        nearest = torch.where(score == score.amax(dim=1, keepdim=True), 0.0, -torch.inf)
        logits = torch.where(sigma2 > 0, score / sigma2.clamp_min(torch.finfo(score.dtype).tiny), nearest)
        if class_labels is not None:
            logits = logits + self._class_mask(class_labels, x.shape[0])
        return logits

    def _class_mask(self, class_labels: Tensor, batch: int) -> Tensor:
        """0 for points of the requested class, −inf elsewhere."""
        if self.labels is None:
            raise ValueError("class_labels given, but the IdealDenoiser was built without `labels`")
        wanted = class_labels.argmax(dim=1) if class_labels.ndim == 2 else class_labels.long()
        if wanted.shape != (batch,):
            raise ValueError(f"class_labels must describe {batch} items, got shape {list(class_labels.shape)}")
        match = wanted.reshape(-1, 1) == self.labels.reshape(1, -1)
        if not match.any(dim=1).all():
            raise ValueError("a requested class has no data points")
        zero = torch.zeros((), dtype=self.data.dtype, device=self.data.device)
        return torch.where(match, zero, -torch.inf)

    def forward(self, x_hat: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """Σ_k softmax_k(−‖x̂ − y_k‖²/(2σ²)) y_k, batched over x̂ [B, ...] and σ [B] (or scalar)."""
        if tuple(x_hat.shape[1:]) != self.item_shape:
            raise ValueError(f"x_hat items have shape {list(x_hat.shape[1:])}, data items {list(self.item_shape)}")
        sigma = torch.as_tensor(sigma, dtype=x_hat.dtype, device=x_hat.device).expand(x_hat.shape[0])
        out = []
        for start in range(0, x_hat.shape[0], self.chunk_size):
            part = slice(start, start + self.chunk_size)
            labels = None if class_labels is None else class_labels[part]
            out.append(_softmax(self.log_weights(x_hat[part], sigma[part], labels)) @ self.data)
        return torch.cat(out).reshape(x_hat.shape).to(x_hat.dtype)


def boundary_sigma(denoiser: Callable[..., Tensor]) -> float:
    """σ_b of a consistency function's boundary f(x̂; σ_b) = x̂ (Precond's boundary_sigma), through the wrappers that
    hold their denoiser as `.denoiser` (GuidedDenoiser, AutocastDenoiser; torch.compile forwards attributes); 0 for a
    plain denoiser."""
    while not hasattr(denoiser, "boundary_sigma") and hasattr(denoiser, "denoiser"):
        denoiser = denoiser.denoiser
    return float(getattr(denoiser, "boundary_sigma", 0.0))


def check_guidance_weight(weight: float) -> None:
    """Refuse a guidance weight that is not a finite number (NaN or ±inf would turn every guided sample into NaN)."""
    if not math.isfinite(weight):
        raise ValueError(f"guidance={weight}: the guidance weight must be a finite number (1 = no guidance, e.g. "
                         "guidance=2)")


class GuidedDenoiser(nn.Module):
    """Guidance: D_w(x̂; σ, c) = D_g + w·(D(x̂; σ, c) − D_g) where σ ∈ (σ_lo, σ_hi], else D(x̂; σ, c).

    - Classifier-free (Ho & Salimans 2022; guide=None): D_g = D(x̂; σ, ∅), the same network with
      null (zero) labels; both calls share one forward pass of twice the batch.
    - Autoguidance (Karras et al. 2024; guide = another denoiser of the same task, e.g. a smaller
      or shorter-trained one): D_g = guide(x̂; σ, c), which works for unconditional models too.
    - Guidance interval (Kynkäänniemi et al. 2024): only σ ∈ (σ_lo, σ_hi] is guided; elsewhere
      the main denoiser alone runs, so the guide's evaluation is saved there.

    w = 1 is the main denoiser exactly (no guide call). `evaluations` counts network evaluations of
    single images (main and guide; a call on B images adds B or 2B), so evaluations / images is the NFE
    per image, guidance and solvers that evaluate a subset of the batch (dpm_adaptive) included.
    """

    def __init__(
        self, denoiser: Callable[..., Tensor], weight: float, guide: Callable[..., Tensor] | None = None,
        interval: tuple[float, float] = (0.0, math.inf),
    ) -> None:
        super().__init__()
        check_guidance_weight(weight)
        lo, hi = float(interval[0]), float(interval[1])
        if not 0 <= lo < hi:
            raise ValueError(f"guidance interval ({lo}, {hi}] must satisfy 0 <= sigma_lo < sigma_hi")
        self.denoiser, self.guide = denoiser, guide
        self.weight, self.interval = float(weight), (lo, hi)
        self.evaluations = 0

    def active(self, sigma: Tensor) -> Tensor:
        """Where guidance applies: σ_lo < σ ≤ σ_hi, per item."""
        lo, hi = self.interval
        return (sigma > lo) & (sigma <= hi)

    def _guide(self, x_hat: Tensor, sigma: Tensor, class_labels: Tensor | None, **kwargs) -> tuple[Tensor, Tensor]:
        """(D, D_g) at the same points: one batched call for classifier-free guidance, two otherwise."""
        if self.guide is not None:
            return self.denoiser(x_hat, sigma, class_labels, **kwargs), self.guide(x_hat, sigma, class_labels, **kwargs)
        if class_labels is None:
            raise ValueError("classifier-free guidance needs class labels; give a guide model (autoguidance) "
                             "to guide an unconditional one")
        both = self.denoiser(torch.cat([x_hat, x_hat]), torch.cat([sigma, sigma]),
                             torch.cat([class_labels, torch.zeros_like(class_labels)]),
                             **{key: torch.cat([value, value]) for key, value in kwargs.items()})
        d, d_guide = both.chunk(2)
        return d, d_guide

    def forward(self, x_hat: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None, **kwargs) -> Tensor:
        """The guided D(x̂; σ); keyword arguments (e.g. sigma_r, [B] tensors) go to both denoisers."""
        if self.weight == 1.0:  # no guidance: the main denoiser, without a host sync
            self.evaluations += x_hat.shape[0]
            return self.denoiser(x_hat, sigma, class_labels, **kwargs)
        sigma = torch.as_tensor(sigma, dtype=x_hat.dtype, device=x_hat.device).expand(x_hat.shape[0])
        active = self.active(sigma)
        if not bool(active.any()):
            self.evaluations += x_hat.shape[0]
            return self.denoiser(x_hat, sigma, class_labels, **kwargs)
        self.evaluations += 2 * x_hat.shape[0]
        d, d_guide = self._guide(x_hat, sigma, class_labels, **kwargs)
        guided = d_guide + self.weight * (d - d_guide)
        return guided if bool(active.all()) else torch.where(active.view((-1,) + (1,) * (x_hat.ndim - 1)), guided, d)


class AutocastDenoiser(nn.Module):
    """D(x̂; σ) with the network under torch.autocast(`dtype`); the result comes back in x̂'s dtype.

    The sampler state, σ and the preconditioning stay in x̂'s dtype; only autocast-eligible
    network ops (convolutions, matmuls, attention) run in bf16/fp16.
    """

    def __init__(self, denoiser: Callable[..., Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.dtype = dtype

    def forward(self, x_hat: Tensor, sigma: Tensor, class_labels: Tensor | None = None, **kwargs) -> Tensor:
        with torch.autocast(x_hat.device.type, dtype=self.dtype):
            out = self.denoiser(x_hat, sigma, class_labels, **kwargs)
        return out.to(x_hat.dtype)


def fast_denoiser(
    denoiser: nn.Module, mixed_precision: str = "no", compile: bool = False, channels_last: bool = False
) -> Callable[..., Tensor]:
    """The sampling fast path: `denoiser` under bf16/fp16 autocast (`mixed_precision`) and/or torch.compile.

    compile wraps the whole denoiser (network and preconditioning in one graph; the solver's
    arithmetic stays eager). A batch of another size compiles once more. channels_last
    converts the denoiser's weights to NHWC in place (convolutions then return NHWC).
    """
    dtype = choose(MIXED_PRECISION, mixed_precision, "mixed_precision")
    if channels_last:
        denoiser = denoiser.to(memory_format=torch.channels_last)
    fast: Callable[..., Tensor] = denoiser if dtype is None else AutocastDenoiser(denoiser, dtype)
    return torch.compile(fast) if compile else fast
