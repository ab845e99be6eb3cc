"""The exponential moving average of the weights (EDM's half-life form)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ema_beta", "update_ema"]


def ema_beta(cur_nimg: int, batch_size: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    """β = 0.5^(B / max(h, 1e-8)), h = min(halflife_kimg·1000, cur_nimg·rampup_ratio)  (EDM)."""
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """θ_ema ← β θ_ema + (1 − β) θ for parameters; buffers are copied."""
    ema_params = list(ema.parameters())
    if ema_params:
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
